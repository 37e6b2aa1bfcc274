//! The key manager's audit log: append-only JSON lines, one per request that touches a key
//! and per administrator's act, each chained to the line before it by a SHA-256 and keyed by
//! an HMAC, so that a line removed, inserted, reordered or edited anywhere before the last
//! one shows when the log is verified, even by someone who recomputes the hashes.
//!
//! A line is a JSON object with, in this order: `seq` (0, 1, 2, … with no gap), `time`
//! (RFC 3339, UTC), `who` (the Hawk credential id), `user` (the caller's `PureCloud-User-Id`,
//! or null), `action`, `key` (hex kek id, or null), `recording` (the recording id the caller
//! gave, or null), `outcome`, `prev`: the hex SHA-256 of the previous line's bytes (without
//! its newline), 64 zeros for the first line, and last `mac`: the hex HMAC-SHA256 under the
//! audit key of `EREC audit v1\n` followed by the line's bytes without `,"mac":"…"`.
//!
//! ```text
//! {"seq":7,"time":"…","who":"platform-1","user":"u-42","action":"decrypt",
//!  "key":"9ed9…","recording":"0194…","outcome":"ok","prev":"<sha-256 of line 6>",
//!  "mac":"<hmac of everything before it>"}
//! ```
//!
//! The audit key comes from the key manager's protector ([`crate::at_rest::Protector`]): a
//! master key derives it, KMS mode opens a data key that KMS sealed. Logs written before
//! keying (lines without `mac`) are continued: the keyed lines start where an upgraded key
//! manager first wrote, and [`verify_keyed`] says where. After a keyed line every line must be
//! keyed.
//!
//! Invariants:
//! - [`Chain`] is pure: given where the chain stands it makes the next line;
//!   [`verify_keyed`] checks a whole log and names the first line that breaks it.
//! - Every field is cleaned before it is written ([`Event::cleaned`]): control characters
//!   become U+FFFD and each field is cut to its bound, so a caller's text cannot forge lines,
//!   confuse a terminal or fill the disk.
//! - [`AuditLog`] appends with `O_APPEND`, one `write` for a whole batch of lines, and syncs
//!   (`fdatasync`) when asked; a write that fails is cut back to the last whole line. It
//!   refuses to open (so to append to) a log whose chain is broken: evidence is not extended
//!   past a tampered line. A torn last line (a crash or a full disk in the middle of a write)
//!   is cut off when the log is opened, and that repair is the next line, with the size and
//!   SHA-256 of what was cut.
//! - [`Writer`] is the key manager's group commit: one thread writes every line; a request
//!   that must be audited (an unwrap, an act that changes keys or credentials) is answered only
//!   once its line is written and synced, with many such lines sharing one sync, and is refused
//!   if that fails. Lines about refused requests are rate-limited (beyond the limit, one
//!   summary line with the count) and not synced one by one.
//! - Cutting lines off the end leaves a valid shorter chain; the last `seq` and hash are
//!   therefore also reported so that a cut can be found against them.
//! - No key material and no DEK is ever written here: kek ids and outcomes only.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The bound of the caller's text fields (`who`, `user`, `recording`), in bytes.
pub const MAX_CALLER_FIELD: usize = 128;
/// The bound of `action` and `key`.
pub const MAX_NAME_FIELD: usize = 80;
/// The bound of `outcome`.
pub const MAX_OUTCOME: usize = 256;

/// What the MAC of a line covers before the line itself.
const MAC_LABEL: &[u8] = b"EREC audit v1\n";

/// One request, as the key manager saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The Hawk credential id of the caller (or `admin` for a local command).
    pub who: String,
    /// The `PureCloud-User-Id` header, if the caller sent one.
    pub user: Option<String>,
    /// What was asked: `decrypt`, `keypair.create`, `keypair.get`, `rotate`, …
    pub action: String,
    /// The kek id (hex) the request touched, if any.
    pub key: Option<String>,
    /// The recording id the caller named, if any.
    pub recording: Option<String>,
    /// `ok`, `denied`, `failed`, `unknown_key`, `rate_limited`, …
    pub outcome: String,
}

/// `text` with control characters (and the Unicode line and paragraph separators) replaced
/// by U+FFFD, cut to at most `max` bytes on a character boundary; a cut ends in `…`.
pub fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            '\u{FFFD}'
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            while out.len() + '…'.len_utf8() > max && out.pop().is_some() {}
            if out.len() + '…'.len_utf8() <= max {
                out.push('…');
            }
            return out;
        }
        out.push(c);
    }
    out
}

impl Event {
    /// The event with every field cleaned and bounded ([`clean`]).
    pub fn cleaned(&self) -> Event {
        Event {
            who: clean(&self.who, MAX_CALLER_FIELD),
            user: self.user.as_deref().map(|u| clean(u, MAX_CALLER_FIELD)),
            action: clean(&self.action, MAX_NAME_FIELD),
            key: self.key.as_deref().map(|k| clean(k, MAX_NAME_FIELD)),
            recording: self
                .recording
                .as_deref()
                .map(|r| clean(r, MAX_CALLER_FIELD)),
            outcome: clean(&self.outcome, MAX_OUTCOME),
        }
    }
}

