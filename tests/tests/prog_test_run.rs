//! `BPF_PROG_TEST_RUN` tests of `lb_xdp` and `lb_decap`: frames in, XDP action, frames and
//! counters out, for every path. Each test loads its own copy of the objects (so its own maps),
//! fills the maps by hand (setup), runs frames through the program (run) and checks the result
//! against what lb-common's hash predicts on the host (check). Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use aya::{Ebpf, EbpfLoader, maps::HashMap, programs::Xdp};
use lb_common::{
    BackendSlot, Counter, DropReason, FlowKey, FlowValue, TrafficCounters, VipKey,
    keys::{
        FLOW_F_CLOSED, PROTO_TCP, PROTO_UDP, RING_EMPTY, SLOT_ACTIVE, SLOT_DOWN, SLOT_DRAINING,
    },
    maps,
};
use lb_tests::{
    balancer::{
        ENCAP_SRC, Lb, TEST_RING_POOL, TEST_TICK, VIP, VIP_ID, VIP_PORT, backend,
        check_encapsulated, flow_key, vip_addr,
    },
    bpf::{self, Run, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    packet::{
        self, ETH_HLEN, ETH_P_IP, GATEWAY_MAC, IP_MF, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_HLEN, Ipv4, TCP_ACK, TCP_FIN, TCP_SYN,
    },
};

/// TCP RST flag (the packet builder has no constant for it).
const TCP_RST: u8 = 0x04;

const NOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 200);
const RING_OFFSET: u32 = 100;
const RING_SIZE: u32 = 13;
/// Backend slots the standard ring cycles through.
const SLOTS: [u32; 3] = [3, 4, 5];
/// A slot outside the standard ring, to move flows to.
const OTHER_SLOT: u32 = 9;

fn is_root() -> bool {
    bpf::is_root("BPF_PROG_TEST_RUN")
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), port)
}

