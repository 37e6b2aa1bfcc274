//! The outcome journal: what became of every recording and every refusal, one JSON line a
//! fact, in `{spool}/outcomes/YYYY-MM-DD.jsonl` (by the UTC day of the fact): a recording
//! started (its port, the recording it continues), ended (the reason), salvaged (cut by a
//! crash or a failed write, kept up to its last whole record), stored (object key, size,
//! SHA-256), failed (the store refused it, or it used up its attempts); refusals counted per
//! reason and second. `edgerec calls list|show` reads it ([`read`], [`fold`]).
//!
//! Written by one thread: the recorder, the uploader and the start-up's recovery hand it
//! facts ([`Outcomes::note`]); it appends them and commits (flush, and `fdatasync` when the
//! spool syncs) once a flush interval, as the spool does its records. Files older than
//! `[outcomes] keep_days` are removed. Each day's file keeps [`RESERVE`] bytes allocated
//! ahead of its end, so that the refusals of a full disk are still written.
//!
//! Invariants: operational facts only — ids, ports, times, sizes, digests, reasons — never
//! media, metadata, addresses or keys. Append-only: a line is never rewritten; a line torn by
//! a crash is skipped by the reader, and the next process starts on a fresh line. A flood of
//! refusals is at most one line per reason and second. Files 0600 in a 0700 directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::appliance::metrics::Metrics;
use erec::clock::{Utc, now_ms};

/// A fact about a recording, or a count of refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Fact {
    /// A recording began (its package exists).
    Started {
        /// The recording id.
        id: Uuid,
        /// Its port (0 for a file of the inbox).
        port: u16,
        /// The recording it continues (a restart, the maximum duration).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        continues: Option<Uuid>,
    },
    /// It ended, and why (`idle_timeout`, `rtcp_bye`, `max_duration`, `shutdown`, …).
    Ended {
        /// The recording id.
        id: Uuid,
        /// The end reason.
        reason: String,
    },
    /// It was kept up to its last whole record without an end (a crash, a failed write).
    Salvaged {
        /// The recording id.
        id: Uuid,
        /// Why.
        why: String,
        /// Bytes kept.
        bytes: u64,
    },
    /// It is in the store.
    Stored {
        /// The recording id.
        id: Uuid,
        /// Its object key.
        key: String,
        /// Its size.
        bytes: u64,
        /// Its SHA-256, hex.
        sha256: String,
    },
    /// The store refused it, or it used up its attempts: it waits in `failed/`.
    Failed {
        /// The recording id.
        id: Uuid,
        /// Why.
        reason: String,
    },
    /// Recordings refused in one second, for one reason (`spool_full`, `kek_stale`, …).
    Refused {
        /// Why.
        reason: String,
        /// How many.
        count: u64,
    },
}

impl Fact {
    /// Its name, as in the journal and the metric.
    pub fn name(&self) -> &'static str {
        match self {
            Fact::Started { .. } => "started",
            Fact::Ended { .. } => "ended",
            Fact::Salvaged { .. } => "salvaged",
            Fact::Stored { .. } => "stored",
            Fact::Failed { .. } => "failed",
            Fact::Refused { .. } => "refused",
        }
    }

    /// The recording it is about, if one.
    pub fn id(&self) -> Option<Uuid> {
        match self {
            Fact::Started { id, .. }
            | Fact::Ended { id, .. }
            | Fact::Salvaged { id, .. }
            | Fact::Stored { id, .. }
            | Fact::Failed { id, .. } => Some(*id),
            Fact::Refused { .. } => None,
        }
    }
}

/// One line of the journal: when, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// When (ms since the epoch; for refusals, the start of their second).
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub fact: Fact,
}

/// Refusals of the same reason and second, added up before they are written.
#[derive(Debug, Default)]
pub struct Refusals {
    pending: BTreeMap<(u64, String), u64>,
}

impl Refusals {
    /// `count` refusals for `reason` at `at_ms`.
    pub fn add(&mut self, at_ms: u64, reason: &str, count: u64) {
        *self
            .pending
            .entry((at_ms / 1000, reason.to_string()))
            .or_default() += count;
    }

