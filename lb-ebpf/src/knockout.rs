//! Stages `cargo xtask bench` can switch off at build time, one object per `knockout-*` feature,
//! to show where a packet's time goes (the difference to the full program is the stage's cost).
//! lbd's objects are built without any: every constant is false and what it guards compiles to
//! the normal code.

/// No counters: global, per-VIP and per-backend.
pub const STATS: bool = cfg!(feature = "knockout-stats");
/// No entropy bits in the outer source address.
pub const ENTROPY: bool = cfg!(feature = "knockout-entropy");
/// No encapsulation: the frame leaves as received.
pub const ENCAP: bool = cfg!(feature = "knockout-encap");
/// No flow-table lookup: every packet is a hit on backend slot 0 (for hit-path figures only).
pub const FLOW_LOOKUP: bool = cfg!(feature = "knockout-flow-lookup");
/// No new-flow rate guard: every new flow may be recorded, without reading the guard's maps.
pub const GUARD: bool = cfg!(feature = "knockout-guard");
/// No flow-table insert: a new flow is counted as pinned but never stored (new-flow figures only).
pub const FLOW_INSERT: bool = cfg!(feature = "knockout-flow-insert");
