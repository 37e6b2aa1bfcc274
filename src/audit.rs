//! The key manager's audit log: append-only JSON lines, one per request that touches a key,
//! each chained to the line before it by a SHA-256, so that a line removed, inserted,
//! reordered or edited anywhere before the last one shows when the log is verified.
//!
//! A line is a JSON object with, in this order: `seq` (0, 1, 2, … with no gap), `time`
//! (RFC 3339, UTC), `who` (the Hawk credential id), `user` (the caller's `PureCloud-User-Id`,
//! or null), `action`, `key` (hex kek id, or null), `recording` (the recording id the caller
//! gave, or null), `outcome`, and `prev`: the hex SHA-256 of the previous line's bytes
//! (without its newline), 64 zeros for the first line.
//!
//! Invariants:
//! - [`Chain`] is pure: given the last line it makes the next one; [`verify`] checks a whole
//!   log and names the first line that breaks the chain.
//! - [`AuditLog`] appends with `O_APPEND`, one `write` and a sync per line, file mode 0600,
//!   and refuses to open (so to append to) a log whose chain is broken: evidence is not
//!   extended past a tampered line.
//! - Cutting lines off the end leaves a valid shorter chain; the last `seq` and hash are
//!   therefore also reported (log and metric) so that a cut can be found against them.
//! - No key material and no DEK is ever written here: kek ids and outcomes only.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

/// Where a chain stands: the next line's number and the hash of the last line (the default:
/// an empty log, whose "last hash" is all zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chain {
    /// The `seq` of the next line (the number of lines so far).
    pub next_seq: u64,
    /// SHA-256 of the last line's bytes (zeros before the first line).
    pub last_hash: [u8; 32],
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

impl Chain {
    /// The next line for `event` at `time_ms` (without its newline); advances the chain.
    pub fn append(&mut self, event: &Event, time_ms: u64) -> String {
        let line = Line {
            seq: self.next_seq,
            time: crate::clock::Utc::from_unix_ms(time_ms).rfc3339(),
            who: event.who.clone(),
            user: event.user.clone(),
            action: event.action.clone(),
            key: event.key.clone(),
            recording: event.recording.clone(),
            outcome: event.outcome.clone(),
            prev: hex::encode(self.last_hash),
        };
        let text = serde_json::to_string(&line).expect("strings and numbers always serialize");
        self.next_seq += 1;
        self.last_hash = Sha256::digest(text.as_bytes()).into();
        text
    }
}

/// Checks a whole log: every line parses, numbers run 0, 1, 2, … and each names the hash of
/// the one before. Returns where the chain stands after the last line. An edited line shows
/// at the line after it (whose `prev` no longer matches), and the error names both.
pub fn verify(text: &str) -> Result<Chain, AuditError> {
    verify_from(Chain::default(), text)
}

/// Checks lines that continue a log whose chain stood at `chain` (line numbers in errors
/// count from that point's first line as 1 more than `chain.next_seq`).
pub fn verify_from(start: Chain, text: &str) -> Result<Chain, AuditError> {
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
        chain.next_seq += 1;
        chain.last_hash = Sha256::digest(raw.as_bytes()).into();
    }
    Ok(chain)
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
}

