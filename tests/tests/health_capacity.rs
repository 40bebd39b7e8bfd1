//! Health-check capacity, quick check: 500 targets of each kind are all probed once a second by
//! one checker, none goes down. The measurement itself lives in `lb_tests::bench::health`; the
//! full figure (backends per 10% of a core, beside a bare-connect baseline) is `cargo xtask
//! bench -- --section health`.

use std::time::Duration;

use lb_tests::bench::health::{Kind, loadavg, measure, raise_nofile};

#[test]
fn quick_capacity_every_target_probed_each_second() {
    const N: usize = 500;
    assert!(
        raise_nofile(N).expect("RLIMIT_NOFILE"),
        "RLIMIT_NOFILE too low for {N} listeners"
    );
    for kind in [Kind::Tcp, Kind::Http] {
        println!("load {}", loadavg());
        let m = measure(N, kind, Duration::ZERO, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        println!("{}", m.report());
        assert_eq!(m.down, 0, "{}", m.report());
        assert_eq!(m.transitions, 0, "{}", m.report());
        // First firing within the first second, then one a second (+-10%).
        let bad: Vec<u64> = m
            .per_target
            .iter()
            .copied()
            .filter(|c| !(2..=4).contains(c))
            .collect();
        assert!(
            bad.is_empty(),
            "{} targets probed other than 2-4 times in 3 s: {:?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
        let total = m.probes();
        assert!(
            (N as u64 * 27 / 10..=N as u64 * 33 / 10).contains(&total),
            "{total} probes, about {} expected",
            N * 3
        );
    }
}
