//! The frames the oracle expects the balancer to send, built byte by byte from the issue-9
//! contract (docs: `notes/ISSUE9-spec.md`) rather than from the data plane's code:
//! encapsulation toward a backend (IPIP or GUE, IPv4 or IPv6 outer, either inner family) and
//! echo replies.

use lb_common::{
    BackendSlot, FlowKey,
    hash::{csum_replace, encap_entropy, flow_label, gue_source_port},
    keys::{ENCAP_GUE, FAMILY_V4, FAMILY_V6},
};

use crate::{
    balancer::{ENCAP_MASK, ENCAP_MASK_V6, ENCAP_SRC, ENCAP_SRC_V6, wire},
    packet::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP_DF, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_HLEN,
        IPV6_HLEN, UDP_HLEN, internet_checksum,
    },
};

const OUTER_TTL: u8 = 64;

/// What an encapsulation copies from the packet it wraps.
#[derive(Clone, Copy, Debug)]
pub struct Inner {
    /// The key the entropy comes from (the client's flow, reversed for an ICMP error).
    pub key: FlowKey,
    /// `FAMILY_V4` or `FAMILY_V6`: the inner header's.
    pub family: u8,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 total length, or 40 + payload length.
    pub len: u32,
}

/// Outer bytes a slot adds (IP header, and UDP for GUE).
pub fn overhead(slot: &BackendSlot) -> usize {
    let ip = if slot.family == FAMILY_V6 {
        IPV6_HLEN
    } else {
        IPV4_HLEN
    };
    ip + if slot.encap == ENCAP_GUE { UDP_HLEN } else { 0 }
}

/// The outer packet's length field would not fit 16 bits.
pub fn too_long(slot: &BackendSlot, inner: &Inner) -> bool {
    let ip_len = if slot.family == FAMILY_V6 {
        overhead(slot) - IPV6_HLEN
    } else {
        overhead(slot)
    };
    inner.len as usize + ip_len > usize::from(u16::MAX)
}

/// `frame` (whose IP packet starts at byte 14) encapsulated toward `slot`: new Ethernet
/// header, outer IP (and UDP for GUE), then everything after the received Ethernet header.
pub fn encapsulated(frame: &[u8], inner: &Inner, slot: &BackendSlot) -> Vec<u8> {
    let entropy = encap_entropy(&inner.key);
    let gue = slot.encap == ENCAP_GUE;
    let udp_len = if gue { UDP_HLEN } else { 0 };
    let next = if gue {
        IPPROTO_UDP
    } else if inner.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let mut out = Vec::with_capacity(frame.len() + overhead(slot));
    out.extend_from_slice(&slot.dst_mac);
    out.extend_from_slice(&slot.src_mac);
    if slot.family == FAMILY_V6 {
        out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        let first = (6u32 << 28) | (u32::from(inner.tos) << 20) | (flow_label(entropy) & 0xf_ffff);
        out.extend_from_slice(&first.to_be_bytes());
        out.extend_from_slice(&((inner.len as usize + udp_len) as u16).to_be_bytes());
        out.push(next);
        out.push(OUTER_TTL);
        let mut src = lb_common::keys::wire_addr(ENCAP_SRC_V6.into()).0;
        src[3] |= entropy & u32::from_ne_bytes(ENCAP_MASK_V6);
        for word in src.iter().chain(&slot.addr) {
            out.extend_from_slice(&word.to_ne_bytes());
        }
    } else {
        out.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let mut ip = [0u8; IPV4_HLEN];
        ip[0] = 0x45;
        ip[1] = inner.tos;
        let tot = inner.len as usize + IPV4_HLEN + udp_len;
        ip[2..4].copy_from_slice(&(tot as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
        ip[8] = OUTER_TTL;
        ip[9] = next;
        let src = wire(ENCAP_SRC) | (entropy & wire(ENCAP_MASK));
        ip[12..16].copy_from_slice(&src.to_ne_bytes());
        ip[16..20].copy_from_slice(&slot.addr[0].to_ne_bytes());
        let csum = internet_checksum(0, &ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        out.extend_from_slice(&ip);
    }
    if gue {
        out.extend_from_slice(&gue_source_port(entropy).to_be_bytes());
        // Stored in network order already: its memory bytes are the wire bytes.
        out.extend_from_slice(&slot.encap_port.to_ne_bytes());
        out.extend_from_slice(&((inner.len as usize + UDP_HLEN) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(&frame[ETH_HLEN..]);
    out
}

/// The echo reply to the echo request in `frame` (IPv4 header without options or IPv6 header
/// directly followed by the ICMP message): MACs and addresses swapped, TTL / hop limit 64,
/// reply type, ICMP checksum updated for the type word (RFC 1624), IPv4 header checksum
/// recomputed; every other byte (payload and Ethernet padding) as received.
pub fn echo_reply(frame: &[u8], family: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[..6]);
    let ip = ETH_HLEN;
    let (addr_at, addr_len, icmp, reply) = if family == FAMILY_V4 {
        (ip + 12, 4, ip + IPV4_HLEN, 0u8)
    } else {
        (ip + 8, 16, ip + IPV6_HLEN, 129u8)
    };
    let (src, dst) = (addr_at, addr_at + addr_len);
    out[src..dst].copy_from_slice(&frame[dst..dst + addr_len]);
    out[dst..dst + addr_len].copy_from_slice(&frame[src..dst]);
    if family == FAMILY_V4 {
        out[ip + 8] = OUTER_TTL;
        out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
        let csum = internet_checksum(0, &out[ip..ip + IPV4_HLEN]);
        out[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
    } else {
        out[ip + 7] = OUTER_TTL;
    }
    let old = u16::from_be_bytes([frame[icmp], frame[icmp + 1]]);
    let new = u16::from_be_bytes([reply, frame[icmp + 1]]);
    let check = u16::from_be_bytes([frame[icmp + 2], frame[icmp + 3]]);
    out[icmp] = reply;
    out[icmp + 2..icmp + 4].copy_from_slice(&csum_replace(check, old, new).to_be_bytes());
    out
}
