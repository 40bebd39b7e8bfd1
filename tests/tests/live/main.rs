//! Live reconfiguration through the real agent and data plane (issue 3): lbd on a gateway, lbctl
//! and the control API driving it, real long-lived TCP connections through the VIP the whole
//! time.
//!
//! - `churn`: 200 chatting connections survive 1000 random changes (backends added, removed,
//!   reweighted, drained; other VIPs added and removed); new connections then reach exactly the
//!   backends in the table.
//! - `restarts_and_upgrades`: the same kind of connections survive 20 SIGKILL+restart cycles and
//!   20 `lbd upgrade`s, and every restart comes back with the state it had.
//! - `drain_wait`: `backend drain --wait` returns within 2 s of the last flow closing, and fails
//!   cleanly at its timeout, leaving the backend draining.
//! - `bad_input`: malformed or refused requests (lbctl and raw HTTP, and a peer without
//!   permission) each get a clear error and change nothing: export, state file and maps compare
//!   equal before and after.
//! - `reconfig_latency`: time from a `backend add` request (in-process API client) to the data
//!   plane using the backend, over 1000 adds to a default-size table; printed.
//!
//! The churn's random changes are reproducible: the seed is printed, `LB_TEST_SEED` reuses one.

mod bad_input;
mod churn;
mod drain;
mod latency;
mod restarts;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    lb::{DataPath, Lbd, LbdOptions, VipConfig, render_config},
    lbctl::{Lbctl, Run},
    netns::{Netns, topology::Topology},
    traffic::{Server, who},
};
use lb_userspace::{
    api::proto::{Status, VipStatus},
    change::Change,
    dataplane::kernel::AttachMode,
    model::{DesiredState, VipId, VipSpec},
};

const PORT: u16 = 80;
/// A small prime table size: 1000 changes stay fast.
const CHURN_RING: u32 = 4099;
/// Long-lived chatting connections in the churn and restart tests.
const CONNECTIONS: usize = 200;
/// Longest pause allowed between two exchanges on a chatting connection (they chat every
/// 100 ms).
const MAX_GAP: Duration = Duration::from_secs(1);
const MODE: AttachMode = AttachMode::Native;

/// A topology with `lb_decap` and a server on every backend (lbd is started by each test, since
/// it borrows the gateway's namespace).
struct Bed {
    _servers: Vec<Server>,
    _datapath: DataPath,
    topo: Topology,
}

impl Bed {
    fn new(label: &str, backends: usize) -> Result<Self> {
        let topo = Topology::one_arm(label).backends(backends).build()?;
        let datapath = DataPath::attach(&topo, MODE, &[IpAddr::V4(topo.vip)])?;
        let servers = topo
            .backends
            .iter()
            .map(|b| Server::start(&b.ns, &b.name, PORT))
            .collect::<Result<_>>()?;
        Ok(Self {
            _servers: servers,
            _datapath: datapath,
            topo,
        })
    }

    fn client(&self) -> &Netns {
        &self.topo.client.ns
    }

    fn gw(&self) -> &Netns {
        &self.topo.gw().ns
    }

    fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.topo.backends[i].ip())
    }

    /// Backend host name (`backend2`) for an address.
    fn name_of(&self, addr: IpAddr) -> Option<&str> {
        self.topo
            .backends
            .iter()
            .find(|b| IpAddr::V4(b.ip()) == addr)
            .map(|b| b.name.as_str())
    }

    fn addr_of(&self, name: &str) -> Result<IpAddr> {
        self.topo
            .backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| IpAddr::V4(b.ip()))
            .with_context(|| format!("no backend called {name}"))
    }

    fn vip(&self, port: u16, proto: &str) -> VipId {
        format!("{}:{port}/{proto}", self.topo.vip)
            .parse()
            .expect("a valid VIP")
    }

    fn target(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.vip), PORT)
    }

    fn start_lbd(&self, vips: &[VipConfig]) -> Result<Lbd<'_>> {
        self.start_lbd_with(vips, LbdOptions::default())
    }

    fn start_lbd_with(&self, vips: &[VipConfig], options: LbdOptions) -> Result<Lbd<'_>> {
        Lbd::start_with(
            self.gw(),
            &self.topo.gw().ifaces(),
            MODE,
            &render_config(vips),
            options,
        )
    }

    /// `VipConfig` for the main VIP with the first `n` backends at weight 100.
    fn main_vip(&self, n: usize, ring_size: Option<u32>) -> VipConfig {
        VipConfig {
            address: self.vip(PORT, "tcp").to_string(),
            ring_size,
            backends: (0..n).map(|i| (self.addr(i), 100)).collect(),
        }
    }
}