/// The standard setup: TCP VIP 10.0.0.100:80 with a 13-entry ring cycling over slots 3, 4
/// and 5 (all egressing on the ingress interface).
fn standard() -> Lb {
    let mut lb = Lb::empty();
    lb.add_vip(vip_addr(), PROTO_TCP, RING_OFFSET, RING_SIZE);
    for slot in SLOTS {
        lb.set_backend(slot, backend(slot, TEST_RUN_IFINDEX));
    }
    lb.set_backend(OTHER_SLOT, backend(OTHER_SLOT, TEST_RUN_IFINDEX));
    let ring: Vec<u32> = (0..RING_SIZE)
        .map(|i| SLOTS[i as usize % SLOTS.len()])
        .collect();
    lb.set_ring(RING_OFFSET, &ring);
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

#[test]
fn syn_to_vip_goes_to_the_predicted_backend() {
    if !is_root() {
        return;
    }
    let lb = standard();
    // Several flows, so more than one ring position (and backend) is exercised.
    for port in 40_000..40_008 {
        let src = client(port);
        let seg = packet::tcp_segment(src, vip_addr(), TCP_SYN, b"");
        let mut ip = Ipv4::new(*src.ip(), VIP, IPPROTO_TCP);
        ip.tos = 0x28;
        let frame = packet::ethernet(GATEWAY_MAC, packet::CLIENT_MAC, ETH_P_IP, &ip.packet(&seg));

        let (run, counters) = lb.run_counting(&frame);

        let key = flow_key(src, vip_addr(), PROTO_TCP);
        let slot_index = lb.predicted_slot(&key);
        assert_eq!(run.action, XDP_TX, "port {port}");
        check_encapsulated(&frame, &run.frame, &lb.backend(slot_index), &key);
        assert_eq!(counters, counted(&[Counter::Tx, Counter::NewFlows]));
        let pinned = lb.flow(&key).expect("flow entry written");
        assert_eq!((pinned.slot, pinned.generation), (slot_index, 1));
    }
}

#[test]
fn udp_to_udp_vip_is_encapsulated() {
    if !is_root() {
        return;
    }
    let mut lb = standard();
    let dns = SocketAddrV4::new(VIP, 53);
    lb.add_vip(dns, PROTO_UDP, RING_OFFSET, RING_SIZE);
    let src = client(5353);
    let frame = packet::udp_frame(src, dns, b"query");
    let key = flow_key(src, dns, PROTO_UDP);

    let (first, counters) = lb.run_counting(&frame);
    assert_eq!(first.action, XDP_TX);
    check_encapsulated(
        &frame,
        &first.frame,
        &lb.backend(lb.predicted_slot(&key)),
        &key,
    );
    // UDP has no handshake: a datagram of an unknown flow starts one (it is not a miss).
    assert_eq!(counters, counted(&[Counter::Tx, Counter::NewFlows]));

    let (second, counters) = lb.run_counting(&frame);
    assert_eq!(
        second.frame, first.frame,
        "same flow, same backend and outer header"
    );
    assert_eq!(counters, counted(&[Counter::Tx, Counter::FlowHits]));
}

#[test]
fn ethernet_padding_is_carried_but_not_counted_in_lengths() {
    if !is_root() {
        return;
    }
    let lb = standard();
    let src = client(41_000);
    let mut frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    frame.resize(60, 0); // minimum Ethernet frame: 6 bytes of padding after the IP packet

    let run = lb.run(&frame);
    assert_eq!(run.action, XDP_TX);
    let key = flow_key(src, vip_addr(), PROTO_TCP);
    check_encapsulated(
        &frame,
        &run.frame,
        &lb.backend(lb.predicted_slot(&key)),
        &key,
    );
}

#[test]
fn established_flow_keeps_its_backend_when_the_ring_changes() {
    if !is_root() {
        return;
    }
    let mut lb = standard();
    let src = client(42_000);
    let key = flow_key(src, vip_addr(), PROTO_TCP);
    let first = lb.predicted_slot(&key);
    assert_eq!(
        lb.run(&packet::tcp_frame(src, vip_addr(), TCP_SYN, b""))
            .action,
        XDP_TX
    );

    lb.set_ring(RING_OFFSET, &[OTHER_SLOT; RING_SIZE as usize]);
    let ack = packet::tcp_frame(src, vip_addr(), TCP_ACK, b"data");
    let (run, counters) = lb.run_counting(&ack);
    assert_eq!(run.action, XDP_TX);
    check_encapsulated(&ack, &run.frame, &lb.backend(first), &key);
    assert_eq!(counters, counted(&[Counter::Tx, Counter::FlowHits]));

    // A new flow follows the new table.
    let other = client(42_001);
    let syn = packet::tcp_frame(other, vip_addr(), TCP_SYN, b"");
    let run = lb.run(&syn);
    assert_eq!(run.action, XDP_TX);
    let other_key = flow_key(other, vip_addr(), PROTO_TCP);
    check_encapsulated(&syn, &run.frame, &lb.backend(OTHER_SLOT), &other_key);
}

#[test]
fn pinned_flow_rehashes_only_when_its_slot_lets_go() {
    struct Case {
        name: &'static str,
        change: fn(&mut BackendSlot),
        stays: bool,
    }
    if !is_root() {
        return;
    }
    let cases = [
        Case {
            name: "slot reused (generation changed)",
            change: |s| s.generation += 1,
            stays: false,
        },
        Case {
            name: "backend down",
            change: |s| s.state = SLOT_DOWN,
            stays: false,
        },
        Case {
            name: "backend draining",
            change: |s| s.state = SLOT_DRAINING,
            stays: true,
        },
    ];
    for case in cases {
        // Setup: a flow pinned to its slot, then the slot changes and the ring moves away.
        let mut lb = standard();
        let src = client(43_000);
        let key = flow_key(src, vip_addr(), PROTO_TCP);
        let pinned = lb.predicted_slot(&key);
        assert_eq!(
            lb.run(&packet::tcp_frame(src, vip_addr(), TCP_SYN, b""))
                .action,
            XDP_TX
        );
        let mut slot = lb.backend(pinned);
        (case.change)(&mut slot);
        lb.set_backend(pinned, slot);
        lb.set_ring(RING_OFFSET, &[OTHER_SLOT; RING_SIZE as usize]);

        // Run: the next packet of the flow.
        let ack = packet::tcp_frame(src, vip_addr(), TCP_ACK, b"");
        let (run, counters) = lb.run_counting(&ack);

        // Check.
        assert_eq!(run.action, XDP_TX, "{}", case.name);
        let (expected, expected_counters) = if case.stays {
            (pinned, counted(&[Counter::Tx, Counter::FlowHits]))
        } else {
            (
                OTHER_SLOT,
                counted(&[Counter::Tx, Counter::NewFlows, Counter::FlowMisses]),
            )
        };
        check_encapsulated(&ack, &run.frame, &lb.backend(expected), &key);
        assert_eq!(counters, expected_counters, "{}", case.name);
        let entry = lb.flow(&key).expect("flow entry");
        assert_eq!(
            entry.slot, expected,
            "{}: flow entry points at the backend",
            case.name
        );
    }
}

/// Sets up a flow pinned to its predicted slot with its entry's `last_seen` backdated to 0 (so
/// a write of the current tick shows), then moves the ring away so that only the flow table can
/// keep the flow on its backend. Returns the flow's key and slot.
fn pinned_flow_with_old_entry(lb: &mut Lb, src: SocketAddrV4) -> (FlowKey, u32) {
    let key = flow_key(src, vip_addr(), PROTO_TCP);
    let pinned = lb.predicted_slot(&key);
    let syn = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    assert_eq!(lb.run(&syn).action, XDP_TX);
    let data = packet::tcp_frame(src, vip_addr(), TCP_ACK, b"data");
    assert_eq!(lb.run(&data).action, XDP_TX);
    let entry = lb.flow(&key).expect("flow entry");
    assert_eq!(entry.flags, 0, "SYN and data leave the entry open");
    lb.set_flow(
        &key,
        FlowValue {
            last_seen: 0,
            ..entry
        },
    );
    lb.set_ring(RING_OFFSET, &[OTHER_SLOT; RING_SIZE as usize]);
    (key, pinned)
}

/// Runs `frame` of the flow `key` and checks it went to `slot` as a flow-table hit, stamping
/// the entry with the published tick; returns the entry.
fn run_hit(lb: &Lb, frame: &[u8], key: &FlowKey, slot: u32, what: &str) -> FlowValue {
    let (run, counters) = lb.run_counting(frame);
    assert_eq!(run.action, XDP_TX, "{what}");
    check_encapsulated(frame, &run.frame, &lb.backend(slot), key);
    assert_eq!(
        counters,
        counted(&[Counter::Tx, Counter::FlowHits]),
        "{what}"
    );
    let entry = lb.flow(key).expect("flow entry");
    assert_eq!((entry.slot, entry.generation), (slot, 1), "{what}");
    assert_eq!(
        entry.last_seen, TEST_TICK,
        "{what}: last_seen is the tick in LB_CONFIG"
    );
    entry
}

#[test]
fn fin_or_rst_marks_the_flow_closed_and_keeps_its_backend() {
    if !is_root() {
        return;
    }
    for (name, flags) in [("FIN", TCP_FIN | TCP_ACK), ("RST", TCP_RST)] {
        let mut lb = standard();
        let src = client(43_500);
        let (key, pinned) = pinned_flow_with_old_entry(&mut lb, src);

        let closing = packet::tcp_frame(src, vip_addr(), flags, b"");
        let entry = run_hit(&lb, &closing, &key, pinned, name);
        assert_eq!(entry.flags, FLOW_F_CLOSED, "{name} closes the entry");

        // Late packets of the closing connection (the last ACK) still reach the backend and
        // leave the entry closed.
        let last_ack = packet::tcp_frame(src, vip_addr(), TCP_ACK, b"");
        let entry = run_hit(&lb, &last_ack, &key, pinned, name);
        assert_eq!(
            entry.flags, FLOW_F_CLOSED,
            "{name}: still closed after an ACK"
        );
    }
}

#[test]
fn syn_on_a_closed_entry_opens_it_again() {
    if !is_root() {
        return;
    }
    let mut lb = standard();
    let src = client(43_600);
    let (key, pinned) = pinned_flow_with_old_entry(&mut lb, src);
    let fin = packet::tcp_frame(src, vip_addr(), TCP_FIN | TCP_ACK, b"");
    assert_eq!(run_hit(&lb, &fin, &key, pinned, "FIN").flags, FLOW_F_CLOSED);
    let closed = lb.flow(&key).expect("flow entry");
    lb.set_flow(
        &key,
        FlowValue {
            last_seen: 0,
            ..closed
        },
    );

    // The client reuses the port: a new connection on the same 5-tuple.
    let syn = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    let entry = run_hit(&lb, &syn, &key, pinned, "SYN after FIN");
    assert_eq!(entry.flags, 0, "a SYN opens the closed entry again");
    let entry = run_hit(&lb, &syn, &key, pinned, "SYN retransmitted");
    assert_eq!(entry.flags, 0, "a SYN on an open entry changes nothing");
}

#[test]
fn the_rate_guard_forwards_new_flows_over_its_limit_without_recording_them() {
    if !is_root() {
        return;
    }
    // The guard counts per CPU, and a test run runs on the caller's CPU.
    bpf::pin_to_current_cpu().expect("pinning the test to its CPU");
    let mut lb = standard();
    lb.set_guard_limit(2);
    let syn = |port: u16| packet::tcp_frame(client(port), vip_addr(), TCP_SYN, b"");
    let key = |port: u16| flow_key(client(port), vip_addr(), PROTO_TCP);
    let mut recorded = Vec::new();
    for port in 41_000..41_005 {
        let frame = syn(port);
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_TX, "port {port}: forwarded either way");
        let slot = lb.predicted_slot(&key(port));
        check_encapsulated(&frame, &run.frame, &lb.backend(slot), &key(port));
        let expected = if port < 41_002 {
            counted(&[Counter::Tx, Counter::NewFlows])
        } else {
            counted(&[Counter::Tx])
        };
        assert_eq!(counters, expected, "port {port}");
        recorded.push(lb.flow(&key(port)).is_some());
    }
    assert_eq!(recorded, [true, true, false, false, false]);
    assert_eq!(lb.guard_unrecorded(), 3);

    // Over the limit, a recorded flow still hits, its retransmitted SYN too.
    let (run, counters) = lb.run_counting(&syn(41_000));
    assert_eq!(run.action, XDP_TX);
    assert_eq!(counters, counted(&[Counter::Tx, Counter::FlowHits]));
    assert_eq!(lb.guard_unrecorded(), 3, "a hit is not a new flow");

    // The next tick: an unrecorded flow's next packet re-hashes to the same backend and is
    // recorded now.
    lb.set_tick(TEST_TICK + 1);
    let ack = packet::tcp_frame(client(41_003), vip_addr(), TCP_ACK, b"data");
    let (run, counters) = lb.run_counting(&ack);
    assert_eq!(run.action, XDP_TX);
    let slot = lb.predicted_slot(&key(41_003));
    check_encapsulated(&ack, &run.frame, &lb.backend(slot), &key(41_003));
    assert_eq!(
        counters,
        counted(&[Counter::Tx, Counter::NewFlows, Counter::FlowMisses])
    );
    let entry = lb.flow(&key(41_003)).expect("recorded in the next tick");
    assert_eq!((entry.slot, entry.last_seen), (slot, TEST_TICK + 1));

    // No limit: everything is recorded.
    lb.set_guard_limit(0);
    for port in 41_010..41_020 {
        let (_, counters) = lb.run_counting(&syn(port));
        assert_eq!(counters, counted(&[Counter::Tx, Counter::NewFlows]));
    }
    assert_eq!(lb.guard_unrecorded(), 3);
}

