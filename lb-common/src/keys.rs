//! Map keys and values. Addresses are four u32 words holding the bytes exactly as they appear on
//! the wire (an IPv4 address is word 0, the rest zero), so the data plane copies them from packet
//! headers without byte swapping. Ports are in network byte order for the same reason.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// An address in wire order, padded to 16 bytes.
pub type WireAddr = [u32; 4];

/// Converts an address into its wire-order words and family tag.
pub fn wire_addr(addr: IpAddr) -> (WireAddr, u8) {
    match addr {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The inverse of [`wire_addr`]; `None` for an unknown family tag.
pub fn ip_from_wire(addr: WireAddr, family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// Key of `LB_VIPS` (address, port, protocol) and of `LB_VIP_ADDRS` (port and protocol zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: WireAddr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl VipKey {
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
        let (addr, family) = wire_addr(addr);
        Self {
            addr,
            port: port.to_be(),
            proto,
            family,
        }
    }

    /// The `LB_VIP_ADDRS` key for this VIP's address.
    #[must_use]
    pub fn address_only(&self) -> Self {
        Self {
            port: 0,
            proto: 0,
            ..*self
        }
    }
}

/// Hash on the source address only instead of the 5-tuple.
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;

/// Value of `LB_VIPS`. Replaced whole (one map update) when the VIP's Maglev table moves to a new
/// region of `LB_RINGS`: that replacement is the atomic table swap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `LB_VIP_STATS`.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// First entry of this VIP's Maglev table in `LB_RINGS`.
    pub ring_offset: u32,
    /// Number of entries (a prime); zero means no table yet.
    pub ring_size: u32,
}

/// A Maglev table entry that names no backend.
pub const RING_EMPTY: u32 = u32::MAX;

/// Key of `LB_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: WireAddr,
    pub dst: WireAddr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

/// Value of `LB_FLOWS`: the backend slot a flow is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Index into `LB_BACKENDS`.
    pub slot: u32,
    /// Must equal the slot's generation, or the entry is stale and the flow re-hashes.
    pub generation: u32,
    /// `bpf_ktime_get_coarse_ns() >> 30` (about seconds of `CLOCK_MONOTONIC`) when last refreshed;
    /// refreshed at most once per such tick, and whenever `flags` change.
    pub last_seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
}

/// The client sent FIN or RST: the connection is closing. The entry stays (late packets of the
/// flow still reach the backend) but no longer counts as a live flow once a tick has passed
/// since `last_seen`. A SYN on the entry (the port reused for a new connection) clears it.
pub const FLOW_F_CLOSED: u32 = 1 << 0;

/// Slot holds no backend.
pub const SLOT_FREE: u8 = 0;
/// Takes new flows (when in a table) and keeps existing ones.
pub const SLOT_ACTIVE: u8 = 1;
/// Weight 0 or drained: out of the table, keeps existing flows.
pub const SLOT_DRAINING: u8 = 2;
/// Failed health checks or unresolvable next hop: loses its flows, which re-hash.
pub const SLOT_DOWN: u8 = 3;
/// Removed a moment ago. Its flows re-hash, but a packet that read the VIP's previous table
/// just before the swap still forwards to it; written FREE after lbd's quarantine. Telling it
/// apart from a live slot lets a restarted lbd quarantine it rather than adopt it.
pub const SLOT_RETIRED: u8 = 4;

/// Encapsulation kinds (`BackendSlot::encap`). The outer header's family is the backend's
/// (`BackendSlot::family`), whatever the client's: IPv4 or IPv6 in IPv4 (protocol 4 or 41), or
/// in IPv6 (next header 4 or 41).
pub const ENCAP_IPIP: u8 = 0;
/// GUE variant 1 (RFC draft "Generic UDP Encapsulation" section 4: the UDP payload is the
/// client's IP packet itself, no GUE header): outer IP, UDP to `BackendSlot::encap_port`, the
/// client's packet. The UDP source port carries the flow's entropy (see
/// `hash::gue_source_port`), so ECMP routers and the backend's RSS spread flows; the UDP
/// checksum is zero (RFC 6935 allows it for tunnels over IPv6 too).
pub const ENCAP_GUE: u8 = 1;

/// Value of `LB_BACKENDS`: one backend of one VIP, with everything the fast path needs to send
/// a packet to it. A slot's generation changes whenever it is freed, so flows that pointed at the
/// previous occupant miss instead of reaching a stranger.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendSlot {
    pub addr: WireAddr,
    pub family: u8,
    /// `SLOT_*`.
    pub state: u8,
    /// `ENCAP_*`.
    pub encap: u8,
    pub pad0: u8,
    pub generation: u32,
    /// The VIP this slot belongs to (its `vip_id`).
    pub vip_id: u32,
    /// Egress interface; `XDP_TX` when it is the ingress interface, devmap redirect otherwise.
    pub ifindex: u32,
    /// Next hop (the backend itself or the gateway toward it).
    pub dst_mac: [u8; 6],
    /// The egress interface's own MAC.
    pub src_mac: [u8; 6],
    /// GUE destination port (network byte order); zero with IPIP.
    pub encap_port: u16,
    pub pad1: [u8; 2],
}

impl BackendSlot {
    /// True when flows pinned to this slot (with this generation) may keep using it.
    pub fn keeps_flows(&self) -> bool {
        self.state == SLOT_ACTIVE || self.state == SLOT_DRAINING
    }

    /// True when a Maglev table entry naming this slot may send a new flow to it. Only a table
    /// lbd has just replaced names a draining or retired slot, for a packet that read it a
    /// moment before the swap: it still forwards rather than meeting a slot mid-rewrite.
    pub fn forwards_from_table(&self) -> bool {
        self.keeps_flows() || self.state == SLOT_RETIRED
    }
}

const _: () = assert!(core::mem::size_of::<VipKey>() == 20);
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 16);
const _: () = assert!(core::mem::size_of::<BackendSlot>() == 48);
