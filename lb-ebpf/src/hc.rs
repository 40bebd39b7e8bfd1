//! Health checks through the tunnel (tc egress on the gateway): a probe whose socket carries
//! `SO_MARK = hc_mark(slot)` leaves encapsulated exactly as `lb_xdp` sends client packets to
//! that backend slot (same outer headers for the slot's family and encapsulation, outer source
//! and entropy from `LB_CONFIG`, MACs and egress interface from the slot), so a backend that
//! cannot decapsulate fails its check. The backend answers the gateway's own address directly,
//! through the gateway's normal stack. Unmarked packets go on untouched; a marked packet that
//! cannot take the tunnel is dropped, so the check fails instead of reaching the backend some
//! other way.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_redirect,
    programs::TcContext,
};
use lb_common::{
    BackendSlot, FlowKey,
    hash::encap_entropy,
    keys::{
        ENCAP_GUE, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, SLOT_FREE, SLOT_RETIRED, WireAddr,
    },
    maps::hc_slot,
};

use crate::{
    encap::{ethernet, gue_udp, ipv4_outer, ipv6_outer},
    lookup,
    maps::LB_BACKENDS,
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, IpInfo, UDP_HLEN},
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
        && crate::encap::overhead(slot).is_some()
}

/// The probe's flow key and what its outer header copies, read with loads rather than direct
/// access: a probe's payload may sit in paged fragments, and these few bytes per check cost
/// nothing that matters. IPv4 without options and IPv6 without extension headers only, as the
/// balancer: the ports then sit right after the header.
#[inline(always)]
fn probe(ctx: &TcContext) -> Option<(FlowKey, IpInfo)> {
    let ether_type: [u8; 2] = ctx.load(ETH_HLEN - 2).ok()?;
    // Addresses stay in wire order, as in the balancer's flow keys.
    let word = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let (src, dst, proto, info, l4): (WireAddr, WireAddr, u8, IpInfo, usize) =
        match u16::from_be_bytes(ether_type) {
            ETH_P_IP => {
                let ip: [u8; IPV4_HLEN] = ctx.load(ETH_HLEN).ok()?;
                if ip[0] != 0x45 {
                    return None;
                }
                let info = IpInfo {
                    tos: ip[1],
                    len: u16::from_be_bytes([ip[2], ip[3]]),
                    family: FAMILY_V4,
                };
                let src = [word(&ip, 12), 0, 0, 0];
                let dst = [word(&ip, 16), 0, 0, 0];
                (src, dst, ip[9], info, ETH_HLEN + IPV4_HLEN)
            }
            ETH_P_IPV6 => {
                let ip: [u8; IPV6_HLEN] = ctx.load(ETH_HLEN).ok()?;
                if ip[0] >> 4 != 6 {
                    return None;
                }
                let info = IpInfo {
                    tos: (ip[0] << 4) | (ip[1] >> 4),
                    len: u16::from_be_bytes([ip[4], ip[5]]).checked_add(IPV6_HLEN as u16)?,
                    family: FAMILY_V6,
                };
                let src = [word(&ip, 8), word(&ip, 12), word(&ip, 16), word(&ip, 20)];
                let dst = [word(&ip, 24), word(&ip, 28), word(&ip, 32), word(&ip, 36)];
                (src, dst, ip[6], info, ETH_HLEN + IPV6_HLEN)
            }
            _ => return None,
        };
    let ports: [u8; 4] = if proto == PROTO_TCP || proto == PROTO_UDP {
        ctx.load(l4).ok()?
    } else {
        [0; 4]
    };
    let flow = FlowKey {
        src,
        dst,
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        family: info.family,
        pad: [0; 2],
    };
    Some((flow, info))
}

/// Encapsulates toward slot `index` and returns the action; `None` drops the packet.
#[inline(always)]
fn encap(ctx: &TcContext, index: u32) -> Option<i32> {
    let slot = LB_BACKENDS.get(index)?;
    if !reachable(slot) {
        return None;
    }
    let cfg = lookup::config()?;
    let (flow, inner) = probe(ctx)?;
    let entropy = encap_entropy(&flow);
    let gue = slot.encap == ENCAP_GUE;
    let udp_len = if gue { UDP_HLEN as u16 } else { 0 };
    // The ENCAP flags record the inner headers so checksum and segmentation offloads still
    // find them.
    let l4_flag = if gue {
        u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_UDP)
    } else {
        0
    };
    let ether_type = if slot.family == FAMILY_V4 {
        let outer = ipv4_outer(slot, &inner, cfg, entropy, udp_len)?;
        grow(
            ctx,
            IPV4_HLEN,
            udp_len,
            u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) | l4_flag,
        )?;
        ctx.store(ETH_HLEN, &outer, 0).ok()?;
        ETH_P_IP
    } else {
        let outer = ipv6_outer(slot, &inner, cfg, entropy, udp_len)?;
        grow(
            ctx,
            IPV6_HLEN,
            udp_len,
            u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV6) | l4_flag,
        )?;
        ctx.store(ETH_HLEN, &outer, 0).ok()?;
        ETH_P_IPV6
    };
    if gue {
        let udp = gue_udp(slot, &inner, entropy)?;
        let at = ETH_HLEN
            + if slot.family == FAMILY_V4 {
                IPV4_HLEN
            } else {
                IPV6_HLEN
            };
        ctx.store(at, &udp, 0).ok()?;
    }
    ctx.store(0, &ethernet(slot, ether_type), 0).ok()?;
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

/// Makes room for the outer headers between the Ethernet header and the probe's IP header
/// (the kernel sets the skb's protocol to the outer family from the `ENCAP_L3` flag).
#[inline(always)]
fn grow(ctx: &TcContext, ip_len: usize, udp_len: u16, flags: u64) -> Option<()> {
    ctx.adjust_room(
        (ip_len + usize::from(udp_len)) as i32,
        BPF_ADJ_ROOM_MAC,
        flags,
    )
    .ok()
}
