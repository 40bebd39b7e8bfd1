//! The scheduler: one lightweight task per target on the caller's Tokio runtime, each firing
//! every interval with jitter, a semaphore bounding the probes in flight, and the results fed
//! through each target's rise/fall state machine. Transitions go out on an unbounded channel
//! (they are rare, and a slow reader must never hold up the probes).

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use tokio::{
    runtime::Handle,
    sync::{Semaphore, mpsc},
    task::JoinHandle,
    time::{Instant, sleep_until},
};

use super::{
    probe::{Passed, Probe, ProbeError},
    state::CheckStatus,
};
use crate::model::VipId;

/// Each firing lands within this fraction of the interval either side of it, so targets added
/// together drift apart instead of probing in bursts.
const JITTER: f64 = 0.1;

/// Shorter intervals are taken as this: a zero interval would spin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// One backend of one VIP: the same backend behind two VIPs is checked once per VIP, since
/// each VIP may check it differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetId {
    pub vip: VipId,
    pub backend: IpAddr,
}

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} backend {}", self.vip, self.backend)
    }
}

/// What to check and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: TargetId,
    pub probe: Probe,
    pub interval: Duration,
    /// Successes in a row that bring a down target back up.
    pub rise: u32,
    /// Failures in a row that take an up target down.
    pub fall: u32,
}

/// A target went down or came back up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub id: TargetId,
    pub up: bool,
    /// The result of the probe that decided it ("connection refused", "HTTP 200", ...).
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("the health checker needs a Tokio runtime")]
    Runtime(#[source] tokio::runtime::TryCurrentError),
}

/// Runs the checks; dropping it stops them all.
pub struct Checker {
    shared: Arc<Shared>,
    runtime: Handle,
}

/// Told of every probe's outcome (passed or not) and duration, e.g. for a latency histogram.
pub type ProbeObserver = Arc<dyn Fn(bool, Duration) + Send + Sync>;

struct Shared {
    table: Mutex<Table>,
    permits: Semaphore,
    transitions: mpsc::UnboundedSender<Transition>,
    observer: Option<ProbeObserver>,
}

struct Table {
    entries: BTreeMap<TargetId, Entry>,
    /// Tells a task's results from those of the task it replaced.
    next_serial: u64,
    rng: Rng,
}

struct Entry {
    target: Arc<Target>,
    status: CheckStatus,
    serial: u64,
    task: JoinHandle<()>,
}

impl Checker {
    /// A checker with no targets, running on the current Tokio runtime, with at most
    /// `max_in_flight` probes at once (at least 1). Also returns where transitions arrive.
    pub fn spawn(
        max_in_flight: usize,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Transition>), HealthError> {
        Self::spawn_observed(max_in_flight, None)
    }

    /// [`Checker::spawn`], calling `observer` after every probe.
    pub fn spawn_observed(
        max_in_flight: usize,
        observer: Option<ProbeObserver>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Transition>), HealthError> {
        let runtime = Handle::try_current().map_err(HealthError::Runtime)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let table = Table {
            entries: BTreeMap::new(),
            next_serial: 0,
            rng: Rng::new(),
        };
        let shared = Arc::new(Shared {
            table: Mutex::new(table),
            permits: Semaphore::new(max_in_flight.max(1)),
            transitions: tx,
            observer,
        });
        Ok((Self { shared, runtime }, rx))
    }

