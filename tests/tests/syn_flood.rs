//! A SYN flood from random sources (2.5x the flow table) against a real lbd while 100
//! established connections keep chatting and one established connection sits idle.
//!
//! With the new-flow rate guard on (`new_flow_limit` in `[settings]`), each CPU records at most
//! the limit per tick: the flood is forwarded but mostly not recorded, so nothing is evicted and
//! the idle connection keeps its flow-table entry. With the guard off the flood fills the table
//! and the LRU evicts what was not used recently, which can include the idle connection's entry;
//! the connection still works, because its next packet re-hashes through the unchanged Maglev
//! table to the same backend (it would break only if the backend set changed meanwhile). Both
//! runs check that every chatting connection survives, and that the metrics show the flood.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{FlowKey, FlowValue, maps};
use lb_tests::{
    balancer::flow_key,
    chatter::Chatter,
    lb::{Lbd, LbdOptions, ServedTopology, VipConfig, render_config},
    netns::topology::Topology,
    packet::{ETH_P_IP, IPPROTO_TCP, Ipv4, TCP_SYN, ethernet, tcp_segment},
    packet_socket::PacketSocket,
    traffic::Session,
};
use lb_userspace::dataplane::kernel::AttachMode;

const PORT: u16 = 80;
/// Flow-table entries (split over the CPUs' LRU lists).
const TABLE: u32 = 8192;
/// SYNs of the flood, each from its own source: 2.5x the table.
const FLOOD: usize = 20_480;
/// New flows each CPU may record per tick with the guard on.
const LIMIT: u32 = 200;
const CONNECTIONS: usize = 100;
/// The flood goes out in bursts of this many frames, this far apart (about 100,000 SYNs a
/// second: far more than the guard's limit, and as much as the veth ring takes).
const BURST: usize = 128;
const BURST_PAUSE: Duration = Duration::from_millis(1);
const CHAT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest pause a chatting connection may see.
const MAX_GAP: Duration = Duration::from_secs(2);

#[test]
fn flood_with_the_guard_on_evicts_nothing() {
    run("sfg", LIMIT);
}

#[test]
fn flood_without_the_guard_keeps_active_connections() {
    run("sfn", 0);
}

fn run(label: &str, limit: u32) {
    let bed = ServedTopology::build(
        Topology::one_arm(label).backends(3),
        AttachMode::Native,
        PORT,
    )
    .expect("topology");
    let config = format!(
        "[settings]
new_flow_limit = {limit}

{}",
        render_config(&[VipConfig::for_topology(&bed.topo, PORT)])
    );
    let gw = bed.topo.gw();
    let options = LbdOptions {
        flow_table_size: TABLE,
        ..LbdOptions::default()
    };
    let lbd = Lbd::start_with(&gw.ns, &gw.ifaces(), bed.mode, &config, options).expect("lbd");
    lbd.finish(body(&bed, &lbd, limit), |_| false);
}

