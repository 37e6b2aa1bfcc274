//! Digital recordings and transcripts (`[inbox]`): files another system leaves in the inbox
//! directory are sealed as packages of media `file` and delivered like calls. The inbox is
//! the one place on the appliance where plaintext lies, put there by that other system.
//!
//! A file is taken when it is renamed into the inbox (writers write elsewhere on the same
//! file system first, as maildir does), or when found there at start or by the periodic
//! scan. A JSON object in `<name>.meta.json` beside it (renamed in first) is its metadata.
//! Names starting with `.` are never taken. While the disk policy refuses new recordings
//! (`spool_max_bytes`, `min_free_bytes`), files wait in the inbox, counted as refused.
//!
//! Only regular files are sealed. The claimed file is opened with `O_NOFOLLOW` and checked
//! by `fstat` on the open descriptor (so nothing swapped in between is read): a symlink
//! renamed in (to `/proc/self/environ`, to the service's secrets) or a FIFO, device or
//! directory is moved to `.edgerec/refused/` with a `.reason` file beside it, counted
//! (`edgerec_inbox_errors_total{reason}`), and never read. The inbox path is made absolute
//! at open, so a relative `inbox.dir` works with the watcher.
//!
//! Invariants — nothing lost, nothing doubled, across a crash at any point:
//! 1. Claim: the file (and its sidecar) is renamed to `.edgerec/<recording id>.<name>` in
//!    the inbox; the claim directory is synced. The plaintext never leaves the inbox.
//! 2. Seal into the spool's `active/<id>.erec.part`, end record included, and sync it.
//! 3. Remove the claim (synced), then move the package to `ready/` with its state.
//!
//! At start, before the spool's own recovery, every claim left by a crash has its partial
//! package (if any) deleted and is sealed again under the same recording id; a package
//! whose claim is gone was complete (step 3 began), and the spool's recovery delivers it.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use uuid::Uuid;

use crate::appliance::metrics::Metrics;
use crate::appliance::outcomes::Fact;
use crate::appliance::shutdown::Shutdown;
use crate::appliance::spool::{ActiveFile, Place, Spool};
use edgerec_net::durable::sync_dir;
use erec::format::{Metadata, Wrap};
use erec::keys::KekHandle;
use erec::writer::{Media, SealOptions, Sealer, seal_stream};

/// The claims directory inside the inbox.
pub const CLAIMS: &str = ".edgerec";
/// What a sidecar's name ends with.
pub const SIDECAR: &str = ".meta.json";
/// The largest sidecar read.
const MAX_SIDECAR: u64 = 64 << 10;

/// Where refused entries go, inside the claims directory.
pub const REFUSED: &str = "refused";

/// Whether a name in the inbox is a file to seal (not hidden, not a sidecar).
pub fn eligible(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.ends_with(SIDECAR)
}

/// A claim's file name split into (recording id, original name, is the sidecar).
pub fn parse_claim(file: &str) -> Option<(Uuid, String, bool)> {
    let (id, rest) = file.split_at_checked(36)?;
    let id = Uuid::parse_str(id).ok()?;
    let name = rest.strip_prefix('.')?;
    match name.strip_suffix(SIDECAR) {
        Some(n) if eligible(n) => Some((id, n.to_string(), true)),
        _ if eligible(name) => Some((id, name.to_string(), false)),
        _ => None,
    }
}

/// Why a file could not be sealed (it stays where it is, and is tried again).
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// File-system trouble.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Sealing failed.
    #[error("{0}")]
    Seal(#[from] erec::Error),
    /// No usable KEK (the key manager's key is stale and the policy refuses).
    #[error("no usable KEK")]
    NoKek,
    /// Not a regular file (the reason for the metric, and what it is): refused for good.
    #[error("not a regular file: {1}")]
    NotRegular(&'static str, String),
}

/// Opens a claimed file for reading if it is a regular file: never through a symlink
/// (`O_NOFOLLOW`), never blocking on a FIFO (`O_NONBLOCK`, cleared for the reads after),
/// and judged by `fstat` on the descriptor itself.
fn open_regular(path: &Path) -> Result<fs::File, InboxError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(InboxError::NotRegular("symlink", "a symbolic link".into()));
        }
        Err(e) => return Err(e.into()),
    };
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(InboxError::NotRegular("not_regular", what.into()));
    }
    // Reads of a regular file never block; the flag only kept a FIFO's open from doing so.
    rustix::fs::fcntl_setfl(&f, rustix::fs::OFlags::empty()).map_err(io::Error::from)?;
    Ok(f)
}

