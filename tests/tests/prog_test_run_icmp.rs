//! `BPF_PROG_TEST_RUN` tests of `lb_xdp`'s ICMP paths (issue 9): echo replies for VIP
//! addresses, ICMP / ICMPv6 errors quoting a VIP flow sent on to the flow's backend, broken
//! quotes, and the egress-MTU check with its fragmentation-needed / packet-too-big replies (run
//! in a namespace of its own with a small-MTU veth: the helper looks the egress interface up in
//! the caller's namespace). Expected frames are built here; checksums are verified by a full
//! recomputation. Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{
    BackendSlot, Counter, DropReason, FlowValue,
    config::{CFG_F_ECHO_REPLY, CFG_F_TOO_BIG_REPLY},
    keys::{ENCAP_GUE, PROTO_TCP, PROTO_UDP},
};
use lb_tests::{
    balancer::{Lb, VIP, VIP6, backend, backend_v6, expected_encap, flow_key_ip},
    bpf::{self, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    netns::Netns,
    packet::{
        self, CLIENT_MAC, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, GATEWAY_MAC, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, Ipv4, Ipv6, TCP_ACK,
        TCP_SYN, internet_checksum, pseudo_sum,
    },
};

const RING_OFFSET: u32 = 100;
const RING_SIZE: u32 = 13;
/// The slot the ring names, and another one a flow entry can point at.
const RING_SLOT: u32 = 3;
const ENTRY_SLOT: u32 = 9;
const GUE_PORT: u16 = 6080;
const ROUTER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);

/// Builds the frame of a flow from client port `port`.
type Build = fn(u16) -> Vec<u8>;
/// Builds backend slot `index` egressing through `ifindex`.
type Make = fn(u32, u32) -> BackendSlot;

fn is_root() -> bool {
    bpf::is_root("BPF_PROG_TEST_RUN")
}

fn counted(items: &[Counter]) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = items.iter().map(|c| (*c as u32, 1)).collect();
    v.sort_unstable();
    v
}

fn dropped(reason: DropReason) -> Vec<(u32, u64)> {
    vec![(Counter::Drop as u32, 1), (reason.counter_index(), 1)]
}

fn with(mut counters: Vec<(u32, u64)>, more: &[Counter]) -> Vec<(u32, u64)> {
    counters.extend(more.iter().map(|c| (*c as u32, 1)));
    counters.sort_unstable();
    counters
}

/// TCP VIPs `VIP:80` and `[VIP6]:80` (and UDP on 53) whose ring names `RING_SLOT` only;
/// `ENTRY_SLOT` exists for flow entries; both slots are `make(index)`.
fn standard(make: fn(u32, u32) -> BackendSlot) -> Lb {
    let mut lb = Lb::empty();
    for (addr, port, proto) in [
        (IpAddr::V4(VIP), 80, PROTO_TCP),
        (IpAddr::V6(VIP6), 80, PROTO_TCP),
        (IpAddr::V4(VIP), 53, PROTO_UDP),
        (IpAddr::V6(VIP6), 53, PROTO_UDP),
    ] {
        lb.add_vip_ip(SocketAddr::new(addr, port), proto, RING_OFFSET, RING_SIZE);
    }
    lb.set_backend(RING_SLOT, make(RING_SLOT, TEST_RUN_IFINDEX));
    lb.set_backend(ENTRY_SLOT, make(ENTRY_SLOT, TEST_RUN_IFINDEX));
    lb.set_ring(RING_OFFSET, &[RING_SLOT; RING_SIZE as usize]);
    lb
}

/// IPv4 frame (TOS `tos`) around an ICMP message.
fn icmp4_frame(src: Ipv4Addr, dst: Ipv4Addr, tos: u8, msg: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4::new(src, dst, IPPROTO_ICMP);
    ip.tos = tos;
    packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IP, &ip.packet(msg))
}

fn icmp6_frame(src: Ipv6Addr, dst: Ipv6Addr, tc: u8, msg: &[u8]) -> Vec<u8> {
    let mut ip = Ipv6::new(src, dst, IPPROTO_ICMPV6);
    ip.traffic_class = tc;
    packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IPV6, &ip.packet(msg))
}

// ---------------------------------------------------------------- echo

