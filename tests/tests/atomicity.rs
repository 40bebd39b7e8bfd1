//! Table swaps are atomic for packets in flight, on the real kernel: one thread keeps applying
//! plans that move a VIP between two backend sets (and their union, and another table size)
//! through the Reconciler and `KernelDataPlane`, while this thread runs `lb_xdp` on the same
//! pinned maps with `BPF_PROG_TEST_RUN`. Every SYN must leave encapsulated toward a backend of
//! one of the sets: never dropped for want of a backend, never toward another address. Needs
//! root; skips otherwise.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions, maps::PerCpuArray, programs::Xdp};
use lb_common::{DropReason, VipKey, keys::PROTO_TCP, maps};
use lb_tests::{
    bpf::{self, PinDir, XDP_TX},
    packet::{self, ETH_HLEN, TCP_SYN},
};
use lb_userspace::{
    dataplane::kernel::{KernelDataPlane, LoadOptions},
    reconcile::{BackendPlan, Egress, Reconciler, Tunnel, VipPlan},
};

/// `BPF_PROG_TEST_RUN` without a context runs on the loopback device (ifindex 1): slots
/// egressing there are sent with `XDP_TX`.
const LO: u32 = 1;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_PORT: u16 = 80;
/// Table sizes (primes) the plans alternate between.
const RING_SIZES: [u32; 2] = [251, 1021];
/// Freed regions and slots wait this long; far beyond one program run, even a preempted one.
const QUARANTINE: Duration = Duration::from_millis(50);
/// Room for every region quarantined at once at the swap rate seen here (about 2k/s).
const RING_POOL: u32 = 1 << 22;
const MIN_SWAPS: u64 = 2000;
const DEADLINE: Duration = Duration::from_secs(15);

fn is_root() -> bool {
    bpf::is_root("BPF maps, pins, BPF_PROG_TEST_RUN")
}

fn set(net: u8) -> Vec<Ipv4Addr> {
    (1..=4)
        .map(|host| Ipv4Addr::new(10, net, 0, host))
        .collect()
}

fn plan(backends: &[Ipv4Addr], ring_size: u32) -> VipPlan {
    VipPlan {
        key: VipKey::new(IpAddr::V4(VIP), VIP_PORT, PROTO_TCP),
        flags: 0,
        tunnel: Tunnel::Ipip,
        ring_size,
        backends: backends
            .iter()
            .map(|addr| BackendPlan {
                addr: IpAddr::V4(*addr),
                weight: 1,
                egress: Some(Egress {
                    ifindex: LO,
                    src_mac: [0x02, 0, 0, 0, 0, 0x02],
                    dst_mac: [0x02, 0xbe, 0, 0, 0, addr.octets()[1]],
                }),
                healthy: true,
            })
            .collect(),
    }
}

/// The n-th plan: A and B in turn, every seventh the union, every fifth the other table size.
fn nth_plan(n: u64, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> VipPlan {
    let union: Vec<Ipv4Addr> = a.iter().chain(b).copied().collect();
    let backends = match (n % 7, n % 2) {
        (3, _) => &union[..],
        (_, 0) => a,
        _ => b,
    };
    plan(backends, RING_SIZES[usize::from(n % 5 == 4)])
}

#[test]
fn packets_see_one_backend_set_or_the_other_while_tables_swap() {
    if !is_root() {
        return;
    }
    let pins = PinDir::new("atomicity");
    let (a, b) = (set(1), set(2));
    let allowed: BTreeSet<Ipv4Addr> = a.iter().chain(&b).copied().collect();
    let stop = AtomicBool::new(false);
    let swaps = AtomicU64::new(0);
    let (ready_tx, ready_rx) = mpsc::channel();

    let (packets, seen) = thread::scope(|scope| {
        let swapper = scope.spawn(|| {
            let mut dp = KernelDataPlane::load(&LoadOptions {
                pin_dir: pins.path().to_path_buf(),
                flow_table_size: 1 << 16,
                ring_pool_size: RING_POOL,
            })
            .unwrap_or_else(|e| panic!("loading the data plane: {e}"));
            let mut rec = Reconciler::adopt(&dp, QUARANTINE).expect("adopt");
            rec.apply(&mut dp, &[nth_plan(0, &a, &b)])
                .expect("first apply");
            ready_tx.send(()).expect("main thread waits");
            let mut n = 1;
            while !stop.load(Ordering::Relaxed) {
                rec.apply(&mut dp, &[nth_plan(n, &a, &b)])
                    .unwrap_or_else(|e| panic!("apply #{n}: {e}"));
                swaps.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        });
        // If the swapper panicked before it was ready, surface its panic.
        if ready_rx.recv().is_err() {
            let panic = swapper
                .join()
                .expect_err("the swapper stopped without a word");
            std::panic::resume_unwind(panic);
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_packets(&pins, &allowed, &swaps, &stop)
        }));
        stop.store(true, Ordering::Relaxed);
        let joined = swapper.join();
        match (result, joined) {
            (Err(panic), _) | (Ok(_), Err(panic)) => std::panic::resume_unwind(panic),
            (Ok(counts), Ok(())) => counts,
        }
    });

    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!(
        "{swaps} table swaps, {packets} packets, all XDP_TX to one of {} backends (saw {})",
        allowed.len(),
        seen.len()
    );
    assert!(swaps >= MIN_SWAPS, "only {swaps} swaps before the deadline");
    assert_eq!(seen, allowed, "every backend of A and B got packets");
}

