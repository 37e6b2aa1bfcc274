//! The parts of a SIP message body, split as recording clients really send them: a
//! `multipart/mixed` body with an SDP offer and RFC 7865 metadata, or a bare SDP.
//!
//! Tolerant where real clients are sloppy (docs/siprec.md lists them): CRLF or LF line
//! ends, the boundary quoted or bare, parts in any order, extra parts (Cisco's
//! `application/gtd`), part headers with no space after the colon, a part's own
//! `Content-Length` (BroadWorks), padding after a delimiter, a missing close delimiter; media
//! types matched without case or parameters, and metadata recognised by its root element when
//! its type is odd.
//!
//! Invariants: pure (no I/O); never allocates more than the part list, whose length is
//! bounded by [`MAX_PARTS`]; every part's body is a slice of the input.

/// Parts a body may have; recording clients send two or three.
pub const MAX_PARTS: usize = 8;

/// What a part holds, by its media type (or, for metadata under an odd type, its root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// `application/sdp`.
    Sdp,
    /// `application/rs-metadata+xml` or `application/rs-metadata`.
    Metadata,
    /// `application/rs-metadata-request`: the client asks for nothing, it offers to send.
    MetadataRequest,
    /// Anything else (kept, not used).
    Other,
}

/// One part of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    /// What it holds.
    pub kind: PartKind,
    /// Its `Content-Type` value as sent, if it had one.
    pub content_type: Option<&'a str>,
    /// Its `Content-Disposition` value as sent, if it had one.
    pub disposition: Option<&'a str>,
    /// Its bytes.
    pub body: &'a [u8],
}

/// Why a body could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MimeError {
    /// `multipart/*` without a `boundary` parameter.
    #[error("multipart body without a boundary parameter")]
    NoBoundary,
    /// The boundary is empty or longer than RFC 2046's 70 characters.
    #[error("multipart boundary of {0} characters (1 to 70)")]
    BadBoundary(usize),
    /// The boundary never starts a line of the body.
    #[error("multipart body with no part")]
    NoParts,
    /// More parts than [`MAX_PARTS`].
    #[error("multipart body of more than {MAX_PARTS} parts")]
    TooManyParts,
}

/// The media type of a `Content-Type` value, lower-cased, without parameters.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The value of parameter `name` (case-insensitive) of a header value such as
/// `multipart/mixed; boundary="x"`: quotes removed, spaces around `=` allowed.
pub fn parameter<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case(name) {
            return None;
        }
        let v = v.trim();
        Some(
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v),
        )
    })
}

/// What a part of type `content_type` holding `body` is.
pub fn kind_of(content_type: Option<&str>, body: &[u8]) -> PartKind {
    match content_type.map(media_type).as_deref() {
        Some("application/sdp") => PartKind::Sdp,
        Some("application/rs-metadata+xml" | "application/rs-metadata") => PartKind::Metadata,
        Some("application/rs-metadata-request") => PartKind::MetadataRequest,
        _ if looks_like_metadata(body) => PartKind::Metadata,
        _ => PartKind::Other,
    }
}

/// Whether `body` starts (after an XML declaration, comments or space) with a `recording` or
/// `recording_metadata` root, in any namespace prefix.
fn looks_like_metadata(body: &[u8]) -> bool {
    let head = &body[..body.len().min(512)];
    let Ok(text) = std::str::from_utf8(head) else {
        return false;
    };
    let mut rest = text.trim_start_matches('\u{feff}').trim_start();
    // Skip the declaration and comments before the root.
    while let Some(r) = rest
        .strip_prefix("<?")
        .or_else(|| rest.strip_prefix("<!--"))
    {
        let Some(end) = r.find('>') else {
            return false;
        };
        rest = r[end + 1..].trim_start();
    }
    let Some(tag) = rest.strip_prefix('<') else {
        return false;
    };
    let name: String = tag
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '>' && *c != '/')
        .collect();
    let local = name.rsplit(':').next().unwrap_or("");
    local == "recording" || local == "recording_metadata"
}

/// The parts of a message body of type `content_type`: the parts of a multipart body, or the
/// body itself as one part.
pub fn parts<'a>(
    content_type: Option<&'a str>,
    body: &'a [u8],
) -> Result<Vec<Part<'a>>, MimeError> {
    match content_type {
        Some(ct) if media_type(ct).starts_with("multipart/") => {
            let boundary = parameter(ct, "boundary").ok_or(MimeError::NoBoundary)?;
            split(body, boundary)
        }
        _ => Ok(vec![Part {
            kind: kind_of(content_type, body),
            content_type,
            disposition: None,
            body,
        }]),
    }
}

