//! `lbctl stats` and `lbctl debug` text: the traffic table (rates in SI units, totals, state,
//! live flows), the data plane's global counters under it, and the debug switch's line.

use std::fmt::Write as _;

use lb_userspace::{
    api::proto::{Debug, GlobalStats, Stats, Traffic},
    units::{bytes, count},
};

use crate::output::{Align, all_down_warnings, plural, table};

/// `lbctl stats`: a line saying what the numbers are, one row per VIP (its totals) followed by
/// one per backend, then the flow table and the global counters.
pub fn stats_table(stats: &Stats) -> String {
    let mut out = String::new();
    if stats.rate_interval_secs > 0.0 {
        write!(out, "rates over {:.1} s", stats.rate_interval_secs)
    } else {
        // lbd's first read has nothing to compare with; the caller reads again, so this shows
        // only when that failed too (lbd restarted in between).
        out.write_str("no rates yet (lbd needs two reads at least 1 s apart): shown as -")
    }
    .expect("writing to a String");
    writeln!(
        out,
        "; FLOWS: seen in the last {}; bytes in SI units (1 kB = 1000 B)",
        seconds(stats.idle_timeout_secs)
    )
    .expect("writing to a String");

    if stats.vips.is_empty() {
        out.push_str("no VIPs\n");
    } else {
        let with_rates = stats.rate_interval_secs > 0.0;
        let mut rows = Vec::new();
        for vip in &stats.vips {
            let flows: u64 = vip.backends.iter().map(|b| b.flows).sum();
            let mut row = vec![
                vip.vip.to_string(),
                "all".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                flows.to_string(),
            ];
            row.extend(traffic_cells(&vip.traffic, with_rates));
            rows.push(row);
            for b in &vip.backends {
                let mut row = vec![
                    vip.vip.to_string(),
                    b.address.to_string(),
                    b.state.to_string(),
                    b.weight.to_string(),
                    b.flows.to_string(),
                ];
                row.extend(traffic_cells(&b.traffic, with_rates));
                rows.push(row);
            }
        }
        out.push_str(&table(
            &[
                ("VIP", Align::Left),
                ("BACKEND", Align::Left),
                ("STATE", Align::Left),
                ("WEIGHT", Align::Right),
                ("FLOWS", Align::Right),
                ("PKT/S", Align::Right),
                ("BYTE RATE", Align::Right),
                ("NEW FLOWS/S", Align::Right),
                ("PACKETS", Align::Right),
                ("BYTES", Align::Right),
            ],
            &rows,
        ));
    }
    out.push_str(&all_down_warnings(
        stats.vips.iter().filter(|v| v.all_down).map(|v| v.vip),
    ));
    let ft = stats.flow_table;
    write!(out, "flow table: {} of {} entries", ft.entries, ft.capacity)
        .expect("writing to a String");
    if ft.capacity > 0 {
        write!(
            out,
            " ({:.1}%)",
            ft.entries as f64 * 100.0 / ft.capacity as f64
        )
        .expect("writing to a String");
    }
    if ft.guard_limit > 0 {
        write!(
            out,
            "; new flows recorded at most {}/s per CPU, {} left unrecorded",
            ft.guard_limit, ft.unrecorded
        )
        .expect("writing to a String");
    }
    out.push('\n');
    out.push_str(&global_lines(&stats.global));
    out
}

/// `60 seconds`, `second`.
fn seconds(n: u64) -> String {
    if n == 1 {
        "second".to_owned()
    } else {
        plural(n, "second")
    }
}

/// PKT/S, BYTE RATE, NEW FLOWS/S, PACKETS, BYTES.
fn traffic_cells(t: &Traffic, with_rates: bool) -> [String; 5] {
    let rate = |cell: String| if with_rates { cell } else { "-".to_owned() };
    [
        rate(count(t.packets_per_sec)),
        rate(format!("{}/s", bytes(t.bytes_per_sec))),
        rate(count(t.new_flows_per_sec)),
        t.packets.to_string(),
        bytes(t.bytes as f64),
    ]
}

