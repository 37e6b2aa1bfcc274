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
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::appliance::carry::{Carried, Carry};
use crate::appliance::feed::{Batch, Msg};
use crate::appliance::journal::{Journal, Marks, Owner, entry_end};
use crate::appliance::metrics::Metrics;
use crate::appliance::outcomes::{Fact, Outcomes};
use crate::appliance::service_manager::Beat;
use crate::appliance::session::{Action, Counters, Holding, Limits, RecId, Sessions};
use crate::appliance::spool::{ActiveFile, Spool};
use erec::clock::now_ms;
use erec::format::{EndReason, Kind, Metadata, Wrap};
use erec::keys::{KekHandle, KekPublic};
use erec::writer::{Media, SealOptions, Sealer};

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
    /// The SIPREC server's media ports and its inactivity timer, if it runs.
    pub siprec: Option<((u16, u16), crate::siprec::transport::MediaSeen)>,
    /// Beaten once a round (at least every [`IDLE_WAKE`]) for the watchdog.
    pub beat: Arc<Beat>,
    /// The recordings in progress by port, for the next process; with those the last
    /// process had, which the first recording on their port continues.
    pub carry: Option<(Carry, HashMap<u16, Carried>)>,
    /// The origin of the session's clock: taken before ingest starts, so datagrams read
    /// before the recorder runs (what waited in sockets kept over a restart) keep their
    /// arrival times.
    pub epoch: Instant,
    /// The datagram journal, if one is kept, and the position of the first entry still to
    /// take (the first the last process left to replay, or its head).
    pub journal: Option<(Journal, u64)>,
    /// The outcome journal: told of each recording started, ended, salvaged, and of the
    /// refusals.
    pub outcomes: Outcomes,
}

/// The longest the recorder waits for work: an idle recorder still beats for the watchdog
/// (well within its `service_manager::STALE`).
const IDLE_WAKE: Duration = Duration::from_millis(250);
/// How soon the recorder looks for packages the opener has made, when nothing else wakes it.
const OPENING_POLL: Duration = Duration::from_millis(10);

/// How often the session's counters reach the metrics (at most).
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// How often the journal's tail is moved on (at most).
const JOURNAL_EVERY: Duration = Duration::from_millis(100);

struct Open {
    id: Uuid,
    sealer: Sealer,
    file: ActiveFile,
}

