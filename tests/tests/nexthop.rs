//! Next-hop resolution against the kernel: two namespaces joined by a veth, a network behind a
//! gateway, routes that cannot forward, an address nobody answers for, and the change watcher.
//!
//! The resolver runs on a thread that has entered namespace A, the way lbd runs under nsenter.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use futures::StreamExt;
use lb_userspace::nexthop::{
    Changes, NeighbourStatus, NextHop, ResolveError, Resolver, RouteKind, watch_changes,
};

const A_ADDR: &str = "10.77.0.1";
const B_ADDR: &str = "10.77.0.2";
const B_ADDR6: &str = "fd77::2";
const NEW_B_MAC: &str = "02:77:00:00:00:bb";
const NEW_A_MAC: &str = "02:77:00:00:00:aa";
const STATIC_MAC: &str = "02:77:00:00:00:cc";

/// A network namespace, deleted on drop (its veth end goes with it), even when the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
        {
            Ok(status) if status.success() => {}
            other => eprintln!("deleting netns {}: {other:?}", self.name),
        }
    }
}

/// Runs `ip` with `args`, panicking with its stderr on failure; returns its stdout.
fn ip(args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        output.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("ip prints UTF-8")
}

/// `ip` with a whitespace-separated argument line.
fn ip_line(line: &str) -> String {
    ip(&line.split_whitespace().collect::<Vec<_>>())
}

fn sysctl(netns: &str, setting: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-q", "-w", setting])
        .status()
        .unwrap_or_else(|e| panic!("running sysctl {setting} in {netns}: {e}"));
    assert!(status.success(), "sysctl {setting} in {netns} failed");
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("MAC {text} is not 6 bytes"))
}

/// Index and MAC of `dev` in `netns`, from `ip -o link show`.
fn link_of(netns: &str, dev: &str) -> (u32, [u8; 6]) {
    let line = ip(&["-n", netns, "-o", "link", "show", "dev", dev]);
    let index = line
        .split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index in {line:?}"));
    let mac = line
        .split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether in {line:?}"));
    (index, parse_mac(mac))
}

/// Runs `test` on a fresh thread that has entered `netns`, propagating its panic.
fn in_netns(netns: &str, test: impl FnOnce() + Send + 'static) {
    let path = format!("/run/netns/{netns}");
    let thread = std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it only changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        test();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn resolve(resolver: &Resolver, addr: &str) -> Result<NextHop, ResolveError> {
    resolver.resolve(addr.parse().expect("test address")).await
}

/// Whether a change notification arrives within `within`.
async fn changed(changes: &mut Changes, within: Duration) -> bool {
    match tokio::time::timeout(within, changes.next()).await {
        Ok(Some(())) => true,
        Ok(None) => panic!("the change stream ended"),
        Err(_elapsed) => false,
    }
}

/// Lets earlier events arrive and drops their notifications.
async fn settle(changes: &mut Changes) {
    while changed(changes, Duration::from_millis(300)).await {}
}

/// Namespaces A and B joined by veth va/vb, IPv4 and IPv6 on both ends, and in A a network behind
/// B and three routes that cannot forward.
fn topology(a: &Netns, b: &Netns) {
    ip(&[
        "link", "add", "va", "netns", &a.name, "type", "veth", "peer", "name", "vb", "netns",
        &b.name,
    ]);
    // Neighbour entries stay REACHABLE for the whole test, so state churn cannot fake a notification.
    for family in ["ipv4", "ipv6"] {
        sysctl(
            &a.name,
            &format!("net.{family}.neigh.va.base_reachable_time_ms=600000"),
        );
    }
    // Neighbour discovery sends solicitations from the link-local address; without DAD it is usable
    // at once instead of a second or two after the link comes up.
    sysctl(&a.name, "net.ipv6.conf.va.accept_dad=0");
    sysctl(&b.name, "net.ipv6.conf.vb.accept_dad=0");
    for (ns, dev, v4, v6) in [
        (&a.name, "va", "10.77.0.1/24", "fd77::1/64"),
        (&b.name, "vb", "10.77.0.2/24", "fd77::2/64"),
    ] {
        ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
        ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    ip(&["-n", &a.name, "route", "add", "10.78.0.0/24", "via", B_ADDR]);
    for (kind, prefix) in [
        ("unreachable", "10.79.0.0/24"),
        ("blackhole", "10.80.0.0/24"),
        ("prohibit", "10.81.0.0/24"),
    ] {
        ip(&["-n", &a.name, "route", "add", kind, prefix]);
    }
}

/// Resolution of every kind of destination, from inside A.
async fn check_resolution(resolver: &Resolver, direct: &NextHop) {
    // Directly connected, nothing in the neighbour table yet: the resolver triggers ARP.
    assert_eq!(resolve(resolver, B_ADDR).await.expect("10.77.0.2"), *direct);
    assert_eq!(
        resolve(resolver, "10.78.0.5").await.expect("10.78.0.5"),
        NextHop {
            gateway: Some(B_ADDR.parse().unwrap()),
            ..direct.clone()
        }
    );
    // IPv6, through neighbour discovery.
    assert_eq!(resolve(resolver, B_ADDR6).await.expect("fd77::2"), *direct);

    match resolve(resolver, "10.99.0.1").await {
        Err(ResolveError::NoRoute { addr }) => assert_eq!(addr.to_string(), "10.99.0.1"),
        other => panic!("10.99.0.1: expected NoRoute, got {other:?}"),
    }
    match resolve(resolver, "fd99::1").await {
        Err(ResolveError::NoRoute { .. }) => {}
        other => panic!("fd99::1: expected NoRoute, got {other:?}"),
    }
    for (addr, expected) in [
        ("10.79.0.1", RouteKind::Unreachable),
        ("10.80.0.1", RouteKind::Blackhole),
        ("10.81.0.1", RouteKind::Prohibit),
        (A_ADDR, RouteKind::Local),
    ] {
        match resolve(resolver, addr).await {
            Err(ResolveError::Unreachable { kind, .. }) => {
                assert_eq!(kind, expected, "{addr}");
            }
            other => panic!("{addr}: expected {expected} route, got {other:?}"),
        }
    }

    // On-link but nobody there: reported unresolved once the bound has passed, not before.
    let start = Instant::now();
    let result = resolve(resolver, "10.77.0.9").await;
    let waited = start.elapsed();
    match result {
        Err(ResolveError::NeighbourUnresolved {
            next_hop,
            ifname,
            status,
            ..
        }) => {
            assert_eq!(next_hop.to_string(), "10.77.0.9");
            assert_eq!(ifname, "va");
            assert_eq!(status, NeighbourStatus::Incomplete);
        }
        other => panic!("10.77.0.9: expected NeighbourUnresolved, got {other:?}"),
    }
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&waited),
        "10.77.0.9 took {waited:?}, expected about the 1 s bound"
    );
}

