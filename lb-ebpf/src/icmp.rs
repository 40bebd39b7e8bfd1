//! ICMP and ICMPv6 to VIP addresses: echo replies written in place, errors that quote a VIP
//! flow (traced back to that flow's key, so the balancer sends them to the flow's backend, and
//! path MTU discovery works through it), and the fragmentation-needed / packet-too-big replies
//! the balancer itself sends when an encapsulated packet would not fit the egress MTU.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    DropReason, FlowKey,
    hash::{csum_add, csum_fold, csum_replace, ipv4_header_csum},
    keys::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
};

use crate::parse::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, Icmp, IcmpKind, IpInfo, addr,
    addr6, words_at, write_words,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const REPLY_TTL: u8 = 64;
/// How much of the client's L4 header a too-big reply quotes: the ports and TCP's sequence
/// number, which is what the client's stack matches the error against (RFC 792's minimum).
const QUOTED_L4: usize = 8;

/// Where the ICMP header starts.
#[inline(always)]
const fn icmp_offset(family: u8) -> usize {
    if family == FAMILY_V4 {
        ETH_HLEN + IPV4_HLEN
    } else {
        ETH_HLEN + IPV6_HLEN
    }
}

/// The ICMP message's kind; `BadL4Header` when its 8-byte header is not all there.
#[inline(always)]
pub fn kind(ctx: &XdpContext, icmp: &Icmp) -> Result<IcmpKind, DropReason> {
    if icmp.payload_len < ICMP_HLEN {
        return Err(DropReason::BadL4Header);
    }
    let header = if icmp.ip.family == FAMILY_V4 {
        words_at::<{ ICMP_HLEN / 2 }>(ctx, ETH_HLEN + IPV4_HLEN)
    } else {
        words_at::<{ ICMP_HLEN / 2 }>(ctx, ETH_HLEN + IPV6_HLEN)
    }
    .ok_or(DropReason::BadL4Header)?;
    let [kind, _code] = header[0].to_ne_bytes();
    Ok(match (icmp.ip.family, kind) {
        (FAMILY_V4, ICMP_ECHO) | (FAMILY_V6, ICMPV6_ECHO_REQUEST) => IcmpKind::EchoRequest,
        (FAMILY_V4, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
        | (FAMILY_V6, ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED) => {
            IcmpKind::Error
        }
        _ => IcmpKind::Other,
    })
}

/// Turns an echo request into its reply in place: MACs and addresses swapped, TTL or hop limit
/// reset, type changed and the checksums updated. The caller sends it back (`XDP_TX`).
#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, icmp: &Icmp) -> Result<(), DropReason> {
    let bad = DropReason::BadL4Header;
    let eth = words_at::<{ ETH_HLEN / 2 }>(ctx, 0).ok_or(bad)?;
    let eth = [eth[3], eth[4], eth[5], eth[0], eth[1], eth[2], eth[6]];
    write_words(ctx, 0, eth).ok_or(bad)?;
    let at = icmp_offset(icmp.ip.family);
    let reply = if icmp.ip.family == FAMILY_V4 {
        let ip = *words_at::<{ IPV4_HLEN / 2 }>(ctx, ETH_HLEN).ok_or(bad)?;
        let [_ttl, proto] = ip[4].to_ne_bytes();
        let mut ip = [
            ip[0],
            ip[1],
            ip[2],
            ip[3],
            u16::from_ne_bytes([REPLY_TTL, proto]),
            0,
            ip[8],
            ip[9],
            ip[6],
            ip[7],
        ];
        ip[5] = ipv4_header_csum(&ip);
        write_words(ctx, ETH_HLEN, ip).ok_or(bad)?;
        ICMP_ECHO_REPLY
    } else {
        let ip = *words_at::<{ IPV6_HLEN / 2 }>(ctx, ETH_HLEN).ok_or(bad)?;
        let [next, _hop] = ip[3].to_ne_bytes();
        let ip = [
            ip[0],
            ip[1],
            ip[2],
            u16::from_ne_bytes([next, REPLY_TTL]),
            ip[12],
            ip[13],
            ip[14],
            ip[15],
            ip[16],
            ip[17],
            ip[18],
            ip[19],
            ip[4],
            ip[5],
            ip[6],
            ip[7],
            ip[8],
            ip[9],
            ip[10],
            ip[11],
        ];
        write_words(ctx, ETH_HLEN, ip).ok_or(bad)?;
        ICMPV6_ECHO_REPLY
    };
    let header = *words_at::<2>(ctx, at).ok_or(bad)?;
    let [_kind, code] = header[0].to_ne_bytes();
    let first = u16::from_ne_bytes([reply, code]);
    // The addresses only swapped places, so the ICMPv6 pseudo header's sum is unchanged: only
    // the type word changes the checksum.
    write_words(ctx, at, [first, csum_replace(header[1], header[0], first)]).ok_or(bad)
}

