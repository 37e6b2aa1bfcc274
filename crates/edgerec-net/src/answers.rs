//! Parsing what a store or a key service answers, and the credential files a client is
//! given: the fields of an S3 XML answer, RFC 9530 digest fields, a KMS error's type and
//! message, a key manager credential, an HTTP `Retry-After` value.
//!
//! Pure functions over untrusted text from the network: they never panic, do work linear in
//! their input, and return nothing rather than guess (fuzzed by `fuzz/text_read`).

use std::time::{Duration, SystemTime};

use base64::Engine;

/// A KMS (JSON 1.1) error answer: its type without the namespace (`com.amazonaws.kms#X` → `X`)
/// and its message, at most 300 characters; `None` for anything else.
pub fn kms_error(body: &[u8]) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Err {
        #[serde(rename = "__type")]
        kind: String,
        #[serde(alias = "Message", default)]
        message: String,
    }
    let e: Err = serde_json::from_slice(body).ok()?;
    let kind = e.kind.rsplit('#').next().unwrap_or_default().to_string();
    (!kind.is_empty()).then(|| (kind, e.message.chars().take(300).collect()))
}

/// A key manager credential as a client holds it: the `id:` and `key:` lines that
/// `edgerec lkm credentials add` prints, or the contract's `POST /auth` answer
/// (`{"id", "authKey"}`). Returns (id, key).
pub fn credential(text: &str) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct AuthAnswer {
        id: String,
        auth_key: String,
    }
    if let Ok(a) = serde_json::from_str::<AuthAnswer>(text) {
        return Some((a.id, a.auth_key)).filter(|(i, k)| !i.is_empty() && !k.is_empty());
    }
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    Some((field("id:")?, field("key:")?))
}

/// The text of every `<tag>…</tag>` in an S3 answer, XML entities for `&`, `<`, `>`
/// resolved (keys here hold none of them, but a listing may).
pub fn xml_all(body: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((_, after)) = rest.split_once(&open) {
        let Some((v, tail)) = after.split_once(&close) else {
            break;
        };
        out.push(unescape(v));
        rest = tail;
    }
    out
}

/// Resolves XML's five named entities and numeric character references (`&#34;`, `&#x22;`,
/// which some stores write for the quotes of an ETag); anything else stays as it is.
pub fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let decoded = tail.find(';').filter(|end| *end <= 10).and_then(|end| {
            let c = match &tail[1..end] {
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "amp" => Some('&'),
                n => n
                    .strip_prefix("#x")
                    .or_else(|| n.strip_prefix("#X"))
                    .map(|h| u32::from_str_radix(h, 16))
                    .or_else(|| n.strip_prefix('#').map(str::parse::<u32>))
                    .and_then(Result::ok)
                    .and_then(char::from_u32),
            }?;
            Some((c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &tail[end + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The SHA-256 in an RFC 9530 digest field (`sha-256=:<base64>:`, among others).
pub fn sha256_of_digest(field: &str) -> Option<[u8; 32]> {
    field.split(',').find_map(|item| {
        let (alg, value) = item.trim().split_once('=')?;
        if !alg.trim().eq_ignore_ascii_case("sha-256") {
            return None;
        }
        let b64 = value.trim().strip_prefix(':')?.strip_suffix(':')?;
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()?
            .try_into()
            .ok()
    })
}

/// Reads an HTTP `Retry-After` value: delay-seconds, or an HTTP date (RFC 9110) relative
/// to `now`. Anything else is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_fields_and_entities_are_read() {
        let body = "<ListBucketResult><IsTruncated>true</IsTruncated>\
            <Contents><Key>a/1.erec</Key></Contents><Contents><Key>a/&amp;2</Key></Contents>\
            <NextContinuationToken>x+y/z=</NextContinuationToken></ListBucketResult>";
        assert_eq!(xml_all(body, "Key"), ["a/1.erec", "a/&2"]);
        assert_eq!(xml_all(body, "IsTruncated"), ["true"]);
        assert!(xml_all(body, "Missing").is_empty());
        assert!(xml_all("<Key>unclosed", "Key").is_empty());
        assert_eq!(
            unescape("&#34;b64&#x22;&amp;lt;&bogus;&"),
            "\"b64\"&lt;&bogus;&"
        );
        assert_eq!(unescape("&#xD800;&#99999999999;"), "&#xD800;&#99999999999;");
    }

    #[test]
    fn digest_fields_give_their_sha256() {
        let sha = [7u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(sha);
        assert_eq!(sha256_of_digest(&format!("sha-256=:{b64}:")), Some(sha));
        assert_eq!(
            sha256_of_digest(&format!("sha-512=:AAAA:, SHA-256=:{b64}:")),
            Some(sha)
        );
        assert_eq!(sha256_of_digest("sha-256=:AAAA:"), None, "wrong length");
        assert_eq!(sha256_of_digest(&format!("sha-256={b64}")), None);
        assert_eq!(sha256_of_digest("md5=:AAAA:"), None);
    }

    #[test]
    fn retry_after_values_parse() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "soon", "-5", "Sun, 06 Nov 1994 25:00:00 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }
}