/// A metadata record of a SIPREC session: the whole state, so the last one read wins
/// (`conversation_id`; `siprec` with the SIP identity, the streams as offered, the merged
/// RFC 7865 metadata as JSON and the XML of the message it came with). At most `max` bytes
/// (a record's limit): the XML goes first (`xml_omitted`), then the metadata
/// (`metadata_omitted`), so what a client sends can never make a record the package refuses.
fn siprec_json(
    call: &crate::siprec::srs::CallInfo,
    streams: &[crate::siprec::srs::MediaStream],
    metadata: Option<&(serde_json::Value, String)>,
    max: usize,
) -> Vec<u8> {
    let streams: Vec<serde_json::Value> = streams
        .iter()
        .map(|s| {
            serde_json::json!({
                "stream": s.index,
                "label": s.label,
                "recorded": s.port.is_some(),
                "srtp": s.srtp.is_some(),
                "codecs": s.payload_types.iter()
                    .map(|(pt, name)| serde_json::json!({"payload_type": pt, "name": name}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut doc = serde_json::json!({
        "siprec": {
            "call_id": call.call_id,
            "from": call.from,
            "to": call.to,
            "streams": streams,
            "metadata": metadata.map(|m| &m.0),
            "xml": metadata.map(|m| &m.1),
        }
    });
    if let Some(c) = &call.conversation_id {
        doc["conversation_id"] = c.clone().into();
    }
    let mut json = serde_json::to_vec(&doc).expect("a JSON value always serializes");
    for (key, omitted) in [("xml", "xml_omitted"), ("metadata", "metadata_omitted")] {
        if json.len() <= max {
            break;
        }
        doc["siprec"][key] = serde_json::Value::Null;
        doc["siprec"][omitted] = true.into();
        json = serde_json::to_vec(&doc).expect("a JSON value always serializes");
    }
    json
}

/// What the recorder keeps of a SIPREC session for its metadata records.
struct SiprecCall {
    call: crate::siprec::srs::CallInfo,
    streams: Vec<crate::siprec::srs::MediaStream>,
    metadata: Option<(serde_json::Value, String)>,
}

/// Hands a SIPREC session's start, change or stop to the session state.
fn siprec_action(
    sessions: &mut Sessions,
    calls: &mut HashMap<crate::siprec::srs::SessionId, SiprecCall>,
    metrics: &Metrics,
    now: u64,
    action: crate::siprec::srs::SipAction,
    max: usize,
    out: &mut Vec<Action>,
) {
    use crate::siprec::srs::SipAction;
    let outcome = |o: &str| {
        metrics
            .siprec_sessions
            .get_or_create(&crate::appliance::metrics::UploadOutcome {
                outcome: o.to_string(),
            })
            .inc();
    };
    match action {
        SipAction::Start {
            session,
            streams,
            call,
            metadata,
        } => {
            let json = siprec_json(&call, &streams, metadata.as_ref(), max);
            if sessions
                .siprec_start(now, session, &streams, json, out)
                .is_some()
            {
                outcome("started");
                tracing::info!(
                    session = session.0,
                    streams = streams.len(),
                    "SIPREC session started"
                );
                calls.insert(
                    session,
                    SiprecCall {
                        call,
                        streams,
                        metadata,
                    },
                );
            }
        }
        SipAction::Change {
            session,
            streams,
            metadata,
        } => {
            // A record when the metadata or the streams changed (a new codec must reach
            // the package: the export decides by it what it can render).
            let json = calls.get_mut(&session).and_then(|c| {
                let changed = metadata.is_some() || c.streams != streams;
                if metadata.is_some() {
                    c.metadata = metadata;
                }
                c.streams.clone_from(&streams);
                changed.then(|| siprec_json(&c.call, &streams, c.metadata.as_ref(), max))
            });
            sessions.siprec_change(now, session, &streams, json, out);
        }
        SipAction::Stop { session, reason } => {
            if calls.remove(&session).is_some() {
                outcome(reason);
                tracing::info!(session = session.0, reason, "SIPREC session stopped");
            }
            sessions.siprec_stop(session, reason, out);
        }
        SipAction::Send { .. } => {}
    }
    metrics.siprec_active.set(sessions.siprec_active() as i64);
}

/// Runs until [`Msg::Shutdown`] arrives or every sender is gone.
pub fn run(setup: RecorderSetup, rx: Receiver<Msg>) {
    let beat = Arc::clone(&setup.beat);
    let mut r = Recorder::new(setup);
    loop {
        beat.beat();
        let msg = rx.recv_timeout(r.timeout().map_or(IDLE_WAKE, |d| d.min(IDLE_WAKE)));
        let stop = r.take(msg);
        r.carry_out();
        r.take_opened(stop);
        r.salvage_broken();
        r.finish_closed();
        r.publish(stop);
        r.forget_carried();
        r.journal_tail(stop);
        if stop {
            r.stop();
            return;
        }
        r.syncer.poll(&mut r.open);
    }
}

/// The recorder's state: the session it drives and every package it holds, each step of a
/// round one method. No lock: one thread owns it all.
struct Recorder {
    /// The recordings in progress by port, for the next process.
    carry: Option<Carry>,
    /// The last process's recordings by port, until a recording there continues one.
    carried_before: HashMap<u16, Carried>,
    /// When the last process's recordings are forgotten.
    forget_carried_at: Instant,
    /// The port and source of each recording to note in `carry` once its package exists.
    carried: HashMap<RecId, (u16, std::net::IpAddr)>,
    /// The ids (and sources) of recordings ended this round: a maximum-duration split's
    /// successor (opened after its predecessor's close, in the same round) names its
    /// predecessor and is carried as it was.
    ended: HashMap<RecId, (Uuid, Option<std::net::IpAddr>)>,
    /// The SIPREC media ports (their recordings are sessions, not ports: not carried).
    siprec_ports: Option<(u16, u16)>,
    /// The datagram journal: owners noted as datagrams are taken, each port's written mark
    /// as its records reach the file, the tail moved on every [`JOURNAL_EVERY`].
    journal: Option<Journal>,
    marks: Marks,
    /// Owners noted in this round, written to the journal in one go.
    owners: Vec<(u64, Owner)>,
    /// Beside each action of the round: the journal position below which the datagrams it
    /// covers lie (for a chunk: every entry of its port before it is in it).
    action_pos: Vec<u64>,
    /// The port of each recording whose datagrams the journal keeps.
    journal_ports: HashMap<RecId, u16>,
    journal_moved: Instant,
    outcomes: Outcomes,
    /// The recording each recording whose package is being made continues.
    continuing: HashMap<RecId, Uuid>,
    spool: Spool,
    keks: KekHandle,
    wrap: Wrap,
    limits: Limits,
    sync: bool,
    ready: SyncSender<Uuid>,
    metrics: Arc<Metrics>,
    accepting: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
    recycle: SyncSender<Batch>,
    sessions: Sessions,
    /// Told of the SIPREC sessions whose media arrives.
    media_seen: Option<crate::siprec::transport::MediaSeen>,
    /// The SIP identity of each SIPREC session recording, for its metadata records.
    siprec_calls: HashMap<crate::siprec::srs::SessionId, SiprecCall>,
    /// The monotonic clock's origin: session times are microseconds since it.
    epoch: Instant,
    /// The session's time of the round ("now" on the clock of the data).
    clock: u64,
    actions: Vec<Action>,
    syncer: Syncer,
    opener: Opener,
    /// Packages being written.
    open: HashMap<RecId, Open>,
    /// Recordings whose package the opener is still making, with what waits for it.
    opening: HashMap<RecId, Vec<Pending>>,
    uuids: HashMap<RecId, Uuid>,
    /// Ended this round: finished together with a fixed number of syncs.
    closing: Vec<(ActiveFile, Vec<u8>)>,
    /// Whose write failed this round, with why.
    broken: Vec<(ActiveFile, String)>,
    buf: Vec<u8>,
    published: Counters,
    last_publish: Instant,
    unpublished: bool,
}

impl Recorder {
    fn new(setup: RecorderSetup) -> Recorder {
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
            siprec,
            beat: _,
            carry,
            epoch,
            journal,
            outcomes,
        } = setup;
        let (journal, marks) = match journal {
            Some((j, start)) => (Some(j), Marks::new(start)),
            None => (None, Marks::default()),
        };
        let mut sessions = Sessions::new(limits);
        let siprec_ports = siprec.as_ref().map(|(ports, _)| *ports);
        let media_seen = siprec.map(|((first, last), seen)| {
            sessions.set_siprec_ports(first, last);
            seen
        });
        let (carry, carried_before) = match carry {
            Some((c, before)) => (Some(c), before),
            None => (None, HashMap::new()),
        };
        if !carried_before.is_empty() {
            tracing::info!(
                recordings = carried_before.len(),
                "recordings of the last process: the next recording on each port continues one"
            );
        }
        Recorder {
            carry,
            carried_before,
            // A call that has not come back within an idle timeout ended meanwhile.
            forget_carried_at: Instant::now()
                + Duration::from_micros(limits.idle_timeout_us)
                + Duration::from_secs(1),
            carried: HashMap::new(),
            ended: HashMap::new(),
            siprec_ports,
            journal,
            marks,
            owners: Vec::new(),
            action_pos: Vec::new(),
            journal_ports: HashMap::new(),
            journal_moved: Instant::now(),
            outcomes,
            continuing: HashMap::new(),
            sessions,
            media_seen,
            siprec_calls: HashMap::new(),
            syncer: Syncer::start(spool.clone(), Arc::clone(&metrics)),
            opener: Opener::start(spool.clone()),
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
            epoch,
            clock: 0,
            actions: Vec::new(),
            open: HashMap::new(),
            opening: HashMap::new(),
            uuids: HashMap::new(),
            closing: Vec::new(),
            broken: Vec::new(),
            buf: Vec::new(),
            published: Counters::default(),
            last_publish: Instant::now(),
            unpublished: false,
        }
    }

    /// The last process's recordings whose call did not come back: forgotten (in the
    /// carry file too, so a later restart does not continue them).
    fn forget_carried(&mut self) {
        if self.carried_before.is_empty() || Instant::now() < self.forget_carried_at {
            return;
        }
        for (port, (id, _)) in self.carried_before.drain() {
            if let Some(c) = &self.carry {
                c.clear(port, id);
            }
        }
    }

    fn us(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// How long to wait for the next message: until the session's next timer, sooner if
    /// counts wait to be published or packages are being made; `None`: until a message.
    fn timeout(&self) -> Option<Duration> {
        let now = self.us(Instant::now());
        let mut timeout = self
            .sessions
            .poll_timeout()
            .map(|t| Duration::from_micros(t.saturating_sub(now)));
        if self.unpublished {
            // Counts not yet in the metrics: come back in time to publish them.
            timeout = Some(timeout.map_or(PUBLISH_EVERY, |t| t.min(PUBLISH_EVERY)));
        }
        if !self.opening.is_empty() {
            // Packages being made: take them up soon even if no datagram comes.
            timeout = Some(timeout.map_or(OPENING_POLL, |t| t.min(OPENING_POLL)));
        }
        timeout
    }

    /// Hands a message (or the lack of one) to the session; whether to stop.
    fn take(&mut self, msg: Result<Msg, RecvTimeoutError>) -> bool {
        let mut stop = false;
        // Timers run on the clock of the data: while datagrams wait in the queue, "now" is
        // the arrival of the one just taken, so a recorder that fell behind never ends a
        // call as idle whose packets are still queued.
        self.clock = self.us(Instant::now());
        // What may start a recording is the session's decision, on the spool's and the
        // key's state as of now.
        self.sessions
            .set_refusal(if !self.accepting.load(Ordering::Relaxed) {
                Some("spool_full")
            } else if self.keks.current().is_empty() {
                Some("kek_stale")
            } else {
                None
            });
        let (sessions, actions) = (&mut self.sessions, &mut self.actions);
        match msg {
            Ok(Msg::Batch(mut batch)) => {
                for (d, data) in batch.iter() {
                    self.clock =
                        u64::try_from(d.at.saturating_duration_since(self.epoch).as_micros())
                            .unwrap_or(u64::MAX);
                    // A chunk handed out before this datagram is taken holds every entry
                    // of its port before it.
                    let before = d.journal.unwrap_or(self.marks.processed_end());
                    // A timer due before this datagram fires first (cheap when none is).
                    if sessions.poll_timeout().is_some_and(|t| t <= self.clock) {
                        sessions.handle_timeout(self.clock, actions);
                    }
                    self.action_pos.resize(actions.len(), before);
                    let mid = actions.len();
                    sessions.handle(self.clock, d.local, d.remote, data, actions);
                    let tag = chunk_mark(
                        &actions[mid..],
                        before,
                        d.journal.map(|p| entry_end(p, data.len())),
                        sessions.took().is_some(),
                        sessions.admitted(),
                    );
                    self.action_pos.resize(actions.len(), tag);
                    if let Some(pos) = d.journal {
                        let owner = sessions.took().map_or(Owner::Dropped, Owner::Port);
                        self.marks.took(pos, entry_end(pos, data.len()), owner);
                        self.owners.push((pos, owner));
                    }
                }
                if let Some(j) = &self.journal {
                    j.owners(&self.owners);
                }
                self.owners.clear();
                if let Some(seen) = &self.media_seen {
                    for s in sessions.take_siprec_seen() {
                        seen.seen(s);
                    }
                }
                self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
                batch.clear();
                let _ = self.recycle.try_send(batch);
                self.unpublished = true;
            }
            Ok(Msg::Metadata { port, doc, reply }) => {
                let json = serde_json::to_vec(&doc).expect("a JSON map always serializes");
                let tagged = sessions.metadata(port, json, actions);
                tracing::info!(port, outcome = ?tagged, "metadata");
                if let Some(r) = reply {
                    let _ = r.try_send(tagged);
                }
            }
            Ok(Msg::Pause { port, pause, reply }) => {
                let applied = if pause {
                    sessions.pause(self.clock, port, actions)
                } else {
                    sessions.resume(self.clock, port, actions)
                };
                tracing::info!(port, pause, outcome = ?applied, "pause");
                if let Some(r) = reply {
                    let _ = r.try_send(applied);
                }
            }
            Ok(Msg::Siprec(action)) => {
                siprec_action(
                    sessions,
                    &mut self.siprec_calls,
                    &self.metrics,
                    self.clock,
                    action,
                    self.limits.max_chunk,
                    actions,
                );
            }
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                sessions.shutdown(actions);
                stop = true;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if !stop {
            sessions.handle_timeout(self.clock, actions);
        }
        // A timer may change counts without an action (a candidate expired).
        self.unpublished |= !actions.is_empty() || sessions.counters() != &self.published;
        self.action_pos
            .resize(actions.len(), self.marks.processed_end());
        stop
    }

    /// Carries out what the session said: packages opened (off this thread), records
    /// sealed and appended, group commits, recordings ended.
    fn carry_out(&mut self) {
        let mut actions = std::mem::take(&mut self.actions);
        let positions = std::mem::take(&mut self.action_pos);
        for (i, action) in actions.drain(..).enumerate() {
            let below = positions
                .get(i)
                .copied()
                .unwrap_or(self.marks.processed_end());
            match action {
                Action::Open {
                    rec,
                    local,
                    continues,
                    source,
                    started_us,
                } => {
                    if self.journal.is_some() && !self.is_siprec_port(local.port()) {
                        self.journal_ports.insert(rec, local.port());
                    }
                    self.open_package(rec, local, continues, source, started_us);
                }
                Action::Chunk { rec, plaintext } => {
                    let mark = self.journal_ports.get(&rec).map(|&p| (p, below));
                    self.record(rec, Kind::Media, plaintext, mark);
                }
                Action::Metadata { rec, json } => {
                    if let Some(id) = self.uuids.get(&rec) {
                        note_conversation(&self.outcomes, *id, &json);
                    }
                    self.record(rec, Kind::Metadata, json, None)
                }
                Action::Sync => {
                    if self.sync {
                        self.syncer.poll(&mut self.open);
                        self.syncer
                            .commit(&self.spool, &mut self.open, &self.metrics);
                    }
                }
                Action::Close { rec, reason } => {
                    let id = self.uuids.remove(&rec);
                    let noted = self.carried.remove(&rec);
                    // Ended by the appliance's stop, it is continued after the restart.
                    if let (Some(carry), Some((port, _)), Some(id)) = (&self.carry, noted, id)
                        && reason != EndReason::Shutdown
                    {
                        carry.clear(port, id);
                    }
                    if let Some(id) = id {
                        self.ended.insert(rec, (id, noted.map(|(_, from)| from)));
                    }
                    // A package still being made keeps its journal port until what waits
                    // for it is written.
                    if let Some(waiting) = self.opening.get_mut(&rec) {
                        waiting.push(Pending::Close(reason));
                    } else {
                        self.end(rec, reason);
                    }
                }
            }
        }
        self.ended.clear();
        // The buffers' room is kept for the next round.
        self.actions = actions;
        self.action_pos = positions;
        self.action_pos.clear();
    }

    /// Ends `rec`'s package: its end record goes with the others of the round.
    fn end(&mut self, rec: RecId, reason: EndReason) {
        self.journal_ports.remove(&rec);
        if let Some(o) = self.open.get(&rec) {
            self.outcomes.note(Fact::Ended {
                id: o.id,
                reason: reason.name().into(),
            });
        }
        close(
            &mut self.open,
            rec,
            reason,
            &mut self.closing,
            &self.metrics,
        );
    }

    fn is_siprec_port(&self, port: u16) -> bool {
        self.siprec_ports
            .is_some_and(|(a, b)| (a..=b).contains(&port))
    }

    /// A record reached `port`'s package file: every entry the port owns below `below` is in
    /// it.
    fn written(&mut self, mark: Option<(u16, u64)>) {
        if let (Some(j), Some((port, below))) = (&self.journal, mark) {
            j.written(port, below);
            self.marks.written(port, below);
        }
    }

    /// Moves the journal's tail on past what is written: every [`JOURNAL_EVERY`], first
    /// letting go of the ports that hold nothing any more (what they owned was written or
    /// dropped, or its package is gone); while the ring is more than half full, of ports
    /// whose only holder is a candidate too (a port kept a candidate by junk does not fill
    /// it; a call's first packets then lose their protection, never their recording). At the
    /// stop, everything taken is in a file or dropped.
    fn journal_tail(&mut self, stop: bool) {
        let Some(j) = &self.journal else {
            return;
        };
        if !stop && self.journal_moved.elapsed() < JOURNAL_EVERY {
            return;
        }
        self.journal_moved = Instant::now();
        let end = self.marks.processed_end();
        let crowded = j.used(self.marks.tail()) > j.capacity() / 2;
        // Ports with a package being made or written: what they took is on its way to a file.
        let live: std::collections::HashSet<u16> = self
            .journal_ports
            .iter()
            .filter(|(r, _)| self.opening.contains_key(r) || self.open.contains_key(r))
            .map(|(_, p)| *p)
            .collect();
        let idle: Vec<u16> = self
            .marks
            .pending()
            .filter(|&p| {
                stop || (!live.contains(&p)
                    && match self.sessions.holding(p) {
                        Holding::Nothing => true,
                        Holding::Candidate => crowded,
                        // One whose package is gone (a failed write): nothing reaches a file.
                        Holding::Recording => true,
                    })
            })
            .collect();
        for p in idle {
            j.written(p, end);
            self.marks.written(p, end);
        }
        j.set_tail(self.marks.tail());
    }

    /// Asks the opener for a package for `rec`: its id chosen here (a successor can name it
    /// at once); the data key, its RSA wrap and the file are made off this thread.
    fn open_package(
        &mut self,
        rec: RecId,
        local: std::net::SocketAddr,
        continues: Option<RecId>,
        source: Option<std::net::IpAddr>,
        started_us: u64,
    ) {
        // The wall clock when its first datagram arrived (it may have been held).
        let age_ms = self.us(Instant::now()).saturating_sub(started_us) / 1000;
        let created_ms = erec::clock::now_ms().saturating_sub(age_ms);
        let mut public = Metadata::new();
        let port = local.port();
        public.insert("port".into(), port.into());
        let current = self.keks.current();
        if current.is_empty() {
            // The key went stale since the session was told: it ends at once.
            tracing::error!(
                port,
                "recording ended at its start: no usable KEK (the key manager's key is stale)"
            );
            self.journal_ports.remove(&rec);
            self.sessions.abort(self.clock, rec);
            return;
        }
        // A split's successor: its predecessor's id, and the source that started it.
        let split = continues.and_then(|c| {
            let source = self.carried.get(&c).map(|&(_, from)| from);
            self.uuids
                .get(&c)
                .map(|&id| (id, source))
                .or_else(|| self.ended.get(&c).copied())
        });
        let source = source.or(split.and_then(|(_, from)| from));
        // A port's recording (not a SIPREC session's) started by a stream: noted for the
        // next process, and it may continue the last process's recording from that source.
        let carried = source.filter(|_| self.carry.is_some() && !self.is_siprec_port(port));
        let before = split.map(|(id, _)| id).or_else(|| {
            let from = carried?;
            let (last, was_from) = *self.carried_before.get(&port)?;
            if was_from != from {
                return None;
            }
            self.carried_before.remove(&port);
            let last = Some(last);
            if let Some(id) = last {
                tracing::info!(port, continues = %id, "continuing a recording of the last process");
            }
            last
        });
        if let Some(prev) = before {
            public.insert("continues".into(), prev.hyphenated().to_string().into());
            self.continuing.insert(rec, prev);
        }
        let id = Uuid::now_v7();
        let opts = SealOptions {
            wrap: self.wrap,
            max_chunk: u32::try_from(self.limits.max_chunk).unwrap_or(u32::MAX),
            media: Media::Rtp,
            public,
            recording_id: Some(id),
            created_ms: Some(created_ms),
        };
        self.uuids.insert(rec, id);
        if let Some(from) = carried {
            // Noted in the carry file once its package exists.
            self.carried.insert(rec, (port, from));
        }
        self.opening.insert(rec, Vec::new());
        let job = OpenJob {
            rec,
            port: local.port(),
            keks: current,
            opts,
        };
        if self.opener.jobs.send(job).is_err() {
            self.opening.remove(&rec);
            self.continuing.remove(&rec);
            self.uuids.remove(&rec);
            self.carried.remove(&rec);
            self.journal_ports.remove(&rec);
            tracing::error!(
                port = local.port(),
                "recording ended at its start: the opener is gone"
            );
            self.sessions.abort(self.clock, rec);
        }
    }

    /// A record for `rec`: written now, or kept until its package is made; `mark`: the
    /// journal's written mark it sets once in the file.
    fn record(&mut self, rec: RecId, kind: Kind, plaintext: Vec<u8>, mark: Option<(u16, u64)>) {
        if let Some(waiting) = self.opening.get_mut(&rec) {
            waiting.push(Pending::Record(kind, plaintext, mark));
        } else {
            self.write(rec, kind, &plaintext, mark);
        }
    }

    /// Seals and appends a record to `rec`'s package; once it is in the file, the journal's
    /// written `mark` is set.
    fn write(&mut self, rec: RecId, kind: Kind, plaintext: &[u8], mark: Option<(u16, u64)>) {
        if write_record(
            &mut self.open,
            rec,
            kind,
            plaintext,
            &mut self.buf,
            &mut self.broken,
            &self.metrics,
        ) {
            self.written(mark);
        }
    }

    /// Packages the opener has made: what waited for them is written now. At shutdown,
    /// every one is waited for, so that each recording gets its end record.
    fn take_opened(&mut self, stop: bool) {
        while !self.opening.is_empty() {
            let made = if stop {
                match self.opener.done.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else {
                match self.opener.done.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            };
            let (rec, port, result) = made;
            let waiting = self.opening.remove(&rec).unwrap_or_default();
            let continues = self.continuing.remove(&rec);
            match result {
                Ok(o) => {
                    tracing::info!(recording = %o.id, port, "recording started");
                    self.outcomes.note(Fact::Started {
                        id: o.id,
                        port,
                        continues,
                    });
                    if let (Some(carry), Some(&(at, from))) = (&self.carry, self.carried.get(&rec))
                    {
                        carry.set(at, o.id, from);
                    }
                    self.open.insert(rec, o);
                    self.metrics.recordings_active.inc();
                    for p in waiting {
                        match p {
                            Pending::Record(kind, plaintext, mark) => {
                                self.write(rec, kind, &plaintext, mark);
                            }
                            Pending::Close(reason) => self.end(rec, reason),
                        }
                    }
                }
                Err(e) => {
                    self.uuids.remove(&rec);
                    self.carried.remove(&rec);
                    self.journal_ports.remove(&rec);
                    tracing::error!(port, error = %e, "recording ended at its start: its package cannot be made");
                    self.sessions.abort(self.us(Instant::now()), rec);
                    self.unpublished = true;
                }
            }
        }
    }

    /// Recordings whose write failed (a full disk): what they hold up to their last whole
    /// record goes to ready/, unterminated, so the call so far is delivered.
    fn salvage_broken(&mut self) {
        // Kept up to their last whole record, whether they reach ready/ now or at the next
        // start's recovery (a full disk may refuse a state file): noted first, one commit.
        let salvaged = self
            .broken
            .iter()
            .map(|(f, why)| Fact::Salvaged {
                id: f.id(),
                why: why.clone(),
                bytes: f.len(),
            })
            .collect();
        self.outcomes.note_all_durable(salvaged);
        for (f, why) in self.broken.drain(..) {
            let id = f.id();
            match self.spool.salvage(f, &why, now_ms()) {
                Ok(state) => {
                    tracing::warn!(recording = %id, bytes = state.size, "package kept up to the failed write; ready, unterminated");
                    let _ = self.ready.try_send(id);
                }
                Err(e) => {
                    tracing::error!(recording = %id, error = %e, "cannot move the package yet; recovery at the next start delivers it");
                }
            }
        }
    }

    /// Every call that ended in this round, sealed with a fixed number of syncs.
    fn finish_closed(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        for (id, r) in self
            .spool
            .finish_all(std::mem::take(&mut self.closing), now_ms())
        {
            match r {
                Ok(state) => {
                    tracing::debug!(recording = %id, bytes = state.size, "package ready");
                    let _ = self.ready.try_send(id);
                }
                Err(e) => {
                    tracing::error!(recording = %id, error = %e, "cannot finish package; recovery will deliver it");
                    Metrics::inc(&self.metrics.recordings_refused, "finish_error", 1);
                }
            }
        }
    }

    /// The session's counts into the metrics, at most every [`PUBLISH_EVERY`] (and at the
    /// stop).
    fn publish(&mut self, stop: bool) {
        if stop || (self.unpublished && self.last_publish.elapsed() >= PUBLISH_EVERY) {
            publish(
                &self.metrics,
                &self.outcomes,
                self.sessions.counters(),
                &mut self.published,
            );
            self.last_publish = Instant::now();
            self.unpublished = false;
        }
    }

    /// Waits for the commit in flight; the syncer thread goes.
    fn stop(self) {
        let Recorder {
            syncer, mut open, ..
        } = self;
        syncer.stop(&mut open);
    }
}

/// The journal position below which a chunk handed out while one datagram was handled
/// holds every entry of its port, for the `actions` that handling gave: `before` (the
/// datagram's own position: the chunk was handed out before it was taken), or, when those
/// actions end its recording without opening another (an RTCP BYE: the final chunk holds
/// it), `end` (the position after it). `0` (no mark) when the datagram admitted a
/// candidate: the datagrams it held were recorded then, and a chunk handed out among them
/// leaves later ones pending.
fn chunk_mark(
    actions: &[Action],
    before: u64,
    end: Option<u64>,
    took: bool,
    admitted: bool,
) -> u64 {
    let closed = actions.iter().any(|a| matches!(a, Action::Close { .. }))
        && !actions.iter().any(|a| matches!(a, Action::Open { .. }));
    match end {
        _ if admitted => 0,
        Some(end) if took && closed => end,
        _ => before,
    }
}

/// Adds what the session counted since the last call to the metrics.
/// Notes the conversation a metadata record names (`conversation_id`) for the manifests'
/// sealed index.
fn note_conversation(outcomes: &Outcomes, id: Uuid, json: &[u8]) {
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(json)
        && let Some(serde_json::Value::String(c)) = m.get("conversation_id")
    {
        outcomes.note_conversation(id, c);
    }
}

fn publish(m: &Metrics, outcomes: &Outcomes, now: &Counters, last: &mut Counters) {
    m.rtp_received.inc_by(now.rtp_packets - last.rtp_packets);
    m.rtp_lost
        .inc_by(now.rtp_lost.saturating_sub(last.rtp_lost));
    m.rtp_duplicate
        .inc_by(now.rtp_duplicates - last.rtp_duplicates);
    m.rtp_reordered
        .inc_by(now.rtp_reordered - last.rtp_reordered);
    m.rtcp.inc_by(now.rtcp_packets - last.rtcp_packets);
    m.rtp_paused.inc_by(now.rtp_paused - last.rtp_paused);
    m.recordings_started.inc_by(now.started - last.started);
    for (reason, n) in &now.refused {
        let before = last.refused.get(reason).copied().unwrap_or(0);
        if *n > before {
            Metrics::inc(&m.recordings_refused, reason, n - before);
            outcomes.note(Fact::Refused {
                reason: (*reason).to_string(),
                count: n - before,
            });
        }
    }
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

/// What waits for a package that is still being made.
enum Pending {
    Record(Kind, Vec<u8>, Option<(u16, u64)>),
    Close(EndReason),
}

/// Seals a record (a media chunk or metadata) into its package and appends it (whether it
/// did); a failed write ends the recording, and its package goes to `broken` with the
/// reason, to be kept up to its last whole record.
fn write_record(
    open: &mut HashMap<RecId, Open>,
    rec: RecId,
    kind: Kind,
    plaintext: &[u8],
    buf: &mut Vec<u8>,
    broken: &mut Vec<(ActiveFile, String)>,
    metrics: &Metrics,
) -> bool {
    let Some(o) = open.get_mut(&rec) else {
        return false;
    };
    buf.clear();
    let written = o
        .sealer
        .seal(kind, plaintext, buf)
        .map_err(|e| e.to_string())
        .and_then(|()| o.file.append(buf).map_err(|e| e.to_string()));
    match written {
        Ok(()) => {
            if kind == Kind::Media {
                metrics.chunks_written.inc();
            }
            true
        }
        Err(e) => {
            tracing::error!(recording = %o.id, error = %e, "write failed; recording ended");
            Metrics::inc(&metrics.recordings_ended, "write_error", 1);
            metrics.recordings_active.dec();
            if let Some(o) = open.remove(&rec) {
                broken.push((o.file, format!("write failed: {e}")));
            }
            false
        }
    }
}

/// Ends a recording: its end record goes into `closing`, finished with the others of the
/// round.
fn close(
    open: &mut HashMap<RecId, Open>,
    rec: RecId,
    reason: EndReason,
    closing: &mut Vec<(ActiveFile, Vec<u8>)>,
    metrics: &Metrics,
) {
    let Some(o) = open.remove(&rec) else {
        return;
    };
    metrics.recordings_active.dec();
    let mut end = Vec::new();
    o.sealer.finish(reason, now_ms(), &mut end);
    tracing::info!(recording = %o.id, reason = reason.name(), "recording ended");
    closing.push((o.file, end));
}

/// A package to make: a fresh data key wrapped to `keks` (an RSA operation) and its file in
/// `active/` (an inode allocation, slow on a busy file system).
struct OpenJob {
    rec: RecId,
    port: u16,
    keks: Arc<Vec<KekPublic>>,
    opts: SealOptions,
}

/// Why a package could not be made for a recording.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// The sealer refused the keys or options.
    #[error(transparent)]
    Seal(#[from] erec::Error),
    /// The spool file could not be made.
    #[error("spool: {0}")]
    Spool(#[from] std::io::Error),
}

/// Makes packages off the recorder's thread, so that a thousand calls starting in the same
/// second cost the recorder no time it needs for datagrams; chunks wait in memory meanwhile.
struct Opener {
    jobs: std::sync::mpsc::Sender<OpenJob>,
    done: Receiver<(RecId, u16, Result<Open, OpenError>)>,
}

impl Opener {
    fn start(spool: Spool) -> Opener {
        let (jobs, rx) = std::sync::mpsc::channel::<OpenJob>();
        let (tx, done) = std::sync::mpsc::channel();
        let work = move || {
            for job in rx {
                let made = Sealer::new(&job.keks, &job.opts)
                    .map_err(OpenError::from)
                    .and_then(|sealer| {
                        let id = sealer.recording_id();
                        let file = spool.create_unsynced(id, sealer.header_bytes())?;
                        Ok(Open { id, sealer, file })
                    });
                if tx.send((job.rec, job.port, made)).is_err() {
                    return;
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("opener".into())
            .spawn(work)
        {
            // Without the thread the jobs channel is closed: every open is refused, counted
            // and logged, and the recorder goes on.
            tracing::error!(error = %e, "cannot start the opener thread");
        }
        Opener { jobs, done }
    }
}

/// Marks the open ones of `recs` as needing a sync again.
fn unsynced(open: &mut HashMap<RecId, Open>, recs: &[RecId]) {
    for rec in recs {
        if let Some(o) = open.get_mut(rec) {
            o.file.mark_unsynced();
        }
    }
}

/// Carries out one group commit and times it.
fn run_job(spool: &Spool, job: SyncJob, metrics: &Metrics) -> std::io::Result<()> {
    let t = Instant::now();
    let r = match job {
        SyncJob::Fs => spool.sync_fs(),
        SyncJob::Files { files, dir } => files
            .iter()
            .try_for_each(std::fs::File::sync_data)
            .and_then(|()| if dir { spool.sync_active_dir() } else { Ok(()) }),
    };
    metrics.sync_duration.observe(t.elapsed().as_secs_f64());
    r
}

/// A group commit for the syncer thread.
enum SyncJob {
    /// `syncfs` of the spool's file system (many files dirty).
    Fs,
    /// `fdatasync` of each file, then of `active/` if `dir` (few files dirty).
    Files {
        files: Vec<std::fs::File>,
        dir: bool,
    },
}

/// The group commit, off the recorder's thread: a disk that takes a second to sync must not
/// stop the recorder from taking datagrams. One commit is in flight at a time; files written
/// meanwhile stay dirty for the next tick.
struct Syncer {
    jobs: SyncSender<SyncJob>,
    done: Receiver<std::io::Result<()>>,
    /// The recordings the commit in flight covers.
    in_flight: Option<Vec<RecId>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn start(spool: Spool, metrics: Arc<Metrics>) -> Syncer {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<SyncJob>(1);
        let (tx, done) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("syncer".into())
            .spawn(move || {
                for job in rx {
                    let r = run_job(&spool, job, &metrics);
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the syncer thread; syncing inline");
                None
            }
        };
        Syncer {
            jobs,
            done,
            in_flight: None,
            thread,
        }
    }

    /// Takes the result of a finished commit, if any: on failure the files it covered need
    /// a sync again.
    fn poll(&mut self, open: &mut HashMap<RecId, Open>) {
        let Some(covered) = &self.in_flight else {
            return;
        };
        match self.done.try_recv() {
            Ok(Ok(())) => {
                tracing::debug!(files = covered.len(), "synced");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "group commit failed; retrying at the next tick");
                unsynced(open, covered);
            }
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                tracing::error!("the syncer thread is gone; syncing inline from now on");
                unsynced(open, covered);
                self.thread = None;
            }
        }
        self.in_flight = None;
    }

    /// Starts a commit of every dirty package, unless one is in flight.
    fn commit(&mut self, spool: &Spool, open: &mut HashMap<RecId, Open>, metrics: &Metrics) {
        const PER_FILE_UP_TO: usize = 4;
        if self.in_flight.is_some() {
            return;
        }
        let dirty: Vec<RecId> = open
            .iter()
            .filter(|(_, o)| o.file.is_dirty())
            .map(|(r, _)| *r)
            .collect();
        if dirty.is_empty() {
            return;
        }
        let job = if dirty.len() > PER_FILE_UP_TO {
            SyncJob::Fs
        } else {
            let mut files = Vec::with_capacity(dirty.len());
            let mut dir = false;
            for rec in &dirty {
                let o = open.get_mut(rec).expect("listed above");
                match o.file.sync_handle() {
                    Ok(f) => files.push(f),
                    // No second handle (out of descriptors): a file-system sync covers it.
                    Err(_) => dir = true,
                }
                dir |= o.file.take_new_entry();
            }
            if files.len() < dirty.len() {
                SyncJob::Fs
            } else {
                SyncJob::Files { files, dir }
            }
        };
        for rec in &dirty {
            open.get_mut(rec).expect("listed above").file.mark_synced();
        }
        if self.thread.is_none() {
            // No thread: sync here.
            if let Err(e) = run_job(spool, job, metrics) {
                tracing::error!(error = %e, "sync failed");
                unsynced(open, &dirty);
            }
            return;
        }
        match self.jobs.try_send(job) {
            Ok(()) => self.in_flight = Some(dirty),
            Err(_) => unsynced(open, &dirty),
        }
    }

    /// Waits for the commit in flight and stops the thread.
    fn stop(mut self, open: &mut HashMap<RecId, Open>) {
        if self.in_flight.is_some()
            && let Ok(r) = self.done.recv()
            && r.is_err()
        {
            open.values_mut().for_each(|o| o.file.mark_unsynced());
        }
        drop(self.jobs);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::session::Tagged;
    use crate::appliance::spool::Place;
    use erec::keys::{KekPrivate, KeyRing};
    use erec::reader::{PackageReader, ReadMode};
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::mpsc::sync_channel;

    fn key(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/vectors")).join(name)
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 0];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend_from_slice(&[0x55; 160]);
        p
    }

    fn doc(k: &str, v: &str) -> Metadata {
        let mut m = Metadata::new();
        m.insert(k.into(), v.into());
        m
    }

    /// Limits for a test: an hour per recording unless `max_recording_us` says otherwise.
    fn limits(max_recording_us: u64) -> Limits {
        Limits {
            idle_timeout_us: 60_000_000,
            max_recording_us,
            flush_interval_us: 1_000_000,
            max_chunk: 65_536,
            min_packets: 1,
            starts_per_source: edgerec_net::rate_limit::Limit {
                rate: 1e9,
                burst: 1e9,
            },
            starts_per_port: edgerec_net::rate_limit::Limit {
                rate: 1e9,
                burst: 1e9,
            },
        }
    }

    /// A test recorder: its spool (and directory), its queue, the ids of the packages it
    /// makes ready, the thread.
    type TestRecorder = (
        tempfile::TempDir,
        Spool,
        SyncSender<Msg>,
        Receiver<Uuid>,
        std::thread::JoinHandle<()>,
    );

    /// A recorder thread on a fresh spool.
    fn recorder(limits: Limits) -> TestRecorder {
        recorder_carrying(limits, None)
    }

    /// [`recorder`], with a carry file and what the last process left in it.
    fn recorder_carrying(
        limits: Limits,
        carry: Option<(Carry, HashMap<u16, Carried>)>,
    ) -> TestRecorder {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let (metrics, _registry) = Metrics::new();
        let (tx, rx) = sync_channel(100);
        let (ready_tx, ready_rx) = sync_channel(100);
        let (recycle, _recycled) = sync_channel(16);
        let setup = RecorderSetup {
            spool: spool.clone(),
            keks: KekHandle::new(vec![
                KekPublic::from_file(&key("test-kek.pub.pem")).unwrap(),
            ]),
            wrap: Wrap::OaepSha256,
            limits,
            sync: true,
            ready: ready_tx,
            metrics,
            accepting: Arc::new(AtomicBool::new(true)),
            queued: Arc::new(AtomicUsize::new(0)),
            recycle,
            siprec: None,
            beat: Beat::new("recorder"),
            carry,
            epoch: Instant::now(),
            journal: None,
            outcomes: Outcomes::none(),
        };
        let t = std::thread::spawn(move || run(setup, rx));
        (dir, spool, tx, ready_rx, t)
    }

    /// The public metadata of a ready package (its header verified).
    fn public_metadata(spool: &Spool, id: Uuid) -> Metadata {
        let file = std::fs::File::open(spool.package_path(Place::Ready, id)).unwrap();
        let r = PackageReader::new(file, &ring(), ReadMode::Strict).unwrap();
        erec::format::parse_json_object(&r.header().metadata).unwrap()
    }

    fn ring() -> KeyRing {
        let mut ring = KeyRing::new();
        ring.add(KekPrivate::from_file(&key("test-kek.pem")).unwrap());
        ring
    }

    #[test]
    fn a_call_of_the_last_process_is_continued_only_from_the_source_that_started_it() {
        let (carry, _, _) = Carry::open(None).unwrap();
        let sbc: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let before = HashMap::from([(40_000, (a, sbc)), (40_002, (b, sbc))]);
        let (_dir, spool, tx, ready, t) =
            recorder_carrying(limits(3_600_000_000), Some((carry, before)));
        let mut batch = Batch::default();
        let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        for s in 0..3 {
            // The same caller on 40000; another one on 40002.
            batch.push(
                local(40_000),
                "10.0.0.1:5000".parse().unwrap(),
                Instant::now(),
                &rtp(s),
            );
            batch.push(
                local(40_002),
                "10.0.0.9:5000".parse().unwrap(),
                Instant::now(),
                &rtp(s),
            );
        }
        tx.send(Msg::Batch(batch)).unwrap();
        tx.send(Msg::Shutdown).unwrap();
        t.join().unwrap();
        let mut continues = HashMap::new();
        for id in ready.try_iter() {
            let public = public_metadata(&spool, id);
            continues.insert(
                public["port"].as_u64().unwrap(),
                public
                    .get("continues")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
            );
        }
        assert_eq!(continues[&40_000], Some(a.hyphenated().to_string()));
        assert_eq!(
            continues[&40_002], None,
            "another caller on the port is not chained"
        );
    }

    /// The journal's written mark of the chunks handed out while one datagram is handled.
    #[test]
    fn a_chunk_marks_the_datagrams_it_holds_and_no_more() {
        let (rec, rec2) = (RecId(1), RecId(2));
        let chunk = Action::Chunk {
            rec,
            plaintext: Vec::new(),
        };
        let close = Action::Close {
            rec,
            reason: EndReason::RtcpBye,
        };
        let open = Action::Open {
            rec: rec2,
            local: "127.0.0.1:40000".parse().unwrap(),
            continues: Some(rec),
            source: None,
            started_us: 0,
        };
        // Full, or split at the maximum duration: the datagram went into the next chunk or
        // the next recording.
        assert_eq!(
            chunk_mark(std::slice::from_ref(&chunk), 100, Some(200), true, false),
            100
        );
        let split = [chunk.clone(), close.clone(), open];
        assert_eq!(chunk_mark(&split, 100, Some(200), true, false), 100);
        // A BYE that ended its recording is in the final chunk.
        let bye = [chunk.clone(), close];
        assert_eq!(chunk_mark(&bye, 100, Some(200), true, false), 200);
        assert_eq!(chunk_mark(&bye, 100, Some(200), false, false), 100);
        // An admission: held datagrams may be left pending: no mark.
        assert_eq!(chunk_mark(&[chunk], 100, Some(200), true, true), 0);
    }

    #[test]
    fn a_maximum_duration_split_names_the_recording_it_continues() {
        let (_dir, spool, tx, ready, t) = recorder(limits(200_000));
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        for seqs in [0..3u16, 3..6] {
            let mut b = Batch::default();
            for s in seqs {
                b.push(local, remote, Instant::now(), &rtp(s));
            }
            tx.send(Msg::Batch(b)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        tx.send(Msg::Shutdown).unwrap();
        t.join().unwrap();
        let mut ids: Vec<Uuid> = ready.try_iter().collect();
        // UUIDv7: in the order they were made.
        ids.sort();
        assert!(ids.len() >= 2, "split at least once: {ids:?}");
        let public = |id: Uuid| public_metadata(&spool, id);
        assert_eq!(public(ids[0]).get("continues"), None);
        for w in ids.windows(2) {
            assert_eq!(
                public(w[1])["continues"],
                w[0].hyphenated().to_string(),
                "each successor names its predecessor"
            );
        }
    }

    #[test]
    fn metadata_before_and_during_a_call_is_sealed_in_order_with_its_media() {
        let (_dir, spool, tx, ready_rx, t) = recorder(limits(3_600_000_000));
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let tag = |d: Metadata| {
            let (reply, answer) = sync_channel(1);
            tx.send(Msg::Metadata {
                port: 40000,
                doc: d,
                reply: Some(reply),
            })
            .unwrap();
            answer.recv().unwrap()
        };
        let media = |seqs: std::ops::Range<u16>| {
            let mut b = Batch::default();
            for s in seqs {
                b.push(local, remote, Instant::now(), &rtp(s));
            }
            tx.send(Msg::Batch(b)).unwrap();
        };
        assert_eq!(tag(doc("conversation_id", "c1")), Tagged::Held);
        media(0..3);
        // Very likely while the package is still being made: the record waits for it.
        assert_eq!(tag(doc("agent", "a1")), Tagged::Now);
        media(3..5);
        tx.send(Msg::Shutdown).unwrap();
        t.join().unwrap();

        let id = ready_rx.try_recv().unwrap();
        let ring = ring();
        let file = std::fs::File::open(spool.package_path(Place::Ready, id)).unwrap();
        let mut r = PackageReader::new(file, &ring, ReadMode::Strict).unwrap();
        let mut kinds = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            kinds.push(rec.kind);
        }
        assert_eq!(
            kinds,
            [Kind::Metadata, Kind::Media, Kind::Metadata, Kind::Media]
        );
        assert_eq!(r.metadata()["conversation_id"], "c1");
        assert_eq!(r.metadata()["agent"], "a1");
    }

    #[test]
    fn a_siprec_record_never_outgrows_a_record_however_large_the_metadata() {
        use crate::siprec::srs::{CallInfo, MediaStream};
        let call = CallInfo {
            call_id: "c".into(),
            from: "<sip:a@b>".into(),
            to: "<sip:c@d>".into(),
            conversation_id: Some("conv".into()),
        };
        let streams = [MediaStream {
            index: 0,
            label: Some("1".into()),
            port: Some(40_000),
            sources: Vec::new(),
            paused: false,
            payload_types: vec![(0, "PCMU/8000".into())],
            srtp: None,
        }];
        let big = (
            serde_json::json!({"participants": ["x".repeat(50_000)]}),
            "<".repeat(60_000),
        );
        let small = (
            serde_json::json!({"participants": []}),
            "<recording/>".to_string(),
        );
        let max = 64 << 10;
        let whole = siprec_json(&call, &streams, Some(&small), max);
        let doc: serde_json::Value = serde_json::from_slice(&whole).unwrap();
        assert_eq!(doc["siprec"]["xml"], "<recording/>");
        assert_eq!(doc["conversation_id"], "conv");
        let cut = siprec_json(&call, &streams, Some(&big), max);
        assert!(cut.len() <= max, "{}", cut.len());
        let doc: serde_json::Value = serde_json::from_slice(&cut).unwrap();
        assert_eq!(doc["siprec"]["xml_omitted"], true);
        assert_eq!(
            doc["siprec"]["call_id"], "c",
            "the call and its streams stay"
        );
        let tiny = siprec_json(&call, &streams, Some(&big), 4096);
        assert!(tiny.len() <= 4096);
        let doc: serde_json::Value = serde_json::from_slice(&tiny).unwrap();
        assert_eq!(doc["siprec"]["metadata_omitted"], true);
    }
}
