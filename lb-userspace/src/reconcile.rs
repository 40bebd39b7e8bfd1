//! Brings the data plane from what is installed to what is wanted with the smallest change, in
//! an order that never breaks a flow: backend slots are written before any table names them, a
//! VIP's table is swapped in one map update, and slots and table regions are freed only after
//! nothing points at them (and after a quarantine, so a packet that read the old table a moment
//! ago still finds what it expects).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    BackendSlot, VipKey, VipMeta,
    keys::{
        ENCAP_IPIP, RING_EMPTY, SLOT_ACTIVE, SLOT_DOWN, SLOT_DRAINING, SLOT_FREE, ip_from_wire,
        wire_addr,
    },
    maps::MAX_VIPS,
};

use crate::{
    dataplane::{DataPlane, DataPlaneError},
    maglev,
    ring_pool::{Region, RingPool},
};

/// Where packets for a backend leave the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// One backend as reconcile needs it: identity, weight and resolved egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    pub addr: IpAddr,
    /// 0 means draining: no new flows, existing ones stay.
    pub weight: u32,
    /// `None` when the next hop could not be resolved: the backend is kept out of the table and
    /// its slot is marked down.
    pub egress: Option<Egress>,
}

/// One VIP as reconcile needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipPlan {
    pub key: VipKey,
    /// `VIP_F_*` bits.
    pub flags: u32,
    pub ring_size: u32,
    pub backends: Vec<BackendPlan>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("too many VIPs: the data plane holds at most {max}")]
    TooManyVips { max: u32 },
    #[error("too many backends: {needed} slots needed, {free} free of {total}")]
    TooManyBackends {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error(
        "ring pool exhausted: a table of {size} entries does not fit in the {free} free entries \
         (pool {pool}); raise --ring-pool"
    )]
    RingPoolExhausted { size: u32, free: u32, pool: u32 },
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
}

#[derive(Clone, Debug)]
struct InstalledBackend {
    slot: u32,
    value: BackendSlot,
}

#[derive(Clone, Debug)]
struct InstalledVip {
    meta: VipMeta,
    region: Option<Region>,
    table: Vec<u32>,
    backends: BTreeMap<IpAddr, InstalledBackend>,
}

/// What reconcile believes is in the maps. Rebuilt from the maps themselves when lbd adopts a
/// running data plane, so nothing needs to be saved for it.
#[derive(Clone, Debug)]
pub struct Reconciler {
    vips: BTreeMap<VipKey, InstalledVip>,
    /// Every slot's last written value (free slots keep their generation).
    slots: Vec<BackendSlot>,
    /// Freed slots and when they were freed.
    slot_quarantine: BTreeMap<u32, Instant>,
    rings: RingPool,
    tx_ports: BTreeSet<u32>,
    quarantine: Duration,
}

/// How long a freed slot or table region stays unused. XDP programs run to completion in
/// microseconds, so a second is far beyond any packet that read the old value.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(1);

