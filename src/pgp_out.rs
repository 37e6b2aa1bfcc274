//! Export outputs encrypted to OpenPGP certificates (`export --pgp-recipient CERT.asc`), by
//! rPGP (the `pgp` crate): each output file becomes `<name>.pgp`, a binary OpenPGP message
//! (SEIPD v1, AES-256, one PKESK per recipient) that `gpg --decrypt` turns back into the
//! exact file.
//!
//! Invariants:
//! - A certificate is used only if its binding signatures verify; its first subkey (else
//!   its primary key) whose algorithm can encrypt is the recipient.
//! - The encrypted file is written under a temporary name and renamed into place; the
//!   plaintext it came from is a temporary file (0600) that is removed, never persisted.

use std::io::Write;
use std::path::{Path, PathBuf};

use pgp::composed::{Deserializable, MessageBuilder, SignedPublicKey};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::types::KeyDetails;

use crate::error::Error;

/// The certificates outputs are encrypted to.
pub struct Recipients {
    certs: Vec<(PathBuf, SignedPublicKey)>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.certs.iter().map(|(p, _)| p))
            .finish()
    }
}

impl Recipients {
    /// Reads armored (or binary) certificates.
    pub fn load(paths: &[PathBuf]) -> Result<Recipients, Error> {
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
            let usable = cert
                .public_subkeys
                .iter()
                .any(|k| k.key.algorithm().can_encrypt())
                || cert.primary_key.algorithm().can_encrypt();
            if !usable {
                return Err(Error::Invalid(format!("{shown}: no key that can encrypt")));
            }
            certs.push((p.clone(), cert));
        }
        Ok(Recipients { certs })
    }

    /// Encrypts the file at `plain` (its literal-data name `name`) into `out`.
    pub fn encrypt(&self, plain: &Path, name: &str, out: &mut impl Write) -> Result<(), Error> {
        let mut rng = rand::rngs::OsRng;
        let file = std::fs::File::open(plain)?;
        let mut builder = MessageBuilder::from_reader(name.to_string(), file)
            .seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
        for (path, cert) in &self.certs {
            let encrypted = match cert
                .public_subkeys
                .iter()
                .find(|k| k.key.algorithm().can_encrypt())
            {
                Some(sub) => builder.encrypt_to_key(&mut rng, sub),
                None => builder.encrypt_to_key(&mut rng, &cert.primary_key),
            };
            encrypted.map_err(|e| {
                Error::Invalid(format!("{}: cannot encrypt to it: {e}", path.display()))
            })?;
        }
        builder
            .to_writer(rng, out)
            .map_err(|e| Error::Invalid(format!("OpenPGP encryption failed: {e}")))
    }
}
