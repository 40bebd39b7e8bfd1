//! Per-packet cost of `lb_xdp` with `BPF_PROG_TEST_RUN` and large repeat counts. The kernel
//! reruns a program on the buffer the previous repeat left (encapsulated, for the forwarding
//! paths), so `bench_reset` (lb-ebpf's `bpf-bench` object) restores the template frame on every
//! repeat, optionally gives it a new source address (a new flow), then tail-calls the program
//! under test. Each figure is net of the same reset program tail-calling `bench_pass` (an
//! `XDP_PASS` program), measured in the same run with the same rewrite; `bench_pass` run on its
//! own is the floor.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd as _,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, Map, ProgramArray},
    programs::{ProgramFd, Xdp},
};
use lb_common::{
    Counter, FlowKey, FlowValue, GlobalConfig,
    keys::{PROTO_TCP, PROTO_UDP},
    maps,
};

use lb_userspace::dataplane::kernel::update_entries;

use super::Figure;
use crate::{
    balancer::{ENCAP_MASK, ENCAP_SRC, Lb, VIP, VIP_PORT, backend, flow_key, wire},
    bpf::{TEST_RUN_IFINDEX, XDP_PASS, XDP_TX, load_program, pin_to_current_cpu},
    packet::{self, IPPROTO_TCP, TCP_ACK, TCP_SYN},
};

/// The length `bench_reset` restores (lb-ebpf/src/bin/bpf-bench.rs).
const FRAME_LEN: usize = 64;
pub(super) const RUNS: usize = 5;
/// The clock tick the bench publishes in `LB_CONFIG` (lbd publishes the real one).
const BENCH_TICK: u32 = 1000;
const RING_SIZE: u32 = 65_537;
const SLOTS: u32 = 16;
/// Flow table entries per CPU (the LRU lists are per CPU): 2 x 2^19 is lbd's default table
/// (`DEFAULT_FLOWS`) on this 2-CPU machine, with room for an insert case's 5 runs x 100,000
/// without evicting.
pub(super) const NEW_FLOW_TABLE: u32 = 1 << 19;
/// Flows of the spread hit path.
const SPREAD_FLOWS: u32 = 1 << 20;
/// Source addresses the reset program counts up from, one range per case.
const NEW_SYN_SRC: Ipv4Addr = Ipv4Addr::new(10, 16, 0, 0);
const NEW_ACK_SRC: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 0);
const SPREAD_SRC: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 40_000);
const NOT_A_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 200), 80);

/// The reset program's object with a program under test in its tail-call slot.
pub(super) struct Reset {
    ebpf: Ebpf,
}

impl Reset {
    pub(super) fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(lb_userspace::bench_object())
            .context("loading the bpf-bench object")?;
        load_program(&mut ebpf, "bench_reset");
        load_program(&mut ebpf, "bench_pass");
        Ok(Self { ebpf })
    }

    fn xdp(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("{name} in bpf-bench"))?
            .try_into()?)
    }

    /// Puts `prog` in the tail-call slot.
    pub(super) fn target(&mut self, prog: &ProgramFd) -> Result<()> {
        let mut progs =
            ProgramArray::try_from(self.ebpf.map_mut("BENCH_PROGS").context("BENCH_PROGS")?)?;
        progs.set(0, prog, 0)?;
        Ok(())
    }

    /// Targets this object's own `bench_pass`.
    pub(super) fn target_pass(&mut self) -> Result<()> {
        let fd = self.xdp("bench_pass")?.fd()?.try_clone()?;
        self.target(&fd)
    }

    /// The frame to restore and how many consecutive source addresses to cycle through from
    /// its own (0: none; a new one every packet while the count is not reached).
    pub(super) fn template(&mut self, frame: &[u8], flows: u32) -> Result<()> {
        let frame: [u8; FRAME_LEN] = frame
            .try_into()
            .with_context(|| format!("bench frames are {FRAME_LEN} bytes, not {}", frame.len()))?;
        let mut template: Array<_, [u8; FRAME_LEN]> = Array::try_from(
            self.ebpf
                .map_mut("BENCH_TEMPLATE")
                .context("BENCH_TEMPLATE")?,
        )?;
        template.set(0, frame, 0)?;
        let mut count: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("BENCH_FLOWS").context("BENCH_FLOWS")?)?;
        count.set(0, flows, 0)?;
        Ok(())
    }

    /// Runs `bench_reset` on `frame` `repeat` times: the action and the kernel's mean ns.
    pub(super) fn run(&self, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
        time(self.xdp("bench_reset")?, frame, repeat)
    }
}

