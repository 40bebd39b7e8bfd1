//! Debug logging of the balancer's decisions (aya-log records in `AYA_LOGS`, which lbd prints
//! under the target `lb_xdp` at DEBUG), behind the runtime switch `CFG_F_DEBUG`. The switch is
//! read once per packet from the `GlobalConfig` the program reads anyway, so with it off a
//! packet pays one branch. Two log sites only (forward, drop): each aya-log record is a lot of
//! code for the verifier to walk.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use lb_common::{
    DropReason, FlowKey, GlobalConfig,
    config::CFG_F_DEBUG,
    keys::{FAMILY_V6, WireAddr},
};

use crate::lookup::Backend;

/// Every record's target (what lbd's log filter matches).
const TARGET: &str = "lb_xdp";

/// This packet's logging switch, read once from the config.
#[derive(Clone, Copy)]
pub struct Switch(bool);

impl Switch {
    /// For a packet that has no config to read it from.
    pub const OFF: Self = Self(false);

    #[inline(always)]
    pub fn new(cfg: &GlobalConfig) -> Self {
        Self(cfg.flags & CFG_F_DEBUG != 0)
    }

    /// Logs where the packet of `flow` went: `how` its backend was chosen, the backend's slot
    /// and address, and the egress interface.
    #[inline(always)]
    pub fn forward(self, ctx: &XdpContext, flow: &FlowKey, how: Choice, backend: Backend) {
        if !self.0 {
            return;
        }
        // Verifier cost: every distinct string an argument may point at is one more state the
        // verifier walks the whole record through, so only the decision is a word; protocol
        // and interface are numbers.
        let how = match how {
            Choice::Hit => "flow hit",
            Choice::New => "new flow",
            Choice::Rehash => "rehashed",
        };
        if flow.family == FAMILY_V6 {
            debug!(
                ctx,
                target: TARGET,
                "{} [{:i}]:{} -> [{:i}]:{} proto {}: slot {} via ifindex {}",
                how,
                v6_bytes(&flow.src),
                u16::from_be(flow.sport),
                v6_bytes(&flow.dst),
                u16::from_be(flow.dport),
                flow.proto,
                backend.index,
                backend.slot.ifindex
            );
            return;
        }
        debug!(
            ctx,
            target: TARGET,
            "{} {:i}:{} -> {:i}:{} proto {}: slot {} backend {:i} via ifindex {}",
            how,
            flow.src[0].to_ne_bytes(),
            u16::from_be(flow.sport),
            flow.dst[0].to_ne_bytes(),
            u16::from_be(flow.dport),
            flow.proto,
            backend.index,
            backend.slot.addr[0].to_ne_bytes(),
            backend.slot.ifindex
        );
    }
}

/// An IPv6 address's bytes from its wire-order words, for the log's `{:i}`.
#[inline(always)]
fn v6_bytes(addr: &WireAddr) -> [u8; 16] {
    let [a, b, c, d] = addr.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// How a packet's backend was chosen.
#[derive(Clone, Copy)]
pub enum Choice {
    /// The flow table's pin still holds.
    Hit,
    /// A TCP SYN or a UDP datagram without a flow entry: the VIP's Maglev table picked.
    New,
    /// Any other TCP packet without a valid flow entry (the flow began on another host, or its
    /// backend or entry went away): re-hashed through Maglev.
    Rehash,
}

/// Why a packet was dropped, with what its log record needs.
pub struct Dropped {
    pub reason: DropReason,
    pub log: Switch,
    /// Source and destination in wire order, of family `family`.
    pub src: WireAddr,
    pub dst: WireAddr,
    pub family: u8,
}

impl Dropped {
    #[inline(always)]
    pub fn new(reason: DropReason, log: Switch, flow: &FlowKey) -> Self {
        Self {
            reason,
            log,
            src: flow.src,
            dst: flow.dst,
            family: flow.family,
        }
    }

    /// Logs the drop with its reason's name (the metric label) and number. The names differ
    /// in length, so this record's copy is a call into a byte loop: fine on a drop.
    #[inline(always)]
    pub fn log(&self, ctx: &XdpContext) {
        if !self.log.0 {
            return;
        }
        if self.family == FAMILY_V6 {
            debug!(
                ctx,
                target: TARGET,
                "drop {:i} -> {:i}: {} ({})",
                v6_bytes(&self.src),
                v6_bytes(&self.dst),
                self.reason.name(),
                self.reason as u32
            );
            return;
        }
        debug!(
            ctx,
            target: TARGET,
            "drop {:i} -> {:i}: {} ({})",
            self.src[0].to_ne_bytes(),
            self.dst[0].to_ne_bytes(),
            self.reason.name(),
            self.reason as u32
        );
    }
}
