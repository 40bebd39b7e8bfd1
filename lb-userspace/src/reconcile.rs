//! Brings the data plane from what is installed to what is wanted with the smallest change, in
//! an order that never breaks a flow: backend slots are written before any table names them, a
//! VIP's table is swapped in one map update, and a slot is let go only once no installed table
//! names it. Even then it is first only retired (a new generation, so pinned flows re-hash, but
//! still forwarding for a packet that read the old table a moment ago); it is written free and
//! reused, like an old table region, only after a quarantine.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    BackendSlot, VipKey, VipMeta,
    keys::{
        ENCAP_GUE, ENCAP_IPIP, RING_EMPTY, SLOT_ACTIVE, SLOT_DOWN, SLOT_DRAINING, SLOT_FREE,
        SLOT_RETIRED, ip_from_wire, wire_addr,
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
    /// False when it fails its health checks: out of the table, slot down (its flows re-hash).
    pub healthy: bool,
}

/// How a VIP's slots tunnel packets to the backends (`BackendSlot::encap`, `encap_port`). The
/// outer family is each slot's own (its backend's address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tunnel {
    #[default]
    Ipip,
    /// GUE to this UDP port (host order).
    Gue { port: u16 },
}

impl Tunnel {
    /// `BackendSlot::{encap, encap_port}`: the port in network order, zero for IPIP.
    pub fn slot_fields(self) -> (u8, u16) {
        match self {
            Tunnel::Ipip => (ENCAP_IPIP, 0),
            Tunnel::Gue { port } => (ENCAP_GUE, port.to_be()),
        }
    }
}

/// One VIP as reconcile needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipPlan {
    pub key: VipKey,
    /// `VIP_F_*` bits.
    pub flags: u32,
    pub ring_size: u32,
    /// Changing it rewrites the VIP's slots in place (same generation: flows stay).
    pub tunnel: Tunnel,
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
    /// What `table` was built from; `None` when it was read back from the maps.
    inputs: Option<TableInputs>,
    backends: BTreeMap<IpAddr, InstalledBackend>,
}

/// Everything a Maglev table depends on: its size and the (address, weight, slot) of each
/// backend that takes new flows. Equal inputs give an equal table, so it is built only when
/// they change (a change to one VIP does not rebuild the others).
#[derive(Clone, Debug, PartialEq, Eq)]
struct TableInputs {
    ring_size: u32,
    takers: Vec<(IpAddr, u32, u32)>,
}

/// Everything apply writes for one VIP, decided before the first write.
struct PreparedVip<'p> {
    plan: &'p VipPlan,
    vip_id: u32,
    /// (address, slot, value) of every wanted backend.
    slots: Vec<(IpAddr, u32, BackendSlot)>,
    table: Vec<u32>,
    inputs: TableInputs,
    /// Needs a new table region: a new VIP, or a changed table, hash or size.
    swap: bool,
}

/// What is installed but no longer wanted.
fn keys_not_in<K: Ord + Copy, V>(installed: &BTreeMap<K, V>, wanted: &BTreeSet<K>) -> Vec<K> {
    installed
        .keys()
        .filter(|k| !wanted.contains(k))
        .copied()
        .collect()
}

/// The slot value a backend plan asks for.
fn slot_value(b: &BackendPlan, tunnel: Tunnel, vip_id: u32, generation: u32) -> BackendSlot {
    let state = match (b.egress, b.healthy, b.weight) {
        (None, _, _) | (_, false, _) => SLOT_DOWN,
        (Some(_), true, 0) => SLOT_DRAINING,
        (Some(_), true, _) => SLOT_ACTIVE,
    };
    let (addr, family) = wire_addr(b.addr);
    let egress = b.egress.unwrap_or(Egress {
        ifindex: 0,
        src_mac: [0; 6],
        dst_mac: [0; 6],
    });
    let (encap, encap_port) = tunnel.slot_fields();
    BackendSlot {
        addr,
        family,
        state,
        encap,
        encap_port,
        generation,
        vip_id,
        ifindex: egress.ifindex,
        dst_mac: egress.dst_mac,
        src_mac: egress.src_mac,
        ..BackendSlot::default()
    }
}

