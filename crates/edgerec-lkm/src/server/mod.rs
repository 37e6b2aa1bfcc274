//! `edgerec lkm serve`: the Local Key Manager's HTTPS service, speaking the platform's
//! key-manager contract (`/key-management/v1/…`) so that a client written for it works
//! unchanged, plus `GET /key-management/v1/current` for recorders and an unauthenticated
//! `GET /key-management/v1/health` for load balancers.
//!
//! Invariants:
//! - Every endpoint but `health` is Hawk-authenticated (its `hawk_auth`); a refusal
//!   says only "authentication failed" (401) and its reason goes to the audit log.
//! - Every credential has a role ([`crate::roles`]) and every endpoint needs one: a
//!   recorder's credential reads public keys and nothing more; a request beyond its role is
//!   refused (403) and logged.
//! - Every request that touches a key is a line of the audit log: who (Hawk id and
//!   `PureCloud-User-Id`), the action, the key, the recording id where the caller gives one,
//!   the outcome. An unwrap is answered, and a key pair or credential made, only after its
//!   line is written and synced; when the log cannot be written the request is refused
//!   (503), never served unaudited. Lines about refused requests are rate-limited.
//! - No endpoint returns a private key. Every failure to unwrap a DEK gets the same answer
//!   (400 "decrypt failed"), whatever went wrong inside; the DEK returned lives in zeroizing
//!   buffers up to the connection's write.
//! - Unwraps and key pair creation are rate-limited per credential (429 + Retry-After).
//! - Deliberately not offered: `decryptType: "pkcs1"` (RSA PKCS#1 v1.5), which the contract
//!   allows: a service that unwraps it for anyone holding a credential is a padding oracle
//!   (Bleichenbacher), and edgerec never seals with it.
//! - Connections are held within [`edgerec_net::https::Limits`] (`[lkm]` header and idle timeouts,
//!   connection caps).
//!
//! Its modules, private to it: `hawk_auth` (Hawk verification, bounded fields, the nonce
//! cache), `oracle` (the unwrap and its opened-key cache) and `metrics` (the service's own
//! metrics, no key or client named in a label).

pub(crate) mod hawk_auth;
mod metrics;
mod oracle;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::audit::{Durability, Event, WriteError, Writer};
use crate::keystore::{KeyRecord, KeyState, KeyStore};
use crate::manager::{Lkm, LkmConfig, Rotation, rotation_due};
use crate::roles::{Action, Role};
use crate::server::hawk_auth::{Authenticated, RequestParts, Verifier};
use crate::server::metrics::{KeyStateLabel, LkmMetrics};
use crate::server::oracle::{Oracle, OracleError};
use edgerec_net::rate_limit::PerKey;
use erec::format::Wrap;
use erec::keys::KekId;

/// The service's shared state.
struct App {
    oracle: Oracle,
    audit: Writer,
    verifier: Verifier,
    credentials_file: std::path::PathBuf,
    demo: bool,
    /// The credentials file as last loaded (or failed to load): device, inode, size and
    /// modification time. Every rewrite makes a new inode, so no change goes unseen.
    credentials_loaded: Mutex<Option<FileStamp>>,
    unwraps: Mutex<PerKey<String>>,
    keypairs: Mutex<PerKey<String>>,
    reads: Mutex<PerKey<String>>,
    metrics: Arc<LkmMetrics>,
}

/// What tells one version of a file from another.
type FileStamp = (u64, u64, u64, Option<std::time::SystemTime>);

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.modified().ok()))
}

impl App {
    fn store(&self) -> &KeyStore {
        self.oracle.store()
    }

    /// Loads the credentials file again if it changed (`lkm credentials add` while the
    /// service runs, or `POST /auth`): a new credential works at once, a removed one stops.
    /// A file that cannot be loaded (it does not parse, its mode is loose, it holds a demo
    /// credential) leaves no credential working until it is mended: a revocation in it must
    /// not be ignored.
    fn reload_credentials(&self) {
        let now = stamp(&self.credentials_file);
        let Ok(mut loaded) = self.credentials_loaded.lock() else {
            return;
        };
        if *loaded == now {
            return;
        }
        *loaded = now;
        match crate::manager::load_credentials(&self.credentials_file, self.demo) {
            Ok(c) => {
                tracing::info!(credentials = c.all.len(), "credentials loaded");
                warn_unset(&c.unset);
                self.verifier.replace(c.all);
            }
            Err(e) => {
                self.verifier.replace(Default::default());
                tracing::error!(
                    error = %e,
                    "cannot load the credentials: every request is refused until the file is \
                     mended"
                )
            }
        }
    }

