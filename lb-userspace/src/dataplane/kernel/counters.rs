//! The per-CPU traffic counters: read (summed over CPUs) for metrics and stats, and zeroed when
//! a VIP id or backend slot gets a new owner. One handle shared by the data plane (resets) and
//! the readers (scrapes run off the agent's loop); the maps are small, so a lock is no cost.

use std::{
    os::fd::AsFd as _,
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf,
    maps::{Array, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{GuardState, TrafficCounters, maps, stats::COUNTER_COUNT};

use super::{batch::sum_per_cpu_u64, take_typed};
use crate::dataplane::{CounterTable, DataPlaneError, FlowGuard};

struct Maps {
    global: PerCpuArray<MapData, u64>,
    vips: PerCpuArray<MapData, TrafficCounters>,
    backends: PerCpuArray<MapData, TrafficCounters>,
    guard_limit: Array<MapData, u32>,
    guard_state: PerCpuArray<MapData, GuardState>,
}

/// `LB_GLOBAL_STATS`, `LB_VIP_STATS` and `LB_BACKEND_STATS`, and the new-flow rate guard's
/// limit and per-CPU state (small arrays read with the counters).
pub struct KernelCounters(Mutex<Maps>);

impl KernelCounters {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DataPlaneError> {
        Ok(Self(Mutex::new(Maps {
            global: take_typed(ebpf, maps::GLOBAL_STATS)?,
            vips: take_typed(ebpf, maps::VIP_STATS)?,
            backends: take_typed(ebpf, maps::BACKEND_STATS)?,
            guard_limit: take_typed(ebpf, maps::GUARD_LIMIT)?,
            guard_state: take_typed(ebpf, maps::GUARD_STATE)?,
        })))
    }

    pub(super) fn set_guard_limit(&self, limit: u32) -> Result<(), DataPlaneError> {
        self.lock()
            .guard_limit
            .set(0, limit, 0)
            .map_err(|e| DataPlaneError::map(maps::GUARD_LIMIT, e))
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // No panic can happen while it is held; the maps are whole either way.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn reset_vip(&self, vip_id: u32) -> Result<(), DataPlaneError> {
        zero(&mut self.lock().vips, vip_id).map_err(|e| DataPlaneError::map(maps::VIP_STATS, e))
    }

    pub(super) fn reset_backend(&self, slot: u32) -> Result<(), DataPlaneError> {
        zero(&mut self.lock().backends, slot)
            .map_err(|e| DataPlaneError::map(maps::BACKEND_STATS, e))
    }
}

fn zero(map: &mut PerCpuArray<MapData, TrafficCounters>, index: u32) -> Result<(), MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, io_error)| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error,
        })
    })?;
    let values =
        PerCpuValues::try_from(vec![TrafficCounters::default(); cpus]).map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error,
            })
        })?;
    map.set(index, values, 0)
}

fn sum(values: &PerCpuValues<TrafficCounters>) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |acc, v| TrafficCounters {
            packets: acc.packets.wrapping_add(v.packets),
            bytes: acc.bytes.wrapping_add(v.bytes),
            new_flows: acc.new_flows.wrapping_add(v.new_flows),
        })
}

impl CounterTable for KernelCounters {
    fn global(&self) -> Result<Vec<u64>, DataPlaneError> {
        let held = self.lock();
        // One batch call on every scrape; key by key (a syscall per counter) where the kernel
        // has no batch lookup.
        if let Ok(cpus) = nr_cpus()
            && let Ok(sums) = sum_per_cpu_u64(held.global.map().fd().as_fd(), COUNTER_COUNT, cpus)
        {
            return Ok(sums);
        }
        (0..COUNTER_COUNT)
            .map(|i| {
                held.global
                    .get(&i, 0)
                    .map(|v| v.iter().fold(0u64, |acc, x| acc.wrapping_add(*x)))
                    .map_err(|e| DataPlaneError::map(maps::GLOBAL_STATS, e))
            })
            .collect()
    }

    fn vip(&self, vip_id: u32) -> Result<TrafficCounters, DataPlaneError> {
        self.lock()
            .vips
            .get(&vip_id, 0)
            .map(|v| sum(&v))
            .map_err(|e| DataPlaneError::map(maps::VIP_STATS, e))
    }

    fn backend(&self, slot: u32) -> Result<TrafficCounters, DataPlaneError> {
        self.lock()
            .backends
            .get(&slot, 0)
            .map(|v| sum(&v))
            .map_err(|e| DataPlaneError::map(maps::BACKEND_STATS, e))
    }

    fn flow_guard(&self) -> Result<FlowGuard, DataPlaneError> {
        let held = self.lock();
        let limit = held
            .guard_limit
            .get(&0, 0)
            .map_err(|e| DataPlaneError::map(maps::GUARD_LIMIT, e))?;
        let unrecorded = held
            .guard_state
            .get(&0, 0)
            .map_err(|e| DataPlaneError::map(maps::GUARD_STATE, e))?
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.unrecorded));
        Ok(FlowGuard { limit, unrecorded })
    }
}