/// lbd must have logged no ERROR other than the expected ones about the test's addresses
/// without a host (10.99.x.x); distinct WARN messages (without timestamps) are printed.
fn expect_no_errors(lbd: &Lbd, test: &str) -> Result<()> {
    let log = lbd.log();
    let warnings: BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN "))
        .filter_map(|l| l.split_once(" WARN ").map(|(_, m)| m))
        .collect();
    if !warnings.is_empty() {
        eprintln!("{test}: lbd warned: {warnings:#?}");
    }
    lbd.expect_no_errors(|l| l.contains("next hop unresolved") && l.contains("backend=10.99."))
}

/// lbctl's arguments for one change.
fn change_args(change: &Change) -> Vec<String> {
    let s = ToString::to_string;
    match change {
        Change::VipAdd {
            vip,
            ring_size,
            hash,
            encap,
            check: None,
        } => {
            let mut a = vec![s("vip"), s("add"), vip.to_string()];
            if let Some(n) = ring_size {
                a.extend([s("--ring-size"), n.to_string()]);
            }
            if let Some(h) = hash {
                a.extend([s("--hash"), h.to_string()]);
            }
            if let Some(e) = encap {
                a.extend([s("--encap"), e.to_string()]);
            }
            a
        }
        Change::VipSet { .. }
        | Change::VipAdd { check: Some(_), .. }
        | Change::BackendAdd { check: Some(_), .. }
        | Change::VipCheck { .. }
        | Change::BackendCheck { .. } => unreachable!("the live tests make no such change"),
        Change::VipDel { vip } => vec![s("vip"), s("del"), vip.to_string()],
        Change::BackendAdd {
            vip,
            address,
            weight,
            check: None,
        } => {
            let mut a = vec![s("backend"), s("add"), vip.to_string(), address.to_string()];
            if let Some(w) = weight {
                a.extend([s("--weight"), w.to_string()]);
            }
            a
        }
        Change::BackendDel { vip, address } => {
            vec![s("backend"), s("del"), vip.to_string(), address.to_string()]
        }
        Change::BackendWeight {
            vip,
            address,
            weight,
        } => vec![
            s("backend"),
            s("weight"),
            vip.to_string(),
            address.to_string(),
            weight.to_string(),
        ],
        Change::BackendDrain { vip, address } => {
            vec![
                s("backend"),
                s("drain"),
                vip.to_string(),
                address.to_string(),
            ]
        }
        Change::BackendUndrain { vip, address } => {
            vec![
                s("backend"),
                s("undrain"),
                vip.to_string(),
                address.to_string(),
            ]
        }
    }
}

/// Applies `change` through lbctl and to `mirror`; both must accept it.
fn apply(lbctl: &Lbctl, mirror: &mut DesiredState, change: &Change) -> Result<Run> {
    change
        .apply(mirror)
        .with_context(|| format!("the test's own model refuses {change}"))?;
    let run = lbctl.run(change_args(change))?;
    ensure!(run.success(), "{change}: {}", run.describe());
    Ok(run)
}

/// VIPs with their backends sorted, for comparisons that ignore backend order.
fn normalized(mut vips: Vec<VipSpec>) -> Vec<VipSpec> {
    vips.sort_by_key(|v| v.id);
    for v in &mut vips {
        v.backends.sort_by_key(|b| b.addr);
    }
    vips
}

/// lbd's running state must be the test's model.
fn expect_state(lbctl: &Lbctl, mirror: &DesiredState) -> Result<()> {
    let running = normalized(lbctl.state()?.vip);
    let wanted = normalized(mirror.clone().into_vips());
    ensure!(
        running == wanted,
        "lbd's state differs from the test's model:\nlbd:  {running:?}\nmodel: {wanted:?}"
    );
    Ok(())
}

fn vip_status<'s>(status: &'s Status, vip: &VipId) -> Result<&'s VipStatus> {
    status
        .vips
        .iter()
        .find(|v| v.vip == *vip)
        .with_context(|| format!("status has no VIP {vip}: {status:?}"))
}

/// The status without its live flow counts (which move with traffic).
fn without_flows(mut status: Status) -> Status {
    for v in &mut status.vips {
        for b in &mut v.backends {
            b.flows = 0;
        }
    }
    status
}

/// Connects `n` times (`WHO`) and counts answers per backend name.
fn who_many(bed: &Bed, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let name = who(bed.client(), bed.target()).with_context(|| format!("WHO {i}"))?;
        *seen.entry(name).or_default() += 1;
    }
    Ok(seen)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
