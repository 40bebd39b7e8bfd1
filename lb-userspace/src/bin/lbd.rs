//! lbd, the load balancer agent: argument parsing and logging setup only; the work is in
//! `lb_userspace::agent`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use lb_common::maps;
use lb_userspace::{
    agent::{self, AgentOptions},
    dataplane::kernel::{AttachMode, LoadOptions},
};

#[derive(Parser, Debug)]
#[command(name = "lbd", version, about = "XDP L4 load balancer agent")]
struct Args {
    /// Interface to attach `lb_xdp` to (repeatable).
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// native, generic or auto (the kernel picks native where the driver supports it).
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
    /// TOML config of VIPs and backends.
    #[arg(long, short = 'c', default_value = "/etc/lb/lb.toml")]
    config: PathBuf,
    /// bpffs folder for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Flow table capacity (used when the table is first created).
    #[arg(long, default_value_t = maps::DEFAULT_FLOWS)]
    flow_table_size: u32,
    /// Maglev table pool in entries (used when the pool is first created).
    #[arg(long, default_value_t = maps::DEFAULT_RING_POOL)]
    ring_pool: u32,
    /// Seconds between periodic next-hop re-resolutions.
    #[arg(long, default_value_t = 30)]
    resolve_interval: u64,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }

    let opts = AgentOptions {
        ifaces: args.ifaces,
        mode: args.xdp_mode,
        config_path: args.config,
        load: LoadOptions {
            pin_dir: args.bpffs,
            flow_table_size: args.flow_table_size,
            ring_pool_size: args.ring_pool,
        },
        resolve_interval: Duration::from_secs(args.resolve_interval.max(1)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(agent::run(opts)).context("lbd")?;
    Ok(())
}
