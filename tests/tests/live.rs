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

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    chatter::{self, Chatter},
    lb::{DataPath, Lbd, LbdOptions, VipConfig, render_config},
    lbctl::{Lbctl, Run, run_bounded},
    netns::{Netns, topology::Topology},
    traffic::{Server, Session, who},
};
use lb_userspace::{
    api::proto::{BackendState, ChangeRequest, ErrorReply, FlowProgress, Status, VipStatus},
    change::Change,
    dataplane::kernel::AttachMode,
    model::{DesiredState, HashMode, VipId, VipSpec},
};

const PORT: u16 = 80;
const CHURN_RING: u32 = 4099;
const CONNECTIONS: usize = 200;
const MAX_GAP: Duration = Duration::from_secs(1);
const MODE: AttachMode = AttachMode::Native;

// ---------------------------------------------------------------------------------------------
// Test bed

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

/// Panics with the error and the end of lbd's log.
fn finish(result: Result<()>, lbd: &Lbd) {
    if let Err(e) = result {
        let log = lbd.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        panic!("{e:#}\n--- end of lbd log:\n{tail}");
    }
}

/// lbd must have logged no ERROR other than the expected ones about the test's addresses
/// without a host (10.99.x.x); distinct WARN messages (without timestamps) are printed.
fn expect_no_errors(lbd: &Lbd, test: &str) -> Result<()> {
    let log = lbd.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .filter(|l| !(l.contains("next hop unresolved") && l.contains("backend=10.99.")))
        .collect();
    let warnings: BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN "))
        .filter_map(|l| l.split_once(" WARN ").map(|(_, m)| m))
        .collect();
    if !warnings.is_empty() {
        eprintln!("{test}: lbd warned: {warnings:#?}");
    }
    ensure!(
        errors.is_empty(),
        "lbd logged {} errors:\n{}",
        errors.len(),
        errors.join("\n")
    );
    Ok(())
}

/// splitmix64: a seeded, reproducible source of random choices.
struct Rng(u64);

impl Rng {
    fn from_env() -> Self {
        let seed = std::env::var("LB_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("random seed {seed} (rerun with LB_TEST_SEED={seed})");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())])
    }
}

/// lbctl's arguments for one change.
fn change_args(change: &Change) -> Vec<String> {
    let s = ToString::to_string;
    match change {
        Change::VipAdd {
            vip,
            ring_size,
            hash,
        } => {
            let mut a = vec![s("vip"), s("add"), vip.to_string()];
            if let Some(n) = ring_size {
                a.extend([s("--ring-size"), n.to_string()]);
            }
            if let Some(h) = hash {
                a.extend([s("--hash"), h.to_string()]);
            }
            a
        }
        Change::VipSet { .. } => unreachable!("lbctl has no vip set"),
        Change::VipDel { vip } => vec![s("vip"), s("del"), vip.to_string()],
        Change::BackendAdd {
            vip,
            address,
            weight,
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

/// `Tcp:` counters of a namespace's `/proc/net/snmp`.
fn tcp_counters(ns: &Netns) -> Result<BTreeMap<String, i64>> {
    let text = ns.exec(["cat", "/proc/net/snmp"])?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp lines in /proc/net/snmp");
    };
    Ok(names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect())
}

fn estab_resets(ns: &Netns) -> Result<i64> {
    tcp_counters(ns)?
        .get("EstabResets")
        .copied()
        .context("no EstabResets counter")
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

/// (median, p99, max) in ms.
fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| millis(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.99), at(1.0))
}

// ---------------------------------------------------------------------------------------------
// Churn

/// Addresses with no host behind them: no route from the gateway, so they never resolve and
/// stay "down" (out of the tables).
const GHOSTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 1),
    Ipv4Addr::new(10, 99, 0, 2),
    Ipv4Addr::new(10, 99, 0, 3),
];

struct Churn {
    main: VipId,
    /// Backends carrying the connections: never removed.
    initial: Vec<IpAddr>,
    /// Backends the test may add to and remove from the main VIP.
    extras: Vec<IpAddr>,
    /// Every address other VIPs may use.
    pool: Vec<IpAddr>,
    others: Vec<VipId>,
}

impl Churn {
    /// One random change that the model accepts and that never removes a backend carrying the
    /// connections.
    fn next(&self, rng: &mut Rng, state: &DesiredState) -> Change {
        loop {
            let change = if rng.chance(60) {
                self.main_change(rng, state)
            } else {
                self.other_change(rng, state)
            };
            if let Some(change) = change
                && change.apply(&mut state.clone()).is_ok()
            {
                return change;
            }
        }
    }

    fn main_change(&self, rng: &mut Rng, state: &DesiredState) -> Option<Change> {
        let vip = self.main;
        let spec = state.vip(&vip)?;
        let present: Vec<IpAddr> = spec.backends.iter().map(|b| b.addr).collect();
        let weight = if rng.chance(10) {
            0
        } else {
            1 + rng.below(300) as u32
        };
        Some(match rng.below(6) {
            0 => Change::BackendAdd {
                vip,
                address: rng.pick(&self.extras)?,
                weight: Some(weight),
            },
            1 => {
                let added: Vec<IpAddr> = present
                    .iter()
                    .copied()
                    .filter(|a| !self.initial.contains(a))
                    .collect();
                Change::BackendDel {
                    vip,
                    address: rng.pick(&added)?,
                }
            }
            2 => Change::BackendWeight {
                vip,
                address: rng.pick(&present)?,
                weight,
            },
            3 | 4 => {
                let address = rng.pick(&present)?;
                if spec.backend(address)?.drain {
                    Change::BackendUndrain { vip, address }
                } else {
                    Change::BackendDrain { vip, address }
                }
            }
            _ => {
                // Undrain whatever is drained, so the table does not stay empty for long.
                let drained: Vec<IpAddr> = spec
                    .backends
                    .iter()
                    .filter(|b| b.drain)
                    .map(|b| b.addr)
                    .collect();
                Change::BackendUndrain {
                    vip,
                    address: rng.pick(&drained)?,
                }
            }
        })
    }

