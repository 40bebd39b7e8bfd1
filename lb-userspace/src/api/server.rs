//! The control API's server: lbd's end of the Unix socket. It parses and checks each request,
//! forwards it to the agent as a [`Command`] and turns the answer into JSON; every refusal is an
//! [`ErrorReply`] that names the problem. Routes: the table in [`super::proto`].
//!
//! Each connection is its own task with a header read timeout (which also closes idle
//! keep-alive connections) and a body read timeout, so a stalled client only holds itself up.

use std::{convert::Infallible, future::Future, io, net::IpAddr, path::PathBuf, time::Duration};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{FromRequest, FromRequestParts, Request, State},
    http::{
        HeaderMap, HeaderValue, Method, StatusCode, Uri,
        header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE},
        request::Parts,
    },
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::{Stream, StreamExt};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, de::DeserializeOwned};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};
use tracing::Instrument;

use super::{
    ApiError, Command,
    proto::{
        ApplyRequest, BODY_LIMIT, ChangeReply, ChangeRequest, DEFAULT_IDLE_TIMEOUT_SECS, Debug,
        ErrorReply, FLOW_POLL_MS, FlowProgress, FlowsQuery, StateReply, Stats, Status,
    },
};
use crate::model::VipId;

pub use socket::bind;

/// A client must send a request's headers within this; an idle keep-alive connection is
/// closed after it too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head (request line and headers) may be this large; a larger one gets hyper's
/// 431. lbctl's are a few hundred bytes; hyper's own bound (about 400 KiB) is loose.
pub const HEAD_LIMIT: usize = 64 << 10;
/// A client must send a request's body within this.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `GET /v1/flows?wait=true` gives up after this many seconds unless told otherwise.
pub const DEFAULT_FLOW_WAIT_SECS: u64 = 300;
/// On shutdown, open connections get this long to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a transient accept error (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A body over [`BODY_LIMIT`] but under this is read and dropped before the 413, so the
/// client, done writing, sees the reply.
const DRAIN_LIMIT: usize = 8 * BODY_LIMIT;

/// Why lbd cannot serve the control API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {}: cannot create its folder: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: cannot inspect it: {source}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: refusing to use it: it is a symlink", path.display())]
    Symlink { path: PathBuf },
    #[error("control socket {}: refusing to use it: it exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error(
        "control socket {}: refusing to use it: it is owned by uid {owner}, not by lbd's uid {euid}",
        path.display()
    )]
    NotOurs {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "control socket {}: refusing to use it: its folder {} is owned by uid {owner}, not by \
         lbd (uid {euid}) or root",
        path.display(),
        dir.display()
    )]
    FolderNotOurs {
        path: PathBuf,
        dir: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "control socket {}: refusing to use it: its folder {} (mode {mode:04o}) is writable by \
         other users, who could replace the socket",
        path.display(),
        dir.display()
    )]
    FolderWritable {
        path: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error("control socket {}: another server answers on it (is lbd already running?)", path.display())]
    InUse { path: PathBuf },
    #[error("control socket {}: cannot remove the stale socket: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: cannot bind: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: cannot set mode 0660: {source}", path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket group {group:?}: no such group")]
    UnknownGroup { group: String },
    #[error("control socket group {group:?}: cannot look it up: {source}")]
    GroupLookup {
        group: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: cannot give it to group {group:?}: {source}", path.display())]
    Chown {
        path: PathBuf,
        group: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket: cannot accept connections: {0}")]
    Accept(#[source] io::Error),
}

/// Serves the control API on `listener` until `shutdown` completes, then gives open
/// connections a few seconds to finish. Each request becomes a [`Command`] on `commands`.
pub async fn serve(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let timeouts = Timeouts {
        header: HEADER_READ_TIMEOUT,
        body: BODY_READ_TIMEOUT,
        grace: SHUTDOWN_GRACE,
    };
    serve_with(listener, commands, shutdown, timeouts).await
}

#[derive(Clone, Copy, Debug)]
struct Timeouts {
    header: Duration,
    body: Duration,
    grace: Duration,
}

async fn serve_with(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    timeouts: Timeouts,
) -> Result<(), ServerError> {
    let router = router(Api {
        commands,
        body_timeout: timeouts.body,
    });
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let conn = serve_connection(stream, router.clone(), timeouts.header, stopping.clone());
                    connections.spawn(conn);
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!("control socket: accept failed, retrying: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                Err(e) => break Err(ServerError::Accept(e)),
            },
            Some(joined) = connections.join_next() => {
                if let Err(e) = joined {
                    tracing::error!("control API connection task failed: {e}");
                }
            }
        }
    };
    stop.send_replace(true);
    let drained = tokio::time::timeout(timeouts.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            "closing {} control API connections still open after {:?}",
            connections.len(),
            timeouts.grace
        );
        connections.shutdown().await;
    }
    result
}

