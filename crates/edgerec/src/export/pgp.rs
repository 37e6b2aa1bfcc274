//! Export outputs encrypted to OpenPGP certificates (`export --pgp-recipient CERT.asc`), by
//! rPGP (the `pgp` crate): each output file becomes `<name>.pgp`, a binary OpenPGP message
//! (SEIPD v1, AES-256, one PKESK per recipient key) that `gpg --decrypt` turns back into the
//! exact file.
//!
//! Invariants:
//! - A certificate is used only if every signature in it verifies, it is not revoked and not
//!   expired. Its recipients are every key that may encrypt, as Sequoia chooses them: each
//!   subkey whose newest binding signature gives it an encryption key flag (communications
//!   or storage), that is not revoked, not expired and of an algorithm that encrypts, and the
//!   primary key if its own self-signature gives it such a flag. A certificate with none is
//!   refused with the reason; a revoked or expired subkey is never a recipient.
//! - Encryption streams: the plaintext is read from a reader as it is rendered (a pipe in
//!   memory, see [`crate::export`]), never from a file on disk.

use std::io::{Read, Write};
use std::path::PathBuf;

use pgp::composed::{Deserializable, MessageBuilder, SignedPublicKey};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::packet::{Signature, SignatureType};
use pgp::types::KeyDetails;

use crate::error::Error;

/// Which key of a certificate a message is encrypted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Primary,
    Subkey(usize),
}

/// The certificates outputs are encrypted to, each with the keys chosen.
pub struct Recipients {
    certs: Vec<(PathBuf, SignedPublicKey, Vec<Key>)>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.certs.iter().map(|(p, _, _)| p))
            .finish()
    }
}

/// The signature's creation time, seconds (0 if it has none).
fn created(s: &Signature) -> u32 {
    s.created().map_or(0, |t| t.as_secs())
}

/// Whether something made at `made` (s) with a lifetime `valid` (s; `None` or 0: for ever)
/// is over at `now`.
fn expired(made: u32, valid: Option<u32>, now: u32) -> bool {
    matches!(valid, Some(d) if d > 0 && u64::from(made) + u64::from(d) <= u64::from(now))
}

/// Whether a signature's key flags let its key encrypt.
fn may_encrypt(s: &Signature) -> bool {
    let f = s.key_flags();
    f.encrypt_comms() || f.encrypt_storage()
}

/// Why a certificate has no key to encrypt to.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Unusable {
    #[error("the certificate is revoked")]
    Revoked,
    #[error("the certificate has expired")]
    Expired,
    #[error(
        "no key that may encrypt: every encryption key is revoked, expired, or without an \
         encryption flag"
    )]
    NoEncryptionKey,
}

/// The keys of `cert` a message may be encrypted to at `now` (unix s), or why none.
fn choose(cert: &SignedPublicKey, now: u32) -> Result<Vec<Key>, Unusable> {
    if !cert.details.revocation_signatures.is_empty() {
        return Err(Unusable::Revoked);
    }
    // The primary key's newest self-signature (on a user id, or directly on the key).
    let own = cert
        .details
        .users
        .iter()
        .flat_map(|u| u.signatures.iter())
        .chain(cert.details.direct_signatures.iter())
        .filter(|s| {
            s.typ().is_some_and(|t| {
                matches!(
                    t,
                    SignatureType::CertGeneric
                        | SignatureType::CertPersona
                        | SignatureType::CertCasual
                        | SignatureType::CertPositive
                        | SignatureType::Key
                )
            })
        })
        .max_by_key(|s| created(s));
    let primary_made = cert.primary_key.created_at().as_secs();
    if let Some(s) = own
        && expired(
            primary_made,
            s.key_expiration_time().map(|d| d.as_secs()),
            now,
        )
    {
        return Err(Unusable::Expired);
    }
    let mut keys = Vec::new();
    for (i, sub) in cert.public_subkeys.iter().enumerate() {
        if sub
            .signatures
            .iter()
            .any(|s| s.typ() == Some(SignatureType::SubkeyRevocation))
        {
            continue;
        }
        let Some(binding) = sub
            .signatures
            .iter()
            .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
            .max_by_key(|s| created(s))
        else {
            continue;
        };
        if !may_encrypt(binding)
            || !sub.key.algorithm().can_encrypt()
            || expired(
                sub.key.created_at().as_secs(),
                binding.key_expiration_time().map(|d| d.as_secs()),
                now,
            )
            || expired(
                created(binding),
                binding.signature_expiration_time().map(|d| d.as_secs()),
                now,
            )
        {
            continue;
        }
        keys.push(Key::Subkey(i));
    }
    if let Some(s) = own
        && may_encrypt(s)
        && cert.primary_key.algorithm().can_encrypt()
    {
        keys.push(Key::Primary);
    }
    if keys.is_empty() {
        return Err(Unusable::NoEncryptionKey);
    }
    Ok(keys)
}

impl Recipients {
    /// Reads armored (or binary) certificates and chooses their keys (at the current time).
    pub fn load(paths: &[PathBuf]) -> Result<Recipients, Error> {
        let now = u32::try_from(erec::clock::now_ms() / 1000).unwrap_or(u32::MAX);
        let mut certs = Vec::new();
        for p in paths {
            let shown = p.display();
            let bytes = std::fs::read(p).map_err(|e| Error::Invalid(format!("{shown}: {e}")))?;
            let cert = match SignedPublicKey::from_armor_single(std::io::Cursor::new(&bytes)) {
                Ok((c, _)) => c,
                Err(_) => {
                    SignedPublicKey::from_bytes(std::io::Cursor::new(&bytes)).map_err(|e| {
                        Error::Invalid(format!("{shown}: not an OpenPGP certificate: {e}"))
                    })?
                }
            };
            cert.verify_bindings().map_err(|e| {
                Error::Invalid(format!("{shown}: its signatures do not verify: {e}"))
            })?;
            let keys = choose(&cert, now).map_err(|e| Error::Invalid(format!("{shown}: {e}")))?;
            certs.push((p.clone(), cert, keys));
        }
        Ok(Recipients { certs })
    }

    /// Encrypts what `plain` gives, to its end (its literal-data name `name`), into `out`.
    pub fn encrypt_reader(
        &self,
        plain: impl Read,
        name: &str,
        out: &mut impl Write,
    ) -> Result<(), Error> {
        let mut rng = rand::rngs::OsRng;
        let mut builder = MessageBuilder::from_reader(name.to_string(), plain)
            .seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
        for (path, cert, keys) in &self.certs {
            for k in keys {
                let encrypted = match k {
                    Key::Subkey(i) => builder.encrypt_to_key(&mut rng, &cert.public_subkeys[*i]),
                    Key::Primary => builder.encrypt_to_key(&mut rng, &cert.primary_key),
                };
                encrypted.map_err(|e| {
                    Error::Invalid(format!("{}: cannot encrypt to it: {e}", path.display()))
                })?;
            }
        }
        builder
            .to_writer(rng, out)
            .map_err(|e| Error::Invalid(format!("OpenPGP encryption failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_end_where_they_should() {
        assert!(!expired(1_000, None, 5_000));
        assert!(!expired(1_000, Some(0), 5_000), "0 is for ever");
        assert!(!expired(1_000, Some(3_999), 4_998));
        assert!(expired(1_000, Some(3_999), 4_999));
        assert!(
            !expired(u32::MAX, Some(u32::MAX), u32::MAX - 1),
            "no overflow"
        );
    }
}
