//! The spool: where packages are written while they record and wait for the store. Only
//! ciphertext is ever written here.
//!
//! ```text
//! spool/active/<id>.erec.part     being written (created O_EXCL, header synced with the dir)
//! spool/ready/<id>.erec           sealed or recovered, waiting for the store
//! spool/ready/<id>.json           its upload state (size, SHA-256, terminated, attempts, …)
//! spool/failed/<id>.erec + .json  refused by the store for good; listable, re-queueable,
//!                                 never deleted by edgerec
//! spool/quarantine/<name>         what cannot even be walked, with <name>.reason
//! ```
//!
//! States and moves (each move is a rename within one file system, followed by a sync of
//! the directories involved, so a crash leaves every package in exactly one state):
//!
//! ```text
//! create ──► active ──finish──► ready ──stored──► (removed)
//!              │                  └──refused──► failed ──retry──► ready
//!              └──crash, then recover──► ready (state: unterminated)  or  quarantine
//! ```
//!
//! Recovery at start needs no key: each `.part` file is walked by its record lengths, its
//! torn tail is cut and it moves to `ready/` marked unterminated (or terminated, if the end
//! record reached the disk before the crash). A file whose header cannot be walked moves to
//! `quarantine/` with a reason: it never stops the start and is never retried in a loop. A
//! `ready/` package without its state file (a crash between the two writes) gets its state
//! rebuilt. State files are written to a temporary name, synced and renamed.
//!
//! Invariants: files are 0600 and directories 0700; nothing here deletes a package except
//! [`Spool::remove_stored`], which the uploader calls only after the store confirmed it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use edgerec_net::durable::sync_dir;
use erec::recover::cut_torn_tail;

use crate::store::Multipart;

/// The upload state kept beside each package in `ready/` and `failed/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// The recording id.
    pub id: Uuid,
    /// Package size in bytes.
    pub size: u64,
    /// SHA-256 of the whole package, hex.
    pub sha256: String,
    /// Whether the package has its end record.
    pub terminated: bool,
    /// Why it is unterminated, when it is ("recovered after a crash").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unterminated_reason: Option<String>,
    /// When it became ready, unix ms.
    pub ready_ms: u64,
    /// Upload attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before this time, unix ms.
    #[serde(default)]
    pub next_attempt_ms: u64,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A multipart upload in progress, so that a restart resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<Multipart>,
    /// The object key below the prefix, for a package that is not a recording (a manifest:
    /// `manifests/…`); a recording's follows from its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

impl UploadState {
    /// The state of a package that just became ready: no attempt yet; `unterminated` says
    /// why it has no end record, if it has none.
    pub fn new(
        id: Uuid,
        size: u64,
        sha256: String,
        unterminated: Option<String>,
        now_ms: u64,
    ) -> Self {
        UploadState {
            id,
            size,
            sha256,
            terminated: unterminated.is_none(),
            unterminated_reason: unterminated,
            ready_ms: now_ms,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            multipart: None,
            object: None,
        }
    }

    /// Its object key in the store under `prefix`.
    pub fn object_key(&self, prefix: &str) -> String {
        match &self.object {
            Some(o) => format!("{prefix}{o}"),
            None => crate::store::object_key(prefix, self.id),
        }
    }

    /// Whether it is a recording (not a manifest): what the outcome journal speaks of.
    pub fn is_recording(&self) -> bool {
        self.object.is_none()
    }
}

/// The spool's directories.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

/// Which directory a package is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Being written.
    Active,
    /// Waiting for the store.
    Ready,
    /// Refused by the store.
    Failed,
    /// Unreadable.
    Quarantine,
}

impl Place {
    fn dir(self) -> &'static str {
        match self {
            Place::Active => "active",
            Place::Ready => "ready",
            Place::Failed => "failed",
            Place::Quarantine => "quarantine",
        }
    }
}

