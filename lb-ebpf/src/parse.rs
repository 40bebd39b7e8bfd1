//! Packet parsing: Ethernet, then IPv4 or IPv6, then TCP or UDP into a flow key (or ICMP into
//! what the ICMP stage needs), every access bounds-checked against `data_end` (the verifier
//! rejects any packet access it cannot prove in bounds).

use core::mem;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    DropReason, FlowKey,
    keys::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, WireAddr},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

pub const ETH_HLEN: usize = mem::size_of::<EthHdr>();
pub const IPV4_HLEN: usize = mem::size_of::<Ipv4Hdr>();
pub const IPV6_HLEN: usize = mem::size_of::<Ipv6Hdr>();
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IP protocol numbers of IPv4 and IPv6 inside IP (the balancer writes them, the decapsulator
/// matches them).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
/// IPv6 extension headers the balancer does not walk (hop-by-hop, routing, destination
/// options), and the fragment header.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
/// IPv4 flags/offset word: more-fragments bit and the 13-bit offset.
const IP_MF_OFFSET: u16 = 0x3fff;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the balancer needs from a well-formed TCP or UDP packet.
pub struct Packet {
    pub flow: FlowKey,
    /// TCP SYN without ACK: the opening packet of a connection.
    pub syn: bool,
    /// TCP FIN or RST: the client is closing the connection.
    pub fin_rst: bool,
    /// Frame length as received, for the byte counters.
    pub len: u32,
    pub ip: IpInfo,
}

/// What an outer header copies from the packet it wraps.
#[derive(Clone, Copy)]
pub struct IpInfo {
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// The whole IP packet's length (IPv4 total length, or 40 + IPv6 payload length), host order.
    pub len: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// What kind of ICMP or ICMPv6 message a packet to a VIP address carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    /// Echo request (ICMP 8, ICMPv6 128).
    EchoRequest,
    /// An error quoting a packet: destination unreachable (fragmentation needed included),
    /// time exceeded, packet too big.
    Error,
    /// Anything else.
    Other,
}

/// A well-formed IP header carrying ICMP (IPv4) or ICMPv6 (IPv6); the ICMP header itself is
/// checked by the ICMP stage, and only when `dst` is a VIP address.
pub struct Icmp {
    pub src: WireAddr,
    pub dst: WireAddr,
    pub ip: IpInfo,
    /// The IP payload's length (the ICMP message, header included).
    pub payload_len: usize,
}

pub enum Parsed {
    Packet(Packet),
    Icmp(Icmp),
    /// Not IP, or too short to say where it is going: not ours, the stack decides.
    NotIp,
    /// An IP packet the balancer cannot forward: dropped with `reason` when `dst` is a VIP
    /// address, passed otherwise. `src` is for the debug log.
    Malformed {
        src: WireAddr,
        dst: WireAddr,
        family: u8,
        reason: DropReason,
    },
}

/// A pointer to a `T` at `offset` from the packet start, or `None` when it does not fit.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    // The verifier needs this comparison against data_end before every packet access.
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// `N` 16-bit words at the even `offset` from the packet start, or `None` when they do not fit.
///
/// Headers are read and written as aligned 16-bit words: LLVM cannot know packet data is
/// aligned, so through byte-typed views (`network_types`' headers, `write_unaligned`) it splits
/// every access into single bytes, doubling the instructions of the fast path. Frames start at
/// an even address: drivers put them at `XDP_PACKET_HEADROOM` (or generic XDP at the skb's
/// `NET_SKB_PAD`-aligned data) plus `NET_IP_ALIGN` (0 or 2), and the balancer moves the start by
/// even amounts only. Even if a driver broke that, the access itself stays correct: the JITs of
/// the hosts we build for (x86-64, arm64) emit plain loads and stores, which take any alignment.
#[inline(always)]
pub fn words_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u16; N]> {
    // SAFETY: in bounds (checked by `ptr_at`) and 2-aligned (see above); the packet lives as
    // long as the context.
    ptr_at::<[u16; N]>(ctx, offset).map(|p| unsafe { &*p })
}