/// The inbox and what sealing needs.
pub struct Inbox {
    dir: PathBuf,
    spool: Spool,
    keks: KekHandle,
    wrap: Wrap,
    max_chunk: u32,
    metrics: Arc<Metrics>,
    /// False while the disk policy refuses new recordings: files wait in the inbox.
    accepting: Arc<AtomicBool>,
    /// The outcome journal: told of each file sealed (started and ended at once; a file that
    /// waits for room is not refused, it is sealed later).
    outcomes: Option<crate::appliance::outcomes::Outcomes>,
}

/// Appends through an active spool file.
struct Appender<'a>(&'a mut ActiveFile);

impl Write for Appender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Inbox {
    /// The inbox at `dir` (made 0700 with its claims directory if missing).
    pub fn open(
        dir: &Path,
        spool: Spool,
        keks: KekHandle,
        wrap: Wrap,
        max_chunk: u32,
        metrics: Arc<Metrics>,
        accepting: Arc<AtomicBool>,
    ) -> io::Result<Inbox> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(CLAIMS))?;
        // Absolute: the watcher names what arrives by absolute path.
        let dir = fs::canonicalize(dir)?;
        Ok(Inbox {
            dir,
            spool,
            keks,
            wrap,
            max_chunk,
            metrics,
            accepting,
            outcomes: None,
        })
    }

    fn claims(&self) -> PathBuf {
        self.dir.join(CLAIMS)
    }

    /// The claims a crash left, by recording id: (name, has a sidecar).
    fn left_claims(&self) -> io::Result<Vec<(Uuid, String, bool)>> {
        let mut found: std::collections::BTreeMap<Uuid, (String, bool)> = Default::default();
        for e in fs::read_dir(self.claims())? {
            let e = e?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                continue; // refused/
            }
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some((id, name, sidecar)) = parse_claim(&file) {
                let entry = found.entry(id).or_insert((name, false));
                entry.1 |= sidecar;
            }
        }
        Ok(found.into_iter().map(|(id, (n, s))| (id, n, s)).collect())
    }

    /// Step one of the start, before the spool's own recovery: deletes the partial package
    /// of every claim a crash left (its plaintext is still claimed in the inbox and is sealed
    /// again). Returns how many claims wait.
    pub fn prepare_recovery(dir: &Path, spool: &Spool) -> io::Result<usize> {
        let claims = dir.join(CLAIMS);
        let Ok(entries) = fs::read_dir(&claims) else {
            return Ok(0);
        };
        let mut ids = std::collections::BTreeSet::new();
        for e in entries {
            let file = e?.file_name().to_string_lossy().into_owned();
            if let Some((id, _, _)) = parse_claim(&file) {
                ids.insert(id);
            }
        }
        for id in &ids {
            let part = spool.package_path(Place::Active, *id);
            match fs::remove_file(&part) {
                Ok(()) => {
                    tracing::warn!(recording = %id, "inbox: a package cut short by a crash is made again from its claimed file");
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if !ids.is_empty() {
            sync_dir(&spool.dir(Place::Active))?;
        }
        Ok(ids.len())
    }

    /// Seals the claims a crash left, then everything eligible in the inbox. Returns how
    /// many files were sealed; a file that fails stays and is counted.
    pub fn scan(&self) -> usize {
        let mut sealed = 0;
        match self.left_claims() {
            Ok(claims) => {
                for (id, name, sidecar) in claims {
                    sealed += usize::from(self.finish_claim(id, &name, sidecar));
                }
            }
            Err(e) => self.failed(None, "io", &e.to_string()),
        }
        // Every eligible name, whatever it is: what is not a regular file is refused (and
        // moved out of the way) rather than looked at again at every scan.
        let names = match fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| eligible(n))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.failed(None, "io", &e.to_string());
                return sealed;
            }
        };
        for name in names {
            sealed += usize::from(self.take(&name));
        }
        sealed
    }

    fn failed(&self, recording: Option<Uuid>, reason: &str, why: &str) {
        Metrics::inc(&self.metrics.inbox_errors, reason, 1);
        match recording {
            Some(id) => {
                tracing::error!(recording = %id, error = why, "inbox: not sealed; the file stays and is tried again")
            }
            None => tracing::error!(error = why, "inbox: cannot read the inbox"),
        }
    }

    /// Moves a refused entry (`from`, the inbox name or its claim) to `.edgerec/refused/`
    /// with the reason beside it, and counts it.
    fn refuse(&self, from: &Path, id: Uuid, name: &str, reason: &'static str, what: &str) {
        let refused = self.claims().join(REFUSED);
        let to = refused.join(format!("{id}.{name}"));
        let made = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&refused);
        // Its sidecar goes with it, claimed or not.
        let side = format!("{name}{SIDECAR}");
        for sidecar in [
            self.claims().join(format!("{id}.{side}")),
            self.dir.join(&side),
        ] {
            if made.is_ok() && fs::symlink_metadata(&sidecar).is_ok() {
                let _ = fs::rename(&sidecar, refused.join(format!("{id}.{side}")));
                break;
            }
        }
        let moved = made
            .and_then(|()| fs::rename(from, &to))
            .and_then(|()| {
                edgerec_net::durable::replace_file(
                    &refused.join(format!("{id}.{name}.reason")),
                    format!("{what}: only regular files are sealed\n").as_bytes(),
                )
            })
            .and_then(|()| sync_dir(&self.claims()).and_then(|()| sync_dir(&self.dir)));
        match moved {
            Ok(()) => tracing::warn!(
                recording = %id,
                name,
                "inbox: {what}, not a regular file: refused, moved to .edgerec/refused/"
            ),
            Err(e) => tracing::error!(
                name,
                error = %e,
                "inbox: {what}, not a regular file: refused, and cannot be moved aside"
            ),
        }
        // Counted once it is dealt with: whoever sees the count finds it moved aside.
        Metrics::inc(&self.metrics.inbox_errors, reason, 1);
    }

    /// Claims and seals one file of the inbox by name.
    pub fn take(&self, name: &str) -> bool {
        let path = self.dir.join(name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return false;
        };
        if !eligible(name) {
            return false;
        }
        if !meta.file_type().is_file() {
            let (reason, what) = if meta.file_type().is_symlink() {
                ("symlink", "a symbolic link")
            } else {
                ("not_regular", "not a regular file")
            };
            self.refuse(&path, Uuid::now_v7(), name, reason, what);
            return false;
        }
        if self.keks.current().is_empty() {
            self.failed(None, "seal", "no usable KEK");
            return false;
        }
        if !self.accepting.load(Ordering::Relaxed) {
            // The spool is full: the file waits where it is (the next scan takes it).
            Metrics::inc(&self.metrics.recordings_refused, "spool_full", 1);
            return false;
        }
        let id = Uuid::now_v7();
        let claim = self.claims().join(format!("{id}.{name}"));
        if let Err(e) = fs::rename(self.dir.join(name), &claim) {
            if e.kind() != io::ErrorKind::NotFound {
                self.failed(Some(id), "io", &e.to_string());
            }
            return false;
        }
        let side = format!("{name}{SIDECAR}");
        let sidecar = fs::rename(
            self.dir.join(&side),
            self.claims().join(format!("{id}.{side}")),
        )
        .is_ok();
        if let Err(e) = sync_dir(&self.claims()).and_then(|()| sync_dir(&self.dir)) {
            self.failed(Some(id), "io", &e.to_string());
        }
        self.finish_claim(id, name, sidecar)
    }

    /// Notes a fact in the outcome journal, if there is one.
    fn note(&self, fact: Fact) {
        if let Some(o) = &self.outcomes {
            o.note(fact);
        }
    }

    /// With the outcome journal to tell.
    pub fn with_outcomes(mut self, outcomes: crate::appliance::outcomes::Outcomes) -> Inbox {
        self.outcomes = Some(outcomes);
        self
    }

    fn finish_claim(&self, id: Uuid, name: &str, sidecar: bool) -> bool {
        match self.seal(id, name, sidecar) {
            Ok(bytes) => {
                self.metrics.inbox_sealed.inc();
                self.note(Fact::Started {
                    id,
                    port: 0,
                    continues: None,
                });
                self.note(Fact::Ended {
                    id,
                    reason: "complete".into(),
                });
                tracing::info!(recording = %id, bytes, "inbox: sealed and removed from the inbox");
                true
            }
            Err(InboxError::NotRegular(reason, what)) => {
                // Swapped in after the look at its name, or left claimed by an older version:
                // refused all the same, never read.
                let claim = self.claims().join(format!("{id}.{name}"));
                self.refuse(&claim, id, name, reason, &what);
                false
            }
            Err(e) => {
                let reason = if matches!(e, InboxError::Io(_)) {
                    "io"
                } else {
                    "seal"
                };
                self.failed(Some(id), reason, &e.to_string());
                false
            }
        }
    }

    fn metadata(&self, id: Uuid, name: &str, sidecar: bool) -> Metadata {
        /// The keys export reads kept only when they hold what it expects: a `media_type` of
        /// [`crate::media::MEDIA_TYPES`], a `conversation_id` of 1 to 256 characters; what
        /// is kept out is named in `sidecar_error`.
        fn checked(mut m: Metadata) -> Metadata {
            let mut wrong = Vec::new();
            if m.get("media_type").is_some_and(|t| {
                !t.as_str()
                    .is_some_and(|t| crate::media::MEDIA_TYPES.contains(&t))
            }) {
                m.remove("media_type");
                wrong.push(format!(
                    "media_type is none of {}",
                    crate::media::MEDIA_TYPES.join(", ")
                ));
            }
            if m.get("conversation_id").is_some_and(|c| {
                !c.as_str()
                    .is_some_and(|c| (1..=256).contains(&c.chars().count()))
            }) {
                m.remove("conversation_id");
                wrong.push("conversation_id is not a text of 1 to 256 characters".into());
            }
            if !wrong.is_empty() {
                m.insert(
                    "sidecar_error".into(),
                    format!("{}; kept out", wrong.join("; ")).into(),
                );
            }
            m
        }
        let mut meta = Metadata::new();
        if sidecar {
            let path = self.claims().join(format!("{id}.{name}{SIDECAR}"));
            let doc = open_regular(&path)
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|f| {
                    let mut text = Vec::new();
                    f.take(MAX_SIDECAR + 1).read_to_end(&mut text)?;
                    Ok(text)
                });
            match doc.map(|t| {
                (t.len() as u64 <= MAX_SIDECAR)
                    .then(|| serde_json::from_slice::<Metadata>(&t).ok())
                    .flatten()
            }) {
                Ok(Some(m)) => meta = checked(m),
                _ => {
                    meta.insert(
                        "sidecar_error".into(),
                        "the sidecar was not a JSON object of at most 64 KiB; kept out".into(),
                    );
                }
            }
        }
        meta.insert("name".into(), name.into());
        meta.insert("source".into(), "inbox".into());
        meta
    }

    /// Steps 2 and 3. Returns the package's size.
    fn seal(&self, id: Uuid, name: &str, sidecar: bool) -> Result<u64, InboxError> {
        let keks = self.keks.current();
        if keks.is_empty() {
            return Err(InboxError::NoKek);
        }
        let claim = self.claims().join(format!("{id}.{name}"));
        let mut input = open_regular(&claim)?;
        let opts = SealOptions {
            wrap: self.wrap,
            max_chunk: self.max_chunk,
            media: Media::File,
            recording_id: Some(id),
            ..SealOptions::default()
        };
        let mut sealer = Sealer::new(&keks, &opts)?;
        let mut first = sealer.header_bytes().to_vec();
        let metadata = self.metadata(id, name, sidecar);
        if let (Some(o), Some(c)) = (
            &self.outcomes,
            metadata.get("conversation_id").and_then(|c| c.as_str()),
        ) {
            o.note_conversation(id, c);
        }
        sealer.seal_metadata(&metadata, &mut first)?;
        let header_len = sealer.header_bytes().len();
        let mut active = self.spool.create(id, &first[..header_len])?;
        active.append(&first[header_len..])?;
        seal_stream(sealer, &mut input, &mut Appender(&mut active), true, 1)?;
        active.sync()?;
        let size = active.len();
        fs::remove_file(&claim)?;
        if sidecar {
            fs::remove_file(self.claims().join(format!("{id}.{name}{SIDECAR}")))?;
        }
        sync_dir(&self.claims())?;
        self.spool.finish(active, &[], erec::clock::now_ms())?;
        Ok(size)
    }

    /// Seals what is there now and what is renamed in later, until `stop`: an inotify watch
    /// on the inbox, and a scan every `rescan` as the safety net. Runs on its own thread.
    pub fn run(self, rescan: Duration, stop: Shutdown) -> notify::Result<()> {
        use notify::event::{ModifyKind, RenameMode};
        use notify::{EventKind, RecursiveMode, Watcher};
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev
                && matches!(
                    ev.kind,
                    EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                )
            {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
        })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        self.scan();
        let mut last_scan = std::time::Instant::now();
        while !stop.is_triggered() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(path) => {
                    if path.parent() == Some(self.dir.as_path())
                        && let Some(name) = path.file_name().and_then(|n| n.to_str())
                    {
                        self.take(name);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_scan.elapsed() >= rescan {
                self.scan();
                last_scan = std::time::Instant::now();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_claims() {
        assert!(eligible("call.mp3") && eligible("chat transcript.txt"));
        assert!(!eligible(".partial") && !eligible("call.mp3.meta.json") && !eligible(""));
        let id = Uuid::now_v7();
        assert_eq!(
            parse_claim(&format!("{id}.call.mp3")),
            Some((id, "call.mp3".into(), false))
        );
        assert_eq!(
            parse_claim(&format!("{id}.call.mp3.meta.json")),
            Some((id, "call.mp3".into(), true))
        );
        assert_eq!(parse_claim("not-a-uuid.call.mp3"), None);
        assert_eq!(parse_claim(&format!("{id}..hidden")), None);
        assert_eq!(parse_claim(&format!("{id}")), None);
    }
}