#[test]
fn other_egress_interface_redirects_through_the_devmap() {
    // The devmap maps the slot's ifindex key to a real device; lo is always there.
    const ROUTED: u32 = 4242;
    const UNROUTED: u32 = 4343;
    if !is_root() {
        return;
    }
    let mut lb = standard();
    lb.set_tx_port(ROUTED, TEST_RUN_IFINDEX);

    for slot in SLOTS {
        lb.set_backend(slot, backend(slot, ROUTED));
    }
    let src = client(44_000);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    let key = flow_key(src, vip_addr(), PROTO_TCP);
    let (run, counters) = lb.run_counting(&frame);
    assert_eq!(run.action, XDP_REDIRECT);
    check_encapsulated(
        &frame,
        &run.frame,
        &lb.backend(lb.predicted_slot(&key)),
        &key,
    );
    assert_eq!(counters, counted(&[Counter::Redirect, Counter::NewFlows]));

    for slot in SLOTS {
        lb.set_backend(slot, backend(slot, UNROUTED));
    }
    let (run, counters) =
        lb.run_counting(&packet::tcp_frame(client(44_001), vip_addr(), TCP_SYN, b""));
    assert_eq!(
        run.action, XDP_DROP,
        "no devmap entry for the egress interface"
    );
    let mut expected = dropped(DropReason::NoRoute);
    expected.push((Counter::NewFlows as u32, 1));
    expected.sort_unstable();
    assert_eq!(counters, expected);
}

