//! The `s3` store: any S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW, …),
//! spoken to with SigV4-signed requests (the `aws-sigv4` crate) over HTTP or HTTPS (rustls).
//!
//! A put, following the store invariants of [`crate::store`]:
//! 1. `HEAD` the key — unless this is the first try of a package never refused (its key, from
//!    a fresh UUIDv7, can then hold only an earlier copy of the same bytes): an object already
//!    there with the package's SHA-256 in its `x-amz-meta-erec-sha256` is success (an earlier
//!    attempt's answer was lost); one with another SHA-256 is a conflict, never overwritten.
//! 2. `PUT` the package, memory-mapped and handed to the request body without a copy, with
//!    `x-amz-checksum-sha256` (the store verifies the bytes it received),
//!    `x-amz-meta-erec-sha256` and `If-None-Match: *` (a store that supports it refuses to
//!    overwrite); a 409 or 412 goes to step 1's comparison.
//! 3. Stored once the store confirmed the SHA-256 it verified: echoed in the answer's
//!    `x-amz-checksum-sha256`, or else a `HEAD` showing an object of the right size whose
//!    `erec-sha256` matches.
//!
//! Above `multipart_threshold` the package goes up in parts instead (see `put_multipart`):
//! progress saved in the state file after every part, resumed after a restart, and only a
//! `HEAD` showing the `erec-sha256` counts (multipart checksums are composite).
//!
//! Statuses map onto the retry policy ([`crate::store::retry::classify`]): 5xx, 408, 429, timeouts
//! and connection errors are transient (with the store's `Retry-After`); other 4xx are
//! permanent, with the store's error code and message as the reason. The credentials need
//! `s3:PutObject` and `s3:GetObject` (HEAD) on the prefix, never a delete.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use sha2::Digest;
use zeroize::Zeroizing;

use crate::store::retry::{Class, classify};
use crate::store::wire::{CONTENT_TYPE, body, map};
use crate::store::{Checkpoint, Multipart, PartDone, Store, StoreError, Stored};
use edgerec_net::answers::xml_all;

/// What an `s3` store needs (`[store]` with `kind = "s3"`).
#[derive(Clone)]
pub struct S3Config {
    /// `http(s)://host:port`, no trailing slash; requests are path-style.
    pub endpoint: String,
    /// The SigV4 region (`us-east-1` for most non-AWS stores).
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// The access key id.
    pub access_key: String,
    /// The secret key.
    pub secret_key: Zeroizing<String>,
    /// TLS: an extra CA, a client certificate.
    pub tls: crate::store::wire::Tls,
    /// The longest one request may take.
    pub timeout: Duration,
    /// The bandwidth limit shared by all uploads, if any.
    pub limit: Option<crate::store::bandwidth::Limit>,
    /// Packages of this many bytes or more go up in parts (`upload.multipart_threshold_bytes`).
    pub multipart_threshold: u64,
    /// Bytes per part (`upload.multipart_part_bytes`), raised for a package that would
    /// otherwise need more than 10,000 parts.
    pub part_bytes: u64,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("secret_key", &"(secret)")
            .finish_non_exhaustive()
    }
}

/// The `s3` store.
pub struct S3Store {
    cfg: S3Config,
    client: reqwest::blocking::Client,
    /// Made once: every request signs with a clone (a reference count, not a copy of the
    /// secret; the crate keeps it zeroized).
    credentials: aws_credential_types::Credentials,
}

impl S3Store {
    /// A client for `cfg`.
    pub fn new(cfg: S3Config) -> Result<S3Store, crate::store::OpenError> {
        let client = crate::store::wire::client(&cfg.tls, cfg.timeout)?;
        let credentials = edgerec_net::aws::credentials(&cfg.access_key, &cfg.secret_key);
        Ok(S3Store {
            cfg,
            client,
            credentials,
        })
    }

    fn url(&self, key: &str) -> String {
        format!(
            "{}/{}/{}",
            self.cfg.endpoint,
            self.cfg.bucket,
            path_escape(key)
        )
    }

