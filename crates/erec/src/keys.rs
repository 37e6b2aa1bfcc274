//! Key-encryption keys (KEKs): loading RSA keys from PEM, kek ids, sealing a DEK to a
//! recipient, and the [`Unwrapper`] interface through which readers get a DEK back.
//!
//! Invariants:
//! - Only RSA keys of 3072 to 4096 bits are accepted, public or private (the format allows
//!   sealed DEKs of 384 to 512 bytes).
//! - A kek id is SHA-256 of the canonical DER SubjectPublicKeyInfo (rsaEncryption, NULL
//!   parameters), re-encoded from whatever form the key came in, so the same key always has
//!   the same id whether it was read as SPKI, PKCS#1 or from a private key.
//! - Unwrap failures are reported as one coarse [`UnwrapError::Failed`]; a DEK that is not
//!   exactly 32 bytes is such a failure. Private keys are never printed.

use std::fmt;
use std::path::Path;

use rsa::oaep::Oaep;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::traits::PublicKeyParts;
use rsa::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::Dek;
use crate::format::{KEK_ID_LEN, Wrap};

/// The OAEP label of wrap 1.
pub const WRAP1_LABEL: &[u8] = b"EREC/dek";
/// Smallest modulus accepted.
pub const MIN_BITS: usize = 3072;
/// Largest modulus accepted.
pub const MAX_BITS: usize = 4096;

/// Problems with a key file or key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The PEM or DER did not parse as an RSA key of the expected kind.
    #[error("{what}: not a usable RSA {kind} key ({detail})")]
    Parse {
        /// Where the key came from.
        what: String,
        /// "public" or "private".
        kind: &'static str,
        /// What the parser said.
        detail: String,
    },
    /// The modulus is outside 3072 ..= 4096 bits.
    #[error("{what}: RSA key of {bits} bits; edgerec needs 3072 to 4096 bits")]
    Size {
        /// Where the key came from.
        what: String,
        /// The modulus size.
        bits: usize,
    },
    /// Key generation or sealing failed inside the RSA implementation.
    #[error("RSA operation failed: {0}")]
    Rsa(String),
}

/// The id of a KEK: SHA-256 of its canonical SPKI DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekId(pub [u8; KEK_ID_LEN]);

/// The kek id of the committed demo key (`samples/demo-kek.pub.pem`), whose private half is
/// in the repository: an appliance seals to it only with `[keys] demo = true`.
pub const DEMO_KEK_ID: &str = "9ed9e96450b7404de4b3755d34f1515d37a04de75ec93834176048b730a2785d";

impl KekId {
    /// Whether this is the committed demo key, which anyone can open.
    pub fn is_demo(&self) -> bool {
        self.to_hex() == DEMO_KEK_ID
    }

    /// 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<KekId> {
        let v = hex::decode(s).ok()?;
        Some(KekId(v.try_into().ok()?))
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekId({})", self.to_hex())
    }
}

/// The public half of a KEK, what the appliance holds.
#[derive(Clone)]
pub struct KekPublic {
    key: PublicKey,
    id: KekId,
}

impl fmt::Debug for KekPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekPublic({}, {} bits)", self.id, self.bits())
    }
}

fn check_size(what: &str, key: &PublicKey) -> Result<(), KeyError> {
    let bits = key.n().bit_width() as usize;
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(KeyError::Size {
            what: what.to_string(),
            bits,
        });
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })
}

impl KekPublic {
    /// Wraps an RSA public key, checking its size and computing its id.
    pub fn from_key(what: &str, key: PublicKey) -> Result<KekPublic, KeyError> {
        check_size(what, &key)?;
        let der = key.to_public_key_der().map_err(|e| KeyError::Parse {
            what: what.to_string(),
            kind: "public",
            detail: e.to_string(),
        })?;
        let id = KekId(Sha256::digest(der.as_bytes()).into());
        Ok(KekPublic { key, id })
    }