/// The data plane's counters over every VIP and interface.
fn global_lines(g: &GlobalStats) -> String {
    let named = |map: &std::collections::BTreeMap<String, u64>, skip_zero: bool| {
        let parts: Vec<String> = map
            .iter()
            .filter(|(_, n)| !skip_zero || **n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    };
    let mut out = format!(
        "data plane: {} new flows, {} flow-table hits, {} misses (TCP non-SYN packets re-hashed)\n\
         XDP actions: {}; drops: {}\n",
        g.new_flows,
        g.flow_hits,
        g.flow_misses,
        named(&g.actions, false),
        named(&g.drops, true),
    );
    // Only once there is ICMP to speak of: most VIPs never see any.
    if g.icmp_forwarded + g.echo_replies + g.too_big_replies > 0 {
        let _ = writeln!(
            out,
            "ICMP: {} errors forwarded to backends, {} echo replies, {} too-big replies",
            g.icmp_forwarded, g.echo_replies, g.too_big_replies
        );
    }
    out
}

/// `lbctl debug`: the switch's state, with a reminder of its cost when on.
pub fn debug_line(debug: Debug) -> String {
    if debug.data_plane {
        "data-plane debug logging: on (lbd logs each packet decision; this costs CPU: \
         turn it off when done)\n"
            .to_owned()
    } else {
        "data-plane debug logging: off\n".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lb_userspace::api::proto::{
        BackendState, BackendStats, FlowTableStats, HealthReport, VipStats,
    };

    use super::*;

    fn traffic(packets: u64, bytes: u64, pps: f64, bps: f64, fps: f64) -> Traffic {
        Traffic {
            packets,
            bytes,
            new_flows: 0,
            packets_per_sec: pps,
            bytes_per_sec: bps,
            new_flows_per_sec: fps,
        }
    }

    fn backend(addr: &str, state: BackendState, flows: u64, t: Traffic) -> BackendStats {
        BackendStats {
            address: addr.parse().unwrap(),
            weight: 100,
            drain: state == BackendState::Draining,
            state,
            flows,
            health: None,
            traffic: t,
        }
    }

    fn fixture(rate_interval_secs: f64) -> Stats {
        Stats {
            rate_interval_secs,
            idle_timeout_secs: 60,
            vips: vec![
                VipStats {
                    vip: "10.0.0.1:80/tcp".parse().unwrap(),
                    all_down: false,
                    traffic: traffic(1_234_567, 987_654_321, 15_320.4, 12_345_678.9, 42.25),
                    backends: vec![
                        BackendStats {
                            health: Some(HealthReport {
                                check: "tcp every 2s".into(),
                                up: true,
                                since_secs: 75,
                                last: Some("ok".into()),
                                last_latency_us: Some(420),
                            }),
                            ..backend(
                                "10.1.0.1",
                                BackendState::Active,
                                12,
                                traffic(1_000_000, 900_000_000, 15_000.0, 12_000_000.0, 42.25),
                            )
                        },
                        BackendStats {
                            weight: 0,
                            ..backend(
                                "10.1.0.22",
                                BackendState::Draining,
                                3,
                                traffic(234_567, 87_654_321, 320.4, 345_678.9, 0.0),
                            )
                        },
                        backend("10.1.0.3", BackendState::Down, 0, Traffic::default()),
                    ],
                },
                VipStats {
                    vip: "[2001:db8::53]:53/udp".parse().unwrap(),
                    all_down: true,
                    traffic: traffic(999, 512, 0.5, 999.96, 0.0),
                    backends: vec![],
                },
            ],
            global: GlobalStats {
                actions: BTreeMap::from([
                    ("drop".into(), 7),
                    ("pass".into(), 31),
                    ("redirect".into(), 0),
                    ("tx".into(), 1_235_566),
                ]),
                flow_hits: 1_234_000,
                flow_misses: 2,
                new_flows: 15,
                icmp_forwarded: 0,
                echo_replies: 0,
                too_big_replies: 0,
                drops: BTreeMap::from([("malformed".into(), 0), ("no_backend".into(), 7)]),
            },
            flow_table: FlowTableStats {
                capacity: 65_536,
                entries: 1_000,
                ..FlowTableStats::default()
            },
        }
    }

    #[test]
    fn stats_is_an_aligned_table_with_units() {
        assert_eq!(
            stats_table(&fixture(1.04)),
            "\
rates over 1.0 s; FLOWS: seen in the last 60 seconds; bytes in SI units (1 kB = 1000 B)
VIP                    BACKEND    STATE     WEIGHT  FLOWS  PKT/S  BYTE RATE  NEW FLOWS/S  PACKETS    BYTES
10.0.0.1:80/tcp        all        -              -     15  15.3k  12.3 MB/s         42.2  1234567   988 MB
10.0.0.1:80/tcp        10.1.0.1   active       100     12  15.0k  12.0 MB/s         42.2  1000000   900 MB
10.0.0.1:80/tcp        10.1.0.22  draining       0      3  320.4   346 kB/s            0   234567  87.7 MB
10.0.0.1:80/tcp        10.1.0.3   down         100      0      0      0 B/s            0        0      0 B
[2001:db8::53]:53/udp  all        -              -      0    0.5  1.00 kB/s            0      999    512 B
warning: every backend of [2001:db8::53]:53/udp fails its health checks; it keeps its last table
flow table: 1000 of 65536 entries (1.5%)
data plane: 15 new flows, 1234000 flow-table hits, 2 misses (TCP non-SYN packets re-hashed)
XDP actions: drop 7, pass 31, redirect 0, tx 1235566; drops: no_backend 7
"
        );
    }

    #[test]
    fn zero_interval_says_there_are_no_rates_yet() {
        let mut stats = fixture(0.0);
        stats.vips.truncate(1);
        stats.vips[0].backends.truncate(1);
        stats.global.drops.clear();
        stats.global.echo_replies = 3;
        stats.flow_table.capacity = 0;
        assert_eq!(
            stats_table(&stats),
            "\
no rates yet (lbd needs two reads at least 1 s apart): shown as -; FLOWS: seen in the last 60 seconds; bytes in SI units (1 kB = 1000 B)
VIP              BACKEND   STATE   WEIGHT  FLOWS  PKT/S  BYTE RATE  NEW FLOWS/S  PACKETS   BYTES
10.0.0.1:80/tcp  all       -            -     12      -          -            -  1234567  988 MB
10.0.0.1:80/tcp  10.1.0.1  active     100     12      -          -            -  1000000  900 MB
flow table: 1000 of 0 entries
data plane: 15 new flows, 1234000 flow-table hits, 2 misses (TCP non-SYN packets re-hashed)
XDP actions: drop 7, pass 31, redirect 0, tx 1235566; drops: none
ICMP: 0 errors forwarded to backends, 3 echo replies, 0 too-big replies
"
        );
        stats.vips.clear();
        stats.idle_timeout_secs = 1;
        assert!(
            stats_table(&stats).starts_with(
                "no rates yet (lbd needs two reads at least 1 s apart): shown as -; \
                 FLOWS: seen in the last second; bytes in SI units (1 kB = 1000 B)\nno VIPs\n"
            ),
            "{}",
            stats_table(&stats)
        );
    }

    #[test]
    fn debug_lines() {
        assert_eq!(
            debug_line(Debug { data_plane: true }),
            "data-plane debug logging: on (lbd logs each packet decision; this costs CPU: turn it off when done)\n"
        );
        assert_eq!(
            debug_line(Debug { data_plane: false }),
            "data-plane debug logging: off\n"
        );
    }
}
