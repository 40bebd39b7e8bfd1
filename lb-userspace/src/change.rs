//! Changes to the desired state: what a control request asks for, what `lbctl apply` prints as a
//! diff, and how a list of them is applied all or nothing.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::check::{CheckKind, CheckSpec};
use crate::model::{
    BackendSpec, DEFAULT_RING_SIZE, DEFAULT_WEIGHT, DesiredState, Encap, HashMode, ModelError,
    VipId, VipSpec,
};

/// One edit of the desired state. Serialized with an `op` tag, e.g.
/// `{"op": "backend_add", "vip": "10.0.0.1:80/tcp", "address": "10.1.0.1", "weight": 50}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// A new VIP without backends.
    VipAdd {
        vip: VipId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ring_size: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash: Option<HashMode>,
        /// IPIP when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encap: Option<Encap>,
        /// The default check of its backends.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSpec>,
    },
    /// Sets (or with `None` clears) a VIP's default check.
    VipCheck {
        vip: VipId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSpec>,
    },
    /// Sets (or with `None` clears, so the VIP's applies) a backend's own check.
    BackendCheck {
        vip: VipId,
        address: IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSpec>,
    },
    /// New table size, hash mode and (when given) encapsulation for an existing VIP. A new
    /// encapsulation rewrites the VIP's backend slots in place: established flows keep their
    /// backends.
    VipSet {
        vip: VipId,
        ring_size: u32,
        hash: HashMode,
        /// Unchanged when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encap: Option<Encap>,
    },
    VipDel {
        vip: VipId,
    },
    BackendAdd {
        vip: VipId,
        address: IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<CheckSpec>,
    },
    BackendDel {
        vip: VipId,
        address: IpAddr,
    },
    BackendWeight {
        vip: VipId,
        address: IpAddr,
        weight: u32,
    },
    BackendDrain {
        vip: VipId,
        address: IpAddr,
    },
    BackendUndrain {
        vip: VipId,
        address: IpAddr,
    },
}

impl Change {
    /// Applies this change to `state`; on error `state` is unchanged.
    pub fn apply(&self, state: &mut DesiredState) -> Result<(), ModelError> {
        match self.clone() {
            Change::VipAdd {
                vip,
                ring_size,
                hash,
                encap,
                check,
            } => state.add_vip(VipSpec {
                ring_size: ring_size.unwrap_or(DEFAULT_RING_SIZE),
                hash: hash.unwrap_or_default(),
                encap: encap.unwrap_or_default(),
                check,
                ..VipSpec::new(vip)
            }),
            Change::VipCheck { vip, check } => state.set_check(&vip, None, check),
            Change::BackendCheck {
                vip,
                address,
                check,
            } => state.set_check(&vip, Some(address), check),
            Change::VipSet {
                vip,
                ring_size,
                hash,
                encap,
            } => state
                .set_vip_options(&vip, ring_size, hash, encap)
                .map(drop),
            Change::VipDel { vip } => state.del_vip(&vip).map(drop),
            Change::BackendAdd {
                vip,
                address,
                weight,
                check,
            } => state.add_backend(
                &vip,
                BackendSpec {
                    check,
                    ..BackendSpec::new(address, weight.unwrap_or(DEFAULT_WEIGHT))
                },
            ),
            Change::BackendDel { vip, address } => state.del_backend(&vip, address).map(drop),
            Change::BackendWeight {
                vip,
                address,
                weight,
            } => state.set_weight(&vip, address, weight).map(drop),
            Change::BackendDrain { vip, address } => state.set_drain(&vip, address, true).map(drop),
            Change::BackendUndrain { vip, address } => {
                state.set_drain(&vip, address, false).map(drop)
            }
        }
    }

    /// The VIP this change is about.
    pub fn vip(&self) -> VipId {
        match *self {
            Change::VipAdd { vip, .. }
            | Change::VipCheck { vip, .. }
            | Change::BackendCheck { vip, .. }
            | Change::VipSet { vip, .. }
            | Change::VipDel { vip }
            | Change::BackendAdd { vip, .. }
            | Change::BackendDel { vip, .. }
            | Change::BackendWeight { vip, .. }
            | Change::BackendDrain { vip, .. }
            | Change::BackendUndrain { vip, .. } => vip,
        }
    }
}