/// The key of the lines' MACs (zeroized on drop, never shown).
#[derive(Clone)]
pub struct AuditKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// The audit key of these bytes.
    pub fn new(bytes: Zeroizing<[u8; 32]>) -> AuditKey {
        AuditKey(bytes)
    }

    /// The audit key of these bytes (a copy goes into the zeroizing buffer; wipe yours).
    pub fn from_bytes(bytes: [u8; 32]) -> AuditKey {
        AuditKey(Zeroizing::new(bytes))
    }

    fn mac(&self, unsigned: &[u8]) -> HmacSha256 {
        let mut m = self.mac_of(MAC_LABEL);
        m.update(unsigned);
        m
    }

    fn mac_of(&self, label: &[u8]) -> HmacSha256 {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(self.0.as_ref())
            .expect("HMAC takes a key of any length");
        m.update(label);
        m
    }
}

/// What the MAC of a keying marker covers before the sequence number.
const MARKER_LABEL: &[u8] = b"EREC audit keyed from\n";

/// Where keying starts, as the key store keeps it apart from the log:
/// `{"keyedFromSeq":N,"mac":"<hex HMAC under the audit key>"}`. Without it, someone who can
/// write the log could strip every MAC and recompute the hashes, and the log would read as
/// one written before keying.
pub fn keying_marker(key: &AuditKey, seq: u64) -> String {
    let mut m = key.mac_of(MARKER_LABEL);
    m.update(seq.to_string().as_bytes());
    format!(
        "{{\"keyedFromSeq\":{seq},\"mac\":\"{}\"}}\n",
        hex::encode(m.finalize().into_bytes())
    )
}

/// Why a keying marker (the key store's record of where the audit log's keying starts) was
/// refused.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// It is not the JSON of a marker.
    #[error("not a keying marker: {0}")]
    NotAMarker(#[from] serde_json::Error),
    /// Its MAC is not hex.
    #[error("its mac is not hex")]
    MacNotHex,
    /// Its MAC does not verify: another key's marker, or a changed one.
    #[error("its mac does not verify under the audit key")]
    BadMac,
}

/// The sequence number a keying marker names, once its MAC verifies under `key`.
pub fn read_keying_marker(key: &AuditKey, text: &str) -> Result<u64, MarkerError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Marker {
        keyed_from_seq: u64,
        mac: String,
    }
    let m: Marker = serde_json::from_str(text)?;
    let want = hex::decode(&m.mac).map_err(|_| MarkerError::MacNotHex)?;
    let mut mac = key.mac_of(MARKER_LABEL);
    mac.update(m.keyed_from_seq.to_string().as_bytes());
    mac.verify_slice(&want).map_err(|_| MarkerError::BadMac)?;
    Ok(m.keyed_from_seq)
}

/// Checks a log's chain against the keying point the key store records: every line from
/// `seq` on is keyed, none before, and the log reaches at least that far.
pub fn check_keying(chain: &Chain, seq: u64) -> Result<(), AuditError> {
    match chain.keyed_from {
        Some(line) if line == seq + 1 => Ok(()),
        Some(line) => Err(AuditError {
            line,
            why: format!(
                "keyed from line {line}, but the key store records keying from line {}",
                seq + 1
            ),
        }),
        None if chain.next_seq == seq => Ok(()),
        None if chain.next_seq < seq => Err(AuditError {
            line: chain.next_seq,
            why: format!(
                "the log ends at line {}, but the key store records keying from line {}: \
                 lines were cut off its end",
                chain.next_seq,
                seq + 1
            ),
        }),
        None => Err(AuditError {
            line: seq + 1,
            why: "no mac, yet the key store records keying from this line: the MACs were \
                  removed"
                .into(),
        }),
    }
}

/// A line as written: the event with its place in the chain.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    time: String,
    who: String,
    user: Option<String>,
    action: String,
    key: Option<String>,
    recording: Option<String>,
    outcome: String,
    prev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

/// Where a chain stands: the next line's number and the hash of the last line (the default:
/// an empty log, whose "last hash" is all zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chain {
    /// The `seq` of the next line (the number of lines so far).
    pub next_seq: u64,
    /// SHA-256 of the last line's bytes (zeros before the first line).
    pub last_hash: [u8; 32],
    /// The line (from 1) where keyed lines begin, if any has been written.
    pub keyed_from: Option<u64>,
}

/// Why a log does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log line {line}: {why}")]
pub struct AuditError {
    /// The first bad line, from 1.
    pub line: u64,
    /// What is wrong with it.
    pub why: String,
}

/// The bytes `,"mac":"` + 64 hex digits + `"}` at the end of a keyed line.
const MAC_SUFFIX: usize = 8 + 64 + 2;

