//! Hostile clients of the control API against a real lbd (issue 7), on its Unix socket:
//!
//! - a few thousand seeded random and malformed requests (mutated and random JSON, random
//!   bytes, deep nesting, invalid UTF-8, unknown fields, wrong methods and paths, broken
//!   framing: bad chunks, conflicting lengths, oversized heads, garbage, pipelines). Each reply
//!   is a 4xx with a JSON message, or hyper's own 400/414/431 for a head it cannot parse, or a
//!   2xx only where nothing can change (reads, dry runs); never a 5xx;
//! - at the same time 200 slow clients that never finish a request (slowloris: a byte every
//!   300 ms into the head or the body) while a normal client's requests stay under 1 s; the
//!   slow ones, a silent one and an idle keep-alive one are all closed at the 10 s timeouts;
//! - a sample of refusals checked for the message naming the problem;
//! - bodies at the limit - 1, the limit (accepted), the limit + 1 (413) and 100x the limit
//!   (413) while lbd's peak RSS stays bounded;
//! - afterwards lbd is alive, still answers, logged no error, and its desired state, status,
//!   state file (byte for byte), debug switch and pinned maps are as before.
//!
//! The random requests are reproducible: the seed is printed, `LB_TEST_SEED` reuses one.

use std::{
    fmt::Write as _,
    fs,
    io::{ErrorKind, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use lb_tests::lb::{Lbd, MapSnapshot, ServedTopology, alive, memory_kib, reset_peak_memory};
use lb_tests::netns::topology::Topology;
use lb_tests::rng::{Rng, seed_from_env};
use lb_userspace::{
    api::{
        proto::{BODY_LIMIT, ChangeReply, Debug, ErrorReply, StateReply, Status},
        server::{BODY_READ_TIMEOUT, HEAD_LIMIT, HEADER_READ_TIMEOUT},
    },
    dataplane::kernel::AttachMode,
};

const PORT: u16 = 80;
/// Random requests per fuzzing thread, and the threads.
const PER_THREAD: usize = 1500;
const FUZZ_THREADS: usize = 2;
/// Slow clients: dribbling a request head, and a body.
const SLOW_HEADS: usize = 150;
const SLOW_BODIES: usize = 50;
/// A slow client's pace.
const DRIBBLE: Duration = Duration::from_millis(300);
/// The normal client's bound per request while the slow ones are open.
const MAX_LATENCY: Duration = Duration::from_secs(1);
/// How long a reply may take to start when one is due.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a reply to a request lbd may fairly wait on (it looks incomplete).
const STALL_WAIT: Duration = Duration::from_millis(300);
/// Slack on the server's timeouts (scheduling, two busy cores).
const TIMEOUT_SLACK: Duration = Duration::from_secs(3);
/// lbd's peak RSS may grow this much over the huge bodies (each is 100 MiB).
const RSS_BOUND_KIB: u64 = 24 * 1024;

#[test]
fn api_fuzz() {
    let bed = ServedTopology::build(
        Topology::one_arm("afz").backends(2),
        AttachMode::Native,
        PORT,
    )
    .expect("topology");
    let lbd = bed.start_lbd().expect("lbd");
    // Refusals are logged at INFO; only the fuzz's own noise is left out of a failure's tail.
    lbd.finish(body(&bed, &lbd), |l| {
        l.contains("refused") || l.contains("control API")
    });
}

fn body(bed: &ServedTopology, lbd: &Lbd) -> Result<()> {
    let pid = lbd.pid().context("lbd has no pid")?;
    let socket = lbd.socket_path.clone();
    let before = Unchanged::take(lbd)?;
    let seed = seed_from_env("LB_TEST_SEED");
    let ctx = Arc::new(Ctx {
        vip: bed.target().to_string() + "/tcp",
        backends: bed
            .topo
            .backends
            .iter()
            .map(|b| b.ip().to_string())
            .collect(),
    });

    // Slow and silent clients first, then the fuzz and the normal client while they hang on.
    let slow = Slowloris::open(&socket)?;
    let silent = Silent::open(&socket)?;
    let stop_fuzz = Arc::new(AtomicBool::new(false));
    let fuzzers: Vec<_> = (0..FUZZ_THREADS)
        .map(|i| {
            let socket = socket.clone();
            let ctx = Arc::clone(&ctx);
            let stop = Arc::clone(&stop_fuzz);
            thread::spawn(move || fuzz(&socket, &ctx, seed.wrapping_add(i as u64), &stop))
        })
        .collect();
    // The normal client works while every slow client is still open: they close at the
    // timeouts, and `Slowloris::check` makes sure none closed earlier.
    let until = slow.opened + HEADER_READ_TIMEOUT.min(BODY_READ_TIMEOUT) / 10 * 9;
    let driver = thread::spawn(move || slow.drive());
    let normal = normal_client(&socket, &ctx, until);
    let fuzzed: Vec<Result<FuzzReport>> = fuzzers
        .into_iter()
        .map(|f| f.join().map_err(|_| anyhow!("a fuzz thread panicked")))
        .collect();
    stop_fuzz.store(true, Ordering::Relaxed);
    let slow = driver
        .join()
        .map_err(|_| anyhow!("the slow clients' driver panicked"))?;

    let mut report = FuzzReport::default();
    for fuzzed in fuzzed {
        report.add(&fuzzed?);
    }
    eprintln!("{}", report.summary());
    ensure!(
        report.failures.is_empty(),
        "{} of {} fuzz requests got a wrong answer:\n{}",
        report.failures.len(),
        report.sent,
        report.failures.join("\n\n")
    );
    ensure!(report.sent >= FUZZ_THREADS * PER_THREAD, "fuzz cut short");
    let normal = normal?;
    let silent = silent.finish()?;
    eprintln!("{}", normal.summary());
    ensure!(
        normal.max <= MAX_LATENCY,
        "the normal client waited {:?} (bound {MAX_LATENCY:?}): {}",
        normal.max,
        normal.summary()
    );
    slow.check()?;
    eprintln!("{}\n{silent}", slow.summary());

    let checked = sample_messages(&socket)?;
    eprintln!("api fuzz: {checked} refusal messages checked");
    let big = body_limits(&socket, pid)?;
    eprintln!("{big}");

    ensure!(alive(pid), "lbd is gone");
    let after = Unchanged::take(lbd)?;
    before.same_as(&after)?;
    lbd.expect_no_errors(|_| false)?;
    ensure!(!lbd.log().contains("panicked"), "lbd logged a panic");
    Ok(())
}

/// What no request may change.
struct Unchanged {
    state: StateReply,
    status: Status,
    export: String,
    state_file: Vec<u8>,
    debug: Debug,
    maps: MapSnapshot,
}

impl Unchanged {
    fn take(lbd: &Lbd) -> Result<Self> {
        let lbctl = lbd.lbctl()?;
        Ok(Self {
            state: lbctl.state()?,
            status: lbctl.status()?,
            export: lbctl.export()?,
            state_file: fs::read(&lbd.state_path).context("reading the state file")?,
            debug: lbctl.debug("status")?,
            maps: lbd.maps()?.snapshot()?,
        })
    }

    fn same_as(&self, after: &Self) -> Result<()> {
        ensure!(
            after.state == self.state,
            "desired state changed:\n{:?}\n->\n{:?}",
            self.state,
            after.state
        );
        ensure!(
            after.status == self.status,
            "status changed:\n{:?}\n->\n{:?}",
            self.status,
            after.status
        );
        ensure!(after.export == self.export, "export changed");
        ensure!(
            after.state_file == self.state_file,
            "the state file changed"
        );
        ensure!(
            after.debug == self.debug,
            "the debug switch changed: {:?}",
            after.debug
        );
        ensure!(after.maps == self.maps, "the pinned maps changed");
        Ok(())
    }
}

/// Names the fuzz builds requests from.
struct Ctx {
    /// `10.x.x.x:80/tcp`.
    vip: String,
    backends: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Random requests.

/// One request as sent, and what may come back.
struct Req {
    label: &'static str,
    bytes: Vec<u8>,
    /// Replies due (pipelines have several); fewer is fine once lbd closes on an error.
    replies: usize,
    /// A 2xx is fine (a read or a dry run); otherwise only 4xx.
    may_succeed: bool,
    /// lbd may fairly wait for more bytes (the request may look incomplete).
    may_stall: bool,
    /// HEAD: replies carry no body.
    head: bool,
}

impl Req {
    fn new(label: &'static str, bytes: Vec<u8>) -> Self {
        Self {
            label,
            bytes,
            replies: 1,
            may_succeed: false,
            may_stall: false,
            head: false,
        }
    }

    fn ok(mut self) -> Self {
        self.may_succeed = true;
        self
    }

    fn stall(mut self) -> Self {
        self.may_stall = true;
        self
    }
}

/// `method target` with `headers`, a Content-Length when `body` is `Some`.
fn request(method: &str, target: &str, headers: &[String], body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: lbd\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if let Some(body) = body {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

fn json_post(target: &str, body: &[u8]) -> Vec<u8> {
    request(
        "POST",
        target,
        &["Content-Type: application/json".to_owned()],
        Some(body),
    )
}

/// Valid bodies that change nothing: dry runs first in the object, so that up to four byte
/// edits cannot turn one into a real change (`"dry_run":true` cannot become `false` or another
/// key in four edits), and the debug switch set to what it is.
fn base_bodies(ctx: &Ctx) -> Vec<(&'static str, String)> {
    let vip = &ctx.vip;
    let b0 = &ctx.backends[0];
    let b1 = &ctx.backends[1];
    vec![
        (
            "/v1/changes",
            r#"{"dry_run":true,"changes":[{"op":"vip_add","vip":"10.200.9.9:80/tcp","ring_size":251},{"op":"backend_add","vip":"10.200.9.9:80/tcp","address":"10.10.9.9","weight":7}]}"#
                .to_owned(),
        ),
        (
            "/v1/changes",
            format!(
                r#"{{"dry_run":true,"changes":[{{"op":"backend_weight","vip":"{vip}","address":"{b0}","weight":3}},{{"op":"backend_drain","vip":"{vip}","address":"{b1}"}}]}}"#
            ),
        ),
        (
            "/v1/changes",
            format!(
                r#"{{"dry_run":true,"changes":[{{"op":"backend_del","vip":"{vip}","address":"{b1}"}},{{"op":"vip_del","vip":"{vip}"}}]}}"#
            ),
        ),
        (
            "/v1/apply",
            format!(
                r#"{{"dry_run":true,"vip":[{{"address":"{vip}","ring_size":4099,"backends":[{{"address":"{b0}","weight":1}}]}}]}}"#
            ),
        ),
        ("/v1/apply", r#"{"dry_run":true,"vip":[]}"#.to_owned()),
    ]
}

/// Up to four single-byte edits: replace, insert (often a JSON metacharacter), delete.
fn mutate(rng: &mut Rng, body: &[u8]) -> Vec<u8> {
    const SPECIAL: &[u8] = b"{}[]\",:\\ 0-e.\xff\xc3\x00\n";
    let mut out = body.to_vec();
    for _ in 0..=rng.below(4) {
        if out.is_empty() {
            out.push(rng.byte());
            continue;
        }
        let at = rng.below(out.len());
        let byte = if rng.chance(60) {
            rng.pick(SPECIAL)
        } else {
            rng.byte()
        };
        match rng.below(3) {
            0 => out[at] = byte,
            1 => out.insert(at, byte),
            _ => {
                out.remove(at);
            }
        }
    }
    out
}

/// A random JSON value, built from the API's own words, `depth` levels at most.
fn random_json(rng: &mut Rng, depth: usize, out: &mut String) {
    const KEYS: &[&str] = &[
        "changes",
        "op",
        "vip",
        "address",
        "weight",
        "ring_size",
        "hash",
        "check",
        "backends",
        "drain",
        "colour",
        "",
        "\u{0}",
        "dry_run",
    ];
    const WORDS: &[&str] = &[
        "vip_add",
        "backend_add",
        "vip_del",
        "10.200.0.1:80/tcp",
        "10.10.0.1",
        "::1",
        "",
        "\u{fffd}",
        "\\ud800",
        "tcp",
        "5tuple",
        "x",
    ];
    let kind = if depth == 0 {
        rng.below(5)
    } else {
        rng.below(7)
    };
    match kind {
        0 => out.push_str(rng.pick(&["null", "true", "false"])),
        1 => {
            let n = rng.pick(&[
                "0",
                "-1",
                "65536",
                "4294967296",
                "1e400",
                "-0.5",
                "18446744073709551616",
                "7",
            ]);
            out.push_str(n);
        }
        2 | 3 => {
            out.push('"');
            out.push_str(rng.pick(WORDS));
            out.push('"');
        }
        4 => out.push_str(rng.pick(&["", "nul", "[", "{", "\"", "}", "]]"])),
        5 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                random_json(rng, depth - 1, out);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "\"{}\":", rng.pick(KEYS));
                random_json(rng, depth - 1, out);
            }
            out.push('}');
        }
    }
}

/// One random request of any kind.
#[allow(clippy::too_many_lines)] // a table of kinds
fn random_request(rng: &mut Rng, ctx: &Ctx, bases: &[(&'static str, String)]) -> Req {
    const TARGETS: &[&str] = &[
        "/v1/state",
        "/v1/status",
        "/v1/stats",
        "/v1/debug",
        "/v1/changes",
        "/v1/apply",
        "/v1/flows",
        "/",
        "/v1",
        "/v1/",
        "/v1/state/",
        "/v2/state",
        "/V1/STATE",
        "//v1/state",
        "/v1/../v1/state",
        "/v1/%73tate",
        "/v1/state%00",
        "/v1/status?idle_timeout=-1",
        "/v1/status?idle_timeout=99999999999999999999",
        "/v1/status?idle_timeout=5&idle_timeout=6",
        "/v1/status?%ff=1",
        "/v1/flows?vip=10.200.0.1:80/tcp&backend=not-an-ip",
        "/v1/flows?vip=&backend=",
        "/v1/flows?wait=maybe",
        "/metrics",
    ];
    const METHODS: &[&str] = &[
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get",
    ];
    const READS: &[&str] = &["/v1/state", "/v1/status", "/v1/stats", "/v1/debug"];
    const CONTENT_TYPES: &[&str] = &[
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/merge-patch+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "\u{e9}",
    ];
    let (target, base) = &bases[rng.below(bases.len())];
    match rng.below(10) {
        // A valid body with a few byte edits.
        0..=2 => {
            let body = mutate(rng, base.as_bytes());
            Req::new("mutated body", json_post(target, &body)).ok()
        }
        // A random JSON value; objects carry the dry run first.
        3 => {
            let mut body = String::new();
            if rng.chance(70) {
                body.push_str("{\"dry_run\":true,");
                let mut inner = String::new();
                random_json(rng, 5, &mut inner);
                let _ = write!(body, "\"{}\":", rng.pick(&["changes", "vip", "x"]));
                body.push_str(&inner);
                body.push('}');
            } else {
                random_json(rng, 5, &mut body);
                // An object without the dry run could be a real apply (`{}` empties the
                // state): only other values go bare.
                if body.starts_with('{') {
                    body = format!("[{body}]");
                }
            }
            let target = rng.pick(&["/v1/changes", "/v1/apply"]);
            Req::new("random json", json_post(target, body.as_bytes())).ok()
        }
        // Random bytes.
        4 => {
            let len = rng.below(2000);
            let body: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            let target = rng.pick(&["/v1/changes", "/v1/apply", "/v1/debug"]);
            let method = if target == "/v1/debug" { "PUT" } else { "POST" };
            let ct = format!("Content-Type: {}", rng.pick(CONTENT_TYPES));
            Req::new("random bytes", request(method, target, &[ct], Some(&body)))
        }
        // Any method on any path.
        5 => {
            let method = rng.pick(METHODS);
            let target = rng.pick(TARGETS);
            let body = rng.chance(30).then(|| mutate(rng, base.as_bytes()));
            let read = matches!(method, "GET" | "HEAD")
                && READS.iter().any(|r| target.split('?').next() == Some(*r));
            let mut req = Req::new(
                "method and path",
                request(method, target, &[], body.as_deref()),
            );
            req.head = method == "HEAD";
            // A mutated dry run posted to its own endpoint may be accepted as a dry run.
            req.may_succeed = read || body.is_some();
            req
        }
        // A dry run with odd headers.
        6 => {
            let mut headers = Vec::new();
            for _ in 0..=rng.below(4) {
                headers.push(match rng.below(8) {
                    0 => format!("Content-Type: {}", rng.pick(CONTENT_TYPES)),
                    1 => format!("X-Junk: {}", "v".repeat(rng.below(8000))),
                    2 => "X-Bin: \u{e9}\u{fffd}".to_owned(),
                    3 => "Content-Encoding: gzip".to_owned(),
                    4 => "Accept: */*".to_owned(),
                    5 => format!("X-{}: 1", rng.below(1000)),
                    6 => "Connection: keep-alive, close".to_owned(),
                    _ => "Cookie: a=b".to_owned(),
                });
            }
            Req::new(
                "odd headers",
                request("POST", target, &headers, Some(base.as_bytes())),
            )
            .ok()
        }
        // Broken framing.
        7 | 8 => framing(rng, ctx, base),
        // Several requests in one write.
        _ => {
            let mut req = Req::new("pipeline", Vec::new()).ok();
            req.replies = 2 + rng.below(3);
            for i in 0..req.replies {
                let part = if i + 1 == req.replies && rng.chance(50) {
                    (0..=rng.below(200))
                        .map(|_| rng.byte())
                        .chain(*b"\r\n\r\n")
                        .collect()
                } else if rng.chance(50) {
                    request("GET", rng.pick(READS), &[], None)
                } else {
                    json_post(target, &mutate(rng, base.as_bytes()))
                };
                req.bytes.extend_from_slice(&part);
            }
            req
        }
    }
}

/// A request with broken HTTP framing (or odd but valid framing).
#[allow(clippy::too_many_lines)] // a table of framings
fn framing(rng: &mut Rng, _ctx: &Ctx, base: &str) -> Req {
    let body = base.as_bytes();
    let post = "POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\n";
    let chunked = format!("{post}Transfer-Encoding: chunked\r\n\r\n");
    let with = |head: &str, rest: &[u8]| [head.as_bytes(), rest].concat();
    match rng.below(22) {
        0 => Req::new(
            "conflicting Content-Length",
            with(
                &format!(
                    "{post}Content-Length: {}\r\nContent-Length: {}\r\n\r\n",
                    body.len(),
                    body.len() + 1
                ),
                body,
            ),
        ),
        1 => {
            let cl = rng.pick(&[
                "abc",
                "-1",
                "+5",
                "1 2",
                "0x10",
                "99999999999999999999999",
                "",
            ]);
            Req::new(
                "bad Content-Length",
                with(&format!("{post}Content-Length: {cl}\r\n\r\n"), body),
            )
        }
        2 => Req::new(
            "Content-Length and chunked",
            with(
                &format!(
                    "{post}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                    body.len()
                ),
                &[body, b"\r\n0\r\n\r\n"].concat(),
            ),
        )
        .ok(),
        3 => Req::new(
            "not chunked",
            with(
                &format!(
                    "{post}Transfer-Encoding: {}\r\n\r\n",
                    rng.pick(&["gzip", "chunked, gzip", "identity", "chunkedx"])
                ),
                body,
            ),
        ),
        4 => Req::new(
            "bad chunk size",
            with(
                &chunked,
                format!(
                    "{}\r\n",
                    rng.pick(&["zz", "-1", "0x5", " ", "fffffffffffffffffff"])
                )
                .as_bytes(),
            ),
        )
        // Some of these hyper may take as a size it waits for the chunk of.
        .stall(),
        5 => Req::new("chunk without CRLF", with(&chunked, b"2\r\n{}XX0\r\n\r\n")),
        6 => {
            // Valid chunks of random sizes: a dry run that must go through.
            let mut out = chunked.clone().into_bytes();
            let mut rest = body;
            while !rest.is_empty() {
                let n = (rng.below(40) + 1).min(rest.len());
                out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                out.extend_from_slice(&rest[..n]);
                out.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            out.extend_from_slice(b"0\r\n\r\n");
            Req::new("chunked", out).ok()
        }
        7 => Req::new(
            "chunk extension junk",
            with(
                &chunked,
                format!("{:x};{}\r\n", body.len(), "e".repeat(20_000)).as_bytes(),
            ),
        )
        .stall(),
        8 => Req::new(
            "HTTP/1.0 chunked",
            b"POST /v1/changes HTTP/1.0
Transfer-Encoding: chunked

0

"
            .to_vec(),
        ),
        9 => {
            let line = rng.pick(&[
                "GET /v1/state HTTP/2.0",
                "GET /v1/state HTTP/9.9",
                "GET /v1/state HTTP/1.1 extra",
                "GET /v1/state FTP/1.1",
                "G@T /v1/state HTTP/1.1",
                "GET\t/v1/state\tHTTP/1.1",
                "GET /v1/st ate HTTP/1.1",
                "GET /v1/state\u{0} HTTP/1.1",
                " GET /v1/state HTTP/1.1",
                "GET",
                "\u{1}\u{2}\u{3}",
                "PRI * HTTP/2.0",
            ]);
            Req::new(
                "bad request line",
                format!("{line}\r\nHost: lbd\r\n\r\n").into_bytes(),
            )
        }
        10 => {
            let header = rng.pick(&[
                "NoColon",
                "Bad Name: x",
                "Name : x",
                ": empty",
                "X-Nul: a\u{0}b",
                " folded: x",
                "X-Ctl: \u{7f}",
            ]);
            Req::new(
                "bad header",
                format!("GET /v1/state HTTP/1.1\r\nHost: lbd\r\n{header}\r\n\r\n").into_bytes(),
            )
        }
        11 => Req::new(
            "head too large",
            format!(
                "GET /v1/state HTTP/1.1\r\nHost: lbd\r\nX-Big: {}\r\n\r\n",
                "b".repeat(500_000)
            )
            .into_bytes(),
        ),
        12 => {
            let mut head = "GET /v1/state HTTP/1.1\r\nHost: lbd\r\n".to_owned();
            for i in 0..150 {
                let _ = write!(head, "X-H{i}: {i}\r\n");
            }
            head.push_str("\r\n");
            Req::new("too many headers", head.into_bytes())
        }
        13 => Req::new(
            "URI too long",
            format!(
                "GET /v1/state?{} HTTP/1.1\r\nHost: lbd\r\n\r\n",
                "q".repeat(70_000)
            )
            .into_bytes(),
        ),
        14 => Req::new(
            "absolute URI",
            b"GET http://lbd/v1/state HTTP/1.1\r\nHost: lbd\r\n\r\n".to_vec(),
        )
        .ok(),
        15 => Req::new("bare LF", b"GET /v1/state HTTP/1.1\nHost: lbd\n\n".to_vec())
            .ok()
            .stall(),
        16 => Req::new(
            "Expect: 100-continue",
            with(
                &format!(
                    "{post}Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                ),
                body,
            ),
        )
        .ok(),
        17 => Req::new(
            "deep nesting",
            json_post(
                "/v1/changes",
                format!(
                    r#"{{"dry_run":true,"changes":[{{"vip":{}{},"op":"vip_add"}}]}}"#,
                    "[".repeat(100_000),
                    "]".repeat(100_000)
                )
                .as_bytes(),
            ),
        ),
        18 => Req::new(
            "invalid UTF-8",
            json_post(
                "/v1/changes",
                b"{\"dry_run\":true,\"changes\":[{\"op\":\"vip_del\",\"vip\":\"\xc3\x28\"}]}",
            ),
        ),
        19 => Req::new(
            "trailer junk",
            with(
                &chunked,
                format!("0\r\nX-Trailer: {}\r\n\r\n", "t".repeat(100)).as_bytes(),
            ),
        )
        .ok(),
        20 => Req::new("body on GET", request("GET", "/v1/status", &[], Some(body))).ok(),
        _ => Req::new(
            "random garbage head",
            (0..=rng.below(300))
                .map(|_| rng.byte())
                .chain(*b"\r\n\r\n")
                .collect(),
        )
        .stall(),
    }
}

// ---------------------------------------------------------------------------------------------
// Replies.

struct Reply {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The message of a JSON refusal, or the status line of hyper's bodiless one.
    fn message(&self) -> String {
        serde_json::from_slice::<ErrorReply>(&self.body)
            .map_or_else(|_| format!("{} {}", self.status, self.reason), |r| r.error)
    }
}

/// What came back on one connection: whole replies, and how it ended.
struct Exchange {
    replies: Vec<Reply>,
    /// No (further) reply within the wait, the connection still open.
    stalled: bool,
}

/// Sends `bytes` on a fresh connection and reads up to `replies` replies (1xx skipped).
fn exchange(
    socket: &Path,
    bytes: &[u8],
    replies: usize,
    head: bool,
    wait: Duration,
) -> Result<Exchange> {
    let mut stream = UnixStream::connect(socket).context("connecting")?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    // lbd may answer and close before reading everything (a head it refuses): keep going.
    if let Err(e) = stream.write_all(bytes)
        && !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
    {
        return Err(e).context("writing the request");
    }
    let mut reader = ReplyReader::new(stream, wait)?;
    let mut out = Exchange {
        replies: Vec::new(),
        stalled: false,
    };
    while out.replies.len() < replies {
        match reader.next(head)? {
            Next::Reply(reply) if reply.status < 200 => {}
            Next::Reply(reply) => out.replies.push(reply),
            Next::Closed => break,
            Next::Stalled => {
                out.stalled = true;
                break;
            }
        }
    }
    Ok(out)
}

enum Next {
    Reply(Reply),
    Closed,
    Stalled,
}

/// Reads HTTP/1.1 replies off a stream, one at a time.
struct ReplyReader {
    stream: UnixStream,
    buf: Vec<u8>,
    eof: bool,
    deadline: Instant,
    wait: Duration,
}

impl ReplyReader {
    fn new(stream: UnixStream, wait: Duration) -> Result<Self> {
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            eof: false,
            deadline: Instant::now() + wait,
            wait,
        })
    }

    /// Reads more; false at EOF or past the deadline.
    fn fill(&mut self) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 16_384];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= self.deadline {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    self.eof = true;
                    return Ok(false);
                }
                Err(e) => return Err(e).context("reading the reply"),
            }
        }
    }

    fn next(&mut self, head_request: bool) -> Result<Next> {
        self.deadline = Instant::now() + self.wait;
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            if !self.fill()? {
                return Ok(self.ended());
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        ensure!(version == "HTTP/1.1", "bad status line {status_line:?}");
        let reason = parts.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        self.buf.drain(..end + 4);
        let mut reply = Reply {
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if head_request || status < 200 || status == 204 || status == 304 {
            return Ok(Next::Reply(reply));
        }
        if let Some(len) = reply.header("content-length") {
            let len: usize = len.parse().context("reply Content-Length")?;
            while self.buf.len() < len {
                if !self.fill()? {
                    bail!(
                        "reply body cut short: {}",
                        String::from_utf8_lossy(&self.buf)
                    );
                }
            }
            reply.body = self.buf.drain(..len).collect();
        } else if reply
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                let Some(line) = find(&self.buf, b"\r\n") else {
                    if !self.fill()? {
                        bail!("chunked reply cut short");
                    }
                    continue;
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line]).into_owned();
                let size = usize::from_str_radix(size_text.trim(), 16)
                    .with_context(|| format!("reply chunk size {size_text:?}"))?;
                while self.buf.len() < line + 2 + size + 2 {
                    if !self.fill()? {
                        bail!("chunked reply cut short");
                    }
                }
                reply
                    .body
                    .extend_from_slice(&self.buf[line + 2..line + 2 + size]);
                self.buf.drain(..line + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill()? {}
            reply.body = std::mem::take(&mut self.buf);
        }
        Ok(Next::Reply(reply))
    }

    fn ended(&self) -> Next {
        if self.eof {
            Next::Closed
        } else {
            Next::Stalled
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The rules every reply follows.
fn judge(req: &Req, reply: &Reply) -> Result<()> {
    let status = reply.status;
    ensure!(status < 500, "a server error: {status} {}", reply.message());
    if (200..300).contains(&status) {
        ensure!(req.may_succeed, "accepted: {status}");
        if let Ok(change) = serde_json::from_slice::<ChangeReply>(&reply.body) {
            ensure!(!change.applied, "a change was applied: {change:?}");
        }
        return Ok(());
    }
    ensure!(
        (400..500).contains(&status),
        "neither 2xx nor 4xx: {status} {}",
        reply.reason
    );
    if req.head {
        return Ok(());
    }
    if reply.body.is_empty() {
        // hyper's own answer to a head it cannot parse: the status line says what.
        ensure!(
            matches!(status, 400 | 414 | 431) && !reply.reason.is_empty(),
            "a {status} without a message"
        );
        return Ok(());
    }
    ensure!(
        reply.header("content-type") == Some("application/json"),
        "a {status} that is not JSON: {:?}",
        String::from_utf8_lossy(&reply.body)
    );
    let error: ErrorReply = serde_json::from_slice(&reply.body).context("not an ErrorReply")?;
    ensure!(!error.error.trim().is_empty(), "an empty error message");
    Ok(())
}

#[derive(Default)]
struct FuzzReport {
    sent: usize,
    replies: usize,
    by_status: std::collections::BTreeMap<u16, usize>,
    stalled: usize,
    failures: Vec<String>,
}

impl FuzzReport {
    fn add(&mut self, other: &Self) {
        self.sent += other.sent;
        self.replies += other.replies;
        self.stalled += other.stalled;
        for (status, n) in &other.by_status {
            *self.by_status.entry(*status).or_default() += n;
        }
        self.failures.extend(other.failures.iter().cloned());
    }

    fn summary(&self) -> String {
        format!(
            "api fuzz: {} requests, {} replies by status {:?}, {} left waiting (lbd waits for \
             more bytes), {} wrong",
            self.sent,
            self.replies,
            self.by_status,
            self.stalled,
            self.failures.len()
        )
    }
}

fn fuzz(socket: &Path, ctx: &Ctx, seed: u64, stop: &AtomicBool) -> FuzzReport {
    let mut rng = Rng::new(seed);
    let bases = base_bodies(ctx);
    let mut report = FuzzReport::default();
    for i in 0..PER_THREAD {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let req = random_request(&mut rng, ctx, &bases);
        report.sent += 1;
        let wait = if req.may_stall {
            STALL_WAIT
        } else {
            REPLY_TIMEOUT
        };
        let describe = || {
            format!(
                "seed {seed} #{i} ({}): {:?}",
                req.label,
                String::from_utf8_lossy(&req.bytes[..req.bytes.len().min(300)])
            )
        };
        let exchange = match exchange(socket, &req.bytes, req.replies, req.head, wait) {
            Ok(exchange) => exchange,
            Err(e) => {
                report.failures.push(format!("{}: {e:#}", describe()));
                continue;
            }
        };
        if exchange.stalled && exchange.replies.is_empty() {
            report.stalled += 1;
            if !req.may_stall {
                report
                    .failures
                    .push(format!("{}: no reply within {wait:?}", describe()));
            }
        }
        if exchange.replies.is_empty() && !exchange.stalled && !req.may_stall {
            report
                .failures
                .push(format!("{}: closed without a reply", describe()));
        }
        for reply in &exchange.replies {
            report.replies += 1;
            *report.by_status.entry(reply.status).or_default() += 1;
            if let Err(e) = judge(&req, reply) {
                report.failures.push(format!("{}: {e:#}", describe()));
            }
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Slow, silent and normal clients.

/// Slow clients: each sends one byte per [`DRIBBLE`] into a request head or body it never
/// finishes.
struct Slowloris {
    conns: Vec<SlowConn>,
    opened: Instant,
}

struct SlowConn {
    stream: UnixStream,
    body: bool,
    reply: Vec<u8>,
    closed: Option<Instant>,
}

impl Slowloris {
    fn open(socket: &Path) -> Result<Self> {
        let opened = Instant::now();
        let mut conns = Vec::new();
        for i in 0..SLOW_HEADS + SLOW_BODIES {
            let mut stream = UnixStream::connect(socket).context("slow client")?;
            let body = i >= SLOW_HEADS;
            let start = if body {
                "POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n{\"dry_run\":true,\"changes\":["
            } else {
                "POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nX-Slow: "
            };
            stream.write_all(start.as_bytes())?;
            stream.set_nonblocking(true)?;
            conns.push(SlowConn {
                stream,
                body,
                reply: Vec::new(),
                closed: None,
            });
        }
        Ok(Self { conns, opened })
    }

    /// Dribbles until every connection is closed or long past the timeouts.
    fn drive(mut self) -> Self {
        let give_up = self.opened + HEADER_READ_TIMEOUT.max(BODY_READ_TIMEOUT) + 2 * TIMEOUT_SLACK;
        while Instant::now() < give_up && self.conns.iter().any(|c| c.closed.is_none()) {
            for conn in self.conns.iter_mut().filter(|c| c.closed.is_none()) {
                let byte: &[u8] = if conn.body { b" " } else { b"a" };
                match conn.stream.write(byte) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => conn.closed = Some(Instant::now()),
                }
                let mut chunk = [0u8; 4096];
                loop {
                    match conn.stream.read(&mut chunk) {
                        Ok(0) => {
                            conn.closed.get_or_insert_with(Instant::now);
                            break;
                        }
                        Ok(n) => conn.reply.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            conn.closed.get_or_insert_with(Instant::now);
                            break;
                        }
                    }
                }
            }
            thread::sleep(DRIBBLE);
        }
        self
    }

    /// Closed at the timeouts, not before: heads without a word, bodies with a 408.
    fn check(&self) -> Result<()> {
        let mut wrong = Vec::new();
        for (i, conn) in self.conns.iter().enumerate() {
            let timeout = if conn.body {
                BODY_READ_TIMEOUT
            } else {
                HEADER_READ_TIMEOUT
            };
            let Some(closed) = conn.closed else {
                wrong.push(format!("slow client {i}: still open"));
                continue;
            };
            let after = closed - self.opened;
            // The driver notices a close at its next round.
            if after + Duration::from_millis(100) < timeout || after > timeout + TIMEOUT_SLACK {
                wrong.push(format!(
                    "slow client {i}: closed after {after:?}, timeout {timeout:?}"
                ));
            }
            let reply = String::from_utf8_lossy(&conn.reply);
            let fine = if conn.body {
                reply.starts_with("HTTP/1.1 408 ")
                    && reply.contains("request body not received within 10 s")
            } else {
                reply.is_empty()
            };
            if !fine {
                wrong.push(format!(
                    "slow client {i} (body: {}): got {reply:?}",
                    conn.body
                ));
            }
        }
        ensure!(
            wrong.is_empty(),
            "{} slow clients wrong:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        Ok(())
    }

    fn summary(&self) -> String {
        let times: Vec<Duration> = self
            .conns
            .iter()
            .filter_map(|c| c.closed.map(|t| t - self.opened))
            .collect();
        format!(
            "slowloris: {} slow clients ({SLOW_HEADS} in the head, {SLOW_BODIES} in the body, a \
             byte per {DRIBBLE:?}) closed between {:?} and {:?} after opening",
            self.conns.len(),
            times.iter().min().copied().unwrap_or_default(),
            times.iter().max().copied().unwrap_or_default()
        )
    }
}

/// A client that connects and sends nothing, and one that goes idle after a keep-alive
/// request: both must be closed at the header timeout.
struct Silent {
    silent: (UnixStream, Instant),
    idle: (UnixStream, Instant),
}

impl Silent {
    fn open(socket: &Path) -> Result<Self> {
        let silent = UnixStream::connect(socket)?;
        let silent_at = Instant::now();
        let idle = UnixStream::connect(socket)?;
        let mut reader = ReplyReader::new(idle.try_clone()?, REPLY_TIMEOUT)?;
        (&idle).write_all(b"GET /v1/debug HTTP/1.1\r\nHost: lbd\r\n\r\n")?;
        let Next::Reply(reply) = reader.next(false)? else {
            bail!("no reply to the keep-alive request");
        };
        ensure!(reply.status == 200, "keep-alive request: {}", reply.status);
        let idle_at = Instant::now();
        Ok(Self {
            silent: (silent, silent_at),
            idle: (idle, idle_at),
        })
    }

    fn finish(self) -> Result<String> {
        let mut out = String::new();
        for (what, (mut stream, since)) in [("silent", self.silent), ("idle", self.idle)] {
            stream.set_read_timeout(Some(HEADER_READ_TIMEOUT + TIMEOUT_SLACK))?;
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .with_context(|| format!("the {what} client was not closed"))?;
            let after = since.elapsed();
            ensure!(
                rest.is_empty(),
                "the {what} client got {:?}",
                String::from_utf8_lossy(&rest)
            );
            ensure!(
                after + Duration::from_millis(200) >= HEADER_READ_TIMEOUT
                    && after <= HEADER_READ_TIMEOUT + TIMEOUT_SLACK,
                "the {what} client was closed after {after:?} (timeout {HEADER_READ_TIMEOUT:?})"
            );
            let _ = write!(out, "{what} client closed after {after:.1?}; ");
        }
        Ok(out.trim_end_matches("; ").to_owned())
    }
}

struct Latencies {
    samples: Vec<Duration>,
    max: Duration,
}

impl Latencies {
    fn summary(&self) -> String {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let at = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        format!(
            "normal client under slowloris and fuzz: {} requests, p50 {:?}, p99 {:?}, max {:?}",
            sorted.len(),
            at(0.5),
            at(0.99),
            self.max
        )
    }
}

/// Reads and dry runs until `until`, each timed.
fn normal_client(socket: &Path, ctx: &Ctx, until: Instant) -> Result<Latencies> {
    let dry = base_bodies(ctx)[1].1.clone();
    let requests = [
        request("GET", "/v1/status", &["Connection: close".to_owned()], None),
        request("GET", "/v1/state", &["Connection: close".to_owned()], None),
        json_post("/v1/changes", dry.as_bytes()),
    ];
    let mut samples = Vec::new();
    let mut i = 0;
    while Instant::now() < until {
        let req = &requests[i % requests.len()];
        i += 1;
        let t = Instant::now();
        let exchange = exchange(socket, req, 1, false, REPLY_TIMEOUT)?;
        let took = t.elapsed();
        let reply = exchange
            .replies
            .first()
            .with_context(|| format!("normal client: no reply after {took:?}"))?;
        ensure!(
            reply.status == 200,
            "normal client: {} {}",
            reply.status,
            reply.message()
        );
        samples.push(took);
        thread::sleep(Duration::from_millis(20));
    }
    let max = samples.iter().max().copied().unwrap_or_default();
    Ok(Latencies { samples, max })
}

// ---------------------------------------------------------------------------------------------
// Messages and limits.

/// Refusals whose message must name the problem: (request, status, substring of the message,
/// lower case; the status line for hyper's bodiless answers).
#[allow(clippy::too_many_lines)] // a table of cases
fn sample_messages(socket: &Path) -> Result<usize> {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let post = "POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\n";
    let chunked = format!("{post}Transfer-Encoding: chunked\r\n\r\n");
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (json_post("/v1/changes", b"{\"dry_run\":true,"), 400, "request body (json): eof while parsing"),
        (
            json_post(
                "/v1/changes",
                format!(r#"{{"dry_run":true,"changes":[{{"vip":{nested},"op":"vip_add"}}]}}"#)
                    .as_bytes(),
            ),
            400,
            "recursion limit exceeded",
        ),
        (
            json_post("/v1/apply", nested.as_bytes()),
            400,
            "expected a json object, got an array",
        ),
        (json_post("/v1/apply", b"[]"), 400, "expected a json object, got an array"),
        (
            json_post(
                "/v1/changes",
                b"{\"dry_run\":true,\"changes\":[{\"op\":\"vip_del\",\"vip\":\"\xff\"}]}",
            ),
            400,
            "invalid unicode",
        ),
        (
            json_post("/v1/changes", br#"{"dry_run":true,"changes":[],"bogus":1}"#),
            400,
            "unknown field `bogus`",
        ),
        (
            json_post(
                "/v1/changes",
                br#"{"dry_run":true,"changes":[{"op":"vip_add","vip":"10.9.9.9:80/tcp","colour":"red"}]}"#,
            ),
            400,
            "unknown field `colour`",
        ),
        (
            request("DELETE", "/v1/changes", &[], None),
            405,
            "delete /v1/changes is not allowed: use post",
        ),
        (request("GET", "/v1/nothing", &[], None), 404, "no such endpoint: /v1/nothing"),
        (
            request(
                "POST",
                "/v1/changes",
                &["Content-Type: text/plain".to_owned()],
                Some(b"{}"),
            ),
            415,
            "content-type must be application/json",
        ),
        (
            [chunked.as_bytes(), b"zz\r\n{}\r\n0\r\n\r\n"].concat(),
            400,
            "invalid chunk size line",
        ),
        (
            format!("{post}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}").into_bytes(),
            400,
            "400 bad request",
        ),
        (
            format!(
                "GET /v1/state HTTP/1.1\r\nHost: lbd\r\nX-Big: {}\r\n\r\n",
                "b".repeat(500_000)
            )
            .into_bytes(),
            431,
            "431 request header fields too large",
        ),
        // Under the head limit (64 KiB): served.
        (
            format!(
                "GET /v1/state HTTP/1.1\r\nHost: lbd\r\nX-Big: {}\r\n\r\n",
                "b".repeat(HEAD_LIMIT - 1000)
            )
            .into_bytes(),
            200,
            "",
        ),
        (
            format!(
                "GET /v1/state HTTP/1.1\r\nHost: lbd\r\nX-Big: {}\r\n\r\n",
                "b".repeat(HEAD_LIMIT)
            )
            .into_bytes(),
            431,
            "431 request header fields too large",
        ),
        (b"\x16\x03\x01garbage\r\n\r\n".to_vec(), 400, "400 bad request"),
        (
            json_post(
                "/v1/changes",
                format!(r#"{{"dry_run":true,"pad":"{}"}}"#, "x".repeat(BODY_LIMIT)).as_bytes(),
            ),
            413,
            "larger than the limit of 1048576 bytes",
        ),
    ];
    let mut wrong = Vec::new();
    for (bytes, status, needle) in &cases {
        let what = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
        let exchange = exchange(socket, bytes, 1, false, REPLY_TIMEOUT)?;
        let Some(reply) = exchange.replies.first() else {
            wrong.push(format!("{what:?}: no reply"));
            continue;
        };
        let message = reply.message();
        if reply.status != *status || !message.to_lowercase().contains(needle) {
            wrong.push(format!(
                "{what:?}: {} {message:?}, expected {status} with {needle:?}",
                reply.status
            ));
        }
    }
    // Pipelined: a good request, then garbage: the first is answered, then a 400 and the end.
    let mut pipeline = request("GET", "/v1/state", &[], None);
    pipeline.extend_from_slice(b"BLAH\x00\x01 nonsense\r\n\r\n");
    pipeline.extend_from_slice(&request("GET", "/v1/state", &[], None));
    let exchange = exchange(socket, &pipeline, 3, false, REPLY_TIMEOUT)?;
    let statuses: Vec<u16> = exchange.replies.iter().map(|r| r.status).collect();
    if statuses != [200, 400] {
        wrong.push(format!(
            "pipelined garbage: replies {statuses:?}, expected [200, 400]"
        ));
    }
    ensure!(
        wrong.is_empty(),
        "{} refusals without the right message:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(cases.len() + 1)
}

/// Bodies around the limit, and 100x it, with lbd's peak RSS watched.
fn body_limits(socket: &Path, pid: u32) -> Result<String> {
    // A valid dry run padded with spaces to exactly `len` bytes.
    let padded = |len: usize| {
        let mut body =
            br#"{"dry_run":true,"changes":[{"op":"vip_add","vip":"10.200.9.9:80/tcp"}]}"#.to_vec();
        body.resize(len, b' ');
        body
    };
    for (len, want) in [
        (BODY_LIMIT - 1, 200),
        (BODY_LIMIT, 200),
        (BODY_LIMIT + 1, 413),
    ] {
        let exchange = exchange(
            socket,
            &json_post("/v1/changes", &padded(len)),
            1,
            false,
            REPLY_TIMEOUT,
        )?;
        let reply = exchange
            .replies
            .first()
            .with_context(|| format!("a body of {len} bytes: no reply"))?;
        ensure!(
            reply.status == want,
            "a body of {len} bytes: {} {}, expected {want}",
            reply.status,
            reply.message()
        );
        if want == 413 {
            ensure!(
                reply
                    .message()
                    .contains("larger than the limit of 1048576 bytes"),
                "413 message: {}",
                reply.message()
            );
        }
    }

    let (rss_before, _) = memory_kib(pid)?;
    reset_peak_memory(pid)?;
    let huge = 100 * BODY_LIMIT;
    // Announced (refused on its headers) and chunked (read to the drain limit, then refused),
    // four of these at once.
    let uploads: Vec<_> = [false, true, true, true]
        .into_iter()
        .map(|chunked| {
            let socket = socket.to_owned();
            thread::spawn(move || upload(&socket, huge, chunked))
        })
        .collect();
    let mut results = Vec::new();
    for upload in uploads {
        results.push(
            upload
                .join()
                .unwrap_or_else(|_| bail!("an upload panicked"))?,
        );
    }
    let (_, peak) = memory_kib(pid)?;
    for (chunked, status, message, sent) in &results {
        ensure!(
            *status == 413 && message.contains("larger than the limit"),
            "a body of {huge} bytes (chunked: {chunked}, {sent} sent): {status} {message}"
        );
    }
    let growth = peak.saturating_sub(rss_before);
    ensure!(
        growth < RSS_BOUND_KIB,
        "lbd's peak RSS grew by {growth} KiB over four {huge}-byte bodies (RSS {rss_before} KiB, \
         peak {peak} KiB)"
    );
    let sent: Vec<String> = results
        .iter()
        .map(|(chunked, _, _, sent)| {
            format!(
                "{}{} MiB",
                if *chunked { "chunked " } else { "" },
                sent >> 20
            )
        })
        .collect();
    Ok(format!(
        "body limit: {} - 1 and {0} accepted, {0} + 1 refused (413); four bodies of {} MiB \
         refused (413) after lbd took [{}]; lbd RSS {rss_before} KiB before, peak {peak} KiB \
         during (+{growth} KiB)",
        BODY_LIMIT,
        huge >> 20,
        sent.join(", ")
    ))
}

/// Streams a body of `len` bytes (never held in memory) until lbd stops taking it; returns
/// (chunked, status, message, bytes lbd took).
fn upload(socket: &Path, len: usize, chunked: bool) -> Result<(bool, u16, String, usize)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {len}")
    };
    let head = format!(
        "POST /v1/changes HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    let block = vec![b' '; 64 << 10];
    let mut chunk = format!("{:x}\r\n", block.len()).into_bytes();
    chunk.extend_from_slice(&block);
    chunk.extend_from_slice(b"\r\n");
    let piece: &[u8] = if chunked { &chunk } else { &block };
    let mut sent = 0;
    while sent < len {
        match stream.write_all(piece) {
            Ok(()) => sent += block.len(),
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                break;
            }
            Err(e) => return Err(e).context("uploading"),
        }
    }
    let mut reader = ReplyReader::new(stream, REPLY_TIMEOUT)?;
    let Next::Reply(reply) = reader.next(false)? else {
        bail!("no reply to a {len}-byte body (chunked: {chunked}) after {sent} bytes");
    };
    Ok((chunked, reply.status, reply.message(), sent))
}