fn time(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((result.return_value, result.duration.as_nanos() as f64))
}

/// (min, median) ns of `RUNS` runs, each checked to end in `action`.
fn measure(reset: &Reset, frame: &[u8], repeat: u32, action: u32) -> Result<(f64, f64)> {
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (got, ns) = reset.run(frame, repeat)?;
        ensure!(got == action, "expected XDP action {action}, got {got}");
        samples.push(ns);
    }
    samples.sort_by(f64::total_cmp);
    Ok((samples[0], samples[RUNS / 2]))
}

/// `frame` padded with zero payload to `FRAME_LEN` (lengths in the headers cover the padding).
pub(super) fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    packet::tcp_frame(src, dst, flags, &[0; FRAME_LEN - 54])
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    packet::udp_frame(src, dst, &[0; FRAME_LEN - 42])
}

/// The balancer with a TCP and a UDP VIP over `SLOTS` backends and a flow table of `flows`
/// entries per CPU (the flow table's LRU lists are per CPU).
fn balancer(flows: u32) -> Result<Lb> {
    balancer_from(lb_userspace::lb_object(), flows)
}

/// [`balancer`] from the balancer object `object` (lbd's, or a knock-out variant).
pub(super) fn balancer_from(object: &[u8], flows: u32) -> Result<Lb> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::FLOWS, flows.max(1024) * cpus)
        .map_max_entries(maps::RINGS, 2 * RING_SIZE)
        .load(object)
        .context("loading the bpf-balancer object")?;
    load_program(&mut ebpf, maps::PROG_LB);
    let mut config: Array<_, GlobalConfig> =
        Array::try_from(ebpf.map_mut(maps::CONFIG).context("LB_CONFIG")?)?;
    config.set(
        0,
        GlobalConfig {
            encap_src_v4: wire(ENCAP_SRC),
            encap_src_v4_mask: wire(ENCAP_MASK),
            now_tick: BENCH_TICK,
            ..GlobalConfig::default()
        },
        0,
    )?;
    let mut lb = Lb {
        ebpf,
        ring: Vec::new(),
    };
    for slot in 0..SLOTS {
        lb.set_backend(slot, backend(slot, TEST_RUN_IFINDEX));
    }
    let ring: Vec<u32> = (0..RING_SIZE).map(|i| i % SLOTS).collect();
    lb.add_vip(SocketAddrV4::new(VIP, VIP_PORT), PROTO_TCP, 0, RING_SIZE);
    lb.set_ring(0, &ring);
    lb.add_vip(
        SocketAddrV4::new(VIP, VIP_PORT),
        PROTO_UDP,
        RING_SIZE,
        RING_SIZE,
    );
    lb.set_ring(RING_SIZE, &ring);
    Ok(lb)
}

pub(super) fn lb_fd(lb: &Lb) -> Result<ProgramFd> {
    let prog: &Xdp = lb
        .ebpf
        .program(maps::PROG_LB)
        .context("lb_xdp")?
        .try_into()?;
    Ok(prog.fd()?.try_clone()?)
}

/// Flows per batch call.
const CHUNK: u32 = 65_536;

/// Inserts `count` established flows from consecutive source addresses at `SPREAD_SRC` with
/// `BPF_MAP_UPDATE_BATCH`, last seen at the published tick (so the hit path does not refresh
/// them).
fn prefill(lb: &Lb, count: u32) -> Result<()> {
    let Some(Map::LruHashMap(data)) = lb.ebpf.map(maps::FLOWS) else {
        bail!("LB_FLOWS is not an LRU hash");
    };
    let base = u32::from(SPREAD_SRC);
    for start in (0..count).step_by(CHUNK as usize) {
        let n = CHUNK.min(count - start);
        let keys: Vec<FlowKey> = (start..start + n)
            .map(|i| {
                let src = SocketAddrV4::new(Ipv4Addr::from(base + i), CLIENT.port());
                flow_key(src, SocketAddrV4::new(VIP, VIP_PORT), IPPROTO_TCP)
            })
            .collect();
        let values: Vec<FlowValue> = (start..start + n)
            .map(|i| FlowValue {
                slot: i % SLOTS,
                generation: 1,
                last_seen: BENCH_TICK,
                flags: 0,
            })
            .collect();
        update_entries(data.fd().as_fd(), &keys, &values).context("filling LB_FLOWS")?;
    }
    Ok(())
}

