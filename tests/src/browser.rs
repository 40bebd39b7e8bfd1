//! Headless Chromium (Debian's `chromium`, installed by `cargo xtask setup`) for page tests:
//! a screenshot or the DOM after the page's scripts ran, taken inside a test namespace, with
//! the requests Chromium made (from its network log). Each run gets a fresh profile folder,
//! removed afterwards, and is killed (its whole process group) when it overruns
//! [`RUN_TIMEOUT`]. Plus a few string helpers to read the serialized DOM.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// Set to `1` to let browser tests pass without Chromium (they say so on stderr).
pub const SKIP_ENV: &str = "LB_SKIP_BROWSER";
/// Longest a single Chromium run may take.
pub const RUN_TIMEOUT: Duration = Duration::from_mins(1);
/// Where Debian puts it.
const CANDIDATES: [&str; 2] = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
/// Headless, as root (no sandbox), and quiet: without the background-networking switches
/// Chromium reaches out to Google services at start and fails inside an isolated namespace.
const FLAGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
];

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// What one Chromium run printed and requested.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Every URL request of the network stack: the page's and Chromium's own.
    pub requests: Vec<Request>,
}

/// One request from Chromium's network log (`URL_REQUEST_START_JOB`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub url: String,
    /// The origin that asked for it (`http://127.0.0.1:9100`), or `not an origin` for a
    /// navigation or Chromium's own background requests.
    pub initiator: String,
    /// `<top-frame site> <frame site>`, e.g. `http://127.0.0.1 http://127.0.0.1`; `null null`
    /// for Chromium's own requests.
    pub isolation_key: String,
}

impl Request {
    /// Whether a page of `origin` (`http://127.0.0.1:9100`) made it: it initiated it, or it
    /// was made for a frame of the origin's site (the navigation itself included).
    pub fn from_page(&self, origin: &str) -> bool {
        let site = site_of(origin);
        self.initiator == origin || self.isolation_key.split(' ').any(|s| s == site)
    }
}

/// `scheme://host` of `scheme://host:port`.
fn site_of(origin: &str) -> &str {
    let host_start = origin.find("://").map_or(0, |i| i + 3);
    match origin[host_start..].rfind(':') {
        // Not the colons of a bracketed IPv6 address.
        Some(i) if !origin[host_start + i..].contains(']') => &origin[..host_start + i],
        _ => origin,
    }
}

/// The installed Chromium.
#[derive(Clone, Debug)]
pub struct Browser {
    bin: PathBuf,
}

impl Browser {
    /// Chromium, or `None` when [`SKIP_ENV`] is `1`. Missing Chromium is an error that says to
    /// run `cargo xtask setup`: a browser test must not pass silently without its browser.
    pub fn find() -> Result<Option<Self>> {
        if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
            eprintln!("{SKIP_ENV}=1: skipping the browser checks");
            return Ok(None);
        }
        match CANDIDATES.iter().map(Path::new).find(|p| p.exists()) {
            Some(bin) => Ok(Some(Self {
                bin: bin.to_owned(),
            })),
            None => bail!(
                "chromium is not installed (looked for {}): run `cargo xtask setup`, which \
                 installs Debian's chromium package (or set {SKIP_ENV}=1 to skip browser tests)",
                CANDIDATES.join(", ")
            ),
        }
    }

    /// Loads `url` inside `ns` and writes a PNG of a `width` x `height` window to `out`,
    /// after `budget_ms` of (virtual) time for the page's scripts.
    pub fn screenshot(
        &self,
        ns: &Netns,
        url: &str,
        out: &Path,
        (width, height): (u32, u32),
        budget_ms: u32,
    ) -> Result<Run> {
        let run = self.run(
            ns,
            &[
                format!("--screenshot={}", out.display()),
                format!("--window-size={width},{height}"),
                format!("--virtual-time-budget={budget_ms}"),
                url.to_owned(),
            ],
        )?;
        if !out.exists() {
            bail!(
                "chromium wrote no screenshot to {} ({}); stderr:\n{}",
                out.display(),
                run.status,
                run.stderr
            );
        }
        Ok(run)
    }

    /// Loads `url` inside `ns`, lets its scripts run for `budget_ms` of virtual time (Chromium
    /// waits for pending fetches) and returns the run with the serialized DOM as its stdout.
    /// (`--dump-dom` prints nothing with scripts off, so a page's script-free form is best
    /// checked on the served HTML.)
    pub fn dump_dom(&self, ns: &Netns, url: &str, budget_ms: u32) -> Result<Run> {
        let args = [
            "--dump-dom".to_owned(),
            format!("--virtual-time-budget={budget_ms}"),
            url.to_owned(),
        ];
        let run = self.run(ns, &args)?;
        if !run.status.success() || !run.stdout.contains("</html>") {
            bail!(
                "chromium --dump-dom {url}: {} after {:?}; stdout {} bytes; stderr:\n{}",
                run.status,
                run.elapsed,
                run.stdout.len(),
                run.stderr
            );
        }
        Ok(run)
    }

    /// Runs Chromium with [`FLAGS`], a fresh profile and `args` inside `ns`, bounded by
    /// [`RUN_TIMEOUT`].
    pub fn run(&self, ns: &Netns, args: &[String]) -> Result<Run> {
        let profile = Profile::new()?;
        let net_log = profile.0.join("netlog.json");
        let mut cmd = ns.command(&self.bin);
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg(format!("--log-net-log={}", net_log.display()))
            .args(args)
            .env("HOME", &profile.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout ends its renderers and helpers too.
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().context("spawning chromium")?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let status = wait_bounded(&mut child, RUN_TIMEOUT)?;
        let stdout = stdout.collect();
        let stderr = stderr.collect();
        let Some(status) = status else {
            bail!(
                "chromium {} did not finish within {RUN_TIMEOUT:?} (killed); stderr:\n{stderr}",
                args.join(" ")
            );
        };
        let requests = read_net_log(&net_log)?;
        Ok(Run {
            status,
            stdout,
            stderr,
            elapsed: started.elapsed(),
            requests,
        })
    }
}