#[test]
fn traffic_not_for_a_vip_passes_untouched() {
    if !is_root() {
        return;
    }
    let lb = standard();
    let src = client(45_000);
    let mut short = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    short.truncate(ETH_HLEN + 16); // not even a whole IPv4 header: cannot tell where it goes
    let mut ipv6 = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let cases: [(&str, Vec<u8>); 7] = [
        (
            "TCP to another address",
            packet::tcp_frame(src, SocketAddrV4::new(NOT_VIP, VIP_PORT), TCP_SYN, b""),
        ),
        (
            "TCP to the VIP address on another port",
            packet::tcp_frame(src, SocketAddrV4::new(VIP, 22), TCP_SYN, b""),
        ),
        (
            "UDP to a TCP-only VIP",
            packet::udp_frame(src, vip_addr(), b"x"),
        ),
        ("ARP", packet::arp_frame(*src.ip(), VIP)),
        ("IPv6 ethertype", ipv6),
        ("IPv4 header cut short", short),
        (
            "Ethernet header only",
            packet::ethernet(GATEWAY_MAC, packet::CLIENT_MAC, ETH_P_IP, &[]),
        ),
    ];
    for (name, frame) in cases {
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_PASS, "{name}");
        assert_eq!(run.frame, frame, "{name}: frame untouched");
        assert_eq!(counters, counted(&[Counter::Pass]), "{name}");
    }
}