    /// The lines of the seconds before `now_ms`'s (all of them with `all`), taken out.
    pub fn due(&mut self, now_ms: u64, all: bool) -> Vec<Line> {
        let now_s = now_ms / 1000;
        let keep = self
            .pending
            .split_off(&(if all { u64::MAX } else { now_s }, String::new()));
        std::mem::replace(&mut self.pending, keep)
            .into_iter()
            .map(|((s, reason), count)| Line {
                at_ms: s * 1000,
                fact: Fact::Refused { reason, count },
            })
            .collect()
    }
}

/// Where the journal of a spool lives.
pub fn dir_of(spool_dir: &Path) -> PathBuf {
    spool_dir.join("outcomes")
}

fn file_of(dir: &Path, at_ms: u64) -> (String, PathBuf) {
    let d = Utc::from_unix_ms(at_ms);
    let day = format!("{:04}-{:02}-{:02}", d.year, d.month, d.day);
    let path = dir.join(format!("{day}.jsonl"));
    (day, path)
}

/// How the journal is written.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `{spool}/outcomes`.
    pub dir: PathBuf,
    /// Days of files kept.
    pub keep_days: u32,
    /// How often what was noted is committed (the spool's flush interval).
    pub commit_every: Duration,
    /// Whether a commit syncs (`recorder.sync = "data"`).
    pub sync: bool,
}

/// What the writer is handed: a line, and for a durable one who waits for its commit (told
/// whether it succeeded).
/// No line: a commit of what was noted before (see [`Outcomes::commit`]).
type Msg = (Option<Line>, Option<SyncSender<bool>>);

/// The handle the appliance's threads note facts through; [`Outcomes::stop`] commits the
/// rest.
#[derive(Clone)]
pub struct Outcomes {
    tx: Option<SyncSender<Msg>>,
    metrics: Option<Arc<Metrics>>,
    /// Told when the writer has committed the last line and returned.
    finished: Option<Arc<std::sync::Mutex<Receiver<()>>>>,
    /// Conversation ids of recordings, noted in memory only (never in the journal's
    /// plaintext) until a manifest, sealed, carries them.
    conversations: Arc<std::sync::Mutex<Conversations>>,
}

/// Conversation ids waiting for the next manifest, at most [`MAX_WAITING_CONVERSATIONS`]
/// (beyond, a recording's is not kept: it is found by decrypting, not by the index).
#[derive(Default)]
struct Conversations {
    by_recording: std::collections::BTreeMap<Uuid, String>,
    dropped: u64,
    /// Since when this process keeps them (ms).
    since_ms: u64,
}

/// Conversation ids held for the next manifest at most (about 30 MB at the longest ids).
pub const MAX_WAITING_CONVERSATIONS: usize = 100_000;

/// The longest conversation id kept for the index, in characters (as an inbox sidecar's;
/// longer ones are not indexed).
pub const MAX_CONVERSATION_ID: usize = 256;

/// Bytes kept allocated past the end of the day's file (`fallocate`, size unchanged): about
/// 4,000 lines written while the spool's file system is full.
pub const RESERVE: u64 = 1 << 20;

/// How long [`Outcomes::note_durable`] waits for its commit at most.
pub const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// Facts waiting for the writer at most; beyond, a fact is lost and counted
/// (`edgerec_outcomes_total{outcome="lost"}`): the recorder never waits for the journal.
const QUEUE: usize = 65_536;

impl Outcomes {
    /// A handle that notes nothing (tests of the parts that take one).
    #[cfg(test)]
    pub fn none() -> Outcomes {
        Outcomes {
            tx: None,
            metrics: None,
            finished: None,
            conversations: Arc::default(),
        }
    }

