//! `edgerec lkm serve`: the Local Key Manager's HTTPS service, speaking the platform's
//! key-manager contract (`/key-management/v1/…`) so that a client written for it works
//! unchanged, plus `GET /key-management/v1/current` for recorders.
//!
//! Invariants:
//! - Every endpoint is Hawk-authenticated ([`crate::hawk_auth`]); a refusal says only
//!   "authentication failed" (401) and its reason goes to the audit log.
//! - Every request that touches a key is a line of the audit log: who (Hawk id and
//!   `PureCloud-User-Id`), the action, the key, the recording id where the caller gives one,
//!   the outcome.
//! - No endpoint returns a private key. Every failure to unwrap a DEK gets the same answer
//!   (400 "decrypt failed"), whatever went wrong inside; the DEK returned is zeroized after
//!   it is encoded.
//! - `POST /key-management/v1/auth` (issuing credentials) answers only an administrator's
//!   credential; `edgerec lkm credentials add` is the usual way.
//! - TLS handshakes run in their own tasks (10 s limit), so a slow client cannot stall the
//!   accept loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::audit::{AuditLog, Event};
use crate::format::Wrap;
use crate::hawk_auth::{Authenticated, RequestParts, Verifier};
use crate::keys::KekId;
use crate::keystore::{KeyRecord, KeyState, KeyStore};
use crate::lkm::{Lkm, LkmConfig, Rotation, rotation_due};
use crate::metrics::{LkmMetrics, SpoolState};
use crate::oracle::{Oracle, OracleError};
use crate::rate_limit::PerKey;

/// The service's shared state.
struct App {
    oracle: Oracle,
    audit: Mutex<AuditLog>,
    verifier: Verifier,
    credentials_file: std::path::PathBuf,
    /// The credentials file's modification time when last loaded.
    credentials_loaded: Mutex<Option<std::time::SystemTime>>,
    limiter: Mutex<PerKey<String>>,
    metrics: Arc<LkmMetrics>,
}

impl App {
    fn store(&self) -> &KeyStore {
        self.oracle.store()
    }

    /// Loads the credentials file again if it changed (`lkm credentials add` while the
    /// service runs, or `POST /auth`): a new credential works at once, a removed one stops.
    fn reload_credentials(&self) {
        let modified = std::fs::metadata(&self.credentials_file)
            .and_then(|m| m.modified())
            .ok();
        let Ok(mut loaded) = self.credentials_loaded.lock() else {
            return;
        };
        if *loaded == modified {
            return;
        }
        match crate::lkm::load_credentials(&self.credentials_file) {
            Ok(c) => {
                tracing::info!(credentials = c.len(), "credentials loaded");
                self.verifier.replace(c);
                *loaded = modified;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the credentials; the loaded ones stay")
            }
        }
    }
}

/// Runs the service until SIGTERM or SIGINT.
pub async fn serve(config: LkmConfig) -> Result<(), String> {
    let (cert, key) = config
        .tls
        .clone()
        .ok_or("lkm.tls_cert and lkm.tls_key are needed: the service speaks HTTPS only")?;
    let tls = Arc::new(crate::https::server_config(
        &cert,
        &key,
        "lkm.tls_cert",
        "lkm.tls_key",
    )?);
    let credentials = crate::lkm::load_credentials(&config.credentials_file)?;
    if credentials.is_empty() {
        tracing::warn!("no Hawk credentials yet: issue one with edgerec lkm credentials add");
    }
    let verifier = Verifier::new(
        credentials,
        Duration::from_secs(config.skew_secs),
        config.require_payload_hash,
    );
    let credentials_file = config.credentials_file.clone();
    let (listen, rotation, limit) = (config.listen, config.rotation, config.unwrap_limit);
    let (cache, metrics_listen) = (config.key_cache_secs, config.metrics_listen);
    // A KMS protector holds a blocking HTTP client: made outside the async context.
    let Lkm { store, audit, .. } = tokio::task::spawn_blocking(move || Lkm::open(config, false))
        .await
        .map_err(|e| e.to_string())??;
    let (metrics, registry) = LkmMetrics::new();
    let app = Arc::new(App {
        oracle: Oracle::new(store, Duration::from_secs(cache)),
        audit: Mutex::new(audit),
        verifier,
        credentials_loaded: Mutex::new(
            std::fs::metadata(&credentials_file)
                .and_then(|m| m.modified())
                .ok(),
        ),
        credentials_file,
        limiter: Mutex::new(PerKey::new(limit, 10_000)),
        metrics,
    });
    if let Some(addr) = metrics_listen {
        let (bound, server) = crate::metrics::serve_registry(addr, None, registry)
            .await
            .map_err(|e| format!("lkm.metrics_listen {addr}: {e}"))?;
        tracing::info!(%bound, "key manager metrics at /metrics");
        tokio::spawn(server);
    }
    tokio::spawn(housekeeping(Arc::clone(&app), rotation));
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("lkm.listen {listen}: {e}"))?;
    let listener = crate::https::TlsListener::start(tcp, tls).map_err(|e| e.to_string())?;
    let local = listener.local;
    let router = Router::new()
        .route(
            "/key-management/v1/keypair",
            get(list_keypairs).post(create_keypair),
        )
        .route("/key-management/v1/keypair/{id}", get(get_keypair))
        .route(
            "/key-management/v1/decrypt",
            post(decrypt).options(decrypt_options),
        )
        .route("/key-management/v1/auth", post(register))
        .route("/key-management/v1/current", get(current))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(app);
    tracing::info!(addr = %local, "key manager listening (HTTPS)");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler can be installed");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await
        .map_err(|e| e.to_string())
}

