//! The balancer's maps, named from `lb_common::maps`. No pinning attributes: lbd pins them, and it
//! may resize `LB_FLOWS` and `LB_RINGS` at load time, so code here never assumes their sizes
//! beyond the bounds checks the map lookups already make.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    BackendSlot, FlowKey, FlowValue, GlobalConfig, GuardState, TrafficCounters, VipKey, VipMeta,
    maps::{DEFAULT_FLOWS, DEFAULT_RING_POOL, MAX_BACKENDS, MAX_TX_PORTS, MAX_VIP_ADDRS, MAX_VIPS},
    stats::COUNTER_COUNT,
};

/// (address, port, protocol) -> VIP. Not preallocated, so replacing an element frees the old
/// one through RCU and a reader never sees a value mutated under it: replacing a `VipMeta` is
/// the atomic swap of the VIP's Maglev table.
#[map(name = "LB_VIPS")]
pub static LB_VIPS: HashMap<VipKey, VipMeta> =
    HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);

/// Address-only keys (port 0, protocol 0): "this address is a VIP", so malformed packets to it
/// are dropped instead of passed.
#[map(name = "LB_VIP_ADDRS")]
pub static LB_VIP_ADDRS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_VIP_ADDRS, 0);

/// Pool of Maglev tables: a VIP's table is `[ring_offset, ring_offset + ring_size)`; an entry is
/// a slot index into `LB_BACKENDS` or `RING_EMPTY`.
#[map(name = "LB_RINGS")]
pub static LB_RINGS: Array<u32> = Array::with_max_entries(DEFAULT_RING_POOL, 0);

#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: Array<BackendSlot> = Array::with_max_entries(MAX_BACKENDS, 0);

/// 5-tuple -> pinned backend. Per-CPU LRU lists avoid a global lock on every insert.
#[map(name = "LB_FLOWS")]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS, BPF_F_NO_COMMON_LRU);

#[map(name = "LB_VIP_STATS")]
pub static LB_VIP_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "LB_BACKEND_STATS")]
pub static LB_BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Indexed by `Counter` and `DropReason::counter_index()`.
#[map(name = "LB_GLOBAL_STATS")]
pub static LB_GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "LB_CONFIG")]
pub static LB_CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// The new-flow rate guard (`lb_common::guard`): the limit lbd sets, and each CPU's count.
#[map(name = "LB_GUARD_LIMIT")]
pub static LB_GUARD_LIMIT: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "LB_GUARD_STATE")]
pub static LB_GUARD_STATE: PerCpuArray<GuardState> = PerCpuArray::with_max_entries(1, 0);

/// Egress interfaces other than the ingress one, keyed by ifindex.
#[map(name = "LB_TX_PORTS")]
pub static LB_TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
