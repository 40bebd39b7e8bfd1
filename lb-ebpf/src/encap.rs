//! IPIP encapsulation: grows the frame by an outer IPv4 header and writes a new Ethernet header
//! toward the backend's next hop. The inner packet is left byte for byte as received.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BackendSlot, DropReason,
    hash::ipv4_header_csum,
    keys::{ENCAP_IPIP, FAMILY_V4},
};

use crate::parse::{ETH_HLEN, ETH_P_IP, IPPROTO_IPIP, IPV4_HLEN, write_words};

const OUTER_TTL: u8 = 64;
/// Don't-fragment: the outer packet must not be fragmented on the way to the backend.
const IP_DF: u16 = 0x4000;

/// What the outer header copies from the inner packet.
pub struct Inner {
    pub tos: u8,
    /// Host order.
    pub tot_len: u16,
}

/// Encapsulates the packet in IPv4 from `src` to the backend. On success the frame is
/// `[Ethernet slot.src_mac -> slot.dst_mac][outer IPv4][inner IPv4 ...]`.
#[inline(always)]
pub fn ipip_v4(
    ctx: &XdpContext,
    slot: &BackendSlot,
    inner: &Inner,
    src: u32,
) -> Result<(), DropReason> {
    // Only IPv4-in-IPv4 so far; an IPv6 backend needs an IPv6 outer header.
    if slot.family != FAMILY_V4 || slot.encap != ENCAP_IPIP {
        return Err(DropReason::EncapFailed);
    }
    let words = outer_header(slot, inner, src).ok_or(DropReason::EncapFailed)?;

    // SAFETY: the helper only moves ctx->data; it takes the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_HLEN as i32)) } != 0 {
        return Err(DropReason::EncapFailed);
    }
    // adjust_head invalidates every packet pointer: bounds are checked again from the new start.
    // Word-wise: see `parse::words_at`.
    let [d0, d1, d2, d3, d4, d5] = slot.dst_mac;
    let [s0, s1, s2, s3, s4, s5] = slot.src_mac;
    let eth = [
        u16::from_ne_bytes([d0, d1]),
        u16::from_ne_bytes([d2, d3]),
        u16::from_ne_bytes([d4, d5]),
        u16::from_ne_bytes([s0, s1]),
        u16::from_ne_bytes([s2, s3]),
        u16::from_ne_bytes([s4, s5]),
        ETH_P_IP.to_be(),
    ];
    write_words(ctx, 0, eth).ok_or(DropReason::EncapFailed)?;
    write_words(ctx, ETH_HLEN, words).ok_or(DropReason::EncapFailed)?;
    Ok(())
}

/// The outer IPv4 header from `src` toward the slot's backend: ten 16-bit words in memory
/// order, checksum filled in. `None` when the inner packet is too long to wrap. Shared with the
/// health-check program, whose probes must leave exactly as client packets do.
#[inline(always)]
pub fn outer_header(slot: &BackendSlot, inner: &Inner, src: u32) -> Option<[u16; 10]> {
    let tot_len = inner.tot_len.checked_add(IPV4_HLEN as u16)?;
    let [s0, s1, s2, s3] = src.to_ne_bytes();
    let [d0, d1, d2, d3] = slot.addr[0].to_ne_bytes();
    let mut words: [u16; 10] = [
        u16::from_ne_bytes([0x45, inner.tos]),
        tot_len.to_be(),
        0,
        IP_DF.to_be(),
        u16::from_ne_bytes([OUTER_TTL, IPPROTO_IPIP]),
        0,
        u16::from_ne_bytes([s0, s1]),
        u16::from_ne_bytes([s2, s3]),
        u16::from_ne_bytes([d0, d1]),
        u16::from_ne_bytes([d2, d3]),
    ];
    words[5] = ipv4_header_csum(&words);
    Some(words)
}
