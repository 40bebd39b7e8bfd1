//! Stage modules of the data plane, shared by the objects built from `src/bin`: `bpf-balancer` (the
//! balancer, feature `balancer`), `bpf-decap` (backend-side decapsulation, feature `decap`) and
//! `bpf-bench` (`cargo xtask bench`'s packet-reset program, feature `bench`).
//! One module per stage; the bins only wire the stages together.
#![no_std]
// Inlining is how BPF code stays verifiable and cheap: a map reference stays a load-time
// constant and no BPF-to-BPF call is emitted (older kernels cannot mix those with tail calls).
#![allow(clippy::inline_always)]

#[cfg(feature = "balancer")]
pub mod debug;
#[cfg(feature = "decap")]
pub mod decap;
#[cfg(feature = "balancer")]
pub mod egress;
pub mod encap;
#[cfg(feature = "balancer")]
pub mod guard;
#[cfg(feature = "balancer")]
pub mod hc;
#[cfg(feature = "balancer")]
pub mod icmp;
pub mod knockout;
#[cfg(feature = "balancer")]
pub mod lookup;
#[cfg(feature = "balancer")]
pub mod maps;
pub mod parse;
#[cfg(feature = "balancer")]
pub mod stats;

/// One panic handler for both objects (each bin links this lib).
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects the loop, so any panic path left
    // in the code fails the load instead of hanging.
    loop {}
}
