//! `lb_xdp`, the balancer: parse, VIP lookup, flow table or Maglev ring, encapsulation (IPIP or
//! GUE, IPv4 or IPv6 outer), egress MTU check, egress, ICMP to VIP addresses, stats, debug
//! log; and `lb_hc_encap`, the tc egress program that sends health checks through a backend's
//! tunnel. This object also defines every LB_* map (see `lb_ebpf::maps`),
//! which both programs share, and aya-log's `AYA_LOGS` ring (see `lb_ebpf::debug`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inlining is how BPF code stays verifiable and cheap: a map reference stays a load-time
// constant and no BPF-to-BPF call is emitted (older kernels cannot mix those with tail calls).
#![allow(clippy::inline_always)]
// `#[xdp]` fixes the entry signature: the context comes by value.
#![allow(clippy::needless_pass_by_value)]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Counter, DropReason, FlowKey, GlobalConfig, VipMeta,
    config::{CFG_F_ECHO_REPLY, CFG_F_TOO_BIG_REPLY},
    hash::{encap_entropy, flow_hash, src_hash},
    keys::{PROTO_UDP, VIP_F_HASH_SRC_ONLY},
};
use lb_ebpf::{
    debug::{Choice, Dropped, Switch},
    egress, encap,
    guard::Guard,
    hc, icmp, knockout,
    lookup::{self, Backend},
    parse::{self, Icmp, IcmpKind, IpInfo, Packet, Parsed},
    stats::{count, count_drop, count_traffic},
};

