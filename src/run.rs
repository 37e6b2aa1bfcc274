//! `edgerec run`: starts the appliance from a validated [`Config`] and runs it until the
//! shutdown future completes.
//!
//! Start-up, in order, each failure one clear line: the spool (created 0700, checked
//! writable, crash leftovers recovered), the KEK public key(s), the store, the file limit
//! (raised to cover every ingest port, or the start fails naming what is needed), then one
//! UDP socket per ingest port. Then three parts run: ingest tasks on the tokio runtime (one
//! per socket, draining each readable socket before yielding), the recorder thread and the
//! uploader thread.
//!
//! Shutdown (SIGTERM or SIGINT): stop taking packets, let the recorder end every recording
//! with its end record and sync, then stop the uploader between packages; upload state is
//! on disk, so whatever was not uploaded goes at the next start.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::UdpSocket;

use crate::clock::now_ms;
use crate::config::{Config, SyncMode};
use crate::keys::{KekHandle, KekPublic};
use crate::metrics::{KekLabel, Metrics, SpoolState};
use crate::recorder::{self, Msg, RecorderSetup};
use crate::spool::{Recovery, Spool};
use crate::store::DirStore;
use crate::uploader;

/// Why the appliance did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A start-up step failed; the text names what and why.
    #[error("{0}")]
    Start(String),
}

fn start<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> RunError {
    move |e| RunError::Start(format!("{what}: {e}"))
}

/// Datagrams the recorder may have queued before ingest drops (and counts) them: about two
/// seconds of 2,000 G.711 streams.
const QUEUE: usize = 200_000;

/// Runs the appliance until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let spool_dir = &config.recorder.spool_dir;
    let spool = Spool::open(spool_dir).map_err(start("recorder.spool_dir"))?;
    for r in spool.recover(now_ms()).map_err(start("spool recovery"))? {
        match r {
            Recovery::Recovered {
                id,
                terminated,
                cut,
            } => {
                tracing::warn!(recording = %id, terminated, cut_bytes = cut, "recovered after a crash")
            }
            Recovery::StateRebuilt(id) => tracing::warn!(recording = %id, "upload state rebuilt"),
            Recovery::Quarantined { name, reason } => {
                tracing::error!(file = name, reason, "quarantined an unreadable spool file")
            }
        }
    }
    let mut keks =
        vec![KekPublic::from_file(&config.public_key).map_err(start("keys.public_key"))?];
    if let Some(escrow) = &config.escrow_public_key {
        keks.push(KekPublic::from_file(escrow).map_err(start("keys.escrow_public_key"))?);
    }
    tracing::info!(kek_id = %keks[0].id(), "sealing to KEK");
    let (metrics, registry) = Metrics::new();
    metrics
        .kek_info
        .get_or_create(&KekLabel {
            kek_id: keks[0].id().to_hex(),
        })
        .set(1);
    let (metrics_addr, metrics_server) =
        crate::metrics::serve(config.metrics.listen, Arc::clone(&metrics), registry)
            .await
            .map_err(start(format!(
                "metrics.listen: cannot listen on {}",
                config.metrics.listen
            )))?;
    tracing::info!(%metrics_addr, "metrics at /metrics, /healthz, /readyz");
    let store = DirStore::open(&config.store_path).map_err(start("store.path"))?;

    let (first, last) = config.ports;
    let count = u64::from(last - first) + 1;
    let need = count + 256;
    let got = rlimit::increase_nofile_limit(need).map_err(start("raising the file limit"))?;
    if got < need {
        return Err(RunError::Start(format!(
            "ingest.ports: {count} ports need {need} open files, but the limit is {got}: \
             raise LimitNOFILE (systemd) or ulimit -n, or use fewer ports"
        )));
    }
    let mut sockets = Vec::with_capacity(count as usize);
    for port in first..=last {
        let addr = SocketAddr::new(config.ingest.bind, port);
        let s = std::net::UdpSocket::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std)
            .map_err(start(format!("ingest: cannot bind udp {addr}")))?;
        sockets.push(s);
    }
    if config.allow.is_empty() {
        tracing::warn!("ingest.allow is empty: packets are taken from any source");
    }
    tracing::info!(bind = %config.ingest.bind, first, last, "listening for RTP");

    let (tx, rx) = sync_channel::<Msg>(QUEUE);
    let (ready_tx, ready_rx) = sync_channel(10_000);
    let accepting = Arc::new(AtomicBool::new(true));
    let setup = RecorderSetup {
        spool: spool.clone(),
        keks: KekHandle::new(keks),
        wrap: config.wrap,
        limits: config.limits(),
        sync: config.recorder.sync == SyncMode::Data,
        ready: ready_tx,
        metrics: Arc::clone(&metrics),
        accepting: Arc::clone(&accepting),
    };
    let recorder = std::thread::Builder::new()
        .name("recorder".into())
        .spawn(move || recorder::run(setup, rx))
        .map_err(start("starting the recorder"))?;
    let up_stop = Arc::new(AtomicBool::new(false));
    let uploader = {
        let (spool, stop, m) = (spool.clone(), Arc::clone(&up_stop), Arc::clone(&metrics));
        std::thread::Builder::new()
            .name("uploader".into())
            .spawn(move || {
                uploader::run(
                    spool,
                    Arc::new(store),
                    String::new(),
                    ready_rx,
                    stop,
                    m,
                    Duration::from_secs(30),
                )
            })
            .map_err(start("starting the uploader"))?
    };

    let allow = Arc::new(config.allow.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for s in sockets {
        tasks.spawn(ingest(
            s,
            tx.clone(),
            Arc::clone(&allow),
            Arc::clone(&metrics),
        ));
    }
    tasks.spawn(metrics_server);
    tasks.spawn(watch_spool(
        spool.clone(),
        config.recorder.spool_max_bytes.into_inner(),
        config.recorder.min_free_bytes.into_inner(),
        accepting,
        Arc::clone(&metrics),
    ));
    shutdown.await;
    tracing::info!("shutting down: ending every recording");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = tx.send(Msg::Shutdown);
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || recorder.join()).await;
    up_stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || uploader.join()).await;
    tracing::info!("stopped; what was not stored waits in the spool");
    Ok(())
}