/// The Maglev table of slot indices, over the backends that take new flows.
fn table_inputs(plan: &VipPlan, slots: &[(IpAddr, u32, BackendSlot)]) -> TableInputs {
    let takers = plan
        .backends
        .iter()
        .zip(slots)
        .filter(|(_, (_, _, value))| value.state == SLOT_ACTIVE)
        .map(|(b, (_, slot, _))| (b.addr, b.weight, *slot))
        .collect();
    TableInputs {
        ring_size: plan.ring_size,
        takers,
    }
}

fn build_table(inputs: &TableInputs) -> Vec<u32> {
    let weighted: Vec<maglev::Weighted> = inputs
        .takers
        .iter()
        .map(|&(addr, weight, _)| maglev::Weighted { addr, weight })
        .collect();
    maglev::build_table(&weighted, inputs.ring_size)
        .into_iter()
        .map(|i| {
            if i == RING_EMPTY {
                RING_EMPTY
            } else {
                inputs.takers[i as usize].2
            }
        })
        .collect()
}

/// The slots a VIP owns, by address: in use and carrying its id. When two slots carry the same
/// address (a change interrupted half-way), the one its table names wins, else the first; the
/// other is left to be freed as an orphan.
fn owned_slots(
    slots: &[BackendSlot],
    vip_id: u32,
    table: &[u32],
) -> BTreeMap<IpAddr, InstalledBackend> {
    let mut owned: BTreeMap<IpAddr, InstalledBackend> = BTreeMap::new();
    for (i, s) in slots.iter().enumerate() {
        if s.state == SLOT_FREE || s.state == SLOT_RETIRED || s.vip_id != vip_id {
            continue;
        }
        let Some(addr) = ip_from_wire(s.addr, s.family) else {
            continue;
        };
        let slot = i as u32;
        let named = |slot: u32| table.contains(&slot);
        if owned
            .get(&addr)
            .is_none_or(|kept| !named(kept.slot) && named(slot))
        {
            owned.insert(addr, InstalledBackend { slot, value: *s });
        }
    }
    owned
}

/// What reconcile believes is in the maps. Rebuilt from the maps themselves when lbd adopts a
/// running data plane, so nothing needs to be saved for it.
#[derive(Clone, Debug)]
pub struct Reconciler {
    vips: BTreeMap<VipKey, InstalledVip>,
    /// Every slot's last written value (free slots keep their generation).
    slots: Vec<BackendSlot>,
    /// Retired slots (not yet written free) and when they were retired.
    slot_quarantine: BTreeMap<u32, Instant>,
    /// Slots in use that no installed VIP owns (an lbd killed in the middle of a change can
    /// leave them); the next apply frees them.
    orphans: BTreeSet<u32>,
    rings: RingPool,
    tx_ports: BTreeSet<u32>,
    quarantine: Duration,
    /// Tables `check` built and `apply` has not installed yet, by VIP: lbd checks a change and
    /// then applies it, and the second `prepare` reuses the first one's table.
    built: RefCell<BTreeMap<VipKey, (TableInputs, Vec<u32>)>>,
}

/// How long a freed slot or table region stays unused. XDP programs run to completion in
/// microseconds, so a second is far beyond any packet that read the old value.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(1);

