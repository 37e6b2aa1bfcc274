//! `edgerec run`: starts the appliance from a validated [`Config`] and runs it until the
//! shutdown future completes.
//!
//! Start-up, in order, each failure one clear line: every socket (taken from the service
//! manager or bound, and handed to its store: [`crate::appliance::sockets`]) and ingest
//! reading them at once (all sockets, epoll and `recvmmsg`, batches to the recorder's queue;
//! see [`crate::appliance::ingest`]); then the spool (created 0700, checked writable, crash
//! leftovers recovered), the KEK public key(s), the store; then the recorder and the
//! uploader. The tokio runtime serves the metrics, watches the spool and tells the service
//! manager `READY=1`, the status and the watchdog's pings (while the ingest and recorder
//! loops beat).
//!
//! Shutdown (SIGTERM or SIGINT; `STOPPING=1`): one [`Shutdown`] signal for every thread and task of
//! intake. Ingest takes what the sockets already hold and returns, then the recorder ends
//! every recording with its end record and sync; the key fetcher and the inbox stop between
//! rounds. The uploader's own signal comes after the recorder's last package, so it is told
//! of them; it stops between packages (upload state is on disk, so whatever was not
//! uploaded goes at the next start).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant, SystemTime};

use crate::appliance::carry::Carry;
use crate::appliance::config::{Config, SyncMode};
use crate::appliance::feed::Msg;
use crate::appliance::ingest::{self, IngestSetup};
use crate::appliance::journal::{self, Journal};
use crate::appliance::key_source;
use crate::appliance::metrics::{Metrics, SpoolState};
use crate::appliance::recorder::{self, RecorderSetup};
use crate::appliance::reload::{Live, ReloadFrom, Reloadable};
use crate::appliance::service_manager::{self, Beat, Passed, Watchdog};
use crate::appliance::shutdown::Shutdown;
use crate::appliance::sockets::{SipSockets, Sockets};
use crate::appliance::spool::{Recovery, Spool};
use crate::appliance::uploader::{self, UploadSettings, UploaderSetup};
use crate::store::StoreKind;
use crate::store::http::HttpStore;
use crate::store::s3::S3Store;
use crate::store::{DirStore, Store};
use erec::clock::now_ms;
use erec::keys::KekHandle;
use sd_notify::NotifyState;

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

impl RunError {
    /// A failed start-up step, for `map_err`: `what` and the error on one line.
    pub(crate) fn io<E: std::fmt::Display>(
        what: impl std::fmt::Display,
    ) -> impl FnOnce(E) -> RunError {
        start(what)
    }
}

/// Datagrams the recorder may have queued before ingest drops (and counts) them: about two
/// seconds of 2,000 G.711 streams.
const QUEUE: usize = 200_000;
/// How long a busy ingest round gathers: each socket is read about this often, taking all
/// that arrived meanwhile in one call (arrival times are those of the read).
const ROUND: Duration = Duration::from_millis(50);

