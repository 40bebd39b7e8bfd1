//! The status page rendered from a fixture: rows and cells, escaping of hostile strings, the
//! all-down warning, the global counters, and the script kept in step with the server render.

use std::collections::BTreeMap;

use super::*;
use crate::api::proto::{FlowTableStats, GlobalStats, HealthReport};

/// What a hostile health check could report as its reason.
const HOSTILE: &str = "<script>alert(\"x\")</script>\"><img src=x onerror='y'>&";

fn traffic(packets: u64, pps: f64) -> Traffic {
    Traffic {
        packets,
        bytes: packets * 1000,
        new_flows: packets / 10,
        packets_per_sec: pps,
        bytes_per_sec: pps * 1000.0,
        new_flows_per_sec: pps / 10.0,
    }
}

fn backend(
    addr: &str,
    weight: u32,
    state: BackendState,
    health: Option<(bool, &str)>,
) -> BackendStats {
    BackendStats {
        address: addr.parse().unwrap(),
        weight,
        drain: false,
        state,
        flows: 7,
        health: health.map(|(up, last)| HealthReport {
            check: "tcp every 1s".to_owned(),
            up,
            since_secs: 75,
            last: Some(last.to_owned()),
            last_latency_us: Some(312),
        }),
        traffic: traffic(1500, 12.5),
    }
}

fn fixture() -> Stats {
    let mut drained = backend("10.1.0.3", 0, BackendState::Draining, None);
    drained.drain = true;
    Stats {
        rate_interval_secs: 2.0,
        idle_timeout_secs: 60,
        vips: vec![
            VipStats {
                vip: "10.0.0.1:80/tcp".parse().unwrap(),
                all_down: false,
                traffic: traffic(3000, 25.0),
                backends: vec![
                    backend("10.1.0.1", 100, BackendState::Active, Some((true, "ok"))),
                    backend(
                        "10.1.0.2",
                        50,
                        BackendState::Down,
                        Some((false, "connection refused")),
                    ),
                    drained,
                ],
            },
            VipStats {
                vip: "[2001:db8::1]:53/udp".parse().unwrap(),
                all_down: true,
                traffic: Traffic::default(),
                backends: vec![backend(
                    "2001:db8::10",
                    100,
                    BackendState::Down,
                    Some((false, HOSTILE)),
                )],
            },
        ],
        global: GlobalStats {
            actions: BTreeMap::from([
                ("drop".to_owned(), 3),
                ("pass".to_owned(), 42),
                ("redirect".to_owned(), 0),
                ("tx".to_owned(), 3000),
            ]),
            flow_hits: 2900,
            flow_misses: 1,
            new_flows: 300,
            icmp_forwarded: 4,
            echo_replies: 5,
            too_big_replies: 6,
            drops: BTreeMap::from([("malformed".to_owned(), 3), ("no_backend".to_owned(), 0)]),
        },
        flow_table: FlowTableStats {
            capacity: 65_536,
            entries: 300,
            ..FlowTableStats::default()
        },
    }
}

/// The markup of the `tr` whose open tag contains `marker`, up to its `</tr>`.
fn row<'p>(page: &'p str, marker: &str) -> &'p str {
    let start = page
        .find(marker)
        .unwrap_or_else(|| panic!("no row with {marker} in:\n{page}"));
    // The marker may be the open tag itself or inside it.
    let start = page[..start + 3].rfind("<tr").expect("row start");
    let end = start + page[start..].find("</tr>").expect("row end");
    &page[start..end]
}

fn backend_row<'p>(page: &'p str, vip: &str, addr: &str) -> &'p str {
    row(page, &format!("data-vip=\"{vip}\" data-backend=\"{addr}\""))
}

/// The `<td class="{class}" ...>` open tag and text of a row's cell.
fn cell<'r>(row: &'r str, class: &str) -> (&'r str, &'r str) {
    let start = row
        .find(&format!("<td class=\"{class}\""))
        .unwrap_or_else(|| panic!("no {class} cell in {row}"));
    let rest = &row[start..];
    let open_end = rest.find('>').expect("open tag end");
    let close = rest.find("</td>").expect("cell end");
    (&rest[..=open_end], &rest[open_end + 1..close])
}

