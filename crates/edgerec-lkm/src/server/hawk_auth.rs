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
//! - [`NonceCache`] is pure (a function of the nonces seen and the time given) and bounded,
//!   in entries and in bytes: entries expire once their timestamp is outside the window, so a
//!   replay outside it is already refused by the timestamp check.
//! - Everything a caller sends is bounded before it is parsed or kept: the `Authorization`
//!   header ([`MAX_AUTHORIZATION`] bytes), and then its `id` ([`MAX_ID`]), `nonce`
//!   ([`MAX_NONCE`]) and `ext` ([`MAX_EXT`]) before the credential is looked up; a claimed id
//!   is handed on (to the audit log) only within its bound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use crate::roles::Role;

/// The clock skew the tests allow: Hawk's customary 60 s (`lkm.skew_secs`' default).
#[cfg(test)]
const DEFAULT_SKEW: Duration = Duration::from_secs(60);

/// Nonces remembered at most; beyond, requests are refused until old ones expire (a flood
/// of fresh nonces cannot push out the one an attacker wants to replay).
pub const MAX_NONCES: usize = 1_000_000;

/// Bytes the remembered nonces may take at most (ids and nonces with their bookkeeping):
/// with the bounds below, at least 200,000 requests within the window.
pub const MAX_NONCE_BYTES: usize = 64 << 20;

/// The longest `Authorization` header read at all.
pub const MAX_AUTHORIZATION: usize = 2048;
/// The longest credential id (ours are at most 64 characters).
pub const MAX_ID: usize = 128;
/// The longest nonce (Hawk clients send 6 to 32 characters).
pub const MAX_NONCE: usize = 64;
/// The longest `ext` (application data the MAC covers).
pub const MAX_EXT: usize = 1024;

/// One Hawk credential.
pub struct Credential {
    /// The shared key (HMAC-SHA256).
    pub key: Zeroizing<Vec<u8>>,
    /// What it may do.
    pub role: Role,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("role", &self.role)
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
    /// What it may do.
    pub role: Role,
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
#[derive(Debug)]
pub struct NonceCache {
    seen: HashSet<(String, String)>,
    by_expiry: BTreeMap<u64, Vec<(String, String)>>,
    /// What the entries take, by [`NonceCache::cost`].
    bytes: usize,
    /// What each credential's entries take.
    by_id: HashMap<String, usize>,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for NonceCache {
    fn default() -> NonceCache {
        NonceCache::bounded(MAX_NONCES, MAX_NONCE_BYTES)
    }
}

impl NonceCache {
    /// A cache of at most `max_entries` entries taking at most `max_bytes`.
    pub fn bounded(max_entries: usize, max_bytes: usize) -> NonceCache {
        NonceCache {
            seen: HashSet::new(),
            by_expiry: BTreeMap::new(),
            bytes: 0,
            by_id: HashMap::new(),
            max_entries,
            max_bytes,
        }
    }

    /// What one entry takes: its text twice (the set and the expiry list) and the
    /// bookkeeping of both.
    fn cost(id: &str, nonce: &str) -> usize {
        2 * (id.len() + nonce.len() + 2 * std::mem::size_of::<String>()) + 32
    }

    /// Bytes the entries take now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records `(id, nonce)` of a request stamped `ts` (unix s) at `now` (unix s), or says
    /// why not: seen before (a replay), the cache full, or this credential's share of it
    /// (a quarter: one credential flooding fresh nonces cannot lock the others out).
    pub fn check_and_insert(
        &mut self,
        id: &str,
        nonce: &str,
        ts: u64,
        now: u64,
        window: u64,
    ) -> Result<(), &'static str> {
        // Forget what can no longer be replayed: stamped outside the window from now.
        let keep_from = now.saturating_sub(window);
        let expired: Vec<u64> = self.by_expiry.range(..keep_from).map(|(t, _)| *t).collect();
        for t in expired {
            for k in self.by_expiry.remove(&t).unwrap_or_default() {
                let cost = Self::cost(&k.0, &k.1);
                self.bytes = self.bytes.saturating_sub(cost);
                if let Some(n) = self.by_id.get_mut(&k.0) {
                    *n = n.saturating_sub(cost);
                    if *n == 0 {
                        self.by_id.remove(&k.0);
                    }
                }
                self.seen.remove(&k);
            }
        }
        let key = (id.to_string(), nonce.to_string());
        let cost = Self::cost(id, nonce);
        if self.seen.contains(&key) {
            return Err("replayed nonce");
        }
        if self.seen.len() >= self.max_entries || self.bytes + cost > self.max_bytes {
            return Err("nonce cache full");
        }
        let own = self.by_id.get(id).copied().unwrap_or(0);
        if own + cost > self.max_bytes / 4 {
            return Err("nonce cache share of this credential full");
        }
        self.bytes += cost;
        *self.by_id.entry(id.to_string()).or_default() += cost;
        self.seen.insert(key.clone());
        // Kept until its timestamp leaves the window (the timestamp check refuses it then).
        self.by_expiry.entry(ts).or_default().push(key);
        Ok(())
    }

