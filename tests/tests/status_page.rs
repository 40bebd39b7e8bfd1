//! The status page in headless Chromium (issue 5). lbd on a gateway with three checked VIPs:
//! - A (port 80): b0 weight 100, up; b1 weight 50, no server on the port, down;
//! - B (port 81): b1 weight 30 and b2 weight 70, both up;
//! - C (port 82): b2 weight 100, no server on the port: every backend down.
//!
//! After a little traffic to A and B, Chromium runs inside lbd's namespace against
//! `http://127.0.0.1:9100/` (where lbd serves it) and
//! - takes a screenshot (kept as `target/test-artifacts/status-page.png`), a valid PNG of the
//!   window's size;
//! - dumps the DOM after the page's refresh script ran from `/stats.json`: every VIP and backend
//!   row with its weight, health, state and live flows (the sessions the test holds open), the
//!   all-down warning on C only, VIP totals between the counters read before and after;
//!   Chromium's network log shows the page fetched only from lbd (and did fetch `/stats.json`);
//! - opens a saved copy from a file, where the refresh cannot reach lbd: the stale marker shows.
//!
//! The served page itself (what a browser without JavaScript shows) must hold the same rows
//! and name nothing outside the host, and `/stats.json` must parse as `api::proto::Stats`.
//! Without Chromium the test fails and says to run `cargo xtask setup`, unless
//! `LB_SKIP_BROWSER=1`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    browser::{Browser, Request, artifacts_dir, attr, cell, element, open_tag},
    lb::{DataPath, Lbd, METRICS_ADDR},
    netns::topology::Topology,
    traffic::{Server, Session, who},
};
use lb_userspace::{
    api::proto::{BackendStats, Stats},
    dataplane::kernel::AttachMode,
    model::VipId,
};

const MODE: AttachMode = AttachMode::Native;
const CHECK: &str = "kind = \"tcp\", interval = \"300ms\", timeout = \"200ms\", rise = 1, fall = 1";
/// Connections sent to each of VIPs A and B (and closed).
const CONNECTIONS: usize = 20;
/// Sessions kept open to A and to B while the browser looks.
const SESSIONS_A: usize = 3;
const SESSIONS_B: usize = 6;
const WINDOW: (u32, u32) = (1280, 900);
/// Virtual time the page's script gets: two refreshes at its 2 s period.
const SCRIPT_BUDGET_MS: u32 = 5000;
/// A screenshot of the whole table is never this small (a blank window is a few KiB).
const MIN_PNG_BYTES: u64 = 20 * 1024;

/// One backend of the test's configuration and the health it must show.
struct Expect {
    port: u16,
    backend: usize,
    weight: u32,
    up: bool,
}

const fn expect(port: u16, backend: usize, weight: u32, up: bool) -> Expect {
    Expect {
        port,
        backend,
        weight,
        up,
    }
}

const EXPECT: [Expect; 5] = [
    expect(80, 0, 100, true),
    expect(80, 1, 50, false),
    expect(81, 1, 30, true),
    expect(81, 2, 70, true),
    expect(82, 2, 100, false),
];
/// The VIP whose backends all fail.
const ALL_DOWN_PORT: u16 = 82;
/// Servers (backend, port): none on b1:80 or on port 82.
const SERVERS: [(usize, u16); 3] = [(0, 80), (1, 81), (2, 81)];