    /// Signs and sends one request; `body_sha256` is the hex SHA-256 of the body.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: Option<reqwest::blocking::Body>,
        body_sha256: &str,
    ) -> Result<reqwest::blocking::Response, StoreError> {
        let signature = edgerec_net::aws::signature_headers(
            edgerec_net::aws::Service::S3,
            &self.credentials,
            &self.cfg.region,
            method,
            url,
            headers,
            body_sha256,
        )
        .map_err(|e| StoreError::Permanent(e.to_string()))?;
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| StoreError::Permanent(e.to_string()))?;
        let mut req = self.client.request(method, url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        for (k, v) in signature {
            req = req.header(k, v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        req.send()
            .map_err(|e| crate::store::wire::no_answer(url, self.cfg.timeout, &e))
    }

    /// The object under `key`, whole (for checks and small objects; export streams).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let url = self.url(key);
        let r = self.send("GET", &url, &[], None, EMPTY_SHA256)?;
        if classify(r.status().as_u16()) != Class::Success {
            return Err(status_error(&url, r));
        }
        r.bytes()
            .map(|b| b.to_vec())
            .map_err(|e| StoreError::transient(format!("{url}: {e}")))
    }

    /// The SHA-256 (hex) of the object under `key`, hashed as it streams in.
    pub fn sha256_of(&self, key: &str) -> Result<String, StoreError> {
        self.get_to(key, &mut std::io::sink())
    }

    /// Streams the object under `key` into `out` (64 KiB at a time, whatever its size);
    /// returns its SHA-256 (hex), hashed on the way.
    pub fn get_to(&self, key: &str, out: &mut dyn std::io::Write) -> Result<String, StoreError> {
        use sha2::Digest;
        use std::io::Read;
        let url = self.url(key);
        let mut r = self.send("GET", &url, &[], None, EMPTY_SHA256)?;
        if classify(r.status().as_u16()) != Class::Success {
            return Err(status_error(&url, r));
        }
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok(hex::encode(hash.finalize())),
                Ok(n) => {
                    hash.update(&buf[..n]);
                    out.write_all(&buf[..n])
                        .map_err(|e| StoreError::transient(format!("{url}: writing: {e}")))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::transient(format!("{url}: {e}"))),
            }
        }
    }

    /// The first `n` bytes of the object under `key` (fewer if it is shorter): a ranged GET.
    pub fn get_first(&self, key: &str, n: usize) -> Result<Vec<u8>, StoreError> {
        let url = self.url(key);
        let range = [("range", format!("bytes=0-{}", n.max(1) - 1))];
        let r = self.send("GET", &url, &range, None, EMPTY_SHA256)?;
        if classify(r.status().as_u16()) != Class::Success {
            return Err(status_error(&url, r));
        }
        let mut b = r
            .bytes()
            .map(|b| b.to_vec())
            .map_err(|e| StoreError::transient(format!("{url}: {e}")))?;
        b.truncate(n);
        Ok(b)
    }

    /// The text of a GET (a listing); `None` for a 404.
    fn get_text(&self, url: &str) -> Result<Option<String>, StoreError> {
        let r = self.send("GET", url, &[], None, EMPTY_SHA256)?;
        match r.status().as_u16() {
            404 => Ok(None),
            c if classify(c) == Class::Success => r
                .text()
                .map(Some)
                .map_err(|e| StoreError::transient(format!("{url}: {e}"))),
            _ => Err(status_error(url, r)),
        }
    }

    /// The keys of every object under `prefix` (ListObjectsV2, page by page).
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/{}?list-type=2&prefix={}",
                self.cfg.endpoint,
                self.cfg.bucket,
                query_escape(prefix)
            );
            if let Some(t) = &token {
                url.push_str(&format!("&continuation-token={}", query_escape(t)));
            }
            let Some(body) = self.get_text(&url)? else {
                return Err(StoreError::Permanent(format!("{url}: 404, no such bucket")));
            };
            keys.extend(xml_all(&body, "Key"));
            token = xml_all(&body, "NextContinuationToken").into_iter().next();
            let truncated =
                xml_all(&body, "IsTruncated").first().map(String::as_str) == Some("true");
            if !truncated || token.is_none() {
                return Ok(keys);
            }
        }
    }

    /// The `erec-sha256` the store holds for an object (`None` if it has none).
    pub fn object_sha256(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self.info(key)? {
            Some(info) => Ok(info.erec_sha256),
            None => Err(StoreError::Permanent(format!("{key}: no such object"))),
        }
    }

    /// What is under `key` compared with the package: `Some` if it decides the put.
    fn compare(
        &self,
        key: &str,
        size: u64,
        sha_hex: &str,
    ) -> Result<Option<Result<Stored, StoreError>>, StoreError> {
        Ok(self.info(key)?.map(|info| match info.erec_sha256 {
            Some(h) if h == sha_hex && info.size == size => Ok(Stored::AlreadyThere),
            sha256 => Err(StoreError::Conflict {
                key: key.to_string(),
                existing: sha256.unwrap_or_else(|| "(none recorded)".into()),
            }),
        }))
    }
}

