//! Probes and the checker against loopback servers that accept, answer, fail, hang or go away.
//! Current-thread runtimes, like lbd's. Time bounds leave slack for a loaded machine.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc::{UnboundedReceiver, error::TryRecvError},
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};

use super::*;
use crate::model::{Protocol, VipId};

const MS: Duration = Duration::from_millis(1);
/// Scheduling delay allowed on top of every computed bound.
const SLACK: Duration = Duration::from_millis(300);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// What a test server does with each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Accept and close.
    Close,
    /// Read the request, answer with this, close.
    Respond(&'static str),
    /// Read the request, wait, answer, close.
    SlowRespond(Duration, &'static str),
    /// Accept and hold the connection without a word.
    Hang,
}

#[derive(Default)]
struct Stats {
    accepted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    accept_times: Mutex<Vec<Instant>>,
    requests: Mutex<Vec<String>>,
}

/// Counts a connection as open while it lives.
struct Open(Arc<Stats>);

impl Open {
    fn new(stats: &Arc<Stats>) -> Self {
        let now = stats.open.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_open.fetch_max(now, Ordering::SeqCst);
        Self(stats.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A loopback listener served by a task; stops listening when dropped.
struct Server {
    addr: SocketAddr,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Self {
        Self::bind(SocketAddr::new(LOCALHOST, 0), behaviour).await
    }

    async fn bind(addr: SocketAddr, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(serve(listener, behaviour, stats.clone()));
        Self { addr, stats, task }
    }

    /// Closes the listening socket (and waits until it is closed).
    async fn stop(mut self) -> SocketAddr {
        self.task.abort();
        assert!((&mut self.task).await.unwrap_err().is_cancelled());
        self.addr
    }

    fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    fn max_open(&self) -> usize {
        self.stats.max_open.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, behaviour: Behaviour, stats: Arc<Stats>) {
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        stats.accept_times.lock().unwrap().push(Instant::now());
        let open = Open::new(&stats);
        match behaviour {
            Behaviour::Close => drop(stream),
            Behaviour::Respond(reply) => {
                tokio::spawn(answer(stream, open, Duration::ZERO, reply));
            }
            Behaviour::SlowRespond(delay, reply) => {
                tokio::spawn(answer(stream, open, delay, reply));
            }
            Behaviour::Hang => {
                tokio::spawn(hang(stream, open));
            }
        }
    }
}

/// Reads and ignores whatever comes until the peer closes.
async fn hang(mut stream: TcpStream, open: Open) {
    let mut buf = [0u8; 1024];
    while let Ok(1..) = stream.read(&mut buf).await {}
    drop(open);
}

/// Reads the request head, waits `delay`, writes `reply` and closes.
async fn answer(mut stream: TcpStream, open: Open, delay: Duration, reply: &str) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.ends_with(b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    open.0
        .requests
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&request).into_owned());
    sleep(delay).await;
    // The checker may have given up already; that is its business.
    let _ = stream.write_all(reply.as_bytes()).await;
    drop(open);
}

fn vip(port: u16) -> VipId {
    VipId {
        addr: "10.0.0.100".parse().unwrap(),
        port,
        proto: Protocol::Tcp,
    }
}

fn tcp(addr: SocketAddr, timeout: Duration) -> Probe {
    Probe {
        addr,
        kind: ProbeKind::Tcp,
        timeout,
        mark: None,
    }
}

fn http(addr: SocketAddr, path: &str, host: Option<&str>, timeout: Duration) -> Probe {
    Probe {
        addr,
        kind: ProbeKind::Http {
            path: path.to_owned(),
            host: host.map(str::to_owned),
            status: DEFAULT_STATUS,
        },
        timeout,
        mark: None,
    }
}

fn target(port: u16, probe: Probe, interval: Duration, rise: u32, fall: u32) -> Target {
    Target {
        id: TargetId {
            vip: vip(port),
            backend: probe.addr.ip(),
        },
        probe,
        interval,
        rise,
        fall,
    }
}

/// The next transition, within `within`.
async fn next_transition(
    rx: &mut UnboundedReceiver<Transition>,
    within: Duration,
) -> (Transition, Duration) {
    let start = Instant::now();
    let transition = timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no transition within {within:?}"))
        .expect("the checker is alive");
    (transition, start.elapsed())
}

/// Waits until `id` has had at least `n` probes.
async fn wait_checks(checker: &Checker, id: &TargetId, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let checks = checker.status(id).map_or(0, |s| s.checks);
        if checks >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: {checks} probes, wanted {n} within {within:?}"
        );
        sleep(10 * MS).await;
    }
}

