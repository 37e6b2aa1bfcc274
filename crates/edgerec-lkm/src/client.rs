//! The key manager's client, as recorders and the reading side use it: the current public
//! key (`GET /key-management/v1/current`) and DEK unwraps (`POST …/decrypt`), Hawk-signed,
//! over TLS with the key manager's CA pinned (no other root is trusted).
//!
//! Invariants:
//! - The credential's key is read from a file (or `EDGEREC_LKM_KEY`), held zeroized, and
//!   only ever used to sign; it is never sent.
//! - Every request signs its payload hash too, so a client of ours works with a key manager
//!   that requires one.
//! - A DEK returned is decoded into a zeroized buffer and the JSON text that carried it is
//!   zeroized; the DEK itself zeroizes when dropped.
//! - Answers map onto [`UnwrapError`] so the reader treats the key manager like any key
//!   source: 404 → not held (try the next recipient), 410 → destroyed, 400 → the one
//!   coarse failure, anything else (no answer, 5xx, 503 access revoked, 429) → unavailable,
//!   with the key manager's message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use zeroize::Zeroizing;

use erec::crypto::Dek;
use erec::format::Wrap;
use erec::keys::{KekId, KekPublic, UnwrapError, Unwrapper};

/// A Hawk credential as `edgerec lkm credentials add` prints it (`id: …`, `key: …`) or as
/// the contract's `POST /auth` returns it (`{"id", "authKey"}`).
pub struct ClientCredential {
    /// The credential id.
    pub id: String,
    key: Zeroizing<String>,
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientCredential({}, key ..)", self.id)
    }
}

impl ClientCredential {
    /// Parses a credential file's text ([`edgerec_net::answers::credential`]).
    pub fn parse(text: &str) -> Option<ClientCredential> {
        let (id, key) = edgerec_net::answers::credential(text)?;
        Some(ClientCredential {
            id,
            key: Zeroizing::new(key),
        })
    }

    /// Reads a credential file; `EDGEREC_LKM_KEY` in the environment replaces its key.
    pub fn from_file(path: &Path) -> Result<ClientCredential, SetupError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            SetupError::Credential {
                path: path.to_path_buf(),
                source,
            }
        })?);
        let mut c = ClientCredential::parse(&text)
            .ok_or_else(|| SetupError::NotACredential(path.to_path_buf()))?;
        if let Ok(k) = std::env::var("EDGEREC_LKM_KEY") {
            c.key = Zeroizing::new(k);
        }
        Ok(c)
    }
}

/// Where the key manager is and how to reach it.
#[derive(Debug, Clone)]
pub struct LkmTarget {
    /// `https://host:port` (a path prefix is allowed; `/key-management/v1/…` is added).
    pub url: String,
    /// The CA that issued the key manager's certificate: the only root trusted.
    pub ca_file: Option<PathBuf>,
    /// The credential file.
    pub credentials: PathBuf,
    /// The longest one request may take.
    pub timeout: Duration,
    /// Who asks, for the key manager's audit log (`PureCloud-User-Id`).
    pub user: String,
}

/// Why a request to the key manager failed.
#[derive(Debug, thiserror::Error)]
pub enum LkmClientError {
    /// No answer (connection refused, TLS, timeout).
    #[error("key manager {url}: no answer: {why}")]
    NoAnswer {
        /// The URL asked.
        url: String,
        /// What happened.
        why: String,
    },
    /// The request could not be signed with the credential (nothing was sent).
    #[error("key manager {url}: credential {id}: {source}")]
    Signing {
        /// The URL to ask.
        url: String,
        /// The credential's id.
        id: String,
        /// What Hawk said.
        source: hawk::Error,
    },
    /// An answer other than success.
    #[error("key manager {url}: {status} {message}")]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The key manager's message.
        message: String,
    },
    /// A success whose body is not what the contract says.
    #[error("key manager {url}: {why}")]
    BadAnswer {
        /// The URL asked.
        url: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The credential file cannot be read.
    #[error("{}: {source}", path.display())]
    Credential {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no credential.
    #[error(
        "{}: not a key manager credential (the lines id: and key: that edgerec lkm credentials add prints)",
        .0.display()
    )]
    NotACredential(std::path::PathBuf),
    /// The URL is not an https URL with a host.
    #[error("key manager URL {url}: {why}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Its HTTPS client could not be built (the CA file).
    #[error(transparent)]
    Client(#[from] edgerec_net::client::ClientError),
}

