//! The Local Key Manager's administrator's acts: setting up a key store, opening it with
//! its audit log, rotating; its configuration (`config`, [`LkmConfig`]) and credentials
//! (`credentials`, [`CredentialsError`]). Every act is written to the audit log.
//!
//! Invariants:
//! - Private keys exist in the clear only in memory; the store holds them sealed under the
//!   master key (see [`crate::at_rest`]), and a backup holds them sealed too.
//! - The public demo master key is refused unless `demo = true`; the master key and the TLS
//!   key must be readable by their owner alone (not checked in demo mode: a fresh clone has
//!   them 0644).
//! - Nothing is appended to an audit log whose chain or keying point does not verify.

mod config;
mod credentials;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{ConfigError, LkmConfig, Protection, Rotation, rotation_due};
pub use credentials::{
    Credentials, CredentialsError, add_credential, list_credentials, load_credentials,
    remove_credential, set_role,
};

use crate::at_rest::{AtRestError, MasterKey, MasterKeyError, Protector};
use crate::audit::{AuditError, AuditKey, AuditLog, Event, MarkerError};
use crate::keystore::{KeyRecord, KeyStore, KeyStoreError};

/// Why the key manager could not be opened, or an act not done or not audited.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The master key could not be made or read.
    #[error("lkm.master_key_file: {0}")]
    MasterKey(#[from] MasterKeyError),
    /// A new master key could not be made.
    #[error("lkm.master_key_file {}: {source}", path.display())]
    NewMasterKey {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The master key is the public demo key, outside demo mode.
    #[error(
        "lkm.master_key_file {}: this is the public DEMO master key (from samples/): anyone \
         can open what it seals. Make your own with edgerec lkm init on an empty key store, or \
         set lkm.demo = true for a demonstration",
        .0.display()
    )]
    DemoMasterKey(PathBuf),
    /// The KMS client could not be made.
    #[error("lkm.kms: {0}")]
    Kms(#[from] edgerec_net::client::ClientError),
    /// The protector gave no integrity key.
    #[error("the {purpose} key: {source}")]
    IntegrityKey {
        /// `integrity` or `audit`.
        purpose: &'static str,
        /// Why.
        source: AtRestError,
    },
    /// The key store could not be opened, read or written.
    #[error("lkm.store_dir {}: {source}", dir.display())]
    Store {
        /// The key store's directory.
        dir: PathBuf,
        /// Why.
        source: KeyStoreError,
    },
    /// The audit log (or its directory) could not be read or written.
    #[error("lkm.audit_log {}: {source}", path.display())]
    AuditIo {
        /// The log, or its directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The audit log's chain or keying does not verify.
    #[error("lkm.audit_log {}: {source}; not appending to a broken log", path.display())]
    BrokenLog {
        /// The log.
        path: PathBuf,
        /// Where and why.
        source: AuditError,
    },
    /// The key store's record of where the log's keying starts does not verify.
    #[error("the audit log's keying record in the key store: {0}; not appending")]
    Marker(#[from] MarkerError),
    /// The log is keyed, but the key store has no record of where keying starts.
    #[error(
        "lkm.audit_log {} is keyed from line {line}, but the key store has no record of where \
         keying starts (audit-keyed.json): restore the key store from a backup (edgerec lkm \
         restore), or, if you know the log is intact, move it aside to start a new one",
        path.display()
    )]
    UnrecordedKeying {
        /// The log.
        path: PathBuf,
        /// Its first keyed line.
        line: u64,
    },
}

/// The key manager's state, opened for an administrator's act or for serving.
pub struct Lkm {
    /// Its configuration.
    pub config: LkmConfig,
    /// The key store.
    pub store: KeyStore,
    /// The audit log (keyed by the protector's audit key).
    pub audit: AuditLog,
}

/// The audit key of a protector ([`crate::at_rest::Protector::integrity_key`], purpose
/// `audit`).
pub fn audit_key(protector: &dyn Protector) -> Result<AuditKey, ManagerError> {
    protector
        .integrity_key("audit")
        .map(AuditKey::new)
        .map_err(|source| ManagerError::IntegrityKey {
            purpose: "audit",
            source,
        })
}

/// The protector `config` names: the master key (made first, with `init`, if there is none;
/// never replacing one), or KMS.
pub fn protector(config: &LkmConfig, init: bool) -> Result<Arc<dyn Protector>, ManagerError> {
    Ok(match &config.protection {
        Protection::MasterKey(mk) => {
            let key = if init && !mk.exists() {
                MasterKey::create(mk).map_err(|source| ManagerError::NewMasterKey {
                    path: mk.clone(),
                    source,
                })?
            } else if config.demo {
                eprintln!(
                    "edgerec: DEMO key store (lkm.demo = true): its master key is public; never \
                     seal real recordings to its keys"
                );
                MasterKey::from_demo_file(mk)?
            } else {
                MasterKey::from_file(mk)?
            };
            if key.is_demo() && !config.demo {
                return Err(ManagerError::DemoMasterKey(mk.clone()));
            }
            Arc::new(key)
        }
        Protection::Kms(k) => Arc::new(crate::at_rest::kms::Kms::new(k.clone())?),
    })
}