/// The URL requests in a network log Chromium wrote (`--log-net-log`).
fn read_net_log(path: &Path) -> Result<Vec<Request>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let log: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a whole network log", path.display()))?;
    let start_job = log
        .pointer("/constants/logEventTypes/URL_REQUEST_START_JOB")
        .and_then(serde_json::Value::as_u64)
        .context("the network log names no URL_REQUEST_START_JOB event")?;
    let events = log
        .get("events")
        .and_then(serde_json::Value::as_array)
        .context("the network log has no events")?;
    let text_of = |params: &serde_json::Value, key: &str| {
        params
            .get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Ok(events
        .iter()
        .filter(|e| e.get("type").and_then(serde_json::Value::as_u64) == Some(start_job))
        .filter_map(|e| e.get("params"))
        .filter(|p| p.get("url").is_some())
        .map(|p| Request {
            method: text_of(p, "method"),
            url: text_of(p, "url"),
            initiator: text_of(p, "initiator"),
            isolation_key: text_of(p, "network_isolation_key"),
        })
        .collect())
}

/// Waits for `child` up to `timeout`; past it, SIGKILLs its process group (which it leads)
/// and returns `None`.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for chromium")? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group our unreaped child leads.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            child.wait().context("reaping chromium")?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A pipe read to its end on a thread.
struct Drain(Option<(JoinHandle<()>, mpsc::Receiver<Vec<u8>>)>);

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> Drain {
    Drain(pipe.map(|mut pipe| {
        let (tx, rx) = mpsc::channel();
        let handle = thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error ends the capture; what was read so far is kept.
            let _ = pipe.read_to_end(&mut buf);
            // The receiver waits for this unless it gave up; nothing to do then.
            let _ = tx.send(buf);
        });
        (handle, rx)
    }))
}

impl Drain {
    /// What was read, waiting a few seconds at most (a helper process that kept the pipe
    /// open past the browser's exit must not hang the test).
    fn collect(self) -> String {
        let Some((handle, rx)) = self.0 else {
            return String::new();
        };
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(buf) => {
                // The thread has sent its last message; joining cannot block.
                let _ = handle.join();
                String::from_utf8_lossy(&buf).into_owned()
            }
            Err(_) => "(output not closed within 5 s)".to_owned(),
        }
    }
}

/// A fresh, empty Chromium profile folder, removed on drop.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Result<Self> {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lbt-chromium-{}-{seq}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// `target/test-artifacts/`, created if needed: files a person may want to look at after a
/// test (next to the test binary's `target/<profile>/deps/`).
pub fn artifacts_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "deps"))
        .and_then(|deps| deps.parent()?.parent())
        .context("the test binary is not in target/<profile>/deps")?;
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The open tag (`<tag ...>`) of the element whose open tag contains `marker`.
pub fn open_tag<'h>(html: &'h str, marker: &str) -> Result<&'h str> {
    let at = html
        .find(marker)
        .with_context(|| format!("no {marker} in the page"))?;
    let start = html[..=at].rfind('<').context("marker outside a tag")?;
    let end = at + html[at..].find('>').context("unterminated tag")?;
    Ok(&html[start..=end])
}

/// The element `<tag ...>...</tag>` whose open tag contains `marker` (`marker` may start with
/// `<tag`); elements of the same tag must not nest.
pub fn element<'h>(html: &'h str, tag: &str, marker: &str) -> Result<&'h str> {
    let at = html
        .find(marker)
        .with_context(|| format!("no <{tag}> with {marker} in the page"))?;
    let open = format!("<{tag}");
    let start = html[..at + open.len()]
        .rfind(&open)
        .with_context(|| format!("{marker} is not in a <{tag}>"))?;
    let close = format!("</{tag}>");
    let end = start
        + html[start..]
            .find(&close)
            .with_context(|| format!("<{tag}> with {marker} is not closed"))?;
    Ok(&html[start..end + close.len()])
}

/// The value of attribute `name` in an open tag, entities decoded.
pub fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    let len = tag[at..].find('"')?;
    Some(unescape(&tag[at..at + len]))
}

/// The open tag and text of the first `<td class="{class}"...>` in `row`, tags inside the
/// text removed and entities decoded.
pub fn cell<'r>(row: &'r str, class: &str) -> Result<(&'r str, String)> {
    let key = format!("<td class=\"{class}\"");
    let at = row
        .find(&key)
        .with_context(|| format!("no {class} cell in {row}"))?;
    let rest = &row[at..];
    let open_end = rest.find('>').context("unterminated <td>")?;
    let close = rest.find("</td>").context("unclosed <td>")?;
    let mut text = String::new();
    let mut in_tag = false;
    for c in rest[open_end + 1..close].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    Ok((&rest[..=open_end], unescape(&text)))
}

/// Text with the entities a serializer writes decoded.
pub fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}
