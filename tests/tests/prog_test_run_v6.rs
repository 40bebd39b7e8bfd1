//! `BPF_PROG_TEST_RUN` tests of `lb_xdp`'s issue-9 forwarding paths: IPv6 clients, IPv6
//! backends, either family inside the other, GUE over IPv4 and IPv6, and malformed IPv6. Each
//! expected frame is built here from the contract with the packet builders (not the data
//! plane's code), and compared byte for byte. Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{
    BackendSlot, Counter, DropReason,
    hash::{encap_entropy, flow_label, gue_source_port},
    keys::{ENCAP_GUE, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, wire_addr},
};
use lb_tests::{
    balancer::{
        ENCAP_MASK_V6, ENCAP_SRC_V6, Lb, VIP, VIP6, backend, backend_v6, expected_encap,
        flow_key_ip,
    },
    bpf::{self, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS, XDP_TX},
    packet::{
        self, CLIENT_MAC, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, GATEWAY_MAC, IPPROTO_IPIP, IPPROTO_IPV6,
        IPPROTO_TCP, IPPROTO_UDP, IPV6_HLEN, Ipv4, Ipv6, TCP_ACK, TCP_SYN,
    },
};

const RING_OFFSET: u32 = 100;
const RING_SIZE: u32 = 13;
const GUE_PORT: u16 = 6080;
const NOT_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x200);

fn is_root() -> bool {
    bpf::is_root("BPF_PROG_TEST_RUN")
}

fn client6(port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7)),
        port,
    )
}

fn client4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), port)
}

fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), port)
}

fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), port)
}

fn gue(mut slot: BackendSlot) -> BackendSlot {
    slot.encap = ENCAP_GUE;
    slot.encap_port = GUE_PORT.to_be();
    slot
}

/// A balancer whose VIP `vip`/`proto` sends every flow to `slot` (at index 3).
fn single(vip: SocketAddr, proto: u8, slot: BackendSlot) -> Lb {
    let mut lb = Lb::empty();
    lb.add_vip_ip(vip, proto, RING_OFFSET, RING_SIZE);
    lb.set_backend(3, slot);
    lb.set_ring(RING_OFFSET, &[3; RING_SIZE as usize]);
    lb
}

fn counted(items: &[Counter]) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = items.iter().map(|c| (*c as u32, 1)).collect();
    v.sort_unstable();
    v
}

fn dropped(reason: DropReason) -> Vec<(u32, u64)> {
    vec![(Counter::Drop as u32, 1), (reason.counter_index(), 1)]
}

/// A TCP frame of either family with TOS / traffic class `tos`.
fn tcp_tos(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8], tos: u8) -> Vec<u8> {
    let seg = packet::tcp_segment_ip(src, dst, flags, payload);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = Ipv4::new(s, d, IPPROTO_TCP);
            ip.tos = tos;
            return packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IP, &ip.packet(&seg));
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = Ipv6::new(s, d, IPPROTO_TCP);
            ip.traffic_class = tos;
            ip.flow_label = 0x12345;
            ip.packet(&seg)
        }
        _ => unreachable!("same family"),
    };
    packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IPV6, &ip)
}

struct Case {
    name: &'static str,
    client: SocketAddr,
    vip: SocketAddr,
    slot: BackendSlot,
    /// Outer family and protocol / next header, spelled out so the expected builder is checked.
    outer: (u8, u8),
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "IPv6 VIP, IPv6 backend (IPIP)",
            client: client6(40_000),
            vip: vip6(80),
            slot: backend_v6(3, TEST_RUN_IFINDEX),
            outer: (FAMILY_V6, IPPROTO_IPV6),
        },
        Case {
            name: "IPv4 VIP, IPv6 backend",
            client: client4(40_001),
            vip: vip4(80),
            slot: backend_v6(3, TEST_RUN_IFINDEX),
            outer: (FAMILY_V6, IPPROTO_IPIP),
        },
        Case {
            name: "IPv6 VIP, IPv4 backend",
            client: client6(40_002),
            vip: vip6(80),
            slot: backend(3, TEST_RUN_IFINDEX),
            outer: (FAMILY_V4, IPPROTO_IPV6),
        },
        Case {
            name: "GUE over IPv4, IPv4 client",
            client: client4(40_003),
            vip: vip4(80),
            slot: gue(backend(3, TEST_RUN_IFINDEX)),
            outer: (FAMILY_V4, IPPROTO_UDP),
        },
        Case {
            name: "GUE over IPv4, IPv6 client",
            client: client6(40_004),
            vip: vip6(80),
            slot: gue(backend(3, TEST_RUN_IFINDEX)),
            outer: (FAMILY_V4, IPPROTO_UDP),
        },
        Case {
            name: "GUE over IPv6, IPv6 client",
            client: client6(40_005),
            vip: vip6(80),
            slot: gue(backend_v6(3, TEST_RUN_IFINDEX)),
            outer: (FAMILY_V6, IPPROTO_UDP),
        },
        Case {
            name: "GUE over IPv6, IPv4 client",
            client: client4(40_006),
            vip: vip4(80),
            slot: gue(backend_v6(3, TEST_RUN_IFINDEX)),
            outer: (FAMILY_V6, IPPROTO_UDP),
        },
    ]
}

