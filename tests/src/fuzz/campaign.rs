//! A fuzzing campaign: frames from the generator through `lb_xdp` (`BPF_PROG_TEST_RUN`), each
//! checked against the oracle: action, output frame, every global counter; and at checkpoints
//! the whole flow table and the per-VIP and per-backend traffic counters.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::{self, Write as _},
    io,
    os::fd::AsFd as _,
};

use aya::{
    TestRun as _, TestRunOptions,
    maps::{HashMap as BpfHashMap, Map},
    programs::Xdp,
};
use lb_common::{
    Counter, FlowKey, FlowValue, TrafficCounters,
    config::CFG_F_ECHO_REPLY,
    keys::{FLOW_F_CLOSED, PROTO_UDP, ip_from_wire},
    maps,
    stats::COUNTER_COUNT,
};
use lb_userspace::dataplane::kernel::sum_per_cpu_u64;

use crate::{
    balancer::{Lb, TEST_TICK, VIP, VIP_ID},
    bpf::XDP_TX,
    fuzz::{
        generate::{Frame, Generator, MIN_FRAME},
        oracle::{Class, Oracle},
        universe::Universe,
    },
    packet::{ETH_HLEN, IPV4_HLEN},
};

/// Flow entries the oracle lets accumulate before a checkpoint compares and empties the table.
/// Well below the fixture's per-CPU LRU share (`TEST_FLOWS` / CPUs), so the kernel never
/// evicts an entry the oracle still counts on.
const FLOW_CHECKPOINT: usize = 128;

/// A frame whose outcome differs from the oracle's, with what it takes to replay it.
#[derive(Debug)]
pub struct Mismatch {
    pub seed: u64,
    /// Position of the frame in the campaign (0-based).
    pub index: u64,
    pub label: String,
    pub frame: Vec<u8>,
    pub problem: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "packet fuzz mismatch at frame #{} (seed {}, replay with LB_FUZZ_SEED={}): {}",
            self.index, self.seed, self.seed, self.problem
        )?;
        writeln!(f, "frame {} ({} bytes):", self.label, self.frame.len())?;
        f.write_str(&hex(&self.frame))
    }
}

impl std::error::Error for Mismatch {}

/// `bytes` as hex, 16 per line with offsets, and the whole frame on one last line (to paste).
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "  {:04x}:", i * 16);
        for b in line {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
    }
    out.push_str("  ");
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out.push('\n');
    out
}

/// Frames per outcome class.
#[derive(Clone, Debug)]
pub struct Tally {
    pub frames: u64,
    /// Indexed by `Class::index`.
    by_class: Vec<u64>,
    /// Flow-table outcomes of frames for a VIP: `[new flow, hit, miss]`.
    pub flow_events: [u64; 3],
    /// Checkpoints passed (flow table compared and emptied).
    pub checkpoints: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            frames: 0,
            by_class: vec![0; Class::all().len()],
            flow_events: [0; 3],
            checkpoints: 0,
        }
    }
}

impl Tally {
    pub fn count(&self, class: Class) -> u64 {
        self.by_class[class.index()]
    }

    /// Reachable classes no frame reached.
    pub fn missing(&self) -> Vec<Class> {
        Class::all()
            .into_iter()
            .filter(|c| c.reachable() && self.count(*c) == 0)
            .collect()
    }

    /// One line per class, every class listed.
    pub fn report(&self) -> String {
        let mut out = format!("{} frames\n", self.frames);
        for class in Class::all() {
            let n = self.count(class);
            let share = n as f64 * 100.0 / self.frames.max(1) as f64;
            let _ = writeln!(out, "  {:<42} {n:>10} {share:>6.2}%", class.name());
        }
        let [new, hits, misses] = self.flow_events;
        let _ = writeln!(
            out,
            "  flow table: {new} new flows, {hits} hits, {misses} misses; {} checkpoints",
            self.checkpoints
        );
        out
    }
}

/// What forwarded frames must have added to a per-VIP or per-backend counter.
type SlotTraffic = BTreeMap<u32, TrafficCounters>;

