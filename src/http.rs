//! Health, readiness and metrics endpoints shared by both binaries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::shutdown::{self, Shutdown};

/// Errors of the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("failed to serve HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// Whether the process is ready: ready when no [`Gate`] is closed (each part of the process holds
/// one until its first sync has completed).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicUsize>);

impl Readiness {
    /// A closed gate: the process is not ready until it is opened (or dropped).
    pub fn gate(&self) -> Gate {
        self.0.fetch_add(1, Ordering::SeqCst);
        Gate(Some(self.0.clone()))
    }

    /// Whether every gate is open.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

/// Keeps the process unready until opened or dropped.
pub struct Gate(Option<Arc<AtomicUsize>>);

impl Gate {
    /// Opens the gate.
    pub fn open(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.release();
    }
}

/// Binds `addr` and serves `/healthz` and `/readyz` until shutdown. Returns the bound address
/// (useful with port 0) and the serving task.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), HttpError>>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|| async { crate::metrics::get().encode() }))
        .with_state(readiness);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown::wait(shutdown))
            .await
            .map_err(HttpError::Serve)
    });
    Ok((local, task))
}

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    if readiness.get() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}