/// Fall-many failures, each up to an interval (with jitter) apart, the first up to an interval
/// after the event, the last one taking its timeout: the bound the issue asks for.
fn transition_bound(count: u32, interval: Duration, probe_timeout: Duration) -> Duration {
    interval.mul_f64(1.1) * (count + 1) + probe_timeout + SLACK
}

#[tokio::test]
async fn refused_probe_says_so() {
    let addr = Server::start(Behaviour::Close).await.stop().await;
    let err = tcp(addr, Duration::from_secs(1)).run().await.unwrap_err();
    assert_eq!(err.to_string(), "connection refused");
}

#[tokio::test]
async fn tcp_probe_passes_on_connect() {
    let server = Server::start(Behaviour::Hang).await;
    let passed = tcp(server.addr, Duration::from_secs(1))
        .run()
        .await
        .unwrap();
    assert_eq!(passed, Passed::Connected);
}

#[tokio::test]
async fn marked_probe_needs_cap_net_admin() {
    let server = Server::start(Behaviour::Close).await;
    let mut probe = tcp(server.addr, Duration::from_secs(1));
    probe.mark = Some(0x4c42_0001);
    let result = probe.run().await;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(result.unwrap(), Passed::Connected);
    } else {
        let err = result.unwrap_err();
        assert!(matches!(err, ProbeError::Mark { .. }), "{err}");
    }
}

#[tokio::test]
async fn http_probe_sends_path_and_host_and_checks_the_status() {
    let ok = Server::start(Behaviour::Respond(
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let probe = http(
        ok.addr,
        "/healthz",
        Some("example.com"),
        Duration::from_secs(1),
    );
    assert_eq!(probe.run().await.unwrap(), Passed::Status(204));
    let request = ok.stats.requests.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("GET /healthz HTTP/1.0\r\n"),
        "{request:?}"
    );
    assert!(request.contains("\r\nHost: example.com\r\n"), "{request:?}");

    let bad = Server::start(Behaviour::Respond("HTTP/1.0 500 Oops\r\n\r\n")).await;
    let err = http(bad.addr, "/", None, Duration::from_secs(1))
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "HTTP 500 (expected 200-399)");
    let request = bad.stats.requests.lock().unwrap()[0].clone();
    assert!(!request.contains("Host:"), "{request:?}");

    let mut narrow = http(ok.addr, "/", None, Duration::from_secs(1));
    narrow.kind = ProbeKind::Http {
        path: "/".into(),
        host: None,
        status: 200..=200,
    };
    let err = narrow.run().await.unwrap_err();
    assert_eq!(err.to_string(), "HTTP 204 (expected 200-200)");
}

#[tokio::test]
async fn http_probe_rejects_what_is_not_http() {
    let ssh = Server::start(Behaviour::Respond("SSH-2.0-OpenSSH_9.6\r\n")).await;
    let err = http(ssh.addr, "/", None, Duration::from_secs(1))
        .run()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "not an HTTP status line: \"SSH-2.0-OpenSSH_9.6\""
    );
    let silent = Server::start(Behaviour::Respond("")).await;
    let err = http(silent.addr, "/", None, Duration::from_secs(1))
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connection closed before a status line");
    let err = http(silent.addr, "/a\r\nX: y", None, Duration::from_secs(1))
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::BadRequest), "{err}");
}

