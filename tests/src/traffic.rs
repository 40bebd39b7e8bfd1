//! Real traffic for namespace tests: a TCP backend server with a small line protocol (and
//! enough HTTP for curl and health checks), a UDP echo server, and client helpers. Everything
//! is bounded in time and in threads, and servers stop when dropped.
//!
//! TCP requests, one line each:
//! - `WHO` -> the server's name and `\n`, then close.
//! - `GET <n>` -> `n` bytes of [`fill_pattern`], then close.
//! - `PUT <n>` -> reads `n` bytes, answers their FNV-1a 64 as 16 hex digits and `\n`.
//! - `ECHO` -> the name and `\n`, then echoes every line until the client closes: a long-lived
//!   flow ([`Session`]).
//! - `GET /<anything> HTTP/1.x` -> `HTTP/1.0 <status>` with the name and `\n` as body
//!   (status 200 unless changed with [`Server::set_http_status`]).
//!
//! UDP: every datagram is answered with `<name>\n<datagram>`.

use std::{
    collections::HashMap,
    io::{self, BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::netns::Netns;

/// Connect and per-read/write timeout of the client helpers.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on a whole GET/PUT transfer.
pub const TRANSFER_DEADLINE: Duration = Duration::from_mins(1);
/// Server-side socket timeout: a stuck client cannot hold a handler thread longer.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;
const MAX_TRANSFER: u64 = 1 << 30;
const MAX_LINE: u64 = 1024;
const POLL_INTERVAL_MS: libc::c_int = 50;
const CHUNK: usize = 64 * 1024;

/// Writes the deterministic test pattern for stream offsets `offset..offset + buf.len()`:
/// 8-byte blocks of splitmix64(block index), so reordered or duplicated segments are caught.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *byte = splitmix64(at / 8).to_le_bytes()[(at % 8) as usize];
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bits, fed incrementally.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of the first `n` pattern bytes: what `PUT <n>` must answer for [`upload`].
pub fn pattern_fnv(n: u64) -> u64 {
    let mut fnv = Fnv64::default();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    while done < n {
        let len = (n - done).min(CHUNK as u64) as usize;
        fill_pattern(done, &mut buf[..len]);
        fnv.update(&buf[..len]);
        done += len as u64;
    }
    fnv.finish()
}

struct Shared {
    name: String,
    stop: AtomicBool,
    http_status: AtomicU16,
    accepted: AtomicU64,
    requests: AtomicU64,
    /// Clones of the open connections, shut down on stop so handlers return at once.
    active: Mutex<HashMap<u64, TcpStream>>,
}

/// A TCP backend server; see the module doc for its protocol. Stops on drop: closes the
/// listener, shuts down open connections and joins every thread.
pub struct Server {
    shared: Arc<Shared>,
    port: u16,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `[::]:port` (IPv4 and IPv6; `0.0.0.0` if the namespace has no IPv6) inside
    /// `ns`. Port 0 picks a free port ([`Server::port`]).
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self> {
        let listener = ns.run(|| {
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        });
        let listener = listener
            .with_context(|| format!("{name}: binding TCP port {port} in {}", ns.name()))?;
        listener
            .set_nonblocking(true)
            .context("nonblocking listener")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            stop: AtomicBool::new(false),
            http_status: AtomicU16::new(200),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            active: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("srv-{name}"))
                .spawn(move || accept_loop(&shared, &listener))
                .context("spawning the accept thread")?
        };
        Ok(Self {
            shared,
            port,
            acceptor: Some(acceptor),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Connections accepted so far, health checks included.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// `WHO`, `GET <n>`, `PUT <n>` and `ECHO` requests received so far: client flows, without
    /// health checks (bare connects and HTTP).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Status of HTTP answers from now on (e.g. 503 to fail an HTTP health check).
    pub fn set_http_status(&self, status: u16) {
        self.shared.http_status.store(status, Ordering::Relaxed);
    }

    /// Stops the server now (as drop does).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take()
            && acceptor.join().is_err()
        {
            eprintln!("server {}: accept thread panicked", self.shared.name);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        handlers.retain(|h| !h.is_finished());
        if !readable(listener.as_raw_fd(), POLL_INTERVAL_MS) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => {
                eprintln!("server {}: accept: {e}", shared.name);
                thread::sleep(Duration::from_millis(POLL_INTERVAL_MS as u64));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if handlers.len() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        let id = next_id;
        next_id += 1;
        match stream.try_clone() {
            Ok(clone) => {
                lock(&shared.active).insert(id, clone);
            }
            Err(e) => {
                eprintln!("server {}: {e}", shared.name);
                continue;
            }
        }
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("conn-{}", shared.name))
            .spawn(move || {
                if let Err(e) = serve(&conn_shared, stream)
                    && !conn_shared.stop.load(Ordering::Relaxed)
                {
                    eprintln!("server {}: connection: {e:#}", conn_shared.name);
                }
                lock(&conn_shared.active).remove(&id);
            });
        match spawned {
            Ok(handle) => handlers.push(handle),
            Err(e) => {
                eprintln!("server {}: spawning a handler: {e}", shared.name);
                lock(&shared.active).remove(&id);
            }
        }
    }
    for stream in lock(&shared.active).values() {
        // Already closed by the peer is fine; this only unblocks handlers.
        stream.shutdown(Shutdown::Both).unwrap_or_default();
    }
    for handler in handlers {
        if handler.join().is_err() {
            eprintln!("server {}: a connection handler panicked", shared.name);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits up to `timeout_ms` for `fd` to become readable.
fn readable(fd: i32, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and the length passed is 1.
    let n = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    n > 0
}

fn read_line(reader: &mut impl io::BufRead) -> Result<String> {
    let mut line = String::new();
    reader.take(MAX_LINE).read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn parse_size(arg: &str) -> Result<u64> {
    let n: u64 = arg.parse().with_context(|| format!("size {arg:?}"))?;
    ensure!(n <= MAX_TRANSFER, "size {n} above {MAX_TRANSFER}");
    Ok(n)
}

fn serve(shared: &Shared, stream: TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let line = read_line(&mut reader)?;
    let mut words = line.split_whitespace();
    let (verb, arg) = (words.next(), words.next());
    if matches!(verb, Some("WHO" | "GET" | "PUT" | "ECHO"))
        && !arg.is_some_and(|a| a.starts_with('/'))
    {
        shared.requests.fetch_add(1, Ordering::Relaxed);
    }
    match (verb, arg) {
        (None, _) => Ok(()), // a TCP health check: connect, then close
        (Some("WHO"), None) => Ok(out.write_all(format!("{}\n", shared.name).as_bytes())?),
        (Some("GET"), Some(path)) if path.starts_with('/') => {
            serve_http(shared, &mut reader, &mut out)
        }
        (Some("GET"), Some(n)) => {
            let n = parse_size(n)?;
            let mut buf = vec![0u8; CHUNK];
            let mut sent = 0;
            while sent < n {
                let len = (n - sent).min(CHUNK as u64) as usize;
                fill_pattern(sent, &mut buf[..len]);
                out.write_all(&buf[..len])?;
                sent += len as u64;
            }
            Ok(out.shutdown(Shutdown::Write)?)
        }
        (Some("PUT"), Some(n)) => {
            let n = parse_size(n)?;
            let mut fnv = Fnv64::default();
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0;
            while got < n {
                let want = (n - got).min(CHUNK as u64) as usize;
                let len = reader.read(&mut buf[..want])?;
                ensure!(len > 0, "PUT {n}: EOF after {got} bytes");
                fnv.update(&buf[..len]);
                got += len as u64;
            }
            Ok(out.write_all(format!("{:016x}\n", fnv.finish()).as_bytes())?)
        }
        (Some("ECHO"), None) => {
            out.write_all(format!("{}\n", shared.name).as_bytes())?;
            loop {
                let mut line = String::new();
                if reader.by_ref().take(MAX_LINE).read_line(&mut line)? == 0 {
                    return Ok(());
                }
                out.write_all(line.as_bytes())?;
            }
        }
        _ => Ok(out.write_all(format!("ERR unknown request {line:?}\n").as_bytes())?),
    }
}

fn serve_http(shared: &Shared, reader: &mut impl io::BufRead, out: &mut TcpStream) -> Result<()> {
    // Read the headers so that closing does not reset the connection under unread data.
    for _ in 0..100 {
        if read_line(reader)?.is_empty() {
            break;
        }
    }
    let status = shared.http_status.load(Ordering::Relaxed);
    let reason = if status == 200 { "OK" } else { "Status" };
    let body = format!("{}\n", shared.name);
    let reply = format!(
        "HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Ok(out.write_all(reply.as_bytes())?)
}

/// A TCP connection from inside `ns` to `addr`, with [`TIMEOUT`] on connect, reads and writes.
pub fn connect(ns: &Netns, addr: SocketAddr) -> Result<TcpStream> {
    let stream = ns
        .run(|| TcpStream::connect_timeout(&addr, TIMEOUT))
        .with_context(|| format!("connecting to {addr} from {}", ns.name()))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Asks the server at `addr` for its name (`WHO`).
pub fn who(ns: &Netns, addr: SocketAddr) -> Result<String> {
    let mut stream = connect(ns, addr)?;
    stream.write_all(b"WHO\n")?;
    let mut reply = String::new();
    stream
        .take(MAX_LINE)
        .read_to_string(&mut reply)
        .with_context(|| format!("WHO {addr}: reading the reply"))?;
    let name = reply
        .strip_suffix('\n')
        .with_context(|| format!("WHO {addr}: reply {reply:?}"))?;
    Ok(name.to_owned())
}

/// Downloads `n` bytes (`GET <n>`) and checks every byte against the pattern and the length.
pub fn download(ns: &Netns, addr: SocketAddr, n: u64) -> Result<()> {
    let mut stream = connect(ns, addr)?;
    stream.write_all(format!("GET {n}\n").as_bytes())?;
    let started = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        ensure!(
            started.elapsed() < TRANSFER_DEADLINE,
            "GET {n} from {addr}: {got} bytes after {TRANSFER_DEADLINE:?}"
        );
        let len = stream
            .read(&mut buf)
            .with_context(|| format!("GET {n} from {addr}: after {got} bytes"))?;
        if len == 0 {
            break;
        }
        ensure!(
            got + len as u64 <= n,
            "GET {n} from {addr}: more than {n} bytes"
        );
        fill_pattern(got, &mut want[..len]);
        if let Some(i) = (0..len).find(|&i| buf[i] != want[i]) {
            bail!(
                "GET {n} from {addr}: byte {} differs from the pattern",
                got + i as u64
            );
        }
        got += len as u64;
    }
    ensure!(
        got == n,
        "GET {n} from {addr}: stream ended after {got} bytes"
    );
    Ok(())
}

/// Uploads `n` pattern bytes (`PUT <n>`) and checks the server's checksum of them.
pub fn upload(ns: &Netns, addr: SocketAddr, n: u64) -> Result<()> {
    let mut stream = connect(ns, addr)?;
    stream.write_all(format!("PUT {n}\n").as_bytes())?;
    let started = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < n {
        ensure!(
            started.elapsed() < TRANSFER_DEADLINE,
            "PUT {n} to {addr}: {sent} bytes after {TRANSFER_DEADLINE:?}"
        );
        let len = (n - sent).min(CHUNK as u64) as usize;
        fill_pattern(sent, &mut buf[..len]);
        stream
            .write_all(&buf[..len])
            .with_context(|| format!("PUT {n} to {addr}: after {sent} bytes"))?;
        sent += len as u64;
    }
    let reply = read_line(&mut BufReader::new(&stream))
        .with_context(|| format!("PUT {n} to {addr}: reply"))?;
    let expected = format!("{:016x}", pattern_fnv(n));
    ensure!(
        reply == expected,
        "PUT {n} to {addr}: server checksum {reply:?}, expected {expected}"
    );
    Ok(())
}

/// `GET <path>` over HTTP/1.0; returns the status and the body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = connect(ns, addr)?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut reply = String::new();
    stream
        .take(1 << 20)
        .read_to_string(&mut reply)
        .with_context(|| format!("GET {path} from {addr}"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path} from {addr}: {reply:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path} from {addr}: status line {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A long-lived TCP flow (`ECHO`): one backend for its whole life unless the balancer moves it.
pub struct Session {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    backend: String,
    sent: u64,
}

impl Session {
    pub fn open(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let mut stream = connect(ns, addr)?;
        stream.write_all(b"ECHO\n")?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let backend = read_line(&mut reader).with_context(|| format!("ECHO {addr}: greeting"))?;
        ensure!(
            !backend.is_empty(),
            "ECHO {addr}: connection closed before the greeting"
        );
        Ok(Self {
            stream,
            reader,
            backend,
            sent: 0,
        })
    }

    /// The name the backend gave when the session opened.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The client's side of the 5-tuple.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Sends one line and waits for its echo: fails if the flow broke (reset, timeout).
    pub fn ping(&mut self) -> Result<()> {
        self.sent += 1;
        let line = format!("ping {}", self.sent);
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("session to {}: send", self.backend))?;
        let echo = read_line(&mut self.reader)
            .with_context(|| format!("session to {}: echo", self.backend))?;
        ensure!(
            echo == line,
            "session to {}: echo {echo:?}, expected {line:?}",
            self.backend
        );
        Ok(())
    }
}

/// UDP echo server: answers every datagram with `<name>\n<datagram>`. Stops on drop.
pub struct UdpEcho {
    name: String,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `[::]:port` (or `0.0.0.0`) inside `ns`; port 0 picks one ([`UdpEcho::port`]).
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self> {
        let socket = ns.run(|| {
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
        });
        let socket =
            socket.with_context(|| format!("{name}: binding UDP port {port} in {}", ns.name()))?;
        socket.set_read_timeout(Some(Duration::from_millis(POLL_INTERVAL_MS as u64)))?;
        let port = socket.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let prefix = format!("{name}\n").into_bytes();
            let name = name.to_owned();
            thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        match socket.recv_from(&mut buf) {
                            Ok((len, from)) => {
                                let mut reply = prefix.clone();
                                reply.extend_from_slice(&buf[..len]);
                                if let Err(e) = socket.send_to(&reply, from) {
                                    eprintln!("udp {name}: reply to {from}: {e}");
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock
                                        | ErrorKind::TimedOut
                                        | ErrorKind::Interrupted
                                ) => {}
                            Err(e) => {
                                eprintln!("udp {name}: {e}");
                                thread::sleep(Duration::from_millis(POLL_INTERVAL_MS as u64));
                            }
                        }
                    }
                })?
        };
        Ok(Self {
            name: name.to_owned(),
            port,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("udp {}: server thread panicked", self.name);
        }
    }
}

/// A UDP socket in a namespace, connected to one server: every request uses the same 5-tuple.
pub struct UdpClient {
    socket: UdpSocket,
    peer: SocketAddr,
}

impl UdpClient {
    pub fn new(ns: &Netns, peer: SocketAddr) -> Result<Self> {
        let socket = ns
            .run(|| {
                let local: SocketAddr = if peer.is_ipv6() {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(local)?;
                socket.connect(peer)?;
                Ok::<_, io::Error>(socket)
            })
            .with_context(|| format!("UDP socket to {peer} in {}", ns.name()))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Self { socket, peer })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Sends `payload` and returns the name of the server that echoed it. Retries a few
    /// times within [`TIMEOUT`] (UDP may lose the first datagram while ARP resolves).
    pub fn who(&self, payload: &[u8]) -> Result<String> {
        let started = Instant::now();
        let mut buf = vec![0u8; 65536];
        while started.elapsed() < TIMEOUT {
            self.socket
                .send(payload)
                .with_context(|| format!("UDP send to {}", self.peer))?;
            let len = match self.socket.recv(&mut buf) {
                Ok(len) => len,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("UDP receive from {}", self.peer)),
            };
            let reply = &buf[..len];
            let split = reply
                .iter()
                .position(|&b| b == b'\n')
                .with_context(|| format!("UDP reply from {}: no name", self.peer))?;
            // A late answer to an earlier attempt carries the same payload, so it is just as good.
            ensure!(
                &reply[split + 1..] == payload,
                "UDP reply from {}: payload differs",
                self.peer
            );
            return Ok(String::from_utf8_lossy(&reply[..split]).into_owned());
        }
        bail!("UDP {}: no answer within {TIMEOUT:?}", self.peer)
    }
}

/// One UDP round trip from a fresh socket; returns the server's name.
pub fn udp_who(ns: &Netns, addr: SocketAddr) -> Result<String> {
    UdpClient::new(ns, addr)?.who(b"who")
}