/// Changes in A's tables reach the watcher, and re-resolution sees them.
async fn check_changes(resolver: &Resolver, a_name: &str, b_name: &str, old_b_mac: [u8; 6]) {
    // Re-validation of a STALE entry: first unicast probe after 1 s, then one every 200 ms.
    sysctl(a_name, "net.ipv4.neigh.va.delay_first_probe_time=1");
    sysctl(a_name, "net.ipv4.neigh.va.retrans_time_ms=200");
    let mut changes = watch_changes().await.expect("watcher");
    settle(&mut changes).await;

    // An entry learned before the watcher started goes away: the watcher read the table at start.
    ip_line(&format!("-n {a_name} neigh flush dev va"));
    assert!(
        changed(&mut changes, Duration::from_secs(2)).await,
        "no notification for the neighbour flush"
    );
    let after = resolve(resolver, B_ADDR)
        .await
        .expect("10.77.0.2 after flush");
    assert_eq!(after.dst_mac, old_b_mac);
    settle(&mut changes).await;

    // B takes a new MAC. A's entry only ages to STALE, keeping the old address: no notification.
    ip_line(&format!("-n {b_name} link set dev vb address {NEW_B_MAC}"));
    ip_line(&format!(
        "-n {a_name} neigh change {B_ADDR} dev va nud stale"
    ));
    assert!(
        !changed(&mut changes, Duration::from_millis(500)).await,
        "a state-only neighbour change was reported"
    );
    // Resolving uses the STALE address but sends the entry to re-validation, which fails against
    // the old MAC: that is a change, and re-resolving learns the new MAC.
    let stale = resolve(resolver, B_ADDR).await.expect("10.77.0.2 stale");
    assert_eq!(stale.dst_mac, old_b_mac);
    assert!(
        changed(&mut changes, Duration::from_secs(4)).await,
        "no notification after the stale entry failed re-validation"
    );
    let after = resolve(resolver, B_ADDR).await.expect("10.77.0.2 moved");
    assert_eq!(after.dst_mac, parse_mac(NEW_B_MAC));
    settle(&mut changes).await;

    // A static entry with another address: a change, used as is.
    ip_line(&format!(
        "-n {a_name} neigh replace {B_ADDR} dev va lladdr {STATIC_MAC} nud permanent"
    ));
    assert!(
        changed(&mut changes, Duration::from_secs(2)).await,
        "no notification for a neighbour address change"
    );
    let after = resolve(resolver, B_ADDR).await.expect("10.77.0.2 static");
    assert_eq!(after.dst_mac, parse_mac(STATIC_MAC));
    settle(&mut changes).await;

    // The egress interface's own MAC changes: a link event.
    ip_line(&format!("-n {a_name} link set dev va address {NEW_A_MAC}"));
    assert!(
        changed(&mut changes, Duration::from_secs(2)).await,
        "no notification for the link address change"
    );
    let after = resolve(resolver, B_ADDR)
        .await
        .expect("10.77.0.2 new source");
    assert_eq!(after.src_mac, parse_mac(NEW_A_MAC));
    settle(&mut changes).await;

    // The gateway route goes away: a route event, and the backend behind it has no route.
    ip_line(&format!("-n {a_name} route del 10.78.0.0/24"));
    assert!(
        changed(&mut changes, Duration::from_secs(2)).await,
        "no notification for the route removal"
    );
    match resolve(resolver, "10.78.0.5").await {
        Err(ResolveError::NoRoute { .. }) => {}
        other => panic!("10.78.0.5 after route del: expected NoRoute, got {other:?}"),
    }
}

#[test]
fn resolves_next_hops_and_reports_changes() {
    let prefix = format!("lbnh{}", std::process::id());
    let a = Netns::new(format!("{prefix}a"));
    let b = Netns::new(format!("{prefix}b"));
    topology(&a, &b);
    let (va_index, va_mac) = link_of(&a.name, "va");
    let (_, vb_mac) = link_of(&b.name, "vb");
    let direct = NextHop {
        ifindex: va_index,
        ifname: "va".to_owned(),
        src_mac: va_mac,
        dst_mac: vb_mac,
        gateway: None,
    };
    let (a_name, b_name) = (a.name.clone(), b.name.clone());

    in_netns(&a.name, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async move {
            let resolver = Resolver::new().expect("resolver");
            check_resolution(&resolver, &direct).await;
            check_changes(&resolver, &a_name, &b_name, vb_mac).await;
        });
    });
}