    /// Parses a public key in PEM: SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`). A
    /// private key's PEM is refused here (use [`KekPrivate`]) so that one is never mistaken
    /// for a public key file and copied onto the appliance.
    pub fn from_pem(what: &str, pem: &str) -> Result<KekPublic, KeyError> {
        let parse_err = |detail: String| KeyError::Parse {
            what: what.to_string(),
            kind: "public",
            detail,
        };
        let key = if pem.contains("-----BEGIN RSA PUBLIC KEY-----") {
            PublicKey::from_pkcs1_pem(pem).map_err(|e| parse_err(e.to_string()))?
        } else if pem.contains("-----BEGIN PUBLIC KEY-----") {
            PublicKey::from_public_key_pem(pem).map_err(|e| parse_err(e.to_string()))?
        } else if pem.contains("PRIVATE KEY-----") {
            return Err(parse_err(
                "this is a private key; give the public key (openssl pkey -pubout)".into(),
            ));
        } else {
            return Err(parse_err(
                "no PUBLIC KEY or RSA PUBLIC KEY PEM block".into(),
            ));
        };
        Self::from_key(what, key)
    }

    /// Parses DER: SPKI, or PKCS#1 RSAPublicKey (the LKM contract's form).
    pub fn from_der(what: &str, der: &[u8]) -> Result<KekPublic, KeyError> {
        let key = PublicKey::from_public_key_der(der)
            .or_else(|_| PublicKey::from_pkcs1_der(der))
            .map_err(|e| KeyError::Parse {
                what: what.to_string(),
                kind: "public",
                detail: e.to_string(),
            })?;
        Self::from_key(what, key)
    }

    /// Reads a public key PEM file.
    pub fn from_file(path: &Path) -> Result<KekPublic, KeyError> {
        Self::from_pem(&path.display().to_string(), &read_text(path)?)
    }

    /// The kek id.
    pub fn id(&self) -> KekId {
        self.id
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.key.n().bit_width() as usize
    }

    /// The PKCS#1 `RSAPublicKey` DER: the key-manager contract's `publicKey` (base64 of it).
    pub fn to_pkcs1_der(&self) -> Vec<u8> {
        rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_der(&self.key)
            .expect("an RSA public key always encodes")
            .into_vec()
    }

    /// The SPKI PEM.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("a validated RSA public key encodes")
    }

    /// Seals a DEK to this key with the given wrap. The result is as long as the modulus.
    pub fn seal(&self, dek: &Dek, wrap: Wrap) -> Result<Vec<u8>, KeyError> {
        let mut rng = getrandom::SysRng;
        let r = match wrap {
            Wrap::OaepSha256 => self.key.encrypt(
                &mut rng,
                Oaep::<Sha256>::new_with_label(WRAP1_LABEL),
                dek.expose(),
            ),
            Wrap::OaepSha1 => self
                .key
                .encrypt(&mut rng, Oaep::<sha1::Sha1>::new(), dek.expose()),
        };
        r.map_err(|e| KeyError::Rsa(e.to_string()))
    }
}

/// A private KEK. Belongs off the appliance: in a key manager or with whoever decrypts.
pub struct KekPrivate {
    key: PrivateKey,
    public: KekPublic,
    /// The same key loaded into aws-lc-rs (with the `appliance` feature, which links it for
    /// TLS already): its OAEP is constant-time too and about seven times faster.
    #[cfg(feature = "aws-lc")]
    fast: Option<aws_lc_rs::rsa::OaepPrivateDecryptingKey>,
}

impl fmt::Debug for KekPrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekPrivate({})", self.public.id)
    }
}

