//! Reconcile against the fake data plane: the order of map operations is the contract.

use std::{net::IpAddr, time::Duration};

use lb_common::{
    VipKey,
    keys::{PROTO_TCP, RING_EMPTY, SLOT_ACTIVE, SLOT_DOWN, SLOT_DRAINING, SLOT_FREE, SLOT_RETIRED},
};

use super::*;
use crate::dataplane::{
    CounterTable as _,
    fake::{FakeDataPlane, Op},
};
use lb_common::TrafficCounters;

const RING: u32 = 13;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn vip(addr: &str) -> VipKey {
    VipKey::new(ip(addr), 80, PROTO_TCP)
}

fn egress() -> Egress {
    Egress {
        ifindex: 7,
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
    }
}

fn backend(addr: &str, weight: u32) -> BackendPlan {
    BackendPlan {
        addr: ip(addr),
        weight,
        egress: Some(egress()),
        healthy: true,
    }
}

fn plan(key: VipKey, backends: Vec<BackendPlan>) -> VipPlan {
    VipPlan {
        key,
        flags: 0,
        ring_size: RING,
        tunnel: Tunnel::Ipip,
        backends,
    }
}

fn setup() -> (FakeDataPlane, Reconciler) {
    let dp = FakeDataPlane::new(64);
    let rec = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    (dp, rec)
}

fn slot_of(rec: &Reconciler, key: &VipKey, addr: &str) -> u32 {
    rec.backend_slots(key)
        .into_iter()
        .find(|(a, _, _)| *a == ip(addr))
        .map(|(_, s, _)| s)
        .expect("backend installed")
}

fn position(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
    ops.iter().position(pred).expect("operation recorded")
}

/// The writes into one slot, in order.
fn writes_to(ops: &[Op], slot: u32) -> Vec<BackendSlot> {
    ops.iter()
        .filter_map(|o| match o {
            Op::SetBackend(s, b) if *s == slot => Some(*b),
            _ => None,
        })
        .collect()
}

/// What removing a backend writes into its slot: the same backend under a new generation.
fn retired(old: BackendSlot) -> BackendSlot {
    BackendSlot {
        state: SLOT_RETIRED,
        generation: old.generation.wrapping_add(1),
        ..old
    }
}

/// What a slot holds once free.
fn free_with(generation: u32) -> BackendSlot {
    BackendSlot {
        generation,
        ..BackendSlot::default()
    }
}

/// Makes everything retired so far count as retired a quarantine ago, as if time had passed.
fn let_quarantine_pass(rec: &mut Reconciler) {
    rec.quarantine = Duration::ZERO;
}

#[test]
fn fresh_vip_writes_slots_before_the_table_that_names_them() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let b = vec![
        backend("10.1.0.1", 1),
        backend("10.1.0.2", 1),
        backend("10.1.0.3", 1),
    ];
    rec.apply(&mut dp, &[plan(v, b)]).unwrap();

    let set_vip = position(&dp.ops, |o| matches!(o, Op::SetVip(..)));
    let last_slot = dp
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::SetBackend(..)))
        .unwrap();
    assert!(
        last_slot < set_vip,
        "slots must exist before the table: {:?}",
        dp.ops
    );
    let table = dp.table_of(&v).unwrap();
    let slots: BTreeSet<u32> = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
        .iter()
        .map(|a| slot_of(&rec, &v, a))
        .collect();
    assert!(table.iter().all(|s| slots.contains(s)), "{table:?}");
    assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 3);
    assert!(dp.vip_addrs.contains_key(&v.address_only()));
    assert!(dp.tx_ports.contains(&7));
}