    /// Starts the writer thread.
    pub fn start(settings: Settings, metrics: Arc<Metrics>) -> io::Result<Outcomes> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.dir)?;
        remove_old(&settings.dir, settings.keep_days, now_ms());
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let (finish, finished) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("outcomes".into())
            .spawn(move || {
                write_loop(&settings, &rx);
                let _ = finish.send(());
            })?;
        Ok(Outcomes {
            tx: Some(tx),
            metrics: Some(metrics),
            finished: Some(Arc::new(std::sync::Mutex::new(finished))),
            conversations: Arc::new(std::sync::Mutex::new(Conversations {
                since_ms: now_ms(),
                ..Conversations::default()
            })),
        })
    }

    /// Since when this process keeps conversations (ms): a recording begun before then, in
    /// another process, may have lost its conversation with that process.
    pub fn conversations_since_ms(&self) -> u64 {
        self.conversations.lock().map_or(u64::MAX, |c| c.since_ms)
    }

    /// Notes the conversation a recording belongs to, in memory, for the next manifest (its
    /// sealed index); a later one for the same recording replaces it. Called before the
    /// recording's end is noted, so a manifest that holds the end holds its conversation.
    pub fn note_conversation(&self, id: Uuid, conversation: &str) {
        if conversation.is_empty() || conversation.chars().count() > MAX_CONVERSATION_ID {
            return;
        }
        let Ok(mut c) = self.conversations.lock() else {
            return;
        };
        if c.by_recording.len() >= MAX_WAITING_CONVERSATIONS && !c.by_recording.contains_key(&id) {
            c.dropped += 1;
            return;
        }
        c.by_recording.insert(id, conversation.to_string());
    }

    /// The conversations noted and not yet in a manifest, and how many could not be kept
    /// since the last manifest.
    pub fn conversations(&self) -> (Vec<(Uuid, String)>, u64) {
        match self.conversations.lock() {
            Ok(c) => (
                c.by_recording
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect(),
                c.dropped,
            ),
            Err(_) => (Vec::new(), 0),
        }
    }

    /// Forgets the conversations a manifest now carries (unless changed since).
    pub fn forget_conversations(&self, carried: &[(Uuid, String)], dropped: u64) {
        if let Ok(mut c) = self.conversations.lock() {
            for (id, conv) in carried {
                if c.by_recording.get(id) == Some(conv) {
                    c.by_recording.remove(id);
                }
            }
            c.dropped = c.dropped.saturating_sub(dropped);
        }
    }

    /// Notes a fact, now; committed with the others of its flush interval (a `kill -9`
    /// before that loses it).
    pub fn note(&self, fact: Fact) {
        self.send(fact, None);
    }

    /// Notes a fact and returns once it is committed, with whether it was: for a fact the
    /// spool will not tell again after a crash (a package stored and removed from the spool,
    /// moved to `failed/`, salvaged). Waits at most [`DURABLE_WAIT`]; a fact not committed
    /// by then is counted `lost` (the caller goes on: delivering a recording comes before
    /// noting it).
    pub fn note_durable(&self, fact: Fact) -> bool {
        if self.tx.is_none() {
            return true; // no journal: nothing to wait for
        }
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let committed =
            self.send(fact, Some(done)) && wait.recv_timeout(DURABLE_WAIT).unwrap_or(false);
        if !committed {
            self.count("lost", 1);
        }
        committed
    }

    /// Commits what was noted before (and the refusals of the seconds before this one);
    /// returns once it is, with whether it was. What a manifest is made of is read after.
    pub fn commit(&self) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        tx.try_send((None, Some(done))).is_ok() && wait.recv_timeout(DURABLE_WAIT).unwrap_or(false)
    }

    /// Notes every fact of `facts`, committed together before it returns (one sync); whether
    /// they were.
    pub fn note_all_durable(&self, facts: Vec<Fact>) -> bool {
        let mut facts = facts;
        let Some(last) = facts.pop() else {
            return true;
        };
        for f in facts {
            self.note(f);
        }
        self.note_durable(last)
    }

    /// Hands a fact to the writer; whether it took it.
    fn send(&self, fact: Fact, done: Option<SyncSender<bool>>) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let (name, n) = match &fact {
            Fact::Refused { count, .. } => ("refused", *count),
            f => (f.name(), 1),
        };
        let line = Line {
            at_ms: now_ms(),
            fact,
        };
        let (name, took) = match tx.try_send((Some(line), done)) {
            Ok(()) => (name, true),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => ("lost", false),
        };
        self.count(name, n);
        took
    }

    /// Counts `n` facts of `outcome` in `edgerec_outcomes_total`.
    fn count(&self, outcome: &str, n: u64) {
        if let Some(m) = &self.metrics {
            m.outcomes
                .get_or_create(&crate::appliance::metrics::UploadOutcome {
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
    }

    /// Commits what was noted and stops the writer, once every other handle is gone too
    /// (the appliance's threads have stopped by then); waits at most [`DURABLE_WAIT`], so a
    /// handle left somewhere never holds the stop up.
    pub fn stop(mut self) {
        self.tx = None;
        if let Some(f) = self.finished.take()
            && let Ok(f) = f.lock()
            && f.recv_timeout(DURABLE_WAIT).is_err()
        {
            tracing::warn!("the outcome journal's writer did not finish in time");
        }
    }
}

/// The writer: appends each line to its day's file, adds up refusals, commits every
/// `commit_every`, when a durable fact waits (after taking what else is queued, so one sync
/// serves them all), and when the last handle goes; tells each durable fact's noter whether
/// its commit succeeded.
fn write_loop(s: &Settings, rx: &Receiver<Msg>) {
    let mut file: Option<(String, BufWriter<File>)> = None;
    let mut reserved_to = 0u64;
    let mut refusals = Refusals::default();
    let (mut dirty, mut failed) = (false, false);
    let mut waiting: Vec<SyncSender<bool>> = Vec::new();
    let mut last_commit = std::time::Instant::now();
    let mut force_sync = false;
    // Lines go to the file of the day they are written (never an earlier one than the last:
    // a manifest reads the days in order, after where it stopped).
    let mut last_day = newest_day(&s.dir);
    loop {
        let mut got = rx.recv_timeout(s.commit_every.saturating_sub(last_commit.elapsed()));
        let mut done = false;
        // Everything already queued goes into this commit.
        for _ in 0..QUEUE {
            match got {
                Ok((
                    Some(Line {
                        at_ms,
                        fact: Fact::Refused { reason, count },
                    }),
                    _,
                )) => refusals.add(at_ms, &reason, count),
                Ok((None, wait)) => {
                    // A manifest reads up to here next: on disk whatever `sync` says, so
                    // that no crash takes back a line a manifest holds.
                    force_sync = true;
                    dirty |= file.is_some();
                    waiting.extend(wait);
                }
                Ok((Some(line), wait)) => {
                    match append(s, &mut file, (&mut reserved_to, &mut last_day), &line) {
                        true => dirty = true,
                        false => failed = true,
                    }
                    waiting.extend(wait);
                }
                Err(RecvTimeoutError::Disconnected) => done = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            got = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    done = true;
                    break;
                }
            };
        }
        if done || !waiting.is_empty() || last_commit.elapsed() >= s.commit_every {
            for line in refusals.due(now_ms(), done) {
                dirty |= append(s, &mut file, (&mut reserved_to, &mut last_day), &line);
            }
            if dirty && let Some((_, w)) = file.as_mut() {
                let committed = w.flush().and_then(|()| {
                    if s.sync || force_sync {
                        w.get_ref().sync_data()
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = committed {
                    tracing::error!(error = %e, "cannot commit the outcome journal");
                    failed = true;
                }
                dirty = false;
                reserve(w.get_ref(), &mut reserved_to);
            }
            last_commit = std::time::Instant::now();
            force_sync = false;
            for w in waiting.drain(..) {
                let _ = w.try_send(!failed);
            }
            failed = false;
        }
        if done {
            if let Some((_, w)) = file.take() {
                release(w);
            }
            return;
        }
    }
}

/// A day's file is done with: what it holds is committed and the room reserved past its end
/// is given back.
fn release(mut w: BufWriter<File>) {
    let _ = w.flush();
    let f = w.get_ref();
    if let Ok(len) = f.metadata().map(|m| m.len()) {
        // Blocks allocated past the end go with a truncation to the size it has.
        let _ = f.set_len(len).and_then(|()| f.sync_data());
    }
}

/// The newest day a file of the journal in `dir` is of, if any.
fn newest_day(dir: &Path) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let day = name.strip_suffix(".jsonl")?;
            (day.len() == 10).then(|| day.to_string())
        })
        .max()
}

/// Appends one line to the file of the day it is written (opened, and the old days removed,
/// at a new day; never a day before `last_day`, whatever the clock says); whether anything
/// was written.
fn append(
    s: &Settings,
    file: &mut Option<(String, BufWriter<File>)>,
    (reserved_to, last_day): (&mut u64, &mut Option<String>),
    line: &Line,
) -> bool {
    let (today, _) = file_of(&s.dir, now_ms());
    let day = match last_day.take() {
        Some(last) if last > today => last,
        _ => today,
    };
    *last_day = Some(day.clone());
    let path = s.dir.join(format!("{day}.jsonl"));
    if file.as_ref().is_none_or(|(d, _)| *d != day) {
        if let Some((_, old)) = file.take() {
            release(old);
        }
        match open_day(&path) {
            Ok(f) => {
                *reserved_to = 0;
                reserve(&f, reserved_to);
                *file = Some((day, BufWriter::new(f)))
            }
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot open the outcome journal");
                return false;
            }
        }
        remove_old(&s.dir, s.keep_days, now_ms());
    }
    let Some((_, w)) = file.as_mut() else {
        return false;
    };
    let mut bytes = serde_json::to_vec(line).expect("a line always serializes");
    bytes.push(b'\n');
    if let Err(e) = w.write_all(&bytes) {
        tracing::error!(error = %e, "cannot write the outcome journal");
        return false;
    }
    true
}

