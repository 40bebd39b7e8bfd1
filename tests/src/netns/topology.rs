//! The load balancer's test networks: a client, gateway hosts and backends, each in its own
//! namespace, joined by bridges in a switch namespace.
//!
//! ```text
//! one-arm  client 10.10.0.1 ─┐                      ┌─ backend1 10.10.0.11 (VIP on lo)
//!          gw0 eth0 10.10.0.2 ┴── bridge "front" ───┼─ backend2 10.10.0.12
//!                                                    └─ ...
//! two-arm  client 10.10.0.1 ── "front" ── eth0 10.10.0.2 gw0 eth1 10.20.0.2 ── "back" ── backends 10.20.0.11..
//! ```
//! IPv6 mirrors it: `fd00:10::/64` (front), `fd00:20::/64` (back), VIP `fd00:200::100`.
//!
//! With a router ([`TopologyBuilder::router`], two-arm, one gateway), the gateway's eth1 sits on
//! a link of its own ("mid", `10.30.0.0/24`, `fd00:30::/64`, MTU of choice) to the router, and
//! the router's eth1 (`10.20.0.1`, `fd00:20::1`) on "back" with the backends:
//! ```text
//! client ── "front" ── eth0 gw0 eth1 10.30.0.2 ── "mid" ── 10.30.0.1 router 10.20.0.1 ── "back" ── backends
//! ```
//! The client routes the VIP to the gateway(s) (ECMP with an L4 hash when there are several);
//! backends hold the VIP on `lo` and answer the client directly (DSR): in one-arm on the shared
//! subnet, in two-arm through the first gateway's kernel forwarding.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::Netns;

/// The VIP every topology routes to the gateways and puts on the backends' `lo`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT_MTU: u32 = 1500;
/// Gateway and backend legs carry encapsulated full-size packets (1500 + outer headers), so
/// they need more than 1500. Native XDP on veth refuses a peer MTU above about 3500 (one page
/// minus headroom) unless the program handles fragments, so stay well below that.
pub const LEG_MTU: u32 = 1600;
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the backends sit relative to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arms {
    /// Everything on one bridge; the gateway sends encapsulated packets out of the interface
    /// they came in on (`XDP_TX`).
    One,
    /// Client on "front", backends on "back"; the gateway redirects from eth0 to eth1.
    Two,
}

/// One end of a veth pair inside a host namespace.
#[derive(Clone, Debug)]
pub struct Iface {
    /// Name inside the host (`eth0`, `eth1`): pass it to lbd's `--iface`.
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The other end, a port of a bridge in [`Topology::switch`]. Native `XDP_TX` or redirect
    /// out of `name` only delivers when this peer runs an XDP program (`XDP_PASS` is enough).
    pub peer: String,
    pub peer_mac: [u8; 6],
}

/// The client or a backend: one namespace, one interface.
#[derive(Debug)]
pub struct Host {
    /// `client`, `backend1`, `backend2`, ...: a natural name for the host's servers.
    pub name: String,
    pub ns: Netns,
    pub eth0: Iface,
}

impl Host {
    pub fn ip(&self) -> Ipv4Addr {
        self.eth0.ip
    }
}

/// A gateway host, where lbd and the XDP balancer run.
#[derive(Debug)]
pub struct Gateway {
    pub ns: Netns,
    /// eth0, on the client's bridge.
    pub front: Iface,
    /// eth1 on the backends' bridge (two-arm only).
    pub back: Option<Iface>,
}

impl Gateway {
    /// The interfaces to attach the balancer to: eth0, and eth1 in two-arm.
    pub fn ifaces(&self) -> Vec<&str> {
        std::iter::once(&self.front)
            .chain(&self.back)
            .map(|i| i.name.as_str())
            .collect()
    }

    /// This gateway's interfaces, each with its switch-side peer.
    pub fn legs(&self) -> Vec<&Iface> {
        std::iter::once(&self.front).chain(&self.back).collect()
    }
}

/// A built network; dropping it deletes every namespace (hosts first, the switch last).
#[derive(Debug)]
pub struct Topology {
    pub arms: Arms,
    pub vip: Ipv4Addr,
    pub vip6: Ipv6Addr,
    pub client: Host,
    pub gateways: Vec<Gateway>,
    pub backends: Vec<Host>,
    /// The router between the gateway and the backends ([`TopologyBuilder::router`]).
    pub router: Option<Router>,
    /// Holds the bridges `front` (and `back`, `mid`) and the peers of every host interface.
    pub switch: Netns,
}

