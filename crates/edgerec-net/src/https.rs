//! The HTTP(S) servers edgerec runs for others to call (the key manager, the control API):
//! a rustls server configuration from PEM files, and [`serve`], which runs an axum router on
//! a listener within [`Limits`] that hold whatever a client does.
//!
//! Invariants:
//! - TLS 1.2 and 1.3 only (rustls's safe defaults, the aws-lc-rs provider).
//! - Connections beyond `max_connections`, or beyond `max_connections_per_address` from one
//!   address, are closed at once, before any TLS or HTTP work (counted by the caller's
//!   `on_refused`).
//! - A client gets `header_read_timeout` for its TLS handshake and for each request's head
//!   from its first byte; a connection with no request in flight is closed after
//!   `idle_timeout` without traffic, and a request still unanswered (a body sent slowly)
//!   after `idle_timeout`. Request heads are bounded at [`MAX_HEAD_BYTES`].
//! - Nothing here logs what a client sent.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest request head (request line and headers) read; beyond, the request is
/// refused (431) and the connection closed.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

/// How much a server lets its clients hold (the config keys of `[lkm]` and `[control]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `header_read_timeout_secs`: the TLS handshake, and each request head from its first
    /// byte.
    pub header_read_timeout: Duration,
    /// `idle_timeout_secs`: a kept-alive connection with nothing in flight, and the longest
    /// one request may take.
    pub idle_timeout: Duration,
    /// `max_connections`: open at once in all.
    pub max_connections: usize,
    /// `max_connections_per_address`: open at once from one IP address.
    pub max_connections_per_address: usize,
}

impl Default for Limits {
    /// 10 s for a head (a slow client on a bad link sends one in well under a second), 60 s
    /// idle (clients keep connections for a few seconds between requests), 1,024
    /// connections (the key manager's busiest clients, recorders and the platform, number in
    /// the tens), 64 from one address (a NAT of many recorders, or one client's pool).
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_connections_per_address: 64,
        }
    }
}

/// A config value and where it was written (its byte span in the file).
pub type At<T> = Option<(T, std::ops::Range<usize>)>;

impl Limits {
    /// [`Limits::from_config`] on values that know where they were written: the error
    /// carries the span of the value at fault, for a message that names its line.
    pub fn from_config_at(
        header_read_timeout_secs: At<u64>,
        idle_timeout_secs: At<u64>,
        max_connections: At<usize>,
        max_connections_per_address: At<usize>,
    ) -> Result<Limits, (&'static str, String, Option<std::ops::Range<usize>>)> {
        let value = |v: &At<u64>| v.as_ref().map(|(x, _)| *x);
        let count = |v: &At<usize>| v.as_ref().map(|(x, _)| *x);
        Limits::from_config(
            value(&header_read_timeout_secs),
            value(&idle_timeout_secs),
            count(&max_connections),
            count(&max_connections_per_address),
        )
        .map_err(|(key, why)| {
            let span = match key {
                "header_read_timeout_secs" => header_read_timeout_secs.map(|(_, s)| s),
                "idle_timeout_secs" => idle_timeout_secs.map(|(_, s)| s),
                "max_connections" => max_connections.map(|(_, s)| s),
                _ => max_connections_per_address.map(|(_, s)| s),
            };
            (key, why, span)
        })
    }

    /// Checks the four values as read from a config file (`None`: the default); an error
    /// names the key and what is wrong.
    pub fn from_config(
        header_read_timeout_secs: Option<u64>,
        idle_timeout_secs: Option<u64>,
        max_connections: Option<usize>,
        max_connections_per_address: Option<usize>,
    ) -> Result<Limits, (&'static str, String)> {
        let d = Limits::default();
        let secs = |key: &'static str, v: Option<u64>, d: Duration, max: u64| match v {
            None => Ok(d),
            Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
            Some(s) => Err((key, format!("{s}: must be 1 to {max}"))),
        };
        let n = |key: &'static str, v: Option<usize>, d: usize| match v {
            None => Ok(d),
            Some(c) if (1..=1_000_000).contains(&c) => Ok(c),
            Some(c) => Err((key, format!("{c}: must be 1 to 1000000"))),
        };
        let l = Limits {
            header_read_timeout: secs(
                "header_read_timeout_secs",
                header_read_timeout_secs,
                d.header_read_timeout,
                300,
            )?,
            idle_timeout: secs("idle_timeout_secs", idle_timeout_secs, d.idle_timeout, 3600)?,
            max_connections: n("max_connections", max_connections, d.max_connections)?,
            max_connections_per_address: n(
                "max_connections_per_address",
                max_connections_per_address,
                d.max_connections_per_address,
            )?,
        };
        if l.max_connections_per_address > l.max_connections {
            return Err((
                "max_connections_per_address",
                format!(
                    "{}: more than max_connections ({})",
                    l.max_connections_per_address, l.max_connections
                ),
            ));
        }
        Ok(l)
    }
}

