//! Issue 5 end to end: `/metrics` of a real lbd against what the hosts' kernels counted.
//!
//! One-arm topology, native XDP, three backends; a TCP VIP on all three and a UDP VIP (another
//! address) on the first two. nftables counters count the packets the client sends to each VIP
//! (output hook) and the packets each backend receives for each VIP after `lb_decap` (prerouting).
//! After a known number of TCP connections (a few echo exchanges each, then closed) and UDP
//! datagrams (each answered), the scrape must report exactly the client's packets per VIP and
//! each backend's packets per backend, and bytes to the byte (see [`ETH_HLEN`]). The scrape must
//! pass a strict format check and an independent parser. Then lbd is killed (SIGKILL) and restarted:
//! no data-plane counter moves; more traffic makes them grow by exactly the new client counts.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    lb::{DataPath, Lbd, LbdOptions, VipConfig, render_config},
    netns::topology::Topology,
    nft::{Count, Hook, NftCounters},
    traffic::{Server, Session, VipUdpEcho},
};
use lb_userspace::{dataplane::kernel::AttachMode, metrics::exposition::lint::lint};
use prometheus_parse::Value;

const MODE: AttachMode = AttachMode::Native;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 5353;
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 101);
/// The UDP VIP's backends: the first two of three (the third must see none of its packets).
const UDP_BACKENDS: usize = 2;
/// Echo exchanges per TCP connection.
const PINGS: usize = 3;
/// The balancer counts bytes as received: the Ethernet frame, i.e. nft's IP-packet length plus
/// the 14-byte Ethernet header (no VLAN tag here, and veth does not pad short frames).
const ETH_HLEN: u64 = 14;
/// How long counts may take to agree after the last exchange (final ACKs still in flight).
const SETTLE: Duration = Duration::from_secs(5);
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// nft counter names, one per VIP, on the client and on every backend.
const NFT_TCP: &str = "vip_tcp";
const NFT_UDP: &str = "vip_udp";
/// Data-plane counter families: read from the pinned maps, so they must survive a restart.
const DATA_PLANE_COUNTERS: [&str; 11] = [
    "lb_vip_packets_total",
    "lb_vip_bytes_total",
    "lb_vip_new_flows_total",
    "lb_backend_packets_total",
    "lb_backend_bytes_total",
    "lb_backend_new_flows_total",
    "lb_xdp_actions_total",
    "lb_drops_total",
    "lb_flow_table_hits_total",
    "lb_flow_table_misses_total",
    "lb_new_flows_total",
];
/// Every family `/metrics` must have in this setup: issue 5's list, without the families that
/// only get series once something happens that this test does not do (health checks and their
/// transitions; a reconfiguration through the API: the config file is loaded at startup).
const FAMILIES: [&str; 20] = [
    "lb_vip_packets_total",
    "lb_vip_bytes_total",
    "lb_vip_new_flows_total",
    "lb_vip_all_backends_down",
    "lb_backend_packets_total",
    "lb_backend_bytes_total",
    "lb_backend_new_flows_total",
    "lb_backend_flows",
    "lb_backend_weight",
    "lb_backend_up",
    "lb_backend_state",
    "lb_xdp_actions_total",
    "lb_drops_total",
    "lb_flow_table_hits_total",
    "lb_flow_table_misses_total",
    "lb_new_flows_total",
    "lb_flow_table_entries",
    "lb_flow_table_capacity",
    "lb_build_info",
    "lb_reconfigurations_total",
];

#[test]
fn metrics_match_client_and_backend_counts_and_survive_restart() {
    let started = Instant::now();
    let topo = Topology::one_arm("metrics")
        .backends(3)
        .build()
        .expect("topology");
    topo.add_vip(IpAddr::V4(UDP_VIP)).expect("UDP VIP");
    let bed = Bed::new(&topo).expect("test bed");
    let gw = topo.gw();
    let mut lbd = Lbd::start(&gw.ns, &gw.ifaces(), MODE, &render_config(&bed.vips())).expect("lbd");
    let result = body(&bed, &mut lbd);
    lbd.finish(result, |_| false);
    eprintln!("metrics: done in {:.1} s", started.elapsed().as_secs_f64());
}