    /// A line the caller need not wait for.
    fn line(&self, event: Event, durability: Durability) {
        self.audit.write(event, durability, None);
    }

    /// Writes a line and waits until it is written and synced; the 503 to answer if it
    /// cannot be.
    async fn audited(&self, event: Event) -> Result<(), Response> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.audit.write(
            event,
            Durability::Synced,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(message(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot be written: request refused",
            )),
        }
    }

    /// [`App::audited`] from a blocking thread (the scheduler).
    fn audited_blocking(&self, event: Event) -> Result<(), WriteError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.audit.write(
            event,
            Durability::Synced,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        rx.recv().map_err(|_| WriteError::Stopped)?
    }

    /// A refused request: counted by `reason`, and a rate-limited line (in the bucket of the
    /// credential that asked, if one was authenticated).
    fn denied(&self, event: Event, reason: &str, by: Option<&str>) {
        self.metrics.denied(reason);
        let durability = match by {
            Some(id) => Durability::DenialOf(id.to_string()),
            None => Durability::Denial,
        };
        self.line(event, durability);
    }
}

/// Warns of every credential of before roles (read as `platform`, which can decrypt).
fn warn_unset(unset: &[String]) {
    for id in unset {
        tracing::warn!(
            credential = %id,
            "this credential has no role and is read as platform (it can decrypt and make key \
             pairs); set the role it needs: edgerec lkm credentials set-role --config FILE {id} \
             recorder (for a recording appliance)"
        );
    }
}

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No certificate and key are configured.
    #[error("lkm.tls_cert and lkm.tls_key are needed: the service speaks HTTPS only")]
    NoTls,
    /// The certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] edgerec_net::https::TlsConfigError),
    /// The credentials file cannot be used.
    #[error(transparent)]
    Credentials(#[from] crate::manager::CredentialsError),
    /// The key store or its audit log cannot be opened.
    #[error(transparent)]
    Open(#[from] crate::manager::ManagerError),
    /// Opening the key store panicked.
    #[error("opening the key store: {0}")]
    Panicked(#[from] tokio::task::JoinError),
    /// The audit writer's thread could not start.
    #[error("the audit writer: {0}")]
    AuditWriter(std::io::Error),
    /// A listener could not be bound.
    #[error("{key} {addr}: {source}")]
    Bind {
        /// `lkm.listen` or `lkm.metrics_listen`.
        key: &'static str,
        /// Its address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The file descriptor limit could not be raised.
    #[error("cannot raise the file descriptor limit: {0}")]
    Descriptors(std::io::Error),
    /// The file descriptor limit is below what the connections need.
    #[error(
        "the file descriptor limit is {got}, below lkm.max_connections + 256 = {need}: raise \
         LimitNOFILE (systemd) or ulimit -n, or lower lkm.max_connections"
    )]
    TooFewDescriptors {
        /// The limit.
        got: u64,
        /// What is needed.
        need: u64,
    },
}

/// Runs the service until SIGTERM or SIGINT.
pub async fn serve(config: LkmConfig) -> Result<(), ServeError> {
    let (cert, key) = config.tls.clone().ok_or(ServeError::NoTls)?;
    let tls = Arc::new(edgerec_net::https::server_config(
        &cert,
        &key,
        "lkm.tls_cert",
        "lkm.tls_key",
        !config.demo,
    )?);
    let credentials = crate::manager::load_credentials(&config.credentials_file, config.demo)?;
    if credentials.all.is_empty() {
        tracing::warn!("no Hawk credentials yet: issue one with edgerec lkm credentials add");
    }
    warn_unset(&credentials.unset);
    let verifier = Verifier::new(
        credentials.all,
        Duration::from_secs(config.skew_secs),
        config.require_payload_hash,
    );
    let credentials_file = config.credentials_file.clone();
    let (listen, rotation, limit) = (config.listen, config.rotation, config.unwrap_limit);
    let (cache, metrics_listen, demo) = (config.key_cache_secs, config.metrics_listen, config.demo);
    let (keypair_limit, denials, server_limits, read_limit) = (
        config.keypair_limit,
        config.audit_denials,
        config.server,
        config.read_limit,
    );
    // A KMS protector holds a blocking HTTP client: made outside the async context.
    let Lkm { store, audit, .. } =
        tokio::task::spawn_blocking(move || Lkm::open(config, false)).await??;
    let (metrics, registry) = LkmMetrics::new();
    metrics
        .rotation_period
        .set(rotation.period_ms().map_or(0, |ms| (ms / 1000) as i64));
    let m = Arc::clone(&metrics);
    let audit = Writer::start(
        audit,
        denials,
        Box::new(move |e| {
            m.audit_write_errors.inc();
            tracing::error!(error = %e, "cannot write the audit log: audited requests are refused");
        }),
    )
    .map_err(ServeError::AuditWriter)?;
    let app = Arc::new(App {
        oracle: Oracle::new(store, Duration::from_secs(cache)),
        audit,
        verifier,
        credentials_loaded: Mutex::new(stamp(&credentials_file)),
        credentials_file,
        demo,
        unwraps: Mutex::new(PerKey::new(limit, 10_000)),
        keypairs: Mutex::new(PerKey::new(keypair_limit, 10_000)),
        reads: Mutex::new(PerKey::new(read_limit, 10_000)),
        metrics: Arc::clone(&metrics),
    });
    if let Some(addr) = metrics_listen {
        let (bound, server) = edgerec_net::metrics_http::serve_registry(addr, None, registry)
            .await
            .map_err(|source| ServeError::Bind {
                key: "lkm.metrics_listen",
                addr,
                source,
            })?;
        tracing::info!(%bound, "key manager metrics at /metrics");
        tokio::spawn(server);
    }
    tokio::spawn(housekeeping(Arc::clone(&app), rotation));
    // Every connection is a descriptor; the key store's files need some too.
    let need = server_limits.max_connections as u64 + 256;
    let got = rlimit::increase_nofile_limit(need).map_err(ServeError::Descriptors)?;
    if got < need {
        return Err(ServeError::TooFewDescriptors { got, need });
    }
    let bind = |source| ServeError::Bind {
        key: "lkm.listen",
        addr: listen,
        source,
    };
    let tcp = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
    let local = tcp.local_addr().map_err(bind)?;
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
        .route(
            "/key-management/v1/health",
            get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(app);
    tracing::info!(addr = %local, "key manager listening (HTTPS)");
    let cut_metrics = Arc::clone(&metrics);
    edgerec_net::https::serve(
        tcp,
        Some(tls),
        router,
        server_limits,
        Arc::new(move |cut| {
            use edgerec_net::https::Cut;
            match cut {
                Cut::TooManyConnections | Cut::TooManyFromAddress => {
                    cut_metrics.denied("connection_limit")
                }
                // A handshake or request head not sent in time: a slow or stalling client.
                Cut::HeaderTimeout => cut_metrics.denied("timeout"),
                // A kept-alive connection closed once idle is housekeeping, not a refusal
                // (an appliance polling every minute has one a minute).
                Cut::Idle => {}
            }
        }),
        async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler can be installed");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        },
    )
    .await;
    Ok(())
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
            let now = erec::clock::now_ms();
            let current = a.store().current(now)?.map(|r| r.date_created);
            if rotation_due(rotation, current, now) {
                // Written before the key exists: a key that recorders seal to is never unaudited.
                a.audited_blocking(scheduler_event(None, "started"))?;
                let made = a.store().generate(now);
                let (key, outcome) = match &made {
                    Ok(r) => (Some(r.id.as_str()), "ok"),
                    Err(_) => (None, "failed"),
                };
                a.audited_blocking(scheduler_event(key, outcome))?;
                let r = made?;
                tracing::info!(kek_id = %r.id, ?rotation, "scheduled rotation: new key pair");
            }
            let all = a.store().list()?;
            for state in [KeyState::Active, KeyState::Retired, KeyState::Destroyed] {
                let n = all.iter().filter(|r| r.state == state).count();
                a.metrics
                    .keys
                    .get_or_create(&KeyStateLabel {
                        state: state.as_str().into(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Ok::<_, HousekeepingError>(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "key store housekeeping failed"),
            Err(e) => tracing::error!(error = %e, "key store housekeeping panicked"),
        }
    }
}

/// Why a round of housekeeping failed (the next one tries again).
#[derive(Debug, thiserror::Error)]
enum HousekeepingError {
    /// The key store could not be read, or a key pair not made.
    #[error(transparent)]
    Store(#[from] crate::keystore::KeyStoreError),
    /// The rotation could not be audited, so it was not made (or not reported).
    #[error(transparent)]
    Audit(#[from] WriteError),
}

fn scheduler_event(key: Option<&str>, outcome: &str) -> Event {
    Event {
        who: "scheduler".into(),
        user: None,
        action: "rotate.scheduled".into(),
        key: key.map(str::to_string),
        recording: None,
        outcome: outcome.into(),
    }
}

/// A JSON answer with a message.
fn message(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({ "message": text }))).into_response()
}

/// A 429 with the wait in `Retry-After`.
fn too_many(text: &str, wait_ms: u64) -> Response {
    let mut r = message(StatusCode::TOO_MANY_REQUESTS, text);
    if let Ok(v) = axum::http::HeaderValue::from_str(&wait_ms.div_ceil(1000).to_string()) {
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    r
}

/// The caller, authenticated, and the `PureCloud-User-Id` it sent.
struct Caller {
    who: Authenticated,
    user: Option<String>,
}

impl Caller {
    /// An event of this caller.
    fn event(
        &self,
        action: &str,
        key: Option<&str>,
        recording: Option<&str>,
        outcome: &str,
    ) -> Event {
        Event {
            who: self.who.id.clone(),
            user: self.user.clone(),
            action: action.to_string(),
            key: key.map(str::to_string),
            recording: recording.map(str::to_string),
            outcome: outcome.to_string(),
        }
    }
}

impl App {
    /// Authenticates a request and checks its role, or answers 401 / 403 (and logs why).
    fn authenticate(
        &self,
        parts: &axum::http::request::Parts,
        body: &[u8],
        action: Action,
    ) -> Result<Caller, Box<Response>> {
        let (method, uri, headers): (&str, &Uri, &HeaderMap) =
            (parts.method.as_str(), &parts.uri, &parts.headers);
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        let host_header = header("host").unwrap_or_default();
        let (host, port) = match host_header.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse().unwrap_or(443)),
            _ => (host_header, 443),
        };
        let content_type = header("content-type")
            .map(|c| c.split(';').next().unwrap_or_default().trim())
            .unwrap_or_default();
        // Cleaned and bounded again by the audit log; bounded here so nothing long is kept.
        let user = header("purecloud-user-id")
            .map(|u| crate::audit::clean(u, crate::audit::MAX_CALLER_FIELD));
        let req = RequestParts {
            method,
            host,
            port,
            path: uri.path(),
            content_type,
            body,
            authorization: header("authorization"),
        };
        let who = match self.verifier.verify(&req) {
            Ok(who) => who,
            Err(denied) => {
                self.denied(
                    Event {
                        who: denied.id.clone().unwrap_or_else(|| "-".into()),
                        user,
                        action: action.name().into(),
                        key: None,
                        recording: None,
                        outcome: format!("denied: {}", denied.reason),
                    },
                    "authentication",
                    None,
                );
                return Err(Box::new(message(
                    StatusCode::UNAUTHORIZED,
                    "authentication failed",
                )));
            }
        };
        let caller = Caller { who, user };
        if !caller.who.role.may(action) {
            self.denied(
                caller.event(
                    action.name(),
                    None,
                    None,
                    &format!(
                        "denied: role {} may not (needs {})",
                        caller.who.role,
                        action.needs()
                    ),
                ),
                "role",
                Some(&caller.who.id),
            );
            return Err(Box::new(message(
                StatusCode::FORBIDDEN,
                &format!(
                    "this credential's role ({}) does not allow {}",
                    caller.who.role,
                    action.name()
                ),
            )));
        }
        Ok(caller)
    }
}

/// An authenticated request whose role allows it: its caller and body. Extracting it
/// answers 401 or 403 (logged) for anyone else.
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
        let action = Action::of(parts.method.as_str(), parts.uri.path());
        let caller = app.authenticate(&parts, &body, action).map_err(|r| *r)?;
        // Reads of public keys (what recorders poll) have a limit of their own: each is an
        // audit line.
        if action.needs() == Role::Recorder
            && let Some(r) = limited(
                app,
                &app.reads,
                &caller,
                action.name(),
                "too many requests for this credential",
            )
        {
            return Err(r);
        }
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

/// Takes a token of `caller` from `limiter`, or the 429 to answer (logged, counted).
fn limited(
    app: &App,
    limiter: &Mutex<PerKey<String>>,
    caller: &Caller,
    action: &str,
    text: &str,
) -> Option<Response> {
    let wait = match limiter.lock() {
        Ok(mut l) => l.take(&caller.who.id, erec::clock::now_ms()).err(),
        Err(_) => Some(1000),
    }?;
    app.denied(
        caller.event(action, None, None, "rate_limited"),
        "rate_limit",
        Some(&caller.who.id),
    );
    Some(too_many(text, wait))
}

/// Runs an act to its end even when the client goes away meanwhile (axum drops a handler
/// whose connection closed): a key pair or credential made is always followed by its line.
async fn to_the_end(act: impl std::future::Future<Output = Response> + Send + 'static) -> Response {
    tokio::spawn(act)
        .await
        .unwrap_or_else(|_| message(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

async fn create_keypair(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    to_the_end(make_keypair(app, caller)).await
}

async fn make_keypair(app: Arc<App>, caller: Caller) -> Response {
    const ACTION: &str = "keypair.create";
    if let Some(r) = limited(
        &app,
        &app.keypairs,
        &caller,
        ACTION,
        "too many key pairs made with this credential",
    ) {
        return r;
    }
    // The act is in the log before the key exists: recorders may seal to it at once.
    if let Err(r) = app
        .audited(caller.event(ACTION, None, None, "started"))
        .await
    {
        return r;
    }
    let a = Arc::clone(&app);
    let made = match blocking(move || a.store().generate(erec::clock::now_ms())).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    match made {
        Ok(r) => match app
            .audited(caller.event(ACTION, Some(&r.id), None, "ok"))
            .await
        {
            Ok(()) => axum::Json(keypair_json(&r)).into_response(),
            Err(resp) => resp,
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot make a key pair");
            app.line(
                caller.event(ACTION, None, None, "failed"),
                Durability::Written,
            );
            message(StatusCode::INTERNAL_SERVER_ERROR, "cannot make a key pair")
        }
    }
}

async fn list_keypairs(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    app.line(
        caller.event("keypair.list", None, None, "ok"),
        Durability::Written,
    );
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
            app.line(
                caller.event("keypair.get", Some(&id), None, "ok"),
                Durability::Written,
            );
            axum::Json(keypair_json(&r)).into_response()
        }
        Err(_) => {
            app.line(
                caller.event("keypair.get", Some(&id), None, "unknown_key"),
                Durability::Written,
            );
            message(StatusCode::NOT_FOUND, "no such keypair")
        }
    }
}

async fn current(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    match app.store().current(erec::clock::now_ms()) {
        Ok(Some(r)) => {
            app.line(
                caller.event("keypair.current", Some(&r.id), None, "ok"),
                Durability::Written,
            );
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

/// `{"body":"<base64 DEK>"}` in a buffer zeroized when the connection is done with it.
fn dek_answer(dek: &[u8]) -> Response {
    let mut text = Zeroizing::new(Vec::with_capacity(64));
    text.extend_from_slice(b"{\"body\":\"");
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(dek));
    text.extend_from_slice(b64.as_bytes());
    text.extend_from_slice(b"\"}");
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from(Bytes::from_owner(text)),
    )
        .into_response()
}

async fn decrypt(State(app): State<Arc<App>>, Authed { caller, body }: Authed) -> Response {
    let done = |key: Option<&str>, rec: Option<&str>, outcome: &str| {
        app.metrics.unwrap(outcome);
        app.line(
            caller.event("decrypt", key, rec, outcome),
            Durability::Written,
        );
    };
    if let Some(r) = limited(
        &app,
        &app.unwraps,
        &caller,
        "decrypt",
        "too many decrypt requests for this credential",
    ) {
        app.metrics.unwrap("rate_limited");
        return r;
    }
    let Ok(req) = serde_json::from_slice::<DecryptBody>(&body) else {
        done(None, None, "bad_request");
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
            done(Some(&req.keypair_id), rec, "unsupported_type");
            return message(
                StatusCode::BAD_REQUEST,
                "unsupported decryptType: oaep (RSA-OAEP-SHA1) or erec; pkcs1 is not offered",
            );
        }
    };
    let Some(id) = KekId::from_hex(&req.keypair_id) else {
        done(Some(&req.keypair_id), rec, "unknown_key");
        return message(StatusCode::NOT_FOUND, "no such keypair");
    };
    let a = Arc::clone(&app);
    let sealed = base64::engine::general_purpose::STANDARD.decode(req.body.as_bytes());
    let unwrapped = blocking(move || {
        let sealed = sealed.map_err(|_| OracleError::Failed)?;
        a.oracle.unwrap(&id, wrap, &sealed)
    })
    .await;
    let key = Some(req.keypair_id.as_str());
    match unwrapped {
        Ok(Ok(dek)) => {
            app.metrics.unwrap("ok");
            // The DEK leaves only once the line saying so is on disk.
            match app.audited(caller.event("decrypt", key, rec, "ok")).await {
                Ok(()) => dek_answer(dek.expose()),
                Err(r) => r,
            }
        }
        Ok(Err(OracleError::Unknown)) => {
            done(key, rec, "unknown_key");
            message(StatusCode::NOT_FOUND, "no such keypair")
        }
        Ok(Err(OracleError::Destroyed)) => {
            done(key, rec, "destroyed");
            message(StatusCode::GONE, "key destroyed")
        }
        Ok(Err(OracleError::Revoked(why))) => {
            tracing::error!(kek_id = %req.keypair_id, error = %why, "the key's protection refused");
            done(key, rec, "access_revoked");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "access revoked: the key's protection refused",
            )
        }
        Ok(Err(OracleError::Unavailable(why))) => {
            tracing::error!(kek_id = %req.keypair_id, error = %why, "the key's protection cannot answer");
            done(key, rec, "protection_unavailable");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "key protection unavailable: try again later",
            )
        }
        Ok(Err(OracleError::Store(why))) => {
            tracing::error!(kek_id = %req.keypair_id, error = %why, "key store");
            done(key, rec, "error");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the key store cannot be read",
            )
        }
        Ok(Err(OracleError::Failed)) | Err(_) => {
            done(key, rec, "failed");
            message(StatusCode::BAD_REQUEST, "decrypt failed")
        }
    }
}

async fn decrypt_options(State(app): State<Arc<App>>, Authed { caller, .. }: Authed) -> Response {
    app.line(
        caller.event("decrypt.options", None, None, "ok"),
        Durability::Written,
    );
    axum::Json(json!({
        "encryptBody": { "keypairId": null, "body": null, "decryptType": null },
        "decryptResponse": { "body": "Decrypted Response" },
    }))
    .into_response()
}

/// `POST /auth`: `{id, role}` (role `recorder` unless given).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    id: String,
    #[serde(default)]
    role: Option<Role>,
}