#[test]
fn echo_requests_to_a_vip_address_are_answered_when_enabled() {
    if !is_root() {
        return;
    }
    let mut lb = standard(backend);
    let payload = b"abcdefghijklmnopqrstuvwxyz0123456789";
    // IPv4: request id 0x1234 seq 7, TOS 0x10, TTL 57.
    let request = packet::icmp_message(8, 0, [0x12, 0x34, 0, 7], payload);
    let mut ip = Ipv4::new(CLIENT4, VIP, IPPROTO_ICMP);
    ip.tos = 0x10;
    ip.ttl = 57;
    ip.id = 0x4242;
    let frame4 = packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IP, &ip.packet(&request));
    let reply = packet::icmp_message(0, 0, [0x12, 0x34, 0, 7], payload);
    let mut rip = Ipv4::new(VIP, CLIENT4, IPPROTO_ICMP);
    rip.tos = 0x10;
    rip.ttl = 64;
    rip.id = 0x4242;
    let want4 = packet::ethernet(CLIENT_MAC, GATEWAY_MAC, ETH_P_IP, &rip.packet(&reply));

    // IPv6: hop limit 50, traffic class 0x20, flow label kept.
    let request6 = packet::icmpv6_message(CLIENT6, VIP6, 128, 0, [0x12, 0x34, 0, 7], payload);
    let mut ip6 = Ipv6::new(CLIENT6, VIP6, IPPROTO_ICMPV6);
    ip6.hop_limit = 50;
    ip6.traffic_class = 0x20;
    ip6.flow_label = 0xabcde;
    let frame6 = packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IPV6, &ip6.packet(&request6));
    let reply6 = packet::icmpv6_message(VIP6, CLIENT6, 129, 0, [0x12, 0x34, 0, 7], payload);
    let mut rip6 = Ipv6::new(VIP6, CLIENT6, IPPROTO_ICMPV6);
    rip6.traffic_class = 0x20;
    rip6.flow_label = 0xabcde;
    let want6 = packet::ethernet(CLIENT_MAC, GATEWAY_MAC, ETH_P_IPV6, &rip6.packet(&reply6));

    for (name, frame, want) in [("IPv4", &frame4, &want4), ("IPv6", &frame6, &want6)] {
        lb.set_flags(0);
        let (run, counters) = lb.run_counting(frame);
        assert_eq!(run.action, XDP_DROP, "{name}: echo replies off");
        assert_eq!(counters, dropped(DropReason::UnsupportedProtocol), "{name}");

        lb.set_flags(CFG_F_ECHO_REPLY);
        let (run, counters) = lb.run_counting(frame);
        assert_eq!(run.action, XDP_TX, "{name}");
        assert_eq!(&run.frame, want, "{name}: reply bytes");
        assert_eq!(
            counters,
            counted(&[Counter::EchoReplies, Counter::Tx]),
            "{name}"
        );
        // Checksums by a full recomputation over the output.
        if name == "IPv4" {
            let ip = &run.frame[ETH_HLEN..];
            assert_eq!(
                internet_checksum(0, &ip[..IPV4_HLEN]),
                0,
                "IPv4 header checksum"
            );
            assert_eq!(internet_checksum(0, &ip[IPV4_HLEN..]), 0, "ICMP checksum");
        } else {
            let msg = &run.frame[ETH_HLEN + IPV6_HLEN..];
            let sum = pseudo_sum(VIP6.into(), CLIENT6.into(), IPPROTO_ICMPV6, msg.len());
            assert_eq!(internet_checksum(sum, msg), 0, "ICMPv6 checksum");
        }
    }
    // Echo requests to another address pass, whatever the flag.
    let other = packet::icmp_message(8, 0, [0, 1, 0, 1], b"x");
    let frame = icmp4_frame(CLIENT4, Ipv4Addr::new(10, 0, 0, 200), 0, &other);
    let (run, counters) = lb.run_counting(&frame);
    assert_eq!(
        (run.action, counters),
        (XDP_PASS, counted(&[Counter::Pass]))
    );
}

// ---------------------------------------------------------------- ICMP errors

/// The packet a backend sent to the client (VIP:80 -> client:cport), as a router quotes it:
/// IP header and 8 L4 bytes.
fn quote4(cport: u16, proto: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&80u16.to_be_bytes());
    l4.extend_from_slice(&cport.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0x11, 0x22]);
    Ipv4::new(VIP, CLIENT4, proto).packet(&l4)
}

