//! The exposition of a fixed [`Stats`]: exact lines, labels, every action and reason listed, and
//! the whole text through an independent parser (prometheus-parse) and the strict [`lint`].

use std::collections::{BTreeMap, BTreeSet};

use prometheus_parse::{Scrape, Value};

use super::{lint::lint, *};
use crate::{
    api::proto::{FlowTableStats, GlobalStats, HealthReport, Traffic},
    metrics::Metrics,
};

fn traffic(packets: u64, bytes: u64, new_flows: u64) -> Traffic {
    Traffic {
        packets,
        bytes,
        new_flows,
        // Rates are the status page's business: they must not leak into the exposition.
        packets_per_sec: 12.5,
        bytes_per_sec: 1000.0,
        new_flows_per_sec: 1.0,
    }
}

fn health(up: bool) -> HealthReport {
    HealthReport {
        check: "tcp every 1s".to_owned(),
        up,
        since_secs: 3,
        last: None,
        last_latency_us: None,
    }
}

fn backend(address: &str, state: BackendState, health: Option<HealthReport>) -> BackendStats {
    BackendStats {
        address: address.parse().unwrap(),
        weight: 100,
        drain: state == BackendState::Draining,
        state,
        flows: 0,
        health,
        traffic: Traffic::default(),
    }
}

/// Two VIPs: v4/tcp with a checked active backend and an unchecked draining one; v6/udp whose
/// only backend fails its checks and was never installed. The global read lacks `redirect`
/// and all but one drop reason, as an older data plane's would.
fn fixture() -> Stats {
    let mut active = backend("10.1.0.2", BackendState::Active, Some(health(true)));
    active.traffic = traffic(1000, 64_000, 10);
    active.flows = 7;
    let mut draining = backend("10.1.0.3", BackendState::Draining, None);
    draining.traffic = traffic(234, 20_000, 2);
    draining.weight = 0;
    let down = backend("2001:db8::10", BackendState::Down, Some(health(false)));
    Stats {
        rate_interval_secs: 1.0,
        idle_timeout_secs: 60,
        vips: vec![
            VipStats {
                vip: "10.0.0.1:80/tcp".parse().unwrap(),
                all_down: false,
                traffic: traffic(1234, 84_000, 12),
                backends: vec![active, draining],
            },
            VipStats {
                vip: "[2001:db8::1]:443/udp".parse().unwrap(),
                all_down: true,
                traffic: Traffic::default(),
                backends: vec![down],
            },
        ],
        global: GlobalStats {
            actions: BTreeMap::from([
                ("pass".to_owned(), 50),
                ("tx".to_owned(), 1234),
                ("drop".to_owned(), 3),
            ]),
            flow_hits: 1220,
            flow_misses: 2,
            new_flows: 12,
            icmp_forwarded: 4,
            echo_replies: 5,
            too_big_replies: 6,
            drops: BTreeMap::from([("no_backend".to_owned(), 3)]),
        },
        flow_table: FlowTableStats {
            capacity: 65_536,
            entries: 9,
            guard_limit: 50_000,
            unrecorded: 17,
        },
    }
}

fn rendered() -> String {
    let metrics = Metrics::new();
    metrics.reconfigured(
        crate::metrics::ReconfigResult::Applied,
        std::time::Duration::from_millis(3),
    );
    metrics.probed(true, std::time::Duration::from_micros(250));
    render(&fixture(), &metrics.registry)
}