#[test]
fn removing_a_backend_swaps_the_table_before_freeing_its_slot() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
        )],
    )
    .unwrap();
    let gone = slot_of(&rec, &v, "10.1.0.2");
    let old = dp.backends[gone as usize];
    dp.ops.clear();

    let kept = [plan(v, vec![backend("10.1.0.1", 1)])];
    rec.apply(&mut dp, &kept).unwrap();
    // Retired after the swap: pinned flows miss the new generation and re-hash, while a packet
    // that read the old table still finds the backend, its state and its next hop.
    let swap = position(&dp.ops, |o| matches!(o, Op::SetVip(..)));
    let retire = position(&dp.ops, |o| *o == Op::SetBackend(gone, retired(old)));
    assert!(swap < retire, "{:?}", dp.ops);
    assert_eq!(writes_to(&dp.ops, gone), [retired(old)], "not freed yet");
    assert_eq!(dp.backends[gone as usize].state, SLOT_RETIRED);
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s != gone));

    // The next apply after the quarantine (zero here) writes it free, with another generation.
    dp.ops.clear();
    rec.apply(&mut dp, &kept).unwrap();
    let free = free_with(old.generation.wrapping_add(2));
    assert_eq!(writes_to(&dp.ops, gone), [free], "{:?}", dp.ops);
    assert_eq!(dp.backends[gone as usize], free);
    assert_eq!(free.state, SLOT_FREE);
}

#[test]
fn draining_keeps_the_slot_and_generation_but_leaves_the_table() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
        )],
    )
    .unwrap();
    let drained = slot_of(&rec, &v, "10.1.0.2");
    let generation = dp.backends[drained as usize].generation;

    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 0)],
        )],
    )
    .unwrap();
    let slot = dp.backends[drained as usize];
    assert_eq!((slot.state, slot.generation), (SLOT_DRAINING, generation));
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s != drained));
}

#[test]
fn unresolved_backend_is_down_and_out_of_the_table() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let mut unresolved = backend("10.1.0.2", 1);
    unresolved.egress = None;
    rec.apply(
        &mut dp,
        &[plan(v, vec![backend("10.1.0.1", 1), unresolved])],
    )
    .unwrap();
    let down = slot_of(&rec, &v, "10.1.0.2");
    assert_eq!(dp.backends[down as usize].state, SLOT_DOWN);
    let up = slot_of(&rec, &v, "10.1.0.1");
    assert_eq!(dp.backends[up as usize].state, SLOT_ACTIVE);
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s == up));
}

#[test]
fn no_usable_backend_gives_an_empty_table() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.1", 0)])])
        .unwrap();
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s == RING_EMPTY));
}

#[test]
fn same_plan_twice_and_after_adoption_changes_nothing() {
    let (mut dp, mut rec) = setup();
    let plans = [
        plan(
            vip("10.0.0.1"),
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 3)],
        ),
        plan(vip("10.0.0.2"), vec![backend("10.1.0.1", 1)]),
    ];
    rec.apply(&mut dp, &plans).unwrap();
    dp.ops.clear();
    rec.apply(&mut dp, &plans).unwrap();
    assert!(
        dp.ops.iter().all(|o| matches!(o, Op::SetVipAddr(..))),
        "{:?}",
        dp.ops
    );

    // A restarted agent reads the same state back and has nothing to change either, beyond
    // re-asserting the (idempotent) redirect ports it cannot read back.
    let mut adopted = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    dp.ops.clear();
    adopted.apply(&mut dp, &plans).unwrap();
    assert!(
        dp.ops
            .iter()
            .all(|o| matches!(o, Op::SetVipAddr(..) | Op::TxPort(_))),
        "{:?}",
        dp.ops
    );
}

#[test]
fn removing_a_vip_deletes_it_then_frees_its_slots_and_address() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.1", 1)])])
        .unwrap();
    let slot = slot_of(&rec, &v, "10.1.0.1");
    let old = dp.backends[slot as usize];
    dp.ops.clear();
    rec.apply(&mut dp, &[]).unwrap();
    let del = position(&dp.ops, |o| matches!(o, Op::DelVip(..)));
    let retire = position(&dp.ops, |o| *o == Op::SetBackend(slot, retired(old)));
    assert!(del < retire, "{:?}", dp.ops);
    assert_eq!(writes_to(&dp.ops, slot), [retired(old)]);
    assert!(dp.vips.is_empty() && dp.vip_addrs.is_empty());

    // Free after the quarantine (zero here), and nothing else left to do.
    dp.ops.clear();
    rec.apply(&mut dp, &[]).unwrap();
    let free = free_with(old.generation.wrapping_add(2));
    assert_eq!(dp.ops, [Op::SetBackend(slot, free)]);
    assert_eq!(dp.backends[slot as usize].state, SLOT_FREE);
}

