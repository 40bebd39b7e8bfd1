//! The new-flow rate guard (like Katran's connection-rate limit): each CPU records at most
//! `LB_GUARD_LIMIT[0]` new flows per tick (about a second) in the flow table. Beyond that a new
//! flow is still forwarded, to the backend the VIP's Maglev table gives, but not recorded, so a
//! flood of new flows cannot evict the entries of established ones faster than the limit. A
//! flow that goes unrecorded is recorded by its next packet once the limit allows (it re-hashes
//! to the same backend while the table is unchanged). 0 means no limit.

/// One CPU's state (`LB_GUARD_STATE`, a per-CPU array of one element), written only by the
/// data plane.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardState {
    /// The tick `recorded` counts in (the published `GlobalConfig::now_tick`).
    pub tick: u32,
    /// New flows recorded in `tick` on this CPU.
    pub recorded: u32,
    /// New flows forwarded without being recorded because the limit was reached, ever.
    pub unrecorded: u64,
}
