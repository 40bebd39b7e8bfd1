//! The Prometheus text exposition of `/metrics`: the data plane's counters from one [`Stats`]
//! read, merged with lbd's own metrics from its registry, sorted by name and encoded once.
//!
//! The data-plane families are built afresh at every scrape from that read (nothing is cached
//! here), so they are exactly what the pinned maps held and keep counting across lbd restarts.
//! Every XDP action and every drop reason is listed, at zero too, so a first drop shows as a
//! change of a series rather than a new one; likewise every backend of a VIP, installed or not.
//!
//! | family                                          | type    | what                                   |
//! |-------------------------------------------------|---------|----------------------------------------|
//! | `lb_vip_packets_total{vip}`                     | counter | packets forwarded for the VIP          |
//! | `lb_vip_bytes_total{vip}`                       | counter | their bytes, as received (Ethernet frame) |
//! | `lb_vip_new_flows_total{vip}`                   | counter | flow-table entries created             |
//! | `lb_vip_all_backends_down{vip}`                 | gauge   | 1 when every backend fails its checks  |
//! | `lb_backend_{packets,bytes,new_flows}_total{vip,backend}` | counter | the same per backend  |
//! | `lb_backend_flows{vip,backend}`                 | gauge   | live flows pinned to the backend       |
//! | `lb_backend_weight{vip,backend}`                | gauge   | configured weight                      |
//! | `lb_backend_up{vip,backend}`                    | gauge   | health (unchecked: 1 unless down)      |
//! | `lb_backend_state{vip,backend,state}`           | gauge   | 1 for the current of active, draining, down |
//! | `lb_xdp_actions_total{action}`                  | counter | packets by XDP action                  |
//! | `lb_drops_total{reason}`                        | counter | drops by `DropReason`                  |
//! | `lb_flow_table_{hits,misses}_total`, `lb_new_flows_total` | counter | flow-table outcomes     |
//! | `lb_flow_table_entries`, `lb_flow_table_capacity` | gauge | flow-table occupancy                   |
//! | `lb_icmp_errors_forwarded_total`                | counter | ICMP errors quoting a VIP flow, sent to its backend |
//! | `lb_icmp_echo_replies_total`                    | counter | echo replies sent for VIP addresses    |
//! | `lb_icmp_too_big_replies_total`                 | counter | fragmentation-needed / packet-too-big replies sent |
//! | `lb_flow_guard_limit`                          | gauge   | new-flow rate guard, per CPU per second |
//! | `lb_flow_guard_unrecorded_total`               | counter | new flows the guard left unrecorded    |
//!
//! lbd's own families (reconfigurations, health transitions and check latency, build info)
//! come from [`super::Metrics::registry`].

pub mod lint;

use std::collections::{BTreeMap, BTreeSet};

use lb_common::DropReason;
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector, proto::MetricFamily,
};

use crate::api::proto::{BackendState, BackendStats, Stats, VipStats};

/// The XDP actions `GlobalStats::actions` names, always listed.
pub const ACTIONS: [&str; 4] = ["pass", "tx", "redirect", "drop"];
/// Values of the `state` label of `lb_backend_state`.
pub const STATES: [BackendState; 3] = [
    BackendState::Active,
    BackendState::Draining,
    BackendState::Down,
];

