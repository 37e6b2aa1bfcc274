//! The SDP of a recording session: the client's offer read stream by stream, and the
//! recording server's answer (RFC 3264 as RFC 7866 and real clients need it).
//!
//! The offer is read with the ezk project's SDP types (`ezk-sdp-types`), one m-section at a
//! time under the session's own lines, so that one section it cannot read (`m=image … t38`,
//! an attribute it parses more strictly than the sender wrote it) declines that stream alone
//! instead of the call, and a missing `t=` costs nothing. The answer is written here, line by
//! line, because its rules are the recording server's: as many m-lines as offered, in their
//! order, of the same media type; each offered `a=label` echoed exactly; `recvonly` for
//! `sendonly` or `sendrecv`, `inactive` for `inactive` or `recvonly`; port 0 for a stream
//! declined; the payload types offered (telephone-events included) with their `rtpmap` and
//! `fmtp`; its own `o=`, `c=` and `t=`; for `RTP/SAVP` an `a=crypto` of its own key.
//!
//! Invariants: pure; at most [`MAX_STREAMS`] m-lines and [`MAX_SDP`] bytes read; SRTP keys
//! live in zeroizing buffers and never appear in `Debug`.

use std::net::IpAddr;

use base64::Engine;
use bytesstr::BytesStr;
use ezk_sdp_types::{Direction, SessionDescription, SrtpSuite, TaggedAddress, TransportProtocol};
use zeroize::Zeroizing;

/// The most m-lines of an offer (a recording has a few streams; more is refused).
pub const MAX_STREAMS: usize = 16;
/// The largest SDP read.
pub const MAX_SDP: usize = 16 * 1024;
/// The longest `a=label` taken.
pub const MAX_LABEL: usize = 64;
/// Bytes of an SDES master key and salt (AES-CM-128: 16 + 14).
pub const SDES_KEY_LEN: usize = 30;

/// An offer, stream by stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The session's connection address (`c=` before the first m-line).
    pub address: Option<IpAddr>,
    /// Its m-lines, in order.
    pub streams: Vec<OfferedStream>,
}

/// One offered m-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedStream {
    /// The m-line as sent (for the answer to a stream that could not be read).
    pub m_line: String,
    /// Its media type (`audio`, `video`, `image`, …).
    pub media: String,
    /// Its port (0: the client offers it declined).
    pub port: u16,
    /// Its transport protocol (`RTP/AVP`, `RTP/SAVP`, …).
    pub proto: String,
    /// Its payload types, as offered.
    pub formats: Vec<String>,
    /// Its `a=label`, exactly as sent.
    pub label: Option<String>,
    /// The direction it is offered in.
    pub direction: Dir,
    /// Its connection address (`c=` of the section, else of the session).
    pub address: Option<IpAddr>,
    /// `a=rtpmap` values (`0 PCMU/8000`, …), as offered.
    pub rtpmaps: Vec<(u8, String)>,
    /// `a=fmtp` values, as offered.
    pub fmtps: Vec<(u8, String)>,
    /// Whether `a=rtcp-mux` is offered.
    pub rtcp_mux: bool,
    /// The SDES keys offered that edgerec can use, in order of preference.
    pub crypto: Vec<Sdes>,
    /// Why the section could not be read, if it could not (the stream is then declined).
    pub unreadable: Option<String>,
}

/// A media direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// `sendrecv` (SDP's default).
    SendRecv,
    /// `sendonly`: what a recording client offers.
    SendOnly,
    /// `recvonly`.
    RecvOnly,
    /// `inactive`: a paused recording (or a held call).
    Inactive,
}

/// An SDES crypto suite edgerec decrypts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// `AES_CM_128_HMAC_SHA1_80`.
    Aes128Sha1_80,
    /// `AES_CM_128_HMAC_SHA1_32`.
    Aes128Sha1_32,
}

impl Suite {
    /// Its name in `a=crypto`.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128Sha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::Aes128Sha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }
}

/// An SDES key (`a=crypto`).
#[derive(Clone, PartialEq, Eq)]
pub struct Sdes {
    /// Its tag.
    pub tag: u32,
    /// Its suite.
    pub suite: Suite,
    /// The master key and salt.
    pub key: Zeroizing<[u8; SDES_KEY_LEN]>,
}

