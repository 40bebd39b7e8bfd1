//! Map names and default sizes: the single source for both sides. lbd may override sizes at load
//! time (flow table, ring pool); the data plane never assumes them beyond bounds checks.

pub const VIPS: &str = "LB_VIPS";
pub const VIP_ADDRS: &str = "LB_VIP_ADDRS";
pub const RINGS: &str = "LB_RINGS";
pub const BACKENDS: &str = "LB_BACKENDS";
pub const FLOWS: &str = "LB_FLOWS";
pub const VIP_STATS: &str = "LB_VIP_STATS";
pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
pub const GLOBAL_STATS: &str = "LB_GLOBAL_STATS";
pub const CONFIG: &str = "LB_CONFIG";
pub const TX_PORTS: &str = "LB_TX_PORTS";
/// Every map of the balancer object (all pinned by lbd).
pub const BALANCER_MAPS: [&str; 10] = [
    VIPS,
    VIP_ADDRS,
    RINGS,
    BACKENDS,
    FLOWS,
    VIP_STATS,
    BACKEND_STATS,
    GLOBAL_STATS,
    CONFIG,
    TX_PORTS,
];
/// `lb_decap`'s set of VIP addresses it decapsulates for (key: `VipKey` with port and proto zero).
pub const DECAP_VIPS: &str = "LB_DECAP_VIPS";

/// Program names (the `#[xdp]` function names).
pub const PROG_LB: &str = "lb_xdp";
pub const PROG_DECAP: &str = "lb_decap";
pub const PROG_PASS: &str = "xdp_pass";

pub const MAX_VIPS: u32 = 512;
pub const MAX_BACKENDS: u32 = 8192;
pub const MAX_VIP_ADDRS: u32 = MAX_VIPS;
pub const MAX_TX_PORTS: u32 = 64;
pub const MAX_DECAP_VIPS: u32 = 1024;
/// Default flow table capacity (split across CPUs: each CPU has its own LRU list).
pub const DEFAULT_FLOWS: u32 = 1 << 20;
/// Default ring pool: room for 64 tables of 65537 entries each, so 32 VIPs can swap tables.
pub const DEFAULT_RING_POOL: u32 = 64 * 65_537;
pub const DEFAULT_RING_SIZE: u32 = 65_537;
