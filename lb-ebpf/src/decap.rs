//! Backend-side IPIP decapsulation: strips the outer IPv4 header of packets the balancer sent to
//! one of this host's VIPs, so the stack sees the client's packet (keeping the outer frame's
//! MACs). Everything else is left untouched.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, macros::map, maps::HashMap, programs::XdpContext};
use lb_common::{VipKey, keys::FAMILY_V4, maps::MAX_DECAP_VIPS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::{ETH_HLEN, ETH_P_IP, IPPROTO_IPIP, IPV4_HLEN, ptr_at};

/// VIP addresses this host decapsulates for (address-only keys: port and protocol zero).
#[map(name = "LB_DECAP_VIPS")]
pub static LB_DECAP_VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);

/// What `strip_ipip` did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decap {
    Stripped,
    Untouched,
}

/// Removes the outer header of `[Ethernet][IPv4 proto 4, IHL 5][IPv4 to a decap VIP]`.
#[inline(always)]
pub fn strip_ipip(ctx: &XdpContext) -> Decap {
    let (Some(eth), Some(outer), Some(inner)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN),
        ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN + IPV4_HLEN),
    ) else {
        return Decap::Untouched;
    };
    // SAFETY: all three bounds-checked above; the header types are plain bytes.
    let (eth, outer, inner) = unsafe { (eth.read_unaligned(), &*outer, &*inner) };
    if u16::from_be(eth.ether_type) != ETH_P_IP
        || outer.vihl != 0x45
        || outer.proto != IPPROTO_IPIP
        // A fragment of the outer packet carries only part of the inner one: leave it to the
        // stack to reassemble rather than strip a header off a piece.
        || u16::from_be_bytes(outer.frags) & 0x3fff != 0
        || inner.vihl >> 4 != 4
    {
        return Decap::Untouched;
    }
    let key = VipKey {
        addr: [u32::from_ne_bytes(inner.dst_addr), 0, 0, 0],
        port: 0,
        proto: 0,
        family: FAMILY_V4,
    };
    if LB_DECAP_VIPS.get_ptr(key).is_none() {
        return Decap::Untouched;
    }
    // The Ethernet header was copied out above: after the head moves it is out of reach.
    // SAFETY: the helper only moves ctx->data; it takes the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_HLEN as i32) } != 0 {
        return Decap::Untouched;
    }
    // adjust_head invalidates every packet pointer: check bounds again from the new start.
    if let Some(new_eth) = ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: bounds-checked just above.
        unsafe { new_eth.write_unaligned(eth) };
    }
    Decap::Stripped
}