impl Chain {
    /// The next line for `event` at `time_ms` (without its newline), keyed when `key` is
    /// given; advances the chain. The event is cleaned first.
    pub fn append(&mut self, event: &Event, time_ms: u64, key: Option<&AuditKey>) -> String {
        let e = event.cleaned();
        let mut line = Line {
            seq: self.next_seq,
            time: erec::clock::Utc::from_unix_ms(time_ms).rfc3339(),
            who: e.who,
            user: e.user,
            action: e.action,
            key: e.key,
            recording: e.recording,
            outcome: e.outcome,
            prev: hex::encode(self.last_hash),
            mac: None,
        };
        let mut text = serde_json::to_string(&line).expect("strings and numbers always serialize");
        if let Some(k) = key {
            line.mac = Some(hex::encode(k.mac(text.as_bytes()).finalize().into_bytes()));
            text = serde_json::to_string(&line).expect("strings and numbers always serialize");
            self.keyed_from.get_or_insert(self.next_seq + 1);
        }
        self.next_seq += 1;
        self.last_hash = Sha256::digest(text.as_bytes()).into();
        text
    }
}

/// Checks a whole log without the audit key: every line parses, numbers run 0, 1, 2, … and
/// each names the hash of the one before; MACs are present where due but not checked.
/// Returns where the chain stands after the last line. An edited line shows at the line
/// after it (whose `prev` no longer matches), and the error names both.
pub fn verify(text: &str) -> Result<Chain, AuditError> {
    verify_from(Chain::default(), text, None)
}

/// [`verify`], and with `key` every keyed line's MAC too.
pub fn verify_keyed(text: &str, key: Option<&AuditKey>) -> Result<Chain, AuditError> {
    verify_from(Chain::default(), text, key)
}

/// Checks lines that continue a log whose chain stood at `start` (line numbers in errors
/// count from that point's first line as 1 more than `start.next_seq`).
pub fn verify_from(start: Chain, text: &str, key: Option<&AuditKey>) -> Result<Chain, AuditError> {
    let mut chain = start;
    let base = start.next_seq;
    let body = match text.strip_suffix('\n') {
        Some(b) => b,
        None if text.is_empty() => return Ok(chain),
        None => {
            return Err(AuditError {
                line: base + text.lines().count() as u64,
                why: "the last line is incomplete (no newline)".into(),
            });
        }
    };
    if body.is_empty() {
        return Err(AuditError {
            line: base + 1,
            why: "an empty line".into(),
        });
    }
    for (i, raw) in body.split('\n').enumerate() {
        let n = base + i as u64 + 1;
        let bad = |why: String| AuditError { line: n, why };
        let line: Line =
            serde_json::from_str(raw).map_err(|e| bad(format!("not an audit line: {e}")))?;
        if line.seq != chain.next_seq {
            return Err(bad(format!(
                "seq {} where {} was due (a line removed, inserted or moved)",
                line.seq, chain.next_seq
            )));
        }
        if line.prev != hex::encode(chain.last_hash) {
            return Err(bad(format!(
                "its prev is not the hash of line {}: that line, or this prev, was changed",
                n - 1
            )));
        }
        match (&line.mac, chain.keyed_from) {
            (None, Some(from)) => {
                return Err(bad(format!(
                    "no mac, but the log is keyed from line {from}: a line written without the \
                     audit key"
                )));
            }
            (None, None) => {}
            (Some(mac), _) => {
                let tail = format!(",\"mac\":\"{mac}\"}}");
                if mac.len() != 64
                    || !mac.bytes().all(|b| b.is_ascii_hexdigit())
                    || !raw.ends_with(&tail)
                    || tail.len() != MAC_SUFFIX
                {
                    return Err(bad(
                        "a mac that is not 64 hex digits at the line's end".into()
                    ));
                }
                if let Some(k) = key {
                    let unsigned = format!("{}}}", &raw[..raw.len() - MAC_SUFFIX]);
                    let want = hex::decode(mac).expect("64 hex digits checked above");
                    // Constant time (hmac's verify_slice).
                    k.mac(unsigned.as_bytes())
                        .verify_slice(&want)
                        .map_err(|_| {
                            bad("its mac does not verify under the audit key: the line was \
                             changed, or written by someone without the key"
                                .into())
                        })?;
                }
                chain.keyed_from.get_or_insert(n);
            }
        }
        chain.next_seq += 1;
        chain.last_hash = Sha256::digest(raw.as_bytes()).into();
    }
    Ok(chain)
}

/// A torn last line cut off when a log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The bytes cut.
    pub bytes: u64,
    /// Their SHA-256, hex.
    pub sha256: String,
}