/// Runs the appliance until `signal` completes (SIGTERM or SIGINT), in named steps: each
/// start-up step fails with one clear line; then one [`Shutdown`] stops every thread and
/// task. SIGHUP reloads the config from `reload` ([`crate::appliance::reload`]).
pub async fn run(
    config: Config,
    reload: ReloadFrom,
    signal: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // Watched from the first moment: a SIGHUP before the appliance is ready waits for it
    // instead of ending the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(start("cannot watch SIGHUP"))?;
    let (metrics, registry) = Metrics::new();
    let shutdown = Shutdown::new();
    // The sockets first, and ingest reading them at once: those the service manager kept
    // while no process ran hold what arrived meanwhile, and it waits in the recorder's
    // queue (not in socket buffers that may fill) while the spool recovers.
    let mut passed = Passed::from_env().map_err(start("the service manager's sockets"))?;
    let (carry, carried, fresh) = Carry::open(passed.take_carry()).map_err(start(
        "the file of recordings carried over restarts (memfd)",
    ))?;
    if fresh && let Err(e) = service_manager::store_file(service_manager::CARRY, carry.as_fd()) {
        tracing::warn!(error = %e, "cannot hand the carried recordings' file to the service manager");
    }
    let (journal, replay) = open_journal(&config, passed.take_journal(), &metrics)?;
    let passed_ring = passed.take_ring();
    let sockets = crate::appliance::sockets::open(&config, passed)?;
    if sockets.adopted > 0 {
        tracing::info!(
            sockets = sockets.adopted,
            "sockets from the service manager taken over"
        );
    }
    let Sockets {
        ingest: udp,
        siprec_from,
        sip,
        metrics: metrics_listener,
        control: control_listener,
        ..
    } = sockets;
    if config.allow.is_empty() {
        tracing::warn!("ingest.allow is empty: packets are taken from any source");
    }
    // Bounded in datagrams by `queued`; the channel's own bound (in batches) is only a
    // backstop.
    let (tx, rx) = sync_channel::<Msg>(4096);
    let queued = Arc::new(AtomicUsize::new(0));
    let (recycle_tx, recycle) = sync_channel(16);
    let (ingest_beat, recorder_beat) = (Beat::new("ingest"), Beat::new("recorder"));
    // The session clock's origin, before the arrival of any datagram ingest can read (what
    // waited in kept sockets arrived before this process started).
    let epoch = Instant::now()
        .checked_sub(ingest::MAX_WAIT)
        .unwrap_or_else(Instant::now);
    let allow = Live::new(config.allow.clone());
    // A mode that cannot be had fails the start, before anything is read.
    let mut way = ingest::Way::open(
        config.ingest.mode,
        &udp,
        (*config.ingest.ring_mib.get_ref(), passed_ring),
        ROUND,
    )
    .map_err(start(format!(
        "ingest.mode = \"{}\"",
        config.ingest.mode.name()
    )))?;
    way.keep_ring();
    metrics
        .ingest_mode
        .get_or_create(&crate::appliance::metrics::IngestMode {
            mode: way.mode().name().into(),
        })
        .set(1);
    let socket_drops_count = way.socket_drops_count();
    let ingest = start_thread("ingest", {
        let setup = IngestSetup {
            way,
            sockets: udp,
            allow: Arc::clone(&allow),
            siprec_from,
            siprec_allow: Arc::new(
                config
                    .siprec
                    .as_ref()
                    .map(|s| s.allow.clone())
                    .unwrap_or_default(),
            ),
            tx: tx.clone(),
            recycle,
            queued: Arc::clone(&queued),
            max_queued: QUEUE,
            metrics: Arc::clone(&metrics),
            stop: shutdown.clone(),
            round: ROUND,
            beat: Arc::clone(&ingest_beat),
            journal: journal.as_ref().map(|(j, _)| j.clone()),
            replay,
        };
        move || {
            if let Err(e) = ingest::run(setup) {
                tracing::error!(error = %e, "ingest stopped");
            }
        }
    })?;

    let outcomes = crate::appliance::outcomes::Outcomes::start(
        crate::appliance::outcomes::Settings {
            dir: crate::appliance::outcomes::dir_of(&config.recorder.spool_dir),
            keep_days: config.outcomes_keep_days,
            commit_every: Duration::from_millis(*config.recorder.flush_interval_ms.get_ref()),
            sync: config.recorder.sync == SyncMode::Data,
        },
        Arc::clone(&metrics),
    )
    .map_err(start("the outcome journal (recorder.spool_dir/outcomes)"))?;
    let spool = open_spool(&config, &outcomes)?;
    let identity = match crate::appliance::identity::Identity::load_or_create(&config.identity_key)
    {
        Ok((identity, true)) => {
            tracing::warn!(
                appliance = identity.id(),
                key_file = %config.identity_key.display(),
                "appliance identity made: register its public key (`edgerec identity show`)"
            );
            identity
        }
        Ok((identity, false)) => identity,
        Err(e) => return Err(RunError::Start(format!("identity.key_file: {e}"))),
    };
    tracing::info!(appliance = identity.id(), "appliance identity");
    let keks = KekHandle::new(Vec::new());
    let mut keys = key_source::prepare(&config)
        .await?
        .start(&config, &keks, &metrics, &shutdown)?;
    keys.apply(&keks, &metrics);
    let kek_file = Live::new(keys.file.clone());
    let (metrics_addr, metrics_server) =
        crate::appliance::metrics::serve(metrics_listener, Arc::clone(&metrics), registry)
            .map_err(start(format!(
                "metrics.listen: cannot listen on {}",
                config.metrics.listen
            )))?;
    tracing::info!(%metrics_addr, "metrics at /metrics, /healthz, /readyz");
    let upload_settings = Live::new(UploadSettings {
        store: open_store(&config).await?,
        policy: config.retry,
        rescan: config.rescan,
    });
    let (first, last) = config.ports;
    tracing::info!(bind = %config.ingest.bind, first, last, "listening for RTP");

    // Cleared by the disk policy (spool_max_bytes, min_free_bytes): no new recordings, calls
    // or inbox files, while it is.
    let accepting = Arc::new(AtomicBool::new(true));
    let inbox = start_inbox(
        &config,
        &spool,
        &keks,
        (&metrics, &outcomes),
        &accepting,
        &shutdown,
    )?;
    let (ready_tx, ready_rx) = sync_channel(10_000);
    let refusing: Box<dyn Fn() -> bool + Send> = {
        let (accepting, keks) = (Arc::clone(&accepting), keks.clone());
        Box::new(move || !accepting.load(Ordering::Relaxed) || keks.current().is_empty())
    };
    let (siprec, siprec_server) = match start_siprec(
        &config,
        sip,
        tx.clone(),
        refusing,
        (&metrics, &outcomes),
        &shutdown,
    )
    .await?
    {
        Some((link, server)) => (Some(link), Some(server)),
        None => (None, None),
    };
    let recorder = start_thread("recorder", {
        let setup = RecorderSetup {
            spool: spool.clone(),
            keks: keks.clone(),
            wrap: config.wrap,
            limits: config.limits(),
            sync: config.recorder.sync == SyncMode::Data,
            ready: ready_tx.clone(),
            metrics: Arc::clone(&metrics),
            accepting: Arc::clone(&accepting),
            queued: Arc::clone(&queued),
            recycle: recycle_tx,
            siprec,
            beat: Arc::clone(&recorder_beat),
            carry: Some((carry, carried)),
            epoch,
            journal,
            outcomes: outcomes.clone(),
        };
        move || recorder::run(setup, rx)
    })?;
    let manifests =
        crate::appliance::manifests::Manifests::open(crate::appliance::manifests::ManifestSetup {
            spool: spool.clone(),
            journal: crate::appliance::outcomes::dir_of(&config.recorder.spool_dir),
            identity,
            keks: keks.clone(),
            wrap: config.wrap,
            outcomes: outcomes.clone(),
            metrics: Arc::clone(&metrics),
            period: config.manifest_period,
        })
        .map_err(start("the manifests' state (recorder.spool_dir/manifests)"))?;
    let manifests = start_thread("manifests", {
        let (ready, stop) = (ready_tx.clone(), shutdown.clone());
        move || crate::appliance::manifests::run(manifests, ready, stop)
    })?;
    // Packages put into ready/ by other means (spool retry, an operator) go at once.
    let _watcher = match uploader::watch_ready(&spool, ready_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch spool/ready; relying on the periodic scan");
            None
        }
    };
    // The uploader stops on a signal of its own, given once the recorder has sealed the
    // last packages: a planned stop delivers the calls it ended, store permitting.
    let upload_stop = Shutdown::new();
    let uploader = start_thread("uploader", {
        let setup = UploaderSetup {
            spool: spool.clone(),
            settings: Arc::clone(&upload_settings),
            prefix: config.prefix.clone(),
            ready: ready_rx,
            stop: upload_stop.clone(),
            metrics: Arc::clone(&metrics),
            concurrency: config.concurrency,
            abort_orphans_after: config.abort_orphans_after,
            outcomes: outcomes.clone(),
        };
        move || uploader::run(setup)
    })?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(metrics_server);
    if let Some(server) = siprec_server {
        tasks.spawn(server);
    }
    let mut token = None;
    if let (Some(control), Some(listener)) = (&config.control, control_listener) {
        let stopping = shutdown.clone();
        let (addr, server, handle) = crate::appliance::control::serve(
            control,
            listener,
            tx.clone(),
            config.ports,
            async move { stopping.triggered().await },
        )
        .map_err(|e| RunError::Start(e.to_string()))?;
        tracing::info!(control_addr = %addr, tls = control.tls.is_some(), "control API listening");
        tasks.spawn(server);
        token = Some(handle);
    }
    tasks.spawn(until(
        shutdown.clone(),
        watch_kernel(
            socket_drops_count.then_some(config.ports),
            Arc::clone(&kek_file),
            Arc::clone(&metrics),
        ),
    ));
    tasks.spawn(until(
        shutdown.clone(),
        watch_spool(
            spool.clone(),
            *config.recorder.spool_max_bytes.get_ref(),
            *config.recorder.min_free_bytes.get_ref(),
            accepting,
            Arc::clone(&metrics),
        ),
    ));

    tasks.spawn(until(
        shutdown.clone(),
        tell_service_manager(vec![ingest_beat, recorder_beat], Arc::clone(&metrics)),
    ));
    let last_manifest = LastManifest {
        manifests,
        spool: spool.clone(),
        upload: Arc::clone(&upload_settings),
        prefix: config.prefix.clone(),
        metrics: Arc::clone(&metrics),
        outcomes: outcomes.clone(),
    };
    let reloadable = Reloadable {
        from: reload,
        current: config,
        allow,
        upload: upload_settings,
        token,
        keks,
        keys,
        kek_file,
        metrics: Arc::clone(&metrics),
        shutdown: shutdown.clone(),
    };
    reloadable.set_log_level(reloadable.current.log_level.as_deref());
    tasks.spawn(until(
        shutdown.clone(),
        reload_on_hangup(hangup, reloadable),
    ));
    service_manager::notify(&[NotifyState::Ready, NotifyState::Status("recording")]);

    signal.await;
    service_manager::notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: ending every recording"),
    ]);
    tracing::info!("shutting down: ending every recording");
    stop(Running {
        shutdown,
        ingest,
        recorder_tx: tx,
        recorder,
        upload_stop,
        tasks,
        inbox,
        uploader,
    })
    .await;
    last_manifest.deliver().await;
    // Every thread that notes outcomes has stopped: what they noted is committed.
    let _ = tokio::task::spawn_blocking(move || outcomes.stop()).await;
    tracing::info!("stopped; what was not stored waits in the spool");
    Ok(())
}

