//! The host-side reference of what `lb_xdp` must do with a frame, written from the rules (the
//! `DropReason` documentation and DESIGN.md's fast-path rules) rather than from the data plane's
//! code: the action, the exact counter increments, the exact output frame, and the flow table
//! afterwards.
//!
//! The rules, in the order they apply (where a frame breaks several, the documented rules do not
//! rank the reasons: the order is the data plane's, checked here so that a change shows):
//! 1. Not Ethernet + IPv4 (another ethertype, VLAN tags, IPv6), or too short to hold the IPv4
//!    header's addresses: not ours, `XDP_PASS`.
//! 2. An IPv4 header the balancer cannot use: version not 4 or IHL < 5 (`BadIpHeader`), then
//!    IHL > 5 (`IpOptions`), then a total length below 20 or beyond the frame (`BadIpHeader`),
//!    then MF or a fragment offset (`Fragment`), then a TCP header (20 bytes, data offset 5..=15
//!    words) or UDP header (8 bytes) that does not fit inside the total length (`BadL4Header`),
//!    then any other protocol (`UnsupportedProtocol`). Dropped with that reason when the
//!    destination is a VIP address, passed otherwise.
//! 3. A well-formed TCP or UDP packet with no VIP on its (address, port, protocol): `XDP_PASS`.
//! 4. A packet for a VIP: the flow table's valid entry, or the VIP's Maglev table (a SYN or a
//!    UDP datagram opens a flow; any other TCP packet without an entry is a miss), then IPIP
//!    encapsulation (`EncapFailed` for a backend it cannot serve), then egress: `XDP_TX` on the
//!    ingress interface, `XDP_REDIRECT` through the devmap, `NoRoute` without a devmap entry.
//!    Ethernet padding after the IP packet is carried along; the inner packet is unchanged.

use std::{collections::HashMap, net::Ipv4Addr};

use lb_common::{
    Counter, DropReason, FlowKey,
    hash::{encap_entropy, flow_hash},
    keys::{ENCAP_IPIP, FAMILY_V4, PROTO_TCP, PROTO_UDP, RING_EMPTY},
};

use crate::{
    balancer::{ENCAP_MASK, ENCAP_SRC, wire},
    bpf::{TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    fuzz::universe::{Universe, VipDef},
    packet::{ETH_HLEN, ETH_P_IP, IP_DF, IPPROTO_IPIP, IPV4_HLEN, internet_checksum},
};

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const OUTER_TTL: u8 = 64;

/// What the reference parser makes of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4 over untagged Ethernet.
    NotIpv4,
    /// IPv4 ethertype, but the frame ends before the header's addresses.
    Short,
    /// An IPv4 packet to `dst` the balancer cannot forward, and why.
    Malformed {
        dst: Ipv4Addr,
        reason: DropReason,
    },
    Flow(Flow),
}

/// A well-formed TCP or UDP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub proto: u8,
    /// SYN without ACK.
    pub syn: bool,
    /// FIN or RST.
    pub fin_rst: bool,
    pub tos: u8,
    pub tot_len: u16,
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn addr_at(bytes: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3])
}

/// Rules 1 and 2.
pub fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < ETH_HLEN || be16(frame, 12) != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    let ip = &frame[ETH_HLEN..];
    if ip.len() < IPV4_HLEN {
        return Parsed::Short;
    }
    let dst = addr_at(ip, 16);
    match check_ipv4(ip) {
        Ok(flow) => Parsed::Flow(flow),
        Err(reason) => Parsed::Malformed { dst, reason },
    }
}