/// A plain kernel router between the gateway and the backends: no XDP anywhere on it. It
/// forwards with ICMP rate limits off, so every packet too big for the "mid" link is answered
/// with fragmentation-needed (IPv4) or packet-too-big (IPv6).
#[derive(Debug)]
pub struct Router {
    pub ns: Netns,
    /// eth0 on "mid", toward the gateway (`10.30.0.1`, `fd00:30::1`).
    pub mid: Iface,
    /// eth1 on "back", the backends' default gateway (`10.20.0.1`, `fd00:20::1`).
    pub back: Iface,
}

impl Topology {
    pub fn one_arm(label: &str) -> TopologyBuilder {
        TopologyBuilder::new(label, Arms::One)
    }

    pub fn two_arm(label: &str) -> TopologyBuilder {
        TopologyBuilder::new(label, Arms::Two)
    }

    /// The first (often only) gateway.
    pub fn gw(&self) -> &Gateway {
        &self.gateways[0]
    }

    /// Puts another VIP on every backend's `lo` and routes it from the client to the gateways.
    pub fn add_vip(&self, vip: IpAddr) -> Result<()> {
        let (host_len, fronts): (u8, Vec<IpAddr>) = match vip {
            IpAddr::V4(_) => (
                32,
                self.gateways
                    .iter()
                    .map(|g| IpAddr::V4(g.front.ip))
                    .collect(),
            ),
            IpAddr::V6(_) => (
                128,
                self.gateways
                    .iter()
                    .map(|g| IpAddr::V6(g.front.ip6))
                    .collect(),
            ),
        };
        for backend in &self.backends {
            backend.ns.add_addr("lo", &format!("{vip}/{host_len}"))?;
        }
        self.client.ns.ip_batch(&[route_line(
            &format!("{vip}/{host_len}"),
            &fronts,
            "eth0",
            "replace",
        )])
    }
}

/// Knobs for a [`Topology`]; `build` creates it.
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    label: String,
    arms: Arms,
    backends: usize,
    gateways: usize,
    client_mtu: u32,
    leg_mtu: u32,
    /// MTU of the gateway-router link when there is a router.
    router_mtu: Option<u32>,
}

impl TopologyBuilder {
    fn new(label: &str, arms: Arms) -> Self {
        Self {
            label: label.to_owned(),
            arms,
            backends: 3,
            gateways: 1,
            client_mtu: CLIENT_MTU,
            leg_mtu: LEG_MTU,
            router_mtu: None,
        }
    }

    /// Number of backends (default 3, at most 100).
    #[must_use]
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Number of gateway hosts (default 1, at most 8); with more than one the client spreads
    /// flows over them by ECMP on the L4 hash.
    #[must_use]
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// MTU of the client's link, both ends (default 1500).
    #[must_use]
    pub fn client_mtu(mut self, mtu: u32) -> Self {
        self.client_mtu = mtu;
        self
    }

    /// MTU of gateway and backend links, both ends (default [`LEG_MTU`]).
    #[must_use]
    pub fn leg_mtu(mut self, mtu: u32) -> Self {
        self.leg_mtu = mtu;
        self
    }

    /// Puts a [`Router`] between the gateway and the backends (two-arm, one gateway only): the
    /// gateway reaches the backends through it over a link of `mid_mtu` (both ends), the
    /// backends answer the client through it and the gateway's kernel forwarding. Every other
    /// link keeps its MTU, so a `mid_mtu` below 1500 makes the router the path's bottleneck.
    #[must_use]
    pub fn router(mut self, mid_mtu: u32) -> Self {
        self.router_mtu = Some(mid_mtu);
        self
    }