/// Start-up: a named thread running `work`.
fn start_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, RunError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map_err(start(format!("starting the {name}")))
}

/// What runs once the appliance has started, for [`stop`].
struct Running {
    shutdown: Shutdown,
    ingest: std::thread::JoinHandle<()>,
    recorder_tx: std::sync::mpsc::SyncSender<Msg>,
    recorder: std::thread::JoinHandle<()>,
    upload_stop: Shutdown,
    tasks: tokio::task::JoinSet<()>,
    inbox: Option<std::thread::JoinHandle<()>>,
    uploader: std::thread::JoinHandle<()>,
}

/// The stop, in order. One signal for all intake: ingest takes what the sockets hold and
/// returns, the key fetcher and the inbox stop between rounds, the tasks at once. The
/// recorder ends every recording once ingest has handed over its last batch; then the
/// uploader stops between packages, having been told of the last ones.
async fn stop(r: Running) {
    let Running {
        shutdown,
        ingest,
        recorder_tx,
        recorder,
        upload_stop,
        mut tasks,
        inbox,
        uploader,
    } = r;
    shutdown.trigger();
    let _ = tokio::task::spawn_blocking(move || ingest.join()).await;
    let _ = recorder_tx.send(Msg::Shutdown);
    drop(recorder_tx);
    let _ = tokio::task::spawn_blocking(move || recorder.join()).await;
    upload_stop.trigger();
    // The metrics server has no end of its own: it goes with the rest.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(t) = inbox {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    let _ = tokio::task::spawn_blocking(move || uploader.join()).await;
}

