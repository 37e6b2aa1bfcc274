//! KMS mode of the key manager: its private keys are sealed at rest by AWS KMS (`Encrypt` /
//! `Decrypt` with a symmetric KMS key, SigV4-signed, JSON 1.1) instead of a local master
//! key, under an encryption context that names the organisation and the kek id. The
//! organisation keeps the last word: when it disables the KMS key or withdraws the grant,
//! unwraps stop ("access revoked"); when it grants again, they work again.
//!
//! Invariants:
//! - Every request carries the encryption context `{"organisation": …, "kek": <kek id>}`, so
//!   a blob moved to another key record, or to another organisation, does not open.
//! - KMS's refusals (`DisabledException`, `AccessDeniedException`,
//!   `KMSInvalidStateException`, `NotFoundException`, `KeyUnavailableException`) are
//!   [`AtRestError::Revoked`]; an unreachable or failing KMS is [`AtRestError::Unavailable`];
//!   `InvalidCiphertextException` (another context, a changed blob) is
//!   [`AtRestError::Authentication`].
//! - Plaintext key material passes through zeroized buffers here; the answer's bytes are
//!   zeroized when dropped.
//! - The integrity keys of the audit log and of backups come from a random 32-byte data key
//!   that KMS sealed (`Encrypt`, context kek `integrity`), kept in `integrity_file` (0600,
//!   made once — at `lkm init`, or on the first start after an upgrade, while nothing is
//!   keyed yet — and never replaced) and carried by every backup, whose restore brings it
//!   back to a lost store; it opens only while KMS grants `Decrypt`, like the private keys.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use sha2::Digest;
use zeroize::Zeroizing;

use crate::at_rest::{AtRestError, Protector};

/// What the blob of a KMS-sealed key starts with.
pub const MAGIC: &[u8; 5] = b"EKMS1";

/// `[lkm.kms]`, validated.
#[derive(Clone)]
pub struct KmsConfig {
    /// `https://kms.<region>.amazonaws.com` by default.
    pub endpoint: String,
    /// The SigV4 region.
    pub region: String,
    /// The KMS key: id, ARN or alias.
    pub key_id: String,
    /// The organisation, in every encryption context.
    pub organisation: String,
    /// The access key id.
    pub access_key: String,
    /// The secret key.
    pub secret_key: Zeroizing<String>,
    /// An extra CA (a private endpoint).
    pub ca_file: Option<PathBuf>,
    /// The longest one request may take.
    pub timeout: Duration,
    /// Where the KMS-sealed integrity data key is kept (`<store_dir>/integrity.kms`).
    pub integrity_file: PathBuf,
}

impl std::fmt::Debug for KmsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("key_id", &self.key_id)
            .field("organisation", &self.organisation)
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// The refusals that mean the organisation withdrew access.
const REFUSALS: [&str; 5] = [
    "DisabledException",
    "AccessDeniedException",
    "KMSInvalidStateException",
    "NotFoundException",
    "KeyUnavailableException",
];

/// How a KMS error answer reads: `__type` (possibly `namespace#Name`) and message.
pub fn classify_error(status: u16, body: &[u8]) -> AtRestError {
    match edgerec_net::answers::kms_error(body) {
        Some((kind, message)) => {
            let said = format!("KMS {kind}: {message}");
            if REFUSALS.contains(&kind.as_str()) {
                AtRestError::Revoked(said)
            } else if kind == "InvalidCiphertextException" {
                AtRestError::Authentication
            } else {
                AtRestError::Unavailable(said)
            }
        }
        None => AtRestError::Unavailable(format!("KMS answered HTTP {status}")),
    }
}

/// The KMS protector.
pub struct Kms {
    cfg: KmsConfig,
    credentials: aws_credential_types::Credentials,
    http: reqwest::blocking::Client,
    /// The integrity data key, once opened.
    integrity: std::sync::Mutex<Option<Zeroizing<Vec<u8>>>>,
}

/// The encryption context's kek of the integrity data key (never a kek id: those are hex).
const INTEGRITY: &str = "integrity";