/// The key of the VIP flow an ICMP error quotes. The quote is a packet the backend sent
/// (VIP -> client), so the key is its reverse, as the client's packets carry it.
#[inline(always)]
pub fn quoted_flow(ctx: &XdpContext, icmp: &Icmp) -> Result<FlowKey, DropReason> {
    let bad = DropReason::BadIcmp;
    if icmp.ip.family == FAMILY_V4 {
        const AT: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN;
        const WORDS: usize = IPV4_HLEN / 2 + QUOTED_L4 / 2;
        if icmp.payload_len < ICMP_HLEN + IPV4_HLEN + QUOTED_L4 {
            return Err(bad);
        }
        let q = words_at::<WORDS>(ctx, AT).ok_or(bad)?;
        let [vihl, _tos] = q[0].to_ne_bytes();
        let [_ttl, proto] = q[4].to_ne_bytes();
        // IHL 5 only: the ports then sit right after the header, as in the balancer.
        if vihl != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
            return Err(bad);
        }
        Ok(FlowKey {
            src: [addr(q[8], q[9]), 0, 0, 0],
            dst: [addr(q[6], q[7]), 0, 0, 0],
            sport: q[11],
            dport: q[10],
            proto,
            family: FAMILY_V4,
            pad: [0; 2],
        })
    } else {
        const AT: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN;
        const WORDS: usize = IPV6_HLEN / 2 + QUOTED_L4 / 2;
        if icmp.payload_len < ICMP_HLEN + IPV6_HLEN + QUOTED_L4 {
            return Err(bad);
        }
        let q = words_at::<WORDS>(ctx, AT).ok_or(bad)?;
        let [vtc, _] = q[0].to_ne_bytes();
        let [next, _hop] = q[3].to_ne_bytes();
        if vtc >> 4 != 6 || (next != PROTO_TCP && next != PROTO_UDP) {
            return Err(bad);
        }
        let ip: &[u16; IPV6_HLEN / 2] = q.first_chunk().ok_or(bad)?;
        Ok(FlowKey {
            src: addr6(ip, 12),
            dst: addr6(ip, 4),
            sport: q[21],
            dport: q[20],
            proto: next,
            family: FAMILY_V6,
            pad: [0; 2],
        })
    }
}

/// Rewrites the client's packet into the ICMP fragmentation-needed (IPv4) or packet-too-big
/// (ICMPv6) reply naming `mtu`, from the VIP back to the client, quoting the packet's IP header
/// and first 8 L4 bytes. The caller sends it back (`XDP_TX`).
///
/// The frame grows at the front by the reply's own headers, which puts the packet's IP header
/// exactly where the quote belongs; then it is cut after the quote.
#[inline(always)]
pub fn too_big_reply(ctx: &XdpContext, ip: &IpInfo, mtu: u32) -> Result<(), DropReason> {
    if ip.family == FAMILY_V4 {
        too_big_v4(ctx, mtu)
    } else {
        too_big_v6(ctx, mtu)
    }
}

/// The reply's Ethernet header: back to whoever sent the packet, from the address it was
/// sent to.
#[inline(always)]
fn back_to_sender(eth: &[u16; ETH_HLEN / 2], ether_type: u16) -> [u16; ETH_HLEN / 2] {
    [
        eth[3],
        eth[4],
        eth[5],
        eth[0],
        eth[1],
        eth[2],
        ether_type.to_be(),
    ]
}