/// What the stop needs for its last manifest.
struct LastManifest {
    manifests: std::thread::JoinHandle<crate::appliance::manifests::Manifests>,
    spool: Spool,
    upload: Arc<Live<UploadSettings>>,
    prefix: String,
    metrics: Arc<Metrics>,
    outcomes: crate::appliance::outcomes::Outcomes,
}

/// How long a stop waits for its last manifest to reach the store.
const LAST_MANIFEST_WAIT: Duration = Duration::from_secs(10);

impl LastManifest {
    /// The stop's manifest (what the stop ended and delivered among it), made and sent to the
    /// store at once, within [`LAST_MANIFEST_WAIT`]; otherwise it waits in the spool for the
    /// next start.
    async fn deliver(self) {
        let LastManifest {
            manifests,
            spool,
            upload,
            prefix,
            metrics,
            outcomes,
        } = self;
        let sent = tokio::task::spawn_blocking(move || {
            let Ok(mut m) = manifests.join() else {
                return false;
            };
            match m.make(now_ms()) {
                Ok(id) => {
                    uploader::deliver_now(&spool, &upload.get(), &prefix, id, (&metrics, &outcomes))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot make the last manifest; the next start makes it");
                    false
                }
            }
        });
        match tokio::time::timeout(LAST_MANIFEST_WAIT, sent).await {
            Ok(Ok(true)) => tracing::info!("the last manifest is in the store"),
            _ => tracing::warn!(
                "the last manifest did not reach the store in time; it waits in the spool"
            ),
        }
    }
}