/// Percent-encodes every byte of `v` but the unreserved characters and those of `keep`.
fn escape(v: &str, keep: &[u8]) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || keep.contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Percent-encodes a query value (everything but the unreserved characters).
fn query_escape(v: &str) -> String {
    escape(v, b"")
}

/// Percent-encodes an object key for the request path as SigV4's canonical URI has it:
/// every byte but the unreserved characters and `/` (an export's `year=2026/` levels, a
/// conversation id with spaces).
fn path_escape(key: &str) -> String {
    escape(key, b"/")
}

/// Whether two ETags name the same part (stores differ in quoting them).
fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// SHA-256 of nothing, hex.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A failed status as a store error, with the store's own code and message.
fn status_error(url: &str, r: reqwest::blocking::Response) -> StoreError {
    crate::store::wire::failed_answer(url, r, |body| {
        let field = |tag: &str| xml_all(body, tag).into_iter().next();
        match (field("Code"), field("Message")) {
            (Some(c), Some(m)) => Some(format!("{c}: {m}")),
            (Some(c), None) => Some(c),
            // A HEAD answer has no body: the status says it all.
            _ => None,
        }
    })
}

impl Store for S3Store {
    fn put(&self, key: &str, file: &Path, sha256: &[u8; 32]) -> Result<Stored, StoreError> {
        self.put_resumable(key, file, sha256, &mut crate::store::InMemory::default())
    }