/// Diff notation: `+` adds, `-` removes, `~` modifies.
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::VipAdd {
                vip,
                ring_size,
                hash,
                encap,
                check,
            } => {
                write!(
                    f,
                    "+ vip {vip} ring_size {} hash {}",
                    ring_size.unwrap_or(DEFAULT_RING_SIZE),
                    hash.unwrap_or_default()
                )?;
                // The default (IPIP) is left out, as for every VIP before GUE existed.
                if let Some(e) = encap.filter(|e| *e != Encap::Ipip) {
                    write!(f, " encap {e}")?;
                }
                write_check(f, check.as_ref())
            }
            Change::VipCheck { vip, check } => {
                write!(f, "~ vip {vip}")?;
                write_check(f, check.as_ref()).and_then(|()| cleared(f, check.as_ref()))
            }
            Change::BackendCheck {
                vip,
                address,
                check,
            } => {
                write!(f, "~ backend {vip} {address}")?;
                write_check(f, check.as_ref()).and_then(|()| cleared(f, check.as_ref()))
            }
            Change::VipSet {
                vip,
                ring_size,
                hash,
                encap,
            } => {
                write!(f, "~ vip {vip} ring_size {ring_size} hash {hash}")?;
                match encap {
                    Some(e) => write!(f, " encap {e}"),
                    None => Ok(()),
                }
            }
            Change::VipDel { vip } => write!(f, "- vip {vip}"),
            Change::BackendAdd {
                vip,
                address,
                weight,
                check,
            } => {
                write!(
                    f,
                    "+ backend {vip} {address} weight {}",
                    weight.unwrap_or(DEFAULT_WEIGHT)
                )?;
                write_check(f, check.as_ref())
            }
            Change::BackendDel { vip, address } => write!(f, "- backend {vip} {address}"),
            Change::BackendWeight {
                vip,
                address,
                weight,
            } => write!(f, "~ backend {vip} {address} weight {weight}"),
            Change::BackendDrain { vip, address } => write!(f, "~ backend {vip} {address} drain"),
            Change::BackendUndrain { vip, address } => {
                write!(f, "~ backend {vip} {address} undrain")
            }
        }
    }
}

/// ` check KIND every INTERVAL ...`, when there is a check.
fn write_check(f: &mut fmt::Formatter<'_>, check: Option<&CheckSpec>) -> fmt::Result {
    let Some(c) = check else { return Ok(()) };
    write!(
        f,
        " check {} interval {} timeout {} rise {} fall {}",
        c.kind, c.interval, c.timeout, c.rise, c.fall
    )?;
    if let Some(port) = c.port {
        write!(f, " port {port}")?;
    }
    if matches!(c.kind, CheckKind::Http { .. }) {
        write!(f, " status {}", c.status)?;
        if let Some(host) = &c.host {
            write!(f, " host {host}")?;
        }
    }
    if c.via_tunnel {
        f.write_str(" via-tunnel")?;
    }
    Ok(())
}

fn cleared(f: &mut fmt::Formatter<'_>, check: Option<&CheckSpec>) -> fmt::Result {
    if check.is_none() {
        f.write_str(" check cleared")?;
    }
    Ok(())
}

/// Applies `changes` in order to a copy of `state`: the new state, or the first refusal (with
/// its position when there are several) and `state` untouched.
pub fn apply_all(state: &DesiredState, changes: &[Change]) -> Result<DesiredState, ModelError> {
    let mut next = state.clone();
    for change in changes {
        change.apply(&mut next)?;
    }
    Ok(next)
}

/// The changes that turn `from` into `to` (up to the order of backends, which no table depends
/// on): removals first, so a VIP or backend moving between limits never overshoots them.
pub fn diff(from: &DesiredState, to: &DesiredState) -> Vec<Change> {
    let mut removals = Vec::new();
    let mut rest = Vec::new();
    for (id, old) in &from.vips {
        if !to.vips.contains_key(id) {
            removals.push(Change::VipDel { vip: *id });
        }
        let Some(new) = to.vips.get(id) else { continue };
        for b in &old.backends {
            if new.backend(b.addr).is_none() {
                removals.push(Change::BackendDel {
                    vip: *id,
                    address: b.addr,
                });
            }
        }
        if old.check != new.check {
            rest.push(Change::VipCheck {
                vip: *id,
                check: new.check.clone(),
            });
        }
        if (old.ring_size, old.hash, old.encap) != (new.ring_size, new.hash, new.encap) {
            rest.push(Change::VipSet {
                vip: *id,
                ring_size: new.ring_size,
                hash: new.hash,
                encap: Some(new.encap),
            });
        }
        for b in &new.backends {
            match old.backend(b.addr) {
                Some(o) => backend_edits(*id, o, b, &mut rest),
                None => backend_adds(*id, b, &mut rest),
            }
        }
    }
    for (id, new) in &to.vips {
        if from.vips.contains_key(id) {
            continue;
        }
        rest.push(Change::VipAdd {
            vip: *id,
            ring_size: Some(new.ring_size),
            hash: Some(new.hash),
            encap: Some(new.encap),
            check: new.check.clone(),
        });
        for b in &new.backends {
            backend_adds(*id, b, &mut rest);
        }
    }
    removals.extend(rest);
    removals
}

