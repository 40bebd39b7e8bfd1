//! Builds a [`Stats`] reply: the status template (names, weights, health) joined with the
//! data plane's counters (read now, by VIP id and slot), a flow-table scan and rates.

use std::{collections::HashMap, time::Instant};

use lb_common::{Counter, DropReason, TrafficCounters, stats::COUNTER_COUNT};

use super::{RateKey, RateTracker};
use crate::{
    api::proto::{FlowTableStats, GlobalStats, Stats, VipStats},
    control::StatusTemplate,
    dataplane::{CounterTable, DataPlaneError},
    flows::Counts,
};

/// Reads the counters and fills `template` in. `capacity` is the flow table's size.
pub fn collect(
    template: StatusTemplate,
    counters: &dyn CounterTable,
    counts: &Counts,
    capacity: u64,
    rates: &mut RateTracker,
    now: Instant,
) -> Result<Stats, DataPlaneError> {
    let global = global_stats(&counters.global()?);
    let guard = counters.flow_guard()?;
    let slots: HashMap<(usize, usize), u32> = template
        .keys
        .iter()
        .map(|(v, b, (slot, _))| ((*v, *b), *slot))
        .collect();
    let mut read: HashMap<RateKey, TrafficCounters> = HashMap::new();
    for (v, vip) in template.status.vips.iter().enumerate() {
        if let Some(id) = template.vip_ids[v] {
            read.insert((vip.vip, None), counters.vip(id)?);
        }
        for (b, backend) in vip.backends.iter().enumerate() {
            if let Some(slot) = slots.get(&(v, b)) {
                read.insert((vip.vip, Some(backend.address)), counters.backend(*slot)?);
            }
        }
    }
    let idle_timeout_secs = template.status.idle_timeout_secs;
    let status = template.fill(counts);
    let rates = rates.observe(now, read);
    let vips = status
        .vips
        .into_iter()
        .map(|vip| {
            let id = vip.vip;
            VipStats::from_status(vip, |backend| rates.traffic(&(id, backend)))
        })
        .collect();
    Ok(Stats {
        rate_interval_secs: rates.span_secs(),
        idle_timeout_secs,
        vips,
        global,
        flow_table: FlowTableStats {
            capacity,
            entries: counts.entries,
            guard_limit: guard.limit,
            unrecorded: guard.unrecorded,
        },
    })
}

/// `LB_GLOBAL_STATS` (indexed by `Counter` and `DropReason`) by name.
fn global_stats(values: &[u64]) -> GlobalStats {
    let at = |i: u32| values.get(i as usize).copied().unwrap_or(0);
    debug_assert_eq!(values.len(), COUNTER_COUNT as usize);
    GlobalStats {
        actions: [
            ("pass", Counter::Pass),
            ("tx", Counter::Tx),
            ("redirect", Counter::Redirect),
            ("drop", Counter::Drop),
        ]
        .into_iter()
        .map(|(name, c)| (name.to_owned(), at(c as u32)))
        .collect(),
        flow_hits: at(Counter::FlowHits as u32),
        flow_misses: at(Counter::FlowMisses as u32),
        new_flows: at(Counter::NewFlows as u32),
        icmp_forwarded: at(Counter::IcmpForwarded as u32),
        echo_replies: at(Counter::EchoReplies as u32),
        too_big_replies: at(Counter::TooBigReplies as u32),
        drops: DropReason::ALL
            .into_iter()
            .map(|r| (r.name().to_owned(), at(r.counter_index())))
            .collect(),
    }
}