impl AuditLog {
    /// Opens (or creates, 0600) the log at `path`, verifying what is there first.
    pub fn open(path: &Path) -> io::Result<AuditLog> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let chain = verify(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}; not appending to a broken log", path.display()),
            )
        })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            chain,
            len: text.len() as u64,
        })
    }

    /// Appends one event (one write, then a sync) and returns the chain after it.
    pub fn append(&mut self, event: &Event, time_ms: u64) -> io::Result<Chain> {
        let shown = self.path.display().to_string();
        let err = |e: io::Error| io::Error::new(e.kind(), format!("{shown}: {e}"));
        self.file.lock().map_err(err)?;
        let done = self.append_locked(event, time_ms);
        let unlocked = self.file.unlock().map_err(err);
        let chain = done.map_err(err)?;
        unlocked?;
        Ok(chain)
    }

    fn append_locked(&mut self, event: &Event, time_ms: u64) -> io::Result<Chain> {
        use std::io::{Seek, SeekFrom};
        let end = self.file.metadata()?.len();
        if end != self.len {
            // Lines another process appended: verified and chained onto, never trusted blindly.
            self.file.seek(SeekFrom::Start(self.len))?;
            let mut text = String::new();
            (&mut self.file)
                .take(end.saturating_sub(self.len))
                .read_to_string(&mut text)?;
            self.chain = verify_from(self.chain, &text).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{e}; not appending to a broken log"),
                )
            })?;
            self.len = end;
        }
        let mut next = self.chain;
        let mut line = next.append(event, time_ms);
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        self.chain = next;
        self.len += line.len() as u64;
        Ok(next)
    }

    /// Where the chain stands.
    pub fn chain(&self) -> Chain {
        self.chain
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

    fn log(n: u64) -> String {
        let mut c = Chain::default();
        (0..n)
            .map(|i| c.append(&event(i), 1_796_051_045_123 + i) + "\n")
            .collect()
    }

    #[test]
    fn two_writers_of_one_log_chain_onto_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut service = AuditLog::open(&path).unwrap();
        service.append(&event(0), 1).unwrap();
        let mut admin = AuditLog::open(&path).unwrap();
        admin.append(&event(1), 2).unwrap();
        admin.append(&event(2), 3).unwrap();
        service.append(&event(3), 4).unwrap();
        admin.append(&event(4), 5).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(verify(&text).unwrap().next_seq, 5, "{text}");
        // Lines appended by someone else that do not continue the chain are found before
        // the next append, which refuses to chain onto them.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(log(1).as_bytes())
            .unwrap();
        let e = service.append(&event(5), 6).unwrap_err();
        assert!(e.to_string().contains("broken log"), "{e}");
    }

    #[test]
    fn lines_are_fixed_json_chained_from_zeros() {
        let mut c = Chain::default();
        let first = c.append(&event(0), 1_796_051_045_123);
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
        let second = c.append(&event(1), 1_796_051_045_124);
        assert!(second.contains(&format!(
            "\"prev\":\"{}\"",
            hex::encode(Sha256::digest(&first))
        )));
        assert_eq!(c.next_seq, 2);
        assert_eq!(verify(&format!("{first}\n{second}\n")), Ok(c));
        assert_eq!(verify(""), Ok(Chain::default()));
    }

    #[test]
    fn removed_edited_moved_and_torn_lines_are_named() {
        let text = log(6);
        let lines: Vec<&str> = text.lines().collect();
        let join = |v: Vec<&str>| v.join("\n") + "\n";
        let mut removed = lines.clone();
        removed.remove(2);
        assert_eq!(verify(&join(removed)).unwrap_err().line, 3);
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&join(swapped)).unwrap_err().line, 2);
        let edited = text.replacen("\"outcome\":\"ok\"", "\"outcome\":\"denied\"", 1);
        let e = verify(&edited).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(verify(&text[..text.len() - 1]).is_err(), "torn last line");
        assert!(verify(&format!("{text}\n")).is_err(), "an empty line");
        assert!(verify(&format!("{text}{{\"seq\":6}}\n")).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any one byte changed before the last line breaks the chain (a change in the last
        /// line only the reported last hash can catch).
        #[test]
        fn any_byte_changed_before_the_last_line_breaks_the_chain(
            n in 2u64..8, at in any::<prop::sample::Index>(), to in any::<u8>()
        ) {
            let text = log(n);
            let last_start = text[..text.len() - 1].rfind('\n').map_or(0, |i| i + 1);
            let i = at.index(last_start);
            prop_assume!(text.as_bytes()[i] != to);
            let mut bytes = text.clone().into_bytes();
            bytes[i] = to;
            let changed = String::from_utf8_lossy(&bytes);
            prop_assert!(verify(&changed).is_err());
        }
    }

    #[test]
    fn the_file_log_resumes_its_chain_and_refuses_a_broken_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut a = AuditLog::open(&path).unwrap();
        a.append(&event(0), 1).unwrap();
        a.append(&event(1), 2).unwrap();
        drop(a);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut a = AuditLog::open(&path).unwrap();
        assert_eq!(a.chain().next_seq, 2);
        let c = a.append(&event(2), 3).unwrap();
        assert_eq!(verify(&std::fs::read_to_string(&path).unwrap()), Ok(c));
        drop(a);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("client-1", "client-9", 1)).unwrap();
        let e = AuditLog::open(&path).unwrap_err();
        assert!(
            e.to_string().contains("line 3") && e.to_string().contains("line 2"),
            "{e}"
        );
    }
}
