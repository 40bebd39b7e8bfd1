//! Health checks through the tunnel (tc egress on the gateway): a probe whose socket carries
//! `SO_MARK = hc_mark(slot)` leaves encapsulated exactly as `lb_xdp` sends client packets to
//! that backend slot (IPIP, outer source from `LB_CONFIG`'s prefix with the flow's entropy, MACs
//! and egress interface from the slot), so a backend that cannot decapsulate fails its check.
//! The backend answers the gateway's own address directly, through the gateway's normal stack.
//! Unmarked packets go on untouched; a marked packet that cannot take the tunnel is dropped, so
//! the check fails instead of reaching the backend some other way.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_redirect,
    programs::TcContext,
};
use lb_common::{
    BackendSlot, FlowKey,
    hash::encap_entropy,
    keys::{ENCAP_IPIP, FAMILY_V4, PROTO_TCP, PROTO_UDP, SLOT_FREE, SLOT_RETIRED},
    maps::hc_slot,
};
use network_types::eth::EthHdr;

use crate::{
    encap::{Inner, outer_header},
    lookup,
    maps::LB_BACKENDS,
    parse::{ETH_HLEN, ETH_P_IP, IPV4_HLEN},
};

/// The program's verdict for one packet leaving an interface.
#[inline(always)]
pub fn encap_probe(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is the program's own `__sk_buff`; mark is readable in tc.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some(index) = hc_slot(mark) else {
        return TC_ACT_OK;
    };
    encap(ctx, index).unwrap_or(TC_ACT_SHOT)
}

/// True when the slot holds a backend the balancer could send to: in use (a backend marked
/// down by its checks included, so its checks can see it recover) with a resolved egress.
#[inline(always)]
fn reachable(slot: &BackendSlot) -> bool {
    slot.state != SLOT_FREE
        && slot.state != SLOT_RETIRED
        && slot.ifindex != 0
        && slot.family == FAMILY_V4
        && slot.encap == ENCAP_IPIP
}

/// Encapsulates toward slot `index` and returns the action; `None` drops the packet.
#[inline(always)]
fn encap(ctx: &TcContext, index: u32) -> Option<i32> {
    let slot = LB_BACKENDS.get(index)?;
    if !reachable(slot) {
        return None;
    }
    let cfg = lookup::config()?;

    // Loads rather than direct access: a probe's payload may sit in paged fragments, and these
    // few bytes per check cost nothing that matters.
    let eth: EthHdr = ctx.load(0).ok()?;
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return None;
    }
    let ip: [u8; IPV4_HLEN] = ctx.load(ETH_HLEN).ok()?;
    // No IPv4 options, as the balancer: the ports then sit right after the header.
    if ip[0] != 0x45 {
        return None;
    }
    let proto = ip[9];
    let ports: [u8; 4] = if proto == PROTO_TCP || proto == PROTO_UDP {
        ctx.load(ETH_HLEN + IPV4_HLEN).ok()?
    } else {
        [0; 4]
    };
    // Addresses stay in wire order, as in the balancer's flow keys.
    let addr = |at: usize| u32::from_ne_bytes([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
    let flow = FlowKey {
        src: [addr(12), 0, 0, 0],
        dst: [addr(16), 0, 0, 0],
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        family: FAMILY_V4,
        pad: [0; 2],
    };
    let entropy = if cfg.encap_src_v4_mask == 0 {
        0
    } else {
        encap_entropy(&flow) & cfg.encap_src_v4_mask
    };
    let inner = Inner {
        tos: ip[1],
        tot_len: u16::from_be_bytes([ip[2], ip[3]]),
    };
    let outer = outer_header(slot, &inner, cfg.encap_src_v4 | entropy)?;

    // Room for the outer header between the Ethernet and the inner IPv4 header; the ENCAP
    // flag records the inner headers so checksum and segmentation offloads still find them.
    ctx.adjust_room(
        IPV4_HLEN as i32,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4),
    )
    .ok()?;
    ctx.store(ETH_HLEN, &outer, 0).ok()?;
    let eth = EthHdr {
        dst_addr: slot.dst_mac,
        src_addr: slot.src_mac,
        ether_type: ETH_P_IP.to_be(),
    };
    ctx.store(0, &eth, 0).ok()?;
    // Cleared so the egress program of the interface it is redirected to (which may run this
    // program too) lets it through instead of encapsulating it twice.
    ctx.set_mark(0);

    // SAFETY: as above; ifindex is readable in tc.
    let here = unsafe { (*ctx.skb.skb).ifindex };
    if slot.ifindex == here {
        return Some(TC_ACT_OK);
    }
    // SAFETY: plain helper call; flags 0 sends it out of (not into) the interface.
    Some(unsafe { bpf_redirect(slot.ifindex, 0) } as i32)
}
