//! The rise/fall state machine of one check target: pure, driven by probe results and a clock
//! reading the caller passes in, so every transition rule is unit-tested without sockets.

use std::time::{Duration, SystemTime};

use super::probe::{Passed, ProbeError};

/// Health of one target and the last probe's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckStatus {
    /// Whether the target counts as healthy. A target starts up, so a restarted lbd never takes
    /// healthy backends out while it waits for their first checks.
    pub up: bool,
    /// When `up` last changed (or when the target was first seen).
    pub since: SystemTime,
    /// The last probe's result; `None` before the first probe ended.
    pub last_ok: Option<bool>,
    /// The last probe's result in words ("connected", "HTTP 200", "connection refused",
    /// "timed out after 1 s"); empty before the first probe ended.
    pub last_reason: String,
    /// How long the last probe took, failed ones included (a timed-out probe took the timeout).
    pub last_latency: Option<Duration>,
    /// How many probes in a row gave the last probe's result (successes if it passed, failures
    /// otherwise); 0 before the first probe ended.
    pub consecutive: u32,
    /// Probes ended since the target was first seen.
    pub checks: u64,
}

impl CheckStatus {
    /// A target seen for the first time: up, no probe yet.
    pub fn new(now: SystemTime) -> Self {
        Self {
            up: true,
            since: now,
            last_ok: None,
            last_reason: String::new(),
            last_latency: None,
            consecutive: 0,
            checks: 0,
        }
    }

    /// Records one probe's result. The target goes down after `fall` failures in a row and comes
    /// back up after `rise` successes in a row (0 counts as 1). Returns the new state when this
    /// result changed it, `None` otherwise, so each transition is reported once.
    pub fn record(
        &mut self,
        result: &Result<Passed, ProbeError>,
        latency: Duration,
        rise: u32,
        fall: u32,
        now: SystemTime,
    ) -> Option<bool> {
        let ok = result.is_ok();
        self.consecutive = if self.last_ok == Some(ok) {
            self.consecutive.saturating_add(1)
        } else {
            1
        };
        self.last_ok = Some(ok);
        self.last_reason = match result {
            Ok(passed) => passed.to_string(),
            Err(e) => e.to_string(),
        };
        self.last_latency = Some(latency);
        self.checks += 1;
        let flips = if self.up {
            !ok && self.consecutive >= fall.max(1)
        } else {
            ok && self.consecutive >= rise.max(1)
        };
        if flips {
            self.up = ok;
            self.since = now;
            Some(ok)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A TCP probe's result: connected or refused.
    fn probe(ok: bool) -> Result<Passed, ProbeError> {
        if ok {
            Ok(Passed::Connected)
        } else {
            Err(ProbeError::Connect(
                std::io::ErrorKind::ConnectionRefused.into(),
            ))
        }
    }

    /// Feeds `results` (true = pass) with rise 2 / fall 3 and returns each transition.
    fn run(status: &mut CheckStatus, results: &[bool]) -> Vec<Option<bool>> {
        results
            .iter()
            .enumerate()
            .map(|(i, &ok)| {
                let result = probe(ok);
                status.record(&result, MS, 2, 3, at(i as u64 + 1))
            })
            .collect()
    }

    #[test]
    fn starts_up_with_no_result() {
        let status = CheckStatus::new(at(0));
        assert!(status.up);
        assert_eq!(status.since, at(0));
        assert_eq!(status.last_ok, None);
        assert_eq!(status.last_latency, None);
        assert_eq!((status.consecutive, status.checks), (0, 0));
        assert!(status.last_reason.is_empty());
    }

    #[test]
    fn goes_down_after_exactly_fall_failures() {
        let mut status = CheckStatus::new(at(0));
        assert_eq!(run(&mut status, &[false, false]), [None, None]);
        assert!(status.up, "fall - 1 failures must not take it down");
        assert_eq!(status.consecutive, 2);
        assert_eq!(status.since, at(0));
        assert_eq!(
            status.record(&probe(false), 5 * MS, 2, 3, at(10)),
            Some(false),
            "the fall-th failure takes it down"
        );
        assert!(!status.up);
        assert_eq!(status.since, at(10));
        assert_eq!(status.last_ok, Some(false));
        assert_eq!(status.last_reason, "connection refused");
        assert_eq!(status.last_latency, Some(5 * MS));
        assert_eq!((status.consecutive, status.checks), (3, 3));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut status = CheckStatus::new(at(0));
        let transitions = run(&mut status, &[false, false, true, false, false]);
        assert_eq!(transitions, [None; 5]);
        assert!(status.up);
        assert_eq!(status.consecutive, 2);
        assert_eq!(status.record(&probe(false), MS, 2, 3, at(9)), Some(false));
    }

    #[test]
    fn comes_back_after_rise_successes_and_a_failure_resets_them() {
        let mut status = CheckStatus::new(at(0));
        run(&mut status, &[false, false, false]);
        assert!(!status.up);
        // One success, a failure, then one more: never two in a row.
        assert_eq!(run(&mut status, &[true, false, true]), [None; 3]);
        assert!(!status.up);
        assert_eq!(status.record(&probe(true), MS, 2, 3, at(20)), Some(true));
        assert!(status.up);
        assert_eq!(status.since, at(20));
        assert_eq!(status.last_reason, "connected");
        assert_eq!(status.consecutive, 2);
    }

    #[test]
    fn transitions_are_reported_once() {
        let mut status = CheckStatus::new(at(0));
        let transitions = run(&mut status, &[false; 8]);
        assert_eq!(
            transitions.iter().filter(|t| t.is_some()).count(),
            1,
            "{transitions:?}"
        );
        assert_eq!(status.consecutive, 8);
        let since = status.since;
        let transitions = run(&mut status, &[true; 8]);
        assert_eq!(transitions.iter().flatten().collect::<Vec<_>>(), [&true]);
        assert_ne!(status.since, since);
        assert_eq!(status.checks, 16);
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_every_change() {
        let mut status = CheckStatus::new(at(0));
        assert_eq!(status.record(&probe(true), MS, 1, 1, at(1)), None);
        assert_eq!(status.record(&probe(false), MS, 1, 1, at(2)), Some(false));
        assert_eq!(status.record(&probe(false), MS, 1, 1, at(3)), None);
        assert_eq!(status.record(&probe(true), MS, 1, 1, at(4)), Some(true));
        // 0 is taken as 1 rather than "never".
        assert_eq!(status.record(&probe(false), MS, 0, 0, at(5)), Some(false));
        assert_eq!(status.record(&probe(true), MS, 0, 0, at(6)), Some(true));
    }

    #[test]
    fn successes_while_up_never_report() {
        let mut status = CheckStatus::new(at(0));
        assert_eq!(run(&mut status, &[true; 5]), [None; 5]);
        assert_eq!(status.since, at(0), "no transition, so `since` stays");
    }
}