fn body(bed: &Bed, lbd: &mut Lbd) -> Result<()> {
    let mut traffic = Traffic::default();
    // Nothing sent yet: every traffic counter is zero, and the zeros are consistent.
    let first = settle(bed, lbd, &traffic).context("before any traffic")?;
    check_format(&first)?;

    bed.send(&mut traffic, 30, 12, 5).context("first round")?;
    let before = settle(bed, lbd, &traffic).context("after the first round")?;
    check_format(&before)?;
    // The same counts (nothing was sent since), with a flow-table scan newer than the traffic.
    report("first round", bed, &flow_table_filled(lbd)?)?;

    lbd.restart().context("restarting lbd")?;
    let restarted = scrape(lbd).context("first scrape after the restart")?;
    compare_across_restart(&before, &restarted)?;
    check_counts(bed, &restarted, &bed.truth()?, &traffic)
        .context("right after the restart, with no traffic since")?;

    bed.send(&mut traffic, 10, 6, 4).context("second round")?;
    let after = settle(bed, lbd, &traffic).context("after the second round")?;
    check_format(&after)?;
    for (vip, _) in bed.vip_labels() {
        let grew = after.value("lb_vip_packets_total", &[("vip", &vip)])?
            - restarted.value("lb_vip_packets_total", &[("vip", &vip)])?;
        eprintln!("metrics: {vip} grew by {grew} packets after the restart");
    }
    report("after restart and second round", bed, &after)?;
    lbd.expect_no_errors(|_| false)
}

/// What the test sent: per VIP, flows opened; per backend (by name), flows and packets it
/// answered.
#[derive(Debug, Default)]
struct Traffic {
    tcp_connections: u64,
    udp_flows: u64,
    /// Backend name -> TCP connections it greeted.
    tcp_by_backend: BTreeMap<String, u64>,
    /// Backend name -> (UDP flows, datagrams) it answered.
    udp_by_backend: BTreeMap<String, (u64, u64)>,
    /// Every UDP socket stays open to the end, so no later flow reuses a source port (which
    /// would hit an old flow entry instead of creating one).
    udp_sockets: Vec<UdpSocket>,
}

/// The topology's servers, data path and counters, and the VIPs' config.
struct Bed<'a> {
    topo: &'a Topology,
    client_nft: NftCounters<'a>,
    backend_nft: Vec<NftCounters<'a>>,
    _tcp: Vec<Server>,
    _udp: Vec<VipUdpEcho>,
    _datapath: DataPath,
}

impl<'a> Bed<'a> {
    fn new(topo: &'a Topology) -> Result<Self> {
        let tcp_vip = topo.vip;
        let datapath = DataPath::attach(topo, MODE, &[IpAddr::V4(tcp_vip), IpAddr::V4(UDP_VIP)])?;
        let tcp = topo
            .backends
            .iter()
            .map(|b| Server::start(&b.ns, &b.name, TCP_PORT))
            .collect::<Result<_>>()?;
        let udp = topo.backends[..UDP_BACKENDS]
            .iter()
            .map(|b| VipUdpEcho::start(&b.ns, &b.name, SocketAddr::new(UDP_VIP.into(), UDP_PORT)))
            .collect::<Result<_>>()?;
        let matches = [
            (NFT_TCP, format!("ip daddr {tcp_vip} tcp dport {TCP_PORT}")),
            (NFT_UDP, format!("ip daddr {UDP_VIP} udp dport {UDP_PORT}")),
        ];
        let rules: Vec<(&str, &str)> = matches.iter().map(|(n, m)| (*n, m.as_str())).collect();
        let client_nft = NftCounters::install(&topo.client.ns, "lbmetrics", Hook::Output, &rules)?;
        let backend_nft = topo
            .backends
            .iter()
            .map(|b| NftCounters::install(&b.ns, "lbmetrics", Hook::Prerouting, &rules))
            .collect::<Result<_>>()?;
        Ok(Self {
            topo,
            client_nft,
            backend_nft,
            _tcp: tcp,
            _udp: udp,
            _datapath: datapath,
        })
    }

