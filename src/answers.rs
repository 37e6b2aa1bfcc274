//! Parsing what a store answers: the fields of an S3 XML answer and RFC 9530 digest fields.
//!
//! Pure functions over untrusted text from the network: they never panic, do work linear in
//! their input, and return nothing rather than guess (fuzzed by `fuzz/text_read`).

use base64::Engine;

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
}