    pub fn build(self) -> Result<Topology> {
        if self.gateways == 0 || self.gateways > 8 {
            bail!("gateways: 1 to 8, not {}", self.gateways);
        }
        if self.backends > 100 {
            bail!("backends: at most 100, not {}", self.backends);
        }
        if self.router_mtu.is_some() && (self.arms != Arms::Two || self.gateways != 1) {
            bail!("a router needs a two-arm topology with one gateway");
        }
        let label = &self.label;
        let two = self.arms == Arms::Two;

        // On an early error the locals drop in reverse order (hosts, then the switch); once
        // built, Topology's field order keeps the switch last.
        let switch = Netns::new(&format!("{label}-sw"))?;
        // Switch ports need no addresses; without IPv6 they send no router/neighbour chatter.
        switch.sysctls(&[
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ])?;
        let mut sw_script = vec![
            "link add front type bridge stp_state 0 mcast_snooping 0".to_owned(),
            "link set front up".to_owned(),
        ];
        if two {
            sw_script.push("link add back type bridge stp_state 0 mcast_snooping 0".to_owned());
            sw_script.push("link set back up".to_owned());
        }
        if self.router_mtu.is_some() {
            sw_script.push("link add mid type bridge stp_state 0 mcast_snooping 0".to_owned());
            sw_script.push("link set mid up".to_owned());
        }

        let client_ns = host_ns(&format!("{label}-client"), &[])?;
        let client = Host {
            name: "client".to_owned(),
            eth0: iface(
                "eth0",
                "c0",
                [1, 1],
                front_v4(1),
                front_v6(1),
                self.client_mtu,
            ),
            ns: client_ns,
        };
        sw_script.extend(veth_lines(&client.eth0, &client.ns, "front"));

        let gateways = self.gateway_hosts(&mut sw_script)?;
        let backends = self.backend_hosts(&mut sw_script)?;
        let router = self.router_host(&mut sw_script)?;
        switch.ip_batch(&sw_script)?;

        let topology = Topology {
            arms: self.arms,
            vip: VIP,
            vip6: VIP6,
            client,
            gateways,
            backends,
            router,
            switch,
        };
        topology.configure_hosts()?;
        topology.configure_router()?;
        Ok(topology)
    }
}

impl TopologyBuilder {
    /// Gateway namespaces; their veth pairs go into the switch script.
    fn gateway_hosts(&self, sw_script: &mut Vec<String>) -> Result<Vec<Gateway>> {
        let two = self.arms == Arms::Two;
        let forwarding: &[(&str, &str)] = if two {
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ]
        } else {
            &[]
        };
        let mut gateways = Vec::with_capacity(self.gateways);
        for g in 0..self.gateways {
            let n = g as u8;
            let ns = host_ns(&format!("{}-gw{g}", self.label), forwarding)?;
            let front = iface(
                "eth0",
                &format!("g{g}f"),
                [2, n + 1],
                front_v4(2 + n),
                front_v6(2 + n),
                self.leg_mtu,
            );
            sw_script.extend(veth_lines(&front, &ns, "front"));
            // With a router, eth1 is on the "mid" link to it instead of on "back".
            let back = two.then(|| match self.router_mtu {
                None => iface(
                    "eth1",
                    &format!("g{g}b"),
                    [3, n + 1],
                    back_v4(2 + n),
                    back_v6(2 + n),
                    self.leg_mtu,
                ),
                Some(mtu) => iface(
                    "eth1",
                    &format!("g{g}b"),
                    [3, n + 1],
                    mid_v4(2 + n),
                    mid_v6(2 + n),
                    mtu,
                ),
            });
            if let Some(back) = &back {
                let bridge = if self.router_mtu.is_some() {
                    "mid"
                } else {
                    "back"
                };
                sw_script.extend(veth_lines(back, &ns, bridge));
            }
            gateways.push(Gateway { ns, front, back });
        }
        Ok(gateways)
    }

    /// Backend namespaces; their veth pairs go into the switch script.
    fn backend_hosts(&self, sw_script: &mut Vec<String>) -> Result<Vec<Host>> {
        let two = self.arms == Arms::Two;
        let mut backends = Vec::with_capacity(self.backends);
        for b in 0..self.backends {
            let n = b as u8;
            // LVS-DR practice: answer ARP only for addresses on the asking interface (not the
            // VIP on lo) and source ARP from the interface's own address.
            let ns = host_ns(
                &format!("{}-be{}", self.label, b + 1),
                &[
                    ("net.ipv4.conf.all.arp_ignore", "1"),
                    ("net.ipv4.conf.all.arp_announce", "2"),
                ],
            )?;
            let (ip, ip6, bridge) = if two {
                (back_v4(11 + n), back_v6(11 + n), "back")
            } else {
                (front_v4(11 + n), front_v6(11 + n), "front")
            };
            let eth0 = iface(
                "eth0",
                &format!("b{}", b + 1),
                [4, n + 1],
                ip,
                ip6,
                self.leg_mtu,
            );
            sw_script.extend(veth_lines(&eth0, &ns, bridge));
            backends.push(Host {
                name: format!("backend{}", b + 1),
                ns,
                eth0,
            });
        }
        Ok(backends)
    }
}

