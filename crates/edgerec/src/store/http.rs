//! The `http` store: packages PUT to a URL template (`https://store.example/rec/{key}`) with
//! a bearer token, over HTTPS (rustls) with an optional CA file and client certificate
//! (the client, body and answers shared with the `s3` store are in [`crate::store::wire`]).
//!
//! The contract a receiving server keeps (docs/operations.md, "`http` store"):
//! - `PUT {url}` carries the package with `Content-Digest: sha-256=:<base64>:` (RFC 9530),
//!   `X-Erec-Sha256: <hex>`, `If-None-Match: *` and `Authorization: Bearer <token>`; the
//!   server verifies the digest before it answers 2xx, and never overwrites (412 or 409 for a
//!   key that exists).
//! - `HEAD {url}` answers 200 with the object's `Content-Length` and its SHA-256, as
//!   `Repr-Digest: sha-256=:<base64>:` or `X-Erec-Sha256: <hex>`; 404 if there is none.
//!
//! A put follows the store invariants of [`crate::store`]: `HEAD` first (the same SHA-256
//! is success, another a conflict), then `PUT` the memory-mapped package, then `HEAD` again —
//! only an object of the right size showing the package's SHA-256 counts as stored; a 2xx
//! alone does not. Statuses map onto the retry policy as for S3. The token needs to write and
//! read; the appliance never deletes.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use zeroize::Zeroizing;

pub use crate::store::wire::Tls;
use crate::store::wire::{client, failed_answer, no_answer};

use crate::store::retry::{Class, classify};
use crate::store::{Store, StoreError, Stored};

/// What an `http` store needs (`[store]` with `kind = "http"`).
#[derive(Clone)]
pub struct HttpConfig {
    /// `http(s)://…{key}…`: where a package goes; `{key}` becomes its object key.
    pub url: String,
    /// The bearer token, if the store takes one.
    pub token: Option<Zeroizing<String>>,
    /// TLS settings.
    pub tls: Tls,
    /// The longest one request may take.
    pub timeout: Duration,
    /// The bandwidth limit shared by all uploads, if any.
    pub limit: Option<crate::store::bandwidth::Limit>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "(secret)"))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Checks a URL template: http(s), exactly one `{key}`, in the path.
pub fn check_template(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with https:// (or http://)")?;
    if url.matches("{key}").count() != 1 {
        return Err("must hold {key} exactly once");
    }
    let (host, _) = rest.split_once('/').ok_or("{key} must be in the path")?;
    if host.is_empty() || host.contains("{key}") {
        return Err("{key} must be in the path");
    }
    if url.contains('#') {
        return Err("must not hold a fragment");
    }
    Ok(())
}

/// The `http` store.
pub struct HttpStore {
    cfg: HttpConfig,
    client: reqwest::blocking::Client,
}

/// What a `HEAD` found.
enum Head {
    Missing,
    Present { size: u64, sha256: Option<[u8; 32]> },
}

impl HttpStore {
    /// A client for `cfg`.
    pub fn new(cfg: HttpConfig) -> Result<HttpStore, crate::store::OpenError> {
        check_template(&cfg.url).map_err(|why| crate::store::OpenError::Template {
            url: cfg.url.clone(),
            why,
        })?;
        let client = client(&cfg.tls, cfg.timeout)?;
        Ok(HttpStore { cfg, client })
    }

