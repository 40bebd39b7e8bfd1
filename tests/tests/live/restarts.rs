//! Restarts and upgrades: the chatting connections survive 20 SIGKILL+restart cycles of lbd
//! and 20 `lbd upgrade`s; every restart comes back with the state, tables and flows it had.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    bench::reconfig::percentiles,
    chatter::{self, Chatter},
    lb::{Lbd, VipConfig},
    lbctl::Lbctl,
};
use lb_userspace::{
    change::Change,
    model::{DesiredState, VipId},
};

use super::{
    Bed, CHURN_RING, CONNECTIONS, MAX_GAP, PORT, apply, expect_no_errors, expect_state, vip_status,
    without_flows,
};

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
    lbd.finish(result, |_| false);
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
    let resets_before = bed.client().estab_resets()?;
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
    let (r_med, _, r_max) = percentiles(&restarts);
    let (u_med, _, u_max) = percentiles(&upgrades);
    eprintln!(
        "restarts: {CYCLES} SIGKILL+restart to ready: median {r_med:.0} ms, max {r_max:.0} ms; \
         {CYCLES} upgrades: median {u_med:.0} ms, max {u_max:.0} ms"
    );
    let resets = bed.client().estab_resets()? - resets_before;
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
            check: None,
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
