//! Egress: back out of the ingress interface (`XDP_TX`) or to another interface through the
//! `LB_TX_PORTS` devmap (`XDP_REDIRECT`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{BackendSlot, Counter, DropReason};

use crate::{maps::LB_TX_PORTS, stats::count};

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
