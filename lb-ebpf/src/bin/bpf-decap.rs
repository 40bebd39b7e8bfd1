//! Backend-side programs: `lb_decap` (strips the balancer's outer headers for local VIPs) and
//! `xdp_pass` (a trivial `XDP_PASS` for veth peers and the benchmark floor). This object defines
//! only `LB_DECAP_VIPS`, so a backend does not create the balancer's large maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inlining is how BPF code stays verifiable and cheap: a map reference stays a load-time
// constant and no BPF-to-BPF call is emitted (older kernels cannot mix those with tail calls).
#![allow(clippy::inline_always)]
// `#[xdp]` fixes the entry signature: the context comes by value.
#![allow(clippy::needless_pass_by_value)]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_ebpf::decap::{self, Decap};

/// Always passes: a stripped packet goes to the stack as the client sent it, anything else as
/// it arrived.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    match decap::strip(&ctx) {
        // Either way the stack gets the frame: stripped, or as it arrived.
        Decap::Stripped | Decap::Untouched => xdp_action::XDP_PASS,
    }
}

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

// On the host this bin only needs to type-check (clippy --workspace).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
