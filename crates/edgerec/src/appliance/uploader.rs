//! The uploader thread: moves packages from `ready/` to the store, and deletes the spool's
//! copy only after the store confirmed the package's SHA-256.
//!
//! This is the first, plain version for the `dir` store: packages are taken oldest first,
//! as the recorder announces them and from a scan of `ready/` at start and every
//! `rescan` interval; a transient failure is retried after the wait the [`Policy`] draws
//! (capped exponential backoff with full jitter, forever by default); a refusal or a conflict moves the package to `failed/` with the reason. Attempts,
//! the next attempt time and the last error are written to the package's state file, so a
//! restart continues where it stopped.
//!
//! Invariant: a package leaves the spool only through [`Spool::remove_stored`] after
//! [`Store::put`] returned `Ok`; nothing here deletes a package otherwise.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use uuid::Uuid;

use crate::appliance::metrics::{Metrics, UploadOutcome};
use crate::appliance::outcomes::{Fact, Outcomes};
use crate::appliance::reload::Live;
use crate::appliance::shutdown::Shutdown;
use crate::appliance::spool::{Place, Spool, UploadState};
use crate::appliance::upload_queue::UploadQueue;
use crate::store::Multipart;
use crate::store::retry::{Policy, Verdict};
use crate::store::{Checkpoint, Store, StoreError, Stored};
use erec::clock::now_ms;

/// The recording id of a state file in `ready/` (`<id>.json`), the last file a package
/// that arrives there gets (packages move before their state, and new state files are
/// renamed into place).
pub fn ready_id(path: &std::path::Path) -> Option<Uuid> {
    let name = path.file_name()?.to_str()?;
    Uuid::parse_str(name.strip_suffix(".json")?).ok()
}