/// A day's file for appending (0600); one a crash left without its last newline gets one,
/// so the torn line stays alone.
fn open_day(path: &Path) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
        }
    }
    Ok(f)
}

/// Keeps [`RESERVE`] bytes allocated past the file's end once half of the last reservation
/// is used (a file system that cannot, or is full, is left as it is: logged once a day).
fn reserve(f: &File, reserved_to: &mut u64) {
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    if len + RESERVE / 2 < *reserved_to {
        return;
    }
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, len, RESERVE) {
        Ok(()) => *reserved_to = len + RESERVE,
        Err(e) => {
            if *reserved_to == 0 {
                tracing::warn!(error = %e, "cannot reserve room for the outcome journal");
            }
            // Not tried again until as much more is written.
            *reserved_to = len + RESERVE / 2 + 1;
        }
    }
}

/// Removes the days' files older than `keep_days` before `now_ms`.
fn remove_old(dir: &Path, keep_days: u32, now_ms: u64) {
    let (oldest, _) = file_of(
        dir,
        now_ms.saturating_sub(u64::from(keep_days) * 86_400_000),
    );
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(day) = name.strip_suffix(".jsonl")
            && day.len() == 10
            && *day < *oldest.as_str()
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Every line of the journal, day by day in file order; a line that does not parse (torn by
/// a crash) is skipped and counted.
pub fn read(dir: &Path) -> io::Result<(Vec<Line>, usize)> {
    let mut days: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jsonl"))
                .is_some()
        })
        .collect();
    days.sort();
    let (mut lines, mut torn) = (Vec::new(), 0);
    for day in days {
        let f = match File::open(&day) {
            Ok(f) => f,
            // Removed by the retention meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut r = io::BufReader::new(f);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            // Bytes, not text: a line torn inside a character is skipped like any other.
            match serde_json::from_slice::<Line>(buf.trim_ascii_end()) {
                Ok(line) => lines.push(line),
                Err(_) if buf.trim_ascii().is_empty() => {}
                Err(_) => torn += 1,
            }
        }
    }
    Ok((lines, torn))
}

