//! IPv6 through the real balancer (issue 9): an IPv6 VIP over IPv6 backends (IPv6 in IPv6) and
//! an IPv4 VIP over IPv6 backends (IPv4 in IPv6). Each: lbd on a two-arm gateway in native
//! mode, 300 connections that must reach every backend, 10 MiB each way checked byte for byte,
//! the outer headers counted on the switch (IPv6 IPIP, nothing else), and echo requests to the
//! VIP answered by the gateway itself (and, once lbd restarts with `icmp_echo_reply = false`,
//! by nobody).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_common::{Counter, DropReason};
use lb_tests::{
    lb::{Lbd, ServedTopology, VipConfig, render_config},
    netns::topology::Topology,
    traffic::{download, ping, upload, who},
};
use lb_userspace::dataplane::kernel::AttachMode;

const PORT: u16 = 80;
const BACKENDS: usize = 3;
const CONNECTIONS: usize = 300;
/// 10 connections each download and upload 1 MiB: 10 MiB each way in total.
const BULK_CONNECTIONS: u64 = 10;
const MIB: u64 = 1 << 20;
const PINGS: u16 = 5;
const PING_WAIT: Duration = Duration::from_secs(2);

/// Builds the bed, starts lbd with one VIP at `vip`:80/tcp over the backends' IPv6 addresses
/// and runs the checks; a failure panics with lbd's log.
fn ipv6_backends(label: &str, vip: fn(&Topology) -> IpAddr) {
    let bed = ServedTopology::build(
        Topology::two_arm(label).backends(BACKENDS),
        AttachMode::Native,
        PORT,
    )
    .expect("topology");
    let topo = &bed.topo;
    let target = SocketAddr::new(vip(topo), PORT);
    let backends = topo.backends.iter().map(|b| IpAddr::V6(b.eth0.ip6));
    let config = render_config(&[VipConfig::with_backends(format!("{target}/tcp"), backends)]);
    let encap = topo.count_backend_encap(6080).expect("switch counters");
    let gw = topo.gw();
    let mut lbd = Lbd::start(&gw.ns, &gw.ifaces(), bed.mode, &config).expect("lbd");
    let result = check(&bed, &lbd, target, &encap);
    lbd.finish(result, |_| false);
    let echo_off = format!("[settings]\nicmp_echo_reply = false\n\n{config}");
    let result = no_echo_when_off(&bed, &mut lbd, target.ip(), &echo_off);
    lbd.finish(result, |_| false);
}

/// With `icmp_echo_reply = false`, nothing answers: the ping helper only counts the gateway's
/// replies, and the requests are dropped as `unsupported_protocol`.
fn no_echo_when_off(bed: &ServedTopology, lbd: &mut Lbd, vip: IpAddr, config: &str) -> Result<()> {
    std::fs::write(&lbd.config_path, config).context("writing lbd's config")?;
    lbd.restart()?;
    let drops_before = lbd.drops(DropReason::UnsupportedProtocol)?;
    let answered = ping(&bed.topo.client.ns, vip, 2, Duration::from_secs(1))?;
    let drops = lbd.drops(DropReason::UnsupportedProtocol)? - drops_before;
    ensure!(
        answered == 0,
        "{answered} echo requests to {vip} answered with echo replies off"
    );
    ensure!(
        drops >= 2,
        "{drops} unsupported_protocol drops for 2 echo requests to {vip}"
    );
    Ok(())
}

fn check(
    bed: &ServedTopology,
    lbd: &Lbd,
    target: SocketAddr,
    encap: &lb_tests::netns::topology::EncapCounters,
) -> Result<()> {
    let client = &bed.topo.client.ns;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..CONNECTIONS {
        let name = who(client, target).with_context(|| format!("connection {i} to {target}"))?;
        *per_backend.entry(name).or_default() += 1;
    }
    // A fair hash gives each about 100 (sigma about 8): half of that only fails when a
    // backend is (nearly) left out.
    let even = CONNECTIONS / BACKENDS;
    for server in &bed.servers {
        let got = per_backend.get(server.name()).copied().unwrap_or(0);
        ensure!(
            got >= even / 2,
            "{} got {got} of {CONNECTIONS} connections: {per_backend:?}",
            server.name()
        );
    }
    ensure!(
        per_backend.len() == BACKENDS,
        "answers from unknown names: {per_backend:?}"
    );
    let served: u64 = bed
        .servers
        .iter()
        .map(lb_tests::traffic::Server::requests)
        .sum();
    ensure!(
        served == CONNECTIONS as u64,
        "the servers counted {served} requests for {CONNECTIONS} connections"
    );

    for i in 0..BULK_CONNECTIONS {
        download(client, target, MIB).with_context(|| format!("download {i}"))?;
        upload(client, target, MIB).with_context(|| format!("upload {i}"))?;
    }

    // Every backend was reached through an IPv6 outer header, and only through one.
    let counts = encap.read()?;
    for (server, count) in bed.servers.iter().zip(&counts) {
        ensure!(
            count.ipip6 > 0 && count.ipip4 == 0 && count.gue4 == 0 && count.gue6 == 0,
            "{}: outer headers seen on the switch {count:?}, expected only IPv6 IPIP",
            server.name()
        );
    }

    let echo_before = lbd.counter(Counter::EchoReplies)?;
    let answered = ping(client, target.ip(), PINGS, PING_WAIT)?;
    let echo_after = lbd.counter(Counter::EchoReplies)?;
    ensure!(
        answered == PINGS,
        "{answered} of {PINGS} echo requests to {} answered (EchoReplies {echo_before} -> {echo_after})",
        target.ip()
    );
    ensure!(
        echo_after >= echo_before + u64::from(PINGS),
        "EchoReplies {echo_before} -> {echo_after} after {PINGS} answered echo requests"
    );
    eprintln!(
        "{target}: {per_backend:?}; {BULK_CONNECTIONS} MiB each way intact; {answered} echo replies; switch saw {counts:?}"
    );
    Ok(())
}

#[test]
fn ipv6_vip_over_ipv6_backends() {
    ipv6_backends("v6v6", |t| IpAddr::V6(t.vip6));
}

#[test]
fn ipv4_vip_over_ipv6_backends() {
    ipv6_backends("v4v6", |t| IpAddr::V4(t.vip));
}