fn quote6(cport: u16, proto: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&80u16.to_be_bytes());
    l4.extend_from_slice(&cport.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0x11, 0x22]);
    Ipv6::new(VIP6, CLIENT6, proto).packet(&l4)
}

fn frag_needed(quote: &[u8]) -> Vec<u8> {
    let msg = packet::icmp_message(3, 4, [0, 0, 0x05, 0x78], quote);
    icmp4_frame(ROUTER4, VIP, 0xc0, &msg)
}

fn too_big6(quote: &[u8]) -> Vec<u8> {
    let msg = packet::icmpv6_message(ROUTER6, VIP6, 2, 0, 1280u32.to_be_bytes(), quote);
    icmp6_frame(ROUTER6, VIP6, 0xc0, &msg)
}

fn gue6(index: u32, ifindex: u32) -> BackendSlot {
    BackendSlot {
        encap: ENCAP_GUE,
        encap_port: GUE_PORT.to_be(),
        ..backend_v6(index, ifindex)
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one flow through every case, in order
fn icmp_errors_go_to_the_flow_entry_backend_else_the_maglev_pick() {
    if !is_root() {
        return;
    }
    let families: [(&str, Build, IpAddr, IpAddr); 2] = [
        (
            "IPv4 frag-needed",
            |p| frag_needed(&quote4(p, IPPROTO_TCP)),
            CLIENT4.into(),
            VIP.into(),
        ),
        (
            "ICMPv6 packet-too-big",
            |p| too_big6(&quote6(p, IPPROTO_TCP)),
            CLIENT6.into(),
            VIP6.into(),
        ),
    ];
    let makes: [(&str, Make); 3] = [
        ("IPv4 IPIP", backend),
        ("IPv6 IPIP", backend_v6),
        ("IPv6 GUE", gue6),
    ];
    for (family, build, client, vip) in families {
        for (kind, make) in makes {
            let name = format!("{family} via {kind} slots");
            let mut lb = standard(make);
            let key = flow_key_ip(
                SocketAddr::new(client, 41_000),
                SocketAddr::new(vip, 80),
                PROTO_TCP,
            );

            // No flow entry: the Maglev pick, nothing written.
            let frame = build(41_000);
            let (run, counters) = lb.run_counting(&frame);
            assert_eq!(run.action, XDP_TX, "{name}");
            assert_eq!(
                run.frame,
                expected_encap(&frame, &lb.backend(RING_SLOT), &key, 0xc0),
                "{name}"
            );
            assert_eq!(
                counters,
                counted(&[Counter::IcmpForwarded, Counter::Tx]),
                "{name}"
            );
            assert!(lb.flow(&key).is_none(), "{name}: no flow entry created");

            // A flow entry on another slot wins, and is left as it was.
            let entry = FlowValue {
                slot: ENTRY_SLOT,
                generation: 1,
                last_seen: 17,
                flags: 0,
            };
            lb.set_flow(&key, entry);
            let (run, counters) = lb.run_counting(&frame);
            assert_eq!(run.action, XDP_TX, "{name}");
            assert_eq!(
                run.frame,
                expected_encap(&frame, &lb.backend(ENTRY_SLOT), &key, 0xc0),
                "{name}"
            );
            assert_eq!(
                counters,
                counted(&[Counter::IcmpForwarded, Counter::Tx]),
                "{name}"
            );
            assert_eq!(lb.flow(&key), Some(entry), "{name}: entry untouched");

            // A stale entry (slot reused) falls back to the Maglev pick.
            lb.set_flow(
                &key,
                FlowValue {
                    generation: 2,
                    ..entry
                },
            );
            let run = lb.run(&frame);
            assert_eq!(
                run.frame,
                expected_encap(&frame, &lb.backend(RING_SLOT), &key, 0xc0),
                "{name}: stale entry"
            );

            // The client's next packet of the flow still uses (and refreshes) the entry: the
            // ICMP error did not disturb it.
            lb.set_flow(&key, entry);
            let data = packet::tcp_frame_ip(
                SocketAddr::new(client, 41_000),
                SocketAddr::new(vip, 80),
                TCP_ACK,
                b"",
            );
            let (run, counters) = lb.run_counting(&data);
            assert_eq!(run.action, XDP_TX);
            assert_eq!(
                run.frame,
                expected_encap(&data, &lb.backend(ENTRY_SLOT), &key, 0),
                "{name}"
            );
            assert_eq!(
                counters,
                counted(&[Counter::Tx, Counter::FlowHits]),
                "{name}"
            );
        }
    }
}

#[test]
fn other_icmp_error_types_quoting_udp_are_forwarded_too() {
    if !is_root() {
        return;
    }
    let lb = standard(backend);
    let key4 = flow_key_ip(
        SocketAddr::new(CLIENT4.into(), 5353),
        SocketAddr::new(VIP.into(), 80),
        PROTO_UDP,
    );
    for (kind, code) in [(3u8, 3u8), (3, 1), (11, 0)] {
        let mut q = quote4(5353, IPPROTO_UDP);
        // The VIP's UDP port is 53 here; the quote names port 80: rewrite it.
        q[IPV4_HLEN..IPV4_HLEN + 2].copy_from_slice(&53u16.to_be_bytes());
        let msg = packet::icmp_message(kind, code, [0; 4], &q);
        let frame = icmp4_frame(ROUTER4, VIP, 0, &msg);
        let mut key = key4;
        key.dport = 53u16.to_be();
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_TX, "type {kind} code {code}");
        assert_eq!(
            run.frame,
            expected_encap(&frame, &lb.backend(RING_SLOT), &key, 0)
        );
        assert_eq!(counters, counted(&[Counter::IcmpForwarded, Counter::Tx]));
    }
    for kind in [1u8, 3] {
        let mut q = quote6(5353, IPPROTO_UDP);
        q[IPV6_HLEN..IPV6_HLEN + 2].copy_from_slice(&53u16.to_be_bytes());
        let msg = packet::icmpv6_message(ROUTER6, VIP6, kind, 0, [0; 4], &q);
        let frame = icmp6_frame(ROUTER6, VIP6, 0, &msg);
        let key = flow_key_ip(
            SocketAddr::new(CLIENT6.into(), 5353),
            SocketAddr::new(VIP6.into(), 53),
            PROTO_UDP,
        );
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_TX, "ICMPv6 type {kind}");
        assert_eq!(
            run.frame,
            expected_encap(&frame, &lb.backend(RING_SLOT), &key, 0)
        );
        assert_eq!(counters, counted(&[Counter::IcmpForwarded, Counter::Tx]));
    }
}

