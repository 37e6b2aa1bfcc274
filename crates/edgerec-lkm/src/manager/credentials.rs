//! The Hawk credentials file: who may call the key manager, with which role.
//!
//! Invariants: a credential's key is shown once, at issue, and stored 0600 (the file is
//! replaced atomically, under a lock, so two administrators' changes never undo each other);
//! the service loads a file only if its owner alone can read it and it holds no public demo
//! credential (both unless `demo = true`); an entry of before roles is read as `admin` if it
//! said so, else as `platform` (what it could do), and reported until its role is set.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::roles::Role;
use crate::server::hawk_auth::Credential;

/// Why the credentials file could not be read, changed or used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file (or its lock file) could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the JSON of credentials.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Others than its owner can read the file.
    #[error("lkm.credentials_file {0}")]
    Loose(#[from] edgerec_net::durable::OwnerOnlyError),
    /// A credential has the public demo key.
    #[error(
        "lkm.credentials_file {}: credential {id} has the public DEMO key (from samples/): \
         anyone can use it. Remove it (edgerec lkm credentials remove {id}) and issue your \
         own, or set lkm.demo = true for a demonstration",
        path.display()
    )]
    Demo {
        /// The file.
        path: PathBuf,
        /// The credential.
        id: String,
    },
    /// No credential has this id.
    #[error("no credential {0}")]
    Unknown(String),
    /// A credential with this id exists already.
    #[error("credential {0} exists already")]
    Exists(String),
    /// The id is not one a credential may have.
    #[error("credential id {0:?}: 1 to 64 letters, digits, - _ .")]
    BadId(String),
    /// The system gave no random bytes for a key.
    #[error("no random bytes for a key: {0}")]
    Random(getrandom::Error),
}

/// One stored credential (the key base64).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCredential {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    /// Before roles: `true` made an administrator. Read, never written again (a role is).
    #[serde(default, skip_serializing)]
    admin: bool,
}

/// SHA-256 of the keys of the committed demo credentials (`samples/lkm/credentials.json`):
/// public, so refused unless `demo = true`.
const DEMO_CREDENTIALS_SHA256: [&str; 3] = [
    "697b7a5a51bf4567276c88a4e2d0efea30915eb5b765b88ad616418c8d09900f",
    "3eab3cc6dda3ec8f5dbd701b8f43a64704c080711256bddb2677a67c3c7d4532",
    "dd2c3b7e143416944afd63fac0a95f7bb79f592300ac0709c6e51a680887c5d9",
];