    fn tcp_target(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip.into(), TCP_PORT)
    }

    fn udp_target() -> SocketAddr {
        SocketAddr::new(UDP_VIP.into(), UDP_PORT)
    }

    fn vips(&self) -> Vec<VipConfig> {
        let backends: Vec<(IpAddr, u32)> = self
            .topo
            .backends
            .iter()
            .map(|b| (IpAddr::V4(b.ip()), 100))
            .collect();
        vec![
            VipConfig {
                address: format!("{}/tcp", self.tcp_target()),
                ring_size: None,
                backends: backends.clone(),
            },
            VipConfig {
                address: format!("{}/udp", Self::udp_target()),
                ring_size: None,
                backends: backends[..UDP_BACKENDS].to_vec(),
            },
        ]
    }

    /// `(vip label, nft counter name)` of both VIPs.
    fn vip_labels(&self) -> [(String, &'static str); 2] {
        [
            (format!("{}/tcp", self.tcp_target()), NFT_TCP),
            (format!("{}/udp", Self::udp_target()), NFT_UDP),
        ]
    }

    /// `tcp` connections with [`PINGS`] exchanges each, closed; `udp` flows (sockets) of
    /// `datagrams` datagrams each, every one answered.
    fn send(&self, traffic: &mut Traffic, tcp: u64, udp: u64, datagrams: u64) -> Result<()> {
        let client = &self.topo.client.ns;
        for i in 0..tcp {
            let mut session = Session::open(client, self.tcp_target())
                .with_context(|| format!("TCP connection {i}"))?;
            for _ in 0..PINGS {
                session
                    .ping()
                    .with_context(|| format!("TCP connection {i}"))?;
            }
            *traffic
                .tcp_by_backend
                .entry(session.backend().to_owned())
                .or_default() += 1;
            traffic.tcp_connections += 1;
        }
        for f in 0..udp {
            let socket = client
                .run(|| {
                    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    socket.connect(Self::udp_target())?;
                    socket.set_read_timeout(Some(UDP_TIMEOUT))?;
                    Ok::<_, std::io::Error>(socket)
                })
                .context("UDP socket")?;
            let mut answered_by = None;
            for d in 0..datagrams {
                let payload = format!("flow {f} datagram {d}");
                let name = udp_exchange(&socket, payload.as_bytes())
                    .with_context(|| format!("UDP flow {f}, datagram {d}"))?;
                ensure!(
                    answered_by.get_or_insert_with(|| name.clone()) == &name,
                    "UDP flow {f} moved from {answered_by:?} to {name}"
                );
            }
            let name = answered_by.context("a flow of no datagrams")?;
            let entry = traffic.udp_by_backend.entry(name).or_default();
            entry.0 += 1;
            entry.1 += datagrams;
            traffic.udp_flows += 1;
            traffic.udp_sockets.push(socket);
        }
        Ok(())
    }

    /// The kernels' counts now: the client's per VIP, and each backend's per VIP.
    fn truth(&self) -> Result<Truth> {
        let client = self.client_nft.read()?;
        let backends = self
            .backend_nft
            .iter()
            .map(NftCounters::read)
            .collect::<Result<_>>()?;
        Ok(Truth { client, backends })
    }
}

/// nft counts: the client's by counter name, and each backend's (topology order).
#[derive(Debug, PartialEq, Eq)]
struct Truth {
    client: BTreeMap<String, Count>,
    backends: Vec<BTreeMap<String, Count>>,
}

fn nft(counters: &BTreeMap<String, Count>, name: &str) -> Result<Count> {
    counters
        .get(name)
        .copied()
        .with_context(|| format!("no nft counter {name}: {counters:?}"))
}

/// Sends one datagram and waits for its answer: the answering backend's name.
fn udp_exchange(socket: &UdpSocket, payload: &[u8]) -> Result<String> {
    socket.send(payload).context("send")?;
    let mut buf = [0u8; 2048];
    let len = socket.recv(&mut buf).context("no answer")?;
    let reply = &buf[..len];
    let split = reply
        .iter()
        .position(|&b| b == b'\n')
        .context("answer without a name")?;
    ensure!(&reply[split + 1..] == payload, "answer to another datagram");
    Ok(String::from_utf8_lossy(&reply[..split]).into_owned())
}

/// One `/metrics` body: checked strictly, then read by prometheus-parse.
struct Scrape {
    text: String,
    parsed: prometheus_parse::Scrape,
}

impl Scrape {
    /// The sample `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.parsed
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
            })
            .and_then(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.get(name, labels)
            .with_context(|| format!("no sample {name}{labels:?} in the scrape"))
    }

    fn count(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        let v = self.value(name, labels)?;
        ensure!(
            v >= 0.0 && v.fract() == 0.0,
            "{name}{labels:?} = {v}, not a count"
        );
        Ok(v as u64)
    }

    /// Every sample of the counter families in [`DATA_PLANE_COUNTERS`], keyed by name and
    /// sorted labels.
    fn data_plane_counters(&self) -> BTreeMap<String, u64> {
        self.parsed
            .samples
            .iter()
            .filter(|s| DATA_PLANE_COUNTERS.contains(&s.metric.as_str()))
            .filter_map(|s| match s.value {
                Value::Counter(v) => Some((format!("{}{{{}}}", s.metric, s.labels), v as u64)),
                _ => None,
            })
            .collect()
    }
}