    fn put_resumable(
        &self,
        key: &str,
        file: &Path,
        sha256: &[u8; 32],
        checkpoint: &mut dyn Checkpoint,
    ) -> Result<Stored, StoreError> {
        let sha_hex = hex::encode(sha256);
        let f = File::open(file)
            .map_err(|e| StoreError::transient(format!("cannot open {}: {e}", file.display())))?;
        let size = f
            .metadata()
            .map_err(|e| StoreError::transient(format!("{}: {e}", file.display())))?
            .len();
        // Look first unless this is the first try of a fresh package (its key can then hold
        // only an earlier copy of the same bytes; `If-None-Match` guards the rest).
        if (checkpoint.attempted_before() || checkpoint.multipart().is_some())
            && let Some(decided) = self.compare(key, size, &sha_hex)?
        {
            return decided;
        }
        let mapped = map(&f)
            .map_err(|e| StoreError::transient(format!("cannot map {}: {e}", file.display())))?;
        let bytes = bytes::Bytes::from_owner(mapped);
        if size >= self.cfg.multipart_threshold.max(1) {
            return self.put_multipart(key, bytes, sha256, checkpoint);
        }
        let body = body(bytes, self.cfg.limit.as_ref());
        let url = self.url(key);
        let checksum = base64::engine::general_purpose::STANDARD.encode(sha256);
        let headers = [
            ("x-amz-checksum-sha256", checksum.clone()),
            ("x-amz-meta-erec-sha256", sha_hex.clone()),
            ("if-none-match", "*".to_string()),
            ("content-type", CONTENT_TYPE.to_string()),
            ("content-length", size.to_string()),
        ];
        let r = self.send("PUT", &url, &headers, Some(body), &sha_hex)?;
        let code = r.status().as_u16();
        match classify(code) {
            Class::Success => {}
            Class::Exists => {
                return self.compare(key, size, &sha_hex)?.unwrap_or_else(|| {
                    Err(StoreError::transient(format!(
                        "{url}: {code}, but nothing is there"
                    )))
                });
            }
            _ => return Err(status_error(&url, r)),
        }
        // Stored once the store confirmed the SHA-256 it verified: echoed in its answer (as
        // S3 does for a put with a checksum), or else shown by a HEAD.
        let echoed = r
            .headers()
            .get("x-amz-checksum-sha256")
            .and_then(|v| v.to_str().ok())
            == Some(checksum.as_str());
        if echoed {
            return Ok(Stored::Written);
        }
        match self.compare(key, size, &sha_hex)? {
            Some(Ok(_)) => Ok(Stored::Written),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::transient(format!(
                "{url}: the store answered {code} but does not show the object"
            ))),
        }
    }

    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let url = format!("{}?uploadId={}", self.url(key), query_escape(upload_id));
        let r = self.send("DELETE", &url, &[], None, EMPTY_SHA256)?;
        match r.status().as_u16() {
            404 => Ok(()), // gone already
            c if classify(c) == Class::Success => Ok(()),
            _ => Err(status_error(&url, r)),
        }
    }

    fn abort_orphans(
        &self,
        prefix: &str,
        keep: &HashSet<String>,
        older_than: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let cutoff = erec::clock::now_ms()
            .saturating_sub(u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX));
        let mut aborted = Vec::new();
        for u in self.list_uploads(prefix)? {
            let old = u.initiated_ms.is_some_and(|t| t <= cutoff);
            if old && !keep.contains(&u.upload_id) {
                self.abort_upload(&u.key, &u.upload_id)?;
                aborted.push(u.key);
            }
        }
        Ok(aborted)
    }

    fn kind(&self) -> &'static str {
        "s3"
    }
}

/// A multipart upload the store lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The object key.
    pub key: String,
    /// The upload id.
    pub upload_id: String,
    /// When it was started, unix ms, if the store said in a form we read.
    pub initiated_ms: Option<u64>,
}

