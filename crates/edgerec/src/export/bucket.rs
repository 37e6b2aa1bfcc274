//! An S3 bucket as an export's destination (`edgerec export --out s3://BUCKET/PREFIX
//! --out-config FILE [--sse s3|kms [--sse-kms-key-id ID]]`).
//!
//! Each output is streamed up as it is rendered: bytes gather in one part's buffer
//! (`[upload] multipart_part_bytes` of the out-config, 16 MiB by default); an output that
//! fits in one part goes up in a single `PUT`, a larger one as a multipart upload whose parts
//! leave as they fill. Memory is a part a job, whatever the recording's size. Every `PUT`
//! and part carries its SHA-256 (`x-amz-checksum-sha256`) for the store to verify, and every
//! object the asked-for server-side encryption (`x-amz-server-side-encryption`, and with
//! `kms` its key id), set on the `PUT` or on the multipart upload's start.
//!
//! Invariants:
//! - An output counts as written only after a `HEAD` shows it with the size written and
//!   the encryption asked for (and the KMS key id, when one was named and the store names
//!   it). A store that ignored the header fails the export of that recording, which says so;
//!   an output that is not confirmed is never recorded as done.
//! - An object appears under its key only when whole (a `PUT` or a completed upload is
//!   atomic); an upload cut by an error is aborted, one cut by a crash is left to the
//!   bucket's lifecycle rule for incomplete uploads (the export never lists them).
//! - Transient failures (5xx, timeouts, a dropped connection) are retried a few times with
//!   a growing pause, from the bytes still held; a permanent one (a 403: the credential may
//!   not write there) fails the recording at once.

use std::io::{self, Write};
use std::time::Duration;

use crate::error::Error;
use crate::store::s3::{ObjectInfo, S3Store};
use crate::store::{PartDone, Store, StoreError};

/// Server-side encryption asked of the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// None asked (the bucket's default applies).
    None,
    /// `AES256`: keys the store manages (SSE-S3).
    S3,
    /// `aws:kms`, with a key id or the account's default KMS key (SSE-KMS).
    Kms(Option<String>),
}

impl Sse {
    /// The value of `x-amz-server-side-encryption`, if any.
    pub fn header(&self) -> Option<&'static str> {
        match self {
            Sse::None => None,
            Sse::S3 => Some("AES256"),
            Sse::Kms(_) => Some("aws:kms"),
        }
    }

    /// How it is named in an export's done-records (`sse=AES256`, `sse=aws:kms:KEY`), if
    /// asked for: a record made with another encryption does not count.
    pub fn label(&self) -> Option<String> {
        match self {
            Sse::None => None,
            Sse::S3 => Some("sse=AES256".into()),
            Sse::Kms(key) => Some(format!(
                "sse=aws:kms:{}",
                key.as_deref().unwrap_or("default")
            )),
        }
    }

    /// The request headers that ask for it.
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some(v) = self.header() {
            h.push(("x-amz-server-side-encryption", v.to_string()));
        }
        if let Sse::Kms(Some(id)) = self {
            h.push(("x-amz-server-side-encryption-aws-kms-key-id", id.clone()));
        }
        h
    }

    /// Why what a `HEAD` shows is not what was asked, if it is not. A key id asked for
    /// matches one the store names in full (an ARN ends with `key/<id>`, an alias ARN
    /// with `alias/<name>`).
    pub fn mismatch(&self, info: &ObjectInfo) -> Option<String> {
        let want = self.header()?;
        let got = info.sse.as_deref().unwrap_or("none");
        if got != want {
            return Some(format!(
                "the store shows server-side encryption {got}, not the {want} asked for \
                 (a store that ignores x-amz-server-side-encryption)"
            ));
        }
        // An alias cannot be compared: stores show the key it names, by ARN.
        if let (Sse::Kms(Some(id)), Some(shown)) = (self, &info.sse_kms_key_id)
            && !id.starts_with("alias/")
            && !id.contains(":alias/")
            && shown != id
            && !shown.ends_with(&format!("/{id}"))
            && !shown.ends_with(&format!(":{id}"))
        {
            return Some(format!(
                "the store shows KMS key {shown}, not the {id} asked for"
            ));
        }
        None
    }
}