/// Every 2 s: the credentials file if it changed, the key gauges from the store (an
/// administrator's command may have changed it), and the scheduled rotation when it is due.
async fn housekeeping(app: Arc<App>, rotation: Rotation) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let a = Arc::clone(&app);
        let done = tokio::task::spawn_blocking(move || {
            a.reload_credentials();
            let all = a.store().list().map_err(|e| e.to_string())?;
            let current = all
                .iter()
                .rev()
                .find(|r| r.state == KeyState::Active)
                .map(|r| r.date_created);
            if rotation_due(rotation, current, crate::clock::now_ms()) {
                let made = a.store().generate(crate::clock::now_ms());
                let (key, outcome) = match &made {
                    Ok(r) => (Some(r.id.as_str()), "ok"),
                    Err(_) => (None, "failed"),
                };
                a.log("scheduler", None, "rotate.scheduled", key, None, outcome);
                let r = made.map_err(|e| e.to_string())?;
                tracing::info!(kek_id = %r.id, ?rotation, "scheduled rotation: new key pair");
            }
            let all = a.store().list().map_err(|e| e.to_string())?;
            for state in [KeyState::Active, KeyState::Retired, KeyState::Destroyed] {
                let n = all.iter().filter(|r| r.state == state).count();
                a.metrics
                    .keys
                    .get_or_create(&SpoolState {
                        state: state.as_str().into(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Ok::<_, String>(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "key store housekeeping failed"),
            Err(e) => tracing::error!(error = %e, "key store housekeeping panicked"),
        }
    }
}

/// A JSON answer with a message.
fn message(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({ "message": text }))).into_response()
}

/// The caller, authenticated, and the `PureCloud-User-Id` it sent.
struct Caller {
    who: Authenticated,
    user: Option<String>,
}

impl App {
    /// Logs a request of `caller` that names no recording.
    fn note(&self, caller: &Caller, action: &str, key: Option<&str>, outcome: &str) {
        self.log(
            &caller.who.id,
            caller.user.as_deref(),
            action,
            key,
            None,
            outcome,
        );
    }

    fn log(
        &self,
        who: &str,
        user: Option<&str>,
        action: &str,
        key: Option<&str>,
        recording: Option<&str>,
        outcome: &str,
    ) {
        let event = Event {
            who: who.to_string(),
            user: user.map(str::to_string),
            action: action.to_string(),
            key: key.map(str::to_string),
            recording: recording.map(str::to_string),
            outcome: outcome.to_string(),
        };
        let written = match self.audit.lock() {
            Ok(mut a) => a.append(&event, crate::clock::now_ms()).map(|_| ()),
            Err(_) => Err(std::io::Error::other("audit log lock poisoned")),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Authenticates a request, or answers 401 (and logs why).
    fn authenticate(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        action: &str,
    ) -> Result<Caller, Box<Response>> {
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let host_header = header("host").unwrap_or_default();
        let (host, port) = match host_header.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse().unwrap_or(443)),
            _ => (host_header, 443),
        };
        let content_type = header("content-type")
            .map(|c| c.split(';').next().unwrap_or_default().trim())
            .unwrap_or_default();
        let user = header("purecloud-user-id").map(str::to_string);
        let parts = RequestParts {
            method: method.as_str(),
            host,
            port,
            path: uri.path(),
            content_type,
            body,
            authorization: header("authorization"),
        };
        match self.verifier.verify(&parts) {
            Ok(who) => Ok(Caller { who, user }),
            Err(denied) => {
                let who = denied.id.clone().unwrap_or_else(|| "-".into());
                self.log(
                    &who,
                    user.as_deref(),
                    action,
                    None,
                    None,
                    &format!("denied: {}", denied.reason),
                );
                Err(Box::new(message(
                    StatusCode::UNAUTHORIZED,
                    "authentication failed",
                )))
            }
        }
    }
}

/// What a request is for, in the audit log.
fn action_of(method: &Method, path: &str) -> &'static str {
    match (method.as_str(), path.trim_end_matches('/')) {
        ("POST", "/key-management/v1/keypair") => "keypair.create",
        ("GET", "/key-management/v1/keypair") => "keypair.list",
        ("GET", "/key-management/v1/current") => "keypair.current",
        ("GET", _) => "keypair.get",
        ("POST", "/key-management/v1/decrypt") => "decrypt",
        ("OPTIONS", _) => "decrypt.options",
        ("POST", "/key-management/v1/auth") => "credentials.add",
        _ => "other",
    }
}

