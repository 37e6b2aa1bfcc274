//! The recording server's SIP side, sans-IO: a pure state machine of (state, message, now)
//! that answers recording clients and says which recording sessions start, change and stop.
//! A thin layer (to come) owns the UDP, TCP and TLS sockets and the media ports; here nothing
//! is read or written but the values passed in and out.
//!
//! What it does (RFC 3261 as an SRS needs it, RFC 7866): a recording INVITE with an SDP offer
//! is answered `200 OK` at once (the media ports are bound when the appliance starts), with
//! `+sip.srs` in its Contact; over UDP the `200` is sent again (T1 doubling to T2) until the
//! ACK comes, and a dialog never acknowledged within 64·T1 is ended with a BYE. ACK, BYE,
//! CANCEL (after the answer: acknowledged, no effect), OPTIONS (`200` with what it supports),
//! re-INVITE and UPDATE (new ports or codecs keep the recording; new metadata is merged;
//! `inactive` pauses a stream, `sendonly` resumes it), retransmitted requests answered again.
//! Refusals: `503` with `Retry-After` at `max_sessions` or while the disk policy refuses
//! recordings, `488` when no offered stream can be taken, `420` for an unknown `Require`,
//! `481` outside a dialog, `405` for other methods. Timers: a session the client forgot (no
//! RTP for the inactivity timeout, or a session timer (RFC 4028) not refreshed) is ended with a
//! BYE to the client's Contact through its route set.
//!
//! Invariants: every request gets exactly one final response (its retransmissions the same
//! one again); a session is started once and stopped once; media ports are taken from the
//! pool when a stream is answered and given back when it is declined later or its session
//! stops; at most `max_sessions` dialogs exist.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use ezk_sip_types::Method;

use super::message::{self, Message, Start};
use super::metadata::{self, Metadata};
use super::mime::{self, PartKind};
use super::sdp::{self, Answered, Dir, Offer, Sdes};

/// RFC 3261's T1 (the round-trip estimate), milliseconds.
pub const T1_MS: u64 = 500;
/// RFC 3261's T2 (the longest retransmission interval), milliseconds.
pub const T2_MS: u64 = 4000;
/// A session whose every stream is paused, with neither media nor SIP from its client for
/// this long (milliseconds), is ended too: a client that forgot a session on hold, and asked
/// for no session timer, would otherwise hold its ports and a session slot for ever. An
/// hour: longer than a hold.
pub const PAUSED_INACTIVITY_MS: u64 = 3_600_000;
/// What the recording server supports (`Supported`, `420`'s `Unsupported` aside).
const SUPPORTED: [&str; 2] = ["siprec", "timer"];
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE";

/// How a message came, and how to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A datagram: responses are sent again until acknowledged.
    Udp,
    /// A TCP connection.
    Tcp,
    /// A TLS connection.
    Tls,
}

/// The other end of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
    /// The connection it came on (stream transports), to answer on the same one.
    pub conn: Option<u64>,
}

/// A recording session's id (one per dialog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// The recording server's settings.
#[derive(Debug, Clone)]
pub struct SrsConfig {
    /// The address put in the SDP answer's `c=` (and `o=`).
    pub advertise: IpAddr,
    /// The recording server's SIP URI, for its Contact and the Via of its own requests
    /// (`sip:srs@198.51.100.10:5060`).
    pub contact: String,
    /// The media ports: even ones for RTP (the odd one above for RTCP).
    pub media_ports: (u16, u16),
    /// The most recording sessions at once.
    pub max_sessions: usize,
    /// The header whose value is the recording's conversation id.
    pub conversation_header: Option<String>,
    /// A session with no media for this long is ended (milliseconds).
    pub inactivity_ms: u64,
}

