//! Active health checks of backends: TCP connect or HTTP GET probes ([`Probe`]), a rise/fall
//! state machine per target ([`CheckStatus`]) and a scheduler ([`Checker`]) that runs every
//! target's probes on the agent's Tokio runtime with jitter and a bound on probes in flight.
//!
//! Health is runtime state only: it is never saved, and a target starts up, so restarting lbd
//! never takes healthy backends out of their tables while their first checks run.
//!
//! Cost: 40-100 µs of CPU per probe, 85-90% of it in the kernel (socket, handshake, reset),
//! so one core's 10% checks about 1,500 (HTTP) to 2,000 (TCP) backends every second; see
//! `tests/tests/health_capacity.rs`.

mod checker;
mod probe;
mod state;

pub use checker::{
    Checker, HealthError, MIN_INTERVAL, ProbeObserver, Target, TargetId, Transition,
};
pub use probe::{DEFAULT_STATUS, Passed, Probe, ProbeError, ProbeKind};
pub use state::CheckStatus;

#[cfg(test)]
mod tests;
