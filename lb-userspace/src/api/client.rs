//! The caller's side of the control API (lbctl, tests): one HTTP/1.1 request per connection to
//! lbd's Unix socket, JSON in and out, refusals turned into [`ClientError::Refused`] with lbd's
//! message verbatim.
//!
//! Every method needs a tokio runtime (with I/O enabled): the connection is driven by a task
//! spawned on it.

use std::{
    fmt::Write as _,
    io,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::net::UnixStream;

use super::proto::{
    ApplyRequest, ChangeReply, ChangeRequest, Debug, ErrorReply, FlowProgress, FlowsQuery,
    StateReply, Stats, Status,
};

/// Largest reply body read whole; a status of every backend is far below it.
const REPLY_LIMIT: usize = 64 << 20;
/// Largest NDJSON line: one [`FlowProgress`] is a few hundred bytes.
const LINE_LIMIT: usize = 64 << 10;

/// Why a request to lbd failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// lbd's socket could not be reached; the message says what to check.
    #[error("{}", connect_message(.path, .source))]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The connection failed after it was made (lbd stopped, or broke the protocol).
    #[error("lost the connection to lbd on {}: {source}", .path.display())]
    Connection {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    /// lbd refused the request: `status` is the HTTP status, `message` lbd's own words
    /// (naming the field and the reason).
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// lbd answered, but not with the reply the request expects.
    #[error("bad reply from lbd to {request}: {reason}")]
    BadReply { request: String, reason: String },
}

/// The message for a failed connect: a hint for the two usual causes.
fn connect_message(path: &Path, e: &io::Error) -> String {
    let path = path.display();
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            format!("permission denied on {path}: run as root or as a member of the socket's group")
        }
        io::ErrorKind::NotFound => format!("is lbd running? (no socket at {path})"),
        // A socket file left behind by an lbd that is gone.
        io::ErrorKind::ConnectionRefused => {
            format!("is lbd running? (nothing listens on {path})")
        }
        _ => format!("cannot connect to lbd on {path}: {e}"),
    }
}

