//! Packet parsing: Ethernet and IPv4 with TCP or UDP into a flow key, every access bounds-checked
//! against `data_end` (the verifier rejects any packet access it cannot prove in bounds).

use core::mem;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    DropReason, FlowKey,
    keys::{FAMILY_V4, PROTO_TCP, PROTO_UDP, WireAddr},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_HLEN: usize = mem::size_of::<EthHdr>();
pub const IPV4_HLEN: usize = mem::size_of::<Ipv4Hdr>();
pub const ETH_P_IP: u16 = 0x0800;
/// IP protocol number of IPv4-in-IPv4 (the balancer writes it, the decapsulator matches it).
pub const IPPROTO_IPIP: u8 = 4;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
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
    /// IPv4 TOS byte, copied to the outer header.
    pub tos: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
}

pub enum Parsed {
    Packet(Packet),
    /// Not IPv4, or too short to say where it is going: not ours, the stack decides.
    NotIp,
    /// An IPv4 packet the balancer cannot forward: dropped with `reason` when `dst` is a VIP
    /// address, passed otherwise. `src` is for the debug log.
    Malformed {
        src: u32,
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

/// Parses an Ethernet frame carrying IPv4 (no VLAN tags: a tagged frame is `NotIp`).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = words_at::<{ ETH_HLEN / 2 }>(ctx, 0) else {
        return Parsed::NotIp;
    };
    if u16::from_be(eth[6]) != ETH_P_IP {
        return Parsed::NotIp;
    }
    let Some(ip) = words_at::<{ IPV4_HLEN / 2 }>(ctx, ETH_HLEN) else {
        return Parsed::NotIp;
    };
    let dst = [addr(ip[8], ip[9]), 0, 0, 0];
    match check_ipv4(ctx, ip) {
        Ok(packet) => Parsed::Packet(packet),
        Err(reason) => Parsed::Malformed {
            src: addr(ip[6], ip[7]),
            dst,
            family: FAMILY_V4,
            reason,
        },
    }
}

/// `ip`: the IPv4 header's ten words.
#[inline(always)]
fn check_ipv4(ctx: &XdpContext, ip: &[u16; IPV4_HLEN / 2]) -> Result<Packet, DropReason> {
    let [vihl, tos] = ip[0].to_ne_bytes();
    if vihl >> 4 != 4 || vihl & 0xf < 5 {
        return Err(DropReason::BadIpHeader);
    }
    if vihl & 0xf != 5 {
        return Err(DropReason::IpOptions);
    }
    let available = ctx.data_end() - ctx.data() - ETH_HLEN;
    let tot_len = u16::from_be(ip[1]);
    if (tot_len as usize) < IPV4_HLEN || tot_len as usize > available {
        return Err(DropReason::BadIpHeader);
    }
    if u16::from_be(ip[3]) & IP_MF_OFFSET != 0 {
        return Err(DropReason::Fragment);
    }
    let [_ttl, proto] = ip[4].to_ne_bytes();
    // Ethernet padding may follow the IP packet, so L4 lengths are checked against tot_len.
    let l4_len = tot_len as usize - IPV4_HLEN;
    let l4_offset = ETH_HLEN + IPV4_HLEN;
    let (sport, dport, syn, fin_rst) = match proto {
        PROTO_TCP => {
            let tcp =
                words_at::<{ TCP_HLEN / 2 }>(ctx, l4_offset).ok_or(DropReason::BadL4Header)?;
            let [doff, flags] = tcp[6].to_ne_bytes();
            let doff = (doff >> 4) as usize;
            if l4_len < TCP_HLEN || doff < 5 || doff * 4 > l4_len {
                return Err(DropReason::BadL4Header);
            }
            let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let fin_rst = flags & (TCP_FIN | TCP_RST) != 0;
            (tcp[0], tcp[1], syn, fin_rst)
        }
        PROTO_UDP => {
            let udp =
                words_at::<{ UDP_HLEN / 2 }>(ctx, l4_offset).ok_or(DropReason::BadL4Header)?;
            if l4_len < UDP_HLEN {
                return Err(DropReason::BadL4Header);
            }
            (udp[0], udp[1], false, false)
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Packet {
        flow: FlowKey {
            src: [addr(ip[6], ip[7]), 0, 0, 0],
            dst: [addr(ip[8], ip[9]), 0, 0, 0],
            sport,
            dport,
            proto,
            family: FAMILY_V4,
            pad: [0; 2],
        },
        syn,
        fin_rst,
        len: (ctx.data_end() - ctx.data()) as u32,
        tos,
        tot_len,
    })
}
