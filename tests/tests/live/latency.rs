//! Reconfiguration latency: time from a `backend add` or `backend del` request (in-process API
//! client) to the data plane using it, timed by `lb_tests::bench::reconfig` as the bench does.

use anyhow::{Context as _, Result};
use lb_tests::{
    bench::reconfig::{ChangeTimer, Latencies, percentiles},
    lb::{Lbd, LbdOptions},
};
use lb_userspace::api::proto::ChangeRequest;

use super::{Bed, PORT};

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
    let ring = maps
        .vip(&vip.key())?
        .context("main VIP not installed")?
        .ring_size;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut timer = ChangeTimer::new(&maps, vip, bed.addr(3))?;
    let mut latencies = Latencies::default();
    let started = std::time::Instant::now();
    for round in 0..changes {
        let sample = timer
            .step(|change| {
                let request = ChangeRequest {
                    changes: vec![change.clone()],
                    dry_run: false,
                };
                runtime.block_on(client.changes(&request))?;
                Ok(())
            })
            .with_context(|| format!("change {round}"))?;
        latencies.push(sample);
    }
    let total = started.elapsed();
    let (med, p99, max) = percentiles(&latencies.all());
    let (a_med, a_p99, a_max) = percentiles(&latencies.adds);
    let (d_med, d_p99, d_max) = percentiles(&latencies.dels);
    let line = format!(
        "reconfig latency: median {a_med:.1} ms, p99 {a_p99:.1} ms over {} backend adds \
         (max {a_max:.1} ms; request to data plane in use, {ring}-entry table); \
         {} deletes: median {d_med:.1} ms, p99 {d_p99:.1} ms (max {d_max:.1}); all {changes} \
         changes: median {med:.1} ms, p99 {p99:.1} ms (max {max:.1}); {} not yet in use at \
         the reply; {:.1} s in all",
        latencies.adds.len(),
        latencies.dels.len(),
        latencies.late,
        total.as_secs_f64()
    );
    println!("{line}");
    eprintln!("{line}");
    Ok(())
}