fn body(bed: &ServedTopology, lbd: &Lbd, limit: u32) -> Result<()> {
    let topo = &bed.topo;
    let target = bed.target();
    let mut idle = Session::open(&topo.client.ns, target).context("idle connection")?;
    let idle_key = match (idle.local_addr()?, target) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => flow_key(src, dst, IPPROTO_TCP),
        other => bail!("not IPv4: {other:?}"),
    };
    let chatter = Chatter::open(&topo.client.ns, target, CONNECTIONS, CHAT_INTERVAL)?;
    std::thread::sleep(Duration::from_millis(500));
    let flows = flow_table(&lbd.pin_dir)?;
    ensure!(
        flows.get(&idle_key, 0).is_ok(),
        "the idle connection has no flow-table entry before the flood"
    );
    let before = Scrape::take(lbd)?;

    let frames = flood_frames(bed);
    let client = &topo.client;
    let ifindex = client.ns.run(|| ifindex(&client.eth0.name))?;
    let sent = client.ns.run(|| -> Result<u64> {
        let sock = PacketSocket::open(ifindex)?;
        let mut sent = 0;
        // Paced: faster than this, the gateway's veth ring overflows and the flood never
        // reaches the program.
        for burst in frames.chunks(BURST) {
            sent += sock.send_all(burst)?;
            std::thread::sleep(BURST_PAUSE);
        }
        Ok(sent)
    })?;
    ensure!(sent == FLOOD as u64, "sent {sent} of {FLOOD} SYNs");
    // Let the chatter run on past the flood, and lbd's flow scan (a tick) catch up.
    std::thread::sleep(Duration::from_secs(2));
    let after = Scrape::take(lbd)?;

    let report = chatter.stop();
    eprintln!("chatter: {}", report.summary());
    report.check(MAX_GAP)?;
    let backend = idle.backend().to_owned();
    idle.ping().context("the idle connection after the flood")?;
    ensure!(
        idle.backend() == backend,
        "the idle connection moved from {backend} to {}",
        idle.backend()
    );
    let kept = flows.get(&idle_key, 0).is_ok();

    let forwarded = after.value("lb_xdp_actions_total{action=\"tx\"}")
        - before.value("lb_xdp_actions_total{action=\"tx\"}");
    let new_flows = after.value("lb_new_flows_total") - before.value("lb_new_flows_total");
    let unrecorded = after.value("lb_flow_guard_unrecorded_total")
        - before.value("lb_flow_guard_unrecorded_total");
    eprintln!(
        "flood of {FLOOD} SYNs, limit {limit}/tick per CPU: {forwarded} packets forwarded, \
         {new_flows} flows recorded, {unrecorded} unrecorded, table {} of {}; idle entry kept: \
         {kept}",
        after.value("lb_flow_table_entries"),
        after.value("lb_flow_table_capacity"),
    );
    // What reached the program: each SYN is a new flow, recorded or not.
    let seen = new_flows + unrecorded;
    ensure!(
        seen >= 2 * u64::from(TABLE) && forwarded >= seen,
        "the flood reached the data plane as {seen} new flows ({forwarded} packets forwarded), \
         not at least twice the table's {TABLE}"
    );
    ensure!(after.value("lb_flow_guard_limit") == u64::from(limit));
    ensure!(after.value("lb_flow_table_entries") <= u64::from(TABLE));
    if limit == 0 {
        ensure!(unrecorded == 0, "{unrecorded} unrecorded with no limit");
    } else {
        // The flood took at most a few ticks; each CPU recorded at most the limit in each.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u64;
        ensure!(
            new_flows <= 3 * cpus * u64::from(limit),
            "{new_flows} new flows recorded with a limit of {limit} per CPU per tick"
        );
        ensure!(
            kept,
            "the idle connection's entry was evicted with the guard on"
        );
    }
    Ok(())
}

/// SYNs to the VIP from `FLOOD` distinct sources in 172.16.0.0/12, as the client's interface
/// would send them to the gateway.
fn flood_frames(bed: &ServedTopology) -> Vec<Vec<u8>> {
    let topo = &bed.topo;
    let gw_mac = topo.gw().front.mac;
    let client_mac = topo.client.eth0.mac;
    let dst = SocketAddrV4::new(topo.vip, PORT);
    (0..FLOOD as u32)
        .map(|i| {
            let src = SocketAddrV4::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i),
                1024 + (i % 60_000) as u16,
            );
            let segment = tcp_segment(src, dst, TCP_SYN, b"");
            let ip = Ipv4::new(*src.ip(), topo.vip, IPPROTO_TCP).packet(&segment);
            ethernet(gw_mac, client_mac, ETH_P_IP, &ip)
        })
        .collect()
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(
        index != 0,
        "no interface {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(index)
}

/// lbd's pinned flow table.
fn flow_table(pin_dir: &Path) -> Result<HashMap<MapData, FlowKey, FlowValue>> {
    let data = MapData::from_pin(pin_dir.join("maps").join(maps::FLOWS))?;
    Ok(HashMap::try_from(Map::LruHashMap(data))?)
}

/// One `/metrics` scrape: series (name with labels) to value, the integer ones.
struct Scrape(Vec<(String, u64)>);

impl Scrape {
    fn take(lbd: &Lbd) -> Result<Self> {
        let (status, body) = lbd.http_get("/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(Self(
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' '))
                .filter_map(|(series, v)| Some((series.to_owned(), v.parse().ok()?)))
                .collect(),
        ))
    }

    /// The value of `series`; 0 when absent.
    fn value(&self, series: &str) -> u64 {
        self.0
            .iter()
            .find(|(s, _)| s == series)
            .map_or(0, |(_, v)| *v)
    }
}