/// Why a server's TLS configuration could not be made; each names the config key.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The key file is not its owner's alone.
    #[error("{key} {source}")]
    KeyMode {
        /// The config key naming the key file.
        key: String,
        /// Why.
        source: crate::durable::OwnerOnlyError,
    },
    /// A PEM file that cannot be read or holds nothing usable.
    #[error("{key} {}: {source}", path.display())]
    Pem {
        /// The config key naming the file.
        key: String,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificate and key together.
    #[error("{keys}: {source}")]
    Rustls {
        /// The config keys of both files.
        keys: String,
        /// Why.
        source: rustls::Error,
    },
}

/// A server configuration from a certificate chain and its key (PEM); `cert_key` and
/// `key_key` name the configuration keys in errors. With `check_mode`, the key file must be
/// readable by its owner alone.
pub fn server_config(
    cert: &Path,
    key: &Path,
    cert_key: &str,
    key_key: &str,
    check_mode: bool,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if check_mode {
        crate::durable::check_owner_only(key, "a TLS private key").map_err(|source| {
            TlsConfigError::KeyMode {
                key: key_key.to_string(),
                source,
            }
        })?;
    }
    let pem = |k: &str, p: &Path| {
        let (key, path) = (k.to_string(), p.to_path_buf());
        move |source| TlsConfigError::Pem { key, path, source }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(pem(cert_key, cert))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(pem(key_key, key))?;
    let keys = || format!("{cert_key} / {key_key}");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsConfigError::Rustls {
            keys: keys(),
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|source| TlsConfigError::Rustls {
            keys: keys(),
            source,
        })
}

/// Why a connection was turned away or cut (for the caller's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// `max_connections` reached.
    TooManyConnections,
    /// `max_connections_per_address` reached for its address.
    TooManyFromAddress,
    /// The TLS handshake or a request head took longer than `header_read_timeout`.
    HeaderTimeout,
    /// Idle past `idle_timeout`, or a request unanswered that long.
    Idle,
}

/// What one connection's watchdog reads: milliseconds since the connection began.
#[derive(Default)]
struct Activity {
    /// When a request head began to arrive (its first byte), +1; 0: none arriving.
    head_from: AtomicU64,
    /// The last byte read or answer finished.
    last: AtomicU64,
    /// When the oldest request in flight was handed to the router, +1; 0: none.
    request_from: AtomicU64,
    /// Requests in flight.
    in_flight: AtomicUsize,
}

/// An I/O stream that tells its [`Activity`] when bytes arrive.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    start: Instant,
}

impl<T> Watched<T> {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.now();
            let a = &self.activity;
            a.last.store(now, Ordering::Relaxed);
            // Bytes with no request in flight begin a head (a pipelined one counts from the
            // answer before it; hyper reads it then).
            if a.in_flight.load(Ordering::Relaxed) == 0 {
                let _ =
                    a.head_from
                        .compare_exchange(0, now + 1, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// How long until `activity` breaks a limit at `now` (ms since the start), or which it broke.
fn deadline(a: &Activity, limits: &Limits, now: u64) -> Result<u64, Cut> {
    let head = limits.header_read_timeout.as_millis() as u64;
    let idle = limits.idle_timeout.as_millis() as u64;
    let due = |from: u64, limit: u64, cut: Cut| {
        let end = from + limit;
        if now >= end { Err(cut) } else { Ok(end - now) }
    };
    let mut wait = idle;
    let head_from = a.head_from.load(Ordering::Relaxed);
    if head_from > 0 {
        wait = wait.min(due(head_from - 1, head, Cut::HeaderTimeout)?);
    }
    let request_from = a.request_from.load(Ordering::Relaxed);
    if a.in_flight.load(Ordering::Relaxed) > 0 && request_from > 0 {
        wait = wait.min(due(request_from - 1, idle, Cut::Idle)?);
    } else if head_from == 0 {
        wait = wait.min(due(a.last.load(Ordering::Relaxed), idle, Cut::Idle)?);
    }
    Ok(wait.max(1))
}

/// The connections open now: in all and by address.
#[derive(Default)]
struct Census {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One connection's place in the [`Census`], given back when dropped.
struct Admitted {
    census: Arc<Mutex<Census>>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut c) = self.census.lock() {
            c.total -= 1;
            if let Some(n) = c.by_address.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    c.by_address.remove(&self.ip);
                }
            }
        }
    }
}