/// Runs `task` until `shutdown` is triggered.
async fn until(shutdown: Shutdown, task: impl Future<Output = ()>) {
    tokio::select! {
        () = shutdown.triggered() => {}
        () = task => {}
    }
}

/// Start-up: the spool opened (0700, checked writable), files an inbox had claimed before
/// a crash made ready to seal again, and the spool's crash leftovers recovered.
/// What [`open_journal`] gives: the journal with the position of its first entry to take,
/// and the datagrams to replay.
type Journaled = (Option<(Journal, u64)>, Vec<(u64, journal::Datagram)>);

/// The crash journal (`appliance/journal.rs`): kept only under a service manager, whose
/// store holds it over a kill, and unless `[ingest] journal_mib = 0`; what the last process
/// left in one is replayed either way.
fn open_journal(
    config: &Config,
    passed: Option<std::os::fd::OwnedFd>,
    metrics: &Metrics,
) -> Result<Journaled, RunError> {
    let size = config.journal_bytes();
    let keep = size.is_some() && std::env::var_os("NOTIFY_SOCKET").is_some();
    let was_passed = passed.is_some();
    if !was_passed && !keep {
        return Ok((None, Vec::new()));
    }
    let (j, replay, fresh) = Journal::open(passed, size.unwrap_or(journal::MIN_CAPACITY))
        .map_err(start("the datagram journal (memfd)"))?;
    if replay.broken {
        tracing::warn!("the last process's datagram journal is damaged: replayed up to the damage");
        Metrics::inc(&metrics.journal, "damaged", 1);
    }
    let first = replay.datagrams.first().map_or(j.head(), |(p, _)| *p);
    let remove = |what: &str| {
        if let Err(e) = service_manager::clear(&[service_manager::JOURNAL.to_string()].into()) {
            tracing::warn!(error = %e, "cannot {what}");
        }
    };
    if !keep {
        remove("remove the datagram journal from the service manager's store");
        return Ok((None, replay.datagrams));
    }
    if fresh {
        if was_passed {
            // Resized: the new one replaces it.
            remove("remove the old datagram journal from the service manager's store");
        }
        if let Err(e) = service_manager::store_file(service_manager::JOURNAL, j.as_fd()) {
            tracing::warn!(error = %e, "cannot hand the datagram journal to the service manager");
        }
    }
    tracing::info!(
        bytes = j.capacity(),
        replay = replay.datagrams.len(),
        "datagram journal kept for the next process"
    );
    Ok((Some((j, first)), replay.datagrams))
}

