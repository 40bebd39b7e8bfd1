//! The agent's control logic, without a kernel: a request is checked whole (validation, then
//! room in the data plane), saved, and only then written to the data plane. A refused request
//! leaves the state, the state file and the data plane as they were.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::keys::{SLOT_ACTIVE, SLOT_DRAINING};

use crate::{
    api::{
        ApiError, ErrorKind,
        proto::{
            ApplyRequest, BackendState, BackendStatus, ChangeReply, ChangeRequest, HealthReport,
            StateReply, Status, VipStatus,
        },
    },
    change::{Change, apply_all, diff},
    config::Settings,
    dataplane::DataPlane,
    model::{BackendSpec, DesiredState, Encap, VipId},
    reconcile::{BackendPlan, Egress, ReconcileError, Reconciler, Tunnel, VipPlan},
    store::StateStore,
};

/// What health checks say, as planning needs it.
#[derive(Clone, Debug, Default)]
pub struct HealthView {
    /// Backends whose checks failed.
    pub down: BTreeSet<(VipId, IpAddr)>,
    /// Per VIP, the backends that last took new flows: kept in the table when every backend
    /// fails its checks, so a VIP never loses its table to checks alone.
    pub last_up: BTreeMap<VipId, BTreeSet<IpAddr>>,
}

/// Reconcile's input, and the VIPs whose every backend is down (kept on their last table).
#[derive(Debug)]
pub struct Planned {
    pub plans: Vec<VipPlan>,
    pub all_down: BTreeSet<VipId>,
}

/// Turns the desired state plus what is known of next hops and health into reconcile's input;
/// GUE VIPs tunnel to `gue_port` (`[settings]`).
pub fn plans(
    state: &DesiredState,
    gue_port: u16,
    egress: &BTreeMap<IpAddr, Egress>,
    health: &HealthView,
) -> Planned {
    let mut all_down = BTreeSet::new();
    let plans = state
        .vips
        .values()
        .map(|vip| {
            let takes_flows =
                |b: &BackendSpec| b.effective_weight() > 0 && egress.contains_key(&b.addr);
            let failed = |b: &BackendSpec| health.down.contains(&(vip.id, b.addr));
            let wanted: Vec<&BackendSpec> =
                vip.backends.iter().filter(|b| takes_flows(b)).collect();
            // Every candidate failed its checks: keep the ones that took flows last (if they
            // are still candidates) rather than leave the VIP without a table.
            let keep: BTreeSet<IpAddr> = if !wanted.is_empty() && wanted.iter().all(|b| failed(b)) {
                all_down.insert(vip.id);
                health.last_up.get(&vip.id).cloned().unwrap_or_default()
            } else {
                BTreeSet::new()
            };
            VipPlan {
                key: vip.id.key(),
                flags: vip.hash.vip_flags(),
                ring_size: vip.ring_size,
                tunnel: match vip.encap {
                    Encap::Ipip => Tunnel::Ipip,
                    Encap::Gue => Tunnel::Gue { port: gue_port },
                },
                backends: vip
                    .backends
                    .iter()
                    .map(|b| BackendPlan {
                        addr: b.addr,
                        weight: b.effective_weight(),
                        egress: egress.get(&b.addr).copied(),
                        healthy: !failed(b) || keep.contains(&b.addr),
                    })
                    .collect(),
            }
        })
        .collect();
    Planned { plans, all_down }
}

/// Per VIP, the backends a plan gives new flows.
fn taking_flows(plans: &[VipPlan], state: &DesiredState) -> BTreeMap<VipId, BTreeSet<IpAddr>> {
    state
        .vips
        .values()
        .zip(plans)
        .map(|(vip, plan)| {
            let up = plan
                .backends
                .iter()
                .filter(|b| b.healthy && b.weight > 0 && b.egress.is_some())
                .map(|b| b.addr)
                .collect();
            (vip.id, up)
        })
        .collect()
}

/// A validated request waiting for its new backends' next hops, then [`Control::commit`].
#[derive(Clone, Debug)]
pub struct Pending {
    state: DesiredState,
    changes: Vec<Change>,
    dry_run: bool,
}

impl Pending {
    /// Backend addresses of the new state.
    pub fn backend_addrs(&self) -> Vec<IpAddr> {
        self.state.backend_addrs()
    }

    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }
}

/// A status with every backend's flow count still to fill in (counting scans the flow table,
/// which is done off the agent's loop).
#[derive(Debug)]
pub struct StatusTemplate {
    pub status: Status,
    /// (vip index, backend index, slot and generation) of every installed backend.
    pub keys: Vec<(usize, usize, (u32, u32))>,
    /// Per VIP (in `status` order), the id its counters are kept under, when installed.
    pub vip_ids: Vec<Option<u32>>,
}

