//! SIP messages as the recording server reads and answers them: framing on a stream (TCP,
//! TLS) and in a datagram, the start line and headers read with the ezk SIP types, and the
//! responses an SRS sends (RFC 3261 §8.2.6: Via, From, Call-ID and CSeq copied as sent, the
//! To given the dialog's tag).
//!
//! Invariants: pure; a message is at most [`MAX_MESSAGE`] bytes, refused whole before
//! anything of it is kept; on a stream `Content-Length` is required (RFC 3261 §18.3) and a body
//! shorter than it waits for more; header values are kept as sent (copied, never re-printed
//! from a parse).

use bytes::Bytes;
use bytesstr::BytesStr;
use ezk_sip_types::msg::{Line, MessageLine, PullParser};
use ezk_sip_types::parse::Parse;
use ezk_sip_types::{Headers, Method, Name};

/// The largest SIP message taken (SIPREC INVITEs are about 3 KB).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A request: its method and request URI (as sent).
    Request {
        /// The method.
        method: Method,
        /// The request URI.
        uri: String,
    },
    /// A response: its status code and reason phrase.
    Response {
        /// The status code.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
}

/// A SIP message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its start line.
    pub start: Start,
    /// Its headers, in order (names compared without case, compact forms known).
    pub headers: Headers,
    /// Its body.
    pub body: Bytes,
}

/// Why bytes are not a SIP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Larger than [`MAX_MESSAGE`].
    #[error("SIP message of {0} bytes or more (at most {MAX_MESSAGE})")]
    TooLarge(usize),
    /// The head does not end (no empty line).
    #[error("SIP message head without its end")]
    Incomplete,
    /// The head is not UTF-8.
    #[error("SIP message head is not UTF-8")]
    NotUtf8,
    /// The start line is neither a request line nor a status line.
    #[error("not a SIP request or status line")]
    BadStartLine,
    /// A header line without `name:`.
    #[error("malformed SIP header line")]
    BadHeader,
    /// `Content-Length` is missing on a stream, or not a number.
    #[error("SIP message without a valid Content-Length")]
    BadContentLength,
    /// The body is shorter than its `Content-Length`.
    #[error("SIP message body of {have} bytes, Content-Length {want}")]
    ShortBody {
        /// What `Content-Length` says.
        want: usize,
        /// What there is.
        have: usize,
    },
}

/// What the start of a stream's buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// A whole message of this many bytes.
    Message(usize),
    /// A keep-alive (RFC 5626: CRLFCRLF, answered by CRLF; a lone CRLF is the answer) of this
    /// many bytes.
    KeepAlive(usize),
    /// Not yet a whole message: read more.
    Incomplete,
}

/// How much of a stream's buffer is the next message (TCP, TLS).
pub fn frame(buf: &[u8]) -> Result<Framed, MessageError> {
    if buf.starts_with(b"\r\n\r\n") {
        return Ok(Framed::KeepAlive(4));
    }
    if buf.starts_with(b"\r\n") && buf.len() >= 3 || buf == b"\r\n" {
        return Ok(Framed::KeepAlive(2));
    }
    let mut parser = PullParser::new(buf, 0);
    if parser.check_complete().is_err() {
        if buf.len() >= MAX_MESSAGE {
            return Err(MessageError::TooLarge(buf.len()));
        }
        return Ok(Framed::Incomplete);
    }
    let head_end = parser.head_end();
    let want = content_length(&buf[..head_end])?.ok_or(MessageError::BadContentLength)?;
    let total = head_end.saturating_add(want);
    if total > MAX_MESSAGE {
        return Err(MessageError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(Framed::Incomplete);
    }
    Ok(Framed::Message(total))
}

/// The `Content-Length` (or `l`) of a head, if it has one.
fn content_length(head: &[u8]) -> Result<Option<usize>, MessageError> {
    let text = std::str::from_utf8(head).map_err(|_| MessageError::NotUtf8)?;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            return value
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| MessageError::BadContentLength);
        }
    }
    Ok(None)
}