/// One stream of a recording session, as the media layer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaStream {
    /// Its m-line's place in the offer (from 0): the stream's identity for the whole
    /// session, whatever port, SSRC or codec it uses later.
    pub index: usize,
    /// Its label.
    pub label: Option<String>,
    /// The recording server's port for it; `None`: declined.
    pub port: Option<u16>,
    /// Where its RTP may come from: the offer's address and the client's.
    pub sources: Vec<IpAddr>,
    /// Whether it is paused (`inactive`).
    pub paused: bool,
    /// The payload types offered (`rtpmap`s).
    pub payload_types: Vec<(u8, String)>,
    /// The client's SDES key, for an SRTP stream.
    pub srtp: Option<Sdes>,
}

/// What the SIP side of the client told about the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInfo {
    /// The recording dialog's Call-ID.
    pub call_id: String,
    /// Its From and To.
    pub from: String,
    /// Its To.
    pub to: String,
    /// The conversation id (the configured header, else the metadata's session id).
    pub conversation_id: Option<String>,
}

/// What the state machine asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SipAction {
    /// Send these bytes.
    Send {
        /// To whom.
        peer: Peer,
        /// The message.
        bytes: Vec<u8>,
    },
    /// A recording session starts.
    Start {
        /// Its id.
        session: SessionId,
        /// Its streams.
        streams: Vec<MediaStream>,
        /// The call's SIP identity.
        call: CallInfo,
        /// The complete metadata (JSON) and the raw XML it came from, if any.
        metadata: Option<(serde_json::Value, String)>,
    },
    /// A recording session's streams or metadata changed (re-INVITE, UPDATE).
    Change {
        /// Its id.
        session: SessionId,
        /// Its streams now.
        streams: Vec<MediaStream>,
        /// The complete metadata now and the raw XML of the update, if there was one.
        metadata: Option<(serde_json::Value, String)>,
    },
    /// A recording session ends.
    Stop {
        /// Its id.
        session: SessionId,
        /// Why: `bye`, `srs_bye_inactive`, `session_timer`, `no_ack`.
        reason: &'static str,
    },
}

/// Why an INVITE was refused (counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `max_sessions` reached.
    Busy,
    /// The disk policy refuses recordings.
    Refusing,
    /// No stream could be taken, or no offer.
    NotAcceptable,
    /// A `Require` it does not support.
    BadExtension,
    /// Not a recording session.
    NotRecording,
    /// A required header missing.
    BadRequest,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Refusing => "disk",
            Refusal::NotAcceptable => "not_acceptable",
            Refusal::BadExtension => "bad_extension",
            Refusal::NotRecording => "not_recording",
            Refusal::BadRequest => "bad_request",
        }
    }
}

/// The media port pool: even ports of the range, each with the odd one above.
#[derive(Debug, Clone)]
struct Ports {
    first: u16,
    last: u16,
    used: BTreeSet<u16>,
    cursor: u16,
}

impl Ports {
    fn new((first, last): (u16, u16)) -> Ports {
        let first = first + first % 2;
        Ports {
            first,
            last,
            used: BTreeSet::new(),
            cursor: first,
        }
    }

    /// An even port (its odd one above in range too), the next free after the last taken.
    fn take(&mut self) -> Option<u16> {
        let span = u32::from(self.last.saturating_sub(self.first)) / 2 + 1;
        for _ in 0..span {
            let p = self.cursor;
            self.cursor = if u32::from(p) + 2 > u32::from(self.last).saturating_sub(1) {
                self.first
            } else {
                p + 2
            };
            if p < self.last && !self.used.contains(&p) {
                self.used.insert(p);
                return Some(p);
            }
        }
        None
    }

    /// Ports still free.
    fn free(&self) -> usize {
        let span = usize::from(self.last.saturating_sub(self.first)).div_ceil(2);
        span.saturating_sub(self.used.len())
    }

    fn give(&mut self, p: u16) {
        self.used.remove(&p);
    }
}

