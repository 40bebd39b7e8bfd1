//! The load balancer inside a test topology: lbd started on a gateway with a generated config,
//! its own control socket and state file, `lb_decap` on every backend, and `xdp_pass` on the
//! veth peers native XDP needs; and a read-only view of lbd's pinned maps. Everything is undone
//! on drop: processes stopped, programs detached, pins, socket and state removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::IpAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Once,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    BackendSlot, VipKey, VipMeta,
    keys::{RING_EMPTY, SLOT_ACTIVE, ip_from_wire},
    maps,
    stats::{Counter, DropReason},
};
use lb_userspace::{
    api::client::Client,
    dataplane::{
        decap::{DecapHandle, attach_decap, attach_decap_with, attach_pass},
        kernel::AttachMode,
    },
};

use crate::{
    lbctl::{Lbctl, run_bounded},
    netns::{
        Netns,
        topology::{KernelIpip, KernelTunnel, Topology, TopologyBuilder},
    },
    traffic::Server,
};

/// Per-lbd folders for the control socket and the state file (outside /tmp, like /run/lb).
const RUN_ROOT: &str = "/run/lb-test";
/// How long lbd gets to become ready (maps, links and socket).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `lbd upgrade` may take.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Maglev table size; lbd's default when `None`.
    pub ring_size: Option<u32>,
    pub backends: Vec<(IpAddr, u32)>,
}

impl VipConfig {
    /// The topology's VIP on `port`/tcp with every backend at weight 100.
    pub fn for_topology(topo: &Topology, port: u16) -> Self {
        Self {
            address: format!("{}:{port}/tcp", topo.vip),
            ring_size: None,
            backends: topo
                .backends
                .iter()
                .map(|b| (IpAddr::V4(b.ip()), 100))
                .collect(),
        }
    }

    /// `address` (`10.200.0.100:80/tcp`, `[fd00:200::100]:80/tcp`) over `backends`, each at
    /// weight 100.
    pub fn with_backends(
        address: impl Into<String>,
        backends: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        Self {
            address: address.into(),
            ring_size: None,
            backends: backends.into_iter().map(|a| (a, 100)).collect(),
        }
    }
}

/// Writes an lbd config file (the `lb.toml` format).
pub fn render_config(vips: &[VipConfig]) -> String {
    let mut out = String::new();
    for vip in vips {
        render_vip(&mut out, vip, &[]);
    }
    out
}

/// [`render_config`] with `[settings]` lines (`gue_port = 7000`) and, per VIP, more key lines
/// (`encap = "gue"`).
pub fn render_config_with(settings: &[&str], vips: &[(VipConfig, &[&str])]) -> String {
    let mut out = String::new();
    if !settings.is_empty() {
        out.push_str("[settings]\n");
        for line in settings {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    for (vip, extra) in vips {
        render_vip(&mut out, vip, extra);
    }
    out
}

fn render_vip(out: &mut String, vip: &VipConfig, extra: &[&str]) {
    let _ = writeln!(out, "[[vip]]\naddress = \"{}\"", vip.address);
    if let Some(size) = vip.ring_size {
        let _ = writeln!(out, "ring_size = {size}");
    }
    for line in extra {
        let _ = writeln!(out, "{line}");
    }
    out.push_str("backends = [\n");
    for (addr, weight) in &vip.backends {
        let _ = writeln!(out, "  {{ address = \"{addr}\", weight = {weight} }},");
    }
    out.push_str("]\n\n");
}

/// `RUN_ROOT/<tag>`, empty: the folder of an lbd's control socket and state file.
fn fresh_run_dir(tag: &str) -> Result<PathBuf> {
    let run_dir = Path::new(RUN_ROOT).join(tag);
    // A leftover from a crashed run of the same name would hand lbd someone else's state.
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing stale {}", run_dir.display()))?;
    }
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    // Others may traverse it: the socket's own mode is what keeps them out.
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", run_dir.display()))?;
    Ok(run_dir)
}

/// Data-plane sizes lbd is started with (used when its maps are first created).
#[derive(Clone, Copy, Debug)]
pub struct LbdOptions {
    pub flow_table_size: u32,
    /// Maglev table pool in entries: room for `ring_pool / ring_size` tables, live or in their
    /// one-second quarantine after a swap.
    pub ring_pool: u32,
    /// `--log-format json` instead of text.
    pub json_logs: bool,
}

impl Default for LbdOptions {
    /// Small enough for many test lbds at once: 65,536 flows, 16 default-size tables.
    fn default() -> Self {
        Self {
            flow_table_size: 65_536,
            ring_pool: 1 << 20,
            json_logs: false,
        }
    }
}

/// A running lbd in a namespace, with its own control socket and state file.
pub struct Lbd<'a> {
    ns: &'a Netns,
    pid: Option<u32>,
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// Holds the control socket and the state file; removed on drop.
    pub run_dir: PathBuf,
    /// `--socket`: `<run_dir>/lbd.sock`.
    pub socket_path: PathBuf,
    /// `--state`: `<run_dir>/state.toml`.
    pub state_path: PathBuf,
    ifaces: Vec<String>,
    mode: AttachMode,
    options: LbdOptions,
}

