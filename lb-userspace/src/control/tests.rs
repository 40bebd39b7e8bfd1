use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::PathBuf,
};

use super::*;
use crate::{config::parse_config, dataplane::fake::FakeDataPlane, reconcile::DEFAULT_QUARANTINE};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-control-{tag}-{}", std::process::id()));
        fs::remove_dir_all(&dir).ok();
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.0).ok();
    }
}

const WEB: &str = "10.0.0.1:80/tcp";

fn egress() -> Egress {
    Egress {
        ifindex: 2,
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
    }
}

/// A control over a fake data plane with a small ring pool, the state file in `dir`, and
/// every 10.1.0.x backend resolvable.
fn control(dir: &TempDir, ring_pool: u32) -> Control<FakeDataPlane> {
    let dp = FakeDataPlane::new(ring_pool);
    let reconciler = Reconciler::adopt(&dp, DEFAULT_QUARANTINE).unwrap();
    let egress = (1..=20)
        .map(|i| (IpAddr::from([10, 1, 0, i]), egress()))
        .collect();
    Control::new(
        Settings::default(),
        DesiredState::default(),
        StateStore::new(dir.0.join("state.toml")),
        dp,
        reconciler,
        egress,
    )
}

fn change(json: &str) -> ChangeRequest {
    serde_json::from_str(json).unwrap()
}

fn run(c: &mut Control<FakeDataPlane>, json: &str) -> Result<ChangeReply, ApiError> {
    let pending = c.prepare_changes(change(json))?;
    c.commit(pending)
}

fn seed(c: &mut Control<FakeDataPlane>) {
    run(
        c,
        r#"{"changes":[{"op":"vip_add","vip":"10.0.0.1:80/tcp","ring_size":13},
            {"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.1"},
            {"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.2","weight":50}]}"#,
    )
    .unwrap();
}

#[test]
fn accepted_changes_are_saved_and_installed() {
    let dir = TempDir::new("accept");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let key = WEB.parse::<VipId>().unwrap().key();
    let table = c.dp().table_of(&key).unwrap().to_vec();
    assert_eq!(table.len(), 13);
    assert!(table.iter().all(|&s| s != lb_common::keys::RING_EMPTY));
    let saved = StateStore::new(dir.0.join("state.toml")).load().unwrap();
    assert_eq!(saved.as_ref(), Some(c.state()));

    // Draining takes the backend out of the table but keeps its slot (and flows).
    run(
        &mut c,
        r#"{"changes":[{"op":"backend_drain","vip":"10.0.0.1:80/tcp","address":"10.1.0.2"}]}"#,
    )
    .unwrap();
    let slots = c.reconciler.backend_slots(&key);
    let drained = slots
        .iter()
        .find(|(a, _, _)| a.to_string() == "10.1.0.2")
        .unwrap();
    assert_eq!(drained.2.state, SLOT_DRAINING);
    let table = c.dp().table_of(&key).unwrap();
    assert!(table.iter().all(|&s| s != drained.1));
    let status = c
        .status_template(60, &BTreeMap::new())
        .fill(&crate::flows::Counts {
            live: HashMap::from([((drained.1, drained.2.generation), 7)]),
            entries: 7,
        });
    let b = &status.vips[0].backends[1];
    assert_eq!(
        (b.state, b.drain, b.weight, b.flows),
        (BackendState::Draining, true, 50, 7)
    );
    assert_eq!(status.vips[0].backends[0].state, BackendState::Active);
}