impl S3Store {
    /// The multipart uploads in progress under `prefix` (ListMultipartUploads, page by page).
    pub fn list_uploads(&self, prefix: &str) -> Result<Vec<Upload>, StoreError> {
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut url = format!(
                "{}/{}?prefix={}&uploads=",
                self.cfg.endpoint,
                self.cfg.bucket,
                query_escape(prefix)
            );
            if let Some((k, u)) = &marker {
                url = format!(
                    "{}/{}?key-marker={}&prefix={}&upload-id-marker={}&uploads=",
                    self.cfg.endpoint,
                    self.cfg.bucket,
                    query_escape(k),
                    query_escape(prefix),
                    query_escape(u)
                );
            }
            let Some(body) = self.get_text(&url)? else {
                return Err(StoreError::Permanent(format!("{url}: 404, no such bucket")));
            };
            for u in xml_all(&body, "Upload") {
                let field = |t: &str| xml_all(&u, t).into_iter().next();
                if let (Some(key), Some(upload_id)) = (field("Key"), field("UploadId")) {
                    out.push(Upload {
                        key,
                        upload_id,
                        initiated_ms: field("Initiated")
                            .and_then(|t| erec::clock::parse_rfc3339_ms(&t)),
                    });
                }
            }
            let truncated =
                xml_all(&body, "IsTruncated").first().map(String::as_str) == Some("true");
            let next = (
                xml_all(&body, "NextKeyMarker").into_iter().next(),
                xml_all(&body, "NextUploadIdMarker").into_iter().next(),
            );
            match next {
                (Some(k), Some(u))
                    if truncated && marker.as_ref() != Some(&(k.clone(), u.clone())) =>
                {
                    marker = Some((k, u));
                }
                _ => return Ok(out),
            }
        }
    }

    /// The parts the store holds for an upload, by number with their ETags; `None` if the
    /// store no longer knows the upload (completed, aborted, or expired by a lifecycle rule).
    fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<(u32, String)>>, StoreError> {
        let mut parts = Vec::new();
        let mut marker = 0u32;
        loop {
            let url = format!(
                "{}?part-number-marker={marker}&uploadId={}",
                self.url(key),
                query_escape(upload_id)
            );
            let Some(body) = self.get_text(&url)? else {
                return Ok(None);
            };
            for p in xml_all(&body, "Part") {
                let field = |t: &str| xml_all(&p, t).into_iter().next();
                if let (Some(n), Some(etag)) = (
                    field("PartNumber").and_then(|n| n.parse().ok()),
                    field("ETag"),
                ) {
                    parts.push((n, etag));
                }
            }
            let truncated =
                xml_all(&body, "IsTruncated").first().map(String::as_str) == Some("true");
            let next: Option<u32> = xml_all(&body, "NextPartNumberMarker")
                .first()
                .and_then(|n| n.parse().ok());
            match next {
                Some(n) if truncated && n > marker => marker = n,
                _ => return Ok(Some(parts)),
            }
        }
    }

    /// Starts a multipart upload carrying the package's SHA-256 as metadata.
    fn create_upload(&self, key: &str, sha_hex: &str) -> Result<String, StoreError> {
        self.begin_parts(
            key,
            &[
                ("x-amz-meta-erec-sha256", sha_hex.to_string()),
                ("content-type", CONTENT_TYPE.to_string()),
            ],
        )
    }

    /// A multipart put: resumes the upload `checkpoint` holds if the store still has it
    /// (keeping the parts the store lists with the same ETag), or starts one; uploads the
    /// missing parts, each with its SHA-256 for the store to verify, saving progress after
    /// each; completes; and counts as stored only once a HEAD shows the package's SHA-256.
    fn put_multipart(
        &self,
        key: &str,
        bytes: bytes::Bytes,
        sha256: &[u8; 32],
        checkpoint: &mut dyn Checkpoint,
    ) -> Result<Stored, StoreError> {
        let size = bytes.len() as u64;
        let sha_hex = hex::encode(sha256);
        let url = self.url(key);
        let resumed = match checkpoint.multipart().cloned() {
            Some(mut m) => match self.list_parts(key, &m.upload_id)? {
                Some(listed) => {
                    m.parts.retain(|p| {
                        listed
                            .iter()
                            .any(|(n, e)| *n == p.number && same_etag(e, &p.etag))
                    });
                    tracing::info!(key, upload_id = %m.upload_id, parts_done = m.parts.len(), "resuming multipart upload");
                    Some(m)
                }
                None => {
                    tracing::info!(key, upload_id = %m.upload_id, "the store no longer knows the multipart upload; starting over");
                    checkpoint.save(None)?;
                    None
                }
            },
            None => None,
        };
        let mut m = match resumed {
            Some(m) => m,
            None => {
                let part_bytes = part_size(size, self.cfg.part_bytes);
                let upload_id = self.create_upload(key, &sha_hex)?;
                let m = Multipart {
                    upload_id,
                    part_bytes,
                    parts: Vec::new(),
                };
                checkpoint.save(Some(m.clone()))?;
                m
            }
        };
        let count = size.div_ceil(m.part_bytes.max(1));
        for number in
            1..=u32::try_from(count).map_err(|_| StoreError::Permanent("too many parts".into()))?
        {
            if m.parts.iter().any(|p| p.number == number) {
                continue;
            }
            let start = u64::from(number - 1) * m.part_bytes;
            let end = (start + m.part_bytes).min(size);
            let (start, end) = (
                usize::try_from(start).expect("within a mapped file"),
                usize::try_from(end).expect("within a mapped file"),
            );
            let Some(part) = self.put_part(key, &m.upload_id, number, bytes.slice(start..end))?
            else {
                checkpoint.save(None)?;
                return Err(StoreError::transient(format!(
                    "{url}: part {number}: the store no longer knows the upload; starting over"
                )));
            };
            m.parts.push(part);
            m.parts.sort_by_key(|p| p.number);
            checkpoint.save(Some(m.clone()))?;
        }
        let (done_url, r) = self.complete(key, &m)?;
        let code = r.status().as_u16();
        if code == 404 {
            // Completed by an earlier attempt whose answer was lost, or gone: what is there decides.
            return match self.compare(key, size, &sha_hex)? {
                Some(d) => d,
                None => {
                    checkpoint.save(None)?;
                    Err(StoreError::transient(format!(
                        "{done_url}: the store no longer knows the upload; starting over"
                    )))
                }
            };
        }
        if classify(code) == Class::Exists {
            return self.compare(key, size, &sha_hex)?.unwrap_or_else(|| {
                Err(StoreError::transient(format!(
                    "{done_url}: {code}, but nothing is there"
                )))
            });
        }
        if classify(code) != Class::Success {
            return Err(status_error(&done_url, r));
        }
        // A 200 may still carry an error (S3 answers before it has finished assembling).
        let answer = r
            .text()
            .map_err(|e| StoreError::transient(format!("{done_url}: {e}")))?;
        if let Some((c, msg)) = completion_error(&answer) {
            if matches!(
                c.as_str(),
                "InvalidPart" | "InvalidPartOrder" | "NoSuchUpload"
            ) {
                checkpoint.save(None)?;
            }
            return Err(StoreError::transient(format!("{done_url}: {c}: {msg}")));
        }
        match self.compare(key, size, &sha_hex)? {
            Some(Ok(_)) => Ok(Stored::Written),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::transient(format!(
                "{done_url}: the store completed the upload but does not show the object"
            ))),
        }
    }
}