#[derive(Debug)]
struct Dialog {
    session: SessionId,
    call_id: String,
    local_tag: String,
    /// The INVITE's From and To (ours tagged), for our own requests.
    from: String,
    to: String,
    remote_target: String,
    route_set: Vec<String>,
    peer: Peer,
    remote_cseq: u32,
    local_cseq: u32,
    offer: Offer,
    streams: Vec<MediaStream>,
    metadata: Metadata,
    origin_version: u64,
    /// The last final response to an INVITE or UPDATE, with its CSeq number.
    last_response: Option<(u32, Vec<u8>)>,
    /// Retransmission of the 200 until the ACK: next send, interval, give-up time.
    unacked: Option<(u64, u64, u64)>,
    /// When the session timer expires without a refresh.
    expires_at: Option<u64>,
    last_media_ms: u64,
}

/// Fills a buffer with random bytes (the operating system's; the tests' fixed).
pub type Random = Box<dyn FnMut(&mut [u8]) + Send>;

/// How long a session may go without media (or SIP) from its client: the configured
/// inactivity while media is expected, [`PAUSED_INACTIVITY_MS`] (at least) while every
/// stream is paused.
fn inactivity_limit(cfg: &SrsConfig, d: &Dialog) -> u64 {
    if d.expects_media() {
        cfg.inactivity_ms
    } else {
        cfg.inactivity_ms.max(PAUSED_INACTIVITY_MS)
    }
}

impl Dialog {
    /// Whether a stream is taken and not paused: media should be arriving.
    fn expects_media(&self) -> bool {
        self.streams.iter().any(|s| s.port.is_some() && !s.paused)
    }
}

/// The recording server's SIP state.
pub struct Srs {
    cfg: SrsConfig,
    dialogs: HashMap<(String, String), Dialog>,
    ports: Ports,
    next_session: u64,
    next_tag: u64,
    refusing: bool,
    random: Random,
    /// INVITEs refused, by why (counters the driver publishes).
    pub refused: HashMap<Refusal, u64>,
    /// Offered streams declined (answered with port 0), by why (counters the driver
    /// publishes): [`sdp::OfferedStream::refusal`]'s reasons and `no_port`.
    pub declined: HashMap<&'static str, u64>,
}

impl std::fmt::Debug for Srs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Srs")
            .field("dialogs", &self.dialogs.len())
            .finish_non_exhaustive()
    }
}

impl Srs {
    /// A recording server with no session; `random` fills buffers with random bytes (tags,
    /// branches, SDES keys).
    pub fn new(cfg: SrsConfig, random: Random) -> Srs {
        Srs {
            ports: Ports::new(cfg.media_ports),
            cfg,
            dialogs: HashMap::new(),
            next_session: 1,
            next_tag: 1,
            refusing: false,
            random,
            refused: HashMap::new(),
            declined: HashMap::new(),
        }
    }

    /// Whether recordings may start (the disk policy's word).
    pub fn set_refusing(&mut self, refusing: bool) {
        self.refusing = refusing;
    }

    /// Recording sessions in progress.
    pub fn sessions(&self) -> usize {
        self.dialogs.len()
    }

    /// Media arrived for `session` at `now_ms` (the inactivity timer starts again). A driver
    /// tells it at most about once a second a session, not per packet: it looks the session
    /// up among all dialogs.
    pub fn media_seen(&mut self, session: SessionId, now_ms: u64) {
        if let Some(d) = self.dialogs.values_mut().find(|d| d.session == session) {
            d.last_media_ms = now_ms;
        }
    }

    /// The earliest time [`Srs::poll`] has something to do.
    pub fn next_timeout(&self) -> Option<u64> {
        self.dialogs
            .values()
            .flat_map(|d| {
                [
                    d.unacked.map(|(next, _, _)| next),
                    d.expires_at,
                    // Never one already past: poll ends the session when it comes.
                    Some(d.last_media_ms + self.inactivity_limit(d)),
                ]
            })
            .flatten()
            .min()
    }

    /// How long a session may go without media (or SIP) from its client.
    fn inactivity_limit(&self, d: &Dialog) -> u64 {
        inactivity_limit(&self.cfg, d)
    }

