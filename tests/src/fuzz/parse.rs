//! The oracle's reference parser: what a frame is to the balancer (not IP, malformed and why, a
//! TCP/UDP flow, or an ICMP message), written from the rules in `oracle`'s documentation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    DropReason, FlowKey,
    keys::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, wire_addr},
};

use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN};

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the reference parser makes of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Neither IPv4 nor IPv6 over untagged Ethernet.
    NotIp,
    /// An IP ethertype, but the frame ends before the fixed header (20 or 40 bytes).
    Short,
    /// An IP packet to `dst` the balancer cannot forward, and why.
    Malformed {
        dst: IpAddr,
        reason: DropReason,
    },
    Flow(Flow),
    Icmp(Icmp),
}

/// The IP header fields every later stage uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpInfo {
    pub family: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 total length or 40 + payload length.
    pub len: u32,
}

/// A well-formed TCP or UDP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub ip: IpInfo,
    pub key: FlowKey,
    pub dport: u16,
    pub proto: u8,
    /// SYN without ACK.
    pub syn: bool,
    /// FIN or RST.
    pub fin_rst: bool,
}

/// An ICMP or ICMPv6 packet whose IP header is well formed; `payload` is its IP payload (cut
/// at the IP length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub ip: IpInfo,
    pub payload: Vec<u8>,
}

pub fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub fn v4_at(bytes: &[u8], at: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        bytes[at],
        bytes[at + 1],
        bytes[at + 2],
        bytes[at + 3],
    ))
}

pub fn v6_at(bytes: &[u8], at: usize) -> IpAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&bytes[at..at + 16]);
    IpAddr::V6(Ipv6Addr::from(o))
}

/// Parses the frame the program sees (the linear part).
pub fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < ETH_HLEN {
        return Parsed::NotIp;
    }
    let ip = &frame[ETH_HLEN..];
    match be16(frame, 12) {
        ETH_P_IP if ip.len() < IPV4_HLEN => Parsed::Short,
        ETH_P_IP => ipv4(ip),
        ETH_P_IPV6 if ip.len() < IPV6_HLEN => Parsed::Short,
        ETH_P_IPV6 => ipv6(ip),
        _ => Parsed::NotIp,
    }
}

fn ipv4(ip: &[u8]) -> Parsed {
    let dst = v4_at(ip, 16);
    let bad = |reason| Parsed::Malformed { dst, reason };
    let (version, ihl) = (ip[0] >> 4, usize::from(ip[0] & 0xf));
    if version != 4 || ihl < 5 {
        return bad(DropReason::BadIpHeader);
    }
    if ihl > 5 {
        return bad(DropReason::IpOptions);
    }
    let tot_len = usize::from(be16(ip, 2));
    if tot_len < IPV4_HLEN || tot_len > ip.len() {
        return bad(DropReason::BadIpHeader);
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return bad(DropReason::Fragment);
    }
    let info = IpInfo {
        family: FAMILY_V4,
        src: v4_at(ip, 12),
        dst,
        tos: ip[1],
        len: tot_len as u32,
    };
    transport(info, ip[9], &ip[IPV4_HLEN..tot_len])
}

fn ipv6(ip: &[u8]) -> Parsed {
    let dst = v6_at(ip, 24);
    let bad = |reason| Parsed::Malformed { dst, reason };
    if ip[0] >> 4 != 6 {
        return bad(DropReason::BadIpHeader);
    }
    let payload_len = usize::from(be16(ip, 4));
    if payload_len == 0 || IPV6_HLEN + payload_len > ip.len() {
        return bad(DropReason::BadIpHeader);
    }
    let info = IpInfo {
        family: FAMILY_V6,
        src: v6_at(ip, 8),
        dst,
        tos: (ip[0] << 4) | (ip[1] >> 4),
        len: (IPV6_HLEN + payload_len) as u32,
    };
    match ip[6] {
        0 | 43 | 60 => bad(DropReason::IpOptions),
        44 => bad(DropReason::Fragment),
        next => transport(info, next, &ip[IPV6_HLEN..IPV6_HLEN + payload_len]),
    }
}

/// The L4 header within the IP payload `l4`.
fn transport(ip: IpInfo, proto: u8, l4: &[u8]) -> Parsed {
    let bad = |reason| Parsed::Malformed {
        dst: ip.dst,
        reason,
    };
    let icmp = if ip.family == FAMILY_V4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    let (syn, fin_rst) = match proto {
        PROTO_TCP => {
            if l4.len() < TCP_HLEN {
                return bad(DropReason::BadL4Header);
            }
            let data_offset = usize::from(l4[12] >> 4) * 4;
            if data_offset < TCP_HLEN || data_offset > l4.len() {
                return bad(DropReason::BadL4Header);
            }
            let flags = l4[13];
            (
                flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
                flags & (TCP_FIN | TCP_RST) != 0,
            )
        }
        PROTO_UDP if l4.len() >= UDP_HLEN => (false, false),
        PROTO_UDP => return bad(DropReason::BadL4Header),
        p if p == icmp => {
            return Parsed::Icmp(Icmp {
                ip,
                payload: l4.to_vec(),
            });
        }
        _ => return bad(DropReason::UnsupportedProtocol),
    };
    let word = |at: usize| u16::from_ne_bytes([l4[at], l4[at + 1]]);
    Parsed::Flow(Flow {
        ip,
        key: FlowKey {
            src: wire_addr(ip.src).0,
            dst: wire_addr(ip.dst).0,
            // Ports as on the wire, like the data plane's key.
            sport: word(0),
            dport: word(2),
            proto,
            family: ip.family,
            pad: [0; 2],
        },
        dport: be16(l4, 2),
        proto,
        syn,
        fin_rst,
    })
}

/// The flow an ICMP error quotes, reversed into the client's direction, and the VIP it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    /// The client's flow key (the quoted packet went VIP -> client).
    pub key: FlowKey,
    /// The quoted source: VIP address, port (host order), protocol.
    pub vip: (IpAddr, u16, u8),
}

/// The quote of an ICMP error (the message's bytes from its type on), if usable: an IPv4
/// header of exactly 20 bytes or an IPv6 header directly followed by TCP or UDP, of the outer
/// family, with its 8 L4 bytes within the message.
pub fn quote(family: u8, msg: &[u8]) -> Option<Quote> {
    let q = msg.get(ICMP_HLEN..)?;
    let (hlen, proto, src, dst) = if family == FAMILY_V4 {
        if q.len() < IPV4_HLEN + 8 || q[0] != 0x45 {
            return None;
        }
        (IPV4_HLEN, q[9], v4_at(q, 12), v4_at(q, 16))
    } else {
        if q.len() < IPV6_HLEN + 8 || q[0] >> 4 != 6 {
            return None;
        }
        (IPV6_HLEN, q[6], v6_at(q, 8), v6_at(q, 24))
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = &q[hlen..];
    let word = |at: usize| u16::from_ne_bytes([l4[at], l4[at + 1]]);
    Some(Quote {
        key: FlowKey {
            src: wire_addr(dst).0,
            dst: wire_addr(src).0,
            sport: word(2),
            dport: word(0),
            proto,
            family,
            pad: [0; 2],
        },
        vip: (src, be16(l4, 0), proto),
    })
}
