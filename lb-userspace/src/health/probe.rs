//! One health probe: a TCP connect, or an HTTP/1.0 GET whose status line must fall in a range,
//! bounded as a whole by the probe's timeout, optionally from a socket carrying an `SO_MARK`
//! (how tunnel checks are steered into the encapsulating path).

use std::{fmt, io, net::SocketAddr, ops::RangeInclusive, time::Duration};

use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// The statuses an HTTP check accepts unless told otherwise (`HAProxy`'s default).
pub const DEFAULT_STATUS: RangeInclusive<u16> = 200..=399;

/// At most this much of a response is read looking for the status line.
const MAX_STATUS_LINE: usize = 512;

/// What a probe does once connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// Passes when the connection is established.
    Tcp,
    /// Sends `GET path HTTP/1.0` (with `Host: host` if given) and passes when the response's
    /// status is in `status`. The rest of the response is not read.
    Http {
        path: String,
        host: Option<String>,
        status: RangeInclusive<u16>,
    },
}

/// One check of one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub addr: SocketAddr,
    pub kind: ProbeKind,
    /// Bounds the whole probe: connect, request and status line.
    pub timeout: Duration,
    /// `SO_MARK` for the probe's socket (needs `CAP_NET_ADMIN`).
    pub mark: Option<u32>,
}

/// How a probe passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passed {
    Connected,
    Status(u16),
}

impl fmt::Display for Passed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connected => f.write_str("connected"),
            Self::Status(code) => write!(f, "HTTP {code}"),
        }
    }
}

/// Why a probe failed. The messages are short on purpose: they are shown as the reason in
/// `lbctl status` and in transition logs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out after {}", human(*.after))]
    TimedOut { after: Duration },
    #[error("{}", io_reason(.0))]
    Connect(#[source] io::Error),
    #[error("creating the socket: {0}")]
    Socket(#[source] io::Error),
    #[error("setting SO_MARK {mark:#x}: {source}")]
    Mark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("sending the request: {}", io_reason(.0))]
    Send(#[source] io::Error),
    #[error("reading the response: {}", io_reason(.0))]
    Receive(#[source] io::Error),
    #[error("connection closed before a status line")]
    Closed,
    #[error("not an HTTP status line: {line:?}")]
    Malformed { line: String },
    #[error("HTTP {got} (expected {}-{})", .expected.start(), .expected.end())]
    Status {
        got: u16,
        expected: RangeInclusive<u16>,
    },
    #[error("path or Host contains whitespace or control characters")]
    BadRequest,
}

/// A duration as people write it: "1 s", "500 ms", "1.5 s".
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        format!("{} µs", d.as_micros())
    } else if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{} s", ms as f64 / 1000.0)
    }
}

/// An I/O error in a few words, without the "(os error N)" noise for the usual ones.
fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let words = match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::BrokenPipe => "broken pipe",
        K::HostUnreachable => "host unreachable",
        K::NetworkUnreachable => "network unreachable",
        K::NetworkDown => "network down",
        K::AddrNotAvailable => "no local address available",
        K::PermissionDenied => "permission denied",
        _ => return e.to_string(),
    };
    words.to_owned()
}

impl Probe {
    /// Runs the probe once. Whatever the peer does, this returns within `timeout` (plus the
    /// timer's granularity).
    pub async fn run(&self) -> Result<Passed, ProbeError> {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::TimedOut {
                after: self.timeout,
            }),
        }
    }

    async fn exchange(&self) -> Result<Passed, ProbeError> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(ProbeError::Socket)?;
        let sock = SockRef::from(&socket);
        if let Some(mark) = self.mark {
            sock.set_mark(mark)
                .map_err(|source| ProbeError::Mark { mark, source })?;
        }
        // Close with a reset, as HAProxy does: an orderly close would leave a TIME_WAIT socket
        // behind for every check, thousands a second on a large pool.
        sock.set_linger(Some(Duration::ZERO))
            .map_err(ProbeError::Socket)?;
        let mut stream = socket
            .connect(self.addr)
            .await
            .map_err(ProbeError::Connect)?;
        match &self.kind {
            ProbeKind::Tcp => Ok(Passed::Connected),
            ProbeKind::Http { path, host, status } => {
                http_get(&mut stream, path, host.as_deref(), status).await
            }
        }
    }
}

/// True when `s` can go into a request line or header as is.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

async fn http_get(
    stream: &mut TcpStream,
    path: &str,
    host: Option<&str>,
    expected: &RangeInclusive<u16>,
) -> Result<Passed, ProbeError> {
    // Refused rather than sent: a stray CR/LF would let a config value inject headers.
    if !is_token(path) || host.is_some_and(|h| !is_token(h)) {
        return Err(ProbeError::BadRequest);
    }
    let request = match host {
        Some(host) => {
            format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\n\r\n")
        }
        None => format!("GET {path} HTTP/1.0\r\nUser-Agent: lbd-health-check\r\n\r\n"),
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Send)?;
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    let line = loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(ProbeError::Receive)?;
        len += n;
        if let Some(end) = buf[..len].iter().position(|&b| b == b'\n') {
            break &buf[..end];
        }
        if n == 0 && len == 0 {
            return Err(ProbeError::Closed);
        }
        // Closed after a partial line, or a line longer than anything sane.
        if n == 0 || len == buf.len() {
            break &buf[..len];
        }
    };
    let got = status_code(line).ok_or_else(|| ProbeError::Malformed {
        line: String::from_utf8_lossy(&line[..line.len().min(64)])
            .trim_end()
            .to_owned(),
    })?;
    if expected.contains(&got) {
        Ok(Passed::Status(got))
    } else {
        Err(ProbeError::Status {
            got,
            expected: expected.clone(),
        })
    }
}

/// The code of a status line such as `HTTP/1.1 200 OK`.
fn status_code(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut words = line.splitn(3, ' ');
    let version = words.next()?;
    let code = words.next()?;
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/1.0 204"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 200 \r"), Some(200));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH_9.6"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc OK"), None);
        assert_eq!(status_code(b""), None);
    }

    #[test]
    fn reasons_are_short() {
        let timed_out = |ms| ProbeError::TimedOut {
            after: Duration::from_millis(ms),
        };
        assert_eq!(timed_out(1000).to_string(), "timed out after 1 s");
        assert_eq!(timed_out(250).to_string(), "timed out after 250 ms");
        assert_eq!(timed_out(1500).to_string(), "timed out after 1.5 s");
        assert_eq!(
            ProbeError::Connect(io::ErrorKind::ConnectionRefused.into()).to_string(),
            "connection refused"
        );
        assert_eq!(
            ProbeError::Status {
                got: 500,
                expected: DEFAULT_STATUS
            }
            .to_string(),
            "HTTP 500 (expected 200-399)"
        );
        assert_eq!(Passed::Status(204).to_string(), "HTTP 204");
    }

    #[test]
    fn request_fields_must_be_tokens() {
        assert!(is_token("/healthz?full=1"));
        assert!(!is_token("/a b"));
        assert!(!is_token("/a\r\nX-Evil: 1"));
        assert!(!is_token(""));
    }
}