/// Writes `words` at the even `offset` from the packet start (see [`words_at`]); `None` when
/// they do not fit.
#[inline(always)]
pub fn write_words<const N: usize>(ctx: &XdpContext, offset: usize, words: [u16; N]) -> Option<()> {
    let at = ptr_at::<[u16; N]>(ctx, offset)?;
    // SAFETY: in bounds and 2-aligned, as in `words_at`.
    unsafe { at.write(words) };
    Some(())
}

/// An IPv4 address (wire order, as `FlowKey` holds it) from its two header words.
#[inline(always)]
pub fn addr(high: u16, low: u16) -> u32 {
    let [a, b] = high.to_ne_bytes();
    let [c, d] = low.to_ne_bytes();
    u32::from_ne_bytes([a, b, c, d])
}

/// An IPv6 address (wire order, as `FlowKey` holds it) from the header's words at `at`.
#[inline(always)]
pub fn addr6(ip: &[u16; IPV6_HLEN / 2], at: usize) -> WireAddr {
    [
        addr(ip[at], ip[at + 1]),
        addr(ip[at + 2], ip[at + 3]),
        addr(ip[at + 4], ip[at + 5]),
        addr(ip[at + 6], ip[at + 7]),
    ]
}

/// Parses an Ethernet frame carrying IPv4 or IPv6 (no VLAN tags: a tagged frame is `NotIp`).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = words_at::<{ ETH_HLEN / 2 }>(ctx, 0) else {
        return Parsed::NotIp;
    };
    match u16::from_be(eth[6]) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext) -> Parsed {
    let Some(ip) = words_at::<{ IPV4_HLEN / 2 }>(ctx, ETH_HLEN) else {
        return Parsed::NotIp;
    };
    let src = [addr(ip[6], ip[7]), 0, 0, 0];
    let dst = [addr(ip[8], ip[9]), 0, 0, 0];
    let malformed = |reason| Parsed::Malformed {
        src,
        dst,
        family: FAMILY_V4,
        reason,
    };
    let [vihl, tos] = ip[0].to_ne_bytes();
    if vihl >> 4 != 4 || vihl & 0xf < 5 {
        return malformed(DropReason::BadIpHeader);
    }
    if vihl & 0xf != 5 {
        return malformed(DropReason::IpOptions);
    }
    let available = ctx.data_end() - ctx.data() - ETH_HLEN;
    let tot_len = u16::from_be(ip[1]);
    if (tot_len as usize) < IPV4_HLEN || tot_len as usize > available {
        return malformed(DropReason::BadIpHeader);
    }
    if u16::from_be(ip[3]) & IP_MF_OFFSET != 0 {
        return malformed(DropReason::Fragment);
    }
    let [_ttl, proto] = ip[4].to_ne_bytes();
    let info = IpInfo {
        tos,
        len: tot_len,
        family: FAMILY_V4,
    };
    // Ethernet padding may follow the IP packet, so L4 lengths are checked against tot_len.
    let l4_len = tot_len as usize - IPV4_HLEN;
    if proto == PROTO_ICMP {
        return Parsed::Icmp(Icmp {
            src,
            dst,
            ip: info,
            payload_len: l4_len,
        });
    }
    match check_l4::<{ ETH_HLEN + IPV4_HLEN }>(ctx, proto, l4_len) {
        Ok(l4) => Parsed::Packet(packet(ctx, src, dst, FAMILY_V4, proto, l4, info)),
        Err(reason) => malformed(reason),
    }
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext) -> Parsed {
    let Some(ip) = words_at::<{ IPV6_HLEN / 2 }>(ctx, ETH_HLEN) else {
        return Parsed::NotIp;
    };
    // The addresses are assembled only where a result needs them, so their eight words are not
    // live across the checks (register pressure here spills on the IPv4 path too).
    let malformed = |reason| Parsed::Malformed {
        src: addr6(ip, 4),
        dst: addr6(ip, 12),
        family: FAMILY_V6,
        reason,
    };
    let [vtc, tc_label] = ip[0].to_ne_bytes();
    if vtc >> 4 != 6 {
        return malformed(DropReason::BadIpHeader);
    }
    let available = ctx.data_end() - ctx.data() - ETH_HLEN - IPV6_HLEN;
    let payload_len = u16::from_be(ip[2]) as usize;
    // Zero is a jumbogram's (a hop-by-hop option carries the length): not forwarded.
    if payload_len == 0 || payload_len > available {
        return malformed(DropReason::BadIpHeader);
    }
    let [next, _hop_limit] = ip[3].to_ne_bytes();
    let info = IpInfo {
        tos: (vtc << 4) | (tc_label >> 4),
        // At most 40 + the frame's length: fits.
        len: (IPV6_HLEN + payload_len) as u16,
        family: FAMILY_V6,
    };
    match next {
        PROTO_ICMPV6 => Parsed::Icmp(Icmp {
            src: addr6(ip, 4),
            dst: addr6(ip, 12),
            ip: info,
            payload_len,
        }),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => malformed(DropReason::IpOptions),
        NEXTHDR_FRAGMENT => malformed(DropReason::Fragment),
        _ => match check_l4::<{ ETH_HLEN + IPV6_HLEN }>(ctx, next, payload_len) {
            Ok(l4) => {
                let (src, dst) = (addr6(ip, 4), addr6(ip, 12));
                Parsed::Packet(packet(ctx, src, dst, FAMILY_V6, next, l4, info))
            }
            Err(reason) => malformed(reason),
        },
    }
}

