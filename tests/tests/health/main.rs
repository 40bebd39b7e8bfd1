//! Active health checks through the real agent and data plane (issue 4): lbd on a gateway
//! checking backends in their own namespaces, the test stopping, failing and hanging their
//! servers and watching `lbctl --json status`, the data plane's tables and real connections.
//!
//! - `down_and_back`: a stopped backend is marked down within fall x interval + timeout (+ one
//!   interval), new connections stop reaching it while 100 chatting connections to the others
//!   see no reset; restarted, it rejoins after rise successes. The times are printed.
//! - `http_status_and_hang`: an HTTP check answered 500 takes its backend down (the reason names
//!   500) and 200 brings it back; a backend that accepts and never answers goes down, each probe
//!   bounded by the timeout, with `lbctl status` answering in under a second throughout.
//! - `flapping`: for a minute backends stop and start every few seconds under 300 ms checks with
//!   rise 1 and fall 1, one VIP at times losing every backend: the tables are never empty, a VIP
//!   whose backends are all down keeps its last table and says so, status always answers.
//! - `state_changes_logged_once`: with `--log-format json`, each change of a backend's state
//!   (added, drained, undrained, down by its checks, up again, removed) is one JSON line with
//!   its cause, and each health transition and applied change is one line too.
//! - `via_tunnel`: a backend without `lb_decap` fails checks sent through its tunnel while a
//!   direct check of the same server passes.

mod down_up;
mod flapping;
mod http;
mod logs;
mod tunnel;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    lb::{Lbd, LbdOptions},
    lbctl::Lbctl,
    netns::{Netns, topology::Topology},
    traffic::{Server, who},
};
use lb_userspace::{
    api::proto::{BackendState, BackendStatus, Status, VipStatus},
    dataplane::{
        decap::{DecapHandle, attach_decap, attach_pass},
        kernel::AttachMode,
    },
    model::VipId,
};

const PORT: u16 = 80;
/// A small prime table: reading a whole table from the test takes milliseconds.
const RING: u32 = 4099;
const MODE: AttachMode = AttachMode::Native;
/// `lbctl status` must answer within this, whatever the checks are doing.
const STATUS_LIMIT: Duration = Duration::from_secs(1);
/// How often a wait for a health state polls status.
const POLL: Duration = Duration::from_millis(50);

/// A topology with `lb_decap` on the backends (all, or all but one) and servers the test can
/// stop and start again on the same port.
struct Bed {
    /// Running servers by (backend index, port).
    servers: Mutex<BTreeMap<(usize, u16), Server>>,
    _decap: Vec<DecapHandle>,
    topo: Topology,
}

impl Bed {
    /// `backends` backends with `lb_decap` and a server on [`PORT`].
    fn new(label: &str, backends: usize) -> Result<Self> {
        Self::build(label, backends, None)
    }

    /// The same, with backend `skip` left without `lb_decap`: it cannot take tunnelled
    /// packets (its server still answers direct connections).
    fn build(label: &str, backends: usize, skip: Option<usize>) -> Result<Self> {
        let topo = Topology::one_arm(label).backends(backends).build()?;
        let vips = [IpAddr::V4(topo.vip)];
        let mut decap = Vec::new();
        for (i, backend) in topo.backends.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let iface = vec![backend.eth0.name.clone()];
            let handle = backend
                .ns
                .run(|| attach_decap(&iface, MODE, &vips))
                .with_context(|| format!("lb_decap on {}", backend.name))?;
            decap.push(handle);
        }
        // Native XDP_TX out of the gateway needs a program on its veth peer.
        let peers: Vec<String> = topo
            .gateways
            .iter()
            .flat_map(|g| g.legs().into_iter().map(|l| l.peer.clone()))
            .collect();
        let pass = topo
            .switch
            .run(|| attach_pass(&peers, MODE))
            .context("xdp_pass on the gateway's veth peers")?;
        decap.push(pass);
        let bed = Self {
            servers: Mutex::new(BTreeMap::new()),
            _decap: decap,
            topo,
        };
        for i in 0..backends {
            bed.start(i, PORT)?;
        }
        Ok(bed)
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, BTreeMap<(usize, u16), Server>> {
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts backend `i`'s server on `port` (again).
    fn start(&self, i: usize, port: u16) -> Result<()> {
        let b = &self.topo.backends[i];
        let server = Server::start(&b.ns, &b.name, port)?;
        self.servers().insert((i, port), server);
        Ok(())
    }

    /// Stops backend `i`'s server on `port`: connections to it are refused from now on.
    fn stop(&self, i: usize, port: u16) -> Result<()> {
        let server = self
            .servers()
            .remove(&(i, port))
            .with_context(|| format!("no server {i} on port {port} to stop"))?;
        server.stop();
        Ok(())
    }

    /// Runs `f` on backend `i`'s running server on `port`.
    fn with_server<R>(&self, i: usize, port: u16, f: impl FnOnce(&Server) -> R) -> Result<R> {
        let servers = self.servers();
        let server = servers
            .get(&(i, port))
            .with_context(|| format!("no server {i} on port {port}"))?;
        Ok(f(server))
    }

    fn client(&self) -> &Netns {
        &self.topo.client.ns
    }

    fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.topo.backends[i].ip())
    }

    fn name(&self, i: usize) -> &str {
        &self.topo.backends[i].name
    }

    fn vip(&self, port: u16) -> VipId {
        format!("{}:{port}/tcp", self.topo.vip)
            .parse()
            .expect("a valid VIP")
    }

    fn target(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.vip), port)
    }

    fn start_lbd(&self, config: &str) -> Result<Lbd<'_>> {
        self.start_lbd_with(config, LbdOptions::default())
    }

    fn start_lbd_with(&self, config: &str, options: LbdOptions) -> Result<Lbd<'_>> {
        Lbd::start_with(
            &self.topo.gw().ns,
            &self.topo.gw().ifaces(),
            MODE,
            config,
            options,
        )
    }

    /// Connects `n` times (`WHO`) to `port` and counts answers per backend name.
    fn who_many(&self, port: u16, n: usize) -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let name = who(self.client(), self.target(port)).with_context(|| format!("WHO {i}"))?;
            *seen.entry(name).or_default() += 1;
        }
        Ok(seen)
    }
}

