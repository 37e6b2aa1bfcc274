//! The manifest writer: every `[outcomes] manifest_period_secs` (on the period's boundary,
//! UTC), at a graceful stop, and at a start that finds a boundary passed, it makes the
//! manifest (`appliance/manifest.rs`) of what the outcome journal gained since the one
//! before, signs it with the appliance's identity, seals it to the KEKs as a `file` package
//! and puts it into the spool's `ready/` with its object key
//! (`manifests/{yyyy}/{mm}/{dd}/{hh}/{appliance}.{seq}.erec`), where the uploader delivers it
//! with the same retry and idempotence as a recording.
//!
//! The chain's state — the next sequence number, the SHA-256 of the last manifest, where in
//! the journal it ended, the end of its period — is `{spool}/manifests/state.json`. A
//! manifest is made in `{spool}/manifests/` first (synced), then the state is advanced and
//! names it as being placed, then it moves to `ready/` with its state file; a crash before
//! the state is advanced leaves a package [`recover`] removes (the next manifest is made
//! again from the same place in the journal, with the same number), a crash after it one
//! [`recover`] places. So every line of the journal is in exactly one manifest, and no
//! number is used for two.
//!
//! Invariants: the manifest holds what the journal holds (ids, ports, times, sizes, digests,
//! reasons), sealed before it reaches the disk; `recover` runs before the spool's own
//! recovery, so a manifest is never taken for a recording; files 0600 in a 0700 directory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::appliance::identity::Identity;
use crate::appliance::metrics::{Metrics, UploadOutcome};
use crate::appliance::outcomes::{Cursor, Outcomes, read_after};
use crate::appliance::spool::{Place, Spool, UploadState};
use edgerec_net::durable::sync_dir;
use erec::format::{Metadata, Wrap};
use erec::keys::KekHandle;
use erec::writer::{Media, SealOptions, Sealer};

/// The chain's state, kept in `{spool}/manifests/state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    /// The next manifest's number.
    pub next_seq: u64,
    /// The SHA-256 of the last manifest (hex).
    pub previous: Option<String>,
    /// Where in the outcome journal the last manifest ended.
    pub cursor: Cursor,
    /// The end of the last manifest's period (ms); none before the first.
    pub covered_to_ms: Option<u64>,
    /// A manifest made and counted in the chain, not yet in `ready/`: its package id and
    /// object key below the prefix.
    pub placing: Option<(Uuid, String)>,
}

/// Where the writer keeps its state and makes its packages.
pub fn dir_of(spool: &Spool) -> PathBuf {
    spool.root().join("manifests")
}

const STATE: &str = "state.json";