#[test]
fn capacity_errors_change_nothing() {
    let (mut dp, mut rec) = setup();
    // 64-entry pool: five 13-entry tables do not fit.
    let plans: Vec<VipPlan> = (1..=5)
        .map(|i| plan(vip(&format!("10.0.0.{i}")), vec![backend("10.1.0.1", 1)]))
        .collect();
    let err = rec.apply(&mut dp, &plans).unwrap_err();
    assert!(
        matches!(err, ReconcileError::RingPoolExhausted { .. }),
        "{err}"
    );
    assert!(dp.ops.is_empty(), "{:?}", dp.ops);
}

#[test]
fn freed_slots_wait_out_the_quarantine() {
    let mut dp = FakeDataPlane::new(64);
    let mut rec = Reconciler::adopt(&dp, Duration::from_hours(1)).unwrap();
    let v = vip("10.0.0.1");
    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.1", 1)])])
        .unwrap();
    let first = slot_of(&rec, &v, "10.1.0.1");
    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.2", 1)])])
        .unwrap();
    assert_ne!(slot_of(&rec, &v, "10.1.0.2"), first);
}

#[test]
fn a_retired_slot_goes_to_a_new_backend_only_after_its_quarantine() {
    let mut dp = FakeDataPlane::new(64);
    let mut rec = Reconciler::adopt(&dp, Duration::from_hours(1)).unwrap();
    let v = vip("10.0.0.1");
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
        )],
    )
    .unwrap();
    let slot = slot_of(&rec, &v, "10.1.0.2");
    let old = dp.backends[slot as usize];
    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.1", 1)])])
        .unwrap();

    // During the quarantine a new backend gets another slot and the retired one is left alone.
    dp.ops.clear();
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.3", 1)],
        )],
    )
    .unwrap();
    assert_ne!(slot_of(&rec, &v, "10.1.0.3"), slot);
    assert!(writes_to(&dp.ops, slot).is_empty(), "{:?}", dp.ops);
    assert_eq!(dp.backends[slot as usize], retired(old));

    // After it, the slot is written free and then handed out (lowest free slot first).
    let_quarantine_pass(&mut rec);
    dp.ops.clear();
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![
                backend("10.1.0.1", 1),
                backend("10.1.0.3", 1),
                backend("10.1.0.4", 1),
            ],
        )],
    )
    .unwrap();
    assert_eq!(slot_of(&rec, &v, "10.1.0.4"), slot);
    let writes = writes_to(&dp.ops, slot);
    assert_eq!(writes.len(), 2, "{:?}", dp.ops);
    assert_eq!(writes[0], free_with(old.generation.wrapping_add(2)));
    let reused = writes[1];
    assert_eq!(reused.state, SLOT_ACTIVE);
    assert_eq!(
        ip_from_wire(reused.addr, reused.family),
        Some(ip("10.1.0.4"))
    );
    // No flow pinned to the removed backend, before or after it was retired, matches.
    assert!(
        reused.generation != old.generation && reused.generation != retired(old).generation,
        "{reused:?}"
    );
}