impl std::fmt::Debug for Sdes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sdes")
            .field("tag", &self.tag)
            .field("suite", &self.suite)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why an offer could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// Larger than [`MAX_SDP`].
    #[error("SDP of {0} bytes (at most {MAX_SDP})")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("SDP is not UTF-8")]
    NotUtf8,
    /// No m-line.
    #[error("SDP offers no stream")]
    NoStreams,
    /// More m-lines than [`MAX_STREAMS`].
    #[error("SDP offers more than {MAX_STREAMS} streams")]
    TooManyStreams,
}

/// Reads an offer.
pub fn parse_offer(sdp: &[u8]) -> Result<Offer, SdpError> {
    if sdp.len() > MAX_SDP {
        return Err(SdpError::TooLarge(sdp.len()));
    }
    let text = std::str::from_utf8(sdp).map_err(|_| SdpError::NotUtf8)?;
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    let first_m = lines.iter().position(|l| l.starts_with("m="));
    let Some(first_m) = first_m else {
        return Err(SdpError::NoStreams);
    };
    let session: Vec<&str> = lines[..first_m].to_vec();
    let mut sections: Vec<Vec<&str>> = Vec::new();
    for l in &lines[first_m..] {
        if l.starts_with("m=") {
            if sections.len() == MAX_STREAMS {
                return Err(SdpError::TooManyStreams);
            }
            sections.push(Vec::new());
        }
        if let Some(s) = sections.last_mut() {
            s.push(l);
        }
    }
    // The session's lines the parser needs, whatever the client left out.
    let mut head = String::from("v=0\r\n");
    let line = |prefix: &str| session.iter().find(|l| l.starts_with(prefix)).copied();
    head += line("o=").unwrap_or("o=- 0 0 IN IP4 0.0.0.0");
    head += "\r\ns=-\r\n";
    if let Some(c) = line("c=") {
        head += c;
        head += "\r\n";
    }
    head += "t=0 0\r\n";
    // Session-level attributes (a direction for all streams, among them).
    for a in session.iter().filter(|l| l.starts_with("a=")) {
        head += a;
        head += "\r\n";
    }
    let address = section_parse(&head, &[])
        .ok()
        .and_then(|d| d.connection.as_ref().and_then(|c| ip_of(&c.address)));
    let streams = sections.iter().map(|s| stream(&head, s, address)).collect();
    Ok(Offer { address, streams })
}

fn section_parse(head: &str, section: &[&str]) -> Result<SessionDescription, String> {
    let mut text = head.to_string();
    for l in section {
        text += l;
        text += "\r\n";
    }
    SessionDescription::parse(&BytesStr::from(text)).map_err(|e| e.to_string())
}

fn ip_of(a: &TaggedAddress) -> Option<IpAddr> {
    match a {
        TaggedAddress::IP4(ip) => Some(IpAddr::V4(*ip)),
        TaggedAddress::IP6(ip) => Some(IpAddr::V6(*ip)),
        TaggedAddress::IP4FQDN(_) | TaggedAddress::IP6FQDN(_) => None,
    }
}

/// One m-section, read under the session's lines; what cannot be read is kept as sent and
/// marked unreadable.
fn stream(head: &str, section: &[&str], session_address: Option<IpAddr>) -> OfferedStream {
    let m_line = section.first().copied().unwrap_or("m=").to_string();
    let mut words = m_line.trim_start_matches("m=").split_whitespace();
    let media = words.next().unwrap_or("").to_string();
    let port = words
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let proto = words.next().unwrap_or("").to_string();
    let formats: Vec<String> = words.map(str::to_string).collect();
    // A label is a token (RFC 4574): one that is not is not echoed (it could carry a line
    // of its own into the answer), and the stream goes by its place instead.
    let label = section
        .iter()
        .find_map(|l| l.strip_prefix("a=label:"))
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && l.len() <= MAX_LABEL && l.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_string);
    let mut out = OfferedStream {
        m_line: m_line.clone(),
        media,
        port,
        proto,
        formats,
        label,
        direction: Dir::SendRecv,
        address: session_address,
        rtpmaps: Vec::new(),
        fmtps: Vec::new(),
        rtcp_mux: false,
        crypto: Vec::new(),
        unreadable: None,
    };
    let d = match section_parse(head, section) {
        Ok(d) => d,
        Err(e) => {
            out.unreadable = Some(e);
            return out;
        }
    };
    let Some(m) = d.media_descriptions.first() else {
        out.unreadable = Some("no media description".into());
        return out;
    };
    out.direction = match m.direction {
        Direction::SendRecv => Dir::SendRecv,
        Direction::SendOnly => Dir::SendOnly,
        Direction::RecvOnly => Dir::RecvOnly,
        Direction::Inactive => Dir::Inactive,
    };
    if let Some(a) = m.connection.as_ref().and_then(|c| ip_of(&c.address)) {
        out.address = Some(a);
    }
    out.rtpmaps = m
        .rtpmap
        .iter()
        .map(|r| {
            let params = r
                .params
                .as_ref()
                .map(|p| format!("/{p}"))
                .unwrap_or_default();
            (
                r.payload,
                format!("{}/{}{params}", r.encoding, r.clock_rate),
            )
        })
        .collect();
    out.fmtps = m
        .fmtp
        .iter()
        .map(|f| (f.format, f.params.to_string()))
        .collect();
    out.rtcp_mux = m.rtcp_mux;
    if matches!(m.media.proto, TransportProtocol::RtpSavp) {
        out.crypto = m
            .crypto
            .iter()
            .filter_map(|c| {
                let suite = match c.suite {
                    SrtpSuite::AES_CM_128_HMAC_SHA1_80 => Suite::Aes128Sha1_80,
                    SrtpSuite::AES_CM_128_HMAC_SHA1_32 => Suite::Aes128Sha1_32,
                    _ => return None,
                };
                // One key, no MKI (RFC 4568 allows more; clients send one).
                let [k] = c.keys.as_slice() else {
                    return None;
                };
                if k.mki.is_some() {
                    return None;
                }
                let bytes = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(k.key_and_salt.as_bytes())
                        .ok()?,
                );
                let key: [u8; SDES_KEY_LEN] = bytes.as_slice().try_into().ok()?;
                Some(Sdes {
                    tag: c.tag,
                    suite,
                    key: Zeroizing::new(key),
                })
            })
            .collect();
    }
    out
}