#[test]
fn exact_lines_for_vips_backends_and_globals() {
    // The encoder sorts label names, so `backend` comes before `vip`.
    let text = rendered();
    let lines: BTreeSet<&str> = text.lines().collect();
    for want in [
        "# HELP lb_vip_packets_total Packets forwarded for the VIP by the data plane.",
        "# TYPE lb_vip_packets_total counter",
        r#"lb_vip_packets_total{vip="10.0.0.1:80/tcp"} 1234"#,
        r#"lb_vip_packets_total{vip="[2001:db8::1]:443/udp"} 0"#,
        r#"lb_vip_bytes_total{vip="10.0.0.1:80/tcp"} 84000"#,
        r#"lb_vip_new_flows_total{vip="10.0.0.1:80/tcp"} 12"#,
        r#"lb_vip_all_backends_down{vip="10.0.0.1:80/tcp"} 0"#,
        r#"lb_vip_all_backends_down{vip="[2001:db8::1]:443/udp"} 1"#,
        "# TYPE lb_backend_packets_total counter",
        r#"lb_backend_packets_total{backend="10.1.0.2",vip="10.0.0.1:80/tcp"} 1000"#,
        r#"lb_backend_packets_total{backend="10.1.0.3",vip="10.0.0.1:80/tcp"} 234"#,
        // Not installed: listed, at zero.
        r#"lb_backend_packets_total{backend="2001:db8::10",vip="[2001:db8::1]:443/udp"} 0"#,
        r#"lb_backend_bytes_total{backend="10.1.0.2",vip="10.0.0.1:80/tcp"} 64000"#,
        r#"lb_backend_new_flows_total{backend="10.1.0.3",vip="10.0.0.1:80/tcp"} 2"#,
        "# TYPE lb_backend_flows gauge",
        r#"lb_backend_flows{backend="10.1.0.2",vip="10.0.0.1:80/tcp"} 7"#,
        r#"lb_backend_weight{backend="10.1.0.2",vip="10.0.0.1:80/tcp"} 100"#,
        r#"lb_backend_weight{backend="10.1.0.3",vip="10.0.0.1:80/tcp"} 0"#,
        r#"lb_backend_up{backend="10.1.0.2",vip="10.0.0.1:80/tcp"} 1"#,
        // Unchecked and draining: up.
        r#"lb_backend_up{backend="10.1.0.3",vip="10.0.0.1:80/tcp"} 1"#,
        r#"lb_backend_up{backend="2001:db8::10",vip="[2001:db8::1]:443/udp"} 0"#,
        r#"lb_backend_state{backend="10.1.0.3",state="active",vip="10.0.0.1:80/tcp"} 0"#,
        r#"lb_backend_state{backend="10.1.0.3",state="draining",vip="10.0.0.1:80/tcp"} 1"#,
        r#"lb_backend_state{backend="10.1.0.3",state="down",vip="10.0.0.1:80/tcp"} 0"#,
        r#"lb_backend_state{backend="2001:db8::10",state="down",vip="[2001:db8::1]:443/udp"} 1"#,
        r#"lb_xdp_actions_total{action="pass"} 50"#,
        r#"lb_xdp_actions_total{action="tx"} 1234"#,
        r#"lb_xdp_actions_total{action="redirect"} 0"#,
        r#"lb_xdp_actions_total{action="drop"} 3"#,
        r#"lb_drops_total{reason="no_backend"} 3"#,
        r#"lb_drops_total{reason="fragment"} 0"#,
        "# TYPE lb_flow_table_hits_total counter",
        "lb_flow_table_hits_total 1220",
        "lb_flow_table_misses_total 2",
        "lb_new_flows_total 12",
        "# TYPE lb_icmp_errors_forwarded_total counter",
        "lb_icmp_errors_forwarded_total 4",
        "lb_icmp_echo_replies_total 5",
        "lb_icmp_too_big_replies_total 6",
        r#"lb_drops_total{reason="bad_icmp"} 0"#,
        r#"lb_drops_total{reason="too_big"} 0"#,
        "# TYPE lb_flow_table_entries gauge",
        "lb_flow_table_entries 9",
        "lb_flow_table_capacity 65536",
        "# TYPE lb_flow_guard_limit gauge",
        "lb_flow_guard_limit 50000",
        "# TYPE lb_flow_guard_unrecorded_total counter",
        "lb_flow_guard_unrecorded_total 17",
        // lbd's own, merged in.
        r#"lb_build_info{version="0.1.0"} 1"#,
        r#"lb_reconfigurations_total{result="applied"} 1"#,
        r#"lb_reconfigurations_total{result="refused"} 0"#,
        r#"lb_reconfiguration_duration_seconds_count{result="applied"} 1"#,
    ] {
        assert!(lines.contains(want), "missing {want:?} in:\n{text}");
    }
    for reason in DropReason::ALL {
        let prefix = format!("lb_drops_total{{reason=\"{}\"}} ", reason.name());
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "{reason:?} missing"
        );
    }
    // Rates stay out: Prometheus derives them.
    assert!(!text.contains("12.5"), "{text}");
}

#[test]
fn families_are_sorted_by_name_and_each_appears_once() {
    let text = rendered();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted);
    // Data plane and lbd's own families are disjoint (a clash would print a family twice).
    let own: BTreeSet<String> = Metrics::new()
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    for family in data_plane(&fixture()) {
        assert!(!own.contains(family.name()), "{} is both", family.name());
    }
}