#[test]
fn check_counts_slots_past_their_quarantine_as_free_like_apply() {
    let mut dp = FakeDataPlane::new(64);
    // Room for three backends.
    dp.backends.truncate(3);
    let mut rec = Reconciler::adopt(&dp, Duration::from_hours(1)).unwrap();
    let v = vip("10.0.0.1");
    let abc = ["10.1.0.1", "10.1.0.2", "10.1.0.3"].map(|a| backend(a, 1));
    rec.apply(&mut dp, &[plan(v, abc.to_vec())]).unwrap();
    let gone = slot_of(&rec, &v, "10.1.0.3");
    rec.apply(&mut dp, &[plan(v, abc[..2].to_vec())]).unwrap();
    let grown = [plan(
        v,
        vec![abc[0].clone(), abc[1].clone(), backend("10.1.0.4", 1)],
    )];
    let full = |e: &ReconcileError| {
        matches!(
            e,
            ReconcileError::TooManyBackends {
                needed: 1,
                free: 0,
                total: 3
            }
        )
    };

    // Retired a moment ago: not free, for check and apply alike.
    let err = rec.check(&grown).unwrap_err();
    assert!(full(&err), "{err}");
    dp.ops.clear();
    let err = rec.apply(&mut dp, &grown).unwrap_err();
    assert!(full(&err), "{err}");
    assert!(dp.ops.is_empty(), "{:?}", dp.ops);

    // Past its quarantine: check counts it free before apply has written it free, and apply
    // agrees.
    let_quarantine_pass(&mut rec);
    rec.check(&grown).unwrap();
    rec.check(&grown).unwrap();
    assert_eq!(
        dp.backends[gone as usize].state, SLOT_RETIRED,
        "check wrote nothing"
    );
    rec.apply(&mut dp, &grown).unwrap();
    assert_eq!(slot_of(&rec, &v, "10.1.0.4"), gone);
}

#[test]
fn a_vip_removal_that_failed_half_way_is_finished_by_the_next_apply() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
        )],
    )
    .unwrap();
    let (first, second) = (slot_of(&rec, &v, "10.1.0.1"), slot_of(&rec, &v, "10.1.0.2"));
    let (old_first, old_second) = (dp.backends[first as usize], dp.backends[second as usize]);
    // The VIP delete and the first retire succeed, the second retire fails.
    dp.ops.clear();
    dp.fail_on = Some(2);
    rec.apply(&mut dp, &[]).unwrap_err();
    assert_eq!(
        dp.ops,
        [Op::DelVip(v), Op::SetBackend(first, retired(old_first))],
        "{:?}",
        dp.ops
    );

    // The next apply neither deletes the VIP again (the kernel map would refuse a missing key)
    // nor retires the first slot again; it retires the second. The first, freed at its start,
    // may go to a new backend, which must then keep it.
    dp.ops.clear();
    let other_vip = vip("10.0.0.2");
    let other = [plan(other_vip, vec![backend("10.1.0.3", 1)])];
    rec.apply(&mut dp, &other).unwrap();
    assert!(
        !dp.ops.iter().any(|o| matches!(o, Op::DelVip(_))),
        "{:?}",
        dp.ops
    );
    assert_eq!(
        writes_to(&dp.ops, second),
        [retired(old_second)],
        "{:?}",
        dp.ops
    );
    let reused = slot_of(&rec, &other_vip, "10.1.0.3");
    let installed = dp.backends[reused as usize];
    dp.ops.clear();
    rec.apply(&mut dp, &other).unwrap();
    rec.apply(&mut dp, &other).unwrap();
    assert!(writes_to(&dp.ops, reused).is_empty(), "{:?}", dp.ops);
    assert_eq!(dp.backends[reused as usize], installed);
    assert_eq!(
        ip_from_wire(installed.addr, installed.family),
        Some(ip("10.1.0.3"))
    );
    assert_eq!(dp.backends[second as usize].state, SLOT_FREE);
}

#[test]
fn unchanged_vips_need_no_new_table_region() {
    // 64-entry pool, 13-entry tables: 4 VIPs fit once; re-applying must not ask for 4 more.
    let (mut dp, mut rec) = setup();
    let plans: Vec<VipPlan> = (1..=4)
        .map(|i| plan(vip(&format!("10.0.0.{i}")), vec![backend("10.1.0.1", 1)]))
        .collect();
    rec.apply(&mut dp, &plans).unwrap();
    rec.apply(&mut dp, &plans).unwrap();
    let mut adopted = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    adopted.apply(&mut dp, &plans).unwrap();
}

