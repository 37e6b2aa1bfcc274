//! What both HTTP stores (`s3`, `http`) share, below both: their HTTPS client (built by
//! `edgerec_net::client`), a package mapped as a request body and paced through the
//! bandwidth limit, and a failed answer or no answer turned into a [`StoreError`] of the
//! right class for the retry policy.
//!
//! Invariant: one of the crate's two `unsafe` blocks is here ([`map`]), with why it is sound (the
//! other takes the descriptors a service manager passed: `appliance::service_manager`).

use std::fs::File;
use std::time::{Duration, SystemTime};

use edgerec_net::answers::parse_retry_after;
pub use edgerec_net::client::Tls;
use edgerec_net::client::Trust;

use crate::store::StoreError;
use crate::store::bandwidth::{Limit, Throttled};
use crate::store::retry::{Class, classify};

/// A blocking HTTPS client for a store: connect timeout 10 s, `timeout` per request, the
/// extra CA and client certificate of `tls`.
pub fn client(
    tls: &Tls,
    timeout: Duration,
) -> Result<reqwest::blocking::Client, edgerec_net::client::ClientError> {
    edgerec_net::client::client(tls, Trust::SystemAndCa, Duration::from_secs(10), timeout)
}

/// Maps a spool package read-only, for a request body that costs no copy of it in memory.
#[allow(unsafe_code)]
pub(crate) fn map(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapped file is a package in spool/ready/, which nothing writes: the
    // recorder writes only active/ files and renames them into ready/ complete, and edgerec
    // only ever reads, moves or unlinks a ready/ package (an unlink keeps the mapping
    // valid). The spool is 0700 and owned by the service user, so no other process may
    // truncate it under the mapping.
    unsafe { memmap2::Mmap::map(file) }
}

/// A request body straight from a mapping, paced through the bandwidth limit if there is one.
pub(crate) fn body(bytes: bytes::Bytes, limit: Option<&Limit>) -> reqwest::blocking::Body {
    match limit {
        // Paced through the bucket, 64 KiB at a time.
        Some(l) => {
            let len = bytes.len() as u64;
            reqwest::blocking::Body::sized(
                Throttled::new(std::io::Cursor::new(bytes), l.clone()),
                len,
            )
        }
        None => reqwest::blocking::Body::from(bytes),
    }
}

/// The content type of a package.
pub(crate) const CONTENT_TYPE: &str = "application/vnd.edgerec.package";

/// A failed answer as a store error: `describe` turns the body into the reason (`None`: the
/// status says it all); the class comes from the status, the wait from `Retry-After`.
pub(crate) fn failed_answer(
    url: &str,
    r: reqwest::blocking::Response,
    describe: impl FnOnce(&str) -> Option<String>,
) -> StoreError {
    let status = r.status();
    let retry_after = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let body = r.text().unwrap_or_default();
    let why = match describe(&body) {
        Some(said) => format!("{url}: {} {said}", status.as_u16()),
        None => format!("{url}: HTTP {status}"),
    };
    match classify(status.as_u16()) {
        Class::Transient => StoreError::Transient { why, retry_after },
        _ => StoreError::Permanent(why),
    }
}

/// A request that got no answer: always worth another attempt.
pub(crate) fn no_answer(url: &str, timeout: Duration, e: &reqwest::Error) -> StoreError {
    StoreError::transient(if e.is_timeout() {
        format!("{url}: no answer in {timeout:?}")
    } else {
        format!("{url}: {e}")
    })
}