pub struct Campaign {
    seed: u64,
    lb: Lb,
    oracle: Oracle,
    generator: Generator,
    /// Bytes of a test-run frame the program sees: the rest is in frags it cannot read.
    linear: usize,
    counters: Vec<u64>,
    tally: Tally,
    vip_traffic: TrafficCounters,
    slot_traffic: SlotTraffic,
    /// The last frame that touched each flow entry, for a checkpoint's report.
    touched: HashMap<FlowKey, (u64, Frame)>,
    ncpus: usize,
    out: Vec<u8>,
}

impl Campaign {
    /// A fresh balancer with the standard universe; panics when the fixture cannot be set up.
    pub fn new(seed: u64) -> Self {
        let universe = Universe::standard();
        Self::with_universes(seed, &universe, universe.clone())
    }

    /// A balancer with `installed` written into its maps, checked by an oracle that believes
    /// `believed` (the same, except in a test that the campaign catches a wrong prediction).
    pub fn with_universes(seed: u64, installed: &Universe, believed: Universe) -> Self {
        let linear = linear_size(installed);
        let lb = installed.install();
        let ncpus = aya::util::nr_cpus().unwrap_or_else(|(what, e)| panic!("{what}: {e}"));
        let generator = Generator::new(seed, &believed, linear);
        let mut campaign = Self {
            seed,
            lb,
            oracle: Oracle::new(believed, linear),
            generator,
            linear,
            counters: Vec::new(),
            tally: Tally::default(),
            vip_traffic: TrafficCounters::default(),
            slot_traffic: SlotTraffic::new(),
            touched: HashMap::new(),
            ncpus,
            out: vec![0; 1 << 16],
        };
        campaign.counters = campaign
            .read_counters()
            .unwrap_or_else(|e| panic!("reading LB_GLOBAL_STATS: {e}"));
        campaign
    }

