//! lb-decap: attaches the backend-side decapsulation program to this host's interfaces and keeps
//! it there until SIGINT or SIGTERM. Run it on each backend; give it the VIPs the backend serves.

use std::net::IpAddr;

use anyhow::Context as _;
use clap::Parser;
use lb_userspace::{
    config::DEFAULT_GUE_PORT,
    dataplane::{decap::attach_decap_with, kernel::AttachMode},
};

#[derive(Parser, Debug)]
#[command(
    name = "lb-decap",
    version,
    about = "Strip the load balancer's IPIP and GUE encapsulation on a backend"
)]
struct Args {
    /// Interface that receives encapsulated packets (repeatable).
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// A VIP address this backend serves (repeatable).
    #[arg(long = "vip", required = true)]
    vips: Vec<IpAddr>,
    /// GUE packets to this UDP port are decapsulated too (the GUE port of lbd's settings);
    /// 0: IPIP only.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_GUE_PORT)]
    gue_port: u16,
    /// native, generic or auto.
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let gue_port = (args.gue_port != 0).then_some(args.gue_port);
    let _handle = attach_decap_with(&args.ifaces, args.xdp_mode, &args.vips, gue_port)
        .context("attaching lb_decap")?;
    eprintln!(
        "lb-decap: decapsulating for {:?} on {:?}",
        args.vips, args.ifaces
    );
    wait_for_termination()
}

fn wait_for_termination() -> anyhow::Result<()> {
    // Block SIGINT and SIGTERM and wait for either; the programs detach when `_handle` drops.
    // SAFETY: plain libc signal-set calls on a local, zero-initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) != 0 {
            anyhow::bail!("blocking signals failed");
        }
        let mut sig = 0;
        if libc::sigwait(&raw const set, &raw mut sig) != 0 {
            anyhow::bail!("sigwait failed");
        }
    }
    Ok(())
}