/// The address a connection counts against: IPv4 as it is, IPv6 by its /64 (what one host
/// or site is given; an attacker has all of its addresses), an IPv4-mapped IPv6 address as the
/// IPv4 one.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn admit(census: &Arc<Mutex<Census>>, ip: IpAddr, limits: &Limits) -> Result<Admitted, Cut> {
    let ip = address_key(ip);
    let mut c = census.lock().map_err(|_| Cut::TooManyConnections)?;
    if c.total >= limits.max_connections {
        return Err(Cut::TooManyConnections);
    }
    let from = c.by_address.entry(ip).or_insert(0);
    if *from >= limits.max_connections_per_address {
        return Err(Cut::TooManyFromAddress);
    }
    *from += 1;
    c.total += 1;
    Ok(Admitted {
        census: Arc::clone(census),
        ip,
    })
}

/// Serves `router` on `tcp` (over TLS with `tls`) within `limits` until `shutdown`
/// completes; then stops accepting and gives the connections open up to 5 s to finish.
/// `on_cut` hears of every connection turned away or cut.
pub async fn serve(
    tcp: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    limits: Limits,
    on_cut: Arc<dyn Fn(Cut) + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    let census = Arc::new(Mutex::new(Census::default()));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = tcp.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = match admit(&census, peer.ip(), &limits) {
            Ok(a) => a,
            Err(cut) => {
                on_cut(cut);
                drop(sock);
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let (router, acceptor, on_cut, stop) = (
            router.clone(),
            acceptor.clone(),
            Arc::clone(&on_cut),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let _admitted = admitted;
            let activity = Arc::new(Activity::default());
            let start = Instant::now();
            let watched = Watched {
                io: sock,
                activity: Arc::clone(&activity),
                start,
            };
            match acceptor {
                Some(acceptor) => {
                    let mut tls = match tokio::time::timeout(
                        limits.header_read_timeout,
                        acceptor.accept(watched),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            on_cut(Cut::HeaderTimeout);
                            return;
                        }
                    };
                    // The handshake's bytes are not a request head; but a client's first
                    // request may have come in the same read as its Finished, already
                    // decrypted, which hyper then reads without a read of the socket. Its
                    // head counts from that read (before, a half-sent head that came so
                    // was timed as idle: cut later, and not counted as a timeout).
                    let buffered = tls
                        .get_mut()
                        .1
                        .process_new_packets()
                        .map(|state| state.plaintext_bytes_to_read())
                        .unwrap_or(0);
                    let head_from = if buffered > 0 {
                        activity.last.load(Ordering::Relaxed) + 1
                    } else {
                        0
                    };
                    activity.head_from.store(head_from, Ordering::Relaxed);
                    connection(tls, router, activity, start, limits, on_cut, stop).await
                }
                None => connection(watched, router, activity, start, limits, on_cut, stop).await,
            }
        });
    }
    drop(tcp);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while census.lock().map(|c| c.total).unwrap_or(0) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection: HTTP/1.1 with keep-alive, watched by the limits.