/// A place in the journal: a day's file and a byte offset in it, just after a whole line.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cursor {
    /// The day (`YYYY-MM-DD`; empty: before the first).
    pub day: String,
    /// Bytes of that day's file already read.
    pub offset: u64,
}

/// The whole lines written after `from` (a line still being written is left for the next
/// read), the lines that do not parse among them, and the cursor after the last whole one.
pub fn read_after(dir: &Path, from: &Cursor) -> io::Result<(Vec<Line>, usize, Cursor)> {
    let mut days: Vec<String> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let day = name.strip_suffix(".jsonl")?;
            (day.len() == 10 && *day >= *from.day.as_str()).then(|| day.to_string())
        })
        .collect();
    days.sort();
    let (mut lines, mut torn, mut at) = (Vec::new(), 0, from.clone());
    for day in days {
        let mut f = match File::open(dir.join(format!("{day}.jsonl"))) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let start = if day == from.day { from.offset } else { 0 };
        f.seek(SeekFrom::Start(start))?;
        let mut r = io::BufReader::new(f);
        let (mut buf, mut offset) = (Vec::new(), start);
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf)?;
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            offset += n as u64;
            match serde_json::from_slice::<Line>(buf.trim_ascii_end()) {
                Ok(line) => lines.push(line),
                Err(_) if buf.trim_ascii().is_empty() => {}
                Err(_) => torn += 1,
            }
        }
        at = Cursor { day, offset };
    }
    Ok((lines, torn, at))
}

