//! The servers: a TCP backend speaking the line protocol (and HTTP) and a UDP echo.

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
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use super::{CHUNK, Fnv64, MAX_LINE, fill_pattern, read_line};
use crate::netns::Netns;

/// Server-side socket timeout: a stuck client cannot hold a handler thread longer.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;
/// Largest `GET`/`PUT` size accepted.
const MAX_TRANSFER: u64 = 1 << 30;
/// How often idle server threads look at their stop flag.
const POLL_INTERVAL_MS: libc::c_int = 50;

struct Shared {
    name: String,
    stop: AtomicBool,
    http_status: AtomicU16,
    /// New connections are held open without a byte of answer ([`Server::set_hang`]).
    hang: AtomicBool,
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
            hang: AtomicBool::new(false),
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

    /// With `true`, connections accepted from now on get no answer at all: each is held open,
    /// its input read and discarded, until the peer closes it or the server stops (a hung
    /// backend, e.g. to time out an HTTP health check). `false` serves new connections again;
    /// ones already held stay held.
    pub fn set_hang(&self, hang: bool) {
        self.shared.hang.store(hang, Ordering::Relaxed);
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

fn parse_size(arg: &str) -> Result<u64> {
    let n: u64 = arg.parse().with_context(|| format!("size {arg:?}"))?;
    ensure!(n <= MAX_TRANSFER, "size {n} above {MAX_TRANSFER}");
    Ok(n)
}

/// Holds a connection without answering until the peer closes it or the server stops.
fn hold(shared: &Shared, mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        if !readable(stream.as_raw_fd(), POLL_INTERVAL_MS) {
            continue;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn serve(shared: &Shared, stream: TcpStream) -> Result<()> {
    if shared.hang.load(Ordering::Relaxed) {
        hold(shared, stream);
        return Ok(());
    }
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let line = match read_line(&mut reader) {
        Ok(line) => line,
        // A TCP health check: connect, then close with a reset (as HAProxy and lbd do).
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == ErrorKind::ConnectionReset) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
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

/// A UDP server on a backend bound to the VIP itself, so answers leave from it (direct server
/// return; a wildcard socket would answer from eth0's address and the client's connected
/// socket would not take it): answers each datagram with `<name>\n<datagram>`. Stops on drop.
pub struct VipUdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VipUdpEcho {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<Self> {
        let socket = ns
            .run(|| UdpSocket::bind(addr))
            .with_context(|| format!("{name}: binding {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let prefix = format!("{name}\n").into_bytes();
            thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        match socket.recv_from(&mut buf) {
                            Ok((len, from)) => {
                                let reply = [prefix.as_slice(), &buf[..len]].concat();
                                if let Err(e) = socket.send_to(&reply, from) {
                                    eprintln!("udp echo: answering {from}: {e}");
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(e) => {
                                eprintln!("udp echo: {e}");
                                thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
                .context("spawning the UDP echo thread")?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for VipUdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("udp echo thread panicked");
        }
    }
}
