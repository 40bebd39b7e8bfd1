//! The data plane's global configuration, one element of `LB_CONFIG`.

/// Data-plane debug logging on (aya-log); off by default.
pub const CFG_F_DEBUG: u32 = 1 << 0;
/// Answer ICMP echo requests (and ICMPv6's) addressed to a VIP address; dropped as
/// `unsupported_protocol` otherwise.
pub const CFG_F_ECHO_REPLY: u32 = 1 << 1;
/// A client packet that would exceed the egress MTU once encapsulated is answered with ICMP
/// fragmentation-needed (or ICMPv6 packet-too-big) naming the MTU left for it; dropped as
/// `too_big` otherwise.
pub const CFG_F_TOO_BIG_REPLY: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Outer IPv4 source of encapsulated packets: `encap_src_v4 | (encap_entropy & encap_src_v4_mask)`,
    /// both in wire order. The mask selects the host bits that carry per-flow entropy, so
    /// backends spread flows over their receive queues.
    pub encap_src_v4: u32,
    pub encap_src_v4_mask: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// The clock flows are stamped with (`FlowValue::last_seen`): lbd's `CLOCK_MONOTONIC_COARSE`
    /// in ns >> 30 (about seconds), written about four times a second. Published by lbd so the
    /// data plane reads a word it reads anyway instead of calling a clock helper per packet
    /// (15-20 ns, measured). Stands still while no lbd runs; a restarted lbd knows the tick it
    /// found as the one flows were stamped with meanwhile (see `flows::Clock`).
    pub now_tick: u32,
    /// Outer IPv6 source toward IPv6 backends, in wire order: the last word becomes
    /// `encap_src_v6[3] | (encap_entropy & encap_src_v6_mask)` (wire order too), so up to the
    /// low 32 bits of the address carry the flow's entropy.
    pub encap_src_v6: [u32; 4],
    pub encap_src_v6_mask: u32,
    pub pad: u32,
}

const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 40);