/// One `[[vip]]` of lb.toml: the VIP on `port` with the given backends at weight 100 and a
/// check written as a TOML inline table's body (`kind = "tcp", interval = "1s"`), if any.
fn vip_toml(bed: &Bed, port: u16, backends: &[usize], check: Option<&str>) -> String {
    let mut out = format!(
        "[[vip]]\naddress = \"{}\"\nring_size = {RING}\n",
        bed.vip(port)
    );
    if let Some(check) = check {
        let _ = writeln!(out, "check = {{ {check} }}");
    }
    out.push_str("backends = [\n");
    for &i in backends {
        let _ = writeln!(out, "  {{ address = \"{}\", weight = 100 }},", bed.addr(i));
    }
    out.push_str("]\n\n");
    out
}

/// `lbctl --json status`, each answer timed: the slowest is kept, and any answer slower than
/// [`STATUS_LIMIT`] is an error (the agent stalled).
struct Watch {
    lbctl: Lbctl,
    slowest: Duration,
    samples: u64,
}

impl Watch {
    fn new(lbd: &Lbd) -> Result<Self> {
        Ok(Self {
            lbctl: lbd.lbctl()?,
            slowest: Duration::ZERO,
            samples: 0,
        })
    }

    fn status(&mut self) -> Result<Status> {
        let run = self.lbctl.run(["--json", "status"])?;
        ensure!(run.success(), "{}", run.describe());
        self.slowest = self.slowest.max(run.elapsed);
        self.samples += 1;
        ensure!(
            run.elapsed < STATUS_LIMIT,
            "lbctl status took {} ms (limit {} ms)",
            run.elapsed.as_millis(),
            STATUS_LIMIT.as_millis()
        );
        serde_json::from_str(&run.stdout).with_context(|| format!("status reply {:?}", run.stdout))
    }

    /// Polls status until `done` holds; returns the time since `since` and that status. Fails
    /// after `give_up` (which should be well past the limit the caller then checks, so a slow
    /// transition is reported with its real duration).
    fn until(
        &mut self,
        since: Instant,
        give_up: Duration,
        what: &str,
        done: impl Fn(&Status) -> Result<bool>,
    ) -> Result<(Duration, Status)> {
        loop {
            let status = self.status()?;
            if done(&status)? {
                return Ok((since.elapsed(), status));
            }
            if since.elapsed() > give_up {
                bail!("{what}: not after {give_up:?}; last status {status:#?}");
            }
            std::thread::sleep(POLL);
        }
    }
}

fn vip_status<'s>(status: &'s Status, vip: &VipId) -> Result<&'s VipStatus> {
    status
        .vips
        .iter()
        .find(|v| v.vip == *vip)
        .with_context(|| format!("status has no VIP {vip}"))
}

fn backend_status<'s>(status: &'s Status, vip: &VipId, addr: IpAddr) -> Result<&'s BackendStatus> {
    vip_status(status, vip)?
        .backends
        .iter()
        .find(|b| b.address == addr)
        .with_context(|| format!("status of {vip} has no backend {addr}"))
}

/// Out of the table and failing its checks.
fn is_down(b: &BackendStatus) -> bool {
    b.state == BackendState::Down && b.health.as_ref().is_some_and(|h| !h.up)
}

/// In the table and passing its checks.
fn is_up(b: &BackendStatus) -> bool {
    b.state == BackendState::Active && b.health.as_ref().is_some_and(|h| h.up)
}

/// The last check's outcome (`ok` or why it failed), `""` before the first.
fn last(b: &BackendStatus) -> &str {
    b.health
        .as_ref()
        .and_then(|h| h.last.as_deref())
        .unwrap_or("")
}

/// Waits until every backend of `vip` has had a check pass (the first checks ran).
fn wait_first_checks(watch: &mut Watch, vip: &VipId, give_up: Duration) -> Result<Duration> {
    let (took, _) = watch.until(Instant::now(), give_up, "first checks", |s| {
        Ok(vip_status(s, vip)?
            .backends
            .iter()
            .all(|b| is_up(b) && last(b) == "ok"))
    })?;
    Ok(took)
}

/// Status requests, which the tests poll with: left out of a failure's log tail.
fn is_status_poll(line: &str) -> bool {
    line.contains(" DEBUG api{") && line.contains("/v1/status")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The backends of a set of table addresses, by name, for messages.
fn names(bed: &Bed, addrs: &BTreeSet<IpAddr>) -> Vec<String> {
    addrs
        .iter()
        .map(|a| {
            (0..bed.topo.backends.len())
                .find(|&i| bed.addr(i) == *a)
                .map_or_else(|| a.to_string(), |i| bed.name(i).to_owned())
        })
        .collect()
}
