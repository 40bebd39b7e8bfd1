//! Churn: 200 chatting connections through a VIP survive 1000 random changes to it and to
//! other VIPs; afterwards new connections reach exactly the backends in the table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    chatter::{self, Chatter},
    lb::Lbd,
    lbctl::Lbctl,
    rng::Rng,
};
use lb_userspace::{
    api::proto::BackendState,
    change::Change,
    model::{DesiredState, HashMode, VipId},
};

use super::{
    Bed, CHURN_RING, CONNECTIONS, MAX_GAP, PORT, apply, expect_no_errors, expect_state, millis,
    vip_status, who_many,
};

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
                address: rng.try_pick(&self.extras)?,
                weight: Some(weight),
                check: None,
            },
            1 => {
                let added: Vec<IpAddr> = present
                    .iter()
                    .copied()
                    .filter(|a| !self.initial.contains(a))
                    .collect();
                Change::BackendDel {
                    vip,
                    address: rng.try_pick(&added)?,
                }
            }
            2 => Change::BackendWeight {
                vip,
                address: rng.try_pick(&present)?,
                weight,
            },
            3 | 4 => {
                let address = rng.try_pick(&present)?;
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
                    address: rng.try_pick(&drained)?,
                }
            }
        })
    }

    fn other_change(&self, rng: &mut Rng, state: &DesiredState) -> Option<Change> {
        let vip = rng.try_pick(&self.others)?;
        let Some(spec) = state.vip(&vip) else {
            return Some(Change::VipAdd {
                vip,
                ring_size: Some(rng.try_pick(&[251, 1021, CHURN_RING])?),
                hash: Some(rng.try_pick(&[HashMode::FiveTuple, HashMode::SrcIp])?),
                // IPIP: the churn topology's backends decapsulate both, the other VIPs carry
                // no traffic.
                encap: None,
                check: None,
            });
        };
        let present: Vec<IpAddr> = spec.backends.iter().map(|b| b.addr).collect();
        Some(match rng.below(8) {
            0 => Change::VipDel { vip },
            1..=3 => Change::BackendAdd {
                vip,
                address: rng.try_pick(&self.pool)?,
                weight: Some(rng.below(200) as u32),
                check: None,
            },
            4 => Change::BackendDel {
                vip,
                address: rng.try_pick(&present)?,
            },
            5 => Change::BackendWeight {
                vip,
                address: rng.try_pick(&present)?,
                weight: 1 + rng.below(500) as u32,
            },
            _ => {
                let address = rng.try_pick(&present)?;
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
    lbd.finish(churn_body(&bed, &lbd), |_| false);
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
    let resets_before = bed.client().estab_resets()?;

    let mut rng = Rng::from_env("LB_TEST_SEED");
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
            Change::VipCheck { .. } => "vip check",
            Change::BackendCheck { .. } => "backend check",
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
    let resets = bed.client().estab_resets()? - resets_before;
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
                check: None,
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