    fn other_change(&self, rng: &mut Rng, state: &DesiredState) -> Option<Change> {
        let vip = rng.pick(&self.others)?;
        let Some(spec) = state.vip(&vip) else {
            return Some(Change::VipAdd {
                vip,
                ring_size: Some(rng.pick(&[251, 1021, CHURN_RING])?),
                hash: Some(rng.pick(&[HashMode::FiveTuple, HashMode::SrcIp])?),
            });
        };
        let present: Vec<IpAddr> = spec.backends.iter().map(|b| b.addr).collect();
        Some(match rng.below(8) {
            0 => Change::VipDel { vip },
            1..=3 => Change::BackendAdd {
                vip,
                address: rng.pick(&self.pool)?,
                weight: Some(rng.below(200) as u32),
            },
            4 => Change::BackendDel {
                vip,
                address: rng.pick(&present)?,
            },
            5 => Change::BackendWeight {
                vip,
                address: rng.pick(&present)?,
                weight: 1 + rng.below(500) as u32,
            },
            _ => {
                let address = rng.pick(&present)?;
                if spec.backend(address)?.drain {
                    Change::BackendUndrain { vip, address }
                } else {
                    Change::BackendDrain { vip, address }
                }
            }
        })
    }
}

const CHANGES: usize = 1000;

#[test]
fn churn() {
    let bed = Bed::new("lv-churn", 5).expect("test bed");
    let lbd = bed
        .start_lbd(&[bed.main_vip(3, Some(CHURN_RING))])
        .expect("lbd");
    finish(churn_body(&bed, &lbd), &lbd);
}

fn churn_body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let mut mirror = DesiredState::from_vips(lbctl.state()?.vip)?;
    let main = bed.vip(PORT, "tcp");
    let ghosts: Vec<IpAddr> = GHOSTS.iter().map(|&g| IpAddr::V4(g)).collect();
    let plan = Churn {
        main,
        initial: (0..3).map(|i| bed.addr(i)).collect(),
        extras: [bed.addr(3), bed.addr(4)]
            .into_iter()
            .chain(ghosts.iter().copied())
            .collect(),
        pool: (0..5).map(|i| bed.addr(i)).chain(ghosts.clone()).collect(),
        others: vec![
            bed.vip(81, "tcp"),
            bed.vip(8080, "udp"),
            "10.200.0.101:80/tcp".parse()?,
            "10.200.0.102:443/tcp".parse()?,
            "10.200.0.103:53/udp".parse()?,
        ],
    };

    let chat = Chatter::open(
        bed.client(),
        bed.target(),
        CONNECTIONS,
        chatter::DEFAULT_INTERVAL,
    )?;
    chatter::expect_backends(&chat.snapshot(), &["backend1", "backend2", "backend3"])?;
    let resets_before = estab_resets(bed.client())?;

    let mut rng = Rng::from_env();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..CHANGES {
        let change = plan.next(&mut rng, &mirror);
        let kind = match &change {
            Change::VipAdd { .. } => "vip add",
            Change::VipDel { .. } => "vip del",
            Change::VipSet { .. } => "vip set",
            Change::BackendAdd { .. } => "backend add",
            Change::BackendDel { .. } => "backend del",
            Change::BackendWeight { .. } => "backend weight",
            Change::BackendDrain { .. } => "backend drain",
            Change::BackendUndrain { .. } => "backend undrain",
        };
        *kinds.entry(kind).or_default() += 1;
        let run = apply(&lbctl, &mut mirror, &change).with_context(|| format!("change {i}"))?;
        slowest = slowest.max(run.elapsed);
        if i % 100 == 99 {
            let report = chat.snapshot();
            report
                .check(MAX_GAP)
                .with_context(|| format!("after change {i}"))?;
            expect_state(&lbctl, &mirror).with_context(|| format!("after change {i}"))?;
        }
    }
    let churn_time = started.elapsed();
    eprintln!(
        "churn: {CHANGES} changes through lbctl in {:.1} s ({:.1} ms each, slowest {:.1} ms): {kinds:?}",
        churn_time.as_secs_f64(),
        millis(churn_time) / CHANGES as f64,
        millis(slowest)
    );
    expect_state(&lbctl, &mirror)?;
    let report = chat.snapshot();
    eprintln!("churn: {}", report.summary());
    report.check(MAX_GAP)?;
    let resets = estab_resets(bed.client())? - resets_before;
    ensure!(
        resets == 0,
        "the client saw {resets} established connections reset"
    );

    settle_and_check_new_flows(bed, lbd, &lbctl, &mut mirror)?;

    let report = chat.stop();
    eprintln!("churn: final {}", report.summary());
    report.check(MAX_GAP)?;
    ensure!(
        report.conns.iter().all(|c| c.closed_cleanly),
        "not every connection closed cleanly"
    );
    expect_no_errors(lbd, "churn")?;
    // Each connection exchanged on cadence: at least half the 100 ms slots (poll slack, CPU).
    let slots = report.elapsed.as_millis() / chatter::DEFAULT_INTERVAL.as_millis();
    ensure!(
        u128::from(report.min_exchanges()) * 2 >= slots,
        "a connection exchanged only {} times in {slots} slots",
        report.min_exchanges()
    );
    Ok(())
}