/// A fact of a [`Call`] with its time: `{"at_ms": …, "outcome": …, …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct When<T> {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub what: T,
}

/// What the journal says of one recording.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Call {
    /// The recording id.
    pub id: Uuid,
    /// Its port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// When it started (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// The recording it continues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continues: Option<Uuid>,
    /// When and why it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<When<Fact>>,
    /// When and why it was salvaged, and the bytes kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salvaged: Option<When<Fact>>,
    /// When it was stored, its object key, size and SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<When<Fact>>,
    /// When and why it failed (the last time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<When<Fact>>,
    /// What became of it: `recording`, `spooled` (ended, not yet stored), `stored`,
    /// `failed`.
    pub outcome: &'static str,
}

impl Call {
    fn settle(&mut self) {
        let stored_after_failing = match (&self.stored, &self.failed) {
            (Some(s), Some(f)) => s.at_ms >= f.at_ms,
            (Some(_), None) => true,
            _ => false,
        };
        self.outcome = if stored_after_failing {
            "stored"
        } else if self.failed.is_some() {
            "failed"
        } else if self.ended.is_some() || self.salvaged.is_some() {
            "spooled"
        } else {
            "recording"
        };
    }

    /// When the journal first names it: its start, or (a start lost to a crash) its
    /// earliest other fact.
    pub fn first_ms(&self) -> u64 {
        self.started_ms
            .into_iter()
            .chain(
                [&self.ended, &self.salvaged, &self.stored, &self.failed]
                    .into_iter()
                    .flatten()
                    .map(|w| w.at_ms),
            )
            .min()
            .unwrap_or(0)
    }

    /// Whether it matches an `--outcome` filter (its outcome, or `salvaged`).
    pub fn is(&self, outcome: &str) -> bool {
        self.outcome == outcome || (outcome == "salvaged" && self.salvaged.is_some())
    }
}

