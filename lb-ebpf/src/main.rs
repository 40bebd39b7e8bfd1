//! Data plane programs: `lb_xdp` (the balancer), `lb_decap` (backend-side decapsulation) and
//! `xdp_pass` (a trivial program for veth peers and as the benchmark floor).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    #[xdp]
    pub fn xdp_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

// On the host this crate only needs to type-check (clippy --workspace); the real build is for
// bpfel-unknown-none.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