/// Splits a multipart body on `boundary`.
pub fn split<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, MimeError> {
    if boundary.is_empty() || boundary.len() > 70 {
        return Err(MimeError::BadBoundary(boundary.len()));
    }
    let delimiter = [b"--".as_slice(), boundary.as_bytes()].concat();
    let starts = delimiter_lines(body, &delimiter);
    if starts.is_empty() {
        return Err(MimeError::NoParts);
    }
    let mut out = Vec::new();
    for (i, &at) in starts.iter().enumerate() {
        let after = at + delimiter.len();
        if body[after..].starts_with(b"--") {
            break; // the close delimiter
        }
        // The rest of the delimiter's line is padding.
        let Some(nl) = body[after..].iter().position(|b| *b == b'\n') else {
            break;
        };
        let start = after + nl + 1;
        // The line break before the next delimiter belongs to that delimiter.
        let end = match starts.get(i + 1) {
            Some(&next) => strip_line_end(body, start, next),
            None => trim_end(body, start),
        };
        if out.len() == MAX_PARTS {
            return Err(MimeError::TooManyParts);
        }
        out.push(part(&body[start..end.max(start)]));
    }
    if out.is_empty() {
        return Err(MimeError::NoParts);
    }
    Ok(out)
}

/// Offsets of the lines of `body` that are delimiters (RFC 2046: `--boundary`, then `--` for
/// the close one or white space, at the start of a line; a longer boundary is not this one).
fn delimiter_lines(body: &[u8], delimiter: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut line = 0;
    while line < body.len() {
        if body[line..].starts_with(delimiter) {
            let next = body.get(line + delimiter.len()).copied();
            if matches!(next, None | Some(b'-' | b' ' | b'\t' | b'\r' | b'\n')) {
                out.push(line);
            }
        }
        match body[line..].iter().position(|b| *b == b'\n') {
            Some(n) => line += n + 1,
            None => break,
        }
    }
    out
}

/// `end`, less the CRLF or LF just before it (not below `start`).
fn strip_line_end(body: &[u8], start: usize, mut end: usize) -> usize {
    if end > start && body[end - 1] == b'\n' {
        end -= 1;
        if end > start && body[end - 1] == b'\r' {
            end -= 1;
        }
    }
    end
}

