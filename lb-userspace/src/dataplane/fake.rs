//! An in-memory [`DataPlane`] for unit tests of the control logic. It also records every call,
//! so tests can check the order of operations (slots before tables, tables before frees).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use lb_common::{
    BackendSlot, FlowValue, GlobalConfig, TrafficCounters, VipKey, VipMeta,
    maps::{MAX_BACKENDS, MAX_VIPS},
    stats::COUNTER_COUNT,
};

use super::{CounterTable, DataPlane, DataPlaneError, FlowGuard, FlowTable};

/// The fake's flow table: tests put entries in it directly.
#[derive(Debug, Default)]
pub struct FakeFlows(pub Mutex<Vec<FlowValue>>);

impl FakeFlows {
    /// A table holding `entries`.
    pub fn with(entries: impl IntoIterator<Item = FlowValue>) -> Self {
        Self(Mutex::new(entries.into_iter().collect()))
    }

    /// Adds one entry.
    pub fn push(&self, value: FlowValue) {
        self.0.lock().expect("not poisoned").push(value);
    }

    /// Replaces every entry.
    pub fn set(&self, entries: impl IntoIterator<Item = FlowValue>) {
        *self.0.lock().expect("not poisoned") = entries.into_iter().collect();
    }
}

impl FlowTable for FakeFlows {
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowValue)) -> Result<(), DataPlaneError> {
        self.0.lock().expect("not poisoned").iter().for_each(f);
        Ok(())
    }
}

/// The fake's counters: tests set them directly, as packets would.
#[derive(Debug)]
pub struct FakeCounters {
    pub global: Mutex<Vec<u64>>,
    pub vips: Mutex<Vec<TrafficCounters>>,
    pub backends: Mutex<Vec<TrafficCounters>>,
    pub guard: Mutex<FlowGuard>,
}

impl Default for FakeCounters {
    fn default() -> Self {
        Self {
            global: Mutex::new(vec![0; COUNTER_COUNT as usize]),
            vips: Mutex::new(vec![TrafficCounters::default(); MAX_VIPS as usize]),
            backends: Mutex::new(vec![TrafficCounters::default(); MAX_BACKENDS as usize]),
            guard: Mutex::default(),
        }
    }
}

impl FakeCounters {
    /// Counts `packets` packets of `bytes` bytes each for a VIP id and a slot.
    pub fn add(&self, vip_id: u32, slot: u32, packets: u64, bytes: u64) {
        for c in [
            &mut self.vips.lock().expect("not poisoned")[vip_id as usize],
            &mut self.backends.lock().expect("not poisoned")[slot as usize],
        ] {
            c.packets += packets;
            c.bytes += packets * bytes;
        }
    }
}

fn entry(all: &Mutex<Vec<TrafficCounters>>, index: u32) -> Result<TrafficCounters, DataPlaneError> {
    all.lock()
        .expect("not poisoned")
        .get(index as usize)
        .copied()
        .ok_or(DataPlaneError::MissingMap {
            name: "fake counters",
        })
}

impl CounterTable for FakeCounters {
    fn global(&self) -> Result<Vec<u64>, DataPlaneError> {
        Ok(self.global.lock().expect("not poisoned").clone())
    }

    fn vip(&self, vip_id: u32) -> Result<TrafficCounters, DataPlaneError> {
        entry(&self.vips, vip_id)
    }

    fn backend(&self, slot: u32) -> Result<TrafficCounters, DataPlaneError> {
        entry(&self.backends, slot)
    }

    fn flow_guard(&self) -> Result<FlowGuard, DataPlaneError> {
        Ok(*self.guard.lock().expect("not poisoned"))
    }
}

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Config,
    Ring { offset: u32, len: u32 },
    SetVip(VipKey, VipMeta),
    DelVip(VipKey),
    SetVipAddr(VipKey, u32),
    DelVipAddr(VipKey),
    SetBackend(u32, BackendSlot),
    TxPort(u32),
    ResetVipCounters(u32),
    ResetBackendCounters(u32),
}

#[derive(Debug)]
pub struct FakeDataPlane {
    pub config: GlobalConfig,
    pub ring: Vec<u32>,
    pub vips: BTreeMap<VipKey, VipMeta>,
    pub vip_addrs: BTreeMap<VipKey, u32>,
    pub backends: Vec<BackendSlot>,
    pub tx_ports: BTreeSet<u32>,
    pub flows: Arc<FakeFlows>,
    pub counters: Arc<FakeCounters>,
    pub ops: Vec<Op>,
    /// When set, the next mutating call fails (to test that failures change nothing visible).
    pub fail_next: bool,
    /// When `Some(n)`, the mutating call after `n` more successful ones fails.
    pub fail_on: Option<u32>,
}

impl FakeDataPlane {
    pub fn new(ring_pool: u32) -> Self {
        Self {
            config: GlobalConfig::default(),
            ring: vec![0; ring_pool as usize],
            vips: BTreeMap::new(),
            vip_addrs: BTreeMap::new(),
            backends: vec![BackendSlot::default(); MAX_BACKENDS as usize],
            tx_ports: BTreeSet::new(),
            flows: Arc::default(),
            counters: Arc::default(),
            ops: Vec::new(),
            fail_next: false,
            fail_on: None,
        }
    }