#[tokio::test]
async fn a_probe_that_hangs_ends_at_its_timeout() {
    let server = Server::start(Behaviour::Hang).await;
    let start = Instant::now();
    let err = http(server.addr, "/", None, Duration::from_secs(1))
        .run()
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.to_string(), "timed out after 1 s");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(1) + SLACK,
        "took {took:?}"
    );
    println!("hanging HTTP probe with a 1 s timeout took {took:?}");
}

#[tokio::test]
async fn listener_up_stays_up_closed_goes_down_reopened_comes_back() {
    let server = Server::start(Behaviour::Close).await;
    let (interval, probe_timeout, rise, fall) = (100 * MS, 200 * MS, 2, 3);
    let (checker, mut rx) = Checker::spawn(8).unwrap();
    let t = target(80, tcp(server.addr, probe_timeout), interval, rise, fall);
    let id = t.id;
    checker.set_targets(vec![t]);
    assert!(checker.status(&id).unwrap().up, "a new target starts up");

    wait_checks(&checker, &id, 4, Duration::from_secs(2)).await;
    let status = checker.status(&id).unwrap();
    assert!(status.up);
    assert_eq!(status.last_ok, Some(true));
    assert_eq!(status.last_reason, "connected");
    assert!(status.consecutive >= 4, "{status:?}");
    assert!(status.last_latency.is_some());
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

    let addr = server.stop().await;
    let bound = transition_bound(fall, interval, probe_timeout);
    let (down, took) = next_transition(&mut rx, bound).await;
    assert_eq!(
        down,
        Transition {
            id,
            up: false,
            reason: "connection refused".into()
        }
    );
    let status = checker.status(&id).unwrap();
    assert!(!status.up);
    assert_eq!(status.consecutive, fall);
    println!("down {took:?} after the listener closed (bound {bound:?})");

    // Still down, and said once: more failures bring no second transition.
    sleep(interval * 3).await;
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    assert!(!checker.status(&id).unwrap().up);

    let _server = Server::bind(addr, Behaviour::Close).await;
    let bound = transition_bound(rise, interval, probe_timeout);
    let (up, took) = next_transition(&mut rx, bound).await;
    assert_eq!(
        up,
        Transition {
            id,
            up: true,
            reason: "connected".into()
        }
    );
    assert_eq!(checker.status(&id).unwrap().consecutive, rise);
    println!("up {took:?} after the listener reopened (bound {bound:?})");
}

#[tokio::test]
async fn http_500_goes_down_with_the_reason_while_200_stays_up() {
    let good = Server::start(Behaviour::Respond("HTTP/1.0 200 OK\r\n\r\nok")).await;
    let bad = Server::start(Behaviour::Respond(
        "HTTP/1.1 500 Internal Server Error\r\n\r\n",
    ))
    .await;
    let interval = 100 * MS;
    let (checker, mut rx) = Checker::spawn(8).unwrap();
    let good_target = target(
        1,
        http(good.addr, "/healthz", None, 500 * MS),
        interval,
        2,
        2,
    );
    let bad_target = target(
        2,
        http(bad.addr, "/healthz", None, 500 * MS),
        interval,
        2,
        2,
    );
    let (good_id, bad_id) = (good_target.id, bad_target.id);
    checker.set_targets(vec![good_target, bad_target]);

    let (down, _) = next_transition(&mut rx, transition_bound(2, interval, 500 * MS)).await;
    assert_eq!(down.id, bad_id);
    assert!(!down.up);
    assert_eq!(down.reason, "HTTP 500 (expected 200-399)");
    wait_checks(&checker, &good_id, 3, Duration::from_secs(2)).await;
    let snapshot = checker.snapshot();
    assert_eq!(snapshot.len(), 2);
    assert!(snapshot[&good_id].up);
    assert_eq!(snapshot[&good_id].last_reason, "HTTP 200");
    assert!(!snapshot[&bad_id].up);
    assert_eq!(snapshot[&bad_id].last_ok, Some(false));
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
}

