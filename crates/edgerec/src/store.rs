//! The recording store: the interface every store implements, the object key of a package,
//! and the first implementation, a directory (local disk or an NFS mount).
//!
//! Invariants:
//! - [`Store::put`] returns `Ok` only once the store holds the object and has confirmed the
//!   package's SHA-256; only then may the spool delete its copy.
//! - A store never overwrites an object: the same key with the same SHA-256 is success
//!   (a retry after a lost answer), with another SHA-256 a [`StoreError::Conflict`].
//! - Object keys come from the recording id alone (`{prefix}{yyyy}/{mm}/{dd}/{id}.erec`, the
//!   UTC date of the UUIDv7 timestamp), so retries and restarts never make duplicates and
//!   no counter can reset and overwrite an older upload.
//! - The appliance needs no permission to delete from the store.
//!
//! Its modules: `s3` (S3 API, multipart, SigV4), `http` (PUT to a URL template, bearer
//! token or client certificate), `wire` (the HTTPS bodies and answers both share), `retry`
//! (the uploader's pure retry policy), `bandwidth` (the upload rate limit), and `census`
//! (`edgerec keys census`: which packages are sealed to a key).

pub mod bandwidth;
#[cfg(feature = "lkm")]
pub(crate) mod census;
pub mod http;
pub(crate) mod retry;
pub mod s3;
pub(crate) mod wire;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use erec::clock::Utc;
use erec::crypto::sha256_file;
use serde::{Deserialize, Serialize};

/// The store the appliance delivers to, validated.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// A directory, and the bandwidth limit.
    Dir(PathBuf, Option<bandwidth::Limit>),
    /// An S3-compatible store.
    S3(s3::S3Config),
    /// A PUT to a URL template.
    Http(http::HttpConfig),
}

/// Why a configured store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Its HTTPS client could not be built (a CA or client certificate file).
    #[error(transparent)]
    Client(#[from] edgerec_net::client::ClientError),
    /// Its URL template is not one.
    #[error("{url}: {why}")]
    Template {
        /// The template.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An `http` store is written to, never listed.
    #[error(
        "an http store cannot be listed from here: use the receiving system's copy and its own tools"
    )]
    NotListable,
}

/// A store opened for reading (export, the key census): a `dir` store's tree, or an S3
/// bucket. The one place a configured store is opened to be read.
pub enum Readable {
    /// The root of a `dir` store.
    Dir(PathBuf),
    /// An S3 store (boxed: its client is large).
    S3(Box<s3::S3Store>),
}

impl StoreKind {
    /// This store, opened for reading; an `http` store cannot be listed from here.
    pub fn open_readable(&self) -> Result<Readable, OpenError> {
        match self {
            StoreKind::Dir(root, _) => Ok(Readable::Dir(root.clone())),
            StoreKind::S3(cfg) => s3::S3Store::new(cfg.clone()).map(|s| Readable::S3(Box::new(s))),
            StoreKind::Http(_) => Err(OpenError::NotListable),
        }
    }
}

/// A multipart upload in progress (S3), kept by the spool in the package's state file after
/// every part the store confirmed: a restart resumes with the parts still missing instead
/// of starting over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Multipart {
    /// The store's upload id.
    pub upload_id: String,
    /// Bytes per part (the last one may be shorter); fixed for the life of the upload.
    pub part_bytes: u64,
    /// The parts the store confirmed, by number.
    pub parts: Vec<PartDone>,
}

/// One part the store confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDone {
    /// Its number, from 1.
    pub number: u32,
    /// The store's ETag for it, as the store gave it.
    pub etag: String,
    /// Its SHA-256, base64 (what the store verified it against).
    pub sha256: String,
}

/// The object key of a package: `{prefix}{yyyy}/{mm}/{dd}/{id}.erec`.
pub fn object_key(prefix: &str, id: Uuid) -> String {
    let ms = id
        .get_timestamp()
        .map(|t| {
            let (s, n) = t.to_unix();
            s * 1000 + u64::from(n / 1_000_000)
        })
        .unwrap_or(0);
    let d = Utc::from_unix_ms(ms);
    format!(
        "{prefix}{:04}/{:02}/{:02}/{}.erec",
        d.year,
        d.month,
        d.day,
        id.hyphenated()
    )
}

/// The folder of manifests below the prefix (`appliance/manifests.rs`): never a recording;
/// every walk of a store for recordings skips it.
pub const MANIFESTS: &str = "manifests/";

/// The object key of a manifest below the prefix:
/// `manifests/{yyyy}/{mm}/{dd}/{hh}/{appliance}.{seq}.erec` (the UTC hour of `at_ms`, the end
/// of its period). A sequence number is never used twice, so the key is never reused.
pub fn manifest_object(appliance: &str, seq: u64, at_ms: u64) -> String {
    let d = Utc::from_unix_ms(at_ms);
    format!(
        "{MANIFESTS}{:04}/{:02}/{:02}/{:02}/{appliance}.{seq}.erec",
        d.year, d.month, d.day, d.hms_ms.0
    )
}