/// A handle on lbd's control socket; cheap, connects per request.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the socket at `socket` (lbd's default is
    /// [`DEFAULT_SOCKET`](super::proto::DEFAULT_SOCKET)). Connects nothing yet.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/state`: the settings and the VIPs lbd serves.
    pub async fn state(&self) -> Result<StateReply, ClientError> {
        self.get_json("/v1/state".to_owned()).await
    }

    /// `GET /v1/status`: every VIP and backend with its state and live flows; `idle_timeout`
    /// (seconds) overrides lbd's default for what counts as live.
    pub async fn status(&self, idle_timeout: Option<u64>) -> Result<Status, ClientError> {
        let mut path = "/v1/status".to_owned();
        if let Some(secs) = idle_timeout {
            write!(path, "?idle_timeout={secs}").expect("writing to a String");
        }
        self.get_json(path).await
    }

    /// `GET /v1/stats`: traffic counters and rates per VIP and backend, with their status;
    /// `idle_timeout` as for [`Client::status`].
    pub async fn stats(&self, idle_timeout: Option<u64>) -> Result<Stats, ClientError> {
        let mut path = "/v1/stats".to_owned();
        if let Some(secs) = idle_timeout {
            write!(path, "?idle_timeout={secs}").expect("writing to a String");
        }
        self.get_json(path).await
    }

    /// `GET /v1/debug`: whether the data plane's debug logging is on.
    pub async fn debug(&self) -> Result<Debug, ClientError> {
        self.get_json("/v1/debug".to_owned()).await
    }

    /// `PUT /v1/debug`: turns the data plane's debug logging on or off.
    pub async fn set_debug(&self, debug: Debug) -> Result<Debug, ClientError> {
        self.send_json(Method::PUT, "/v1/debug", &debug).await
    }

    /// `POST /v1/changes`: applies all of the changes or none.
    pub async fn changes(&self, request: &ChangeRequest) -> Result<ChangeReply, ClientError> {
        self.post_json("/v1/changes", request).await
    }

    /// `POST /v1/apply`: makes lbd's VIPs those of `request`; the reply lists the diff.
    pub async fn apply(&self, request: &ApplyRequest) -> Result<ChangeReply, ClientError> {
        self.post_json("/v1/apply", request).await
    }

    /// `GET /v1/flows`: the live flows on one backend now (`query.wait` is ignored).
    pub async fn flows(&self, query: &FlowsQuery) -> Result<FlowProgress, ClientError> {
        self.get_json(flows_path(query, false)).await
    }

    /// `GET /v1/flows?wait=true` (whatever `query.wait` says): follows the flow count until it
    /// reaches zero, calling `on_line` with each report as it arrives, and returns the last one,
    /// which has `done` set or carries lbd's `error` (timeout, backend gone). A stream that ends
    /// before such a line is a [`ClientError::BadReply`].
    pub async fn wait_flows(
        &self,
        query: &FlowsQuery,
        mut on_line: impl FnMut(&FlowProgress),
    ) -> Result<FlowProgress, ClientError> {
        let path = flows_path(query, true);
        let bad = |reason: String| ClientError::BadReply {
            request: format!("GET {path}"),
            reason,
        };
        let mut body = self.send(Method::GET, &path, None).await?.into_body();
        let mut pending: Vec<u8> = Vec::new();
        let mut last: Option<FlowProgress> = None;
        loop {
            let frame = body.frame().await.transpose().map_err(|e| self.lost(e))?;
            let end_of_stream = frame.is_none();
            if let Some(data) = frame.and_then(|f| f.into_data().ok()) {
                pending.extend_from_slice(&data);
            } else if !end_of_stream {
                continue; // trailers: nothing to read
            }
            // Whole lines, and at the end whatever is left (a last line without its newline).
            while let Some(line) = next_line(&mut pending, end_of_stream) {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let progress: FlowProgress = serde_json::from_slice(line)
                    .map_err(|e| bad(format!("{e} in line {:?}", String::from_utf8_lossy(line))))?;
                on_line(&progress);
                if progress.done || progress.error.is_some() {
                    return Ok(progress);
                }
                last = Some(progress);
            }
            if pending.len() > LINE_LIMIT {
                return Err(bad(format!("a line longer than {LINE_LIMIT} bytes")));
            }
            if end_of_stream {
                return Err(bad(match last {
                    Some(p) => format!(
                        "the stream ended with {} flows left, before done or an error",
                        p.flows
                    ),
                    None => "the stream ended before its first line".to_owned(),
                }));
            }
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: String) -> Result<T, ClientError> {
        let reply = self.send(Method::GET, &path, None).await?;
        self.read_json(reply, format!("GET {path}")).await
    }

    async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send_json(Method::POST, path, body).await
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("API messages always serialize");
        let what = format!("{method} {path}");
        let reply = self.send(method, path, Some(body)).await?;
        self.read_json(reply, what).await
    }

    /// Connects, sends one request and returns the reply if its status is 2xx, else lbd's
    /// refusal.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.lost(e))?;
        let socket = self.socket.clone();
        tokio::spawn(async move {
            // The request and the body read see this failure too and report it; this only
            // keeps the detail for debugging.
            if let Err(e) = connection.await {
                tracing::debug!(socket = %socket.display(), "control connection: {e}");
            }
        });

        let label = format!("{method} {path}");
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "lbd")
            // One request per connection: lbd closes it once the reply is written.
            .header(header::CONNECTION, "close");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a path of our own and fixed headers always make a request");
        let reply = sender
            .send_request(request)
            .await
            .map_err(|e| self.lost(e))?;
        if reply.status().is_success() {
            return Ok(reply);
        }
        let status = reply.status();
        let text = self.read_body(reply, &label).await?;
        Err(refusal(status, &text))
    }

    async fn read_json<T: DeserializeOwned>(
        &self,
        reply: Response<Incoming>,
        request: String,
    ) -> Result<T, ClientError> {
        let body = self.read_body(reply, &request).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadReply {
            request,
            reason: e.to_string(),
        })
    }

    async fn read_body(
        &self,
        reply: Response<Incoming>,
        request: &str,
    ) -> Result<Bytes, ClientError> {
        match Limited::new(reply.into_body(), REPLY_LIMIT).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) => match e.downcast::<hyper::Error>() {
                Ok(e) => Err(self.lost(*e)),
                Err(e) => Err(ClientError::BadReply {
                    request: request.to_owned(),
                    reason: e.to_string(),
                }),
            },
        }
    }

    fn lost(&self, source: hyper::Error) -> ClientError {
        ClientError::Connection {
            path: self.socket.clone(),
            source,
        }
    }
}

