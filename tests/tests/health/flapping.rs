//! A minute of flapping under fast checks (300 ms, rise 1, fall 1): on VIP A one backend's
//! server stops and starts every 2.5 s; on VIP B the servers follow a 10 s cycle in which at
//! times every backend is down. Every ~200 ms the test reads `lbctl --json status` (which must
//! answer within a second: the agent never stalls) and both VIPs' tables from the pinned maps:
//! no table is ever empty, a VIP whose backends are all down says `all_down` and keeps one
//! unchanged table, and otherwise the table follows the checks. Chatting connections on VIP A's
//! steady backends see no failure and no reset the whole time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    chatter::{Chatter, DEFAULT_INTERVAL},
    lb::{Lbd, PinnedMaps},
};
use lb_userspace::{api::proto::Status, model::VipId};

use super::{
    Bed, PORT, Watch, is_status_poll, names, secs, vip_status, vip_toml, wait_first_checks,
};

/// VIP B's port (VIP A is on [`PORT`]).
const PORT_B: u16 = 81;
const BACKENDS: usize = 3;
const FLAP_FOR: Duration = Duration::from_mins(1);
/// VIP A's backend 0 is stopped and started every this long.
const FLAP_A: Duration = Duration::from_millis(2500);
/// Each phase of VIP B's cycle lasts this long (all up, one down, all down, another down).
const PHASE_B: Duration = Duration::from_millis(2500);
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Status and table may disagree this long while a transition is applied.
const SETTLE: Duration = Duration::from_secs(1);
/// Chatting connections on VIP A's two steady backends.
const CONNECTIONS: usize = 30;

#[test]
fn flapping() {
    let bed = Bed::new("hc-flap", BACKENDS).expect("test bed");
    for i in 0..BACKENDS {
        bed.start(i, PORT_B).expect("servers on VIP B's port");
    }
    let check = "kind = \"tcp\", interval = \"300ms\", timeout = \"200ms\", rise = 1, fall = 1";
    let all: Vec<usize> = (0..BACKENDS).collect();
    let config =
        vip_toml(&bed, PORT, &all, Some(check)) + &vip_toml(&bed, PORT_B, &all, Some(check));
    let lbd = bed.start_lbd(&config).expect("lbd");
    lbd.finish(body(&bed, &lbd), is_status_poll);
}

/// Whether backend `i`'s server on `port` runs `t` into the flapping.
fn wanted(i: usize, port: u16, t: Duration) -> bool {
    if t >= FLAP_FOR {
        return true;
    }
    if port == PORT {
        // Only backend 0 flaps on VIP A: up, down, up, ...
        return i != 0 || (t.as_millis() / FLAP_A.as_millis()).is_multiple_of(2);
    }
    match (t.as_millis() / PHASE_B.as_millis()) % 4 {
        0 => true,
        1 => i != 1,
        2 => false,
        _ => i != 2,
    }
}

/// Server state changes over the whole run (the final restart included): how many health
/// transitions lbd should log.
fn expected_transitions() -> usize {
    let step = Duration::from_millis(50);
    let mut count = 0;
    for port in [PORT, PORT_B] {
        for i in 0..BACKENDS {
            let mut t = Duration::ZERO;
            let mut prev = true;
            while t <= FLAP_FOR {
                let now = wanted(i, port, t);
                count += usize::from(now != prev);
                prev = now;
                t += step;
            }
        }
    }
    count
}

