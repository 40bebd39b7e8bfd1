//! The only module that touches BPF: loading and attaching the programs, pinning, and reading and
//! writing the maps. Everything else goes through the small [`DataPlane`] trait, so the control
//! logic (reconcile) is unit-tested against [`fake::FakeDataPlane`] without a kernel.

pub mod decap;
pub mod fake;
pub mod kernel;

use std::{io, path::PathBuf, sync::Arc};

use lb_common::{BackendSlot, FlowValue, GlobalConfig, TrafficCounters, VipKey, VipMeta};

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("interface {iface}: {reason}")]
    Interface { iface: String, reason: String },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ring write out of bounds: entries {offset}..{end} but the pool has {pool}")]
    RingOutOfBounds { offset: u32, end: u64, pool: u32 },
}

impl DataPlaneError {
    pub(crate) fn map(name: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            name,
            source: Box::new(source),
        }
    }
}

/// What the control logic may do to the balancer's maps. Each method is one map operation, so
/// the order in which reconcile calls them is the order the data plane sees the changes.
pub trait DataPlane {
    fn config(&self) -> Result<GlobalConfig, DataPlaneError>;
    fn set_config(&mut self, config: &GlobalConfig) -> Result<(), DataPlaneError>;
    /// Sets the new-flow rate guard's limit (new flows each CPU records per tick; 0: none).
    fn set_flow_guard(&mut self, limit: u32) -> Result<(), DataPlaneError>;
    /// Writes `entries` into the ring pool starting at `offset`.
    fn write_ring(&mut self, offset: u32, entries: &[u32]) -> Result<(), DataPlaneError>;
    /// Reads `len` ring pool entries starting at `offset`.
    fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, DataPlaneError>;
    fn ring_pool_size(&self) -> u32;
    /// Inserts or replaces a VIP (replacing is the atomic table swap).
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataPlaneError>;
    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataPlaneError>;
    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, DataPlaneError>;
    /// Marks an address as carrying VIPs (so malformed packets to it are dropped, not passed).
    fn set_vip_addr(&mut self, key: &VipKey, vips_on_it: u32) -> Result<(), DataPlaneError>;
    fn del_vip_addr(&mut self, key: &VipKey) -> Result<(), DataPlaneError>;
    fn vip_addrs(&self) -> Result<Vec<VipKey>, DataPlaneError>;
    fn set_backend(&mut self, slot: u32, backend: &BackendSlot) -> Result<(), DataPlaneError>;
    /// Every slot, free ones included (their generations must survive restarts).
    fn backends(&self) -> Result<Vec<BackendSlot>, DataPlaneError>;
    /// Makes an interface a redirect target (devmap) for backends behind it.
    fn add_tx_port(&mut self, ifindex: u32) -> Result<(), DataPlaneError>;
    /// A read handle on the flow table that a blocking task can scan while the agent goes on.
    fn flow_table(&self) -> Arc<dyn FlowTable>;
    /// A read handle on the traffic counters (metrics read them on every scrape, off the loop).
    fn counters(&self) -> Arc<dyn CounterTable>;
    /// Zeroes a VIP id's traffic counters (on every CPU) before a new VIP takes the id, so
    /// its series starts at zero instead of inheriting the previous owner's.
    fn reset_vip_counters(&mut self, vip_id: u32) -> Result<(), DataPlaneError>;
    /// Zeroes a backend slot's traffic counters before a new backend takes the slot.
    fn reset_backend_counters(&mut self, slot: u32) -> Result<(), DataPlaneError>;
}

/// Read access to the data plane's counters, summed over CPUs. They live in pinned maps, so
/// they keep counting through lbd restarts and never go backwards while a VIP id or slot keeps
/// its owner.
pub trait CounterTable: Send + Sync {
    /// `LB_GLOBAL_STATS`: one value per index of `lb_common::Counter` / `DropReason`
    /// (`lb_common::stats::COUNTER_COUNT` values).
    fn global(&self) -> Result<Vec<u64>, DataPlaneError>;
    /// `LB_VIP_STATS` of one VIP id.
    fn vip(&self, vip_id: u32) -> Result<TrafficCounters, DataPlaneError>;
    /// `LB_BACKEND_STATS` of one backend slot.
    fn backend(&self, slot: u32) -> Result<TrafficCounters, DataPlaneError>;
    /// The new-flow rate guard: its limit (`LB_GUARD_LIMIT`) and the new flows it left
    /// unrecorded (`LB_GUARD_STATE`, summed over CPUs).
    fn flow_guard(&self) -> Result<FlowGuard, DataPlaneError>;
}

/// What [`CounterTable::flow_guard`] reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowGuard {
    pub limit: u32,
    pub unrecorded: u64,
}

/// Read access to `LB_FLOWS`. A scan of a large table takes long, so it runs off the agent's
/// loop; the data plane keeps inserting and evicting meanwhile, so a scan is a close estimate.
pub trait FlowTable: Send + Sync {
    /// Calls `f` with the value of every entry.
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowValue)) -> Result<(), DataPlaneError>;
}
