//! The balancer object as a `BPF_PROG_TEST_RUN` fixture: loaded with small tables and the
//! outer-source config, its maps filled by hand (setup), `lb_xdp` run on frames (run), and the
//! checks of an encapsulated frame against what lb-common's hash predicts on the host (check).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    BackendSlot, FlowKey, FlowValue, GlobalConfig, GuardState, TrafficCounters, VipKey, VipMeta,
    hash::{encap_entropy, flow_hash, flow_label, gue_source_port},
    keys::{ENCAP_GUE, ENCAP_IPIP, FAMILY_V4, FAMILY_V6, SLOT_ACTIVE, wire_addr},
    maps,
    stats::COUNTER_COUNT,
};

use crate::{
    bpf::{self, Run},
    packet::{self, ETH_HLEN, ETH_P_IP, GATEWAY_MAC, IP_DF, IPPROTO_IPIP, IPV4_HLEN},
};

/// Small flow table and ring pool: the defaults would allocate tens of MB per test.
pub const TEST_FLOWS: u32 = 1024;
pub const TEST_RING_POOL: u32 = 4096;

/// The clock tick the fixture publishes (lbd publishes its own): flows are stamped with it.
pub const TEST_TICK: u32 = 4242;
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const VIP_PORT: u16 = 80;
pub const VIP_ID: u32 = 7;
pub const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
/// Entropy bits of the outer source: the low 16 bits (a /16 of source addresses).
pub const ENCAP_MASK: Ipv4Addr = Ipv4Addr::new(0, 0, 255, 255);
/// Outer IPv6 source toward IPv6 backends; its last 16 bits carry entropy.
pub const ENCAP_SRC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0x1b, 0);
/// `GlobalConfig::encap_src_v6_mask` (wire order): the address's last two bytes.
pub const ENCAP_MASK_V6: [u8; 4] = [0, 0, 0xff, 0xff];
/// An IPv6 VIP address.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x100);

/// `addr` as the data plane stores it.
pub fn wire(addr: Ipv4Addr) -> u32 {
    wire_addr(IpAddr::V4(addr)).0[0]
}

pub fn vip_addr() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

/// The flow key the data plane builds for a frame from `src` to `dst`.
pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src: wire_addr(IpAddr::V4(*src.ip())).0,
        dst: wire_addr(IpAddr::V4(*dst.ip())).0,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: FAMILY_V4,
        pad: [0; 2],
    }
}

/// The flow key the data plane builds for a frame of either family from `src` to `dst`.
pub fn flow_key_ip(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    let (s, family) = wire_addr(src.ip());
    FlowKey {
        src: s,
        dst: wire_addr(dst.ip()).0,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family,
        pad: [0; 2],
    }
}

/// Active IPv6 backend slot `index` at `2001:db8:be::<index>`, reached through `ifindex`.
pub fn backend_v6(index: u32, ifindex: u32) -> BackendSlot {
    let addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0, 0, 0, 0, index as u16);
    BackendSlot {
        addr: wire_addr(IpAddr::V6(addr)).0,
        family: FAMILY_V6,
        ..backend(index, ifindex)
    }
}

/// Active backend slot `index` at 192.168.1.`index`, reached through `ifindex`.
pub fn backend(index: u32, ifindex: u32) -> BackendSlot {
    let n = index as u8;
    BackendSlot {
        addr: wire_addr(IpAddr::V4(Ipv4Addr::new(192, 168, 1, n))).0,
        family: FAMILY_V4,
        state: SLOT_ACTIVE,
        encap: ENCAP_IPIP,
        generation: 1,
        vip_id: VIP_ID,
        ifindex,
        dst_mac: [0x02, 0xbe, 0, 0, 0, n],
        src_mac: GATEWAY_MAC,
        ..BackendSlot::default()
    }
}

