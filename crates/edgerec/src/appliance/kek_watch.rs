//! Rotation by file (`[keys] source = "file"`): the KEK public key file is watched, and a new
//! key put in its place — written in place, or renamed over it as careful tools and
//! configuration managers do — becomes the KEK of every recording started from then on.
//! Recordings in progress keep the key they were opened with.
//!
//! Invariants:
//! - The directory is watched, not the file: a rename over the file replaces its inode, which
//!   a watch on the file itself would lose.
//! - Only a complete write (`close` after writing) or a rename into place is acted on, so a
//!   half-written file is never read as the new key; a file that does not parse is logged and
//!   counted (`edgerec_kek_fetch_errors_total`) and the current key stays.
//! - Public keys only: nothing here ever sees a private key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::appliance::metrics::{KekLabel, Metrics};
use erec::keys::{KekHandle, KekId, KekPublic};

/// Whether an event on a watched directory may have put a complete new file at a path.
pub fn completes_a_file(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

/// What [`reload`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The file holds the key in use already.
    Same,
    /// The new key is in use for new recordings.
    Rotated {
        /// The key in use before, hex id.
        from: String,
        /// The key in use now, hex id.
        to: String,
    },
}

/// The committed demo key, refused: its private half is in the repository, so anything
/// sealed to it is readable by anyone.
#[derive(Debug, thiserror::Error)]
#[error(
    "kek {0} is the committed DEMO key (samples/demo-kek.pub.pem; its private half is public): \
     set [keys] demo = true for a demonstration, or give your own key"
)]
pub struct DemoKeyRefused(pub KekId);

/// Refuses the committed demo key unless `[keys] demo = true` says this is a demonstration:
/// the one check every key source (the file at start and on a change, the key manager)
/// makes.
pub fn refuse_demo(kek: &KekPublic, allowed: bool) -> Result<(), DemoKeyRefused> {
    if kek.id().is_demo() && !allowed {
        return Err(DemoKeyRefused(kek.id()));
    }
    Ok(())
}

/// Why a key file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// It cannot be read as a public key.
    #[error(transparent)]
    Key(#[from] erec::keys::KeyError),
    /// It is the demo key.
    #[error(transparent)]
    Demo(#[from] DemoKeyRefused),
}

/// Reads `public_key` (and `escrow`) again and, if the KEK changed, makes it the one new
/// recordings are sealed to.
pub fn reload(
    public_key: &Path,
    escrow: Option<&Path>,
    handle: &KekHandle,
    allow_demo: bool,
) -> Result<Reloaded, ReloadError> {
    let kek = KekPublic::from_file(public_key)?;
    refuse_demo(&kek, allow_demo)?;
    let current = handle.current();
    let from = current.first().map(|k| k.id());
    if from == Some(kek.id()) {
        return Ok(Reloaded::Same);
    }
    let mut keks = vec![kek];
    if let Some(e) = escrow {
        keks.push(KekPublic::from_file(e)?);
    }
    let to = keks[0].id().to_hex();
    handle.replace(keks);
    Ok(Reloaded::Rotated {
        from: from.map(|i| i.to_hex()).unwrap_or_default(),
        to,
    })
}

/// Watches the directory of `public_key` and rotates on every complete new file there.
/// Keep the watcher alive for as long as it should watch.
pub fn watch(
    public_key: PathBuf,
    escrow: Option<PathBuf>,
    handle: KekHandle,
    metrics: Arc<Metrics>,
    allow_demo: bool,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = public_key
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = public_key.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if !completes_a_file(&ev.kind) || !ev.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            return;
        }
        match reload(&public_key, escrow.as_deref(), &handle, allow_demo) {
            Ok(Reloaded::Same) => {}
            Ok(Reloaded::Rotated { from, to }) => {
                metrics
                    .kek_info
                    .get_or_create(&KekLabel {
                        kek_id: from.clone(),
                    })
                    .set(0);
                metrics
                    .kek_info
                    .get_or_create(&KekLabel { kek_id: to.clone() })
                    .set(1);
                tracing::info!(
                    from,
                    to,
                    "KEK rotated: new recordings are sealed to the new key"
                );
            }
            Err(e) => {
                metrics.kek_fetch_errors.inc();
                tracing::error!(error = %e, "the KEK file changed but cannot be read; recording goes on with the current key");
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join(format!("tests/vectors/{name}-kek.pub.pem"))
    }

    #[test]
    fn a_new_key_file_rotates_and_a_bad_one_keeps_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kek.pub.pem");
        std::fs::copy(key("test"), &file).unwrap();
        let first = KekPublic::from_file(&file).unwrap();
        let handle = KekHandle::new(vec![first.clone()]);
        assert!(matches!(
            reload(&file, None, &handle, false),
            Ok(Reloaded::Same)
        ));
        std::fs::write(&file, b"-----BEGIN PUBLIC KEY-----\ntruncated").unwrap();
        assert!(reload(&file, None, &handle, false).is_err());
        assert_eq!(
            handle.current()[0].id(),
            first.id(),
            "the current key stays"
        );
        std::fs::copy(key("other"), &file).unwrap();
        let other = KekPublic::from_file(&file).unwrap();
        assert_eq!(
            reload(&file, Some(&key("r3")), &handle, false).unwrap(),
            Reloaded::Rotated {
                from: first.id().to_hex(),
                to: other.id().to_hex()
            }
        );
        let now = handle.current();
        assert_eq!(now.len(), 2, "the escrow key rides along");
        assert_eq!(now[0].id(), other.id());
    }

    #[test]
    fn only_complete_files_are_acted_on() {
        assert!(completes_a_file(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(completes_a_file(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(!completes_a_file(&EventKind::Modify(ModifyKind::Data(
            notify::event::DataChange::Any
        ))));
        assert!(!completes_a_file(&EventKind::Create(
            notify::event::CreateKind::File
        )));
    }
}