impl<'a> Lbd<'a> {
    /// Starts lbd on `ifaces` of `ns` and waits until every interface has its pinned link and
    /// the control socket answers.
    pub fn start(ns: &'a Netns, ifaces: &[&str], mode: AttachMode, config: &str) -> Result<Self> {
        Self::start_with(ns, ifaces, mode, config, LbdOptions::default())
    }

    /// [`Lbd::start`] with other data-plane sizes.
    pub fn start_with(
        ns: &'a Netns,
        ifaces: &[&str],
        mode: AttachMode,
        config: &str,
        options: LbdOptions,
    ) -> Result<Self> {
        STALE_CLEANUP.call_once(cleanup_stale);
        let tag = ns.name().to_owned();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
        let config_path = std::env::temp_dir().join(format!("{tag}-lb.toml"));
        let log_path = std::env::temp_dir().join(format!("{tag}-lbd.log"));
        fs::write(&config_path, config).context("writing lbd config")?;
        let run_dir = fresh_run_dir(&tag)?;
        let mut lbd = Self {
            ns,
            pid: None,
            pin_dir,
            config_path,
            log_path,
            socket_path: run_dir.join("lbd.sock"),
            state_path: run_dir.join("state.toml"),
            run_dir,
            ifaces: ifaces.iter().map(|s| (*s).to_owned()).collect(),
            mode,
            options,
        };
        lbd.spawn()?;
        Ok(lbd)
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_extra(&[])
    }