/// The scrape body: `stats`' data-plane families and `registry`'s, sorted by name.
pub fn render(stats: &Stats, registry: &Registry) -> String {
    let mut families = data_plane(stats);
    families.extend(registry.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    debug_assert!(
        families.windows(2).all(|w| w[0].name() != w[1].name()),
        "a family name is both lbd's own and the data plane's"
    );
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("valid families encode into a Vec");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// The data plane's families from one read.
pub fn data_plane(stats: &Stats) -> Vec<MetricFamily> {
    let f = Families::default();
    vip_families(&f, &stats.vips);
    global_families(&f, stats);
    f.registry.gather()
}

/// A registry for one scrape; every family registered once, so names are checked unique.
#[derive(Default)]
struct Families {
    registry: Registry,
}

impl Families {
    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        self.registry
            .register(Box::new(collector.clone()))
            .expect("data-plane family names are unique");
        collector
    }

    fn counter(&self, name: &str, help: &str, value: u64) {
        let counter = IntCounter::new(name, help).expect("valid metric");
        counter.inc_by(value);
        self.register(counter);
    }

    fn gauge(&self, name: &str, help: &str, value: u64) {
        let gauge = IntGauge::new(name, help).expect("valid metric");
        gauge.set(clamp(value));
        self.register(gauge);
    }

    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
}

/// Gauges are `i64`; no count here comes near `i64::MAX`, but never wrap to negative.
fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn vip_families(f: &Families, vips: &[VipStats]) {
    let vip_packets = f.counters(
        "lb_vip_packets_total",
        "Packets forwarded for the VIP by the data plane.",
        &["vip"],
    );
    let vip_bytes = f.counters(
        "lb_vip_bytes_total",
        "Bytes of the packets forwarded for the VIP, as received (Ethernet frame, before \
         encapsulation).",
        &["vip"],
    );
    let vip_new_flows = f.counters(
        "lb_vip_new_flows_total",
        "Flow-table entries created for the VIP.",
        &["vip"],
    );
    let all_down = f.gauges(
        "lb_vip_all_backends_down",
        "1 when every backend of the VIP fails its health checks (the VIP keeps its last table).",
        &["vip"],
    );
    let backend = &["vip", "backend"];
    let be_packets = f.counters(
        "lb_backend_packets_total",
        "Packets forwarded to the backend for the VIP (0 while it is not installed).",
        backend,
    );
    let be_bytes = f.counters(
        "lb_backend_bytes_total",
        "Bytes of the packets forwarded to the backend for the VIP, as received (Ethernet \
         frame, before encapsulation).",
        backend,
    );
    let be_new_flows = f.counters(
        "lb_backend_new_flows_total",
        "Flow-table entries created pinning a flow of the VIP to the backend.",
        backend,
    );
    let flows = f.gauges(
        "lb_backend_flows",
        "Live flows pinned to the backend (seen within the idle timeout).",
        backend,
    );
    let weight = f.gauges(
        "lb_backend_weight",
        "The backend's configured weight.",
        backend,
    );
    let up = f.gauges(
        "lb_backend_up",
        "1 when the backend passes its health checks (unchecked backends: 1 unless down).",
        backend,
    );
    let state = f.gauges(
        "lb_backend_state",
        "1 for the backend's current state: active (takes new flows), draining (keeps its \
         flows) or down (out of the table).",
        &["vip", "backend", "state"],
    );
    for vip in vips {
        let id = vip.vip.to_string();
        let labels = [id.as_str()];
        vip_packets
            .with_label_values(&labels)
            .inc_by(vip.traffic.packets);
        vip_bytes
            .with_label_values(&labels)
            .inc_by(vip.traffic.bytes);
        vip_new_flows
            .with_label_values(&labels)
            .inc_by(vip.traffic.new_flows);
        all_down
            .with_label_values(&labels)
            .set(i64::from(vip.all_down));
        for b in &vip.backends {
            let address = b.address.to_string();
            let labels = [id.as_str(), address.as_str()];
            be_packets
                .with_label_values(&labels)
                .inc_by(b.traffic.packets);
            be_bytes.with_label_values(&labels).inc_by(b.traffic.bytes);
            be_new_flows
                .with_label_values(&labels)
                .inc_by(b.traffic.new_flows);
            flows.with_label_values(&labels).set(clamp(b.flows));
            weight.with_label_values(&labels).set(i64::from(b.weight));
            up.with_label_values(&labels).set(i64::from(is_up(b)));
            for s in STATES {
                let name = s.to_string();
                state
                    .with_label_values(&[id.as_str(), address.as_str(), name.as_str()])
                    .set(i64::from(s == b.state));
            }
        }
    }
}

/// Checked backends: their health; unchecked ones are up unless the data plane has them down.
fn is_up(b: &BackendStats) -> bool {
    match &b.health {
        Some(health) => health.up,
        None => b.state != BackendState::Down,
    }
}

/// The label values to list: every fixed one (at zero when the read lacks it) and any other
/// the read has.
fn listed<'a>(fixed: &[&'a str], read: &'a BTreeMap<String, u64>) -> BTreeSet<&'a str> {
    fixed
        .iter()
        .copied()
        .chain(read.keys().map(String::as_str))
        .collect()
}

fn global_families(f: &Families, stats: &Stats) {
    let g = &stats.global;
    let actions = f.counters(
        "lb_xdp_actions_total",
        "Packets the balancer's XDP program returned with each action (pass: not for a VIP).",
        &["action"],
    );
    for action in listed(&ACTIONS, &g.actions) {
        let n = g.actions.get(action).copied().unwrap_or(0);
        actions.with_label_values(&[action]).inc_by(n);
    }
    let drops = f.counters(
        "lb_drops_total",
        "Packets for a VIP the data plane dropped, by reason.",
        &["reason"],
    );
    for reason in listed(&DropReason::ALL.map(DropReason::name), &g.drops) {
        let n = g.drops.get(reason).copied().unwrap_or(0);
        drops.with_label_values(&[reason]).inc_by(n);
    }
    f.counter(
        "lb_flow_table_hits_total",
        "Packets whose flow-table entry was found and still valid.",
        g.flow_hits,
    );
    f.counter(
        "lb_flow_table_misses_total",
        "TCP packets other than a SYN with no valid flow-table entry (the flow began elsewhere, \
         or its backend or entry went away), re-hashed through the Maglev table.",
        g.flow_misses,
    );
    f.counter(
        "lb_new_flows_total",
        "Flow-table entries created, every VIP.",
        g.new_flows,
    );
    f.counter(
        "lb_icmp_errors_forwarded_total",
        "ICMP and ICMPv6 errors (unreachable, time exceeded, packet too big) quoting a VIP flow, \
         sent on to that flow's backend.",
        g.icmp_forwarded,
    );
    f.counter(
        "lb_icmp_echo_replies_total",
        "ICMP and ICMPv6 echo replies the data plane sent for VIP addresses \
         (settings.icmp_echo_reply).",
        g.echo_replies,
    );
    f.counter(
        "lb_icmp_too_big_replies_total",
        "ICMP fragmentation-needed and ICMPv6 packet-too-big replies sent to clients whose \
         packet would not fit the egress MTU once encapsulated (settings.icmp_too_big_reply).",
        g.too_big_replies,
    );
    f.gauge(
        "lb_flow_table_entries",
        "Entries in the flow table at the last scan (live or not yet evicted).",
        stats.flow_table.entries,
    );
    f.gauge(
        "lb_flow_table_capacity",
        "Entries the flow table holds at most.",
        stats.flow_table.capacity,
    );
    f.gauge(
        "lb_flow_guard_limit",
        "New flows each CPU records in the flow table per second at most (0: no limit).",
        u64::from(stats.flow_table.guard_limit),
    );
    f.counter(
        "lb_flow_guard_unrecorded_total",
        "New flows forwarded by the Maglev table but not recorded, because their CPU had \
         reached the new-flow rate guard's limit.",
        stats.flow_table.unrecorded,
    );
}

#[cfg(test)]
mod tests;