/// The encoding of a static RTP payload type (RFC 3551, table 4), for one offered
/// without an `rtpmap`.
pub fn static_payload(pt: u8) -> Option<&'static str> {
    Some(match pt {
        0 => "PCMU/8000",
        3 => "GSM/8000",
        4 => "G723/8000",
        5 => "DVI4/8000",
        6 => "DVI4/16000",
        7 => "LPC/8000",
        8 => "PCMA/8000",
        9 => "G722/8000",
        10 => "L16/44100/2",
        11 => "L16/44100",
        12 => "QCELP/8000",
        13 => "CN/8000",
        14 => "MPA/90000",
        15 => "G728/8000",
        16 => "DVI4/11025",
        17 => "DVI4/22050",
        18 => "G729/8000",
        _ => return None,
    })
}

impl OfferedStream {
    /// Every payload type offered with its encoding, in the offer's order: its `rtpmap`, or
    /// for a static one without (RFC 3551) its standard name.
    pub fn payload_types(&self) -> Vec<(u8, String)> {
        self.formats
            .iter()
            .filter_map(|f| f.parse::<u8>().ok())
            .filter_map(|pt| {
                let name = self
                    .rtpmaps
                    .iter()
                    .find(|(p, _)| *p == pt)
                    .map(|(_, m)| m.clone())
                    .or_else(|| static_payload(pt).map(str::to_string))?;
                Some((pt, name))
            })
            .collect()
    }

    /// Why edgerec cannot record this stream, if it cannot.
    pub fn refusal(&self) -> Option<&'static str> {
        if self.unreadable.is_some() {
            Some("unreadable")
        } else if self.port == 0 {
            Some("offered_declined")
        } else if self.media != "audio" {
            Some("not_audio")
        } else if self.proto == "RTP/SAVP" {
            self.crypto.is_empty().then_some("no_usable_crypto")
        } else if self.proto != "RTP/AVP" {
            Some("transport")
        } else {
            None
        }
    }
}

/// What the recording server answers for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// Declined: port 0.
    Declined,
    /// Taken on this port, with the recording server's own SDES key for `RTP/SAVP` (the
    /// tag and suite of the offered key it chose).
    Taken {
        /// The recording server's port.
        port: u16,
        /// Its key, for an SRTP stream.
        crypto: Option<Sdes>,
    },
}