#[test]
fn an_independent_parser_reads_every_family_with_its_type() {
    let text = rendered();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // Every HELP'd family has samples, and every sample line was understood.
    let sample_lines = text.lines().filter(|l| !l.starts_with('#')).count();
    let parsed_points: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            // A histogram's buckets fold into one sample; its _sum and _count stay separate.
            Value::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(parsed_points, sample_lines);
    let lint = lint(&text).unwrap();
    for (family, kind) in &lint.types {
        assert!(scrape.docs.contains_key(family), "{family} has no HELP");
        let samples: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| &s.metric == family)
            .collect();
        assert!(!samples.is_empty(), "{family}: no samples");
        for s in samples {
            let ok = match kind.as_str() {
                "counter" => matches!(s.value, Value::Counter(_)),
                "gauge" => matches!(s.value, Value::Gauge(_)),
                "histogram" => matches!(s.value, Value::Histogram(_)),
                other => panic!("{family}: unexpected type {other}"),
            };
            assert!(ok, "{family} ({kind}): parsed as {:?}", s.value);
        }
        if kind == "counter" {
            assert!(family.ends_with("_total"), "{family}");
        }
    }
    // Labels come back as written: addresses with colons, brackets and slashes need no escape.
    let v6 = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "lb_backend_packets_total"
                && s.labels.get("backend") == Some("2001:db8::10")
        })
        .expect("the IPv6 backend");
    assert_eq!(v6.labels.get("vip"), Some("[2001:db8::1]:443/udp"));
    assert_eq!(v6.value, Value::Counter(0.0));
    let vip = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "lb_vip_bytes_total" && s.labels.get("vip") == Some("10.0.0.1:80/tcp")
        })
        .expect("the v4 VIP");
    assert_eq!(vip.value, Value::Counter(84_000.0));
}

#[test]
fn lint_reads_values_and_labels() {
    let lint = lint(&rendered()).unwrap();
    assert_eq!(
        lint.get(
            "lb_backend_state",
            &[
                ("vip", "[2001:db8::1]:443/udp"),
                ("backend", "2001:db8::10"),
                ("state", "down")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(lint.get("lb_flow_table_capacity", &[]), Some(65_536.0));
    assert_eq!(lint.types["lb_backend_up"], "gauge");
    assert_eq!(lint.types["lb_health_check_duration_seconds"], "histogram");
}

#[test]
fn no_vips_still_lists_the_global_families() {
    let stats = Stats {
        rate_interval_secs: 0.0,
        idle_timeout_secs: 60,
        vips: Vec::new(),
        global: GlobalStats::default(),
        flow_table: FlowTableStats::default(),
    };
    let text = render(&stats, &Metrics::new().registry);
    let lint = lint(&text).unwrap();
    assert!(!text.contains("lb_vip_packets_total"), "{text}");
    for action in ACTIONS {
        assert_eq!(
            lint.get("lb_xdp_actions_total", &[("action", action)]),
            Some(0.0)
        );
    }
    assert_eq!(
        lint.samples
            .keys()
            .filter(|(name, _)| name == "lb_drops_total")
            .count(),
        DropReason::ALL.len()
    );
    assert_eq!(lint.get("lb_flow_table_entries", &[]), Some(0.0));
}

/// Label values are escaped: a quote, a backslash and a line feed survive the round trip.
#[test]
fn label_values_are_escaped() {
    let f = Families::default();
    f.counters("lb_test_total", "test", &["vip"])
        .with_label_values(&["a\"b\\c\nd"])
        .inc();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&f.registry.gather(), &mut out)
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains(r#"lb_test_total{vip="a\"b\\c\nd"} 1"#),
        "{text}"
    );
    assert_eq!(
        lint(&text)
            .unwrap()
            .get("lb_test_total", &[("vip", "a\"b\\c\nd")]),
        Some(1.0)
    );
}

#[test]
fn lint_refuses_what_lax_parsers_skip() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\"} 1\n";
    lint(ok).unwrap();
    for (bad, why) in [
        ("# TYPE a_total counter\na_total 1\n", "no HELP"),
        ("# HELP a_total x\na_total 1\n", "no TYPE"),
        (
            "# HELP a x\n# TYPE a counter\na 1\n",
            "counter without _total",
        ),
        (
            "# HELP a_total x\n# TYPE a_total counter\nb_total 1\n",
            "other family",
        ),
        (
            "# HELP a_total x\n# TYPE a_total counter\na_total 1\na_total 2\n",
            "duplicate series",
        ),
        (
            "# HELP a_total x\n# TYPE a_total counter\na_total 1\n# HELP a_total x\n# TYPE a_total counter\n",
            "family twice",
        ),
        (
            "# HELP g x\n# TYPE g gauge\ng{l=\"v} 1\n",
            "unterminated value",
        ),
        (
            "# HELP g x\n# TYPE g gauge\ng{l=\"v\"x=\"w\"} 1\n",
            "no comma",
        ),
        ("# HELP g x\n# TYPE g gauge\ng{l=\"\\t\"} 1\n", "bad escape"),
        ("# HELP g x\n# TYPE g gauge\ng one\n", "not a number"),
        ("# HELP g x\n# TYPE g gauge\n\ng 1\n", "blank line"),
        ("# HELP g x\n# TYPE g gauge\ng 1", "no final line feed"),
        (
            "# HELP a_total x\n# TYPE a_total counter\na_total -1\n",
            "negative",
        ),
    ] {
        assert!(lint(bad).is_err(), "{why}: accepted {bad:?}");
    }
}