/// The L4 fields the balancer reads: ports (wire order) and TCP flags.
#[derive(Clone, Copy)]
struct L4 {
    sport: u16,
    dport: u16,
    syn: bool,
    fin_rst: bool,
}

/// Checks the TCP or UDP header at `OFFSET` against the IP payload length `l4_len`.
#[inline(always)]
fn check_l4<const OFFSET: usize>(
    ctx: &XdpContext,
    proto: u8,
    l4_len: usize,
) -> Result<L4, DropReason> {
    match proto {
        PROTO_TCP => {
            let tcp = words_at::<{ TCP_HLEN / 2 }>(ctx, OFFSET).ok_or(DropReason::BadL4Header)?;
            let [doff, flags] = tcp[6].to_ne_bytes();
            let doff = (doff >> 4) as usize;
            if l4_len < TCP_HLEN || doff < 5 || doff * 4 > l4_len {
                return Err(DropReason::BadL4Header);
            }
            Ok(L4 {
                sport: tcp[0],
                dport: tcp[1],
                syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
                fin_rst: flags & (TCP_FIN | TCP_RST) != 0,
            })
        }
        PROTO_UDP => {
            let udp = words_at::<{ UDP_HLEN / 2 }>(ctx, OFFSET).ok_or(DropReason::BadL4Header)?;
            if l4_len < UDP_HLEN {
                return Err(DropReason::BadL4Header);
            }
            Ok(L4 {
                sport: udp[0],
                dport: udp[1],
                syn: false,
                fin_rst: false,
            })
        }
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

#[inline(always)]
fn packet(
    ctx: &XdpContext,
    src: WireAddr,
    dst: WireAddr,
    family: u8,
    proto: u8,
    l4: L4,
    ip: IpInfo,
) -> Packet {
    Packet {
        flow: FlowKey {
            src,
            dst,
            sport: l4.sport,
            dport: l4.dport,
            proto,
            family,
            pad: [0; 2],
        },
        syn: l4.syn,
        fin_rst: l4.fin_rst,
        len: (ctx.data_end() - ctx.data()) as u32,
        ip,
    }
}