async fn register(State(app): State<Arc<App>>, Authed { caller, body }: Authed) -> Response {
    to_the_end(issue(app, caller, body)).await
}

async fn issue(app: Arc<App>, caller: Caller, body: Bytes) -> Response {
    const ACTION: &str = "credentials.add";
    let Ok(req) = serde_json::from_slice::<Register>(&body) else {
        return message(
            StatusCode::BAD_REQUEST,
            "a JSON body with the id (and a role: recorder, decrypt, platform or admin)",
        );
    };
    let role = req.role.unwrap_or(Role::Recorder);
    let what = format!("{}: {} as {role}", "started", req.id);
    if let Err(r) = app.audited(caller.event(ACTION, None, None, &what)).await {
        return r;
    }
    match crate::manager::add_credential(&app.credentials_file, &req.id, role) {
        Ok(key) => {
            let ok = format!("ok: {} as {role}", req.id);
            if let Err(r) = app.audited(caller.event(ACTION, None, None, &ok)).await {
                return r;
            }
            tracing::info!(id = %req.id, %role, "credential issued");
            app.reload_credentials();
            let mut answer = axum::Json(
                json!({ "id": req.id, "authKey": key.as_str(), "algorithm": "sha256", "role": role }),
            )
            .into_response();
            answer.headers_mut().insert(
                axum::http::header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("no-store"),
            );
            answer
        }
        Err(e) => {
            app.line(
                caller.event(ACTION, None, None, "failed"),
                Durability::Written,
            );
            use crate::manager::CredentialsError::{BadId, Exists};
            match e {
                BadId(_) | Exists(_) => message(StatusCode::BAD_REQUEST, &e.to_string()),
                e => {
                    // The file's path and the system's error are the operator's, not the
                    // caller's.
                    tracing::error!(error = %e, "cannot issue a credential");
                    message(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the credentials file cannot be changed",
                    )
                }
            }
        }
    }
}