/// The answer to `offer`: `answered[i]` for its i-th m-line (a missing entry declines),
/// from `address`, with origin session id and version `origin`.
pub fn answer(offer: &Offer, answered: &[Answered], address: IpAddr, origin: (u64, u64)) -> String {
    use std::fmt::Write;
    let family = if address.is_ipv4() { "IP4" } else { "IP6" };
    let mut out = String::new();
    let _ = write!(
        out,
        "v=0\r\no=edgerec {} {} IN {family} {address}\r\ns=edgerec\r\nc=IN {family} {address}\r\nt=0 0\r\n",
        origin.0, origin.1
    );
    for (i, s) in offer.streams.iter().enumerate() {
        match answered.get(i).unwrap_or(&Answered::Declined) {
            Answered::Declined => {
                let media = if s.media.is_empty() {
                    "audio"
                } else {
                    &s.media
                };
                let proto = if s.proto.is_empty() {
                    "RTP/AVP"
                } else {
                    &s.proto
                };
                let fmt = s.formats.first().map_or("0", String::as_str);
                let _ = write!(out, "m={media} 0 {proto} {fmt}\r\n");
                if let Some(l) = &s.label {
                    let _ = write!(out, "a=label:{l}\r\n");
                }
            }
            Answered::Taken { port, crypto } => {
                let _ = write!(
                    out,
                    "m=audio {port} {} {}\r\n",
                    s.proto,
                    s.formats.join(" ")
                );
                if let Some(l) = &s.label {
                    let _ = write!(out, "a=label:{l}\r\n");
                }
                for (pt, map) in &s.rtpmaps {
                    let _ = write!(out, "a=rtpmap:{pt} {map}\r\n");
                }
                for (pt, params) in &s.fmtps {
                    let _ = write!(out, "a=fmtp:{pt} {params}\r\n");
                }
                let dir = match s.direction {
                    Dir::SendOnly | Dir::SendRecv => "recvonly",
                    Dir::RecvOnly | Dir::Inactive => "inactive",
                };
                let _ = write!(out, "a={dir}\r\n");
                if s.rtcp_mux {
                    out += "a=rtcp-mux\r\n";
                }
                if let Some(c) = crypto {
                    let key = Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(c.key.as_ref()),
                    );
                    let _ = write!(
                        out,
                        "a=crypto:{} {} inline:{}\r\n",
                        c.tag,
                        c.suite.name(),
                        key.as_str()
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=SBC 1234 1 IN IP4 192.0.2.1\r\ns=SIPREC\r\nc=IN IP4 192.0.2.1\r\n\
t=0 0\r\nm=audio 10000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=label:1\r\na=sendonly\r\n\
m=audio 10002 RTP/AVP 0 101\r\nc=IN IP4 192.0.2.2\r\na=rtpmap:101 telephone-event/8000\r\n\
a=label:2\r\na=sendonly\r\na=rtcp-mux\r\n";

    #[test]
    fn a_two_leg_offer_is_read_stream_by_stream() {
        let o = parse_offer(OFFER.as_bytes()).unwrap();
        assert_eq!(o.address, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(o.streams.len(), 2);
        let (a, b) = (&o.streams[0], &o.streams[1]);
        assert_eq!(
            (a.port, a.label.as_deref(), a.direction),
            (10000, Some("1"), Dir::SendOnly)
        );
        assert_eq!(a.formats, ["0", "8", "101"]);
        assert_eq!(a.rtpmaps[2], (101, "telephone-event/8000".into()));
        assert_eq!(a.fmtps, [(101, "0-15".into())]);
        assert_eq!(
            b.address,
            Some("192.0.2.2".parse().unwrap()),
            "the section's own c="
        );
        assert!(b.rtcp_mux && !a.rtcp_mux);
        assert_eq!(a.refusal(), None);
    }

    #[test]
    fn the_answer_mirrors_the_offer_line_for_line() {
        let o = parse_offer(OFFER.as_bytes()).unwrap();
        let ans = answer(
            &o,
            &[
                Answered::Taken {
                    port: 20000,
                    crypto: None,
                },
                Answered::Declined,
            ],
            "198.51.100.10".parse().unwrap(),
            (7, 1),
        );
        assert_eq!(
            ans,
            "v=0\r\no=edgerec 7 1 IN IP4 198.51.100.10\r\ns=edgerec\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\n\
m=audio 20000 RTP/AVP 0 8 101\r\na=label:1\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=recvonly\r\n\
m=audio 0 RTP/AVP 0\r\na=label:2\r\n"
        );
        // The answer is SDP ezk reads back, with as many m-lines.
        let back = SessionDescription::parse(&BytesStr::from(ans)).unwrap();
        assert_eq!(back.media_descriptions.len(), 2);
    }

    #[test]
    fn vendor_offers_are_read_as_sent() {
        // LF only, no t= line, labels large or strings or missing, a session-level
        // direction, an m=image line the parser cannot read (declined alone), an offer that
        // starts inactive (Cisco on hold).
        let sdp = "v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nc=IN IP4 192.0.2.1\na=sendonly\n\
m=audio 4000 RTP/AVP 0\na=label:16777227\n\
m=audio 4002 RTP/AVP 0\na=label:a_leg\na=inactive\n\
m=image 4004 udptl t38\na=T38FaxVersion:0\n\
m=audio 4006 RTP/AVP 0\n";
        let o = parse_offer(sdp.as_bytes()).unwrap();
        let s = &o.streams;
        assert_eq!(s.len(), 4);
        assert_eq!(
            (s[0].label.as_deref(), s[0].direction),
            (Some("16777227"), Dir::SendOnly)
        );
        assert_eq!(
            (s[1].label.as_deref(), s[1].direction),
            (Some("a_leg"), Dir::Inactive)
        );
        assert_eq!(s[2].refusal(), Some("unreadable"));
        assert_eq!(s[3].label, None);
        let ans = answer(
            &o,
            &[
                Answered::Taken {
                    port: 5000,
                    crypto: None,
                },
                Answered::Taken {
                    port: 5002,
                    crypto: None,
                },
            ],
            "198.51.100.10".parse().unwrap(),
            (1, 1),
        );
        let m: Vec<&str> = ans.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            m,
            [
                "m=audio 5000 RTP/AVP 0",
                "m=audio 5002 RTP/AVP 0",
                "m=image 0 udptl t38",
                "m=audio 0 RTP/AVP 0"
            ]
        );
        assert!(ans.contains("a=label:a_leg\r\na=inactive\r\n"));
    }

    #[test]
    fn sdes_keys_are_read_and_answered_with_the_servers_own() {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 30]);
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
m=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:{key}\r\n\
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{key}|2^31\r\na=sendonly\r\n\
m=audio 4002 RTP/SAVP 0\r\na=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:{key}\r\n"
        );
        let o = parse_offer(sdp.as_bytes()).unwrap();
        let c = &o.streams[0].crypto;
        assert_eq!(c.len(), 1, "the AES-256 suite is not one edgerec takes");
        assert_eq!((c[0].tag, c[0].suite), (2, Suite::Aes128Sha1_32));
        assert_eq!(*c[0].key, [7u8; 30]);
        assert!(!format!("{c:?}").contains(&key), "no key in Debug");
        assert_eq!(o.streams[1].refusal(), Some("no_usable_crypto"));
        let mine = Sdes {
            tag: 2,
            suite: Suite::Aes128Sha1_32,
            key: Zeroizing::new([9u8; 30]),
        };
        let ans = answer(
            &o,
            &[Answered::Taken {
                port: 6000,
                crypto: Some(mine),
            }],
            "198.51.100.10".parse().unwrap(),
            (1, 1),
        );
        let want = format!(
            "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{}\r\n",
            base64::engine::general_purpose::STANDARD.encode([9u8; 30])
        );
        assert!(ans.contains(&want), "{ans}");
        assert!(ans.contains("m=audio 0 RTP/SAVP 0\r\n"));
    }

    #[test]
    fn bad_offers_are_errors() {
        assert_eq!(parse_offer(b"v=0\r\n"), Err(SdpError::NoStreams));
        assert_eq!(parse_offer(b"\xff"), Err(SdpError::NotUtf8));
        assert!(matches!(
            parse_offer(&vec![b'a'; MAX_SDP + 1]),
            Err(SdpError::TooLarge(_))
        ));
        let many = format!(
            "v=0\r\n{}",
            "m=audio 1 RTP/AVP 0\r\n".repeat(MAX_STREAMS + 1)
        );
        assert_eq!(parse_offer(many.as_bytes()), Err(SdpError::TooManyStreams));
        // A label that is not a token is not echoed.
        let o = parse_offer(b"m=audio 1 RTP/AVP 0\r\na=label:x\rm=audio 9 RTP/AVP 0\r\n").unwrap();
        assert_eq!(o.streams[0].label, None);
        // A garbled m-line is one unreadable stream, not a panic.
        let o = parse_offer(b"m=\r\nm=audio x y\r\n").unwrap();
        assert!(o.streams.iter().all(|s| s.refusal().is_some()));
    }

    proptest::proptest! {
        #[test]
        fn any_text_reads_without_panic(s in "((v|o|s|c|t|m|a)=[ -~]{0,30}\r?\n){0,30}") {
            if let Ok(o) = parse_offer(s.as_bytes()) {
                let answered: Vec<Answered> = o.streams.iter().map(|_| Answered::Taken { port: 1, crypto: None }).collect();
                let _ = answer(&o, &answered, "127.0.0.1".parse().unwrap(), (1, 1));
            }
        }
    }
}
