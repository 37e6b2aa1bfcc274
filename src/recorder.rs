//! The recorder thread: drives the [`Sessions`] state machine with the datagram batches the
//! ingest thread hands it and with its timers, and carries out its actions on the spool — a fresh
//! data key and package per recording, sealed chunks appended, one group commit per flush
//! tick, the end record and the move to `ready/`.
//!
//! It is a plain thread, not an async task: it does blocking file I/O and syncs, and it
//! owns every open package, so no lock is needed. Ingest never blocks on it: the queue is
//! bounded and a datagram that finds it full is counted as dropped (`overload`).
//!
//! Invariants: plaintext exists only in memory (the session's pending chunk, sealed before
//! it is written); a recording whose package cannot be created or written is refused or
//! ended and counted, never allowed to stop the others; at shutdown every recording gets its
//! end record (reason shutdown) and everything is synced before the thread returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::clock::now_ms;
use crate::format::{Kind, Metadata, Wrap};
use crate::ingest::Batch;
use crate::keys::KekHandle;
use crate::metrics::Metrics;
use crate::session::{Action, Counters, Limits, RecId, Sessions};
use crate::spool::{ActiveFile, Spool};
use crate::writer::{Media, SealOptions, Sealer};

/// What the ingest thread sends.
#[derive(Debug)]
pub enum Msg {
    /// The datagrams of one ingest round, each with its arrival time.
    Batch(Batch),
    /// End every recording and return.
    Shutdown,
}

/// What the recorder needs.
pub struct RecorderSetup {
    /// The spool.
    pub spool: Spool,
    /// The KEK (and escrow KEK) new recordings are sealed to; a key change swaps it.
    pub keks: KekHandle,
    /// The wrap.
    pub wrap: Wrap,
    /// The session limits.
    pub limits: Limits,
    /// Whether to sync at each flush tick.
    pub sync: bool,
    /// Told the id of every package that reached `ready/`.
    pub ready: SyncSender<Uuid>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// False while the spool is over its quota or short of free space: new recordings are
    /// refused (nothing already spooled is touched).
    pub accepting: Arc<AtomicBool>,
    /// Datagrams queued by ingest; the recorder subtracts those it has taken.
    pub queued: Arc<AtomicUsize>,
    /// Where emptied batches go back to ingest for reuse.
    pub recycle: SyncSender<Batch>,
}

/// How often the session's counters reach the metrics (at most).
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

struct Open {
    id: Uuid,
    sealer: Sealer,
    file: ActiveFile,
}