impl KekPrivate {
    /// Generates a new key pair of `bits` bits (3072 or 4096).
    pub fn generate(bits: usize) -> Result<KekPrivate, KeyError> {
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(KeyError::Size {
                what: "keygen".into(),
                bits,
            });
        }
        // aws-lc-rs (where the build links it) makes a 3072-bit key in a tenth of the time
        // the rsa crate takes; both draw from the operating system's generator.
        #[cfg(feature = "aws-lc")]
        if let Ok(size) = match bits {
            3072 => Ok(aws_lc_rs::rsa::KeySize::Rsa3072),
            4096 => Ok(aws_lc_rs::rsa::KeySize::Rsa4096),
            _ => Err(()),
        } {
            use aws_lc_rs::encoding::AsDer;
            let made = aws_lc_rs::rsa::PrivateDecryptingKey::generate(size)
                .and_then(|k| k.as_der())
                .map_err(|e| KeyError::Rsa(e.to_string()))?;
            let key = PrivateKey::from_pkcs8_der(made.as_ref())
                .map_err(|e| KeyError::Rsa(e.to_string()))?;
            return Self::from_key("generated key", key);
        }
        let key = PrivateKey::new(&mut getrandom::SysRng, bits)
            .map_err(|e| KeyError::Rsa(e.to_string()))?;
        Self::from_key("generated key", key)
    }

    fn from_key(what: &str, key: PrivateKey) -> Result<KekPrivate, KeyError> {
        key.validate().map_err(|e| KeyError::Parse {
            what: what.to_string(),
            kind: "private",
            detail: e.to_string(),
        })?;
        let public = KekPublic::from_key(what, key.to_public_key())?;
        #[cfg(feature = "aws-lc")]
        let fast = key
            .to_pkcs8_der()
            .ok()
            .and_then(|der| aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(der.as_bytes()).ok())
            .and_then(|k| aws_lc_rs::rsa::OaepPrivateDecryptingKey::new(k).ok());
        Ok(KekPrivate {
            key,
            public,
            #[cfg(feature = "aws-lc")]
            fast,
        })
    }

    /// Parses a private key in PEM: PKCS#8 (`PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
    pub fn from_pem(what: &str, pem: &str) -> Result<KekPrivate, KeyError> {
        let parse_err = |detail: String| KeyError::Parse {
            what: what.to_string(),
            kind: "private",
            detail,
        };
        let key = if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
            PrivateKey::from_pkcs1_pem(pem).map_err(|e| parse_err(e.to_string()))?
        } else if pem.contains("-----BEGIN PRIVATE KEY-----") {
            PrivateKey::from_pkcs8_pem(pem).map_err(|e| parse_err(e.to_string()))?
        } else if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(parse_err(
                "passphrase-protected keys are not read; decrypt it first \
                 (openssl pkey -in KEY -out PLAIN) on the machine that decrypts"
                    .into(),
            ));
        } else {
            return Err(parse_err(
                "no PRIVATE KEY or RSA PRIVATE KEY PEM block".into(),
            ));
        };
        Self::from_key(what, key)
    }

    /// Reads a private key PEM file.
    pub fn from_file(path: &Path) -> Result<KekPrivate, KeyError> {
        Self::from_pem(&path.display().to_string(), &read_text(path)?)
    }

    /// The public half.
    pub fn public(&self) -> &KekPublic {
        &self.public
    }

    /// The PKCS#8 PEM, zeroized when dropped.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Rsa(e.to_string()))
    }

    /// Unwraps a sealed DEK; any failure, a wrong length included, is one coarse error.
    pub fn unseal(&self, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        #[cfg(feature = "aws-lc")]
        if let Some(k) = &self.fast {
            use aws_lc_rs::rsa::{OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256};
            if sealed.len() != k.key_size_bytes() {
                return Err(UnwrapError::Failed);
            }
            let mut out = Zeroizing::new(vec![0u8; k.min_output_size()]);
            let plain = match wrap {
                Wrap::OaepSha256 => {
                    k.decrypt(&OAEP_SHA256_MGF1SHA256, sealed, &mut out, Some(WRAP1_LABEL))
                }
                Wrap::OaepSha1 => k.decrypt(&OAEP_SHA1_MGF1SHA1, sealed, &mut out, None),
            }
            .map_err(|_| UnwrapError::Failed)?;
            return Dek::from_slice(plain).ok_or(UnwrapError::Failed);
        }
        let plain = match wrap {
            Wrap::OaepSha256 => self
                .key
                .decrypt(Oaep::<Sha256>::new_with_label(WRAP1_LABEL), sealed),
            Wrap::OaepSha1 => self.key.decrypt(Oaep::<sha1::Sha1>::new(), sealed),
        }
        .map(Zeroizing::new)
        .map_err(|_| UnwrapError::Failed)?;
        Dek::from_slice(&plain).ok_or(UnwrapError::Failed)
    }
}