/// An audit log file, open for appending. Several processes may append to one log (the
/// service and an administrator's commands): each append holds an exclusive lock on the
/// file, first reads and verifies what others appended since, and chains onto that.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    chain: Chain,
    /// The bytes of the file this log has verified.
    len: u64,
    key: Option<AuditKey>,
    /// Why a sync failed, if one did: then lines said to be written may be lost (the kernel
    /// may drop the pages it could not write), so nothing more is appended until the log is
    /// opened again, and checked, by a new process.
    sync_failed: Option<String>,
}

/// The actor of the lines the log writes about itself.
const SELF: &str = "edgerec";

impl AuditLog {
    /// Opens (or creates, 0600) the log at `path`, verifying what is there first (the MACs
    /// too, with `key`), cutting a torn last line off (and writing that repair as the next
    /// line); new lines are keyed with `key`.
    pub fn open(path: &Path, key: Option<AuditKey>) -> io::Result<AuditLog> {
        let shown = path.display().to_string();
        let err = |e: io::Error| io::Error::new(e.kind(), format!("{shown}: {e}"));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            chain: Chain::default(),
            len: 0,
            key,
            sync_failed: None,
        };
        log.file.lock().map_err(err)?;
        let caught = log.catch_up(erec::clock::now_ms());
        let unlocked = log.file.unlock().map_err(err);
        caught.map_err(err)?;
        unlocked?;
        Ok(log)
    }

    /// Reads and verifies what was appended since `self.len` (under the lock), cutting a
    /// torn last line and recording the repair.
    fn catch_up(&mut self, now_ms: u64) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let open = self.file.metadata()?;
        // The path must still name the file this log verified and holds open: a log renamed
        // away (rotated) or replaced would have the service write where nobody reads.
        let named = std::fs::metadata(&self.path)?;
        if (named.dev(), named.ino()) != (open.dev(), open.ino()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file at this path is no longer the log opened (renamed or replaced); \
                 not appending",
            ));
        }
        let end = open.len();
        if end < self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the log shrank from {} to {end} bytes (truncated by someone); not appending",
                    self.len
                ),
            ));
        }
        if end == self.len {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(self.len))?;
        let mut bytes = Vec::new();
        (&mut self.file)
            .take(end.saturating_sub(self.len))
            .read_to_end(&mut bytes)?;
        // A torn last line: everything after the last newline. Under the lock, no writer is
        // in the middle of a write, so it is what a crash or a full disk left.
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let repair = (whole < bytes.len()).then(|| Repair {
            bytes: (bytes.len() - whole) as u64,
            sha256: hex::encode(Sha256::digest(&bytes[whole..])),
        });
        let text = std::str::from_utf8(&bytes[..whole]).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not UTF-8 text; not appending to a broken log",
            )
        })?;
        self.chain = verify_from(self.chain, text, self.key.as_ref()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{e}; not appending to a broken log"),
            )
        })?;
        self.len += whole as u64;
        if let Some(r) = repair {
            self.file.set_len(self.len)?;
            let event = Event {
                who: SELF.into(),
                user: None,
                action: "audit.repair".into(),
                key: None,
                recording: None,
                outcome: format!(
                    "cut a torn last line: {} bytes, sha256 {}",
                    r.bytes, r.sha256
                ),
            };
            self.write_lines(&[(event, now_ms)], true)?;
        }
        Ok(())
    }

    /// Appends one event (one write, then a sync) and returns the chain after it.
    pub fn append(&mut self, event: &Event, time_ms: u64) -> io::Result<Chain> {
        self.append_all(&[(event.clone(), time_ms)], true)
    }

    /// Appends events in one write, synced (`fdatasync`) if `sync`; returns the chain after
    /// them. A write that fails leaves the log as it was (cut back to its last whole line).
    pub fn append_all(&mut self, events: &[(Event, u64)], sync: bool) -> io::Result<Chain> {
        let shown = self.path.display().to_string();
        let err = |e: io::Error| io::Error::new(e.kind(), format!("{shown}: {e}"));
        if let Some(why) = &self.sync_failed {
            return Err(io::Error::other(format!(
                "{shown}: a sync failed ({why}): lines may be lost; nothing more is appended \
                 until the key manager is started again"
            )));
        }
        self.file.lock().map_err(err)?;
        let now = events.last().map_or_else(erec::clock::now_ms, |e| e.1);
        let done = self
            .catch_up(now)
            .and_then(|()| self.write_lines(events, sync));
        let unlocked = self.file.unlock().map_err(err);
        done.map_err(err)?;
        unlocked?;
        Ok(self.chain)
    }

    /// Writes lines under the lock, the file caught up.
    fn write_lines(&mut self, events: &[(Event, u64)], sync: bool) -> io::Result<()> {
        if events.is_empty() {
            if sync && let Err(e) = self.file.sync_data() {
                self.sync_failed = Some(e.to_string());
                return Err(e);
            }
            return Ok(());
        }
        let mut next = self.chain;
        let mut text = String::new();
        for (e, t) in events {
            text.push_str(&next.append(e, *t, self.key.as_ref()));
            text.push('\n');
        }
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            // Whatever part of the batch reached the file goes again: a torn line would
            // otherwise break the chain for every later writer.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.chain = next;
        self.len += text.len() as u64;
        if sync && let Err(e) = self.file.sync_data() {
            self.sync_failed = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Where the chain stands.
    pub fn chain(&self) -> Chain {
        self.chain
    }
}

/// How a line is written by the [`Writer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Answered only once written and synced (an unwrap, an act that changes something).
    Synced,
    /// Written with the next batch, synced with the next sync (a read of public keys).
    Written,
    /// A request refused before anyone was authenticated: rate-limited (one bucket for all
    /// of them), then summarised ([`Writer::start`]).
    Denial,
    /// A request of this authenticated credential refused (its role, a rate limit):
    /// rate-limited in a bucket of the credential's own, so that nobody else's flood hides
    /// its lines.
    DenialOf(String),
}

