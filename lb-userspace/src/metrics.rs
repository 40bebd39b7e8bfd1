//! Observability: the counters lbd keeps itself ([`Metrics`]: reconfigurations, health
//! transitions and check latency, build info), per-second rates from successive reads of the
//! data plane's counters ([`RateTracker`]), and the HTTP server on `--metrics-addr` with
//! `/metrics` (Prometheus text format), the status page at `/` and its JSON.
//!
//! Data-plane counters are never cached here: every scrape reads the pinned maps, so they keep
//! counting through lbd restarts. The counters in [`Metrics`] belong to the process and start
//! at zero with it, as any Prometheus process counter does (`rate()` handles the reset).

pub mod exposition;
pub mod page;
pub mod server;
pub mod stats;

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::TrafficCounters;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::{api::proto::Traffic, model::VipId};

/// Buckets of the health-check latency histogram, in seconds: probes on a LAN take well under a
/// millisecond; the top buckets catch timeouts.
const CHECK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Buckets of the reconfiguration latency histogram, in seconds (a change takes ms; one that
/// waits out a quarantine takes about a second).
const RECONFIG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// How a reconfiguration request ended (label `result`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconfigResult {
    /// Saved and written to the data plane.
    Applied,
    /// Validated, nothing to do, or a dry run.
    Unchanged,
    /// Refused: bad input or no room; nothing changed.
    Refused,
    /// Accepted but failed inside (state file, data plane).
    Failed,
}

impl ReconfigResult {
    pub fn label(self) -> &'static str {
        match self {
            ReconfigResult::Applied => "applied",
            ReconfigResult::Unchanged => "unchanged",
            ReconfigResult::Refused => "refused",
            ReconfigResult::Failed => "failed",
        }
    }
}

/// lbd's own metrics, registered in [`Metrics::registry`]; the data plane's are added at
/// every scrape by [`exposition`].
pub struct Metrics {
    pub registry: Registry,
    reconfigurations: IntCounterVec,
    reconfiguration_seconds: HistogramVec,
    health_transitions: IntCounterVec,
    check_seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconfigurations = IntCounterVec::new(
            Opts::new(
                "lb_reconfigurations_total",
                "Change and apply requests handled by this lbd process, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconfiguration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lb_reconfiguration_duration_seconds",
                "Time from a validated change to the data plane using it (check, save, map \
                 writes), by result.",
            )
            .buckets(RECONFIG_BUCKETS.to_vec()),
            &["result"],
        )
        .expect("valid metric");
        let health_transitions = IntCounterVec::new(
            Opts::new(
                "lb_backend_health_transitions_total",
                "Backends going down or up by their health checks, since this lbd started.",
            ),
            &["vip", "backend", "to"],
        )
        .expect("valid metric");
        let check_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lb_health_check_duration_seconds",
                "Health probe duration (failed ones included; a timed-out probe takes its \
                 timeout), by result.",
            )
            .buckets(CHECK_BUCKETS.to_vec()),
            &["result"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("lb_build_info", "lbd's version; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(reconfigurations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconfiguration_seconds.clone()),
            Box::new(health_transitions.clone()),
            Box::new(check_seconds.clone()),
            Box::new(build_info),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        // Every result is listed from the start, at zero, so a first refusal is a change in
        // the series rather than a new series.
        for result in [
            ReconfigResult::Applied,
            ReconfigResult::Unchanged,
            ReconfigResult::Refused,
            ReconfigResult::Failed,
        ] {
            reconfigurations.with_label_values(&[result.label()]);
        }
        Self {
            registry,
            reconfigurations,
            reconfiguration_seconds,
            health_transitions,
            check_seconds,
        }
    }

    /// One change or apply request ended after `took`.
    pub fn reconfigured(&self, result: ReconfigResult, took: Duration) {
        self.reconfigurations
            .with_label_values(&[result.label()])
            .inc();
        self.reconfiguration_seconds
            .with_label_values(&[result.label()])
            .observe(took.as_secs_f64());
    }

    /// A backend went up or down by its checks.
    pub fn health_transition(&self, vip: &VipId, backend: IpAddr, up: bool) {
        self.health_transitions
            .with_label_values(&[
                vip.to_string().as_str(),
                backend.to_string().as_str(),
                if up { "up" } else { "down" },
            ])
            .inc();
    }

    /// One health probe ended after `took`.
    pub fn probed(&self, ok: bool, took: Duration) {
        self.check_seconds
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .observe(took.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What a rate is keyed by: a VIP, or one of its backends. Keyed by name, not by slot, so a
/// slot taken over by another backend is a new series.
pub type RateKey = (VipId, Option<IpAddr>);

/// Per-second rates from successive reads of cumulative counters. A rate is taken against the
/// newest earlier read at least [`RateTracker::MIN_SPAN`] old, so readers polling at any pace
/// (the status page, `lbctl stats --watch`, a scraper) all get rates over a second or more.
#[derive(Debug, Default)]
pub struct RateTracker {
    /// The read rates are taken against, and the newer read that replaces it once it is old
    /// enough.
    base: Option<(Instant, HashMap<RateKey, TrafficCounters>)>,
    next: Option<(Instant, HashMap<RateKey, TrafficCounters>)>,
}

impl RateTracker {
    pub const MIN_SPAN: Duration = Duration::from_secs(1);

    /// Records a read at `now`; returns the span the rates are over (`None` for the first
    /// read) and the rates function.
    pub fn observe(&mut self, now: Instant, read: HashMap<RateKey, TrafficCounters>) -> Rates<'_> {
        if let Some((at, _)) = &self.next
            && now.duration_since(*at) >= Self::MIN_SPAN
        {
            self.base = self.next.take();
        }
        if self.base.is_none() {
            self.base = Some((now, read.clone()));
        }
        if self
            .next
            .as_ref()
            .is_none_or(|(at, _)| now.duration_since(*at) >= Self::MIN_SPAN)
        {
            self.next = Some((now, read.clone()));
        }
        let (at, base) = self.base.as_ref().expect("set above");
        let span = now.duration_since(*at);
        Rates {
            span: (span >= Self::MIN_SPAN).then_some(span),
            base,
            read,
        }
    }
}

/// Rates of one read against the tracker's base read.
pub struct Rates<'a> {
    span: Option<Duration>,
    base: &'a HashMap<RateKey, TrafficCounters>,
    read: HashMap<RateKey, TrafficCounters>,
}

impl Rates<'_> {
    /// Seconds the rates are over; 0 before there are any.
    pub fn span_secs(&self) -> f64 {
        self.span.map_or(0.0, |s| s.as_secs_f64())
    }

    /// The counters of `key` with their rates. A counter that went backwards (its slot was
    /// reset for a new occupant) has rate 0 for this span.
    pub fn traffic(&self, key: &RateKey) -> Traffic {
        let now = self.read.get(key).copied().unwrap_or_default();
        let mut traffic = Traffic {
            packets: now.packets,
            bytes: now.bytes,
            new_flows: now.new_flows,
            ..Traffic::default()
        };
        if let (Some(span), Some(then)) = (self.span, self.base.get(key)) {
            let per_sec =
                |now: u64, then: u64| now.saturating_sub(then) as f64 / span.as_secs_f64();
            traffic.packets_per_sec = per_sec(now.packets, then.packets);
            traffic.bytes_per_sec = per_sec(now.bytes, then.bytes);
            traffic.new_flows_per_sec = per_sec(now.new_flows, then.new_flows);
        }
        traffic
    }
}

#[cfg(test)]
mod tests;