/// lbd's refusal: the [`ErrorReply`] message, or failing that the body as text (a proxy or an
/// older lbd), or the status's own name.
fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let message = if let Ok(reply) = serde_json::from_slice::<ErrorReply>(body) {
        reply.error
    } else {
        let text = String::from_utf8_lossy(body).trim().to_owned();
        if text.is_empty() {
            format!("lbd answered {status}")
        } else {
            text
        }
    };
    ClientError::Refused {
        status: status.as_u16(),
        message,
    }
}

/// Takes the next line (with its newline) off the front of `pending`; at the end of the
/// stream, also a last line without one.
fn next_line(pending: &mut Vec<u8>, end_of_stream: bool) -> Option<Vec<u8>> {
    match pending.iter().position(|&b| b == b'\n') {
        Some(i) => Some(pending.drain(..=i).collect()),
        None if end_of_stream && !pending.is_empty() => Some(std::mem::take(pending)),
        None => None,
    }
}

fn flows_path(query: &FlowsQuery, wait: bool) -> String {
    let mut path = format!(
        "/v1/flows?vip={}&backend={}",
        encode(&query.vip.to_string()),
        encode(&query.backend.to_string())
    );
    if let Some(secs) = query.idle_timeout {
        write!(path, "&idle_timeout={secs}").expect("writing to a String");
    }
    if wait {
        path.push_str("&wait=true");
        if let Some(secs) = query.timeout {
            write!(path, "&timeout={secs}").expect("writing to a String");
        }
    }
    path
}

