//! The control API (`[control]`): what the contact-center platform tells the appliance about
//! the calls it records — the conversation and participants of the recording on a port, and
//! a pause while a caller reads out card details.
//!
//! - `PUT /v1/ports/{port}/metadata` with a JSON object (`conversation_id`, `participants`,
//!   anything else): sealed into the recording in progress on the port as a metadata record,
//!   or held for the next recording there. → `{"port", "applied": "now" | "next"}`.
//! - `POST /v1/ports/{port}/pause` and `…/resume`: no media is stored from the pause until
//!   the resume, in the recording in progress and in any that starts on the port meanwhile;
//!   the events are recorded. → `{"port", "paused", "applied": "now" | "next" | "unchanged"}`.
//!
//! Invariants:
//! - Every request carries `Authorization: Bearer <token>`; the token is compared in
//!   constant time (an HMAC under a random key of both sides), and a refusal says only 401.
//! - Bodies above `max_body_bytes` are refused (413) before they are read whole; a port
//!   outside `ingest.ports` is 404. Its own listener, loopback by default, TLS optional but
//!   required off loopback unless `allow_plaintext` (the token would cross the network in the
//!   clear); connections held within [`edgerec_net::https::Limits`].
//! - Metadata goes only into the package (encrypted) and nowhere else: not into logs, not
//!   into metrics, not into answers beyond the port.

use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use hmac::{KeyInit, Mac};
use serde_json::json;

use crate::appliance::config::Control;
use crate::appliance::feed::Msg;
use crate::appliance::session::{PauseApplied, Tagged};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The bearer token requests must carry, replaceable by a reload. Only the HMAC of the
/// token under a random key is kept, and a presented token is compared by its HMAC in
/// constant time.
pub struct ControlToken {
    key: [u8; 32],
    expected: std::sync::RwLock<Vec<u8>>,
}

impl ControlToken {
    fn new(token: &str) -> Result<ControlToken, ControlError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(ControlError::Random)?;
        let t = ControlToken {
            key,
            expected: std::sync::RwLock::new(Vec::new()),
        };
        t.set(token);
        Ok(t)
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.key).expect("HMAC takes a key of any length")
    }

    /// From now on requests must carry `token`.
    pub fn set(&self, token: &str) {
        let mut m = self.mac();
        m.update(token.as_bytes());
        *self
            .expected
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            m.finalize().into_bytes().to_vec();
    }

    fn matches(&self, presented: &str) -> bool {
        let mut m = self.mac();
        m.update(presented.as_bytes());
        let expected = self
            .expected
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.verify_slice(&expected).is_ok()
    }
}

/// What the handlers share.
struct Api {
    token: Arc<ControlToken>,
    recorder: SyncSender<Msg>,
    ports: (u16, u16),
}

impl Api {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        self.token.matches(presented)
    }
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn message(status: StatusCode, text: &str) -> Response {
    answer(status, json!({ "message": text }))
}

/// Sends a message to the recorder and waits (off the async threads) for its answer.
async fn ask<T: Send + 'static>(
    recorder: SyncSender<Msg>,
    make: impl FnOnce(SyncSender<T>) -> Msg + Send + 'static,
) -> Option<T> {
    tokio::task::spawn_blocking(move || {
        let (tx, rx) = sync_channel(1);
        recorder.send(make(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(10)).ok()
    })
    .await
    .ok()
    .flatten()
}

/// The refusal for a request that is not authorized or names no ingest port, if any.
fn refused(api: &Api, headers: &HeaderMap, port: u16) -> Option<Response> {
    if !api.authorized(headers) {
        return Some(message(StatusCode::UNAUTHORIZED, "authentication failed"));
    }
    if port < api.ports.0 || port > api.ports.1 {
        return Some(message(
            StatusCode::NOT_FOUND,
            "not an ingest port of this appliance",
        ));
    }
    None
}

async fn metadata(
    State(api): State<Arc<Api>>,
    Path(port): Path<u16>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&api, &headers, port) {
        return r;
    }
    let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice::<serde_json::Value>(&body)
    else {
        return message(StatusCode::BAD_REQUEST, "the body must be one JSON object");
    };
    let tagged = ask(api.recorder.clone(), move |reply| Msg::Metadata {
        port,
        doc,
        reply: Some(reply),
    })
    .await;
    match tagged {
        Some(Tagged::Now) => answer(StatusCode::OK, json!({ "port": port, "applied": "now" })),
        Some(Tagged::Held) => answer(StatusCode::OK, json!({ "port": port, "applied": "next" })),
        Some(Tagged::TooLarge) => message(
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than a record of this appliance (recorder.chunk_bytes)",
        ),
        Some(Tagged::TooManyHeld) => message(
            StatusCode::TOO_MANY_REQUESTS,
            "too many documents wait for the next recording on this port",
        ),
        None => message(
            StatusCode::SERVICE_UNAVAILABLE,
            "the recorder does not answer",
        ),
    }
}

