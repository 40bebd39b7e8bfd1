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

/// Parses an Ethernet frame carrying IPv4 (no VLAN tags: a tagged frame is `NotIp`).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::NotIp;
    };
    // SAFETY: `eth` is bounds-checked above.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Parsed::NotIp;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::NotIp;
    };
    // SAFETY: `ip` is bounds-checked above; Ipv4Hdr is all bytes (align 1).
    let ip = unsafe { &*ip };
    let dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
    match check_ipv4(ctx, ip) {
        Ok(packet) => Parsed::Packet(packet),
        Err(reason) => Parsed::Malformed {
            src: u32::from_ne_bytes(ip.src_addr),
            dst,
            family: FAMILY_V4,
            reason,
        },
    }
}

#[inline(always)]
fn check_ipv4(ctx: &XdpContext, ip: &Ipv4Hdr) -> Result<Packet, DropReason> {
    if ip.vihl >> 4 != 4 || ip.vihl & 0xf < 5 {
        return Err(DropReason::BadIpHeader);
    }
    if ip.vihl & 0xf != 5 {
        return Err(DropReason::IpOptions);
    }
    let available = ctx.data_end() - ctx.data() - ETH_HLEN;
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if (tot_len as usize) < IPV4_HLEN || tot_len as usize > available {
        return Err(DropReason::BadIpHeader);
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return Err(DropReason::Fragment);
    }
    // Ethernet padding may follow the IP packet, so L4 lengths are checked against tot_len.
    let l4_len = tot_len as usize - IPV4_HLEN;
    let l4_offset = ETH_HLEN + IPV4_HLEN;
    let (ports, syn, fin_rst) = match ip.proto {
        PROTO_TCP => {
            let tcp = ptr_at::<[u8; TCP_HLEN]>(ctx, l4_offset).ok_or(DropReason::BadL4Header)?;
            // SAFETY: bounds-checked above.
            let tcp = unsafe { &*tcp };
            let doff = (tcp[12] >> 4) as usize;
            if l4_len < TCP_HLEN || doff < 5 || doff * 4 > l4_len {
                return Err(DropReason::BadL4Header);
            }
            let flags = tcp[13];
            let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let fin_rst = flags & (TCP_FIN | TCP_RST) != 0;
            ([tcp[0], tcp[1], tcp[2], tcp[3]], syn, fin_rst)
        }
        PROTO_UDP => {
            let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, l4_offset).ok_or(DropReason::BadL4Header)?;
            // SAFETY: bounds-checked above.
            let udp = unsafe { &*udp };
            if l4_len < UDP_HLEN {
                return Err(DropReason::BadL4Header);
            }
            ([udp[0], udp[1], udp[2], udp[3]], false, false)
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Packet {
        flow: FlowKey {
            src: [u32::from_ne_bytes(ip.src_addr), 0, 0, 0],
            dst: [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0],
            sport: u16::from_ne_bytes([ports[0], ports[1]]),
            dport: u16::from_ne_bytes([ports[2], ports[3]]),
            proto: ip.proto,
            family: FAMILY_V4,
            pad: [0; 2],
        },
        syn,
        fin_rst,
        len: (ctx.data_end() - ctx.data()) as u32,
        tos: ip.tos,
        tot_len,
    })
}