impl StatusTemplate {
    pub fn fill(mut self, counts: &crate::flows::Counts) -> Status {
        for (v, b, key) in self.keys {
            self.status.vips[v].backends[b].flows = counts.live.get(&key).copied().unwrap_or(0);
        }
        self.status
    }
}

/// Owner of the desired state, its saved copy and the data plane.
pub struct Control<D> {
    pub settings: Settings,
    state: DesiredState,
    store: StateStore,
    dp: D,
    reconciler: Reconciler,
    /// Next hops of backends, as last resolved.
    pub egress: BTreeMap<IpAddr, Egress>,
    /// Health-check results, as the agent last heard them.
    pub health: HealthView,
    /// VIPs whose every backend is down, kept on their last table.
    all_down: BTreeSet<VipId>,
    /// Each backend's forwarding state as last logged.
    transitions: transitions::Transitions,
}

impl<D: DataPlane> Control<D> {
    pub fn new(
        settings: Settings,
        state: DesiredState,
        store: StateStore,
        dp: D,
        reconciler: Reconciler,
        egress: BTreeMap<IpAddr, Egress>,
    ) -> Self {
        Self {
            settings,
            state,
            store,
            dp,
            reconciler,
            egress,
            health: HealthView::default(),
            all_down: BTreeSet::new(),
            transitions: transitions::Transitions::default(),
        }
    }