/// `GET /metrics` from lbd's namespace, strictly checked and parsed.
fn scrape(lbd: &Lbd) -> Result<Scrape> {
    let (status, text) = lbd.http_get("/metrics")?;
    ensure!(status == 200, "GET /metrics: {status}: {text}");
    lint(&text).context("strict format check of the scrape")?;
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .context("prometheus-parse")?;
    Ok(Scrape { text, parsed })
}

/// Waits until the scrape agrees with the kernels' counts, and those have not moved for one
/// poll; returns that scrape. On timeout, the last disagreement is the error.
fn settle(bed: &Bed, lbd: &Lbd, traffic: &Traffic) -> Result<Scrape> {
    let started = Instant::now();
    let mut last: Option<Truth> = None;
    loop {
        let truth = bed.truth()?;
        let scrape = scrape(lbd)?;
        let agree = check_counts(bed, &scrape, &truth, traffic);
        let still = last.as_ref() == Some(&truth) && bed.truth()? == truth;
        match agree {
            Ok(()) if still => return Ok(scrape),
            Err(e) if started.elapsed() > SETTLE => {
                return Err(e.context(format!("counts did not agree within {SETTLE:?}")));
            }
            _ if started.elapsed() > SETTLE => bail!("counts kept moving for {SETTLE:?}"),
            _ => {}
        }
        last = Some(truth);
        thread::sleep(Duration::from_millis(200));
    }
}

/// Mismatches between `/metrics` and what it should say, all listed at once.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn expect(&mut self, what: impl std::fmt::Display, got: u64, want: u64) {
        if got != want {
            self.0
                .push(format!("{what}: /metrics says {got}, expected {want}"));
        }
    }
}

/// The exact checks: per VIP against the client, per backend against that backend, sums, flows
/// against what the test opened, and the global counters. Lists every mismatch.
fn check_counts(bed: &Bed, scrape: &Scrape, truth: &Truth, traffic: &Traffic) -> Result<()> {
    let mut m = Mismatches::default();
    let mut total_packets = 0;
    for (v, (vip, counter)) in bed.vip_labels().into_iter().enumerate() {
        let client = nft(&truth.client, counter)?;
        total_packets += client.packets;
        let labels = [("vip", vip.as_str())];
        let packets = scrape.count("lb_vip_packets_total", &labels)?;
        let bytes = scrape.count("lb_vip_bytes_total", &labels)?;
        let flows = scrape.count("lb_vip_new_flows_total", &labels)?;
        m.expect(
            format!("{vip} packets (client's nft)"),
            packets,
            client.packets,
        );
        m.expect(
            format!("{vip} bytes (client's nft + {ETH_HLEN} per packet)"),
            bytes,
            client.bytes + ETH_HLEN * client.packets,
        );
        let opened = if v == 0 {
            traffic.tcp_connections
        } else {
            traffic.udp_flows
        };
        m.expect(
            format!("{vip} new flows (opened by the test)"),
            flows,
            opened,
        );
        let sums = check_backends(bed, scrape, truth, traffic, v, &mut m)?;
        m.expect(format!("{vip}: sum of backend packets"), sums[0], packets);
        m.expect(format!("{vip}: sum of backend bytes"), sums[1], bytes);
        m.expect(format!("{vip}: sum of backend new flows"), sums[2], flows);
    }
    check_global(scrape, traffic, total_packets, &mut m)?;
    ensure!(m.0.is_empty(), "{}", m.0.join("\n"));
    Ok(())
}