impl TopologyBuilder {
    /// The router namespace, if asked for; its veth pairs go into the switch script.
    fn router_host(&self, sw_script: &mut Vec<String>) -> Result<Option<Router>> {
        let Some(mid_mtu) = self.router_mtu else {
            return Ok(None);
        };
        let ns = host_ns(
            &format!("{}-rt", self.label),
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                // Every too-big packet gets its ICMP error: the test counts on them.
                ("net.ipv4.icmp_ratelimit", "0"),
                ("net.ipv6.icmp.ratelimit", "0"),
                ("net.ipv4.icmp_msgs_per_sec", "100000"),
                ("net.ipv4.icmp_msgs_burst", "100000"),
            ],
        )?;
        let mid = iface("eth0", "r0m", [5, 1], mid_v4(1), mid_v6(1), mid_mtu);
        let back = iface("eth1", "r0b", [5, 2], back_v4(1), back_v6(1), self.leg_mtu);
        sw_script.extend(veth_lines(&mid, &ns, "mid"));
        sw_script.extend(veth_lines(&back, &ns, "back"));
        Ok(Some(Router { ns, mid, back }))
    }
}

impl Topology {
    /// The router's addresses and routes (client, VIPs via the gateway), and the gateway's
    /// routes to the backends via the router.
    fn configure_router(&self) -> Result<()> {
        let Some(router) = &self.router else {
            return Ok(());
        };
        let gw = self.gw();
        let gw_mid = gw
            .back
            .as_ref()
            .context("a router needs the gateway's eth1")?;
        let mut script = iface_lines(&router.mid);
        script.extend(iface_lines(&router.back));
        // The client's subnet and every VIP (ICMP errors about the backends' replies are
        // addressed to the VIP) lie behind the gateway.
        for dst in ["10.10.0.0/24", "10.200.0.0/16"] {
            script.push(format!("route add {dst} via {} dev eth0", gw_mid.ip));
        }
        for dst in ["fd00:10::/64", "fd00:200::/48"] {
            script.push(format!("route add {dst} via {} dev eth0", gw_mid.ip6));
        }
        router.ns.ip_batch(&script)?;
        gw.ns.ip_batch(&[
            format!("route add 10.20.0.0/24 via {} dev eth1", router.mid.ip),
            format!("route add fd00:20::/64 via {} dev eth1", router.mid.ip6),
        ])?;
        router
            .ns
            .wait_links_up(&["eth0", "eth1"], LINK_TIMEOUT)
            .map_err(|e| e.context("router links"))
    }

    /// Addresses and routes on every host, then waits for carrier everywhere.
    fn configure_hosts(&self) -> Result<()> {
        let two = self.arms == Arms::Two;
        let fronts4: Vec<IpAddr> = self.gateways.iter().map(|g| g.front.ip.into()).collect();
        let fronts6: Vec<IpAddr> = self.gateways.iter().map(|g| g.front.ip6.into()).collect();

        let mut client = iface_lines(&self.client.eth0);
        client.push(route_line(
            &format!("{}/32", self.vip),
            &fronts4,
            "eth0",
            "add",
        ));
        client.push(route_line(
            &format!("{}/128", self.vip6),
            &fronts6,
            "eth0",
            "add",
        ));
        if two {
            client.push(route_line("10.20.0.0/24", &fronts4[..1], "eth0", "add"));
            client.push(route_line("fd00:20::/64", &fronts6[..1], "eth0", "add"));
        }
        if self.gateways.len() > 1 {
            self.client.ns.sysctls(&[
                ("net.ipv4.fib_multipath_hash_policy", "1"),
                ("net.ipv6.fib_multipath_hash_policy", "1"),
            ])?;
        }
        self.client.ns.ip_batch(&client)?;
        self.client.ns.tx_checksum_off("eth0")?;

        for gw in &self.gateways {
            let script: Vec<String> = gw.legs().into_iter().flat_map(iface_lines).collect();
            gw.ns.ip_batch(&script)?;
        }

        // Replies leave through the first gateway: in one-arm only off-subnet traffic does,
        // in two-arm everything toward the client.
        // With a router, through it.
        let gw = &self.gateways[0];
        let (via4, via6) = match (&self.router, &gw.back) {
            (Some(router), _) => (router.back.ip, router.back.ip6),
            (None, Some(back)) => (back.ip, back.ip6),
            (None, None) => (gw.front.ip, gw.front.ip6),
        };
        for backend in &self.backends {
            let mut script = iface_lines(&backend.eth0);
            script.push(format!("addr add {}/32 dev lo", self.vip));
            script.push(format!("addr add {}/128 dev lo nodad", self.vip6));
            script.push(format!("route add default via {via4} dev eth0"));
            script.push(format!("route add ::/0 via {via6} dev eth0"));
            backend.ns.ip_batch(&script)?;
        }

        self.client.ns.wait_links_up(&["eth0"], LINK_TIMEOUT)?;
        for gw in &self.gateways {
            gw.ns.wait_links_up(&gw.ifaces(), LINK_TIMEOUT)?;
        }
        for backend in &self.backends {
            backend.ns.wait_links_up(&["eth0"], LINK_TIMEOUT)?;
        }
        Ok(())
    }
}