/// The recipients new recordings are sealed to, behind a handle a key change can swap:
/// each new recording takes the current set once, so recordings in progress keep the key
/// they started with while later ones use the new one.
#[derive(Debug, Clone)]
pub struct KekHandle(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Vec<KekPublic>>>>);

impl KekHandle {
    /// A handle holding `keks` (the current KEK first, then any escrow KEK).
    pub fn new(keks: Vec<KekPublic>) -> KekHandle {
        KekHandle(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(keks),
        )))
    }

    /// The current set.
    pub fn current(&self) -> std::sync::Arc<Vec<KekPublic>> {
        match self.0.read() {
            Ok(g) => std::sync::Arc::clone(&g),
            Err(poisoned) => std::sync::Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the set for every recording started from now on.
    pub fn replace(&self, keks: Vec<KekPublic>) {
        let new = std::sync::Arc::new(keks);
        match self.0.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}

/// Why an unwrapper did not return a DEK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwrapError {
    /// This unwrapper does not hold the key with that id; the reader tries the next recipient.
    #[error("key not held")]
    UnknownKey,
    /// The key with that id was destroyed; the reader tries the next recipient, and says so
    /// if none opens.
    #[error("key destroyed")]
    Destroyed,
    /// The key is held but the sealed DEK did not unwrap to 32 bytes (one coarse answer).
    #[error("unwrap failed")]
    Failed,
    /// The key source could not answer (a key manager down, access revoked); the text says
    /// why and contains no secret.
    #[error("key source unavailable: {0}")]
    Unavailable(String),
}

/// Gives back a DEK from (kek id, wrap, sealed DEK). Readers take this, not a key file, so
/// that a key file, a key manager or any later source plug in without touching the format.
pub trait Unwrapper: Send + Sync {
    /// Unwraps one recipient's sealed DEK.
    fn unwrap_dek(&self, kek_id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError>;

    /// Unwraps one recipient's sealed DEK for the recording `recording` (a key manager
    /// writes its id to its audit log); the default asks [`Unwrapper::unwrap_dek`].
    fn unwrap_dek_for(
        &self,
        recording: &[u8; 16],
        kek_id: &KekId,
        wrap: Wrap,
        sealed: &[u8],
    ) -> Result<Dek, UnwrapError> {
        let _ = recording;
        self.unwrap_dek(kek_id, wrap, sealed)
    }

    /// The ids this unwrapper holds, for error messages; empty when it cannot list them.
    fn held_ids(&self) -> Vec<KekId> {
        Vec::new()
    }
}

/// Two key sources asked in turn: the first that holds the key answers. A key the first
/// refuses (destroyed, a failed unwrap) is still asked of the second, and the first refusal
/// is the answer if neither opens it.
#[derive(Debug)]
pub struct Either<A, B>(pub A, pub B);

impl<A: Unwrapper, B: Unwrapper> Either<A, B> {
    /// `ask` of the first source, then (unless it answered) of the second.
    fn in_turn(
        &self,
        ask: impl Fn(&dyn Unwrapper) -> Result<Dek, UnwrapError>,
    ) -> Result<Dek, UnwrapError> {
        match ask(&self.0) {
            Ok(dek) => Ok(dek),
            Err(UnwrapError::UnknownKey) => ask(&self.1),
            Err(first) => ask(&self.1).map_err(|_| first),
        }
    }
}

impl<A: Unwrapper, B: Unwrapper> Unwrapper for Either<A, B> {
    fn unwrap_dek(&self, kek_id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        self.in_turn(|u| u.unwrap_dek(kek_id, wrap, sealed))
    }

    fn unwrap_dek_for(
        &self,
        recording: &[u8; 16],
        kek_id: &KekId,
        wrap: Wrap,
        sealed: &[u8],
    ) -> Result<Dek, UnwrapError> {
        self.in_turn(|u| u.unwrap_dek_for(recording, kek_id, wrap, sealed))
    }

    fn held_ids(&self) -> Vec<KekId> {
        let mut ids = self.0.held_ids();
        ids.extend(self.1.held_ids());
        ids
    }
}

/// One or more private key files: the first [`Unwrapper`].
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: Vec<KekPrivate>,
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key.
    pub fn add(&mut self, key: KekPrivate) {
        self.keys.push(key);
    }

    /// Reads each file into a ring.
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::new();
        for p in paths {
            ring.add(KekPrivate::from_file(p.as_ref())?);
        }
        Ok(ring)
    }
}