#[test]
fn status_page_in_chromium() {
    let started = Instant::now();
    let browser = match Browser::find() {
        Ok(Some(browser)) => Some(browser),
        Ok(None) => None,
        Err(e) => panic!("{e:#}"),
    };
    let topo = Topology::one_arm("page")
        .backends(3)
        .build()
        .expect("topology");
    let vip = IpAddr::V4(topo.vip);
    let _datapath = DataPath::attach(&topo, MODE, &[vip]).expect("backend programs");
    let _servers: Vec<Server> = SERVERS
        .iter()
        .map(|&(b, port)| {
            let backend = &topo.backends[b];
            Server::start(&backend.ns, &backend.name, port).expect("backend server")
        })
        .collect();
    let gw = topo.gw();
    let lbd = Lbd::start(&gw.ns, &gw.ifaces(), MODE, &config(&topo)).expect("lbd");
    lbd.finish(body(&topo, &lbd, browser.as_ref()), |_| false);
    eprintln!(
        "status_page_in_chromium: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn body(topo: &Topology, lbd: &Lbd, browser: Option<&Browser>) -> Result<()> {
    let setup = Instant::now();
    wait_health(topo, lbd)?;
    let (_sessions, flows) = traffic(topo)?;
    // The page's own read then has a rate over at least a second, and the closed connections'
    // flows have stopped counting.
    std::thread::sleep(Duration::from_millis(2100));
    let before = stats(lbd)?;
    // What a browser without JavaScript shows: the server's render, reloaded every 5 s.
    let (status, html) = lbd.http_get("/")?;
    ensure!(status == 200, "GET /: {status}");
    check_served_html(&html)?;
    check_rows(topo, &html, &flows, &before, &stats(lbd)?).context("the served page")?;
    eprintln!(
        "status_page: health and traffic ready after {:?}",
        setup.elapsed()
    );
    let Some(browser) = browser else {
        return Ok(());
    };
    let ns = &topo.gw().ns;
    let url = format!("http://{METRICS_ADDR}/");

    let shot = artifacts_dir()?.join("status-page.png");
    // An earlier run's file must not pass for this one's.
    if shot.exists() {
        std::fs::remove_file(&shot).with_context(|| format!("removing {}", shot.display()))?;
    }
    let run = browser.screenshot(ns, &url, &shot, WINDOW, SCRIPT_BUDGET_MS)?;
    check_png(&shot)?;
    eprintln!(
        "status_page: screenshot {} in {:?}",
        shot.display(),
        run.elapsed
    );

    let t = Instant::now();
    let run = browser.dump_dom(ns, &url, SCRIPT_BUDGET_MS)?;
    let dom = &run.stdout;
    let after = stats(lbd)?;
    let refreshes: u32 = attr(open_tag(dom, "id=\"live\"")?, "data-refreshes")
        .context("#live has no data-refreshes")?
        .parse()?;
    ensure!(
        refreshes >= 1,
        "the script never refreshed the page:\n{dom}"
    );
    ensure!(
        open_tag(dom, "id=\"stale\"")?.contains(" hidden"),
        "the page says it is stale after refreshing:\n{dom}"
    );
    check_rows(topo, dom, &flows, &before, &after).context("DOM after the script ran")?;
    check_requests(&run.requests)?;
    eprintln!(
        "status_page: DOM after {refreshes} script refreshes checked in {:?}; requests: {:?}",
        t.elapsed(),
        run.requests
            .iter()
            .filter(|r| r.from_page(&origin()))
            .map(|r| &r.url)
            .collect::<Vec<_>>()
    );

    check_stale(browser, topo, lbd)
}

/// Where lbd serves the page, as an origin.
fn origin() -> String {
    format!("http://{METRICS_ADDR}")
}

/// lb.toml: the three VIPs of the module doc, each checked over TCP.
fn config(topo: &Topology) -> String {
    let mut by_port: BTreeMap<u16, Vec<&Expect>> = BTreeMap::new();
    for e in &EXPECT {
        by_port.entry(e.port).or_default().push(e);
    }
    let mut out = String::new();
    for (port, backends) in by_port {
        let _ = writeln!(
            out,
            "[[vip]]\naddress = \"{}:{port}/tcp\"\nring_size = 4099",
            topo.vip
        );
        let _ = writeln!(out, "check = {{ {CHECK} }}\nbackends = [");
        for e in backends {
            let _ = writeln!(
                out,
                "  {{ address = \"{}\", weight = {} }},",
                topo.backends[e.backend].ip(),
                e.weight
            );
        }
        out.push_str("]\n\n");
    }
    out
}

fn vip_id(topo: &Topology, port: u16) -> VipId {
    format!("{}:{port}/tcp", topo.vip)
        .parse()
        .expect("a valid VIP")
}

fn addr(topo: &Topology, backend: usize) -> IpAddr {
    IpAddr::V4(topo.backends[backend].ip())
}

/// `GET /stats.json`, parsed as the API's [`Stats`].
fn stats(lbd: &Lbd) -> Result<Stats> {
    let (status, body) = lbd.http_get("/stats.json")?;
    ensure!(status == 200, "/stats.json: {status} {body}");
    serde_json::from_str(&body).with_context(|| format!("/stats.json is not Stats: {body}"))
}

fn backend_stats<'s>(stats: &'s Stats, vip: &VipId, addr: IpAddr) -> Result<&'s BackendStats> {
    stats
        .vips
        .iter()
        .find(|v| v.vip == *vip)
        .with_context(|| format!("stats have no VIP {vip}"))?
        .backends
        .iter()
        .find(|b| b.address == addr)
        .with_context(|| format!("stats of {vip} have no backend {addr}"))
}