#[tokio::test]
async fn hanging_checks_are_bounded_and_never_overlap() {
    let server = Server::start(Behaviour::Hang).await;
    let (interval, probe_timeout) = (100 * MS, 300 * MS);
    let (checker, mut rx) = Checker::spawn(8).unwrap();
    let t = target(
        1,
        http(server.addr, "/", None, probe_timeout),
        interval,
        1,
        2,
    );
    let id = t.id;
    checker.set_targets(vec![t]);

    let (down, took) = next_transition(
        &mut rx,
        transition_bound(2, interval, probe_timeout) + probe_timeout,
    )
    .await;
    assert_eq!(down.reason, "timed out after 300 ms");
    println!("hanging server: down after {took:?}");
    wait_checks(&checker, &id, 4, Duration::from_secs(3)).await;
    let status = checker.status(&id).unwrap();
    let latency = status.last_latency.unwrap();
    assert!(
        latency >= probe_timeout && latency < probe_timeout + SLACK,
        "{latency:?}"
    );
    // The timeout is longer than the interval, yet a target has one probe at a time: back to
    // back, each taking the timeout. (Counting connections at the server would race its
    // noticing the last one's reset with accepting the next.)
    let before = checker.status(&id).unwrap().checks;
    let window = Duration::from_millis(1500);
    sleep(window).await;
    let probes = checker.status(&id).unwrap().checks - before;
    let sequential = (window.as_millis() / probe_timeout.as_millis()) as u64;
    assert!(
        (sequential - 2..=sequential + 1).contains(&probes),
        "{probes} probes in {window:?} with a {probe_timeout:?} timeout"
    );
    assert!(server.accepted() >= 6);
}

#[tokio::test]
async fn jitter_spreads_targets_with_the_same_interval() {
    const TARGETS: u16 = 200;
    let server = Server::start(Behaviour::Close).await;
    let interval = 500 * MS;
    let (checker, _rx) = Checker::spawn(256).unwrap();
    let start = Instant::now();
    checker.set_targets(
        (0..TARGETS)
            .map(|i| target(i, tcp(server.addr, Duration::from_secs(1)), interval, 2, 3))
            .collect(),
    );
    sleep(interval * 3).await;
    let times = server.stats.accept_times.lock().unwrap().clone();
    let mut buckets = std::collections::BTreeMap::<u128, usize>::new();
    for t in &times {
        *buckets
            .entry(t.duration_since(start).as_millis() / 10)
            .or_default() += 1;
    }
    let busiest = buckets.values().max().copied().unwrap_or(0);
    // 200 targets over 500 ms average 4 probes per 10 ms.
    println!("{} probes, busiest 10 ms window: {busiest}", times.len());
    assert!(times.len() >= 2 * usize::from(TARGETS), "{}", times.len());
    assert!(busiest <= 25, "busiest 10 ms window held {busiest} probes");
    // The first firings spread over the first interval.
    let first: Vec<Duration> = times[..usize::from(TARGETS)]
        .iter()
        .map(|t| t.duration_since(start))
        .collect();
    let spread = first.last().unwrap().checked_sub(first[0]).unwrap();
    assert!(
        spread > interval.mul_f64(0.7),
        "first firings spread over {spread:?}"
    );
}