/// Runs until [`Msg::Shutdown`] arrives or every sender is gone.
pub fn run(setup: RecorderSetup, rx: Receiver<Msg>) {
    let RecorderSetup {
        spool,
        keks,
        wrap,
        limits,
        sync,
        ready,
        metrics,
        accepting,
        queued,
        recycle,
    } = setup;
    let mut published = Counters::default();
    let mut last_publish = Instant::now();
    let mut unpublished = false;
    let epoch = Instant::now();
    let us = |t: Instant| {
        u64::try_from(t.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
    };
    let mut sessions = Sessions::new(limits);
    let mut open: HashMap<RecId, Open> = HashMap::new();
    let mut uuids: HashMap<RecId, Uuid> = HashMap::new();
    let mut actions = Vec::new();
    let mut closing: Vec<(ActiveFile, Vec<u8>)> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let mut timeout = sessions
            .poll_timeout()
            .map(|t| Duration::from_micros(t.saturating_sub(us(Instant::now()))));
        if unpublished {
            // Counts not yet in the metrics: come back in time to publish them.
            timeout = Some(timeout.map_or(PUBLISH_EVERY, |t| t.min(PUBLISH_EVERY)));
        }
        let msg = match timeout {
            Some(d) => rx.recv_timeout(d),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let mut stop = false;
        // Timers run on the clock of the data: while datagrams wait in the queue, "now" is
        // the arrival of the one just taken, so a recorder that fell behind never ends a
        // call as idle whose packets are still queued.
        let mut clock = us(Instant::now());
        match msg {
            Ok(Msg::Batch(mut batch)) => {
                for (d, data) in batch.iter() {
                    clock = us(d.at);
                    // A timer due before this datagram fires first (cheap when none is).
                    if sessions.poll_timeout().is_some_and(|t| t <= clock) {
                        sessions.handle_timeout(clock, &mut actions);
                    }
                    sessions.handle(clock, d.local, d.remote, data, &mut actions);
                }
                queued.fetch_sub(batch.len(), Ordering::Relaxed);
                batch.clear();
                let _ = recycle.try_send(batch);
                unpublished = true;
            }
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                sessions.shutdown(&mut actions);
                stop = true;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if !stop {
            sessions.handle_timeout(clock, &mut actions);
        }
        unpublished |= !actions.is_empty();
        for action in actions.drain(..) {
            match action {
                Action::Open {
                    rec,
                    local,
                    continues,
                } => {
                    let mut public = Metadata::new();
                    public.insert("port".into(), local.port().into());
                    if let Some(prev) = continues.and_then(|c| uuids.get(&c)) {
                        public.insert("continues".into(), prev.hyphenated().to_string().into());
                    }
                    let opts = SealOptions {
                        wrap,
                        max_chunk: u32::try_from(limits.max_chunk).unwrap_or(u32::MAX),
                        media: Media::Rtp,
                        public,
                        recording_id: None,
                        created_ms: None,
                    };
                    if !accepting.load(Ordering::Relaxed) {
                        tracing::error!(
                            port = local.port(),
                            "recording refused: the spool is full"
                        );
                        Metrics::inc(&metrics.recordings_refused, "spool_full", 1);
                        continue;
                    }
                    let started = Sealer::new(&keks.current(), &opts)
                        .map_err(|e| e.to_string())
                        .and_then(|sealer| {
                            let id = sealer.recording_id();
                            spool
                                .create_unsynced(id, sealer.header_bytes())
                                .map(|file| Open { id, sealer, file })
                                .map_err(|e| e.to_string())
                        });
                    match started {
                        Ok(o) => {
                            tracing::info!(recording = %o.id, port = local.port(), "recording started");
                            uuids.insert(rec, o.id);
                            open.insert(rec, o);
                            metrics.recordings_active.inc();
                        }
                        Err(e) => {
                            tracing::error!(port = local.port(), error = %e, "recording refused");
                            Metrics::inc(&metrics.recordings_refused, "spool_error", 1);
                        }
                    }
                }
                Action::Chunk { rec, plaintext } => {
                    let Some(o) = open.get_mut(&rec) else {
                        continue;
                    };
                    buf.clear();
                    let written = o
                        .sealer
                        .seal(Kind::Media, &plaintext, &mut buf)
                        .map_err(|e| e.to_string())
                        .and_then(|()| o.file.append(&buf).map_err(|e| e.to_string()));
                    match written {
                        Ok(()) => {
                            metrics.chunks_written.inc();
                        }
                        Err(e) => {
                            // The package keeps what was written; recovery at the next start
                            // cuts the torn tail and delivers it as unterminated.
                            tracing::error!(recording = %o.id, error = %e, "write failed; recording ended");
                            Metrics::inc(&metrics.recordings_ended, "write_error", 1);
                            metrics.recordings_active.dec();
                            open.remove(&rec);
                        }
                    }
                }
                Action::Sync => {
                    let dirty = open.values().filter(|o| o.file.is_dirty()).count();
                    if sync && dirty > 0 {
                        let t = Instant::now();
                        group_commit(&spool, &mut open, dirty);
                        metrics.sync_duration.observe(t.elapsed().as_secs_f64());
                        tracing::debug!(files = dirty, "synced");
                    }
                }
                Action::Close { rec, reason } => {
                    uuids.remove(&rec);
                    let Some(o) = open.remove(&rec) else { continue };
                    metrics.recordings_active.dec();
                    let mut end = Vec::new();
                    o.sealer.finish(reason, now_ms(), &mut end);
                    tracing::info!(recording = %o.id, reason = reason.name(), "recording ended");
                    closing.push((o.file, end));
                }
            }
        }
        if !closing.is_empty() {
            // Every call that ended in this round, sealed with a fixed number of syncs.
            for (id, r) in spool.finish_all(std::mem::take(&mut closing), now_ms()) {
                match r {
                    Ok(state) => {
                        tracing::debug!(recording = %id, bytes = state.size, "package ready");
                        let _ = ready.try_send(id);
                    }
                    Err(e) => {
                        tracing::error!(recording = %id, error = %e, "cannot finish package; recovery will deliver it");
                        Metrics::inc(&metrics.recordings_refused, "finish_error", 1);
                    }
                }
            }
        }
        if stop || (unpublished && last_publish.elapsed() >= PUBLISH_EVERY) {
            publish(&metrics, sessions.counters(), &mut published);
            last_publish = Instant::now();
            unpublished = false;
        }
        if stop {
            return;
        }
    }
}

/// Adds what the session counted since the last call to the metrics.
fn publish(m: &Metrics, now: &Counters, last: &mut Counters) {
    m.rtp_received.inc_by(now.rtp_packets - last.rtp_packets);
    m.rtp_lost
        .inc_by(now.rtp_lost.saturating_sub(last.rtp_lost));
    m.rtp_duplicate
        .inc_by(now.rtp_duplicates - last.rtp_duplicates);
    m.rtp_reordered
        .inc_by(now.rtp_reordered - last.rtp_reordered);
    m.rtcp.inc_by(now.rtcp_packets - last.rtcp_packets);
    m.recordings_started.inc_by(now.started - last.started);
    for (reason, n) in &now.dropped {
        let before = last.dropped.get(reason).copied().unwrap_or(0);
        if *n > before {
            Metrics::inc(&m.datagrams_rejected, reason, n - before);
        }
    }
    for (reason, n) in &now.ended {
        let before = last.ended.get(reason).copied().unwrap_or(0);
        if *n > before {
            Metrics::inc(&m.recordings_ended, reason, n - before);
        }
    }
    last.clone_from(now);
}

/// Syncs every dirty package: one `fdatasync` each when few are dirty, one `syncfs` for the
/// whole spool when many are (thousands of recordings must not cost thousands of syncs).
fn group_commit(spool: &Spool, open: &mut HashMap<RecId, Open>, dirty: usize) {
    const PER_FILE_UP_TO: usize = 4;
    if dirty > PER_FILE_UP_TO {
        match spool.sync_fs() {
            Ok(()) => open.values_mut().for_each(|o| o.file.mark_synced()),
            Err(e) => tracing::error!(error = %e, "syncfs of the spool failed"),
        }
        return;
    }
    let mut new_entries = false;
    for o in open.values_mut() {
        if let Err(e) = o.file.sync() {
            tracing::error!(recording = %o.id, error = %e, "sync failed");
        }
        new_entries |= o.file.take_new_entry();
    }
    if new_entries {
        if let Err(e) = spool.sync_active_dir() {
            tracing::error!(error = %e, "sync of spool/active failed");
        }
    }
}