/// One `lb_xdp` case: what it runs and how.
pub(super) struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// Source addresses cycled by the reset program (0: the template's only).
    pub flows: u32,
    pub action: u32,
    /// The global counter every packet of the case must bump: proof the path is the one named
    /// (`None` for an object built without counters).
    pub counter: Option<Counter>,
    /// Inserts fill the flow table: fewer repeats.
    pub inserts: bool,
    pub target: Option<&'static str>,
}

impl Case {
    /// Repeats per run: fewer where inserts fill the table, 10x fewer when `quick`.
    pub(super) fn repeat(&self, quick: bool) -> u32 {
        let scale = if quick { 10 } else { 1 };
        (if self.inserts { 100_000 } else { 1_000_000 }) / scale
    }
}

/// Measures `cases` on `lb` net of the reset program with the same rewrite into `bench_pass`.
pub(super) fn run_cases(
    reset: &mut Reset,
    lb: &Lb,
    cases: &[Case],
    quick: bool,
) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for case in cases {
        let repeat = case.repeat(quick);
        reset.template(&case.frame, case.flows)?;
        reset.target_pass()?;
        let (base_min, base_median) = measure(reset, &case.frame, repeat, XDP_PASS)?;
        reset.target(&lb_fd(lb)?)?;
        let count = |counter: Option<Counter>| counter.map(|c| lb.counters()[c as usize]);
        let before = count(case.counter);
        let (min, median) = measure(reset, &case.frame, repeat, case.action)
            .with_context(|| case.name.to_string())?;
        if let (Some(before), Some(after)) = (before, count(case.counter)) {
            let expected = RUNS as u64 * u64::from(repeat);
            ensure!(
                after - before == expected,
                "{}: counter {:?} grew by {}, not {expected}: the path taken is not the one named",
                case.name,
                case.counter,
                after - before
            );
        }
        let rewrite = if case.flows == 0 { "" } else { " + new source" };
        figures.push(Figure {
            section: "test_run",
            name: case.name.to_string(),
            value: median - base_median,
            unit: "ns/packet",
            stats: vec![
                ("min".into(), min - base_min),
                ("median".into(), median - base_median),
                ("gross median".into(), median),
            ],
            baseline: Some((format!("reset{rewrite} -> XDP_PASS (median)"), base_median)),
            target: case.target.map(str::to_string),
            note: format!("net; {RUNS} runs x repeat {repeat}"),
        });
    }
    Ok(figures)
}

/// Opens the client's TCP flow of [`hit_case`] through the program itself.
pub(super) fn establish(lb: &Lb) -> Result<()> {
    let syn = tcp(CLIENT, SocketAddrV4::new(VIP, VIP_PORT), TCP_SYN);
    ensure!(lb.run(&syn).action == XDP_TX, "SYN not forwarded");
    Ok(())
}

pub(super) fn non_vip_case() -> Case {
    Case {
        name: "non-VIP packet (XDP_PASS)",
        frame: tcp(CLIENT, NOT_A_VIP, TCP_ACK),
        flows: 0,
        action: XDP_PASS,
        counter: Some(Counter::Pass),
        inserts: false,
        target: Some("<= 30"),
    }
}

/// The established flow [`establish`] opened.
pub(super) fn hit_case() -> Case {
    Case {
        name: "established flow (hit, IPIP, XDP_TX)",
        frame: tcp(CLIENT, SocketAddrV4::new(VIP, VIP_PORT), TCP_ACK),
        flows: 0,
        action: XDP_TX,
        counter: Some(Counter::FlowHits),
        inserts: false,
        target: Some("<= 100"),
    }
}