fn open_spool(
    config: &Config,
    outcomes: &crate::appliance::outcomes::Outcomes,
) -> Result<Spool, RunError> {
    let spool = Spool::open(&config.recorder.spool_dir).map_err(start("recorder.spool_dir"))?;
    if let Some(inbox) = &config.inbox {
        // Before the spool's recovery: a package cut short while sealing an inbox file is
        // made again from the file, not delivered unterminated.
        let waiting = crate::appliance::inbox::Inbox::prepare_recovery(&inbox.dir, &spool)
            .map_err(start("inbox.dir"))?;
        if waiting > 0 {
            tracing::warn!(
                files = waiting,
                "inbox: files claimed before a crash are sealed again"
            );
        }
    }
    // Before the spool's recovery: a manifest being placed is not taken for a recording.
    crate::appliance::manifests::recover(&spool, now_ms())
        .map_err(start("manifest recovery (recorder.spool_dir/manifests)"))?;
    // The salvages are in the outcome journal before their packages leave active/.
    let mut note = |kept: Vec<(uuid::Uuid, u64)>| {
        outcomes.note_all_durable(
            kept.into_iter()
                .map(|(id, bytes)| crate::appliance::outcomes::Fact::Salvaged {
                    id,
                    why: "recovered after a crash".into(),
                    bytes,
                })
                .collect(),
        );
    };
    for r in spool
        .recover_noting(now_ms(), &mut note)
        .map_err(start("spool recovery"))?
    {
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
    Ok(spool)
}

/// Start-up and reload: the store packages are delivered to.
pub(crate) async fn open_store(config: &Config) -> Result<Arc<dyn Store>, RunError> {
    Ok(match &config.store {
        StoreKind::Dir(path, limit) => Arc::new(
            DirStore::open(path)
                .map_err(start("store.path"))?
                .with_limit(limit.clone()),
        ),
        StoreKind::S3(s3) => {
            tracing::info!(endpoint = %s3.endpoint, bucket = %s3.bucket, prefix = %config.prefix, "s3 store");
            // The blocking HTTP client runs a runtime of its own: made (and later dropped)
            // outside this async context.
            let cfg = s3.clone();
            let made = tokio::task::spawn_blocking(move || S3Store::new(cfg))
                .await
                .map_err(start("store"))?;
            Arc::new(made.map_err(start("store"))?)
        }
        StoreKind::Http(h) => {
            tracing::info!(url = %h.url, prefix = %config.prefix, "http store");
            let cfg = h.clone();
            let made = tokio::task::spawn_blocking(move || HttpStore::new(cfg))
                .await
                .map_err(start("store"))?;
            Arc::new(made.map_err(start("store"))?)
        }
    })
}

/// Start-up, `[siprec]`: the SIP listener bound and its server made (run by the caller until
/// `shutdown`), and a thread that hands the sessions it reports to the recorder. Returns the
/// media ports and the handle the recorder tells of media, and the server's task.
#[allow(clippy::type_complexity)]
async fn start_siprec(
    config: &Config,
    sockets: Option<SipSockets>,
    recorder: std::sync::mpsc::SyncSender<Msg>,
    refusing: Box<dyn Fn() -> bool + Send>,
    (metrics, outcomes): (&Arc<Metrics>, &crate::appliance::outcomes::Outcomes),
    shutdown: &Shutdown,
) -> Result<
    Option<(
        ((u16, u16), crate::siprec::transport::MediaSeen),
        impl Future<Output = ()> + Send + 'static,
    )>,
    RunError,
> {
    use crate::siprec::{srs, transport};
    let (Some(cfg), Some(sockets)) = (&config.siprec, sockets) else {
        return Ok(None);
    };
    let listener = transport::Listener::from_std(sockets.udp, sockets.tcp).map_err(start(
        format!("siprec.listen: cannot listen on {}", cfg.listen),
    ))?;
    let listener = match (&cfg.tls, sockets.tls) {
        (Some((addr, cert, key)), Some(tcp)) => {
            let tls = edgerec_net::https::server_config(
                cert,
                key,
                "siprec.tls_cert",
                "siprec.tls_key",
                true,
            )
            .map_err(|e| RunError::Start(e.to_string()))?;
            let l = listener
                .with_tls_on(tcp, tls)
                .map_err(start(format!("siprec.tls_listen: cannot listen on {addr}")))?;
            tracing::info!(tls = ?l.tls_addr(), "SIPREC server listening (TLS)");
            l
        }
        _ => listener,
    };
    let local = listener
        .local_addr()
        .map_err(start("siprec.listen: its address"))?;
    let srs = srs::Srs::new(
        srs::SrsConfig {
            advertise: cfg.advertise,
            contact: format!("sip:srs@{}", SocketAddr::new(cfg.advertise, local.port())),
            media_ports: cfg.media_ports,
            max_sessions: cfg.max_sessions,
            conversation_header: cfg.conversation_id_header.clone(),
            inactivity_ms: u64::try_from(cfg.inactivity.as_millis()).unwrap_or(u64::MAX),
        },
        Box::new(|b: &mut [u8]| {
            getrandom::fill(b).expect("the operating system's random source is available")
        }),
    );
    if cfg.allow.is_empty() {
        tracing::warn!("siprec.allow is empty: any address may start a recording session");
    }
    let (events_tx, mut events) = tokio::sync::mpsc::channel(1024);
    // Sessions go to the recorder in order and none is lost: a blocking send on its queue
    // (a std channel), from a thread of its own that acknowledges each once queued; the SIP
    // task awaits the acknowledgement before it sends the answer. A full queue (the
    // recorder far behind) holds the SIP side up, never a runtime thread.
    let (sessions, mut session_rx) =
        tokio::sync::mpsc::channel::<(srs::SipAction, tokio::sync::oneshot::Sender<()>)>(64);
    start_thread("siprec-sessions", move || {
        while let Some((action, ack)) = session_rx.blocking_recv() {
            if recorder.send(Msg::Siprec(action)).is_err() {
                break;
            }
            let _ = ack.send(());
        }
    })?;
    let stopping = shutdown.clone();
    let (seen, server) = transport::server(
        listener,
        srs,
        Arc::new(cfg.allow.clone()),
        transport::SipLimits::default(),
        events_tx,
        transport::SipHooks {
            refusing,
            metrics: Some(Arc::clone(metrics)),
            sessions: Some(sessions),
            outcomes: Some(outcomes.clone()),
        },
        async move { stopping.triggered().await },
    );
    let m = Arc::clone(metrics);
    // What else the server reports is counted (sessions went to the recorder above).
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                transport::Event::Denied => Metrics::inc(&m.siprec_dropped, "denied_source", 1),
                transport::Event::Malformed => Metrics::inc(&m.siprec_dropped, "malformed", 1),
                transport::Event::Session(_) => {}
            }
        }
    });
    let (first, last) = cfg.media_ports;
    tracing::info!(%local, advertise = %cfg.advertise, first, last, "SIPREC server listening (UDP and TCP)");
    Ok(Some((((first, last), seen), server)))
}

