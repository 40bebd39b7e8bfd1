//! Counters: global per-CPU counters indexed by `Counter`/`DropReason`, and per-VIP and
//! per-backend traffic. Per-CPU values need no atomics; lbd sums the CPUs.

use lb_common::{Counter, DropReason, TrafficCounters};

use crate::{
    knockout,
    maps::{LB_BACKEND_STATS, LB_GLOBAL_STATS, LB_VIP_STATS},
};

#[inline(always)]
fn bump(index: u32) {
    if knockout::STATS {
        return;
    }
    if let Some(value) = LB_GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array element of this CPU, valid for the program run.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    bump(counter as u32);
}

/// Counts a drop: the total and the reason.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    bump(Counter::Drop as u32);
    bump(reason.counter_index());
}

/// Counts one forwarded packet of `bytes` (as received) for its VIP and backend.
#[inline(always)]
pub fn count_traffic(vip_id: u32, backend: u32, bytes: u32, new_flow: bool) {
    if knockout::STATS {
        return;
    }
    add(LB_VIP_STATS.get_ptr_mut(vip_id), bytes, new_flow);
    add(LB_BACKEND_STATS.get_ptr_mut(backend), bytes, new_flow);
}

#[inline(always)]
fn add(counters: Option<*mut TrafficCounters>, bytes: u32, new_flow: bool) {
    if let Some(counters) = counters {
        // SAFETY: a per-CPU array element of this CPU, valid for the program run.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += u64::from(bytes);
            (*counters).new_flows += u64::from(new_flow);
        }
    }
}
