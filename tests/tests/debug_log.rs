//! Data-plane debug logging: `lb_xdp` writes aya-log records while `CFG_F_DEBUG` is set in
//! `LB_CONFIG`, and lbd prints them (target `lb_xdp`). Needs root; skips otherwise.
//!
//! - `switch_changes_records_not_forwarding` (`BPF_PROG_TEST_RUN`): the same frames through two
//!   copies of `lb_xdp`, the switch off in one and on in the other, give the same actions, output
//!   bytes and counters; only the copy with the switch on writes records, one per forwarded or
//!   dropped packet, naming the decision.
//! - `switch_cost` (printed, never asserted): flow-hit ns/packet with the switch off and on, and
//!   `lb_xdp`'s instruction counts. With `LB_DEBUG_BASELINE=<bpf-balancer object>` it also
//!   measures that object (e.g. one built before logging existed) the same way, interleaved.
//! - `lbd_logs_decisions_only_while_switched_on` (namespace topology): real lbd, real TCP
//!   connections through the VIP: no record with the switch off; with it on, one "new flow"
//!   record per connection naming the client, the VIP and the backend that answered; off again,
//!   no new record.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    EbpfLoader,
    maps::{Array, MapData, RingBuf},
    programs::Xdp,
};
use lb_common::{
    GlobalConfig,
    config::CFG_F_DEBUG,
    keys::{PROTO_TCP, PROTO_UDP},
    maps,
};
use lb_tests::{
    balancer::{
        ENCAP_MASK, ENCAP_SRC, Lb, TEST_FLOWS, TEST_RING_POOL, VIP, VIP_PORT, backend, vip_addr,
        wire,
    },
    bpf::{self, Run, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS, XDP_TX},
    lb::{Lbd, ServedTopology},
    netns::topology::Topology,
    packet::{self, ETH_P_IP, GATEWAY_MAC, IP_MF, IPPROTO_TCP, Ipv4, TCP_ACK, TCP_FIN, TCP_SYN},
    traffic::who,
};
use lb_userspace::{api::proto::Debug, dataplane::kernel::AttachMode};

/// `VIP` as it appears in a record.
const VIP_OCTETS: &[u8] = &[10, 0, 0, 100];
/// The aya-log ring buffer in the balancer object.
const AYA_LOGS: &str = "AYA_LOGS";
const RING_OFFSET: u32 = 100;
const RING_SIZE: u32 = 13;
const SLOTS: [u32; 3] = [3, 4, 5];
/// A VIP port with no table: new flows to it are dropped (`no_backend`).
const EMPTY_PORT: u16 = 8080;
const UDP_PORT: u16 = 53;

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), port)
}

/// `lb_xdp` of `object` on empty maps with the test config (as `Lb::empty`, any object).
fn load(object: &[u8]) -> Lb {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::FLOWS, TEST_FLOWS)
        .map_max_entries(maps::RINGS, TEST_RING_POOL)
        .load(object)
        .unwrap_or_else(|e| panic!("loading a bpf-balancer object: {e}"));
    bpf::load_program(&mut ebpf, maps::PROG_LB);
    let mut lb = Lb {
        ebpf,
        ring: Vec::new(),
    };
    set_config(&mut lb, |_| GlobalConfig {
        encap_src_v4: wire(ENCAP_SRC),
        encap_src_v4_mask: wire(ENCAP_MASK),
        ..GlobalConfig::default()
    });
    lb
}

fn set_config(lb: &mut Lb, change: impl FnOnce(GlobalConfig) -> GlobalConfig) {
    let mut config: Array<_, GlobalConfig> =
        Array::try_from(lb.ebpf.map_mut(maps::CONFIG).expect("LB_CONFIG")).expect("array");
    let cfg = config.get(&0, 0).expect("LB_CONFIG[0]");
    config.set(0, change(cfg), 0).expect("set LB_CONFIG");
}

fn set_switch(lb: &mut Lb, on: bool) {
    set_config(lb, |cfg| GlobalConfig {
        flags: if on {
            cfg.flags | CFG_F_DEBUG
        } else {
            cfg.flags & !CFG_F_DEBUG
        },
        ..cfg
    });
}

/// TCP VIP 10.0.0.100:80 over slots 3, 4, 5; UDP VIP :53 on the same table; TCP VIP :8080
/// without a table.
fn setup(lb: &mut Lb) {
    lb.add_vip(vip_addr(), PROTO_TCP, RING_OFFSET, RING_SIZE);
    lb.add_vip(
        SocketAddrV4::new(VIP, UDP_PORT),
        PROTO_UDP,
        RING_OFFSET,
        RING_SIZE,
    );
    lb.add_vip(
        SocketAddrV4::new(VIP, EMPTY_PORT),
        PROTO_TCP,
        RING_OFFSET,
        0,
    );
    for slot in SLOTS {
        lb.set_backend(slot, backend(slot, TEST_RUN_IFINDEX));
    }
    let ring: Vec<u32> = (0..RING_SIZE)
        .map(|i| SLOTS[i as usize % SLOTS.len()])
        .collect();
    lb.set_ring(RING_OFFSET, &ring);
}