/// Start-up: the inbox's thread, if `[inbox]` is configured; it runs until `shutdown`.
fn start_inbox(
    config: &Config,
    spool: &Spool,
    keks: &KekHandle,
    (metrics, outcomes): (&Arc<Metrics>, &crate::appliance::outcomes::Outcomes),
    accepting: &Arc<AtomicBool>,
    shutdown: &Shutdown,
) -> Result<Option<std::thread::JoinHandle<()>>, RunError> {
    let Some(cfg) = &config.inbox else {
        return Ok(None);
    };
    let inbox = crate::appliance::inbox::Inbox::open(
        &cfg.dir,
        spool.clone(),
        keks.clone(),
        config.wrap,
        1 << 20,
        Arc::clone(metrics),
        Arc::clone(accepting),
    )
    .map_err(start(format!("inbox.dir {}", cfg.dir.display())))?
    .with_outcomes(outcomes.clone());
    let (rescan, stop) = (cfg.rescan, shutdown.clone());
    tracing::info!(dir = %cfg.dir.display(), "inbox watched: files renamed into it are sealed");
    std::thread::Builder::new()
        .name("inbox".into())
        .spawn(move || {
            if let Err(e) = inbox.run(rescan, stop) {
                tracing::error!(error = %e, "inbox: cannot watch the directory");
            }
        })
        .map(Some)
        .map_err(start("inbox thread"))
}

/// Each SIGHUP: the config reloaded ([`Reloadable::reload`]), the outcome logged and
/// counted, the service manager told (`RELOADING=1`, then `READY=1`).
async fn reload_on_hangup(mut hangup: tokio::signal::unix::Signal, mut r: Reloadable) {
    while hangup.recv().await.is_some() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => service_manager::notify(&[NotifyState::Reloading, now]),
            Err(_) => service_manager::notify(&[NotifyState::Reloading]),
        }
        match r.reload().await {
            Ok(changes) => {
                tracing::info!(changed = ?changes.names(), "config reloaded");
                Metrics::inc(&r.metrics.config_reloads, "applied", 1);
            }
            Err(why) => {
                tracing::error!(%why, "config reload refused; the running config stays");
                Metrics::inc(&r.metrics.config_reloads, "refused", 1);
            }
        }
        service_manager::notify(&[NotifyState::Ready]);
    }
}