/// Rule 2 on the IP packet (at least 20 bytes), Ethernet padding included.
fn check_ipv4(ip: &[u8]) -> Result<Flow, DropReason> {
    let (version, ihl) = (ip[0] >> 4, usize::from(ip[0] & 0xf));
    if version != 4 || ihl < 5 {
        return Err(DropReason::BadIpHeader);
    }
    if ihl > 5 {
        return Err(DropReason::IpOptions);
    }
    let tot_len = be16(ip, 2);
    if usize::from(tot_len) < IPV4_HLEN || usize::from(tot_len) > ip.len() {
        return Err(DropReason::BadIpHeader);
    }
    let more_fragments = be16(ip, 6) & 0x2000 != 0;
    if more_fragments || be16(ip, 6) & 0x1fff != 0 {
        return Err(DropReason::Fragment);
    }
    // Everything L4 must fit within the total length (what follows it is padding).
    let l4 = &ip[IPV4_HLEN..usize::from(tot_len)];
    let proto = ip[9];
    let (syn, fin_rst) = match proto {
        PROTO_TCP => {
            if l4.len() < TCP_HLEN {
                return Err(DropReason::BadL4Header);
            }
            let data_offset = usize::from(l4[12] >> 4) * 4;
            if data_offset < TCP_HLEN || data_offset > l4.len() {
                return Err(DropReason::BadL4Header);
            }
            let flags = l4[13];
            (
                flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
                flags & (TCP_FIN | TCP_RST) != 0,
            )
        }
        PROTO_UDP if l4.len() >= UDP_HLEN => (false, false),
        PROTO_UDP => return Err(DropReason::BadL4Header),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    let word = |at: usize| u16::from_ne_bytes([l4[at], l4[at + 1]]);
    let (src, dst) = (addr_at(ip, 12), addr_at(ip, 16));
    Ok(Flow {
        key: FlowKey {
            src: [wire(src), 0, 0, 0],
            dst: [wire(dst), 0, 0, 0],
            // Ports as on the wire, like the data plane's key.
            sport: word(0),
            dport: word(2),
            proto,
            family: FAMILY_V4,
            pad: [0; 2],
        },
        dst,
        dport: be16(l4, 2),
        proto,
        syn,
        fin_rst,
        tos: ip[1],
        tot_len,
    })
}

/// Where a frame ended up: the classes a campaign tallies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Passed: not IPv4 (other ethertypes, VLAN-tagged, IPv6).
    PassNotIpv4,
    /// Passed: IPv4 ethertype but cut before the addresses.
    PassShort,
    /// Passed: an IPv4 packet the balancer could not use, not for a VIP address.
    PassMalformed,
    /// Passed: a well-formed TCP/UDP packet for no VIP (another address, port or protocol).
    PassNoVip,
    Tx,
    Redirect,
    Drop(DropReason),
}

impl Class {
    /// Every class, in report order.
    pub fn all() -> Vec<Class> {
        let mut all = vec![
            Class::PassNotIpv4,
            Class::PassShort,
            Class::PassMalformed,
            Class::PassNoVip,
            Class::Tx,
            Class::Redirect,
        ];
        all.extend(DropReason::ALL.iter().map(|r| Class::Drop(*r)));
        all
    }

    /// Position in [`Class::all`].
    pub fn index(self) -> usize {
        match self {
            Class::PassNotIpv4 => 0,
            Class::PassShort => 1,
            Class::PassMalformed => 2,
            Class::PassNoVip => 3,
            Class::Tx => 4,
            Class::Redirect => 5,
            Class::Drop(reason) => 6 + reason as usize,
        }
    }

    pub fn name(self) -> String {
        match self {
            Class::PassNotIpv4 => "pass (not IPv4)".into(),
            Class::PassShort => "pass (IPv4 cut short)".into(),
            Class::PassMalformed => "pass (malformed, not to a VIP address)".into(),
            Class::PassNoVip => "pass (no VIP on address/port/protocol)".into(),
            Class::Tx => "tx".into(),
            Class::Redirect => "redirect".into(),
            Class::Drop(reason) => format!("drop {}", reason.name()),
        }
    }

    pub fn action(self) -> u32 {
        match self {
            Class::PassNotIpv4 | Class::PassShort | Class::PassMalformed | Class::PassNoVip => {
                XDP_PASS
            }
            Class::Tx => XDP_TX,
            Class::Redirect => XDP_REDIRECT,
            Class::Drop(_) => XDP_DROP,
        }
    }
}

/// What must happen to one frame.
#[derive(Clone, Debug)]
pub struct Expected {
    pub class: Class,
    /// Increments of `LB_GLOBAL_STATS`, sorted by index: every other counter stays.
    pub counters: Vec<(u32, u64)>,
    /// The exact output frame when forwarded (for a pass it is the input).
    pub output: Option<Vec<u8>>,
    /// What a forwarded packet adds to its VIP's and backend's traffic counters.
    pub traffic: Option<Traffic>,
    /// The flow-table entry the frame looked up or wrote, if it got that far.
    pub flow: Option<FlowKey>,
}

/// One forwarded packet's traffic counts.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    pub slot: u32,
    /// Bytes the program saw (the linear part of the frame).
    pub bytes: u64,
    pub new_flow: bool,
}

/// The oracle's view of a flow-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    pub generation: u32,
    /// The client sent FIN or RST (`FLOW_F_CLOSED`).
    pub closed: bool,
}

/// The reference: the configuration and the flow table as it must be.
pub struct Oracle {
    pub universe: Universe,
    pub flows: HashMap<FlowKey, Entry>,
    /// Bytes of a frame the program sees: a test run passes the rest in frags, which a program
    /// without `xdp.frags` cannot read (see `Campaign`).
    pub linear: usize,
}

