//! The control API: lbd serves it on a Unix socket ([`server`]), lbctl calls it ([`client`]).
//! The server only parses, checks and forwards: every request becomes a [`Command`] for the
//! agent's loop, the one owner of the desired state and the data plane.

pub mod client;
pub mod proto;
pub mod server;

use std::{net::IpAddr, time::Duration};

use tokio::sync::oneshot;

use crate::{
    model::{ModelError, VipId},
    reconcile::ReconcileError,
};
use proto::{ApplyRequest, ChangeReply, ChangeRequest, Debug, StateReply, Stats, Status};

/// A request for the agent, with where to send the answer.
#[derive(Debug)]
pub enum Command {
    State(oneshot::Sender<StateReply>),
    Status {
        idle_timeout: Duration,
        reply: oneshot::Sender<Result<Status, ApiError>>,
    },
    Change {
        request: ChangeRequest,
        reply: oneshot::Sender<Result<ChangeReply, ApiError>>,
    },
    Apply {
        request: ApplyRequest,
        reply: oneshot::Sender<Result<ChangeReply, ApiError>>,
    },
    /// Live flows on one backend right now.
    Flows {
        vip: VipId,
        backend: IpAddr,
        idle_timeout: Duration,
        reply: oneshot::Sender<Result<u64, ApiError>>,
    },
    /// Counters, rates and status, for `lbctl stats`, the status page and `/metrics`.
    Stats {
        idle_timeout: Duration,
        reply: oneshot::Sender<Result<Stats, ApiError>>,
    },
    /// Turns the data plane's debug logging on or off (`None`: only report it).
    Debug {
        set: Option<Debug>,
        reply: oneshot::Sender<Result<Debug, ApiError>>,
    },
}

/// How a refusal maps onto HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: malformed or invalid.
    BadRequest,
    /// 404: no such VIP or backend.
    NotFound,
    /// 409: already exists.
    Conflict,
    /// 507: valid, but the data plane has no room for it (slots, VIP ids, ring pool).
    NoRoom,
    /// 500: accepted input, failed inside (state file, data plane).
    Internal,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::NoRoom => 507,
            ErrorKind::Internal => 500,
        }
    }
}

/// A refused or failed request: the message names the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let kind = match e {
            ModelError::NoSuchVip { .. } | ModelError::NoSuchBackend { .. } => ErrorKind::NotFound,
            ModelError::VipExists { .. }
            | ModelError::BackendExists { .. }
            | ModelError::DuplicateVip { .. }
            | ModelError::DuplicateBackend { .. } => ErrorKind::Conflict,
            _ => ErrorKind::BadRequest,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<ReconcileError> for ApiError {
    fn from(e: ReconcileError) -> Self {
        let kind = match e {
            ReconcileError::TooManyVips { .. }
            | ReconcileError::TooManyBackends { .. }
            | ReconcileError::RingPoolExhausted { .. } => ErrorKind::NoRoom,
            ReconcileError::DataPlane(_) => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}