/// The current key as the key manager publishes it.
#[derive(Debug, Clone)]
pub struct CurrentKey {
    /// The public key.
    pub kek: KekPublic,
    /// When the key pair was made, unix ms.
    pub date_created: u64,
}

/// An error and its sources, one line ("error sending request: … : connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The longest answer read (a key pair list of a few hundred keys fits).
const MAX_ANSWER: usize = 1 << 20;

/// A key manager client.
pub struct LkmClient {
    base: String,
    host: String,
    port: u16,
    prefix: String,
    credential: ClientCredential,
    http: reqwest::blocking::Client,
    user: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeypairAnswer {
    id: String,
    public_key: String,
    date_created: u64,
}

impl LkmClient {
    /// A client for `target`.
    pub fn new(target: &LkmTarget) -> Result<LkmClient, SetupError> {
        let credential = ClientCredential::from_file(&target.credentials)?;
        let bad_url = |why: String| SetupError::Url {
            url: target.url.clone(),
            why,
        };
        let url = reqwest::Url::parse(&target.url).map_err(|e| bad_url(e.to_string()))?;
        if url.scheme() != "https" {
            return Err(bad_url("https only (the key manager speaks TLS)".into()));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad_url("no host".into()))?
            .to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let prefix = url.path().trim_end_matches('/').to_string();
        // The key manager's CA alone when one is given (pinned), else the system's.
        let tls = edgerec_net::client::Tls {
            ca_file: target.ca_file.clone(),
            ..Default::default()
        };
        let http = edgerec_net::client::client(
            &tls,
            edgerec_net::client::Trust::CaOnly,
            Duration::from_secs(5),
            target.timeout,
        )?;
        Ok(LkmClient {
            base: format!("{}://{}", url.scheme(), url.authority()),
            host,
            port,
            prefix,
            credential,
            http,
            user: target.user.clone(),
        })
    }

    fn authorization(&self, method: &str, path: &str, body: &[u8]) -> Result<String, hawk::Error> {
        let key = hawk::Key::new(self.credential.key.as_bytes(), hawk::SHA256)?;
        let credentials = hawk::Credentials {
            id: self.credential.id.clone(),
            key,
        };
        let hash = (!body.is_empty())
            .then(|| hawk::PayloadHasher::hash("application/json", hawk::SHA256, body))
            .transpose()?;
        let header = hawk::RequestBuilder::new(method, &self.host, self.port, path)
            .hash(hash.as_deref())
            .request()
            .make_header(&credentials)?;
        Ok(format!("Hawk {header}"))
    }

    /// One signed request; the answer's body on success (zeroized when dropped).
    fn call(
        &self,
        method: reqwest::Method,
        endpoint: &str,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, LkmClientError> {
        let path = format!("{}/key-management/v1/{endpoint}", self.prefix);
        let url = format!("{}{path}", self.base);
        let auth = self
            .authorization(method.as_str(), &path, body)
            .map_err(|source| LkmClientError::Signing {
                url: url.clone(),
                id: self.credential.id.clone(),
                source,
            })?;
        let mut req = self
            .http
            .request(method, &url)
            .header("Authorization", auth)
            .header("PureCloud-User-Id", &self.user);
        if !body.is_empty() {
            req = req
                .header("Content-Type", "application/json")
                .body(body.to_vec());
        }
        let r = req.send().map_err(|e| LkmClientError::NoAnswer {
            url: url.clone(),
            why: error_chain(&e),
        })?;
        let status = r.status().as_u16();
        // Read straight into a zeroizing buffer large enough for any answer, so that no
        // copy of a DEK is left behind by a reallocation; longer answers are cut (and then
        // fail to parse).
        let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_ANSWER));
        {
            use std::io::Read;
            r.take(MAX_ANSWER as u64)
                .read_to_end(&mut bytes)
                .map_err(|e| LkmClientError::NoAnswer {
                    url: url.clone(),
                    why: e.to_string(),
                })?;
        }
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or_default();
        Err(LkmClientError::Status {
            url,
            status,
            message,
        })
    }

