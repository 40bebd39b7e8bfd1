//! The load balancer inside a test topology: lbd started on a gateway with a generated config,
//! `lb_decap` on every backend, and `xdp_pass` on the veth peers native XDP needs. Everything is
//! undone on drop: processes stopped, programs detached, pins removed.

use std::{
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_userspace::dataplane::{
    decap::{DecapHandle, attach_decap, attach_pass},
    kernel::AttachMode,
};

use crate::netns::{Netns, topology::Topology};

/// A built binary of the workspace, next to the running executable (target/<profile>/, or its
/// parent when this is a test in target/<profile>/deps/).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("executable has no folder")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (`cargo build -p lb-userspace` or `cargo xtask test`)",
            bin.display()
        );
    }
    Ok(bin)
}

/// One VIP of an lbd config, with its backends.
#[derive(Clone, Debug)]
pub struct VipConfig {
    /// `10.200.0.100:80/tcp`.
    pub address: String,
    pub backends: Vec<(IpAddr, u32)>,
}

impl VipConfig {
    /// The topology's VIP on `port`/tcp with every backend at weight 100.
    pub fn for_topology(topo: &Topology, port: u16) -> Self {
        Self {
            address: format!("{}:{port}/tcp", topo.vip),
            backends: topo
                .backends
                .iter()
                .map(|b| (IpAddr::V4(b.ip()), 100))
                .collect(),
        }
    }
}

/// Writes an lbd config file (the `lb.toml` format).
pub fn render_config(vips: &[VipConfig]) -> String {
    let mut out = String::new();
    for vip in vips {
        let _ = writeln!(out, "[[vip]]\naddress = \"{}\"\nbackends = [", vip.address);
        for (addr, weight) in &vip.backends {
            let _ = writeln!(out, "  {{ address = \"{addr}\", weight = {weight} }},");
        }
        out.push_str("]\n\n");
    }
    out
}

/// A running lbd in a namespace.
pub struct Lbd<'a> {
    ns: &'a Netns,
    pid: Option<u32>,
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    ifaces: Vec<String>,
    mode: AttachMode,
}

impl<'a> Lbd<'a> {
    /// Starts lbd on `ifaces` of `ns` and waits until every interface has its pinned link.
    pub fn start(ns: &'a Netns, ifaces: &[&str], mode: AttachMode, config: &str) -> Result<Self> {
        let tag = ns.name().to_owned();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
        let config_path = std::env::temp_dir().join(format!("{tag}-lb.toml"));
        let log_path = std::env::temp_dir().join(format!("{tag}-lbd.log"));
        fs::write(&config_path, config).context("writing lbd config")?;
        let mut lbd = Self {
            ns,
            pid: None,
            pin_dir,
            config_path,
            log_path,
            ifaces: ifaces.iter().map(|s| (*s).to_owned()).collect(),
            mode,
        };
        lbd.spawn()?;
        Ok(lbd)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening lbd log")?;
        let mut cmd = self.ns.command(workspace_bin("lbd")?);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .args(["--flow-table-size", "65536", "--ring-pool", "1048576"])
            .args(["--xdp-mode", mode_name(self.mode)])
            .env("RUST_LOG", "info,lb_userspace=debug")
            .stdout(Stdio::null())
            .stderr(log);
        for iface in &self.ifaces {
            cmd.args(["--iface", iface]);
        }
        let started = Instant::now();
        let pid = self.ns.spawn(cmd)?;
        self.pid = Some(pid);
        // Ready once every interface has its link pinned (attach comes after the maps are full).
        while !self
            .ifaces
            .iter()
            .all(|i| self.pin_dir.join("links").join(i).exists())
            || !self.log().contains("lbd running")
        {
            if let Some(status) = self.ns.try_wait(pid)? {
                bail!("lbd exited early ({status}):\n{}", self.log());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("lbd not ready after 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// What lbd has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(pid) = self.pid.take() {
            self.ns.kill(pid)?;
        }
        Ok(())
    }

    /// Starts lbd again with the same arguments (it adopts the pins).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for Lbd<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = self.ns.stop(pid);
        }
        // The pinned links keep the program attached; removing the pins detaches it (the
        // namespace's interfaces go away with the topology anyway).
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_file(&self.config_path);
    }
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
        AttachMode::Auto => "auto",
    }
}

/// Backend-side programs for a topology: `lb_decap` on every backend and, in native mode,
/// `xdp_pass` on the switch-side peers the gateways transmit or redirect into.
pub struct DataPath {
    _handles: Vec<DecapHandle>,
}

impl DataPath {
    pub fn attach(topo: &Topology, mode: AttachMode, vips: &[IpAddr]) -> Result<Self> {
        let mut handles = Vec::new();
        for backend in &topo.backends {
            let iface = vec![backend.eth0.name.clone()];
            let handle = backend
                .ns
                .run(|| attach_decap(&iface, mode, vips))
                .with_context(|| format!("lb_decap on {}", backend.name))?;
            handles.push(handle);
        }
        if mode == AttachMode::Native {
            let peers: Vec<String> = topo
                .gateways
                .iter()
                .flat_map(|g| g.legs().into_iter().map(|l| l.peer.clone()))
                .collect();
            let handle = topo
                .switch
                .run(|| attach_pass(&peers, AttachMode::Native))
                .context("xdp_pass on the gateways' veth peers")?;
            handles.push(handle);
        }
        Ok(Self { _handles: handles })
    }
}