/// Why the [`Writer`] did not write (or sync) a line.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Writing or syncing the batch failed (one error, told to every line of the batch).
    #[error("the audit log cannot be written: {0}")]
    Failed(Arc<io::Error>),
    /// The writer's thread is gone.
    #[error("the audit writer has stopped")]
    Stopped,
}

/// What a caller waiting for its line is told: written (and synced), or why not.
pub type Done = Box<dyn FnOnce(Result<(), WriteError>) + Send>;

enum Job {
    Line(Event, Durability, Option<Done>),
}

/// The group-commit writer: a thread that owns the [`AuditLog`].
pub struct Writer {
    tx: std::sync::mpsc::Sender<Job>,
}

/// Lines the writer takes into one batch at most.
const MAX_BATCH: usize = 4096;

impl Writer {
    /// Starts the writer thread for `log`. Denial lines beyond `denials` (a token bucket)
    /// are not written; a line `denials.suppressed` with their count follows within a
    /// second. `on_error` is called with the reason whenever a batch cannot be written.
    pub fn start(
        mut log: AuditLog,
        denials: edgerec_net::rate_limit::Limit,
        on_error: Box<dyn Fn(&WriteError) + Send>,
    ) -> io::Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                use std::time::Duration;
                let now = erec::clock::now_ms;
                let mut bucket = edgerec_net::rate_limit::TokenBucket::full(denials, now());
                let mut buckets = edgerec_net::rate_limit::PerKey::new(denials, 10_000);
                let (mut suppressed, mut unsynced, mut last_sync) = (0u64, false, now());
                let mut last_summary = 0;
                loop {
                    let wait = if suppressed > 0 || unsynced {
                        Duration::from_millis(250)
                    } else {
                        Duration::from_secs(3600)
                    };
                    let mut jobs = Vec::new();
                    match rx.recv_timeout(wait) {
                        Ok(j) => jobs.push(j),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    while jobs.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    let t = now();
                    let (mut lines, mut waiters, mut sync) = (Vec::new(), Vec::new(), false);
                    for Job::Line(event, durability, done) in jobs {
                        let refused = match &durability {
                            Durability::Denial => bucket.take(denials, t).is_err(),
                            Durability::DenialOf(who) => buckets.take(who, t).is_err(),
                            Durability::Synced => {
                                sync = true;
                                false
                            }
                            Durability::Written => false,
                        };
                        if refused {
                            suppressed += 1;
                            continue;
                        }
                        lines.push((event, t));
                        waiters.extend(done);
                    }
                    // At most one summary a second, whatever the flood.
                    if suppressed > 0 && t.saturating_sub(last_summary) >= 1000 {
                        last_summary = t;
                        lines.push((
                            Event {
                                who: SELF.into(),
                                user: None,
                                action: "denials.suppressed".into(),
                                key: None,
                                recording: None,
                                outcome: format!(
                                    "{suppressed} refused requests not written one by one \
                                     (more than {}/s, by anyone unauthenticated or by one \
                                     credential)",
                                    denials.rate
                                ),
                            },
                            t,
                        ));
                        suppressed = 0;
                    }
                    // Unsynced lines are synced within a second even when nothing asks.
                    let sync = sync || (unsynced && t.saturating_sub(last_sync) >= 1000);
                    if lines.is_empty() && !sync {
                        continue;
                    }
                    let written = log
                        .append_all(&lines, sync)
                        .map(|_| ())
                        .map_err(|e| WriteError::Failed(Arc::new(e)));
                    match &written {
                        Ok(()) if sync => (unsynced, last_sync) = (false, t),
                        Ok(()) => unsynced = true,
                        Err(e) => on_error(e),
                    }
                    for w in waiters {
                        w(written.clone());
                    }
                }
            })?;
        Ok(Writer { tx })
    }

    /// Hands a line to the writer; `done` (if any) is called once it is written (and, for
    /// [`Durability::Synced`], synced) or cannot be.
    pub fn write(&self, event: Event, durability: Durability, done: Option<Done>) {
        if let Err(std::sync::mpsc::SendError(Job::Line(_, _, Some(done)))) =
            self.tx.send(Job::Line(event, durability, done))
        {
            done(Err(WriteError::Stopped));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(i: u64) -> Event {
        Event {
            who: format!("client-{}", i % 3),
            user: i.is_multiple_of(2).then(|| format!("user-{i}")),
            action: "decrypt".into(),
            key: Some("ab".repeat(32)),
            recording: Some(format!("0194-{i}")),
            outcome: if i.is_multiple_of(5) { "denied" } else { "ok" }.into(),
        }
    }

    fn key() -> AuditKey {
        AuditKey::new(Zeroizing::new([9u8; 32]))
    }

    fn log(n: u64, key: Option<&AuditKey>) -> String {
        let mut c = Chain::default();
        (0..n)
            .map(|i| c.append(&event(i), 1_796_051_045_123 + i, key) + "\n")
            .collect()
    }

    #[test]
    fn two_writers_of_one_log_chain_onto_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut service = AuditLog::open(&path, Some(key())).unwrap();
        service.append(&event(0), 1).unwrap();
        let mut admin = AuditLog::open(&path, Some(key())).unwrap();
        admin.append(&event(1), 2).unwrap();
        admin.append(&event(2), 3).unwrap();
        service.append(&event(3), 4).unwrap();
        admin.append(&event(4), 5).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            verify_keyed(&text, Some(&key())).unwrap().next_seq,
            5,
            "{text}"
        );
        // Lines appended by someone else that do not continue the chain are found before
        // the next append, which refuses to chain onto them.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(log(1, Some(&key())).as_bytes())
            .unwrap();
        let e = service.append(&event(5), 6).unwrap_err();
        assert!(e.to_string().contains("broken log"), "{e}");
    }

    #[test]
    fn lines_are_fixed_json_chained_from_zeros_and_keyed() {
        let mut c = Chain::default();
        let first = c.append(&event(0), 1_796_051_045_123, None);
        assert_eq!(
            first,
            format!(
                "{{\"seq\":0,\"time\":\"2026-11-30T15:04:05.123Z\",\"who\":\"client-0\",\
                 \"user\":\"user-0\",\"action\":\"decrypt\",\"key\":\"{}\",\
                 \"recording\":\"0194-0\",\"outcome\":\"denied\",\"prev\":\"{}\"}}",
                "ab".repeat(32),
                "0".repeat(64)
            )
        );
        let second = c.append(&event(1), 1_796_051_045_124, Some(&key()));
        assert!(second.contains(&format!(
            "\"prev\":\"{}\"",
            hex::encode(Sha256::digest(&first))
        )));
        // The MAC covers the line without itself, under the label.
        let unsigned = format!("{}}}", &second[..second.len() - MAC_SUFFIX]);
        let mac = key().mac(unsigned.as_bytes()).finalize().into_bytes();
        assert!(second.ends_with(&format!(",\"mac\":\"{}\"}}", hex::encode(mac))));
        assert_eq!((c.next_seq, c.keyed_from), (2, Some(2)));
        assert_eq!(
            verify_keyed(&format!("{first}\n{second}\n"), Some(&key())),
            Ok(c)
        );
        assert_eq!(verify(""), Ok(Chain::default()));
    }

    #[test]
    fn removed_edited_moved_and_torn_lines_are_named() {
        for k in [None, Some(key())] {
            let text = log(6, k.as_ref());
            let lines: Vec<&str> = text.lines().collect();
            let join = |v: Vec<&str>| v.join("\n") + "\n";
            let mut removed = lines.clone();
            removed.remove(2);
            assert_eq!(
                verify_keyed(&join(removed), k.as_ref()).unwrap_err().line,
                3
            );
            let mut swapped = lines.clone();
            swapped.swap(1, 2);
            assert_eq!(
                verify_keyed(&join(swapped), k.as_ref()).unwrap_err().line,
                2
            );
            let edited = text.replacen("\"outcome\":\"ok\"", "\"outcome\":\"denied\"", 1);
            let e = verify_keyed(&edited, k.as_ref()).unwrap_err();
            // Without the key the next line's prev shows it; with it, the line's own MAC.
            assert_eq!(e.line, if k.is_some() { 2 } else { 3 }, "{e}");
            assert!(verify(&text[..text.len() - 1]).is_err(), "torn last line");
            assert!(verify(&format!("{text}\n")).is_err(), "an empty line");
            assert!(verify(&format!("{text}{{\"seq\":6}}\n")).is_err());
        }
    }

    /// Removing a line and recomputing every hash after it passes the unkeyed check but not
    /// the keyed one: the MACs cover each line's `prev` and `seq`.
    #[test]
    fn lines_removed_and_the_hashes_recomputed_fail_under_the_key() {
        let text = log(6, Some(&key()));
        let mut lines: Vec<Line> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        lines.remove(3);
        let mut prev = [0u8; 32];
        let mut forged = String::new();
        for (i, l) in lines.iter_mut().enumerate() {
            l.seq = i as u64;
            l.prev = hex::encode(prev);
            let raw = serde_json::to_string(&l).unwrap();
            prev = Sha256::digest(raw.as_bytes()).into();
            forged.push_str(&raw);
            forged.push('\n');
        }
        assert_eq!(
            verify(&forged).unwrap().next_seq,
            5,
            "the unkeyed chain is whole"
        );
        let e = verify_keyed(&forged, Some(&key())).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.why.contains("does not verify under the audit key"), "{e}");
        // Dropping the MACs instead is found too: keyed lines cannot become unkeyed.
        let stripped: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 4 {
                    format!("{}}}\n", &l[..l.len() - MAC_SUFFIX])
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(verify(&stripped).is_err());
    }

    #[test]
    fn an_unkeyed_log_is_continued_keyed_and_says_where_keying_starts() {
        let mut c = Chain::default();
        let mut text = String::new();
        for i in 0..3 {
            text += &(c.append(&event(i), 1_000 + i, None) + "\n");
        }
        for i in 3..5 {
            text += &(c.append(&event(i), 1_000 + i, Some(&key())) + "\n");
        }
        let v = verify_keyed(&text, Some(&key())).unwrap();
        assert_eq!((v.next_seq, v.keyed_from), (5, Some(4)));
        assert_eq!(verify(&text).unwrap().keyed_from, Some(4));
        let other = AuditKey::new(Zeroizing::new([8u8; 32]));
        assert_eq!(verify_keyed(&text, Some(&other)).unwrap_err().line, 4);
    }

    #[test]
    fn fields_are_cleaned_and_bounded() {
        assert_eq!(clean("plain", 10), "plain");
        assert_eq!(
            clean("a\nb\u{1b}[31m\u{2028}", 64),
            "a\u{FFFD}b\u{FFFD}[31m\u{FFFD}"
        );
        let long = "x".repeat(1000);
        let cut = clean(&long, 128);
        assert!(cut.len() <= 128 && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(
            clean(&"é".repeat(64), 128),
            "é".repeat(64),
            "exactly the bound"
        );
        let cut = clean(&"é".repeat(65), 128);
        assert!(cut.len() <= 128 && cut.ends_with('…'));
        let e = Event {
            who: "w".repeat(400_000),
            user: Some("u\r\n{\"seq\":9}".into()),
            action: "decrypt".into(),
            key: None,
            recording: None,
            outcome: "denied: bad MAC".into(),
        };
        let line = Chain::default().append(&e, 1, None);
        assert!(line.len() < 600, "{}", line.len());
        assert!(!line.contains("\\r") && !line.contains("\\n"), "{line}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any one byte changed before the last line breaks the chain (a change in the last
        /// line only the reported last hash, or its MAC, can catch).
        #[test]
        fn any_byte_changed_before_the_last_line_breaks_the_chain(
            n in 2u64..8, at in any::<prop::sample::Index>(), to in any::<u8>(), keyed in any::<bool>()
        ) {
            let k = keyed.then(key);
            let text = log(n, k.as_ref());
            let last_start = text[..text.len() - 1].rfind('\n').map_or(0, |i| i + 1);
            let i = at.index(last_start);
            prop_assume!(text.as_bytes()[i] != to);
            let mut bytes = text.clone().into_bytes();
            bytes[i] = to;
            let changed = String::from_utf8_lossy(&bytes);
            prop_assert!(verify(&changed).is_err());
        }

        /// Any field a caller sends, however long or strange, makes one line within bounds.
        #[test]
        fn any_caller_text_makes_one_bounded_line(who in ".{0,600}", user in ".{0,600}") {
            let e = Event { who, user: Some(user), action: "x".into(), key: None, recording: None, outcome: "denied".into() };
            let line = Chain::default().append(&e, 1, Some(&key()));
            prop_assert!(!line.contains('\n'));
            prop_assert!(line.len() < 1_500);
            prop_assert!(verify_keyed(&(line + "\n"), Some(&key())).is_ok());
        }
    }

    #[test]
    fn the_file_log_resumes_its_chain_and_refuses_a_broken_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut a = AuditLog::open(&path, None).unwrap();
        a.append(&event(0), 1).unwrap();
        a.append(&event(1), 2).unwrap();
        drop(a);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut a = AuditLog::open(&path, Some(key())).unwrap();
        assert_eq!(a.chain().next_seq, 2);
        let c = a.append(&event(2), 3).unwrap();
        assert_eq!(
            verify_keyed(&std::fs::read_to_string(&path).unwrap(), Some(&key())),
            Ok(c)
        );
        drop(a);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("client-1", "client-9", 1)).unwrap();
        let e = AuditLog::open(&path, Some(key())).unwrap_err();
        assert!(
            e.to_string().contains("line 3") && e.to_string().contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_at_open_and_the_repair_is_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut a = AuditLog::open(&path, Some(key())).unwrap();
        a.append(&event(0), 1).unwrap();
        a.append(&event(1), 2).unwrap();
        drop(a);
        // A full disk in the middle of the third line.
        let torn = "{\"seq\":2,\"time\":\"2026-11-30T";
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(torn.as_bytes())
            .unwrap();
        assert!(verify(&std::fs::read_to_string(&path).unwrap()).is_err());
        let mut a = AuditLog::open(&path, Some(key())).unwrap();
        a.append(&event(2), 3).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let c = verify_keyed(&text, Some(&key())).unwrap();
        assert_eq!(c.next_seq, 4);
        let repair = text.lines().nth(2).unwrap();
        assert!(
            repair.contains("\"action\":\"audit.repair\"")
                && repair.contains(&format!("{} bytes", torn.len()))
                && repair.contains(&hex::encode(Sha256::digest(torn.as_bytes()))),
            "{repair}"
        );
    }

    #[test]
    fn the_keying_point_is_kept_apart_and_a_log_stripped_of_its_macs_fails_it() {
        let marker = keying_marker(&key(), 3);
        assert_eq!(read_keying_marker(&key(), &marker).ok(), Some(3));
        let other = AuditKey::from_bytes([1u8; 32]);
        assert!(
            matches!(
                read_keying_marker(&other, &marker),
                Err(MarkerError::BadMac)
            ),
            "keyed"
        );
        let moved = marker.replace("\"keyedFromSeq\":3", "\"keyedFromSeq\":9");
        assert!(read_keying_marker(&key(), &moved).is_err());
        // Three lines before keying, then keyed ones: consistent with a marker at seq 3.
        let mut c = Chain::default();
        let mut text = String::new();
        for i in 0..5 {
            text += &(c.append(&event(i), 1 + i, (i >= 3).then(key).as_ref()) + "\n");
        }
        let v = verify_keyed(&text, Some(&key())).unwrap();
        assert!(check_keying(&v, 3).is_ok());
        assert!(check_keying(&v, 0).is_err(), "keyed from line 4, not 1");
        // The whole log rewritten without MACs passes the chain, not the keying point.
        let mut bare = Chain::default();
        let stripped: String = (0..5)
            .map(|i| bare.append(&event(i), 1 + i, None) + "\n")
            .collect();
        let v = verify_keyed(&stripped, Some(&key())).unwrap();
        assert_eq!(v.keyed_from, None);
        assert_eq!(check_keying(&v, 3).unwrap_err().line, 4);
        // A log not yet reaching the keying point is fine.
        let short = Chain {
            next_seq: 3,
            ..Chain::default()
        };
        assert!(check_keying(&short, 3).is_ok());
    }

    #[test]
    fn a_log_truncated_or_replaced_under_the_writer_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut a = AuditLog::open(&path, Some(key())).unwrap();
        a.append(&event(0), 1).unwrap();
        a.append(&event(1), 2).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap().len() + 1;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(first as u64)
            .unwrap();
        let e = a.append(&event(2), 3).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
        let mut b = AuditLog::open(&path, Some(key())).unwrap();
        std::fs::rename(&path, dir.path().join("rotated.jsonl")).unwrap();
        std::fs::write(&path, "").unwrap();
        let e = b.append(&event(3), 4).unwrap_err();
        assert!(e.to_string().contains("no longer the log opened"), "{e}");
    }

    #[test]
    fn the_writer_answers_after_the_line_and_summarises_a_flood_of_denials() {
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, Some(key())).unwrap();
        let limit = edgerec_net::rate_limit::Limit {
            rate: 1.0,
            burst: 5.0,
        };
        let w = Writer::start(log, limit, Box::new(|_| {})).unwrap();
        for i in 0..200 {
            let mut e = event(i);
            e.outcome = "denied: unknown credential id".into();
            w.write(e, Durability::Denial, None);
        }
        // A credential's own refusals are not hidden by the anonymous flood.
        let mut own = event(7);
        own.outcome = "denied: role recorder may not (needs decrypt)".into();
        w.write(own, Durability::DenialOf("client-1".into()), None);
        let (tx, rx) = channel();
        w.write(
            event(1),
            Durability::Synced,
            Some(Box::new(move |r| tx.send(r).unwrap())),
        );
        assert!(
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .unwrap()
                .is_ok()
        );
        // The answer came after the line: it is in the file.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().any(|l| l.contains("\"outcome\":\"ok\"")),
            "{text}"
        );
        assert!(text.contains("role recorder may not"), "{text}");
        // Five denials written, the rest summed up in one line (within a second or so).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.contains("denials.suppressed") {
                break text;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(text.matches("denied: unknown").count(), 5, "{text}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap();
            let summed: u64 = text
                .lines()
                .filter(|l| l.contains("denials.suppressed"))
                .filter_map(|l| {
                    l.split("\"outcome\":\"")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum();
            if summed == 195 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{summed}: {text}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(verify_keyed(&text, Some(&key())).is_ok());
    }
}