/// A host namespace with the settings every host shares plus `extra`.
fn host_ns(label: &str, extra: &[(&str, &str)]) -> Result<Netns> {
    let ns = Netns::new(label)?;
    let mut settings = vec![
        // XDP-forwarded and DSR traffic arrives on paths the reverse-path filter rejects.
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        // No duplicate address detection or autoconfiguration: addresses work at once.
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_ra", "0"),
        ("net.ipv6.conf.default.autoconf", "0"),
    ];
    settings.extend_from_slice(extra);
    ns.sysctls(&settings)?;
    Ok(ns)
}

fn iface(name: &str, peer: &str, id: [u8; 2], ip: Ipv4Addr, ip6: Ipv6Addr, mtu: u32) -> Iface {
    Iface {
        name: name.to_owned(),
        ip,
        ip6,
        mac: [0x02, 0, 0, 0, id[0], id[1]],
        mtu,
        peer: peer.to_owned(),
        peer_mac: [0x02, 0, 0, 1, id[0], id[1]],
    }
}

fn front_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 0, host)
}

fn back_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, 0, host)
}

fn mid_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 30, 0, host)
}

fn mid_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, host.into())
}

fn front_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, host.into())
}

fn back_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, host.into())
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Switch-side script: the veth pair (host end moved into `host`) and the port on `bridge`.
fn veth_lines(iface: &Iface, host: &Netns, bridge: &str) -> [String; 2] {
    [
        format!(
            "link add {peer} address {pmac} mtu {mtu} type veth peer name {name} address {mac} mtu {mtu} netns {ns}",
            peer = iface.peer,
            pmac = format_mac(iface.peer_mac),
            name = iface.name,
            mac = format_mac(iface.mac),
            mtu = iface.mtu,
            ns = host.name(),
        ),
        format!("link set {} master {bridge} up", iface.peer),
    ]
}

/// Host-side script: the interface up with its addresses.
fn iface_lines(iface: &Iface) -> Vec<String> {
    vec![
        format!("link set {} up", iface.name),
        format!("addr add {}/24 dev {}", iface.ip, iface.name),
        format!("addr add {}/64 dev {} nodad", iface.ip6, iface.name),
    ]
}

/// `route <verb> <dst>` via one gateway, or ECMP over several.
fn route_line(dst: &str, vias: &[IpAddr], dev: &str, verb: &str) -> String {
    if let [via] = vias {
        return format!("route {verb} {dst} via {via} dev {dev}");
    }
    let mut line = format!("route {verb} {dst}");
    for via in vias {
        write!(line, " nexthop via {via} dev {dev}").expect("writing to a String");
    }
    line
}

// ---- Kernel tunnel decapsulation on the backends (issues 8 and 9) -----------------------
// Backends that take the tunnel off with the kernel's own devices instead of `lb_decap`, as a
// stock Linux backend does. The kernel hands an IPIP packet addressed to a local address to the
// first *up* tunnel that matches, in this order: remote and local equal to the outer source and
// destination; remote only; local only (remote any); a key-less wildcard tunnel; the
// collect-metadata (`external`) device; the fallback (`tunl0`, `ip6tnl0`, which stay down).
// ip6tnl does the same for an IPv6 outer header, and takes IPv4 (next header 4) as well as IPv6
// (41) inside in `mode any`. GUE goes through fou first: its UDP socket strips the outer UDP
// header (variant 1: the payload is the IP packet) and hands the rest to the IPIP handler of the
// outer family, so to the same devices. The decapsulated packet then enters the stack again as
// if received on that device, so the VIP on `lo` takes it.