/// Stops and starts servers to follow [`wanted`] until `stop` is set; leaves them all running.
fn flap(bed: &Bed, stop: &AtomicBool) -> Result<()> {
    let started = Instant::now();
    let mut running: BTreeMap<(usize, u16), bool> = (0..BACKENDS)
        .flat_map(|i| [((i, PORT), true), ((i, PORT_B), true)])
        .collect();
    loop {
        let t = started.elapsed();
        let done = stop.load(Ordering::Relaxed) || t >= FLAP_FOR;
        for (&(i, port), on) in &mut running {
            let want = done || wanted(i, port, t);
            if want != *on {
                if want {
                    bed.start(i, port)?;
                } else {
                    bed.stop(i, port)?;
                }
                *on = want;
            }
        }
        if done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let mut watch = Watch::new(lbd)?;
    let (vip_a, vip_b) = (bed.vip(PORT), bed.vip(PORT_B));
    wait_first_checks(&mut watch, &vip_a, Duration::from_secs(3))?;
    wait_first_checks(&mut watch, &vip_b, Duration::from_secs(3))?;

    // Connections on VIP A's steady backends only: opened while backend 0 takes no new flows.
    let a0 = bed.addr(0).to_string();
    lbctl.ok(["backend", "drain", &vip_a.to_string(), &a0])?;
    let chatter = Chatter::open(
        bed.client(),
        bed.target(PORT),
        CONNECTIONS,
        DEFAULT_INTERVAL,
    )?;
    lbctl.ok(["backend", "undrain", &vip_a.to_string(), &a0])?;
    ensure!(
        !chatter.snapshot().per_backend().contains_key(bed.name(0)),
        "a connection reached drained {}",
        bed.name(0)
    );
    let resets_before = bed.client().estab_resets()?;
    let transitions_before = logged_transitions(lbd);

    let stop = AtomicBool::new(false);
    let (sampled, flapped) = std::thread::scope(|scope| {
        let flapper = scope.spawn(|| flap(bed, &stop));
        let sampled = sample(bed, lbd, &mut watch, &[vip_a, vip_b]);
        // On a sampling failure the flapper stops early (restoring every server).
        stop.store(true, Ordering::Relaxed);
        let flapped = flapper
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the flapper panicked")));
        (sampled, flapped)
    });
    let seen = sampled?;
    flapped?;

    // Everything back: every backend up, full tables.
    let maps = lbd.maps()?;
    let since = Instant::now();
    watch.until(
        since,
        Duration::from_secs(5),
        "all up after flapping",
        |s| {
            Ok([vip_a, vip_b].iter().all(|v| {
                vip_status(s, v).is_ok_and(|v| {
                    !v.all_down
                        && v.backends
                            .iter()
                            .all(|b| b.health.as_ref().is_some_and(|h| h.up))
                })
            }))
        },
    )?;
    for vip in [vip_a, vip_b] {
        let table = maps.table_addrs(&vip.key())?;
        ensure!(
            table.len() == BACKENDS,
            "{vip} after flapping: table {:?}",
            names(bed, &table)
        );
    }

    let logged = logged_transitions(lbd) - transitions_before;
    let expected = expected_transitions();
    eprintln!(
        "flapping: {} samples, slowest status {} ms; transitions: {} seen in status, {logged} logged by lbd, {expected} server changes; VIP B all down {} times ({} samples); status/table lagging samples {}",
        seen.samples,
        watch.slowest.as_millis(),
        seen.transitions,
        seen.all_down_episodes,
        seen.all_down_samples,
        seen.lagging
    );
    ensure!(
        logged.abs_diff(expected) <= 2,
        "lbd logged {logged} transitions for {expected} server state changes"
    );
    ensure!(
        seen.all_down_episodes >= 4,
        "VIP B was seen with every backend down only {} times",
        seen.all_down_episodes
    );
    ensure!(
        seen.transitions >= expected / 2,
        "status showed only {} transitions",
        seen.transitions
    );

    let report = chatter.stop();
    eprintln!("flapping: {}", report.summary());
    report.check(Duration::from_secs(1))?;
    let resets = bed.client().estab_resets()? - resets_before;
    ensure!(resets == 0, "{resets} established connections were reset");
    lbd.expect_no_errors(|l| l.contains("every backend fails its health checks"))
}

/// Health transitions lbd has logged so far.
fn logged_transitions(lbd: &Lbd) -> usize {
    lbd.log()
        .lines()
        .filter(|l| l.contains("health: backend down") || l.contains("health: backend up"))
        .count()
}

/// What the sampler saw.
#[derive(Default)]
struct Seen {
    samples: u64,
    /// Changes of a backend's `health.up` between two samples.
    transitions: usize,
    all_down_episodes: usize,
    all_down_samples: usize,
    /// Samples where a transition came in while the status was read, or where status and table
    /// (or `all_down` and the backends' health) disagreed.
    lagging: usize,
}

/// One VIP's view across samples.
#[derive(Default)]
struct Track {
    up: BTreeMap<IpAddr, bool>,
    /// Within an all-down episode.
    in_episode: bool,
    /// The table when the current all-down episode began.
    episode_table: Option<BTreeSet<IpAddr>>,
    /// Since when status and table disagree.
    disagree_since: Option<Instant>,
}

/// Samples status and tables until the flapping is over.
fn sample(bed: &Bed, lbd: &Lbd, watch: &mut Watch, vips: &[VipId]) -> Result<Seen> {
    let maps = lbd.maps()?;
    let mut seen = Seen::default();
    let mut tracks: Vec<Track> = vips.iter().map(|_| Track::default()).collect();
    let started = Instant::now();
    while started.elapsed() < FLAP_FOR + SAMPLE_EVERY {
        let at = started.elapsed();
        let tables_before = tables(&maps, vips)?;
        let status = watch
            .status()
            .with_context(|| format!("at {:.1} s", secs(at)))?;
        let tables_after = tables(&maps, vips)?;
        seen.samples += 1;
        for (((vip, track), before), after) in vips
            .iter()
            .zip(&mut tracks)
            .zip(&tables_before)
            .zip(&tables_after)
        {
            // Every table read is checked on its own; the status only against a table that
            // held still while the status was taken (else a transition came in between).
            let stable = (before == after).then_some(after);
            check_sample(bed, &status, vip, before, stable, track, &mut seen)
                .with_context(|| format!("{vip} at {:.1} s", secs(at)))?;
            ensure!(
                !after.is_empty(),
                "{vip} at {:.1} s: the table is empty",
                secs(at)
            );
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    Ok(seen)
}

fn tables(maps: &PinnedMaps, vips: &[VipId]) -> Result<Vec<BTreeSet<IpAddr>>> {
    vips.iter().map(|v| table(maps, v)).collect()
}

/// The backends of a VIP's table as the data plane saw it at one moment. Reading a table takes
/// a few thousand lookups; the agent swaps the table and only then demotes the backends it no
/// longer names, so a read that began before a swap could pair the old table with the demoted
/// slots. A read is kept only when the VIP's entry (which the swap replaces) is the same
/// before and after it.
fn table(maps: &PinnedMaps, vip: &VipId) -> Result<BTreeSet<IpAddr>> {
    let key = vip.key();
    for _ in 0..10 {
        let before = maps.vip(&key)?;
        let addrs = maps.table_addrs(&key)?;
        if maps.vip(&key)? == before {
            return Ok(addrs);
        }
    }
    bail!("{vip}'s table changed under every one of 10 reads")
}

fn check_sample(
    bed: &Bed,
    status: &Status,
    vip: &VipId,
    table: &BTreeSet<IpAddr>,
    stable: Option<&BTreeSet<IpAddr>>,
    track: &mut Track,
    seen: &mut Seen,
) -> Result<()> {
    ensure!(!table.is_empty(), "the table is empty");
    let v = vip_status(status, vip)?;
    let mut up = BTreeSet::new();
    for b in &v.backends {
        let h = b.health.as_ref().context("a backend without health")?;
        if h.up {
            up.insert(b.address);
        }
        if let Some(before) = track.up.insert(b.address, h.up)
            && before != h.up
        {
            seen.transitions += 1;
        }
    }
    let members: BTreeSet<IpAddr> = v.backends.iter().map(|b| b.address).collect();
    ensure!(
        table.is_subset(&members),
        "the table holds {:?}, not backends of the VIP",
        names(bed, table)
    );
    if v.all_down {
        seen.all_down_samples += 1;
        if !track.in_episode {
            seen.all_down_episodes += 1;
            track.in_episode = true;
        }
    } else {
        track.in_episode = false;
        track.episode_table = None;
    }
    let Some(table) = stable else {
        seen.lagging += 1;
        return Ok(());
    };
    if v.all_down {
        match &track.episode_table {
            None => track.episode_table = Some(table.clone()),
            Some(first) => ensure!(
                first == table,
                "the kept table changed while every backend was down: {:?} then {:?}",
                names(bed, first),
                names(bed, table)
            ),
        }
    }
    // all_down exactly when no backend passes, and otherwise the table is the backends that
    // pass. The status may lag a probe's result by a moment (its transition still on the way
    // to the agent's loop), not by a second.
    let agree = v.all_down == up.is_empty() && (v.all_down || *table == up);
    if agree {
        track.disagree_since = None;
    } else {
        seen.lagging += 1;
        let since = *track.disagree_since.get_or_insert_with(Instant::now);
        if since.elapsed() > SETTLE {
            bail!(
                "for {:?}: all_down {} with {:?} passing checks, table {:?}",
                since.elapsed(),
                v.all_down,
                names(bed, &up),
                names(bed, table)
            );
        }
    }
    Ok(())
}