/// Counter increments being collected for one frame.
#[derive(Default)]
struct Counts(Vec<(u32, u64)>);

impl Counts {
    fn add(&mut self, counter: Counter) {
        self.0.push((counter as u32, 1));
    }

    fn drop(mut self, reason: DropReason) -> Vec<(u32, u64)> {
        self.add(Counter::Drop);
        self.0.push((reason.counter_index(), 1));
        self.done()
    }

    fn done(mut self) -> Vec<(u32, u64)> {
        self.0.sort_unstable();
        self.0
    }
}

fn dropped(reason: DropReason, counts: Counts) -> Expected {
    Expected {
        class: Class::Drop(reason),
        counters: counts.drop(reason),
        output: None,
        traffic: None,
        flow: None,
    }
}

fn passed(class: Class, frame: &[u8]) -> Expected {
    let mut counts = Counts::default();
    counts.add(Counter::Pass);
    Expected {
        class,
        counters: counts.done(),
        output: Some(frame.to_vec()),
        traffic: None,
        flow: None,
    }
}

impl Oracle {
    pub fn new(universe: Universe, linear: usize) -> Self {
        Self {
            universe,
            flows: HashMap::new(),
            linear,
        }
    }

    /// What `lb_xdp` must do with `frame`; updates the flow table as the program must.
    pub fn expect(&mut self, frame: &[u8]) -> Expected {
        let seen = &frame[..frame.len().min(self.linear)];
        match parse(seen) {
            Parsed::NotIpv4 => passed(Class::PassNotIpv4, frame),
            Parsed::Short => passed(Class::PassShort, frame),
            Parsed::Malformed { dst, reason } => {
                if self.universe.is_vip_address(dst) {
                    dropped(reason, Counts::default())
                } else {
                    passed(Class::PassMalformed, frame)
                }
            }
            Parsed::Flow(flow) => match self.universe.vip(flow.dst, flow.dport, flow.proto) {
                None => passed(Class::PassNoVip, frame),
                Some(vip) => {
                    let vip = vip.clone();
                    self.forward(frame, &flow, &vip)
                }
            },
        }
    }

    /// The slot the VIP's Maglev table gives `key`, if it can take the flow.
    fn ring_backend(&self, vip: &VipDef, key: &FlowKey) -> Result<u32, DropReason> {
        if vip.ring.is_empty() {
            return Err(DropReason::NoBackend);
        }
        let index = vip.ring[flow_hash(key) as usize % vip.ring.len()];
        if index == RING_EMPTY {
            return Err(DropReason::NoBackend);
        }
        match self.universe.slot(index) {
            Some(slot) if slot.forwards_from_table() => Ok(index),
            _ => Err(DropReason::NoBackend),
        }
    }

    /// Rule 4: backend choice (and flow-table update), encapsulation, egress.
    fn forward(&mut self, frame: &[u8], flow: &Flow, vip: &VipDef) -> Expected {
        let key = flow.key;
        let mut counts = Counts::default();
        let table = self.ring_backend(vip, &key);
        let existing = self.flows.get(&key).copied();
        let valid = existing.filter(|e| {
            self.universe
                .slot(e.slot)
                .is_some_and(|s| s.generation == e.generation && s.keeps_flows())
        });
        let (index, new_flow) = match (flow.syn, table, existing, valid) {
            // A SYN of a flow the table has never seen opens it.
            (true, Ok(index), None, _) => {
                self.pin(key, index);
                counts.add(Counter::NewFlows);
                (index, true)
            }
            (_, _, _, Some(mut entry)) => {
                counts.add(Counter::FlowHits);
                if (flow.fin_rst && !entry.closed) || (flow.syn && entry.closed) {
                    entry.closed = !entry.closed;
                    self.flows.insert(key, entry);
                }
                (entry.slot, false)
            }
            (_, Err(reason), _, None) => {
                return Expected {
                    flow: Some(key),
                    ..dropped(reason, counts)
                };
            }
            (_, Ok(index), _, None) => {
                self.pin(key, index);
                counts.add(Counter::NewFlows);
                if !flow.syn && flow.proto == PROTO_TCP {
                    counts.add(Counter::FlowMisses);
                }
                (index, true)
            }
        };
        let Some(slot) = self.universe.slot(index) else {
            unreachable!("a pinned slot exists");
        };
        if slot.family != FAMILY_V4
            || slot.encap != ENCAP_IPIP
            || usize::from(flow.tot_len) + IPV4_HLEN > usize::from(u16::MAX)
        {
            return Expected {
                flow: Some(key),
                ..dropped(DropReason::EncapFailed, counts)
            };
        }
        let class = if slot.ifindex == TEST_RUN_IFINDEX {
            Class::Tx
        } else if self
            .universe
            .tx_ports
            .iter()
            .any(|(k, _)| *k == slot.ifindex)
        {
            Class::Redirect
        } else {
            return Expected {
                flow: Some(key),
                ..dropped(DropReason::NoRoute, counts)
            };
        };
        counts.add(if class == Class::Tx {
            Counter::Tx
        } else {
            Counter::Redirect
        });
        Expected {
            class,
            counters: counts.done(),
            output: Some(encapsulated(frame, flow, &slot)),
            traffic: Some(Traffic {
                slot: index,
                bytes: frame.len().min(self.linear) as u64,
                new_flow,
            }),
            flow: Some(key),
        }
    }