/// Whether `key` (a full object key) is under the manifests of `prefix`.
pub fn is_manifest(prefix: &str, key: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|k| k.starts_with(MANIFESTS))
}

/// The appliance id and sequence number a manifest's key names.
pub fn manifest_names(key: &str) -> Option<(String, u64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".erec")?;
    let (appliance, seq) = name.split_once('.')?;
    Some((appliance.to_string(), seq.parse().ok()?))
}

/// Why a put did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying later: the store is unreachable, busy, or the copy did not verify.
    #[error("store unavailable: {why}")]
    Transient {
        /// What happened.
        why: String,
        /// When the store asked to be tried again (`Retry-After`), if it did.
        retry_after: Option<std::time::Duration>,
    },
    /// The store refuses this package for good (permissions, a bad request); it goes to
    /// `failed/` with this reason.
    #[error("store refused the package: {0}")]
    Permanent(String),
    /// The key holds another object (a different SHA-256); never overwritten.
    #[error("the store already holds a different object under {key} (SHA-256 {existing})")]
    Conflict {
        /// The key.
        key: String,
        /// The SHA-256 of what the store holds, hex.
        existing: String,
    },
}

impl StoreError {
    /// A transient failure with no word from the store on when to come back.
    pub fn transient(why: impl Into<String>) -> StoreError {
        StoreError::Transient {
            why: why.into(),
            retry_after: None,
        }
    }
}

/// What a successful put found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Written now.
    Written,
    /// It was already there with the same SHA-256 (an earlier attempt's answer was lost).
    AlreadyThere,
}

/// Where a put that spans attempts keeps its progress: the package's state file (an S3
/// multipart upload's id and confirmed parts).
pub trait Checkpoint {
    /// The multipart upload an earlier attempt left, if any.
    fn multipart(&self) -> Option<&Multipart>;
    /// Persists `m` (durably) before the put goes on; `None` forgets the upload.
    fn save(&mut self, m: Option<Multipart>) -> Result<(), StoreError>;

    /// Whether an earlier attempt may have reached the store (or found something there).
    /// `false` only for a package never tried and never refused: its key, from a fresh
    /// UUIDv7, cannot hold anything but an earlier copy of these same bytes, so a store may
    /// skip looking before it writes.
    fn attempted_before(&self) -> bool {
        true
    }
}

/// A checkpoint kept in memory only (a put with nothing to resume from).
#[derive(Debug, Default)]
pub struct InMemory(pub Option<Multipart>);

impl Checkpoint for InMemory {
    fn multipart(&self) -> Option<&Multipart> {
        self.0.as_ref()
    }
    fn save(&mut self, m: Option<Multipart>) -> Result<(), StoreError> {
        self.0 = m;
        Ok(())
    }
}

/// A recording store.
pub trait Store: Send + Sync {
    /// Stores the package at `file` under `key`; returns once the store confirmed `sha256`.
    fn put(&self, key: &str, file: &Path, sha256: &[u8; 32]) -> Result<Stored, StoreError>;

    /// [`Store::put`], resuming the progress `checkpoint` holds and saving it as it goes.
    /// Stores that finish a put in one request need no checkpoint.
    fn put_resumable(
        &self,
        key: &str,
        file: &Path,
        sha256: &[u8; 32],
        checkpoint: &mut dyn Checkpoint,
    ) -> Result<Stored, StoreError> {
        let _ = checkpoint;
        self.put(key, file, sha256)
    }

    /// Abandons the multipart upload `upload_id` of `key` (its package went to `failed/`).
    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let _ = (key, upload_id);
        Ok(())
    }

    /// Aborts the multipart uploads under `prefix` that were started more than `older_than`
    /// ago and whose id is not in `keep` (uploads a crash or a lost answer left behind); returns
    /// the keys of those aborted.
    fn abort_orphans(
        &self,
        prefix: &str,
        keep: &std::collections::HashSet<String>,
        older_than: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        let _ = (prefix, keep, older_than);
        Ok(Vec::new())
    }

    /// A short name for logs and metrics (`dir`, `http`, `s3`).
    fn kind(&self) -> &'static str;
}

/// A directory as the store: `root/{key}`. Each put copies to a temporary file beside the
/// destination, syncs it, reads it back to verify the SHA-256, and links it into place
/// (a hard link fails if the name exists, so nothing is ever overwritten, even by a
/// concurrent writer), then syncs the directory.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
    limit: Option<crate::store::bandwidth::Limit>,
}

fn transient(what: &str, p: &Path, e: io::Error) -> StoreError {
    StoreError::transient(format!("{what} {}: {e}", p.display()))
}

