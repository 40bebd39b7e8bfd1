//! Live flows per backend, counted from a scan of the flow table: what drain waits on and what
//! status reports. Time is in ticks (coarse monotonic ns >> 30, about seconds), the clock lbd
//! publishes in `GlobalConfig::now_tick` and the data plane stamps entries with.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lb_common::{FlowValue, keys::FLOW_F_CLOSED};

use crate::dataplane::{DataPlaneError, FlowTable};

/// Nanoseconds per tick, as a shift.
const TICK_SHIFT: u32 = 30;

/// The current tick: `CLOCK_MONOTONIC_COARSE` in ns, shifted right by 30. What lbd publishes
/// to the data plane.
pub fn now_tick() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; CLOCK_MONOTONIC_COARSE exists on every Linux this
    // runs on (2.6.32+), so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    let ns = (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64);
    (ns >> TICK_SHIFT) as u32
}

/// `d` in ticks, rounded up (a flow idle for less than `d` must not count as gone).
pub fn idle_ticks(d: Duration) -> u32 {
    let ns = d.as_nanos();
    let ticks = ns.div_ceil(1 << TICK_SHIFT);
    u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// The time flows are judged at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub now: u32,
    /// (the tick a previous lbd last published, this lbd's first): while no lbd ran, the data
    /// plane stamped every packet with the former, so an entry holding it was seen at least as
    /// late as the latter. Errs toward live, so a drain never ends early.
    pub frozen: Option<(u32, u32)>,
}

impl Clock {
    /// Now, with no previous lbd's frozen tick to account for.
    pub fn at(now: u32) -> Self {
        Self { now, frozen: None }
    }

    /// When `v` was last seen, as far as we can tell.
    fn last_seen(&self, v: &FlowValue) -> u32 {
        match self.frozen {
            Some((frozen, started)) if v.last_seen == frozen => started,
            _ => v.last_seen,
        }
    }
}

/// Whether an entry is a live flow at `clock`: seen within `idle_ticks`, and not closed (a
/// closed entry counts until the tick in which its FIN or RST was seen ends).
pub fn is_live(v: &FlowValue, clock: Clock, idle_ticks: u32) -> bool {
    // The data plane may have stamped a tick our read of the clock has not reached yet; the
    // signed difference treats that as "just seen" (and survives the u32 wrap).
    let idle = clock.now.wrapping_sub(clock.last_seen(v)) as i32;
    let idle = idle.max(0) as u32;
    if v.flags & FLOW_F_CLOSED != 0 && idle > 0 {
        return false;
    }
    idle <= idle_ticks
}

/// One scan of the flow table: live flows per (slot, generation), and every entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// A backend's count is the entry for its slot and current generation; older generations
    /// are flows of a previous occupant.
    pub live: HashMap<(u32, u32), u64>,
    /// Entries in the table, live or not (yet) evicted: its occupancy.
    pub entries: u64,
}

/// Counts live flows per (slot, generation) and all entries in one scan of `table`.
pub fn count_live(
    table: &dyn FlowTable,
    clock: Clock,
    idle_ticks: u32,
) -> Result<Counts, DataPlaneError> {
    let mut counts = Counts::default();
    table.for_each_flow(&mut |v| {
        counts.entries += 1;
        if is_live(v, clock, idle_ticks) {
            *counts.live.entry((v.slot, v.generation)).or_default() += 1;
        }
    })?;
    Ok(counts)
}

/// The last scan, reused within its tick: counts can only change when the tick does (an entry
/// ages by ticks), and a scan of a large table takes long. One scan runs at a time, however
/// many drain waits and status requests ask.
#[derive(Default)]
pub struct CountCache {
    last: Mutex<Option<(Clock, u32, Arc<Counts>)>>,
}