/// The device every kernel-decapsulating backend with an IPv4 outer header gets.
pub const IPIP_DEV: &str = "ipip0";
/// The device for an IPv6 outer header (not `ip6tnl0`: the module's own fallback device).
pub const IP6TNL_DEV: &str = "ip6tun0";

/// How a kernel tunnel device matches the outer addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpipDevice {
    /// `type ipip external` / `type ip6tnl external`: the namespace's collect-metadata device,
    /// which takes every tunnel packet to a local address that no more specific tunnel claims,
    /// from any outer source (`lb_xdp` varies it per flow).
    External,
    /// `local <backend address> remote any`: a classic tunnel bound to the backend's own
    /// address, taking tunnel packets from any source (the kernel's "remote wildcard, local
    /// match" rule). Unlike `ip tunnel add`, it does not need the fallback device.
    AnyRemote,
}

/// The outer headers a kernel-decapsulating backend takes off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEncap {
    /// IPv4 outer header, protocol 4: an `ipip` device (IPv4 VIPs only).
    Ipip4,
    /// IPv6 outer header, next header 4 or 41: an `ip6tnl` device in `mode any`.
    Ipip6,
    /// IPv4 outer header and UDP to this port: `ip fou add port <port> gue`, then an `ipip`
    /// device (IPv4 VIPs only).
    Gue4(u16),
    /// IPv6 outer header and UDP to this port: `ip fou add port <port> gue -6`, then an
    /// `ip6tnl` device in `mode any`.
    Gue6(u16),
}

impl KernelEncap {
    /// Whether the outer header is IPv6 (lbd must then be given the backends' IPv6 addresses).
    pub fn outer_v6(self) -> bool {
        matches!(self, Self::Ipip6 | Self::Gue6(_))
    }

    /// The GUE port, for GUE.
    pub fn gue_port(self) -> Option<u16> {
        match self {
            Self::Gue4(port) | Self::Gue6(port) => Some(port),
            Self::Ipip4 | Self::Ipip6 => None,
        }
    }
}

/// What a kernel-decapsulating backend is given: the outer headers it takes off, and how its
/// tunnel device matches their addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTunnel {
    pub encap: KernelEncap,
    pub device: IpipDevice,
}

impl KernelTunnel {
    pub fn new(encap: KernelEncap, device: IpipDevice) -> Self {
        Self { encap, device }
    }

    /// The tunnel device's name: [`IP6TNL_DEV`] for an IPv6 outer header, else [`IPIP_DEV`].
    pub fn dev(self) -> &'static str {
        if self.encap.outer_v6() {
            IP6TNL_DEV
        } else {
            IPIP_DEV
        }
    }

    /// The device's link kind, as `ip -d link` shows it.
    fn link_kind(self) -> &'static str {
        if self.encap.outer_v6() {
            "ip6tnl"
        } else {
            "ipip"
        }
    }

    /// The `ip` commands (batch lines, without the leading `ip`) that set a backend up whose
    /// tunnel endpoint is `local` (IPv4) or `local6`: the fou socket for GUE, then the device,
    /// brought up (the kernel skips a tunnel that is down).
    pub fn ip_lines(self, local: Ipv4Addr, local6: Ipv6Addr) -> Vec<String> {
        let dev = self.dev();
        let mut lines = Vec::new();
        match self.encap {
            KernelEncap::Gue4(port) => lines.push(format!("fou add port {port} gue")),
            KernelEncap::Gue6(port) => lines.push(format!("fou add port {port} gue -6")),
            KernelEncap::Ipip4 | KernelEncap::Ipip6 => {}
        }
        let bound = match (self.device, self.encap.outer_v6()) {
            (IpipDevice::External, _) => "external".to_owned(),
            (IpipDevice::AnyRemote, false) => format!("local {local} remote any"),
            (IpipDevice::AnyRemote, true) => format!("local {local6} remote any"),
        };
        // ip6tnl's own default would be ip6ip6 only; `any` takes IPv4 inside too.
        let mode = if self.encap.outer_v6() {
            " mode any"
        } else {
            ""
        };
        lines.push(format!(
            "link add {dev} type {} {bound}{mode}",
            self.link_kind()
        ));
        lines.push(format!("link set {dev} up"));
        lines
    }

    /// The `ip` command (batch line) that removes the fou socket, for GUE.
    fn fou_del_line(self) -> Option<String> {
        match self.encap {
            KernelEncap::Gue4(port) => Some(format!("fou del port {port}")),
            KernelEncap::Gue6(port) => Some(format!("fou del port {port} -6")),
            KernelEncap::Ipip4 | KernelEncap::Ipip6 => None,
        }
    }
}

