//! GUE through the real balancer (issue 9): VIPs with `encap = "gue"`, backends decapsulating
//! with `lb_decap`, over IPv4 backends (lbd's default GUE port) and over IPv6 backends (a port
//! set in `[settings]`). TCP to an IPv4 and an IPv6 VIP (60 connections reaching every backend,
//! 1 MiB each way per VIP byte for byte) and a UDP VIP. The switch counts what it forwards to
//! each backend: UDP to the GUE port in the backends' family, and no IPIP at all.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    lb::{BackendDecap, Lbd, ServedTopology, VipConfig, render_config_with},
    netns::topology::{EncapCounters, Topology},
    traffic::{UdpClient, VipUdpEcho, download, upload, who},
};
use lb_userspace::dataplane::kernel::AttachMode;

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const BACKENDS: usize = 3;
/// Per TCP VIP.
const CONNECTIONS: usize = 30;
const UDP_FLOWS: usize = 30;
const MIB: u64 = 1 << 20;
/// `lbd`'s and `lb_decap`'s default GUE port.
const DEFAULT_GUE_PORT: u16 = 6080;

/// `gue_port`: `None` leaves lbd and `lb_decap` at their default ([`DEFAULT_GUE_PORT`]).
fn gue_case(label: &str, v6_backends: bool, gue_port: Option<u16>) {
    let decap = gue_port.map_or(BackendDecap::LbDecap, BackendDecap::LbDecapGue);
    let bed = ServedTopology::build_with(
        Topology::two_arm(label).backends(BACKENDS),
        AttachMode::Native,
        TCP_PORT,
        decap,
    )
    .expect("topology");
    let topo = &bed.topo;
    let udp_vip = SocketAddr::new(IpAddr::V4(topo.vip), UDP_PORT);
    let _echoes: Vec<VipUdpEcho> = topo
        .backends
        .iter()
        .map(|b| VipUdpEcho::start(&b.ns, &b.name, udp_vip))
        .collect::<Result<_>>()
        .expect("UDP servers");
    let addrs: Vec<IpAddr> = topo
        .backends
        .iter()
        .map(|b| {
            if v6_backends {
                IpAddr::V6(b.eth0.ip6)
            } else {
                IpAddr::V4(b.ip())
            }
        })
        .collect();
    let tcp4 = SocketAddr::new(IpAddr::V4(topo.vip), TCP_PORT);
    let tcp6 = SocketAddr::new(IpAddr::V6(topo.vip6), TCP_PORT);
    let gue: &[&str] = &["encap = \"gue\""];
    let vips: Vec<(VipConfig, &[&str])> = [
        format!("{tcp4}/tcp"),
        format!("{tcp6}/tcp"),
        format!("{udp_vip}/udp"),
    ]
    .into_iter()
    .map(|address| (VipConfig::with_backends(address, addrs.clone()), gue))
    .collect();
    let setting = gue_port.map(|p| format!("gue_port = {p}"));
    let settings: Vec<&str> = setting.iter().map(String::as_str).collect();
    let config = render_config_with(&settings, &vips);

    let port = gue_port.unwrap_or(DEFAULT_GUE_PORT);
    let encap = topo.count_backend_encap(port).expect("switch counters");
    let gw = topo.gw();
    let lbd = Lbd::start(&gw.ns, &gw.ifaces(), bed.mode, &config).expect("lbd");
    let result = check(&bed, &[tcp4, tcp6], udp_vip, &encap, v6_backends);
    lbd.finish(result, |_| false);
}

fn check(
    bed: &ServedTopology,
    tcp: &[SocketAddr],
    udp: SocketAddr,
    encap: &EncapCounters,
    v6_backends: bool,
) -> Result<()> {
    let client = &bed.topo.client.ns;
    let names: BTreeSet<String> = bed.servers.iter().map(|s| s.name().to_owned()).collect();
    for &target in tcp {
        let mut seen = BTreeSet::new();
        for i in 0..CONNECTIONS {
            seen.insert(
                who(client, target).with_context(|| format!("connection {i} to {target}"))?,
            );
        }
        ensure!(
            seen == names,
            "{target}: answers from {seen:?}, backends {names:?}"
        );
        download(client, target, MIB).with_context(|| format!("1 MiB from {target}"))?;
        upload(client, target, MIB).with_context(|| format!("1 MiB to {target}"))?;
    }

    let mut seen = BTreeSet::new();
    for i in 0..UDP_FLOWS {
        let payload = format!("flow {i}");
        let name = UdpClient::new(client, udp)?
            .who(payload.as_bytes())
            .with_context(|| format!("UDP flow {i} to {udp}"))?;
        seen.insert(name);
    }
    ensure!(
        seen == names,
        "{udp}: answers from {seen:?}, backends {names:?}"
    );

    let counts = encap.read()?;
    for (server, count) in bed.servers.iter().zip(&counts) {
        let (gue, other_gue) = if v6_backends {
            (count.gue6, count.gue4)
        } else {
            (count.gue4, count.gue6)
        };
        // Each backend took about a third of 60 connections (4 packets or more each) and of
        // the UDP flows: 20 is far below that, and far above stray packets.
        ensure!(
            gue >= 20 && other_gue == 0 && count.ipip4 == 0 && count.ipip6 == 0,
            "{}: outer headers seen on the switch {count:?}, expected only GUE over IPv{}",
            server.name(),
            if v6_backends { 6 } else { 4 }
        );
    }
    eprintln!("GUE: every backend answered TCP (v4 and v6 VIP) and UDP; switch saw {counts:?}");
    Ok(())
}

#[test]
fn gue_over_ipv4_backends() {
    gue_case("gue4", false, None);
}

#[test]
fn gue_over_ipv6_backends() {
    gue_case("gue6", true, Some(7777));
}
