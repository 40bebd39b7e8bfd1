//! `lb_xdp`, the balancer: parse, VIP lookup, flow table or Maglev ring, IPIP encapsulation,
//! egress, stats; and `lb_hc_encap`, the tc egress program that sends health checks through a
//! backend's tunnel. This object also defines every LB_* map (see `lb_ebpf::maps`), which both
//! programs share.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inlining is how BPF code stays verifiable and cheap: a map reference stays a load-time
// constant and no BPF-to-BPF call is emitted (older kernels cannot mix those with tail calls).
#![allow(clippy::inline_always)]
// `#[xdp]` fixes the entry signature: the context comes by value.
#![allow(clippy::needless_pass_by_value)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_coarse_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Counter, DropReason,
    hash::{flow_hash, src_hash},
    keys::VIP_F_HASH_SRC_ONLY,
};
use lb_ebpf::{
    egress, encap, hc, lookup,
    parse::{self, Parsed},
    stats::{count, count_drop, count_traffic},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn pass() -> u32 {
    count(Counter::Pass);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<u32, DropReason> {
    let packet = match parse::parse(ctx) {
        Parsed::Packet(packet) => packet,
        Parsed::NotIp => return Ok(pass()),
        // Never forward what we cannot parse; drop it only when it was meant for a VIP.
        Parsed::Malformed {
            dst,
            family,
            reason,
        } => {
            return if lookup::is_vip_address(dst, family) {
                Err(reason)
            } else {
                Ok(pass())
            };
        }
    };
    let flow = &packet.flow;
    let Some(vip) = lookup::vip(flow) else {
        return Ok(pass());
    };
    // LB_CONFIG always has its one element; the verifier still wants the null check.
    let cfg = lookup::config().ok_or(DropReason::EncapFailed)?;
    // bpf_ktime_get_coarse_ns needs kernel 5.11+; a tick is about a second.
    // SAFETY: no arguments; reads the coarse monotonic clock.
    let tick = (unsafe { bpf_ktime_get_coarse_ns() } >> 30) as u32;

    // The 5-tuple hash is needed to pick a backend for a new flow (unless the VIP hashes the
    // source only) and for the outer source's entropy bits; computed at most once, lazily.
    let mut hash = None;
    let (backend, new_flow) =
        if let Some(backend) = lookup::pinned_backend(flow, tick, packet.syn, packet.fin_rst) {
            count(Counter::FlowHits);
            (backend, false)
        } else {
            let ring_hash = if vip.flags & VIP_F_HASH_SRC_ONLY != 0 {
                src_hash(flow)
            } else {
                *hash.insert(flow_hash(flow))
            };
            let backend = lookup::ring_backend(&vip, ring_hash)?;
            let pinned = lookup::pin_flow(flow, backend, tick);
            if pinned {
                count(Counter::NewFlows);
            }
            if !packet.syn {
                count(Counter::FlowMisses);
            }
            (backend, pinned)
        };

    let entropy = if cfg.encap_src_v4_mask == 0 {
        0
    } else {
        hash.unwrap_or_else(|| flow_hash(flow)) & cfg.encap_src_v4_mask
    };
    let inner = encap::Inner {
        tos: packet.tos,
        tot_len: packet.tot_len,
    };
    encap::ipip_v4(ctx, backend.slot, &inner, cfg.encap_src_v4 | entropy)?;
    let action = egress::send(ctx, backend.slot)?;
    count_traffic(vip.vip_id, backend.index, packet.len, new_flow);
    Ok(action)
}

/// Health checks through the tunnel (tc egress): packets of probe sockets marked with
/// `hc_mark(slot)` leave encapsulated toward that slot's backend; everything else passes.
#[classifier]
pub fn lb_hc_encap(ctx: TcContext) -> i32 {
    hc::encap_probe(&ctx)
}

// On the host this bin only needs to type-check (clippy --workspace).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
