//! Long-lived chatting TCP connections: many `ECHO` sessions through a VIP, driven by one
//! thread with nonblocking sockets and `poll`, each exchanging a checksummed, numbered message
//! at a fixed cadence. Whatever happens to the load balancer meanwhile (reconfiguration,
//! restarts, upgrades), the report says whether every connection stayed open, every echo came
//! back intact, no reset was seen, and how long the longest pause between exchanges was.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    netns::Netns,
    traffic::{Fnv64, connect},
};

/// The cadence the issue asks for: a message at least every 100 ms on every connection.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// An echo not back after this long fails the connection (a black-holed flow never resets).
const STALL: Duration = Duration::from_secs(10);
/// How long closing waits for the server's side of the close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest poll sleep, so the stop flag is seen promptly.
const MAX_POLL_MS: i32 = 20;

/// How one connection is doing.
#[derive(Clone, Debug)]
pub struct ConnStats {
    /// The backend's name from the `ECHO` greeting.
    pub backend: String,
    /// The client's side of the 5-tuple.
    pub local: SocketAddr,
    /// Completed round trips (message sent, identical echo received).
    pub exchanges: u64,
    /// Longest time between two completed exchanges (from the greeting for the first).
    pub max_gap: Duration,
    /// Why the connection failed (reset, EOF, wrong echo, stall); `None` while healthy.
    pub failure: Option<String>,
    /// Closed cleanly by [`Chatter::stop`]: our FIN answered by the server's.
    pub closed_cleanly: bool,
}

/// Every connection's stats at one moment.
#[derive(Clone, Debug)]
pub struct Report {
    pub conns: Vec<ConnStats>,
    /// Since the connections were opened.
    pub elapsed: Duration,
}

impl Report {
    /// `"<local> to <backend>: <why>"` for every failed connection.
    pub fn failures(&self) -> Vec<String> {
        self.conns
            .iter()
            .filter_map(|c| {
                c.failure
                    .as_ref()
                    .map(|f| format!("{} to {}: {f}", c.local, c.backend))
            })
            .collect()
    }

    pub fn max_gap(&self) -> Duration {
        self.conns
            .iter()
            .map(|c| c.max_gap)
            .max()
            .unwrap_or_default()
    }

    pub fn min_exchanges(&self) -> u64 {
        self.conns.iter().map(|c| c.exchanges).min().unwrap_or(0)
    }

    pub fn total_exchanges(&self) -> u64 {
        self.conns.iter().map(|c| c.exchanges).sum()
    }

    /// Connections per backend name.
    pub fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for c in &self.conns {
            *out.entry(c.backend.clone()).or_default() += 1;
        }
        out
    }

    /// Fails unless every connection is healthy and no gap between exchanges reached
    /// `max_gap`.
    pub fn check(&self, max_gap: Duration) -> Result<()> {
        let failures = self.failures();
        ensure!(
            failures.is_empty(),
            "{} of {} connections failed:\n{}",
            failures.len(),
            self.conns.len(),
            failures.join("\n")
        );
        let worst = self.max_gap();
        ensure!(
            worst < max_gap,
            "a connection went {worst:?} without an exchange (limit {max_gap:?})"
        );
        Ok(())
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} connections {:?}, {} exchanges in {:.1} s (min {} per connection), max gap {} ms",
            self.conns.len(),
            self.per_backend(),
            self.total_exchanges(),
            self.elapsed.as_secs_f64(),
            self.min_exchanges(),
            self.max_gap().as_millis()
        )
    }
}

struct Shared {
    stop: AtomicBool,
    stats: Mutex<Vec<ConnStats>>,
}

/// Connections chatting in the background until [`Chatter::stop`] (or drop, which stops them
/// too but discards the report).
pub struct Chatter {
    shared: Arc<Shared>,
    started: Instant,
    thread: Option<JoinHandle<()>>,
}

