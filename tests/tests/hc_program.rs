//! `BPF_PROG_TEST_RUN` tests of `lb_hc_encap`, the tc egress program that sends health-check
//! packets through a backend slot's tunnel: a frame and an skb mark in, the tc action, the frame
//! and the mark out. Setup fills the balancer object's maps by hand; the check compares the
//! output with what `lb_xdp` makes of the same packet. Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use aya::programs::SchedClassifier;
use lb_common::{
    BackendSlot,
    keys::{
        ENCAP_GUE, FAMILY_V6, PROTO_TCP, PROTO_UDP, SLOT_ACTIVE, SLOT_DOWN, SLOT_DRAINING,
        SLOT_FREE, SLOT_RETIRED, wire_addr,
    },
    maps::{self, HC_MARK_BASE, MAX_BACKENDS, hc_mark},
};
use lb_tests::{
    balancer::{self, Lb, VIP, check_encapsulated, flow_key, vip_addr},
    bpf::{self, TEST_RUN_IFINDEX, XDP_TX},
    packet::{self, ETH_P_IP, GATEWAY_MAC, IPPROTO_TCP, Ipv4, TCP_SYN},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// Another egress interface (never used as a device: test runs do not redirect).
const OTHER_IFINDEX: u32 = 42;

/// The gateway's own address: a probe's source.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const SLOT: u32 = 5;

/// Byte offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`).
const SKB_MARK: usize = 8;
/// Context passed in: `struct __sk_buff` up to and including `tc_index`; the kernel zeroes the
/// rest. Only `mark` is set.
const SKB_CTX_IN: usize = 48;
/// Room for the whole `struct __sk_buff` the kernel writes back (192 bytes on 6.x).
const SKB_CTX_OUT: usize = 512;

fn is_root() -> bool {
    bpf::is_root("BPF_PROG_TEST_RUN")
}

/// Backend at 192.168.1.`index` behind `ifindex`, in `state`.
fn backend(index: u32, ifindex: u32, state: u8) -> BackendSlot {
    BackendSlot {
        state,
        generation: 3,
        ..balancer::backend(index, ifindex)
    }
}

/// The balancer object with both programs loaded on the same maps.
fn load() -> Lb {
    Lb::with_programs(&[maps::PROG_HC, maps::PROG_LB])
}

/// A TCP VIP whose one-entry table names `slot`, so `lb_xdp` sends every flow there.
fn route_vip_to(lb: &mut Lb, slot: u32) {
    lb.add_vip(vip_addr(), PROTO_TCP, 0, 1);
    lb.set_ring(0, &[slot]);
}

/// One run of the tc program.
struct TcRun {
    action: u32,
    frame: Vec<u8>,
    /// The skb mark after the run.
    mark: u32,
}

fn run_tc(lb: &Lb, frame: &[u8], mark: u32) -> TcRun {
    let prog: &SchedClassifier = lb
        .ebpf
        .program(maps::PROG_HC)
        .expect("lb_hc_encap")
        .try_into()
        .expect("classifier");
    let mut ctx_in = [0u8; SKB_CTX_IN];
    ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
    let mut ctx_out = [0u8; SKB_CTX_OUT];
    let run = bpf::test_run_ctx(prog, frame, &ctx_in, &mut ctx_out);
    let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().expect("4 bytes"));
    TcRun {
        action: run.action,
        frame: run.frame,
        mark,
    }
}

fn probe_src(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(GATEWAY, port)
}

#[test]
fn marked_probe_is_encapsulated_toward_its_slot_and_redirected() {
    if !is_root() {
        return;
    }
    let mut hc = load();
    let slot = backend(SLOT, OTHER_IFINDEX, SLOT_ACTIVE);
    hc.set_backend(SLOT, slot);
    // Another slot, to show the mark picks the slot.
    hc.set_backend(SLOT + 1, backend(SLOT + 1, OTHER_IFINDEX, SLOT_ACTIVE));

    let src = probe_src(50_000);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    let run = run_tc(&hc, &frame, hc_mark(SLOT));
    assert_eq!(run.action, TC_ACT_REDIRECT, "out of the slot's interface");
    check_encapsulated(
        &frame,
        &run.frame,
        &slot,
        &flow_key(src, vip_addr(), PROTO_TCP),
    );
    assert_eq!(
        run.mark, 0,
        "mark cleared: the next egress hook lets it pass"
    );

    // UDP, and a payload: the ports of either protocol feed the entropy.
    let src = probe_src(50_001);
    let frame = packet::udp_frame(src, vip_addr(), b"health?");
    let run = run_tc(&hc, &frame, hc_mark(SLOT));
    assert_eq!(run.action, TC_ACT_REDIRECT);
    check_encapsulated(
        &frame,
        &run.frame,
        &slot,
        &flow_key(src, vip_addr(), PROTO_UDP),
    );
}

#[test]
fn slot_on_the_current_interface_goes_on_without_redirect() {
    if !is_root() {
        return;
    }
    let mut hc = load();
    let slot = backend(SLOT, TEST_RUN_IFINDEX, SLOT_ACTIVE);
    hc.set_backend(SLOT, slot);
    let src = probe_src(50_002);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"GET / HTTP/1.0\r\n\r\n");
    let run = run_tc(&hc, &frame, hc_mark(SLOT));
    assert_eq!(run.action, TC_ACT_OK);
    check_encapsulated(
        &frame,
        &run.frame,
        &slot,
        &flow_key(src, vip_addr(), PROTO_TCP),
    );
    assert_eq!(run.mark, 0);
}