/// An authenticated request: its caller and body. Extracting it answers 401 (logged) for
/// anyone else.
struct Authed {
    caller: Caller,
    body: Bytes,
}

impl axum::extract::FromRequest<Arc<App>> for Authed {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, app: &Arc<App>) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 64 << 10)
            .await
            .map_err(|_| message(StatusCode::PAYLOAD_TOO_LARGE, "request too large"))?;
        let action = action_of(&parts.method, parts.uri.path());
        let caller = app
            .authenticate(&parts.method, &parts.uri, &parts.headers, &body, action)
            .map_err(|r| *r)?;
        Ok(Authed { caller, body })
    }
}

/// The contract's view of a key pair.
fn keypair_json(r: &KeyRecord) -> serde_json::Value {
    json!({ "id": r.id, "publicKey": r.public_key, "dateCreated": r.date_created, "state": r.state })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| message(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

async fn create_keypair(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    let a = Arc::clone(&app);
    let made = match blocking(move || a.store().generate(crate::clock::now_ms())).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    match made {
        Ok(r) => {
            app.note(&caller, "keypair.create", Some(&r.id), "ok");
            axum::Json(keypair_json(&r)).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot make a key pair");
            app.note(&caller, "keypair.create", None, "failed");
            message(StatusCode::INTERNAL_SERVER_ERROR, "cannot make a key pair")
        }
    }
}

async fn list_keypairs(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    app.note(&caller, "keypair.list", None, "ok");
    match app.store().list() {
        Ok(all) => axum::Json(all.iter().map(keypair_json).collect::<Vec<_>>()).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot list the key store");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot read the key store",
            )
        }
    }
}

async fn get_keypair(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
    Authed { caller, .. }: Authed,
) -> Response {
    match app.store().get(&id) {
        Ok(r) => {
            app.note(&caller, "keypair.get", Some(&id), "ok");
            axum::Json(keypair_json(&r)).into_response()
        }
        Err(_) => {
            app.note(&caller, "keypair.get", Some(&id), "unknown_key");
            message(StatusCode::NOT_FOUND, "no such keypair")
        }
    }
}

async fn current(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    match app.store().current() {
        Ok(Some(r)) => {
            app.note(&caller, "keypair.current", Some(&r.id), "ok");
            axum::Json(keypair_json(&r)).into_response()
        }
        _ => message(StatusCode::NOT_FOUND, "no active keypair"),
    }
}

/// The decrypt request of the contract (`recordingId` is edgerec's optional addition, for
/// the audit log).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecryptBody {
    keypair_id: String,
    body: String,
    decrypt_type: Option<String>,
    recording_id: Option<String>,
}

