//! Egress: back out of the ingress interface (`XDP_TX`) or to another interface through the
//! `LB_TX_PORTS` devmap (`XDP_REDIRECT`); and the egress MTU check before encapsulation.

use aya_ebpf::{
    bindings::{bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED, xdp_action},
    helpers::bpf_check_mtu,
    programs::XdpContext,
};
use lb_common::{BackendSlot, Counter, DropReason};

use crate::{maps::LB_TX_PORTS, stats::count};

/// Every IP link carries packets of this size (RFC 791's 576), so smaller ones skip the check.
const ALWAYS_FITS: u32 = 576;

#[inline(always)]
pub fn send(ctx: &XdpContext, slot: &BackendSlot) -> Result<u32, DropReason> {
    if slot.ifindex as usize == ctx.ingress_ifindex() {
        count(Counter::Tx);
        return Ok(xdp_action::XDP_TX);
    }
    // Flags 0: a missing devmap entry makes the helper return XDP_ABORTED, which we drop as NoRoute.
    match LB_TX_PORTS.redirect(slot.ifindex, 0) {
        Ok(action) => {
            count(Counter::Redirect);
            Ok(action)
        }
        Err(_) => Err(DropReason::NoRoute),
    }
}

/// The egress interface's MTU when the packet (IP length `ip_len`), grown by `overhead` bytes
/// of outer headers, would not fit it; `None` when it fits. A helper the kernel cannot answer
/// (no such interface) says nothing, and the redirect decides as before.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, slot: &BackendSlot, ip_len: u16, overhead: u32) -> Option<u32> {
    if u32::from(ip_len) + overhead <= ALWAYS_FITS {
        return None;
    }
    let mut mtu: u32 = 0;
    // SAFETY: plain helper call on the program's own context; `mtu` is a live stack slot. With
    // `mtu` zero the kernel measures the frame itself (minus its Ethernet header) and returns
    // the interface's MTU in `mtu`.
    let verdict = unsafe {
        bpf_check_mtu(
            ctx.ctx.cast(),
            slot.ifindex,
            &raw mut mtu,
            overhead as i32,
            0,
        )
    };
    (verdict == i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED)).then_some(mtu)
}