fn with_path(e: io::Error, what: &str, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

use erec::crypto::sha256_file;

/// Above this many packages at once, one `syncfs` replaces the per-file syncs.
const GROUP_SYNC_ABOVE: usize = 4;

/// What the spool holds, for the metrics and the disk policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Package files: active, ready, failed, quarantine.
    pub files: [u64; 4],
    /// Bytes of all files.
    pub bytes: u64,
    /// When the oldest package in `ready/` got there (its modification time), unix ms.
    pub oldest_ready_ms: Option<u64>,
    /// Bytes free for unprivileged use on the spool's file system.
    pub free_bytes: u64,
}

/// What recovery did with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// A `.part` file moved to `ready/`; `cut` bytes of torn tail removed.
    Recovered {
        /// The recording id.
        id: Uuid,
        /// Whether its end record was there.
        terminated: bool,
        /// Torn bytes cut.
        cut: u64,
    },
    /// A `ready/` package got its missing state file.
    StateRebuilt(Uuid),
    /// A file moved to `quarantine/`.
    Quarantined {
        /// Its file name.
        name: String,
        /// Why.
        reason: String,
    },
}

impl Spool {
    /// Opens (creating, 0700) the spool at `root`, and checks that it is writable.
    pub fn open(root: &Path) -> io::Result<Spool> {
        let spool = Spool {
            root: root.to_path_buf(),
        };
        for place in [
            Place::Active,
            Place::Ready,
            Place::Failed,
            Place::Quarantine,
        ] {
            let d = spool.dir(place);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| with_path(e, "cannot create spool directory", &d))?;
        }
        let probe = spool.probe_path();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .and_then(|mut f| f.write_all(b"probe"))
            .map_err(|e| with_path(e, "spool is not writable:", &spool.root))?;
        fs::remove_file(&probe).map_err(|e| with_path(e, "cannot remove", &probe))?;
        Ok(spool)
    }

    /// The spool at `root` as it is, for the operator's tools: nothing is created or probed
    /// (the appliance may be running on it).
    pub fn existing(root: &Path) -> io::Result<Spool> {
        let spool = Spool {
            root: root.to_path_buf(),
        };
        for place in [Place::Ready, Place::Failed] {
            let d = spool.dir(place);
            if !d.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{} is not a spool (no {} in it)",
                        root.display(),
                        d.display()
                    ),
                ));
            }
        }
        Ok(spool)
    }

    /// A write probe of this process's own, so that two processes probing one spool (the
    /// appliance and an operator's tool) never remove each other's probe.
    fn probe_path(&self) -> PathBuf {
        let n = getrandom::u64().unwrap_or(0);
        self.dir(Place::Active)
            .join(format!(".write-probe-{}-{n:016x}", std::process::id()))
    }

    /// The spool's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a place.
    pub fn dir(&self, place: Place) -> PathBuf {
        self.root.join(place.dir())
    }

    /// The package file of `id` in `place`.
    pub fn package_path(&self, place: Place, id: Uuid) -> PathBuf {
        let name = match place {
            Place::Active => format!("{id}.erec.part"),
            _ => format!("{id}.erec"),
        };
        self.dir(place).join(name)
    }

    /// The state file of `id` in `place` (ready or failed).
    pub fn state_path(&self, place: Place, id: Uuid) -> PathBuf {
        self.dir(place).join(format!("{id}.json"))
    }

    /// Starts a package: creates `active/<id>.erec.part` (O_EXCL, 0600), writes the header
    /// and syncs file and directory, so the package exists after a crash.
    pub fn create(&self, id: Uuid, header: &[u8]) -> io::Result<ActiveFile> {
        let mut f = self.create_unsynced(id, header)?;
        f.file.sync_all()?;
        sync_dir(&self.dir(Place::Active))?;
        f.dirty = false;
        f.new_entry = false;
        Ok(f)
    }

    /// Like [`Spool::create`], but leaves file and directory to the next group commit
    /// ([`ActiveFile::sync`] with [`Spool::sync_active_dir`], or [`Spool::sync_fs`]): a
    /// thousand calls starting in one second cost one sync, not two thousand. A crash before
    /// that commit loses at most the flush interval the recording had.
    pub fn create_unsynced(&self, id: Uuid, header: &[u8]) -> io::Result<ActiveFile> {
        let path = self.package_path(Place::Active, id);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| with_path(e, "cannot create", &path))?;
        file.write_all(header)?;
        let mut hash = Sha256::new();
        hash.update(header);
        Ok(ActiveFile {
            id,
            file,
            hash,
            len: header.len() as u64,
            dirty: true,
            new_entry: true,
        })
    }

    /// Makes new entries of `active/` durable (after per-file syncs of new packages).
    pub fn sync_active_dir(&self) -> io::Result<()> {
        sync_dir(&self.dir(Place::Active))
    }

    /// Ends a package: appends `end` (the end record), syncs, renames it to `ready/`, writes
    /// its state file, syncs the directories. Returns the state.
    pub fn finish(&self, f: ActiveFile, end: &[u8], now_ms: u64) -> io::Result<UploadState> {
        let id = f.id;
        self.finish_all(vec![(f, end.to_vec())], now_ms)
            .pop()
            .map(|(_, r)| r)
            .unwrap_or_else(|| Err(io::Error::other(format!("package {id} was not finished"))))
    }

    /// Keeps a package whose write failed (a full disk): cuts what the failed write left past
    /// its last whole record, syncs, moves it to `ready/` unterminated with `why`, and writes
    /// its state. If that fails too, the file stays in `active/` (or `ready/` without a state)
    /// and recovery at the next start delivers it.
    pub fn salvage(&self, f: ActiveFile, why: &str, now_ms: u64) -> io::Result<UploadState> {
        let ActiveFile {
            id,
            file,
            hash,
            len,
            ..
        } = f;
        let from = self.package_path(Place::Active, id);
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(|e| with_path(e, "cannot cut", &from))?;
        drop(file);
        fs::rename(&from, self.package_path(Place::Ready, id))
            .map_err(|e| with_path(e, "cannot move", &from))?;
        sync_dir(&self.dir(Place::Ready))?;
        sync_dir(&self.dir(Place::Active))?;
        let state = UploadState::new(
            id,
            len,
            hex::encode(hash.finalize()),
            Some(why.to_string()),
            now_ms,
        );
        self.write_state(Place::Ready, &state)?;
        Ok(state)
    }

    /// Ends many packages at once (every call that ends in one tick), with a fixed number of
    /// syncs instead of several per package: end records appended, one group commit, the
    /// renames to `ready/` and the state files, one more group commit. With a few packages
    /// each file and directory is synced on its own (cheaper than a file-system-wide sync).
    /// A package whose step fails stays in `active/` (recovery delivers it at the next
    /// start), or in `ready/` without its state (recovery rebuilds it).
    pub fn finish_all(
        &self,
        items: Vec<(ActiveFile, Vec<u8>)>,
        now_ms: u64,
    ) -> Vec<(Uuid, io::Result<UploadState>)> {
        let many = items.len() > GROUP_SYNC_ABOVE;
        let mut results = Vec::with_capacity(items.len());
        let mut staged = Vec::with_capacity(items.len());
        for (mut f, end) in items {
            let r = f
                .append(&end)
                .and_then(|()| if many { Ok(()) } else { f.file.sync_data() });
            match r {
                Ok(()) => staged.push(f),
                Err(e) => results.push((f.id, Err(e))),
            }
        }
        let fail_all = |results: &mut Vec<_>, staged: Vec<ActiveFile>, e: &io::Error| {
            for f in staged {
                results.push((f.id, Err(io::Error::new(e.kind(), e.to_string()))));
            }
        };
        if many && let Err(e) = self.sync_fs() {
            fail_all(&mut results, staged, &e);
            return results;
        }
        let mut moved = Vec::with_capacity(staged.len());
        for f in staged {
            let from = self.package_path(Place::Active, f.id);
            let to = self.package_path(Place::Ready, f.id);
            let state = UploadState::new(f.id, f.len, hex::encode(f.hash.finalize()), None, now_ms);
            let r = fs::rename(&from, &to)
                .map_err(|e| with_path(e, "cannot move", &from))
                .and_then(|()| self.write_state_unsynced(Place::Ready, &state, !many));
            match r {
                Ok(()) => moved.push(state),
                Err(e) => results.push((state.id, Err(e))),
            }
        }
        let durable = if many {
            self.sync_fs()
        } else {
            sync_dir(&self.dir(Place::Ready)).and_then(|()| sync_dir(&self.dir(Place::Active)))
        };
        match durable {
            Ok(()) => results.extend(moved.into_iter().map(|s| (s.id, Ok(s)))),
            Err(e) => {
                for s in moved {
                    results.push((s.id, Err(io::Error::new(e.kind(), e.to_string()))));
                }
            }
        }
        results
    }

    /// Counts files and bytes per place, the oldest ready package, and the free space.
    pub fn usage(&self) -> io::Result<Usage> {
        let mut u = Usage::default();
        for (i, place) in [
            Place::Active,
            Place::Ready,
            Place::Failed,
            Place::Quarantine,
        ]
        .into_iter()
        .enumerate()
        {
            for e in fs::read_dir(self.dir(place))?.filter_map(|e| e.ok()) {
                let Ok(meta) = e.metadata() else { continue };
                u.bytes += meta.len();
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".erec") || name.ends_with(".erec.part") {
                    u.files[i] += 1;
                    if place == Place::Ready {
                        let ms = meta
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                        u.oldest_ready_ms = Some(u.oldest_ready_ms.map_or(ms, |o| o.min(ms)));
                    }
                }
            }
        }
        let st = rustix::fs::statvfs(&self.root).map_err(io::Error::from)?;
        u.free_bytes = st.f_bavail.saturating_mul(st.f_frsize);
        Ok(u)
    }

    /// Whether a file can be created in the spool now.
    pub fn writable(&self) -> bool {
        let probe = self.probe_path();
        let ok = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .is_ok();
        let _ = fs::remove_file(&probe);
        ok
    }

    /// One group commit: makes every file written on the spool's file system durable with
    /// a single `syncfs`, instead of one `fdatasync` per recording.
    pub fn sync_fs(&self) -> io::Result<()> {
        let dir = File::open(&self.root)?;
        rustix::fs::syncfs(&dir).map_err(io::Error::from)
    }

    /// Writes a state file atomically (temporary name, sync, rename, directory sync).
    pub fn write_state(&self, place: Place, state: &UploadState) -> io::Result<()> {
        self.write_state_unsynced(place, state, true)?;
        sync_dir(&self.dir(place))
    }

    /// Writes a state file to a temporary name and renames it; syncs the file first only if
    /// `sync_file` (a group commit covers it otherwise). The directory is not synced.
    fn write_state_unsynced(
        &self,
        place: Place,
        state: &UploadState,
        sync_file: bool,
    ) -> io::Result<()> {
        let path = self.state_path(place, state.id);
        let (mut f, tmp) = edgerec_net::durable::create_temp(&path, 0o600)?;
        let written = f
            .write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)
            .and_then(|()| if sync_file { f.sync_all() } else { Ok(()) })
            .and_then(|()| {
                fs::rename(&tmp, &path).map_err(|e| with_path(e, "cannot rename", &tmp))
            });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Reads a state file.
    pub fn read_state(&self, place: Place, id: Uuid) -> io::Result<UploadState> {
        let path = self.state_path(place, id);
        let bytes = fs::read(&path).map_err(|e| with_path(e, "cannot read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }

    /// The ids of the packages in `place` (ready or failed), oldest id first (UUIDv7 ids
    /// sort by time).
    pub fn list(&self, place: Place) -> io::Result<Vec<Uuid>> {
        let mut ids: Vec<Uuid> = fs::read_dir(self.dir(place))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Uuid::parse_str(name.strip_suffix(".erec")?).ok()
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Moves a package and its state between `ready/` and `failed/` (package first, so a
    /// crash in between leaves a package whose state recovery rebuilds).
    pub fn move_package(&self, id: Uuid, from: Place, to: Place) -> io::Result<()> {
        let p = self.package_path(from, id);
        fs::rename(&p, self.package_path(to, id)).map_err(|e| with_path(e, "cannot move", &p))?;
        let s = self.state_path(from, id);
        fs::rename(&s, self.state_path(to, id)).map_err(|e| with_path(e, "cannot move", &s))?;
        sync_dir(&self.dir(to))?;
        sync_dir(&self.dir(from))
    }

    /// Removes a package from `ready/` after the store confirmed it (state file last).
    pub fn remove_stored(&self, id: Uuid) -> io::Result<()> {
        for p in [
            self.package_path(Place::Ready, id),
            self.state_path(Place::Ready, id),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // removed already
                Err(e) => return Err(with_path(e, "cannot remove", &p)),
            }
        }
        sync_dir(&self.dir(Place::Ready))
    }

    fn quarantine(&self, from: &Path, name: &str, reason: &str) -> io::Result<Recovery> {
        let to = self.dir(Place::Quarantine).join(name);
        fs::rename(from, &to)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.dir(Place::Quarantine).join(format!("{name}.reason")))?;
        writeln!(f, "{reason}")?;
        f.sync_all()?;
        sync_dir(&self.dir(Place::Quarantine))?;
        Ok(Recovery::Quarantined {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    }

    fn rebuild_state(&self, id: Uuid, terminated: bool, now_ms: u64) -> io::Result<UploadState> {
        let path = self.package_path(Place::Ready, id);
        let state = UploadState::new(
            id,
            fs::metadata(&path)?.len(),
            hex::encode(sha256_file(&path)?),
            (!terminated).then(|| "recovered after a crash".to_string()),
            now_ms,
        );
        self.write_state(Place::Ready, &state)?;
        Ok(state)
    }

    /// Recovers what a crash left (see the module documentation). Call once at start,
    /// before recording. Errors are only I/O errors of the spool itself.
    pub fn recover(&self, now_ms: u64) -> io::Result<Vec<Recovery>> {
        self.recover_noting(now_ms, &mut |_| {})
    }

    /// [`Spool::recover`], telling `salvaged` of every package it keeps without an end record
    /// (its id and the bytes kept) before any of them leaves `active/`: a crash in between
    /// tells them again at the next start, never not at all.
    pub fn recover_noting(
        &self,
        now_ms: u64,
        salvaged: &mut dyn FnMut(Vec<(Uuid, u64)>),
    ) -> io::Result<Vec<Recovery>> {
        let mut done = Vec::new();
        let mut names: Vec<_> = fs::read_dir(self.dir(Place::Active))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut kept = Vec::new();
        for name in names {
            let from = self.dir(Place::Active).join(&name);
            let name = name.to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".erec.part")
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                done.push(self.quarantine(&from, &name, "not a spool file name")?);
                continue;
            };
            let file = OpenOptions::new().read(true).write(true).open(&from)?;
            match cut_torn_tail(&file) {
                Ok(r) => kept.push((
                    from,
                    id,
                    r.walk.terminated,
                    r.cut_bytes,
                    file.metadata()?.len(),
                )),
                Err(erec::Error::Io(e)) => return Err(e),
                Err(e) => done.push(self.quarantine(&from, &name, &e.to_string())?),
            }
        }
        salvaged(
            kept.iter()
                .filter(|k| !k.2)
                .map(|&(_, id, _, _, bytes)| (id, bytes))
                .collect(),
        );
        for (from, id, terminated, cut, _) in kept {
            fs::rename(&from, self.package_path(Place::Ready, id))?;
            self.rebuild_state(id, terminated, now_ms)?;
            sync_dir(&self.dir(Place::Active))?;
            done.push(Recovery::Recovered {
                id,
                terminated,
                cut,
            });
        }
        for id in self.list(Place::Ready)? {
            if !self.state_path(Place::Ready, id).exists() {
                let path = self.package_path(Place::Ready, id);
                let file = File::open(&path)?;
                match erec::recover::walk_file(&file, erec::format::Tail::Strict) {
                    Ok(w) => {
                        self.rebuild_state(id, w.terminated, now_ms)?;
                        done.push(Recovery::StateRebuilt(id));
                    }
                    Err(erec::Error::Io(e)) => return Err(e),
                    Err(e) => {
                        let name = format!("{id}.erec");
                        done.push(self.quarantine(&path, &name, &e.to_string())?);
                    }
                }
            }
        }
        for place in [Place::Ready, Place::Failed] {
            for e in fs::read_dir(self.dir(place))?.filter_map(|e| e.ok()) {
                if edgerec_net::durable::is_temp_name(&e.file_name().to_string_lossy()) {
                    fs::remove_file(e.path())?;
                }
            }
        }
        Ok(done)
    }
}

/// A package being written in `active/`.
#[derive(Debug)]
pub struct ActiveFile {
    id: Uuid,
    file: File,
    hash: Sha256,
    len: u64,
    dirty: bool,
    /// Its directory entry has not been synced yet.
    new_entry: bool,
}

impl ActiveFile {
    /// The recording id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether only nothing has been written (never: the header is written at creation).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends encoded records in one write. On error (a full disk) the file may hold part
    /// of them: the recording must end, and recovery cuts the torn tail.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Makes what was appended durable (fdatasync), if anything was.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Whether something was appended since the last sync.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Records that a file-system-wide sync ([`Spool::sync_fs`]) made it durable.
    pub fn mark_synced(&mut self) {
        self.dirty = false;
        self.new_entry = false;
    }

    /// Whether its directory entry still needs a sync of `active/`; clears the flag.
    pub fn take_new_entry(&mut self) -> bool {
        std::mem::take(&mut self.new_entry)
    }

    /// A second handle on the file, for syncing it on another thread.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Records that a sync meant to cover it failed: it needs one again (data and entry).
    pub fn mark_unsynced(&mut self) {
        self.dirty = true;
        self.new_entry = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn layout_permissions_and_the_happy_path() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        for p in ["active", "ready", "failed", "quarantine"] {
            assert_eq!(mode(&dir.path().join("spool").join(p)), 0o700);
        }
        let id = Uuid::now_v7();
        let mut f = spool.create(id, b"HEADER").unwrap();
        assert_eq!(mode(&spool.package_path(Place::Active, id)), 0o600);
        f.append(b"chunk").unwrap();
        f.sync().unwrap();
        let st = spool.finish(f, b"END", 42).unwrap();
        assert_eq!(st.size, 14);
        assert_eq!(st.sha256, hex::encode(Sha256::digest(b"HEADERchunkEND")));
        assert!(!spool.package_path(Place::Active, id).exists());
        assert_eq!(spool.read_state(Place::Ready, id).unwrap(), st);
        assert_eq!(mode(&spool.state_path(Place::Ready, id)), 0o600);
        assert_eq!(spool.list(Place::Ready).unwrap(), vec![id]);
        spool.move_package(id, Place::Ready, Place::Failed).unwrap();
        assert_eq!(spool.list(Place::Failed).unwrap(), vec![id]);
        spool.move_package(id, Place::Failed, Place::Ready).unwrap();
        spool.remove_stored(id).unwrap();
        assert!(spool.list(Place::Ready).unwrap().is_empty());
        assert!(spool.create(id, b"H").is_ok(), "a removed id can be reused");
        assert!(spool.create(id, b"H").is_err(), "O_EXCL");
    }

    #[test]
    fn a_package_whose_write_failed_is_kept_up_to_its_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = Uuid::now_v7();
        let mut f = spool.create(id, b"HEADER").unwrap();
        f.append(b"chunk1").unwrap();
        // A write that failed half-way (ENOSPC) left part of a record behind.
        OpenOptions::new()
            .append(true)
            .open(spool.package_path(Place::Active, id))
            .unwrap()
            .write_all(b"chu")
            .unwrap();
        let st = spool.salvage(f, "write failed: no space", 7).unwrap();
        let kept = fs::read(spool.package_path(Place::Ready, id)).unwrap();
        assert_eq!(kept, b"HEADERchunk1", "the torn bytes are cut");
        assert_eq!(st.size, 12);
        assert_eq!(st.sha256, hex::encode(Sha256::digest(&kept)));
        assert!(!st.terminated);
        assert_eq!(
            st.unterminated_reason.as_deref(),
            Some("write failed: no space")
        );
        assert_eq!(spool.read_state(Place::Ready, id).unwrap(), st);
        assert!(!spool.package_path(Place::Active, id).exists());
    }

    #[test]
    fn an_unwritable_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let e = Spool::open(&file.join("spool")).unwrap_err();
        assert!(e.to_string().contains("plain-file"), "{e}");
    }
}