impl Lkm {
    /// Opens the key manager of `config`; with `init`, makes a master key first if there is
    /// none (never replacing one).
    pub fn open(config: LkmConfig, init: bool) -> Result<Lkm, ManagerError> {
        let protector = protector(&config, init)?;
        let store = KeyStore::open(&config.store_dir, Arc::clone(&protector))
            .map_err(|source| ManagerError::Store {
                dir: config.store_dir.clone(),
                source,
            })?
            .with_skew(config.skew_secs * 1000);
        if let Some(dir) = config.audit_log.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ManagerError::AuditIo {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        // A new integrity key only where nothing was keyed yet (a new key manager, or the
        // first start after an upgrade): one made later could not verify the lines before.
        if init || !log_is_keyed(&config.audit_log)? {
            protector
                .prepare_integrity()
                .map_err(|source| ManagerError::IntegrityKey {
                    purpose: "integrity",
                    source,
                })?;
        }
        let key = audit_key(protector.as_ref())?;
        let seq = keying_point(&store, &key, &config.audit_log)?;
        let audit = AuditLog::open(&config.audit_log, Some(key)).map_err(|source| {
            ManagerError::AuditIo {
                path: config.audit_log.clone(),
                source,
            }
        })?;
        crate::audit::check_keying(&audit.chain(), seq).map_err(|source| {
            ManagerError::BrokenLog {
                path: config.audit_log.clone(),
                source,
            }
        })?;
        Ok(Lkm {
            config,
            store,
            audit,
        })
    }

    /// The key store alone, without the audit log: for `lkm restore`, which may have to
    /// bring back the integrity key that keys the log before the log can be opened.
    pub fn open_store(config: &LkmConfig) -> Result<KeyStore, ManagerError> {
        let protector = protector(config, false)?;
        Ok(KeyStore::open(&config.store_dir, protector)
            .map_err(|source| ManagerError::Store {
                dir: config.store_dir.clone(),
                source,
            })?
            .with_skew(config.skew_secs * 1000))
    }

    /// Writes an administrator's act to the audit log (synced before it returns).
    pub fn record(
        &mut self,
        action: &str,
        key: Option<&str>,
        outcome: &str,
    ) -> Result<(), ManagerError> {
        self.audit
            .append(
                &Event {
                    who: "admin".into(),
                    user: Some(crate::client::os_user()),
                    action: action.into(),
                    key: key.map(str::to_string),
                    recording: None,
                    outcome: outcome.into(),
                },
                erec::clock::now_ms(),
            )
            .map(|_| ())
            .map_err(|source| ManagerError::AuditIo {
                path: self.config.audit_log.clone(),
                source,
            })
    }

    /// Makes a new key pair, the current one from now on.
    pub fn rotate(&mut self, action: &str) -> Result<KeyRecord, ManagerError> {
        match self.store.generate(erec::clock::now_ms()) {
            Ok(r) => {
                self.record(action, Some(&r.id), "ok")?;
                Ok(r)
            }
            Err(source) => {
                self.record(action, None, "failed")?;
                Err(ManagerError::Store {
                    dir: self.config.store_dir.clone(),
                    source,
                })
            }
        }
    }
}

/// Where the audit log's keying starts (its first keyed line's `seq`), as the key store
/// records it; recorded now if the log holds no keyed line yet (a new key manager, or the
/// first start after an upgrade). A keyed log with no record is refused: its record was lost
/// with the key store (restore it from a backup), or removed to pass off a log stripped of
/// its MACs.
pub fn keying_point(store: &KeyStore, key: &AuditKey, log: &Path) -> Result<u64, ManagerError> {
    let in_store = |source| ManagerError::Store {
        dir: store.dir().to_path_buf(),
        source,
    };
    if let Some(text) = store.audit_marker().map_err(in_store)? {
        return Ok(crate::audit::read_keying_marker(key, &text)?);
    }
    let text = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(ManagerError::AuditIo {
                path: log.to_path_buf(),
                source,
            });
        }
    };
    // A torn last line is cut when the log is opened: it does not count.
    let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let chain =
        crate::audit::verify(&String::from_utf8_lossy(&text[..whole])).map_err(|source| {
            ManagerError::BrokenLog {
                path: log.to_path_buf(),
                source,
            }
        })?;
    if let Some(line) = chain.keyed_from {
        return Err(ManagerError::UnrecordedKeying {
            path: log.to_path_buf(),
            line,
        });
    }
    store
        .set_audit_marker(&crate::audit::keying_marker(key, chain.next_seq))
        .map_err(in_store)?;
    Ok(chain.next_seq)
}

/// Whether the audit log at `path` holds keyed lines already (a missing log holds none).
fn log_is_keyed(path: &Path) -> Result<bool, ManagerError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b.windows(7).any(|w| w == b"\"mac\":\"")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ManagerError::AuditIo {
            path: path.to_path_buf(),
            source,
        }),
    }
}