/// The drop counters that are not zero, by reason.
fn drops(ebpf: &Ebpf) -> String {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(maps::GLOBAL_STATS).expect("LB_GLOBAL_STATS"))
            .expect("per-cpu array");
    DropReason::ALL
        .iter()
        .map(|r| {
            let n: u64 = stats
                .get(&r.counter_index(), 0)
                .map_or(0, |v| v.iter().sum());
            (r.name(), n)
        })
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs SYNs through `lb_xdp` (on the pinned maps) until the swapper did `MIN_SWAPS` swaps;
/// returns how many packets ran and which backends they went to.
fn run_packets(
    pins: &PinDir,
    allowed: &BTreeSet<Ipv4Addr>,
    swaps: &AtomicU64,
    stop: &AtomicBool,
) -> (u64, BTreeSet<Ipv4Addr>) {
    let mut loader = EbpfLoader::new();
    let map_dir = pins.path().join("maps");
    for name in maps::BALANCER_MAPS {
        assert!(map_dir.join(name).exists(), "{name} pinned");
        loader.map_pin_path(name, map_dir.join(name));
    }
    let mut ebpf = loader
        .load(lb_userspace::lb_object())
        .unwrap_or_else(|e| panic!("loading the bpf-balancer object: {e}"));
    bpf::load_program(&mut ebpf, maps::PROG_LB);
    let prog: &Xdp = ebpf
        .program(maps::PROG_LB)
        .expect("lb_xdp")
        .try_into()
        .expect("xdp");

    let started = Instant::now();
    let mut out = vec![0u8; 256];
    let mut seen = BTreeSet::new();
    let mut packets = 0u64;
    while swaps.load(Ordering::Relaxed) < MIN_SWAPS && !stop.load(Ordering::Relaxed) {
        assert!(
            started.elapsed() < DEADLINE,
            "deadline: {} swaps, {packets} packets",
            swaps.load(Ordering::Relaxed)
        );
        // A new flow almost every packet: the ring decides, not the flow table.
        let n = packets as u32;
        let client = SocketAddrV4::new(
            Ipv4Addr::new(198, 51, (n >> 16) as u8, (n >> 8) as u8),
            1024 + (n % 60_000) as u16,
        );
        let frame = packet::tcp_frame(client, SocketAddrV4::new(VIP, VIP_PORT), TCP_SYN, b"");
        out.resize(frame.len() + 64, 0);
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        packets += 1;
        assert_eq!(
            result.return_value,
            XDP_TX,
            "packet {packets} from {client} after {} swaps; drops so far: {}",
            swaps.load(Ordering::Relaxed),
            drops(&ebpf)
        );
        let frame_out = &out[..result.data_size_out as usize];
        let outer = packet::parse_ipv4(&frame_out[ETH_HLEN..])
            .unwrap_or_else(|e| panic!("packet {packets}: outer header: {e}"));
        assert!(
            allowed.contains(&outer.dst),
            "packet {packets} went to {}, not a backend of A or B",
            outer.dst
        );
        seen.insert(outer.dst);
    }
    (packets, seen)
}