    /// Nonces remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// Whether every `ts` attribute of a Hawk header's attribute list (`id="…", ts="…", …`, read
/// as the `hawk` crate reads it) is at most 12 decimal digits: within year 33,000, far from
/// an overflow. Lists the crate would refuse anyway pass here; it refuses them.
fn ts_is_sane(attributes: &str) -> bool {
    let mut p = attributes;
    loop {
        p = p.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let Some(eq) = p.find('=') else {
            return true;
        };
        let attr = p[..eq].trim();
        let Some(rest) = p[eq + 1..].trim_start().strip_prefix('"') else {
            return true;
        };
        let Some(end) = rest.find('"') else {
            return true;
        };
        let val = &rest[..end];
        if attr == "ts" && !(val.len() <= 12 && val.bytes().all(|b| b.is_ascii_digit())) {
            return false;
        }
        p = &rest[end + 1..];
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
        if value.len() > MAX_AUTHORIZATION {
            return Err(deny(None, "Authorization header too long"));
        }
        let value = value
            .strip_prefix("Hawk ")
            .ok_or_else(|| deny(None, "not a Hawk Authorization header"))?;
        // The crate adds `ts` seconds to the epoch unchecked: a value near u64::MAX panics.
        if !ts_is_sane(value) {
            return Err(deny(None, "malformed Hawk header"));
        }
        let header =
            hawk::Header::from_str(value).map_err(|_| deny(None, "malformed Hawk header"))?;
        let id = header.id.clone().ok_or_else(|| deny(None, "no id"))?;
        if id.len() > MAX_ID {
            return Err(deny(None, "id too long"));
        }
        let id = id.as_str();
        if header.nonce.as_ref().is_some_and(|n| n.len() > MAX_NONCE) {
            return Err(deny(Some(id), "nonce too long"));
        }
        if header.ext.as_ref().is_some_and(|e| e.len() > MAX_EXT) {
            return Err(deny(Some(id), "ext too long"));
        }
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
        self.nonces
            .lock()
            .map_err(|_| deny(Some(id), "nonce cache unavailable"))?
            .check_and_insert(
                id,
                nonce,
                secs(ts),
                secs(SystemTime::now()),
                self.skew.as_secs() + 1,
            )
            .map_err(|why| deny(Some(id), why))?;
        Ok(Authenticated {
            id: id.to_string(),
            role: cred.role,
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
                role: Role::Recorder,
            },
        );
        creds.insert(
            "admin".to_string(),
            Credential {
                key: Zeroizing::new(vec![7; 32]),
                role: Role::Admin,
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
                role: Role::Recorder
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
        assert_eq!(
            v.verify(&parts("OPTIONS", PATH, b"", &admin)).unwrap().role,
            Role::Admin
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
                    role: Role::Recorder,
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
    fn oversized_fields_are_refused_before_the_credential_is_looked_up() {
        let v = verifier();
        let now = SystemTime::now();
        let make = |id: &str, nonce: String, ext: Option<&str>| {
            let credentials = hawk::Credentials {
                id: id.to_string(),
                key: hawk::Key::new(KEY, hawk::SHA256).unwrap(),
            };
            let h = hawk::RequestBuilder::new("GET", "lkm.example", 8443, PATH)
                .ext(ext)
                .request()
                .make_header_full(&credentials, now, nonce)
                .unwrap();
            format!("Hawk {h}")
        };
        let long_id = "r".repeat(MAX_ID + 1);
        let cases = [
            (make(&long_id, "n1".into(), None), "id too long", None),
            (
                make("recorder-1", "n".repeat(MAX_NONCE + 1), None),
                "nonce too long",
                Some("recorder-1"),
            ),
            (
                make("recorder-1", "n2".into(), Some(&"e".repeat(MAX_EXT + 1))),
                "ext too long",
                Some("recorder-1"),
            ),
            (
                format!("Hawk id=\"{}\"", "x".repeat(MAX_AUTHORIZATION)),
                "Authorization header too long",
                None,
            ),
        ];
        for (auth, reason, id) in cases {
            let e = v.verify(&parts("GET", PATH, b"", &auth)).unwrap_err();
            assert_eq!((e.reason, e.id.as_deref()), (reason, id));
        }
        // At the bounds, a request passes.
        let ok = make(
            "recorder-1",
            "n".repeat(MAX_NONCE),
            Some(&"e".repeat(MAX_EXT)),
        );
        assert!(ok.len() <= MAX_AUTHORIZATION, "{}", ok.len());
        assert!(v.verify(&parts("GET", PATH, b"", &ok)).is_ok());
    }

    #[test]
    fn a_timestamp_past_the_clock_s_range_is_refused_without_a_panic() {
        let v = verifier();
        for ts in [
            "18446744073709551615",
            "9223372036854775808",
            "1234567890123",
            "-1",
            "1e9",
        ] {
            let auth = format!("Hawk id=\"recorder-1\", ts=\"{ts}\", nonce=\"n\", mac=\"AA==\"");
            let e = v.verify(&parts("GET", PATH, b"", &auth)).unwrap_err();
            assert_eq!(e.reason, "malformed Hawk header", "{ts}");
            let spaced = format!("Hawk id=\"x\" ,  ts  =  \"{ts}\", mac=\"AA==\"");
            assert!(v.verify(&parts("GET", PATH, b"", &spaced)).is_err());
        }
        assert!(ts_is_sane(
            "id=\"a\", ts=\"1796051045\", nonce=\"12345678901234567890\""
        ));
    }

    #[test]
    fn the_nonce_cache_is_bounded_in_bytes_as_well_as_entries() {
        let mut c = NonceCache::bounded(1_000_000, 80_000);
        // One credential takes a quarter at most; the others still get theirs.
        let mut taken = 0;
        let refused = loop {
            match c.check_and_insert("recorder-1", &format!("{taken:064}"), 1000, 1000, 60) {
                Ok(()) => taken += 1,
                Err(why) => break why,
            }
        };
        assert_eq!(refused, "nonce cache share of this credential full");
        assert!(c.bytes() <= 20_000 && c.bytes() > 19_000, "{}", c.bytes());
        for id in ["recorder-2", "recorder-3", "recorder-4"] {
            let mut n = 0;
            while c
                .check_and_insert(id, &format!("{n:064}"), 1000, 1000, 60)
                .is_ok()
            {
                n += 1;
            }
            assert_eq!(n, taken, "{id}");
        }
        // The whole is bounded too: a fifth credential finds the rest of the cache full.
        let mut n = 0;
        let refused = loop {
            match c.check_and_insert("recorder-5", &format!("{n:064}"), 1000, 1000, 60) {
                Ok(()) => n += 1,
                Err(why) => break why,
            }
        };
        assert_eq!((refused, n < taken), ("nonce cache full", true));
        assert!(c.bytes() <= 80_000);
        // Once the window has passed, the space is free again.
        assert!(
            c.check_and_insert("recorder-1", "later", 1100, 1100, 60)
                .is_ok()
        );
        assert_eq!(
            (c.len(), c.bytes()),
            (1, NonceCache::cost("recorder-1", "later"))
        );
        let mut few = NonceCache::bounded(2, 1 << 20);
        assert!(
            few.check_and_insert("a", "1", 1, 1, 60).is_ok()
                && few.check_and_insert("a", "2", 1, 1, 60).is_ok()
        );
        assert!(
            few.check_and_insert("a", "3", 1, 1, 60).is_err(),
            "entries bounded too"
        );
    }

    #[test]
    fn the_nonce_cache_forgets_only_what_the_window_already_refuses() {
        let mut c = NonceCache::default();
        assert!(c.check_and_insert("a", "n1", 1000, 1000, 60).is_ok());
        assert!(
            c.check_and_insert("a", "n1", 1000, 1030, 60).is_err(),
            "replay in the window"
        );
        assert!(
            c.check_and_insert("b", "n1", 1000, 1030, 60).is_ok(),
            "nonces are per credential"
        );
        assert_eq!(c.len(), 2);
        // Past the window the entries go (a request stamped 1000 is refused by time then).
        assert!(c.check_and_insert("a", "n2", 1061, 1061, 60).is_ok());
        assert_eq!(c.len(), 1);
        // A request stamped ahead of our clock is kept until its own stamp leaves the window.
        assert!(c.check_and_insert("a", "n3", 1100, 1062, 60).is_ok());
        assert!(c.check_and_insert("a", "n3", 1100, 1125, 60).is_err());
    }
}
