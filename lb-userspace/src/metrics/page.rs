//! The status page at `/`: every VIP with its backends (weight, drain, state, health, live
//! flows, packet and byte rates, totals) and the data plane's global counters.
//!
//! Rendered here, on the server, so it is complete without JavaScript; a `<noscript>` meta
//! refresh reloads it every [`RELOAD_SECS`]. With JavaScript, a small inline script (no
//! framework, `page/script.js`) fetches `/stats.json` every 2 s and rebuilds the same elements
//! in place, and shows a "stale" marker while that fails. Nothing comes from anywhere else:
//! style and script are inline, and a Content-Security-Policy tells the browser so.
//!
//! Hooks for tests and scripts (the same in both renderings):
//! - `section.vip[data-vip]` per VIP (`data-all-down="true"` and a `p.all-down` warning when
//!   every backend fails its checks), holding `table.backends`;
//! - `tr.backend[data-vip][data-backend]` per backend, its cells classed `address`, `weight`,
//!   `drain`, `state`, `health`, `since`, `last`, `flows`, `pps`, `bps`, `packets`, `bytes`,
//!   `new-flows`, raw values in `data-value` (`health`: `up`, `down` or `unchecked`);
//! - `tr.total[data-vip]` in each table's footer: the VIP's own counters;
//! - `#actions tr[data-action]`, `#drops tr[data-reason]`, `#flow-table tr[data-counter]`,
//!   `#icmp tr[data-counter]`;
//! - `#rate-interval[data-value]`, `#live[data-refreshes]` (counts the script's refreshes),
//!   `#stale` (hidden unless the last refresh failed).

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use crate::{
    api::proto::{BackendState, BackendStats, Stats, Traffic, VipStats},
    units,
};

/// Seconds between reloads of the page when JavaScript is off.
pub const RELOAD_SECS: u32 = 5;
const STYLE: &str = include_str!("page/style.css");
const SCRIPT: &str = include_str!("page/script.js");
/// Everything from this host only; inline style and script are the page's own.
const CSP: &str = "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; \
                   style-src 'unsafe-inline'; img-src data:";
/// A backend table's columns: cell class and heading (`script.js` has the same list).
const COLUMNS: [(&str, &str); 13] = [
    ("address", "backend"),
    ("weight", "weight"),
    ("drain", "drain"),
    ("state", "state"),
    ("health", "health"),
    ("since", "since"),
    ("last", "last check"),
    ("flows", "live flows"),
    ("pps", "packets/s"),
    ("bps", "bytes/s"),
    ("packets", "packets"),
    ("bytes", "bytes"),
    ("new-flows", "new flows"),
];

/// The warning over a VIP whose backends all fail their checks (`script.js` has it too).
const ALL_DOWN: &str =
    "Every backend fails its health checks: the VIP keeps forwarding with its last table.";

/// The whole page for `stats`.
pub fn render(stats: &Stats) -> String {
    let mut h = Html(String::with_capacity(16 * 1024));
    h.raw("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.open(
        "meta",
        &[("http-equiv", "Content-Security-Policy"), ("content", CSP)],
    );
    h.raw("\n<link rel=\"icon\" href=\"data:,\">\n<title>lbd status</title>\n");
    h.raw(&format!(
        "<noscript><meta http-equiv=\"refresh\" content=\"{RELOAD_SECS}\"></noscript>\n"
    ));
    h.raw("<style>\n");
    h.raw(STYLE);
    h.raw("</style>\n</head>\n<body>\n<header>\n<h1>lbd status</h1>\n<p id=\"meta\">");
    summary(&mut h, stats);
    h.raw(" · ");
    rate_interval(&mut h, stats.rate_interval_secs);
    h.raw(" · ");
    h.open("span", &[("id", "live"), ("data-refreshes", "0")]);
    h.text(&format!("reloads every {RELOAD_SECS} s"));
    h.raw("</span> <span id=\"stale\" hidden></span></p>\n</header>\n<main>\n<div id=\"vips\">\n");
    if stats.vips.is_empty() {
        h.raw("<p class=\"empty\">No VIPs configured.</p>\n");
    }
    for vip in &stats.vips {
        vip_section(&mut h, vip, stats.idle_timeout_secs);
    }
    h.raw("</div>\n<section id=\"global\">\n<h2>Data plane</h2>\n<div class=\"cards\">\n");
    global(&mut h, stats);
    h.raw("</div>\n</section>\n</main>\n<script>\n");
    h.raw(SCRIPT);
    h.raw("</script>\n</body>\n</html>\n");
    h.0
}