    fn check(&mut self) -> Result<(), DataPlaneError> {
        match self.fail_on {
            Some(0) => {
                self.fail_on = None;
                self.fail_next = true;
            }
            Some(n) => self.fail_on = Some(n - 1),
            None => {}
        }
        if std::mem::take(&mut self.fail_next) {
            return Err(DataPlaneError::MissingMap { name: "fake" });
        }
        Ok(())
    }

    /// The table a VIP currently points at, as slot indices.
    pub fn table_of(&self, key: &VipKey) -> Option<&[u32]> {
        let meta = self.vips.get(key)?;
        let start = meta.ring_offset as usize;
        Some(&self.ring[start..start + meta.ring_size as usize])
    }
}

impl DataPlane for FakeDataPlane {
    fn config(&self) -> Result<GlobalConfig, DataPlaneError> {
        Ok(self.config)
    }

    fn set_flow_guard(&mut self, limit: u32) -> Result<(), DataPlaneError> {
        self.check()?;
        self.counters.guard.lock().expect("not poisoned").limit = limit;
        Ok(())
    }

    fn set_config(&mut self, config: &GlobalConfig) -> Result<(), DataPlaneError> {
        self.check()?;
        self.config = *config;
        self.ops.push(Op::Config);
        Ok(())
    }

    fn write_ring(&mut self, offset: u32, entries: &[u32]) -> Result<(), DataPlaneError> {
        self.check()?;
        let end = offset as usize + entries.len();
        if end > self.ring.len() {
            return Err(DataPlaneError::RingOutOfBounds {
                offset,
                end: end as u64,
                pool: self.ring.len() as u32,
            });
        }
        self.ring[offset as usize..end].copy_from_slice(entries);
        self.ops.push(Op::Ring {
            offset,
            len: entries.len() as u32,
        });
        Ok(())
    }

    fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, DataPlaneError> {
        let (start, end) = (offset as usize, offset as usize + len as usize);
        self.ring
            .get(start..end)
            .map(<[u32]>::to_vec)
            .ok_or(DataPlaneError::RingOutOfBounds {
                offset,
                end: end as u64,
                pool: self.ring.len() as u32,
            })
    }

    fn ring_pool_size(&self) -> u32 {
        self.ring.len() as u32
    }

    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataPlaneError> {
        self.check()?;
        self.vips.insert(*key, *meta);
        self.ops.push(Op::SetVip(*key, *meta));
        Ok(())
    }

    fn del_vip(&mut self, key: &VipKey) -> Result<(), DataPlaneError> {
        self.check()?;
        self.vips.remove(key);
        self.ops.push(Op::DelVip(*key));
        Ok(())
    }

    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, DataPlaneError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn set_vip_addr(&mut self, key: &VipKey, vips_on_it: u32) -> Result<(), DataPlaneError> {
        self.check()?;
        self.vip_addrs.insert(*key, vips_on_it);
        self.ops.push(Op::SetVipAddr(*key, vips_on_it));
        Ok(())
    }

    fn del_vip_addr(&mut self, key: &VipKey) -> Result<(), DataPlaneError> {
        self.check()?;
        self.vip_addrs.remove(key);
        self.ops.push(Op::DelVipAddr(*key));
        Ok(())
    }

    fn vip_addrs(&self) -> Result<Vec<VipKey>, DataPlaneError> {
        Ok(self.vip_addrs.keys().copied().collect())
    }

    fn set_backend(&mut self, slot: u32, backend: &BackendSlot) -> Result<(), DataPlaneError> {
        self.check()?;
        self.backends[slot as usize] = *backend;
        self.ops.push(Op::SetBackend(slot, *backend));
        Ok(())
    }

    fn backends(&self) -> Result<Vec<BackendSlot>, DataPlaneError> {
        Ok(self.backends.clone())
    }

    fn add_tx_port(&mut self, ifindex: u32) -> Result<(), DataPlaneError> {
        self.check()?;
        self.tx_ports.insert(ifindex);
        self.ops.push(Op::TxPort(ifindex));
        Ok(())
    }

    fn flow_table(&self) -> Arc<dyn FlowTable> {
        self.flows.clone()
    }

    fn counters(&self) -> Arc<dyn CounterTable> {
        self.counters.clone()
    }

    fn reset_vip_counters(&mut self, vip_id: u32) -> Result<(), DataPlaneError> {
        self.check()?;
        self.counters.vips.lock().expect("not poisoned")[vip_id as usize] =
            TrafficCounters::default();
        self.ops.push(Op::ResetVipCounters(vip_id));
        Ok(())
    }

    fn reset_backend_counters(&mut self, slot: u32) -> Result<(), DataPlaneError> {
        self.check()?;
        self.counters.backends.lock().expect("not poisoned")[slot as usize] =
            TrafficCounters::default();
        self.ops.push(Op::ResetBackendCounters(slot));
        Ok(())
    }
}