    /// VIPs whose every backend fails its checks (kept on their last table).
    pub fn all_down(&self) -> &BTreeSet<VipId> {
        &self.all_down
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub fn dp(&self) -> &D {
        &self.dp
    }

    pub fn dp_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Brings the data plane to the current state, next hops and health.
    pub fn reconcile(&mut self) -> Result<(), ReconcileError> {
        let planned = plans(
            &self.state,
            self.settings.gue_port,
            &self.egress,
            &self.health,
        );
        for vip in planned.all_down.difference(&self.all_down) {
            tracing::error!(vip = %vip, cause = "every backend fails its health checks", "VIP all down: keeping the last table");
        }
        for vip in self.all_down.difference(&planned.all_down) {
            tracing::info!(vip = %vip, cause = "a backend passes its health checks again", "VIP no longer all down");
        }
        self.all_down = planned.all_down;
        self.reconciler.apply(&mut self.dp, &planned.plans)?;
        let causes = transitions::causes(&self.state, &planned.plans);
        transitions::log(&self.transitions.update(causes));
        for (vip, up) in taking_flows(&planned.plans, &self.state) {
            if !up.is_empty() {
                self.health.last_up.insert(vip, up);
            }
        }
        self.health
            .last_up
            .retain(|vip, _| self.state.vips.contains_key(vip));
        Ok(())
    }

    pub fn state_reply(&self) -> StateReply {
        StateReply {
            settings: self.settings,
            vip: self.state.vips.values().cloned().collect(),
        }
    }

    /// Validates a list of changes against the current state.
    pub fn prepare_changes(&self, request: ChangeRequest) -> Result<Pending, ApiError> {
        if request.changes.is_empty() {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "changes: the list is empty",
            ));
        }
        let state = apply_all(&self.state, &request.changes).map_err(|e| {
            let mut e = ApiError::from(e);
            if request.changes.len() > 1 {
                e.message = format!("changes: {}", e.message);
            }
            e
        })?;
        Ok(Pending {
            state,
            changes: request.changes,
            dry_run: request.dry_run,
        })
    }

    /// Validates a whole wanted VIP list and computes the diff to it.
    pub fn prepare_apply(&self, request: ApplyRequest) -> Result<Pending, ApiError> {
        let wanted = DesiredState::from_vips(request.vip)?;
        let changes = diff(&self.state, &wanted);
        // The diff reaches `wanted` up to backend order; keep the order the file gives.
        apply_all(&self.state, &changes).map_err(|e| {
            ApiError::new(
                ErrorKind::Internal,
                format!("the computed diff does not apply: {e}"),
            )
        })?;
        Ok(Pending {
            state: wanted,
            changes,
            dry_run: request.dry_run,
        })
    }

    /// When a change refused for lack of room ([`ErrorKind::NoRoom`]) may fit: slots or table
    /// regions in quarantine are free after it (a burst of changes can outrun the quarantine
    /// of the tables it replaces).
    pub fn room_after(&self) -> Option<std::time::Duration> {
        self.reconciler
            .room_in_quarantine()
            .then(|| self.reconciler.quarantine())
    }

    /// Checks the configured limits and room in the data plane, saves, then writes the data
    /// plane. A dry run, or an empty change, stops after the checks. A failed save (disk full,
    /// read-only folder) stops the change before the data plane sees it.
    pub fn commit(&mut self, pending: Pending) -> Result<ChangeReply, ApiError> {
        // Draining a drained backend, say: nothing to save or write.
        if pending.state == self.state {
            return Ok(ChangeReply {
                applied: false,
                changes: pending.changes,
            });
        }
        self.settings
            .limits()
            .check_change(&self.state, &pending.state)
            .map_err(ApiError::from)?;
        self.reconciler
            .check(
                &plans(
                    &pending.state,
                    self.settings.gue_port,
                    &self.egress,
                    &self.health,
                )
                .plans,
            )
            .map_err(ApiError::from)?;
        if pending.dry_run || pending.changes.is_empty() {
            return Ok(ChangeReply {
                applied: false,
                changes: pending.changes,
            });
        }
        self.store
            .save(&pending.state)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.state = pending.state;
        if let Err(e) = self.reconcile() {
            // Saved and accepted: the agent's loop retries until the data plane matches.
            return Err(ApiError::new(
                ErrorKind::Internal,
                format!("change saved, but writing the data plane failed (lbd retries): {e}"),
            ));
        }
        Ok(ChangeReply {
            applied: true,
            changes: pending.changes,
        })
    }

    /// The slot and generation flows of this backend carry.
    pub fn flow_key(&self, vip: &VipId, addr: IpAddr) -> Result<(u32, u32), ApiError> {
        let spec = self.state.vip(vip).ok_or_else(|| {
            ApiError::new(ErrorKind::NotFound, format!("vip[\"{vip}\"]: no such VIP"))
        })?;
        let no_backend = || {
            ApiError::new(
                ErrorKind::NotFound,
                format!("vip[\"{vip}\"].backends[\"{addr}\"]: no such backend"),
            )
        };
        spec.backend(addr).ok_or_else(no_backend)?;
        self.reconciler
            .backend_slots(&vip.key())
            .into_iter()
            .find(|(a, _, _)| *a == addr)
            .map(|(_, slot, value)| (slot, value.generation))
            // Wanted but not installed (yet): no flow can be on it.
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!(
                        "vip[\"{vip}\"].backends[\"{addr}\"]: not installed in the data plane yet"
                    ),
                )
            })
    }

    /// The backend slot of an installed backend (health checks through the tunnel mark their
    /// packets with it).
    pub fn slot_of(&self, vip: &VipId, addr: IpAddr) -> Option<u32> {
        self.reconciler
            .backend_slots(&vip.key())
            .into_iter()
            .find(|(a, _, _)| *a == addr)
            .map(|(_, slot, _)| slot)
    }

    /// Everything of `lbctl status` but the flow counts; `health` has the checked backends'.
    pub fn status_template(
        &self,
        idle_timeout_secs: u64,
        health: &BTreeMap<(VipId, IpAddr), HealthReport>,
    ) -> StatusTemplate {
        let mut keys = Vec::new();
        let mut vip_ids = Vec::new();
        let vips = self
            .state
            .vips
            .values()
            .enumerate()
            .map(|(v, spec)| {
                let installed = self.reconciler.backend_slots(&spec.id.key());
                vip_ids.push(self.reconciler.vip_id(&spec.id.key()));
                let backends = spec
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(b, backend)| {
                        let slot = installed.iter().find(|(a, _, _)| *a == backend.addr);
                        let state = match slot.map(|(_, _, value)| value.state) {
                            Some(SLOT_ACTIVE) => BackendState::Active,
                            Some(SLOT_DRAINING) => BackendState::Draining,
                            _ => BackendState::Down,
                        };
                        if let Some((_, index, value)) = slot {
                            keys.push((v, b, (*index, value.generation)));
                        }
                        BackendStatus {
                            address: backend.addr,
                            weight: backend.weight,
                            drain: backend.drain,
                            state,
                            flows: 0,
                            health: health.get(&(spec.id, backend.addr)).cloned(),
                        }
                    })
                    .collect();
                VipStatus {
                    vip: spec.id,
                    ring_size: spec.ring_size,
                    hash: spec.hash,
                    encap: spec.encap,
                    all_down: self.all_down.contains(&spec.id),
                    backends,
                }
            })
            .collect();
        StatusTemplate {
            status: Status {
                idle_timeout_secs,
                vips,
            },
            keys,
            vip_ids,
        }
    }
}

#[cfg(test)]
mod tests;
pub mod transitions;

/// The operator's limits (`[settings]` `max_*`) through the control path: a change or apply
/// past one is refused with the setting named, and leaves state, file and data plane alone.
#[cfg(test)]
mod limit_tests {
    use std::{fs, path::PathBuf};

