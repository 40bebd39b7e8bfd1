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
/// The new-flow rate guard's limit (one u32) and per-CPU state (`GuardState`).
pub const GUARD_LIMIT: &str = "LB_GUARD_LIMIT";
pub const GUARD_STATE: &str = "LB_GUARD_STATE";
/// Every map of the balancer object (all pinned by lbd).
pub const BALANCER_MAPS: [&str; 12] = [
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
    GUARD_LIMIT,
    GUARD_STATE,
];
/// `lb_decap`'s set of VIP addresses it decapsulates for (key: `VipKey` with port and proto zero).
pub const DECAP_VIPS: &str = "LB_DECAP_VIPS";

/// Program names (the `#[xdp]` and `#[classifier]` function names).
pub const PROG_LB: &str = "lb_xdp";
pub const PROG_DECAP: &str = "lb_decap";
pub const PROG_PASS: &str = "xdp_pass";
/// The gateway's tc egress program that sends marked health-check packets through a backend
/// slot's tunnel (in the balancer object, so it shares its maps).
pub const PROG_HC: &str = "lb_hc_encap";

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

/// Health checks through the tunnel: a probe socket with `SO_MARK = hc_mark(slot)` has its
/// packets encapsulated toward backend slot `slot` by `lb_hc_encap`. A mark is a health-check
/// mark when `mark & HC_MARK_MASK == HC_MARK_BASE`; the bits outside the mask are the slot.
/// ("LB" in the upper half: unlikely to meet another user of packet marks.)
pub const HC_MARK_BASE: u32 = 0x4c42_0000;
pub const HC_MARK_MASK: u32 = 0xffff_0000;

// Every slot index must fit in the bits outside the mask.
const _: () = assert!(MAX_BACKENDS - 1 <= !HC_MARK_MASK);
const _: () = assert!(HC_MARK_BASE & !HC_MARK_MASK == 0);

/// The `SO_MARK` that sends a probe through backend slot `slot`'s tunnel. `slot` is below
/// `MAX_BACKENDS`, so it fits the bits outside `HC_MARK_MASK`.
pub const fn hc_mark(slot: u32) -> u32 {
    HC_MARK_BASE | (slot & !HC_MARK_MASK)
}

/// The backend slot a health-check mark names; `None` for any other mark.
// The data plane must not pay for a BPF-to-BPF call on two instructions.
#[allow(clippy::inline_always)]
#[inline(always)]
pub const fn hc_slot(mark: u32) -> Option<u32> {
    if mark & HC_MARK_MASK == HC_MARK_BASE {
        Some(mark & !HC_MARK_MASK)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_marks_round_trip_and_others_are_not_marks() {
        for slot in [0, 1, 4242, MAX_BACKENDS - 1] {
            assert_eq!(hc_slot(hc_mark(slot)), Some(slot));
        }
        assert_eq!(hc_mark(3), 0x4c42_0003);
        for mark in [0, 1, 0x4000, 0x4c41_0001, 0x4c43_0000, u32::MAX] {
            assert_eq!(hc_slot(mark), None, "{mark:#x}");
        }
    }
}