impl Unwrapper for KeyRing {
    fn unwrap_dek(&self, kek_id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.public.id == *kek_id)
            .ok_or(UnwrapError::UnknownKey)?;
        key.unseal(wrap, sealed)
    }

    fn held_ids(&self) -> Vec<KekId> {
        self.keys.iter().map(|k| k.public.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = include_str!("../../../tests/vectors/test-kek.pem");
    const PUB: &str = include_str!("../../../tests/vectors/test-kek.pub.pem");

    #[test]
    fn ids_agree_across_forms() {
        let private = KekPrivate::from_pem("priv", PRIV).unwrap();
        let public = KekPublic::from_pem("pub", PUB).unwrap();
        assert_eq!(private.public().id(), public.id());
        assert_eq!(public.bits(), 3072);
        let pkcs1 =
            rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_pem(&public.key, LineEnding::LF).unwrap();
        assert_eq!(KekPublic::from_pem("p1", &pkcs1).unwrap().id(), public.id());
        let der = rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_der(&public.key).unwrap();
        assert_eq!(
            KekPublic::from_der("d", der.as_bytes()).unwrap().id(),
            public.id()
        );
        assert_eq!(
            KekPublic::from_pem("again", &public.to_pem()).unwrap().id(),
            public.id()
        );
    }

    #[test]
    fn seal_unseal_both_wraps() {
        let private = KekPrivate::from_pem("priv", PRIV).unwrap();
        let dek = Dek::generate().unwrap();
        for wrap in [Wrap::OaepSha256, Wrap::OaepSha1] {
            let sealed = private.public().seal(&dek, wrap).unwrap();
            assert_eq!(sealed.len(), 384);
            assert_eq!(private.unseal(wrap, &sealed).unwrap(), dek);
        }
        let sealed = private.public().seal(&dek, Wrap::OaepSha256).unwrap();
        assert_eq!(
            private.unseal(Wrap::OaepSha1, &sealed),
            Err(UnwrapError::Failed)
        );
        let mut bad = sealed.clone();
        bad[100] ^= 1;
        assert_eq!(
            private.unseal(Wrap::OaepSha256, &bad),
            Err(UnwrapError::Failed)
        );
    }

    #[test]
    fn refuses_private_as_public_and_garbage() {
        assert!(KekPublic::from_pem("x", PRIV).is_err());
        assert!(KekPublic::from_pem("x", "hello").is_err());
        assert!(KekPrivate::from_pem("x", PUB).is_err());
    }

    #[test]
    fn a_key_change_swaps_the_handle_for_new_users_only() {
        let a = KekPublic::from_pem("a", PUB).unwrap();
        let b = KekPrivate::from_pem("b", PRIV).unwrap();
        let h = KekHandle::new(vec![a.clone()]);
        let in_progress = h.current();
        let other = KekPublic::from_pem(
            "o",
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/vectors/other-kek.pub.pem"
            ))
            .unwrap(),
        )
        .unwrap();
        h.replace(vec![other.clone(), b.public().clone()]);
        assert_eq!(
            in_progress[0].id(),
            a.id(),
            "a recording in progress keeps its key"
        );
        assert_eq!(h.current()[0].id(), other.id());
        assert_eq!(h.clone().current().len(), 2, "clones share the swap");
    }

    #[test]
    fn ring_reports_unknown_key() {
        let mut ring = KeyRing::new();
        ring.add(KekPrivate::from_pem("priv", PRIV).unwrap());
        assert_eq!(
            ring.unwrap_dek(&KekId([0; 32]), Wrap::OaepSha256, &[0; 384]),
            Err(UnwrapError::UnknownKey)
        );
    }
}
