//! The control API's messages, shared by lbd and lbctl: JSON over HTTP/1.1 on a Unix socket.
//!
//! | request                                   | body            | reply                     |
//! |-------------------------------------------|-----------------|---------------------------|
//! | `GET /v1/state`                           |                 | [`StateReply`]            |
//! | `GET /v1/status?idle_timeout=S`           |                 | [`Status`]                |
//! | `POST /v1/changes`                        | [`ChangeRequest`] | [`ChangeReply`]         |
//! | `POST /v1/apply`                          | [`ApplyRequest`]  | [`ChangeReply`]         |
//! | `GET /v1/flows?vip=V&backend=A&idle_timeout=S[&wait=true&timeout=S]` | | [`FlowProgress`], or with `wait` one per line (NDJSON) until `done` or `error` |
//!
//! Any other status than 2xx carries an [`ErrorReply`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    change::Change,
    config::Settings,
    model::{HashMode, VipId, VipSpec},
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

/// Body of every non-2xx reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// Names the field and the reason.
    pub error: String,
}