#[test]
#[allow(clippy::too_many_lines)] // a table of cases
fn broken_quotes_and_other_types_are_dropped() {
    if !is_root() {
        return;
    }
    let lb = standard(backend);
    let good4 = quote4(41_000, IPPROTO_TCP);
    let good6 = quote6(41_000, IPPROTO_TCP);
    let mut cases: Vec<(String, Vec<u8>, DropReason)> = Vec::new();
    // Every cut of the ICMP message: below 8 bytes the ICMP header itself is missing.
    let msg4 = packet::icmp_message(3, 4, [0, 0, 5, 0x78], &good4);
    for len in 0..msg4.len() {
        let reason = if len < 8 {
            DropReason::BadL4Header
        } else {
            DropReason::BadIcmp
        };
        cases.push((
            format!("IPv4 message cut to {len}"),
            icmp4_frame(ROUTER4, VIP, 0, &msg4[..len]),
            reason,
        ));
    }
    let msg6 = packet::icmpv6_message(ROUTER6, VIP6, 2, 0, [0, 0, 5, 0], &good6);
    for len in 0..msg6.len() {
        // An empty IPv6 payload is a bad IPv6 header (payload length 0) before it is anything.
        let reason = if len == 0 {
            DropReason::BadIpHeader
        } else if len < 8 {
            DropReason::BadL4Header
        } else {
            DropReason::BadIcmp
        };
        cases.push((
            format!("ICMPv6 message cut to {len}"),
            icmp6_frame(ROUTER6, VIP6, 0, &msg6[..len]),
            reason,
        ));
    }
    let edit4 = |f: fn(&mut Vec<u8>)| {
        let mut q = good4.clone();
        f(&mut q);
        frag_needed(&q)
    };
    let edit6 = |f: fn(&mut Vec<u8>)| {
        let mut q = good6.clone();
        f(&mut q);
        too_big6(&q)
    };
    let bad = DropReason::BadIcmp;
    cases.extend([
        (
            "quote version 6 in IPv4".into(),
            edit4(|q| q[0] = 0x65),
            bad,
        ),
        (
            "quote IHL 6".into(),
            edit4(|q| {
                q[0] = 0x46;
                q.splice(20..20, [1, 1, 1, 0]);
            }),
            bad,
        ),
        ("quote IHL 4".into(), edit4(|q| q[0] = 0x44), bad),
        (
            "quote protocol ICMP".into(),
            edit4(|q| q[9] = IPPROTO_ICMP),
            bad,
        ),
        ("quote from no VIP".into(), edit4(|q| q[15] = 99), bad),
        (
            "quote from the VIP's other port".into(),
            edit4(|q| q[21] = 81),
            bad,
        ),
        ("IPv6 quote in IPv4".into(), frag_needed(&good6), bad),
        (
            "quote version 4 in IPv6".into(),
            edit6(|q| q[0] = 0x40),
            bad,
        ),
        (
            "quote with an extension header".into(),
            edit6(|q| q[6] = 0),
            bad,
        ),
        (
            "quote with a fragment header".into(),
            edit6(|q| q[6] = 44),
            bad,
        ),
        (
            "quote protocol ICMPv6".into(),
            edit6(|q| q[6] = IPPROTO_ICMPV6),
            bad,
        ),
        (
            "quote from no VIP (IPv6)".into(),
            edit6(|q| q[23] ^= 1),
            bad,
        ),
        ("IPv4 quote in IPv6".into(), too_big6(&good4), bad),
    ]);
    // Quote beyond the outer IP length, though within the frame (the rest looks like padding).
    let mut short4 = frag_needed(&good4);
    let tot = u16::from_be_bytes([short4[ETH_HLEN + 2], short4[ETH_HLEN + 3]]) - 1;
    short4[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot.to_be_bytes());
    packet::fix_ipv4_checksum(&mut short4);
    cases.push(("quote beyond the IPv4 total length".into(), short4, bad));
    let mut short6 = too_big6(&good6);
    let pl = u16::from_be_bytes([short6[ETH_HLEN + 4], short6[ETH_HLEN + 5]]) - 1;
    short6[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&pl.to_be_bytes());
    cases.push(("quote beyond the IPv6 payload length".into(), short6, bad));
    // Types the balancer does not handle.
    for (kind, code) in [(0u8, 0u8), (5, 1), (12, 0), (13, 0)] {
        let msg = packet::icmp_message(kind, code, [0; 4], &good4);
        cases.push((
            format!("ICMP type {kind}"),
            icmp4_frame(ROUTER4, VIP, 0, &msg),
            DropReason::UnsupportedProtocol,
        ));
    }
    for kind in [4u8, 129, 135, 136] {
        let msg = packet::icmpv6_message(ROUTER6, VIP6, kind, 0, [0; 4], &good6);
        cases.push((
            format!("ICMPv6 type {kind}"),
            icmp6_frame(ROUTER6, VIP6, 0, &msg),
            DropReason::UnsupportedProtocol,
        ));
    }
    for (name, frame, reason) in cases {
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_DROP, "{name}");
        assert_eq!(
            counters,
            dropped(reason),
            "{name}: expected {}",
            reason.name()
        );
    }
    // An error quoting a VIP flow, sent to the client's address instead: not ours.
    let to_client = icmp4_frame(ROUTER4, CLIENT4, 0, &msg4);
    let (run, counters) = lb.run_counting(&to_client);
    assert_eq!(
        (run.action, counters),
        (XDP_PASS, counted(&[Counter::Pass]))
    );
}