/// Watches `ready/` (inotify) and tells the uploader of every package that arrives there by
/// other means than the recorder (`edgerec spool retry`, an operator's copy, a restore),
/// at once instead of at the next scan. Keep the watcher alive for as long as it should
/// watch; the periodic scan stays as the safety net (a full event queue, a rename the
/// watcher missed).
pub fn watch_ready(
    spool: &Spool,
    tx: std::sync::mpsc::SyncSender<Uuid>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if matches!(ev.kind, EventKind::Create(_) | EventKind::Modify(_)) {
            for id in ev.paths.iter().filter_map(|p| ready_id(p)) {
                let _ = tx.try_send(id);
            }
        }
    })?;
    watcher.watch(&spool.dir(Place::Ready), RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// What a reload may replace (`[store]`, `[upload]`'s policy and rescan interval): each
/// attempt takes the settings of its moment.
pub struct UploadSettings {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The retry policy.
    pub policy: Policy,
    /// How often `ready/` is scanned as a safety net (`upload.rescan_secs`).
    pub rescan: Duration,
}

/// What the uploader needs.
pub struct UploaderSetup {
    /// The spool.
    pub spool: Spool,
    /// The store, retry policy and rescan interval, replaced by a reload.
    pub settings: Arc<Live<UploadSettings>>,
    /// Prefix of every object key.
    pub prefix: String,
    /// Told the id of every package that reached `ready/`.
    pub ready: Receiver<Uuid>,
    /// The shutdown signal (seen between packages).
    pub stop: Shutdown,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Uploads at once (`[upload] concurrency`).
    pub concurrency: usize,
    /// Orphaned multipart uploads are aborted after this long (`None`: never).
    pub abort_orphans_after: Option<Duration>,
    /// The outcome journal: told of each package stored or failed.
    pub outcomes: crate::appliance::outcomes::Outcomes,
}

/// How often the store is swept for orphaned multipart uploads (and once at start).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Runs until `stop` is set (checked between packages) or the sender is gone.
pub fn run(setup: UploaderSetup) {
    let UploaderSetup {
        spool,
        settings,
        prefix,
        ready: rx,
        stop,
        metrics,
        concurrency,
        abort_orphans_after,
        outcomes,
    } = setup;
    let sweeper = abort_orphans_after.and_then(|older_than| {
        let (spool, settings, prefix, metrics, stop) = (
            spool.clone(),
            Arc::clone(&settings),
            prefix.clone(),
            Arc::clone(&metrics),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("upload-sweep".into())
            .spawn(move || {
                loop {
                    let store = Arc::clone(&settings.get().store);
                    if let Err(e) =
                        sweep_orphans(&spool, store.as_ref(), &prefix, older_than, &metrics)
                    {
                        tracing::warn!(error = %e, "cannot sweep the store for orphaned multipart uploads");
                    }
                    if stop.wait(SWEEP_EVERY) {
                        break;
                    }
                }
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the orphan sweep"))
            .ok()
    });
    // Workers take one package at a time from `jobs` and answer on `done` with the next
    // attempt time, if the package stays. This thread keeps the queue and hands out at most
    // `concurrency` packages at once, never the same one twice.
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Uuid>();
    let jobs_rx = Arc::new(std::sync::Mutex::new(jobs_rx));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(Uuid, Option<u64>)>();
    let workers: Vec<_> = (0..concurrency.max(1))
        .filter_map(|i| {
            let (spool, settings, prefix, metrics, outcomes) = (
                spool.clone(),
                Arc::clone(&settings),
                prefix.clone(),
                Arc::clone(&metrics),
                outcomes.clone(),
            );
            let (jobs, done) = (Arc::clone(&jobs_rx), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("upload-{i}"))
                .spawn(move || {
                    loop {
                        let job = match jobs.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(id) = job else { return };
                        let now = settings.get();
                        let next = upload_one(
                            &spool,
                            now.store.as_ref(),
                            &prefix,
                            id,
                            (&metrics, &outcomes),
                            &now.policy,
                        );
                        if done.send((id, next)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| tracing::error!(error = %e, "cannot start an upload worker"))
                .ok()
        })
        .collect();
    let slots = workers.len();
    let mut queue = UploadQueue::new(slots);
    let mut last_scan: Option<std::time::Instant> = None;
    let mut news_open = true;
    let attempt_at = |id| {
        spool
            .read_state(Place::Ready, id)
            .ok()
            .map(|s| s.next_attempt_ms)
    };
    while !stop.is_triggered() && slots > 0 {
        while let Ok((id, next)) = done_rx.try_recv() {
            queue.answered(id, next);
        }
        if last_scan.is_none_or(|t| t.elapsed() >= settings.get().rescan) {
            match spool.list(Place::Ready) {
                Ok(ids) => ids.into_iter().for_each(|id| queue.offer(id)),
                Err(e) => tracing::error!(error = %e, "cannot list the spool"),
            }
            last_scan = Some(std::time::Instant::now());
        }
        let now = now_ms();
        let mut handed = false;
        while let Some(id) = queue.next_due(now, attempt_at) {
            if jobs_tx.send(id).is_err() {
                return finish(jobs_tx, workers, sweeper);
            }
            handed = true;
        }
        if handed {
            continue;
        }
        if !news_open && queue.is_empty() {
            break;
        }
        // Nothing to hand out now: wait for news, a worker's answer (which may free a slot
        // or bring a package back), the next due time or the next scan, checking the stop
        // flag at least every 200 ms.
        let mut wait = Duration::from_millis(200);
        if let Some(at) = queue.poll_timeout() {
            wait = wait.min(Duration::from_millis(at.saturating_sub(now)));
        }
        if queue.in_flight() > 0 {
            // Answers come on their own channel: looked at this often while any is due.
            wait = wait.min(Duration::from_millis(20));
        }
        if news_open {
            match rx.recv_timeout(wait) {
                Ok(id) => queue.offer(id),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => news_open = false,
            }
            while let Ok(id) = rx.try_recv() {
                queue.offer(id);
            }
        } else if let Ok((id, next)) = done_rx.recv_timeout(wait) {
            queue.answered(id, next);
        }
    }
    // Stopping: the packages the recorder sealed last were told before the stop and may
    // not have been handed out yet (told in the round the stop came in): they go too, as
    // many as there are free workers; the rest waits in ready/ for the next start.
    while let Ok(id) = rx.try_recv() {
        queue.offer(id);
    }
    while let Ok((id, next)) = done_rx.try_recv() {
        queue.answered(id, next);
    }
    let now = now_ms();
    while let Some(id) = queue.next_due(now, attempt_at) {
        if jobs_tx.send(id).is_err() {
            break;
        }
    }
    finish(jobs_tx, workers, sweeper);
}

/// Stopping: the packages in flight finish (their state is on disk either way), then the
/// workers go.
fn finish(
    jobs: std::sync::mpsc::Sender<Uuid>,
    workers: Vec<std::thread::JoinHandle<()>>,
    sweeper: Option<std::thread::JoinHandle<()>>,
) {
    drop(jobs);
    for w in workers {
        let _ = w.join();
    }
    if let Some(s) = sweeper {
        let _ = s.join();
    }
}

/// One attempt at the package `id` now, outside the uploader's thread (the stop's last
/// manifest, after the uploader stopped); whether the store confirmed it.
pub fn deliver_now(
    spool: &Spool,
    settings: &UploadSettings,
    prefix: &str,
    id: Uuid,
    (metrics, outcomes): (&Metrics, &Outcomes),
) -> bool {
    upload_one(
        spool,
        settings.store.as_ref(),
        prefix,
        id,
        (metrics, outcomes),
        &settings.policy,
    )
    .is_none()
        && !spool.package_path(Place::Ready, id).exists()
        && !spool.package_path(Place::Failed, id).exists()
}

/// One attempt. Returns the next attempt time if the package stays in `ready/`.
fn upload_one(
    spool: &Spool,
    store: &dyn Store,
    prefix: &str,
    id: Uuid,
    (metrics, outcomes): (&Metrics, &Outcomes),
    policy: &Policy,
) -> Option<u64> {
    let Ok(mut state) = spool.read_state(Place::Ready, id) else {
        return None; // gone meanwhile (stored, or moved by an operator)
    };
    let key = state.object_key(prefix);
    let path = spool.package_path(Place::Ready, id);
    let sha: [u8; 32] = match hex::decode(&state.sha256)
        .ok()
        .and_then(|v| v.try_into().ok())
    {
        Some(s) => s,
        None => {
            tracing::error!(recording = %id, "state file has no valid SHA-256");
            return None;
        }
    };
    state.attempts += 1;
    let started = std::time::Instant::now();
    let result = store.put_resumable(
        &key,
        &path,
        &sha,
        &mut StateCheckpoint {
            spool,
            state: &mut state,
            metrics,
        },
    );
    metrics
        .upload_duration
        .observe(started.elapsed().as_secs_f64());
    // A manifest's upload is counted among the manifests, not the recordings.
    let counter = match state.is_recording() {
        true => &metrics.uploads,
        false => &metrics.manifests,
    };
    let outcome = |o: &str| {
        counter
            .get_or_create(&UploadOutcome { outcome: o.into() })
            .inc();
    };
    match result {
        Ok(how) => {
            // In the journal before the spool lets go of it: a crash in between sends it
            // again (the store answers "already there") and notes it again. Not noted, it
            // stays: a recording no manifest lists would look forged (the next attempt finds
            // it there and notes it then).
            if state.is_recording()
                && !outcomes.note_durable(Fact::Stored {
                    id,
                    key: key.clone(),
                    bytes: state.size,
                    sha256: state.sha256.clone(),
                })
            {
                tracing::warn!(recording = %id, "stored, but the outcome journal did not commit it; kept in the spool and tried again");
                let wait = policy.wait(state.attempts, None, random());
                state.next_attempt_ms =
                    now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                state.last_error = Some("the outcome journal did not commit".into());
                if let Err(e) = spool.write_state(Place::Ready, &state) {
                    tracing::error!(recording = %id, error = %e, "cannot write upload state");
                }
                return Some(state.next_attempt_ms);
            }
            match spool.remove_stored(id) {
                Ok(()) => {
                    outcome(match how {
                        Stored::Written => "stored",
                        Stored::AlreadyThere => "already_stored",
                    });
                    metrics.uploaded_bytes.inc_by(state.size);
                    if state.is_recording() {
                        let age_ms = now_ms().saturating_sub(state.ready_ms);
                        metrics.recording_to_stored.observe(age_ms as f64 / 1000.0);
                    }
                    tracing::info!(recording = %id, key, ?how, "stored");
                    None
                }
                Err(e) => {
                    tracing::error!(recording = %id, error = %e, "stored, but cannot remove from the spool");
                    None
                }
            }
        }
        Err(StoreError::Transient { why, retry_after }) => {
            let wait = match policy.after_transient(state.attempts, retry_after, random()) {
                Verdict::RetryAfter(w) => w,
                _ => {
                    let e = StoreError::Permanent(format!(
                        "gave up after {} attempts (upload.max_attempts); last: {why}",
                        state.attempts
                    ));
                    return fail(spool, store, &key, &mut state, &e, (metrics, outcomes));
                }
            };
            outcome("retry");
            metrics.upload_retries.inc();
            state.next_attempt_ms = now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            tracing::warn!(recording = %id, attempts = state.attempts, wait_ms = wait.as_millis(), error = %why, "upload failed; will retry");
            state.last_error = Some(why);
            if let Err(e) = spool.write_state(Place::Ready, &state) {
                tracing::error!(recording = %id, error = %e, "cannot write upload state");
            }
            Some(state.next_attempt_ms)
        }
        Err(e) => fail(spool, store, &key, &mut state, &e, (metrics, outcomes)),
    }
}

/// Moves a package the store refused (or that used up its attempts) to `failed/`, with the
/// reason in its state file. Never deletes it.
fn fail(
    spool: &Spool,
    store: &dyn Store,
    key: &str,
    state: &mut UploadState,
    e: &StoreError,
    (metrics, outcomes): (&Metrics, &Outcomes),
) -> Option<u64> {
    let id = state.id;
    state.last_error = Some(e.to_string());
    // Its parts would only take space in the store: a retry from failed/ starts afresh.
    if let Some(m) = state.multipart.take() {
        match store.abort_upload(key, &m.upload_id) {
            Ok(()) => {
                tracing::info!(recording = %id, upload_id = %m.upload_id, "multipart upload aborted")
            }
            Err(e) => {
                tracing::warn!(recording = %id, upload_id = %m.upload_id, error = %e, "cannot abort the multipart upload; the orphan sweep will")
            }
        }
    }
    // In the journal before the move: a crash in between leaves it in ready/, tried again.
    if state.is_recording() {
        outcomes.note_durable(Fact::Failed {
            id,
            reason: e.to_string(),
        });
    }
    let moved = spool
        .write_state(Place::Ready, state)
        .and_then(|()| spool.move_package(id, Place::Ready, Place::Failed));
    if let Err(e) = moved {
        tracing::error!(recording = %id, error = %e, "cannot move to failed/");
    }
    // Logged and counted once it is in failed/, so what the metric says is on disk.
    tracing::error!(recording = %id, error = %e, "store refused the package; moved to failed/");
    match state.is_recording() {
        true => &metrics.uploads,
        false => &metrics.manifests,
    }
    .get_or_create(&UploadOutcome {
        outcome: "failed".into(),
    })
    .inc();
    None
}

/// The package's state file as the store's checkpoint: multipart progress is written to it
/// (atomically, synced) before the upload goes on.
struct StateCheckpoint<'a> {
    spool: &'a Spool,
    state: &'a mut UploadState,
    metrics: &'a Metrics,
}

impl Checkpoint for StateCheckpoint<'_> {
    fn multipart(&self) -> Option<&Multipart> {
        self.state.multipart.as_ref()
    }

    fn save(&mut self, m: Option<Multipart>) -> Result<(), StoreError> {
        let parts = |m: &Option<Multipart>| m.as_ref().map_or(0, |m| m.parts.len());
        if parts(&m) > parts(&self.state.multipart) {
            self.metrics.upload_parts.inc();
        }
        self.state.multipart = m;
        self.spool
            .write_state(Place::Ready, self.state)
            .map_err(|e| StoreError::transient(format!("cannot save the upload's progress: {e}")))
    }

    fn attempted_before(&self) -> bool {
        // `attempts` counts this one already; `spool retry` resets it but keeps the error.
        self.state.attempts > 1 || self.state.last_error.is_some() || self.state.multipart.is_some()
    }
}

/// Aborts the multipart uploads under `prefix` that no package in the spool refers to, once
/// they are older than `older_than` (see `upload.abort_orphans_after_secs`). Returns how many.
pub fn sweep_orphans(
    spool: &Spool,
    store: &dyn Store,
    prefix: &str,
    older_than: Duration,
    metrics: &Metrics,
) -> Result<usize, StoreError> {
    let mut keep = std::collections::HashSet::new();
    for place in [Place::Ready, Place::Failed] {
        for id in spool.list(place).unwrap_or_default() {
            match spool.read_state(place, id) {
                Ok(s) => keep.extend(s.multipart.map(|m| m.upload_id)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // stored meanwhile
                // A state file being rewritten: skip this sweep rather than abort its upload.
                Err(e) => {
                    return Err(StoreError::transient(format!(
                        "orphan sweep postponed: {e}"
                    )));
                }
            }
        }
    }
    let aborted = store.abort_orphans(prefix, &keep, older_than)?;
    for key in &aborted {
        tracing::info!(key, "orphaned multipart upload aborted");
    }
    metrics
        .multipart_orphans_aborted
        .inc_by(aborted.len() as u64);
    Ok(aborted.len())
}

/// A uniformly random number for the jitter (the OS's generator; a failure only makes the
/// wait the bound's full length).
fn random() -> u64 {
    getrandom::u64().unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc::sync_channel;
    use std::time::Instant;

    /// Fails transiently `fails` times, then stores.
    struct Flaky {
        fails: AtomicU32,
        puts: AtomicU32,
    }

    impl Store for Flaky {
        fn put(&self, _key: &str, _file: &Path, _sha: &[u8; 32]) -> Result<Stored, StoreError> {
            self.puts.fetch_add(1, Ordering::Relaxed);
            if self.fails.load(Ordering::Relaxed) > 0 {
                self.fails.fetch_sub(1, Ordering::Relaxed);
                return Err(StoreError::Transient {
                    why: "503 Slow Down".into(),
                    retry_after: None,
                });
            }
            Ok(Stored::Written)
        }
        fn kind(&self) -> &'static str {
            "flaky"
        }
    }

    fn ready_package(spool: &Spool) -> Uuid {
        let id = Uuid::now_v7();
        let f = spool.create(id, b"HEADER").unwrap();
        spool.finish(f, b"END", now_ms()).unwrap();
        id
    }

    fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start(
        spool: &Spool,
        store: Arc<dyn Store>,
        policy: Policy,
        concurrency: usize,
    ) -> (
        std::sync::mpsc::SyncSender<Uuid>,
        Shutdown,
        Arc<Metrics>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = sync_channel(10);
        let stop = Shutdown::new();
        let (metrics, _registry) = Metrics::new();
        let setup = UploaderSetup {
            spool: spool.clone(),
            settings: Live::new(UploadSettings {
                store,
                policy,
                rescan: Duration::from_secs(60),
            }),
            prefix: String::new(),
            ready: rx,
            stop: stop.clone(),
            metrics: Arc::clone(&metrics),
            concurrency,
            abort_orphans_after: None,
            outcomes: crate::appliance::outcomes::Outcomes::none(),
        };
        let t = std::thread::spawn(move || run(setup));
        (tx, stop, metrics, t)
    }

    /// Takes its time over each put and notes how many run at once.
    struct Slow {
        now: AtomicU32,
        most: AtomicU32,
        puts: AtomicU32,
    }

    impl Store for Slow {
        fn put(&self, _key: &str, _file: &Path, _sha: &[u8; 32]) -> Result<Stored, StoreError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.puts.fetch_add(1, Ordering::SeqCst);
            Ok(Stored::Written)
        }
        fn kind(&self) -> &'static str {
            "slow"
        }
    }

    #[test]
    fn uploads_run_side_by_side_up_to_the_bound_each_package_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let ids: Vec<Uuid> = (0..9).map(|_| ready_package(&spool)).collect();
        let store = Arc::new(Slow {
            now: AtomicU32::new(0),
            most: AtomicU32::new(0),
            puts: AtomicU32::new(0),
        });
        let (_tx, stop, _metrics, t) = start(
            &spool,
            Arc::clone(&store) as Arc<dyn Store>,
            Policy::default(),
            3,
        );
        until("every package is stored", || {
            spool.list(Place::Ready).unwrap().is_empty()
        });
        stop.trigger();
        t.join().unwrap();
        assert_eq!(store.puts.load(Ordering::SeqCst), 9, "each once");
        assert_eq!(
            store.most.load(Ordering::SeqCst),
            3,
            "three at a time, never more"
        );
        assert!(
            ids.iter()
                .all(|id| !spool.package_path(Place::Ready, *id).exists())
        );
    }

    /// Saves multipart progress three times per put (as an S3 multipart upload does), and
    /// announces the package each time, as the `ready/` watcher does when it sees the state
    /// file rewritten.
    struct Chatty {
        news: std::sync::Mutex<Option<std::sync::mpsc::SyncSender<Uuid>>>,
        puts: AtomicU32,
    }

    impl Store for Chatty {
        fn put(&self, _key: &str, _file: &Path, _sha: &[u8; 32]) -> Result<Stored, StoreError> {
            unreachable!("the uploader resumes")
        }
        fn put_resumable(
            &self,
            key: &str,
            _file: &Path,
            _sha: &[u8; 32],
            cp: &mut dyn Checkpoint,
        ) -> Result<Stored, StoreError> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            let id =
                Uuid::parse_str(key.trim_end_matches(".erec").rsplit('/').next().unwrap()).unwrap();
            let mut m = Multipart {
                upload_id: "u".into(),
                part_bytes: 5 << 20,
                parts: Vec::new(),
            };
            for number in 1..=3 {
                m.parts.push(crate::store::PartDone {
                    number,
                    etag: format!("e{number}"),
                    sha256: String::new(),
                });
                cp.save(Some(m.clone()))?;
                if let Some(tx) = self.news.lock().unwrap().as_ref() {
                    let _ = tx.try_send(id);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            Ok(Stored::Written)
        }
        fn kind(&self) -> &'static str {
            "chatty"
        }
    }

    #[test]
    fn news_of_a_package_being_uploaded_never_starts_a_second_upload_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let ids: Vec<Uuid> = (0..3).map(|_| ready_package(&spool)).collect();
        let store = Arc::new(Chatty {
            news: std::sync::Mutex::new(None),
            puts: AtomicU32::new(0),
        });
        let (tx, stop, metrics, t) = start(
            &spool,
            Arc::clone(&store) as Arc<dyn Store>,
            Policy::default(),
            4,
        );
        *store.news.lock().unwrap() = Some(tx);
        until("every package is stored", || {
            spool.list(Place::Ready).unwrap().is_empty()
        });
        stop.trigger();
        t.join().unwrap();
        // The first package may have been handed out before the news channel was set, the
        // rest were announced again and again while being uploaded: each went up once.
        assert_eq!(store.puts.load(Ordering::SeqCst), 3, "each once");
        assert_eq!(metrics.upload_parts.get(), 9, "every saved part counted");
        assert!(
            ids.iter()
                .all(|id| !spool.state_path(Place::Ready, *id).exists())
        );
    }

    #[test]
    fn only_state_files_name_a_ready_package() {
        let id = Uuid::now_v7();
        assert_eq!(
            ready_id(Path::new(&format!("/s/ready/{id}.json"))),
            Some(id)
        );
        for other in [
            format!("/s/ready/{id}.erec"),
            format!("/s/ready/.{id}.json.0123456789abcdef.tmp"),
            "/s/ready/notes.json".to_string(),
        ] {
            assert_eq!(ready_id(Path::new(&other)), None, "{other}");
        }
    }

    #[test]
    fn transient_failures_are_retried_until_the_store_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = ready_package(&spool);
        let store = Arc::new(Flaky {
            fails: AtomicU32::new(3),
            puts: AtomicU32::new(0),
        });
        let policy = Policy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
            max_attempts: None,
        };
        let (tx, stop, metrics, t) = start(&spool, Arc::clone(&store) as Arc<dyn Store>, policy, 1);
        tx.send(id).unwrap();
        until("the package leaves the spool", || {
            !spool.package_path(Place::Ready, id).exists()
        });
        stop.trigger();
        t.join().unwrap();
        assert_eq!(store.puts.load(Ordering::Relaxed), 4);
        assert_eq!(metrics.upload_retries.get(), 3);
        assert!(!spool.package_path(Place::Failed, id).exists());
    }

    #[test]
    fn bounded_attempts_end_in_failed_with_the_reason_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = ready_package(&spool);
        let store = Arc::new(Flaky {
            fails: AtomicU32::new(u32::MAX),
            puts: AtomicU32::new(0),
        });
        let policy = Policy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
            max_attempts: Some(3),
        };
        let (tx, stop, _metrics, t) =
            start(&spool, Arc::clone(&store) as Arc<dyn Store>, policy, 1);
        tx.send(id).unwrap();
        until("the package reaches failed/", || {
            spool.package_path(Place::Failed, id).exists()
        });
        stop.trigger();
        t.join().unwrap();
        assert_eq!(store.puts.load(Ordering::Relaxed), 3);
        let state = spool.read_state(Place::Failed, id).unwrap();
        let why = state.last_error.unwrap();
        assert!(why.contains("gave up after 3 attempts"), "{why}");
        assert!(why.contains("503 Slow Down"), "{why}");
    }
}