/// Waits until every backend has been checked and shows the health the test expects.
fn wait_health(topo: &Topology, lbd: &Lbd) -> Result<()> {
    let started = Instant::now();
    loop {
        let stats = stats(lbd)?;
        let mut pending = Vec::new();
        for e in &EXPECT {
            let vip = vip_id(topo, e.port);
            let b = backend_stats(&stats, &vip, addr(topo, e.backend))?;
            let settled = b
                .health
                .as_ref()
                .is_some_and(|h| h.last.is_some() && h.up == e.up);
            if !settled {
                pending.push(format!("{vip} {}: {:?}", b.address, b.health));
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("health not as expected after 15 s: {pending:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Open sessions (live flows) by (VIP port, backend index).
type Flows = BTreeMap<(u16, usize), u64>;

/// A few connections to A (all on b0, the only one up) and to B, closed; then sessions left
/// open, which the page must count as live flows (closed flows stop counting within a tick).
fn traffic(topo: &Topology) -> Result<(Vec<Session>, Flows)> {
    let mut sessions = Vec::new();
    let mut flows = Flows::new();
    for (port, open) in [(80, SESSIONS_A), (81, SESSIONS_B)] {
        let target = SocketAddr::new(IpAddr::V4(topo.vip), port);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..CONNECTIONS {
            let name =
                who(&topo.client.ns, target).with_context(|| format!("WHO {i} to {target}"))?;
            *seen.entry(name).or_default() += 1;
        }
        if port == 80 {
            ensure!(
                seen.len() == 1 && seen.contains_key(&topo.backends[0].name),
                "A's connections reached {seen:?}, not b0 alone"
            );
        }
        for _ in 0..open {
            let session = Session::open(&topo.client.ns, target)?;
            let backend = topo
                .backends
                .iter()
                .position(|b| b.name == session.backend())
                .with_context(|| format!("a session answered by {}", session.backend()))?;
            *flows.entry((port, backend)).or_default() += 1;
            sessions.push(session);
        }
    }
    Ok((sessions, flows))
}

/// The page as served: complete, naming nothing outside the host.
fn check_served_html(html: &str) -> Result<()> {
    ensure!(
        html.contains("</html>"),
        "GET / is not a whole page: {html}"
    );
    for outside in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "url(",
        "@import",
    ] {
        ensure!(
            !html.contains(outside),
            "the served page mentions {outside:?}"
        );
    }
    for tag in html.split('<').skip(1) {
        for attr_name in [" src=\"", " href=\""] {
            if let Some(at) = tag.find(attr_name) {
                let value = &tag[at + attr_name.len()..];
                ensure!(
                    value.starts_with("data:"),
                    "the served page loads {:?}",
                    value.split('"').next()
                );
            }
        }
    }
    Ok(())
}

/// A PNG of [`WINDOW`]'s size and more than a blank window's weight.
fn check_png(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR"),
        "{} is not a PNG",
        path.display()
    );
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let (w, h) = (be(16), be(20));
    ensure!((w, h) == WINDOW, "screenshot is {w}x{h}, not {WINDOW:?}");
    ensure!(
        bytes.len() as u64 >= MIN_PNG_BYTES,
        "screenshot is only {} bytes: blank?",
        bytes.len()
    );
    Ok(())
}

/// Every VIP section and backend row of `dom`, as the test configured them and as
/// `/stats.json` reads before (`before`) and after (`after`) the browser ran.
fn check_rows(
    topo: &Topology,
    dom: &str,
    flows: &Flows,
    before: &Stats,
    after: &Stats,
) -> Result<()> {
    ensure!(
        dom.matches("<tr class=\"backend ").count() == EXPECT.len(),
        "expected {} backend rows:\n{dom}",
        EXPECT.len()
    );
    check_sections(topo, dom)?;
    for e in &EXPECT {
        check_backend_row(topo, dom, e, flows, after)?;
    }
    check_totals(topo, dom, flows, before, after)?;
    for id in ["id=\"actions\"", "id=\"drops\"", "id=\"flow-table\""] {
        ensure!(dom.contains(id), "the page has no {id}");
    }
    Ok(())
}

/// A section per VIP, the all-down one flagged and warned about.
fn check_sections(topo: &Topology, dom: &str) -> Result<()> {
    for port in [80, 81, 82] {
        let vip = vip_id(topo, port);
        let section = element(dom, "section", &format!("data-vip=\"{vip}\""))?;
        let all_down = port == ALL_DOWN_PORT;
        ensure!(
            attr(open_tag(section, "<section")?, "data-all-down").as_deref()
                == Some(if all_down { "true" } else { "false" }),
            "{vip}: data-all-down wrong in {section}"
        );
        ensure!(
            section.contains("class=\"alert all-down\"") == all_down,
            "{vip}: the all-down warning is {} its section",
            if all_down {
                "missing from"
            } else {
                "wrongly in"
            }
        );
    }
    Ok(())
}

/// A backend's row: weight and health as configured, state as `/stats.json` says, live flows
/// as the open sessions, and the last check's outcome.
fn check_backend_row(
    topo: &Topology,
    dom: &str,
    e: &Expect,
    flows: &Flows,
    after: &Stats,
) -> Result<()> {
    let vip = vip_id(topo, e.port);
    let backend = addr(topo, e.backend);
    let row = element(
        dom,
        "tr",
        &format!("data-vip=\"{vip}\" data-backend=\"{backend}\""),
    )?;
    let health = if e.up { "up" } else { "down" };
    let stats_state = backend_stats(after, &vip, backend)?.state.to_string();
    for (class, want) in [
        ("weight", e.weight.to_string()),
        ("health", health.to_owned()),
        ("state", stats_state),
        (
            "flows",
            flows
                .get(&(e.port, e.backend))
                .copied()
                .unwrap_or(0)
                .to_string(),
        ),
    ] {
        let (tag, text) = cell(row, class)?;
        let value = attr(tag, "data-value");
        ensure!(
            value.as_deref() == Some(want.as_str()) && text == want,
            "{vip} {backend}: {class} is {value:?} / {text:?}, expected {want}: {row}"
        );
    }
    let (last, _) = cell(row, "last")?;
    let title = attr(last, "title").unwrap_or_default();
    let expected_last = if e.up { "ok" } else { "connection refused" };
    ensure!(
        title.contains(expected_last),
        "{vip} {backend}: last check {title:?}, expected {expected_last}"
    );
    // The row's class carries the same state for styling.
    ensure!(
        row.starts_with("<tr class=\"backend state-")
            && row.contains(&format!("health-{health}\"")),
        "{vip} {backend}: row classes wrong: {row}"
    );
    Ok(())
}

/// Totals of A and B: packets between the reads around the browser run, live flows the open
/// sessions.
fn check_totals(
    topo: &Topology,
    dom: &str,
    flows: &Flows,
    before: &Stats,
    after: &Stats,
) -> Result<()> {
    for port in [80, 81] {
        let vip = vip_id(topo, port);
        let total = element(dom, "tr", &format!("class=\"total\" data-vip=\"{vip}\""))?;
        let packets: u64 = attr(cell(total, "packets")?.0, "data-value")
            .context("packets without data-value")?
            .parse()?;
        let vip_packets = |s: &Stats| -> Result<u64> {
            Ok(s.vips
                .iter()
                .find(|v| v.vip == vip)
                .context("VIP missing from stats")?
                .traffic
                .packets)
        };
        let (lo, hi) = (vip_packets(before)?, vip_packets(after)?);
        ensure!(
            lo > 0 && (lo..=hi).contains(&packets),
            "{vip}: page shows {packets} packets, stats read {lo} before and {hi} after"
        );
        let live: u64 = flows
            .iter()
            .filter(|((p, _), _)| *p == port)
            .map(|(_, n)| n)
            .sum();
        let shown = attr(cell(total, "flows")?.0, "data-value");
        ensure!(
            shown == Some(live.to_string()),
            "{vip}: total live flows {shown:?}, expected {live}"
        );
    }
    Ok(())
}

/// Every request the page made went to lbd, and the refresh fetched `/stats.json`.
fn check_requests(requests: &[Request]) -> Result<()> {
    let base = format!("{}/", origin());
    let page: Vec<&str> = requests
        .iter()
        .filter(|r| r.from_page(&origin()))
        .map(|r| r.url.as_str())
        .collect();
    for url in &page {
        ensure!(
            url.starts_with(&base),
            "the page fetched {url} (all requests: {page:?})"
        );
    }
    ensure!(
        page.contains(&base.as_str()) && page.iter().any(|u| u.ends_with("/stats.json")),
        "the network log lacks the page or its /stats.json refresh: {page:?}"
    );
    Ok(())
}

/// A saved copy opened from a file cannot refresh: the stale marker shows.
fn check_stale(browser: &Browser, topo: &Topology, lbd: &Lbd) -> Result<()> {
    let (_, html) = lbd.http_get("/")?;
    let saved = SavedPage::write(&html)?;
    let url = format!("file://{}", saved.0.display());
    let run = browser.dump_dom(&topo.gw().ns, &url, SCRIPT_BUDGET_MS)?;
    let dom = &run.stdout;
    let stale = element(dom, "span", "id=\"stale\"")?;
    ensure!(
        !open_tag(stale, "<span")?.contains(" hidden")
            && stale.contains(">stale since page load: "),
        "a page that cannot refresh does not say so: {stale}"
    );
    ensure!(
        dom.contains("<body class=\"stale\">"),
        "the stale page is not greyed out"
    );
    eprintln!("status_page: a page that cannot refresh says {stale}");
    Ok(())
}

/// The page saved to a file, removed on drop.
struct SavedPage(PathBuf);

impl SavedPage {
    fn write(html: &str) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("lbt-{}-status-page.html", std::process::id()));
        std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for SavedPage {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}