/// The balancer with its log ring taken out (as lbd does), and the switch set.
fn logged(object: &[u8], on: bool) -> (Lb, RingBuf<MapData>) {
    let mut lb = load(object);
    setup(&mut lb);
    set_switch(&mut lb, on);
    let ring = lb.ebpf.take_map(AYA_LOGS).expect("AYA_LOGS in the object");
    (lb, RingBuf::try_from(ring).expect("ring buffer"))
}

/// Every record in the ring, consumed.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    while let Some(item) = ring.next() {
        records.push(item.to_vec());
    }
    records
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A frame, what `lb_xdp` does with it, and what its record says.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    action: u32,
    /// Words the packet's record holds; `None`: no record.
    record: Option<&'static [&'static [u8]]>,
}

/// One packet down every path that logs, and two that do not.
fn cases() -> Vec<Case> {
    let vip = vip_addr();
    let mut fragment = Ipv4::new(*client(40_000).ip(), VIP, IPPROTO_TCP);
    fragment.frag = IP_MF;
    let segment = packet::tcp_segment(client(40_000), vip, TCP_ACK, b"x");
    // In order: each case runs on the state the ones before it left.
    vec![
        Case {
            name: "SYN of a new flow",
            frame: packet::tcp_frame(client(40_000), vip, TCP_SYN, b""),
            action: XDP_TX,
            record: Some(&[b"lb_xdp", b"new flow", VIP_OCTETS]),
        },
        Case {
            name: "data of that flow",
            frame: packet::tcp_frame(client(40_000), vip, TCP_ACK, b"data"),
            action: XDP_TX,
            record: Some(&[b"flow hit"]),
        },
        Case {
            name: "FIN of that flow",
            frame: packet::tcp_frame(client(40_000), vip, TCP_FIN | TCP_ACK, b""),
            action: XDP_TX,
            record: Some(&[b"flow hit"]),
        },
        Case {
            name: "data without a flow entry",
            frame: packet::tcp_frame(client(40_001), vip, TCP_ACK, b"data"),
            action: XDP_TX,
            record: Some(&[b"rehashed"]),
        },
        Case {
            name: "UDP datagram",
            frame: packet::udp_frame(client(5353), SocketAddrV4::new(VIP, UDP_PORT), b"q"),
            action: XDP_TX,
            record: Some(&[b"new flow"]),
        },
        Case {
            name: "fragment to the VIP",
            frame: packet::ethernet(
                GATEWAY_MAC,
                packet::CLIENT_MAC,
                ETH_P_IP,
                &fragment.packet(&segment),
            ),
            action: XDP_DROP,
            record: Some(&[b"drop", b"fragment", VIP_OCTETS]),
        },
        Case {
            name: "SYN to a VIP without a table",
            frame: packet::tcp_frame(
                client(40_002),
                SocketAddrV4::new(VIP, EMPTY_PORT),
                TCP_SYN,
                b"",
            ),
            action: XDP_DROP,
            record: Some(&[b"drop", b"no_backend"]),
        },
        Case {
            name: "VIP address, other port",
            frame: packet::tcp_frame(client(40_003), SocketAddrV4::new(VIP, 81), TCP_SYN, b""),
            action: XDP_PASS,
            record: None,
        },
        Case {
            name: "not a VIP",
            frame: packet::tcp_frame(
                client(40_004),
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 200), VIP_PORT),
                TCP_SYN,
                b"",
            ),
            action: XDP_PASS,
            record: None,
        },
    ]
}

#[test]
fn switch_changes_records_not_forwarding() {
    if !bpf::is_root("BPF_PROG_TEST_RUN") {
        return;
    }
    let (off, mut off_ring) = logged(lb_userspace::lb_object(), false);
    let (on, mut on_ring) = logged(lb_userspace::lb_object(), true);
    for case in &cases() {
        let quiet = off.run(&case.frame);
        let loud = on.run(&case.frame);
        assert_eq!(quiet.action, case.action, "{}", case.name);
        assert_eq!(loud.action, quiet.action, "{}: action", case.name);
        assert_eq!(loud.frame, quiet.frame, "{}: output bytes", case.name);

        assert_eq!(
            drain(&mut off_ring).len(),
            0,
            "{}: record with the switch off",
            case.name
        );
        let records = drain(&mut on_ring);
        match case.record {
            None => assert_eq!(records.len(), 0, "{}: no record", case.name),
            Some(words) => {
                assert_eq!(records.len(), 1, "{}: one record", case.name);
                for word in words {
                    assert!(
                        contains(&records[0], word),
                        "{}: record lacks {:?}: {:?}",
                        case.name,
                        String::from_utf8_lossy(word),
                        String::from_utf8_lossy(&records[0])
                    );
                }
            }
        }
    }
    assert_eq!(on.counters(), off.counters(), "global counters");
}