/// `s` with the characters that mean something in HTML text or a quoted attribute escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// The page being written: markup goes in raw, every value from [`Stats`] through
/// [`Html::text`] or an attribute, escaped.
struct Html(String);

impl Html {
    fn raw(&mut self, s: &str) {
        self.0.push_str(s);
    }

    fn text(&mut self, s: &str) {
        escape_into(&mut self.0, s);
    }

    fn open(&mut self, tag: &str, attrs: &[(&str, &str)]) {
        self.0.push('<');
        self.0.push_str(tag);
        for (name, value) in attrs {
            self.0.push(' ');
            self.0.push_str(name);
            self.0.push_str("=\"");
            escape_into(&mut self.0, value);
            self.0.push('"');
        }
        self.0.push('>');
    }

    fn close(&mut self, tag: &str) {
        self.0.push_str("</");
        self.0.push_str(tag);
        self.0.push('>');
    }

    /// `<td class=... data-value=... title=...>text</td>`; `value` and `title` when given.
    fn cell(&mut self, class: &str, value: Option<&str>, title: Option<&str>, text: &str) {
        let mut attrs = vec![("class", class)];
        if let Some(value) = value {
            attrs.push(("data-value", value));
        }
        if let Some(title) = title {
            attrs.push(("title", title));
        }
        self.open("td", &attrs);
        self.text(text);
        self.close("td");
    }

    /// A counter total: shortened, exact in `data-value` and the tooltip.
    fn total_cell(&mut self, class: &str, n: u64, text: &str) {
        let exact = n.to_string();
        self.cell(class, Some(&exact), Some(&exact), text);
    }
}

/// `up`, `down` or `unchecked`: the `data-value` of a backend's health cell.
fn health_word(b: &BackendStats) -> &'static str {
    match &b.health {
        Some(r) if r.up => "up",
        Some(_) => "down",
        None => "unchecked",
    }
}

fn summary(h: &mut Html, stats: &Stats) {
    let backends = stats.vips.iter().flat_map(|v| &v.backends);
    let total = backends.clone().count();
    let active = backends
        .clone()
        .filter(|b| b.state == BackendState::Active)
        .count();
    let flows: u64 = backends.map(|b| b.flows).sum();
    let pps: f64 = stats.vips.iter().map(|v| v.traffic.packets_per_sec).sum();
    h.open("span", &[("id", "summary")]);
    h.text(&format!(
        "{} VIPs · {active}/{total} backends active · {} live flows · {} packets/s",
        stats.vips.len(),
        units::count(flows as f64),
        units::count(pps)
    ));
    h.close("span");
}

fn rate_interval(h: &mut Html, secs: f64) {
    let value = secs.to_string();
    h.open("span", &[("id", "rate-interval"), ("data-value", &value)]);
    if secs > 0.0 {
        h.text(&format!("rates over {secs:.1} s"));
    } else {
        h.text("rates need a second read (next refresh)");
    }
    h.close("span");
}