/// What a `HEAD` shows of an object another tool than the uploader wrote (an export's
/// output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its size.
    pub size: u64,
    /// Its ETag, unquoted.
    pub etag: String,
    /// `x-amz-server-side-encryption`: `AES256`, `aws:kms`, or none.
    pub sse: Option<String>,
    /// `x-amz-server-side-encryption-aws-kms-key-id`, if the store names it.
    pub sse_kms_key_id: Option<String>,
    /// The package's SHA-256 the uploader recorded in `x-amz-meta-erec-sha256` (lower-case
    /// hex), if any.
    pub erec_sha256: Option<String>,
}

/// Objects written by `edgerec export --out s3://…`: whole small ones, large ones in parts,
/// each part and whole object with its SHA-256 for the store to verify. No retries here: the
/// caller holds the bytes and decides.
impl S3Store {
    /// What the store holds under `key`; `None` if nothing.
    pub fn info(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let url = self.url(key);
        let r = self.send("HEAD", &url, &[], None, EMPTY_SHA256)?;
        let code = r.status().as_u16();
        if code == 404 {
            return Ok(None);
        }
        if classify(code) != Class::Success {
            return Err(status_error(&url, r));
        }
        let h = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Some(ObjectInfo {
            size: h("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            etag: h("etag").unwrap_or_default().trim_matches('"').to_string(),
            sse: h("x-amz-server-side-encryption"),
            sse_kms_key_id: h("x-amz-server-side-encryption-aws-kms-key-id"),
            erec_sha256: h("x-amz-meta-erec-sha256").map(|v| v.to_ascii_lowercase()),
        }))
    }

    /// The object under `key`, whole, if there is one and it is at most `max` bytes (a
    /// small record: a larger one is an error, never read whole).
    pub fn get_if_any(&self, key: &str, max: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let url = self.url(key);
        let r = self.send("GET", &url, &[], None, EMPTY_SHA256)?;
        match r.status().as_u16() {
            404 => Ok(None),
            c if classify(c) == Class::Success => read_at_most(r, max, &url).map(Some),
            _ => Err(status_error(&url, r)),
        }
    }