fn median(mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// `lb_xdp`'s size after the verifier (instructions), and the instructions it processed.
fn instructions(lb: &Lb) -> (u32, u32) {
    let prog: &Xdp = lb
        .ebpf
        .program(maps::PROG_LB)
        .expect("lb_xdp")
        .try_into()
        .expect("xdp");
    let info = prog.info().expect("program info");
    (
        info.size_translated().unwrap_or(0) / 8,
        info.verified_instruction_count().unwrap_or(0),
    )
}

/// One variant of the flow-hit measurement: a balancer with an established flow.
struct Variant {
    name: &'static str,
    lb: Lb,
    ring: Option<RingBuf<MapData>>,
    /// The ring is emptied (outside the timed runs) every this many runs.
    drain_every: usize,
    samples: Vec<u64>,
}

impl Variant {
    fn new(name: &'static str, object: &[u8], on: bool, drain_every: usize, syn: &[u8]) -> Self {
        let (mut lb, ring) = if object == lb_userspace::lb_object() {
            let (lb, ring) = logged(object, on);
            (lb, Some(ring))
        } else {
            // An object from before logging has no ring and ignores the flag.
            let mut lb = load(object);
            setup(&mut lb);
            (lb, None)
        };
        assert_eq!(lb.run(syn).action, XDP_TX, "{name}: SYN");
        set_switch(&mut lb, on);
        Self {
            name,
            lb,
            ring,
            drain_every,
            samples: Vec::new(),
        }
    }

    fn sample(&mut self, ack: &[u8]) {
        let Run { action, nanos, .. } = self.lb.run(ack);
        assert_eq!(action, XDP_TX, "{}", self.name);
        self.samples.push(nanos);
        // A full ring would fail the reservation, a cheaper path than logging. Emptied after
        // every run, each record finds the reader caught up and wakes it (aya-log submits
        // with adaptive wakeup); emptied less often, most records wake no one.
        if let Some(ring) = &mut self.ring
            && self.samples.len().is_multiple_of(self.drain_every)
        {
            drain(ring);
        }
    }
}

/// Flow-hit cost with the switch off and on (and a baseline object if given), interleaved so
/// that the host's noise hits every variant alike. Printed, not asserted.
#[test]
fn switch_cost() {
    const CALLS: usize = 3000;
    if !bpf::is_root("BPF_PROG_TEST_RUN") {
        return;
    }
    let src = client(50_000);
    let syn = packet::tcp_frame(src, vip_addr(), TCP_SYN, b"");
    let ack = packet::tcp_frame(src, vip_addr(), TCP_ACK, &[0u8; 64]);
    let baseline = std::env::var_os("LB_DEBUG_BASELINE").map(|path| {
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    });
    let object = lb_userspace::lb_object();
    let mut variants = vec![
        Variant::new("switch off", object, false, 1, &syn),
        Variant::new(
            "switch on, each record wakes the reader",
            object,
            true,
            1,
            &syn,
        ),
        Variant::new("switch on, reader behind", object, true, 256, &syn),
    ];
    if let Some(baseline) = &baseline {
        variants.push(Variant::new("baseline object", baseline, false, 1, &syn));
    }
    for _ in 0..CALLS {
        for variant in &mut variants {
            variant.sample(&ack);
        }
    }
    for variant in variants {
        let (xlated, verified) = instructions(&variant.lb);
        eprintln!(
            "{}: lb_xdp flow hit median {} ns/packet over {CALLS} calls (repeat=1); \
             {xlated} instructions, {verified} processed by the verifier",
            variant.name,
            median(variant.samples),
        );
    }
}

const PORT: u16 = 80;
const CONNECTIONS: usize = 6;
/// How long records may take from the ring to lbd's log.
const SETTLE: Duration = Duration::from_millis(500);
const WAIT: Duration = Duration::from_secs(5);

/// lbd's data-plane records (tracing's text format: `... DEBUG lb_xdp: <message>`).
fn records(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" lb_xdp: ")).collect()
}

/// Waits until lbd's log has stopped growing for `SETTLE`; returns its length.
fn settled(lbd: &Lbd) -> usize {
    let deadline = Instant::now() + WAIT;
    let mut len = lbd.log().len();
    loop {
        thread::sleep(SETTLE);
        let now = lbd.log().len();
        if now == len || Instant::now() > deadline {
            return now;
        }
        len = now;
    }
}

