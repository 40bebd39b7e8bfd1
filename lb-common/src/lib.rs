//! Types and constants shared by the data plane (lb-ebpf) and the agent (lb-userspace): one
//! definition of every map key, map value, counter and hash, so the two sides cannot drift.
#![no_std]

pub mod config;
pub mod guard;
pub mod hash;
pub mod keys;
pub mod maps;
pub mod stats;

pub use config::GlobalConfig;
pub use guard::GuardState;
pub use keys::{BackendSlot, FlowKey, FlowValue, VipKey, VipMeta};
pub use stats::{Counter, DropReason, TrafficCounters};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is repr(C), Copy, has explicit padding fields and no pointers,
    // so any bit pattern is a valid value.
    unsafe impl aya::Pod for crate::VipKey {}
    unsafe impl aya::Pod for crate::VipMeta {}
    unsafe impl aya::Pod for crate::FlowKey {}
    unsafe impl aya::Pod for crate::FlowValue {}
    unsafe impl aya::Pod for crate::BackendSlot {}
    unsafe impl aya::Pod for crate::TrafficCounters {}
    unsafe impl aya::Pod for crate::GlobalConfig {}
    unsafe impl aya::Pod for crate::GuardState {}
}