#[test]
fn refusals_change_nothing() {
    let dir = TempDir::new("refuse");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let file = fs::read(dir.0.join("state.toml")).unwrap();
    let state = c.state().clone();
    let ops = c.dp().ops.len();
    let cases = [
        (
            r#"{"changes":[{"op":"backend_weight","vip":"10.0.0.1:80/tcp","address":"10.1.0.1","weight":70000}]}"#,
            ErrorKind::BadRequest,
            "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.1\"].weight: 70000 is out of range 0..=65535",
        ),
        (
            r#"{"changes":[{"op":"vip_add","vip":"10.0.0.1:80/tcp"}]}"#,
            ErrorKind::Conflict,
            "vip[\"10.0.0.1:80/tcp\"]: already exists",
        ),
        (
            r#"{"changes":[{"op":"backend_del","vip":"10.0.0.1:80/tcp","address":"10.1.0.9"}]}"#,
            ErrorKind::NotFound,
            "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.9\"]: no such backend",
        ),
        (
            r#"{"changes":[{"op":"vip_add","vip":"10.0.0.2:80/tcp","ring_size":100}]}"#,
            ErrorKind::BadRequest,
            "vip[\"10.0.0.2:80/tcp\"].ring_size: 100 is not prime (the next prime is 101)",
        ),
        // The first change is fine, the second is not: neither is applied.
        (
            r#"{"changes":[{"op":"backend_del","vip":"10.0.0.1:80/tcp","address":"10.1.0.1"},
                {"op":"vip_del","vip":"10.0.0.9:80/tcp"}]}"#,
            ErrorKind::NotFound,
            "changes: vip[\"10.0.0.9:80/tcp\"]: no such VIP",
        ),
        // Valid, but the ring pool (64 entries, 13 in use) has no room for a 61-entry table.
        (
            r#"{"changes":[{"op":"vip_add","vip":"10.0.0.2:80/tcp","ring_size":61}]}"#,
            ErrorKind::NoRoom,
            "ring pool exhausted",
        ),
        (
            r#"{"changes":[]}"#,
            ErrorKind::BadRequest,
            "changes: the list is empty",
        ),
    ];
    for (json, kind, message) in cases {
        let e = run(&mut c, json).unwrap_err();
        assert_eq!(e.kind, kind, "{json}: {e}");
        assert!(
            e.message.contains(message),
            "{json}:\n got {}\nwant {message}",
            e.message
        );
        assert_eq!(c.state(), &state);
        assert_eq!(fs::read(dir.0.join("state.toml")).unwrap(), file);
        assert_eq!(c.dp().ops.len(), ops, "{json} wrote to the data plane");
    }
}

#[test]
fn failed_save_is_not_applied() {
    let dir = TempDir::new("nosave");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let state = c.state().clone();
    let ops = c.dp().ops.len();
    // The state file's folder is gone and a file sits where it was.
    fs::remove_dir_all(&dir.0).unwrap();
    fs::write(&dir.0, "not a folder").unwrap();
    let e = run(
        &mut c,
        r#"{"changes":[{"op":"backend_del","vip":"10.0.0.1:80/tcp","address":"10.1.0.1"}]}"#,
    )
    .unwrap_err();
    fs::remove_file(&dir.0).unwrap();
    assert_eq!(e.kind, ErrorKind::Internal);
    assert!(e.message.contains("cannot save"), "{e}");
    assert_eq!(c.state(), &state);
    assert_eq!(c.dp().ops.len(), ops);
}

#[test]
fn dry_run_and_apply() {
    let dir = TempDir::new("apply");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let file = fs::read(dir.0.join("state.toml")).unwrap();
    let ops = c.dp().ops.len();
    let wanted = parse_config(
        r#"
[[vip]]
address = "10.0.0.1:80/tcp"
ring_size = 13
backends = [{ address = "10.1.0.2", weight = 50 }, { address = "10.1.0.3" }]
[[vip]]
address = "10.0.0.2:53/udp"
ring_size = 7
backends = [{ address = "10.1.0.3", drain = true }]
"#,
    )
    .unwrap()
    .state;
    let request = |dry_run| ApplyRequest {
        vip: wanted.clone().into_vips(),
        dry_run,
    };
    let reply = c.commit(c.prepare_apply(request(true)).unwrap()).unwrap();
    assert!(!reply.applied);
    let lines: Vec<String> = reply.changes.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "- backend 10.0.0.1:80/tcp 10.1.0.1",
            "+ backend 10.0.0.1:80/tcp 10.1.0.3 weight 100",
            "+ vip 10.0.0.2:53/udp ring_size 7 hash 5tuple",
            "+ backend 10.0.0.2:53/udp 10.1.0.3 weight 100",
            "~ backend 10.0.0.2:53/udp 10.1.0.3 drain",
        ]
    );
    assert_eq!(fs::read(dir.0.join("state.toml")).unwrap(), file);
    assert_eq!(c.dp().ops.len(), ops);

    let reply = c.commit(c.prepare_apply(request(false)).unwrap()).unwrap();
    assert!(reply.applied);
    assert_eq!(c.state(), &wanted);
    assert_eq!(
        StateStore::new(dir.0.join("state.toml")).load().unwrap(),
        Some(wanted.clone())
    );
    // Applying the same file again is a no-op.
    let reply = c.commit(c.prepare_apply(request(false)).unwrap()).unwrap();
    assert!(!reply.applied && reply.changes.is_empty());

    // A bad file names the entry by position.
    let mut bad = wanted.into_vips();
    bad[1].ring_size = 8;
    let e = c
        .prepare_apply(ApplyRequest {
            vip: bad,
            dry_run: false,
        })
        .unwrap_err();
    assert_eq!(
        e.message,
        "vip[1].ring_size: 8 is not prime (the next prime is 11)"
    );
}