/// Checks an encapsulated frame against its input: Ethernet from the slot, a correct outer
/// IPv4 header toward the slot's address from the entropy prefix, the inner packet unchanged.
pub fn check_encapsulated(input: &[u8], output: &[u8], slot: &BackendSlot, key: &FlowKey) {
    assert_eq!(
        output.len(),
        input.len() + IPV4_HLEN,
        "frame grows by one IPv4 header"
    );
    let eth = packet::parse_ethernet(output).expect("output Ethernet");
    assert_eq!(eth.dst, slot.dst_mac, "next-hop MAC from the slot");
    assert_eq!(eth.src, slot.src_mac, "egress MAC from the slot");
    assert_eq!(eth.ethertype, ETH_P_IP);

    let inner_in = packet::parse_ipv4(&input[ETH_HLEN..]).expect("input IPv4");
    let outer = packet::parse_ipv4(eth.payload).expect("outer IPv4");
    assert_eq!(outer.version, 4);
    assert_eq!(outer.header_len, IPV4_HLEN);
    assert!(outer.checksum_ok, "outer header checksum");
    assert_eq!(outer.proto, IPPROTO_IPIP);
    assert_eq!(outer.ttl, 64);
    assert_eq!(outer.frag, IP_DF, "DF set, not a fragment");
    assert_eq!(outer.id, 0);
    assert_eq!(outer.tos, inner_in.tos, "TOS copied from the inner header");
    assert_eq!(outer.total_len, inner_in.total_len + IPV4_HLEN as u16);
    let backend_ip = Ipv4Addr::from(slot.addr[0].to_ne_bytes());
    assert_eq!(outer.dst, backend_ip, "outer destination is the backend");
    let entropy = encap_entropy(key) & wire(ENCAP_MASK);
    let expected_src = Ipv4Addr::from((wire(ENCAP_SRC) | entropy).to_ne_bytes());
    assert_eq!(
        outer.src, expected_src,
        "outer source: prefix | (flow hash & mask)"
    );
    assert_eq!(
        &output[ETH_HLEN + IPV4_HLEN..],
        &input[ETH_HLEN..],
        "inner packet byte-identical"
    );
}