impl Chatter {
    /// Opens `n` `ECHO` sessions from `ns` to `addr` (one after another, each waiting for its
    /// greeting) and starts exchanging a message on each every `interval`.
    pub fn open(ns: &Netns, addr: SocketAddr, n: usize, interval: Duration) -> Result<Self> {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let (stream, backend) =
                open_session(ns, addr).with_context(|| format!("opening session {i} to {addr}"))?;
            conns.push(Conn::new(i, stream, backend)?);
        }
        let started = Instant::now();
        // Spread the first sends over one interval so the connections do not all fire at once.
        for (i, conn) in conns.iter_mut().enumerate() {
            conn.next_send = started + interval.mul_f64(i as f64 / n.max(1) as f64);
            conn.last_exchange = started;
        }
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            stats: Mutex::new(conns.iter().map(|c| c.stats.clone()).collect()),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("chatter".to_owned())
                .spawn(move || drive(&shared, conns, interval))
                .context("spawning the chatter thread")?
        };
        Ok(Self {
            shared,
            started,
            thread: Some(thread),
        })
    }

    /// The stats right now (the connections keep chatting).
    pub fn snapshot(&self) -> Report {
        Report {
            conns: lock(&self.shared.stats).clone(),
            elapsed: self.started.elapsed(),
        }
    }

    /// Stops sending, waits for the echoes in flight, closes every connection (our FIN, then
    /// the server's) and returns the final report. A connection that could not close cleanly
    /// has its failure set.
    pub fn stop(mut self) -> Report {
        self.finish();
        self.snapshot()
    }

    fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("chatter: the driver thread panicked");
        }
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connects, asks for `ECHO` and reads the greeting byte by byte (nothing past it).
fn open_session(ns: &Netns, addr: SocketAddr) -> Result<(TcpStream, String)> {
    let mut stream = connect(ns, addr)?;
    stream.set_nodelay(true)?;
    stream.write_all(b"ECHO\n")?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let len = stream.read(&mut byte).context("reading the greeting")?;
        ensure!(len == 1, "closed before the greeting");
        if byte[0] == b'\n' {
            break;
        }
        name.push(byte[0]);
        ensure!(name.len() < 256, "greeting too long");
    }
    let name = String::from_utf8(name).context("greeting is not UTF-8")?;
    ensure!(!name.is_empty(), "empty greeting");
    Ok((stream, name))
}

/// One connection's driver-side state.
struct Conn {
    id: usize,
    stream: TcpStream,
    seq: u64,
    /// The line sent and not yet echoed, with when it was sent.
    pending: Option<(Vec<u8>, Instant)>,
    out: Vec<u8>,
    input: Vec<u8>,
    next_send: Instant,
    last_exchange: Instant,
    /// Our FIN is sent; waiting for the server's.
    closing: bool,
    stats: ConnStats,
}

impl Conn {
    fn new(id: usize, stream: TcpStream, backend: String) -> Result<Self> {
        let local = stream.local_addr()?;
        stream.set_nonblocking(true)?;
        let now = Instant::now();
        Ok(Self {
            id,
            stream,
            seq: 0,
            pending: None,
            out: Vec::new(),
            input: Vec::new(),
            next_send: now,
            last_exchange: now,
            closing: false,
            stats: ConnStats {
                backend,
                local,
                exchanges: 0,
                max_gap: Duration::ZERO,
                failure: None,
                closed_cleanly: false,
            },
        })
    }

    fn alive(&self) -> bool {
        self.stats.failure.is_none() && !self.stats.closed_cleanly
    }

    fn fail(&mut self, why: String) {
        if self.stats.failure.is_none() {
            self.stats.failure = Some(why);
        }
        // Nothing more to do on it; closing now would only add noise on the wire.
        self.pending = None;
        self.out.clear();
    }

    /// Queues the next message: `<id> <seq> <payload> <fnv64(payload)>`.
    fn queue_message(&mut self, now: Instant) {
        self.seq += 1;
        let line = message(self.id, self.seq);
        self.out.extend_from_slice(&line);
        self.pending = Some((line, now));
    }

    fn flush(&mut self) {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return self.fail("write returned 0".to_owned()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.fail(format!("send: {}", describe_io(&e))),
            }
        }
    }

    /// Reads whatever arrived and checks every complete line against the pending message.
    fn receive(&mut self, now: Instant) {
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return self.fail(format!(
                        "receive: {} (after {} exchanges)",
                        describe_io(&e),
                        self.stats.exchanges
                    ));
                }
            }
        }
        while let Some(end) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            let Some((sent, _)) = self.pending.take() else {
                return self.fail(format!(
                    "unexpected line {:?}",
                    String::from_utf8_lossy(&line)
                ));
            };
            if line != sent {
                let why = if checksum_ok(&line) {
                    "an intact message that is not the one sent"
                } else {
                    "a corrupted message"
                };
                return self.fail(format!(
                    "echo {:?} is {why}; sent {:?}",
                    String::from_utf8_lossy(&line),
                    String::from_utf8_lossy(&sent)
                ));
            }
            let gap = now - self.last_exchange;
            self.stats.max_gap = self.stats.max_gap.max(gap);
            self.last_exchange = now;
            self.stats.exchanges += 1;
        }
        if eof {
            if self.closing && self.pending.is_none() && self.input.is_empty() {
                self.stats.closed_cleanly = true;
            } else {
                self.fail(format!(
                    "unexpected EOF (after {} exchanges)",
                    self.stats.exchanges
                ));
            }
        }
    }
}

