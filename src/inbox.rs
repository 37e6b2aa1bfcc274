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

use crate::durable::sync_dir;
use crate::format::{Metadata, Wrap};
use crate::keys::KekHandle;
use crate::metrics::Metrics;
use crate::spool::{ActiveFile, Place, Spool};
use crate::writer::{Media, SealOptions, Sealer, seal_stream};

/// The claims directory inside the inbox.
pub const CLAIMS: &str = ".edgerec";
/// What a sidecar's name ends with.
pub const SIDECAR: &str = ".meta.json";
/// The largest sidecar read.
const MAX_SIDECAR: u64 = 64 << 10;

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
    Seal(#[from] crate::Error),
    /// No usable KEK (the key manager's key is stale and the policy refuses).
    #[error("no usable KEK")]
    NoKek,
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
        Ok(Inbox {
            dir: dir.to_path_buf(),
            spool,
            keks,
            wrap,
            max_chunk,
            metrics,
            accepting,
        })
    }

    fn claims(&self) -> PathBuf {
        self.dir.join(CLAIMS)
    }

    /// The claims a crash left, by recording id: (name, has a sidecar).
    fn left_claims(&self) -> io::Result<Vec<(Uuid, String, bool)>> {
        let mut found: std::collections::BTreeMap<Uuid, (String, bool)> = Default::default();
        for e in fs::read_dir(self.claims())? {
            let file = e?.file_name().to_string_lossy().into_owned();
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
            Err(e) => self.failed(None, &e.to_string()),
        }
        let names = match fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| eligible(n))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.failed(None, &e.to_string());
                return sealed;
            }
        };
        for name in names {
            sealed += usize::from(self.take(&name));
        }
        sealed
    }

    fn failed(&self, recording: Option<Uuid>, why: &str) {
        self.metrics.inbox_errors.inc();
        match recording {
            Some(id) => {
                tracing::error!(recording = %id, error = why, "inbox: not sealed; the file stays and is tried again")
            }
            None => tracing::error!(error = why, "inbox: cannot read the inbox"),
        }
    }

    /// Claims and seals one file of the inbox by name.
    pub fn take(&self, name: &str) -> bool {
        if !eligible(name) || !self.dir.join(name).is_file() {
            return false;
        }
        if self.keks.current().is_empty() {
            self.failed(None, "no usable KEK");
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
                self.failed(Some(id), &e.to_string());
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
            self.failed(Some(id), &e.to_string());
        }
        self.finish_claim(id, name, sidecar)
    }

    fn finish_claim(&self, id: Uuid, name: &str, sidecar: bool) -> bool {
        match self.seal(id, name, sidecar) {
            Ok(bytes) => {
                self.metrics.inbox_sealed.inc();
                tracing::info!(recording = %id, bytes, "inbox: sealed and removed from the inbox");
                true
            }
            Err(e) => {
                self.failed(Some(id), &e.to_string());
                false
            }
        }
    }

    fn metadata(&self, id: Uuid, name: &str, sidecar: bool) -> Metadata {
        let mut meta = Metadata::new();
        if sidecar {
            let path = self.claims().join(format!("{id}.{name}{SIDECAR}"));
            let doc = fs::File::open(&path).and_then(|f| {
                let mut text = Vec::new();
                f.take(MAX_SIDECAR + 1).read_to_end(&mut text)?;
                Ok(text)
            });
            match doc.map(|t| {
                (t.len() as u64 <= MAX_SIDECAR)
                    .then(|| serde_json::from_slice::<Metadata>(&t).ok())
                    .flatten()
            }) {
                Ok(Some(m)) => meta = m,
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
        let mut input = fs::File::open(&claim)?;
        let opts = SealOptions {
            wrap: self.wrap,
            max_chunk: self.max_chunk,
            media: Media::File,
            recording_id: Some(id),
            ..SealOptions::default()
        };
        let mut sealer = Sealer::new(&keks, &opts)?;
        let mut first = sealer.header_bytes().to_vec();
        sealer.seal_metadata(&self.metadata(id, name, sidecar), &mut first)?;
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
        self.spool.finish(active, &[], crate::clock::now_ms())?;
        Ok(size)
    }

    /// Seals what is there now and what is renamed in later, until `stop`: an inotify watch
    /// on the inbox, and a scan every `rescan` as the safety net. Runs on its own thread.
    pub fn run(self, rescan: Duration, stop: Arc<AtomicBool>) -> notify::Result<()> {
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
        while !stop.load(Ordering::Relaxed) {
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