/// Parses one whole message: a datagram, or what [`frame`] delimited. In a datagram without
/// `Content-Length` the body is the rest of it.
pub fn parse(buf: &[u8]) -> Result<Message, MessageError> {
    if buf.len() > MAX_MESSAGE {
        return Err(MessageError::TooLarge(buf.len()));
    }
    let bytes = Bytes::copy_from_slice(buf);
    let mut parser = PullParser::new(&bytes, 0);
    let mut start = None;
    let mut headers = Headers::new();
    for line in &mut parser {
        let line = line.map_err(|_| MessageError::Incomplete)?;
        let line = std::str::from_utf8(line).map_err(|_| MessageError::NotUtf8)?;
        if start.is_none() {
            start = Some(start_line(&bytes, line)?);
            continue;
        }
        match Line::parse(&bytes, line) {
            Ok((_, l)) => headers.insert(l.name, l.value),
            Err(_) => return Err(MessageError::BadHeader),
        }
    }
    let start = start.ok_or(MessageError::BadStartLine)?;
    let head_end = parser.head_end();
    // The length from the headers just read, not from a second pass over the head.
    let length = match headers.get_raw(&Name::CONTENT_LENGTH).next() {
        Some(v) => Some(
            v.trim()
                .parse::<usize>()
                .map_err(|_| MessageError::BadContentLength)?,
        ),
        None => None,
    };
    let body = match length {
        Some(0) => Bytes::new(),
        Some(n) if bytes.len() >= head_end + n => bytes.slice(head_end..head_end + n),
        Some(n) => {
            return Err(MessageError::ShortBody {
                want: n,
                have: bytes.len() - head_end,
            });
        }
        None => bytes.slice(head_end..),
    };
    Ok(Message {
        start,
        headers,
        body,
    })
}

fn start_line(src: &Bytes, line: &str) -> Result<Start, MessageError> {
    match MessageLine::parse(src)(line) {
        Ok((_, MessageLine::Request(r))) => Ok(Start::Request {
            method: r.method,
            // As sent: the second word of the line.
            uri: line.split_whitespace().nth(1).unwrap_or("").to_string(),
        }),
        Ok((_, MessageLine::Response(s))) => Ok(Start::Response {
            code: s.code.into_u16(),
            reason: s.reason.map(|r| r.to_string()).unwrap_or_default(),
        }),
        Err(_) => Err(MessageError::BadStartLine),
    }
}

impl Message {
    /// The method of a request.
    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            Start::Request { method, .. } => Some(method),
            Start::Response { .. } => None,
        }
    }

    /// The first value of header `name` (any case, compact forms too), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get_raw(&Name::from(BytesStr::from(name)))
            .next()
            .map(|v| v.as_str().trim())
    }

    /// Every value of header `name`, a comma-separated line split into its elements (for
    /// token lists such as `Require` and `Supported`).
    pub fn tokens(&self, name: &str) -> Vec<String> {
        self.headers
            .get_raw(&Name::from(BytesStr::from(name)))
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Every raw value of header `name`, in order (one per line).
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_raw(&Name::from(BytesStr::from(name)))
            .map(|v| v.as_str())
            .collect()
    }

    /// Whether an INVITE asks for a recording session: `Require: siprec`, or a Contact with
    /// `+sip.src` (RFC 7866) or AudioCodes' `src`, or a body holding rs-metadata (clients
    /// that say neither).
    pub fn is_recording_session(&self) -> bool {
        if self.tokens("require").iter().any(|t| t == "siprec") {
            return true;
        }
        if self
            .values("contact")
            .iter()
            .any(|c| contact_param(c, "+sip.src") || contact_param(c, "src"))
        {
            return true;
        }
        super::mime::parts(self.header("content-type"), &self.body).is_ok_and(|parts| {
            parts
                .iter()
                .any(|p| p.kind == super::mime::PartKind::Metadata)
        })
    }
}

/// Whether a Contact value has header parameter `name` (after the `<uri>`, or after the URI
/// when it is not in angle brackets).
fn contact_param(contact: &str, name: &str) -> bool {
    let params = match contact.rfind('>') {
        Some(i) => &contact[i + 1..],
        None => contact.split_once(';').map_or("", |(_, p)| p),
    };
    params
        .split(';')
        .filter_map(|p| p.split('=').next())
        .any(|p| p.trim().eq_ignore_ascii_case(name))
}

