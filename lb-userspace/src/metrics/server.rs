//! The metrics server on `--metrics-addr` (TCP, default 127.0.0.1:9100):
//!
//! | request            | reply                                                      |
//! |--------------------|------------------------------------------------------------|
//! | `GET /metrics`     | Prometheus text format ([`super::exposition`])             |
//! | `GET /`            | the status page ([`super::page`]), live without JavaScript frameworks |
//! | `GET /stats.json`  | [`Stats`], what the page refreshes itself from              |
//!
//! Read-only: nothing here changes lbd. Every request asks the agent for a fresh [`Stats`],
//! so counters are read from the pinned maps each time. Each connection is its own task with
//! a header read timeout, so a stalled client holds up only itself.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use super::{Metrics, exposition, page};
use crate::api::{ApiError, Command, proto::DEFAULT_IDLE_TIMEOUT_SECS, proto::Stats};

/// The address lbd serves metrics on unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9100";
/// A client must send a request's headers within this (idle keep-alive connections too).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent answers a stats request within this, or the request fails (a flow-table scan of
/// a full 1M table takes about half a second).
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// The Prometheus text format's content type.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("metrics address {addr}: cannot bind: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds the metrics address (before lbd touches the data plane, so a taken port stops it
/// early with a clear message).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsServerError::Bind { addr, source })
}

#[derive(Clone)]
struct Shared {
    commands: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
}

impl Shared {
    async fn stats(&self) -> Result<Stats, Failure> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Stats {
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| Failure::gone())?;
        match tokio::time::timeout(STATS_TIMEOUT, answer).await {
            Ok(Ok(stats)) => stats.map_err(Failure::from),
            Ok(Err(_)) => Err(Failure::gone()),
            Err(_) => Err(Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("lbd did not answer within {STATS_TIMEOUT:?}"),
            )),
        }
    }
}

/// A request that could not be answered: plain text, as scrapers log it.
struct Failure(StatusCode, String);

impl Failure {
    fn gone() -> Self {
        Self(
            StatusCode::SERVICE_UNAVAILABLE,
            "lbd is shutting down".to_owned(),
        )
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        tracing::warn!(
            status = self.0.as_u16(),
            "metrics request failed: {}",
            self.1
        );
        (
            self.0,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/", get(get_page))
        .route("/stats.json", get(get_stats_json))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics or /\n") })
        .with_state(shared)
}

async fn get_metrics(State(shared): State<Shared>) -> Result<Response, Failure> {
    let stats = shared.stats().await?;
    let body = exposition::render(&stats, &shared.metrics.registry);
    Ok(([(CONTENT_TYPE, TEXT_FORMAT)], body).into_response())
}

async fn get_page(State(shared): State<Shared>) -> Result<Response, Failure> {
    let stats = shared.stats().await?;
    let body = page::render(&stats);
    Ok(([(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

async fn get_stats_json(State(shared): State<Shared>) -> Result<Response, Failure> {
    let stats = shared.stats().await?;
    Ok(axum::Json(stats).into_response())
}

/// Serves until `shutdown` completes; open connections are then dropped (nothing here is
/// worth waiting for).
pub async fn serve(
    listener: TcpListener,
    commands: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let router = router(Shared { commands, metrics });
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = TowerToHyperService::new(router.clone());
                    connections.spawn(async move {
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
                        if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                            tracing::debug!("metrics connection ended: {e}");
                        }
                    });
                }
                // Out of descriptors or a connection reset before accept: pause, go on.
                Err(e) => {
                    tracing::warn!("metrics: accept failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
    connections.shutdown().await;
}
