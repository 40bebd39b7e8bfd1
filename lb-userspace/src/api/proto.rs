//! The control API's messages, shared by lbd and lbctl: JSON over HTTP/1.1 on a Unix socket.
//!
//! | request                                   | body            | reply                     |
//! |-------------------------------------------|-----------------|---------------------------|
//! | `GET /v1/state`                           |                 | [`StateReply`]            |
//! | `GET /v1/status?idle_timeout=S`           |                 | [`Status`]                |
//! | `POST /v1/changes`                        | [`ChangeRequest`] | [`ChangeReply`]         |
//! | `POST /v1/apply`                          | [`ApplyRequest`]  | [`ChangeReply`]         |
//! | `GET /v1/flows?vip=V&backend=A&idle_timeout=S[&wait=true&timeout=S]` | | [`FlowProgress`], or with `wait` one per line (NDJSON) until `done` or `error` |
//! | `GET /v1/stats?idle_timeout=S`            |                 | [`Stats`]                 |
//! | `GET /v1/debug`                           |                 | [`Debug`]                 |
//! | `PUT /v1/debug`                           | [`Debug`]       | [`Debug`]                 |
//!
//! Any other status than 2xx carries an [`ErrorReply`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    change::Change,
    config::Settings,
    model::{Encap, HashMode, VipId, VipSpec},
};

pub const DEFAULT_SOCKET: &str = "/run/lb/lbd.sock";
/// Largest request body lbd reads.
pub const BODY_LIMIT: usize = 1 << 20;
/// A flow not seen for this long no longer counts as live (drain, status).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// How often `GET /v1/flows?wait=true` reports.
pub const FLOW_POLL_MS: u64 = 250;

/// The running state in the config file's shape: `lbctl export` prints it as TOML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateReply {
    pub settings: Settings,
    pub vip: Vec<VipSpec>,
}

/// Changes applied together: all of them or none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    pub changes: Vec<Change>,
    /// Validate and report, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// A whole wanted set of VIPs (a config file's `[[vip]]` list): lbd applies the diff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    #[serde(default)]
    pub vip: Vec<VipSpec>,
    #[serde(default)]
    pub dry_run: bool,
}

/// What a change or apply request did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeReply {
    /// False for a dry run (or an apply with nothing to do).
    pub applied: bool,
    /// The changes, in the order applied; for apply, the diff.
    pub changes: Vec<Change>,
}

/// `lbctl status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub idle_timeout_secs: u64,
    pub vips: Vec<VipStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipStatus {
    pub vip: VipId,
    pub ring_size: u32,
    pub hash: HashMode,
    /// Absent from an older lbd's reply: IPIP, all it had.
    #[serde(default)]
    pub encap: Encap,
    /// Every backend fails its health checks: the VIP keeps its last table.
    #[serde(default)]
    pub all_down: bool,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub weight: u32,
    pub drain: bool,
    pub state: BackendState,
    /// Live flows pinned to this backend.
    pub flows: u64,
    /// Health checks, when the backend has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
}

/// A checked backend's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    /// The check, e.g. `http:/healthz every 1s`.
    pub check: String,
    pub up: bool,
    /// Seconds in the current state.
    pub since_secs: u64,
    /// The last check's outcome: `ok`, or why it failed; absent before the first check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_latency_us: Option<u64>,
}

/// What the data plane does with a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// In the table: takes new flows.
    Active,
    /// Keeps its flows, takes no new ones (drained or weight 0).
    Draining,
    /// Out of the table, flows re-hash (next hop unresolved, or failing health checks).
    Down,
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Down => "down",
        })
    }
}

/// Query of `GET /v1/flows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsQuery {
    pub vip: VipId,
    pub backend: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    /// Stream until the count reaches zero.
    #[serde(default)]
    pub wait: bool,
    /// With `wait`: give up after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// Live flows on one backend; with `wait`, one per line until `done` or `error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowProgress {
    pub vip: VipId,
    pub backend: IpAddr,
    pub flows: u64,
    /// The count reached zero (last line of a wait).
    #[serde(default)]
    pub done: bool,
    /// The wait failed (timeout, or the backend went away); last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `lbctl stats`, the status page and `/metrics`: traffic counters from the data plane's pinned
/// maps (summed over CPUs, so they survive lbd restarts) with per-second rates, and each
/// backend's state, health and live flows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Seconds the rates are averaged over (the time since an earlier read at least a second
    /// before this one); 0 when there was none yet, and every rate is 0.
    pub rate_interval_secs: f64,
    pub idle_timeout_secs: u64,
    pub vips: Vec<VipStats>,
    pub global: GlobalStats,
    pub flow_table: FlowTableStats,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipStats {
    pub vip: VipId,
    /// Every backend fails its health checks: the VIP keeps its last table.
    #[serde(default)]
    pub all_down: bool,
    pub traffic: Traffic,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendStats {
    pub address: IpAddr,
    pub weight: u32,
    pub drain: bool,
    pub state: BackendState,
    /// Live flows pinned to this backend.
    pub flows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// Zero for a backend not installed in the data plane.
    pub traffic: Traffic,
}

impl VipStats {
    /// A VIP's status with traffic: `traffic(None)` is the VIP's, `traffic(Some(addr))` a
    /// backend's.
    pub fn from_status(status: VipStatus, traffic: impl Fn(Option<IpAddr>) -> Traffic) -> Self {
        Self {
            vip: status.vip,
            all_down: status.all_down,
            traffic: traffic(None),
            backends: status
                .backends
                .into_iter()
                .map(|b| BackendStats {
                    traffic: traffic(Some(b.address)),
                    address: b.address,
                    weight: b.weight,
                    drain: b.drain,
                    state: b.state,
                    flows: b.flows,
                    health: b.health,
                })
                .collect(),
        }
    }
}

/// Packets forwarded to a VIP or backend (bytes as received, before encapsulation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    pub new_flows_per_sec: f64,
}

/// The data plane's global counters (every interface, every VIP).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalStats {
    /// Packets by XDP action: `pass`, `tx`, `redirect`, `drop`.
    pub actions: std::collections::BTreeMap<String, u64>,
    /// Packets whose flow entry was found (and still valid).
    pub flow_hits: u64,
    /// TCP packets other than a SYN with no valid flow entry, re-hashed.
    pub flow_misses: u64,
    pub new_flows: u64,
    /// ICMP and ICMPv6 errors quoting a VIP flow, forwarded to its backend (absent from an
    /// older lbd's reply).
    #[serde(default)]
    pub icmp_forwarded: u64,
    /// Echo replies sent for VIP addresses.
    #[serde(default)]
    pub echo_replies: u64,
    /// Fragmentation-needed / packet-too-big replies sent to clients.
    #[serde(default)]
    pub too_big_replies: u64,
    /// Drops by reason (`lb_common::DropReason` names), every reason listed.
    pub drops: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowTableStats {
    /// Entries the table holds at most.
    pub capacity: u64,
    /// Entries in it at the last scan (live or not yet evicted).
    pub entries: u64,
    /// The new-flow rate guard: new flows each CPU records per tick (about a second) at most;
    /// 0: no limit.
    pub guard_limit: u32,
    /// New flows forwarded but not recorded because their CPU had reached the guard's limit.
    pub unrecorded: u64,
}

/// The data plane's debug logging (`lbctl debug on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debug {
    /// `lb_xdp` logs each packet's decision (aya-log, into lbd's log at DEBUG under the target
    /// `lb_xdp`). Off by default; off costs one branch on a flag the program reads anyway.
    pub data_plane: bool,
}

/// Body of every non-2xx reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// Names the field and the reason.
    pub error: String,
}
