//! lbd's main loop: load (or adopt) the data plane, resolve every backend's next hop, reconcile,
//! attach, then keep next hops fresh as the kernel's routes and neighbours change. The order at
//! start matters: tables are complete before a freshly attached program sees its first packet,
//! and an adopted program keeps forwarding from the pinned maps the whole time.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use futures::StreamExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config,
    dataplane::{
        DataPlane, DataPlaneError,
        kernel::{AttachMode, Attached, KernelDataPlane, LoadOptions},
    },
    model::DesiredState,
    nexthop::{NextHop, ResolveError, Resolver, watch_changes},
    reconcile::{BackendPlan, DEFAULT_QUARANTINE, Egress, ReconcileError, Reconciler, VipPlan},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error("next-hop resolution: {0}")]
    Resolve(#[from] ResolveError),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Everything lbd is started with.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
    pub config_path: PathBuf,
    pub load: LoadOptions,
    /// Re-resolve every backend this often even without a netlink notification.
    pub resolve_interval: Duration,
}

/// Turns the desired state plus what is known of next hops into reconcile's input.
pub fn plans(state: &DesiredState, egress: &BTreeMap<IpAddr, Egress>) -> Vec<VipPlan> {
    state
        .vips
        .values()
        .map(|vip| VipPlan {
            key: vip.id.key(),
            flags: vip.hash.vip_flags(),
            ring_size: vip.ring_size,
            backends: vip
                .backends
                .iter()
                .map(|b| BackendPlan {
                    addr: b.addr,
                    weight: b.effective_weight(),
                    egress: egress.get(&b.addr).copied(),
                })
                .collect(),
        })
        .collect()
}

fn egress_of(hop: &NextHop) -> Egress {
    Egress {
        ifindex: hop.ifindex,
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
    }
}

/// Resolves every backend of `state`. A backend that resolved before and fails now keeps its
/// last next hop (a neighbour entry flapping must not kill its flows); one that never resolved
/// stays out of the tables. Either way it is reported.
async fn resolve_all(
    resolver: &Resolver,
    state: &DesiredState,
    known: &mut BTreeMap<IpAddr, Egress>,
    failing: &mut BTreeMap<IpAddr, String>,
) {
    let mut addrs: Vec<IpAddr> = state
        .vips
        .values()
        .flat_map(|v| v.backends.iter().map(|b| b.addr))
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    known.retain(|a, _| addrs.contains(a));
    failing.retain(|a, _| addrs.contains(a));
    for addr in addrs {
        let result = resolver.resolve(addr).await;
        // Report each failure once, when it starts or its reason changes, not on every retry.
        let reason = result.as_ref().err().map(ToString::to_string);
        let newly_failing = match &reason {
            Some(r) => failing.insert(addr, r.clone()).as_ref() != Some(r),
            None => failing.remove(&addr).is_some(),
        };
        match result {
            Ok(hop) => {
                let egress = egress_of(&hop);
                if known.insert(addr, egress) != Some(egress) {
                    tracing::info!(backend = %addr, iface = %hop.ifname, gateway = ?hop.gateway,
                        mac = %mac(hop.dst_mac), "backend next hop resolved");
                }
            }
            Err(_) if !newly_failing => {}
            Err(e) if known.contains_key(&addr) => {
                tracing::warn!(backend = %addr, error = %e, "backend next hop unresolved; keeping the last one");
            }
            Err(e) => {
                tracing::error!(backend = %addr, error = %e, "backend next hop unresolved; backend kept out of the tables");
            }
        }
    }
}

fn mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Runs lbd until SIGINT or SIGTERM. The data plane stays pinned and forwarding afterwards.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let mut config = config::load_config(&opts.config_path)?;
    let mut dp = KernelDataPlane::load(&opts.load)?;
    dp.set_config(&config.settings.global_config())?;
    let mut reconciler = Reconciler::adopt(&dp, DEFAULT_QUARANTINE)?;

    let resolver = Resolver::new()?;
    let mut changes = watch_changes().await?;
    // Start from the next hops the adopted slots hold, so a neighbour entry that is briefly
    // unusable at restart does not take a backend (and its flows) down.
    let mut egress = reconciler.installed_egress();
    let mut failing = BTreeMap::new();
    resolve_all(&resolver, &config.state, &mut egress, &mut failing).await;
    reconciler.apply(&mut dp, &plans(&config.state, &egress))?;

    for iface in &opts.ifaces {
        match dp.attach(iface, opts.mode)? {
            Attached::Adopted => {
                tracing::info!(iface, "adopted the pinned link; program replaced in place");
            }
            Attached::New => tracing::info!(iface, mode = ?opts.mode, "attached"),
        }
    }
    tracing::info!(vips = config.state.vips.len(), pins = %dp.pin_dir().display(), "lbd running");

    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let mut tick = tokio::time::interval(opts.resolve_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => match config::load_config(&opts.config_path) {
                Ok(new) => {
                    tracing::info!(path = %opts.config_path.display(), "config reloaded");
                    config = new;
                    dp.set_config(&config.settings.global_config())?;
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload rejected; keeping the running config");
                    continue;
                }
            },
            Some(()) = changes.next() => tracing::debug!("routes or neighbours changed"),
            _ = tick.tick() => {}
        }
        resolve_all(&resolver, &config.state, &mut egress, &mut failing).await;
        if let Err(e) = reconciler.apply(&mut dp, &plans(&config.state, &egress)) {
            tracing::error!(error = %e, "reconcile failed; will retry");
        }
    }
    tracing::info!("lbd stopping; the data plane stays pinned and forwarding");
    Ok(())
}
