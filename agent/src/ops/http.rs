//! The local HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process runs and its WAL works)
//! and `/readyz` (events are being accepted: the WAL is neither failed nor full).

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use telemetry_wal::Wal;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::ops::metrics::METRICS;

/// A connection must send a request's headers within this, else it is closed.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog, holding none of the agent's file
/// descriptors (which ingest needs).
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a connection is served, however busy: a client that never reads its answers lets go.
const MAX_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn bind(address: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| format!("cannot listen on [http] listen = {address:?}"))
}

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, wal: Wal, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot before accepting: beyond the cap, connections wait in the kernel's backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let wal = wal.clone();
        let service = hyper::service::service_fn(move |request| {
            let wal = wal.clone();
            async move { Ok::<_, Infallible>(answer(&request, &wal)) }
        });
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            // Without a timer hyper never times out a client that sends no request.
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(MAX_CONNECTION_LIFETIME, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection ended with an error"),
                Err(_) => tracing::debug!(
                    secs = MAX_CONNECTION_LIFETIME.as_secs(),
                    "HTTP connection closed: served for too long"
                ),
            }
        });
    }
}

fn answer(request: &Request<Incoming>, wal: &Wal) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, METRICS.render());
            if let Ok(value) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        "/healthz" => match wal.failure() {
            None => text(StatusCode::OK, "ok\n".into()),
            Some(failure) => text(StatusCode::SERVICE_UNAVAILABLE, format!("WAL failed: {failure}\n")),
        },
        "/readyz" => match not_ready(wal) {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
    }
}

/// Why events are not being accepted, if they are not.
pub fn not_ready(wal: &Wal) -> Option<String> {
    if let Some(failure) = wal.failure() {
        return Some(format!("WAL failed: {failure}"));
    }
    match wal.stats() {
        Ok(stats) if stats.is_full() => {
            Some(format!("WAL full: {} of {} bytes; clients get wal_full", stats.disk_bytes, stats.max_bytes))
        }
        Ok(_) => None,
        Err(e) => Some(format!("cannot read WAL stats: {e}")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