/// Each backend of VIP `v` against its own nft count and the flows and datagrams it answered;
/// a backend not in the VIP has no series and saw nothing. Returns the sums of packets, bytes
/// and new flows.
fn check_backends(
    bed: &Bed,
    scrape: &Scrape,
    truth: &Truth,
    traffic: &Traffic,
    v: usize,
    m: &mut Mismatches,
) -> Result<[u64; 3]> {
    let (vip, counter) = &bed.vip_labels()[v];
    let mut sums = [0; 3];
    for (b, host) in bed.topo.backends.iter().enumerate() {
        let seen = nft(&truth.backends[b], counter)?;
        let addr = host.ip().to_string();
        let name = &host.name;
        let labels = [("vip", vip.as_str()), ("backend", addr.as_str())];
        if v == 1 && b >= UDP_BACKENDS {
            ensure!(
                scrape.get("lb_backend_packets_total", &labels).is_none(),
                "{vip} lists {addr}, which is not its backend"
            );
            m.expect(
                format!("{name} packets for {vip} (not its backend)"),
                seen.packets,
                0,
            );
            continue;
        }
        let packets = scrape.count("lb_backend_packets_total", &labels)?;
        let bytes = scrape.count("lb_backend_bytes_total", &labels)?;
        let flows = scrape.count("lb_backend_new_flows_total", &labels)?;
        m.expect(
            format!("{vip} {addr} packets ({name}'s nft)"),
            packets,
            seen.packets,
        );
        m.expect(
            format!("{vip} {addr} bytes ({name}'s nft + {ETH_HLEN} per packet)"),
            bytes,
            seen.bytes + ETH_HLEN * seen.packets,
        );
        if v == 0 {
            let greeted = traffic.tcp_by_backend.get(name).copied().unwrap_or(0);
            m.expect(
                format!("{vip} {addr} new flows (greeted by {name})"),
                flows,
                greeted,
            );
        } else {
            let (answered_flows, datagrams) =
                traffic.udp_by_backend.get(name).copied().unwrap_or((0, 0));
            m.expect(
                format!("{vip} {addr} new flows (answered by {name})"),
                flows,
                answered_flows,
            );
            m.expect(
                format!("{vip} {addr} datagrams (answered by {name})"),
                packets,
                datagrams,
            );
        }
        for (sum, n) in sums.iter_mut().zip([packets, bytes, flows]) {
            *sum += n;
        }
    }
    Ok(sums)
}

/// XDP actions, flow-table outcomes and drops against the totals.
fn check_global(
    scrape: &Scrape,
    traffic: &Traffic,
    total_packets: u64,
    m: &mut Mismatches,
) -> Result<()> {
    // One-arm: every packet for a VIP goes back out with XDP_TX; nothing is dropped.
    let action = |a: &str| scrape.count("lb_xdp_actions_total", &[("action", a)]);
    m.expect(
        "XDP_TX packets (client's total)",
        action("tx")?,
        total_packets,
    );
    m.expect("XDP_DROP packets", action("drop")?, 0);
    m.expect("XDP_REDIRECT packets", action("redirect")?, 0);
    let opened = traffic.tcp_connections + traffic.udp_flows;
    let new_flows = scrape.count("lb_new_flows_total", &[])?;
    m.expect("new flows, every VIP", new_flows, opened);
    // A packet either finds its flow or creates it (no flow is re-hashed here).
    m.expect(
        "flow-table hits + new flows",
        scrape.count("lb_flow_table_hits_total", &[])? + new_flows,
        total_packets,
    );
    // TCP flows start with a SYN and UDP datagrams start flows: no miss.
    m.expect(
        "flow-table misses",
        scrape.count("lb_flow_table_misses_total", &[])?,
        0,
    );
    for s in scrape
        .parsed
        .samples
        .iter()
        .filter(|s| s.metric == "lb_drops_total")
    {
        let dropped = match s.value {
            Value::Counter(v) => v as u64,
            _ => u64::MAX,
        };
        m.expect(format!("drops {}", s.labels), dropped, 0);
    }
    Ok(())
}