#[test]
fn flow_key_names_missing_things() {
    let dir = TempDir::new("flowkey");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let web: VipId = WEB.parse().unwrap();
    let (slot, _) = c.flow_key(&web, "10.1.0.1".parse().unwrap()).unwrap();
    assert!(
        c.reconciler
            .backend_slots(&web.key())
            .iter()
            .any(|(_, s, _)| *s == slot)
    );
    let e = c.flow_key(&web, "10.1.0.7".parse().unwrap()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = c
        .flow_key(
            &"10.0.0.5:80/tcp".parse().unwrap(),
            "10.1.0.1".parse().unwrap(),
        )
        .unwrap_err();
    assert_eq!(e.message, "vip[\"10.0.0.5:80/tcp\"]: no such VIP");
}

#[test]
fn room_after_names_the_quarantine_only_when_tables_wait_in_it() {
    let dir = TempDir::new("room");
    // Room for two 13-entry tables: the VIP's, and one more during a swap.
    let mut c = control(&dir, 26);
    seed(&mut c);
    assert_eq!(c.room_after(), None, "nothing replaced yet");
    run(
        &mut c,
        r#"{"changes":[{"op":"backend_drain","vip":"10.0.0.1:80/tcp","address":"10.1.0.2"}]}"#,
    )
    .unwrap();
    // The old table waits out its quarantine, so the next swap finds no room yet...
    let e = run(
        &mut c,
        r#"{"changes":[{"op":"backend_undrain","vip":"10.0.0.1:80/tcp","address":"10.1.0.2"}]}"#,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoRoom, "{e}");
    // ...and says how long until it will.
    assert_eq!(c.room_after(), Some(DEFAULT_QUARANTINE));
}

#[test]
fn failed_checks_take_a_backend_out_and_all_down_keeps_the_last_table() {
    let dir = TempDir::new("health");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let web: VipId = WEB.parse().unwrap();
    let key = web.key();
    let (b1, b2): (IpAddr, IpAddr) = ("10.1.0.1".parse().unwrap(), "10.1.0.2".parse().unwrap());
    let slot = |c: &Control<FakeDataPlane>, addr: IpAddr| {
        c.reconciler
            .backend_slots(&key)
            .into_iter()
            .find(|(a, _, _)| *a == addr)
            .map(|(_, s, v)| (s, v.state))
            .unwrap()
    };
    let named = |c: &Control<FakeDataPlane>| -> BTreeSet<u32> {
        c.dp().table_of(&key).unwrap().iter().copied().collect()
    };

    // One backend down: out of the table, its slot down (its flows re-hash).
    c.health.down.insert((web, b1));
    c.reconcile().unwrap();
    assert_eq!(slot(&c, b1).1, lb_common::keys::SLOT_DOWN);
    assert_eq!(named(&c), BTreeSet::from([slot(&c, b2).0]));
    assert!(c.all_down().is_empty());

    // Both down: the last table (b2 alone) stays, and the VIP is reported.
    c.health.down.insert((web, b2));
    c.reconcile().unwrap();
    assert_eq!(named(&c), BTreeSet::from([slot(&c, b2).0]));
    assert_eq!(slot(&c, b2).1, SLOT_ACTIVE);
    assert_eq!(c.all_down(), &BTreeSet::from([web]));
    let status = c
        .status_template(60, &BTreeMap::new())
        .fill(&crate::flows::Counts::default());
    assert!(status.vips[0].all_down);

    // b1 comes back: it alone takes new flows, and the VIP is no longer all down.
    c.health.down.remove(&(web, b1));
    c.reconcile().unwrap();
    assert_eq!(named(&c), BTreeSet::from([slot(&c, b1).0]));
    assert_eq!(slot(&c, b2).1, lb_common::keys::SLOT_DOWN);
    assert!(c.all_down().is_empty());
}

#[test]
fn a_change_that_changes_nothing_saves_and_writes_nothing() {
    let dir = TempDir::new("noop");
    let mut c = control(&dir, 64);
    seed(&mut c);
    let drain =
        r#"{"changes":[{"op":"backend_drain","vip":"10.0.0.1:80/tcp","address":"10.1.0.2"}]}"#;
    assert!(run(&mut c, drain).unwrap().applied);
    let file = fs::read(dir.0.join("state.toml")).unwrap();
    let ops = c.dp().ops.len();
    let again = run(&mut c, drain).unwrap();
    assert!(!again.applied);
    assert_eq!(again.changes.len(), 1);
    assert_eq!(c.dp().ops.len(), ops);
    assert_eq!(fs::read(dir.0.join("state.toml")).unwrap(), file);
}