/// One socket: receive, check the source, hand to the recorder, never block on it.
async fn ingest(
    socket: UdpSocket,
    tx: SyncSender<Msg>,
    allow: Arc<Vec<IpNet>>,
    metrics: Arc<Metrics>,
) {
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "ingest socket has no address");
            return;
        }
    };
    let mut buf = vec![0u8; 65_536];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        // Drain everything that is queued before yielding: one wake-up, many datagrams.
        loop {
            match socket.try_recv_from(&mut buf) {
                Ok((n, remote)) => {
                    if !allow.is_empty() && !allow.iter().any(|net| net.contains(&remote.ip())) {
                        Metrics::inc(&metrics.datagrams_rejected, "denied_source", 1);
                        continue;
                    }
                    let msg = Msg::Datagram {
                        local,
                        remote,
                        data: buf[..n].to_vec(),
                        at: Instant::now(),
                    };
                    match tx.try_send(msg) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            Metrics::inc(&metrics.datagrams_rejected, "overload", 1);
                        }
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(port = local.port(), error = %e, "receive error");
                    break;
                }
            }
        }
    }
}

/// Every two seconds: the spool's files, bytes and free space into the metrics; new
/// recordings refused (and `/readyz` false) while the spool is over `max_bytes`, short of
/// `min_free` or not writable. Nothing already spooled is ever dropped.
async fn watch_spool(
    spool: Spool,
    max_bytes: u64,
    min_free: u64,
    accepting: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let s = spool.clone();
        let Ok((usage, writable)) =
            tokio::task::spawn_blocking(move || (s.usage(), s.writable())).await
        else {
            return;
        };
        let problem = match &usage {
            Err(e) => Some(format!("cannot read the spool: {e}")),
            Ok(_) if !writable => Some("the spool is not writable".to_string()),
            Ok(u) if u.bytes >= max_bytes => Some(format!(
                "the spool holds {} bytes, recorder.spool_max_bytes is {max_bytes}",
                u.bytes
            )),
            Ok(u) if u.free_bytes < min_free => Some(format!(
                "{} bytes free, recorder.min_free_bytes is {min_free}",
                u.free_bytes
            )),
            Ok(_) => None,
        };
        let ok = problem.is_none();
        if accepting.swap(ok, Ordering::Relaxed) != ok {
            match &problem {
                Some(why) => tracing::error!(why, "refusing new recordings"),
                None => tracing::info!("accepting new recordings again"),
            }
        }
        metrics.set_ready(ok, problem.as_deref().unwrap_or(""));
        if let Ok(u) = usage {
            for (i, state) in ["active", "ready", "failed", "quarantine"]
                .into_iter()
                .enumerate()
            {
                metrics
                    .spool_files
                    .get_or_create(&SpoolState {
                        state: state.into(),
                    })
                    .set(i64::try_from(u.files[i]).unwrap_or(i64::MAX));
            }
            metrics
                .spool_bytes
                .set(i64::try_from(u.bytes).unwrap_or(i64::MAX));
            metrics
                .spool_capacity
                .set(i64::try_from(max_bytes).unwrap_or(i64::MAX));
            let age = u
                .oldest_ready_ms
                .map_or(0, |t| now_ms().saturating_sub(t) / 1000);
            metrics
                .spool_oldest_ready_age
                .set(i64::try_from(age).unwrap_or(i64::MAX));
        }
    }
}