#[test]
fn replacing_vips_frees_their_room_first() {
    // Room for the old and the new tables at once (removed tables are quarantined).
    let mut dp = FakeDataPlane::new(13 * 8);
    let mut rec = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    let old: Vec<VipPlan> = (1..=4)
        .map(|i| plan(vip(&format!("10.0.0.{i}")), vec![backend("10.1.0.1", 1)]))
        .collect();
    rec.apply(&mut dp, &old).unwrap();
    let new: Vec<VipPlan> = (5..=8)
        .map(|i| plan(vip(&format!("10.0.0.{i}")), vec![backend("10.1.0.1", 1)]))
        .collect();
    rec.apply(&mut dp, &new).unwrap();
    assert_eq!(dp.vips.len(), 4);
    let first_set = position(
        &dp.ops,
        |o| matches!(o, Op::SetVip(k, _) if *k == vip("10.0.0.5")),
    );
    let last_del = dp
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::DelVip(_)))
        .unwrap();
    assert!(last_del < first_set, "{:?}", dp.ops);
}

#[test]
fn a_failed_write_is_remembered_and_repaired() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let plans = [plan(v, vec![backend("10.1.0.1", 1)])];
    // Fail on the ring write (after the tx port and the slot were written).
    dp.fail_on = Some(2);
    rec.apply(&mut dp, &plans).unwrap_err();
    assert!(dp.vips.is_empty());
    rec.apply(&mut dp, &plans).unwrap();
    let table = dp.table_of(&v).unwrap();
    assert!(table.iter().all(|s| *s == slot_of(&rec, &v, "10.1.0.1")));
    // Only one slot was ever used for the backend.
    let used = dp.backends.iter().filter(|b| b.state != SLOT_FREE).count();
    assert_eq!(used, 1);
}

#[test]
fn drain_writes_the_demotion_after_the_table_swap() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
        )],
    )
    .unwrap();
    let drained = slot_of(&rec, &v, "10.1.0.2");
    dp.ops.clear();
    rec.apply(
        &mut dp,
        &[plan(
            v,
            vec![backend("10.1.0.1", 1), backend("10.1.0.2", 0)],
        )],
    )
    .unwrap();
    let swap = position(&dp.ops, |o| matches!(o, Op::SetVip(..)));
    let demote = position(
        &dp.ops,
        |o| matches!(o, Op::SetBackend(s, b) if *s == drained && b.state == SLOT_DRAINING),
    );
    assert!(swap < demote, "{:?}", dp.ops);
}

/// Switching a VIP between IPIP and GUE (or GUE ports) rewrites its slots in place: same
/// slot, same generation (flows keep their backends), no new table.
#[test]
fn a_new_tunnel_rewrites_the_slots_in_place() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let backends = || vec![backend("10.1.0.1", 1), backend("2001:db8::2", 0)];
    rec.apply(&mut dp, &[plan(v, backends())]).unwrap();
    let before = rec.backend_slots(&v);
    assert!(
        before
            .iter()
            .all(|(_, _, b)| (b.encap, b.encap_port) == (ENCAP_IPIP, 0))
    );
    dp.ops.clear();

    let gue = VipPlan {
        tunnel: Tunnel::Gue { port: 6080 },
        ..plan(v, backends())
    };
    rec.apply(&mut dp, std::slice::from_ref(&gue)).unwrap();
    assert!(
        !dp.ops.iter().any(|o| matches!(o, Op::SetVip(..))),
        "no table swap: {:?}",
        dp.ops
    );
    let after = rec.backend_slots(&v);
    assert_eq!(after.len(), 2);
    for ((a0, s0, b0), (a1, s1, b1)) in before.iter().zip(&after) {
        assert_eq!(
            (a0, s0, b0.generation, b0.state),
            (a1, s1, b1.generation, b1.state)
        );
        assert_eq!(b1.encap, ENCAP_GUE);
        assert_eq!(
            b1.encap_port.to_ne_bytes(),
            [0x17, 0xc0],
            "6080, network order"
        );
        assert_eq!(dp.backends[*s1 as usize], *b1, "written to the map");
    }
    // The draining one too, and nothing else was written.
    assert_eq!(
        dp.ops
            .iter()
            .filter(|o| matches!(o, Op::SetBackend(..)))
            .count(),
        2,
        "{:?}",
        dp.ops
    );
    // Same plan again: nothing to write.
    dp.ops.clear();
    rec.apply(&mut dp, &[gue]).unwrap();
    assert!(
        !dp.ops.iter().any(|o| matches!(o, Op::SetBackend(..))),
        "{:?}",
        dp.ops
    );
    rec.apply(&mut dp, &[plan(v, backends())]).unwrap();
    assert!(
        rec.backend_slots(&v)
            .iter()
            .all(|(_, _, b)| (b.encap, b.encap_port) == (ENCAP_IPIP, 0))
    );
}