/// Tells the service manager how the appliance is: every two seconds a `STATUS=` line with
/// the recordings in progress and the packages waiting (when it changed); and, if it asked
/// for a watchdog (`WATCHDOG_USEC`), `WATCHDOG=1` four times a period (at most every two
/// seconds) — only while every loop in `beats` keeps beating ([`Watchdog`]), so a hung
/// ingest or recorder thread gets the process restarted after the period.
async fn tell_service_manager(beats: Vec<Arc<Beat>>, metrics: Arc<Metrics>) {
    let period = service_manager::watchdog_period();
    let tick_every = period.map_or(Duration::from_secs(2), |p| {
        (p / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
    });
    let mut tick = tokio::time::interval(tick_every);
    let mut watchdog = Watchdog::new(beats, Instant::now());
    let (mut status, mut status_at, mut stalled) = (String::new(), Instant::now(), None);
    loop {
        tick.tick().await;
        if period.is_some() {
            match watchdog.check(Instant::now()) {
                Ok(()) => {
                    service_manager::notify(&[NotifyState::Watchdog]);
                    stalled = None;
                }
                Err(thread) if stalled != Some(thread) => {
                    tracing::error!(
                        thread,
                        "a loop has stopped: no watchdog ping, the service manager restarts \
                         the appliance"
                    );
                    stalled = Some(thread);
                }
                Err(_) => {}
            }
        }
        if status_at.elapsed() >= Duration::from_secs(2) || status.is_empty() {
            status_at = Instant::now();
            let ready = metrics
                .spool_files
                .get_or_create(&SpoolState {
                    state: "ready".into(),
                })
                .get();
            let now = format!(
                "recording {} calls; {ready} packages waiting for the store",
                metrics.recordings_active.get()
            );
            if now != status {
                service_manager::notify(&[NotifyState::Status(&now)]);
                status = now;
            }
        }
    }
}

/// Every two seconds: datagrams the kernel dropped at full socket buffers on the ingest
/// ports (a burst larger than a socket holds between two reads) into
/// `edgerec_datagrams_rejected_total{reason="socket_buffer_full"}` (unless `ports` is None:
/// a packet ring counts its own), and the age of the KEK file into
/// `edgerec_kek_age_seconds`.
async fn watch_kernel(
    ports: Option<(u16, u16)>,
    kek_file: Arc<Live<Option<PathBuf>>>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut counted = None;
    let mut warned = false;
    loop {
        tick.tick().await;
        let file = (*kek_file.get()).clone();
        let Ok((drops, modified)) = tokio::task::spawn_blocking(move || {
            let mut drops = None;
            // The process's own view (`/proc/self/net`): the unit's `ProcSubset=pid` hides
            // `/proc/net`, and with it every drop the kernel counts.
            for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
                if let Some(ports) = ports
                    && let Ok(text) = std::fs::read_to_string(table)
                {
                    *drops.get_or_insert(0) += ingest::kernel_drops(&text, ports);
                }
            }
            let modified = file.map(|f| std::fs::metadata(f).and_then(|m| m.modified()));
            (drops, modified)
        })
        .await
        else {
            return;
        };
        if drops.is_none() && ports.is_some() && !warned {
            warned = true;
            tracing::warn!(
                "cannot read /proc/self/net/udp: the kernel's drops at full socket buffers are \
                 not counted (edgerec_datagrams_rejected_total{{reason=\"socket_buffer_full\"}})"
            );
        }
        if let Some(now) = drops {
            // Counted from 0 at the first look: a socket the service manager kept while no
            // process ran brings the drops of that time (buffers that filled), which are
            // losses too.
            let before = counted.replace(now).unwrap_or(0);
            if now > before {
                Metrics::inc(
                    &metrics.datagrams_rejected,
                    "socket_buffer_full",
                    now - before,
                );
            }
        }
        if let Some(Ok(modified)) = modified {
            let age = SystemTime::now()
                .duration_since(modified)
                .unwrap_or_default()
                .as_secs();
            metrics.kek_age.set(i64::try_from(age).unwrap_or(i64::MAX));
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