/// `s3://BUCKET[/PREFIX]`: the bucket and the key prefix (with a `/` at its end unless
/// empty).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url}: not an s3://BUCKET/PREFIX URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if !crate::appliance::config::is_bucket_name(bucket) {
        return Err(format!(
            "{url}: {bucket:?} is not an S3 bucket name (3 to 63 lower-case letters, digits, - and .)"
        ));
    }
    if !prefix
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-_./=".contains(&c))
        || prefix.split('/').any(|p| p == "." || p == "..")
        || prefix.starts_with('/')
    {
        return Err(format!(
            "{url}: the prefix may hold only letters, digits and - _ . / = (no . or .. levels)"
        ));
    }
    let prefix = match prefix.is_empty() || prefix.ends_with('/') {
        true => prefix.to_string(),
        false => format!("{prefix}/"),
    };
    Ok((bucket.to_string(), prefix))
}

/// Attempts of one request before a transient failure is final.
const ATTEMPTS: u32 = 4;

/// Runs `f` until it succeeds, fails permanently, or has failed transiently [`ATTEMPTS`]
/// times (pausing 0.5 s, 1 s, 2 s between).
fn retried<T>(what: &str, mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, Error> {
    let mut pause = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(StoreError::Transient { .. }) if attempt < ATTEMPTS => {
                std::thread::sleep(pause);
                pause *= 2;
                attempt += 1;
            }
            Err(e) => return Err(Error::Invalid(format!("{what}: {e}"))),
        }
    }
}

/// The destination bucket.
pub struct Bucket {
    store: S3Store,
    bucket: String,
    prefix: String,
    sse: Sse,
    part_bytes: usize,
}

/// An object written and confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// Its ETag.
    pub etag: String,
}

impl Bucket {
    /// A destination `s3://{bucket}/{prefix}` reached with `cfg`.
    pub fn new(cfg: crate::store::s3::S3Config, prefix: String, sse: Sse) -> Result<Bucket, Error> {
        let part_bytes = usize::try_from(cfg.part_bytes).unwrap_or(usize::MAX);
        let bucket = cfg.bucket.clone();
        let store = S3Store::new(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(Bucket {
            store,
            bucket,
            prefix,
            sse,
            part_bytes,
        })
    }

    /// The key of `rel` (a path below the destination, `/`-separated).
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// How an object is named to the operator.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// A writer of the object `key`: [`ObjectWriter::finish`] puts it in place.
    pub fn writer(&self, key: String) -> ObjectWriter<'_> {
        ObjectWriter {
            bucket: self,
            key,
            buf: Vec::new(),
            upload: None,
            parts: Vec::new(),
            size: 0,
        }
    }

    /// What the bucket holds under `key`.
    pub fn info(&self, key: &str) -> Result<Option<ObjectInfo>, Error> {
        retried(&self.url(key), || self.store.info(key))
    }

    /// A small object (a done-record, at most 1 MiB), if there is one.
    pub fn get_small(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        retried(&self.url(key), || self.store.get_if_any(key, 1 << 20))
    }

    /// The encryption asked for.
    pub fn sse(&self) -> &Sse {
        &self.sse
    }

    /// Puts a small object (a done-record), encrypted like the outputs, and confirms it.
    pub fn put_small(&self, key: &str, bytes: Vec<u8>) -> Result<Written, Error> {
        let mut w = self.writer(key.to_string());
        w.write_all(&bytes)?;
        w.finish()
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = self.sse.headers();
        h.push(("content-type", "application/octet-stream".to_string()));
        h
    }

    /// Checks what a `HEAD` shows of `key` against `size` and the encryption asked for.
    fn confirm(&self, key: &str, size: u64) -> Result<Written, Error> {
        let url = self.url(key);
        let info = self.info(key)?.ok_or_else(|| {
            Error::Invalid(format!(
                "{url}: the store accepted the object but does not show it"
            ))
        })?;
        if info.size != size {
            return Err(Error::Invalid(format!(
                "{url}: the store shows {} bytes, not the {size} written",
                info.size
            )));
        }
        if let Some(why) = self.sse.mismatch(&info) {
            return Err(Error::Invalid(format!("{url}: {why}")));
        }
        Ok(Written {
            key: key.to_string(),
            size,
            etag: info.etag,
        })
    }
}

/// One object being written: bytes gather into a part; full parts go up as they fill.
pub struct ObjectWriter<'b> {
    bucket: &'b Bucket,
    key: String,
    buf: Vec<u8>,
    /// The multipart upload's id, once the first part is full.
    upload: Option<String>,
    parts: Vec<PartDone>,
    size: u64,
}

