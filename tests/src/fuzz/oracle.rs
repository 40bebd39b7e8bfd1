//! The host-side reference of what `lb_xdp` must do with a frame, written from the rules (the
//! `DropReason` documentation, DESIGN.md's fast-path rules and the issue-9 contract in
//! `notes/ISSUE9-spec.md`) rather than from the data plane's code: the action, the exact counter
//! increments, the exact output frame, and the flow table afterwards.
//!
//! The rules, in the order they apply (where a frame breaks several, the order is the data
//! plane's, checked here so that a change shows):
//! 1. Neither IPv4 nor IPv6 over untagged Ethernet, or too short for the fixed IP header (20 or
//!    40 bytes): not ours, `XDP_PASS`.
//! 2. An IP header the balancer cannot use. IPv4: version not 4 or IHL < 5 (`BadIpHeader`),
//!    IHL > 5 (`IpOptions`), total length below 20 or beyond the frame (`BadIpHeader`), MF or
//!    a fragment offset (`Fragment`). IPv6: version not 6, payload length 0 or beyond the frame
//!    (`BadIpHeader`), next header 0/43/60 (`IpOptions`) or 44 (`Fragment`). Then a TCP header
//!    (20 bytes, data offset 5..=15 words) or UDP header (8 bytes) that does not fit inside the
//!    IP length (`BadL4Header`), then any protocol but TCP, UDP and the family's ICMP
//!    (`UnsupportedProtocol`). Dropped with that reason when the destination is a VIP address
//!    (of its family), passed otherwise.
//! 3. ICMP / ICMPv6 to no VIP address: `XDP_PASS`. To a VIP address: an ICMP header cut short
//!    by the IP length (`BadL4Header`); an echo request is answered in place (`XDP_TX`,
//!    `EchoReplies`) when `CFG_F_ECHO_REPLY` is set, else `UnsupportedProtocol`; an error
//!    (IPv4 3/11, ICMPv6 1/2/3) whose quote is a VIP flow (see `parse::quote`, else `BadIcmp`)
//!    goes to the flow's backend (valid flow entry, read-only, else the Maglev pick; none:
//!    `NoBackend`), encapsulated like a client packet (`IcmpForwarded` with `Tx`/`Redirect`);
//!    any other type `UnsupportedProtocol`.
//! 4. A well-formed TCP or UDP packet with no VIP on its (address, port, protocol): `XDP_PASS`.
//! 5. A packet for a VIP: the flow table's valid entry, or the VIP's Maglev table (a SYN or a
//!    UDP datagram opens a flow; any other TCP packet without an entry is a miss), then
//!    encapsulation toward the slot (IPIP or GUE, outer family the slot's), then egress:
//!    `XDP_TX` on the ingress interface, `XDP_REDIRECT` through the devmap, `NoRoute` without a
//!    devmap entry. Ethernet padding after the IP packet is carried along; the inner packet is
//!    unchanged. (The egress MTU check never fires here: see `Universe::standard`.)

use std::collections::HashMap;

use lb_common::{
    Counter, DropReason, FlowKey,
    hash::flow_hash,
    keys::{FAMILY_V4, PROTO_TCP, RING_EMPTY},
};

use crate::{
    bpf::{TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    fuzz::{
        parse::{self, Flow, ICMP_HLEN, Icmp, Parsed},
        reference::{self, Inner},
        universe::{Universe, VipDef},
    },
};

/// Where a frame ended up: the classes a campaign tallies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Passed: neither IPv4 nor IPv6 (other ethertypes, VLAN-tagged).
    PassNotIp,
    /// Passed: an IP ethertype but cut before the fixed header ends.
    PassShort,
    /// Passed: an IP packet the balancer could not use, not for a VIP address.
    PassMalformed,
    /// Passed: a well-formed TCP/UDP packet for no VIP, or ICMP to no VIP address.
    PassNoVip,
    Tx,
    Redirect,
    /// An echo reply sent back (`XDP_TX`).
    EchoReply,
    /// An ICMP error sent on to its flow's backend through the ingress interface.
    IcmpTx,
    /// An ICMP error sent on to its flow's backend through the devmap.
    IcmpRedirect,
    Drop(DropReason),
}

impl Class {
    /// Every class, in report order.
    pub fn all() -> Vec<Class> {
        let mut all = vec![
            Class::PassNotIp,
            Class::PassShort,
            Class::PassMalformed,
            Class::PassNoVip,
            Class::Tx,
            Class::Redirect,
            Class::EchoReply,
            Class::IcmpTx,
            Class::IcmpRedirect,
        ];
        all.extend(DropReason::ALL.iter().map(|r| Class::Drop(*r)));
        all
    }

