//! The key manager's key store: its RSA KEK pairs, one JSON file per key in a 0700
//! directory, each private key sealed at rest by a [`Protector`] (a local master key, or
//! KMS) and bound to its kek id.
//!
//! A key file `keys/<kek id>.json` (0600) holds `id` (hex kek id), `publicKey` (base64 of the
//! PKCS#1 `RSAPublicKey` DER, the key-manager contract's form), `dateCreated` (unix ms, as
//! the contract has it), `state` (`active`, `retired`, `destroyed`), `retiredAt`/`destroyedAt`
//! (unix ms) when so, and
//! `sealedPrivateKey` (base64 of the sealed PKCS#8 PEM), which `destroy` removes for good.
//!
//! Invariants:
//! - No API here returns a private key in the clear except [`KeyStore::private`], which the
//!   unwrap path uses in memory (zeroized on drop); nothing writes one unsealed.
//! - Files are written to a temporary name, synced and renamed: a crash leaves the old record
//!   or the new one, never half of one.
//! - The current key (what recorders seal to) is the newest active key.
//! - A backup is the records as they are (private keys still sealed); restoring never
//!   overwrites a record that differs.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::at_rest::{AtRestError, Protector};
use crate::keys::{KekId, KekPrivate, KekPublic};

/// A key's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Recorders may seal to it (the newest active key is the current one).
    Active,
    /// No new recordings; still unwraps what was sealed to it.
    Retired,
    /// Its private key is gone: what was sealed to it can never be opened.
    Destroyed,
}

impl KeyState {
    /// The state as written in the store and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }
}

/// A key's record as stored (and, without `sealedPrivateKey`, as listed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRecord {
    /// Hex kek id.
    pub id: String,
    /// Base64 of the PKCS#1 `RSAPublicKey` DER.
    pub public_key: String,
    /// When it was made, unix milliseconds (the contract's `dateCreated`, a number).
    pub date_created: u64,
    /// Its state.
    pub state: KeyState,
    /// When it was retired, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
    /// When its private key was destroyed, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<u64>,
    /// Base64 of the sealed private key; absent once destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_private_key: Option<String>,
}

