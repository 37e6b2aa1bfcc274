//! Private keys at rest in the key manager: each sealed under a 32-byte master key, bound to
//! a context (its kek id) so that a sealed key cannot be passed off as another's.
//!
//! A sealed blob is `EKS1` | salt (16 bytes) | ciphertext | tag (32 bytes). From the master
//! key and the salt, HKDF-SHA256 derives an AES-256-CTR key and an HMAC-SHA256 key
//! (info `EREC/at-rest/enc` and `EREC/at-rest/mac`); the ciphertext is the plaintext under
//! AES-256-CTR with a zero IV (the key is fresh for every salt, so a key and IV pair never
//! repeats), and the tag is the HMAC of `EKS1` | salt | context length (u16 BE) | context |
//! ciphertext (encrypt-then-MAC). The tag is checked in constant time before anything is
//! decrypted, and every failure to open reads the same.
//!
//! Invariants:
//! - Master keys and opened keys live in zeroizing buffers and never appear in `Debug`.
//! - A master key file must be readable by its owner alone (0600 or stricter).
//! - [`Protector`] is the interface the key store uses, so a KMS-held key (issue 5's KMS mode)
//!   replaces the master key without touching the store.
//!
//! Its module `kms` (feature `server`): the [`Protector`] whose keys AWS KMS seals.

#[cfg(feature = "server")]
pub(crate) mod kms;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

const MAGIC: &[u8; 4] = b"EKS1";
const SALT: usize = 16;
const TAG: usize = 32;

/// Why a key could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtRestError {
    /// Not a sealed key of this format.
    #[error("not a sealed key (bad magic or too short)")]
    Malformed,
    /// The tag did not verify: another master key, another context, or a changed byte.
    #[error("sealed key does not open: authentication failed")]
    Authentication,
    /// The protector could not answer (a KMS unreachable or failing); the text says why.
    #[error("key protection unavailable: {0}")]
    Unavailable(String),
    /// The protector refused (a KMS key disabled, access denied, its state invalid): the
    /// organisation withdrew access. The text says which refusal.
    #[error("access revoked: {0}")]
    Revoked(String),
}

/// Seals and opens private keys at rest, and keys the integrity of the key manager's own
/// records (the audit log's MACs, backups) to the same secret.
pub trait Protector: Send + Sync {
    /// Seals `plain`, bound to `context`.
    fn seal(&self, plain: &[u8], context: &str) -> Result<Vec<u8>, AtRestError>;
    /// Opens a blob sealed with the same context.
    fn open(&self, blob: &[u8], context: &str) -> Result<Zeroizing<Vec<u8>>, AtRestError>;
    /// A 32-byte key for `purpose` (`audit`, `backup`): whoever lacks the protector's
    /// secret cannot compute it. A master key derives it; KMS mode derives it from a data key
    /// it keeps sealed by KMS.
    fn integrity_key(&self, purpose: &str) -> Result<Zeroizing<[u8; 32]>, AtRestError>;
    /// What a backup carries so that [`Protector::integrity_key_from`] finds the same key
    /// after the store is lost (KMS mode: the sealed data key); nothing for a master key.
    fn integrity_blob(&self) -> Result<Option<Vec<u8>>, AtRestError> {
        Ok(None)
    }
    /// The integrity key for `purpose` from a backup's blob (only a protector that makes
    /// blobs opens one).
    fn integrity_key_from(
        &self,
        _blob: &[u8],
        _purpose: &str,
    ) -> Result<Zeroizing<[u8; 32]>, AtRestError> {
        Err(AtRestError::Malformed)
    }
    /// Takes a backup's blob as its own where it has none (a lost store restored).
    fn adopt_integrity_blob(&self, _blob: &[u8]) -> Result<(), AtRestError> {
        Ok(())
    }
    /// Makes what [`Protector::integrity_key`] derives from, if there is nothing yet (KMS
    /// mode: a new sealed data key). Called only where nothing was keyed before: a key made
    /// now cannot verify what an earlier one keyed.
    fn prepare_integrity(&self) -> Result<(), AtRestError> {
        Ok(())
    }
}