/// IPv6 VIPs and backends of either family get slots of the backend's family, the address in
/// wire order.
#[test]
fn slots_take_the_backends_family() {
    let (mut dp, mut rec) = setup();
    let v6 = VipKey::new(ip("2001:db8::1"), 443, PROTO_TCP);
    let v4 = vip("10.0.0.1");
    rec.apply(
        &mut dp,
        &[
            plan(
                v6,
                vec![backend("10.1.0.1", 1), backend("2001:db8:1::5", 1)],
            ),
            plan(v4, vec![backend("2001:db8:1::6", 1)]),
        ],
    )
    .unwrap();
    for key in [v6, v4] {
        for (addr, slot, value) in rec.backend_slots(&key) {
            let (wire, family) = wire_addr(addr);
            assert_eq!((value.addr, value.family), (wire, family), "{addr}");
            assert_eq!(value.state, SLOT_ACTIVE);
            assert_eq!(dp.backends[slot as usize], value);
        }
    }
    let b6 = rec
        .backend_slots(&v4)
        .into_iter()
        .next()
        .map(|(_, _, b)| b)
        .unwrap();
    assert_eq!(b6.family, lb_common::keys::FAMILY_V6);
    assert_eq!(ip_from_wire(b6.addr, b6.family), Some(ip("2001:db8:1::6")));
    // Both VIP addresses are known to the data plane, each in its family.
    let addrs = &dp.vip_addrs;
    assert!(addrs.contains_key(&v6.address_only()), "{addrs:?}");
    assert!(addrs.contains_key(&v4.address_only()), "{addrs:?}");
}

/// A slot in use as a backend of `vip_id`, as an interrupted lbd may leave it.
fn stray_slot(addr: &str, vip_id: u32, generation: u32) -> BackendSlot {
    let mut b = slot_value(&backend(addr, 1), Tunnel::Ipip, vip_id, generation);
    b.state = SLOT_ACTIVE;
    b
}

#[test]
fn adoption_frees_slots_of_unknown_vips_on_the_first_apply() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let plans = [plan(v, vec![backend("10.1.0.1", 1)])];
    rec.apply(&mut dp, &plans).unwrap();
    // Slot 40 belongs to VIP id 99, which no VIP carries.
    dp.backends[40] = stray_slot("10.9.0.1", 99, 6);
    dp.ops.clear();

    let mut adopted = Reconciler::adopt(&dp, Duration::from_hours(1)).unwrap();
    assert!(dp.ops.is_empty(), "adopting writes nothing: {:?}", dp.ops);
    adopted.apply(&mut dp, &plans).unwrap();

    let stray = stray_slot("10.9.0.1", 99, 6);
    assert_eq!(dp.backends[40], retired(stray));
    assert_eq!(dp.backends[40].generation, 7);
    assert!(
        !dp.ops.iter().any(|o| matches!(o, Op::SetVip(..))),
        "no table change needed: {:?}",
        dp.ops
    );
    // Retired like any removed backend: a new backend does not get it during the quarantine.
    let grown = [plan(
        v,
        vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
    )];
    adopted.apply(&mut dp, &grown).unwrap();
    assert_ne!(slot_of(&adopted, &v, "10.1.0.2"), 40);
    // Written free only after it, and retired and freed once each.
    assert_eq!(writes_to(&dp.ops, 40), [retired(stray)], "{:?}", dp.ops);
    let_quarantine_pass(&mut adopted);
    adopted.apply(&mut dp, &grown).unwrap();
    adopted.apply(&mut dp, &grown).unwrap();
    assert_eq!(
        writes_to(&dp.ops, 40),
        [retired(stray), free_with(8)],
        "{:?}",
        dp.ops
    );
}