/// Format: parses (both parsers), every counter ends in `_total`, every family of the issue is
/// there with a type the independent parser agrees with; build info; flow-table capacity.
fn check_format(scrape: &Scrape) -> Result<()> {
    let types = lint(&scrape.text)?.types;
    for line in scrape.text.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.strip_suffix(" counter"))
        {
            ensure!(
                name.ends_with("_total"),
                "counter {name} does not end in _total"
            );
        }
    }
    for family in FAMILIES {
        ensure!(
            types.contains_key(family),
            "{family} missing from the scrape"
        );
    }
    for (family, kind) in &types {
        ensure!(
            scrape.parsed.docs.contains_key(family),
            "prometheus-parse found no HELP for {family}"
        );
        let samples: Vec<_> = scrape
            .parsed
            .samples
            .iter()
            .filter(|s| &s.metric == family)
            .collect();
        ensure!(
            !samples.is_empty(),
            "prometheus-parse found no sample of {family}"
        );
        for s in samples {
            let agrees = match kind.as_str() {
                "counter" => matches!(s.value, Value::Counter(_)),
                "gauge" => matches!(s.value, Value::Gauge(_)),
                "histogram" => matches!(s.value, Value::Histogram(_)),
                _ => false,
            };
            ensure!(agrees, "{family} is a {kind}, parsed as {:?}", s.value);
        }
    }
    let build = scrape
        .parsed
        .samples
        .iter()
        .find(|s| s.metric == "lb_build_info")
        .context("no lb_build_info")?;
    ensure!(
        build.value == Value::Gauge(1.0),
        "lb_build_info = {:?}",
        build.value
    );
    ensure!(
        build.labels.get("version").is_some_and(|v| !v.is_empty()),
        "lb_build_info without a version"
    );
    let capacity = scrape.count("lb_flow_table_capacity", &[])?;
    ensure!(
        capacity == u64::from(LbdOptions::default().flow_table_size),
        "lb_flow_table_capacity {capacity}"
    );
    Ok(())
}

/// No data-plane counter series went anywhere across the restart: the same series, and the
/// same values (`pass` may grow: ARP and neighbour traffic go on in the meantime).
fn compare_across_restart(before: &Scrape, after: &Scrape) -> Result<()> {
    let before = before.data_plane_counters();
    let after = after.data_plane_counters();
    ensure!(
        !before.is_empty(),
        "no data-plane counters before the restart"
    );
    let mut wrong = Vec::new();
    for (series, was) in &before {
        match after.get(series) {
            None => wrong.push(format!("{series} is gone")),
            Some(now) if now < was => wrong.push(format!("{series} went back: {was} -> {now}")),
            Some(now) if now != was && !series.contains("action=\"pass\"") => {
                wrong.push(format!("{series} moved without traffic: {was} -> {now}"));
            }
            Some(_) => {}
        }
    }
    for series in after.keys().filter(|s| !before.contains_key(*s)) {
        wrong.push(format!("{series} is new after the restart"));
    }
    ensure!(
        wrong.is_empty(),
        "across the restart:\n{}",
        wrong.join("\n")
    );
    eprintln!(
        "metrics: {} data-plane counter series unchanged across the restart",
        before.len()
    );
    Ok(())
}

/// The first scrape with `lb_flow_table_entries` > 0: once lbd has scanned the table since the
/// traffic (it reuses a scan within the data plane's one-second tick).
fn flow_table_filled(lbd: &Lbd) -> Result<Scrape> {
    let started = Instant::now();
    loop {
        let scrape = scrape(lbd)?;
        let entries = scrape.value("lb_flow_table_entries", &[])?;
        if entries > 0.0 {
            return Ok(scrape);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(3),
            "lb_flow_table_entries is still {entries} 3 s after traffic"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Prints the measured counts (the scrape agreed with them exactly).
fn report(when: &str, bed: &Bed, scrape: &Scrape) -> Result<()> {
    let truth = bed.truth()?;
    for (vip, counter) in bed.vip_labels() {
        let client = nft(&truth.client, counter)?;
        let per_backend: Vec<String> = bed
            .topo
            .backends
            .iter()
            .zip(&truth.backends)
            .map(|(h, t)| Ok(format!("{}={}", h.name, nft(t, counter)?.packets)))
            .collect::<Result<_>>()?;
        eprintln!(
            "metrics: {when}: {vip}: client sent {} packets / {} bytes (IP); lb_vip_packets_total {}, \
             lb_vip_bytes_total {}; backends {}",
            client.packets,
            client.bytes,
            scrape.count("lb_vip_packets_total", &[("vip", &vip)])?,
            scrape.count("lb_vip_bytes_total", &[("vip", &vip)])?,
            per_backend.join(" "),
        );
    }
    eprintln!(
        "metrics: {when}: hits {}, misses {}, new flows {}, tx {}, pass {}, flow-table entries {}",
        scrape.count("lb_flow_table_hits_total", &[])?,
        scrape.count("lb_flow_table_misses_total", &[])?,
        scrape.count("lb_new_flows_total", &[])?,
        scrape.count("lb_xdp_actions_total", &[("action", "tx")])?,
        scrape.count("lb_xdp_actions_total", &[("action", "pass")])?,
        scrape.count("lb_flow_table_entries", &[])?,
    );
    Ok(())
}