/// A backend's kernel tunnel device (and fou socket); dropping it deletes them (the namespace
/// going away does too).
#[derive(Debug)]
pub struct KernelIpip {
    /// The backend namespace's name (`ip -n`).
    ns: String,
    pub tunnel: KernelTunnel,
}

impl Drop for KernelIpip {
    fn drop(&mut self) {
        let mut lines = vec![vec![
            "link".to_owned(),
            "del".to_owned(),
            "dev".to_owned(),
            self.tunnel.dev().to_owned(),
        ]];
        if let Some(fou) = self.tunnel.fou_del_line() {
            lines.push(fou.split(' ').map(str::to_owned).collect());
        }
        for args in lines {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["-n", &self.ns]).args(&args);
            // Fails only when the namespace is already gone, which deleted these too.
            let _ = super::command_output(&mut cmd);
        }
    }
}

impl Host {
    /// Packets the kernel tunnel device `dev` ([`KernelTunnel::dev`]) has received: tunnel
    /// packets the kernel decapsulated.
    pub fn tunnel_rx_packets(&self, dev: &str) -> Result<u64> {
        let out = self.ns.ip(["-s", "-j", "link", "show", "dev", dev])?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("`ip -s -j link show {dev}`: {out}"))?;
        json.pointer("/0/stats64/rx/packets")
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no rx packet count for {dev} in {out}"))
    }

    /// Gives this backend the kernel tunnel `tunnel` with its endpoint on eth0's address (of
    /// the outer family), up, with the reverse-path filter off on the device.
    pub fn add_kernel_tunnel(&self, tunnel: KernelTunnel) -> Result<KernelIpip> {
        // The guard first, so a half-made device goes too.
        let device = KernelIpip {
            ns: self.ns.name().to_owned(),
            tunnel,
        };
        self.ns
            .ip_batch(&tunnel.ip_lines(self.ip(), self.eth0.ip6))?;
        // The inner source (the client) routes back through eth0, not through the tunnel, so
        // a strict reverse-path filter would drop every IPv4 packet. The namespace's `all` and
        // `default` are 0 already (host_ns); saying it on the device keeps it so regardless.
        let rp_filter = format!("net.ipv4.conf.{}.rp_filter", tunnel.dev());
        self.ns.sysctls(&[(rp_filter.as_str(), "0")])?;
        Ok(device)
    }
}

impl Topology {
    /// The kernel tunnel `tunnel` on every backend ([`Host::add_kernel_tunnel`]); the VIPs are
    /// on their `lo` already.
    pub fn add_kernel_tunnel(&self, tunnel: KernelTunnel) -> Result<Vec<KernelIpip>> {
        self.backends
            .iter()
            .map(|b| {
                b.add_kernel_tunnel(tunnel)
                    .map_err(|e| e.context(format!("kernel tunnel device on {}", b.name)))
            })
            .collect()
    }
}

/// Whether this kernel can set up `tunnel`: tries in a scratch namespace. The error says why
/// not (typically `Unknown device type`: no `CONFIG_NET_IPIP`/`CONFIG_IPV6_TUNNEL`, or the
/// module cannot be loaded; or a fou error: no `CONFIG_NET_FOU`).
pub fn probe_kernel_tunnel(tunnel: KernelTunnel) -> Result<()> {
    let ns = Netns::new("ktun-probe")?;
    let local6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    ns.ip_batch(&tunnel.ip_lines(Ipv4Addr::new(192, 0, 2, 1), local6))?;
    let dev = tunnel.dev();
    let link = ns.ip(["-d", "link", "show", "dev", dev])?;
    if !link.contains(tunnel.link_kind()) {
        bail!(
            "{dev} was created but is not an {} device: {link}",
            tunnel.link_kind()
        );
    }
    if let Some(port) = tunnel.encap.gue_port() {
        let fou = ns.ip(["fou", "show"])?;
        if !fou.contains(&format!("port {port} gue")) {
            bail!("`ip fou show` has no GUE socket on port {port}: {fou}");
        }
    }
    Ok(())
}