impl Kms {
    /// A client for `cfg`.
    pub fn new(cfg: KmsConfig) -> Result<Kms, edgerec_net::client::ClientError> {
        let tls = edgerec_net::client::Tls {
            ca_file: cfg.ca_file.clone(),
            client_cert: None,
            client_key: None,
        };
        let http = edgerec_net::client::client(
            &tls,
            edgerec_net::client::Trust::SystemAndCa,
            Duration::from_secs(10),
            cfg.timeout,
        )?;
        let credentials = edgerec_net::aws::credentials(&cfg.access_key, &cfg.secret_key);
        Ok(Kms {
            cfg,
            credentials,
            http,
            integrity: std::sync::Mutex::new(None),
        })
    }

    /// The integrity data key, opened from `integrity_file` (once; then kept).
    fn integrity_root(&self) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
        let mut cached = self
            .integrity
            .lock()
            .map_err(|_| AtRestError::Unavailable("integrity key lock poisoned".into()))?;
        if let Some(k) = cached.as_ref() {
            return Ok(k.clone());
        }
        let path = &self.cfg.integrity_file;
        let blob = std::fs::read(path).map_err(|e| {
            AtRestError::Unavailable(format!(
                "the KMS-sealed integrity key {}: {e}{}",
                path.display(),
                if e.kind() == std::io::ErrorKind::NotFound {
                    " (lost with the key store? edgerec lkm restore brings it back from a backup)"
                } else {
                    ""
                }
            ))
        })?;
        let root = self.open_root(&blob)?;
        *cached = Some(root.clone());
        Ok(root)
    }

    fn open_root(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
        let root = self.open(blob, INTEGRITY)?;
        if root.len() != 32 {
            return Err(AtRestError::Authentication);
        }
        Ok(root)
    }

    fn context(&self, kek: &str) -> serde_json::Value {
        serde_json::json!({ "organisation": self.cfg.organisation, "kek": kek })
    }

    /// One call: `TrentService.<action>` with a JSON body; the answer's body.
    fn call(&self, action: &str, body: &[u8]) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
        let url = format!("{}/", self.cfg.endpoint.trim_end_matches('/'));
        let headers = [
            ("content-type", "application/x-amz-json-1.1".to_string()),
            ("x-amz-target", format!("TrentService.{action}")),
        ];
        let sha = hex::encode(sha2::Sha256::digest(body));
        let signature = edgerec_net::aws::signature_headers(
            edgerec_net::aws::Service::Kms,
            &self.credentials,
            &self.cfg.region,
            "POST",
            &url,
            &headers,
            &sha,
        )
        .map_err(|e| AtRestError::Unavailable(e.to_string()))?;
        let mut req = self.http.post(&url).body(body.to_vec());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        for (k, v) in signature {
            req = req.header(k, v);
        }
        let r = req
            .send()
            .map_err(|e| AtRestError::Unavailable(format!("KMS {url}: no answer: {e}")))?;
        let status = r.status().as_u16();
        let bytes = Zeroizing::new(
            r.bytes()
                .map_err(|e| AtRestError::Unavailable(format!("KMS {url}: {e}")))?
                .to_vec(),
        );
        if status == 200 {
            Ok(bytes)
        } else {
            Err(classify_error(status, &bytes))
        }
    }
}