    fn tag(&mut self) -> String {
        let mut b = [0u8; 6];
        (self.random)(&mut b);
        self.next_tag += 1;
        format!("{}{}", hex::encode(b), self.next_tag)
    }

    /// Handles one message from `peer` at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, peer: Peer, msg: &Message) -> Vec<SipAction> {
        let Start::Request { method, .. } = &msg.start else {
            return Vec::new(); // responses to our BYEs: nothing more to do
        };
        let mut out = Vec::new();
        let respond = |code: u16, reason: &str, extra: &[(&str, String)]| SipAction::Send {
            peer,
            bytes: message::response(msg, code, reason, None, extra, None),
        };
        let (Some(call_id), Some(from), Some(to), Some(cseq)) = (
            msg.header("call-id"),
            msg.header("from"),
            msg.header("to"),
            msg.header("cseq"),
        ) else {
            if *method != Method::ACK {
                *self.refused.entry(Refusal::BadRequest).or_default() += 1;
                out.push(respond(400, "Bad Request", &[]));
            }
            return out;
        };
        let cseq_n: u32 = cseq
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let remote_tag = message::tag_of(from).unwrap_or("").to_string();
        let key = (call_id.to_string(), remote_tag);
        // A dialog is its Call-ID and both tags (RFC 3261 12): a request naming the dialog's
        // Call-ID and From tag but not its To tag (ours) is not in it, so no one who learnt
        // the first two can re-INVITE or end someone else's session. Only the retransmitted
        // INVITE that created it (and its CANCEL) come without our tag.
        let in_dialog = [Method::INVITE, Method::UPDATE, Method::BYE, Method::ACK];
        if let Some(d) = self
            .dialogs
            .get(&key)
            .filter(|_| in_dialog.contains(method))
        {
            let foreign = match message::tag_of(to) {
                Some(t) => t != d.local_tag,
                None => !(*method == Method::INVITE && cseq_n <= d.remote_cseq),
            };
            if foreign {
                if *method != Method::ACK {
                    out.push(respond(481, "Call/Transaction Does Not Exist", &[]));
                }
                return out;
            }
        }
        match method {
            m if *m == Method::OPTIONS => out.push(respond(
                200,
                "OK",
                &[
                    ("Allow", ALLOW.into()),
                    (
                        "Accept",
                        "application/sdp, application/rs-metadata+xml, multipart/mixed".into(),
                    ),
                    ("Supported", SUPPORTED.join(", ")),
                ],
            )),
            m if *m == Method::ACK => {
                if let Some(d) = self.dialogs.get_mut(&key) {
                    d.unacked = None;
                }
            }
            m if *m == Method::INVITE || *m == Method::UPDATE => {
                if let Some(d) = self.dialogs.get(&key) {
                    if cseq_n <= d.remote_cseq {
                        // A retransmission: the same answer again.
                        if let Some((n, bytes)) = &d.last_response
                            && *n == cseq_n
                        {
                            out.push(SipAction::Send {
                                peer,
                                bytes: bytes.clone(),
                            });
                        } else {
                            out.push(respond(
                                500,
                                "Server Internal Error",
                                &[("Retry-After", "1".into())],
                            ));
                        }
                        return out;
                    }
                    self.modify(now_ms, peer, msg, key, cseq_n, &mut out);
                } else if *m == Method::UPDATE {
                    out.push(respond(481, "Call/Transaction Does Not Exist", &[]));
                } else {
                    self.invite(now_ms, peer, msg, key, cseq_n, &mut out);
                }
            }
            m if *m == Method::BYE => match self.dialogs.remove(&key) {
                Some(d) => {
                    out.push(respond(200, "OK", &[]));
                    self.release(&d);
                    out.push(SipAction::Stop {
                        session: d.session,
                        reason: "bye",
                    });
                }
                None => out.push(respond(481, "Call/Transaction Does Not Exist", &[])),
            },
            m if *m == Method::CANCEL => {
                // The INVITE was answered at once: the CANCEL has nothing left to cancel.
                if self.dialogs.contains_key(&key) {
                    out.push(respond(200, "OK", &[]));
                } else {
                    out.push(respond(481, "Call/Transaction Does Not Exist", &[]));
                }
            }
            _ => out.push(respond(
                405,
                "Method Not Allowed",
                &[("Allow", ALLOW.into())],
            )),
        }
        out
    }

    fn refuse(&mut self, msg: &Message, peer: Peer, why: Refusal, out: &mut Vec<SipAction>) {
        *self.refused.entry(why).or_default() += 1;
        let (code, reason, extra): (u16, &str, Vec<(&str, String)>) = match why {
            Refusal::Busy => (
                503,
                "Service Unavailable",
                vec![("Retry-After", "5".into())],
            ),
            Refusal::Refusing => (
                503,
                "Service Unavailable",
                vec![("Retry-After", "30".into())],
            ),
            Refusal::NotAcceptable => (488, "Not Acceptable Here", vec![]),
            Refusal::NotRecording => (
                488,
                "Not Acceptable Here",
                vec![(
                    "Warning",
                    "399 edgerec \"not a recording session (RFC 7866)\"".into(),
                )],
            ),
            Refusal::BadRequest => (400, "Bad Request", vec![]),
            Refusal::BadExtension => {
                let unsupported: Vec<String> = msg
                    .tokens("require")
                    .into_iter()
                    .filter(|t| !SUPPORTED.contains(&t.as_str()))
                    .collect();
                (
                    420,
                    "Bad Extension",
                    vec![("Unsupported", unsupported.join(", "))],
                )
            }
        };
        out.push(SipAction::Send {
            peer,
            bytes: message::response(msg, code, reason, Some(&self.tag()), &extra, None),
        });
    }

    /// The offer and metadata of a message body.
    fn body(msg: &Message) -> (Option<Offer>, Option<(Metadata, String)>) {
        let Ok(parts) = mime::parts(msg.header("content-type"), &msg.body) else {
            return (None, None);
        };
        let offer = parts
            .iter()
            .find(|p| p.kind == PartKind::Sdp)
            .and_then(|p| sdp::parse_offer(p.body).ok());
        let meta = parts
            .iter()
            .find(|p| p.kind == PartKind::Metadata)
            .and_then(|p| {
                let m = metadata::parse(p.body).ok()?;
                Some((m, String::from_utf8_lossy(p.body).into_owned()))
            });
        (offer, meta)
    }

    fn invite(
        &mut self,
        now_ms: u64,
        peer: Peer,
        msg: &Message,
        key: (String, String),
        cseq_n: u32,
        out: &mut Vec<SipAction>,
    ) {
        out.push(SipAction::Send {
            peer,
            bytes: message::response(msg, 100, "Trying", None, &[], None),
        });
        if msg
            .tokens("require")
            .iter()
            .any(|t| !SUPPORTED.contains(&t.as_str()))
        {
            return self.refuse(msg, peer, Refusal::BadExtension, out);
        }
        if !msg.is_recording_session() {
            return self.refuse(msg, peer, Refusal::NotRecording, out);
        }
        if self.refusing {
            return self.refuse(msg, peer, Refusal::Refusing, out);
        }
        if self.dialogs.len() >= self.cfg.max_sessions {
            return self.refuse(msg, peer, Refusal::Busy, out);
        }
        let (Some(offer), meta) = Self::body(msg) else {
            return self.refuse(msg, peer, Refusal::NotAcceptable, out);
        };
        let mut metadata = Metadata::default();
        let raw = meta.map(|(m, raw)| {
            metadata.apply(m);
            raw
        });
        let takeable = offer
            .streams
            .iter()
            .filter(|s| s.refusal().is_none())
            .count();
        if takeable == 0 {
            return self.refuse(msg, peer, Refusal::NotAcceptable, out);
        }
        if self.ports.free() < takeable {
            return self.refuse(msg, peer, Refusal::Busy, out);
        }
        let mut streams = Vec::new();
        let mut answered = Vec::new();
        for (index, s) in offer.streams.iter().enumerate() {
            let (a, m) = self.take(index, s, None, peer);
            answered.push(a);
            streams.push(m);
        }
        let session = SessionId(self.next_session);
        self.next_session += 1;
        let local_tag = self.tag();
        let origin_version = 1;
        let answer = sdp::answer(
            &offer,
            &answered,
            self.cfg.advertise,
            (session.0, origin_version),
        );
        let expires = session_expires(msg);
        let extra = self.ok_headers(expires);
        let bytes = message::response(
            msg,
            200,
            "OK",
            Some(&local_tag),
            &extra,
            Some(("application/sdp", answer.as_bytes())),
        );
        let to = msg.header("to").unwrap_or("");
        let d = Dialog {
            session,
            call_id: key.0.clone(),
            from: format!("{to};tag={local_tag}"),
            to: msg.header("from").unwrap_or("").to_string(),
            local_tag,
            remote_target: msg.header("contact").map(uri_of).unwrap_or_default(),
            route_set: msg
                .values("record-route")
                .iter()
                .flat_map(|v| v.split(','))
                .map(|r| r.trim().to_string())
                .collect(),
            peer,
            remote_cseq: cseq_n,
            local_cseq: 0,
            offer,
            streams: streams.clone(),
            metadata: metadata.clone(),
            origin_version,
            last_response: Some((cseq_n, bytes.clone())),
            unacked: (peer.transport == Transport::Udp).then_some((
                now_ms + T1_MS,
                T1_MS,
                now_ms + 64 * T1_MS,
            )),
            expires_at: expires.map(|s| now_ms + u64::from(s) * 1000),
            last_media_ms: now_ms,
        };
        let conversation_id = self
            .cfg
            .conversation_header
            .as_deref()
            .and_then(|h| msg.header(h))
            .map(|v| v.chars().take(metadata::MAX_TEXT).collect())
            .or_else(|| metadata.sessions.keys().next().cloned());
        let call = CallInfo {
            call_id: d.call_id.clone(),
            from: d.to.clone(),
            to: to.to_string(),
            conversation_id,
        };
        self.dialogs.insert(key, d);
        out.push(SipAction::Send { peer, bytes });
        out.push(SipAction::Start {
            session,
            streams,
            call,
            metadata: raw.map(|r| (metadata.to_json(), r)),
        });
    }

    /// The answer for offered stream `index` (keeping `had`'s port if it had one) and what
    /// the media layer gets for it.
    fn take(
        &mut self,
        index: usize,
        s: &sdp::OfferedStream,
        had: Option<u16>,
        peer: Peer,
    ) -> (Answered, MediaStream) {
        let mut m = MediaStream {
            index,
            label: s.label.clone(),
            port: None,
            sources: s.address.into_iter().chain([peer.addr.ip()]).collect(),
            paused: matches!(s.direction, Dir::Inactive | Dir::RecvOnly),
            payload_types: s.payload_types(),
            srtp: None,
        };
        m.sources.dedup();
        if let Some(why) = s.refusal() {
            *self.declined.entry(why).or_default() += 1;
            if let Some(p) = had {
                self.ports.give(p);
            }
            return (Answered::Declined, m);
        }
        let Some(port) = had.or_else(|| self.ports.take()) else {
            *self.declined.entry("no_port").or_default() += 1;
            return (Answered::Declined, m);
        };
        m.port = Some(port);
        let crypto = s.crypto.first().map(|theirs| {
            m.srtp = Some(theirs.clone());
            let mut key = zeroize::Zeroizing::new([0u8; sdp::SDES_KEY_LEN]);
            (self.random)(key.as_mut());
            Sdes {
                tag: theirs.tag,
                suite: theirs.suite,
                key,
            }
        });
        (Answered::Taken { port, crypto }, m)
    }

    /// The headers of a `200` to an INVITE or UPDATE: the recording server's Contact, what it
    /// allows and supports, and the session timer when one was asked for.
    fn ok_headers(&self, expires: Option<u32>) -> Vec<(&'static str, String)> {
        let mut extra = vec![
            ("Contact", format!("<{}>;+sip.srs", self.cfg.contact)),
            ("Allow", ALLOW.into()),
            ("Supported", SUPPORTED.join(", ")),
        ];
        if let Some(secs) = expires {
            extra.push(("Require", "timer".into()));
            extra.push(("Session-Expires", format!("{secs};refresher=uac")));
        }
        extra
    }

    /// A re-INVITE or UPDATE in a dialog.
    fn modify(
        &mut self,
        now_ms: u64,
        peer: Peer,
        msg: &Message,
        key: (String, String),
        cseq_n: u32,
        out: &mut Vec<SipAction>,
    ) {
        let (offer, meta) = Self::body(msg);
        let Some(mut d) = self.dialogs.remove(&key) else {
            return;
        };
        d.remote_cseq = cseq_n;
        d.peer = peer;
        // The client is alive, and a stream resumed now has its full inactivity time.
        d.last_media_ms = d.last_media_ms.max(now_ms);
        let mut changed = false;
        let raw = meta.map(|(m, raw)| {
            d.metadata.apply(m);
            changed = true;
            raw
        });
        let mut body = None;
        if let Some(offer) = offer {
            let mut answered = Vec::new();
            let mut streams = Vec::new();
            for (index, s) in offer.streams.iter().enumerate() {
                let had = d.streams.get(index).and_then(|m| m.port);
                let (a, m) = self.take(index, s, had, peer);
                answered.push(a);
                streams.push(m);
            }
            // m-lines are never removed (RFC 3264): ones missing now are released.
            for old in d.streams.iter().skip(streams.len()) {
                if let Some(p) = old.port {
                    self.ports.give(p);
                }
            }
            d.origin_version += 1;
            body = Some(sdp::answer(
                &offer,
                &answered,
                self.cfg.advertise,
                (d.session.0, d.origin_version),
            ));
            changed |= streams != d.streams;
            d.streams = streams;
            d.offer = offer;
        }
        if let Some(secs) = session_expires(msg) {
            d.expires_at = Some(now_ms + u64::from(secs) * 1000);
        }
        let extra = self.ok_headers(session_expires(msg));
        let bytes = message::response(
            msg,
            200,
            "OK",
            Some(&d.local_tag),
            &extra,
            body.as_deref().map(|b| ("application/sdp", b.as_bytes())),
        );
        d.last_response = Some((cseq_n, bytes.clone()));
        if msg.method() == Some(&Method::INVITE) && peer.transport == Transport::Udp {
            d.unacked = Some((now_ms + T1_MS, T1_MS, now_ms + 64 * T1_MS));
        }
        out.push(SipAction::Send { peer, bytes });
        if changed {
            out.push(SipAction::Change {
                session: d.session,
                streams: d.streams.clone(),
                metadata: raw.map(|r| (d.metadata.to_json(), r)),
            });
        }
        self.dialogs.insert(key, d);
    }

    fn release(&mut self, d: &Dialog) {
        for s in &d.streams {
            if let Some(p) = s.port {
                self.ports.give(p);
            }
        }
    }

    /// What is due at `now_ms`: 200s sent again, dialogs never acknowledged, sessions whose
    /// timer or media went quiet ended with a BYE.
    pub fn poll(&mut self, now_ms: u64) -> Vec<SipAction> {
        let mut out = Vec::new();
        let mut ended = Vec::new();
        for (key, d) in self.dialogs.iter_mut() {
            if let Some((next, interval, give_up)) = d.unacked
                && now_ms >= next
            {
                if now_ms >= give_up {
                    ended.push((key.clone(), "no_ack"));
                    continue;
                }
                if let Some((_, bytes)) = &d.last_response {
                    out.push(SipAction::Send {
                        peer: d.peer,
                        bytes: bytes.clone(),
                    });
                }
                let interval = (interval * 2).min(T2_MS);
                d.unacked = Some((now_ms + interval, interval, give_up));
            }
            if d.expires_at.is_some_and(|at| now_ms >= at) {
                ended.push((key.clone(), "session_timer"));
            } else if now_ms.saturating_sub(d.last_media_ms) >= inactivity_limit(&self.cfg, d) {
                ended.push((key.clone(), "srs_bye_inactive"));
            }
        }
        for (key, reason) in ended {
            if let Some(mut d) = self.dialogs.remove(&key) {
                let branch = self.tag();
                out.push(SipAction::Send {
                    peer: bye_peer(&d),
                    bytes: self.bye(&mut d, &branch),
                });
                self.release(&d);
                out.push(SipAction::Stop {
                    session: d.session,
                    reason,
                });
            }
        }
        out
    }

    /// The BYE the recording server sends to end `d`: to the client's Contact, through the
    /// route set the INVITE's Record-Route gave.
    fn bye(&self, d: &mut Dialog, branch: &str) -> Vec<u8> {
        use std::fmt::Write;
        d.local_cseq += 1;
        let sent_by = self
            .cfg
            .contact
            .trim_start_matches("sips:")
            .trim_start_matches("sip:");
        let sent_by = sent_by.rsplit('@').next().unwrap_or(sent_by);
        let sent_by = sent_by.split(';').next().unwrap_or(sent_by);
        let transport = match d.peer.transport {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        };
        let mut m = format!("BYE {} SIP/2.0\r\n", d.remote_target);
        let _ = write!(
            m,
            "Via: SIP/2.0/{transport} {sent_by};branch=z9hG4bK{branch}\r\n"
        );
        let _ = write!(m, "Max-Forwards: 70\r\n");
        for r in &d.route_set {
            let _ = write!(m, "Route: {r}\r\n");
        }
        let _ = write!(
            m,
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} BYE\r\nContent-Length: 0\r\n\r\n",
            d.from, d.to, d.call_id, d.local_cseq
        );
        m.into_bytes()
    }
}