/// The credentials file's entries, an entry of before roles read as `admin` (it said so) or
/// left without a role (read as `platform`).
fn read_credentials(path: &Path) -> Result<BTreeMap<String, StoredCredential>, CredentialsError> {
    match std::fs::read(path) {
        Ok(b) => {
            let b = Zeroizing::new(b);
            let mut all: BTreeMap<String, StoredCredential> =
                serde_json::from_slice(&b).map_err(|source| CredentialsError::Json {
                    path: path.to_path_buf(),
                    source,
                })?;
            for c in all.values_mut() {
                if c.admin && c.role.is_none() {
                    c.role = Some(Role::Admin);
                }
            }
            Ok(all)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(CredentialsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Runs `change` on the credentials file's entries under an exclusive lock (a lock file
/// beside it: the file itself is replaced, not written), and writes the result: two
/// administrators' changes at once (a command and `POST /auth`) never undo each other, a
/// revocation included.
fn change_credentials<T>(
    path: &Path,
    change: impl FnOnce(&mut BTreeMap<String, StoredCredential>) -> Result<T, CredentialsError>,
) -> Result<T, CredentialsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    let io = |source| CredentialsError::Io {
        path: lock.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock)
        .map_err(io)?;
    file.lock().map_err(io)?;
    let mut all = read_credentials(path)?;
    let out = change(&mut all)?;
    write_credentials(path, &all)?;
    Ok(out)
}

fn write_credentials(
    path: &Path,
    all: &BTreeMap<String, StoredCredential>,
) -> Result<(), CredentialsError> {
    let text = Zeroizing::new(serde_json::to_vec_pretty(all).map_err(|source| {
        CredentialsError::Json {
            path: path.to_path_buf(),
            source,
        }
    })?);
    edgerec_net::durable::replace_file(path, &text).map_err(|source| CredentialsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The credentials the service accepts.
pub struct Credentials {
    /// By id. A credential's key is its text: the contract's clients (the platform's
    /// `apiKey`) use the string they were given as the Hawk key.
    pub all: HashMap<String, Credential>,
    /// Entries of before roles with no role set (read as `platform`): the service warns at
    /// every start until an operator sets theirs.
    pub unset: Vec<String>,
}

/// Loads the credentials file for the service: owner-only (unless `demo`), the demo
/// credentials refused unless `demo`.
pub fn load_credentials(path: &Path, demo: bool) -> Result<Credentials, CredentialsError> {
    use sha2::Digest;
    if !demo && path.exists() {
        edgerec_net::durable::check_owner_only(path, "the credentials file")?;
    }
    let mut out = Credentials {
        all: HashMap::new(),
        unset: Vec::new(),
    };
    for (id, c) in read_credentials(path)? {
        let hash = hex::encode(sha2::Sha256::digest(c.key.as_bytes()));
        if !demo && DEMO_CREDENTIALS_SHA256.contains(&hash.as_str()) {
            return Err(CredentialsError::Demo {
                path: path.to_path_buf(),
                id,
            });
        }
        let role = c.role.unwrap_or_else(|| {
            out.unset.push(id.clone());
            Role::Platform
        });
        let key = Zeroizing::new(c.key.as_bytes().to_vec());
        out.all.insert(id, Credential { key, role });
    }
    Ok(out)
}

/// Every credential's id and role (`None`: an entry of before roles, read as `platform`);
/// never a key.
pub fn list_credentials(path: &Path) -> Result<Vec<(String, Option<Role>)>, CredentialsError> {
    Ok(read_credentials(path)?
        .into_iter()
        .map(|(id, c)| (id, c.role))
        .collect())
}

/// Sets a credential's role (the file rewritten atomically); returns the role it had.
pub fn set_role(path: &Path, id: &str, role: Role) -> Result<Option<Role>, CredentialsError> {
    change_credentials(path, |all| {
        let c = all
            .get_mut(id)
            .ok_or_else(|| CredentialsError::Unknown(id.to_string()))?;
        Ok(c.role.replace(role))
    })
}

/// Revokes a credential (the file rewritten without it, 0600, atomically).
pub fn remove_credential(path: &Path, id: &str) -> Result<(), CredentialsError> {
    change_credentials(path, |all| match all.remove(id) {
        Some(_) => Ok(()),
        None => Err(CredentialsError::Unknown(id.to_string())),
    })
}

/// Issues a Hawk credential with `role`: a key of 256 random bits written as 43 base64url
/// characters, stored (0600, written to a temporary name and renamed) and returned for the
/// administrator to hand to the client, which uses that text as its Hawk key (algorithm
/// sha256). An id that exists is refused.
pub fn add_credential(
    path: &Path,
    id: &str,
    role: Role,
) -> Result<Zeroizing<String>, CredentialsError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(CredentialsError::BadId(id.to_string()));
    }
    change_credentials(path, |all| {
        if all.contains_key(id) {
            return Err(CredentialsError::Exists(id.to_string()));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(CredentialsError::Random)?;
        let encoded =
            Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_ref()));
        all.insert(
            id.to_string(),
            StoredCredential {
                key: encoded.to_string(),
                role: Some(role),
                admin: false,
            },
        );
        Ok(encoded)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn credentials_are_issued_once_each_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let k = add_credential(&path, "recorder-1", Role::Recorder).unwrap();
        add_credential(&path, "ops", Role::Admin).unwrap();
        assert!(add_credential(&path, "recorder-1", Role::Recorder).is_err());
        assert!(add_credential(&path, "bad id", Role::Recorder).is_err());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let all = load_credentials(&path, false).unwrap().all;
        assert_eq!(all.len(), 2);
        assert_eq!(
            all["recorder-1"].key.as_slice(),
            k.as_bytes(),
            "the text is the key"
        );
        assert_eq!(k.len(), 43);
        assert_eq!(
            (all["ops"].role, all["recorder-1"].role),
            (Role::Admin, Role::Recorder)
        );
        remove_credential(&path, "recorder-1").unwrap();
        assert!(remove_credential(&path, "recorder-1").is_err(), "gone");
        assert_eq!(
            load_credentials(&path, false)
                .unwrap()
                .all
                .keys()
                .collect::<Vec<_>>(),
            ["ops"]
        );
    }

    #[test]
    fn credentials_of_before_roles_keep_what_they_could_do_until_their_role_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        std::fs::write(
            &path,
            r#"{"ops": {"key": "k1", "admin": true}, "rec-7": {"key": "k2", "admin": false},
                "old": {"key": "k3"}}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load_credentials(&path, false).unwrap();
        assert_eq!(c.all["ops"].role, Role::Admin);
        assert_eq!(c.all["rec-7"].role, Role::Platform, "today's behaviour");
        assert_eq!(c.unset, ["old", "rec-7"]);
        assert_eq!(set_role(&path, "rec-7", Role::Recorder).unwrap(), None);
        // A rewrite keeps the administrator an administrator.
        let listed = list_credentials(&path).unwrap();
        assert_eq!(
            listed,
            [
                ("old".to_string(), None),
                ("ops".to_string(), Some(Role::Admin)),
                ("rec-7".to_string(), Some(Role::Recorder))
            ]
        );
        let c = load_credentials(&path, false).unwrap();
        assert_eq!(
            (c.all["rec-7"].role, c.unset),
            (Role::Recorder, vec!["old".to_string()])
        );
        assert!(set_role(&path, "nobody", Role::Admin).is_err());
    }

    #[test]
    fn demo_credentials_and_loose_modes_are_refused_outside_demo_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        std::fs::copy(
            Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../samples/lkm/credentials.json"
            )),
            &path,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_credentials(&path, false).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_credentials(&path, false).err().unwrap();
        assert!(matches!(e, CredentialsError::Demo { .. }), "{e}");
        assert!(e.to_string().contains("public DEMO key"), "{e}");
        let demo = load_credentials(&path, true).unwrap();
        assert_eq!(demo.all["demo-recorder"].role, Role::Recorder);
        assert_eq!(demo.all["demo-decrypt"].role, Role::Decrypt);
        assert!(demo.unset.is_empty());
    }
}