/// Leaves the main VIP with some backends active, some draining and one down, then checks
/// that new connections reach exactly the active ones.
fn settle_and_check_new_flows(
    bed: &Bed,
    lbd: &Lbd,
    lbctl: &Lbctl,
    mirror: &mut DesiredState,
) -> Result<()> {
    let vip = bed.vip(PORT, "tcp");
    let ghost = IpAddr::V4(GHOSTS[0]);
    // (address, weight, drained)
    let wanted = [
        (bed.addr(0), 100, false),
        (bed.addr(1), 100, true),
        (bed.addr(2), 100, false),
        (bed.addr(3), 100, false),
        (bed.addr(4), 100, true),
        (ghost, 100, false),
    ];
    for (address, weight, drain) in wanted {
        let spec = mirror.vip(&vip).context("main VIP gone")?;
        let mut changes = Vec::new();
        match spec.backend(address) {
            None => changes.push(Change::BackendAdd {
                vip,
                address,
                weight: Some(weight),
            }),
            Some(b) if b.weight != weight => changes.push(Change::BackendWeight {
                vip,
                address,
                weight,
            }),
            Some(_) => {}
        }
        let drained = spec.backend(address).is_some_and(|b| b.drain);
        if drain && !drained {
            changes.push(Change::BackendDrain { vip, address });
        } else if !drain && drained {
            changes.push(Change::BackendUndrain { vip, address });
        }
        for change in changes {
            apply(lbctl, mirror, &change)?;
        }
    }
    // Leave nothing else on the main VIP.
    let extra: Vec<IpAddr> = mirror
        .vip(&vip)
        .context("main VIP gone")?
        .backends
        .iter()
        .map(|b| b.addr)
        .filter(|a| !wanted.iter().any(|w| w.0 == *a))
        .collect();
    for address in extra {
        apply(lbctl, mirror, &Change::BackendDel { vip, address })?;
    }
    expect_state(lbctl, mirror)?;

    let status = lbctl.status()?;
    let main = vip_status(&status, &vip)?;
    let by_state = |state: BackendState| -> BTreeSet<IpAddr> {
        main.backends
            .iter()
            .filter(|b| b.state == state)
            .map(|b| b.address)
            .collect()
    };
    let active = by_state(BackendState::Active);
    let expected_active: BTreeSet<IpAddr> = [bed.addr(0), bed.addr(2), bed.addr(3)].into();
    ensure!(
        active == expected_active,
        "active per status: {active:?}, expected {expected_active:?}: {main:?}"
    );
    ensure!(
        by_state(BackendState::Draining) == [bed.addr(1), bed.addr(4)].into(),
        "draining per status: {main:?}"
    );
    ensure!(
        by_state(BackendState::Down) == [ghost].into(),
        "down per status: {main:?}"
    );
    let in_table = lbd.maps()?.table_addrs(&vip.key())?;
    ensure!(
        in_table == active,
        "the data plane's table holds {in_table:?}, status says {active:?}"
    );

    let seen = who_many(bed, 300)?;
    let seen_names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    let active_names: BTreeSet<&str> = active.iter().filter_map(|a| bed.name_of(*a)).collect();
    eprintln!("churn: 300 new connections: {seen:?}; active {active_names:?}");
    ensure!(
        seen_names == active_names,
        "new connections reached {seen:?}, the active backends are {active_names:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Restarts and upgrades

const CYCLES: usize = 20;

#[test]
fn restarts_and_upgrades() {
    let bed = Bed::new("lv-restart", 3).expect("test bed");
    let second = VipConfig {
        address: bed.vip(8080, "udp").to_string(),
        ring_size: Some(251),
        backends: vec![(bed.addr(0), 100)],
    };
    let mut lbd = bed
        .start_lbd(&[bed.main_vip(3, Some(CHURN_RING)), second])
        .expect("lbd");
    let result = restarts_body(&bed, &mut lbd);
    finish(result, &lbd);
}

fn restarts_body(bed: &Bed, lbd: &mut Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let main = bed.vip(PORT, "tcp");
    let mut mirror = DesiredState::from_vips(lbctl.state()?.vip)?;
    let chat = Chatter::open(
        bed.client(),
        bed.target(),
        CONNECTIONS,
        chatter::DEFAULT_INTERVAL,
    )?;
    let resets_before = estab_resets(bed.client())?;
    let link = lbd.pin_dir.join("links").join("eth0");
    let mut restarts = Vec::new();
    let mut upgrades = Vec::new();

    for cycle in 0..CYCLES {
        // A change before every restart, so each one has a different state to restore.
        let change = cycle_change(bed, &mirror, cycle);
        apply(&lbctl, &mut mirror, &change).with_context(|| format!("cycle {cycle}"))?;
        let export = lbctl.export()?;
        restarts.push(
            restart_and_compare(lbd, &lbctl, &main).with_context(|| format!("cycle {cycle}"))?,
        );
        expect_state(&lbctl, &mirror)?;

        let before = link_prog_id(&link)?;
        let t = Instant::now();
        lbd.upgrade()
            .with_context(|| format!("cycle {cycle}: upgrade"))?;
        upgrades.push(t.elapsed());
        let after = link_prog_id(&link)?;
        ensure!(
            after != before,
            "cycle {cycle}: the link still runs program {before} after the upgrade"
        );
        expect_pinned_maps(lbd, after).with_context(|| format!("cycle {cycle}"))?;
        ensure!(
            lbctl.export()? == export,
            "cycle {cycle}: export differs after the upgrade"
        );
        chat.snapshot()
            .check(MAX_GAP)
            .with_context(|| format!("cycle {cycle}"))?;
    }
    let (r_med, _, r_max) = percentiles(&mut restarts);
    let (u_med, _, u_max) = percentiles(&mut upgrades);
    eprintln!(
        "restarts: {CYCLES} SIGKILL+restart to ready: median {r_med:.0} ms, max {r_max:.0} ms; \
         {CYCLES} upgrades: median {u_med:.0} ms, max {u_max:.0} ms"
    );
    let resets = estab_resets(bed.client())? - resets_before;
    let report = chat.stop();
    eprintln!("restarts: {}", report.summary());
    report.check(MAX_GAP)?;
    ensure!(
        report.conns.iter().all(|c| c.closed_cleanly),
        "not every connection closed cleanly"
    );
    ensure!(
        resets == 0,
        "the client saw {resets} established connections reset"
    );
    expect_no_errors(lbd, "restarts")?;
    Ok(())
}

/// The change made before restart `cycle`: weights, a ghost backend on the second VIP, or
/// draining and undraining a backend that carries connections.
fn cycle_change(bed: &Bed, mirror: &DesiredState, cycle: usize) -> Change {
    let main = bed.vip(PORT, "tcp");
    let drained = mirror
        .vip(&main)
        .and_then(|v| v.backend(bed.addr(1)))
        .is_some_and(|b| b.drain);
    match cycle % 4 {
        0 | 2 => Change::BackendWeight {
            vip: main,
            address: bed.addr(cycle / 2 % 3),
            weight: 50 + cycle as u32,
        },
        1 => Change::BackendAdd {
            vip: bed.vip(8080, "udp"),
            address: IpAddr::V4(Ipv4Addr::new(10, 99, 1, cycle as u8)),
            weight: None,
        },
        _ if drained => Change::BackendUndrain {
            vip: main,
            address: bed.addr(1),
        },
        _ => Change::BackendDrain {
            vip: main,
            address: bed.addr(1),
        },
    }
}

/// SIGKILL + restart; the restarted lbd must serve the same state from the same state file and
/// tables, with every chatting flow still live. Returns the time to ready.
fn restart_and_compare(lbd: &mut Lbd, lbctl: &Lbctl, main: &VipId) -> Result<Duration> {
    let export = lbctl.export()?;
    let status = without_flows(lbctl.status()?);
    let state_file = fs::read(&lbd.state_path).context("reading the state file")?;
    let table = lbd.maps()?.table_addrs(&main.key())?;

    let t = Instant::now();
    lbd.restart().context("restart")?;
    let took = t.elapsed();

    ensure!(
        lbctl.export()? == export,
        "export differs after the restart"
    );
    let after = lbctl.status()?;
    let flows: u64 = vip_status(&after, main)?
        .backends
        .iter()
        .map(|b| b.flows)
        .sum();
    ensure!(
        without_flows(after) == status,
        "status differs after the restart"
    );
    ensure!(
        fs::read(&lbd.state_path)? == state_file,
        "the restart changed the state file"
    );
    ensure!(
        lbd.maps()?.table_addrs(&main.key())? == table,
        "the data plane's table changed across the restart"
    );
    ensure!(
        flows == CONNECTIONS as u64,
        "after the restart status counts {flows} live flows on {main}, expected {CONNECTIONS}"
    );
    Ok(took)
}

/// The program `prog_id` must use the pinned maps (flow table included), not fresh ones.
fn expect_pinned_maps(lbd: &Lbd, prog_id: u64) -> Result<()> {
    let prog = bpftool(&["prog", "show", "id", &prog_id.to_string()])?;
    let used: BTreeSet<u64> = prog["map_ids"]
        .as_array()
        .with_context(|| format!("no map_ids in {prog}"))?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    for name in [
        lb_common::maps::FLOWS,
        lb_common::maps::VIPS,
        lb_common::maps::BACKENDS,
    ] {
        let pin = lbd.pin_dir.join("maps").join(name);
        let map = bpftool(&["map", "show", "pinned", &pin.display().to_string()])?;
        let id = map["id"]
            .as_u64()
            .with_context(|| format!("no id in {map}"))?;
        ensure!(
            used.contains(&id),
            "program {prog_id} does not use the pinned {name} (map {id}); it uses {used:?}"
        );
    }
    Ok(())
}

/// `bpftool -j <args>`, parsed.
fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {}: JSON", args.join(" ")))
}

/// The id of the program inside a pinned link.
fn link_prog_id(pin: &Path) -> Result<u64> {
    let v = bpftool(&["link", "show", "pinned", &pin.display().to_string()])?;
    v["prog_id"]
        .as_u64()
        .with_context(|| format!("no prog_id in {v}"))
}

// ---------------------------------------------------------------------------------------------
// Drain and wait

#[test]
fn drain_wait() {
    let bed = Bed::new("lv-drain", 3).expect("test bed");
    let lbd = bed
        .start_lbd(&[bed.main_vip(3, Some(CHURN_RING))])
        .expect("lbd");
    finish(drain_body(&bed, &lbd), &lbd);
}

fn drain_body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let vip = bed.vip(PORT, "tcp");
    let mut sessions: BTreeMap<String, Vec<Session>> = BTreeMap::new();
    for _ in 0..30 {
        let s = Session::open(bed.client(), bed.target())?;
        sessions.entry(s.backend().to_owned()).or_default().push(s);
    }
    let counts: BTreeMap<&str, usize> = sessions
        .iter()
        .map(|(k, v)| (k.as_str(), v.len()))
        .collect();
    eprintln!("drain: sessions per backend {counts:?}");
    ensure!(sessions.len() >= 2, "30 sessions reached only {counts:?}");
    let mut by_size: Vec<(String, usize)> =
        counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    by_size.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let (x_name, x_count) = by_size[0].clone();
    let y_name = by_size[1].0.clone();
    let x = bed.addr_of(&x_name)?;
    let y = bed.addr_of(&y_name)?;

    // 1. Drain X and wait while its sessions are open; it must report them, then finish
    // promptly once they close.
    let args = [
        "backend".to_owned(),
        "drain".to_owned(),
        vip.to_string(),
        x.to_string(),
        "--wait".to_owned(),
        "--timeout".to_owned(),
        "10".to_owned(),
    ];
    let mut child = lbctl.spawn(&args)?;
    let stdout = child.0.stdout.take().context("piped stdout")?;
    let (tx, lines) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let result = drain_x(
        bed,
        &lbctl,
        &vip,
        x,
        x_count,
        &mut sessions,
        &x_name,
        &lines,
        &mut child.0,
    );
    // Whatever happened, the process goes (and with it the reader's pipe).
    drop(child);
    let joined = reader.join();
    result?;
    ensure!(joined.is_ok(), "the stdout reader thread panicked");

    // 2. Drain Y with a session kept open: fails at its timeout, Y stays draining.
    drain_timeout(&lbctl, &vip, y, &mut sessions, &y_name)?;

    // 3. Undrain both: new connections reach them again.
    lbctl.ok(["backend", "undrain", &vip.to_string(), &y.to_string()])?;
    lbctl.ok(["backend", "undrain", &vip.to_string(), &x.to_string()])?;
    let status = lbctl.status()?;
    ensure!(
        vip_status(&status, &vip)?
            .backends
            .iter()
            .all(|b| !b.drain && b.state == BackendState::Active),
        "after undrain: {status:?}"
    );
    let seen = who_many(bed, 60)?;
    ensure!(
        seen.contains_key(&x_name) && seen.contains_key(&y_name),
        "after undrain new connections reached {seen:?}"
    );
    for s in sessions.values_mut().flatten() {
        s.ping()?;
    }
    expect_no_errors(lbd, "drain")
}