impl Reconciler {
    /// Reads back what a data plane holds (empty on a fresh one).
    pub fn adopt(dp: &impl DataPlane, quarantine: Duration) -> Result<Self, ReconcileError> {
        let slots = dp.backends()?;
        let mut rings = RingPool::new(dp.ring_pool_size());
        let mut vips = BTreeMap::new();
        for (key, meta) in dp.vips()? {
            let region = (meta.ring_size > 0).then_some(Region {
                offset: meta.ring_offset,
                len: meta.ring_size,
            });
            let table = match region {
                Some(r) => {
                    rings.claim(r);
                    dp.read_ring(r.offset, r.len)?
                }
                None => Vec::new(),
            };
            let backends = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state != SLOT_FREE && s.vip_id == meta.vip_id)
                .filter_map(|(i, s)| {
                    ip_from_wire(s.addr, s.family).map(|addr| {
                        (
                            addr,
                            InstalledBackend {
                                slot: i as u32,
                                value: *s,
                            },
                        )
                    })
                })
                .collect();
            vips.insert(
                key,
                InstalledVip {
                    meta,
                    region,
                    table,
                    backends,
                },
            );
        }
        Ok(Self {
            vips,
            slots,
            slot_quarantine: BTreeMap::new(),
            rings,
            tx_ports: BTreeSet::new(),
            quarantine,
        })
    }

    /// The slot and generation of each installed backend of a VIP (for status and tests).
    pub fn backend_slots(&self, key: &VipKey) -> Vec<(IpAddr, u32, BackendSlot)> {
        self.vips
            .get(key)
            .map(|v| {
                v.backends
                    .iter()
                    .map(|(a, b)| (*a, b.slot, b.value))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies `plans` (the complete wanted set of VIPs). Capacity is checked before anything
    /// is written, so an error from that check leaves the data plane untouched.
    pub fn apply(
        &mut self,
        dp: &mut impl DataPlane,
        plans: &[VipPlan],
    ) -> Result<(), ReconcileError> {
        let now = Instant::now();
        self.release_quarantined(now);
        self.check_capacity(plans)?;

        let wanted: BTreeSet<VipKey> = plans.iter().map(|p| p.key).collect();
        for plan in plans {
            self.apply_vip(dp, plan, now)?;
        }
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_vip(dp, &key, now)?;
        }
        self.sync_vip_addrs(dp)?;
        Ok(())
    }

    fn release_quarantined(&mut self, now: Instant) {
        let q = self.quarantine;
        self.slot_quarantine
            .retain(|_, freed| now.duration_since(*freed) < q);
        self.rings.release_quarantined(now, q);
    }

    fn free_slots(&self) -> usize {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.state == SLOT_FREE && !self.slot_quarantine.contains_key(&(*i as u32))
            })
            .count()
    }

    fn check_capacity(&self, plans: &[VipPlan]) -> Result<(), ReconcileError> {
        if plans.len() > MAX_VIPS as usize {
            return Err(ReconcileError::TooManyVips { max: MAX_VIPS });
        }
        // New slots: backends not installed yet. Slots freed by this change are not counted as
        // free: they go to quarantine first.
        let needed: usize = plans
            .iter()
            .map(|p| {
                let installed = self.vips.get(&p.key);
                p.backends
                    .iter()
                    .filter(|b| installed.is_none_or(|v| !v.backends.contains_key(&b.addr)))
                    .count()
            })
            .sum();
        let free = self.free_slots();
        if needed > free {
            return Err(ReconcileError::TooManyBackends {
                needed,
                free,
                total: self.slots.len(),
            });
        }
        // Every VIP may need a fresh region while its old one is still in use.
        let mut pool = self.rings.clone();
        for p in plans {
            if pool.alloc(p.ring_size).is_none() {
                return Err(ReconcileError::RingPoolExhausted {
                    size: p.ring_size,
                    free: pool.free_entries(),
                    pool: pool.size(),
                });
            }
        }
        Ok(())
    }

    fn alloc_slot(&mut self) -> u32 {
        let index = self
            .slots
            .iter()
            .enumerate()
            .position(|(i, s)| {
                s.state == SLOT_FREE && !self.slot_quarantine.contains_key(&(i as u32))
            })
            .expect("capacity checked before applying");
        index as u32
    }

    fn alloc_vip_id(&self) -> u32 {
        let used: BTreeSet<u32> = self.vips.values().map(|v| v.meta.vip_id).collect();
        (0..MAX_VIPS)
            .find(|id| !used.contains(id))
            .expect("VIP count checked before applying")
    }

    fn apply_vip(
        &mut self,
        dp: &mut impl DataPlane,
        plan: &VipPlan,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        let mut vip = match self.vips.get(&plan.key) {
            Some(v) => v.clone(),
            None => InstalledVip {
                meta: VipMeta {
                    vip_id: self.alloc_vip_id(),
                    ..VipMeta::default()
                },
                region: None,
                table: Vec::new(),
                backends: BTreeMap::new(),
            },
        };

        self.write_slots(dp, plan, &mut vip)?;
        self.swap_table(dp, plan, &mut vip, now)?;
        self.free_unwanted(dp, plan, &mut vip, now)?;
        self.vips.insert(plan.key, vip);
        Ok(())
    }

    /// Step 1, slots first: every backend the new table may name exists before the table does.
    fn write_slots(
        &mut self,
        dp: &mut impl DataPlane,
        plan: &VipPlan,
        vip: &mut InstalledVip,
    ) -> Result<(), ReconcileError> {
        for b in &plan.backends {
            let want_state = match (b.egress, b.weight) {
                (None, _) => SLOT_DOWN,
                (Some(_), 0) => SLOT_DRAINING,
                (Some(_), _) => SLOT_ACTIVE,
            };
            let (addr, family) = wire_addr(b.addr);
            let egress = b.egress.unwrap_or(Egress {
                ifindex: 0,
                src_mac: [0; 6],
                dst_mac: [0; 6],
            });
            let (slot, generation) = if let Some(installed) = vip.backends.get(&b.addr) {
                (installed.slot, installed.value.generation)
            } else {
                let slot = self.alloc_slot();
                (slot, self.slots[slot as usize].generation.wrapping_add(1))
            };
            let value = BackendSlot {
                addr,
                family,
                state: want_state,
                encap: ENCAP_IPIP,
                generation,
                vip_id: vip.meta.vip_id,
                ifindex: egress.ifindex,
                dst_mac: egress.dst_mac,
                src_mac: egress.src_mac,
                ..BackendSlot::default()
            };
            if self.slots[slot as usize] != value {
                if egress.ifindex != 0 && self.tx_ports.insert(egress.ifindex) {
                    dp.add_tx_port(egress.ifindex)?;
                }
                dp.set_backend(slot, &value)?;
                self.slots[slot as usize] = value;
            }
            vip.backends
                .insert(b.addr, InstalledBackend { slot, value });
        }

        Ok(())
    }

    /// Step 2, the table: built from the backends that take new flows, swapped in one update.
    fn swap_table(
        &mut self,
        dp: &mut impl DataPlane,
        plan: &VipPlan,
        vip: &mut InstalledVip,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        let takers: Vec<(IpAddr, u32, u32)> = plan
            .backends
            .iter()
            .filter(|b| b.egress.is_some() && b.weight > 0)
            .map(|b| (b.addr, b.weight, vip.backends[&b.addr].slot))
            .collect();
        let weighted: Vec<maglev::Weighted> = takers
            .iter()
            .map(|(addr, weight, _)| maglev::Weighted {
                addr: *addr,
                weight: *weight,
            })
            .collect();
        let table: Vec<u32> = maglev::build_table(&weighted, plan.ring_size)
            .into_iter()
            .map(|i| {
                if i == RING_EMPTY {
                    RING_EMPTY
                } else {
                    takers[i as usize].2
                }
            })
            .collect();
        let meta_changed = vip.meta.flags != plan.flags || vip.meta.ring_size != plan.ring_size;
        if table != vip.table || meta_changed || !self.vips.contains_key(&plan.key) {
            let region = self
                .rings
                .alloc(plan.ring_size)
                .expect("ring space checked before applying");
            dp.write_ring(region.offset, &table)?;
            let meta = VipMeta {
                vip_id: vip.meta.vip_id,
                flags: plan.flags,
                ring_offset: region.offset,
                ring_size: region.len,
            };
            dp.set_vip(&plan.key, &meta)?;
            if let Some(old) = vip.region.replace(region) {
                self.rings.free(old, now);
            }
            vip.meta = meta;
            vip.table = table;
        }

        Ok(())
    }

    /// Step 3, backends no longer wanted: nothing in the new table names them any more.
    fn free_unwanted(
        &mut self,
        dp: &mut impl DataPlane,
        plan: &VipPlan,
        vip: &mut InstalledVip,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        let wanted: BTreeSet<IpAddr> = plan.backends.iter().map(|b| b.addr).collect();
        let gone: Vec<IpAddr> = vip
            .backends
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in gone {
            let b = vip.backends.remove(&addr).expect("listed above");
            self.free_slot(dp, b.slot, now)?;
        }
        Ok(())
    }

    fn free_slot(
        &mut self,
        dp: &mut impl DataPlane,
        slot: u32,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        // A new generation makes every flow still pinned to this slot miss and re-hash.
        let old = self.slots[slot as usize];
        let freed = BackendSlot {
            generation: old.generation.wrapping_add(1),
            ..BackendSlot::default()
        };
        dp.set_backend(slot, &freed)?;
        self.slots[slot as usize] = freed;
        self.slot_quarantine.insert(slot, now);
        Ok(())
    }

    fn remove_vip(
        &mut self,
        dp: &mut impl DataPlane,
        key: &VipKey,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        let Some(vip) = self.vips.get(key).cloned() else {
            return Ok(());
        };
        dp.del_vip(key)?;
        for b in vip.backends.values() {
            self.free_slot(dp, b.slot, now)?;
        }
        if let Some(region) = vip.region {
            self.rings.free(region, now);
        }
        self.vips.remove(key);
        Ok(())
    }

    /// `LB_VIP_ADDRS` holds every address that carries at least one VIP.
    fn sync_vip_addrs(&self, dp: &mut impl DataPlane) -> Result<(), ReconcileError> {
        let mut counts: BTreeMap<VipKey, u32> = BTreeMap::new();
        for key in self.vips.keys() {
            *counts.entry(key.address_only()).or_default() += 1;
        }
        for stale in dp.vip_addrs()? {
            if !counts.contains_key(&stale) {
                dp.del_vip_addr(&stale)?;
            }
        }
        for (key, n) in counts {
            dp.set_vip_addr(&key, n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