    /// The URL of `key` (keys hold only URL-safe characters; anything else is escaped).
    pub fn url(&self, key: &str) -> String {
        let escaped: String = key
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        self.cfg.url.replace("{key}", &escaped)
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::blocking::RequestBuilder {
        let mut r = self.client.request(method, url);
        if let Some(t) = &self.cfg.token {
            r = r.bearer_auth(t.as_str());
        }
        r
    }

    fn send(
        &self,
        r: reqwest::blocking::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::blocking::Response, StoreError> {
        r.send().map_err(|e| no_answer(url, self.cfg.timeout, &e))
    }

    fn head(&self, url: &str) -> Result<Head, StoreError> {
        let r = self.send(self.request(reqwest::Method::HEAD, url), url)?;
        let code = r.status().as_u16();
        if code == 404 {
            return Ok(Head::Missing);
        }
        if classify(code) != Class::Success {
            return Err(status_error(url, r));
        }
        let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok());
        let size = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let sha256 = header("repr-digest")
            .and_then(edgerec_net::answers::sha256_of_digest)
            .or_else(|| {
                header("x-erec-sha256").and_then(|h| hex::decode(h.trim()).ok()?.try_into().ok())
            });
        Ok(Head::Present { size, sha256 })
    }

    /// What is at `url` compared with the package: `Some` if it decides the put.
    fn compare(
        &self,
        key: &str,
        url: &str,
        size: u64,
        sha256: &[u8; 32],
    ) -> Result<Option<Result<Stored, StoreError>>, StoreError> {
        Ok(match self.head(url)? {
            Head::Missing => None,
            Head::Present {
                size: s,
                sha256: Some(h),
            } if h == *sha256 && s == size => Some(Ok(Stored::AlreadyThere)),
            Head::Present { sha256, .. } => Some(Err(StoreError::Conflict {
                key: key.to_string(),
                existing: sha256.map_or_else(|| "(none shown)".into(), hex::encode),
            })),
        })
    }
}

/// A failed status as a store error, with the first line of the store's answer.
fn status_error(url: &str, r: reqwest::blocking::Response) -> StoreError {
    failed_answer(url, r, |body| {
        let said: String = body.lines().next()?.trim().chars().take(200).collect();
        (!said.is_empty()).then_some(said)
    })
}

impl Store for HttpStore {
    fn put(&self, key: &str, file: &Path, sha256: &[u8; 32]) -> Result<Stored, StoreError> {
        let url = self.url(key);
        let f = std::fs::File::open(file)
            .map_err(|e| StoreError::transient(format!("cannot open {}: {e}", file.display())))?;
        let size = f
            .metadata()
            .map_err(|e| StoreError::transient(format!("{}: {e}", file.display())))?
            .len();
        if let Some(decided) = self.compare(key, &url, size, sha256)? {
            return decided;
        }
        let mapped = crate::store::wire::map(&f)
            .map_err(|e| StoreError::transient(format!("cannot map {}: {e}", file.display())))?;
        let body =
            crate::store::wire::body(bytes::Bytes::from_owner(mapped), self.cfg.limit.as_ref());
        let b64 = base64::engine::general_purpose::STANDARD.encode(sha256);
        let req = self
            .request(reqwest::Method::PUT, &url)
            .header("content-digest", format!("sha-256=:{b64}:"))
            .header("x-erec-sha256", hex::encode(sha256))
            .header("if-none-match", "*")
            .header("content-type", crate::store::wire::CONTENT_TYPE)
            .header("content-length", size)
            .body(body);
        let r = self.send(req, &url)?;
        let code = r.status().as_u16();
        match classify(code) {
            Class::Success => {}
            Class::Exists => {
                return self.compare(key, &url, size, sha256)?.unwrap_or_else(|| {
                    Err(StoreError::transient(format!(
                        "{url}: {code}, but nothing is there"
                    )))
                });
            }
            _ => return Err(status_error(&url, r)),
        }
        match self.compare(key, &url, size, sha256)? {
            Some(Ok(_)) => Ok(Stored::Written),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::transient(format!(
                "{url}: the store answered {code} but does not show the object"
            ))),
        }
    }

    fn kind(&self) -> &'static str {
        "http"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_templates_are_checked_and_filled() {
        assert!(check_template("https://s.example/rec/{key}").is_ok());
        assert!(check_template("http://127.0.0.1:8080/a/{key}?site=x").is_ok());
        for bad in [
            "ftp://s.example/{key}",
            "https://s.example/rec/",
            "https://s.example/{key}/{key}",
            "https://{key}/x",
            "https://s.example",
            "https://s.example/{key}#x",
        ] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
        let store = HttpStore::new(HttpConfig {
            url: "https://s.example/rec/{key}?v=1".into(),
            token: Some(Zeroizing::new("secret-token".into())),
            tls: Tls::default(),
            timeout: Duration::from_secs(1),
            limit: None,
        })
        .unwrap();
        assert_eq!(
            store.url("site/2026/11/29/a b.erec"),
            "https://s.example/rec/site/2026/11/29/a%20b.erec?v=1"
        );
        assert!(!format!("{:?}", store.cfg).contains("secret-token"));
    }
}