#[test]
fn probe_leaves_exactly_as_the_balancer_sends_client_packets() {
    if !is_root() {
        return;
    }
    let mut hc = load();
    route_vip_to(&mut hc, SLOT);
    // Every outer shape: IPv4 or IPv6 toward the backend, IP in IP or GUE.
    let v4 = backend(SLOT, TEST_RUN_IFINDEX, SLOT_ACTIVE);
    let v6 = BackendSlot {
        addr: wire_addr(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 11))).0,
        family: FAMILY_V6,
        ..v4
    };
    let gue = |slot: BackendSlot| BackendSlot {
        encap: ENCAP_GUE,
        encap_port: 6080u16.to_be(),
        ..slot
    };
    let shapes = [
        ("IPIP over IPv4", v4),
        ("IPIP over IPv6", v6),
        ("GUE over IPv4", gue(v4)),
        ("GUE over IPv6", gue(v6)),
    ];
    for (shape, slot) in shapes {
        hc.set_backend(SLOT, slot);
        for port in [50_010, 50_011, 61_234] {
            let frame = packet::tcp_frame(probe_src(port), vip_addr(), TCP_SYN, b"");
            let balanced = hc.run(&frame);
            assert_eq!(balanced.action, XDP_TX, "{shape}: lb_xdp forwards the SYN");
            let run = run_tc(&hc, &frame, hc_mark(SLOT));
            assert_eq!(run.action, TC_ACT_OK, "{shape}");
            assert_eq!(
                run.frame, balanced.frame,
                "{shape}, port {port}: byte for byte what lb_xdp sends"
            );
        }
    }
}

#[test]
fn unmarked_and_foreign_marks_pass_untouched() {
    if !is_root() {
        return;
    }
    let mut hc = load();
    hc.set_backend(SLOT, backend(SLOT, OTHER_IFINDEX, SLOT_ACTIVE));
    let frame = packet::tcp_frame(probe_src(50_020), vip_addr(), TCP_SYN, b"");
    let arp = packet::arp_frame(GATEWAY, VIP);
    // Marks that differ from a health-check mark only in the upper half, and common ones.
    let foreign = [
        0,
        SLOT,
        0x4000,
        (HC_MARK_BASE ^ 0x0001_0000) | SLOT,
        (HC_MARK_BASE ^ 0x8000_0000) | SLOT,
    ];
    for mark in foreign {
        for input in [&frame, &arp] {
            let run = run_tc(&hc, input, mark);
            assert_eq!(run.action, TC_ACT_OK, "mark {mark:#x}");
            assert_eq!(&run.frame, input, "mark {mark:#x}: frame untouched");
            assert_eq!(run.mark, mark, "mark {mark:#x} kept");
        }
    }
}

#[test]
fn probe_that_cannot_take_the_tunnel_is_dropped() {
    if !is_root() {
        return;
    }
    let mut hc = load();
    let frame = packet::tcp_frame(probe_src(50_030), vip_addr(), TCP_SYN, b"");
    let slots = [
        ("free slot", backend(1, OTHER_IFINDEX, SLOT_FREE)),
        ("retired slot", backend(2, OTHER_IFINDEX, SLOT_RETIRED)),
        (
            "down slot without a resolved next hop",
            backend(3, 0, SLOT_DOWN),
        ),
        (
            "unknown encapsulation kind",
            BackendSlot {
                encap: 9,
                ..backend(4, OTHER_IFINDEX, SLOT_ACTIVE)
            },
        ),
        (
            "unknown address family",
            BackendSlot {
                family: 0,
                ..backend(5, OTHER_IFINDEX, SLOT_ACTIVE)
            },
        ),
    ];
    for (index, (name, slot)) in (1u32..).zip(&slots) {
        hc.set_backend(index, *slot);
        let run = run_tc(&hc, &frame, hc_mark(index));
        assert_eq!(run.action, TC_ACT_SHOT, "{name}");
    }
    // A slot index past the end of LB_BACKENDS.
    let run = run_tc(&hc, &frame, hc_mark(MAX_BACKENDS + 1));
    assert_eq!(run.action, TC_ACT_SHOT, "slot past the table");

    // Marked packets it cannot encapsulate as the balancer would.
    hc.set_backend(SLOT, backend(SLOT, OTHER_IFINDEX, SLOT_ACTIVE));
    let mut options = Ipv4::new(GATEWAY, VIP, IPPROTO_TCP);
    options.options = vec![1, 1, 1, 0];
    let seg = packet::tcp_segment(probe_src(50_031), vip_addr(), TCP_SYN, b"");
    let with_options = packet::ethernet(
        GATEWAY_MAC,
        [2, 0, 0, 0, 0, 9],
        ETH_P_IP,
        &options.packet(&seg),
    );
    let cases = [
        ("ARP", packet::arp_frame(GATEWAY, VIP)),
        ("IPv4 with options", with_options),
    ];
    for (name, input) in cases {
        let run = run_tc(&hc, &input, hc_mark(SLOT));
        assert_eq!(run.action, TC_ACT_SHOT, "{name}");
    }
}

#[test]
fn slot_down_by_its_checks_or_draining_is_still_checked() {
    if !is_root() {
        return;
    }
    // A backend taken out for failing its checks must be probed through the tunnel to come
    // back; a draining one is still a backend whose tunnel matters.
    let mut hc = load();
    let src = probe_src(50_040);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    for state in [SLOT_DOWN, SLOT_DRAINING] {
        let slot = backend(SLOT, OTHER_IFINDEX, state);
        hc.set_backend(SLOT, slot);
        let run = run_tc(&hc, &frame, hc_mark(SLOT));
        assert_eq!(run.action, TC_ACT_REDIRECT, "state {state}");
        check_encapsulated(
            &frame,
            &run.frame,
            &slot,
            &flow_key(src, vip_addr(), PROTO_TCP),
        );
    }
}
