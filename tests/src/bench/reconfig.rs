//! Reconfiguration latency: from a change request to the data plane using the change, over
//! alternating `backend add` / `backend del` of one backend on a VIP with lbd's default-size
//! table. Timed two ways, each beside a read-only round trip of the same kind: the `lbctl`
//! binary (a process per change, against `lbctl debug status`) and the in-process API client
//! (against `GET /v1/debug`), so the process start-up and the change itself are separable.
//!
//! "In use" is read from lbd's pinned maps: the VIP points at a new table (the swap), and after
//! an add that table names an active slot of the backend. The runs interleave in blocks so both
//! see the same load.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_common::{VipKey, maps::DEFAULT_RING_POOL};
use lb_userspace::{
    api::proto::ChangeRequest, change::Change, dataplane::kernel::AttachMode, model::VipId,
};

use super::Figure;
use crate::{
    lb::{Lbd, LbdOptions, PinnedMaps, VipConfig, render_config},
    lbctl::Lbctl,
    netns::topology::Topology,
};

const SECTION: &str = "reconfig";
const PORT: u16 = 80;
/// Backends in the VIP; one more is added and removed.
const BACKENDS: usize = 3;
/// Changes (and no-op calls) per method in a row before the next method's turn; even, so every
/// block ends with the backend removed.
const BLOCK: usize = 50;
/// Longest a change may take to reach the data plane after its call returned.
const IN_USE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deletes between two full reads of the table (65537 lookups) to check the removal.
const CHECK_EVERY: usize = 50;

/// One timed change.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// From the call to the data plane using the change.
    pub took: Duration,
    pub adding: bool,
    /// The data plane did not use the change yet when the call returned.
    pub late: bool,
}

/// Alternately adds and removes one backend of a VIP and times each change until the data
/// plane uses it, read through the pinned maps.
pub struct ChangeTimer<'m> {
    maps: &'m PinnedMaps,
    vip: VipId,
    key: VipKey,
    address: IpAddr,
    /// The table's backends without `address`: what every delete must restore.
    rest: BTreeSet<IpAddr>,
    adding: bool,
    deletes: usize,
}

impl<'m> ChangeTimer<'m> {
    /// Starts with `address` out of `vip`'s table (it must be).
    pub fn new(maps: &'m PinnedMaps, vip: VipId, address: IpAddr) -> Result<Self> {
        let key = vip.key();
        let rest = maps.table_addrs(&key)?;
        ensure!(!rest.is_empty(), "VIP {vip} has no table");
        ensure!(
            !rest.contains(&address),
            "{address} is already in {vip}'s table"
        );
        Ok(Self {
            maps,
            vip,
            key,
            address,
            rest,
            adding: true,
            deletes: 0,
        })
    }

    /// The change the next [`ChangeTimer::step`] makes.
    pub fn next_change(&self) -> Change {
        if self.adding {
            Change::BackendAdd {
                vip: self.vip,
                address: self.address,
                weight: None,
                check: None,
            }
        } else {
            Change::BackendDel {
                vip: self.vip,
                address: self.address,
            }
        }
    }

    /// `lbctl` arguments for [`ChangeTimer::next_change`].
    pub fn next_lbctl_args(&self) -> [String; 4] {
        let verb = if self.adding { "add" } else { "del" };
        [
            "backend".into(),
            verb.into(),
            self.vip.to_string(),
            self.address.to_string(),
        ]
    }

    /// Makes the next change with `apply` (which returns once lbd accepted it) and waits until
    /// the data plane uses it.
    pub fn step(&mut self, apply: impl FnOnce(&Change) -> Result<()>) -> Result<Sample> {
        let change = self.next_change();
        let before = self.maps.vip(&self.key)?.context("VIP gone")?;
        let started = Instant::now();
        apply(&change).with_context(|| format!("{change}"))?;
        let in_use = || -> Result<bool> {
            let now = self.maps.vip(&self.key)?.context("VIP gone")?;
            Ok(now.ring_offset != before.ring_offset
                && (!self.adding || self.maps.table_has(&self.key, self.address)?))
        };
        let late = !in_use()?;
        if late {
            while !in_use()? {
                ensure!(
                    started.elapsed() < IN_USE_TIMEOUT,
                    "{change}: not in the data plane {IN_USE_TIMEOUT:?} after the call"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let took = started.elapsed();
        let sample = Sample {
            took,
            adding: self.adding,
            late,
        };
        if !self.adding {
            self.deletes += 1;
            // A whole table costs a read per entry: check the removal on a sample.
            if self.deletes % CHECK_EVERY == 1 {
                let table = self.maps.table_addrs(&self.key)?;
                ensure!(
                    table == self.rest,
                    "after {change} the table holds {table:?}, not {:?}",
                    self.rest
                );
            }
        }
        self.adding = !self.adding;
        Ok(sample)
    }
}

/// Samples of one way of making changes.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub adds: Vec<Duration>,
    pub dels: Vec<Duration>,
    pub late: usize,
}

impl Latencies {
    pub fn push(&mut self, sample: Sample) {
        if sample.adding {
            self.adds.push(sample.took);
        } else {
            self.dels.push(sample.took);
        }
        self.late += usize::from(sample.late);
    }

    pub fn all(&self) -> Vec<Duration> {
        self.adds.iter().chain(&self.dels).copied().collect()
    }
}

/// (median, p99, max) in ms.
pub fn percentiles(samples: &[Duration]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let Some(last) = sorted.len().checked_sub(1) else {
        return (f64::NAN, f64::NAN, f64::NAN);
    };
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )] // an index below the length
    let at = |q: f64| sorted[(last as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99), at(1.0))
}