impl ObjectWriter<'_> {
    /// Sends the full buffer as the next part (starting the upload on the first).
    fn send_part(&mut self) -> Result<(), Error> {
        let b = self.bucket;
        let url = b.url(&self.key);
        let upload = match &self.upload {
            Some(u) => u.clone(),
            None => {
                let headers = b.headers();
                let id = retried(&url, || b.store.begin_parts(&self.key, &headers))?;
                self.upload = Some(id.clone());
                id
            }
        };
        let number = u32::try_from(self.parts.len() + 1)
            .ok()
            .filter(|n| *n <= 10_000)
            .ok_or_else(|| Error::Invalid(format!("{url}: more than 10,000 parts")))?;
        let data = bytes::Bytes::from(std::mem::take(&mut self.buf));
        let part = retried(&url, || {
            b.store.put_part(&self.key, &upload, number, data.clone())
        })?
        .ok_or_else(|| Error::Invalid(format!("{url}: the store no longer knows the upload")))?;
        self.parts.push(part);
        Ok(())
    }

    /// Puts the object in place and confirms it: one `PUT` if it never filled a part, else
    /// the last part and the upload's completion.
    pub fn finish(mut self) -> Result<Written, Error> {
        let b = self.bucket;
        let url = b.url(&self.key);
        match self.upload.clone() {
            None => {
                let data = bytes::Bytes::from(std::mem::take(&mut self.buf));
                let headers = b.headers();
                retried(&url, || {
                    b.store.put_bytes(&self.key, data.clone(), &headers)
                })?;
            }
            Some(upload) => {
                if !self.buf.is_empty() {
                    self.send_part()?;
                }
                let parts = std::mem::take(&mut self.parts);
                let done = retried(&url, || {
                    b.store.finish_parts(&self.key, &upload, parts.clone())
                });
                if let Err(e) = done {
                    // A completion whose answer was lost is retried against an upload that
                    // is gone: the object the store shows decides.
                    if b.info(&self.key)?.is_none_or(|i| i.size != self.size) {
                        self.parts = parts;
                        return Err(e);
                    }
                }
                self.upload = None;
            }
        }
        b.confirm(&self.key, self.size)
    }
}

impl Write for ObjectWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.bucket.part_bytes.saturating_sub(self.buf.len());
        let n = data.len().min(room.max(1));
        if self.buf.capacity() == 0 {
            self.buf.reserve(self.bucket.part_bytes.min(1 << 20));
        }
        self.buf.extend_from_slice(&data[..n]);
        self.size += n as u64;
        if self.buf.len() >= self.bucket.part_bytes {
            self.send_part().map_err(io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter<'_> {
    /// An upload not completed is aborted (best effort: a bucket lifecycle rule catches
    /// what a crash leaves).
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take()
            && let Err(e) = self.bucket.store.abort_upload(&self.key, &upload)
        {
            tracing::warn!(key = %self.key, error = %e, "cannot abort an unfinished upload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_urls_give_a_bucket_and_a_prefix_ending_in_a_slash() {
        assert_eq!(
            parse_url("s3://exports/edge/2026").unwrap(),
            ("exports".into(), "edge/2026/".into())
        );
        assert_eq!(
            parse_url("s3://exports").unwrap(),
            ("exports".into(), "".into())
        );
        assert_eq!(
            parse_url("s3://exports/").unwrap(),
            ("exports".into(), "".into())
        );
        assert!(parse_url("/tmp/out").is_err());
        assert!(parse_url("s3://Bad_Bucket/x").is_err());
        assert!(parse_url("s3://exports/../x").is_err());
        assert!(parse_url("s3://exports//x").is_err());
        assert!(parse_url("s3://exports/a b").is_err());
    }

    fn info(sse: Option<&str>, key: Option<&str>) -> ObjectInfo {
        ObjectInfo {
            size: 1,
            etag: "e".into(),
            sse: sse.map(str::to_string),
            sse_kms_key_id: key.map(str::to_string),
            erec_sha256: None,
        }
    }

    #[test]
    fn encryption_is_confirmed_as_asked() {
        assert_eq!(Sse::None.mismatch(&info(None, None)), None);
        assert_eq!(Sse::S3.mismatch(&info(Some("AES256"), None)), None);
        assert!(Sse::S3.mismatch(&info(None, None)).is_some());
        assert!(Sse::S3.mismatch(&info(Some("aws:kms"), None)).is_some());
        let kms = Sse::Kms(Some("1234abcd".into()));
        assert_eq!(
            kms.mismatch(&info(
                Some("aws:kms"),
                Some("arn:aws:kms:eu-west-1:111122223333:key/1234abcd")
            )),
            None
        );
        // A store that does not name the key is taken at the encryption it shows.
        assert_eq!(kms.mismatch(&info(Some("aws:kms"), None)), None);
        assert!(
            kms.mismatch(&info(Some("aws:kms"), Some("key/other")))
                .is_some()
        );
        assert_eq!(
            Sse::Kms(None).mismatch(&info(Some("aws:kms"), Some("k"))),
            None
        );
    }
}