fn vip_section(h: &mut Html, vip: &VipStats, idle_timeout_secs: u64) {
    let id = vip.vip.to_string();
    let all_down = if vip.all_down { "true" } else { "false" };
    h.open(
        "section",
        &[
            ("class", "vip"),
            ("data-vip", &id),
            ("data-all-down", all_down),
        ],
    );
    h.raw("\n<h2>");
    h.text(&id);
    h.raw("</h2>\n");
    if vip.all_down {
        h.raw("<p class=\"alert all-down\">");
        h.text(ALL_DOWN);
        h.raw("</p>\n");
    }
    let checks: BTreeSet<&str> = vip
        .backends
        .iter()
        .filter_map(|b| b.health.as_ref().map(|r| r.check.as_str()))
        .collect();
    if !checks.is_empty() {
        h.raw("<p class=\"checks\">checks: ");
        h.text(&checks.into_iter().collect::<Vec<_>>().join(", "));
        h.raw("</p>\n");
    }
    h.raw("<table class=\"backends\">\n<thead><tr>");
    for (class, heading) in COLUMNS {
        h.open("th", &[("class", class)]);
        h.text(heading);
        h.close("th");
    }
    h.raw("</tr></thead>\n<tbody>\n");
    for b in &vip.backends {
        backend_row(h, &id, b);
    }
    h.raw("</tbody>\n<tfoot>\n");
    total_row(h, vip, idle_timeout_secs);
    h.raw("</tfoot>\n</table>\n</section>\n");
}

fn backend_row(h: &mut Html, vip: &str, b: &BackendStats) {
    let address = b.address.to_string();
    let state = b.state.to_string();
    let health = health_word(b);
    let class = format!("backend state-{state} health-{health}");
    h.open(
        "tr",
        &[
            ("class", &class),
            ("data-vip", vip),
            ("data-backend", &address),
        ],
    );
    h.cell("address", None, None, &address);
    let weight = b.weight.to_string();
    h.cell("weight", Some(&weight), None, &weight);
    let (drain_value, drain_text) = if b.drain {
        ("true", "drained")
    } else {
        ("false", "")
    };
    h.cell("drain", Some(drain_value), None, drain_text);
    h.cell("state", Some(&state), None, &state);
    if let Some(r) = &b.health {
        h.cell("health", Some(health), Some(&r.check), health);
        let since = r.since_secs.to_string();
        h.cell("since", Some(&since), None, &units::duration(r.since_secs));
        let last = r.last.as_deref().unwrap_or("no check yet");
        let text = match r.last_latency_us {
            Some(us) => format!("{last} · {}", units::latency(us)),
            None => last.to_owned(),
        };
        h.cell("last", None, Some(&format!("{}: {last}", r.check)), &text);
    } else {
        h.cell("health", Some(health), None, "not checked");
        h.cell("since", None, None, "");
        h.cell("last", None, None, "");
    }
    h.total_cell("flows", b.flows, &units::count(b.flows as f64));
    traffic_cells(h, &b.traffic);
    h.raw("</tr>\n");
}

/// The VIP's own line: its backends in short, live flows summed, the VIP's counters.
fn total_row(h: &mut Html, vip: &VipStats, idle_timeout_secs: u64) {
    let id = vip.vip.to_string();
    h.open("tr", &[("class", "total"), ("data-vip", &id)]);
    h.cell("address", None, None, "VIP total");
    let weight: u64 = vip.backends.iter().map(|b| u64::from(b.weight)).sum();
    h.cell("weight", Some(&weight.to_string()), None, "");
    h.cell("drain", None, None, "");
    let active = vip
        .backends
        .iter()
        .filter(|b| b.state == BackendState::Active)
        .count();
    h.cell(
        "state",
        Some(&active.to_string()),
        None,
        &format!("{active}/{} active", vip.backends.len()),
    );
    let checked = vip.backends.iter().filter(|b| b.health.is_some()).count();
    let up = vip
        .backends
        .iter()
        .filter(|b| health_word(b) == "up")
        .count();
    let health = if checked > 0 {
        format!("{up}/{checked} up")
    } else {
        String::new()
    };
    h.cell("health", Some(&up.to_string()), None, &health);
    h.cell("since", None, None, "");
    h.cell("last", None, None, "");
    let flows: u64 = vip.backends.iter().map(|b| b.flows).sum();
    let exact = flows.to_string();
    let title = format!("{flows} flows seen in the last {idle_timeout_secs} s");
    h.cell(
        "flows",
        Some(&exact),
        Some(&title),
        &units::count(flows as f64),
    );
    traffic_cells(h, &vip.traffic);
    h.raw("</tr>\n");
}