/// The peer a dialog's own requests go to: the first route's, else the remote target's
/// address when it is an IP literal, else the client's address it came from; a new
/// connection when the client's is gone is the driver's to open.
fn bye_peer(d: &Dialog) -> Peer {
    let target = d
        .route_set
        .first()
        .map(|r| uri_of(r))
        .unwrap_or_else(|| d.remote_target.clone());
    let addr = host_port(&target).unwrap_or(d.peer.addr);
    Peer { addr, ..d.peer }
}

/// The URI of a name-addr (`"Name" <sip:a@b>;p` → `sip:a@b`) or of a bare URI.
fn uri_of(value: &str) -> String {
    match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => value[a + 1..b].to_string(),
        _ => value.split(';').next().unwrap_or(value).trim().to_string(),
    }
}

/// The socket address of a SIP URI whose host is an IP literal (port 5060 by default).
fn host_port(uri: &str) -> Option<SocketAddr> {
    let rest = uri.split_once(':')?.1;
    let rest = rest.rsplit('@').next()?;
    let hostport = rest.split(';').next()?;
    if let Ok(a) = hostport.parse::<SocketAddr>() {
        return Some(a);
    }
    hostport
        .trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 5060))
}

/// The Session-Expires (RFC 4028) a request asks for, at least 90 s.
fn session_expires(msg: &Message) -> Option<u32> {
    // Its compact form `x` is the same header to ezk's names.
    let v = msg.header("session-expires")?;
    let secs: u32 = v.split(';').next()?.trim().parse().ok()?;
    Some(secs.max(90))
}

#[cfg(test)]
mod tests;
