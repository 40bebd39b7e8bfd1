//! `BPF_PROG_TEST_RUN` tests of `lb_hc_encap`, the tc egress program that sends health-check
//! packets through a backend slot's tunnel: a frame and an skb mark in, the tc action, the frame
//! and the mark out. Setup fills the balancer object's maps by hand; the check compares the
//! output with what `lb_xdp` makes of the same packet. Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use lb_common::{
    BackendSlot, FlowKey, GlobalConfig, VipKey, VipMeta,
    hash::flow_hash,
    keys::{
        ENCAP_IPIP, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, SLOT_ACTIVE, SLOT_DOWN,
        SLOT_DRAINING, SLOT_FREE, SLOT_RETIRED, wire_addr,
    },
    maps::{self, HC_MARK_BASE, MAX_BACKENDS, hc_mark},
};
use lb_tests::packet::{
    self, ETH_HLEN, ETH_P_IP, GATEWAY_MAC, IP_DF, IPPROTO_IPIP, IPPROTO_TCP, IPV4_HLEN, Ipv4,
    TCP_SYN,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_TX: u32 = 3;

/// Without a context ifindex, `BPF_PROG_TEST_RUN` runs the program on the caller's loopback
/// device, always ifindex 1: a slot egressing there needs no redirect.
const TEST_RUN_IFINDEX: u32 = 1;
/// Another egress interface (never used as a device: test runs do not redirect).
const OTHER_IFINDEX: u32 = 42;

const TEST_FLOWS: u32 = 1024;
const TEST_RING_POOL: u32 = 4096;

/// The gateway's own address: a probe's source.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_PORT: u16 = 80;
const VIP_ID: u32 = 7;
const SLOT: u32 = 5;
const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
const ENCAP_MASK: Ipv4Addr = Ipv4Addr::new(0, 0, 255, 255);

/// Byte offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`).
const SKB_MARK: usize = 8;
/// Context passed in: `struct __sk_buff` up to and including `tc_index`; the kernel zeroes the
/// rest. Only `mark` is set.
const SKB_CTX_IN: usize = 48;
/// Room for the whole `struct __sk_buff` the kernel writes back (192 bytes on 6.x).
const SKB_CTX_OUT: usize = 512;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: BPF_PROG_TEST_RUN needs root (run the tests as root)");
    }
    root
}

fn wire(addr: Ipv4Addr) -> u32 {
    wire_addr(IpAddr::V4(addr)).0[0]
}

fn load_error(what: &str, e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!("verifier rejected {what}: {io_error}\n{verifier_log}"),
        other => format!("loading {what}: {other}"),
    }
}

/// Backend at 192.168.1.`index` behind `ifindex`, in `state`.
fn backend(index: u32, ifindex: u32, state: u8) -> BackendSlot {
    let n = index as u8;
    BackendSlot {
        addr: wire_addr(IpAddr::V4(Ipv4Addr::new(192, 168, 1, n))).0,
        family: FAMILY_V4,
        state,
        encap: ENCAP_IPIP,
        generation: 3,
        vip_id: VIP_ID,
        ifindex,
        dst_mac: [0x02, 0xbe, 0, 0, 0, n],
        src_mac: GATEWAY_MAC,
        ..BackendSlot::default()
    }
}

/// One run of the tc program.
struct TcRun {
    action: u32,
    frame: Vec<u8>,
    /// The skb mark after the run.
    mark: u32,
}

/// The balancer object with both programs loaded on the same maps.
struct Hc {
    ebpf: Ebpf,
}