#[test]
fn lbd_logs_decisions_only_while_switched_on() {
    if !bpf::is_root("namespaces and XDP") {
        return;
    }
    let bed = ServedTopology::build(
        Topology::one_arm("dbgl").backends(2),
        AttachMode::Generic,
        PORT,
    )
    .expect("topology");
    let lbd = bed.start_lbd().expect("lbd");
    let topo = &bed.topo;
    let result = switch_on_and_off(topo, &lbd);
    lbd.finish(result, |_| false);
}

fn switch_on_and_off(topo: &Topology, lbd: &Lbd) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = lbd.client();
    let target = SocketAddr::new(IpAddr::V4(topo.vip), PORT);
    let connect = || -> Result<BTreeMap<String, usize>> {
        let mut answered = BTreeMap::new();
        for i in 0..CONNECTIONS {
            let name = who(&topo.client.ns, target).with_context(|| format!("WHO {i}"))?;
            *answered.entry(name).or_default() += 1;
        }
        Ok(answered)
    };
    let switch = |on: bool| -> Result<()> {
        let reply = runtime.block_on(api.set_debug(Debug { data_plane: on }))?;
        ensure!(reply.data_plane == on, "switch {on}: {reply:?}");
        Ok(())
    };

    // Off by default: connections leave no record.
    ensure!(
        !runtime.block_on(api.debug())?.data_plane,
        "the switch starts off"
    );
    connect()?;
    let mark = settled(lbd);
    expect_no_records(lbd, 0)?;

    // On: one "new flow" record per connection, naming the client, the VIP and the backend
    // that answered it; the connections' later packets are flow hits.
    switch(true)?;
    let answered = connect()?;
    expect_new_flows(topo, lbd, mark, &answered)?;
    let with_hits = settled(lbd);
    ensure!(
        records(&lbd.log()[mark..with_hits])
            .iter()
            .any(|l| l.contains("flow hit")),
        "no flow-hit record for the connections' later packets"
    );

    // Off again: no new record.
    switch(false)?;
    let mark = settled(lbd);
    connect()?;
    settled(lbd);
    expect_no_records(lbd, mark)?;

    // After `lbd upgrade` the links run a program with a ring of its own: the running lbd
    // moves to it.
    lbd.upgrade()?;
    let mark = settled(lbd);
    switch(true)?;
    let answered = connect()?;
    expect_new_flows(topo, lbd, mark, &answered)?;
    ensure!(
        lbd.log()[mark..].contains("reading the program the links now run"),
        "lbd did not say it moved to the upgraded program's log"
    );
    switch(false)
}

/// Fails when lbd logged a data-plane record after byte `mark` of its log.
fn expect_no_records(lbd: &Lbd, mark: usize) -> Result<()> {
    let log = lbd.log();
    let late = records(&log[mark..]);
    ensure!(
        late.is_empty(),
        "records with the switch off:\n{}",
        late.join("\n")
    );
    Ok(())
}

/// Waits for a "new flow" record per connection after byte `mark` of lbd's log, and checks
/// that they name the client, the VIP and, connection for connection, the backends that
/// answered (`answered`: backend name -> connections).
fn expect_new_flows(
    topo: &Topology,
    lbd: &Lbd,
    mark: usize,
    answered: &BTreeMap<String, usize>,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    let new_flows = loop {
        let log = lbd.log();
        let new_flows: Vec<String> = records(&log[mark..])
            .into_iter()
            .filter(|l| l.contains("new flow"))
            .map(str::to_owned)
            .collect();
        if new_flows.len() >= CONNECTIONS {
            break new_flows;
        }
        if Instant::now() > deadline {
            bail!(
                "{} new-flow records for {CONNECTIONS} connections after {WAIT:?}",
                new_flows.len()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    eprintln!("for example: {}", new_flows[0]);
    let from = format!("new flow {}:", topo.client.ip());
    let to = format!(" -> {}:{PORT} proto 6: slot ", topo.vip);
    let mut logged: BTreeMap<String, usize> = BTreeMap::new();
    for line in &new_flows {
        ensure!(
            line.contains(&from) && line.contains(&to),
            "record does not name the client and the VIP: {line}"
        );
        let backend = topo
            .backends
            .iter()
            .find(|b| line.contains(&format!(" backend {} via ", b.ip())))
            .with_context(|| format!("record names no backend of the topology: {line}"))?;
        *logged.entry(backend.name.clone()).or_default() += 1;
    }
    ensure!(
        logged == *answered,
        "backends in the records {logged:?}, backends that answered {answered:?}"
    );
    Ok(())
}
