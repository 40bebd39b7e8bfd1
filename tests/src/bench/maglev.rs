//! Maglev table build time (lb-userspace's builder, as reconcile calls it) for 10, 100 and 1000
//! backends at sizes 65537 and 655373, beside a 1-backend build of the same size: that is the
//! per-size floor (allocating and filling the table once), so the difference is what the
//! backends' permutations cost.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use lb_userspace::maglev::{Weighted, build_table};

use super::Figure;

const SIZES: [u32; 2] = [65_537, 655_373];
const BACKENDS: [u32; 3] = [10, 100, 1000];
const RUNS: usize = 5;

fn backends(n: u32) -> Vec<Weighted> {
    (0..n)
        .map(|i| Weighted {
            addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            weight: 1,
        })
        .collect()
}

/// Milliseconds of each of `RUNS` builds.
fn time_builds(set: &[Weighted], size: u32) -> Vec<f64> {
    (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            black_box(build_table(black_box(set), size));
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// (min, median) of `samples`.
fn min_median(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[0], samples[samples.len() / 2])
}

/// The build times; `quick` builds only the smaller size.
pub fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let sizes: &[u32] = if quick { &SIZES[..1] } else { &SIZES };
    let mut figures = Vec::new();
    for &size in sizes {
        let (_, floor) = min_median(time_builds(&backends(1), size));
        for n in BACKENDS {
            let (min, median) = min_median(time_builds(&backends(n), size));
            figures.push(Figure {
                section: "maglev",
                name: format!("Maglev table, {n} backends, size {size}"),
                value: median,
                unit: "ms",
                stats: vec![("min".into(), min), ("median".into(), median)],
                baseline: Some((format!("1 backend, size {size} (median)"), floor)),
                target: None,
                note: format!("build_table, {RUNS} runs, equal weights"),
            });
        }
    }
    Ok(figures)
}