pub(super) fn new_syn_case() -> Case {
    Case {
        name: "new flow SYN (Maglev + insert), new 5-tuple per packet",
        frame: tcp(
            SocketAddrV4::new(NEW_SYN_SRC, CLIENT.port()),
            SocketAddrV4::new(VIP, VIP_PORT),
            TCP_SYN,
        ),
        flows: u32::MAX,
        action: XDP_TX,
        counter: Some(Counter::NewFlows),
        inserts: true,
        target: Some("<= 400"),
    }
}

/// The trivial program alone (its repeats are idempotent): the floor.
fn floor(reset: &Reset, quick: bool) -> Result<Figure> {
    let frame = tcp(CLIENT, NOT_A_VIP, TCP_ACK);
    let repeat = if quick { 100_000 } else { 1_000_000 };
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (action, ns) = time(reset.xdp("bench_pass")?, &frame, repeat)?;
        ensure!(action == XDP_PASS, "bench_pass returned {action}");
        samples.push(ns);
    }
    samples.sort_by(f64::total_cmp);
    Ok(Figure {
        section: "test_run",
        name: "trivial XDP_PASS program (floor)".into(),
        value: samples[RUNS / 2],
        unit: "ns/packet",
        stats: vec![
            ("min".into(), samples[0]),
            ("median".into(), samples[RUNS / 2]),
        ],
        baseline: None,
        target: None,
        note: format!("raw, not net of anything; {RUNS} runs x repeat {repeat}"),
    })
}

/// Every test-run figure; `quick` runs 10x fewer repeats and spreads over 10x fewer flows.
pub fn run(quick: bool) -> Result<Vec<Figure>> {
    pin_to_current_cpu()?;
    let mut reset = Reset::load()?;
    let vip = SocketAddrV4::new(VIP, VIP_PORT);
    let mut figures = Vec::new();

    figures.push(floor(&reset, quick)?);

    let lb = balancer(NEW_FLOW_TABLE)?;
    establish(&lb)?;
    let udp_frame = udp(CLIENT, vip);
    ensure!(lb.run(&udp_frame).action == XDP_TX, "UDP not forwarded");
    let cases = [
        non_vip_case(),
        hit_case(),
        Case {
            name: "UDP established flow (hit, XDP_TX)",
            frame: udp_frame,
            flows: 0,
            action: XDP_TX,
            counter: Some(Counter::FlowHits),
            inserts: false,
            target: None,
        },
    ];
    figures.extend(run_cases(&mut reset, &lb, &cases, quick)?);
    drop(lb);

    // Each insert case on an empty table of its own (lbd's default size on 2 CPUs), its 5 runs
    // filling it to half: an insert costs more as the table fills (60-100 ns more for a case
    // measured after another had filled the first half), so cases that shared one would not be
    // comparable.
    let inserting = [
        new_syn_case(),
        Case {
            name: "unknown flow, non-SYN (re-hash), new 5-tuple per packet",
            frame: tcp(SocketAddrV4::new(NEW_ACK_SRC, CLIENT.port()), vip, TCP_ACK),
            flows: u32::MAX,
            action: XDP_TX,
            counter: Some(Counter::FlowMisses),
            inserts: true,
            target: Some("<= 450"),
        },
    ];
    for case in inserting {
        let lb = balancer(NEW_FLOW_TABLE)?;
        figures.extend(run_cases(&mut reset, &lb, &[case], quick)?);
    }

    let spread = if quick {
        SPREAD_FLOWS / 10
    } else {
        SPREAD_FLOWS
    };
    // Room beyond the prefill so nothing is evicted.
    let lb = balancer(spread + spread / 2)?;
    prefill(&lb, spread)?;
    let case = Case {
        name: if quick {
            "established flow over 100K flows (hit, cycling)"
        } else {
            "established flow over 1M flows (hit, cycling)"
        },
        frame: tcp(SocketAddrV4::new(SPREAD_SRC, CLIENT.port()), vip, TCP_ACK),
        flows: spread,
        action: XDP_TX,
        counter: Some(Counter::FlowHits),
        inserts: false,
        target: Some("<= 100"),
    };
    figures.extend(run_cases(&mut reset, &lb, &[case], quick)?);
    Ok(figures)
}