    /// Whether a campaign must reach this class: growing a frame (`EncapFailed`) only fails
    /// when the kernel has no headroom, and no fuzz slot's egress has a small MTU (`TooBig`).
    pub fn reachable(self) -> bool {
        !matches!(
            self,
            Class::Drop(DropReason::EncapFailed | DropReason::TooBig)
        )
    }

    /// Position in [`Class::all`].
    pub fn index(self) -> usize {
        match self {
            Class::PassNotIp => 0,
            Class::PassShort => 1,
            Class::PassMalformed => 2,
            Class::PassNoVip => 3,
            Class::Tx => 4,
            Class::Redirect => 5,
            Class::EchoReply => 6,
            Class::IcmpTx => 7,
            Class::IcmpRedirect => 8,
            Class::Drop(reason) => 9 + reason as usize,
        }
    }

    pub fn name(self) -> String {
        match self {
            Class::PassNotIp => "pass (not IP)".into(),
            Class::PassShort => "pass (IP header cut short)".into(),
            Class::PassMalformed => "pass (malformed, not to a VIP address)".into(),
            Class::PassNoVip => "pass (no VIP on address/port/protocol)".into(),
            Class::Tx => "tx".into(),
            Class::Redirect => "redirect".into(),
            Class::EchoReply => "tx (echo reply)".into(),
            Class::IcmpTx => "tx (ICMP error to its flow's backend)".into(),
            Class::IcmpRedirect => "redirect (ICMP error to its flow's backend)".into(),
            Class::Drop(reason) => format!("drop {}", reason.name()),
        }
    }

    pub fn action(self) -> u32 {
        match self {
            Class::PassNotIp | Class::PassShort | Class::PassMalformed | Class::PassNoVip => {
                XDP_PASS
            }
            Class::Tx | Class::EchoReply | Class::IcmpTx => XDP_TX,
            Class::Redirect | Class::IcmpRedirect => XDP_REDIRECT,
            Class::Drop(_) => XDP_DROP,
        }
    }

    /// Whether an output of this class is the received packet encapsulated.
    pub fn forwarded(self) -> bool {
        matches!(
            self,
            Class::Tx | Class::Redirect | Class::IcmpTx | Class::IcmpRedirect
        )
    }
}