/// A response to `request`: its Via, From, Call-ID and CSeq copied as sent, its To with
/// `to_tag` added when it has no tag yet, then `extra` headers and the body (with its type),
/// and `Content-Length` always.
pub fn response(
    request: &Message,
    code: u16,
    reason: &str,
    to_tag: Option<&str>,
    extra: &[(&str, String)],
    body: Option<(&str, &[u8])>,
) -> Vec<u8> {
    use std::fmt::Write;
    let mut head = format!("SIP/2.0 {code} {reason}\r\n");
    for v in request.values("via") {
        let _ = write!(head, "Via: {}\r\n", v.trim());
    }
    for name in ["From", "To", "Call-ID", "CSeq"] {
        for v in request.values(name) {
            let v = v.trim();
            match (name, to_tag) {
                ("To", Some(tag)) if !has_tag(v) => {
                    let _ = write!(head, "To: {v};tag={tag}\r\n");
                }
                _ => {
                    let _ = write!(head, "{name}: {v}\r\n");
                }
            }
        }
    }
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let body = body.unwrap_or(("", b""));
    if !body.1.is_empty() {
        let _ = write!(head, "Content-Type: {}\r\n", body.0);
    }
    let _ = write!(head, "Content-Length: {}\r\n\r\n", body.1.len());
    let mut out = head.into_bytes();
    out.extend_from_slice(body.1);
    out
}

/// Whether a From or To value carries a `tag` parameter.
pub fn has_tag(value: &str) -> bool {
    tag_of(value).is_some()
}