/// Runs the section: 1000 changes per way (100 with `quick`) on a 65537-entry table.
pub fn run(quick: bool) -> Result<Vec<Figure>> {
    let changes: usize = if quick { 100 } else { 1000 };
    let topo = Topology::one_arm("bench-reconf")
        .backends(BACKENDS + 1)
        .build()?;
    let addr = |i: usize| IpAddr::V4(topo.backends[i].ip());
    let vip: VipId = format!("{}:{PORT}/tcp", topo.vip).parse()?;
    let config = render_config(&[VipConfig {
        address: vip.to_string(),
        ring_size: None,
        backends: (0..BACKENDS).map(|i| (addr(i), 100)).collect(),
    }]);
    let gw = topo.gw();
    // lbd's default pool: a table swap quarantines the old region for a second, and ~60 swaps
    // a second would exhaust the test harness's small pool.
    let options = LbdOptions {
        ring_pool: DEFAULT_RING_POOL,
        ..LbdOptions::default()
    };
    let lbd = Lbd::start_with(&gw.ns, &gw.ifaces(), AttachMode::Native, &config, options)?;
    let maps = lbd.maps()?;
    let lbctl = lbd.lbctl()?;
    let client = lbd.client();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ring = maps
        .vip(&vip.key())?
        .context("VIP not installed")?
        .ring_size;

    let mut timer = ChangeTimer::new(&maps, vip, addr(BACKENDS))?;
    let (mut via_lbctl, mut via_api) = (Latencies::default(), Latencies::default());
    let (mut lbctl_noop, mut api_noop) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for _ in 0..changes.div_ceil(BLOCK) {
        for _ in 0..BLOCK {
            lbctl_noop.push(lbctl_round_trip(&lbctl)?);
        }
        for _ in 0..BLOCK {
            let args = timer.next_lbctl_args();
            via_lbctl.push(timer.step(|_| {
                let run = lbctl.run(&args)?;
                ensure!(run.success(), "{}", run.describe());
                Ok(())
            })?);
        }
        for _ in 0..BLOCK {
            let t = Instant::now();
            runtime.block_on(client.debug())?;
            api_noop.push(t.elapsed());
        }
        for _ in 0..BLOCK {
            via_api.push(timer.step(|change| {
                let request = ChangeRequest {
                    changes: vec![change.clone()],
                    dry_run: false,
                };
                runtime.block_on(client.changes(&request))?;
                Ok(())
            })?);
        }
    }
    eprintln!(
        "reconfig: {} changes and {} no-op calls in {:.1} s",
        via_lbctl.all().len() + via_api.all().len(),
        lbctl_noop.len() + api_noop.len(),
        started.elapsed().as_secs_f64()
    );
    lbd.expect_no_errors(|_| false)?;
    Ok(figures(ring, &via_lbctl, &lbctl_noop, &via_api, &api_noop))
}

/// `lbctl debug status`: a read-only request through the same binary and socket.
fn lbctl_round_trip(lbctl: &Lbctl) -> Result<Duration> {
    let t = Instant::now();
    let run = lbctl.run(["debug", "status"])?;
    let took = t.elapsed();
    ensure!(run.success(), "{}", run.describe());
    Ok(took)
}

fn figures(
    ring: u32,
    via_lbctl: &Latencies,
    lbctl_noop: &[Duration],
    via_api: &Latencies,
    api_noop: &[Duration],
) -> Vec<Figure> {
    // Median as the value; p99 and max beside it.
    let figure = |name: &str, samples: &[Duration], baseline, note| {
        let (med, p99, max) = percentiles(samples);
        Figure {
            section: SECTION,
            name: name.into(),
            value: med,
            unit: "ms",
            stats: vec![
                ("median".to_owned(), med),
                ("p99".to_owned(), p99),
                ("max".to_owned(), max),
            ],
            baseline,
            target: None,
            note,
        }
    };
    let change = |name: &str, l: &Latencies, noop: (&str, &[Duration]), how: &str| {
        let baseline = Some((format!("{} (median)", noop.0), percentiles(noop.1).0));
        let note = format!(
            "{} alternating backend add/del, {ring}-entry table; {how}, until the pinned maps \
             show the swapped table (holding the backend after an add)",
            l.adds.len() + l.dels.len()
        );
        let mut f = figure(name, &l.all(), baseline, note);
        f.stats.push(("add median".into(), percentiles(&l.adds).0));
        f.stats.push(("del median".into(), percentiles(&l.dels).0));
        #[allow(clippy::cast_precision_loss)] // a count below 2^52
        f.stats.push(("late at reply".into(), l.late as f64));
        f
    };
    let noop = |name: &str, samples: &[Duration], how: &str| {
        figure(
            name,
            samples,
            None,
            format!("{} calls; {how}", samples.len()),
        )
    };
    vec![
        change(
            "lbctl change to data plane in use",
            via_lbctl,
            ("lbctl debug status", lbctl_noop),
            "one lbctl process per change",
        ),
        change(
            "API client change to data plane in use",
            via_api,
            ("API GET /v1/debug", api_noop),
            "in-process client, POST of one change",
        ),
        noop(
            "lbctl debug status round trip",
            lbctl_noop,
            "process start, connect, read-only request",
        ),
        noop(
            "API GET /v1/debug round trip",
            api_noop,
            "in-process client, read-only request",
        ),
    ]
}
