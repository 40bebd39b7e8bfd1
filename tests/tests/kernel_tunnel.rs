//! What `lb_xdp` sends is what a stock Linux backend accepts: end to end through a real lbd
//! on the gateway to three backends that decapsulate with the kernel's own tunnel devices, not
//! `lb_decap`, and hold the VIPs on `lo`. Real TCP connections complete, spread over the
//! backends, carry data byte for byte in both directions, and a UDP VIP answers; every
//! backend's tunnel device counts the packets it decapsulated.
//!
//! Every outer shape `lb_xdp` writes: IPIP in IPv4 (an `ipip` device), IPv4 and IPv6 in IPv6
//! (an `ip6tnl` device in `mode any`, with per-flow outer sources and flow labels), and GUE
//! variant 1 over IPv4 and IPv6 (the kernel's fou socket in GUE mode, handing the inner packet
//! to the same devices). Two device kinds: the collect-metadata device (`external`) and a
//! classic tunnel bound to the backend's address with any remote. Half the cases are one-arm
//! native XDP (`XDP_TX`), half two-arm generic XDP (devmap redirect).
//!
//! Kernels without these devices (this build host's) skip with a message; `cargo xtask vm`
//! runs it on stock Debian kernels with `LB_REQUIRE_KERNEL_TUNNEL=1`, which turns the skip into
//! a failure. Needs root.

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
    lb::{BackendDecap, Lbd, ServedTopology, VipConfig, render_config_with, workspace_bin},
    netns::topology::{
        IpipDevice, KernelEncap, KernelTunnel, Topology, TopologyBuilder, probe_kernel_tunnel,
    },
    traffic::{UdpClient, VipUdpEcho, download, upload, who},
};
use lb_userspace::dataplane::kernel::AttachMode;

/// Set to 1 (by `cargo xtask vm`) when a kernel without the devices must fail the test, not
/// skip it.
const REQUIRE_ENV: &str = "LB_REQUIRE_KERNEL_TUNNEL";
const PORT: u16 = 80;
const UDP_PORT: u16 = 5353;
/// lbd's default, set explicitly so the fou socket and lbd cannot disagree.
const GUE_PORT: u16 = 6080;
/// Per TCP VIP.
const CONNECTIONS: usize = 50;
/// 4 x 256 KiB = 1 MiB each way per TCP VIP, over 8 connections.
const TRANSFERS: usize = 4;
const TRANSFER_BYTES: u64 = 256 * 1024;
const UDP_FLOWS: usize = 12;
const DATAGRAMS: usize = 3;
/// A TCP connection sends at least SYN, the request and the final ACK/FIN to the backend.
const MIN_PACKETS_PER_CONNECTION: u64 = 3;

/// IPIP in IPv4, native XDP as on a real NIC: `XDP_TX` back out of eth0 (`xdp_pass` on the
/// veth peer).
#[test]
fn external_device_one_arm_native() {
    run(
        "ktun-ext",
        Topology::one_arm("ktun-ext"),
        AttachMode::Native,
        KernelTunnel::new(KernelEncap::Ipip4, IpipDevice::External),
    );
}

/// IPIP in IPv4, generic XDP: a devmap redirect from eth0 to eth1.
#[test]
fn any_remote_tunnel_two_arm_generic() {
    run(
        "ktun-any",
        Topology::two_arm("ktun-any"),
        AttachMode::Generic,
        KernelTunnel::new(KernelEncap::Ipip4, IpipDevice::AnyRemote),
    );
}

/// IPv4 and IPv6 VIPs over IPv6 backends (next header 4 and 41) into `ip6tnl external`.
#[test]
fn ip6tnl_external_two_arm_native() {
    run(
        "ktun-6ext",
        Topology::two_arm("ktun-6ext"),
        AttachMode::Native,
        KernelTunnel::new(KernelEncap::Ipip6, IpipDevice::External),
    );
}

/// The same into an ip6tnl bound to the backend's IPv6 address with any remote.
#[test]
fn ip6tnl_any_remote_one_arm_generic() {
    run(
        "ktun-6any",
        Topology::one_arm("ktun-6any"),
        AttachMode::Generic,
        KernelTunnel::new(KernelEncap::Ipip6, IpipDevice::AnyRemote),
    );
}

/// GUE over IPv4 backends: fou in GUE mode, then `ipip external`.
#[test]
fn gue4_external_one_arm_native() {
    run(
        "ktun-gue4",
        Topology::one_arm("ktun-gue4"),
        AttachMode::Native,
        KernelTunnel::new(KernelEncap::Gue4(GUE_PORT), IpipDevice::External),
    );
}