/// `drain --wait` on a backend whose flows stay open must fail at its timeout with a clear
/// message and leave the backend draining, its flows intact.
fn drain_timeout(
    lbctl: &Lbctl,
    vip: &VipId,
    y: IpAddr,
    sessions: &mut BTreeMap<String, Vec<Session>>,
    y_name: &str,
) -> Result<()> {
    let y_count = sessions.get(y_name).map_or(0, Vec::len);
    let started = Instant::now();
    let run = lbctl.run([
        "backend",
        "drain",
        &vip.to_string(),
        &y.to_string(),
        "--wait",
        "--timeout",
        "2",
    ])?;
    let took = started.elapsed();
    eprintln!(
        "drain: timeout case exited {} after {took:?}: {}",
        run.status,
        run.stderr.trim()
    );
    ensure!(
        !run.success(),
        "drain --wait --timeout 2 with an open flow succeeded: {}",
        run.describe()
    );
    ensure!(run.code() == Some(1), "expected exit 1: {}", run.describe());
    let err = run.stderr.to_lowercase();
    ensure!(
        err.contains("lbctl:") && (err.contains("timed out") || err.contains("timeout")),
        "no clear timeout message: {}",
        run.describe()
    );
    ensure!(
        (Duration::from_millis(1800)..Duration::from_secs(6)).contains(&took),
        "the 2 s timeout took {took:?}"
    );
    let status = lbctl.status()?;
    let yb = vip_status(&status, vip)?
        .backends
        .iter()
        .find(|b| b.address == y)
        .context("Y missing from status")?;
    ensure!(
        yb.drain && yb.state == BackendState::Draining,
        "Y after the timeout: {yb:?}"
    );
    ensure!(
        yb.flows == y_count as u64,
        "Y has {} live flows per status, {y_count} sessions are open",
        yb.flows
    );
    for s in sessions.get_mut(y_name).into_iter().flatten() {
        s.ping().context("a session on the draining backend")?;
    }

    // The NDJSON form of the same: every line a FlowProgress, the last one carrying the error.
    let run = lbctl.run([
        "--json",
        "backend",
        "drain",
        &vip.to_string(),
        &y.to_string(),
        "--wait",
        "--timeout",
        "1",
    ])?;
    ensure!(run.code() == Some(1), "expected exit 1: {}", run.describe());
    let progress: Vec<FlowProgress> = run
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("NDJSON lines: {}", run.describe()))?;
    let last = progress.last().context("no NDJSON line")?;
    ensure!(
        last.error.is_some() && !last.done && last.flows == y_count as u64,
        "last line {last:?}"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one step of one test, spelled out
fn drain_x(
    bed: &Bed,
    lbctl: &Lbctl,
    vip: &VipId,
    x: IpAddr,
    x_count: usize,
    sessions: &mut BTreeMap<String, Vec<Session>>,
    x_name: &str,
    lines: &mpsc::Receiver<(Instant, String)>,
    child: &mut std::process::Child,
) -> Result<()> {
    let first = lines
        .recv_timeout(Duration::from_secs(5))
        .context("drain --wait printed nothing within 5 s")?
        .1;
    eprintln!("drain: first line {first:?}");
    ensure!(
        first == format!("{x}: {x_count} flows"),
        "first line {first:?}, expected \"{x}: {x_count} flows\""
    );
    let status = lbctl.status()?;
    let xb = vip_status(&status, vip)?
        .backends
        .iter()
        .find(|b| b.address == x)
        .context("X missing from status")?;
    ensure!(
        xb.drain && xb.state == BackendState::Draining,
        "X while draining: {xb:?}"
    );
    let seen = who_many(bed, 30)?;
    ensure!(
        !seen.contains_key(x_name),
        "a new connection reached draining {x_name}: {seen:?}"
    );
    for s in sessions.values_mut().flatten() {
        s.ping().context("a session while X drains")?;
    }
    ensure!(
        child.try_wait()?.is_none(),
        "drain --wait ended with flows open"
    );

    let closed = Instant::now();
    drop(sessions.remove(x_name));
    let deadline = closed + Duration::from_secs(10);
    let mut printed = vec![first];
    let status = loop {
        while let Ok((_, line)) = lines.try_recv() {
            printed.push(line);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "drain --wait still running 10 s after the last flow closed: {printed:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = closed.elapsed();
    while let Ok((_, line)) = lines.recv_timeout(Duration::from_millis(200)) {
        printed.push(line);
    }
    eprintln!(
        "drain: returned {status} {:.0} ms after the last flow closed; printed {printed:?}",
        millis(took)
    );
    ensure!(
        status.success(),
        "drain --wait failed ({status}): {printed:?}"
    );
    ensure!(
        took < Duration::from_secs(2),
        "drain --wait returned {took:?} after the last flow closed (limit 2 s)"
    );
    ensure!(
        printed
            .last()
            .is_some_and(|l| *l == format!("{x}: drained")),
        "last line is not \"{x}: drained\": {printed:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_input() {
    let bed = Bed::new("lv-bad", 2).expect("test bed");
    let second = VipConfig {
        address: bed.vip(8080, "udp").to_string(),
        ring_size: Some(251),
        backends: vec![(bed.addr(0), 100)],
    };
    let lbd = bed
        .start_lbd(&[bed.main_vip(2, Some(CHURN_RING)), second])
        .expect("lbd");
    finish(bad_input_body(&bed, &lbd), &lbd);
}

/// Everything a refused request must leave alone.
#[derive(PartialEq, Eq)]
struct Unchanged {
    export: String,
    state_file: Vec<u8>,
    maps: lb_tests::lb::MapSnapshot,
}

impl Unchanged {
    fn take(lbd: &Lbd) -> Result<Self> {
        Ok(Self {
            export: lbd.lbctl()?.export()?,
            state_file: fs::read(&lbd.state_path).context("reading the state file")?,
            maps: lbd.maps()?.snapshot()?,
        })
    }
}

fn bad_input_body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let before = Unchanged::take(lbd)?;
    let v0 = bed.vip(PORT, "tcp").to_string();
    let b1 = bed.addr(0).to_string();
    let files = TempFiles::new(&lbd.run_dir)?;

    let mut failures = Vec::new();
    let mut checked = 0;
    for (args, expect) in lbctl_cases(&v0, &b1, &files) {
        checked += 1;
        let run = lbctl.run(&args)?;
        if let Err(e) = expect_refusal(&run, &expect) {
            failures.push(format!("{e:#}"));
        }
    }
    for case in api_cases(&v0, &b1) {
        checked += 1;
        if let Err(e) = case.check(&lbd.socket_path) {
            failures.push(format!("{e:#}"));
        }
    }
    checked += 1;
    if let Err(e) = permission_denied(lbd, &lbctl) {
        failures.push(format!("{e:#}"));
    }
    // A dry run is accepted and changes nothing either.
    let dry = lbctl.run(["apply", "-f", &files.valid, "--dry-run"])?;
    ensure!(dry.success(), "dry run: {}", dry.describe());
    ensure!(
        dry.stdout.contains("dry run:") && dry.stdout.contains("+ vip 10.200.0.120:80/tcp"),
        "dry run output: {}",
        dry.stdout
    );

    let after = Unchanged::take(lbd)?;
    ensure!(
        after.export == before.export,
        "export changed:\nbefore:\n{}\nafter:\n{}",
        before.export,
        after.export
    );
    ensure!(
        after.state_file == before.state_file,
        "the state file changed"
    );
    ensure!(after.maps == before.maps, "the data plane changed");
    eprintln!(
        "bad input: {checked} refusals checked, {} wrong",
        failures.len()
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// Config files for `lbctl apply -f`.
struct TempFiles {
    syntax: String,
    unknown_field: String,
    duplicate: String,
    not_prime: String,
    valid: String,
}

impl TempFiles {
    fn new(dir: &Path) -> Result<Self> {
        let write = |name: &str, text: &str| -> Result<String> {
            let path = dir.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path.display().to_string())
        };
        Ok(Self {
            syntax: write("syntax.toml", "[[vip]\naddress = \"10.200.0.120:80/tcp\"\n")?,
            unknown_field: write(
                "unknown.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\ncolour = \"blue\"\n",
            )?,
            duplicate: write(
                "duplicate.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\n[[vip]]\naddress = \"10.200.0.120:80/tcp\"\n",
            )?,
            not_prime: write(
                "not-prime.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\nring_size = 1000\n",
            )?,
            valid: write(
                "valid.toml",
                "[[vip]]\naddress = \"10.200.0.120:80/tcp\"\nring_size = 251\nbackends = [{ address = \"10.10.0.11\" }]\n",
            )?,
        })
    }
}

/// An lbctl command line and what its error must say (every substring, case-insensitive).
type LbctlCase = (Vec<String>, Vec<String>);

#[allow(clippy::too_many_lines)] // a table of cases
fn lbctl_cases(v0: &str, b1: &str, files: &TempFiles) -> Vec<LbctlCase> {
    let case = |args: &[&str], expect: &[&str]| -> LbctlCase {
        (
            args.iter().map(ToString::to_string).collect(),
            expect.iter().map(ToString::to_string).collect(),
        )
    };
    let new = "10.200.0.110:80/tcp";
    let unknown_vip = "10.200.0.111:80/tcp";
    let mut cases = vec![
        // Malformed addresses, ports, protocols.
        case(
            &["vip", "add", "10.200.0.300:80/tcp"],
            &["10.200.0.300:80/tcp"],
        ),
        case(
            &["vip", "add", "10.200.0.110:99999/tcp"],
            &["10.200.0.110:99999/tcp"],
        ),
        case(
            &["vip", "add", "10.200.0.110:http/tcp"],
            &["10.200.0.110:http/tcp"],
        ),
        case(&["vip", "add", "10.200.0.110/tcp"], &["10.200.0.110/tcp"]),
        case(
            &["vip", "add", "10.200.0.110:80/sctp"],
            &["10.200.0.110:80/sctp", "protocol"],
        ),
        case(&["vip", "add", "10.200.0.110:0/tcp"], &["port 0"]),
        case(
            &["vip", "add", "0.0.0.0:80/tcp"],
            &["0.0.0.0", "cannot be a VIP"],
        ),
        case(
            &["vip", "add", "[2001:db8::1]:80/tcp"],
            &["2001:db8::1", "not supported"],
        ),
        case(&["backend", "add", v0, "10.10.0.999"], &["10.10.0.999"]),
        case(
            &["backend", "add", v0, "224.0.0.1"],
            &["224.0.0.1", "cannot be a backend"],
        ),
        case(&["backend", "add", v0, "fd00::1"], &["fd00::1"]),
        // Duplicates and unknowns.
        case(&["vip", "add", v0], &[v0, "already exists"]),
        case(&["backend", "add", v0, b1], &[b1, "already exists"]),
        case(&["vip", "del", unknown_vip], &[unknown_vip, "no such VIP"]),
        case(
            &["backend", "add", unknown_vip, "10.10.0.50"],
            &[unknown_vip, "no such VIP"],
        ),
        case(
            &["backend", "del", v0, "10.10.0.77"],
            &["10.10.0.77", "no such backend"],
        ),
        case(
            &["backend", "weight", v0, "10.10.0.77", "5"],
            &["10.10.0.77", "no such backend"],
        ),
        case(
            &["backend", "drain", v0, "10.10.0.77"],
            &["10.10.0.77", "no such backend"],
        ),
        case(
            &["backend", "undrain", unknown_vip, b1],
            &[unknown_vip, "no such VIP"],
        ),
        // Out of range.
        case(
            &["backend", "weight", v0, b1, "65536"],
            &["weight", "65536", "out of range"],
        ),
        case(
            &["backend", "add", v0, "10.10.0.50", "--weight", "70000"],
            &["weight", "70000", "out of range"],
        ),
        case(&["backend", "weight", v0, b1, "-1"], &["-1"]),
        case(&["backend", "weight", v0, b1, "ten"], &["ten"]),
        case(
            &["vip", "add", new, "--ring-size", "4096"],
            &["ring_size", "4096", "not prime"],
        ),
        case(
            &["vip", "add", new, "--ring-size", "5"],
            &["ring_size", "5", "out of range"],
        ),
        case(
            &["vip", "add", new, "--ring-size", "2000003"],
            &["ring_size", "2000003", "out of range"],
        ),
        case(&["vip", "add", new, "--ring-size", "abc"], &["abc"]),
        case(&["vip", "add", new, "--hash", "md5"], &["md5"]),
        case(
            &["backend", "drain", v0, b1, "--wait", "--timeout", "soon"],
            &["soon"],
        ),
        // Whole-state files.
        case(&["apply", "-f", &files.syntax], &[&files.syntax]),
        case(
            &["apply", "-f", &files.unknown_field],
            &["unknown field", "colour"],
        ),
        case(
            &["apply", "-f", &files.duplicate],
            &["10.200.0.120:80/tcp", "duplicate"],
        ),
        case(
            &["apply", "-f", &files.not_prime],
            &["ring_size", "1000", "not prime"],
        ),
        case(
            &["apply", "-f", "/nonexistent/lb.toml"],
            &["/nonexistent/lb.toml"],
        ),
    ];
    // The same refusals through --json must fail the same way.
    cases.push(case(&["--json", "vip", "add", v0], &["already exists"]));
    cases
}

/// lbctl must have failed (exit 1, or 2 for usage errors) with every expected substring.
fn expect_refusal(run: &Run, expect: &[String]) -> Result<()> {
    ensure!(
        matches!(run.code(), Some(1 | 2)),
        "expected exit 1 or 2: {}",
        run.describe()
    );
    let err = run.stderr.to_lowercase();
    let missing: Vec<&String> = expect
        .iter()
        .filter(|e| !err.contains(&e.to_lowercase()))
        .collect();
    ensure!(
        missing.is_empty(),
        "stderr does not say {missing:?}: {}",
        run.describe()
    );
    if run.code() == Some(1) {
        ensure!(
            run.stderr.starts_with("lbctl: "),
            "error without the `lbctl: ` prefix: {}",
            run.describe()
        );
    }
    Ok(())
}

/// lbctl run as `nobody` must be refused by the socket's permissions, and say so.
fn permission_denied(lbd: &Lbd, lbctl: &Lbctl) -> Result<()> {
    // A copy nobody may execute, in a folder nobody may enter: a failure can then only come
    // from the socket.
    let bin = lbd.run_dir.join("lbctl-copy");
    fs::copy(lbctl.bin(), &bin).context("copying lbctl")?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(&bin)
        .arg("--socket")
        .arg(&lbd.socket_path)
        .arg("status");
    let run = run_bounded(
        cmd,
        vec!["(as nobody) status".to_owned()],
        Duration::from_secs(30),
    )?;
    let _ = fs::remove_file(&bin);
    let meta = fs::metadata(&lbd.socket_path).context("socket metadata")?;
    let socket = {
        use std::os::unix::fs::MetadataExt as _;
        format!(
            "socket mode {:o}, uid {}, gid {}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        )
    };
    ensure!(
        run.code() == Some(1),
        "as nobody ({socket}): {}",
        run.describe()
    );
    ensure!(
        run.stderr.starts_with("lbctl: ")
            && run.stderr.to_lowercase().contains("permission denied"),
        "as nobody, no clear permission error: {}",
        run.describe()
    );
    Ok(())
}

/// One raw HTTP request to the API and the refusal it must get.
struct ApiCase {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    status: u16,
    /// Substrings of the error message (case-insensitive).
    expect: Vec<String>,
}

impl ApiCase {
    fn check(&self, socket: &Path) -> Result<()> {
        let what = format!(
            "{} {} {}",
            self.method,
            self.path,
            String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
        );
        let (status, body) =
            http(socket, self.method, &self.path, &self.body).with_context(|| what.clone())?;
        ensure!(
            status == self.status,
            "{what}: status {status}, expected {}: {body}",
            self.status
        );
        let reply: ErrorReply = serde_json::from_str(&body)
            .with_context(|| format!("{what}: error body {body:?} is not an ErrorReply"))?;
        let msg = reply.error.to_lowercase();
        let missing: Vec<&String> = self
            .expect
            .iter()
            .filter(|e| !msg.contains(&e.to_lowercase()))
            .collect();
        ensure!(
            missing.is_empty(),
            "{what}: error {:?} does not say {missing:?}",
            reply.error
        );
        Ok(())
    }
}

#[allow(clippy::too_many_lines)] // a table of cases
fn api_cases(v0: &str, b1: &str) -> Vec<ApiCase> {
    let case = |method, path: &str, body: String, status, expect: &[&str]| ApiCase {
        method,
        path: path.to_owned(),
        body: body.into_bytes(),
        status,
        expect: expect.iter().map(ToString::to_string).collect(),
    };
    let changes = |list: &str| format!(r#"{{"changes":[{list}]}}"#);
    let huge = format!(
        r#"{{"changes":[],"pad":"{}"}}"#,
        "x".repeat(lb_userspace::api::proto::BODY_LIMIT + 1024)
    );
    vec![
        case(
            "POST",
            "/v1/changes",
            "{not json".to_owned(),
            400,
            &["request body"],
        ),
        case(
            "POST",
            "/v1/changes",
            String::new(),
            400,
            &["request body", "empty"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_add","vip":"10.200.0.110:80/tcp","port":1}"#),
            400,
            &["unknown field `port`"],
        ),
        case(
            "POST",
            "/v1/changes",
            r#"{"changes":[],"extra":true}"#.to_owned(),
            400,
            &["unknown field `extra`"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_frob","vip":"10.200.0.110:80/tcp"}"#),
            400,
            &["vip_frob"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_add","vip":"10.200.0.110:80/udpx"}"#),
            400,
            &["10.200.0.110:80/udpx", "protocol"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(&format!(
                r#"{{"op":"backend_add","vip":"{v0}","address":"10.10.0.60","weight":-5}}"#
            )),
            400,
            &["-5"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(r#"{"op":"vip_add","vip":"10.200.0.110:80/tcp","ring_size":4096}"#),
            400,
            &["ring_size", "not prime"],
        ),
        // All or nothing: a valid change followed by a refused one applies neither.
        case(
            "POST",
            "/v1/changes",
            changes(&format!(
                r#"{{"op":"vip_add","vip":"10.200.0.110:80/tcp"}},{{"op":"backend_weight","vip":"{v0}","address":"{b1}","weight":70000}}"#
            )),
            400,
            &["weight", "70000", "out of range"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(
                r#"{"op":"vip_add","vip":"10.200.0.110:80/tcp"},{"op":"vip_add","vip":"10.200.0.110:80/tcp"}"#,
            ),
            409,
            &["10.200.0.110:80/tcp", "already exists"],
        ),
        case(
            "POST",
            "/v1/changes",
            changes(&format!(
                r#"{{"op":"backend_del","vip":"{v0}","address":"10.10.0.77"}}"#
            )),
            404,
            &["no such backend"],
        ),
        case(
            "POST",
            "/v1/apply",
            r#"{"vip":[{"address":"10.200.0.110:80/tcp"},{"address":"10.200.0.110:80/tcp"}]}"#
                .to_owned(),
            409,
            &["duplicate"],
        ),
        case(
            "POST",
            "/v1/apply",
            r#"{"vip":[{"address":"10.200.0.110:80/tcp","ring_size":100}]}"#.to_owned(),
            400,
            &["ring_size", "not prime"],
        ),
        case(
            "GET",
            &format!("/v1/flows?vip={v0}&backend=10.10.0.77"),
            String::new(),
            404,
            &["no such backend"],
        ),
        case(
            "GET",
            &format!("/v1/flows?vip=nonsense&backend={b1}"),
            String::new(),
            400,
            &["nonsense"],
        ),
        case(
            "GET",
            "/v1/status?idle_timeout=abc",
            String::new(),
            400,
            &["idle_timeout"],
        ),
        case("POST", "/v1/changes", huge, 413, &[]),
    ]
}

/// One HTTP/1.1 request on the Unix socket; returns the status and the (de-chunked) body.
fn http(socket: &Path, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket).context("connecting")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let length = if method == "POST" {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    } else {
        String::new()
    };
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n{length}\r\n");
    stream.write_all(request.as_bytes())?;
    // lbd may answer (413) and close before reading a body that is too large.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("reading the reply")?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {head:?}"))?;
    let chunked = head.to_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("chunk end")?;
    }
}

// ---------------------------------------------------------------------------------------------
// Reconfiguration latency

/// Changes timed, alternating add and delete of one backend: 1000 adds (`LB_LATENCY_CHANGES`
/// overrides; a change of a default-size table costs ~45 ms with a debug build of lbd).
const LATENCY_CHANGES: usize = 2000;

#[test]
fn reconfig_latency() {
    let bed = Bed::new("lv-latency", 4).expect("test bed");
    // lbd's default table size and pool: the latency users will see. (A table swap quarantines
    // the old region for a second, so the test's small default pool would run out.)
    let options = LbdOptions {
        ring_pool: lb_common::maps::DEFAULT_RING_POOL,
        ..LbdOptions::default()
    };
    let lbd = bed
        .start_lbd_with(&[bed.main_vip(3, None)], options)
        .expect("lbd");
    finish(latency_body(&bed, &lbd), &lbd);
}

fn latency_body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let changes = std::env::var("LB_LATENCY_CHANGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(LATENCY_CHANGES);
    let client = lbd.client();
    let maps = lbd.maps()?;
    let vip = bed.vip(PORT, "tcp");
    let key = vip.key();
    let address = bed.addr(3);
    let ring = maps.vip(&key)?.context("main VIP not installed")?.ring_size;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut adds = Vec::with_capacity(changes / 2);
    let mut dels = Vec::with_capacity(changes / 2);
    let mut late = 0;
    let started = Instant::now();
    for round in 0..changes {
        let adding = round % 2 == 0;
        let change = if adding {
            Change::BackendAdd {
                vip,
                address,
                weight: None,
            }
        } else {
            Change::BackendDel { vip, address }
        };
        let request = ChangeRequest {
            changes: vec![change],
            dry_run: false,
        };
        let before = maps.vip(&key)?.context("main VIP gone")?;
        let t = Instant::now();
        runtime
            .block_on(client.changes(&request))
            .with_context(|| format!("change {round}"))?;
        // In use once the VIP points at a new table (the swap) that names an active slot for
        // the added backend; normally already true when the reply arrives.
        let in_use = || -> Result<bool> {
            let now = maps.vip(&key)?.context("main VIP gone")?;
            Ok(now.ring_offset != before.ring_offset
                && (!adding || maps.table_has(&key, address)?))
        };
        if !in_use()? {
            late += 1;
            while !in_use()? {
                ensure!(
                    t.elapsed() < Duration::from_secs(5),
                    "change {round}: not in the data plane 5 s after it was accepted"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let took = t.elapsed();
        if adding {
            adds.push(took);
        } else {
            dels.push(took);
            // A whole table costs a read per entry: check the removal on a sample.
            if round % 100 == 1 {
                let table = maps.table_addrs(&key)?;
                ensure!(
                    !table.contains(&address) && table.len() == 3,
                    "change {round}: after the delete the table holds {table:?}"
                );
            }
        }
    }
    let total = started.elapsed();
    let mut all: Vec<Duration> = adds.iter().chain(&dels).copied().collect();
    let (med, p99, max) = percentiles(&mut all);
    let (a_med, a_p99, a_max) = percentiles(&mut adds);
    let (d_med, d_p99, d_max) = percentiles(&mut dels);
    let line = format!(
        "reconfig latency: median {a_med:.1} ms, p99 {a_p99:.1} ms over {} backend adds \
         (max {a_max:.1} ms; request to data plane in use, {ring}-entry table); \
         {} deletes: median {d_med:.1} ms, p99 {d_p99:.1} ms (max {d_max:.1}); all {changes} \
         changes: median {med:.1} ms, p99 {p99:.1} ms (max {max:.1}); {late} not yet in use at \
         the reply; {:.1} s in all",
        adds.len(),
        dels.len(),
        total.as_secs_f64()
    );
    println!("{line}");
    eprintln!("{line}");
    Ok(())
}