fn backend_adds(vip: VipId, b: &BackendSpec, out: &mut Vec<Change>) {
    out.push(Change::BackendAdd {
        vip,
        address: b.addr,
        weight: Some(b.weight),
        check: b.check.clone(),
    });
    if b.drain {
        out.push(Change::BackendDrain {
            vip,
            address: b.addr,
        });
    }
}

fn backend_edits(vip: VipId, old: &BackendSpec, new: &BackendSpec, out: &mut Vec<Change>) {
    let address = new.addr;
    if old.weight != new.weight {
        out.push(Change::BackendWeight {
            vip,
            address,
            weight: new.weight,
        });
    }
    if old.check != new.check {
        out.push(Change::BackendCheck {
            vip,
            address,
            check: new.check.clone(),
        });
    }
    match (old.drain, new.drain) {
        (false, true) => out.push(Change::BackendDrain { vip, address }),
        (true, false) => out.push(Change::BackendUndrain { vip, address }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(text: &str) -> DesiredState {
        crate::config::parse_config(text).unwrap().state
    }

    /// Equal up to backend order.
    fn normalized(mut s: DesiredState) -> DesiredState {
        for v in s.vips.values_mut() {
            v.backends.sort_by_key(|b| b.addr);
        }
        s
    }

    const A: &str = r#"
[[vip]]
address = "10.0.0.1:80/tcp"
backends = [{ address = "10.1.0.1" }, { address = "10.1.0.2", weight = 5 }, { address = "10.1.0.3", drain = true }]
[[vip]]
address = "10.0.0.2:53/udp"
backends = [{ address = "10.1.0.1" }]
"#;

    const B: &str = r#"
[[vip]]
address = "10.0.0.1:80/tcp"
ring_size = 251
backends = [{ address = "10.1.0.4", drain = true }, { address = "10.1.0.2", weight = 7, drain = true }, { address = "10.1.0.3" }]
[[vip]]
address = "10.0.0.3:443/tcp"
hash = "src-ip"
backends = [{ address = "10.1.0.9", weight = 0 }]
"#;

    #[test]
    fn diff_then_apply_reaches_the_target() {
        for (from, to) in [(A, B), (B, A), (A, A), ("", A), (B, "")] {
            let (from, to) = (state(from), state(to));
            let changes = diff(&from, &to);
            let reached = apply_all(&from, &changes).unwrap();
            assert_eq!(normalized(reached), normalized(to.clone()), "{changes:#?}");
            if from == to {
                assert!(changes.is_empty());
            }
        }
    }

    #[test]
    fn diff_lists_removals_first_and_reads_well() {
        let lines: Vec<String> = diff(&state(A), &state(B))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "- backend 10.0.0.1:80/tcp 10.1.0.1",
                "- vip 10.0.0.2:53/udp",
                "~ vip 10.0.0.1:80/tcp ring_size 251 hash 5tuple encap ipip",
                "+ backend 10.0.0.1:80/tcp 10.1.0.4 weight 100",
                "~ backend 10.0.0.1:80/tcp 10.1.0.4 drain",
                "~ backend 10.0.0.1:80/tcp 10.1.0.2 weight 7",
                "~ backend 10.0.0.1:80/tcp 10.1.0.2 drain",
                "~ backend 10.0.0.1:80/tcp 10.1.0.3 undrain",
                "+ vip 10.0.0.3:443/tcp ring_size 65537 hash src-ip",
                "+ backend 10.0.0.3:443/tcp 10.1.0.9 weight 0",
            ]
        );
    }

    /// An encapsulation change is a VIP change of its own (backends untouched), and a VIP
    /// added with GUE says so; IPv6 VIPs and mixed families diff like any other.
    #[test]
    fn encap_changes_diff_and_apply() {
        let ipip = state(
            "[[vip]]\naddress = \"[2001:db8::1]:443/tcp\"\nbackends = [{ address = \"10.1.0.1\" }]",
        );
        let gue = state(
            "[[vip]]\naddress = \"[2001:db8::1]:443/tcp\"\nencap = \"gue\"\nbackends = [{ address = \"10.1.0.1\" }]",
        );
        let changes = diff(&ipip, &gue);
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            ["~ vip [2001:db8::1]:443/tcp ring_size 65537 hash 5tuple encap gue"]
        );
        assert_eq!(apply_all(&ipip, &changes).unwrap(), gue);
        assert_eq!(apply_all(&gue, &diff(&gue, &ipip)).unwrap(), ipip);
        let lines: Vec<String> = diff(&DesiredState::default(), &gue)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines[0],
            "+ vip [2001:db8::1]:443/tcp ring_size 65537 hash 5tuple encap gue"
        );
        // A vip_set without encap keeps it.
        let vip: VipId = "[2001:db8::1]:443/tcp".parse().unwrap();
        let keep: Change = serde_json::from_str(
            r#"{"op":"vip_set","vip":"[2001:db8::1]:443/tcp","ring_size":251,"hash":"5tuple"}"#,
        )
        .unwrap();
        let kept = apply_all(&gue, &[keep]).unwrap();
        assert_eq!(kept.vip(&vip).unwrap().encap, Encap::Gue);
        assert_eq!(kept.vip(&vip).unwrap().ring_size, 251);
        let add: Change =
            serde_json::from_str(r#"{"op":"vip_add","vip":"[2001:db8::2]:80/udp","encap":"gue"}"#)
                .unwrap();
        let added = apply_all(&DesiredState::default(), &[add]).unwrap();
        let v2: VipId = "[2001:db8::2]:80/udp".parse().unwrap();
        assert_eq!(added.vip(&v2).unwrap().encap, Encap::Gue);
        let e = serde_json::from_str::<Change>(
            r#"{"op":"vip_add","vip":"10.0.0.1:80/udp","encap":"vxlan"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `vxlan`"), "{e}");
    }

    #[test]
    fn a_refused_list_changes_nothing_and_names_the_field() {
        let a = state(A);
        let vip: VipId = "10.0.0.1:80/tcp".parse().unwrap();
        let changes = [
            Change::BackendWeight {
                vip,
                address: "10.1.0.1".parse().unwrap(),
                weight: 1,
            },
            Change::BackendWeight {
                vip,
                address: "10.1.0.2".parse().unwrap(),
                weight: 65_536,
            },
        ];
        let e = apply_all(&a, &changes).unwrap_err().to_string();
        assert_eq!(
            e,
            "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.2\"].weight: 65536 is out of range 0..=65535"
        );
        assert_eq!(a, state(A));
    }

    #[test]
    fn json_form() {
        let c: Change = serde_json::from_str(
            r#"{"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.1","weight":5}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Change::BackendAdd {
                vip: "10.0.0.1:80/tcp".parse().unwrap(),
                address: "10.1.0.1".parse().unwrap(),
                weight: Some(5),
                check: None,
            }
        );
        assert_eq!(
            serde_json::from_str::<Change>(&serde_json::to_string(&c).unwrap()).unwrap(),
            c
        );
        for (bad, why) in [
            (
                r#"{"op":"vip_add","vip":"10.0.0.1:80/tcp","port":1}"#,
                "unknown field `port`",
            ),
            (
                r#"{"op":"vip_frob","vip":"10.0.0.1:80/tcp"}"#,
                "unknown variant `vip_frob`",
            ),
            (
                r#"{"op":"vip_del","vip":"10.0.0.1:80/sctp"}"#,
                "the protocol must be",
            ),
            (
                r#"{"op":"backend_del","vip":"10.0.0.1:80/tcp","address":"10.1.0"}"#,
                "invalid IP address syntax",
            ),
            (
                r#"{"op":"backend_weight","vip":"10.0.0.1:80/tcp","address":"10.1.0.1","weight":-1}"#,
                "invalid value: integer `-1`",
            ),
        ] {
            let e = serde_json::from_str::<Change>(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