/// What went wrong in the key store.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// No key with that id.
    #[error("no key {0}")]
    Unknown(String),
    /// The key was destroyed.
    #[error("key destroyed: {0}")]
    Destroyed(String),
    /// The key is not active (for retiring twice, or sealing to it).
    #[error("key {0} is {1:?}")]
    State(String, KeyState),
    /// The protector refused or failed (a KMS withdrawing access shows here).
    #[error(transparent)]
    Protection(#[from] AtRestError),
    /// A record that does not parse, or a key in it that does not.
    #[error("key store record {path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// File-system trouble.
    #[error("key store: {0}")]
    Io(#[from] std::io::Error),
}

/// The key store.
pub struct KeyStore {
    dir: PathBuf,
    protector: Arc<dyn Protector>,
}

fn b64() -> base64::engine::general_purpose::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl KeyStore {
    /// Opens (creating, 0700) the store in `dir`.
    pub fn open(dir: &Path, protector: Arc<dyn Protector>) -> Result<KeyStore, KeyStoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("keys"))?;
        Ok(KeyStore {
            dir: dir.to_path_buf(),
            protector,
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join("keys").join(format!("{id}.json"))
    }

    fn write(&self, r: &KeyRecord) -> Result<(), KeyStoreError> {
        let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
        Ok(crate::durable::replace_file(&self.path(&r.id), &bytes)?)
    }

    /// One key's record.
    pub fn get(&self, id: &str) -> Result<KeyRecord, KeyStoreError> {
        let path = self.path(id);
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.len() != 64 {
            return Err(KeyStoreError::Unknown(id.to_string()));
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyStoreError::Unknown(id.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        let r: KeyRecord = serde_json::from_slice(&bytes).map_err(|e| KeyStoreError::Corrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        if r.id != id {
            return Err(KeyStoreError::Corrupt {
                path: path.display().to_string(),
                why: format!("it names key {}", r.id),
            });
        }
        Ok(r)
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Result<Vec<KeyRecord>, KeyStoreError> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.dir.join("keys"))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                out.push(self.get(id)?);
            }
        }
        out.sort_by(|a, b| (a.date_created, &a.id).cmp(&(b.date_created, &b.id)));
        Ok(out)
    }

    /// The key new recordings are sealed to: the newest active one.
    pub fn current(&self) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(self
            .list()?
            .into_iter()
            .rev()
            .find(|r| r.state == KeyState::Active))
    }

    /// Generates a new RSA-3072 pair, seals its private key, stores it active.
    pub fn generate(&self, now_ms: u64) -> Result<KeyRecord, KeyStoreError> {
        let key = KekPrivate::generate(3072).map_err(|e| KeyStoreError::Corrupt {
            path: "(new key)".into(),
            why: e.to_string(),
        })?;
        self.import(&key, now_ms)
    }

    /// Takes an existing private key into the store (sealed, active, dated `now_ms`): how
    /// an organisation moves from key files to the key manager. A key already held is
    /// refused.
    pub fn import(&self, key: &KekPrivate, now_ms: u64) -> Result<KeyRecord, KeyStoreError> {
        let id = key.public().id().to_hex();
        match self.get(&id) {
            Err(KeyStoreError::Unknown(_)) => {}
            Ok(r) => return Err(KeyStoreError::State(r.id, r.state)),
            Err(e) => return Err(e),
        }
        let pem = key.to_pem().map_err(|e| KeyStoreError::Corrupt {
            path: "(new key)".into(),
            why: e.to_string(),
        })?;
        let sealed = self.protector.seal(pem.as_bytes(), &id)?;
        let r = KeyRecord {
            id,
            public_key: b64().encode(key.public().to_pkcs1_der()),
            date_created: now_ms,
            state: KeyState::Active,
            retired_at: None,
            destroyed_at: None,
            sealed_private_key: Some(b64().encode(sealed)),
        };
        self.write(&r)?;
        Ok(r)
    }

    /// The public key of a record.
    pub fn public(&self, r: &KeyRecord) -> Result<KekPublic, KeyStoreError> {
        let der = b64()
            .decode(&r.public_key)
            .map_err(|e| KeyStoreError::Corrupt {
                path: self.path(&r.id).display().to_string(),
                why: format!("publicKey: {e}"),
            })?;
        let k = KekPublic::from_der(&r.id, &der).map_err(|e| KeyStoreError::Corrupt {
            path: self.path(&r.id).display().to_string(),
            why: e.to_string(),
        })?;
        if k.id().to_hex() != r.id {
            return Err(KeyStoreError::Corrupt {
                path: self.path(&r.id).display().to_string(),
                why: "publicKey is not the key of this id".into(),
            });
        }
        Ok(k)
    }

    /// The private key of `id`, opened by the protector, for an unwrap in memory.
    pub fn private(&self, id: &KekId) -> Result<KekPrivate, KeyStoreError> {
        let id = id.to_hex();
        let r = self.get(&id)?;
        let Some(sealed) = &r.sealed_private_key else {
            return Err(KeyStoreError::Destroyed(id));
        };
        let blob = b64().decode(sealed).map_err(|e| KeyStoreError::Corrupt {
            path: self.path(&id).display().to_string(),
            why: format!("sealedPrivateKey: {e}"),
        })?;
        let pem = self.protector.open(&blob, &id)?;
        let text = std::str::from_utf8(&pem).map_err(|_| KeyStoreError::Corrupt {
            path: self.path(&id).display().to_string(),
            why: "the opened key is not PEM".into(),
        })?;
        let key = KekPrivate::from_pem(&id, text).map_err(|e| KeyStoreError::Corrupt {
            path: self.path(&id).display().to_string(),
            why: e.to_string(),
        })?;
        if key.public().id().to_hex() != id {
            return Err(KeyStoreError::Corrupt {
                path: self.path(&id).display().to_string(),
                why: "the sealed private key is not the key of this id".into(),
            });
        }
        Ok(key)
    }

    /// No new recordings for `id`; it still unwraps.
    pub fn retire(&self, id: &str, now_ms: u64) -> Result<KeyRecord, KeyStoreError> {
        let mut r = self.get(id)?;
        if r.state != KeyState::Active {
            return Err(KeyStoreError::State(r.id, r.state));
        }
        r.state = KeyState::Retired;
        r.retired_at = Some(now_ms);
        self.write(&r)?;
        Ok(r)
    }

    /// Removes `id`'s private key for good: what was sealed to it can never be opened again.
    /// The record stays (state `destroyed`), so the id is still known and answered for.
    pub fn destroy(&self, id: &str, now_ms: u64) -> Result<KeyRecord, KeyStoreError> {
        let mut r = self.get(id)?;
        if r.state == KeyState::Destroyed {
            return Err(KeyStoreError::Destroyed(r.id));
        }
        r.state = KeyState::Destroyed;
        r.destroyed_at = Some(now_ms);
        r.sealed_private_key = None;
        self.write(&r)?;
        Ok(r)
    }

    /// Every record, private keys still sealed, as one JSON document.
    pub fn backup(&self) -> Result<Vec<u8>, KeyStoreError> {
        let all = self.list()?;
        Ok(serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?)
    }

    /// Restores a backup: records missing here are written; records already here must be
    /// equal (never overwritten). Returns how many were written.
    pub fn restore(&self, backup: &[u8]) -> Result<usize, KeyStoreError> {
        let all: Vec<KeyRecord> =
            serde_json::from_slice(backup).map_err(|e| KeyStoreError::Corrupt {
                path: "(backup)".into(),
                why: e.to_string(),
            })?;
        // Check everything before writing anything.
        let mut new = Vec::new();
        for r in &all {
            self.public(r)?;
            match self.get(&r.id) {
                Ok(here) if here == *r => {}
                Ok(_) => {
                    return Err(KeyStoreError::Corrupt {
                        path: self.path(&r.id).display().to_string(),
                        why: "differs from the backup's record; not overwritten".into(),
                    });
                }
                Err(KeyStoreError::Unknown(_)) => new.push(r),
                Err(e) => return Err(e),
            }
        }
        for r in &new {
            self.write(r)?;
        }
        Ok(new.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::at_rest::MasterKey;

    fn store(dir: &Path) -> KeyStore {
        KeyStore::open(dir, Arc::new(MasterKey::generate().unwrap())).unwrap()
    }

    #[test]
    fn keys_are_generated_sealed_rotated_retired_destroyed_backed_up_and_restored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let master = Arc::new(MasterKey::generate().unwrap());
        let ks = KeyStore::open(dir.path(), master.clone()).unwrap();
        assert!(ks.current().unwrap().is_none());
        let a = ks.generate(1_000).unwrap();
        let file = ks.path(&a.id);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = fs::read_to_string(&file).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "never stored in the clear");
        let public = ks.public(&a).unwrap();
        assert_eq!(public.id().to_hex(), a.id);
        assert_eq!(public.bits(), 3072);
        let private = ks.private(&public.id()).unwrap();
        let dek = crate::crypto::Dek::generate().unwrap();
        let sealed = public.seal(&dek, crate::format::Wrap::OaepSha256).unwrap();
        assert_eq!(
            private
                .unseal(crate::format::Wrap::OaepSha256, &sealed)
                .unwrap()
                .expose(),
            dek.expose()
        );
        assert!(
            matches!(ks.import(&private, 9), Err(KeyStoreError::State(..))),
            "a key held already is not imported again"
        );
        // Rotation: the newer active key is current; the older one still unwraps.
        let b = ks.generate(2_000).unwrap();
        assert_eq!(ks.current().unwrap().unwrap().id, b.id);
        ks.retire(&b.id, 3_000).unwrap();
        assert_eq!(ks.current().unwrap().unwrap().id, a.id, "b retired");
        assert!(matches!(
            ks.retire(&b.id, 3_001),
            Err(KeyStoreError::State(..))
        ));
        assert!(
            ks.private(&ks.public(&b).unwrap().id()).is_ok(),
            "retired keys unwrap"
        );
        // Backup (still sealed), destroy, restore into a fresh store with the master key.
        let backup = ks.backup().unwrap();
        assert!(!String::from_utf8_lossy(&backup).contains("PRIVATE KEY"));
        ks.destroy(&a.id, 4_000).unwrap();
        assert!(matches!(
            ks.private(&public.id()),
            Err(KeyStoreError::Destroyed(_))
        ));
        assert_eq!(ks.get(&a.id).unwrap().state, KeyState::Destroyed);
        let dir2 = tempfile::tempdir().unwrap();
        let ks2 = KeyStore::open(dir2.path(), master).unwrap();
        assert_eq!(ks2.restore(&backup).unwrap(), 2);
        assert_eq!(ks2.restore(&backup).unwrap(), 0, "idempotent");
        assert!(ks2.private(&public.id()).is_ok(), "restored keys unwrap");
        // Restoring over a record that differs (the destroyed one) is refused.
        assert!(matches!(
            ks.restore(&backup),
            Err(KeyStoreError::Corrupt { .. })
        ));
        // Another master key cannot open the restored keys.
        let ks3 = store(dir2.path());
        assert!(matches!(
            ks3.private(&public.id()),
            Err(KeyStoreError::Protection(AtRestError::Authentication))
        ));
        assert!(matches!(ks.get("nothex"), Err(KeyStoreError::Unknown(_))));
    }

    #[test]
    fn a_sealed_key_moved_to_another_id_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let ks = store(dir.path());
        let a = ks.generate(1).unwrap();
        let b = ks.generate(2).unwrap();
        let mut forged = ks.get(&b.id).unwrap();
        forged.sealed_private_key = a.sealed_private_key.clone();
        ks.write(&forged).unwrap();
        let id_b = ks.public(&b).unwrap().id();
        assert!(matches!(
            ks.private(&id_b),
            Err(KeyStoreError::Protection(AtRestError::Authentication))
        ));
    }
}
