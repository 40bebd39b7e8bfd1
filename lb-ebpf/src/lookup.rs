//! Lookups that choose a packet's backend: VIP and VIP address, the flow table (pinned
//! backends), and the VIP's Maglev table in the ring pool.

use core::ptr;

use aya_ebpf::bindings::BPF_NOEXIST;

use lb_common::{
    BackendSlot, DropReason, FlowKey, FlowValue, GlobalConfig, VipKey, VipMeta,
    keys::{FLOW_F_CLOSED, RING_EMPTY, WireAddr},
};

use crate::{
    knockout,
    maps::{LB_BACKENDS, LB_CONFIG, LB_FLOWS, LB_RINGS, LB_VIP_ADDRS, LB_VIPS},
};

/// A backend slot and its index in `LB_BACKENDS`.
#[derive(Clone, Copy)]
pub struct Backend {
    pub index: u32,
    pub slot: &'static BackendSlot,
}

/// True when `addr` is the address of some VIP (any port or protocol).
#[inline(always)]
pub fn is_vip_address(addr: WireAddr, family: u8) -> bool {
    let key = VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    };
    LB_VIP_ADDRS.get_ptr(key).is_some()
}

/// The VIP a flow is addressed to.
#[inline(always)]
pub fn vip(flow: &FlowKey) -> Option<VipMeta> {
    let key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: LB_VIPS is not preallocated, so an element lbd replaces is freed only after an RCU
    // grace period: this copy sees the old value or the new one, never a mix.
    LB_VIPS.get_ptr(key).map(|meta| unsafe { *meta })
}

#[inline(always)]
pub fn config() -> Option<&'static GlobalConfig> {
    LB_CONFIG.get(0)
}

/// The backend `flow` is pinned to, if that pin still holds: the slot still has the generation
/// the flow recorded and keeps flows (active or draining). Refreshes `last_seen` only when the
/// tick moved, so an established flow costs one write per tick rather than one per packet.
/// `syn` and `fin_rst` are the packet's TCP flags: a FIN or RST marks the entry closed, a SYN on
/// a closed entry (the client reused the port for a new connection) opens it again.
#[inline(always)]
pub fn pinned_backend(flow: &FlowKey, tick: u32, syn: bool, fin_rst: bool) -> Option<Backend> {
    if knockout::FLOW_LOOKUP {
        return LB_BACKENDS.get(0).map(|slot| Backend { index: 0, slot });
    }
    let value = LB_FLOWS.get_ptr_mut(flow)?;
    // SAFETY: a pointer from a successful lookup stays valid for this program run (RCU).
    let (index, generation, last_seen, flags) = unsafe {
        (
            (*value).slot,
            (*value).generation,
            (*value).last_seen,
            (*value).flags,
        )
    };
    let slot = LB_BACKENDS.get(index)?;
    if slot.generation != generation || !slot.keeps_flows() {
        return None;
    }
    let closed = flags & FLOW_F_CLOSED != 0;
    if (fin_rst && !closed) || (syn && closed) {
        // SAFETY: as above. last_seen goes first so that a reader which sees the new flag also
        // sees the tick it was set in (the flag alone would make the flow look long gone).
        unsafe {
            ptr::write_volatile(&raw mut (*value).last_seen, tick);
            ptr::write_volatile(&raw mut (*value).flags, flags ^ FLOW_F_CLOSED);
        }
    } else if last_seen != tick {
        // SAFETY: as above; a racing writer on another CPU stores a tick just as good.
        unsafe { (*value).last_seen = tick };
    }
    Some(Backend { index, slot })
}

/// The backend `flow` is pinned to, if that pin still holds, without touching the entry: for
/// an ICMP error about the flow, which says nothing about whether the flow is alive.
#[inline(always)]
pub fn existing_backend(flow: &FlowKey) -> Option<Backend> {
    // SAFETY: a pointer from a successful lookup stays valid for this program run (RCU).
    let value = unsafe { *LB_FLOWS.get_ptr(flow)? };
    let slot = LB_BACKENDS.get(value.slot)?;
    if slot.generation != value.generation || !slot.keeps_flows() {
        return None;
    }
    Some(Backend {
        index: value.slot,
        slot,
    })
}

/// The backend the VIP's Maglev table gives for `hash`.
#[inline(always)]
pub fn ring_backend(vip: &VipMeta, hash: u32) -> Result<Backend, DropReason> {
    if vip.ring_size == 0 {
        return Err(DropReason::NoBackend);
    }
    // LB_RINGS may have been resized by lbd: the map lookup is the bounds check.
    let entry = vip.ring_offset.wrapping_add(hash % vip.ring_size);
    let index = *LB_RINGS.get(entry).ok_or(DropReason::NoBackend)?;
    if index == RING_EMPTY {
        return Err(DropReason::NoBackend);
    }
    let slot = LB_BACKENDS.get(index).ok_or(DropReason::NoBackend)?;
    // The table decides who takes new flows; the state only guards against a slot that cannot
    // forward (see `forwards_from_table`).
    if !slot.forwards_from_table() {
        return Err(DropReason::NoBackend);
    }
    Ok(Backend { index, slot })
}

/// Pins `flow` to `backend`; false when the flow table refused the entry (the packet still goes
/// to `backend`, and the next one re-hashes to the same place).
#[inline(always)]
pub fn pin_flow(flow: &FlowKey, backend: Backend, tick: u32) -> bool {
    insert(flow, backend, tick, 0)
}

/// Pins `flow` to `backend` unless the table has an entry for it: false when it has (or when
/// the table refused the entry).
#[inline(always)]
pub fn pin_new_flow(flow: &FlowKey, backend: Backend, tick: u32) -> bool {
    insert(flow, backend, tick, u64::from(BPF_NOEXIST))
}

#[inline(always)]
fn insert(flow: &FlowKey, backend: Backend, tick: u32, flags: u64) -> bool {
    if knockout::FLOW_INSERT {
        return true;
    }
    let value = FlowValue {
        slot: backend.index,
        generation: backend.slot.generation,
        last_seen: tick,
        flags: 0,
    };
    LB_FLOWS.insert(flow, value, flags).is_ok()
}