#[test]
fn adoption_keeps_the_duplicate_its_table_names_and_frees_the_other() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let plans = [plan(v, vec![backend("10.1.0.1", 1)])];
    rec.apply(&mut dp, &plans).unwrap();
    let first = slot_of(&rec, &v, "10.1.0.1");
    let meta = dp.vips[&v];
    // A second slot for the same address, named by the table: the first one is the orphan.
    let dup = first + 30;
    dp.backends[dup as usize] = dp.backends[first as usize];
    let region = meta.ring_offset as usize..(meta.ring_offset + meta.ring_size) as usize;
    dp.ring[region].fill(dup);

    let copy = dp.backends[first as usize];

    let mut adopted = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    assert_eq!(slot_of(&adopted, &v, "10.1.0.1"), dup);
    dp.ops.clear();
    adopted.apply(&mut dp, &plans).unwrap();
    assert_eq!(dp.backends[first as usize], retired(copy));
    assert_eq!(dp.backends[dup as usize], copy);
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s == dup));
    assert!(
        !dp.ops.iter().any(|o| matches!(o, Op::SetVip(..))),
        "{:?}",
        dp.ops
    );
    // Free after the quarantine (zero here); the kept one is untouched.
    adopted.apply(&mut dp, &plans).unwrap();
    assert_eq!(dp.backends[first as usize].state, SLOT_FREE);
    assert_eq!(dp.backends[dup as usize], copy);
    assert!(writes_to(&dp.ops, dup).is_empty(), "{:?}", dp.ops);

    // Without a table naming either, the first slot wins and the later one is the orphan.
    let (mut dp, mut rec) = setup();
    rec.apply(&mut dp, &plans).unwrap();
    let first = slot_of(&rec, &v, "10.1.0.1");
    let copy = dp.backends[first as usize];
    dp.backends[(first + 30) as usize] = copy;
    let mut adopted = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    assert_eq!(slot_of(&adopted, &v, "10.1.0.1"), first);
    adopted.apply(&mut dp, &plans).unwrap();
    assert_eq!(dp.backends[(first + 30) as usize], retired(copy));
    adopted.apply(&mut dp, &plans).unwrap();
    assert_eq!(dp.backends[(first + 30) as usize].state, SLOT_FREE);
    assert_eq!(dp.backends[first as usize], copy);
}

#[test]
fn an_orphan_named_by_a_table_is_freed_only_after_the_table_swap() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let plans = [plan(v, vec![backend("10.1.0.1", 1)])];
    rec.apply(&mut dp, &plans).unwrap();
    // The table still names slot 40, which belongs to no VIP.
    dp.backends[40] = stray_slot("10.9.0.1", 99, 0);
    let meta = dp.vips[&v];
    dp.ring[meta.ring_offset as usize] = 40;

    let stray = dp.backends[40];

    let mut adopted = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    dp.ops.clear();
    adopted.apply(&mut dp, &plans).unwrap();
    let swap = position(&dp.ops, |o| matches!(o, Op::SetVip(..)));
    let retire = position(&dp.ops, |o| matches!(o, Op::SetBackend(40, _)));
    assert!(swap < retire, "{:?}", dp.ops);
    assert_eq!(writes_to(&dp.ops, 40), [retired(stray)]);
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s != 40));

    // Free after the quarantine (zero here).
    dp.ops.clear();
    adopted.apply(&mut dp, &plans).unwrap();
    assert_eq!(writes_to(&dp.ops, 40), [free_with(2)]);
    assert_eq!(dp.backends[40].state, SLOT_FREE);
}

#[test]
fn adoption_leaves_table_regions_no_vip_names_free() {
    // A table written but never published (lbd killed before the VIP update) is not claimed.
    let mut dp = FakeDataPlane::new(2 * RING);
    dp.ring[..RING as usize].fill(3);
    let mut rec = Reconciler::adopt(&dp, Duration::ZERO).unwrap();
    let plans: Vec<VipPlan> = (1..=2)
        .map(|i| plan(vip(&format!("10.0.0.{i}")), vec![backend("10.1.0.1", 1)]))
        .collect();
    rec.apply(&mut dp, &plans).unwrap();
    let offsets: BTreeSet<u32> = dp.vips.values().map(|m| m.ring_offset).collect();
    assert_eq!(offsets, BTreeSet::from([0, RING]));
}

