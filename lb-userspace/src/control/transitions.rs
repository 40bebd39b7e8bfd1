//! One log line per backend whose forwarding state changes (active, draining, down, removed),
//! with why: the data plane's side of what the API, the health checks and the next-hop lookups
//! decided. The agent's first reconcile only records the states (a restart changes nothing).

use std::{collections::BTreeMap, net::IpAddr};

use crate::{api::proto::BackendState, model::DesiredState, model::VipId, reconcile::VipPlan};

/// Why a backend is in its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Takes new flows.
    Serving,
    /// Drained by the operator.
    Drained,
    /// Weight 0.
    WeightZero,
    /// Its next hop is unresolved, so it is not in the data plane.
    NoNextHop,
    /// It fails its health checks.
    FailsChecks,
}

impl Cause {
    fn state(self) -> BackendState {
        match self {
            Cause::Serving => BackendState::Active,
            Cause::Drained | Cause::WeightZero => BackendState::Draining,
            Cause::NoNextHop | Cause::FailsChecks => BackendState::Down,
        }
    }

    /// Why the backend reached this state from `from` (`None`: it is new).
    fn describe(self, from: Option<Cause>) -> &'static str {
        match (self, from) {
            (Cause::Serving, None) => "added",
            (Cause::Serving, Some(Cause::FailsChecks)) => "passes its health checks again",
            (Cause::Serving, Some(Cause::NoNextHop)) => "next hop resolved",
            (Cause::Serving, Some(Cause::Drained)) => "undrained",
            (Cause::Serving, Some(_)) => "weight set above 0",
            (Cause::Drained, _) => "drained",
            (Cause::WeightZero, _) => "weight set to 0",
            (Cause::NoNextHop, _) => "next hop unresolved",
            (Cause::FailsChecks, _) => "fails its health checks",
        }
    }
}

/// The cause of each backend's state as a plan gives it (the rules of `reconcile::slot_value`).
pub fn causes(state: &DesiredState, plans: &[VipPlan]) -> BTreeMap<(VipId, IpAddr), Cause> {
    let mut out = BTreeMap::new();
    for (vip, plan) in state.vips.values().zip(plans) {
        for b in &plan.backends {
            let drained = vip.backend(b.addr).is_some_and(|spec| spec.drain);
            let cause = match (b.egress, b.healthy, b.weight) {
                (None, _, _) => Cause::NoNextHop,
                (_, false, _) => Cause::FailsChecks,
                (_, true, 0) if drained => Cause::Drained,
                (_, true, 0) => Cause::WeightZero,
                _ => Cause::Serving,
            };
            out.insert((vip.id, b.addr), cause);
        }
    }
    out
}

/// What was last logged for each backend.
#[derive(Debug, Default)]
pub struct Transitions {
    last: Option<BTreeMap<(VipId, IpAddr), Cause>>,
}

/// One backend's change of state.
#[derive(Debug, PartialEq, Eq)]
pub struct Transition {
    pub vip: VipId,
    pub backend: IpAddr,
    /// `None`: new.
    pub from: Option<BackendState>,
    /// `None`: removed.
    pub to: Option<BackendState>,
    pub cause: &'static str,
}

impl Transitions {
    /// Records `now` and returns what changed since the last call (nothing on the first call).
    pub fn update(&mut self, now: BTreeMap<(VipId, IpAddr), Cause>) -> Vec<Transition> {
        let Some(last) = self.last.replace(now) else {
            return Vec::new();
        };
        let now = self.last.as_ref().expect("just set");
        let mut changed = Vec::new();
        for (&(vip, backend), &cause) in now {
            let before = last.get(&(vip, backend)).copied();
            if before.map(Cause::state) != Some(cause.state()) {
                changed.push(Transition {
                    vip,
                    backend,
                    from: before.map(Cause::state),
                    to: Some(cause.state()),
                    cause: cause.describe(before),
                });
            }
        }
        for (&(vip, backend), &cause) in &last {
            if !now.contains_key(&(vip, backend)) {
                changed.push(Transition {
                    vip,
                    backend,
                    from: Some(cause.state()),
                    to: None,
                    cause: "removed",
                });
            }
        }
        changed
    }
}

/// Logs each change once.
pub fn log(changes: &[Transition]) {
    let name = |s: Option<BackendState>| s.map_or_else(|| "none".to_owned(), |s| s.to_string());
    for t in changes {
        let (from, to) = (name(t.from), name(t.to));
        if t.to == Some(BackendState::Down) {
            tracing::warn!(vip = %t.vip, backend = %t.backend, from, to, cause = t.cause, "backend state changed");
        } else {
            tracing::info!(vip = %t.vip, backend = %t.backend, from, to, cause = t.cause, "backend state changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(backend: &str) -> (VipId, IpAddr) {
        ("10.0.0.1:80/tcp".parse().unwrap(), backend.parse().unwrap())
    }

    #[test]
    fn the_first_update_only_records_then_each_change_is_reported_once() {
        let mut t = Transitions::default();
        let a = key("10.1.0.1");
        let b = key("10.1.0.2");
        assert!(t.update(BTreeMap::from([(a, Cause::Serving)])).is_empty());
        // Unchanged: nothing.
        assert!(t.update(BTreeMap::from([(a, Cause::Serving)])).is_empty());
        let changes = t.update(BTreeMap::from([
            (a, Cause::FailsChecks),
            (b, Cause::Serving),
        ]));
        assert_eq!(
            changes,
            [
                Transition {
                    vip: a.0,
                    backend: a.1,
                    from: Some(BackendState::Active),
                    to: Some(BackendState::Down),
                    cause: "fails its health checks",
                },
                Transition {
                    vip: b.0,
                    backend: b.1,
                    from: None,
                    to: Some(BackendState::Active),
                    cause: "added",
                },
            ]
        );
        let changes = t.update(BTreeMap::from([(a, Cause::Serving)]));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].cause, "passes its health checks again");
        assert_eq!((changes[1].backend, changes[1].to), (b.1, None));
    }

    #[test]
    fn a_new_cause_for_the_same_state_is_not_a_change() {
        let mut t = Transitions::default();
        let a = key("10.1.0.1");
        t.update(BTreeMap::from([(a, Cause::FailsChecks)]));
        assert!(t.update(BTreeMap::from([(a, Cause::NoNextHop)])).is_empty());
        let changes = t.update(BTreeMap::from([(a, Cause::Drained)]));
        assert_eq!(changes[0].cause, "drained");
        let changes = t.update(BTreeMap::from([(a, Cause::Serving)]));
        assert_eq!(changes[0].cause, "undrained");
    }
}
