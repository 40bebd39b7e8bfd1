//! The data plane's global configuration, one element of `LB_CONFIG`.

/// Data-plane debug logging on (aya-log); off by default.
pub const CFG_F_DEBUG: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Outer IPv4 source of encapsulated packets: `encap_src_v4 | (flow_hash & encap_src_v4_mask)`,
    /// both in wire order. The mask selects the host bits that carry per-flow entropy, so
    /// backends spread flows over their receive queues.
    pub encap_src_v4: u32,
    pub encap_src_v4_mask: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    pub pad: u32,
}