/// lbd restarted within a quarantine: the slot it had retired is not taken for a live backend
/// (even one of the same VIP and address, re-added meanwhile) but waits out a new quarantine.
#[test]
fn adoption_quarantines_retired_slots() {
    let (mut dp, mut rec) = setup();
    let v = vip("10.0.0.1");
    let both = [plan(
        v,
        vec![backend("10.1.0.1", 1), backend("10.1.0.2", 1)],
    )];
    rec.apply(&mut dp, &both).unwrap();
    let gone = slot_of(&rec, &v, "10.1.0.2");
    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.1", 1)])])
        .unwrap();
    assert_eq!(dp.backends[gone as usize].state, SLOT_RETIRED);

    let mut adopted = Reconciler::adopt(&dp, Duration::from_hours(1)).unwrap();
    assert!(
        adopted
            .backend_slots(&v)
            .iter()
            .all(|(_, slot, _)| *slot != gone),
        "a retired slot is not a backend"
    );
    dp.ops.clear();
    adopted.apply(&mut dp, &both).unwrap();
    assert_ne!(slot_of(&adopted, &v, "10.1.0.2"), gone);
    assert!(writes_to(&dp.ops, gone).is_empty(), "{:?}", dp.ops);
    let_quarantine_pass(&mut adopted);
    adopted.apply(&mut dp, &both).unwrap();
    assert_eq!(dp.backends[gone as usize].state, SLOT_FREE);
}

#[test]
fn a_reused_slot_or_vip_id_starts_its_counters_at_zero() {
    let (mut dp, mut rec) = setup();
    let (a, b) = (vip("10.0.0.1"), vip("10.0.0.2"));
    rec.apply(&mut dp, &[plan(a, vec![backend("10.1.0.1", 1)])])
        .unwrap();
    let slot = slot_of(&rec, &a, "10.1.0.1");
    let vip_id = dp.vips[&a].vip_id;
    dp.counters.add(vip_id, slot, 10, 100);

    // Changes that keep the VIP and the backend keep their counters.
    dp.ops.clear();
    rec.apply(&mut dp, &[plan(a, vec![backend("10.1.0.1", 2)])])
        .unwrap();
    assert!(
        !dp.ops
            .iter()
            .any(|o| matches!(o, Op::ResetVipCounters(_) | Op::ResetBackendCounters(_))),
        "{:?}",
        dp.ops
    );
    assert_eq!(dp.counters.backend(slot).unwrap().packets, 10);

    // Gone, then (after the zero quarantine) both the id and the slot go to a new VIP.
    rec.apply(&mut dp, &[]).unwrap();
    rec.apply(&mut dp, &[]).unwrap();
    dp.ops.clear();
    rec.apply(&mut dp, &[plan(b, vec![backend("10.1.0.9", 1)])])
        .unwrap();
    assert_eq!(dp.vips[&b].vip_id, vip_id, "the id is reused");
    assert_eq!(slot_of(&rec, &b, "10.1.0.9"), slot, "the slot is reused");
    let reset_vip = position(&dp.ops, |o| *o == Op::ResetVipCounters(vip_id));
    let reset_slot = position(&dp.ops, |o| *o == Op::ResetBackendCounters(slot));
    let slot_written = position(&dp.ops, |o| matches!(o, Op::SetBackend(s, _) if *s == slot));
    let published = position(&dp.ops, |o| matches!(o, Op::SetVip(..)));
    assert!(
        reset_slot < slot_written && reset_vip < published,
        "{:?}",
        dp.ops
    );
    assert_eq!(dp.counters.vip(vip_id).unwrap(), TrafficCounters::default());
    assert_eq!(
        dp.counters.backend(slot).unwrap(),
        TrafficCounters::default()
    );
}