#[test]
fn icmp_error_for_a_vip_without_backend_is_dropped() {
    if !is_root() {
        return;
    }
    let mut lb = Lb::empty();
    lb.add_vip_ip(SocketAddr::new(VIP.into(), 80), PROTO_TCP, RING_OFFSET, 0);
    let (run, counters) = lb.run_counting(&frag_needed(&quote4(41_000, IPPROTO_TCP)));
    assert_eq!(run.action, XDP_DROP);
    assert_eq!(counters, dropped(DropReason::NoBackend));
}

// ---------------------------------------------------------------- egress MTU

/// The 70-byte fragmentation-needed reply to the IPv4 `frame`.
fn frag_needed_reply(frame: &[u8], mtu: u16) -> Vec<u8> {
    let ip = &frame[ETH_HLEN..];
    let (src, dst) = (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
    );
    let [m0, m1] = mtu.to_be_bytes();
    let msg = packet::icmp_message(3, 4, [0, 0, m0, m1], &ip[..IPV4_HLEN + 8]);
    let mut out = Ipv4::new(dst, src, IPPROTO_ICMP);
    (out.id, out.frag, out.ttl) = (0, 0, 64);
    let dst_mac: [u8; 6] = frame[6..12].try_into().unwrap();
    let src_mac: [u8; 6] = frame[..6].try_into().unwrap();
    packet::ethernet(dst_mac, src_mac, ETH_P_IP, &out.packet(&msg))
}