impl Protector for Kms {
    fn seal(&self, plain: &[u8], context: &str) -> Result<Vec<u8>, AtRestError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        // Built by hand so that the base64 of the key lives only in zeroized buffers.
        let plain_b64 = Zeroizing::new(b64.encode(plain));
        let body = Zeroizing::new(
            format!(
                "{{\"KeyId\":{},\"Plaintext\":\"{}\",\"EncryptionContext\":{}}}",
                serde_json::Value::from(self.cfg.key_id.as_str()),
                plain_b64.as_str(),
                self.context(context)
            )
            .into_bytes(),
        );
        let answer = self.call("Encrypt", &body)?;
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Encrypted {
            ciphertext_blob: String,
        }
        let e: Encrypted = serde_json::from_slice(&answer)
            .map_err(|_| AtRestError::Unavailable("KMS Encrypt: no CiphertextBlob".into()))?;
        let blob = b64.decode(e.ciphertext_blob).map_err(|_| {
            AtRestError::Unavailable("KMS Encrypt: CiphertextBlob not base64".into())
        })?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&blob);
        Ok(out)
    }

    fn open(&self, blob: &[u8], context: &str) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let Some(kms_blob) = blob.strip_prefix(MAGIC.as_slice()) else {
            return Err(AtRestError::Malformed);
        };
        let req = serde_json::json!({
            "KeyId": self.cfg.key_id,
            "CiphertextBlob": b64.encode(kms_blob),
            "EncryptionContext": self.context(context),
        });
        let body = serde_json::to_vec(&req).expect("JSON values always serialize");
        let answer = self.call("Decrypt", &body)?;
        /// Borrowed from the zeroized answer (base64 needs no JSON escapes).
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Decrypted<'a> {
            plaintext: &'a str,
        }
        let d: Decrypted = serde_json::from_slice(&answer)
            .map_err(|_| AtRestError::Unavailable("KMS Decrypt: no Plaintext".into()))?;
        Ok(Zeroizing::new(b64.decode(d.plaintext).map_err(|_| {
            AtRestError::Unavailable("KMS Decrypt: Plaintext not base64".into())
        })?))
    }

    fn integrity_key(&self, purpose: &str) -> Result<Zeroizing<[u8; 32]>, AtRestError> {
        Ok(crate::at_rest::derive_integrity(
            &self.integrity_root()?,
            purpose,
        ))
    }

    fn integrity_blob(&self) -> Result<Option<Vec<u8>>, AtRestError> {
        self.integrity_root()?;
        std::fs::read(&self.cfg.integrity_file)
            .map(Some)
            .map_err(|e| {
                AtRestError::Unavailable(format!(
                    "integrity key {}: {e}",
                    self.cfg.integrity_file.display()
                ))
            })
    }

    fn integrity_key_from(
        &self,
        blob: &[u8],
        purpose: &str,
    ) -> Result<Zeroizing<[u8; 32]>, AtRestError> {
        Ok(crate::at_rest::derive_integrity(
            &self.open_root(blob)?,
            purpose,
        ))
    }

    fn prepare_integrity(&self) -> Result<(), AtRestError> {
        if self.cfg.integrity_file.exists() {
            return Ok(());
        }
        let mut fresh = Zeroizing::new(vec![0u8; 32]);
        getrandom::fill(&mut fresh).map_err(|e| AtRestError::Unavailable(e.to_string()))?;
        let blob = self.seal(&fresh, INTEGRITY)?;
        match write_new(&self.cfg.integrity_file, &blob) {
            // Another process made one first: theirs is the one.
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(AtRestError::Unavailable(format!(
                "integrity key {}: {e}",
                self.cfg.integrity_file.display()
            ))),
        }
    }

    fn adopt_integrity_blob(&self, blob: &[u8]) -> Result<(), AtRestError> {
        self.open_root(blob)?;
        match write_new(&self.cfg.integrity_file, blob) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(AtRestError::Unavailable(format!(
                "integrity key {}: {e}",
                self.cfg.integrity_file.display()
            ))),
        }
    }
}

/// Writes a new file (0600, never over an existing one) and syncs it and its directory.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    edgerec_net::durable::sync_dir(path.parent().unwrap_or(std::path::Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kms_refusals_are_revocations_and_the_rest_is_unavailability() {
        for kind in [
            "DisabledException",
            "com.amazonaws.kms#AccessDeniedException",
            "KMSInvalidStateException",
        ] {
            let body = format!(r#"{{"__type":"{kind}","message":"arn:... is disabled."}}"#);
            match classify_error(400, body.as_bytes()) {
                AtRestError::Revoked(why) => {
                    assert!(why.contains(kind.rsplit('#').next().unwrap()), "{why}")
                }
                other => panic!("{kind}: {other:?}"),
            }
        }
        assert_eq!(
            classify_error(400, br#"{"__type":"InvalidCiphertextException"}"#),
            AtRestError::Authentication
        );
        assert!(matches!(
            classify_error(500, br#"{"__type":"KMSInternalException","Message":"oops"}"#),
            AtRestError::Unavailable(w) if w.contains("oops")
        ));
        assert!(matches!(
            classify_error(502, b"<html>bad gateway</html>"),
            AtRestError::Unavailable(w) if w.contains("502")
        ));
    }
}
