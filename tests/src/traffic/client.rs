//! Client helpers: each opens its socket inside the client namespace and is bounded by
//! [`TIMEOUT`] per operation and [`TRANSFER_DEADLINE`] per transfer.

use std::{
    io::{self, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{CHUNK, MAX_LINE, TIMEOUT, TRANSFER_DEADLINE, fill_pattern, pattern_fnv, read_line};
use crate::netns::Netns;

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