#[test]
fn escape_covers_markup_and_quotes() {
    assert_eq!(
        escape("<script>alert(\"x\")</script>"),
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    );
    assert_eq!(escape("a'b&c>"), "a&#39;b&amp;c&gt;");
    assert_eq!(escape("10.0.0.1:80/tcp µs"), "10.0.0.1:80/tcp µs");
}

#[test]
fn every_backend_has_a_row_with_its_cells() {
    let page = render(&fixture());
    let up = backend_row(&page, "10.0.0.1:80/tcp", "10.1.0.1");
    assert!(
        up.starts_with("<tr class=\"backend state-active health-up\""),
        "{up}"
    );
    assert_eq!(cell(up, "address").1, "10.1.0.1");
    assert_eq!(
        cell(up, "weight"),
        ("<td class=\"weight\" data-value=\"100\">", "100")
    );
    assert_eq!(cell(up, "state").1, "active");
    assert_eq!(
        cell(up, "health"),
        (
            "<td class=\"health\" data-value=\"up\" title=\"tcp every 1s\">",
            "up"
        )
    );
    assert_eq!(cell(up, "since").1, "1 m 15 s");
    assert_eq!(cell(up, "last").1, "ok · 312 µs");
    assert_eq!(cell(up, "flows").1, "7");
    assert_eq!(cell(up, "pps").1, "12.5");
    assert_eq!(cell(up, "bps").1, "12.5 kB/s");
    assert_eq!(
        cell(up, "packets"),
        (
            "<td class=\"packets\" data-value=\"1500\" title=\"1500\">",
            "1.50k"
        )
    );
    assert_eq!(cell(up, "bytes").1, "1.50 MB");

    let down = backend_row(&page, "10.0.0.1:80/tcp", "10.1.0.2");
    assert!(down.contains("state-down health-down"), "{down}");
    assert_eq!(cell(down, "health").1, "down");
    assert_eq!(cell(down, "weight").1, "50");
    assert_eq!(cell(down, "last").1, "connection refused · 312 µs");

    let drained = backend_row(&page, "10.0.0.1:80/tcp", "10.1.0.3");
    assert_eq!(
        cell(drained, "drain"),
        ("<td class=\"drain\" data-value=\"true\">", "drained")
    );
    assert_eq!(cell(drained, "state").1, "draining");
    assert_eq!(
        cell(drained, "health"),
        (
            "<td class=\"health\" data-value=\"unchecked\">",
            "not checked"
        )
    );

    let v6 = backend_row(&page, "[2001:db8::1]:53/udp", "2001:db8::10");
    assert_eq!(cell(v6, "health").1, "down");
    assert_eq!(page.matches("<tr class=\"backend ").count(), 4);

    let total = row(&page, "<tr class=\"total\" data-vip=\"10.0.0.1:80/tcp\"");
    assert_eq!(cell(total, "state").1, "1/3 active");
    assert_eq!(cell(total, "health").1, "1/2 up");
    assert_eq!(cell(total, "flows").1, "21");
    assert_eq!(cell(total, "packets").1, "3.00k");
    assert!(page.contains("<p class=\"checks\">checks: tcp every 1s</p>"));
}

#[test]
fn hostile_strings_are_escaped_everywhere() {
    let page = render(&fixture());
    // The page's own script is the only one, and the hostile img never becomes a tag.
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    assert!(!page.contains("<img"), "{page}");
    assert!(!page.contains("onerror='"), "{page}");
    let v6 = backend_row(&page, "[2001:db8::1]:53/udp", "2001:db8::10");
    let escaped = escape(HOSTILE);
    assert!(escaped.starts_with("&lt;script&gt;alert(&quot;x&quot;)"));
    assert_eq!(cell(v6, "last").1, format!("{escaped} · 312 µs"));
    let (open, _) = cell(v6, "last");
    assert_eq!(
        open,
        format!("<td class=\"last\" title=\"tcp every 1s: {escaped}\">")
    );
}