    /// Puts `data` under `key` (replacing what is there) with `headers` besides its
    /// SHA-256; returns the ETag.
    pub fn put_bytes(
        &self,
        key: &str,
        data: bytes::Bytes,
        headers: &[(&str, String)],
    ) -> Result<String, StoreError> {
        let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
        let url = self.url(key);
        let mut all = vec![
            (
                "x-amz-checksum-sha256",
                base64::engine::general_purpose::STANDARD.encode(digest),
            ),
            ("content-length", data.len().to_string()),
        ];
        all.extend(headers.iter().cloned());
        let body = body(data, self.cfg.limit.as_ref());
        let r = self.send("PUT", &url, &all, Some(body), &hex::encode(digest))?;
        if classify(r.status().as_u16()) != Class::Success {
            return Err(status_error(&url, r));
        }
        Ok(etag_of(&r))
    }

    /// Starts a multipart upload to `key` with `headers` (server-side encryption, content
    /// type); returns its id.
    pub fn begin_parts(&self, key: &str, headers: &[(&str, String)]) -> Result<String, StoreError> {
        let url = format!("{}?uploads=", self.url(key));
        let mut all = vec![("x-amz-checksum-algorithm", "SHA256".to_string())];
        all.extend(headers.iter().cloned());
        let r = self.send("POST", &url, &all, None, EMPTY_SHA256)?;
        if classify(r.status().as_u16()) != Class::Success {
            return Err(status_error(&url, r));
        }
        let body = String::from_utf8_lossy(&read_at_most(r, MAX_ANSWER, &url)?).into_owned();
        xml_all(&body, "UploadId")
            .into_iter()
            .next()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| StoreError::transient(format!("{url}: no UploadId in the answer")))
    }

    /// Uploads part `number` of an upload, with its SHA-256 for the store to verify; `None`
    /// if the store no longer knows the upload (completed, aborted, expired).
    pub fn put_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: bytes::Bytes,
    ) -> Result<Option<PartDone>, StoreError> {
        let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
        let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
        let url = format!(
            "{}?partNumber={number}&uploadId={}",
            self.url(key),
            query_escape(upload_id)
        );
        let headers = [
            ("x-amz-checksum-sha256", b64.clone()),
            ("content-length", data.len().to_string()),
        ];
        let body = body(data, self.cfg.limit.as_ref());
        let r = self.send("PUT", &url, &headers, Some(body), &hex::encode(digest))?;
        match r.status().as_u16() {
            404 => return Ok(None),
            c if classify(c) == Class::Success => {}
            _ => return Err(status_error(&url, r)),
        }
        // As the store gave it (stores differ in quoting it; `same_etag` compares).
        let etag = r
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .ok_or_else(|| StoreError::transient(format!("{url}: no ETag in the answer")))?;
        Ok(Some(PartDone {
            number,
            etag,
            sha256: b64,
        }))
    }

    /// Completes an upload from its parts, in order.
    pub fn finish_parts(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<PartDone>,
    ) -> Result<(), StoreError> {
        let m = Multipart {
            upload_id: upload_id.to_string(),
            part_bytes: 0,
            parts,
        };
        let (url, r) = self.complete(key, &m)?;
        if classify(r.status().as_u16()) != Class::Success {
            return Err(status_error(&url, r));
        }
        // A 200 may still carry an error (S3 answers before it has finished assembling).
        let answer = String::from_utf8_lossy(&read_at_most(r, MAX_ANSWER, &url)?).into_owned();
        match completion_error(&answer) {
            Some((c, msg)) => Err(StoreError::transient(format!("{url}: {c}: {msg}"))),
            None => Ok(()),
        }
    }

    /// Sends CompleteMultipartUpload with `m`'s parts: the request's URL and the answer.
    fn complete(
        &self,
        key: &str,
        m: &Multipart,
    ) -> Result<(String, reqwest::blocking::Response), StoreError> {
        let xml = complete_body(m);
        let body_sha = hex::encode(sha2::Sha256::digest(xml.as_bytes()));
        let url = format!("{}?uploadId={}", self.url(key), query_escape(&m.upload_id));
        let headers = [
            ("content-type", "application/xml".to_string()),
            ("content-length", xml.len().to_string()),
        ];
        let r = self.send("POST", &url, &headers, Some(xml.into()), &body_sha)?;
        Ok((url, r))
    }
}