// ---- What the switch forwards to the backends (issue 9) ----------------------------------
// lb_decap strips the outer headers in XDP, before any hook on the backend could see them, so
// the outer headers are counted where they still exist: in the switch's bridge, on the way to
// each backend's port.

/// Outer-header counts of the frames the switch forwarded to one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapCount {
    /// IPv4 outer header, protocol 4 or 41 (IPIP).
    pub ipip4: u64,
    /// IPv6 outer header, next header 4 or 41 (IPIP).
    pub ipip6: u64,
    /// IPv4 outer header, UDP to the GUE port.
    pub gue4: u64,
    /// IPv6 outer header, UDP to the GUE port.
    pub gue6: u64,
}

/// nft counters (table family `bridge`, forward hook) in the switch namespace, one set per
/// backend port; the table is deleted on drop.
pub struct EncapCounters<'a> {
    switch: &'a Netns,
    table: String,
    /// The backends' switch-side ports, in backend order.
    ports: Vec<String>,
}

const ENCAP_TABLE: &str = "lbt_encap";

impl Topology {
    /// Counts, per backend, the IPIP and GUE (UDP to `gue_port`) frames the switch forwards to
    /// it, outer IPv4 and IPv6 apart.
    pub fn count_backend_encap(&self, gue_port: u16) -> Result<EncapCounters<'_>> {
        let ports: Vec<String> = self.backends.iter().map(|b| b.eth0.peer.clone()).collect();
        let table = ENCAP_TABLE;
        let mut script = format!(
            "add table bridge {table}; add chain bridge {table} count {{ type filter hook forward priority 0; policy accept; }}; "
        );
        for port in &ports {
            for (kind, matches) in [
                ("ipip4", "ip protocol { 4, 41 }".to_owned()),
                ("ipip6", "ip6 nexthdr { 4, 41 }".to_owned()),
                ("gue4", format!("ip protocol udp udp dport {gue_port}")),
                ("gue6", format!("ip6 nexthdr udp udp dport {gue_port}")),
            ] {
                let name = format!("{port}_{kind}");
                write!(
                    script,
                    "add counter bridge {table} {name}; add rule bridge {table} count oifname \"{port}\" {matches} counter name \"{name}\"; "
                )
                .expect("writing to a String");
            }
        }
        // The guard first, so a half-made table goes too.
        let counters = EncapCounters {
            switch: &self.switch,
            table: table.to_owned(),
            ports,
        };
        self.switch
            .exec(["nft", script.as_str()])
            .context("creating the switch's encapsulation counters")?;
        Ok(counters)
    }
}

impl EncapCounters<'_> {
    /// The counts so far, in backend order.
    pub fn read(&self) -> Result<Vec<EncapCount>> {
        let json = self.switch.exec([
            "nft",
            "-j",
            "list",
            "counters",
            "table",
            "bridge",
            &self.table,
        ])?;
        let value: serde_json::Value =
            serde_json::from_str(&json).with_context(|| format!("nft counters: {json}"))?;
        let items = value["nftables"]
            .as_array()
            .with_context(|| format!("nft counters: no nftables array in {json}"))?;
        let packets = |name: &str| -> Result<u64> {
            items
                .iter()
                .filter_map(|i| i.get("counter"))
                .find(|c| c["name"] == name)
                .and_then(|c| c["packets"].as_u64())
                .with_context(|| format!("no nft counter {name} in {json}"))
        };
        self.ports
            .iter()
            .map(|port| {
                Ok(EncapCount {
                    ipip4: packets(&format!("{port}_ipip4"))?,
                    ipip6: packets(&format!("{port}_ipip6"))?,
                    gue4: packets(&format!("{port}_gue4"))?,
                    gue6: packets(&format!("{port}_gue6"))?,
                })
            })
            .collect()
    }
}

impl Drop for EncapCounters<'_> {
    fn drop(&mut self) {
        // Fails only when the switch namespace is gone already, and the table with it.
        let _ = self
            .switch
            .exec(["nft", "delete", "table", "bridge", self.table.as_str()]);
    }
}