/// The integrity key for `purpose` from a root secret (HKDF-SHA256, info
/// `EREC/lkm/integrity/<purpose>`).
pub fn derive_integrity(root: &[u8], purpose: &str) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, root);
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(&[b"EREC/lkm/integrity/", purpose.as_bytes()], out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// SHA-256 of the committed demo master key (`samples/lkm/master.DEMO-ONLY.key`): public, so
/// a key manager without `demo = true` refuses it.
const DEMO_MASTER_KEY_SHA256: &str =
    "2cabec1c2ec575150a35baef98ead4de3948de1de710c6c18776aa88e8128b21";

/// A local master key.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// Why a master key file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// Others than its owner may read it.
    #[error(transparent)]
    Mode(#[from] edgerec_net::durable::OwnerOnlyError),
    /// It cannot be read.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It does not hold 64 hex digits.
    #[error("{}: not 64 hex digits", .0.display())]
    NotHex(std::path::PathBuf),
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Result<MasterKey, getrandom::Error> {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(k.as_mut())?;
        Ok(MasterKey(k))
    }

    /// Writes a new master key to `path` (64 hex digits and a newline, created 0600; an
    /// existing file is never overwritten).
    pub fn create(path: &Path) -> std::io::Result<MasterKey> {
        let key = MasterKey::generate().map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut text = Zeroizing::new(hex::encode(key.0.as_ref()));
        text.push('\n');
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(key)
    }

    /// Reads a master key file (64 hex digits), which must be readable by its owner alone.
    pub fn from_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
        edgerec_net::durable::check_owner_only(path, "a master key file")?;
        Self::read(path)
    }

    /// Reads a master key that is public anyway (the committed demo key store's), whatever
    /// its file mode: a fresh clone has it 0644.
    pub fn from_demo_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
        Self::read(path)
    }

    /// Whether this is the committed demo master key (public to anyone with the source).
    pub fn is_demo(&self) -> bool {
        use sha2::Digest;
        hex::encode(Sha256::digest(self.0.as_ref())) == DEMO_MASTER_KEY_SHA256
    }

    fn read(path: &Path) -> Result<MasterKey, MasterKeyError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            MasterKeyError::Unreadable {
                path: path.to_path_buf(),
                source,
            }
        })?);
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), key.as_mut())
            .map_err(|_| MasterKeyError::NotHex(path.to_path_buf()))?;
        Ok(MasterKey(key))
    }

    fn keys(&self, salt: &[u8]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        let hk = Hkdf::<Sha256>::new(Some(salt), self.0.as_ref());
        let (mut enc, mut mac) = (Zeroizing::new([0u8; 32]), Zeroizing::new([0u8; 32]));
        hk.expand(b"EREC/at-rest/enc", enc.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        hk.expand(b"EREC/at-rest/mac", mac.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        (enc, mac)
    }
}

fn tag(mac_key: &[u8; 32], salt: &[u8], context: &str, ciphertext: &[u8]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(mac_key).expect("HMAC takes a key of any length");
    m.update(MAGIC);
    m.update(salt);
    let len = u16::try_from(context.len()).unwrap_or(u16::MAX);
    m.update(&len.to_be_bytes());
    m.update(context.as_bytes());
    m.update(ciphertext);
    m
}

fn ctr(enc_key: &[u8; 32]) -> ctr::Ctr128BE<Aes256> {
    ctr::Ctr128BE::<Aes256>::new(enc_key.into(), &[0u8; 16].into())
}

impl Protector for MasterKey {
    fn seal(&self, plain: &[u8], context: &str) -> Result<Vec<u8>, AtRestError> {
        if context.len() > usize::from(u16::MAX) {
            return Err(AtRestError::Malformed);
        }
        let mut salt = [0u8; SALT];
        getrandom::fill(&mut salt).map_err(|e| AtRestError::Unavailable(e.to_string()))?;
        let (enc, mac) = self.keys(&salt);
        let mut out = Vec::with_capacity(MAGIC.len() + SALT + plain.len() + TAG);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&salt);
        let start = out.len();
        out.extend_from_slice(plain);
        ctr(&enc).apply_keystream(&mut out[start..]);
        let t = tag(&mac, &salt, context, &out[start..])
            .finalize()
            .into_bytes();
        out.extend_from_slice(&t);
        Ok(out)
    }

    fn open(&self, blob: &[u8], context: &str) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
        if blob.len() < MAGIC.len() + SALT + TAG || &blob[..MAGIC.len()] != MAGIC {
            return Err(AtRestError::Malformed);
        }
        let salt = &blob[MAGIC.len()..MAGIC.len() + SALT];
        let (ciphertext, t) =
            blob[MAGIC.len() + SALT..].split_at(blob.len() - MAGIC.len() - SALT - TAG);
        let (enc, mac) = self.keys(salt);
        // Constant time (hmac's verify_slice).
        tag(&mac, salt, context, ciphertext)
            .verify_slice(t)
            .map_err(|_| AtRestError::Authentication)?;
        let mut plain = Zeroizing::new(ciphertext.to_vec());
        ctr(&enc).apply_keystream(&mut plain);
        Ok(plain)
    }

    fn integrity_key(&self, purpose: &str) -> Result<Zeroizing<[u8; 32]>, AtRestError> {
        Ok(derive_integrity(self.0.as_ref(), purpose))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    fn fixed() -> MasterKey {
        MasterKey(Zeroizing::new([42u8; 32]))
    }

    #[test]
    fn sealed_keys_open_only_with_their_master_key_and_context() {
        let k = fixed();
        let blob = k.seal(b"PKCS#8 DER of a private key", "kek-a").unwrap();
        assert_eq!(&blob[..4], b"EKS1");
        assert_eq!(blob.len(), 4 + 16 + 27 + 32);
        assert!(
            !blob.windows(7).any(|w| w == b"PKCS#8 "),
            "the plaintext is not in the blob"
        );
        assert_eq!(
            k.open(&blob, "kek-a").unwrap().as_slice(),
            b"PKCS#8 DER of a private key"
        );
        assert_eq!(k.open(&blob, "kek-b"), Err(AtRestError::Authentication));
        let other = MasterKey(Zeroizing::new([43u8; 32]));
        assert_eq!(other.open(&blob, "kek-a"), Err(AtRestError::Authentication));
        assert_eq!(k.open(&blob[..40], "kek-a"), Err(AtRestError::Malformed));
        assert_eq!(k.open(b"EKS2", "kek-a"), Err(AtRestError::Malformed));
        assert_ne!(
            k.seal(b"x", "c").unwrap(),
            k.seal(b"x", "c").unwrap(),
            "fresh salt each time"
        );
        assert_eq!(format!("{k:?}"), "MasterKey(..)");
    }

    /// A blob sealed by this implementation, committed: the format must keep opening it.
    const VECTOR: &str = "454b53315b959f69768dba095a6e48fb62f6bcfae8e4c6033d6ab3159b9299ff2eeebc071a6d13ba5ef68057481795dc2794b88298f038e9083cb3d27779217d810d33230122a7699b70";

    #[test]
    fn the_committed_vector_opens_and_its_tampered_forms_do_not() {
        let blob = hex::decode(VECTOR).unwrap();
        let k = fixed();
        assert_eq!(
            k.open(&blob, "kek-vector").unwrap().as_slice(),
            b"edgerec at-rest vector"
        );
        let mut salt_changed = blob.clone();
        salt_changed[4] ^= 1;
        assert_eq!(
            k.open(&salt_changed, "kek-vector"),
            Err(AtRestError::Authentication)
        );
        let mut tag_changed = blob.clone();
        *tag_changed.last_mut().unwrap() ^= 0x80;
        assert_eq!(
            k.open(&tag_changed, "kek-vector"),
            Err(AtRestError::Authentication)
        );
        assert_eq!(
            k.open(&blob, "kek-vectors"),
            Err(AtRestError::Authentication)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn any_changed_byte_or_cut_fails(
            plain in proptest::collection::vec(any::<u8>(), 0..300),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let k = fixed();
            let blob = k.seal(&plain, "kek").unwrap();
            let opened = k.open(&blob, "kek").unwrap();
            prop_assert_eq!(opened.as_slice(), plain.as_slice());
            let mut bad = blob.clone();
            bad[at.index(blob.len())] ^= flip;
            prop_assert!(k.open(&bad, "kek").is_err());
            prop_assert!(k.open(&blob[..cut.index(blob.len())], "kek").is_err());
        }
    }

    #[test]
    fn master_key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let made = MasterKey::create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(MasterKey::create(&path).is_err(), "never overwritten");
        let read = MasterKey::from_file(&path).unwrap();
        let blob = made.seal(b"k", "c").unwrap();
        assert_eq!(read.open(&blob, "c").unwrap().as_slice(), b"k");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = MasterKey::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(dir.path().join("short"), "abcd").unwrap();
        std::fs::set_permissions(
            dir.path().join("short"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(
            MasterKey::from_file(&dir.path().join("short"))
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );
    }
}
