//! Active health checks of backends: TCP connect or HTTP GET probes ([`Probe`]), a rise/fall
//! state machine per target ([`CheckStatus`]) and a scheduler ([`Checker`]) that runs every
//! target's probes on the agent's Tokio runtime with jitter and a bound on probes in flight.
//!
//! Health is runtime state only: it is never saved, and a target starts up, so restarting lbd
//! never takes healthy backends out of their tables while their first checks run.

mod checker;
mod probe;
mod state;

pub use checker::{Checker, HealthError, MIN_INTERVAL, Target, TargetId, Transition};
pub use probe::{DEFAULT_STATUS, Passed, Probe, ProbeError, ProbeKind};
pub use state::CheckStatus;

#[cfg(test)]
mod tests;