async fn decrypt(State(app): State<Arc<App>>, Authed { caller, body }: Authed) -> Response {
    let log = |key: Option<&str>, rec: Option<&str>, outcome: &str| {
        app.metrics.unwrap(outcome);
        app.log(
            &caller.who.id,
            caller.user.as_deref(),
            "decrypt",
            key,
            rec,
            outcome,
        )
    };
    let limited = match app.limiter.lock() {
        Ok(mut l) => l.take(&caller.who.id, crate::clock::now_ms()).err(),
        Err(_) => Some(1000),
    };
    if let Some(wait_ms) = limited {
        log(None, None, "rate_limited");
        let mut r = message(
            StatusCode::TOO_MANY_REQUESTS,
            "too many decrypt requests for this credential",
        );
        if let Ok(v) = axum::http::HeaderValue::from_str(&wait_ms.div_ceil(1000).to_string()) {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        return r;
    }
    let Ok(req) = serde_json::from_slice::<DecryptBody>(&body) else {
        log(None, None, "bad_request");
        return message(
            StatusCode::BAD_REQUEST,
            "Decrypt body and keypairId must be filled out",
        );
    };
    let rec = req.recording_id.as_deref();
    let wrap = match req.decrypt_type.as_deref() {
        None | Some("") | Some("oaep") | Some("oaep-sha1") => Wrap::OaepSha1,
        Some("erec") => Wrap::OaepSha256,
        Some(_) => {
            log(Some(&req.keypair_id), rec, "unsupported_type");
            return message(StatusCode::BAD_REQUEST, "unsupported decryptType");
        }
    };
    let Some(id) = KekId::from_hex(&req.keypair_id) else {
        log(Some(&req.keypair_id), rec, "unknown_key");
        return message(StatusCode::NOT_FOUND, "no such keypair");
    };
    let a = Arc::clone(&app);
    let sealed = base64::engine::general_purpose::STANDARD.decode(req.body.as_bytes());
    let unwrapped = blocking(move || -> Result<Zeroizing<String>, OracleError> {
        let sealed = sealed.map_err(|_| OracleError::Failed)?;
        let dek = a.oracle.unwrap(&id, wrap, &sealed)?;
        Ok(Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(dek.expose()),
        ))
    })
    .await;
    let key = Some(req.keypair_id.as_str());
    match unwrapped {
        Ok(Ok(dek)) => {
            log(key, rec, "ok");
            axum::Json(json!({ "body": dek.as_str() })).into_response()
        }
        Ok(Err(OracleError::Unknown)) => {
            log(key, rec, "unknown_key");
            message(StatusCode::NOT_FOUND, "no such keypair")
        }
        Ok(Err(OracleError::Destroyed)) => {
            log(key, rec, "destroyed");
            message(StatusCode::GONE, "key destroyed")
        }
        Ok(Err(OracleError::Revoked(why))) => {
            tracing::error!(kek_id = %req.keypair_id, error = %why, "the key's protection refused");
            log(key, rec, "access_revoked");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "access revoked: the key's protection refused",
            )
        }
        Ok(Err(OracleError::Unavailable(why))) => {
            tracing::error!(kek_id = %req.keypair_id, error = %why, "the key's protection cannot answer");
            log(key, rec, "protection_unavailable");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "key protection unavailable: try again later",
            )
        }
        Ok(Err(OracleError::Store(why))) => {
            tracing::error!(kek_id = %req.keypair_id, error = %why, "key store");
            log(key, rec, "error");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the key store cannot be read",
            )
        }
        Ok(Err(OracleError::Failed)) | Err(_) => {
            log(key, rec, "failed");
            message(StatusCode::BAD_REQUEST, "decrypt failed")
        }
    }
}

async fn decrypt_options(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    app.note(&caller, "decrypt.options", None, "ok");
    axum::Json(json!({
        "encryptBody": { "keypairId": null, "body": null, "decryptType": null },
        "decryptResponse": { "body": "Decrypted Response" },
    }))
    .into_response()
}

#[derive(Deserialize)]
struct Register {
    id: String,
}

async fn register(State(app): State<Arc<App>>, Authed { caller, body }: Authed) -> Response {
    if !caller.who.admin {
        app.note(
            &caller,
            "credentials.add",
            None,
            "denied: not an administrator",
        );
        return message(
            StatusCode::FORBIDDEN,
            "only an administrator issues credentials",
        );
    }
    let Ok(req) = serde_json::from_slice::<Register>(&body) else {
        return message(StatusCode::BAD_REQUEST, "a JSON body with the id");
    };
    match crate::lkm::add_credential(&app.credentials_file, &req.id, false) {
        Ok(key) => {
            app.note(&caller, "credentials.add", None, "ok");
            tracing::info!(id = %req.id, "credential issued");
            app.reload_credentials();
            axum::Json(json!({ "id": req.id, "authKey": key.as_str(), "algorithm": "sha256" }))
                .into_response()
        }
        Err(e) => {
            app.note(&caller, "credentials.add", None, "failed");
            message(StatusCode::BAD_REQUEST, &e)
        }
    }
}
