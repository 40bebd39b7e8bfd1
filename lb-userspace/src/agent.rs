//! lbd's main loop: load (or adopt) the data plane, restore the saved state, resolve every
//! backend's next hop, reconcile, attach, then serve the control API and keep next hops fresh
//! as the kernel's routes and neighbours change.
//!
//! The order at start matters: tables are complete before a freshly attached program sees its
//! first packet, and an adopted program keeps forwarding from the pinned maps the whole time.
//! The loop is the only writer of the desired state and the maps; API requests reach it as
//! [`Command`]s, next-hop lookups run beside it and report back, and flow-table scans run on
//! blocking threads, so none of them stalls the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use lb_common::{GlobalConfig, config::CFG_F_DEBUG};

use futures::{StreamExt, future::join_all};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    api::{self, ApiError, Command, ErrorKind, proto::HealthReport},
    check::{CheckKind, CheckSpec},
    config::{self, Config, Settings},
    control::{Control, Pending},
    dataplane::{
        DataPlane, DataPlaneError,
        kernel::{AttachMode, Attached, KernelDataPlane, LoadOptions},
    },
    flows,
    health::{Checker, Probe, ProbeKind, Target, TargetId, Transition},
    metrics::{self, Metrics, RateTracker, ReconfigResult},
    model::{DesiredState, VipSpec},
    nexthop::{NextHop, ResolveError, Resolver, watch_changes},
    reconcile::{DEFAULT_QUARANTINE, Egress, ReconcileError, Reconciler},
    store::{StateStore, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error("next-hop resolution: {0}")]
    Resolve(#[from] ResolveError),
    #[error("control socket: {0}")]
    Api(#[from] api::server::ServerError),
    #[error(transparent)]
    Metrics(#[from] metrics::server::MetricsServerError),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("health-check thread: {0}")]
    HealthThread(#[source] std::io::Error),
    /// The saved state is above a limit the config file sets (limits lowered while lbd was
    /// stopped): lbd will not run a state its own config refuses.
    #[error(
        "state file {}: {source}; raise the limit in {} or remove VIPs or backends from the \
         state file",
        state.display(),
        config.display()
    )]
    OverLimit {
        state: PathBuf,
        config: PathBuf,
        #[source]
        source: crate::model::ModelError,
    },
    #[error("--detach-on-exit: {0}")]
    Detach(#[source] DataPlaneError),
}

/// A runtime on its own thread for the health checks, so fsyncs, map writes and table builds
/// on the agent's loop never delay a probe into a false timeout. Shut down without waiting
/// (dropping a runtime inside another one's task would panic).
struct HealthRuntime(Option<tokio::runtime::Runtime>);

impl HealthRuntime {
    fn start() -> Result<Self, AgentError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lbd-health")
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
            .map_err(AgentError::HealthThread)
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for HealthRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Everything lbd is started with.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
    pub config_path: PathBuf,
    /// Where accepted changes are saved.
    pub state_path: PathBuf,
    pub socket: PathBuf,
    pub socket_group: Option<String>,
    pub load: LoadOptions,
    /// Re-resolve every backend this often even without a netlink notification.
    pub resolve_interval: Duration,
    /// Where `/metrics` and the status page are served; `None`: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, detach the programs and remove every pin instead of leaving the
    /// data plane forwarding.
    pub detach_on_exit: bool,
}

/// Health probes running at once, at most: enough for thousands of backends at a 1 s
/// interval (a probe is a connect, or a connect and a GET, with a timeout).
const MAX_CHECKS_IN_FLIGHT: usize = 256;

/// How long a change waits for its new backends' next hops before going ahead without them
/// (they join the table when the lookup finishes in the background).
const CHANGE_RESOLVE_BUDGET: Duration = Duration::from_millis(300);

/// How often lbd publishes the tick (about a second) flows are stamped with: a quarter tick, so
/// a stamp lags the real tick by a quarter at most.
const CLOCK_INTERVAL: Duration = Duration::from_millis(250);

fn egress_of(hop: &NextHop) -> Egress {
    Egress {
        ifindex: hop.ifindex,
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
    }
}

fn mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

type Resolved = Vec<(IpAddr, Result<NextHop, String>)>;

async fn resolve_many(resolver: &Resolver, addrs: Vec<IpAddr>) -> Resolved {
    let lookups = addrs.iter().map(|a| resolver.resolve(*a));
    let results = join_all(lookups).await;
    addrs
        .into_iter()
        .zip(results)
        .map(|(a, r)| (a, r.map_err(|e| e.to_string())))
        .collect()
}

/// The agent's loop state.
struct Agent {
    opts: AgentOptions,
    control: Control<KernelDataPlane>,
    resolver: Arc<Resolver>,
    /// Backends whose last lookup failed, with the reason (each reported once).
    failing: BTreeMap<IpAddr, String>,
    resolved_tx: mpsc::UnboundedSender<Resolved>,
    /// A background lookup is running; `resolve_again` asks for another when it ends. One at
    /// a time: an unresolvable backend takes the neighbour timeout, and netlink events come in
    /// bursts.
    resolving: bool,
    resolve_again: bool,
    checker: Checker,
    flow_counts: Arc<flows::CountCache>,
    metrics: Arc<Metrics>,
    rates: Arc<Mutex<RateTracker>>,
    /// The data plane's debug logging (`lbctl debug`), kept across config reloads.
    debug: bool,
    clock: PublishedClock,
}

/// The clock lbd publishes to the data plane (`GlobalConfig::now_tick`).
struct PublishedClock {
    /// See `flows::Clock::frozen`.
    frozen: Option<(u32, u32)>,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
}

impl PublishedClock {
    /// Writes the first config, with the clock, to a data plane a previous lbd may have left
    /// running, and remembers the tick it left behind.
    fn start(dp: &mut KernelDataPlane, settings: Settings) -> Result<Self, AgentError> {
        let frozen = dp.config()?.now_tick;
        let global = GlobalConfig {
            now_tick: flows::now_tick(),
            ..settings.global_config()
        };
        dp.set_config(&global)?;
        Ok(Self {
            frozen: (frozen != 0 && frozen != global.now_tick).then_some((frozen, global.now_tick)),
            failing: false,
        })
    }
}

impl Agent {
    /// Records lookup results for the backends in `wanted`; true when a next hop changed.
    fn absorb(&mut self, results: Resolved, wanted: &[IpAddr]) -> bool {
        let mut changed = false;
        for (addr, result) in results {
            if !wanted.contains(&addr) {
                continue;
            }
            match result {
                Ok(hop) => {
                    self.failing.remove(&addr);
                    let egress = egress_of(&hop);
                    if self.control.egress.insert(addr, egress) != Some(egress) {
                        changed = true;
                        tracing::info!(backend = %addr, iface = %hop.ifname, gateway = ?hop.gateway,
                            mac = %mac(hop.dst_mac), cause = "route and neighbour lookup", "backend next hop resolved");
                    }
                }
                // A backend that resolved before keeps its last next hop (a neighbour entry
                // flapping must not kill its flows); one that never resolved stays out of the
                // tables. Either way it is reported once, when the reason changes.
                Err(reason) => {
                    if self.failing.insert(addr, reason.clone()).as_ref() == Some(&reason) {
                        continue;
                    }
                    if self.control.egress.contains_key(&addr) {
                        tracing::warn!(backend = %addr, error = %reason, "backend next hop unresolved; keeping the last one");
                    } else {
                        tracing::warn!(backend = %addr, error = %reason, "backend next hop unresolved; backend kept out of the tables");
                    }
                }
            }
        }
        self.control.egress.retain(|a, _| wanted.contains(a));
        self.failing.retain(|a, _| wanted.contains(a));
        changed
    }

    /// Looks up every backend in the background; the results come back through `resolved_tx`.
    fn resolve_in_background(&mut self) {
        if self.resolving {
            self.resolve_again = true;
            return;
        }
        let addrs = self.control.state().backend_addrs();
        if addrs.is_empty() {
            return;
        }
        self.resolving = true;
        let resolver = self.resolver.clone();
        let tx = self.resolved_tx.clone();
        tokio::spawn(async move {
            // The agent may be stopping; then nobody needs the answer.
            let _ = tx.send(resolve_many(&resolver, addrs).await);
        });
    }

    fn reconcile(&mut self) {
        if let Err(e) = self.control.reconcile() {
            tracing::error!(error = %e, "reconcile failed; will retry");
        }
    }

    /// Makes the checker check what the state asks for (after every change). A backend that
    /// leaves its check and comes back starts over as up; one whose check changes keeps its
    /// state.
    fn sync_checks(&mut self) {
        let targets: Vec<Target> = self
            .control
            .state()
            .vips
            .values()
            .flat_map(|vip| {
                vip.backends
                    .iter()
                    .filter_map(|b| Some((b.addr, vip.check_of(b)?)))
                    .filter_map(|(addr, spec)| self.target(vip, addr, spec))
            })
            .collect();
        self.checker.set_targets(targets);
        self.refresh_health();
    }

    /// Takes which backends are down from the checker itself, the one source of truth: a
    /// transition still queued for a check that has since changed or gone cannot leave a
    /// backend down with nothing checking it.
    fn refresh_health(&mut self) {
        let down: BTreeSet<_> = self
            .checker
            .snapshot()
            .into_iter()
            .filter(|(_, s)| !s.up)
            .map(|(id, _)| (id.vip, id.backend))
            .collect();
        if down != self.control.health.down {
            self.control.health.down = down;
            self.reconcile();
        }
    }

    fn target(&self, vip: &VipSpec, backend: IpAddr, spec: &CheckSpec) -> Option<Target> {
        let port = spec.port.unwrap_or(vip.id.port);
        let kind = match &spec.kind {
            CheckKind::None => return None,
            CheckKind::Tcp => ProbeKind::Tcp,
            CheckKind::Http { path } => ProbeKind::Http {
                path: path.clone(),
                host: spec.host.clone(),
                status: spec.status.lo..=spec.status.hi,
            },
        };
        // Through the tunnel: to the VIP, marked with the backend's slot so the gateway's tc
        // program encapsulates it to that backend (no slot yet: checked once it has one).
        let (addr, mark) = if spec.via_tunnel {
            let slot = self.control.slot_of(&vip.id, backend)?;
            (vip.id.addr, Some(lb_common::maps::hc_mark(slot)))
        } else {
            (backend, None)
        };
        Some(Target {
            id: TargetId {
                vip: vip.id,
                backend,
            },
            probe: Probe {
                addr: std::net::SocketAddr::new(addr, port),
                kind,
                timeout: spec.timeout.0,
                mark,
            },
            interval: spec.interval.0,
            rise: spec.rise,
            fall: spec.fall,
        })
    }

    /// Each checked backend's health, for status.
    fn health_reports(&self) -> BTreeMap<(crate::model::VipId, IpAddr), HealthReport> {
        let now = std::time::SystemTime::now();
        let state = self.control.state();
        self.checker
            .snapshot()
            .into_iter()
            .filter_map(|(id, s)| {
                let vip = state.vip(&id.vip)?;
                let spec = vip.check_of(vip.backend(id.backend)?)?;
                let via = if spec.via_tunnel { " via tunnel" } else { "" };
                let report = HealthReport {
                    check: format!("{} every {}{via}", spec.kind, spec.interval),
                    up: s.up,
                    since_secs: now.duration_since(s.since).unwrap_or_default().as_secs(),
                    last: s.last_ok.map(|ok| {
                        if ok {
                            "ok".to_owned()
                        } else {
                            s.last_reason.clone()
                        }
                    }),
                    last_latency_us: s.last_latency.map(|d| d.as_micros() as u64),
                };
                Some(((id.vip, id.backend), report))
            })
            .collect()
    }

    fn on_transition(&mut self, t: &Transition) {
        self.metrics
            .health_transition(&t.id.vip, t.id.backend, t.up);
        if t.up {
            tracing::info!(vip = %t.id.vip, backend = %t.id.backend, cause = %t.reason, "health: backend up");
        } else {
            tracing::warn!(vip = %t.id.vip, backend = %t.id.backend, cause = %t.reason, "health: backend down");
        }
        self.refresh_health();
    }

    /// Resolves a request's new backends (briefly), then commits it.
    async fn commit(&mut self, pending: Pending) -> Result<api::proto::ChangeReply, ApiError> {
        // Backends already known to fail are retried by the background lookups, not here.
        let new: Vec<IpAddr> = pending
            .backend_addrs()
            .into_iter()
            .filter(|a| !self.control.egress.contains_key(a) && !self.failing.contains_key(a))
            .collect();
        let mut late = false;
        if !new.is_empty() && !pending.is_dry_run() {
            // Resolved neighbours answer in microseconds; a missing one takes the neighbour
            // timeout, and the request does not wait that long for it.
            let lookups = new
                .iter()
                .map(|a| tokio::time::timeout(CHANGE_RESOLVE_BUDGET, self.resolver.resolve(*a)));
            let answered: Resolved = new
                .iter()
                .zip(join_all(lookups).await)
                .filter_map(|(a, r)| Some((*a, r.ok()?.map_err(|e| e.to_string()))))
                .collect();
            late = answered.len() < new.len();
            let mut wanted = self.control.state().backend_addrs();
            wanted.extend(new);
            self.absorb(answered, &wanted);
        }
        let started = Instant::now();
        let reply = self.commit_with_room(pending).await;
        self.metrics
            .reconfigured(reconfig_result(&reply), started.elapsed());
        // The state changed (or a failed write left it half done): checks follow it, and the
        // backends that did not answer in time join when their lookup ends.
        self.sync_checks();
        if late {
            self.resolve_in_background();
        }
        reply
    }

    /// Commits; a change refused only because replaced tables are still in quarantine is
    /// tried once more when the quarantine ends.
    async fn commit_with_room(
        &mut self,
        pending: Pending,
    ) -> Result<api::proto::ChangeReply, ApiError> {
        let retry = pending.clone();
        match self.commit_now(pending) {
            Err(e) if e.kind == ErrorKind::NoRoom => match self.control.room_after() {
                Some(wait) => {
                    tracing::debug!(
                        ?wait,
                        "no room until replaced tables leave quarantine; waiting"
                    );
                    tokio::time::sleep(wait).await;
                    self.commit_now(retry)
                }
                None => Err(e),
            },
            reply => reply,
        }
    }

    fn commit_now(&mut self, pending: Pending) -> Result<api::proto::ChangeReply, ApiError> {
        let reply = self.control.commit(pending);
        match &reply {
            Ok(r) if r.applied => {
                for change in &r.changes {
                    tracing::info!(change = %change, cause = "api", "change applied");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::info!(error = %e, "change refused"),
        }
        reply
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::State(reply) => {
                let _ = reply.send(self.control.state_reply());
            }
            Command::Change { request, reply } => {
                let result = match self.control.prepare_changes(request) {
                    Ok(pending) => self.commit(pending).await,
                    Err(e) => Err(self.refused(e)),
                };
                let _ = reply.send(result);
            }
            Command::Apply { request, reply } => {
                let result = match self.control.prepare_apply(request) {
                    Ok(pending) => self.commit(pending).await,
                    Err(e) => Err(self.refused(e)),
                };
                let _ = reply.send(result);
            }
            Command::Status {
                idle_timeout,
                reply,
            } => {
                let template = self.status_template(idle_timeout);
                self.count_flows(idle_timeout, reply, move |counts| Ok(template.fill(counts)));
            }
            Command::Flows {
                vip,
                backend,
                idle_timeout,
                reply,
            } => match self.control.flow_key(&vip, backend) {
                Ok(key) => self.count_flows(idle_timeout, reply, move |counts| {
                    Ok(counts.live.get(&key).copied().unwrap_or(0))
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Stats {
                idle_timeout,
                reply,
            } => {
                let template = self.status_template(idle_timeout);
                let counters = self.control.dp().counters();
                let capacity = u64::from(self.control.dp().flow_table_size());
                let rates = self.rates.clone();
                self.count_flows(idle_timeout, reply, move |counts| {
                    let mut rates = rates.lock().unwrap_or_else(PoisonError::into_inner);
                    metrics::stats::collect(
                        template,
                        &*counters,
                        counts,
                        capacity,
                        &mut rates,
                        Instant::now(),
                    )
                    .map_err(|e| ApiError::new(ErrorKind::Internal, format!("counters: {e}")))
                });
            }
            Command::Debug { set, reply } => {
                let result = match set {
                    Some(debug) => self.set_debug(debug.data_plane),
                    None => Ok(()),
                };
                let _ = reply.send(result.map(|()| api::proto::Debug {
                    data_plane: self.debug,
                }));
            }
        }
    }

    /// Status without flow counts (a scan fills them in off the loop).
    fn status_template(&self, idle_timeout: Duration) -> crate::control::StatusTemplate {
        self.control
            .status_template(idle_timeout.as_secs(), &self.health_reports())
    }

    /// A request refused before it reached the data plane, counted.
    fn refused(&self, e: ApiError) -> ApiError {
        tracing::info!(error = %e, "change refused");
        self.metrics
            .reconfigured(ReconfigResult::Refused, Duration::ZERO);
        e
    }

    /// What the data plane is configured with: the settings, the debug switch and the clock.
    fn global_config(&self) -> GlobalConfig {
        let mut config = self.control.settings.global_config();
        if self.debug {
            config.flags |= CFG_F_DEBUG;
        }
        config.now_tick = flows::now_tick();
        config
    }

    /// The time flows are judged at (see `flows::Clock`).
    fn clock(&self) -> flows::Clock {
        flows::Clock {
            now: flows::now_tick(),
            frozen: self.clock.frozen,
        }
    }

    /// Publishes the clock the data plane stamps flows with.
    fn publish_clock(&mut self) {
        let config = self.global_config();
        match self.control.dp_mut().set_config(&config) {
            Ok(()) => self.clock.failing = false,
            // Once per failing spell: it repeats four times a second.
            Err(e) if !self.clock.failing => {
                self.clock.failing = true;
                tracing::warn!(error = %e, "publishing the clock failed; flows keep older stamps");
            }
            Err(_) => {}
        }
    }

    fn set_debug(&mut self, on: bool) -> Result<(), ApiError> {
        if on == self.debug {
            return Ok(());
        }
        self.debug = on;
        let config = self.global_config();
        if let Err(e) = self.control.dp_mut().set_config(&config) {
            self.debug = !on;
            return Err(ApiError::new(
                ErrorKind::Internal,
                format!("data_plane: writing the debug switch failed: {e}"),
            ));
        }
        tracing::info!(on, cause = "api", "data-plane debug logging switched");
        Ok(())
    }

    /// Scans the flow table on a blocking thread and answers with `finish(counts)`.
    fn count_flows<T: Send + 'static>(
        &self,
        idle_timeout: Duration,
        reply: oneshot::Sender<Result<T, ApiError>>,
        finish: impl FnOnce(&flows::Counts) -> Result<T, ApiError> + Send + 'static,
    ) {
        let table = self.control.dp().flow_table();
        let cache = self.flow_counts.clone();
        let clock = self.clock();
        tokio::task::spawn_blocking(move || {
            let counts = cache.counts(&*table, clock, flows::idle_ticks(idle_timeout));
            let result = counts
                .map_err(|e| ApiError::new(ErrorKind::Internal, format!("flow table: {e}")))
                .and_then(|c| finish(&c));
            let _ = reply.send(result);
        });
    }

    /// Attaches (or adopts) `lb_xdp` and the health-check encapsulator on every interface.
    fn attach_all(&mut self) -> Result<(), AgentError> {
        for iface in &self.opts.ifaces {
            match self.control.dp_mut().attach(iface, self.opts.mode)? {
                Attached::Adopted => {
                    tracing::info!(iface, "adopted the pinned link; program replaced in place");
                }
                Attached::New => tracing::info!(iface, mode = ?self.opts.mode, "attached"),
            }
            // The tc program that sends tunnel checks (`via_tunnel`) the way traffic goes; it
            // touches only packets lbd's own probes mark. Needs tcx (kernel 6.6+): without it only
            // those checks are lost.
            if let Err(e) = self.control.dp_mut().attach_hc(iface) {
                tracing::warn!(iface, error = %e, "no health checks through the tunnel on this interface");
            }
        }
        Ok(())
    }

    fn reload(&mut self) {
        match load_config(&self.opts.config_path) {
            Ok(new) => {
                // Lowered limits must hold for what runs now, as they would at a restart.
                if let Err(e) = new.settings.limits().check(self.control.state()) {
                    tracing::error!(error = %e, path = %self.opts.config_path.display(),
                        "config reload rejected: the running state is above its limits; keeping the running config");
                    return;
                }
                tracing::info!(path = %self.opts.config_path.display(), cause = "SIGHUP", "config reloaded");
                warn_if_vips_differ(&new, self.control.state());
                self.control.settings = new.settings;
                let global = self.global_config();
                if let Err(e) = self.control.dp_mut().set_config(&global) {
                    tracing::error!(error = %e, "writing the reloaded settings failed");
                }
                let limit = flow_guard_limit(new.settings, self.control.dp());
                if let Err(e) = self.control.dp_mut().set_flow_guard(limit) {
                    tracing::error!(error = %e, "writing the new-flow limit failed");
                }
                // A new gue_port rewrites the slots of GUE VIPs; otherwise nothing changes.
                self.reconcile();
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; keeping the running config");
            }
        }
    }
}

/// The new-flow rate guard's limit for `settings` on this data plane's flow table and CPUs.
fn flow_guard_limit(settings: Settings, dp: &KernelDataPlane) -> u32 {
    // The flow table's LRU lists are per possible CPU, as aya counts them.
    let cpus = aya::util::nr_cpus().map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let limit = settings.new_flow_limit_for(dp.flow_table_size(), cpus);
    tracing::info!(
        limit,
        cause = if settings.new_flow_limit.is_some() {
            "config"
        } else {
            "default"
        },
        "new flows each CPU records per second at most (0: no limit)"
    );
    limit
}

/// The metrics label of a change's outcome.
fn reconfig_result(reply: &Result<api::proto::ChangeReply, ApiError>) -> ReconfigResult {
    match reply {
        Ok(r) if r.applied => ReconfigResult::Applied,
        Ok(_) => ReconfigResult::Unchanged,
        Err(e) if e.kind == ErrorKind::Internal => ReconfigResult::Failed,
        Err(_) => ReconfigResult::Refused,
    }
}

/// The config file, or the defaults when there is none.
fn load_config(path: &std::path::Path) -> Result<Config, config::ConfigError> {
    if !path.exists() {
        tracing::info!(path = %path.display(), "no config file; using the default settings");
        return Ok(Config::default());
    }
    config::load_config(path)
}

fn warn_if_vips_differ(config: &Config, running: &DesiredState) {
    if !config.state.vips.is_empty() && config.state != *running {
        tracing::warn!(
            "the config file's [[vip]] list differs from the saved state and is ignored: the \
             state file holds the running VIPs (use `lbctl apply -f` to apply a file)"
        );
    }
}

/// The saved state, or (first start) the config file's VIPs, saved. A state file that is
/// there but not whole and valid (see [`StateStore::load`]), or that is above the config's
/// limits, stops lbd with the file and the problem named; it is never overwritten.
fn restore_state(
    path: &std::path::Path,
    config: &Config,
    config_path: &std::path::Path,
) -> Result<(StateStore, DesiredState), AgentError> {
    let store = StateStore::new(path);
    let state = if let Some(saved) = store.load()? {
        config
            .settings
            .limits()
            .check(&saved)
            .map_err(|source| AgentError::OverLimit {
                state: path.to_owned(),
                config: config_path.to_owned(),
                source,
            })?;
        tracing::info!(path = %store.path().display(), vips = saved.vips.len(), "restored the saved state");
        warn_if_vips_differ(config, &saved);
        saved
    } else {
        tracing::info!(path = %store.path().display(), vips = config.state.vips.len(),
            "no saved state; starting from the config file");
        store.save(&config.state)?;
        config.state.clone()
    };
    Ok((store, state))
}

/// Serves `/metrics` and the status page until the returned sender is used or dropped.
fn spawn_metrics_server(
    listener: tokio::net::TcpListener,
    commands: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = listener.local_addr().ok();
    tokio::spawn(metrics::server::serve(
        listener,
        commands,
        metrics,
        async move {
            let _ = stopped.await;
        },
    ));
    tracing::info!(addr = ?addr, "serving /metrics and the status page");
    stop
}

/// Runs lbd until SIGINT or SIGTERM. The data plane stays pinned and forwarding afterwards,
/// unless `detach_on_exit` asks to take it out of the kernel.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    // Handlers first: a SIGHUP (systemctl reload) or SIGTERM during start-up must not kill lbd
    // by the default action halfway through adopting the data plane.
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let config = load_config(&opts.config_path)?;
    let (store, state) = restore_state(&opts.state_path, &config, &opts.config_path)?;
    // The socket first: a bad socket path stops lbd before it touches the data plane.
    let listener = api::server::bind(&opts.socket, opts.socket_group.as_deref())?;
    let metrics_listener = match opts.metrics_addr {
        Some(addr) => Some(metrics::server::bind(addr).await?),
        None => None,
    };

    let mut dp = KernelDataPlane::load(&opts.load)?;
    let clock = PublishedClock::start(&mut dp, config.settings)?;
    dp.set_flow_guard(flow_guard_limit(config.settings, &dp))?;
    let reconciler = Reconciler::adopt(&dp, DEFAULT_QUARANTINE)?;
    // Start from the next hops the adopted slots hold, so a neighbour entry that is briefly
    // unusable at restart does not take a backend (and its flows) down.
    let egress = reconciler.installed_egress();
    let control = Control::new(config.settings, state, store, dp, reconciler, egress);

    let resolver = Arc::new(Resolver::new()?);
    let mut netlink_changes = watch_changes().await?;
    let (resolved_tx, mut resolved_rx) = mpsc::unbounded_channel();
    let health_runtime = HealthRuntime::start()?;
    let metrics = Arc::new(Metrics::new());
    let (checker, mut transitions) = {
        let _on_it = health_runtime.handle().enter();
        let metrics = metrics.clone();
        let observer: crate::health::ProbeObserver =
            Arc::new(move |ok, took| metrics.probed(ok, took));
        Checker::spawn_observed(MAX_CHECKS_IN_FLIGHT, Some(observer))
            .expect("entered the health runtime")
    };
    let mut agent = Agent {
        opts,
        control,
        resolver,
        failing: BTreeMap::new(),
        resolved_tx,
        resolving: false,
        resolve_again: false,
        checker,
        flow_counts: Arc::default(),
        metrics,
        rates: Arc::default(),
        debug: false,
        clock,
    };
    let addrs = agent.control.state().backend_addrs();
    let first = resolve_many(&agent.resolver, addrs.clone()).await;
    agent.absorb(first, &addrs);
    agent.control.reconcile()?;
    agent.sync_checks();

    agent.attach_all()?;

    let (commands_tx, mut commands) = mpsc::channel(64);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let metrics_stop = metrics_listener
        .map(|listener| spawn_metrics_server(listener, commands_tx.clone(), agent.metrics.clone()));
    let server = tokio::spawn(api::server::serve(listener, commands_tx, async move {
        let _ = stop_rx.await;
    }));
    tracing::info!(vips = agent.control.state().vips.len(), pins = %agent.control.dp().pin_dir().display(),
        socket = %agent.opts.socket.display(), "lbd running");

    let mut tick = tokio::time::interval(agent.opts.resolve_interval);
    tick.tick().await;
    let mut clock = tokio::time::interval(CLOCK_INTERVAL);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => agent.reload(),
            _ = clock.tick() => agent.publish_clock(),
            Some(command) = commands.recv() => agent.handle(command).await,
            Some(transition) = transitions.recv() => agent.on_transition(&transition),
            Some(results) = resolved_rx.recv() => {
                agent.resolving = false;
                let wanted = agent.control.state().backend_addrs();
                if agent.absorb(results, &wanted) {
                    agent.reconcile();
                }
                if std::mem::take(&mut agent.resolve_again) {
                    agent.resolve_in_background();
                }
            }
            Some(()) = netlink_changes.next() => {
                tracing::debug!("routes or neighbours changed");
                agent.resolve_in_background();
            }
            _ = tick.tick() => {
                agent.resolve_in_background();
                // Also retries a failed write and releases quarantined slots and regions.
                agent.reconcile();
                agent.sync_checks();
            }
        }
    }
    shut_down(&mut agent, stop_tx, metrics_stop, server).await
}

/// After SIGTERM or SIGINT: stops the servers, then (`--detach-on-exit`) takes the data plane
/// out of the kernel; otherwise leaves it pinned and forwarding.
async fn shut_down(
    agent: &mut Agent,
    stop_api: oneshot::Sender<()>,
    stop_metrics: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), api::server::ServerError>>,
) -> Result<(), AgentError> {
    if agent.opts.detach_on_exit {
        tracing::info!("lbd stopping; detaching the data plane (--detach-on-exit)");
    } else {
        tracing::info!("lbd stopping; the data plane stays pinned and forwarding");
    }
    let _ = stop_api.send(());
    if let Some(stop) = stop_metrics {
        let _ = stop.send(());
    }
    // Requests in flight get their answer or a closed connection; either is fine at exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if agent.opts.detach_on_exit {
        // No request can change the maps any more: the loop that applies them has ended.
        detach(agent.control.dp_mut())?;
    }
    Ok(())
}

/// `--detach-on-exit`: programs detached, every pin and the pin folder removed.
fn detach(dp: &mut KernelDataPlane) -> Result<(), AgentError> {
    let detached = dp.detach_and_unpin().map_err(AgentError::Detach)?;
    tracing::info!(xdp = ?detached.xdp, tc = ?detached.hc, map_pins = detached.maps,
        pins = %dp.pin_dir().display(),
        "data plane detached and unpinned; it goes with lbd's last descriptors");
    Ok(())
}
