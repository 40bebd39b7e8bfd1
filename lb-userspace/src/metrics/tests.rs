//! Rates and in-process metrics.
// The rates compared are exact: whole counts over whole seconds.
#![allow(clippy::float_cmp)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use lb_common::TrafficCounters;

use super::*;

fn vip() -> VipId {
    "10.0.0.1:80/tcp".parse().unwrap()
}

fn read(packets: u64) -> HashMap<RateKey, TrafficCounters> {
    HashMap::from([(
        (vip(), None),
        TrafficCounters {
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
        },
    )])
}

#[test]
fn rates_need_a_second_and_span_at_least_one() {
    let mut rates = RateTracker::default();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let first = rates.observe(t0, read(0));
    assert_eq!(first.span_secs(), 0.0);
    assert_eq!(first.traffic(&(vip(), None)).packets_per_sec, 0.0);
    // Half a second later: still no rate (too short to mean much).
    assert_eq!(rates.observe(at(500), read(50)).span_secs(), 0.0);
    // One second: 100 packets over 1 s.
    let r = rates.observe(at(1000), read(100));
    assert_eq!(r.span_secs(), 1.0);
    let t = r.traffic(&(vip(), None));
    assert_eq!((t.packets, t.packets_per_sec), (100, 100.0));
    assert_eq!(t.bytes_per_sec, 10_000.0);
    assert_eq!(t.new_flows_per_sec, 10.0);
    // 1.5 s: still against the read at 0.
    assert_eq!(rates.observe(at(1500), read(150)).span_secs(), 1.5);
    // 2 s: against the read at 1 s, 300 packets since then.
    let r = rates.observe(at(2000), read(400));
    assert_eq!(r.span_secs(), 1.0);
    assert_eq!(r.traffic(&(vip(), None)).packets_per_sec, 300.0);
}

#[test]
fn a_counter_that_went_back_has_no_rate_and_unknown_keys_are_zero() {
    let mut rates = RateTracker::default();
    let t0 = Instant::now();
    rates.observe(t0, read(1000));
    let r = rates.observe(t0 + Duration::from_secs(1), read(10));
    let t = r.traffic(&(vip(), None));
    assert_eq!((t.packets, t.packets_per_sec), (10, 0.0));
    let other = (vip(), Some("10.1.0.1".parse().unwrap()));
    assert_eq!(r.traffic(&other), Traffic::default());
}

#[test]
fn own_metrics_are_registered_and_counted() {
    let m = Metrics::new();
    m.reconfigured(ReconfigResult::Applied, Duration::from_millis(12));
    m.health_transition(&vip(), "10.1.0.1".parse().unwrap(), false);
    m.probed(true, Duration::from_micros(300));
    let names: Vec<String> = m
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    for name in [
        "lb_reconfigurations_total",
        "lb_reconfiguration_duration_seconds",
        "lb_backend_health_transitions_total",
        "lb_health_check_duration_seconds",
        "lb_build_info",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
    }
    assert_eq!(m.reconfigurations.with_label_values(&["applied"]).get(), 1);
    assert_eq!(m.reconfigurations.with_label_values(&["refused"]).get(), 0);
}
