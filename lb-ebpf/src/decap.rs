//! Backend-side decapsulation: strips the outer header the balancer added (IPv4 or IPv6 outer,
//! IP in IP or GUE) from packets for one of this host's VIPs, so the stack sees the client's
//! packet (keeping the outer frame's MACs). Everything else is left untouched.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, macros::map, maps::HashMap, programs::XdpContext};
use lb_common::{
    VipKey,
    keys::{FAMILY_V4, FAMILY_V6, PROTO_UDP, WireAddr},
    maps::MAX_DECAP_VIPS,
};

use crate::parse::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN, UDP_HLEN,
    addr, addr6, words_at, write_words,
};

/// VIP addresses this host decapsulates for (address-only keys: port and protocol zero). The
/// value is the GUE port accepted for the VIP (`u32::from(port.to_be())`), 0 for IPIP only.
#[map(name = "LB_DECAP_VIPS")]
pub static LB_DECAP_VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);

/// What `strip` did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decap {
    Stripped,
    Untouched,
}

/// The outer header's length and what it carries: the inner family when it is IP in IP, or
/// `PROTO_UDP` for a possible GUE packet (which the UDP port decides).
struct Outer {
    len: usize,
    carries: u8,
}

/// Removes the outer header of `[Ethernet][outer IPv4 or IPv6][UDP, for GUE][IP to a decap VIP]`.
#[inline(always)]
pub fn strip(ctx: &XdpContext) -> Decap {
    let Some(eth) = words_at::<{ ETH_HLEN / 2 }>(ctx, 0) else {
        return Decap::Untouched;
    };
    // The Ethernet header is copied: after the head moves it is out of reach.
    let eth = *eth;
    let outer = match u16::from_be(eth[6]) {
        ETH_P_IP => outer_v4(ctx),
        ETH_P_IPV6 => outer_v6(ctx),
        _ => None,
    };
    let Some(outer) = outer else {
        return Decap::Untouched;
    };
    let (len, inner_family) = if outer.carries == PROTO_UDP {
        match gue(ctx, outer.len) {
            Some(family) => (outer.len + UDP_HLEN, family),
            None => return Decap::Untouched,
        }
    } else {
        (outer.len, outer.carries)
    };
    let accepted = match inner_destination(ctx, ETH_HLEN + len, inner_family) {
        Some(key) => LB_DECAP_VIPS.get_ptr(key),
        None => return Decap::Untouched,
    };
    let Some(accepted) = accepted else {
        return Decap::Untouched;
    };
    if outer.carries == PROTO_UDP {
        // SAFETY: a pointer from a successful lookup stays valid for this program run.
        let port = unsafe { *accepted };
        let dport = udp_dport(ctx, outer.len);
        if port == 0 || dport.map(u32::from) != Some(port) {
            return Decap::Untouched;
        }
    }
    // SAFETY: the helper only moves ctx->data; it takes the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, len as i32) } != 0 {
        return Decap::Untouched;
    }
    let ether_type = if inner_family == FAMILY_V4 {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    let eth = [
        eth[0],
        eth[1],
        eth[2],
        eth[3],
        eth[4],
        eth[5],
        ether_type.to_be(),
    ];
    // adjust_head invalidates every packet pointer: `write_words` checks bounds again.
    let _ = write_words(ctx, 0, eth);
    Decap::Stripped
}

/// An outer IPv4 header (no options, not a fragment) carrying IPv4, IPv6 or UDP.
#[inline(always)]
fn outer_v4(ctx: &XdpContext) -> Option<Outer> {
    let ip = words_at::<{ IPV4_HLEN / 2 }>(ctx, ETH_HLEN)?;
    let [vihl, _tos] = ip[0].to_ne_bytes();
    let [_ttl, proto] = ip[4].to_ne_bytes();
    // A fragment of the outer packet carries only part of the inner one: leave it to the
    // stack to reassemble rather than strip a header off a piece.
    if vihl != 0x45 || u16::from_be(ip[3]) & 0x3fff != 0 {
        return None;
    }
    carried(IPV4_HLEN, proto)
}

/// An outer IPv6 header whose next header is IPv4, IPv6 or UDP (no extension headers).
#[inline(always)]
fn outer_v6(ctx: &XdpContext) -> Option<Outer> {
    let ip = words_at::<{ IPV6_HLEN / 2 }>(ctx, ETH_HLEN)?;
    let [vtc, _] = ip[0].to_ne_bytes();
    let [next, _hop] = ip[3].to_ne_bytes();
    if vtc >> 4 != 6 {
        return None;
    }
    carried(IPV6_HLEN, next)
}

#[inline(always)]
fn carried(len: usize, proto: u8) -> Option<Outer> {
    let carries = match proto {
        IPPROTO_IPIP => FAMILY_V4,
        IPPROTO_IPV6 => FAMILY_V6,
        PROTO_UDP => PROTO_UDP,
        _ => return None,
    };
    Some(Outer { len, carries })
}

/// The family of the IP packet in a UDP payload after `outer_len` bytes of outer IP header
/// (GUE variant 1: the version nibble says which).
#[inline(always)]
fn gue(ctx: &XdpContext, outer_len: usize) -> Option<u8> {
    let first = words_at::<1>(ctx, ETH_HLEN + outer_len + UDP_HLEN)?;
    let [version, _] = first[0].to_ne_bytes();
    match version >> 4 {
        4 => Some(FAMILY_V4),
        6 => Some(FAMILY_V6),
        _ => None,
    }
}

/// The UDP destination port (network order, as the map value holds it).
#[inline(always)]
fn udp_dport(ctx: &XdpContext, outer_len: usize) -> Option<u16> {
    // Constant offsets per outer family keep the access provably in bounds.
    let udp = if outer_len == IPV4_HLEN {
        words_at::<{ UDP_HLEN / 2 }>(ctx, ETH_HLEN + IPV4_HLEN)?
    } else {
        words_at::<{ UDP_HLEN / 2 }>(ctx, ETH_HLEN + IPV6_HLEN)?
    };
    Some(udp[1])
}

/// The `LB_DECAP_VIPS` key for the inner packet at `at`: its destination, address only.
#[inline(always)]
fn inner_destination(ctx: &XdpContext, at: usize, family: u8) -> Option<VipKey> {
    let addr: WireAddr = if family == FAMILY_V4 {
        let ip = words_at::<{ IPV4_HLEN / 2 }>(ctx, at)?;
        if ip[0].to_ne_bytes()[0] >> 4 != 4 {
            return None;
        }
        [addr(ip[8], ip[9]), 0, 0, 0]
    } else {
        let ip = words_at::<{ IPV6_HLEN / 2 }>(ctx, at)?;
        if ip[0].to_ne_bytes()[0] >> 4 != 6 {
            return None;
        }
        addr6(ip, 12)
    };
    Some(VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    })
}