/// What `lb_xdp` must make of `frame` (untagged, no padding) toward `slot`, built from the
/// contract rather than the program: Ethernet from the slot; outer IPv4 (0x45, TOS copied, id
/// 0, DF, TTL 64, protocol 4/41/17, source prefix | masked entropy) or IPv6 (traffic class
/// copied, flow label from the entropy, next header 4/41/17, hop limit 64, source word 3 |
/// masked entropy); for GUE a UDP header (entropy port, the slot's port, checksum 0); then the
/// frame's IP packet. `key` is the flow the entropy comes from, `tos` the inner TOS or class.
pub fn expected_encap(frame: &[u8], slot: &BackendSlot, key: &FlowKey, tos: u8) -> Vec<u8> {
    let inner = &frame[ETH_HLEN..];
    let inner_v4 = frame[12..14] == ETH_P_IP.to_be_bytes();
    let entropy = encap_entropy(key);
    let mut body = Vec::new();
    let proto = if slot.encap == ENCAP_GUE {
        body.extend_from_slice(&gue_source_port(entropy).to_be_bytes());
        body.extend_from_slice(&u16::from_be(slot.encap_port).to_be_bytes());
        body.extend_from_slice(&u16::try_from(inner.len() + 8).expect("fits").to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        packet::IPPROTO_UDP
    } else if inner_v4 {
        IPPROTO_IPIP
    } else {
        packet::IPPROTO_IPV6
    };
    body.extend_from_slice(inner);
    match lb_common::keys::ip_from_wire(slot.addr, slot.family).expect("slot address") {
        IpAddr::V4(dst) => {
            let src =
                Ipv4Addr::from((wire(ENCAP_SRC) | (entropy & wire(ENCAP_MASK))).to_ne_bytes());
            let mut ip = packet::Ipv4::new(src, dst, proto);
            ip.tos = tos;
            ip.id = 0;
            ip.frag = IP_DF;
            ip.ttl = 64;
            packet::ethernet(slot.dst_mac, slot.src_mac, ETH_P_IP, &ip.packet(&body))
        }
        IpAddr::V6(dst) => {
            let mut src = ENCAP_SRC_V6.octets();
            let word = u32::from_ne_bytes(src[12..16].try_into().expect("4 bytes"))
                | (entropy & u32::from_ne_bytes(ENCAP_MASK_V6));
            src[12..16].copy_from_slice(&word.to_ne_bytes());
            let mut ip = packet::Ipv6::new(Ipv6Addr::from(src), dst, proto);
            ip.traffic_class = tos;
            ip.flow_label = flow_label(entropy);
            packet::ethernet(
                slot.dst_mac,
                slot.src_mac,
                packet::ETH_P_IPV6,
                &ip.packet(&body),
            )
        }
    }
}

/// The balancer object with its maps, filled by the test.
pub struct Lb {
    pub ebpf: Ebpf,
    /// What the test wrote to the VIP's ring, to predict backends.
    pub ring: Vec<u32>,
}

impl Lb {
    /// Loads the balancer object with empty maps and the outer-source config, and `lb_xdp`.
    pub fn empty() -> Self {
        Self::with_programs(&[maps::PROG_LB])
    }

    /// Loads the balancer object with empty maps and the outer-source config, and `programs`
    /// (all on the same maps).
    pub fn with_programs(programs: &[&str]) -> Self {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, TEST_FLOWS)
            .map_max_entries(maps::RINGS, TEST_RING_POOL)
            .load(lb_userspace::lb_object())
            .unwrap_or_else(|e| panic!("loading the bpf-balancer object: {e}"));
        for name in programs {
            bpf::load_program(&mut ebpf, name);
        }
        let mut config: Array<_, GlobalConfig> =
            Array::try_from(ebpf.map_mut(maps::CONFIG).expect("LB_CONFIG")).expect("array");
        let cfg = GlobalConfig {
            encap_src_v4: wire(ENCAP_SRC),
            encap_src_v4_mask: wire(ENCAP_MASK),
            now_tick: TEST_TICK,
            encap_src_v6: wire_addr(IpAddr::V6(ENCAP_SRC_V6)).0,
            encap_src_v6_mask: u32::from_ne_bytes(ENCAP_MASK_V6),
            ..GlobalConfig::default()
        };
        config.set(0, cfg, 0).expect("set LB_CONFIG");
        Self {
            ebpf,
            ring: Vec::new(),
        }
    }

    pub fn add_vip(&mut self, vip: SocketAddrV4, proto: u8, ring_offset: u32, ring_size: u32) {
        self.add_vip_ip(vip.into(), proto, ring_offset, ring_size);
    }

    /// Adds a VIP of either family (`LB_VIPS` and `LB_VIP_ADDRS`) with id `VIP_ID`.
    pub fn add_vip_ip(&mut self, vip: SocketAddr, proto: u8, ring_offset: u32, ring_size: u32) {
        let key = VipKey::new(vip.ip(), vip.port(), proto);
        let meta = VipMeta {
            vip_id: VIP_ID,
            flags: 0,
            ring_offset,
            ring_size,
        };
        let mut vips: HashMap<_, VipKey, VipMeta> =
            HashMap::try_from(self.ebpf.map_mut(maps::VIPS).expect("LB_VIPS")).expect("hash");
        vips.insert(key, meta, 0).expect("insert VIP");
        let mut addrs: HashMap<_, VipKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(maps::VIP_ADDRS).expect("LB_VIP_ADDRS"))
                .expect("hash");
        addrs
            .insert(key.address_only(), 1, 0)
            .expect("insert VIP address");
    }

    pub fn set_backend(&mut self, index: u32, slot: BackendSlot) {
        let mut backends: Array<_, BackendSlot> =
            Array::try_from(self.ebpf.map_mut(maps::BACKENDS).expect("LB_BACKENDS"))
                .expect("array");
        backends.set(index, slot, 0).expect("set backend");
    }

    pub fn backend(&self, index: u32) -> BackendSlot {
        let backends: Array<_, BackendSlot> =
            Array::try_from(self.ebpf.map(maps::BACKENDS).expect("LB_BACKENDS")).expect("array");
        backends.get(&index, 0).expect("get backend")
    }

    pub fn set_ring(&mut self, offset: u32, entries: &[u32]) {
        let mut rings: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(maps::RINGS).expect("LB_RINGS")).expect("array");
        for (i, entry) in entries.iter().enumerate() {
            rings
                .set(offset + i as u32, entry, 0)
                .expect("set ring entry");
        }
        self.ring = entries.to_vec();
    }

    pub fn set_tx_port(&mut self, key: u32, ifindex: u32) {
        let mut ports: DevMapHash<_> =
            DevMapHash::try_from(self.ebpf.map_mut(maps::TX_PORTS).expect("LB_TX_PORTS"))
                .expect("devmap hash");
        ports.insert(key, ifindex, None, 0).expect("insert tx port");
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        let flows: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map(maps::FLOWS).expect("LB_FLOWS")).expect("lru hash");
        flows.get(key, 0).ok()
    }

    pub fn set_flow(&mut self, key: &FlowKey, value: FlowValue) {
        let mut flows: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(self.ebpf.map_mut(maps::FLOWS).expect("LB_FLOWS")).expect("lru hash");
        flows.insert(key, value, 0).expect("set flow entry");
    }

    /// Sets the new-flow rate guard's limit (per CPU per tick; 0: none).
    pub fn set_guard_limit(&mut self, limit: u32) {
        let mut map: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut(maps::GUARD_LIMIT)
                .expect("LB_GUARD_LIMIT"),
        )
        .expect("array");
        map.set(0, limit, 0).expect("set LB_GUARD_LIMIT");
    }

    /// New flows the rate guard left unrecorded, summed over CPUs.
    pub fn guard_unrecorded(&self) -> u64 {
        let state: PerCpuArray<_, GuardState> =
            PerCpuArray::try_from(self.ebpf.map(maps::GUARD_STATE).expect("LB_GUARD_STATE"))
                .expect("per-cpu array");
        state
            .get(&0, 0)
            .expect("guard state")
            .iter()
            .map(|s| s.unrecorded)
            .sum()
    }

    /// Sets `GlobalConfig::flags` (`CFG_F_*`).
    pub fn set_flags(&mut self, flags: u32) {
        let mut config: Array<_, GlobalConfig> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG).expect("LB_CONFIG")).expect("array");
        let current = config.get(&0, 0).expect("LB_CONFIG");
        config
            .set(0, GlobalConfig { flags, ..current }, 0)
            .expect("set LB_CONFIG");
    }

    /// Publishes `tick` as the clock, as lbd does.
    pub fn set_tick(&mut self, tick: u32) {
        let mut config: Array<_, GlobalConfig> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG).expect("LB_CONFIG")).expect("array");
        let current = config.get(&0, 0).expect("LB_CONFIG");
        config
            .set(
                0,
                GlobalConfig {
                    now_tick: tick,
                    ..current
                },
                0,
            )
            .expect("set LB_CONFIG");
    }

    /// The backend slot the ring gives a new flow.
    pub fn predicted_slot(&self, key: &FlowKey) -> u32 {
        self.ring[(flow_hash(key) % self.ring.len() as u32) as usize]
    }

    /// `LB_GLOBAL_STATS`, summed over CPUs.
    pub fn counters(&self) -> Vec<u64> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::GLOBAL_STATS).expect("LB_GLOBAL_STATS"))
                .expect("per-cpu array");
        (0..COUNTER_COUNT)
            .map(|i| stats.get(&i, 0).expect("counter").iter().sum())
            .collect()
    }

    /// Traffic counters `index` of stats map `map`, summed over CPUs.
    pub fn traffic(&self, map: &str, index: u32) -> TrafficCounters {
        let stats: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.ebpf.map(map).expect("stats map")).expect("per-cpu array");
        stats.get(&index, 0).expect("traffic counters").iter().fold(
            TrafficCounters::default(),
            |sum, c| TrafficCounters {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
                new_flows: sum.new_flows + c.new_flows,
            },
        )
    }

    /// Runs `frame` through `lb_xdp`.
    pub fn run(&self, frame: &[u8]) -> Run {
        let prog: &Xdp = self
            .ebpf
            .program(maps::PROG_LB)
            .expect("lb_xdp")
            .try_into()
            .expect("xdp");
        bpf::test_run(prog, frame)
    }

    /// Runs `frame` and returns the global counters that changed, as (index, increase).
    pub fn run_counting(&self, frame: &[u8]) -> (Run, Vec<(u32, u64)>) {
        let before = self.counters();
        let run = self.run(frame);
        let after = self.counters();
        let changed = (0..COUNTER_COUNT)
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(i, (b, a))| (i, a - b))
            .collect();
        (run, changed)
    }
}