#[test]
fn every_family_and_encapsulation_forwards_syn_and_hit() {
    if !is_root() {
        return;
    }
    for case in cases() {
        let lb = single(case.vip, PROTO_TCP, case.slot);
        let key = flow_key_ip(case.client, case.vip, PROTO_TCP);
        for (flags, payload, want_counters) in [
            (
                TCP_SYN,
                &b""[..],
                counted(&[Counter::Tx, Counter::NewFlows]),
            ),
            (
                TCP_ACK,
                &b"hello"[..],
                counted(&[Counter::Tx, Counter::FlowHits]),
            ),
        ] {
            let frame = tcp_tos(case.client, case.vip, flags, payload, 0xb8);
            let (run, counters) = lb.run_counting(&frame);
            let name = case.name;
            assert_eq!(run.action, XDP_TX, "{name}");
            let want = expected_encap(&frame, &case.slot, &key, 0xb8);
            assert_eq!(run.frame, want, "{name}: output frame");
            assert_eq!(counters, want_counters, "{name}");
            // The few fields the contract names, read back from the output directly.
            let (family, proto) = case.outer;
            let entropy = encap_entropy(&key);
            if family == FAMILY_V6 {
                let ip = &run.frame[ETH_HLEN..];
                assert_eq!(
                    u16::from_be_bytes([run.frame[12], run.frame[13]]),
                    ETH_P_IPV6
                );
                assert_eq!(ip[6], proto, "{name}: next header");
                let first = u32::from_be_bytes(ip[..4].try_into().unwrap());
                assert_eq!(first & 0xf_ffff, flow_label(entropy), "{name}: flow label");
                assert_eq!((first >> 20) & 0xff, 0xb8, "{name}: traffic class");
                let word3 = u32::from_ne_bytes(ip[20..24].try_into().unwrap());
                let base = wire_addr(IpAddr::V6(ENCAP_SRC_V6)).0[3];
                assert_eq!(
                    word3,
                    base | (entropy & u32::from_ne_bytes(ENCAP_MASK_V6)),
                    "{name}: source word 3"
                );
            } else {
                assert_eq!(run.frame[ETH_HLEN + 9], proto, "{name}: protocol");
                assert_eq!(
                    packet::internet_checksum(0, &run.frame[ETH_HLEN..ETH_HLEN + 20]),
                    0,
                    "{name}: outer checksum"
                );
            }
            if proto == IPPROTO_UDP {
                let at = ETH_HLEN + if family == FAMILY_V6 { IPV6_HLEN } else { 20 };
                let udp = &run.frame[at..at + 8];
                assert_eq!(
                    u16::from_be_bytes([udp[0], udp[1]]),
                    gue_source_port(entropy),
                    "{name}"
                );
                assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT, "{name}");
                assert_eq!(
                    usize::from(u16::from_be_bytes([udp[4], udp[5]])),
                    frame.len() - ETH_HLEN + 8,
                    "{name}: UDP length"
                );
                assert_eq!(udp[6..8], [0, 0], "{name}: no UDP checksum");
            }
        }
        let entry = lb.flow(&key).expect("flow entry");
        assert_eq!(entry.slot, 3, "{}", case.name);
    }
}

#[test]
fn ipv6_udp_to_a_udp_vip_starts_a_flow() {
    if !is_root() {
        return;
    }
    let slot = backend_v6(3, TEST_RUN_IFINDEX);
    let lb = single(vip6(53), PROTO_UDP, slot);
    let frame = packet::udp_frame_ip(client6(5353), vip6(53), b"query");
    let key = flow_key_ip(client6(5353), vip6(53), PROTO_UDP);
    let (run, counters) = lb.run_counting(&frame);
    assert_eq!(run.action, XDP_TX);
    assert_eq!(run.frame, expected_encap(&frame, &slot, &key, 0));
    assert_eq!(counters, counted(&[Counter::Tx, Counter::NewFlows]));
    assert_eq!(key.family, FAMILY_V6);
    assert!(lb.flow(&key).is_some());
}

type Build = fn(Ipv6Addr) -> Vec<u8>;

fn v6_tcp(dst: Ipv6Addr) -> Vec<u8> {
    packet::tcp_frame_ip(
        client6(46_000),
        SocketAddr::new(IpAddr::V6(dst), 80),
        TCP_SYN,
        b"",
    )
}

fn v6_with(dst: Ipv6Addr, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut frame = v6_tcp(dst);
    frame[ETH_HLEN + at..ETH_HLEN + at + bytes.len()].copy_from_slice(bytes);
    frame
}

fn v6_raw(dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let src = match client6(1).ip() {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!(),
    };
    packet::ethernet(
        GATEWAY_MAC,
        CLIENT_MAC,
        ETH_P_IPV6,
        &Ipv6::new(src, dst, next).packet(payload),
    )
}