    use super::*;
    use crate::{dataplane::fake::FakeDataPlane, reconcile::DEFAULT_QUARANTINE};

    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            // Best effort: a leftover temp folder must not hide the result.
            fs::remove_dir_all(&self.0).ok();
        }
    }

    fn limited(dir: &TempDir) -> Control<FakeDataPlane> {
        let dp = FakeDataPlane::new(1024);
        let reconciler = Reconciler::adopt(&dp, DEFAULT_QUARANTINE).unwrap();
        let egress = Egress {
            ifindex: 2,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
        };
        let settings = Settings {
            max_vips: 2,
            max_backends: 3,
            max_backends_per_vip: 2,
            ..Settings::default()
        };
        Control::new(
            settings,
            DesiredState::default(),
            StateStore::new(dir.0.join("state.toml")),
            dp,
            reconciler,
            (1..=9)
                .map(|i| (IpAddr::from([10, 1, 0, i]), egress))
                .collect(),
        )
    }

    fn change(c: &mut Control<FakeDataPlane>, json: &str) -> Result<ChangeReply, ApiError> {
        let pending = c.prepare_changes(serde_json::from_str(json).unwrap())?;
        c.commit(pending)
    }

    fn apply(c: &mut Control<FakeDataPlane>, toml: &str) -> Result<ChangeReply, ApiError> {
        let vip = crate::config::parse_state(toml).unwrap().into_vips();
        let pending = c.prepare_apply(ApplyRequest {
            vip,
            dry_run: false,
        })?;
        c.commit(pending)
    }

    #[test]
    fn changes_past_a_limit_are_refused_and_change_nothing() {
        let dir =
            TempDir(std::env::temp_dir().join(format!("lb-control-limits-{}", std::process::id())));
        fs::create_dir_all(&dir.0).unwrap();
        let mut c = limited(&dir);
        change(
            &mut c,
            r#"{"changes":[{"op":"vip_add","vip":"10.0.0.1:80/tcp","ring_size":7},
                {"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.1"},
                {"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.2"},
                {"op":"vip_add","vip":"10.0.0.2:80/tcp","ring_size":7}]}"#,
        )
        .unwrap();
        let file = fs::read(dir.0.join("state.toml")).unwrap();
        let state = c.state().clone();
        let ops = c.dp().ops.len();
        let vips3 = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 7\n\
                     [[vip]]\naddress = \"10.0.0.2:80/tcp\"\nring_size = 7\n\
                     [[vip]]\naddress = \"10.0.0.3:80/tcp\"\nring_size = 7\n";
        let per_vip = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 7\nbackends = [\
                       { address = \"10.1.0.1\" }, { address = \"10.1.0.2\" }, \
                       { address = \"10.1.0.3\" }]\n";
        let refusals = [
            (
                change(
                    &mut c,
                    r#"{"changes":[{"op":"vip_add","vip":"10.0.0.3:80/tcp","ring_size":7}]}"#,
                ),
                "vip: 3 VIPs exceed the limit of 2 (settings.max_vips)",
            ),
            (
                change(
                    &mut c,
                    r#"{"changes":[{"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.3"}]}"#,
                ),
                "vip[\"10.0.0.1:80/tcp\"].backends: 3 backends exceed the limit of 2 per VIP \
                 (settings.max_backends_per_vip)",
            ),
            (
                change(
                    &mut c,
                    r#"{"dry_run":true,"changes":[
                        {"op":"backend_add","vip":"10.0.0.2:80/tcp","address":"10.1.0.3"},
                        {"op":"backend_add","vip":"10.0.0.2:80/tcp","address":"10.1.0.4"}]}"#,
                ),
                "backends: 4 backends over all VIPs exceed the limit of 3 (settings.max_backends)",
            ),
            (
                apply(&mut c, vips3),
                "vip: 3 VIPs exceed the limit of 2 (settings.max_vips)",
            ),
            (apply(&mut c, per_vip), "(settings.max_backends_per_vip)"),
        ];
        for (result, want) in refusals {
            let e = result.unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
            assert!(e.message.contains(want), "got {e}\nwant {want}");
        }
        assert_eq!(c.state(), &state);
        assert_eq!(fs::read(dir.0.join("state.toml")).unwrap(), file);
        assert_eq!(c.dp().ops.len(), ops, "the data plane was written");
        // Within the limits: accepted.
        change(
            &mut c,
            r#"{"changes":[{"op":"backend_add","vip":"10.0.0.2:80/tcp","address":"10.1.0.3"}]}"#,
        )
        .unwrap();
        assert_eq!(c.state().backend_count(), 3);
    }
}
