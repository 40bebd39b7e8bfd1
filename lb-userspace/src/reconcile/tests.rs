//! Reconcile against the fake data plane: the order of map operations is the contract.

use std::{net::IpAddr, time::Duration};

use lb_common::{
    VipKey,
    keys::{PROTO_TCP, RING_EMPTY, SLOT_ACTIVE, SLOT_DOWN, SLOT_DRAINING, SLOT_FREE},
};

use super::*;
use crate::dataplane::fake::{FakeDataPlane, Op};

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
    }
}

fn plan(key: VipKey, backends: Vec<BackendPlan>) -> VipPlan {
    VipPlan {
        key,
        flags: 0,
        ring_size: RING,
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
    let old_gen = dp.backends[gone as usize].generation;
    dp.ops.clear();

    rec.apply(&mut dp, &[plan(v, vec![backend("10.1.0.1", 1)])])
        .unwrap();
    let swap = position(&dp.ops, |o| matches!(o, Op::SetVip(..)));
    let free = position(
        &dp.ops,
        |o| matches!(o, Op::SetBackend(s, b) if *s == gone && b.state == SLOT_FREE),
    );
    assert!(swap < free, "{:?}", dp.ops);
    assert_eq!(
        dp.backends[gone as usize].generation,
        old_gen.wrapping_add(1)
    );
    assert!(dp.table_of(&v).unwrap().iter().all(|s| *s != gone));
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
    dp.ops.clear();
    rec.apply(&mut dp, &[]).unwrap();
    let del = position(&dp.ops, |o| matches!(o, Op::DelVip(..)));
    let free = position(&dp.ops, |o| matches!(o, Op::SetBackend(s, _) if *s == slot));
    assert!(del < free);
    assert!(dp.vips.is_empty() && dp.vip_addrs.is_empty());
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