/// Accept errors that concern one connection or a passing shortage, not the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
        )
    )
}

async fn serve_connection(
    stream: UnixStream,
    router: Router,
    header_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let routes = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let span = tracing::info_span!("api", method = %req.method(), path = %req.uri().path());
        tracing::debug!(parent: &span, query = req.uri().query().unwrap_or(""), "request");
        hyper::service::Service::call(&routes, req).instrument(span)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(HEAD_LIMIT);
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // The guard wait_for returns must not live across the await below.
        stop = async { stopping.wait_for(|stop| *stop).await.map(drop) } => {
            if stop.is_err() {
                tracing::debug!("control API server gone: closing connection");
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        // hyper has answered a malformed head itself (400, 414 or 431, without a body): say
        // what was wrong here, where the operator looks.
        Err(e) if e.is_parse() || e.is_parse_too_large() => {
            tracing::info!(
                "control API: refused a malformed request head: {}",
                chain(&e)
            );
        }
        // Also how an idle keep-alive connection ends: not worth more than debug.
        Err(e) if e.is_timeout() => {
            tracing::debug!("control API: no complete request head in time: closing");
        }
        Err(e) => tracing::debug!("control API connection ended: {}", chain(&e)),
        Ok(()) => {}
    }
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/state", get(get_state))
        .route("/v1/status", get(get_status))
        .route("/v1/changes", post(post_changes))
        .route("/v1/apply", post(post_apply))
        .route("/v1/flows", get(get_flows))
        .route("/v1/stats", get(get_stats))
        .route("/v1/debug", get(get_debug).put(put_debug))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api)
}

/// What every handler shares: the way to the agent.
#[derive(Clone)]
struct Api {
    commands: mpsc::Sender<Command>,
    body_timeout: Duration,
}

impl Api {
    /// Sends the command `make` builds and waits for the agent's answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Refusal> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| Refusal::agent_gone())?;
        answer.await.map_err(|_| Refusal::agent_gone())
    }

    async fn flows(&self, vip: VipId, backend: IpAddr, idle: Duration) -> Result<u64, Refusal> {
        let answer = self
            .ask(|reply| Command::Flows {
                vip,
                backend,
                idle_timeout: idle,
                reply,
            })
            .await?;
        Ok(answer?)
    }
}

/// A request lbd does not carry out: the status and the [`ErrorReply`] message.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn agent_gone() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "lbd is shutting down: its agent takes no more requests",
        )
    }
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        let status =
            StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, e.message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), "failed: {}", self.message);
        } else {
            tracing::info!(status = self.status.as_u16(), "refused: {}", self.message);
        }
        (
            self.status,
            Json(ErrorReply {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// A JSON request body: `Content-Type` JSON or absent, at most [`BODY_LIMIT`] bytes, complete
/// within the body timeout; errors name the field (`changes[0].vip: ...`).
struct JsonBody<T>(T);

impl<T: DeserializeOwned + Send> FromRequest<Api> for JsonBody<T> {
    type Rejection = Refusal;

    async fn from_request(req: Request, api: &Api) -> Result<Self, Refusal> {
        check_content_type(req.headers())?;
        // Too large to be worth reading even to discard: refuse before reading.
        if content_length(req.headers()).is_some_and(|len| len > DRAIN_LIMIT as u64) {
            return Err(too_large());
        }
        let read = read_body(req.into_body());
        match tokio::time::timeout(api.body_timeout, read).await {
            Ok(bytes) => parse_json(&bytes?).map(JsonBody),
            Err(_) => Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    api.body_timeout.as_secs_f64()
                ),
            )),
        }
    }
}