#[xdp]
// Into the exported entry the macro wraps it in: LLVM stopped inlining it once the program grew
// (IPv6, ICMP), leaving a BPF-to-BPF call on every packet.
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(dropped) => {
            count_drop(dropped.reason);
            dropped.log(&ctx);
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
fn try_lb(ctx: &XdpContext) -> Result<u32, Dropped> {
    let packet = match parse::parse(ctx) {
        Parsed::Packet(packet) => packet,
        Parsed::Icmp(icmp) => return icmp_to_vip(ctx, &icmp),
        Parsed::NotIp => return Ok(pass()),
        // Never forward what we cannot parse; drop it only when it was meant for a VIP.
        Parsed::Malformed {
            src,
            dst,
            family,
            reason,
        } => {
            return if lookup::is_vip_address(dst, family) {
                // The config is not read on this path otherwise; a drop can afford the lookup.
                let log = lookup::config().map_or(Switch::OFF, Switch::new);
                Err(Dropped {
                    reason,
                    log,
                    src,
                    dst,
                    family,
                })
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
    let Some(cfg) = lookup::config() else {
        return Err(Dropped::new(DropReason::EncapFailed, Switch::OFF, flow));
    };
    // The one read of the debug switch for this packet.
    let log = Switch::new(cfg);
    forward(ctx, &packet, &vip, cfg, log).map_err(|reason| Dropped::new(reason, log, flow))
}

/// Picks the backend of a packet for `vip`, encapsulates the packet and sends it on; or, when
/// it would not fit the egress MTU once encapsulated, answers the client with the MTU it has.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipMeta,
    cfg: &GlobalConfig,
    log: Switch,
) -> Result<u32, DropReason> {
    let flow = &packet.flow;
    // lbd's published clock (about seconds), not a helper call per packet.
    let tick = cfg.now_tick;
    let (backend, new_flow, choice) = choose(packet, vip, tick)?;

    let overhead = encap::overhead(backend.slot).ok_or(DropReason::EncapFailed)?;
    if let Some(mtu) = egress::too_big(ctx, backend.slot, packet.ip.len, overhead) {
        if cfg.flags & CFG_F_TOO_BIG_REPLY == 0 {
            return Err(DropReason::TooBig);
        }
        icmp::too_big_reply(ctx, &packet.ip, mtu.saturating_sub(overhead))?;
        count(Counter::TooBigReplies);
        count(Counter::Tx);
        return Ok(xdp_action::XDP_TX);
    }
    let action = encap_and_send(ctx, backend, &packet.ip, flow, cfg)?;
    count_traffic(vip.vip_id, backend.index, packet.len, new_flow);
    log.forward(ctx, flow, choice, backend);
    Ok(action)
}

/// Encapsulates the packet of `flow` toward `backend` and sends it on.
#[inline(always)]
fn encap_and_send(
    ctx: &XdpContext,
    backend: Backend,
    ip: &IpInfo,
    flow: &FlowKey,
    cfg: &GlobalConfig,
) -> Result<u32, DropReason> {
    let entropy = if knockout::ENTROPY {
        0
    } else {
        encap_entropy(flow)
    };
    if !knockout::ENCAP {
        encap::encapsulate(ctx, backend.slot, ip, cfg, entropy)?;
    }
    egress::send(ctx, backend.slot)
}

/// ICMP or ICMPv6 to a VIP address: echo requests answered, errors quoting a VIP flow sent to
/// that flow's backend, the rest dropped. ICMP to any other address goes on untouched.
#[inline(always)]
fn icmp_to_vip(ctx: &XdpContext, msg: &Icmp) -> Result<u32, Dropped> {
    if !lookup::is_vip_address(msg.dst, msg.ip.family) {
        return Ok(pass());
    }
    let cfg = lookup::config();
    let log = cfg.map_or(Switch::OFF, Switch::new);
    let dropped = |reason| Dropped {
        reason,
        log,
        src: msg.src,
        dst: msg.dst,
        family: msg.ip.family,
    };
    let Some(cfg) = cfg else {
        return Err(dropped(DropReason::EncapFailed));
    };
    match icmp::kind(ctx, msg).map_err(dropped)? {
        IcmpKind::EchoRequest if cfg.flags & CFG_F_ECHO_REPLY != 0 => {
            icmp::echo_reply(ctx, msg).map_err(dropped)?;
            count(Counter::EchoReplies);
            count(Counter::Tx);
            Ok(xdp_action::XDP_TX)
        }
        IcmpKind::Error => forward_icmp_error(ctx, msg, cfg).map_err(dropped),
        IcmpKind::EchoRequest | IcmpKind::Other => Err(dropped(DropReason::UnsupportedProtocol)),
    }
}

/// Sends an ICMP error about a VIP flow to the backend that owns the flow (the one its entry
/// names, or else the one the VIP's table gives it), encapsulated like the flow's own packets:
/// the backend's stack then learns the path MTU toward the client, or that it is unreachable.
#[inline(always)]
fn forward_icmp_error(ctx: &XdpContext, msg: &Icmp, cfg: &GlobalConfig) -> Result<u32, DropReason> {
    let flow = icmp::quoted_flow(ctx, msg)?;
    let vip = lookup::vip(&flow).ok_or(DropReason::BadIcmp)?;
    let backend = match lookup::existing_backend(&flow) {
        Some(backend) => backend,
        None => lookup::ring_backend(&vip, ring_hash(&vip, &flow))?,
    };
    let action = encap_and_send(ctx, backend, &msg.ip, &flow, cfg)?;
    count(Counter::IcmpForwarded);
    Ok(action)
}

/// The backend for `packet`, whether the flow was recorded just now, and how it was chosen.
#[inline(always)]
fn choose(
    packet: &Packet,
    vip: &VipMeta,
    tick: u32,
) -> Result<(Backend, bool, Choice), DropReason> {
    let flow = &packet.flow;
    // A SYN nearly always opens a flow the table has never seen: record it first, and look the
    // table up only when an entry exists (a retransmitted SYN, or the port reused). One hash
    // table operation instead of two on the common path. Without a table backend, the entry
    // (a draining backend's, say) still decides below. The Maglev pick and the rate guard read
    // here serve the fallback too, so a SYN over the guard's limit (a flood) pays for them once.
    let mut picked = None;
    if packet.syn
        && let Ok(backend) = lookup::ring_backend(vip, ring_hash(vip, flow))
    {
        let guard = Guard::at(tick);
        if guard.room() && lookup::pin_new_flow(flow, backend, tick) {
            guard.recorded();
            count(Counter::NewFlows);
            return Ok((backend, true, Choice::New));
        }
        picked = Some((backend, guard));
    }
    if let Some(backend) = lookup::pinned_backend(flow, tick, packet.syn, packet.fin_rst) {
        count(Counter::FlowHits);
        return Ok((backend, false, Choice::Hit));
    }
    let (backend, guard) = match picked {
        Some(picked) => picked,
        None => (
            lookup::ring_backend(vip, ring_hash(vip, flow))?,
            Guard::at(tick),
        ),
    };
    // Over the guard's limit the flow still goes to the table's backend, unrecorded.
    let pinned = guard.room() && lookup::pin_flow(flow, backend, tick);
    if pinned {
        guard.recorded();
        count(Counter::NewFlows);
    } else if !guard.room() {
        guard.unrecorded();
    }
    // A SYN, or a UDP datagram (UDP has no handshake: any unknown flow is new).
    let choice = if packet.syn || flow.proto == PROTO_UDP {
        Choice::New
    } else {
        count(Counter::FlowMisses);
        Choice::Rehash
    };
    Ok((backend, pinned, choice))
}

/// The hash that picks a new flow's entry in the VIP's Maglev table.
#[inline(always)]
fn ring_hash(vip: &VipMeta, flow: &FlowKey) -> u32 {
    if vip.flags & VIP_F_HASH_SRC_ONLY != 0 {
        src_hash(flow)
    } else {
        flow_hash(flow)
    }
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