/// Grows the frame by `GROW` bytes at the front, then cuts it to `FRAME` bytes in all.
#[inline(always)]
fn reshape<const GROW: usize, const FRAME: usize>(ctx: &XdpContext) -> Result<(), DropReason> {
    // SAFETY: the helpers only move ctx->data / data_end; they take the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return Err(DropReason::TooBig);
    }
    let len = ctx.data_end() - ctx.data();
    // SAFETY: as above.
    if len < FRAME || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - FRAME) as i32)) } != 0 {
        return Err(DropReason::TooBig);
    }
    Ok(())
}

#[inline(always)]
fn too_big_v4(ctx: &XdpContext, mtu: u32) -> Result<(), DropReason> {
    const GROW: usize = IPV4_HLEN + ICMP_HLEN;
    const QUOTE: usize = IPV4_HLEN + QUOTED_L4;
    const FRAME: usize = ETH_HLEN + GROW + QUOTE;
    let failed = DropReason::TooBig;
    let eth = *words_at::<{ ETH_HLEN / 2 }>(ctx, 0).ok_or(failed)?;
    let quote = *words_at::<{ QUOTE / 2 }>(ctx, ETH_HLEN).ok_or(failed)?;
    reshape::<GROW, FRAME>(ctx)?;
    let mut ip: [u16; IPV4_HLEN / 2] = [
        u16::from_ne_bytes([0x45, 0]),
        ((GROW + QUOTE) as u16).to_be(),
        0,
        0,
        u16::from_ne_bytes([REPLY_TTL, PROTO_ICMP]),
        0,
        quote[8],
        quote[9],
        quote[6],
        quote[7],
    ];
    ip[5] = ipv4_header_csum(&ip);
    // Next-hop MTU in the second half of the "unused" word (RFC 1191).
    let mut icmp: [u16; ICMP_HLEN / 2] = [
        u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]),
        0,
        0,
        (mtu.min(u32::from(u16::MAX)) as u16).to_be(),
    ];
    icmp[1] = csum_fold(csum_add(csum_add(0, &icmp), &quote));
    write_words(ctx, 0, back_to_sender(&eth, ETH_P_IP)).ok_or(failed)?;
    write_words(ctx, ETH_HLEN, ip).ok_or(failed)?;
    write_words(ctx, ETH_HLEN + IPV4_HLEN, icmp).ok_or(failed)
}

#[inline(always)]
fn too_big_v6(ctx: &XdpContext, mtu: u32) -> Result<(), DropReason> {
    const GROW: usize = IPV6_HLEN + ICMP_HLEN;
    const QUOTE: usize = IPV6_HLEN + QUOTED_L4;
    const FRAME: usize = ETH_HLEN + GROW + QUOTE;
    const PAYLOAD: u16 = (ICMP_HLEN + QUOTE) as u16;
    let failed = DropReason::TooBig;
    let eth = *words_at::<{ ETH_HLEN / 2 }>(ctx, 0).ok_or(failed)?;
    let quote = *words_at::<{ QUOTE / 2 }>(ctx, ETH_HLEN).ok_or(failed)?;
    reshape::<GROW, FRAME>(ctx)?;
    let packet: &[u16; IPV6_HLEN / 2] = quote.first_chunk().ok_or(failed)?;
    let (vip, client) = (addr6(packet, 12), addr6(packet, 4));
    let ip = crate::encap::ipv6_words(6 << 28, PAYLOAD, PROTO_ICMPV6, REPLY_TTL, &vip, &client);
    let mut icmp: [u16; ICMP_HLEN / 2] = [
        u16::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0]),
        0,
        ((mtu >> 16) as u16).to_be(),
        (mtu as u16).to_be(),
    ];
    // Pseudo header: both addresses, the upper-layer length and the next header.
    let addresses: &[u16; 16] = ip.last_chunk().ok_or(failed)?;
    let pseudo = [0, PAYLOAD.to_be(), 0, u16::from(PROTO_ICMPV6).to_be()];
    let sum = csum_add(csum_add(csum_add(0, addresses), &pseudo), &icmp);
    icmp[1] = csum_fold(csum_add(sum, &quote));
    write_words(ctx, 0, back_to_sender(&eth, ETH_P_IPV6)).ok_or(failed)?;
    write_words(ctx, ETH_HLEN, ip).ok_or(failed)?;
    write_words(ctx, ETH_HLEN + IPV6_HLEN, icmp).ok_or(failed)
}