/// The message numbered `seq` of connection `id`: a payload of varying length, then its FNV-1a.
fn message(id: usize, seq: u64) -> Vec<u8> {
    let mut x = mix((id as u64) << 32 ^ seq);
    let words = 1 + (x % 12) as usize;
    let mut payload = String::new();
    for _ in 0..words {
        x = mix(x);
        write!(payload, "{x:016x}").expect("writing to a String");
    }
    let mut fnv = Fnv64::default();
    fnv.update(payload.as_bytes());
    format!("{id} {seq} {payload} {:016x}\n", fnv.finish()).into_bytes()
}

/// Whether a received line's checksum matches its payload.
fn checksum_ok(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let words: Vec<&str> = text.trim_end().split(' ').collect();
    let [_, _, payload, sum] = words[..] else {
        return false;
    };
    let mut fnv = Fnv64::default();
    fnv.update(payload.as_bytes());
    format!("{:016x}", fnv.finish()) == sum
}

/// splitmix64's output function: cheap, well-mixed payload bytes.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset => format!("connection reset (ECONNRESET): {e}"),
        ErrorKind::BrokenPipe => format!("broken pipe (EPIPE): {e}"),
        _ => e.to_string(),
    }
}

/// The driver thread: sends on schedule, reads echoes, and on stop drains and closes.
fn drive(shared: &Shared, mut conns: Vec<Conn>, interval: Duration) {
    let mut stop_at: Option<Instant> = None;
    let mut pollfds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());
    loop {
        let now = Instant::now();
        if stop_at.is_none() && shared.stop.load(Ordering::Relaxed) {
            stop_at = Some(now);
        }
        for conn in conns.iter_mut().filter(|c| c.alive()) {
            match stop_at {
                None if conn.pending.is_none() && now >= conn.next_send => {
                    conn.queue_message(now);
                    // Keep the cadence: the next one is due an interval after this one.
                    conn.next_send = (conn.next_send + interval).max(now);
                }
                Some(_) if conn.pending.is_none() && !conn.closing => {
                    conn.closing = true;
                    if let Err(e) = conn.stream.shutdown(Shutdown::Write) {
                        conn.fail(format!("shutdown: {}", describe_io(&e)));
                        continue;
                    }
                }
                _ => {}
            }
            if let Some((_, sent)) = &conn.pending
                && now - *sent > STALL
            {
                conn.fail(format!("no echo for {STALL:?}"));
                continue;
            }
            conn.flush();
        }
        if let Some(at) = stop_at
            && now - at > CLOSE_TIMEOUT
        {
            for conn in conns.iter_mut().filter(|c| c.alive()) {
                conn.fail(format!("not closed within {CLOSE_TIMEOUT:?} of the stop"));
            }
        }
        publish(shared, &conns);
        if !conns.iter().any(Conn::alive) {
            return;
        }

        let wait_ms = if stop_at.is_some() {
            MAX_POLL_MS
        } else {
            conns
                .iter()
                .filter(|c| c.alive() && c.pending.is_none())
                .map(|c| c.next_send.saturating_duration_since(now).as_millis() as i32)
                .min()
                .unwrap_or(MAX_POLL_MS)
                .min(MAX_POLL_MS)
        };
        pollfds.clear();
        pollfds.extend(conns.iter().filter(|c| c.alive()).map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN | if c.out.is_empty() { 0 } else { libc::POLLOUT },
            revents: 0,
        }));
        // SAFETY: `pollfds` is a valid array of `len` pollfd structs for the whole call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, wait_ms) };
        if n <= 0 {
            continue;
        }
        let now = Instant::now();
        let mut ready = pollfds.iter();
        for conn in conns.iter_mut().filter(|c| c.alive()) {
            let Some(pfd) = ready.next() else { break };
            if pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                conn.receive(now);
            }
        }
    }
}

/// Copies the stats where [`Chatter::snapshot`] reads them.
fn publish(shared: &Shared, conns: &[Conn]) {
    let mut stats = lock(&shared.stats);
    for (slot, conn) in stats.iter_mut().zip(conns) {
        slot.clone_from(&conn.stats);
    }
}

/// Fails if a session went to a backend not in `allowed`.
pub fn expect_backends(report: &Report, allowed: &[&str]) -> Result<()> {
    for (name, count) in report.per_backend() {
        if !allowed.contains(&name.as_str()) {
            bail!("{count} sessions went to {name}, expected only {allowed:?}");
        }
    }
    Ok(())
}