    /// The key recorders seal to now.
    pub fn current(&self) -> Result<CurrentKey, LkmClientError> {
        let body = self.call(reqwest::Method::GET, "current", b"")?;
        let bad = |why: String| LkmClientError::BadAnswer {
            url: format!("{}{}/key-management/v1/current", self.base, self.prefix),
            why,
        };
        let a: KeypairAnswer = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(&a.public_key)
            .map_err(|e| bad(format!("publicKey: {e}")))?;
        let kek = KekPublic::from_der("the key manager's current key", &der)
            .map_err(|e| bad(e.to_string()))?;
        if kek.id().to_hex() != a.id {
            return Err(bad(format!(
                "keypair {} has a public key whose kek id is {}",
                a.id,
                kek.id()
            )));
        }
        Ok(CurrentKey {
            kek,
            date_created: a.date_created,
        })
    }

    /// Unwraps one sealed DEK (`decryptType` "erec" for wrap 1, the contract's default
    /// OAEP-SHA1 for wrap 2); `recording` goes to the key manager's audit log.
    pub fn decrypt(
        &self,
        kek: &KekId,
        wrap: Wrap,
        sealed: &[u8],
        recording: Option<&str>,
    ) -> Result<Dek, LkmClientError> {
        let mut req = serde_json::json!({
            "keypairId": kek.to_hex(),
            "body": base64::engine::general_purpose::STANDARD.encode(sealed),
        });
        if wrap == Wrap::OaepSha256 {
            req["decryptType"] = "erec".into();
        }
        if let Some(r) = recording {
            req["recordingId"] = r.into();
        }
        let body = serde_json::to_vec(&req).expect("JSON values always serialize");
        let answer = self.call(reqwest::Method::POST, "decrypt", &body)?;
        let bad = |why: &str| LkmClientError::BadAnswer {
            url: format!("{}{}/key-management/v1/decrypt", self.base, self.prefix),
            why: why.into(),
        };
        /// Borrowed from the zeroized answer: base64 needs no JSON escapes, so no copy.
        #[derive(Deserialize)]
        struct Answer<'a> {
            body: &'a str,
        }
        let a: Answer = serde_json::from_slice(&answer).map_err(|_| bad("no body"))?;
        let dek = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(a.body.as_bytes())
                .map_err(|_| bad("body is not base64"))?,
        );
        Dek::from_slice(&dek).ok_or_else(|| bad("the DEK is not 32 bytes"))
    }
}

impl Unwrapper for LkmClient {
    fn unwrap_dek(&self, kek_id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        self.unwrap_for(None, kek_id, wrap, sealed)
    }

    fn unwrap_dek_for(
        &self,
        recording: &[u8; 16],
        kek_id: &KekId,
        wrap: Wrap,
        sealed: &[u8],
    ) -> Result<Dek, UnwrapError> {
        let id = uuid::Uuid::from_bytes(*recording).to_string();
        self.unwrap_for(Some(&id), kek_id, wrap, sealed)
    }
}

impl LkmClient {
    fn unwrap_for(
        &self,
        recording: Option<&str>,
        kek_id: &KekId,
        wrap: Wrap,
        sealed: &[u8],
    ) -> Result<Dek, UnwrapError> {
        match self.decrypt(kek_id, wrap, sealed, recording) {
            Ok(dek) => Ok(dek),
            Err(LkmClientError::Status { status: 404, .. }) => Err(UnwrapError::UnknownKey),
            Err(LkmClientError::Status { status: 410, .. }) => Err(UnwrapError::Destroyed),
            Err(LkmClientError::Status { status: 400, .. }) => Err(UnwrapError::Failed),
            Err(e) => Err(UnwrapError::Unavailable(e.to_string())),
        }
    }
}

/// Who runs this command: the user `sudo` was run by, else the process's user (by name
/// where the system knows it, else the numeric uid).
pub fn os_user() -> String {
    if let Ok(u) = std::env::var("SUDO_USER")
        && !u.is_empty()
    {
        return u;
    }
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => std::env::var("USER").unwrap_or_else(|_| format!("uid {uid}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_as_printed_and_as_the_contract_returns_them() {
        let printed = "id: recorder-1\nkey: abcDEF_-123\nalgorithm: sha256\n";
        let c = ClientCredential::parse(printed).unwrap();
        assert_eq!(
            (c.id.as_str(), c.key.as_str()),
            ("recorder-1", "abcDEF_-123")
        );
        let json = r#"{"id":"r2","authKey":"k2","algorithm":"sha256"}"#;
        let c = ClientCredential::parse(json).unwrap();
        assert_eq!((c.id.as_str(), c.key.as_str()), ("r2", "k2"));
        assert!(ClientCredential::parse("id: only\n").is_none());
        assert!(ClientCredential::parse("").is_none());
        assert!(!format!("{c:?}").contains("k2"), "the key is not in Debug");
    }
}
