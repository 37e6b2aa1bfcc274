//! Which recordings in the store are sealed to a KEK: the count an administrator sees before
//! destroying a key (`edgerec lkm destroy`). It lists the store and reads each package's
//! header, which needs no key: the recipients' kek ids are public.
//!
//! Invariants:
//! - Only headers are read (a ranged GET on S3, the first bytes of a file in a `dir` store);
//!   nothing is decrypted and nothing in the store is changed.
//! - An object that cannot be read or is not a package is counted as unreadable with the
//!   reason, never silently skipped: the administrator must see that the count is incomplete.

use std::io::Read;
use std::path::Path;

use crate::store::{Readable, StoreKind};
use erec::format::{Decoded, Header};
use erec::keys::KekId;

/// What a census of the store found for one KEK.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Packages read.
    pub packages: usize,
    /// Packages with the KEK among their recipients.
    pub sealed_to: usize,
    /// Of those, packages with no other recipient that can still open them (none, or only
    /// keys destroyed already): unreadable once the KEK is destroyed.
    pub only_to: usize,
    /// Their recording ids.
    pub only_ids: Vec<String>,
    /// Objects that could not be read as packages: (key, why).
    pub unreadable: Vec<(String, String)>,
    /// Objects not looked at: not named `*.erec`, or (in a `dir` store) not regular files.
    pub skipped: usize,
}

impl Census {
    /// Counts one package's header; `gone` are keys destroyed already.
    pub fn add(&mut self, header: &Header, kek: &KekId, gone: &[KekId]) {
        self.packages += 1;
        if header.recipients.iter().any(|r| r.kek_id == kek.0) {
            self.sealed_to += 1;
            if header
                .recipients
                .iter()
                .all(|r| r.kek_id == kek.0 || gone.iter().any(|g| g.0 == r.kek_id))
            {
                self.only_to += 1;
                self.only_ids
                    .push(uuid::Uuid::from_bytes(header.recording_id).to_string());
            }
        }
    }
}

/// Why an object's header could not be read: its bytes (`E`, the store's error), or what
/// they hold.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError<E> {
    /// The first bytes could not be read.
    #[error("{0}")]
    Read(E),
    /// They are not a package header.
    #[error(transparent)]
    Format(#[from] erec::format::FormatError),
    /// The object ends inside its header.
    #[error("too short for a package header")]
    Short,
}

/// Decodes a header from the first bytes of an object, asking `first(n)` for the first `n`
/// bytes as often as the decoder needs more.
pub fn header_of<E>(
    mut first: impl FnMut(usize) -> Result<Vec<u8>, E>,
) -> Result<Header, HeaderError<E>> {
    let mut want = 4096;
    loop {
        let bytes = first(want).map_err(HeaderError::Read)?;
        match Header::decode(&bytes)? {
            Decoded::Done(h, _) => return Ok(h),
            Decoded::Need(n) if n > bytes.len() && bytes.len() == want => want = n,
            Decoded::Need(_) => return Err(HeaderError::Short),
        }
    }
}

fn file_first(path: &Path, n: usize) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut buf = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Why a store could not be counted (a package that cannot be read is not this: it is
/// counted as unreadable, with why).
#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    /// The store could not be opened for reading.
    #[error(transparent)]
    Open(#[from] crate::store::OpenError),
    /// A `dir` store's tree could not be walked.
    #[error("store {}: {source}", path.display())]
    Walk {
        /// The store's root.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An S3 store could not be listed.
    #[error(transparent)]
    List(#[from] crate::store::StoreError),
}

/// Reads every package header under the store of `kind` (and `prefix`, for S3); `gone` are
/// the keys destroyed already.
pub fn count(
    kind: &StoreKind,
    prefix: &str,
    kek: &KekId,
    gone: &[KekId],
) -> Result<Census, CensusError> {
    let mut census = Census::default();
    match kind.open_readable()? {
        Readable::Dir(root) => {
            let found = crate::package_files::find(&root).map_err(|source| CensusError::Walk {
                path: root.clone(),
                source,
            })?;
            census.skipped += found.skipped;
            for f in found.packages {
                match header_of(|n| file_first(&f, n)) {
                    Ok(h) => census.add(&h, kek, gone),
                    Err(why) => census
                        .unreadable
                        .push((f.display().to_string(), why.to_string())),
                }
            }
        }
        Readable::S3(store) => {
            for key in store.list(prefix)? {
                if crate::store::is_manifest(prefix, &key) {
                    continue;
                }
                if !key.ends_with(".erec") {
                    census.skipped += 1;
                    continue;
                }
                match header_of(|n| store.get_first(&key, n)) {
                    Ok(h) => census.add(&h, kek, gone),
                    Err(why) => census.unreadable.push((key, why.to_string())),
                }
            }
        }
    }
    Ok(census)
}

#[cfg(test)]
mod tests {
    use super::*;
    use erec::keys::KekPrivate;
    use erec::writer::{Media, SealOptions, Sealer};

    #[test]
    fn packages_are_counted_by_their_recipients_and_junk_is_named() {
        let a = KekPrivate::generate(3072).unwrap();
        let b = KekPrivate::generate(3072).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("calls/2026/11/29");
        std::fs::create_dir_all(&sub).unwrap();
        let opts = SealOptions {
            media: Media::File,
            ..SealOptions::default()
        };
        let recipients = [
            vec![a.public().clone()],
            vec![a.public().clone(), b.public().clone()],
            vec![b.public().clone()],
        ];
        for (i, r) in recipients.iter().enumerate() {
            let s = Sealer::new(r, &opts).unwrap();
            std::fs::write(sub.join(format!("{i}.erec")), s.header_bytes()).unwrap();
        }
        std::fs::write(sub.join("junk.erec"), b"not a package").unwrap();
        std::fs::write(sub.join("notes.txt"), b"ignored").unwrap();
        let kind = StoreKind::Dir(dir.path().to_path_buf(), None);
        let c = count(&kind, "", &a.public().id(), &[]).unwrap();
        assert_eq!((c.packages, c.sealed_to, c.only_to), (3, 2, 1));
        assert_eq!(c.skipped, 1, "notes.txt");
        assert_eq!(c.only_ids.len(), 1);
        assert_eq!(c.unreadable.len(), 1);
        assert!(
            c.unreadable[0].0.ends_with("junk.erec"),
            "{:?}",
            c.unreadable
        );
        let c = count(&kind, "", &b.public().id(), &[]).unwrap();
        assert_eq!((c.sealed_to, c.only_to), (2, 1));
        // With a destroyed already, b is the last key of the package sealed to both.
        let c = count(&kind, "", &b.public().id(), &[a.public().id()]).unwrap();
        assert_eq!((c.sealed_to, c.only_to), (2, 2));
    }
}