impl Hc {
    fn load() -> Self {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, TEST_FLOWS)
            .map_max_entries(maps::RINGS, TEST_RING_POOL)
            .load(lb_userspace::lb_object())
            .unwrap_or_else(|e| panic!("loading the bpf-balancer object: {e}"));
        let tc: &mut SchedClassifier = ebpf
            .program_mut(maps::PROG_HC)
            .expect("lb_hc_encap in the object")
            .try_into()
            .expect("lb_hc_encap is a classifier");
        tc.load()
            .unwrap_or_else(|e| panic!("{}", load_error(maps::PROG_HC, &e)));
        let xdp: &mut Xdp = ebpf
            .program_mut(maps::PROG_LB)
            .expect("lb_xdp in the object")
            .try_into()
            .expect("lb_xdp is XDP");
        xdp.load()
            .unwrap_or_else(|e| panic!("{}", load_error(maps::PROG_LB, &e)));
        let mut config: Array<_, GlobalConfig> =
            Array::try_from(ebpf.map_mut(maps::CONFIG).expect("LB_CONFIG")).expect("array");
        let cfg = GlobalConfig {
            encap_src_v4: wire(ENCAP_SRC),
            encap_src_v4_mask: wire(ENCAP_MASK),
            ..GlobalConfig::default()
        };
        config.set(0, cfg, 0).expect("set LB_CONFIG");
        Self { ebpf }
    }

    fn set_backend(&mut self, index: u32, slot: BackendSlot) {
        let mut backends: Array<_, BackendSlot> =
            Array::try_from(self.ebpf.map_mut(maps::BACKENDS).expect("LB_BACKENDS"))
                .expect("array");
        backends.set(index, slot, 0).expect("set backend");
    }

    /// A TCP VIP whose one-entry table names `slot`, so `lb_xdp` sends every flow there.
    fn route_vip_to(&mut self, slot: u32) {
        let key = VipKey::new(IpAddr::V4(VIP), VIP_PORT, PROTO_TCP);
        let meta = VipMeta {
            vip_id: VIP_ID,
            flags: 0,
            ring_offset: 0,
            ring_size: 1,
        };
        let mut vips: HashMap<_, VipKey, VipMeta> =
            HashMap::try_from(self.ebpf.map_mut(maps::VIPS).expect("LB_VIPS")).expect("hash");
        vips.insert(key, meta, 0).expect("insert VIP");
        let mut rings: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(maps::RINGS).expect("LB_RINGS")).expect("array");
        rings.set(0, slot, 0).expect("set ring");
    }

    fn run_tc(&self, frame: &[u8], mark: u32) -> TcRun {
        let prog: &SchedClassifier = self
            .ebpf
            .program(maps::PROG_HC)
            .expect("lb_hc_encap")
            .try_into()
            .expect("classifier");
        let mut ctx_in = [0u8; SKB_CTX_IN];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_OUT];
        let mut out = vec![0u8; frame.len() + 256];
        // repeat = 1: with more, the kernel runs the program again on the modified packet.
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of lb_hc_encap: {e}"));
        out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().expect("4 bytes"));
        TcRun {
            action: result.return_value,
            frame: out,
            mark,
        }
    }

    fn run_xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self
            .ebpf
            .program(maps::PROG_LB)
            .expect("lb_xdp")
            .try_into()
            .expect("xdp");
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of lb_xdp: {e}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }
}

fn probe_src(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(GATEWAY, port)
}

fn vip_addr() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src: wire_addr(IpAddr::V4(*src.ip())).0,
        dst: wire_addr(IpAddr::V4(*dst.ip())).0,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: FAMILY_V4,
        pad: [0; 2],
    }
}

/// Checks an encapsulated frame: Ethernet from the slot, a correct outer IPv4 header from the
/// entropy prefix to the slot's backend, the inner packet unchanged.
fn check_encapsulated(input: &[u8], output: &[u8], slot: &BackendSlot, key: &FlowKey) {
    assert_eq!(output.len(), input.len() + IPV4_HLEN, "grows by one header");
    let eth = packet::parse_ethernet(output).expect("output Ethernet");
    assert_eq!(eth.dst, slot.dst_mac, "next-hop MAC from the slot");
    assert_eq!(eth.src, slot.src_mac, "egress MAC from the slot");
    assert_eq!(eth.ethertype, ETH_P_IP);
    let inner = packet::parse_ipv4(&input[ETH_HLEN..]).expect("input IPv4");
    let outer = packet::parse_ipv4(eth.payload).expect("outer IPv4");
    assert_eq!(outer.header_len, IPV4_HLEN);
    assert!(outer.checksum_ok, "outer header checksum");
    assert_eq!(outer.proto, IPPROTO_IPIP);
    assert_eq!(outer.ttl, 64);
    assert_eq!(outer.frag, IP_DF);
    assert_eq!(outer.tos, inner.tos);
    assert_eq!(outer.total_len, inner.total_len + IPV4_HLEN as u16);
    assert_eq!(outer.dst, Ipv4Addr::from(slot.addr[0].to_ne_bytes()));
    let entropy = flow_hash(key) & wire(ENCAP_MASK);
    let src = Ipv4Addr::from((wire(ENCAP_SRC) | entropy).to_ne_bytes());
    assert_eq!(outer.src, src, "outer source: prefix | (flow hash & mask)");
    assert_eq!(&output[ETH_HLEN + IPV4_HLEN..], &input[ETH_HLEN..]);
}