/// Reads a body of at most [`BODY_LIMIT`] bytes. A larger one is read on to its end (up to
/// [`DRAIN_LIMIT`]) and dropped: a client still writing when the server closes gets a reset
/// instead of the 413.
async fn read_body(body: Body) -> Result<Vec<u8>, Refusal> {
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| Refusal::bad_request(format!("request body: {}", chain(&e))))?;
        seen += chunk.len();
        if seen <= BODY_LIMIT {
            bytes.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > BODY_LIMIT {
        return Err(too_large());
    }
    Ok(bytes)
}

/// An error and its causes, `outer: inner: root`: hyper's body errors say only "error reading
/// a body from connection" on top and name the problem (a bad chunk size line) below.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Wrappers often repeat their inner error's text.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn too_large() -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the limit of {BODY_LIMIT} bytes"),
    )
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Refusal> {
    // No Content-Type: take it as JSON (the only body this API reads).
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match essence {
        Some(mime) if mime == "application/json" || mime.ends_with("+json") => Ok(()),
        _ => Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type must be application/json, not {:?} (curl: use --json)",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    if bytes.trim_ascii().is_empty() {
        return Err(Refusal::bad_request(
            "request body: expected a JSON object, got an empty body",
        ));
    }
    // Every body is an object: serde would also take a struct as an array of its fields, so
    // `[]` would be a whole-state apply with no VIPs.
    let start = bytes.trim_ascii_start();
    if !start.starts_with(b"{") {
        let got = match start.first() {
            Some(b'[') => "an array".to_owned(),
            _ => format!(
                "{:?}",
                String::from_utf8_lossy(&start[..start.len().min(16)])
            ),
        };
        return Err(Refusal::bad_request(format!(
            "request body: expected a JSON object, got {got}"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Refusal::bad_request(format!("request body (JSON): {e}")))?;
    de.end()
        .map_err(|e| Refusal::bad_request(format!("request body (JSON): {e}")))?;
    Ok(value)
}

/// A query string; errors name the parameter (`vip: "x" is not a valid VIP: ...`).
struct QueryOf<T>(T);

impl<T: DeserializeOwned + Send> FromRequestParts<Api> for QueryOf<T> {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _: &Api) -> Result<Self, Refusal> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(QueryOf)
            .map_err(|e| Refusal::bad_request(format!("query: {e}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    #[serde(default)]
    idle_timeout: Option<u64>,
}

fn idle_timeout(secs: Option<u64>) -> Duration {
    Duration::from_secs(secs.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS))
}

async fn get_state(State(api): State<Api>) -> Result<Json<StateReply>, Refusal> {
    Ok(Json(api.ask(Command::State).await?))
}

async fn get_status(
    State(api): State<Api>,
    QueryOf(query): QueryOf<StatusQuery>,
) -> Result<Json<Status>, Refusal> {
    let idle_timeout = idle_timeout(query.idle_timeout);
    let status = api
        .ask(|reply| Command::Status {
            idle_timeout,
            reply,
        })
        .await?;
    Ok(Json(status?))
}

async fn get_stats(
    State(api): State<Api>,
    QueryOf(query): QueryOf<StatusQuery>,
) -> Result<Json<Stats>, Refusal> {
    let idle_timeout = idle_timeout(query.idle_timeout);
    let stats = api
        .ask(|reply| Command::Stats {
            idle_timeout,
            reply,
        })
        .await?;
    Ok(Json(stats?))
}

async fn get_debug(State(api): State<Api>) -> Result<Json<Debug>, Refusal> {
    let reply = api.ask(|reply| Command::Debug { set: None, reply }).await?;
    Ok(Json(reply?))
}

async fn put_debug(
    State(api): State<Api>,
    JsonBody(request): JsonBody<Debug>,
) -> Result<Json<Debug>, Refusal> {
    let reply = api
        .ask(|reply| Command::Debug {
            set: Some(request),
            reply,
        })
        .await?;
    Ok(Json(reply?))
}

async fn post_changes(
    State(api): State<Api>,
    JsonBody(request): JsonBody<ChangeRequest>,
) -> Result<Json<ChangeReply>, Refusal> {
    let reply = api.ask(|reply| Command::Change { request, reply }).await?;
    Ok(Json(reply?))
}

async fn post_apply(
    State(api): State<Api>,
    JsonBody(request): JsonBody<ApplyRequest>,
) -> Result<Json<ChangeReply>, Refusal> {
    let reply = api.ask(|reply| Command::Apply { request, reply }).await?;
    Ok(Json(reply?))
}

async fn get_flows(
    State(api): State<Api>,
    QueryOf(query): QueryOf<FlowsQuery>,
) -> Result<Response, Refusal> {
    let started = Instant::now();
    let idle = idle_timeout(query.idle_timeout);
    // The first count comes before any reply, so an unknown VIP or backend is a plain 404.
    let flows = api.flows(query.vip, query.backend, idle).await?;
    let progress = FlowProgress {
        vip: query.vip,
        backend: query.backend,
        flows,
        done: flows == 0,
        error: None,
    };
    if !query.wait {
        return Ok(Json(progress).into_response());
    }
    let wait = FlowWait {
        api,
        vip: query.vip,
        backend: query.backend,
        idle,
        timeout_secs: query.timeout.unwrap_or(DEFAULT_FLOW_WAIT_SECS),
        started,
        last: flows,
        measured: Some(Ok(flows)),
        finished: false,
    };
    let headers = [(CONTENT_TYPE, "application/x-ndjson")];
    Ok((headers, Body::from_stream(wait.lines())).into_response())
}

/// `GET /v1/flows?wait=true`: one [`FlowProgress`] line per poll until the count is zero, the
/// time is up or the agent refuses (the backend went away).
struct FlowWait {
    api: Api,
    vip: VipId,
    backend: IpAddr,
    idle: Duration,
    timeout_secs: u64,
    started: Instant,
    /// The last count, for a line that ends in an error.
    last: u64,
    /// A count taken but not yet reported.
    measured: Option<Result<u64, Refusal>>,
    finished: bool,
}

impl FlowWait {
    fn lines(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut wait| async move {
            if wait.finished {
                return None;
            }
            let measured = if let Some(measured) = wait.measured.take() {
                measured
            } else {
                tokio::time::sleep(Duration::from_millis(FLOW_POLL_MS)).await;
                wait.api.flows(wait.vip, wait.backend, wait.idle).await
            };
            let progress = wait.report(measured);
            let mut line =
                serde_json::to_vec(&progress).expect("a FlowProgress always serializes to JSON");
            line.push(b'\n');
            Some((Ok(Bytes::from(line)), wait))
        })
    }

    fn report(&mut self, measured: Result<u64, Refusal>) -> FlowProgress {
        let mut progress = FlowProgress {
            vip: self.vip,
            backend: self.backend,
            flows: self.last,
            done: false,
            error: None,
        };
        match measured {
            Ok(0) => {
                progress.flows = 0;
                progress.done = true;
                self.finished = true;
            }
            Ok(flows) => {
                progress.flows = flows;
                self.last = flows;
                if self.started.elapsed() >= Duration::from_secs(self.timeout_secs) {
                    progress.error = Some(format!(
                        "timed out after {} s with {flows} flows still live",
                        self.timeout_secs
                    ));
                    self.finished = true;
                }
            }
            Err(refusal) => {
                progress.error = Some(refusal.message);
                self.finished = true;
            }
        }
        match &progress.error {
            Some(error) => tracing::info!(
                "flow wait for backend {} of {}: {error}",
                self.backend,
                self.vip
            ),
            None if progress.done => tracing::debug!(
                "flow wait for backend {} of {}: drained",
                self.backend,
                self.vip
            ),
            None => {}
        }
        progress
    }
}

async fn not_found(uri: Uri) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint: {} (there are GET /v1/state, GET /v1/status, POST /v1/changes, \
             POST /v1/apply, GET /v1/flows)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allow = match uri.path() {
        "/v1/changes" | "/v1/apply" => "POST",
        _ => "GET, HEAD",
    };
    let mut response = Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} {} is not allowed: use {allow}", uri.path()),
    )
    .into_response();
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

mod socket;
#[cfg(test)]
mod tests;