impl Reconciler {
    /// Reads back what a data plane holds (empty on a fresh one). Table regions that no VIP
    /// names are left free; slots in use that no VIP owns are recorded as orphans for the next
    /// apply to free (adopting only reads).
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
            let backends = owned_slots(&slots, meta.vip_id, &table);
            vips.insert(
                key,
                InstalledVip {
                    meta,
                    region,
                    table,
                    inputs: None,
                    backends,
                },
            );
        }
        let owned: BTreeSet<u32> = vips
            .values()
            .flat_map(|v| v.backends.values().map(|b| b.slot))
            .collect();
        let orphans: BTreeSet<u32> = (0..slots.len() as u32)
            .filter(|i| {
                let state = slots[*i as usize].state;
                state != SLOT_FREE && state != SLOT_RETIRED && !owned.contains(i)
            })
            .collect();
        // Retired by an earlier lbd: quarantined afresh, since when they were retired is lost.
        let now = Instant::now();
        let slot_quarantine = (0..slots.len() as u32)
            .filter(|i| slots[*i as usize].state == SLOT_RETIRED)
            .map(|i| (i, now))
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "backend slots in use that no VIP owns; the next change frees them"
            );
        }
        Ok(Self {
            vips,
            slots,
            slot_quarantine,
            orphans,
            rings,
            tx_ports: BTreeSet::new(),
            quarantine,
            built: RefCell::default(),
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

    /// The VIP id an installed VIP's counters are kept under.
    pub fn vip_id(&self, key: &VipKey) -> Option<u32> {
        self.vips.get(key).map(|v| v.meta.vip_id)
    }

    /// Next hops of the installed backends, so a restarted agent keeps using them for a backend
    /// whose neighbour entry is briefly unusable instead of marking it down.
    pub fn installed_egress(&self) -> BTreeMap<IpAddr, Egress> {
        self.vips
            .values()
            .flat_map(|v| v.backends.iter())
            .filter(|(_, b)| b.value.keeps_flows() && b.value.ifindex != 0)
            .map(|(addr, b)| {
                (
                    *addr,
                    Egress {
                        ifindex: b.value.ifindex,
                        src_mac: b.value.src_mac,
                        dst_mac: b.value.dst_mac,
                    },
                )
            })
            .collect()
    }

    /// True when retired slots or table regions are waiting out their quarantine: room that a
    /// change refused for lack of it may find a quarantine later.
    pub fn room_in_quarantine(&self) -> bool {
        !self.slot_quarantine.is_empty() || self.rings.quarantined_entries() > 0
    }

    pub fn quarantine(&self) -> Duration {
        self.quarantine
    }

    /// Checks that `plans` fit in what is free, as `apply` would, without writing anything.
    pub fn check(&mut self, plans: &[VipPlan]) -> Result<(), ReconcileError> {
        self.release_quarantined(Instant::now());
        let wanted: BTreeSet<VipKey> = plans.iter().map(|p| p.key).collect();
        let gone = keys_not_in(&self.vips, &wanted);
        self.prepare(plans, &gone, Instant::now()).map(drop)
    }

    /// Applies `plans` (the complete wanted set of VIPs). Everything that can fail for lack of
    /// room is decided before the first write of the change, so such an error leaves the VIPs
    /// and their backends untouched (only retired slots past their quarantine may have been
    /// written free, which no packet can tell).
    pub fn apply(
        &mut self,
        dp: &mut impl DataPlane,
        plans: &[VipPlan],
    ) -> Result<(), ReconcileError> {
        let now = Instant::now();
        self.free_retired(dp, now)?;
        self.release_quarantined(now);
        let wanted: BTreeSet<VipKey> = plans.iter().map(|p| p.key).collect();
        let gone = keys_not_in(&self.vips, &wanted);
        let prepared = self.prepare(plans, &gone, now)?;
        // The prepared VIPs hold their tables now; the memo only bridges a check and this.
        self.built.get_mut().clear();

        // Removed VIPs first: their map entries and ids make room for new ones.
        for key in &gone {
            self.remove_vip(dp, key, now)?;
        }
        self.ensure_tx_ports(dp, plans)?;
        for vip in &prepared {
            self.apply_vip(dp, vip, now)?;
        }
        self.sync_vip_addrs(dp)?;
        self.free_orphans(dp, now)
    }

    /// Frees the orphan slots no installed table names any more (a table that named one was
    /// swapped for one without it by the VIP's apply, which ran first).
    fn free_orphans(
        &mut self,
        dp: &mut impl DataPlane,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        if self.orphans.is_empty() {
            return Ok(());
        }
        let named: BTreeSet<u32> = self
            .vips
            .values()
            .flat_map(|v| v.table.iter().copied())
            .collect();
        let ready: Vec<u32> = self
            .orphans
            .iter()
            .copied()
            .filter(|s| !named.contains(s))
            .collect();
        for slot in ready {
            self.free_slot(dp, slot, now)?;
            self.orphans.remove(&slot);
        }
        Ok(())
    }

    fn release_quarantined(&mut self, now: Instant) {
        let q = self.quarantine;
        self.rings.release_quarantined(now, q);
    }

    /// Decides every slot, VIP id and table, and which VIPs need a new table region, checking
    /// each against what is free. A slot is free when it is FREE and not retired, or was retired
    /// a quarantine before `now` (even if not yet written free). Writes nothing.
    fn prepare<'p>(
        &self,
        plans: &'p [VipPlan],
        gone: &[VipKey],
        now: Instant,
    ) -> Result<Vec<PreparedVip<'p>>, ReconcileError> {
        if plans.len() > MAX_VIPS as usize {
            return Err(ReconcileError::TooManyVips { max: MAX_VIPS });
        }
        let mut used_ids: BTreeSet<u32> = self
            .vips
            .iter()
            .filter(|(k, _)| !gone.contains(k))
            .map(|(_, v)| v.meta.vip_id)
            .collect();
        // Retired slots are free once their quarantine has passed (apply writes them FREE
        // before it gets here; check counts them as apply will).
        let q = self.quarantine;
        let free: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|i| match self.slot_quarantine.get(i) {
                Some(retired) => now.duration_since(*retired) >= q,
                None => self.slots[*i as usize].state == SLOT_FREE,
            })
            .collect();
        let needed = plans
            .iter()
            .map(|p| {
                let installed = self.vips.get(&p.key);
                p.backends
                    .iter()
                    .filter(|b| installed.is_none_or(|v| !v.backends.contains_key(&b.addr)))
                    .count()
            })
            .sum::<usize>();
        if needed > free.len() {
            return Err(ReconcileError::TooManyBackends {
                needed,
                free: free.len(),
                total: self.slots.len(),
            });
        }
        let mut free = free.into_iter();
        let mut pool = self.rings.clone();
        let mut prepared = Vec::with_capacity(plans.len());
        for plan in plans {
            let installed = self.vips.get(&plan.key);
            let vip_id = if let Some(v) = installed {
                v.meta.vip_id
            } else {
                let id = (0..MAX_VIPS)
                    .find(|id| !used_ids.contains(id))
                    .ok_or(ReconcileError::TooManyVips { max: MAX_VIPS })?;
                used_ids.insert(id);
                id
            };
            let slots: Vec<(IpAddr, u32, BackendSlot)> = plan
                .backends
                .iter()
                .map(|b| {
                    let (slot, generation) =
                        installed.and_then(|v| v.backends.get(&b.addr)).map_or_else(
                            || {
                                let slot = free.next().expect("counted above");
                                (slot, self.slots[slot as usize].generation.wrapping_add(1))
                            },
                            |ib| (ib.slot, ib.value.generation),
                        );
                    (b.addr, slot, slot_value(b, plan.tunnel, vip_id, generation))
                })
                .collect();
            let inputs = table_inputs(plan, &slots);
            let table = match installed {
                Some(v) if v.inputs.as_ref() == Some(&inputs) => v.table.clone(),
                _ => self.built_table(plan.key, &inputs),
            };
            let swap = installed.is_none_or(|v| {
                v.region.is_none()
                    || v.meta.flags != plan.flags
                    || v.meta.ring_size != plan.ring_size
                    || v.table != table
            });
            if swap && pool.alloc(plan.ring_size).is_none() {
                return Err(ReconcileError::RingPoolExhausted {
                    size: plan.ring_size,
                    free: pool.free_entries(),
                    pool: pool.size(),
                });
            }
            prepared.push(PreparedVip {
                plan,
                vip_id,
                slots,
                table,
                inputs,
                swap,
            });
        }
        Ok(prepared)
    }

    /// The table for `inputs`, built once for a `check` and the `apply` that follows it.
    fn built_table(&self, key: VipKey, inputs: &TableInputs) -> Vec<u32> {
        let mut built = self.built.borrow_mut();
        if let Some((memo, table)) = built.get(&key)
            && memo == inputs
        {
            return table.clone();
        }
        let table = build_table(inputs);
        built.insert(key, (inputs.clone(), table.clone()));
        table
    }

    /// Every egress interface in the plans is a redirect target. Re-checked on every apply, so
    /// a failed insert or an adopted data plane is repaired.
    fn ensure_tx_ports(
        &mut self,
        dp: &mut impl DataPlane,
        plans: &[VipPlan],
    ) -> Result<(), ReconcileError> {
        let ifindexes: BTreeSet<u32> = plans
            .iter()
            .flat_map(|p| p.backends.iter().filter_map(|b| b.egress))
            .map(|e| e.ifindex)
            .collect();
        for ifindex in ifindexes {
            if !self.tx_ports.contains(&ifindex) {
                dp.add_tx_port(ifindex)?;
                self.tx_ports.insert(ifindex);
            }
        }
        Ok(())
    }

    /// Applies one prepared VIP. What was written is recorded even when a later step fails, so
    /// the next apply starts from the truth.
    fn apply_vip(
        &mut self,
        dp: &mut impl DataPlane,
        p: &PreparedVip<'_>,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        // A new VIP's counters start at zero, not at a deleted VIP's that had its id.
        if !self.vips.contains_key(&p.plan.key) {
            dp.reset_vip_counters(p.vip_id)?;
        }
        let mut vip = self.vips.remove(&p.plan.key).unwrap_or(InstalledVip {
            meta: VipMeta {
                vip_id: p.vip_id,
                ..VipMeta::default()
            },
            region: None,
            table: Vec::new(),
            inputs: None,
            backends: BTreeMap::new(),
        });
        let result = self.apply_vip_steps(dp, p, &mut vip, now);
        self.vips.insert(p.plan.key, vip);
        result
    }

    fn apply_vip_steps(
        &mut self,
        dp: &mut impl DataPlane,
        p: &PreparedVip<'_>,
        vip: &mut InstalledVip,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        // 1. New slots and slots that start taking flows: they exist before a table names them.
        //    Demotions wait until the old table, which may still name them, is gone (step 3).
        let (early, late): (Vec<_>, Vec<_>) =
            p.slots.iter().copied().partition(|(addr, _, value)| {
                value.state == SLOT_ACTIVE || !vip.backends.contains_key(addr)
            });
        for (addr, slot, value) in early {
            // A slot's counters are its backend's: a new occupant starts at zero.
            if !vip.backends.contains_key(&addr) {
                dp.reset_backend_counters(slot)?;
            }
            self.write_slot(dp, slot, &value)?;
            vip.backends.insert(addr, InstalledBackend { slot, value });
        }
        // 2. The table, swapped in one map update.
        if p.swap {
            self.swap_table(dp, p, vip, now)?;
        }
        vip.inputs = Some(p.inputs.clone());
        // 3. Demotions (draining, down), then backends no longer wanted.
        for (addr, slot, value) in late {
            self.write_slot(dp, slot, &value)?;
            vip.backends.insert(addr, InstalledBackend { slot, value });
        }
        let wanted: BTreeSet<IpAddr> = p.plan.backends.iter().map(|b| b.addr).collect();
        let unwanted = keys_not_in(&vip.backends, &wanted);
        for addr in unwanted {
            let slot = vip.backends[&addr].slot;
            self.free_slot(dp, slot, now)?;
            vip.backends.remove(&addr);
        }
        Ok(())
    }

    fn write_slot(
        &mut self,
        dp: &mut impl DataPlane,
        slot: u32,
        value: &BackendSlot,
    ) -> Result<(), ReconcileError> {
        if self.slots[slot as usize] != *value {
            dp.set_backend(slot, value)?;
            self.slots[slot as usize] = *value;
        }
        Ok(())
    }

    /// Writes the prepared table into a fresh region and points the VIP at it.
    fn swap_table(
        &mut self,
        dp: &mut impl DataPlane,
        p: &PreparedVip<'_>,
        vip: &mut InstalledVip,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        let region = self
            .rings
            .alloc(p.plan.ring_size)
            .expect("ring space checked in prepare");
        let meta = VipMeta {
            vip_id: vip.meta.vip_id,
            flags: p.plan.flags,
            ring_offset: region.offset,
            ring_size: region.len,
        };
        let published = dp
            .write_ring(region.offset, &p.table)
            .and_then(|()| dp.set_vip(&p.plan.key, &meta));
        if let Err(e) = published {
            // Never published, so nothing can be reading it: no quarantine needed.
            self.rings.release(region);
            return Err(e.into());
        }
        if let Some(old) = vip.region.replace(region) {
            self.rings.free(old, now);
        }
        vip.meta = meta;
        vip.table.clone_from(&p.table);
        Ok(())
    }

    /// Retires a slot that no installed table names any more: `SLOT_RETIRED` under a new
    /// generation, the rest unchanged. [`Self::free_retired`] writes it free once the quarantine has passed; until
    /// then no new backend gets it.
    fn free_slot(
        &mut self,
        dp: &mut impl DataPlane,
        slot: u32,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        // A new generation (and a state that keeps no flows) makes every flow still pinned to
        // this slot miss and re-hash; the rest stays, so a packet that read an older table
        // still forwards. Written FREE once
        // the quarantine has passed (free_retired).
        let old = self.slots[slot as usize];
        let retired = BackendSlot {
            state: SLOT_RETIRED,
            generation: old.generation.wrapping_add(1),
            ..old
        };
        dp.set_backend(slot, &retired)?;
        self.slots[slot as usize] = retired;
        self.slot_quarantine.insert(slot, now);
        Ok(())
    }

    /// Writes FREE (with a new generation) into the slots retired a quarantine ago. Runs at the
    /// start of `apply`, so a slot is written free by a later apply than the one that retired it
    /// (lbd applies on every resolve tick, so that is soon after the quarantine).
    fn free_retired(
        &mut self,
        dp: &mut impl DataPlane,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        let q = self.quarantine;
        let expired: Vec<u32> = self
            .slot_quarantine
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= q)
            .map(|(s, _)| *s)
            .collect();
        for slot in expired {
            let freed = BackendSlot {
                generation: self.slots[slot as usize].generation.wrapping_add(1),
                ..BackendSlot::default()
            };
            dp.set_backend(slot, &freed)?;
            self.slots[slot as usize] = freed;
            self.slot_quarantine.remove(&slot);
        }
        Ok(())
    }

    fn remove_vip(
        &mut self,
        dp: &mut impl DataPlane,
        key: &VipKey,
        now: Instant,
    ) -> Result<(), ReconcileError> {
        // Each step is recorded as it succeeds, so an apply that fails half-way is finished by
        // the next one without deleting the VIP or retiring a slot twice.
        let Some(vip) = self.vips.get_mut(key) else {
            return Ok(());
        };
        if let Some(region) = vip.region {
            dp.del_vip(key)?;
            vip.region = None;
            self.rings.free(region, now);
        }
        let backends: Vec<(IpAddr, u32)> = vip.backends.iter().map(|(a, b)| (*a, b.slot)).collect();
        for (addr, slot) in backends {
            self.free_slot(dp, slot, now)?;
            if let Some(vip) = self.vips.get_mut(key) {
                vip.backends.remove(&addr);
            }
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
