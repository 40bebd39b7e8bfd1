//! lbctl's text output: tables, summaries and drain progress lines, kept apart from the I/O so
//! their format is tested.

use std::{fmt::Write as _, net::IpAddr};

use lb_userspace::{
    api::proto::{ChangeReply, FlowProgress, Status},
    model::{VipId, VipSpec},
};

/// `1 flow`, `2 flows`.
pub fn plural(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `lbctl status`: one row per backend, and one per VIP without backends.
pub fn status_table(status: &Status) -> String {
    if status.vips.is_empty() {
        return "no VIPs\n".to_owned();
    }
    let mut rows = Vec::new();
    for vip in &status.vips {
        if vip.backends.is_empty() {
            rows.push(vec![
                vip.vip.to_string(),
                vip.encap.to_string(),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
            ]);
        }
        for b in &vip.backends {
            let (health, last) = b.health.as_ref().map_or_else(
                || (dash(), dash()),
                |h| {
                    let state = if h.up { "up" } else { "down" };
                    let last = match (&h.last, h.last_latency_us) {
                        (Some(last), Some(us)) if last == "ok" => {
                            format!("ok {:.1}ms", us as f64 / 1e3)
                        }
                        (Some(last), _) => last.clone(),
                        (None, _) => "not yet checked".to_owned(),
                    };
                    (format!("{state} {}", since(h.since_secs)), last)
                },
            );
            rows.push(vec![
                vip.vip.to_string(),
                vip.encap.to_string(),
                b.address.to_string(),
                b.weight.to_string(),
                b.state.to_string(),
                b.flows.to_string(),
                health,
                last,
            ]);
        }
    }
    let mut out = table(
        &[
            ("VIP", Align::Left),
            ("ENCAP", Align::Left),
            ("BACKEND", Align::Left),
            ("WEIGHT", Align::Right),
            ("STATE", Align::Left),
            ("FLOWS", Align::Right),
            ("HEALTH", Align::Left),
            ("LAST CHECK", Align::Left),
        ],
        &rows,
    );
    out.push_str(&all_down_warnings(
        status.vips.iter().filter(|v| v.all_down).map(|v| v.vip),
    ));
    out
}

/// One warning line per VIP whose backends all fail their health checks (`status`, `stats`).
pub fn all_down_warnings(vips: impl Iterator<Item = VipId>) -> String {
    let mut out = String::new();
    for vip in vips {
        let _ = writeln!(
            out,
            "warning: every backend of {vip} fails its health checks; it keeps its last table"
        );
    }
    out
}

/// `75` -> `1m15s`.
fn since(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

/// `lbctl vip list`: one row per VIP.
pub fn vip_list(vips: &[VipSpec]) -> String {
    if vips.is_empty() {
        return "no VIPs\n".to_owned();
    }
    let rows: Vec<Vec<String>> = vips
        .iter()
        .map(|v| {
            vec![
                v.id.to_string(),
                v.ring_size.to_string(),
                v.hash.to_string(),
                v.encap.to_string(),
                v.backends.len().to_string(),
            ]
        })
        .collect();
    table(
        &[
            ("VIP", Align::Left),
            ("RING_SIZE", Align::Right),
            ("HASH", Align::Left),
            ("ENCAP", Align::Left),
            ("BACKENDS", Align::Right),
        ],
        &rows,
    )
}

/// `lbctl apply`: the diff, one change per line, then what became of it.
pub fn apply_report(reply: &ChangeReply, dry_run: bool) -> String {
    let mut out = String::new();
    for change in &reply.changes {
        writeln!(out, "{change}").expect("writing to a String");
    }
    let n = plural(reply.changes.len() as u64, "change");
    let summary = if reply.changes.is_empty() {
        "no changes".to_owned()
    } else if dry_run {
        format!("dry run: {n} not applied")
    } else if reply.applied {
        format!("applied {n}")
    } else {
        format!("{n} not applied")
    };
    out.push_str(&summary);
    out.push('\n');
    out
}

/// The lines `lbctl backend drain --wait` prints: the count when it changes (and the first),
/// then `drained`. An error line prints its count if new; the caller reports the error.
#[derive(Debug)]
pub struct DrainProgress {
    addr: IpAddr,
    shown: Option<u64>,
}

impl DrainProgress {
    pub fn new(addr: IpAddr) -> Self {
        Self { addr, shown: None }
    }

    /// The line for this report, if it says something new.
    pub fn line(&mut self, p: &FlowProgress) -> Option<String> {
        if p.done {
            return Some(format!("{}: drained", self.addr));
        }
        if self.shown == Some(p.flows) {
            return None;
        }
        self.shown = Some(p.flows);
        Some(format!("{}: {}", self.addr, plural(p.flows, "flow")))
    }
}

fn dash() -> String {
    "-".to_owned()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Columns two spaces apart, each as wide as its widest cell; no trailing spaces.
pub fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(h, _)| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, &width), (_, align))) in row.iter().zip(&widths).zip(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            match align {
                Align::Left => write!(line, "{cell:<width$}"),
                Align::Right => write!(line, "{cell:>width$}"),
            }
            .expect("writing to a String");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_userspace::{
        api::proto::{BackendState, BackendStatus, HealthReport, VipStatus},
        change::Change,
        model::{BackendSpec, HashMode},
    };

    use lb_userspace::model::Encap;

    use super::*;

    fn backend(addr: &str, weight: u32, state: BackendState, flows: u64) -> BackendStatus {
        BackendStatus {
            address: addr.parse().unwrap(),
            weight,
            drain: state == BackendState::Draining,
            state,
            flows,
            health: None,
        }
    }

    #[test]
    fn status_is_an_aligned_table() {
        let status = Status {
            idle_timeout_secs: 60,
            vips: vec![
                VipStatus {
                    vip: "10.0.0.1:80/tcp".parse().unwrap(),
                    ring_size: 65_537,
                    hash: HashMode::FiveTuple,
                    encap: Encap::Ipip,
                    all_down: false,
                    backends: vec![
                        BackendStatus {
                            health: Some(HealthReport {
                                check: "tcp every 2s".into(),
                                up: true,
                                since_secs: 75,
                                last: Some("ok".into()),
                                last_latency_us: Some(420),
                            }),
                            ..backend("10.1.0.1", 100, BackendState::Active, 12_345)
                        },
                        backend("10.1.0.22", 5, BackendState::Draining, 3),
                        BackendStatus {
                            health: Some(HealthReport {
                                check: "http:/healthz every 1s".into(),
                                up: false,
                                since_secs: 4,
                                last: Some("HTTP 500 (expected 200-399)".into()),
                                last_latency_us: Some(900),
                            }),
                            ..backend("10.1.0.3", 100, BackendState::Down, 0)
                        },
                    ],
                },
                VipStatus {
                    vip: "[2001:db8::53]:53/udp".parse().unwrap(),
                    ring_size: 251,
                    hash: HashMode::SrcIp,
                    encap: Encap::Gue,
                    all_down: true,
                    backends: vec![],
                },
            ],
        };
        assert_eq!(
            status_table(&status),
            "\
VIP                    ENCAP  BACKEND    WEIGHT  STATE     FLOWS  HEALTH    LAST CHECK
10.0.0.1:80/tcp        ipip   10.1.0.1      100  active    12345  up 1m15s  ok 0.4ms
10.0.0.1:80/tcp        ipip   10.1.0.22       5  draining      3  -         -
10.0.0.1:80/tcp        ipip   10.1.0.3      100  down          0  down 4s   HTTP 500 (expected 200-399)
[2001:db8::53]:53/udp  gue    -               -  -             -  -         -
warning: every backend of [2001:db8::53]:53/udp fails its health checks; it keeps its last table
"
        );
        let empty = Status {
            idle_timeout_secs: 60,
            vips: vec![],
        };
        assert_eq!(status_table(&empty), "no VIPs\n");
    }

    #[test]
    fn vip_list_is_one_row_per_vip() {
        let mut web = VipSpec::new("10.0.0.1:80/tcp".parse().unwrap());
        web.backends = vec![
            BackendSpec::new("10.1.0.1".parse().unwrap(), 1),
            BackendSpec::new("10.1.0.2".parse().unwrap(), 1),
        ];
        let dns = VipSpec {
            ring_size: 251,
            hash: HashMode::SrcIp,
            encap: Encap::Gue,
            ..VipSpec::new("[2001:db8::53]:53/udp".parse().unwrap())
        };
        assert_eq!(
            vip_list(&[web, dns]),
            "\
VIP                    RING_SIZE  HASH    ENCAP  BACKENDS
10.0.0.1:80/tcp            65537  5tuple  ipip          2
[2001:db8::53]:53/udp        251  src-ip  gue           0
"
        );
        assert_eq!(vip_list(&[]), "no VIPs\n");
    }

    #[test]
    fn apply_reports() {
        let vip = "10.0.0.1:80/tcp".parse().unwrap();
        let changes = vec![
            Change::VipDel { vip },
            Change::BackendWeight {
                vip,
                address: "10.1.0.1".parse().unwrap(),
                weight: 50,
            },
        ];
        let applied = ChangeReply {
            applied: true,
            changes: changes.clone(),
        };
        assert_eq!(
            apply_report(&applied, false),
            "- vip 10.0.0.1:80/tcp\n~ backend 10.0.0.1:80/tcp 10.1.0.1 weight 50\napplied 2 changes\n"
        );
        let dry = ChangeReply {
            applied: false,
            changes: changes[..1].to_vec(),
        };
        assert_eq!(
            apply_report(&dry, true),
            "- vip 10.0.0.1:80/tcp\ndry run: 1 change not applied\n"
        );
        let none = ChangeReply {
            applied: false,
            changes: vec![],
        };
        assert_eq!(apply_report(&none, false), "no changes\n");
        assert_eq!(apply_report(&none, true), "no changes\n");
    }

    #[test]
    fn drain_prints_changes_only() {
        let addr: IpAddr = "10.1.0.1".parse().unwrap();
        let p = |flows, done| FlowProgress {
            vip: "10.0.0.1:80/tcp".parse().unwrap(),
            backend: addr,
            flows,
            done,
            error: None,
        };
        let mut progress = DrainProgress::new(addr);
        let lines: Vec<String> = [
            p(3, false),
            p(3, false),
            p(1, false),
            p(1, false),
            p(0, true),
        ]
        .iter()
        .filter_map(|x| progress.line(x))
        .collect();
        assert_eq!(
            lines,
            ["10.1.0.1: 3 flows", "10.1.0.1: 1 flow", "10.1.0.1: drained"]
        );
        // Already drained at the first report.
        let mut progress = DrainProgress::new(addr);
        assert_eq!(progress.line(&p(0, true)).unwrap(), "10.1.0.1: drained");
    }
}