    /// Starts lbd with the usual arguments plus `extra` and waits until it is ready.
    fn spawn_extra(&mut self, extra: &[&str]) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening lbd log")?;
        // Readiness is judged on what this run logs, not on an earlier run's lines.
        let log_start = log.metadata().map_or(0, |m| m.len()) as usize;
        let mut cmd = self.ns.command(workspace_bin("lbd")?);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(&self.socket_path)
            .arg("--state")
            .arg(&self.state_path)
            .arg("--flow-table-size")
            .arg(self.options.flow_table_size.to_string())
            .arg("--ring-pool")
            .arg(self.options.ring_pool.to_string())
            .args(["--xdp-mode", mode_name(self.mode)])
            .args(extra)
            .env("RUST_LOG", "info,lb_userspace=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        for iface in &self.ifaces {
            cmd.args(["--iface", iface]);
        }
        if self.options.json_logs {
            cmd.args(["--log-format", "json"]);
        }
        let started = Instant::now();
        let pid = self.ns.spawn(cmd)?;
        self.pid = Some(pid);
        // Ready once every interface has its link pinned (attach comes after the maps are
        // full) and the control socket accepts connections.
        loop {
            let links = self
                .ifaces
                .iter()
                .all(|i| self.pin_dir.join("links").join(i).exists());
            if links
                && self
                    .log()
                    .get(log_start..)
                    .unwrap_or("")
                    .contains("lbd running")
                && UnixStream::connect(&self.socket_path).is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.ns.try_wait(pid)? {
                self.pid = None;
                bail!("lbd exited early ({status}):\n{}", self.log());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("lbd not ready after {READY_TIMEOUT:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What lbd has logged so far (every run of it).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Fails, listing them, when lbd logged an ERROR line that `expected` does not allow.
    pub fn expect_no_errors(&self, expected: impl Fn(&str) -> bool) -> Result<()> {
        let log = self.log();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| (l.contains(" ERROR ") || l.contains(r#""level":"ERROR""#)) && !expected(l))
            .collect();
        anyhow::ensure!(
            errors.is_empty(),
            "lbd logged {} errors:\n{}",
            errors.len(),
            errors.join("\n")
        );
        Ok(())
    }

    /// Panics with `result`'s error and the end of lbd's log, leaving out the lines `noise`
    /// matches (such as the status requests a test polls with).
    pub fn finish(&self, result: Result<()>, noise: impl Fn(&str) -> bool) {
        if let Err(e) = result {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| !noise(l)).collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            panic!("{e:#}\n--- end of lbd log:\n{tail}");
        }
    }

    /// The running lbd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// lbctl on this lbd's socket.
    pub fn lbctl(&self) -> Result<Lbctl> {
        Lbctl::new(&self.socket_path)
    }

    /// An in-process API client on this lbd's socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket_path)
    }

    /// `GET path` on lbd's metrics address (its default, 127.0.0.1:9100 in its namespace),
    /// from inside the namespace: the status code and the body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        self.ns.run(|| http_get(METRICS_ADDR, path))
    }

    /// One entry of the pinned `LB_GLOBAL_STATS`, summed over the CPUs: a [`Counter`] or a
    /// [`DropReason::counter_index`].
    pub fn global_counter(&self, index: u32) -> Result<u64> {
        let path = self.pin_dir.join("maps").join(maps::GLOBAL_STATS);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map = Map::from_map_data(data).context("LB_GLOBAL_STATS")?;
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(map).context("LB_GLOBAL_STATS")?;
        let values = stats
            .get(&index, 0)
            .with_context(|| format!("reading LB_GLOBAL_STATS[{index}]"))?;
        Ok(values.iter().sum())
    }

    /// A global counter ([`Lbd::global_counter`]).
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        self.global_counter(counter as u32)
    }

    /// Drops counted for `reason` ([`Lbd::global_counter`]).
    pub fn drops(&self, reason: DropReason) -> Result<u64> {
        self.global_counter(reason.counter_index())
    }

    /// A read-only view of the pinned maps.
    pub fn maps(&self) -> Result<PinnedMaps> {
        PinnedMaps::open(&self.pin_dir)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(pid) = self.pid.take() {
            self.ns.kill(pid)?;
        }
        Ok(())
    }

    /// Starts lbd again with the same arguments (it adopts the pins and reads the state file)
    /// and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// `lbd upgrade --bpffs <pin_dir>` in the namespace: replaces the program in every pinned
    /// link with this build's. Fails unless it exits 0; returns its stderr (its log).
    pub fn upgrade(&self) -> Result<String> {
        let mut cmd = self.ns.command(workspace_bin("lbd")?);
        cmd.arg("upgrade")
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .env("RUST_LOG", "info");
        let args = vec![
            "upgrade".to_owned(),
            "--bpffs".to_owned(),
            self.pin_dir.display().to_string(),
        ];
        let run = run_bounded(cmd, args, UPGRADE_TIMEOUT)?;
        if !run.success() {
            bail!("lbd upgrade: {}\nstderr: {}", run.status, run.stderr);
        }
        Ok(run.stderr)
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
        let _ = fs::remove_dir_all(&self.run_dir);
        // A failed test keeps the log for a post-mortem.
        if !std::thread::panicking() {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

/// Where lbd serves `/metrics` and the status page (its default), in its namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9100";

/// One HTTP/1.1 GET with `Connection: close` (bounded by timeouts): the status and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = addr.parse().context("metrics address")?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("reading the reply to GET {path}"))?;
    parse_http_reply(&String::from_utf8_lossy(&reply))
}

/// A whole HTTP/1.1 reply (read to the end of a `Connection: close` exchange): its status and
/// its body, de-chunked.
pub fn parse_http_reply(reply: &str) -> Result<(u16, String)> {
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {reply:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The body of a chunked reply.
fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).context("chunk shorter than its size")?;
        out.push_str(chunk);
        rest = after.get(size + 2..).context("chunk without its CRLF")?;
    }
}

static STALE_CLEANUP: Once = Once::new();

/// Removes the pins and run folders of test processes that died without cleaning up (named
/// after their namespaces, `lbt-<pid>-...`).
fn cleanup_stale() {
    for root in ["/sys/fs/bpf", RUN_ROOT] {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("lbt-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists()
                && let Err(e) = fs::remove_dir_all(entry.path())
            {
                eprintln!("removing stale {}: {e}", entry.path().display());
            }
        }
    }
}

/// lbd's pinned maps, opened read-only from the test: what the data plane really holds.
pub struct PinnedMaps {
    vips: HashMap<MapData, VipKey, VipMeta>,
    rings: Array<MapData, u32>,
    backends: Array<MapData, BackendSlot>,
}

/// Everything a refused or failed change must leave alone: the export, the state file's bytes
/// and the data plane's maps.
#[derive(Debug, PartialEq, Eq)]
pub struct Unchanged {
    pub export: String,
    pub state_file: Vec<u8>,
    pub maps: MapSnapshot,
}

impl Unchanged {
    pub fn take(lbd: &Lbd) -> Result<Self> {
        Ok(Self {
            export: lbd.lbctl()?.export()?,
            state_file: fs::read(&lbd.state_path).context("reading the state file")?,
            maps: lbd.maps()?.snapshot()?,
        })
    }
}

/// Everything a reconfiguration could touch, for before/after comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSnapshot {
    pub vips: BTreeMap<VipKey, VipMeta>,
    /// Each VIP's table, read through its `VipMeta`.
    pub rings: BTreeMap<VipKey, Vec<u32>>,
    /// Every slot, free ones included.
    pub backends: Vec<BackendSlot>,
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_dir.join("maps").join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Map::from_map_data(data).with_context(|| format!("map {name}"))
        };
        Ok(Self {
            vips: HashMap::try_from(open(maps::VIPS)?).context("LB_VIPS")?,
            rings: Array::try_from(open(maps::RINGS)?).context("LB_RINGS")?,
            backends: Array::try_from(open(maps::BACKENDS)?).context("LB_BACKENDS")?,
        })
    }

    pub fn vips(&self) -> Result<BTreeMap<VipKey, VipMeta>> {
        self.vips
            .iter()
            .collect::<Result<_, _>>()
            .context("reading LB_VIPS")
    }

    pub fn vip(&self, key: &VipKey) -> Result<Option<VipMeta>> {
        match self.vips.get(key, 0) {
            Ok(meta) => Ok(Some(meta)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading LB_VIPS"),
        }
    }

    pub fn backend(&self, slot: u32) -> Result<BackendSlot> {
        self.backends
            .get(&slot, 0)
            .with_context(|| format!("reading LB_BACKENDS[{slot}]"))
    }

    pub fn backends(&self) -> Result<Vec<BackendSlot>> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .context("reading LB_BACKENDS")
    }

    /// The table `meta` points at.
    pub fn ring(&self, meta: &VipMeta) -> Result<Vec<u32>> {
        (meta.ring_offset..meta.ring_offset + meta.ring_size)
            .map(|i| {
                self.rings
                    .get(&i, 0)
                    .with_context(|| format!("reading LB_RINGS[{i}]"))
            })
            .collect()
    }

    /// The addresses of the active slots in a VIP's table: the backends new flows can reach.
    /// Empty when the VIP is not installed.
    pub fn table_addrs(&self, vip: &VipKey) -> Result<BTreeSet<IpAddr>> {
        let Some(meta) = self.vip(vip)? else {
            return Ok(BTreeSet::new());
        };
        let slots: BTreeSet<u32> = self
            .ring(&meta)?
            .into_iter()
            .filter(|&s| s != RING_EMPTY)
            .collect();
        let mut out = BTreeSet::new();
        for slot in slots {
            let b = self.backend(slot)?;
            if b.state == SLOT_ACTIVE
                && let Some(addr) = ip_from_wire(b.addr, b.family)
            {
                out.insert(addr);
            }
        }
        Ok(out)
    }

    /// Whether the VIP's table has an entry naming an active slot of `addr`; reads only as far
    /// as the first such entry.
    pub fn table_has(&self, vip: &VipKey, addr: IpAddr) -> Result<bool> {
        let Some(meta) = self.vip(vip)? else {
            return Ok(false);
        };
        let mut seen: BTreeMap<u32, bool> = BTreeMap::new();
        for i in meta.ring_offset..meta.ring_offset + meta.ring_size {
            let slot = self
                .rings
                .get(&i, 0)
                .with_context(|| format!("reading LB_RINGS[{i}]"))?;
            if slot == RING_EMPTY {
                continue;
            }
            let hit = if let Some(&hit) = seen.get(&slot) {
                hit
            } else {
                let b = self.backend(slot)?;
                let hit = b.state == SLOT_ACTIVE && ip_from_wire(b.addr, b.family) == Some(addr);
                seen.insert(slot, hit);
                hit
            };
            if hit {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// VIPs, their tables and every backend slot.
    pub fn snapshot(&self) -> Result<MapSnapshot> {
        let vips = self.vips()?;
        let rings = vips
            .iter()
            .map(|(k, m)| Ok((*k, self.ring(m)?)))
            .collect::<Result<_>>()?;
        Ok(MapSnapshot {
            vips,
            rings,
            backends: self.backends()?,
        })
    }
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
        AttachMode::Auto => "auto",
    }
}

/// Backend-side programs for a topology: `lb_decap` on every backend (or the kernel's tunnel
/// device, [`DataPath::attach_with`]) and, in native mode, `xdp_pass` on the switch-side peers
/// the gateways transmit or redirect into.
pub struct DataPath {
    _handles: Vec<DecapHandle>,
    /// Kernel tunnel devices instead of `lb_decap` ([`DataPath::attach_with`]).
    _tunnels: Vec<KernelIpip>,
}

impl DataPath {
    pub fn attach(topo: &Topology, mode: AttachMode, vips: &[IpAddr]) -> Result<Self> {
        Self::attach_lb_decap(topo, mode, vips, None)
    }

    /// `lb_decap` on every backend taking IPIP and GUE on `gue_port` (`lb_decap`'s default
    /// port when `None`), plus `xdp_pass` on the gateways' peers in native mode.
    fn attach_lb_decap(
        topo: &Topology,
        mode: AttachMode,
        vips: &[IpAddr],
        gue_port: Option<u16>,
    ) -> Result<Self> {
        let mut handles = Vec::new();
        for backend in &topo.backends {
            let iface = vec![backend.eth0.name.clone()];
            let handle = backend
                .ns
                .run(|| match gue_port {
                    None => attach_decap(&iface, mode, vips),
                    Some(port) => attach_decap_with(&iface, mode, vips, Some(port)),
                })
                .with_context(|| format!("lb_decap on {}", backend.name))?;
            handles.push(handle);
        }
        handles.extend(attach_peer_pass(topo, mode)?);
        Ok(Self {
            _handles: handles,
            _tunnels: Vec::new(),
        })
    }
}

/// In native mode, `xdp_pass` on the switch-side peers the gateways transmit or redirect into.
fn attach_peer_pass(topo: &Topology, mode: AttachMode) -> Result<Option<DecapHandle>> {
    if mode != AttachMode::Native {
        return Ok(None);
    }
    let peers: Vec<String> = topo
        .gateways
        .iter()
        .flat_map(|g| g.legs().into_iter().map(|l| l.peer.clone()))
        .collect();
    let handle = topo
        .switch
        .run(|| attach_pass(&peers, AttachMode::Native))
        .context("xdp_pass on the gateways' veth peers")?;
    Ok(Some(handle))
}

/// A topology ready for lbd: backends that decapsulate ([`DataPath`]) and each serve `port`
/// ([`Server`], answering with its name). What most end-to-end tests start from.
pub struct ServedTopology {
    // Dropped in this order: servers, then programs, then the namespaces.
    pub servers: Vec<Server>,
    _datapath: DataPath,
    pub topo: Topology,
    pub port: u16,
    pub mode: AttachMode,
}

impl ServedTopology {
    pub fn build(builder: TopologyBuilder, mode: AttachMode, port: u16) -> Result<Self> {
        Self::build_with(builder, mode, port, BackendDecap::LbDecap)
    }

    /// [`ServedTopology::build`] with backends that decapsulate as `decap` says.
    pub fn build_with(
        builder: TopologyBuilder,
        mode: AttachMode,
        port: u16,
        decap: BackendDecap,
    ) -> Result<Self> {
        let topo = builder.build()?;
        // Both VIPs: tests choose the family per VIP (and per backend).
        let vips = [IpAddr::V4(topo.vip), IpAddr::V6(topo.vip6)];
        let datapath = DataPath::attach_with(&topo, mode, &vips, decap)?;
        let servers = topo
            .backends
            .iter()
            .map(|b| Server::start(&b.ns, &b.name, port))
            .collect::<Result<_>>()?;
        Ok(Self {
            servers,
            _datapath: datapath,
            topo,
            port,
            mode,
        })
    }

    /// lbd on the gateway with one VIP on the port, over every backend at weight 100.
    pub fn start_lbd(&self) -> Result<Lbd<'_>> {
        let config = render_config(&[VipConfig::for_topology(&self.topo, self.port)]);
        let gw = self.topo.gw();
        Lbd::start(&gw.ns, &gw.ifaces(), self.mode, &config)
    }

    /// Where clients connect: the VIP and the port.
    pub fn target(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(IpAddr::V4(self.topo.vip), self.port)
    }
}