    /// Bytes of a frame `lb_xdp` sees in a test run (the linear part).
    pub fn linear(&self) -> usize {
        self.linear
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Generates, runs and checks the next frame.
    pub fn step(&mut self) -> Result<(), Mismatch> {
        let frame = self.generator.next_frame();
        let index = self.tally.frames;
        self.check_frame(&frame)
            .map_err(|problem| self.mismatch(index, &frame, problem))?;
        self.tally.frames += 1;
        if self.oracle.flows.len() >= FLOW_CHECKPOINT {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// The closing checkpoint: flow table and traffic counters.
    pub fn finish(&mut self) -> Result<(), Mismatch> {
        self.checkpoint()
    }

    fn mismatch(&self, index: u64, frame: &Frame, problem: String) -> Mismatch {
        Mismatch {
            seed: self.seed,
            index,
            label: frame.label.clone(),
            frame: frame.bytes.clone(),
            problem,
        }
    }

    fn check_frame(&mut self, frame: &Frame) -> Result<(), String> {
        let expected = self.oracle.expect(&frame.bytes);
        let bytes = &frame.bytes;
        if self.out.len() < bytes.len() + 256 {
            self.out.resize(bytes.len() + 256, 0);
        }
        let prog: &Xdp = self
            .lb
            .ebpf
            .program(maps::PROG_LB)
            .expect("lb_xdp")
            .try_into()
            .expect("xdp");
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(bytes),
                data_out: Some(&mut self.out),
                ..TestRunOptions::default()
            })
            .map_err(|e| format!("BPF_PROG_TEST_RUN failed: {e}"))?;
        let output = &self.out[..result.data_size_out as usize];
        let class = expected.class;
        if result.return_value != class.action() {
            return Err(format!(
                "action {} ({}), expected {} ({})",
                result.return_value,
                action_name(result.return_value),
                class.action(),
                class.name()
            ));
        }
        if let Some(want) = &expected.output {
            compare_output(bytes, output, want, class)?;
        }
        let after = self
            .read_counters()
            .map_err(|e| format!("reading LB_GLOBAL_STATS: {e}"))?;
        let changed: Vec<(u32, u64)> = (0..COUNTER_COUNT)
            .zip(self.counters.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(i, (b, a))| (i, a.wrapping_sub(*b)))
            .collect();
        self.counters = after;
        if changed != expected.counters {
            return Err(format!(
                "expected {}, counters changed by {} instead of {}",
                class.name(),
                counter_names(&changed),
                counter_names(&expected.counters)
            ));
        }
        if let Some(traffic) = expected.traffic {
            add_traffic(&mut self.vip_traffic, traffic.bytes, traffic.new_flow);
            add_traffic(
                self.slot_traffic.entry(traffic.slot).or_default(),
                traffic.bytes,
                traffic.new_flow,
            );
        }
        if let Some(key) = expected.flow {
            self.touched.insert(key, (self.tally.frames, frame.clone()));
        }
        self.tally.by_class[class.index()] += 1;
        for (index, n) in &expected.counters {
            let event = [Counter::NewFlows, Counter::FlowHits, Counter::FlowMisses]
                .iter()
                .position(|c| *c as u32 == *index);
            if let Some(event) = event {
                self.tally.flow_events[event] += n;
            }
        }
        Ok(())
    }

    /// Sums `LB_GLOBAL_STATS` over CPUs with lbd's own batched read (key by key, a syscall per
    /// counter, it took longer than the test run itself).
    fn read_counters(&self) -> io::Result<Vec<u64>> {
        let Some(Map::PerCpuArray(data)) = self.lb.ebpf.map(maps::GLOBAL_STATS) else {
            return Err(io::Error::other("LB_GLOBAL_STATS is not a per-CPU array"));
        };
        sum_per_cpu_u64(data.fd().as_fd(), COUNTER_COUNT, self.ncpus)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Compares the kernel's flow table and traffic counters with the oracle's, then empties
    /// the flow table (kernel and oracle) so it never fills up.
    fn checkpoint(&mut self) -> Result<(), Mismatch> {
        let index = self.tally.frames;
        let problem = |what: String| Mismatch {
            seed: self.seed,
            index,
            label: "checkpoint".into(),
            frame: Vec::new(),
            problem: what,
        };
        let mut flows: BpfHashMap<_, FlowKey, FlowValue> =
            BpfHashMap::try_from(self.lb.ebpf.map_mut(maps::FLOWS).expect("LB_FLOWS"))
                .expect("LB_FLOWS is a hash map");
        let kernel: Vec<(FlowKey, FlowValue)> = flows
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| problem(format!("reading LB_FLOWS: {e}")))?;
        for (key, value) in &kernel {
            let want = self.oracle.flows.get(key);
            let ok = want.is_some_and(|w| {
                value.slot == w.slot
                    && value.generation == w.generation
                    && value.last_seen == TEST_TICK
                    && (value.flags & FLOW_F_CLOSED != 0) == w.closed
            });
            if !ok {
                let what = format!(
                    "flow table entry {} is {value:?}, expected {want:?}",
                    describe_key(key)
                );
                return Err(match self.touched.get(key) {
                    Some((i, frame)) => Mismatch {
                        index: *i,
                        label: frame.label.clone(),
                        frame: frame.bytes.clone(),
                        ..problem(format!("{what} (last frame of that flow below)"))
                    },
                    None => problem(format!("{what}: no frame should have written it")),
                });
            }
        }
        if kernel.len() != self.oracle.flows.len() {
            let missing: Vec<String> = self
                .oracle
                .flows
                .keys()
                .filter(|k| !kernel.iter().any(|(key, _)| key == *k))
                .map(describe_key)
                .collect();
            return Err(problem(format!(
                "flow table has {} entries, expected {}; missing: {}",
                kernel.len(),
                self.oracle.flows.len(),
                missing.join(", ")
            )));
        }
        for (key, _) in &kernel {
            flows
                .remove(key)
                .map_err(|e| problem(format!("emptying LB_FLOWS: {e}")))?;
        }
        self.oracle.flows.clear();
        self.touched.clear();
        self.tally.checkpoints += 1;
        // Echo replies on in every other stretch of the campaign, off in the rest.
        self.oracle.echo_reply = !self.oracle.echo_reply;
        self.lb.set_flags(if self.oracle.echo_reply {
            CFG_F_ECHO_REPLY
        } else {
            0
        });

        let vip = self.lb.traffic(maps::VIP_STATS, VIP_ID);
        if vip != self.vip_traffic {
            return Err(problem(format!(
                "VIP traffic counters {vip:?}, expected {:?}",
                self.vip_traffic
            )));
        }
        for (slot, want) in &self.slot_traffic {
            let got = self.lb.traffic(maps::BACKEND_STATS, *slot);
            if got != *want {
                return Err(problem(format!(
                    "backend slot {slot} traffic counters {got:?}, expected {want:?}"
                )));
            }
        }
        Ok(())
    }
}

fn add_traffic(counters: &mut TrafficCounters, bytes: u64, new_flow: bool) {
    counters.packets += 1;
    counters.bytes += bytes;
    counters.new_flows += u64::from(new_flow);
}

/// The output (of `input`) must be exactly `want`; on a difference, says where and what.
fn compare_output(input: &[u8], output: &[u8], want: &[u8], class: Class) -> Result<(), String> {
    if output == want {
        return Ok(());
    }
    let at = output
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(output.len().min(want.len()));
    let outer_end = want.len().saturating_sub(input.len()) + ETH_HLEN;
    let region = match at {
        0..ETH_HLEN if class.action() != crate::bpf::XDP_PASS => "Ethernet header",
        at if class.forwarded() && at < outer_end => "outer headers",
        _ if class.forwarded() => "inner packet",
        _ if class == Class::EchoReply => "echo reply",
        _ => "passed frame",
    };
    Err(format!(
        "{}: output ({} bytes) differs from the expected ({} bytes) at byte {at} ({region})\n\
         output:\n{}expected:\n{}",
        class.name(),
        output.len(),
        want.len(),
        hex(output),
        hex(want)
    ))
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

fn counter_names(counters: &[(u32, u64)]) -> String {
    let names: Vec<String> = counters
        .iter()
        .map(|(i, n)| format!("{}+{n}", counter_name(*i)))
        .collect();
    format!("[{}]", names.join(", "))
}

fn counter_name(index: u32) -> String {
    use lb_common::DropReason;
    let plain = [
        Counter::Pass,
        Counter::Tx,
        Counter::Redirect,
        Counter::Drop,
        Counter::NewFlows,
        Counter::FlowHits,
        Counter::FlowMisses,
        Counter::IcmpForwarded,
        Counter::EchoReplies,
        Counter::TooBigReplies,
    ];
    if let Some(c) = plain.iter().find(|c| **c as u32 == index) {
        return format!("{c:?}");
    }
    DropReason::ALL
        .iter()
        .find(|r| r.counter_index() == index)
        .map_or_else(|| format!("#{index}"), |r| format!("drop:{}", r.name()))
}

fn describe_key(key: &FlowKey) -> String {
    let addr = |w| ip_from_wire(w, key.family).map_or_else(|| format!("{w:x?}"), |a| a.to_string());
    let proto = if key.proto == PROTO_UDP { "udp" } else { "tcp" };
    format!(
        "{}:{} -> {}:{}/{proto}",
        addr(key.src),
        u16::from_be(key.sport),
        addr(key.dst),
        u16::from_be(key.dport)
    )
}

/// How many bytes of a test-run frame `lb_xdp` sees. `BPF_PROG_TEST_RUN` puts at most a page
/// minus the XDP headroom (256) and `skb_shared_info` into the linear part and the rest into
/// frags, which a program without `xdp.frags` cannot read. Found by bisection on a fixture of its
/// own: a full-length UDP datagram to a VIP is forwarded exactly while it fits.
fn linear_size(universe: &Universe) -> usize {
    let lb = universe.install();
    let forwarded = |len: usize| {
        let src = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(198, 51, 100, 9), 9);
        let payload = vec![0u8; len - ETH_HLEN - IPV4_HLEN - 8];
        let frame = crate::packet::udp_frame(src, std::net::SocketAddrV4::new(VIP, 53), &payload);
        lb.run(&frame).action == XDP_TX
    };
    let (mut lo, mut hi) = (MIN_FRAME + IPV4_HLEN + 8, 1 << 15);
    assert!(
        forwarded(lo),
        "a small datagram to the UDP VIP is not forwarded"
    );
    assert!(!forwarded(hi), "a {hi}-byte frame is forwarded whole");
    while hi - lo > 1 {
        let mid = lo.midpoint(hi);
        if forwarded(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}
