//! Hawk request authentication for the key manager's HTTP API.
//!
//! The `hawk` crate checks a request's MAC (in constant time), its payload hash and its
//! timestamp against the allowed clock skew. This module adds what the crate leaves to a
//! server: the credential lookup, the payload hash checked whenever a client sends one (and,
//! with `require_payload_hash`, required on every request with a body — off by default, as
//! the platform's sample key manager does not check it and contract clients need not send
//! it; TLS and the nonce cache already keep a captured request from being replayed with
//! another body), a nonce cache that refuses a request seen before within the skew window
//! (a replay), and one answer for every failure — the caller learns only "authentication
//! failed"; the reason goes to the audit log.
//!
//! Invariants:
//! - Credential keys live in zeroizing buffers and never appear in `Debug` or logs.
//! - [`NonceCache`] is pure (a function of the nonces seen and the time given) and bounded:
//!   entries expire once their timestamp is outside the window, so a replay outside it is
//!   already refused by the timestamp check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

/// The clock skew allowed by default: Hawk's customary 60 s.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(60);

/// Nonces remembered at most; beyond, requests are refused until old ones expire (a flood
/// of fresh nonces cannot push out the one an attacker wants to replay).
pub const MAX_NONCES: usize = 1_000_000;

/// One Hawk credential.
pub struct Credential {
    /// The shared key (HMAC-SHA256).
    pub key: Zeroizing<Vec<u8>>,
    /// Whether it may administer (issue credentials through the API).
    pub admin: bool,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

/// What a request is, as far as Hawk covers it.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// `GET`, `POST`, `OPTIONS`, …
    pub method: &'a str,
    /// The host the client addressed (the `Host` header, without the port).
    pub host: &'a str,
    /// The port the client addressed.
    pub port: u16,
    /// Path and query, as sent.
    pub path: &'a str,
    /// The `Content-Type` (its media type), for the payload hash.
    pub content_type: &'a str,
    /// The body; an empty one needs no payload hash.
    pub body: &'a [u8],
    /// The `Authorization` header.
    pub authorization: Option<&'a str>,
}

/// Who a request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The credential id.
    pub id: String,
    /// Whether it is an administrator's.
    pub admin: bool,
}

/// Why a request was refused (for the audit log; the caller is told only
/// "authentication failed").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct Denied {
    /// The credential id the request claimed, if it parsed.
    pub id: Option<String>,
    /// Why, for the audit log.
    pub reason: &'static str,
}

/// The nonces seen within the window, by expiry.
#[derive(Debug, Default)]
pub struct NonceCache {
    seen: HashSet<(String, String)>,
    by_expiry: BTreeMap<u64, Vec<(String, String)>>,
}