/// A malformed-frame builder: destination address in, frame out.
type Malformed = fn(Ipv4Addr) -> Vec<u8>;

fn tcp_to(dst: Ipv4Addr) -> Vec<u8> {
    packet::tcp_frame(
        client(46_000),
        SocketAddrV4::new(dst, VIP_PORT),
        TCP_SYN,
        b"",
    )
}

fn ip_frame(ip: &Ipv4, payload: &[u8]) -> Vec<u8> {
    packet::ethernet(
        GATEWAY_MAC,
        packet::CLIENT_MAC,
        ETH_P_IP,
        &ip.packet(payload),
    )
}

fn tcp_ip(dst: Ipv4Addr) -> Ipv4 {
    Ipv4::new(*client(46_000).ip(), dst, IPPROTO_TCP)
}

/// TCP frame whose header byte `at` (from the TCP header start) is set to `value`.
fn tcp_with_byte(dst: Ipv4Addr, at: usize, value: u8) -> Vec<u8> {
    let mut frame = tcp_to(dst);
    frame[ETH_HLEN + IPV4_HLEN + at] = value;
    frame
}

fn ip_with_field(dst: Ipv4Addr, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut frame = tcp_to(dst);
    frame[ETH_HLEN + at..ETH_HLEN + at + bytes.len()].copy_from_slice(bytes);
    packet::fix_ipv4_checksum(&mut frame);
    frame
}