/// The journal's lines folded into one [`Call`] per recording (in order of first mention)
/// and the refusals as they are.
pub fn fold(lines: Vec<Line>) -> (Vec<Call>, Vec<Line>) {
    let mut calls: Vec<Call> = Vec::new();
    let mut index: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    let mut refusals = Vec::new();
    for line in lines {
        let Some(id) = line.fact.id() else {
            refusals.push(line);
            continue;
        };
        let i = *index.entry(id).or_insert_with(|| {
            calls.push(Call {
                id,
                ..Call::default()
            });
            calls.len() - 1
        });
        let c = &mut calls[i];
        let at_ms = line.at_ms;
        let slot = match &line.fact {
            Fact::Started {
                port, continues, ..
            } => {
                c.port = Some(*port);
                c.started_ms = Some(at_ms);
                c.continues = *continues;
                continue;
            }
            Fact::Ended { .. } => &mut c.ended,
            Fact::Salvaged { .. } => &mut c.salvaged,
            Fact::Stored { .. } => &mut c.stored,
            Fact::Failed { .. } => &mut c.failed,
            Fact::Refused { .. } => continue,
        };
        *slot = Some(When {
            at_ms,
            what: line.fact,
        });
    }
    for c in &mut calls {
        c.settle();
    }
    (calls, refusals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_wait_in_memory_bounded_until_a_manifest_carries_them() {
        let o = Outcomes::none();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        o.note_conversation(a, "c-1");
        o.note_conversation(b, "");
        o.note_conversation(b, &"x".repeat(MAX_CONVERSATION_ID + 1));
        let (taken, dropped) = o.conversations();
        assert_eq!(taken, [(a, "c-1".to_string())]);
        assert_eq!(dropped, 0);
        // Relabelled after the snapshot: the new label waits for the next manifest.
        o.note_conversation(a, "c-2");
        o.forget_conversations(&taken, dropped);
        assert_eq!(o.conversations().0, [(a, "c-2".to_string())]);
        o.forget_conversations(&o.conversations().0, 0);
        assert!(o.conversations().0.is_empty());
        for i in 0..MAX_WAITING_CONVERSATIONS as u128 + 5 {
            o.note_conversation(Uuid::from_u128(100 + i), "c");
        }
        let (taken, dropped) = o.conversations();
        assert_eq!((taken.len(), dropped), (MAX_WAITING_CONVERSATIONS, 5));
        o.forget_conversations(&taken, dropped);
        assert_eq!(o.conversations(), (Vec::new(), 0));
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_flood_of_refusals_is_a_line_per_reason_and_second() {
        let mut r = Refusals::default();
        for i in 0..10_000u64 {
            r.add(
                5_000 + i % 2_000,
                if i % 3 == 0 {
                    "kek_stale"
                } else {
                    "spool_full"
                },
                1,
            );
        }
        let due = r.due(6_500, false);
        assert_eq!(due.len(), 2, "the second 5 of both reasons: {due:?}");
        assert!(due.iter().all(|l| l.at_ms == 5_000));
        let total: u64 = due
            .iter()
            .map(|l| match &l.fact {
                Fact::Refused { count, .. } => *count,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 5_000);
        assert_eq!(r.due(6_500, true).len(), 2, "the second 6 at the stop");
        assert!(r.due(99_000, true).is_empty());
    }

    #[test]
    fn the_lines_of_a_recording_fold_into_its_outcome() {
        let line = |at_ms, fact| Line { at_ms, fact };
        let lines = vec![
            line(
                1,
                Fact::Started {
                    id: id(1),
                    port: 40_000,
                    continues: None,
                },
            ),
            line(
                2,
                Fact::Started {
                    id: id(2),
                    port: 40_002,
                    continues: Some(id(9)),
                },
            ),
            line(
                3,
                Fact::Refused {
                    reason: "spool_full".into(),
                    count: 4,
                },
            ),
            line(
                4,
                Fact::Ended {
                    id: id(1),
                    reason: "rtcp_bye".into(),
                },
            ),
            line(
                5,
                Fact::Failed {
                    id: id(1),
                    reason: "403".into(),
                },
            ),
            line(
                6,
                Fact::Salvaged {
                    id: id(2),
                    why: "recovered after a crash".into(),
                    bytes: 9,
                },
            ),
            line(
                7,
                Fact::Stored {
                    id: id(1),
                    key: "k".into(),
                    bytes: 10,
                    sha256: "ab".into(),
                },
            ),
            line(
                8,
                Fact::Started {
                    id: id(3),
                    port: 40_004,
                    continues: None,
                },
            ),
        ];
        let (calls, refused) = fold(lines);
        assert_eq!(refused.len(), 1);
        let outcomes: Vec<(Uuid, &str)> = calls.iter().map(|c| (c.id, c.outcome)).collect();
        assert_eq!(
            outcomes,
            [(id(1), "stored"), (id(2), "spooled"), (id(3), "recording")]
        );
        assert!(calls[1].is("salvaged") && calls[1].continues == Some(id(9)));
    }

    #[test]
    fn a_durable_fact_is_on_disk_when_noting_it_returns_and_the_stop_commits_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (metrics, _) = Metrics::new();
        let o = Outcomes::start(
            Settings {
                dir: dir.path().join("outcomes"),
                keep_days: 30,
                // Longer than the test: only the durable fact and the stop commit.
                commit_every: Duration::from_secs(3600),
                sync: false,
            },
            metrics,
        )
        .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode(&dir.path().join("outcomes")), 0o700);
        o.note(Fact::Started {
            id: id(1),
            port: 40_000,
            continues: None,
        });
        o.note(Fact::Refused {
            reason: "spool_full".into(),
            count: 3,
        });
        assert!(o.note_durable(Fact::Stored {
            id: id(1),
            key: "2026/12/01/x.erec".into(),
            bytes: 10,
            sha256: "ab".into(),
        }));
        let (lines, _) = read(&dir.path().join("outcomes")).unwrap();
        let names: Vec<&str> = lines.iter().map(|l| l.fact.name()).collect();
        assert_eq!(
            names,
            ["started", "stored"],
            "the start went with the durable commit"
        );
        o.stop();
        let (lines, _) = read(&dir.path().join("outcomes")).unwrap();
        assert_eq!(lines.len(), 3, "the refusal at the stop");
        let day = fs::read_dir(dir.path().join("outcomes"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(mode(&day.path()), 0o600);
    }

    #[test]
    fn lines_round_trip_and_a_torn_line_is_skipped_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings {
            dir: dir.path().to_path_buf(),
            keep_days: 30,
            commit_every: Duration::from_millis(10),
            sync: false,
        };
        let at = 1_796_083_200_000; // 2026-12-01
        let first = Line {
            at_ms: at,
            fact: Fact::Ended {
                id: id(1),
                reason: "idle_timeout".into(),
            },
        };
        let (mut file, mut reserved, mut last_day) = (None, 0, None);
        assert!(append(
            &s,
            &mut file,
            (&mut reserved, &mut last_day),
            &first
        ));
        file.take().unwrap().1.flush().unwrap();
        // Filed by the day it is written, whatever its time.
        let (_, path) = file_of(dir.path(), now_ms());
        assert!(path.exists());
        // A crash mid-line, then the next process appends.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"at_ms\":17").unwrap();
        let second = Line {
            at_ms: at + 1,
            fact: Fact::Failed {
                id: id(1),
                reason: "gave up".into(),
            },
        };
        assert!(append(
            &s,
            &mut file,
            (&mut reserved, &mut last_day),
            &second
        ));
        file.take().unwrap().1.flush().unwrap();
        let (lines, torn) = read(dir.path()).unwrap();
        assert_eq!(lines, [first.clone(), second.clone()]);
        assert_eq!(torn, 1);
        // Read after a place: whole lines only; one being written waits for the next read.
        let (after, _, cursor) = read_after(dir.path(), &Cursor::default()).unwrap();
        assert_eq!(after, [first, second.clone()]);
        f.write_all(b"\n").unwrap();
        let mut partial = serde_json::to_vec(&second).unwrap();
        f.write_all(&partial[..10]).unwrap();
        assert!(read_after(dir.path(), &cursor).unwrap().0.is_empty());
        partial.push(b'\n');
        f.write_all(&partial[10..]).unwrap();
        let (after, _, _) = read_after(dir.path(), &cursor).unwrap();
        assert_eq!(after.len(), 1, "the line, once whole");
        // A clock set back never files a line before the newest day.
        let later = dir.path().join("2999-01-01.jsonl");
        fs::write(&later, "").unwrap();
        let mut last_day = newest_day(dir.path());
        assert!(append(
            &s,
            &mut file,
            (&mut reserved, &mut last_day),
            &second
        ));
        file.take().unwrap().1.flush().unwrap();
        assert!(fs::metadata(&later).unwrap().len() > 0);
        // A day past keep_days goes.
        fs::write(dir.path().join("2026-10-01.jsonl"), "").unwrap();
        remove_old(dir.path(), 30, at);
        assert!(!dir.path().join("2026-10-01.jsonl").exists());
        assert!(path.exists());
    }
}
