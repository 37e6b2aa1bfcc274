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
//! - The current key (what recorders seal to) is the newest active key created no later than
//!   now plus the allowed clock skew: a record dated ahead (a forged one, or a clock set back)
//!   never takes over.
//! - The key manager holds RSA-3072 keys only (what the platform requires).
//! - A backup is the records as they are (private keys still sealed) under a MAC keyed by the
//!   protector's secret ([`Protector::integrity_key`]); restoring checks the MAC, opens every
//!   private key and checks it is the key of its id, refuses records dated ahead, never
//!   overwrites a record (one whose life went on here, retired or destroyed since, stays as it
//!   is), and never changes which key is current unless the store had none. `undestroy` brings
//!   one destroyed key back from a backup made before, as retired.
//!
//! Backup file (version 2), JSON:
//!
//! ```text
//! {"edgerecBackup": 2, "created": <unix ms>, "records": [<key record>, …],
//!  "integrityKey": "<base64 of the KMS-sealed integrity data key>" (KMS mode only),
//!  "mac": "<hex HMAC-SHA256 under the backup key of "EREC lkm backup v2\n" and the
//!          compact JSON of the object without "mac", fields in this order>"}
//! ```
//!
//! A backup of before (a bare JSON array of records) has no MAC; it is restored only when
//! the administrator says so (`--accept-unauthenticated`).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::at_rest::{AtRestError, Protector};
use erec::keys::{KekId, KekPrivate, KekPublic};

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
    /// Something the key manager does not take (a key size, a backup that fails a check).
    #[error("{0}")]
    Refused(String),
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
    /// How far ahead of the clock a key's creation may lie and still be current.
    skew_ms: u64,
}

/// The modulus size of every key the key manager holds.
pub const BITS: usize = 3072;

/// The MAC of a backup covers this label first.
const BACKUP_LABEL: &[u8] = b"EREC lkm backup v2\n";

/// A backup as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackupFile {
    edgerec_backup: u32,
    created: u64,
    records: Vec<KeyRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    integrity_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_marker: Option<String>,
    mac: String,
}

/// What the MAC of a backup covers (the file without `mac`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BackupBody<'a> {
    edgerec_backup: u32,
    created: u64,
    records: &'a [KeyRecord],
    #[serde(skip_serializing_if = "Option::is_none")]
    integrity_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_marker: Option<&'a str>,
}

/// How a restore may go.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Take an older backup without a MAC.
    pub accept_unauthenticated: bool,
}