    /// Makes `targets` the set checked. A target already checked keeps its state, and its
    /// schedule unless its probe or interval changed; a new one starts up and fires first at a
    /// random point within its interval; one left out stops. Of two targets with one id, the
    /// last wins.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let wanted: BTreeMap<TargetId, Target> = targets.into_iter().map(|t| (t.id, t)).collect();
        let mut table = self.shared.lock();
        table.entries.retain(|id, entry| {
            let keep = wanted.contains_key(id);
            if !keep {
                entry.task.abort();
            }
            keep
        });
        let now = SystemTime::now();
        for (id, target) in wanted {
            let reschedule = match table.entries.get_mut(&id) {
                Some(entry) if *entry.target == target => false,
                // Rise and fall are read at each result: the schedule stays.
                Some(entry)
                    if entry.target.probe == target.probe
                        && entry.target.interval == target.interval =>
                {
                    entry.target = Arc::new(target);
                    continue;
                }
                _ => true,
            };
            if !reschedule {
                continue;
            }
            let serial = table.next_serial;
            table.next_serial += 1;
            let target = Arc::new(target);
            let first = target.interval.max(MIN_INTERVAL).mul_f64(table.rng.unit());
            let seed = table.rng.next_u64();
            let task = self.runtime.spawn(probe_loop(
                self.shared.clone(),
                serial,
                target.clone(),
                first,
                seed,
            ));
            if let Some(entry) = table.entries.get_mut(&id) {
                entry.task.abort();
                entry.target = target;
                entry.serial = serial;
                entry.task = task;
            } else {
                let entry = Entry {
                    target,
                    status: CheckStatus::new(now),
                    serial,
                    task,
                };
                table.entries.insert(id, entry);
            }
        }
    }

    /// Every target's state.
    pub fn snapshot(&self) -> BTreeMap<TargetId, CheckStatus> {
        let table = self.shared.lock();
        table
            .entries
            .iter()
            .map(|(id, entry)| (*id, entry.status.clone()))
            .collect()
    }

    /// One target's state.
    pub fn status(&self, id: &TargetId) -> Option<CheckStatus> {
        self.shared
            .lock()
            .entries
            .get(id)
            .map(|entry| entry.status.clone())
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for entry in self.shared.lock().entries.values() {
            entry.task.abort();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding the lock; if something did, the table is still whole.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feeds a result to the target's state machine; false when the task has been replaced or
    /// its target removed, and should stop.
    fn record(
        &self,
        target: &Target,
        serial: u64,
        result: &Result<Passed, ProbeError>,
        latency: Duration,
    ) -> bool {
        if let Some(observe) = &self.observer {
            observe(result.is_ok(), latency);
        }
        let mut table = self.lock();
        let Some(entry) = table.entries.get_mut(&target.id) else {
            return false;
        };
        if entry.serial != serial {
            return false;
        }
        let (rise, fall) = (entry.target.rise, entry.target.fall);
        if let Some(up) = entry
            .status
            .record(result, latency, rise, fall, SystemTime::now())
        {
            let transition = Transition {
                id: target.id,
                up,
                reason: entry.status.last_reason.clone(),
            };
            // Fails only once the receiver is gone, when nobody needs to know any more.
            let _ = self.transitions.send(transition);
        }
        true
    }
}

/// One target's loop: wait for the firing time, wait for a permit, probe, record. The next
/// firing is an interval (with jitter) after this one, or right after the probe if the probe
/// ran longer than that: a target never has two probes in flight.
async fn probe_loop(
    shared: Arc<Shared>,
    serial: u64,
    target: Arc<Target>,
    first: Duration,
    seed: u64,
) {
    let interval = target.interval.max(MIN_INTERVAL);
    let mut rng = Rng(seed);
    let mut next = Instant::now() + first;
    loop {
        sleep_until(next).await;
        let fired = Instant::now();
        // The semaphore is never closed.
        let Ok(permit) = shared.permits.acquire().await else {
            return;
        };
        let started = Instant::now();
        let result = target.probe.run().await;
        let latency = started.elapsed();
        drop(permit);
        if !shared.record(&target, serial, &result, latency) {
            return;
        }
        next = fired + jittered(interval, &mut rng);
    }
}

/// `interval` moved by up to `JITTER` of itself either way.
fn jittered(interval: Duration, rng: &mut Rng) -> Duration {
    interval.mul_f64(1.0 - JITTER + 2.0 * JITTER * rng.unit())
}

/// `SplitMix64`: plenty for spreading timers, and no dependency. Seeded from the standard
/// library's per-process random hash keys.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(RandomState::new().hash_one(SystemTime::now()))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads() {
        let interval = Duration::from_secs(1);
        let mut rng = Rng::new();
        let delays: Vec<Duration> = (0..2000).map(|_| jittered(interval, &mut rng)).collect();
        let min = *delays.iter().min().unwrap();
        let max = *delays.iter().max().unwrap();
        assert!(min >= Duration::from_millis(900), "{min:?}");
        assert!(max <= Duration::from_millis(1100), "{max:?}");
        // Uniform over 200 ms: 2000 draws cover nearly all of it.
        assert!(
            max.checked_sub(min).unwrap() > Duration::from_millis(180),
            "{min:?}..{max:?}"
        );
    }

    #[test]
    fn rngs_differ() {
        let (mut a, mut b) = (Rng::new(), Rng::new());
        assert_ne!(a.next_u64(), b.next_u64());
    }
}