impl DirStore {
    /// A store rooted at `root` (created if missing).
    pub fn open(root: &Path) -> io::Result<DirStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(root)?;
        Ok(DirStore {
            root: root.to_path_buf(),
            limit: None,
        })
    }

    /// Copies kept to `limit` (`[upload] bandwidth_bytes_per_sec`; an NFS store shares the
    /// link too).
    pub fn with_limit(mut self, limit: Option<crate::store::bandwidth::Limit>) -> DirStore {
        self.limit = limit;
        self
    }

    /// Where `key` lives.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn check_existing(
        &self,
        key: &str,
        dest: &Path,
        sha256: &[u8; 32],
    ) -> Result<Stored, StoreError> {
        let existing = sha256_file(dest).map_err(|e| transient("cannot read", dest, e))?;
        if existing == *sha256 {
            Ok(Stored::AlreadyThere)
        } else {
            Err(StoreError::Conflict {
                key: key.to_string(),
                existing: hex::encode(existing),
            })
        }
    }
}

impl Store for DirStore {
    fn put(&self, key: &str, file: &Path, sha256: &[u8; 32]) -> Result<Stored, StoreError> {
        if key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(StoreError::Permanent(format!("bad object key {key:?}")));
        }
        let dest = self.path_of(key);
        if dest.exists() {
            return self.check_existing(key, &dest, sha256);
        }
        let dir = dest.parent().expect("a key has at least one component");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| transient("cannot create", dir, e))?;
        let (out, tmp) = edgerec_net::durable::create_temp(&dest, 0o640)
            .map_err(|e| transient("cannot create", dir, e))?;
        let result = (|| {
            let src = File::open(file).map_err(|e| transient("cannot read", file, e))?;
            let mut src: Box<dyn Read> = match &self.limit {
                Some(l) => Box::new(crate::store::bandwidth::Throttled::new(src, l.clone())),
                None => Box::new(src),
            };
            let mut out = out;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src
                    .read(&mut buf)
                    .map_err(|e| transient("cannot read", file, e))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])
                    .map_err(|e| transient("cannot write", &tmp, e))?;
            }
            out.sync_all()
                .map_err(|e| transient("cannot sync", &tmp, e))?;
            drop(out);
            let copied = sha256_file(&tmp).map_err(|e| transient("cannot read", &tmp, e))?;
            if copied != *sha256 {
                return Err(StoreError::transient(format!(
                    "the copy in {} does not match the package's SHA-256",
                    tmp.display()
                )));
            }
            match fs::hard_link(&tmp, &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return self.check_existing(key, &dest, sha256);
                }
                Err(e) => return Err(transient("cannot link", &dest, e)),
            }
            edgerec_net::durable::sync_dir(dir)
                .map_err(|e| StoreError::transient(e.to_string()))?;
            Ok(Stored::Written)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn kind(&self) -> &'static str {
        "dir"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn keys_follow_the_uuid_v7_date() {
        // 0x019acd8c2c00 ms = 2025-11-29T... ; check against the clock module.
        let id = Uuid::parse_str("019acd8c-2c00-7abc-8def-0123456789ab").unwrap();
        let ms = 0x019a_cd8c_2c00u64;
        let d = Utc::from_unix_ms(ms);
        assert_eq!(
            object_key("rec/", id),
            format!(
                "rec/{:04}/{:02}/{:02}/019acd8c-2c00-7abc-8def-0123456789ab.erec",
                d.year, d.month, d.day
            )
        );
        assert_eq!(&object_key("", id)[..11], "2025/11/29/");
    }

    #[test]
    fn put_verifies_never_overwrites_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(&dir.path().join("store")).unwrap();
        let pkg = dir.path().join("p.erec");
        fs::write(&pkg, b"ciphertext").unwrap();
        let sha: [u8; 32] = Sha256::digest(b"ciphertext").into();
        let key = "2026/11/29/x.erec";
        assert_eq!(store.put(key, &pkg, &sha).unwrap(), Stored::Written);
        assert_eq!(fs::read(store.path_of(key)).unwrap(), b"ciphertext");
        assert_eq!(store.put(key, &pkg, &sha).unwrap(), Stored::AlreadyThere);
        fs::write(&pkg, b"other").unwrap();
        let other: [u8; 32] = Sha256::digest(b"other").into();
        assert!(matches!(
            store.put(key, &pkg, &other),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            fs::read(store.path_of(key)).unwrap(),
            b"ciphertext",
            "not overwritten"
        );
        // A package that changed after its SHA-256 was taken does not verify.
        assert!(matches!(
            store.put("2026/11/29/y.erec", &pkg, &sha),
            Err(StoreError::Transient { .. })
        ));
        assert!(!store.path_of("2026/11/29/y.erec").exists());
        let leftovers: Vec<_> = fs::read_dir(store.path_of("2026/11/29")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left");
        assert!(matches!(
            store.put("../x", &pkg, &sha),
            Err(StoreError::Permanent(_))
        ));
    }
}