fn traffic_cells(h: &mut Html, t: &Traffic) {
    h.cell(
        "pps",
        Some(&t.packets_per_sec.to_string()),
        None,
        &units::count(t.packets_per_sec),
    );
    h.cell(
        "bps",
        Some(&t.bytes_per_sec.to_string()),
        None,
        &format!("{}/s", units::bytes(t.bytes_per_sec)),
    );
    h.total_cell("packets", t.packets, &units::count(t.packets as f64));
    h.total_cell("bytes", t.bytes, &units::bytes(t.bytes as f64));
    h.total_cell("new-flows", t.new_flows, &units::count(t.new_flows as f64));
}

/// One `name | value` table of the data-plane cards: rows of (key, label, count, text).
fn counter_table<'a>(
    h: &mut Html,
    id: &str,
    caption: &str,
    key: &str,
    rows: impl IntoIterator<Item = (&'a str, &'a str, u64, String)>,
) {
    h.open("table", &[("id", id), ("class", "counters")]);
    h.raw("<caption>");
    h.text(caption);
    h.raw("</caption>\n<tbody>\n");
    for (name, label, n, text) in rows {
        let class = if n == 0 { "zero" } else { "nonzero" };
        h.open("tr", &[(key, name), ("class", class)]);
        h.cell("name", None, None, label);
        h.total_cell("value", n, &text);
        h.raw("</tr>\n");
    }
    h.raw("</tbody>\n</table>\n");
}

fn global(h: &mut Html, stats: &Stats) {
    let g = &stats.global;
    let packets = |n: u64| (n, units::count(n as f64));
    counter_table(
        h,
        "actions",
        "XDP actions (packets)",
        "data-action",
        g.actions.iter().map(|(name, &n)| {
            let (n, text) = packets(n);
            (name.as_str(), name.as_str(), n, text)
        }),
    );
    let ft = &stats.flow_table;
    let used = if ft.capacity > 0 {
        format!(
            "{} ({:.1}%)",
            units::count(ft.entries as f64),
            ft.entries as f64 * 100.0 / ft.capacity as f64
        )
    } else {
        units::count(ft.entries as f64)
    };
    counter_table(
        h,
        "flow-table",
        "Flow table",
        "data-counter",
        [
            ("entries", "entries", ft.entries, used),
            (
                "capacity",
                "capacity",
                ft.capacity,
                units::count(ft.capacity as f64),
            ),
            (
                "hits",
                "hits",
                g.flow_hits,
                units::count(g.flow_hits as f64),
            ),
            (
                "misses",
                "misses",
                g.flow_misses,
                units::count(g.flow_misses as f64),
            ),
            (
                "new-flows",
                "new flows",
                g.new_flows,
                units::count(g.new_flows as f64),
            ),
        ],
    );
    counter_table(
        h,
        "icmp",
        "ICMP (packets)",
        "data-counter",
        [
            (
                "forwarded",
                "errors forwarded to backends",
                g.icmp_forwarded,
            ),
            ("echo-replies", "echo replies", g.echo_replies),
            ("too-big-replies", "too-big replies", g.too_big_replies),
        ]
        .map(|(key, label, n)| {
            let (n, text) = packets(n);
            (key, label, n, text)
        }),
    );
    counter_table(
        h,
        "drops",
        "Drops by reason (packets)",
        "data-reason",
        g.drops.iter().map(|(name, &n)| {
            let (n, text) = packets(n);
            (name.as_str(), name.as_str(), n, text)
        }),
    );
}