/// Percent-encodes a query value: VIPs hold `:`, `/`, `[` and `]`.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            write!(out, "%{b:02X}").expect("writing to a String");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::UnixListener,
        sync::mpsc,
        time::timeout,
    };

    use super::*;
    use crate::change::Change;

    /// Removes the test's socket folder even when the test fails.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("lb-client-test-{name}-{}", std::process::id()));
            // A folder left by an earlier run of the same pid would make bind fail.
            std::fs::remove_dir_all(&dir).ok();
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("lbd.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            // Best effort: a leftover temp folder must not hide the test's result.
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    /// Reads one request (head and `Content-Length` body) as text.
    async fn read_request(stream: &mut UnixStream) -> String {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed before the end of its request");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed before the end of its body");
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(buf).unwrap()
    }

    fn response(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// Answers one connection per canned response, in order; returns the requests received.
    fn serve(
        listener: UnixListener,
        responses: Vec<String>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut requests = Vec::new();
            for response in responses {
                let (mut stream, _) = listener.accept().await.unwrap();
                requests.push(read_request(&mut stream).await);
                stream.write_all(response.as_bytes()).await.unwrap();
                stream.shutdown().await.unwrap();
            }
            requests
        })
    }

    /// Runs a test body with a deadline, so a hang fails instead of blocking the suite.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        timeout(Duration::from_secs(20), f)
            .await
            .expect("the test took longer than 20 s")
    }

    fn vip() -> crate::model::VipId {
        "10.0.0.1:80/tcp".parse().unwrap()
    }

    #[tokio::test]
    async fn requests_and_replies() {
        within(async {
            let dir = TempDir::new("replies");
            let server = serve(
                UnixListener::bind(dir.socket()).unwrap(),
                vec![
                    response(
                        "200 OK",
                        r#"{"applied":true,"changes":[{"op":"backend_add","vip":"10.0.0.1:80/tcp","address":"10.1.0.1","weight":5}]}"#,
                    ),
                    response("200 OK", r#"{"idle_timeout_secs":7,"vips":[]}"#),
                    response(
                        "200 OK",
                        r#"{"vip":"[2001:db8::1]:443/udp","backend":"2001:db8::2","flows":4}"#,
                    ),
                    response("200 OK", "not json"),
                ],
            );
            let client = Client::new(dir.socket());
            let change = Change::BackendAdd {
                vip: vip(),
                address: "10.1.0.1".parse().unwrap(),
                weight: Some(5),
                check: None,
            };
            let request = ChangeRequest {
                changes: vec![change.clone()],
                dry_run: false,
            };
            let reply = client.changes(&request).await.unwrap();
            assert!(reply.applied);
            assert_eq!(reply.changes, [change]);

            let status = client.status(Some(7)).await.unwrap();
            assert_eq!(status.idle_timeout_secs, 7);

            let query = FlowsQuery {
                vip: "[2001:db8::1]:443/udp".parse().unwrap(),
                backend: "2001:db8::2".parse().unwrap(),
                idle_timeout: Some(30),
                wait: true,
                timeout: Some(9),
            };
            let progress = client.flows(&query).await.unwrap();
            assert_eq!(progress.flows, 4);

            let e = client.state().await.unwrap_err();
            assert!(
                matches!(&e, ClientError::BadReply { request, .. } if request == "GET /v1/state"),
                "{e:?}"
            );
            assert!(e.to_string().starts_with("bad reply from lbd to GET /v1/state: expected"), "{e}");

            let requests = server.await.unwrap();
            let (head, body) = requests[0].split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("POST /v1/changes HTTP/1.1\r\n"), "{head}");
            assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
            assert_eq!(serde_json::from_str::<ChangeRequest>(body).unwrap(), request);
            assert!(requests[1].starts_with("GET /v1/status?idle_timeout=7 HTTP/1.1\r\n"));
            // Encoded values; `flows` never asks to wait.
            assert!(
                requests[2].starts_with(
                    "GET /v1/flows?vip=%5B2001%3Adb8%3A%3A1%5D%3A443%2Fudp&backend=2001%3Adb8%3A%3A2&idle_timeout=30 HTTP/1.1\r\n"
                ),
                "{}",
                requests[2]
            );
            assert!(requests[3].starts_with("GET /v1/state HTTP/1.1\r\n"));
        })
        .await;
    }

    #[tokio::test]
    async fn refusals_carry_lbds_message() {
        within(async {
            let dir = TempDir::new("refusals");
            let message = r#"vip["10.0.0.1:80/tcp"].backends["10.1.0.1"].weight: 70000 is out of range 0..=65535"#;
            let body = serde_json::to_string(&ErrorReply {
                error: message.to_owned(),
            })
            .unwrap();
            let server = serve(
                UnixListener::bind(dir.socket()).unwrap(),
                vec![
                    response("400 Bad Request", &body),
                    response("413 Payload Too Large", "length limit exceeded"),
                    response("500 Internal Server Error", ""),
                ],
            );
            let client = Client::new(dir.socket());
            let request = ChangeRequest {
                changes: vec![Change::BackendWeight {
                    vip: vip(),
                    address: "10.1.0.1".parse().unwrap(),
                    weight: 70_000,
                }],
                dry_run: false,
            };
            let e = client.changes(&request).await.unwrap_err();
            assert!(
                matches!(&e, ClientError::Refused { status: 400, message: m } if m == message),
                "{e:?}"
            );
            assert_eq!(e.to_string(), message);

            let e = client.apply(&ApplyRequest { vip: vec![], dry_run: true }).await.unwrap_err();
            assert!(matches!(&e, ClientError::Refused { status: 413, .. }), "{e:?}");
            assert_eq!(e.to_string(), "length limit exceeded");

            let e = client.state().await.unwrap_err();
            assert_eq!(e.to_string(), "lbd answered 500 Internal Server Error");
            server.await.unwrap();
        })
        .await;
    }

    fn line(flows: u64, done: bool, error: Option<&str>) -> String {
        let p = FlowProgress {
            vip: vip(),
            backend: "10.1.0.1".parse().unwrap(),
            flows,
            done,
            error: error.map(str::to_owned),
        };
        format!("{}\n", serde_json::to_string(&p).unwrap())
    }

    fn chunk(data: &str) -> String {
        format!("{:x}\r\n{data}\r\n", data.len())
    }

    const STREAM_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";

    /// The client must hand over each line before the next is sent: the server waits for the
    /// callback's acknowledgement of line N before it writes line N+1, so a client that
    /// buffered the stream would stall and the test would time out.
    #[tokio::test]
    async fn wait_flows_sees_each_line_as_it_arrives() {
        within(async {
            let dir = TempDir::new("stream");
            let listener = UnixListener::bind(dir.socket()).unwrap();
            let (ack, mut acks) = mpsc::unbounded_channel::<u64>();
            let server = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                let request = read_request(&mut stream).await;
                stream.write_all(STREAM_HEAD.as_bytes()).await.unwrap();
                let lines = [line(3, false, None), line(1, false, None), line(0, true, None)];
                let mut acked = Vec::new();
                for l in &lines {
                    // Each line in two pieces with a pause between: the client must join them.
                    let (a, b) = l.split_at(l.len() / 2);
                    stream.write_all(chunk(a).as_bytes()).await.unwrap();
                    stream.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    stream.write_all(chunk(b).as_bytes()).await.unwrap();
                    stream.flush().await.unwrap();
                    let got = timeout(Duration::from_secs(5), acks.recv()).await;
                    acked.push(got.ok().flatten());
                }
                // The client hangs up after the done line: the end chunk may find no reader.
                stream.write_all(b"0\r\n\r\n").await.ok();
                (request, acked)
            });
            let client = Client::new(dir.socket());
            let query = FlowsQuery {
                vip: vip(),
                backend: "10.1.0.1".parse().unwrap(),
                idle_timeout: Some(60),
                wait: false,
                timeout: Some(300),
            };
            let mut seen = Vec::new();
            let last = client
                .wait_flows(&query, |p| {
                    seen.push(p.flows);
                    ack.send(p.flows).unwrap();
                })
                .await
                .unwrap();
            assert!(last.done);
            assert_eq!(last.flows, 0);
            assert_eq!(seen, [3, 1, 0]);
            let (request, acked) = server.await.unwrap();
            assert_eq!(acked, [Some(3), Some(1), Some(0)]);
            assert!(
                request.starts_with(
                    "GET /v1/flows?vip=10.0.0.1%3A80%2Ftcp&backend=10.1.0.1&idle_timeout=60&wait=true&timeout=300 HTTP/1.1\r\n"
                ),
                "{request}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn wait_flows_ends_on_error_or_reports_a_cut_stream() {
        within(async {
            let dir = TempDir::new("stream-end");
            let listener = UnixListener::bind(dir.socket()).unwrap();
            let streams = [
                // An error line ends the wait; the line after it is never read.
                vec![
                    line(2, false, None),
                    line(2, false, Some("timed out after 1 s")),
                    line(0, true, None),
                ],
                // Cut short: no done, no error.
                vec![line(5, false, None)],
                vec!["{\"flows\":".to_owned()],
            ];
            let server = tokio::spawn(async move {
                for lines in streams {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    read_request(&mut stream).await;
                    stream.write_all(STREAM_HEAD.as_bytes()).await.unwrap();
                    for l in lines {
                        stream.write_all(chunk(&l).as_bytes()).await.unwrap();
                    }
                    // The client may have hung up after its last line: ignore write errors.
                    stream.write_all(b"0\r\n\r\n").await.ok();
                }
            });
            let client = Client::new(dir.socket());
            let query = FlowsQuery {
                vip: vip(),
                backend: "10.1.0.1".parse().unwrap(),
                idle_timeout: None,
                wait: true,
                timeout: None,
            };
            let mut seen = Vec::new();
            let last = client
                .wait_flows(&query, |p| seen.push(p.clone()))
                .await
                .unwrap();
            assert_eq!(last.error.as_deref(), Some("timed out after 1 s"));
            assert_eq!(seen.len(), 2);

            let e = client.wait_flows(&query, |_| {}).await.unwrap_err();
            assert!(
                e.to_string()
                    .ends_with("the stream ended with 5 flows left, before done or an error"),
                "{e}"
            );
            let e = client.wait_flows(&query, |_| {}).await.unwrap_err();
            assert!(matches!(e, ClientError::BadReply { .. }), "{e:?}");
            server.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn no_lbd_says_so() {
        let dir = TempDir::new("missing");
        let client = Client::new(dir.socket());
        let e = client.state().await.unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("is lbd running? (no socket at {})", dir.socket().display())
        );

        // A socket file left by an lbd that is gone.
        drop(std::os::unix::net::UnixListener::bind(dir.socket()).unwrap());
        let e = client.status(None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "is lbd running? (nothing listens on {})",
                dir.socket().display()
            )
        );
    }

    #[test]
    fn permission_hint() {
        let e = ClientError::Connect {
            path: "/run/lb/lbd.sock".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_eq!(
            e.to_string(),
            "permission denied on /run/lb/lbd.sock: run as root or as a member of the socket's group"
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("10.0.0.1:80/tcp"), "10.0.0.1%3A80%2Ftcp");
        assert_eq!(encode("a b+c%&=?#"), "a%20b%2Bc%25%26%3D%3F%23");
    }
}
