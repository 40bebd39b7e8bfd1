//! What `lb_xdp` sends is what a stock Linux backend accepts: end to end through a real lbd
//! on the gateway to three backends that decapsulate with the kernel's own ipip
//! device, not `lb_decap`, and hold the VIP on `lo`. Real TCP connections complete, spread over
//! the backends, carry data byte for byte in both directions, and a UDP VIP answers; every
//! backend's ipip device counts the packets it decapsulated.
//!
//! Two device kinds: the collect-metadata device (`type ipip external`; one-arm, native XDP,
//! `XDP_TX`) and a classic tunnel bound to the backend's address with any remote (two-arm,
//! generic XDP, devmap redirect).
//!
//! Kernels without ipip (this build host's) skip with a message; `cargo xtask vm` runs it on
//! stock Debian kernels with `LB_REQUIRE_KERNEL_TUNNEL=1`, which turns the skip into a failure.
//! Needs root.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    bpf::is_root,
    lb::{BackendDecap, Lbd, ServedTopology, VipConfig, render_config, workspace_bin},
    netns::topology::{IPIP_DEV, IpipDevice, Topology, TopologyBuilder, probe_kernel_ipip},
    traffic::{UdpClient, VipUdpEcho, download, upload, who},
};
use lb_userspace::dataplane::kernel::AttachMode;

/// Set to 1 (by `cargo xtask vm`) when a kernel without ipip must fail the test, not skip it.
const REQUIRE_ENV: &str = "LB_REQUIRE_KERNEL_TUNNEL";
const PORT: u16 = 80;
const UDP_PORT: u16 = 5353;
const CONNECTIONS: usize = 50;
/// 4 x 256 KiB = 1 MiB each way, over 8 connections.
const TRANSFERS: usize = 4;
const TRANSFER_BYTES: u64 = 256 * 1024;
const UDP_FLOWS: usize = 12;
const DATAGRAMS: usize = 3;
/// A TCP connection sends at least SYN, the request and the final ACK/FIN to the backend.
const MIN_PACKETS_PER_CONNECTION: u64 = 3;

/// Native XDP, as on a real NIC: `XDP_TX` back out of eth0 (`xdp_pass` on the veth peer).
#[test]
fn external_device_one_arm_native() {
    run(
        "ktun-ext",
        Topology::one_arm("ktun-ext"),
        AttachMode::Native,
        IpipDevice::External,
    );
}

/// Generic XDP: a devmap redirect from eth0 to eth1.
#[test]
fn any_remote_tunnel_two_arm_generic() {
    run(
        "ktun-any",
        Topology::two_arm("ktun-any"),
        AttachMode::Generic,
        IpipDevice::AnyRemote,
    );
}

