//! Serving a Prometheus registry: `/metrics` (text format), `/healthz` and `/readyz`, for
//! the appliance and the key manager alike, within the servers' [`Limits`].
//!
//! Invariant: what is served is only what the registry holds (each service keeps labels
//! free of recording ids, addresses and metadata); readiness is the service's own answer.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::https::Limits;

/// A service's answer to `/readyz`: ready, or why not.
pub trait Readiness: Send + Sync {
    /// `None` when ready; else the reason given in the 503's body.
    fn not_ready(&self) -> Option<String>;
}

struct Served {
    ready: Option<Arc<dyn Readiness>>,
    registry: Registry,
}

async fn metrics_text(State(s): State<Arc<Served>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn readyz(State(s): State<Arc<Served>>) -> impl IntoResponse {
    match s.ready.as_ref().and_then(|r| r.not_ready()) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds a listener for `registry` (`/metrics`, `/healthz`, `/readyz`; without `ready`,
/// always ready); returns its address and the server future.
pub async fn serve_registry(
    listen: SocketAddr,
    ready: Option<Arc<dyn Readiness>>,
    registry: Registry,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    serve_registry_on(
        tokio::net::TcpListener::bind(listen).await?,
        ready,
        registry,
    )
}

/// [`serve_registry`] on a listener already bound (one a service manager passed, say).
pub fn serve_registry_on(
    listener: tokio::net::TcpListener,
    ready: Option<Arc<dyn Readiness>>,
    registry: Registry,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let served = Arc::new(Served { ready, registry });
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(served);
    let addr = listener.local_addr()?;
    // Within the same limits as the services' own listeners: whoever reaches the port cannot
    // hold the process's descriptors.
    Ok((
        addr,
        crate::https::serve(
            listener,
            None,
            app,
            Limits::default(),
            Arc::new(|cut| tracing::debug!(?cut, "metrics connection refused or cut")),
            std::future::pending(),
        ),
    ))
}