#[test]
fn all_down_is_flagged_on_its_vip_only() {
    let page = render(&fixture());
    assert_eq!(page.matches("<p class=\"alert all-down\">").count(), 1);
    let v6 = page
        .find("<section class=\"vip\" data-vip=\"[2001:db8::1]:53/udp\" data-all-down=\"true\">")
        .expect("v6 section flagged all down");
    let warning = page.find("<p class=\"alert all-down\">").unwrap();
    assert!(warning > v6, "the warning is in the v6 section");
    assert!(page.contains(&format!("<p class=\"alert all-down\">{ALL_DOWN}</p>")));
    assert!(
        page.contains(
            "<section class=\"vip\" data-vip=\"10.0.0.1:80/tcp\" data-all-down=\"false\">"
        )
    );
}

#[test]
fn global_counters_and_rate_interval() {
    let page = render(&fixture());
    let tx = row(&page, "data-action=\"tx\"");
    assert_eq!(cell(tx, "value").1, "3.00k");
    assert!(row(&page, "data-action=\"redirect\"").contains("class=\"zero\""));
    let malformed = row(&page, "data-reason=\"malformed\"");
    assert!(malformed.contains("class=\"nonzero\""));
    assert_eq!(cell(malformed, "value").1, "3");
    assert!(page.contains("data-reason=\"no_backend\""));
    assert!(page.contains("<table id=\"icmp\""), "{page}");
    assert_eq!(
        cell(row(&page, "data-counter=\"forwarded\""), "value").1,
        "4"
    );
    assert_eq!(
        cell(row(&page, "data-counter=\"echo-replies\""), "value").1,
        "5"
    );
    assert_eq!(
        cell(row(&page, "data-counter=\"too-big-replies\""), "value").1,
        "6"
    );
    let entries = row(&page, "data-counter=\"entries\"");
    assert_eq!(cell(entries, "value").1, "300 (0.5%)");
    assert_eq!(
        cell(row(&page, "data-counter=\"capacity\""), "value").1,
        "65.5k"
    );
    assert_eq!(cell(row(&page, "data-counter=\"misses\""), "value").1, "1");
    assert!(page.contains("<span id=\"rate-interval\" data-value=\"2\">rates over 2.0 s</span>"));
    assert!(page.contains(
        "<span id=\"summary\">2 VIPs · 1/4 backends active · 28 live flows · 25 packets/s</span>"
    ));
}

#[test]
fn complete_without_scripts_and_fetches_nothing_elsewhere() {
    let page = render(&fixture());
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains("<noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript>"));
    assert!(page.contains(&format!("content=\"{}\"", escape(CSP))));
    assert!(CSP.starts_with("default-src 'none'; connect-src 'self';"));
    for outside in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "url(",
        "@import",
    ] {
        assert!(!page.contains(outside), "the page mentions {outside}");
    }
    assert!(page.contains("<span id=\"stale\" hidden></span>"));
}

#[test]
fn no_vips_and_no_rates_yet() {
    let stats = Stats {
        rate_interval_secs: 0.0,
        idle_timeout_secs: 60,
        vips: Vec::new(),
        global: GlobalStats::default(),
        flow_table: FlowTableStats::default(),
    };
    let page = render(&stats);
    assert!(page.contains("<p class=\"empty\">No VIPs configured.</p>"));
    assert!(page.contains("rates need a second read"));
    assert!(!page.contains("<section class=\"vip\""));
}

#[test]
fn the_script_renders_the_same_columns_and_warning() {
    for (class, heading) in COLUMNS {
        assert!(
            SCRIPT.contains(&format!("[\"{class}\", \"{heading}\"]")),
            "script.js lacks column {class}"
        );
    }
    assert!(SCRIPT.contains(&format!("\"{ALL_DOWN}\"")));
    assert!(!SCRIPT.contains(".innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
    assert!(!SCRIPT.contains("</script"));
}