#[test]
fn marked_probe_is_encapsulated_toward_its_slot_and_redirected() {
    if !is_root() {
        return;
    }
    let mut hc = Hc::load();
    let slot = backend(SLOT, OTHER_IFINDEX, SLOT_ACTIVE);
    hc.set_backend(SLOT, slot);
    // Another slot, to show the mark picks the slot.
    hc.set_backend(SLOT + 1, backend(SLOT + 1, OTHER_IFINDEX, SLOT_ACTIVE));

    let src = probe_src(50_000);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    let run = hc.run_tc(&frame, hc_mark(SLOT));
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
    let run = hc.run_tc(&frame, hc_mark(SLOT));
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
    let mut hc = Hc::load();
    let slot = backend(SLOT, TEST_RUN_IFINDEX, SLOT_ACTIVE);
    hc.set_backend(SLOT, slot);
    let src = probe_src(50_002);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"GET / HTTP/1.0\r\n\r\n");
    let run = hc.run_tc(&frame, hc_mark(SLOT));
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
    let mut hc = Hc::load();
    hc.set_backend(SLOT, backend(SLOT, TEST_RUN_IFINDEX, SLOT_ACTIVE));
    hc.route_vip_to(SLOT);
    for port in [50_010, 50_011, 61_234] {
        let frame = packet::tcp_frame(probe_src(port), vip_addr(), TCP_SYN, b"");
        let (action, balanced) = hc.run_xdp(&frame);
        assert_eq!(action, XDP_TX, "lb_xdp forwards the SYN");
        let run = hc.run_tc(&frame, hc_mark(SLOT));
        assert_eq!(run.action, TC_ACT_OK);
        assert_eq!(
            run.frame, balanced,
            "port {port}: byte for byte what lb_xdp sends"
        );
    }
}

#[test]
fn unmarked_and_foreign_marks_pass_untouched() {
    if !is_root() {
        return;
    }
    let mut hc = Hc::load();
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
            let run = hc.run_tc(input, mark);
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
    let mut hc = Hc::load();
    let frame = packet::tcp_frame(probe_src(50_030), vip_addr(), TCP_SYN, b"");
    let slots = [
        ("free slot", backend(1, OTHER_IFINDEX, SLOT_FREE)),
        ("retired slot", backend(2, OTHER_IFINDEX, SLOT_RETIRED)),
        (
            "down slot without a resolved next hop",
            backend(3, 0, SLOT_DOWN),
        ),
        (
            "IPv6 backend (no IPv6 outer header yet)",
            BackendSlot {
                family: FAMILY_V6,
                ..backend(4, OTHER_IFINDEX, SLOT_ACTIVE)
            },
        ),
    ];
    for (index, (name, slot)) in (1u32..).zip(&slots) {
        hc.set_backend(index, *slot);
        let run = hc.run_tc(&frame, hc_mark(index));
        assert_eq!(run.action, TC_ACT_SHOT, "{name}");
    }
    // A slot index past the end of LB_BACKENDS.
    let run = hc.run_tc(&frame, hc_mark(MAX_BACKENDS + 1));
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
        let run = hc.run_tc(&input, hc_mark(SLOT));
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
    let mut hc = Hc::load();
    let src = probe_src(50_040);
    let frame = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    for state in [SLOT_DOWN, SLOT_DRAINING] {
        let slot = backend(SLOT, OTHER_IFINDEX, state);
        hc.set_backend(SLOT, slot);
        let run = hc.run_tc(&frame, hc_mark(SLOT));
        assert_eq!(run.action, TC_ACT_REDIRECT, "state {state}");
        check_encapsulated(
            &frame,
            &run.frame,
            &slot,
            &flow_key(src, vip_addr(), PROTO_TCP),
        );
    }
}