/// The `tag` parameter of a From or To value.
pub fn tag_of(value: &str) -> Option<&str> {
    let params = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value.split_once(';').map_or("", |(_, p)| p),
    };
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("tag").then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const INVITE: &str = "INVITE sip:srs@198.51.100.10:5060 SIP/2.0\r\n\
Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK-1\r\n\
Via: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK-0\r\n\
Max-Forwards: 70\r\n\
From: <sip:src@192.0.2.1>;tag=abc\r\n\
To: <sip:srs@198.51.100.10>\r\n\
Call-ID: 1-2-3@192.0.2.1\r\n\
CSeq: 101 INVITE\r\n\
Contact: <sip:src@192.0.2.1:5060;transport=tcp>;+sip.src\r\n\
Require: siprec\r\n\
X-Conversation-Id: conv-42\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

    #[test]
    fn a_request_is_read_with_its_headers_and_body() {
        let m = parse(INVITE.as_bytes()).unwrap();
        assert_eq!(
            m.start,
            Start::Request {
                method: Method::INVITE,
                uri: "sip:srs@198.51.100.10:5060".into()
            }
        );
        assert_eq!(m.header("call-id"), Some("1-2-3@192.0.2.1"));
        assert_eq!(m.header("X-CONVERSATION-ID"), Some("conv-42"));
        assert_eq!(m.values("Via").len(), 2);
        assert_eq!(&m.body[..], b"v=0\n");
        assert!(m.is_recording_session());
    }

    /// The INVITE with `contact` as its Contact, `require` (if any), and `body` of type `ct`.
    fn invite(contact: &str, require: Option<&str>, ct: &str, body: &str) -> Message {
        let head: String = INVITE
            .lines()
            .take_while(|l| !l.is_empty())
            .filter(|l| {
                !["Contact:", "Require:", "Content-Type:", "Content-Length:"]
                    .iter()
                    .any(|h| l.starts_with(h))
            })
            .map(|l| format!("{l}\r\n"))
            .collect();
        let require = require
            .map(|r| format!("Require: {r}\r\n"))
            .unwrap_or_default();
        let text = format!(
            "{head}Contact: {contact}\r\n{require}Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn recording_sessions_are_told_by_any_of_their_signs() {
        let sdp = ("application/sdp", "v=0\r\n");
        // AudioCodes: ;src and no Require; a Mediant VE: +sip.src and no Require.
        assert!(invite("<sip:a@192.0.2.1>;src", None, sdp.0, sdp.1).is_recording_session());
        assert!(invite("<sip:a@192.0.2.1>;+sip.src", None, sdp.0, sdp.1).is_recording_session());
        assert!(invite("sip:a@192.0.2.1;+SIP.SRC", None, sdp.0, sdp.1).is_recording_session());
        assert!(!invite("<sip:a@192.0.2.1>", None, sdp.0, sdp.1).is_recording_session());
        // A URI parameter called src is not the header parameter.
        assert!(!invite("<sip:a@192.0.2.1;src>", None, sdp.0, sdp.1).is_recording_session());
        // Require lists.
        let m = invite("<sip:a@192.0.2.1>", Some("timer, SIPREC"), sdp.0, sdp.1);
        assert_eq!(m.tokens("require"), ["timer", "siprec"]);
        assert!(m.is_recording_session());
        // Neither sign, but a body with rs-metadata.
        let body = "--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--b\r\n\
                    Content-Type: application/rs-metadata\r\n\r\n<recording/>\r\n--b--\r\n";
        let m = invite(
            "<sip:a@192.0.2.1>",
            None,
            "multipart/mixed;boundary=b",
            body,
        );
        assert!(m.is_recording_session());
    }

    #[test]
    fn streams_are_framed_by_content_length_and_keep_alives_answered() {
        let two = format!("{INVITE}{INVITE}");
        let n = INVITE.len();
        assert_eq!(frame(two.as_bytes()), Ok(Framed::Message(n)));
        assert_eq!(frame(&two.as_bytes()[..n - 1]), Ok(Framed::Incomplete));
        assert_eq!(frame(&two.as_bytes()[..40]), Ok(Framed::Incomplete));
        assert_eq!(frame(b"\r\n\r\nINVITE"), Ok(Framed::KeepAlive(4)));
        assert_eq!(frame(b"\r\n"), Ok(Framed::KeepAlive(2)));
        let no_length = INVITE.replace("Content-Length: 4\r\n", "");
        assert_eq!(
            frame(no_length.as_bytes()),
            Err(MessageError::BadContentLength)
        );
        let huge = INVITE.replace("Content-Length: 4", "Content-Length: 999999");
        assert!(matches!(
            frame(huge.as_bytes()),
            Err(MessageError::TooLarge(_))
        ));
        let endless = format!("INVITE sip:a@b SIP/2.0\r\nX: {}", "y".repeat(MAX_MESSAGE));
        assert!(matches!(
            frame(endless.as_bytes()),
            Err(MessageError::TooLarge(_))
        ));
    }

    #[test]
    fn lf_only_messages_and_datagrams_without_length_are_read() {
        let lf = INVITE.replace("\r\n", "\n");
        let m = parse(lf.as_bytes()).unwrap();
        assert_eq!(m.header("cseq"), Some("101 INVITE"));
        let no_length = INVITE.replace("Content-Length: 4\r\n", "");
        assert_eq!(&parse(no_length.as_bytes()).unwrap().body[..], b"v=0\n");
        let short = INVITE.replace("Content-Length: 4", "Content-Length: 40");
        assert_eq!(
            parse(short.as_bytes()).err(),
            Some(MessageError::ShortBody { want: 40, have: 4 })
        );
        assert_eq!(
            parse(b"HELLO\r\n\r\n").err(),
            Some(MessageError::BadStartLine)
        );
        assert!(parse(b"INVITE sip:a@b SIP/2.0\r\nnot a header\r\n\r\n").is_err());
        assert!(parse(&vec![b'a'; MAX_MESSAGE + 1]).is_err());
    }

    #[test]
    fn responses_copy_the_transaction_and_tag_the_dialog() {
        let m = parse(INVITE.as_bytes()).unwrap();
        let r = response(
            &m,
            200,
            "OK",
            Some("srs1"),
            &[("Contact", "<sip:srs@198.51.100.10>;+sip.srs".into())],
            Some(("application/sdp", b"v=0\r\n")),
        );
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK-1\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK-0\r\n"), "{text}");
        assert!(
            text.contains("\r\nTo: <sip:srs@198.51.100.10>;tag=srs1\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nFrom: <sip:src@192.0.2.1>;tag=abc\r\n"));
        assert!(text.contains("\r\nCSeq: 101 INVITE\r\n"));
        assert!(
            text.ends_with("Content-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n")
        );
        let back = parse(text.as_bytes()).unwrap();
        assert_eq!(
            back.start,
            Start::Response {
                code: 200,
                reason: "OK".into()
            }
        );
        assert_eq!(tag_of(back.header("to").unwrap()), Some("srs1"));
        // A To that has its tag already keeps it.
        let again = parse(
            INVITE
                .replace(
                    "To: <sip:srs@198.51.100.10>",
                    "To: <sip:srs@198.51.100.10>;tag=old",
                )
                .as_bytes(),
        )
        .unwrap();
        let r = String::from_utf8(response(&again, 100, "Trying", Some("new"), &[], None)).unwrap();
        assert!(
            r.contains("To: <sip:srs@198.51.100.10>;tag=old\r\n")
                && r.ends_with("Content-Length: 0\r\n\r\n")
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_frame_and_parse_without_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let _ = frame(&b);
            let _ = parse(&b);
            let mut with_head = INVITE.as_bytes().to_vec();
            with_head.extend_from_slice(&b);
            let _ = frame(&with_head);
            if let Ok(m) = parse(&with_head) { let _ = m.is_recording_session(); }
        }
    }
}