/// What must happen to one frame.
#[derive(Clone, Debug)]
pub struct Expected {
    pub class: Class,
    /// Increments of `LB_GLOBAL_STATS`, sorted by index: every other counter stays.
    pub counters: Vec<(u32, u64)>,
    /// The exact output frame when sent (for a pass it is the input).
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
    /// `CFG_F_ECHO_REPLY` as installed.
    pub echo_reply: bool,
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
            echo_reply: false,
        }
    }

    /// What `lb_xdp` must do with `frame`; updates the flow table as the program must.
    pub fn expect(&mut self, frame: &[u8]) -> Expected {
        let seen = &frame[..frame.len().min(self.linear)];
        match parse::parse(seen) {
            Parsed::NotIp => passed(Class::PassNotIp, frame),
            Parsed::Short => passed(Class::PassShort, frame),
            Parsed::Malformed { dst, reason } => {
                if self.universe.is_vip_address(dst) {
                    dropped(reason, Counts::default())
                } else {
                    passed(Class::PassMalformed, frame)
                }
            }
            Parsed::Icmp(icmp) => {
                if self.universe.is_vip_address(icmp.ip.dst) {
                    self.icmp(frame, &icmp)
                } else {
                    passed(Class::PassNoVip, frame)
                }
            }
            Parsed::Flow(flow) => match self.universe.vip(flow.ip.dst, flow.dport, flow.proto) {
                None => passed(Class::PassNoVip, frame),
                Some(vip) => {
                    let vip = vip.clone();
                    self.forward(frame, &flow, &vip)
                }
            },
        }
    }

    /// Rule 3: ICMP or ICMPv6 to a VIP address.
    fn icmp(&self, frame: &[u8], icmp: &Icmp) -> Expected {
        let msg = &icmp.payload;
        if msg.len() < ICMP_HLEN {
            return dropped(DropReason::BadL4Header, Counts::default());
        }
        let v4 = icmp.ip.family == FAMILY_V4;
        let kind = msg[0];
        let (echo, error) = if v4 {
            (kind == 8, kind == 3 || kind == 11)
        } else {
            (kind == 128, (1..=3).contains(&kind))
        };
        if echo {
            if !self.echo_reply {
                return dropped(DropReason::UnsupportedProtocol, Counts::default());
            }
            let mut counts = Counts::default();
            counts.add(Counter::EchoReplies);
            counts.add(Counter::Tx);
            return Expected {
                class: Class::EchoReply,
                counters: counts.done(),
                output: Some(reference::echo_reply(frame, icmp.ip.family)),
                traffic: None,
                flow: None,
            };
        }
        if !error {
            return dropped(DropReason::UnsupportedProtocol, Counts::default());
        }
        let Some(quote) = parse::quote(icmp.ip.family, msg) else {
            return dropped(DropReason::BadIcmp, Counts::default());
        };
        let (addr, port, proto) = quote.vip;
        let Some(vip) = self.universe.vip(addr, port, proto) else {
            return dropped(DropReason::BadIcmp, Counts::default());
        };
        let index = match self.valid_entry(&quote.key) {
            Some(entry) => entry.slot,
            None => match self.ring_backend(vip, &quote.key) {
                Ok(index) => index,
                Err(reason) => return dropped(reason, Counts::default()),
            },
        };
        let inner = Inner {
            key: quote.key,
            family: icmp.ip.family,
            tos: icmp.ip.tos,
            len: icmp.ip.len,
        };
        let mut counts = Counts::default();
        let class = match self.egress(index, &inner) {
            Ok(Class::Tx) => Class::IcmpTx,
            Ok(_) => Class::IcmpRedirect,
            Err(reason) => return dropped(reason, counts),
        };
        counts.add(Counter::IcmpForwarded);
        counts.add(if class == Class::IcmpTx {
            Counter::Tx
        } else {
            Counter::Redirect
        });
        let slot = self.universe.slot(index).expect("a chosen slot exists");
        Expected {
            class,
            counters: counts.done(),
            output: Some(reference::encapsulated(frame, &inner, &slot)),
            traffic: None,
            flow: None,
        }
    }

    /// The flow entry of `key` if its slot still takes it.
    fn valid_entry(&self, key: &FlowKey) -> Option<Entry> {
        self.flows.get(key).copied().filter(|e| {
            self.universe
                .slot(e.slot)
                .is_some_and(|s| s.generation == e.generation && s.keeps_flows())
        })
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

    /// Encapsulation and egress toward slot `index`: `Class::Tx` or `Class::Redirect`.
    fn egress(&self, index: u32, inner: &Inner) -> Result<Class, DropReason> {
        let slot = self.universe.slot(index).expect("a chosen slot exists");
        if reference::too_long(&slot, inner) {
            return Err(DropReason::EncapFailed);
        }
        if slot.ifindex == TEST_RUN_IFINDEX {
            Ok(Class::Tx)
        } else if self
            .universe
            .tx_ports
            .iter()
            .any(|(k, _)| *k == slot.ifindex)
        {
            Ok(Class::Redirect)
        } else {
            Err(DropReason::NoRoute)
        }
    }

    /// Rule 5: backend choice (and flow-table update), encapsulation, egress.
    fn forward(&mut self, frame: &[u8], flow: &Flow, vip: &VipDef) -> Expected {
        let key = flow.key;
        let mut counts = Counts::default();
        let table = self.ring_backend(vip, &key);
        let existing = self.flows.get(&key).copied();
        let valid = self.valid_entry(&key);
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
        let inner = Inner {
            key,
            family: flow.ip.family,
            tos: flow.ip.tos,
            len: flow.ip.len,
        };
        let class = match self.egress(index, &inner) {
            Ok(class) => class,
            Err(reason) => {
                return Expected {
                    flow: Some(key),
                    ..dropped(reason, counts)
                };
            }
        };
        counts.add(if class == Class::Tx {
            Counter::Tx
        } else {
            Counter::Redirect
        });
        let slot = self.universe.slot(index).expect("a chosen slot exists");
        Expected {
            class,
            counters: counts.done(),
            output: Some(reference::encapsulated(frame, &inner, &slot)),
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

    use super::*;
    use crate::{
        balancer::{VIP, VIP6},
        packet::{
            self, ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN,
            TCP_SYN as SYN, internet_checksum, pseudo_sum,
        },
    };

    fn tcp(port: u16) -> Vec<u8> {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 40_000);
        packet::tcp_frame(src, SocketAddrV4::new(VIP, port), SYN, b"")
    }

    fn tcp6(port: u16) -> Vec<u8> {
        let src: SocketAddr = "[2001:db8:c::1]:40000".parse().unwrap();
        packet::tcp_frame_ip(src, SocketAddr::new(IpAddr::V6(VIP6), port), SYN, b"")
    }

    #[test]
    fn reference_parser_follows_the_rules() {
        let frame = tcp(80);
        assert!(matches!(parse::parse(&frame), Parsed::Flow(f) if f.syn && f.dport == 80));
        assert_eq!(parse::parse(&frame[..ETH_HLEN + 19]), Parsed::Short);
        let mut options = frame.clone();
        options[ETH_HLEN] = 0x46;
        assert!(matches!(
            parse::parse(&options),
            Parsed::Malformed {
                reason: DropReason::IpOptions,
                ..
            }
        ));
        // Cut inside the TCP header: the total length no longer fits.
        assert!(matches!(
            parse::parse(&frame[..frame.len() - 1]),
            Parsed::Malformed {
                reason: DropReason::BadIpHeader,
                ..
            }
        ));
        let mut vlan = frame.clone();
        vlan.splice(12..12, [0x81, 0, 0, 1]);
        assert_eq!(parse::parse(&vlan), Parsed::NotIp);

        let v6 = tcp6(80);
        assert!(matches!(parse::parse(&v6), Parsed::Flow(f) if f.ip.len == 60));
        assert_eq!(parse::parse(&v6[..ETH_HLEN + 39]), Parsed::Short);
        for (next, reason) in [
            (0, DropReason::IpOptions),
            (43, DropReason::IpOptions),
            (60, DropReason::IpOptions),
            (44, DropReason::Fragment),
            (51, DropReason::UnsupportedProtocol),
            (1, DropReason::UnsupportedProtocol),
        ] {
            let mut f = v6.clone();
            f[ETH_HLEN + 6] = next;
            assert_eq!(
                parse::parse(&f),
                Parsed::Malformed {
                    dst: IpAddr::V6(VIP6),
                    reason
                },
                "next header {next}"
            );
        }
        let mut zero = v6.clone();
        zero[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&[0, 0]);
        assert!(matches!(
            parse::parse(&zero),
            Parsed::Malformed {
                reason: DropReason::BadIpHeader,
                ..
            }
        ));
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
        if out[12..14] == [0x08, 0] {
            assert_eq!(
                internet_checksum(0, &out[ETH_HLEN..ETH_HLEN + IPV4_HLEN]),
                0
            );
        }
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
        assert_eq!(oracle.expect(&tcp6(80)).class, Class::Tx);
        assert_eq!(
            oracle.expect(&tcp6(81)).class,
            Class::Drop(DropReason::NoBackend)
        );
        assert_eq!(oracle.expect(&tcp6(443)).class, Class::Redirect);
    }

    #[test]
    fn echo_replies_carry_valid_checksums() {
        let mut oracle = Oracle::new(Universe::standard(), 3520);
        let client = Ipv4Addr::new(198, 51, 100, 1);
        let echo = packet::icmp_message(8, 0, [0, 1, 0, 2], b"ping");
        let frame = packet::ip_frame(client.into(), VIP.into(), IPPROTO_ICMP, &echo);
        assert_eq!(
            oracle.expect(&frame).class,
            Class::Drop(DropReason::UnsupportedProtocol)
        );
        oracle.echo_reply = true;
        let out = oracle.expect(&frame).output.expect("reply");
        assert_eq!(
            internet_checksum(0, &out[ETH_HLEN..ETH_HLEN + IPV4_HLEN]),
            0
        );
        assert_eq!(internet_checksum(0, &out[ETH_HLEN + IPV4_HLEN..]), 0);

        let c6: Ipv6Addr = "2001:db8:c::1".parse().unwrap();
        let echo = packet::icmpv6_message(c6, VIP6, 128, 0, [0, 1, 0, 2], b"ping6");
        let frame = packet::ip_frame(c6.into(), VIP6.into(), IPPROTO_ICMPV6, &echo);
        let e = oracle.expect(&frame);
        assert_eq!(e.class, Class::EchoReply);
        let out = e.output.expect("reply");
        let msg = &out[ETH_HLEN + IPV6_HLEN..];
        let sum = pseudo_sum(VIP6.into(), c6.into(), IPPROTO_ICMPV6, msg.len());
        assert_eq!(internet_checksum(sum, msg), 0);
        assert_eq!(msg[0], 129);
    }

    #[test]
    fn icmp_errors_follow_their_quoted_flow() {
        let mut oracle = Oracle::new(Universe::standard(), 3520);
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 40_000);
        let quoted = packet::Ipv4::new(VIP, *client.ip(), IPPROTO_TCP)
            .packet(&[0, 80, 0x9c, 0x40, 1, 2, 3, 4]);
        let msg = packet::icmp_message(3, 4, [0, 0, 5, 0x78], &quoted);
        let router = Ipv4Addr::new(203, 0, 113, 1);
        let frame = packet::ip_frame(router.into(), VIP.into(), IPPROTO_ICMP, &msg);
        let e = oracle.expect(&frame);
        assert_eq!(e.class, Class::IcmpTx, "{e:?}");
        assert!(oracle.flows.is_empty(), "no flow entry written");
        let mut cut = msg.clone();
        cut.truncate(msg.len() - 1);
        let frame = packet::ip_frame(router.into(), VIP.into(), IPPROTO_ICMP, &cut);
        assert_eq!(
            oracle.expect(&frame).class,
            Class::Drop(DropReason::BadIcmp)
        );
    }
}
