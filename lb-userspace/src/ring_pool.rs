//! Allocator for the shared Maglev table pool (`LB_RINGS`). Each VIP's table is a region of the
//! pool; a table change writes a fresh region and then points the VIP at it, and the old region
//! is reused only after a quarantine. The allocator's state is derivable from the VIPs' metadata,
//! which is how a restarted lbd rebuilds it.

use std::time::{Duration, Instant};

/// A run of pool entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Region {
    pub offset: u32,
    pub len: u32,
}

impl Region {
    fn end(self) -> u32 {
        self.offset + self.len
    }
}

#[derive(Clone, Debug)]
pub struct RingPool {
    size: u32,
    /// In use or quarantined, sorted by offset.
    taken: Vec<Region>,
    quarantined: Vec<(Region, Instant)>,
}

impl RingPool {
    pub fn new(size: u32) -> Self {
        Self {
            size,
            taken: Vec::new(),
            quarantined: Vec::new(),
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Marks a region found in the data plane as in use.
    pub fn claim(&mut self, region: Region) {
        let at = self.taken.partition_point(|r| r.offset < region.offset);
        self.taken.insert(at, region);
    }

    /// First fit.
    pub fn alloc(&mut self, len: u32) -> Option<Region> {
        let mut start = 0u32;
        for r in &self.taken {
            if r.offset >= start && r.offset - start >= len {
                break;
            }
            start = start.max(r.end());
        }
        if self.size.checked_sub(start)? < len {
            return None;
        }
        let region = Region { offset: start, len };
        self.claim(region);
        Some(region)
    }

    /// Returns a region nothing ever read (it was never published): reusable at once.
    pub fn release(&mut self, region: Region) {
        self.taken.retain(|r| *r != region);
    }

    /// Returns a region; it becomes allocatable after the quarantine.
    pub fn free(&mut self, region: Region, now: Instant) {
        self.quarantined.push((region, now));
    }

    pub fn release_quarantined(&mut self, now: Instant, quarantine: Duration) {
        let (expired, kept): (Vec<_>, Vec<_>) = self
            .quarantined
            .drain(..)
            .partition(|(_, at)| now.duration_since(*at) >= quarantine);
        self.quarantined = kept;
        for (region, _) in expired {
            self.taken.retain(|r| *r != region);
        }
    }

    /// Entries freed but still in quarantine: free soon.
    pub fn quarantined_entries(&self) -> u32 {
        self.quarantined.iter().map(|(r, _)| r.len).sum()
    }

    pub fn free_entries(&self) -> u32 {
        self.size - self.taken.iter().map(|r| r.len).sum::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_reuses_released_gaps_only_after_quarantine() {
        let mut pool = RingPool::new(100);
        let a = pool.alloc(30).unwrap();
        let b = pool.alloc(30).unwrap();
        assert_eq!((a.offset, b.offset), (0, 30));
        let t0 = Instant::now();
        pool.free(a, t0);
        // Still quarantined: the next region goes after b.
        assert_eq!(pool.alloc(30).unwrap().offset, 60);
        assert!(
            pool.alloc(30).is_none(),
            "pool is full while a is quarantined"
        );
        pool.release_quarantined(t0 + Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(pool.alloc(30).unwrap().offset, 0);
        assert_eq!(pool.free_entries(), 10);
    }

    #[test]
    fn claimed_regions_are_respected() {
        let mut pool = RingPool::new(20);
        pool.claim(Region { offset: 5, len: 5 });
        assert_eq!(pool.alloc(5).unwrap().offset, 0);
        assert_eq!(pool.alloc(6).unwrap().offset, 10);
        assert!(pool.alloc(5).is_none());
    }
}