/// The code and message of an error a completion's 200 answer carries, if it does.
fn completion_error(answer: &str) -> Option<(String, String)> {
    answer.contains("<Error>").then(|| {
        let field = |t: &str| xml_all(answer, t).into_iter().next().unwrap_or_default();
        (field("Code"), field("Message"))
    })
}

/// The longest answer to a multipart start or completion read (a few hundred bytes
/// normally).
const MAX_ANSWER: usize = 1 << 20;

/// An answer's body, if it is at most `max` bytes (never more is read).
fn read_at_most(
    r: reqwest::blocking::Response,
    max: usize,
    url: &str,
) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    let mut body = Vec::new();
    r.take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| StoreError::transient(format!("{url}: {e}")))?;
    if body.len() > max {
        return Err(StoreError::Permanent(format!(
            "{url}: an answer of more than {max} bytes"
        )));
    }
    Ok(body)
}

/// An answer's ETag, unquoted (empty if none).
fn etag_of(r: &reqwest::blocking::Response) -> String {
    r.headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// Bytes per part for a package of `size`: `wanted`, raised (to whole MiB) where the package
/// would otherwise need more than S3's 10,000 parts.
pub fn part_size(size: u64, wanted: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let least = size.div_ceil(10_000).div_ceil(MIB) * MIB;
    wanted.max(least).max(1)
}

/// The CompleteMultipartUpload body: every part with its ETag and SHA-256, in order.
fn complete_body(m: &Multipart) -> String {
    let esc = |v: &str| {
        v.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut x =
        String::from("<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for p in &m.parts {
        x.push_str(&format!(
            "<Part><ChecksumSHA256>{}</ChecksumSHA256><ETag>{}</ETag><PartNumber>{}</PartNumber></Part>",
            esc(&p.sha256),
            esc(&p.etag),
            p.number
        ));
    }
    x.push_str("</CompleteMultipartUpload>");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_query_values_are_compared_and_written_right() {
        assert!(same_etag("\"abc\"", "abc"));
        assert!(!same_etag("\"abc\"", "abd"));
        assert_eq!(query_escape("calls/x+y=z~"), "calls%2Fx%2By%3Dz~");
        assert_eq!(
            path_escape("org/year=2026/conversation_id=a b+ü/x.wav"),
            "org/year%3D2026/conversation_id%3Da%20b%2B%C3%BC/x.wav"
        );
        assert_eq!(part_size(100 << 20, 16 << 20), 16 << 20);
        // 200 GiB in at most 10,000 parts: raised to whole MiB.
        let p = part_size(200 << 30, 16 << 20);
        assert!(
            (200u64 << 30).div_ceil(p) <= 10_000 && p.is_multiple_of(1 << 20),
            "{p}"
        );
        let xml = complete_body(&Multipart {
            upload_id: "u".into(),
            part_bytes: 5 << 20,
            parts: vec![PartDone {
                number: 1,
                etag: "\"e&1\"".into(),
                sha256: "c2hh".into(),
            }],
        });
        assert!(
            xml.contains("<Part><ChecksumSHA256>c2hh</ChecksumSHA256><ETag>\"e&amp;1\"</ETag><PartNumber>1</PartNumber></Part>"),
            "{xml}"
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:8333".into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            access_key: "AKID".into(),
            secret_key: Zeroizing::new("very-secret".into()),
            tls: Default::default(),
            timeout: Duration::from_secs(1),
            limit: None,
            multipart_threshold: 64 << 20,
            part_bytes: 16 << 20,
        };
        assert!(!format!("{cfg:?}").contains("very-secret"));
    }
}