fn malformed_cases() -> [(&'static str, Malformed, DropReason); 13] {
    [
        (
            "IP version 6 in an IPv4 frame",
            |d| ip_with_field(d, 0, &[0x65]),
            DropReason::BadIpHeader,
        ),
        (
            "IHL 4",
            |d| ip_with_field(d, 0, &[0x44]),
            DropReason::BadIpHeader,
        ),
        (
            "IHL 6 (options)",
            |d| {
                let mut ip = tcp_ip(d);
                ip.options = vec![1, 1, 1, 0];
                let seg = packet::tcp_segment(
                    client(46_000),
                    SocketAddrV4::new(d, VIP_PORT),
                    TCP_SYN,
                    b"",
                );
                ip_frame(&ip, &seg)
            },
            DropReason::IpOptions,
        ),
        (
            "first fragment (MF)",
            |d| ip_with_field(d, 6, &IP_MF.to_be_bytes()),
            DropReason::Fragment,
        ),
        (
            "later fragment (offset)",
            |d| ip_with_field(d, 6, &185u16.to_be_bytes()),
            DropReason::Fragment,
        ),
        (
            "total length beyond the frame",
            |d| ip_with_field(d, 2, &60u16.to_be_bytes()),
            DropReason::BadIpHeader,
        ),
        (
            "total length below the header",
            |d| ip_with_field(d, 2, &19u16.to_be_bytes()),
            DropReason::BadIpHeader,
        ),
        (
            "TCP header cut short",
            |d| ip_frame(&tcp_ip(d), &[0u8; 10]),
            DropReason::BadL4Header,
        ),
        (
            "TCP header present but beyond the total length",
            |d| {
                // Total length says 10 bytes of TCP; the rest of the header looks like padding.
                let mut frame = tcp_to(d);
                let len = (IPV4_HLEN + 10) as u16;
                frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&len.to_be_bytes());
                packet::fix_ipv4_checksum(&mut frame);
                frame
            },
            DropReason::BadL4Header,
        ),
        (
            "TCP data offset 4",
            |d| tcp_with_byte(d, 12, 4 << 4),
            DropReason::BadL4Header,
        ),
        (
            "TCP data offset past the segment",
            |d| tcp_with_byte(d, 12, 15 << 4),
            DropReason::BadL4Header,
        ),
        (
            "UDP header cut short",
            |d| ip_frame(&Ipv4::new(*client(1).ip(), d, IPPROTO_UDP), &[0u8; 4]),
            DropReason::BadL4Header,
        ),
        (
            "ICMP echo request",
            |d| {
                ip_frame(
                    &Ipv4::new(*client(1).ip(), d, IPPROTO_ICMP),
                    &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
                )
            },
            DropReason::UnsupportedProtocol,
        ),
    ]
}

#[test]
fn malformed_packets_to_a_vip_are_dropped_and_others_passed() {
    if !is_root() {
        return;
    }
    let lb = standard();
    for (name, build, reason) in malformed_cases() {
        let frame = build(VIP);
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_DROP, "{name} to a VIP address");
        assert_eq!(
            counters,
            dropped(reason),
            "{name}: counted as {}",
            reason.name()
        );

        let frame = build(NOT_VIP);
        let (run, counters) = lb.run_counting(&frame);
        assert_eq!(run.action, XDP_PASS, "{name} to another address");
        assert_eq!(run.frame, frame, "{name}: passed untouched");
        assert_eq!(counters, counted(&[Counter::Pass]), "{name}");
    }
}

#[test]
fn vip_without_a_usable_backend_drops_new_flows() {
    struct Case {
        name: &'static str,
        ring_offset: u32,
        ring_size: u32,
        entries: Vec<u32>,
        slot_state: u8,
    }
    if !is_root() {
        return;
    }
    let cases = [
        Case {
            name: "no table yet (ring size 0)",
            ring_offset: RING_OFFSET,
            ring_size: 0,
            entries: vec![],
            slot_state: SLOT_ACTIVE,
        },
        Case {
            name: "every entry RING_EMPTY",
            ring_offset: RING_OFFSET,
            ring_size: RING_SIZE,
            entries: vec![RING_EMPTY; RING_SIZE as usize],
            slot_state: SLOT_ACTIVE,
        },
        Case {
            name: "only a down backend",
            ring_offset: RING_OFFSET,
            ring_size: RING_SIZE,
            entries: vec![SLOTS[0]; RING_SIZE as usize],
            slot_state: SLOT_DOWN,
        },
        Case {
            name: "entry beyond LB_BACKENDS",
            ring_offset: RING_OFFSET,
            ring_size: RING_SIZE,
            entries: vec![maps::MAX_BACKENDS + 1; RING_SIZE as usize],
            slot_state: SLOT_ACTIVE,
        },
        Case {
            name: "table beyond the ring pool",
            ring_offset: TEST_RING_POOL,
            ring_size: RING_SIZE,
            entries: vec![],
            slot_state: SLOT_ACTIVE,
        },
    ];
    for case in cases {
        let mut lb = Lb::empty();
        lb.add_vip(vip_addr(), PROTO_TCP, case.ring_offset, case.ring_size);
        let mut slot = backend(SLOTS[0], TEST_RUN_IFINDEX);
        slot.state = case.slot_state;
        lb.set_backend(SLOTS[0], slot);
        lb.set_ring(case.ring_offset, &case.entries);

        let src = client(47_000);
        let (run, counters) = lb.run_counting(&packet::tcp_frame(src, vip_addr(), TCP_SYN, b""));

        assert_eq!(run.action, XDP_DROP, "{}", case.name);
        assert_eq!(counters, dropped(DropReason::NoBackend), "{}", case.name);
        assert!(
            lb.flow(&flow_key(src, vip_addr(), PROTO_TCP)).is_none(),
            "{}: no flow entry",
            case.name
        );
    }
}