fn load(dir: &Path) -> io::Result<ChainState> {
    match fs::read(dir.join(STATE)) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(STATE).display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ChainState::default()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `dir/name` whole: a temporary name, synced, renamed, the directory
/// synced.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let path = dir.join(name);
    let (mut f, tmp) = edgerec_net::durable::create_temp(&path, 0o600)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

fn save(dir: &Path, state: &ChainState) -> io::Result<()> {
    write_durably(
        dir,
        STATE,
        &serde_json::to_vec_pretty(state).expect("the chain's state always serializes"),
    )
}

/// Moves the manifest `id` into `ready/` with its state file (object key `object`), if it is
/// still in `dir`; writes the state of one a crash left in `ready/` without it.
fn place(spool: &Spool, dir: &Path, id: Uuid, object: &str, now_ms: u64) -> io::Result<()> {
    let made = dir.join(format!("{id}.erec"));
    let ready = spool.package_path(Place::Ready, id);
    if made.exists() {
        fs::rename(&made, &ready)?;
        sync_dir(&spool.dir(Place::Ready))?;
        sync_dir(dir)?;
    }
    if ready.exists() && !spool.state_path(Place::Ready, id).exists() {
        let bytes = fs::read(&ready)?;
        let mut state = UploadState::new(
            id,
            bytes.len() as u64,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            None,
            now_ms,
        );
        state.object = Some(object.to_string());
        spool.write_state(Place::Ready, &state)?;
    }
    Ok(())
}

/// At start, before the spool's recovery: places the manifest a crash left being placed,
/// removes what a crash left of one being made (it is made again).
pub fn recover(spool: &Spool, now_ms: u64) -> io::Result<()> {
    let dir = dir_of(spool);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let mut state = load(&dir)?;
    if let Some((id, object)) = state.placing.take() {
        place(spool, &dir, id, &object, now_ms)?;
        save(&dir, &state)?;
    }
    for e in fs::read_dir(&dir)?.flatten() {
        if e.file_name() != STATE {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Why a manifest could not be made now (it is tried again; nothing of the journal is
/// skipped).
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    /// No key to seal to.
    #[error("no KEK to seal the manifest to")]
    NoKek,
    /// The outcome journal did not commit in time.
    #[error("the outcome journal did not commit")]
    Journal,
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] erec::Error),
    /// The spool.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The writer.
pub struct Manifests {
    spool: Spool,
    dir: PathBuf,
    journal: PathBuf,
    identity: Identity,
    keks: KekHandle,
    wrap: Wrap,
    outcomes: Outcomes,
    metrics: Arc<Metrics>,
    period_ms: u64,
    state: ChainState,
    /// When this process opened the chain: the start of a first manifest's period.
    opened_ms: u64,
}

/// What the writer needs.
pub struct ManifestSetup {
    /// The spool (recovered by [`recover`]).
    pub spool: Spool,
    /// The outcome journal's directory.
    pub journal: PathBuf,
    /// The appliance's identity.
    pub identity: Identity,
    /// The KEKs to seal to.
    pub keks: KekHandle,
    /// How the data key is wrapped.
    pub wrap: Wrap,
    /// The journal's handle (to commit before reading it).
    pub outcomes: Outcomes,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// `[outcomes] manifest_period_secs`.
    pub period: Duration,
}

/// The first period boundary after `ms` (a multiple of `period_ms` since the epoch).
pub fn next_boundary(ms: u64, period_ms: u64) -> u64 {
    (ms / period_ms + 1) * period_ms
}

impl Manifests {
    /// The writer of `setup`'s spool, its chain where it stopped.
    pub fn open(setup: ManifestSetup) -> io::Result<Manifests> {
        let dir = dir_of(&setup.spool);
        let state = load(&dir)?;
        Ok(Manifests {
            spool: setup.spool,
            dir,
            journal: setup.journal,
            identity: setup.identity,
            keks: setup.keks,
            wrap: setup.wrap,
            outcomes: setup.outcomes,
            metrics: setup.metrics,
            period_ms: u64::try_from(setup.period.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            state,
            opened_ms: erec::clock::now_ms(),
        })
    }

    /// When the next manifest is due (ms): the first boundary after the last one's end (at
    /// once when that has passed), or after the chain was opened for a first one.
    pub fn due_at(&self) -> u64 {
        next_boundary(self.period_from(), self.period_ms)
    }

    /// Where the next manifest's period begins.
    fn period_from(&self) -> u64 {
        self.state.covered_to_ms.unwrap_or(self.opened_ms)
    }

    /// Makes the manifest of what the journal gained since the last one, up to `now_ms`, and
    /// puts it into `ready/`; returns its package id (to tell the uploader).
    pub fn make(&mut self, now_ms: u64) -> Result<Uuid, MakeError> {
        let made = self.try_make(now_ms);
        let outcome = if made.is_ok() { "made" } else { "not_made" };
        self.metrics
            .manifests
            .get_or_create(&UploadOutcome {
                outcome: outcome.into(),
            })
            .inc();
        made
    }

    fn try_make(&mut self, now_ms: u64) -> Result<Uuid, MakeError> {
        // One whose placing failed goes first: the chain names it.
        if let Some((id, object)) = self.state.placing.clone() {
            place(&self.spool, &self.dir, id, &object, now_ms)?;
            self.state.placing = None;
            save(&self.dir, &self.state)?;
        }
        let keks = self.keks.current();
        if keks.is_empty() {
            return Err(MakeError::NoKek);
        }
        // What was noted before now is in the files before they are read.
        if !self.outcomes.commit() {
            return Err(MakeError::Journal);
        }
        let (facts, unreadable, cursor) = read_after(&self.journal, &self.state.cursor)?;
        // Taken after the journal is read: a recording's conversation is noted before its
        // end, so a manifest that holds an end holds the conversation (or one before did).
        let (conversations, not_kept) = self.outcomes.conversations();
        let seq = self.state.next_seq;
        let appliance = self.identity.id();
        let mut manifest = crate::appliance::manifest::make(
            &appliance,
            (seq, self.state.previous.clone()),
            (self.period_from(), now_ms, self.period_ms),
            facts,
            unreadable,
        );
        manifest.conversations = conversations;
        manifest.conversations_not_kept = not_kept;
        manifest.conversations_since_ms = Some(self.outcomes.conversations_since_ms());
        let (plaintext, sha) = crate::appliance::manifest::sign(&manifest, &self.identity);
        let id = Uuid::now_v7();
        let mut meta = Metadata::new();
        meta.insert(
            "name".into(),
            format!("manifest-{appliance}-{seq}.json").into(),
        );
        meta.insert("source".into(), "manifest".into());
        let mut sealer = Sealer::new(
            &keks,
            &SealOptions {
                wrap: self.wrap,
                media: Media::File,
                recording_id: Some(id),
                created_ms: Some(now_ms),
                ..SealOptions::default()
            },
        )?;
        let mut package = sealer.header_bytes().to_vec();
        sealer.seal_metadata(&meta, &mut package)?;
        for chunk in plaintext.chunks(sealer.max_chunk()) {
            sealer.seal(erec::format::Kind::Media, chunk, &mut package)?;
        }
        sealer.finish(erec::format::EndReason::Complete, now_ms, &mut package);
        // Made beside the chain's state, then counted in it, then placed.
        let object = crate::store::manifest_object(&appliance, seq, now_ms);
        let name = format!("{id}.erec");
        let dest = self.dir.join(&name);
        let made = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dest)
            .and_then(|mut f| {
                f.write_all(&package)?;
                f.sync_all()
            })
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = made {
            let _ = fs::remove_file(&dest);
            return Err(e.into());
        }
        let next = ChainState {
            next_seq: seq + 1,
            previous: Some(sha),
            cursor,
            covered_to_ms: Some(now_ms),
            placing: Some((id, object.clone())),
        };
        if let Err(e) = save(&self.dir, &next) {
            // Renamed into place but not synced, say: what the disk says is the chain.
            match load(&self.dir) {
                Ok(on_disk) if on_disk.placing.as_ref().map(|p| p.0) == Some(id) => {}
                _ => {
                    let _ = fs::remove_file(&dest);
                    return Err(e.into());
                }
            }
        }
        self.state = next;
        self.outcomes
            .forget_conversations(&manifest.conversations, not_kept);
        // Counted in the chain: from here a failure leaves it to the next start's recovery.
        place(&self.spool, &self.dir, id, &object, now_ms)?;
        self.state.placing = None;
        save(&self.dir, &self.state)?;
        tracing::info!(appliance, seq, object, "manifest made");
        Ok(id)
    }
}

/// How long a manifest that could not be made waits before it is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// Makes a manifest at every boundary until `stop`; tells the uploader of each. Returns the
/// writer, for the stop's last manifest.
pub fn run(
    mut m: Manifests,
    ready: std::sync::mpsc::SyncSender<Uuid>,
    stop: crate::appliance::shutdown::Shutdown,
) -> Manifests {
    let mut retry_at: Option<u64> = None;
    loop {
        let now = erec::clock::now_ms();
        let at = retry_at.unwrap_or_else(|| m.due_at());
        if at > now {
            if stop.wait(Duration::from_millis(at - now)) {
                return m;
            }
            continue;
        }
        match m.make(now) {
            Ok(id) => {
                retry_at = None;
                let _ = ready.try_send(id);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot make the manifest; trying again");
                retry_at = Some(now + RETRY.as_millis() as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::outcomes::{Fact, Settings};

    struct Fixture {
        _dir: tempfile::TempDir,
        spool: Spool,
        outcomes: Outcomes,
        manifests: Manifests,
        ring: erec::keys::KeyRing,
        identity: crate::appliance::identity::PublicIdentity,
    }

    fn fixture(dir: tempfile::TempDir) -> Fixture {
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        recover(&spool, 0).unwrap();
        let (metrics, _) = Metrics::new();
        let journal = crate::appliance::outcomes::dir_of(spool.root());
        let outcomes = Outcomes::start(
            Settings {
                dir: journal.clone(),
                keep_days: 30,
                commit_every: Duration::from_secs(3600),
                sync: false,
            },
            Arc::clone(&metrics),
        )
        .unwrap();
        let kek = erec::keys::KekPrivate::generate(3072).unwrap();
        let (identity, _) = Identity::load_or_create(&spool.root().join("identity.key")).unwrap();
        let public =
            crate::appliance::identity::PublicIdentity::from_pem(&identity.public_pem()).unwrap();
        let manifests = Manifests::open(ManifestSetup {
            spool: spool.clone(),
            journal,
            identity,
            keks: KekHandle::new(vec![kek.public().clone()]),
            wrap: Wrap::OaepSha256,
            outcomes: outcomes.clone(),
            metrics,
            period: Duration::from_secs(60),
        })
        .unwrap();
        Fixture {
            _dir: dir,
            spool,
            outcomes,
            manifests,
            ring: {
                let mut ring = erec::keys::KeyRing::new();
                ring.add(kek);
                ring
            },
            identity: public,
        }
    }

    fn read(f: &Fixture, id: Uuid) -> crate::appliance::manifest::Signed {
        let bytes = fs::read(f.spool.package_path(Place::Ready, id)).unwrap();
        let mut plain = Vec::new();
        erec::reader::open_stream(
            &bytes[..],
            &f.ring,
            erec::reader::ReadMode::Strict,
            &mut plain,
            1,
        )
        .unwrap();
        crate::appliance::manifest::verify(&plain, std::slice::from_ref(&f.identity)).unwrap()
    }

    fn started(n: u128) -> Fact {
        Fact::Started {
            id: Uuid::from_u128(n),
            port: 40_000,
            continues: None,
        }
    }

    #[test]
    fn manifests_chain_and_each_fact_goes_into_exactly_one() {
        let mut f = fixture(tempfile::tempdir().unwrap());
        f.outcomes.note(started(1));
        let a = f.manifests.make(1_000).unwrap();
        // Idle: a manifest all the same.
        let b = f.manifests.make(61_000).unwrap();
        f.outcomes.note(started(2));
        let c = f.manifests.make(121_000).unwrap();
        let (a, b, c) = (read(&f, a), read(&f, b), read(&f, c));
        assert_eq!([a.manifest.seq, b.manifest.seq, c.manifest.seq], [0, 1, 2]);
        assert_eq!(a.manifest.previous, None);
        assert_eq!(b.manifest.previous.as_ref(), Some(&a.sha256));
        assert_eq!(c.manifest.previous.as_ref(), Some(&b.sha256));
        assert_eq!(a.manifest.began, [Uuid::from_u128(1)]);
        assert!(b.manifest.facts.is_empty());
        assert_eq!(c.manifest.began, [Uuid::from_u128(2)]);
        assert_eq!((c.manifest.from_ms, c.manifest.to_ms), (61_000, 121_000));
        // Each with its object key and not a recording.
        let state = f
            .spool
            .read_state(Place::Ready, f.spool.list(Place::Ready).unwrap()[0])
            .unwrap();
        assert!(!state.is_recording());
        assert!(
            state
                .object_key("rec/")
                .starts_with("rec/manifests/1970/01/01/00/")
        );
        assert!(state.object_key("rec/").ends_with(".0.erec"));
    }

    #[test]
    fn a_crash_while_a_manifest_is_made_or_placed_loses_no_fact_and_reuses_no_number() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let mut f = fixture(dir);
        f.outcomes.note(started(1));
        f.manifests.make(1_000).unwrap();
        f.outcomes.note(started(2));
        f.outcomes.commit();
        // A crash after the package was made, before the chain counted it: removed, made
        // again with the same number and the same facts.
        let stray = dir_of(&f.spool).join(format!("{}.erec", Uuid::now_v7()));
        fs::write(&stray, b"half a manifest").unwrap();
        recover(&f.spool, 2_000).unwrap();
        assert!(!stray.exists());
        // A crash after it was counted, before it reached ready/: placed at the start.
        let kept = f.manifests.state.clone();
        let id = f.manifests.make(61_000).unwrap();
        let package = f.spool.package_path(Place::Ready, id);
        fs::rename(&package, dir_of(&f.spool).join(format!("{id}.erec"))).unwrap();
        fs::remove_file(f.spool.state_path(Place::Ready, id)).unwrap();
        let mut crashed = f.manifests.state.clone();
        crashed.placing = Some((id, "manifests/x.1.erec".into()));
        save(&dir_of(&f.spool), &crashed).unwrap();
        assert_ne!(kept, crashed);
        let spool = Spool::open(&root).unwrap();
        recover(&spool, 62_000).unwrap();
        assert!(spool.package_path(Place::Ready, id).exists());
        assert_eq!(
            spool
                .read_state(Place::Ready, id)
                .unwrap()
                .object
                .as_deref(),
            Some("manifests/x.1.erec")
        );
        assert_eq!(load(&dir_of(&spool)).unwrap().placing, None);
        let m = read(&f, id);
        assert_eq!(m.manifest.seq, 1);
        assert_eq!(m.manifest.began, [Uuid::from_u128(2)]);
    }

    #[test]
    fn a_manifest_whose_move_to_ready_failed_goes_before_the_next_one() {
        let mut f = fixture(tempfile::tempdir().unwrap());
        let first = f.manifests.make(1_000).unwrap();
        // As if the move to ready/ had failed: counted in the chain, still beside it.
        fs::rename(
            f.spool.package_path(Place::Ready, first),
            dir_of(&f.spool).join(format!("{first}.erec")),
        )
        .unwrap();
        fs::remove_file(f.spool.state_path(Place::Ready, first)).unwrap();
        f.manifests.state.placing = Some((first, "manifests/x.0.erec".into()));
        let second = f.manifests.make(61_000).unwrap();
        for (id, seq) in [(first, 0), (second, 1)] {
            assert_eq!(read(&f, id).manifest.seq, seq);
            assert!(!f.spool.read_state(Place::Ready, id).unwrap().is_recording());
        }
    }

    #[test]
    fn boundaries_are_multiples_of_the_period() {
        assert_eq!(next_boundary(0, 60_000), 60_000);
        assert_eq!(next_boundary(59_999, 60_000), 60_000);
        assert_eq!(next_boundary(60_000, 60_000), 120_000);
    }
}