/// The 110-byte packet-too-big reply to the IPv6 `frame`.
fn packet_too_big_reply(frame: &[u8], mtu: u32) -> Vec<u8> {
    let ip = &frame[ETH_HLEN..];
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
    let (src, dst) = (addr(8), addr(24));
    let msg = packet::icmpv6_message(dst, src, 2, 0, mtu.to_be_bytes(), &ip[..IPV6_HLEN + 8]);
    let dst_mac: [u8; 6] = frame[6..12].try_into().unwrap();
    let src_mac: [u8; 6] = frame[..6].try_into().unwrap();
    packet::ethernet(
        dst_mac,
        src_mac,
        ETH_P_IPV6,
        &Ipv6::new(dst, src, IPPROTO_ICMPV6).packet(&msg),
    )
}

/// A TCP frame whose IP packet is `ip_len` bytes long.
fn sized_tcp(client: IpAddr, vip: IpAddr, port: u16, flags: u8, ip_len: usize) -> Vec<u8> {
    let hdr = if client.is_ipv4() {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    } + 20;
    let payload = vec![0x5a; ip_len - hdr];
    packet::tcp_frame_ip(
        SocketAddr::new(client, port),
        SocketAddr::new(vip, 80),
        flags,
        &payload,
    )
}

#[test]
#[allow(clippy::too_many_lines)] // setup in the namespace, then a table of cases
fn packets_too_big_for_the_egress_mtu_get_a_reply_or_are_dropped() {
    if !is_root() {
        return;
    }
    let ns = Netns::new("ptr-mtu").expect("test namespace");
    for (dev, peer, mtu) in [
        ("mtu1400", "mtu1400p", "1400"),
        ("mtu500", "mtu500p", "500"),
    ] {
        ns.ip([
            "link", "add", dev, "mtu", mtu, "type", "veth", "peer", "name", peer, "mtu", mtu,
        ])
        .expect("veth pair");
        ns.ip(["link", "set", dev, "up"]).expect("veth up");
        ns.ip(["link", "set", peer, "up"]).expect("peer up");
    }
    let (if1400, if500) = (
        ns.ifindex("mtu1400").expect("ifindex"),
        ns.ifindex("mtu500").expect("ifindex"),
    );
    // The test run, the devmap's device lookup and bpf_check_mtu all resolve interfaces in
    // the calling thread's namespace.
    ns.run(move || {
        // (slot kind, client family, MTU left for the client's packet behind the 1400 device)
        let cases: [(&str, Make, IpAddr, IpAddr, u32); 4] = [
            (
                "IPv4 outer, IPv4 client",
                backend,
                CLIENT4.into(),
                VIP.into(),
                1380,
            ),
            (
                "IPv6 outer, IPv4 client",
                backend_v6,
                CLIENT4.into(),
                VIP.into(),
                1360,
            ),
            (
                "GUE over IPv6, IPv6 client",
                gue6,
                CLIENT6.into(),
                VIP6.into(),
                1352,
            ),
            (
                "IPv4 outer, IPv6 client",
                backend,
                CLIENT6.into(),
                VIP6.into(),
                1380,
            ),
        ];
        for (name, make, client, vip, room) in cases {
            let mut lb = standard(make);
            lb.set_backend(RING_SLOT, make(RING_SLOT, if1400));
            lb.set_tx_port(if1400, if1400);
            lb.set_flags(CFG_F_TOO_BIG_REPLY);
            let reply = |frame: &[u8]| {
                if client.is_ipv4() {
                    frag_needed_reply(frame, room as u16)
                } else {
                    packet_too_big_reply(frame, room)
                }
            };

            // 1500 bytes: too big; the new flow is recorded first.
            let frame = sized_tcp(client, vip, 42_000, TCP_SYN, 1500);
            let key = flow_key_ip(
                SocketAddr::new(client, 42_000),
                SocketAddr::new(vip, 80),
                PROTO_TCP,
            );
            let (run, counters) = lb.run_counting(&frame);
            assert_eq!(run.action, XDP_TX, "{name}");
            let want = reply(&frame);
            assert_eq!(
                run.frame.len(),
                if client.is_ipv4() { 70 } else { 110 },
                "{name}"
            );
            assert_eq!(run.frame, want, "{name}: reply bytes");
            assert_eq!(
                counters,
                counted(&[Counter::NewFlows, Counter::TooBigReplies, Counter::Tx]),
                "{name}"
            );
            assert!(
                lb.flow(&key).is_some(),
                "{name}: flow recorded before the MTU check"
            );
            let out = &run.frame[ETH_HLEN..];
            if client.is_ipv4() {
                assert_eq!(
                    internet_checksum(0, &out[..IPV4_HLEN]),
                    0,
                    "{name}: IPv4 checksum"
                );
                assert_eq!(
                    internet_checksum(0, &out[IPV4_HLEN..]),
                    0,
                    "{name}: ICMP checksum"
                );
            } else {
                let sum = pseudo_sum(vip, client, IPPROTO_ICMPV6, out.len() - IPV6_HLEN);
                assert_eq!(
                    internet_checksum(sum, &out[IPV6_HLEN..]),
                    0,
                    "{name}: ICMPv6 checksum"
                );
            }

            // Exactly the room left fits (redirected to the veth); one byte more does not.
            let fits = sized_tcp(client, vip, 42_000, TCP_ACK, room as usize);
            let (run, counters) = lb.run_counting(&fits);
            assert_eq!(run.action, XDP_REDIRECT, "{name}: {room} bytes fit");
            assert_eq!(
                run.frame,
                expected_encap(&fits, &lb.backend(RING_SLOT), &key, 0),
                "{name}"
            );
            assert_eq!(
                counters,
                counted(&[Counter::Redirect, Counter::FlowHits]),
                "{name}"
            );
            let over = sized_tcp(client, vip, 42_000, TCP_ACK, room as usize + 1);
            let (run, counters) = lb.run_counting(&over);
            assert_eq!(run.frame, reply(&over), "{name}: {} bytes", room + 1);
            assert_eq!(
                counters,
                counted(&[Counter::FlowHits, Counter::TooBigReplies, Counter::Tx]),
                "{name}"
            );

            // Replies off: dropped as too_big.
            lb.set_flags(0);
            let (run, counters) = lb.run_counting(&over);
            assert_eq!(run.action, XDP_DROP, "{name}");
            assert_eq!(
                counters,
                with(dropped(DropReason::TooBig), &[Counter::FlowHits]),
                "{name}"
            );
        }

        // Behind a 500-byte device: up to 576 bytes after encapsulation are never checked.
        let mut lb = standard(backend);
        lb.set_backend(RING_SLOT, backend(RING_SLOT, if500));
        lb.set_tx_port(if500, if500);
        lb.set_flags(CFG_F_TOO_BIG_REPLY);
        let (client, vip) = (IpAddr::from(CLIENT4), IpAddr::from(VIP));
        let key = flow_key_ip(
            SocketAddr::new(client, 43_000),
            SocketAddr::new(vip, 80),
            PROTO_TCP,
        );
        let small = sized_tcp(client, vip, 43_000, TCP_SYN, 576 - 20);
        let (run, counters) = lb.run_counting(&small);
        assert_eq!(run.action, XDP_REDIRECT, "556 + 20 bytes are not checked");
        assert_eq!(
            run.frame,
            expected_encap(&small, &lb.backend(RING_SLOT), &key, 0)
        );
        assert_eq!(counters, counted(&[Counter::Redirect, Counter::NewFlows]));
        let checked = sized_tcp(client, vip, 43_000, TCP_ACK, 576 - 20 + 1);
        let (run, counters) = lb.run_counting(&checked);
        assert_eq!(
            run.frame,
            frag_needed_reply(&checked, 480),
            "557 + 20 bytes are checked"
        );
        assert_eq!(
            counters,
            counted(&[Counter::FlowHits, Counter::TooBigReplies, Counter::Tx])
        );

        // ICMP errors are never checked, however large.
        let mut quote = quote4(43_000, IPPROTO_TCP);
        quote.extend(vec![0u8; 1400]);
        let frame = frag_needed(&quote);
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_REDIRECT, "a large ICMP error is forwarded");
        assert_eq!(
            counters,
            counted(&[Counter::IcmpForwarded, Counter::Redirect])
        );
    });
}