async fn connection<T>(
    io: T,
    router: axum::Router,
    activity: Arc<Activity>,
    start: Instant,
    limits: Limits,
    on_cut: Arc<dyn Fn(Cut) + Send + Sync>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let since = move || start.elapsed().as_millis() as u64;
    let a = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let now = since();
        a.head_from.store(0, Ordering::Relaxed);
        if a.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            a.request_from.store(now + 1, Ordering::Relaxed);
        }
        let (a, router) = (Arc::clone(&a), router.clone());
        async move {
            let answer = router.oneshot(req).await;
            if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
                a.request_from.store(0, Ordering::Relaxed);
            }
            a.last.store(since(), Ordering::Relaxed);
            answer
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        // Our own watchdog times heads from their first byte, not from the last answer.
        .header_read_timeout(None);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        let wait = match deadline(&activity, &limits, since()) {
            Ok(ms) => Duration::from_millis(ms),
            Err(cut) => {
                on_cut(cut);
                return;
            }
        };
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(wait) => {}
            changed = stop.changed(), if !draining => {
                if changed.is_ok() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 3,
            max_connections_per_address: 2,
        }
    }

    #[test]
    fn heads_idle_connections_and_slow_requests_have_their_deadlines() {
        let l = limits();
        let a = Activity::default();
        // Idle since 0: 60 s.
        assert_eq!(deadline(&a, &l, 1_000), Ok(59_000));
        assert_eq!(deadline(&a, &l, 60_000), Err(Cut::Idle));
        // A head began at 5 s: 10 s for it, whatever the idle time.
        a.last.store(5_000, Ordering::Relaxed);
        a.head_from.store(5_001, Ordering::Relaxed);
        assert_eq!(deadline(&a, &l, 6_000), Ok(9_000));
        assert_eq!(deadline(&a, &l, 15_000), Err(Cut::HeaderTimeout));
        // The head arrived; the request runs (its body may come slowly): 60 s from then.
        a.head_from.store(0, Ordering::Relaxed);
        a.in_flight.store(1, Ordering::Relaxed);
        a.request_from.store(7_001, Ordering::Relaxed);
        assert_eq!(deadline(&a, &l, 30_000), Ok(37_000));
        assert_eq!(deadline(&a, &l, 67_000), Err(Cut::Idle));
        // Answered at 8 s: idle from then.
        a.in_flight.store(0, Ordering::Relaxed);
        a.request_from.store(0, Ordering::Relaxed);
        a.last.store(8_000, Ordering::Relaxed);
        assert_eq!(deadline(&a, &l, 60_000), Ok(8_000));
    }

    /// A half-sent head that comes in the same read as the client's TLS Finished is cut at
    /// the header timeout, and counted so (it was timed as idle: the key manager's
    /// lkm_attacks test saw fewer timeouts than half-sent heads on a loaded CI machine).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_that_came_with_the_handshake_is_timed_as_a_head() {
        use std::io::{Read, Write};
        let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../samples/lkm");
        let tls = server_config(
            &Path::new(samples).join("tls.pem"),
            &Path::new(samples).join("tls.DEMO-ONLY.key"),
            "tls_cert",
            "tls_key",
            false,
        )
        .unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let cuts = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&cuts);
        let limits = Limits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            ..limits()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            tcp,
            Some(Arc::new(tls)),
            axum::Router::new(),
            limits,
            Arc::new(move |cut| seen.lock().unwrap().push(cut)),
            async {
                let _ = stopped.await;
            },
        ));
        let client = tokio::task::spawn_blocking(move || {
            let mut roots = rustls::RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_file_iter(
                Path::new(samples).join("demo-ca.pem"),
            )
            .unwrap()
            {
                roots.add(c.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let mut conn =
                rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
                    .unwrap();
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            while conn.is_handshaking() {
                let n = conn.read_tls(&mut sock).unwrap();
                assert!(n > 0, "the server closed the connection in the handshake");
                conn.process_new_packets().unwrap();
            }
            // The client's Finished and half a head, in one write.
            conn.writer()
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
                .unwrap();
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out).unwrap();
            }
            sock.write_all(&out).unwrap();
            let started = Instant::now();
            let mut b = [0u8; 4096];
            while matches!(sock.read(&mut b), Ok(n) if n > 0) {}
            started.elapsed()
        });
        let held = client.await.unwrap();
        let _ = stop.send(());
        server.await.unwrap();
        assert_eq!(*cuts.lock().unwrap(), vec![Cut::HeaderTimeout], "{held:?}");
        assert!(held < Duration::from_secs(8), "cut as a head: {held:?}");
    }

    #[test]
    fn connections_are_admitted_within_both_caps_and_given_back() {
        let l = limits();
        let census = Arc::new(Mutex::new(Census::default()));
        let (one, two): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = admit(&census, one, &l).unwrap();
        let _a2 = admit(&census, one, &l).unwrap();
        assert_eq!(admit(&census, one, &l).err(), Some(Cut::TooManyFromAddress));
        let _b1 = admit(&census, two, &l).unwrap();
        assert_eq!(admit(&census, two, &l).err(), Some(Cut::TooManyConnections));
        drop(a1);
        assert!(admit(&census, one, &l).is_ok(), "a place given back");
    }

    #[test]
    fn an_ipv6_network_counts_as_one_address() {
        let l = limits();
        let census = Arc::new(Mutex::new(Census::default()));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = admit(&census, a, &l).unwrap();
        let _y = admit(&census, b, &l).unwrap();
        assert_eq!(
            admit(&census, a, &l).err(),
            Some(Cut::TooManyFromAddress),
            "same /64"
        );
        assert!(admit(&census, c, &l).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn config_values_are_checked_with_their_key() {
        assert_eq!(
            Limits::from_config(None, None, None, None),
            Ok(Limits::default())
        );
        assert_eq!(
            Limits::from_config(Some(0), None, None, None)
                .unwrap_err()
                .0,
            "header_read_timeout_secs"
        );
        assert_eq!(
            Limits::from_config(None, None, Some(10), Some(20))
                .unwrap_err()
                .0,
            "max_connections_per_address"
        );
    }
}