/// `next` extension header (8 bytes, pointing at TCP) before a TCP header.
fn v6_ext(dst: Ipv6Addr, next: u8) -> Vec<u8> {
    let mut body = vec![IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
    body.extend(packet::tcp_segment_ip(
        client6(46_000),
        SocketAddr::new(IpAddr::V6(dst), 80),
        TCP_SYN,
        b"",
    ));
    v6_raw(dst, next, &body)
}

fn malformed_v6() -> Vec<(&'static str, Build, DropReason)> {
    vec![
        (
            "version 4 in an IPv6 frame",
            |d| v6_with(d, 0, &[0x40]),
            DropReason::BadIpHeader,
        ),
        (
            "payload length 0",
            |d| v6_with(d, 4, &[0, 0]),
            DropReason::BadIpHeader,
        ),
        (
            "payload length beyond the frame",
            |d| v6_with(d, 4, &[0, 21]),
            DropReason::BadIpHeader,
        ),
        (
            "hop-by-hop options",
            |d| v6_ext(d, 0),
            DropReason::IpOptions,
        ),
        ("routing header", |d| v6_ext(d, 43), DropReason::IpOptions),
        (
            "destination options",
            |d| v6_ext(d, 60),
            DropReason::IpOptions,
        ),
        ("fragment header", |d| v6_ext(d, 44), DropReason::Fragment),
        (
            "TCP cut short",
            |d| v6_raw(d, IPPROTO_TCP, &[0; 19]),
            DropReason::BadL4Header,
        ),
        (
            "TCP data offset 4",
            |d| v6_with(d, IPV6_HLEN + 12, &[4 << 4]),
            DropReason::BadL4Header,
        ),
        (
            "TCP data offset past the payload",
            |d| v6_with(d, IPV6_HLEN + 12, &[6 << 4]),
            DropReason::BadL4Header,
        ),
        (
            "UDP cut short",
            |d| v6_raw(d, IPPROTO_UDP, &[0; 7]),
            DropReason::BadL4Header,
        ),
        (
            "ICMPv6 header cut short",
            |d| v6_raw(d, 58, &[128, 0, 0, 0]),
            DropReason::BadL4Header,
        ),
        ("AH", |d| v6_ext(d, 51), DropReason::UnsupportedProtocol),
        (
            "ICMP (IPv4's) in IPv6",
            |d| v6_raw(d, 1, &[8, 0, 0, 0, 0, 0, 0, 0]),
            DropReason::UnsupportedProtocol,
        ),
        (
            "SCTP",
            |d| v6_raw(d, 132, &[0; 12]),
            DropReason::UnsupportedProtocol,
        ),
    ]
}

#[test]
fn malformed_ipv6_to_a_vip_address_is_dropped_and_otherwise_passed() {
    if !is_root() {
        return;
    }
    let lb = single(vip6(80), PROTO_TCP, backend_v6(3, TEST_RUN_IFINDEX));
    for (name, build, reason) in malformed_v6() {
        let frame = build(VIP6);
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_DROP, "{name} to the VIP address");
        assert_eq!(counters, dropped(reason), "{name}: {}", reason.name());

        let frame = build(NOT_VIP6);
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_PASS, "{name} to another address");
        assert_eq!(run.frame, frame, "{name}: untouched");
        assert_eq!(counters, counted(&[Counter::Pass]), "{name}");
    }
}

#[test]
fn ipv6_not_for_a_vip_passes_untouched() {
    if !is_root() {
        return;
    }
    let lb = single(vip6(80), PROTO_TCP, backend_v6(3, TEST_RUN_IFINDEX));
    let mut short = v6_tcp(VIP6);
    short.truncate(ETH_HLEN + IPV6_HLEN - 1);
    // The VIP's IPv4 twin address in IPv6 (v4-mapped) is not the VIP.
    let mapped = IpAddr::V6(VIP.to_ipv6_mapped());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("TCP to another address", v6_tcp(NOT_VIP6)),
        (
            "TCP to the VIP address on another port",
            packet::tcp_frame_ip(client6(1), vip6(22), TCP_SYN, b""),
        ),
        (
            "UDP to a TCP-only VIP",
            packet::udp_frame_ip(client6(1), vip6(80), b"x"),
        ),
        ("fewer than 40 bytes of IPv6", short),
        (
            "the IPv4 VIP v4-mapped",
            packet::tcp_frame_ip(client6(1), SocketAddr::new(mapped, 80), TCP_SYN, b""),
        ),
        (
            "ICMPv6 to another address",
            v6_raw(NOT_VIP6, 58, &[128, 0, 0, 0, 0, 0, 0, 0]),
        ),
    ];
    for (name, frame) in cases {
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_PASS, "{name}");
        assert_eq!(run.frame, frame, "{name}: untouched");
        assert_eq!(counters, counted(&[Counter::Pass]), "{name}");
    }
}