/// lbd's memory from `/proc/<pid>/status`: (`VmRSS`, `VmHWM`) in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets `VmHWM` (the peak resident size) of `pid` to its current size (`clear_refs` 5), so a
/// later peak measures only what happened since.
pub fn reset_peak_memory(pid: u32) -> Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of {pid}"))
}

/// Whether `pid` is alive: it exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// lbd alone for start-up and socket tests: a namespace of its own with only `lo` (generic
/// XDP), metrics off, an empty config, and its state under a run folder. [`BareLbd::run`] runs
/// one lbd to its exit (a refusal at start); [`BareLbd::start`] keeps one running. Drop stops
/// them and removes the pins and the folder.
pub struct BareLbd {
    pub ns: Netns,
    /// `/run/lb-test/<ns>`: the config, the state file and the sockets the test picks.
    pub run_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    pub state_path: PathBuf,
    pids: std::sync::Mutex<Vec<u32>>,
}

impl BareLbd {
    pub fn new(label: &str) -> Result<Self> {
        STALE_CLEANUP.call_once(cleanup_stale);
        let ns = Netns::new(label)?;
        let tag = ns.name().to_owned();
        let run_dir = fresh_run_dir(&tag)?;
        let config_path = run_dir.join("lb.toml");
        fs::write(&config_path, "").context("writing lbd config")?;
        Ok(Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{tag}")),
            state_path: run_dir.join("state.toml"),
            config_path,
            run_dir,
            ns,
            pids: std::sync::Mutex::default(),
        })
    }

    /// lbd in the namespace on `lo` with `--socket socket` and `extra` arguments.
    pub fn command(&self, socket: &Path, extra: &[&str]) -> Result<std::process::Command> {
        let mut cmd = self.ns.command(workspace_bin("lbd")?);
        cmd.args([
            "--iface",
            "lo",
            "--xdp-mode",
            "generic",
            "--metrics-addr",
            "off",
        ])
        .arg("--config")
        .arg(&self.config_path)
        .arg("--bpffs")
        .arg(&self.pin_dir)
        .arg("--state")
        .arg(&self.state_path)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
        Ok(cmd)
    }

    /// Runs lbd until it exits on its own (at most `timeout`): its status and output.
    pub fn run(
        &self,
        socket: &Path,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<crate::lbctl::Run> {
        let cmd = self.command(socket, extra)?;
        let mut args = vec![
            "lbd".to_owned(),
            "--socket".to_owned(),
            socket.display().to_string(),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        run_bounded(cmd, args, timeout)
    }

    /// Starts lbd and waits until its socket accepts connections; returns its pid.
    pub fn start(&self, socket: &Path, extra: &[&str]) -> Result<u32> {
        let log_path = self.run_dir.join(format!(
            "lbd-{}.log",
            self.pids.lock().map_or(0, |p| p.len())
        ));
        let log = fs::File::create(&log_path).context("creating the lbd log")?;
        let mut cmd = self.command(socket, extra)?;
        cmd.stdout(Stdio::null()).stderr(log);
        let pid = self.ns.spawn(cmd)?;
        if let Ok(mut pids) = self.pids.lock() {
            pids.push(pid);
        }
        let started = Instant::now();
        loop {
            if UnixStream::connect(socket).is_ok() {
                return Ok(pid);
            }
            let log = || fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(status) = self.ns.try_wait(pid)? {
                bail!("lbd exited early ({status}):\n{}", log());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("lbd not ready after {READY_TIMEOUT:?}:\n{}", log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops an lbd [`BareLbd::start`] started (SIGTERM, then SIGKILL).
    pub fn stop(&self, pid: u32) -> Result<()> {
        if let Ok(mut pids) = self.pids.lock() {
            pids.retain(|p| *p != pid);
        }
        self.ns.stop(pid).map(drop)
    }

    /// What lbd left in the data plane: its pin folder, and an XDP program on `lo`. `None`
    /// when there is neither.
    pub fn data_plane_trace(&self) -> Result<Option<String>> {
        let mut found = Vec::new();
        if fs::symlink_metadata(&self.pin_dir).is_ok() {
            found.push(format!("{} exists", self.pin_dir.display()));
        }
        let link = self.ns.ip(["-d", "link", "show", "dev", "lo"])?;
        if link.contains("xdp") {
            found.push(format!("lo carries an XDP program: {}", link.trim()));
        }
        Ok((!found.is_empty()).then(|| found.join("; ")))
    }
}

impl Drop for BareLbd {
    fn drop(&mut self) {
        let pids = self.pids.lock().map(|p| p.clone()).unwrap_or_default();
        for pid in pids {
            let _ = self.ns.stop(pid);
        }
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

// ---- Robustness (issue 7): limits, the state file, signals --------------------------------
// lbd stopped by SIGTERM, and started again with extra arguments (such as `--detach-on-exit`)
// or another state file, with the same readiness wait as `Lbd::start`.

impl Lbd<'_> {
    /// SIGTERM, as systemd stops lbd; waits for it to exit (SIGKILL after the harness's grace
    /// period) and returns how it exited. The process is forgotten afterwards.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.pid.take().context("lbd is not running")?;
        self.ns.stop(pid)
    }

    /// Starts lbd again (after [`Lbd::terminate`] or [`Lbd::kill`]) with the usual arguments
    /// plus `extra`, and waits until it is ready. [`Lbd::state_path`] may have been changed.
    pub fn spawn_with_args(&mut self, extra: &[&str]) -> Result<()> {
        anyhow::ensure!(self.pid.is_none(), "lbd is still running");
        self.spawn_extra(extra)
    }
}

// ---- Backends decapsulating with the kernel's own tunnel devices (issues 8 and 9) ---------
// The default stays `lb_decap`; kernel_tunnel.rs asks for the kernel's own devices (ipip,
// ip6tnl, fou in GUE mode), to show that what lb_xdp sends is what a stock Linux backend
// accepts.

/// How the backends take the tunnel off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendDecap {
    /// Our `lb_decap` XDP program on each backend's eth0 (IPIP, and GUE on its default port).
    #[default]
    LbDecap,
    /// `lb_decap` taking GUE on this UDP port instead of the default (and IPIP).
    LbDecapGue(u16),
    /// The kernel's own tunnel devices ([`KernelTunnel`]: ipip, ip6tnl, fou) and no XDP
    /// program on the backends.
    Kernel(KernelTunnel),
}

impl DataPath {
    /// [`DataPath::attach`] with backends that decapsulate as `decap` says; `vips` only matter
    /// to `lb_decap` (the kernel device takes any tunnel packet addressed to the backend, and
    /// the VIPs are on the backends' `lo` already). `xdp_pass` goes on the gateways' peers in
    /// native mode either way.
    pub fn attach_with(
        topo: &Topology,
        mode: AttachMode,
        vips: &[IpAddr],
        decap: BackendDecap,
    ) -> Result<Self> {
        match decap {
            BackendDecap::LbDecap => Self::attach(topo, mode, vips),
            BackendDecap::LbDecapGue(port) => Self::attach_lb_decap(topo, mode, vips, Some(port)),
            BackendDecap::Kernel(tunnel) => {
                let tunnels = topo.add_kernel_tunnel(tunnel)?;
                let handles = attach_peer_pass(topo, mode)?.into_iter().collect();
                Ok(Self {
                    _handles: handles,
                    _tunnels: tunnels,
                })
            }
        }
    }
}
