//! Reconfiguration latency: time from a `backend add` request (in-process API client) to the
//! data plane using the backend.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use lb_tests::lb::{Lbd, LbdOptions};
use lb_userspace::{api::proto::ChangeRequest, change::Change};

use super::{Bed, PORT, percentiles};

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
    lbd.finish(latency_body(&bed, &lbd), |_| false);
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
                check: None,
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