impl NonceCache {
    /// Records `(id, nonce)` of a request stamped `ts` (unix s) at `now` (unix s); false if
    /// it was seen before (a replay) or the cache is full.
    pub fn check_and_insert(
        &mut self,
        id: &str,
        nonce: &str,
        ts: u64,
        now: u64,
        window: u64,
    ) -> bool {
        // Forget what can no longer be replayed: stamped outside the window from now.
        let keep_from = now.saturating_sub(window);
        let expired: Vec<u64> = self.by_expiry.range(..keep_from).map(|(t, _)| *t).collect();
        for t in expired {
            for k in self.by_expiry.remove(&t).unwrap_or_default() {
                self.seen.remove(&k);
            }
        }
        let key = (id.to_string(), nonce.to_string());
        if self.seen.contains(&key) || self.seen.len() >= MAX_NONCES {
            return false;
        }
        self.seen.insert(key.clone());
        // Kept until its timestamp leaves the window (the timestamp check refuses it then).
        self.by_expiry.entry(ts).or_default().push(key);
        true
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Checks requests against a set of credentials.
#[derive(Debug)]
pub struct Verifier {
    credentials: std::sync::RwLock<std::sync::Arc<HashMap<String, Credential>>>,
    skew: Duration,
    require_payload_hash: bool,
    nonces: Mutex<NonceCache>,
}

impl Verifier {
    /// A verifier for `credentials`, allowing `skew` between the client's clock and ours;
    /// with `require_payload_hash`, a request with a body must carry its hash.
    pub fn new(
        credentials: HashMap<String, Credential>,
        skew: Duration,
        require_payload_hash: bool,
    ) -> Verifier {
        Verifier {
            credentials: std::sync::RwLock::new(std::sync::Arc::new(credentials)),
            skew,
            require_payload_hash,
            nonces: Mutex::new(NonceCache::default()),
        }
    }

    /// Replaces the credentials (the file changed): requests from now on are checked
    /// against these.
    pub fn replace(&self, credentials: HashMap<String, Credential>) {
        if let Ok(mut c) = self.credentials.write() {
            *c = std::sync::Arc::new(credentials);
        }
    }

    /// Authenticates a request (the MAC, the payload hash, the time, a fresh nonce).
    pub fn verify(&self, req: &RequestParts) -> Result<Authenticated, Denied> {
        let deny = |id: Option<&str>, reason| Denied {
            id: id.map(str::to_string),
            reason,
        };
        let value = req
            .authorization
            .ok_or_else(|| deny(None, "no Authorization header"))?;
        let value = value
            .strip_prefix("Hawk ")
            .ok_or_else(|| deny(None, "not a Hawk Authorization header"))?;
        let header =
            hawk::Header::from_str(value).map_err(|_| deny(None, "malformed Hawk header"))?;
        let id = header.id.clone().ok_or_else(|| deny(None, "no id"))?;
        let id = id.as_str();
        let all = self
            .credentials
            .read()
            .map(|c| std::sync::Arc::clone(&c))
            .map_err(|_| deny(Some(id), "credentials lock poisoned"))?;
        let cred = all
            .get(id)
            .ok_or_else(|| deny(Some(id), "unknown credential id"))?;
        let key = hawk::Key::new(cred.key.as_slice(), hawk::SHA256)
            .map_err(|_| deny(Some(id), "unusable key"))?;
        // A hash the client sent is always checked against the body.
        let hash = match (&header.hash, req.body.is_empty()) {
            (Some(_), _) => Some(
                hawk::PayloadHasher::hash(req.content_type, hawk::SHA256, req.body)
                    .map_err(|_| deny(Some(id), "cannot hash the payload"))?,
            ),
            (None, false) if self.require_payload_hash => {
                return Err(deny(Some(id), "a body without a payload hash"));
            }
            (None, _) => None,
        };
        let request = hawk::RequestBuilder::new(req.method, req.host, req.port, req.path)
            .hash(hash.as_deref())
            .request();
        if !request.validate_header(&header, &key, self.skew) {
            return Err(deny(Some(id), "bad MAC, payload hash or timestamp"));
        }
        let (Some(ts), Some(nonce)) = (header.ts, header.nonce.as_deref()) else {
            return Err(deny(Some(id), "no timestamp or nonce"));
        };
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let fresh = self
            .nonces
            .lock()
            .map_err(|_| deny(Some(id), "nonce cache unavailable"))?
            .check_and_insert(
                id,
                nonce,
                secs(ts),
                secs(SystemTime::now()),
                self.skew.as_secs() + 1,
            );
        if !fresh {
            return Err(deny(Some(id), "replayed nonce"));
        }
        Ok(Authenticated {
            id: id.to_string(),
            admin: cred.admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        let mut creds = HashMap::new();
        creds.insert(
            "recorder-1".to_string(),
            Credential {
                key: Zeroizing::new(b"a 32-byte shared secret, test!!!".to_vec()),
                admin: false,
            },
        );
        creds.insert(
            "admin".to_string(),
            Credential {
                key: Zeroizing::new(vec![7; 32]),
                admin: true,
            },
        );
        Verifier::new(creds, DEFAULT_SKEW, true)
    }

    /// A client's header, made by the hawk crate as a contract client would.
    fn header(
        id: &str,
        key: &[u8],
        method: &str,
        path: &str,
        body: &[u8],
        ts: SystemTime,
    ) -> String {
        let credentials = hawk::Credentials {
            id: id.to_string(),
            key: hawk::Key::new(key, hawk::SHA256).unwrap(),
        };
        let hash = (!body.is_empty())
            .then(|| hawk::PayloadHasher::hash("application/json", hawk::SHA256, body).unwrap());
        let h = hawk::RequestBuilder::new(method, "lkm.example", 8443, path)
            .hash(hash.as_deref())
            .request()
            .make_header_full(&credentials, ts, format!("n{}", getrandom::u64().unwrap()))
            .unwrap();
        format!("Hawk {h}")
    }

    fn parts<'a>(
        method: &'a str,
        path: &'a str,
        body: &'a [u8],
        auth: &'a str,
    ) -> RequestParts<'a> {
        RequestParts {
            method,
            host: "lkm.example",
            port: 8443,
            path,
            content_type: "application/json",
            body,
            authorization: Some(auth),
        }
    }

    const KEY: &[u8] = b"a 32-byte shared secret, test!!!";
    const BODY: &[u8] = br#"{"keypairId":"ab","body":"c2VhbGVk"}"#;
    const PATH: &str = "/key-management/v1/decrypt";

    #[test]
    fn a_signed_request_passes_once() {
        let v = verifier();
        let auth = header("recorder-1", KEY, "POST", PATH, BODY, SystemTime::now());
        assert_eq!(
            v.verify(&parts("POST", PATH, BODY, &auth)),
            Ok(Authenticated {
                id: "recorder-1".into(),
                admin: false
            })
        );
        let again = v.verify(&parts("POST", PATH, BODY, &auth)).unwrap_err();
        assert_eq!(again.reason, "replayed nonce");
        assert_eq!(
            again.to_string(),
            "authentication failed",
            "one answer for all"
        );
        let admin = header("admin", &[7; 32], "OPTIONS", PATH, b"", SystemTime::now());
        assert!(
            v.verify(&parts("OPTIONS", PATH, b"", &admin))
                .unwrap()
                .admin
        );
    }

    #[test]
    fn everything_else_is_refused_with_its_reason() {
        let v = verifier();
        let now = SystemTime::now();
        let cases: Vec<(String, &str, &[u8], &str)> = vec![
            (
                header(
                    "recorder-1",
                    b"another key of the same length!!",
                    "POST",
                    PATH,
                    BODY,
                    now,
                ),
                PATH,
                BODY,
                "bad MAC, payload hash or timestamp",
            ),
            (
                header("nobody", KEY, "POST", PATH, BODY, now),
                PATH,
                BODY,
                "unknown credential id",
            ),
            (
                header("recorder-1", KEY, "POST", PATH, BODY, now),
                "/key-management/v1/keypair",
                BODY,
                "bad MAC, payload hash or timestamp",
            ),
            (
                header("recorder-1", KEY, "POST", PATH, BODY, now),
                PATH,
                br#"{"keypairId":"cd","body":"c2VhbGVk"}"#,
                "bad MAC, payload hash or timestamp",
            ),
            (
                header("recorder-1", KEY, "POST", PATH, b"", now),
                PATH,
                BODY,
                "a body without a payload hash",
            ),
            (
                header(
                    "recorder-1",
                    KEY,
                    "POST",
                    PATH,
                    BODY,
                    now - Duration::from_secs(120),
                ),
                PATH,
                BODY,
                "bad MAC, payload hash or timestamp",
            ),
            (
                header(
                    "recorder-1",
                    KEY,
                    "POST",
                    PATH,
                    BODY,
                    now + Duration::from_secs(120),
                ),
                PATH,
                BODY,
                "bad MAC, payload hash or timestamp",
            ),
            (
                "Bearer x".into(),
                PATH,
                BODY,
                "not a Hawk Authorization header",
            ),
            (
                "Hawk id=\"x\", garbage".into(),
                PATH,
                BODY,
                "malformed Hawk header",
            ),
        ];
        for (auth, path, body, reason) in cases {
            let e = v.verify(&parts("POST", path, body, &auth)).unwrap_err();
            assert_eq!(e.reason, reason, "{auth}");
        }
        // Without the requirement, a body without a hash passes (contract clients), one with
        // a hash must match it.
        let lenient = Verifier::new(
            HashMap::from([(
                "recorder-1".to_string(),
                Credential {
                    key: Zeroizing::new(KEY.to_vec()),
                    admin: false,
                },
            )]),
            DEFAULT_SKEW,
            false,
        );
        let unhashed = header("recorder-1", KEY, "POST", PATH, b"", now);
        assert!(
            lenient
                .verify(&parts("POST", PATH, BODY, &unhashed))
                .is_ok()
        );
        let hashed = header("recorder-1", KEY, "POST", PATH, BODY, now);
        let other = br#"{"keypairId":"cd"}"#;
        assert!(
            lenient
                .verify(&parts("POST", PATH, other, &hashed))
                .is_err()
        );
        let mut none = parts("POST", PATH, BODY, "");
        none.authorization = None;
        assert_eq!(
            v.verify(&none).unwrap_err().reason,
            "no Authorization header"
        );
        assert!(!format!("{:?}", v).contains("shared secret"));
    }

    #[test]
    fn the_nonce_cache_forgets_only_what_the_window_already_refuses() {
        let mut c = NonceCache::default();
        assert!(c.check_and_insert("a", "n1", 1000, 1000, 60));
        assert!(
            !c.check_and_insert("a", "n1", 1000, 1030, 60),
            "replay in the window"
        );
        assert!(
            c.check_and_insert("b", "n1", 1000, 1030, 60),
            "nonces are per credential"
        );
        assert_eq!(c.len(), 2);
        // Past the window the entries go (a request stamped 1000 is refused by time then).
        assert!(c.check_and_insert("a", "n2", 1061, 1061, 60));
        assert_eq!(c.len(), 1);
        // A request stamped ahead of our clock is kept until its own stamp leaves the window.
        assert!(c.check_and_insert("a", "n3", 1100, 1062, 60));
        assert!(!c.check_and_insert("a", "n3", 1100, 1125, 60));
    }
}
