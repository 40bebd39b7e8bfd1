//! What the fuzzing fixture installs in the balancer's maps, known to both sides: the fixture
//! writes it into a fresh `Lb`, the oracle predicts from it. One VIP per data-plane outcome, so
//! every branch of `lb_xdp` is reachable by a frame that only has to name the right port.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    BackendSlot,
    keys::{ENCAP_GUE, PROTO_TCP, PROTO_UDP, RING_EMPTY, SLOT_DOWN},
    maps::MAX_BACKENDS,
};

use crate::{
    balancer::{Lb, VIP, VIP6, backend, backend_v6},
    bpf::TEST_RUN_IFINDEX,
};

/// The second VIP address (the first is `balancer::VIP`).
pub const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
/// Devmap key of the routed egress interface (the devmap sends it to lo).
pub const ROUTED_IFINDEX: u32 = 4242;
/// An egress interface with no devmap entry: forwarding there fails with `NoRoute`.
pub const UNROUTED_IFINDEX: u32 = 4343;
/// The GUE slots' UDP destination port.
pub const GUE_PORT: u16 = 6080;

/// One VIP: address, port, protocol and its Maglev table (empty: no table yet).
#[derive(Clone, Debug)]
pub struct VipDef {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub ring: Vec<u32>,
    /// Where the table lives in `LB_RINGS`.
    pub ring_offset: u32,
}

/// The whole installed configuration.
#[derive(Clone, Debug)]
pub struct Universe {
    pub vips: Vec<VipDef>,
    /// Backend slots by index; every other slot is all zeros (free), as in the array map.
    pub slots: Vec<(u32, BackendSlot)>,
    /// Devmap entries: key (a slot's ifindex) -> device.
    pub tx_ports: Vec<(u32, u32)>,
}

fn cycle(slots: &[u32], len: usize) -> Vec<u32> {
    (0..len).map(|i| slots[i % slots.len()]).collect()
}

fn gue(mut slot: BackendSlot) -> BackendSlot {
    slot.encap = ENCAP_GUE;
    slot.encap_port = GUE_PORT.to_be();
    slot
}

impl Universe {
    /// The fuzzing configuration:
    /// - `VIP:80/tcp` and `VIP:53/udp`: a 13-entry table over slots 3, 4, 5 (IPv4, IPIP),
    ///   15 (IPv6, IPIP), 16 (IPv4, GUE) and 17 (IPv6, GUE), all `XDP_TX`;
    /// - `VIP:81/tcp`: no table (`NoBackend`);
    /// - `VIP:82/tcp`: slot 10, whose egress has no devmap entry (`NoRoute`);
    /// - `VIP:83/udp`: slot 11, an IPv6 backend;
    /// - `VIP2:443/tcp+udp`: slots 12 and 13 behind the devmap (`XDP_REDIRECT`);
    /// - `VIP2:8080/tcp`: a table mixing slot 12, empty entries and down slot 14, so whether a
    ///   flow is forwarded or dropped (`NoBackend`) depends on its hash;
    /// - `VIP6:80/tcp` and `VIP6:53/udp`: the same mixed table as `VIP:80`;
    /// - `VIP6:81/tcp`: no table; `VIP6:443/tcp`: slots 12 and 13 (redirect).
    ///
    /// Every egress is lo (MTU 65536) or an ifindex with no device, so the egress MTU check
    /// never finds a frame too big: the too-big path is `prog_test_run_icmp`'s.
    pub fn standard() -> Self {
        let mut slots = Vec::new();
        for index in [3, 4, 5] {
            slots.push((index, backend(index, TEST_RUN_IFINDEX)));
        }
        slots.push((10, backend(10, UNROUTED_IFINDEX)));
        slots.push((11, backend_v6(11, TEST_RUN_IFINDEX)));
        for index in [12, 13] {
            slots.push((index, backend(index, ROUTED_IFINDEX)));
        }
        let mut down = backend(14, TEST_RUN_IFINDEX);
        down.state = SLOT_DOWN;
        slots.push((14, down));
        slots.push((15, backend_v6(15, TEST_RUN_IFINDEX)));
        slots.push((16, gue(backend(16, TEST_RUN_IFINDEX))));
        slots.push((17, gue(backend_v6(17, TEST_RUN_IFINDEX))));

        let vip = |addr: IpAddr, port, proto, ring: Vec<u32>, ring_offset| VipDef {
            addr,
            port,
            proto,
            ring,
            ring_offset,
        };
        let (v4, v4b, v6) = (IpAddr::V4(VIP), IpAddr::V4(VIP2), IpAddr::V6(VIP6));
        let main = cycle(&[3, 4, 5, 15, 16, 17], 13);
        let routed = cycle(&[12, 13], 11);
        let mixed = vec![12, RING_EMPTY, 14, RING_EMPTY, 12, 14, MAX_BACKENDS + 3];
        Self {
            vips: vec![
                vip(v4, 80, PROTO_TCP, main.clone(), 100),
                vip(v4, 53, PROTO_UDP, main.clone(), 100),
                vip(v4, 81, PROTO_TCP, Vec::new(), 200),
                vip(v4, 82, PROTO_TCP, vec![10; 7], 300),
                vip(v4, 83, PROTO_UDP, vec![11; 7], 400),
                vip(v4b, 443, PROTO_TCP, routed.clone(), 500),
                vip(v4b, 443, PROTO_UDP, routed.clone(), 500),
                vip(v4b, 8080, PROTO_TCP, mixed, 600),
                vip(v6, 80, PROTO_TCP, main.clone(), 100),
                vip(v6, 53, PROTO_UDP, main, 100),
                vip(v6, 81, PROTO_TCP, Vec::new(), 200),
                vip(v6, 443, PROTO_TCP, routed, 500),
            ],
            slots,
            tx_ports: vec![(ROUTED_IFINDEX, TEST_RUN_IFINDEX)],
        }
    }

    /// A fresh balancer (own maps) with this configuration written into it.
    pub fn install(&self) -> Lb {
        let mut lb = Lb::empty();
        for (index, slot) in &self.slots {
            lb.set_backend(*index, *slot);
        }
        for (key, ifindex) in &self.tx_ports {
            lb.set_tx_port(*key, *ifindex);
        }
        for vip in &self.vips {
            let addr = std::net::SocketAddr::new(vip.addr, vip.port);
            lb.add_vip_ip(addr, vip.proto, vip.ring_offset, vip.ring.len() as u32);
            lb.set_ring(vip.ring_offset, &vip.ring);
        }
        lb
    }

    /// True when `addr` is some VIP's address (any port, any protocol).
    pub fn is_vip_address(&self, addr: IpAddr) -> bool {
        self.vips.iter().any(|v| v.addr == addr)
    }

    pub fn vip(&self, addr: IpAddr, port: u16, proto: u8) -> Option<&VipDef> {
        self.vips
            .iter()
            .find(|v| v.addr == addr && v.port == port && v.proto == proto)
    }

    /// Slot `index` as the data plane reads it: `None` beyond `LB_BACKENDS`, zeros if unset.
    pub fn slot(&self, index: u32) -> Option<BackendSlot> {
        if index >= MAX_BACKENDS {
            return None;
        }
        Some(
            self.slots
                .iter()
                .find(|(i, _)| *i == index)
                .map_or_else(BackendSlot::default, |(_, s)| *s),
        )
    }

    /// Every VIP address, once.
    pub fn vip_addrs(&self) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> = self.vips.iter().map(|v| v.addr).collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs
    }

    /// Every VIP port, once.
    pub fn vip_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.vips.iter().map(|v| v.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}