async fn pause_or_resume(api: Arc<Api>, headers: HeaderMap, port: u16, pause: bool) -> Response {
    if let Some(r) = refused(&api, &headers, port) {
        return r;
    }
    let applied = ask(api.recorder.clone(), move |reply| Msg::Pause {
        port,
        pause,
        reply: Some(reply),
    })
    .await;
    let applied = match applied {
        Some(PauseApplied::Now) => "now",
        Some(PauseApplied::Next) => "next",
        Some(PauseApplied::Unchanged) => "unchanged",
        None => {
            return message(
                StatusCode::SERVICE_UNAVAILABLE,
                "the recorder does not answer",
            );
        }
    };
    answer(
        StatusCode::OK,
        json!({ "port": port, "paused": pause, "applied": applied }),
    )
}

/// Why the control API did not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No random bytes for the token comparison's key.
    #[error("no random bytes: {0}")]
    Random(getrandom::Error),
    /// The listener could not be bound.
    #[error("control.listen {addr}: {source}")]
    Bind {
        /// `control.listen`.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] edgerec_net::https::TlsConfigError),
}

/// Serves the control API on `listener` (bound to `cfg.listen`, non-blocking; inside the
/// runtime); returns its address, the server future (which runs until `shutdown`) and the
/// token's handle (a reload replaces the token).
pub fn serve<F: std::future::Future<Output = ()> + Send + 'static>(
    cfg: &Control,
    listener: std::net::TcpListener,
    recorder: SyncSender<Msg>,
    ports: (u16, u16),
    shutdown: F,
) -> Result<
    (
        std::net::SocketAddr,
        impl std::future::Future<Output = ()> + use<F>,
        Arc<ControlToken>,
    ),
    ControlError,
> {
    let token = Arc::new(ControlToken::new(&cfg.token)?);
    let api = Arc::new(Api {
        token: Arc::clone(&token),
        recorder,
        ports,
    });
    let router = Router::new()
        .route("/v1/ports/{port}/metadata", put(metadata))
        .route(
            "/v1/ports/{port}/pause",
            post(|State(a), Path(p), h| pause_or_resume(a, h, p, true)),
        )
        .route(
            "/v1/ports/{port}/resume",
            post(|State(a), Path(p), h| pause_or_resume(a, h, p, false)),
        )
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(api);
    let bind = |source| ControlError::Bind {
        addr: cfg.listen,
        source,
    };
    let tcp = tokio::net::TcpListener::from_std(listener).map_err(bind)?;
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(Arc::new(edgerec_net::https::server_config(
            cert,
            key,
            "control.tls_cert",
            "control.tls_key",
            true,
        )?)),
        None => None,
    };
    let addr = tcp.local_addr().map_err(bind)?;
    let limits = cfg.limits;
    let server = edgerec_net::https::serve(
        tcp,
        tls,
        router,
        limits,
        Arc::new(|cut| tracing::debug!(?cut, "control connection refused or cut")),
        shutdown,
    );
    Ok((addr, server, token))
}
