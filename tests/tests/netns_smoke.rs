//! Proves the namespace harness without the load balancer: both topology shapes carry real TCP
//! and UDP from the client to every backend's own address (IPv4 and IPv6), large transfers
//! arrive byte-identical, and dropping a topology leaves no namespace, interface or process.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use lb_tests::{
    netns::{Netns, Topology},
    traffic::{self, Server, Session, UdpClient, UdpEcho},
};

const PORT: u16 = 8080;
const TEN_MB: u64 = 10 * 1024 * 1024;

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn names(topology: &Topology) -> Vec<String> {
    let mut names = vec![
        topology.client.ns.name().to_owned(),
        topology.switch.name().to_owned(),
    ];
    names.extend(topology.gateways.iter().map(|g| g.ns.name().to_owned()));
    names.extend(topology.backends.iter().map(|b| b.ns.name().to_owned()));
    names
}

fn assert_gone(names: &[String]) {
    let list = netns_list();
    for name in names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} survived its drop:\n{list}"
        );
    }
}

/// Client to each backend directly: WHO over IPv4 and IPv6, UDP, HTTP, a 10 MB download and a
/// 1 MB upload, and a long-lived session.
fn exercise(topology: &Topology) {
    let servers: Vec<Server> = topology
        .backends
        .iter()
        .map(|b| Server::start(&b.ns, &b.name, PORT).unwrap_or_else(|e| panic!("{e:#}")))
        .collect();
    let udp: Vec<UdpEcho> = topology
        .backends
        .iter()
        .map(|b| UdpEcho::start(&b.ns, &b.name, PORT).unwrap_or_else(|e| panic!("{e:#}")))
        .collect();
    let client = &topology.client.ns;
    for backend in &topology.backends {
        let v4 = SocketAddr::new(IpAddr::V4(backend.eth0.ip), PORT);
        let v6 = SocketAddr::new(IpAddr::V6(backend.eth0.ip6), PORT);
        assert_eq!(
            traffic::who(client, v4).unwrap_or_else(|e| panic!("{e:#}")),
            backend.name
        );
        assert_eq!(
            traffic::who(client, v6).unwrap_or_else(|e| panic!("{e:#}")),
            backend.name
        );
        assert_eq!(
            traffic::udp_who(client, v4).unwrap_or_else(|e| panic!("{e:#}")),
            backend.name
        );
        let (status, body) = traffic::http_get(client, v4, "/").unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!((status, body.trim()), (200, backend.name.as_str()));
        // curl, run through nsenter, reaches the HTTP side (as the demo will).
        let url = format!("http://{v4}/");
        let curl = client
            .exec(["curl", "-sS", "--max-time", "5", url.as_str()])
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(curl, format!("{}\n", backend.name));
        traffic::upload(client, v4, 1 << 20).unwrap_or_else(|e| panic!("{e:#}"));
        let mut session = Session::open(client, v6).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(session.backend(), backend.name);
        for _ in 0..3 {
            session.ping().unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
    let first = &topology.backends[0];
    traffic::download(
        client,
        SocketAddr::new(IpAddr::V4(first.eth0.ip), PORT),
        TEN_MB,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Each backend saw WHO v4, WHO v6, PUT and the session, plus two HTTP requests that do
    // not count as requests; the first one also served the download.
    for (i, server) in servers.iter().enumerate() {
        let extra = u64::from(i == 0);
        assert_eq!(server.requests(), 4 + extra, "{}", server.name());
        assert_eq!(server.accepted(), 6 + extra, "{}", server.name());
    }
    let client_udp = UdpClient::new(
        client,
        SocketAddr::new(IpAddr::V4(first.eth0.ip), udp[0].port()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        client_udp.who(b"twice").unwrap_or_else(|e| panic!("{e:#}")),
        first.name
    );
    assert_eq!(
        client_udp.who(b"twice").unwrap_or_else(|e| panic!("{e:#}")),
        first.name
    );

    // The server answers 503 once told to: what a failing HTTP health check sees.
    servers[0].set_http_status(503);
    let (status, _) = traffic::http_get(
        client,
        SocketAddr::new(IpAddr::V4(first.eth0.ip), PORT),
        "/health",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(status, 503);

    // A stopped server refuses: the harness's servers really stop.
    let stopped = servers.into_iter().next().expect("a server");
    stopped.stop();
    assert!(traffic::who(client, SocketAddr::new(IpAddr::V4(first.eth0.ip), PORT)).is_err());
}

#[test]
fn one_arm_carries_traffic_and_cleans_up() {
    let topology = Topology::one_arm("smoke1")
        .backends(3)
        .build()
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(topology.gw().ifaces(), ["eth0"]);
    assert_eq!(topology.backends[2].eth0.ip.to_string(), "10.10.0.13");
    // Setup the tests rely on: DSR sysctls, the VIP on lo, the client's route to the VIP,
    // checksum offload off on the client, MTUs.
    let be = &topology.backends[0].ns;
    // Read back by a separate process, so the per-thread setns in `sysctls` is checked too.
    let arp_ignore = be
        .exec(["cat", "/proc/sys/net/ipv4/conf/all/arp_ignore"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(arp_ignore.trim(), "1");
    assert_eq!(
        be.sysctl("net.ipv4.conf.all.arp_ignore")
            .unwrap_or_else(|e| panic!("{e:#}")),
        "1"
    );
    assert!(
        be.ip(["addr", "show", "dev", "lo"])
            .unwrap_or_else(|e| panic!("{e:#}"))
            .contains("10.200.0.100/32")
    );
    let route = topology
        .client
        .ns
        .ip(["route", "get", "10.200.0.100"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(route.contains("via 10.10.0.2"), "{route}");
    let features = topology
        .client
        .ns
        .exec(["ethtool", "-k", "eth0"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(features.contains("tx-checksumming: off"), "{features}");
    let gw_link = topology
        .gw()
        .ns
        .ip(["link", "show", "dev", "eth0"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(gw_link.contains("mtu 1600"), "{gw_link}");
    assert!(
        topology
            .switch
            .links()
            .unwrap_or_else(|e| panic!("{e:#}"))
            .contains(&topology.gw().front.peer)
    );
    assert_eq!(
        topology
            .gw()
            .ns
            .mac("eth0")
            .unwrap_or_else(|e| panic!("{e:#}")),
        topology.gw().front.mac
    );

    exercise(&topology);

    let names = names(&topology);
    drop(topology);
    assert_gone(&names);
}

#[test]
fn two_arm_carries_traffic_through_the_gateway_and_cleans_up() {
    let topology = Topology::two_arm("smoke2")
        .backends(2)
        .build()
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(topology.gw().ifaces(), ["eth0", "eth1"]);
    assert_eq!(topology.backends[1].eth0.ip.to_string(), "10.20.0.12");
    assert_eq!(
        topology
            .gw()
            .ns
            .sysctl("net.ipv4.ip_forward")
            .unwrap_or_else(|e| panic!("{e:#}")),
        "1"
    );

    exercise(&topology);

    // The backend's reply path to the client really goes through the gateway.
    let route = topology.backends[0]
        .ns
        .ip(["route", "get", "10.10.0.1"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(route.contains("via 10.20.0.2"), "{route}");

    let names = names(&topology);
    drop(topology);
    assert_gone(&names);
}

#[test]
fn ecmp_over_two_gateways_routes_the_vip_to_both() {
    let topology = Topology::one_arm("smoke3")
        .gateways(2)
        .backends(1)
        .build()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let routes = topology
        .client
        .ns
        .ip(["route", "show", "10.200.0.100"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        routes.contains("nexthop via 10.10.0.2") && routes.contains("nexthop via 10.10.0.3"),
        "{routes}"
    );
    assert_eq!(
        topology
            .client
            .ns
            .sysctl("net.ipv4.fib_multipath_hash_policy")
            .unwrap_or_else(|e| panic!("{e:#}")),
        "1"
    );
    let names = names(&topology);
    drop(topology);
    assert_gone(&names);
}

#[test]
fn netns_drop_stops_spawned_and_stray_processes_and_deletes_links() {
    let a = Netns::new("smoke4-a").unwrap_or_else(|e| panic!("{e:#}"));
    let b = Netns::new("smoke4-b").unwrap_or_else(|e| panic!("{e:#}"));
    a.add_veth("va", &b, "vb", 1500)
        .unwrap_or_else(|e| panic!("{e:#}"));
    a.wait_links_up(&["va"], Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));

    // Processes see the namespace (and only it).
    let links = a
        .exec(["ip", "-o", "link", "show"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(links.contains("va@") && !links.contains("vb@"), "{links}");
    // A socket made in run() lives in the namespace.
    let bound = a
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind in netns");

    let mut sleeper = a.command("sleep");
    sleeper.arg("300").stdout(Stdio::null());
    let spawned = a.spawn(sleeper).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        a.try_wait(spawned).unwrap_or_else(|e| panic!("{e:#}")),
        None
    );
    // A process the harness did not start, found through `ip netns pids`.
    let mut stray = Command::new("nsenter")
        .arg(format!("--net={}", a.path().display()))
        .args(["--", "sleep", "300"])
        .spawn()
        .expect("spawn stray");
    // nsenter enters the namespace just after it starts: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !a
        .pids()
        .unwrap_or_else(|e| panic!("{e:#}"))
        .contains(&stray.id())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "stray process never entered the namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let stopped = a.spawn({
        let mut cmd = a.command("sleep");
        cmd.arg("300");
        cmd
    });
    let stopped = stopped.unwrap_or_else(|e| panic!("{e:#}"));
    let status = a.stop(stopped).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!status.success(), "sleep ended by SIGTERM: {status}");

    let names = [a.name().to_owned(), b.name().to_owned()];
    drop(a);
    // The leaked listener would keep namespace `a` (and the veth) alive; its links were
    // deleted, so `b` lost its end too.
    assert!(b.links().unwrap_or_else(|e| panic!("{e:#}")).is_empty());
    assert!(
        stray.wait().is_ok_and(|s| !s.success()),
        "stray process killed"
    );
    // The spawned sleeper was stopped and reaped by the drop.
    assert!(!std::path::Path::new(&format!("/proc/{spawned}")).exists());
    drop(bound);
    drop(b);
    assert_gone(&names);
}

#[test]
fn a_panicking_test_still_removes_its_namespaces() {
    let names = std::sync::Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(|| {
        let topology = Topology::two_arm("smoke5")
            .backends(1)
            .build()
            .unwrap_or_else(|e| panic!("{e:#}"));
        let _server = Server::start(&topology.backends[0].ns, "backend1", PORT)
            .unwrap_or_else(|e| panic!("{e:#}"));
        names.lock().expect("names").extend(self::names(&topology));
        panic!("test failure with a topology and a server alive");
    });
    assert!(outcome.is_err());
    let names = names.into_inner().expect("names");
    assert_eq!(names.len(), 4);
    assert_gone(&names);
}