#[test]
fn vip_and_backend_counters_count_packets_bytes_and_new_flows() {
    if !is_root() {
        return;
    }
    let lb = standard();
    let src = client(48_000);
    let frames = [
        packet::tcp_frame(src, vip_addr(), TCP_SYN, b""),
        packet::tcp_frame(src, vip_addr(), TCP_ACK, b"GET / HTTP/1.1\r\n\r\n"),
        packet::tcp_frame(src, vip_addr(), TCP_ACK, b""),
    ];
    for frame in &frames {
        assert_eq!(lb.run(frame).action, XDP_TX);
    }
    let expected = TrafficCounters {
        packets: 3,
        bytes: frames.iter().map(|f| f.len() as u64).sum(),
        new_flows: 1,
    };
    let slot = lb.predicted_slot(&flow_key(src, vip_addr(), PROTO_TCP));
    assert_eq!(
        lb.traffic(maps::VIP_STATS, VIP_ID),
        expected,
        "VIP counters"
    );
    assert_eq!(
        lb.traffic(maps::BACKEND_STATS, slot),
        expected,
        "backend counters"
    );
    for other in SLOTS.into_iter().filter(|s| *s != slot) {
        assert_eq!(
            lb.traffic(maps::BACKEND_STATS, other),
            TrafficCounters::default(),
            "slot {other} saw nothing"
        );
    }
}

/// The backend-side object with `LB_DECAP_VIPS` filled by the test.
struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    fn load(vips: &[Ipv4Addr]) -> Self {
        let mut ebpf = EbpfLoader::new()
            .load(lb_userspace::decap_object())
            .unwrap_or_else(|e| panic!("loading the lb-decap object: {e}"));
        for name in [maps::PROG_DECAP, maps::PROG_PASS] {
            bpf::load_program(&mut ebpf, name);
        }
        let mut decap_vips: HashMap<_, VipKey, u32> =
            HashMap::try_from(ebpf.map_mut(maps::DECAP_VIPS).expect("LB_DECAP_VIPS"))
                .expect("hash");
        for vip in vips {
            let key = VipKey::new(IpAddr::V4(*vip), 0, 0);
            decap_vips.insert(key, 1, 0).expect("insert decap VIP");
        }
        Self { ebpf }
    }

    fn run(&self, program: &str, frame: &[u8]) -> Run {
        let prog: &Xdp = self
            .ebpf
            .program(program)
            .expect("program")
            .try_into()
            .expect("xdp");
        bpf::test_run(prog, frame)
    }
}

/// `inner` (an Ethernet frame) inside an outer IPv4 header toward a backend, with `outer`'s
/// fields, in a frame with the backend-side MACs.
fn encapsulate(outer: &Ipv4, inner: &[u8]) -> Vec<u8> {
    packet::ethernet(
        [0x02, 0xbe, 0, 0, 0, 1],
        GATEWAY_MAC,
        ETH_P_IP,
        &outer.packet(&inner[ETH_HLEN..]),
    )
}

fn outer_header() -> Ipv4 {
    Ipv4::new(ENCAP_SRC, Ipv4Addr::new(192, 168, 1, 1), IPPROTO_IPIP)
}

#[test]
fn decap_strips_the_outer_header_of_packets_for_its_vips() {
    if !is_root() {
        return;
    }
    let decap = Decap::load(&[VIP]);
    let inner = packet::tcp_frame(client(49_000), vip_addr(), TCP_SYN, b"hello");
    let frame = encapsulate(&outer_header(), &inner);

    let run = decap.run(maps::PROG_DECAP, &frame);

    assert_eq!(run.action, XDP_PASS);
    let mut expected = frame[..ETH_HLEN].to_vec(); // the outer frame's MACs
    expected.extend_from_slice(&inner[ETH_HLEN..]);
    assert_eq!(
        run.frame, expected,
        "outer IPv4 header removed, inner packet as sent"
    );
}