/// The end of `body` without trailing white space (a last part with no close delimiter).
fn trim_end(body: &[u8], start: usize) -> usize {
    let mut end = body.len();
    while end > start && body[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end
}

/// One part: its headers up to the first empty line, then its body (cut at its own
/// `Content-Length` when it gives one that fits).
fn part(raw: &[u8]) -> Part<'_> {
    let mut content_type = None;
    let mut disposition = None;
    let mut length = None;
    let mut at = 0;
    let mut body_at = None;
    while at < raw.len() {
        let end = raw[at..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(raw.len(), |n| at + n);
        let line = &raw[at..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let next = (end + 1).min(raw.len());
        if line.is_empty() {
            body_at = Some(next);
            break;
        }
        let Some((name, value)) = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_once(':'))
        else {
            // Not a header: a part with no headers, its body starting here.
            body_at = Some(at);
            break;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" | "c" => content_type = Some(value),
            "content-disposition" => disposition = Some(value),
            "content-length" | "l" => length = value.parse::<usize>().ok(),
            _ => {}
        }
        at = next;
    }
    let start = body_at.unwrap_or(raw.len());
    let mut body = &raw[start..];
    if let Some(n) = length.filter(|n| *n <= body.len()) {
        body = &body[..n];
    }
    Part {
        kind: kind_of(content_type, body),
        content_type,
        disposition,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
                       m=audio 10000 RTP/AVP 0\r\na=label:1\r\na=sendonly\r\n";
    const XML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n\
                       <recording xmlns=\"urn:ietf:params:xml:ns:recording:1\">\
                       <datamode>complete</datamode></recording>";

    fn body(eol: &str, boundary: &str, close: bool) -> String {
        let b = format!(
            "--{boundary}{eol}Content-Type: application/sdp{eol}{eol}{}{eol}\
             --{boundary}{eol}Content-Type: application/rs-metadata+xml{eol}\
             Content-Disposition: recording-session{eol}{eol}{XML}{eol}",
            SDP.replace("\r\n", eol)
        );
        if close {
            format!("{b}--{boundary}--{eol}")
        } else {
            b
        }
    }

    #[test]
    fn the_rfc_form_splits_into_its_sdp_and_metadata() {
        let text = body("\r\n", "unique-boundary-1", true);
        let ct = "multipart/mixed;boundary=unique-boundary-1";
        let p = parts(Some(ct), text.as_bytes()).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].kind, PartKind::Sdp);
        assert_eq!(p[0].body, SDP.as_bytes());
        assert_eq!(p[1].kind, PartKind::Metadata);
        assert_eq!(p[1].disposition, Some("recording-session"));
        assert_eq!(p[1].body, XML.as_bytes());
    }

    #[test]
    fn lf_only_quoted_boundaries_and_a_missing_close_delimiter_split_alike() {
        // AudioCodes: LF only; a quoted boundary with spaces around '='; no close delimiter.
        let text = body("\n", "OSS-unique-boundary-42", false);
        let ct = "Multipart/Mixed ; Boundary = \"OSS-unique-boundary-42\"";
        let p = parts(Some(ct), text.as_bytes()).unwrap();
        assert_eq!(
            p.iter().map(|p| p.kind).collect::<Vec<_>>(),
            [PartKind::Sdp, PartKind::Metadata]
        );
        assert_eq!(p[0].body, SDP.replace("\r\n", "\n").as_bytes());
        assert!(
            p[1].body.ends_with(b"</recording>"),
            "trailing space trimmed"
        );
    }

    #[test]
    fn broadworks_metadata_first_no_space_after_colons_and_part_lengths() {
        let text = format!(
            "--UniqueBroadWorksBoundary\r\nContent-Type:application/rs-metadata+xml\r\n\
             Content-Disposition:recording-session\r\nContent-Length:{}\r\n\r\n{XML}\r\n\
             --UniqueBroadWorksBoundary\r\nContent-Type:application/sdp\r\n\
             Content-Length:{}\r\n\r\n{SDP}\r\n--UniqueBroadWorksBoundary--\r\n",
            XML.len(),
            SDP.len()
        );
        let p = split(text.as_bytes(), "UniqueBroadWorksBoundary").unwrap();
        assert_eq!(p[0].kind, PartKind::Metadata);
        assert_eq!(p[0].body, XML.as_bytes());
        assert_eq!(p[1].kind, PartKind::Sdp);
        assert_eq!(p[1].body, SDP.as_bytes());
    }

    #[test]
    fn extra_parts_odd_types_and_trailing_padding_are_taken() {
        // Cisco: a third part (application/gtd), a disposition on the SDP; Dialpad's charset
        // parameter; metadata under a type nobody registered, found by its root; white space
        // after the delimiters and the close one.
        let text = format!(
            "preamble\r\n--b1  \r\nContent-Type: application/sdp;charset=ISO-10646\r\n\
             Content-Disposition: session;handling=required\r\n\r\n{SDP}\r\n--b1\r\n\
             Content-Type: application/gtd\r\n\r\nIAM,\r\nPRN,isdn*,,ATT*,\r\n--b1\r\n\
             Content-Type: application/xml\r\n\r\n{XML}\r\n--b1--   \r\n  \r\n"
        );
        let p = split(text.as_bytes(), "b1").unwrap();
        assert_eq!(
            p.iter().map(|p| p.kind).collect::<Vec<_>>(),
            [PartKind::Sdp, PartKind::Other, PartKind::Metadata]
        );
        assert_eq!(p[0].disposition, Some("session;handling=required"));
        assert_eq!(p[0].body, SDP.as_bytes());
    }

    #[test]
    fn a_body_that_is_not_multipart_is_one_part() {
        let p = parts(Some("application/sdp"), SDP.as_bytes()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].kind, PartKind::Sdp);
        assert_eq!(
            parts(None, XML.as_bytes()).unwrap()[0].kind,
            PartKind::Metadata,
            "sniffed"
        );
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        assert_eq!(
            parts(Some("multipart/mixed"), b"x"),
            Err(MimeError::NoBoundary)
        );
        assert_eq!(split(b"no parts here", "b"), Err(MimeError::NoParts));
        assert_eq!(split(b"--b--\r\n", "b"), Err(MimeError::NoParts));
        assert!(matches!(split(b"", ""), Err(MimeError::BadBoundary(0))));
        let many = "--b\r\n\r\nx\r\n".repeat(MAX_PARTS + 1);
        assert_eq!(split(many.as_bytes(), "b"), Err(MimeError::TooManyParts));
        // A delimiter at the very end, with nothing after it.
        assert_eq!(split(b"--b", "b"), Err(MimeError::NoParts));
        // A longer boundary that starts with this one is not a delimiter.
        let p = split(b"--b\r\n\r\n--bx\r\n--b--", "b").unwrap();
        assert_eq!(p[0].body, b"--bx");
        // A part length beyond the part is ignored.
        let p = split(b"--b\r\nContent-Length: 999\r\n\r\nabc\r\n--b--", "b").unwrap();
        assert_eq!(p[0].body, b"abc");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_split_without_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), b in "[a-z0-9]{1,8}") {
            let _ = split(&body, &b);
            let _ = parts(Some("multipart/mixed; boundary=x"), &body);
        }
    }
}
