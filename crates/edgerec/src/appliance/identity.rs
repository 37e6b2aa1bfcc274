//! The appliance's identity: an Ed25519 key pair (through the aws-lc-rs the appliance links
//! already) to sign what the appliance vouches for — the manifests of what it recorded — so
//! that a package sealed by anyone else to the same public KEK can be told apart. The
//! appliance id is the first 16 hex digits of the SHA-256 of the public key (its 32 bytes).
//!
//! The private key lives in `[identity] key_file` (default `identity.key` in the spool
//! directory), PKCS#8 PEM, 0600, made at the appliance's first start and never replaced;
//! `edgerec identity show` prints the public key (SPKI PEM) and the id for the operator to
//! register where the store is verified.
//!
//! Invariants: the key file is created exclusively (never overwritten) and refused if any
//! other user may read it; the private key never leaves this module (it signs, nothing else);
//! it is a signing key, not a KEK: nothing is encrypted to it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

/// Why the identity could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or made.
    #[error("{}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Other users may read it.
    #[error("{}: readable by others (mode {mode:o}): `chmod 600` it", path.display())]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// It is not an Ed25519 private key in PKCS#8 PEM.
    #[error("{}: not an Ed25519 private key (PKCS#8 PEM)", path.display())]
    NotAKey {
        /// The key file.
        path: PathBuf,
    },
    /// There is none yet.
    #[error(
        "{}: no identity yet: the appliance makes it at its first start (`edgerec run`)",
        path.display()
    )]
    Missing {
        /// The key file.
        path: PathBuf,
    },
}

/// The appliance's key pair.
pub struct Identity {
    pair: Ed25519KeyPair,
}

const PRIVATE: &str = "PRIVATE KEY";
const PUBLIC: &str = "PUBLIC KEY";

/// `der` as PEM with `label`, 64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside a PEM block of `label`, if there is one.
fn unpem(label: &str, text: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text.split_once(&begin)?.1.split_once(&end)?.0;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(b64).ok()
}

impl Identity {
    /// The identity in `path`, made there first if there is none (0600, exclusively); with
    /// whether it was made now.
    pub fn load_or_create(path: &Path) -> Result<(Identity, bool), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        match Self::load(path) {
            Err(IdentityError::Missing { .. }) => {}
            other => return other.map(|i| (i, false)),
        }
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| {
            io(std::io::Error::other(
                "the random source failed to make a key",
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        // Written whole and synced under another name, then linked into place (which fails
        // if the name exists): a crash leaves no half key where the key belongs.
        let tmp = dir.join(format!(".identity.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(pem(PRIVATE, doc.as_ref()).as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| fs::hard_link(&tmp, path));
        let _ = fs::remove_file(&tmp);
        match written {
            Ok(()) => {}
            // Made meanwhile by another start: that one is the identity.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Self::load(path).map(|i| (i, false));
            }
            Err(e) => return Err(io(e)),
        }
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        let pair =
            Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| IdentityError::NotAKey {
                path: path.to_path_buf(),
            })?;
        Ok((Identity { pair }, true))
    }

    /// The identity in `path`.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(IdentityError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let not_a_key = || IdentityError::NotAKey {
            path: path.to_path_buf(),
        };
        let der = unpem(PRIVATE, &text).ok_or_else(not_a_key)?;
        // PKCS#8 v2 as made here, or v1 (what `openssl genpkey -algorithm ed25519` writes).
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|_| not_a_key())?;
        Ok(Identity { pair })
    }

    /// The public key's 32 bytes.
    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The appliance id: the first 16 hex digits of the SHA-256 of the public key.
    pub fn id(&self) -> String {
        id_of(self.public())
    }

    /// The public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`), to register.
    pub fn public_pem(&self) -> String {
        let der = self
            .pair
            .public_key()
            .as_der()
            .expect("an Ed25519 public key always encodes");
        pem(PUBLIC, der.as_ref())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.pair
            .sign(message)
            .as_ref()
            .try_into()
            .expect("an Ed25519 signature is 64 bytes")
    }
}

/// The appliance id of a public key (its 32 bytes).
pub fn id_of(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// A registered appliance's public key (what `edgerec identity show` printed), to verify
/// what it signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicIdentity {
    raw: [u8; 32],
}

impl PublicIdentity {
    /// The key of an SPKI PEM (`-----BEGIN PUBLIC KEY-----`); `None` if it is not an Ed25519
    /// public key.
    pub fn from_pem(text: &str) -> Option<PublicIdentity> {
        let der = unpem(PUBLIC, text)?;
        // SPKI of Ed25519: a fixed 12-byte prefix, then the key.
        const PREFIX: [u8; 12] = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        let raw = der.strip_prefix(&PREFIX[..])?.try_into().ok()?;
        Some(PublicIdentity { raw })
    }

    /// Its appliance id.
    pub fn id(&self) -> String {
        id_of(&self.raw)
    }

    /// Whether `signature` is this key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, self.raw)
            .verify(message, signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(public_pem: &str, message: &[u8], signature: &[u8]) -> Option<bool> {
        PublicIdentity::from_pem(public_pem).map(|k| k.verify(message, signature))
    }

    #[test]
    fn an_identity_is_made_once_kept_private_and_signs_what_its_public_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool/identity.key");
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Missing { .. })
        ));
        let (a, made) = Identity::load_or_create(&path).unwrap();
        assert!(made);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (b, made) = Identity::load_or_create(&path).unwrap();
        assert!(!made, "never replaced");
        assert_eq!(a.public(), b.public());
        assert_eq!(a.id().len(), 16);
        assert_eq!(a.id(), id_of(a.public()));
        assert_eq!(
            PublicIdentity::from_pem(&a.public_pem()).unwrap().id(),
            a.id()
        );
        let sig = a.sign(b"manifest 1");
        assert_eq!(verify(&a.public_pem(), b"manifest 1", &sig), Some(true));
        assert_eq!(verify(&a.public_pem(), b"manifest 2", &sig), Some(false));
        let (other, _) = Identity::load_or_create(&dir.path().join("other.key")).unwrap();
        assert_eq!(
            verify(&other.public_pem(), b"manifest 1", &sig),
            Some(false)
        );
        assert_eq!(verify("not a key", b"manifest 1", &sig), None);
        // Readable by others: refused, not used.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Exposed { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::NotAKey { .. })
        ));
    }
}