    fn pin(&mut self, key: FlowKey, index: u32) {
        let generation = self.universe.slot(index).map_or(0, |s| s.generation);
        self.flows.insert(
            key,
            Entry {
                slot: index,
                generation,
                closed: false,
            },
        );
    }
}

/// The frame the balancer must send: Ethernet toward the slot's next hop, an outer IPv4 header
/// (DF, TTL 64, TOS copied, source from the entropy prefix, valid checksum), then the received
/// IP packet and any padding, byte for byte.
fn encapsulated(frame: &[u8], flow: &Flow, slot: &lb_common::BackendSlot) -> Vec<u8> {
    let entropy = encap_entropy(&flow.key) & wire(ENCAP_MASK);
    let src = (wire(ENCAP_SRC) | entropy).to_ne_bytes();
    let mut out = Vec::with_capacity(frame.len() + IPV4_HLEN);
    out.extend_from_slice(&slot.dst_mac);
    out.extend_from_slice(&slot.src_mac);
    out.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut outer = [0u8; IPV4_HLEN];
    outer[0] = 0x45;
    outer[1] = flow.tos;
    outer[2..4].copy_from_slice(&(flow.tot_len + IPV4_HLEN as u16).to_be_bytes());
    outer[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    outer[8] = OUTER_TTL;
    outer[9] = IPPROTO_IPIP;
    outer[12..16].copy_from_slice(&src);
    outer[16..20].copy_from_slice(&slot.addr[0].to_ne_bytes());
    let csum = internet_checksum(0, &outer);
    outer[10..12].copy_from_slice(&csum.to_be_bytes());
    out.extend_from_slice(&outer);
    out.extend_from_slice(&frame[ETH_HLEN..]);
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::{
        balancer::VIP,
        packet::{self, TCP_SYN as SYN},
    };

    fn tcp(port: u16) -> Vec<u8> {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 40_000);
        packet::tcp_frame(src, SocketAddrV4::new(VIP, port), SYN, b"")
    }

    #[test]
    fn reference_parser_follows_the_rules() {
        let frame = tcp(80);
        assert!(matches!(parse(&frame), Parsed::Flow(f) if f.syn && f.dport == 80));
        assert_eq!(parse(&frame[..ETH_HLEN + 19]), Parsed::Short);
        let mut options = frame.clone();
        options[ETH_HLEN] = 0x46;
        assert!(matches!(
            parse(&options),
            Parsed::Malformed {
                reason: DropReason::IpOptions,
                ..
            }
        ));
        // Cut inside the TCP header: the total length no longer fits.
        assert!(matches!(
            parse(&frame[..frame.len() - 1]),
            Parsed::Malformed {
                reason: DropReason::BadIpHeader,
                ..
            }
        ));
        let mut vlan = frame.clone();
        vlan.splice(12..12, [0x81, 0, 0, 1]);
        assert_eq!(parse(&vlan), Parsed::NotIpv4);
    }

    #[test]
    fn oracle_predicts_each_vip_outcome() {
        let mut oracle = Oracle::new(Universe::standard(), 3520);
        let e = oracle.expect(&tcp(80));
        assert_eq!(e.class, Class::Tx);
        assert_eq!(
            e.counters,
            vec![(Counter::Tx as u32, 1), (Counter::NewFlows as u32, 1)]
        );
        let out = e.output.expect("output");
        assert_eq!(
            internet_checksum(0, &out[ETH_HLEN..ETH_HLEN + IPV4_HLEN]),
            0
        );
        assert_eq!(oracle.expect(&tcp(80)).counters[0].0, Counter::Tx as u32);
        assert_eq!(
            oracle.expect(&tcp(81)).class,
            Class::Drop(DropReason::NoBackend)
        );
        assert_eq!(
            oracle.expect(&tcp(82)).class,
            Class::Drop(DropReason::NoRoute)
        );
        assert_eq!(oracle.expect(&tcp(22)).class, Class::PassNoVip);
    }
}