/// What a restore did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Records written.
    pub written: usize,
    /// Of those, active keys newer than the current one, written as retired so that the
    /// current key does not change.
    pub retired: Vec<String>,
    /// Records kept as they are here, whose life went on since the backup (retired or
    /// destroyed here).
    pub kept_newer: Vec<String>,
    /// Whether the backup had no MAC (taken with `accept_unauthenticated`).
    pub unauthenticated: bool,
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
            skew_ms: 60_000,
        })
    }

    /// The same store, taking keys created up to `skew_ms` ahead of the clock as current.
    pub fn with_skew(mut self, skew_ms: u64) -> KeyStore {
        self.skew_ms = skew_ms;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What seals the private keys (and keys the integrity of backups and the audit log).
    pub fn protector(&self) -> &Arc<dyn Protector> {
        &self.protector
    }

    fn marker_path(&self) -> PathBuf {
        self.dir.join("audit-keyed.json")
    }

    /// Where the audit log's keying starts, as kept here ([`crate::audit::keying_marker`]),
    /// if it was recorded.
    pub fn audit_marker(&self) -> Result<Option<String>, KeyStoreError> {
        match fs::read_to_string(self.marker_path()) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records where the audit log's keying starts (0600, durably).
    pub fn set_audit_marker(&self, marker: &str) -> Result<(), KeyStoreError> {
        Ok(edgerec_net::durable::replace_file(
            &self.marker_path(),
            marker.as_bytes(),
        )?)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join("keys").join(format!("{id}.json"))
    }

    fn write(&self, r: &KeyRecord) -> Result<(), KeyStoreError> {
        let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
        Ok(edgerec_net::durable::replace_file(
            &self.path(&r.id),
            &bytes,
        )?)
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

    /// The key new recordings are sealed to at `now_ms`: the newest active one created no
    /// later than `now_ms` plus the allowed skew.
    pub fn current(&self, now_ms: u64) -> Result<Option<KeyRecord>, KeyStoreError> {
        Ok(current_of(self.list()?, now_ms, self.skew_ms))
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
        if key.public().bits() != BITS {
            return Err(KeyStoreError::Refused(format!(
                "a {}-bit key: the key manager holds RSA-{BITS} keys only (what the platform \
                 requires)",
                key.public().bits()
            )));
        }
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
        self.open_private(&self.get(&id.to_hex())?)
    }

    /// The private key of a record (stored or not), opened and checked to be the key of its
    /// id.
    fn open_private(&self, r: &KeyRecord) -> Result<KekPrivate, KeyStoreError> {
        let id = r.id.clone();
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

    /// Every record, private keys still sealed, as one JSON document under the backup MAC.
    pub fn backup(&self, now_ms: u64) -> Result<Vec<u8>, KeyStoreError> {
        let records = self.list()?;
        let blob = self.protector.integrity_blob()?.map(|b| b64().encode(b));
        let marker = self.audit_marker()?;
        let key = self.protector.integrity_key("backup")?;
        let body = BackupBody {
            edgerec_backup: 2,
            created: now_ms,
            records: &records,
            integrity_key: blob.as_deref(),
            audit_marker: marker.as_deref(),
        };
        let mac = backup_mac(&key, &body);
        let file = BackupFile {
            edgerec_backup: 2,
            created: now_ms,
            integrity_key: blob,
            audit_marker: marker,
            records,
            mac,
        };
        Ok(serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?)
    }

    /// Reads a backup: its records, once its MAC verifies (or, for an older backup without
    /// one, when `opts` accepts that); whether it had a MAC.
    fn read_backup(
        &self,
        bytes: &[u8],
        opts: RestoreOptions,
    ) -> Result<(Vec<KeyRecord>, bool), KeyStoreError> {
        let refused = |why: String| KeyStoreError::Refused(format!("backup: {why}"));
        if let Ok(file) = serde_json::from_slice::<BackupFile>(bytes) {
            if file.edgerec_backup != 2 {
                return Err(refused(format!(
                    "version {}: this edgerec reads version 2",
                    file.edgerec_backup
                )));
            }
            let blob = match &file.integrity_key {
                Some(b) => Some(
                    b64()
                        .decode(b)
                        .map_err(|_| refused("integrityKey is not base64".into()))?,
                ),
                None => None,
            };
            // The store's own integrity key where it has one: a backup cannot bring the key
            // its MAC is checked with. Only a store that lost it (a lost key store, KMS
            // mode) takes the backup's sealed one, which only KMS can open.
            let key = match (self.protector.integrity_key("backup"), &blob) {
                (Ok(k), _) => k,
                (Err(_), Some(b)) => {
                    self.protector
                        .integrity_key_from(b, "backup")
                        .map_err(|e| {
                            refused(format!(
                                "its KMS integrity key does not open here ({e}): a backup of a \
                                 key manager in KMS mode is restored into one with the same KMS \
                                 key"
                            ))
                        })?
                }
                (Err(e), None) => return Err(e.into()),
            };
            let body = BackupBody {
                edgerec_backup: file.edgerec_backup,
                created: file.created,
                records: &file.records,
                integrity_key: file.integrity_key.as_deref(),
                audit_marker: file.audit_marker.as_deref(),
            };
            let want = hex::decode(&file.mac).map_err(|_| refused("mac is not hex".into()))?;
            let mut m = backup_hmac(&key);
            hmac::Mac::update(
                &mut m,
                &serde_json::to_vec(&body).map_err(std::io::Error::other)?,
            );
            // Constant time (hmac's verify_slice).
            hmac::Mac::verify_slice(m, &want).map_err(|_| {
                refused(
                    "its MAC does not verify: it was changed, or made under another master \
                     key (or KMS key); nothing restored"
                        .into(),
                )
            })?;
            if let Some(b) = &blob {
                self.protector.adopt_integrity_blob(b)?;
            }
            if let Some(m) = &file.audit_marker
                && self.audit_marker()?.is_none()
            {
                self.set_audit_marker(m)?;
            }
            unique(&file.records)?;
            return Ok((file.records, true));
        }
        // Only a bare array is a backup of before: an object that fails to parse as one of
        // now is refused as it is, never read another way.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
            return Err(match serde_json::from_slice::<BackupFile>(bytes) {
                Err(e) => refused(format!("not a key manager backup: {e}")),
                Ok(_) => refused("unreadable".into()),
            });
        }
        match serde_json::from_slice::<Vec<KeyRecord>>(bytes) {
            Ok(records) if opts.accept_unauthenticated => {
                unique(&records)?;
                Ok((records, false))
            }
            Ok(_) => Err(refused(
                "an older backup without a MAC: nothing shows whether it was changed; restore \
                 it with --accept-unauthenticated only if you know where it has been"
                    .into(),
            )),
            Err(e) => Err(refused(format!("not a key manager backup: {e}"))),
        }
    }

    /// Checks one record of a backup on its own: its public key is the key of its id, it is
    /// not dated ahead of `now_ms`, and its private key (which every key but a destroyed one
    /// has) opens and is the key of its id.
    fn check_restorable(&self, r: &KeyRecord, now_ms: u64) -> Result<(), KeyStoreError> {
        let refused = |why: &str| KeyStoreError::Refused(format!("backup: key {}: {why}", r.id));
        self.public(r)?;
        let ahead = now_ms + self.skew_ms;
        if r.date_created > ahead
            || r.retired_at.is_some_and(|t| t > ahead)
            || r.destroyed_at.is_some_and(|t| t > ahead)
        {
            return Err(refused("dated in the future"));
        }
        match (r.state, &r.sealed_private_key) {
            (KeyState::Destroyed, None) => Ok(()),
            (KeyState::Destroyed, Some(_)) => Err(refused("destroyed, yet it has a private key")),
            (_, None) => Err(refused("no private key for a key that is not destroyed")),
            (_, Some(_)) => self.open_private(r).map(|_| ()).map_err(|e| match e {
                KeyStoreError::Protection(AtRestError::Authentication) => {
                    refused("its private key does not open with this master key (or KMS key)")
                }
                e => e,
            }),
        }
    }

    /// Restores a backup (`KeyStore::read_backup`, every record checked by
    /// `KeyStore::check_restorable` before anything is written): records missing here are
    /// written; records already here must be equal, or the same key further on in its life
    /// (kept as they are); anything else is refused. If the store has a current key, active
    /// keys newer than it are written retired: a restore never changes the current key unless
    /// there was none.
    pub fn restore(
        &self,
        backup: &[u8],
        opts: RestoreOptions,
        now_ms: u64,
    ) -> Result<Restored, KeyStoreError> {
        let (all, authenticated) = self.read_backup(backup, opts)?;
        let mut done = Restored {
            unauthenticated: !authenticated,
            ..Restored::default()
        };
        let mut new = Vec::new();
        for r in &all {
            self.check_restorable(r, now_ms)?;
            match self.get(&r.id) {
                Ok(here) if here == *r => {}
                Ok(here) if later_in_life(&here, r) => done.kept_newer.push(r.id.clone()),
                Ok(_) => {
                    return Err(KeyStoreError::Corrupt {
                        path: self.path(&r.id).display().to_string(),
                        why: "differs from the backup's record; not overwritten".into(),
                    });
                }
                Err(KeyStoreError::Unknown(_)) => new.push(r.clone()),
                Err(e) => return Err(e),
            }
        }
        let current = self.current(now_ms)?;
        for mut r in new {
            if let Some(c) = &current
                && r.state == KeyState::Active
                && (r.date_created, &r.id) > (c.date_created, &c.id)
            {
                r.state = KeyState::Retired;
                r.retired_at = Some(now_ms);
                done.retired.push(r.id.clone());
            }
            self.write(&r)?;
            done.written += 1;
        }
        Ok(done)
    }

    /// Brings back the destroyed key `id` from a backup made before its destruction: the
    /// record here must be destroyed and the backup's the same key with its private key
    /// (which must open and be the key of its id). It comes back retired: it decrypts what
    /// was sealed to it and is never current again.
    pub fn undestroy(
        &self,
        backup: &[u8],
        id: &str,
        opts: RestoreOptions,
        now_ms: u64,
    ) -> Result<KeyRecord, KeyStoreError> {
        let (all, _) = self.read_backup(backup, opts)?;
        let here = self.get(id)?;
        if here.state != KeyState::Destroyed {
            return Err(KeyStoreError::Refused(format!(
                "key {id} is {}, not destroyed: nothing to bring back",
                here.state.as_str()
            )));
        }
        let mut r = all
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| KeyStoreError::Refused(format!("the backup holds no key {id}")))?;
        if r.public_key != here.public_key || r.date_created != here.date_created {
            return Err(KeyStoreError::Refused(format!(
                "the backup's key {id} is not the key destroyed here"
            )));
        }
        if r.sealed_private_key.is_none() {
            return Err(KeyStoreError::Refused(format!(
                "the backup was made after key {id} was destroyed: it holds no private key"
            )));
        }
        self.check_restorable(&r, now_ms)?;
        r.state = KeyState::Retired;
        r.retired_at = Some(r.retired_at.unwrap_or(now_ms));
        r.destroyed_at = None;
        self.write(&r)?;
        Ok(r)
    }
}

/// Refuses a backup that names a key twice (which record would win is nobody's choice).
fn unique(records: &[KeyRecord]) -> Result<(), KeyStoreError> {
    let mut seen = std::collections::HashSet::new();
    for r in records {
        if !seen.insert(&r.id) {
            return Err(KeyStoreError::Refused(format!(
                "backup: key {} appears twice",
                r.id
            )));
        }
    }
    Ok(())
}

/// The current key among `all` at `now_ms`: the newest active one created no later than
/// `now_ms + skew_ms`.
pub fn current_of(all: Vec<KeyRecord>, now_ms: u64, skew_ms: u64) -> Option<KeyRecord> {
    all.into_iter()
        .filter(|r| r.state == KeyState::Active && r.date_created <= now_ms + skew_ms)
        .max_by(|a, b| (a.date_created, &a.id).cmp(&(b.date_created, &b.id)))
}

/// Whether `here` is the backup's record `then` further on in its life (retired or
/// destroyed since): the same key, made at the same time.
fn later_in_life(here: &KeyRecord, then: &KeyRecord) -> bool {
    let step = |s: KeyState| match s {
        KeyState::Active => 0,
        KeyState::Retired => 1,
        KeyState::Destroyed => 2,
    };
    here.id == then.id
        && here.public_key == then.public_key
        && here.date_created == then.date_created
        && step(here.state) > step(then.state)
}

fn backup_hmac(key: &[u8; 32]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::{KeyInit, Mac};
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
        .expect("HMAC takes a key of any length");
    m.update(BACKUP_LABEL);
    m
}

fn backup_mac(key: &[u8; 32], body: &BackupBody) -> String {
    use hmac::Mac;
    let mut m = backup_hmac(key);
    m.update(&serde_json::to_vec(body).expect("records always serialize"));
    hex::encode(m.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::at_rest::MasterKey;

    const NOW: u64 = 10_000_000;
    const OPTS: RestoreOptions = RestoreOptions {
        accept_unauthenticated: false,
    };

    fn store(dir: &Path) -> KeyStore {
        KeyStore::open(dir, Arc::new(MasterKey::generate().unwrap())).unwrap()
    }

    #[test]
    fn keys_are_generated_sealed_rotated_retired_destroyed_backed_up_and_restored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let master = Arc::new(MasterKey::generate().unwrap());
        let ks = KeyStore::open(dir.path(), master.clone()).unwrap();
        assert!(ks.current(NOW).unwrap().is_none());
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
        let dek = erec::crypto::Dek::generate().unwrap();
        let sealed = public.seal(&dek, erec::format::Wrap::OaepSha256).unwrap();
        assert_eq!(
            private
                .unseal(erec::format::Wrap::OaepSha256, &sealed)
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
        assert_eq!(ks.current(NOW).unwrap().unwrap().id, b.id);
        ks.retire(&b.id, 3_000).unwrap();
        assert_eq!(ks.current(NOW).unwrap().unwrap().id, a.id, "b retired");
        assert!(matches!(
            ks.retire(&b.id, 3_001),
            Err(KeyStoreError::State(..))
        ));
        assert!(
            ks.private(&ks.public(&b).unwrap().id()).is_ok(),
            "retired keys unwrap"
        );
        // Backup (still sealed), destroy, restore into a fresh store with the master key.
        let backup = ks.backup(NOW).unwrap();
        assert!(!String::from_utf8_lossy(&backup).contains("PRIVATE KEY"));
        ks.destroy(&a.id, 4_000).unwrap();
        assert!(matches!(
            ks.private(&public.id()),
            Err(KeyStoreError::Destroyed(_))
        ));
        assert_eq!(ks.get(&a.id).unwrap().state, KeyState::Destroyed);
        let dir2 = tempfile::tempdir().unwrap();
        let ks2 = KeyStore::open(dir2.path(), master).unwrap();
        assert_eq!(ks2.restore(&backup, OPTS, NOW).unwrap().written, 2);
        assert_eq!(
            ks2.restore(&backup, OPTS, NOW).unwrap(),
            Restored::default(),
            "idempotent"
        );
        assert!(ks2.private(&public.id()).is_ok(), "restored keys unwrap");
        // The destroyed record here went on in its life since the backup: it stays destroyed.
        let again = ks.restore(&backup, OPTS, NOW).unwrap();
        assert_eq!((again.written, again.kept_newer), (0, vec![a.id.clone()]));
        assert_eq!(ks.get(&a.id).unwrap().state, KeyState::Destroyed);
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

    /// A store with two keys made at 1,000 and 2,000, its master key, and a backup of it.
    fn backed_up(dir: &Path) -> (KeyStore, Arc<MasterKey>, Vec<u8>) {
        let master = Arc::new(MasterKey::generate().unwrap());
        let ks = KeyStore::open(dir, master.clone()).unwrap();
        ks.generate(1_000).unwrap();
        ks.generate(2_000).unwrap();
        let b = ks.backup(NOW).unwrap();
        (ks, master, b)
    }

    fn edit(backup: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(backup).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_tampered_backup_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_, master, backup) = backed_up(dir.path());
        let fresh = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(fresh.path(), master).unwrap();
        // An attacker's own key pair, dated a year ahead, slipped into the backup.
        let evil = KekPrivate::generate(3072).unwrap();
        let evil_dir = tempfile::tempdir().unwrap();
        let evil_store = store(evil_dir.path());
        let mut forged = evil_store.import(&evil, NOW + 365 * 86_400_000).unwrap();
        forged.state = KeyState::Active;
        let tampered = edit(&backup, |v| {
            v["records"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::to_value(&forged).unwrap())
        });
        let e = ks.restore(&tampered, OPTS, NOW).unwrap_err();
        assert!(e.to_string().contains("MAC does not verify"), "{e}");
        assert!(ks.list().unwrap().is_empty(), "nothing restored");
        // Without a MAC at all (an "older" backup forged whole): refused unless accepted,
        // and even then every record's private key must open here.
        let bare = serde_json::to_vec(&vec![forged.clone()]).unwrap();
        let e = ks.restore(&bare, OPTS, NOW).unwrap_err();
        assert!(e.to_string().contains("--accept-unauthenticated"), "{e}");
        let accept = RestoreOptions {
            accept_unauthenticated: true,
        };
        let e = ks.restore(&bare, accept, NOW).unwrap_err();
        assert!(e.to_string().contains("dated in the future"), "{e}");
        let mut now_dated = forged.clone();
        now_dated.date_created = NOW;
        let bare = serde_json::to_vec(&vec![now_dated]).unwrap();
        let e = ks.restore(&bare, accept, NOW).unwrap_err();
        assert!(e.to_string().contains("does not open"), "{e}");
        // A record of an active key without its private key.
        let mut keyless: Vec<KeyRecord> = serde_json::from_value(
            serde_json::from_slice::<serde_json::Value>(&backup).unwrap()["records"].clone(),
        )
        .unwrap();
        keyless[0].sealed_private_key = None;
        let e = ks
            .restore(&serde_json::to_vec(&keyless).unwrap(), accept, NOW)
            .unwrap_err();
        assert!(e.to_string().contains("no private key"), "{e}");
        assert!(ks.list().unwrap().is_empty());
        // The genuine backup restores.
        assert_eq!(ks.restore(&backup, OPTS, NOW).unwrap().written, 2);
    }

    #[test]
    fn a_restore_never_changes_the_current_key_and_a_future_key_is_never_current() {
        let dir = tempfile::tempdir().unwrap();
        let (ks, master, backup) = backed_up(dir.path());
        let newest = ks.current(NOW).unwrap().unwrap();
        // Another store of the same master key holds one older key, current there.
        let other = tempfile::tempdir().unwrap();
        let ks2 = KeyStore::open(other.path(), master).unwrap();
        let old = ks2.generate(500).unwrap();
        let r = ks2.restore(&backup, OPTS, NOW).unwrap();
        assert_eq!(r.written, 2);
        assert_eq!(
            r.retired.len(),
            2,
            "both backup keys are newer than the current one"
        );
        assert_eq!(
            ks2.current(NOW).unwrap().unwrap().id,
            old.id,
            "current unchanged"
        );
        assert_eq!(ks2.get(&newest.id).unwrap().state, KeyState::Retired);
        assert_eq!(
            ks2.restore(&backup, OPTS, NOW).unwrap().written,
            0,
            "a second restore finds them retired here and leaves them"
        );
        // Into an empty store, the backup's newest key becomes current.
        let empty = tempfile::tempdir().unwrap();
        let (_, m3, b3) = backed_up(empty.path());
        let into = tempfile::tempdir().unwrap();
        let ks3 = KeyStore::open(into.path(), m3).unwrap();
        ks3.restore(&b3, OPTS, NOW).unwrap();
        assert_eq!(ks3.current(NOW).unwrap().unwrap().date_created, 2_000);
        // A key dated ahead of the clock (beyond the skew) is not current.
        ks3.generate(NOW + 3_600_000).unwrap();
        assert_eq!(ks3.current(NOW).unwrap().unwrap().date_created, 2_000);
        assert_eq!(
            ks3.current(NOW + 3_600_000).unwrap().unwrap().date_created,
            NOW + 3_600_000
        );
    }

    #[test]
    fn a_destroyed_key_comes_back_retired_from_a_backup_made_before() {
        let dir = tempfile::tempdir().unwrap();
        let (ks, _, before) = backed_up(dir.path());
        let first = ks.list().unwrap()[0].clone();
        let id = ks.public(&first).unwrap().id();
        ks.destroy(&first.id, NOW).unwrap();
        let after = ks.backup(NOW).unwrap();
        let e = ks.undestroy(&after, &first.id, OPTS, NOW).unwrap_err();
        assert!(e.to_string().contains("holds no private key"), "{e}");
        let other = ks.list().unwrap()[1].id.clone();
        let e = ks.undestroy(&before, &other, OPTS, NOW).unwrap_err();
        assert!(e.to_string().contains("not destroyed"), "{e}");
        let r = ks.undestroy(&before, &first.id, OPTS, NOW).unwrap();
        assert_eq!((r.state, r.destroyed_at), (KeyState::Retired, None));
        assert!(ks.private(&id).is_ok(), "it decrypts again");
        assert_eq!(ks.current(NOW).unwrap().unwrap().id, other, "never current");
    }

    #[test]
    fn only_rsa_3072_keys_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let ks = store(dir.path());
        let big = KekPrivate::generate(4096).unwrap();
        let e = ks.import(&big, 1).unwrap_err();
        assert!(e.to_string().contains("RSA-3072 keys only"), "{e}");
    }
}