/// Whether the test can run here: root, and a kernel that creates ipip devices. Otherwise it
/// skips, or fails when [`REQUIRE_ENV`] is 1.
fn kernel_ready(kind: IpipDevice) -> bool {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    if !is_root("network namespaces, XDP and ipip devices") {
        assert!(
            !required,
            "{REQUIRE_ENV}=1 but the test does not run as root"
        );
        return false;
    }
    match probe_kernel_ipip(kind) {
        Ok(()) => true,
        Err(e) => {
            assert!(
                !required,
                "{REQUIRE_ENV}=1 but this kernel ({}) cannot create an ipip device \
                 (CONFIG_NET_IPIP, module `ipip` loaded?): {e:#}",
                kernel_release()
            );
            eprintln!(
                "skipped: this kernel has no ipip support (runs in `cargo xtask vm`)\n  kernel {}: {e:#}",
                kernel_release()
            );
            false
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|e| format!("unknown ({e})"), |r| r.trim().to_owned())
}

fn run(label: &str, builder: TopologyBuilder, mode: AttachMode, kind: IpipDevice) {
    if !kernel_ready(kind) {
        return;
    }
    let started = Instant::now();
    // Dropped in reverse order: lbd, the UDP servers, then servers, devices and namespaces.
    let bed = ServedTopology::build_with(
        builder.backends(3),
        mode,
        PORT,
        BackendDecap::KernelIpip(kind),
    )
    .unwrap_or_else(|e| panic!("{label}: topology with kernel ipip backends: {e:#}"));
    let topo = &bed.topo;
    let udp_target = SocketAddr::new(IpAddr::V4(topo.vip), UDP_PORT);
    let _udp: Vec<VipUdpEcho> = topo
        .backends
        .iter()
        .map(|b| VipUdpEcho::start(&b.ns, &b.name, udp_target))
        .collect::<Result<_>>()
        .unwrap_or_else(|e| panic!("{label}: UDP servers: {e:#}"));
    let mut vips = vec![VipConfig::for_topology(topo, PORT)];
    vips.push(VipConfig {
        address: format!("{udp_target}/udp"),
        ..vips[0].clone()
    });
    // Under `cargo xtask vm` binaries come in over 9p: read lbd once, so its readiness wait
    // does not also time the first transfer of its ~150 MB debug build.
    warm(&workspace_bin("lbd").unwrap_or_else(|e| panic!("{e:#}")));
    let gw = topo.gw();
    let lbd = Lbd::start(&gw.ns, &gw.ifaces(), mode, &render_config(&vips))
        .unwrap_or_else(|e| panic!("{label}: lbd: {e:#}"));
    let result = check(&bed, kind, udp_target)
        .and_then(|()| lbd.expect_no_errors(|_| false))
        .with_context(|| format!("{label}: {mode:?} XDP, backends decapsulating with {kind:?}"));
    lbd.finish(result, |_| false);
    eprintln!("{label}: done in {:.1} s", started.elapsed().as_secs_f64());
}

fn check(bed: &ServedTopology, kind: IpipDevice, udp_target: SocketAddr) -> Result<()> {
    let topo = &bed.topo;
    let client = &topo.client.ns;
    for b in &topo.backends {
        eprintln!(
            "{}: ip {}; sysctl net.ipv4.conf.{IPIP_DEV}.rp_filter=0",
            b.name,
            kind.ip_lines(b.ip()).join("; ip ")
        );
    }
    let rx_before = ipip_rx(topo)?;
    // No lb_decap anywhere: the kernel device is the only way in.
    for b in &topo.backends {
        let link = b.ns.ip(["-d", "link", "show", "dev", &b.eth0.name])?;
        ensure!(
            !link.contains("xdp"),
            "{}: eth0 carries an XDP program: {link}",
            b.name
        );
    }

    let target = bed.target();
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..CONNECTIONS {
        let name =
            who(client, target).with_context(|| format!("TCP connection {i} to {target}"))?;
        *per_backend.entry(name).or_default() += 1;
    }
    for b in &topo.backends {
        ensure!(
            per_backend.contains_key(&b.name),
            "{} answered none of {CONNECTIONS} connections: {per_backend:?}",
            b.name
        );
    }
    ensure!(
        per_backend.len() == topo.backends.len(),
        "answers from unknown names: {per_backend:?}"
    );

    for t in 0..TRANSFERS {
        download(client, target, TRANSFER_BYTES)
            .with_context(|| format!("download {t} of {TRANSFER_BYTES} bytes"))?;
        upload(client, target, TRANSFER_BYTES)
            .with_context(|| format!("upload {t} of {TRANSFER_BYTES} bytes"))?;
    }

    let mut udp_by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for f in 0..UDP_FLOWS {
        let socket = UdpClient::new(client, udp_target)?;
        let mut answered_by: Option<String> = None;
        for d in 0..DATAGRAMS {
            // One datagram per flow near the client's MTU: the largest the tunnel carries.
            let payload = if d == 0 {
                vec![b'x'; 1400]
            } else {
                format!("flow {f} datagram {d}").into_bytes()
            };
            let name = socket
                .who(&payload)
                .with_context(|| format!("UDP flow {f}, datagram {d} to {udp_target}"))?;
            let first = answered_by.get_or_insert_with(|| name.clone());
            ensure!(*first == name, "UDP flow {f} moved from {first} to {name}");
        }
        *udp_by_backend
            .entry(answered_by.context("a flow without datagrams")?)
            .or_default() += 1;
    }

    // Every backend's device decapsulated at least its share of the TCP packets (plus UDP).
    let rx_after = ipip_rx(topo)?;
    let mut grew = BTreeMap::new();
    for (b, (before, after)) in topo.backends.iter().zip(rx_before.iter().zip(&rx_after)) {
        let got = after.saturating_sub(*before);
        let connections = per_backend.get(&b.name).copied().unwrap_or(0);
        ensure!(
            got >= connections * MIN_PACKETS_PER_CONNECTION,
            "{}: {IPIP_DEV} received {got} packets for {connections} connections",
            b.name
        );
        grew.insert(b.name.clone(), got);
    }
    eprintln!(
        "{kind:?}: TCP {per_backend:?}; {TRANSFERS} x {TRANSFER_BYTES} bytes each way intact; \
         UDP flows {udp_by_backend:?}; {IPIP_DEV} rx packets {grew:?}"
    );
    Ok(())
}

/// Reads `path` to the end, into the page cache; failures show up when lbd starts.
fn warm(path: &Path) {
    let read = File::open(path).and_then(|mut f| io::copy(&mut f, &mut io::sink()));
    if let Err(e) = read {
        eprintln!("reading {}: {e}", path.display());
    }
}

/// Each backend's ipip device rx packet count, in topology order.
fn ipip_rx(topo: &Topology) -> Result<Vec<u64>> {
    topo.backends
        .iter()
        .map(|b| {
            b.ipip_rx_packets()
                .with_context(|| format!("{}: {IPIP_DEV} counters", b.name))
        })
        .collect()
}