/// GUE over IPv6 backends (IPv4 and IPv6 VIPs): fou in GUE mode for IPv6 (which takes the zero
/// UDP checksum: the kernel's tunnel sockets allow it), then an ip6tnl bound to the backend.
#[test]
fn gue6_any_remote_two_arm_generic() {
    run(
        "ktun-gue6",
        Topology::two_arm("ktun-gue6"),
        AttachMode::Generic,
        KernelTunnel::new(KernelEncap::Gue6(GUE_PORT), IpipDevice::AnyRemote),
    );
}

/// Whether the test can run here: root, and a kernel that sets up `tunnel`. Otherwise it
/// skips, or fails when [`REQUIRE_ENV`] is 1.
fn kernel_ready(tunnel: KernelTunnel) -> bool {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    if !is_root("network namespaces, XDP and tunnel devices") {
        assert!(
            !required,
            "{REQUIRE_ENV}=1 but the test does not run as root"
        );
        return false;
    }
    match probe_kernel_tunnel(tunnel) {
        Ok(()) => true,
        Err(e) => {
            assert!(
                !required,
                "{REQUIRE_ENV}=1 but this kernel ({}) cannot set up {tunnel:?} \
                 (CONFIG_NET_IPIP, CONFIG_IPV6_TUNNEL, CONFIG_NET_FOU; modules `ipip`, \
                 `ip6_tunnel`, `fou`, `fou6` loaded?): {e:#}",
                kernel_release()
            );
            eprintln!(
                "skipped: this kernel cannot set up {tunnel:?} (runs in `cargo xtask vm`)\n  \
                 kernel {}: {e:#}",
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

fn run(label: &str, builder: TopologyBuilder, mode: AttachMode, tunnel: KernelTunnel) {
    if !kernel_ready(tunnel) {
        return;
    }
    let started = Instant::now();
    // Dropped in reverse order: lbd, the UDP servers, then servers, devices and namespaces.
    let bed = ServedTopology::build_with(
        builder.backends(3),
        mode,
        PORT,
        BackendDecap::Kernel(tunnel),
    )
    .unwrap_or_else(|e| panic!("{label}: topology with kernel tunnel backends: {e:#}"));
    let topo = &bed.topo;
    let udp_target = SocketAddr::new(IpAddr::V4(topo.vip), UDP_PORT);
    let _udp: Vec<VipUdpEcho> = topo
        .backends
        .iter()
        .map(|b| VipUdpEcho::start(&b.ns, &b.name, udp_target))
        .collect::<Result<_>>()
        .unwrap_or_else(|e| panic!("{label}: UDP servers: {e:#}"));
    // An IPv6 outer header carries either family; an IPv4 one only IPv4 (ipip has no IPv6
    // inside: that is the sit device's, which lb_xdp's users do not need).
    let mut tcp_targets = vec![SocketAddr::new(IpAddr::V4(topo.vip), PORT)];
    if tunnel.encap.outer_v6() {
        tcp_targets.push(SocketAddr::new(IpAddr::V6(topo.vip6), PORT));
    }
    let backends: Vec<IpAddr> = topo
        .backends
        .iter()
        .map(|b| {
            if tunnel.encap.outer_v6() {
                IpAddr::V6(b.eth0.ip6)
            } else {
                IpAddr::V4(b.ip())
            }
        })
        .collect();
    let gue: &[&str] = if tunnel.encap.gue_port().is_some() {
        &["encap = \"gue\""]
    } else {
        &[]
    };
    let vips: Vec<(VipConfig, &[&str])> = tcp_targets
        .iter()
        .map(|t| format!("{t}/tcp"))
        .chain([format!("{udp_target}/udp")])
        .map(|address| (VipConfig::with_backends(address, backends.clone()), gue))
        .collect();
    let setting = tunnel.encap.gue_port().map(|p| format!("gue_port = {p}"));
    let settings: Vec<&str> = setting.iter().map(String::as_str).collect();
    let config = render_config_with(&settings, &vips);
    // Under `cargo xtask vm` binaries come in over 9p: read lbd once, so its readiness wait
    // does not also time the first transfer of its ~150 MB debug build.
    warm(&workspace_bin("lbd").unwrap_or_else(|e| panic!("{e:#}")));
    let gw = topo.gw();
    let lbd = Lbd::start(&gw.ns, &gw.ifaces(), mode, &config)
        .unwrap_or_else(|e| panic!("{label}: lbd: {e:#}"));
    let result = check(&bed, tunnel, &tcp_targets, udp_target)
        .and_then(|()| lbd.expect_no_errors(|_| false))
        .with_context(|| format!("{label}: {mode:?} XDP, backends decapsulating with {tunnel:?}"));
    if result.is_err() {
        dump_backend_state(topo, tunnel);
    }
    lbd.finish(result, |_| false);
    eprintln!("{label}: done in {:.1} s", started.elapsed().as_secs_f64());
}

fn check(
    bed: &ServedTopology,
    tunnel: KernelTunnel,
    tcp_targets: &[SocketAddr],
    udp_target: SocketAddr,
) -> Result<()> {
    let topo = &bed.topo;
    let client = &topo.client.ns;
    let dev = tunnel.dev();
    for b in &topo.backends {
        eprintln!(
            "{}: ip {}; sysctl net.ipv4.conf.{dev}.rp_filter=0",
            b.name,
            tunnel.ip_lines(b.ip(), b.eth0.ip6).join("; ip ")
        );
    }
    let rx_before = tunnel_rx(topo, dev)?;
    // No lb_decap anywhere: the kernel device is the only way in.
    for b in &topo.backends {
        let link = b.ns.ip(["-d", "link", "show", "dev", &b.eth0.name])?;
        ensure!(
            !link.contains("xdp"),
            "{}: eth0 carries an XDP program: {link}",
            b.name
        );
    }

    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for &target in tcp_targets {
        let mut this_vip: BTreeMap<String, u64> = BTreeMap::new();
        for i in 0..CONNECTIONS {
            let name =
                who(client, target).with_context(|| format!("TCP connection {i} to {target}"))?;
            *this_vip.entry(name).or_default() += 1;
        }
        for b in &topo.backends {
            ensure!(
                this_vip.contains_key(&b.name),
                "{target}: {} answered none of {CONNECTIONS} connections: {this_vip:?}",
                b.name
            );
        }
        ensure!(
            this_vip.len() == topo.backends.len(),
            "{target}: answers from unknown names: {this_vip:?}"
        );
        for t in 0..TRANSFERS {
            download(client, target, TRANSFER_BYTES)
                .with_context(|| format!("download {t} of {TRANSFER_BYTES} bytes from {target}"))?;
            upload(client, target, TRANSFER_BYTES)
                .with_context(|| format!("upload {t} of {TRANSFER_BYTES} bytes to {target}"))?;
        }
        for (name, n) in this_vip {
            *per_backend.entry(name).or_default() += n;
        }
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
    let rx_after = tunnel_rx(topo, dev)?;
    let mut grew = BTreeMap::new();
    for (b, (before, after)) in topo.backends.iter().zip(rx_before.iter().zip(&rx_after)) {
        let got = after.saturating_sub(*before);
        let connections = per_backend.get(&b.name).copied().unwrap_or(0);
        ensure!(
            got >= connections * MIN_PACKETS_PER_CONNECTION,
            "{}: {dev} received {got} packets for {connections} connections",
            b.name
        );
        grew.insert(b.name.clone(), got);
    }
    eprintln!(
        "{tunnel:?}: TCP {per_backend:?} over {tcp_targets:?}; {TRANSFERS} x {TRANSFER_BYTES} \
         bytes each way per VIP intact; UDP flows {udp_by_backend:?}; {dev} rx packets {grew:?}"
    );
    Ok(())
}

/// On failure: the client's IPv6 routes, and what each backend's kernel made of the tunnel packets (device counters, fou
/// sockets, the stack's counters), for the report.
fn dump_backend_state(topo: &Topology, tunnel: KernelTunnel) {
    for args in [["-6", "route", "show"], ["-6", "addr", "show"]] {
        match topo.client.ns.ip(args) {
            Ok(out) => eprintln!("client: ip {}:\n{out}", args.join(" ")),
            Err(e) => eprintln!("client: ip {}: {e:#}", args.join(" ")),
        }
    }
    for b in &topo.backends {
        let mut commands: Vec<Vec<&str>> = vec![
            vec!["-s", "-d", "link", "show", "dev", tunnel.dev()],
            vec!["-s", "link", "show", "dev", &b.eth0.name],
        ];
        if tunnel.encap.gue_port().is_some() {
            commands.push(vec!["fou", "show"]);
        }
        for args in commands {
            match b.ns.ip(&args) {
                Ok(out) => eprintln!("{}: ip {}:\n{out}", b.name, args.join(" ")),
                Err(e) => eprintln!("{}: ip {}: {e:#}", b.name, args.join(" ")),
            }
        }
        // Absolute, non-zero counters without touching nstat's history file.
        let nstat = std::process::Command::new("ip")
            .args(["netns", "exec", b.ns.name(), "nstat", "-as"])
            .output();
        match nstat {
            Ok(out) => eprintln!(
                "{}: nstat -as:\n{}{}",
                b.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("{}: nstat: {e}", b.name),
        }
    }
}

/// Reads `path` to the end, into the page cache; failures show up when lbd starts.
fn warm(path: &Path) {
    let read = File::open(path).and_then(|mut f| io::copy(&mut f, &mut io::sink()));
    if let Err(e) = read {
        eprintln!("reading {}: {e}", path.display());
    }
}

/// Each backend's tunnel device rx packet count, in topology order.
fn tunnel_rx(topo: &Topology, dev: &str) -> Result<Vec<u64>> {
    topo.backends
        .iter()
        .map(|b| {
            b.tunnel_rx_packets(dev)
                .with_context(|| format!("{}: {dev} counters", b.name))
        })
        .collect()
}