#[tokio::test]
async fn max_in_flight_is_respected() {
    let server = Server::start(Behaviour::SlowRespond(200 * MS, "HTTP/1.0 200 OK\r\n\r\n")).await;
    let (checker, _rx) = Checker::spawn(3).unwrap();
    checker.set_targets(
        (0..20)
            .map(|i| {
                target(
                    i,
                    http(server.addr, "/", None, Duration::from_secs(2)),
                    50 * MS,
                    2,
                    3,
                )
            })
            .collect(),
    );
    sleep(Duration::from_millis(1500)).await;
    let probes: u64 = checker.snapshot().values().map(|s| s.checks).sum();
    assert_eq!(
        server.max_open(),
        3,
        "at most 3 in flight, and 20 eager targets fill them"
    );
    // 3 at a time, 200 ms each.
    assert!((10..=25).contains(&probes), "{probes} probes in 1.5 s");
    assert!(checker.snapshot().values().all(|s| s.up));
}

#[tokio::test]
async fn set_targets_keeps_adds_and_removes() {
    let live = Server::start(Behaviour::Close).await;
    let other = Server::start(Behaviour::Close).await;
    let dead = Server::start(Behaviour::Close).await.stop().await;
    let interval = 50 * MS;
    let (checker, mut rx) = Checker::spawn(8).unwrap();
    let a = target(1, tcp(dead, 500 * MS), interval, 2, 1);
    let b = target(2, tcp(other.addr, 500 * MS), interval, 2, 3);
    checker.set_targets(vec![a.clone(), b.clone()]);
    let (down, _) = next_transition(&mut rx, transition_bound(1, interval, 500 * MS)).await;
    assert_eq!(down.id, a.id);
    wait_checks(&checker, &b.id, 2, Duration::from_secs(2)).await;

    // A kept as is, B removed, C new.
    let c = target(3, tcp(live.addr, 500 * MS), interval, 2, 3);
    let before = checker.status(&a.id).unwrap();
    checker.set_targets(vec![a.clone(), c.clone()]);
    let snapshot = checker.snapshot();
    assert_eq!(snapshot.keys().copied().collect::<Vec<_>>(), [a.id, c.id]);
    assert!(!snapshot[&a.id].up, "a kept target keeps its state");
    assert_eq!(snapshot[&a.id].since, before.since);
    assert!(snapshot[&a.id].checks >= before.checks);
    assert!(snapshot[&c.id].up, "a new target starts up");
    sleep(interval * 2).await;
    let removed_count = other.accepted();
    sleep(interval * 4).await;
    assert_eq!(
        other.accepted(),
        removed_count,
        "a removed target is no longer probed"
    );
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

    // New rise and fall only: same state and schedule. A new probe: same state, new schedule,
    // and it comes up after `rise` successes at the live server.
    let mut a2 = a.clone();
    a2.rise = 3;
    checker.set_targets(vec![a2.clone(), c.clone()]);
    assert!(!checker.status(&a.id).unwrap().up);
    a2.probe.addr = live.addr;
    checker.set_targets(vec![a2, c]);
    let (up, _) = next_transition(&mut rx, transition_bound(3, interval, 500 * MS)).await;
    assert_eq!((up.id, up.up), (a.id, true));
    assert_eq!(checker.status(&a.id).unwrap().consecutive, 3);

    // Dropping the checker stops everything.
    drop(checker);
    sleep(interval * 2).await;
    let count = live.accepted();
    sleep(interval * 4).await;
    assert_eq!(
        live.accepted(),
        count,
        "probes after the checker was dropped"
    );
}

#[tokio::test]
async fn probes_reach_ipv6_backends() {
    let listener = TcpListener::bind("[::1]:0")
        .await
        .expect("binding [::1] (is IPv6 disabled on lo?)");
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    let _server = Server {
        addr,
        stats: stats.clone(),
        task: tokio::spawn(serve(
            listener,
            Behaviour::Respond("HTTP/1.1 200 OK\r\n\r\n"),
            stats,
        )),
    };
    assert_eq!(
        tcp(addr, Duration::from_secs(1)).run().await.unwrap(),
        Passed::Connected
    );
    assert_eq!(
        http(addr, "/", Some("[::1]"), Duration::from_secs(1))
            .run()
            .await
            .unwrap(),
        Passed::Status(200)
    );
}