impl CountCache {
    /// The counts at `clock` for `idle_ticks`, from the cache or a fresh scan.
    pub fn counts(
        &self,
        table: &dyn FlowTable,
        clock: Clock,
        idle_ticks: u32,
    ) -> Result<Arc<Counts>, DataPlaneError> {
        // Held during the scan, so concurrent askers wait for it instead of scanning too.
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, idle, counts)) = &*last
            && (*at, *idle) == (clock, idle_ticks)
        {
            return Ok(counts.clone());
        }
        let counts = Arc::new(count_live(table, clock, idle_ticks)?);
        *last = Some((clock, idle_ticks, counts.clone()));
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeFlows;

    /// Counts its scans.
    struct Counted(FakeFlows, std::sync::atomic::AtomicU32);

    impl FlowTable for Counted {
        fn for_each_flow(&self, f: &mut dyn FnMut(&FlowValue)) -> Result<(), DataPlaneError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.for_each_flow(f)
        }
    }

    #[test]
    fn the_cache_scans_once_per_tick_and_idle_timeout() {
        let table = Counted(FakeFlows::default(), 0.into());
        table.0.push(flow(1, 1, 100, 0));
        let cache = CountCache::default();
        let scans = || table.1.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            cache.counts(&table, Clock::at(100), 5).unwrap().live[&(1, 1)],
            1
        );
        assert_eq!(
            cache.counts(&table, Clock::at(100), 5).unwrap().live[&(1, 1)],
            1
        );
        assert_eq!(scans(), 1);
        // A new tick or another idle timeout scans again.
        assert!(
            cache
                .counts(&table, Clock::at(106), 5)
                .unwrap()
                .live
                .is_empty()
        );
        assert_eq!(
            cache.counts(&table, Clock::at(106), 9).unwrap().live[&(1, 1)],
            1
        );
        assert_eq!(scans(), 3);
    }

    fn flow(slot: u32, generation: u32, last_seen: u32, flags: u32) -> FlowValue {
        FlowValue {
            slot,
            generation,
            last_seen,
            flags,
        }
    }

    #[test]
    fn idle_ticks_round_up() {
        assert_eq!(idle_ticks(Duration::ZERO), 0);
        assert_eq!(idle_ticks(Duration::from_nanos(1)), 1);
        assert_eq!(idle_ticks(Duration::from_nanos(1 << 30)), 1);
        assert_eq!(idle_ticks(Duration::from_nanos((1 << 30) + 1)), 2);
        // 60 s is 55.9 ticks.
        assert_eq!(idle_ticks(Duration::from_mins(1)), 56);
        assert_eq!(idle_ticks(Duration::MAX), u32::MAX);
    }

    #[test]
    fn open_flows_live_until_idle_too_long() {
        let now = 1000;
        assert!(is_live(&flow(1, 1, now, 0), Clock::at(now), 0));
        assert!(is_live(&flow(1, 1, now - 60, 0), Clock::at(now), 60));
        assert!(!is_live(&flow(1, 1, now - 61, 0), Clock::at(now), 60));
        // Stamped by the data plane in a tick our clock read has not reached yet.
        assert!(is_live(&flow(1, 1, now + 1, 0), Clock::at(now), 0));
    }

    #[test]
    fn closed_flows_are_gone_once_their_tick_has_passed() {
        let now = 1000;
        assert!(is_live(&flow(1, 1, now, FLOW_F_CLOSED), Clock::at(now), 60));
        assert!(!is_live(
            &flow(1, 1, now - 1, FLOW_F_CLOSED),
            Clock::at(now),
            60
        ));
        assert!(is_live(
            &flow(1, 1, now + 1, FLOW_F_CLOSED),
            Clock::at(now),
            60
        ));
    }

    #[test]
    fn ticks_survive_the_u32_wrap() {
        assert!(is_live(&flow(1, 1, u32::MAX, 0), Clock::at(5), 10));
        assert!(!is_live(&flow(1, 1, u32::MAX - 20, 0), Clock::at(5), 10));
    }

    #[test]
    fn entries_stamped_while_no_lbd_ran_count_from_its_start() {
        // The previous lbd last published 900; this one started at 990.
        let clock = Clock {
            now: 1000,
            frozen: Some((900, 990)),
        };
        assert!(is_live(&flow(1, 1, 900, 0), clock, 10));
        assert!(!is_live(&flow(1, 1, 900, 0), clock, 9));
        assert!(!is_live(&flow(1, 1, 899, 0), clock, 60));
        assert!(!is_live(&flow(1, 1, 900, 0), Clock::at(1000), 10));
    }

    #[test]
    fn count_live_groups_by_slot_and_generation() {
        let now = 500;
        let table = FakeFlows::with([
            flow(3, 1, now, 0),
            flow(3, 1, now - 2, 0),
            // An older occupant of slot 3.
            flow(3, 0, now, 0),
            flow(4, 7, now, FLOW_F_CLOSED),
            // Gone: closed in an earlier tick, or idle too long.
            flow(4, 7, now - 1, FLOW_F_CLOSED),
            flow(5, 1, now - 11, 0),
        ]);
        let counts = count_live(&table, Clock::at(now), 10).unwrap();
        let expected: HashMap<(u32, u32), u64> = [((3, 1), 2), ((3, 0), 1), ((4, 7), 1)]
            .into_iter()
            .collect();
        assert_eq!(counts.live, expected);
        assert_eq!(counts.entries, 6);

        table.push(flow(5, 1, now, 0));
        assert_eq!(
            count_live(&table, Clock::at(now), 10).unwrap().live[&(5, 1)],
            1
        );
    }

    #[test]
    fn now_tick_follows_the_coarse_clock() {
        let a = now_tick();
        let b = now_tick();
        assert!(b.wrapping_sub(a) <= 1, "{a} then {b}");
    }
}