#[test]
fn decap_leaves_everything_else_untouched() {
    if !is_root() {
        return;
    }
    let decap = Decap::load(&[VIP]);
    let to_vip = packet::tcp_frame(client(49_001), vip_addr(), TCP_SYN, b"");
    let to_other = packet::tcp_frame(client(49_001), SocketAddrV4::new(NOT_VIP, 80), TCP_SYN, b"");
    let mut with_options = outer_header();
    with_options.options = vec![1, 1, 1, 0];
    let mut truncated = encapsulate(&outer_header(), &to_vip);
    truncated.truncate(ETH_HLEN + IPV4_HLEN + 12);
    let cases: [(&str, Vec<u8>); 5] = [
        (
            "inner packet not for a local VIP",
            encapsulate(&outer_header(), &to_other),
        ),
        ("not IPIP", to_vip.clone()),
        (
            "outer header with options",
            encapsulate(&with_options, &to_vip),
        ),
        ("inner header cut short", truncated),
        (
            "ARP",
            packet::arp_frame(Ipv4Addr::new(192, 168, 1, 254), VIP),
        ),
    ];
    for (name, frame) in cases {
        let run = decap.run(maps::PROG_DECAP, &frame);
        assert_eq!(run.action, XDP_PASS, "{name}");
        assert_eq!(run.frame, frame, "{name}: untouched");
    }
}

#[test]
fn balancer_output_decapsulates_to_the_client_packet() {
    if !is_root() {
        return;
    }
    let lb = standard();
    let decap = Decap::load(&[VIP]);
    let frame = packet::tcp_frame(client(49_002), vip_addr(), TCP_ACK, b"payload");

    let encapsulated = lb.run(&frame);
    assert_eq!(encapsulated.action, XDP_TX);
    let run = decap.run(maps::PROG_DECAP, &encapsulated.frame);

    assert_eq!(run.action, XDP_PASS);
    assert_eq!(
        run.frame[..ETH_HLEN],
        encapsulated.frame[..ETH_HLEN],
        "backend-side MACs"
    );
    assert_eq!(
        run.frame[ETH_HLEN..],
        frame[ETH_HLEN..],
        "the client's packet"
    );
}

fn median(mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Per-packet cost with repeat = 1 per call (the kernel's duration includes its timer
/// overhead, which the `xdp_pass` floor shows). Printed, not asserted: timings depend on the host.
#[test]
fn per_packet_cost() {
    const CALLS: u16 = 2000;
    if !is_root() {
        return;
    }
    let lb = standard();
    let decap = Decap::load(&[VIP]);
    let src = client(50_000);
    let syn = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    let ack = packet::tcp_frame(src, vip_addr(), TCP_ACK, &[0u8; 64]);
    assert_eq!(lb.run(&syn).action, XDP_TX);

    let pass: Vec<u64> = (0..CALLS)
        .map(|_| {
            let run = decap.run(maps::PROG_PASS, &ack);
            assert_eq!(run.action, XDP_PASS);
            run.nanos
        })
        .collect();
    let hit: Vec<u64> = (0..CALLS)
        .map(|_| {
            let run = lb.run(&ack);
            assert_eq!(run.action, XDP_TX);
            run.nanos
        })
        .collect();
    // A new source port per call: the miss path (ring lookup, LRU insert), evicting as it goes.
    let miss: Vec<u64> = (0..CALLS)
        .map(|i| {
            let run = lb.run(&packet::tcp_frame(client(i), vip_addr(), TCP_SYN, b""));
            assert_eq!(run.action, XDP_TX);
            run.nanos
        })
        .collect();
    let decap_ns: Vec<u64> = (0..CALLS)
        .map(|_| {
            let run = decap.run(maps::PROG_DECAP, &lb.run(&ack).frame);
            assert_eq!(run.action, XDP_PASS);
            run.nanos
        })
        .collect();
    let (pass, hit, miss, decap_ns) = (median(pass), median(hit), median(miss), median(decap_ns));
    eprintln!(
        "median ns/packet over {CALLS} calls (repeat=1): xdp_pass {pass}, lb_xdp flow hit {hit} \
         (+{}), lb_xdp new flow {miss} (+{}), lb_decap strip {decap_ns} (+{})",
        hit.saturating_sub(pass),
        miss.saturating_sub(pass),
        decap_ns.saturating_sub(pass),
    );
}
