//! SIPREC recordings inside [`Sessions`]: one recording per recording session (a SIP dialog
//! the SIP side started, [`crate::siprec::srs`]), spanning every media port its answer
//! handed out. Unlike a port of `ingest.ports`, nothing here is admitted by traffic: the
//! recording starts when the session does (a session that never sends RTP is still a
//! package, with its metadata) and ends when the session stops.
//!
//! Rules (docs/siprec.md, "The media side"):
//! - A stream of the recording is its m-line: stream index = the m-line's place in the
//!   offer, whatever port, SSRC or codec it uses later. Its first packet writes its
//!   `StreamOpened` (labelled with the offer's `a=label`); a new SSRC later is an
//!   `SsrcChange` on the same stream.
//! - A datagram counts only from the session's own sources (the offer's `c=` addresses and
//!   the client's); anything else on a media port is dropped and counted (`siprec_source`,
//!   `siprec_no_session`). RTCP comes on the port above or muxed on the RTP port.
//! - An SRTP stream is decrypted on arrival ([`SrtpIn`]); the package holds plain RTP
//!   inside its own encryption. A packet that does not authenticate is counted
//!   (`srtp_auth`), never stored.
//! - A paused stream (`a=inactive`) keeps its sequence tracking but stores nothing; the
//!   pause and the resume are events on that stream.
//! - Metadata: a record at the start and at every change that brought metadata, each the
//!   whole state (`conversation_id` and `siprec` with the call, the merged RFC 7865
//!   metadata as JSON and the raw XML it came from), so the merged view of any package is
//!   complete; a record `siprec_end` with the SIP reason (and `streams_with_media`, how many
//!   streams sent anything) before the end.
//! - The maximum duration splits it like any recording: a continuation with the same
//!   streams and metadata.
//!
//! Invariants: every media port maps to at most one session's stream; a session's ports are
//! released when it stops; a session is opened once and closed once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{Action, Discard, Packet, PortMap, RecId, Recording, Sessions, Stream, hand_out};
use crate::media::rtp::{Datagram, SeqOutcome, SeqTracker, classify};
use crate::siprec::srs::{MediaStream, SessionId};
use crate::siprec::srtp::SrtpIn;
use erec::entries::{ENTRY_HEADER_LEN, Entry, Event};
use erec::format::EndReason;

/// How often at most a session's media is reported as seen (the SIP side's inactivity
/// timer), µs.
pub const SEEN_EVERY_US: u64 = 1_000_000;

/// The SIPREC part of the session state.
#[derive(Debug, Default)]
pub(super) struct SiprecState {
    /// The media port range (RTP and RTCP ports); datagrams there are SIPREC's.
    range: Option<(u16, u16)>,
    /// The RTP port of every taken stream: its session and m-line.
    by_port: PortMap<(SessionId, usize)>,
    calls: BTreeMap<SessionId, Call>,
    /// Sessions whose media arrived since the driver last asked.
    seen: Vec<SessionId>,
}

#[derive(Debug)]
struct Call {
    rec: Recording,
    legs: Vec<Leg>,
    /// The package could not be made: its media is dropped as refused until it stops.
    aborted: bool,
    last_seen_report_us: Option<u64>,
}

/// One stream (m-line) of a SIPREC recording.
struct Leg {
    port: Option<u16>,
    sources: Vec<IpAddr>,
    paused: bool,
    label: String,
    srtp: Option<SrtpIn>,
    /// What the SDES key was, to keep the context across a re-INVITE that repeats it.
    sdes: Option<crate::siprec::sdp::Sdes>,
    /// Its RTP so far: SSRC, sender, sequence (none before its first packet).
    stream: Option<Stream>,
    /// Where its first packet arrived (for a continuation to announce it again).
    local: Option<SocketAddr>,
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg")
            .field("port", &self.port)
            .field("paused", &self.paused)
            .field("srtp", &self.srtp.is_some())
            .finish_non_exhaustive()
    }
}

impl Leg {
    fn new(s: &MediaStream) -> (Leg, Option<String>) {
        let (srtp, problem) = match &s.srtp {
            Some(sdes) => match SrtpIn::new(sdes) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, None),
        };
        let leg = Leg {
            port: s.port,
            sources: s.sources.clone(),
            paused: s.paused,
            label: s.label.clone().unwrap_or_default(),
            srtp,
            sdes: s.srtp.clone(),
            stream: None,
            local: None,
        };
        (leg, problem)
    }
}

/// The SIP side's reason for a stop, as a package's end reason.
fn end_reason(sip: &str) -> EndReason {
    match sip {
        "bye" => EndReason::Complete,
        "srs_bye_inactive" | "session_timer" => EndReason::IdleTimeout,
        _ => EndReason::Error,
    }
}

impl Sessions {
    /// Datagrams to ports `first..=last` are SIPREC media (the answered ports and the odd
    /// ones above them); set once, before any arrives.
    pub fn set_siprec_ports(&mut self, first: u16, last: u16) {
        self.siprec.range = Some((first, last));
    }

    /// Whether a datagram to `port` is SIPREC's.
    pub(super) fn is_siprec_port(&self, port: u16) -> bool {
        self.siprec
            .range
            .is_some_and(|(a, b)| (a..=b).contains(&port))
    }

    /// SIPREC sessions recording now.
    pub fn siprec_active(&self) -> usize {
        self.siprec.calls.len()
    }

    /// The sessions whose media arrived since the last call (each at most once a
    /// [`SEEN_EVERY_US`]): the SIP side's inactivity timer is told.
    pub fn take_siprec_seen(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.siprec.seen)
    }

    /// A SIPREC session starts: its recording opens now, with `json` (a JSON object: the
    /// call and its metadata) as its first metadata record. Streams not answered (no port)
    /// are kept by index for a later change. Returns the recording, or `None` if the session
    /// has one already.
    pub fn siprec_start(
        &mut self,
        now: u64,
        session: SessionId,
        streams: &[MediaStream],
        json: Vec<u8>,
        out: &mut Vec<Action>,
    ) -> Option<RecId> {
        if self.siprec.calls.contains_key(&session) {
            return None;
        }
        let local = first_local(streams.iter().filter_map(|s| s.port));
        let rec = self.open_siprec(now, local, None, out);
        let id = rec.id;
        let mut legs = Vec::with_capacity(streams.len());
        for s in streams {
            let (leg, problem) = Leg::new(s);
            if let Some(p) = problem {
                tracing::warn!(stream = s.index, error = %p, "SRTP stream cannot be decrypted; its packets are dropped");
            }
            legs.push(leg);
        }
        let mut call = Call {
            rec,
            legs,
            aborted: false,
            last_seen_report_us: None,
        };
        self.take_ports(session, &call.legs);
        let limits = self.limits;
        Self::tag_call(&mut call, json, out);
        for (i, leg) in call.legs.iter().enumerate() {
            if leg.paused {
                Self::mark_leg(&limits, &mut call.rec, now, i, true, out);
            }
        }
        self.siprec.calls.insert(session, call);
        self.after_open(now);
        Some(id)
    }

    /// A SIPREC session's streams or metadata changed (re-INVITE, UPDATE): ports and keys
    /// follow, pauses and resumes are events, `json` (if any) a new metadata record.
    pub fn siprec_change(
        &mut self,
        now: u64,
        session: SessionId,
        streams: &[MediaStream],
        json: Option<Vec<u8>>,
        out: &mut Vec<Action>,
    ) {
        let limits = self.limits;
        let Some(mut call) = self.siprec.calls.remove(&session) else {
            return;
        };
        self.release_ports(session, &call.legs);
        // A stream the new offer no longer has gave its port back (the SIP side may hand it
        // to another session): it has none now.
        for (i, leg) in call.legs.iter_mut().enumerate() {
            if !streams.iter().any(|s| s.index == i) {
                leg.port = None;
            }
        }
        for s in streams {
            let i = s.index;
            if i >= usize::from(erec::entries::NO_STREAM) {
                continue;
            }
            while call.legs.len() <= i {
                call.legs.push(Leg {
                    port: None,
                    sources: Vec::new(),
                    paused: false,
                    label: String::new(),
                    srtp: None,
                    sdes: None,
                    stream: None,
                    local: None,
                });
            }
            let leg = &mut call.legs[i];
            leg.port = s.port;
            leg.sources.clone_from(&s.sources);
            if let Some(l) = &s.label {
                leg.label.clone_from(l);
            }
            if leg.sdes != s.srtp {
                let (fresh, problem) = Leg::new(s);
                if let Some(p) = problem {
                    tracing::warn!(stream = i, error = %p, "SRTP stream cannot be decrypted; its packets are dropped");
                }
                leg.srtp = fresh.srtp;
                leg.sdes = fresh.sdes;
            }
            if leg.paused != s.paused {
                leg.paused = s.paused;
                if !call.aborted {
                    Self::mark_leg(&limits, &mut call.rec, now, i, s.paused, out);
                }
            }
        }
        self.take_ports(session, &call.legs);
        if let Some(json) = json
            && !call.aborted
        {
            Self::tag_call(&mut call, json, out);
        }
        self.siprec.calls.insert(session, call);
    }

    /// A SIPREC session stopped (`reason` the SIP side's): its recording ends, with a last
    /// metadata record naming the reason, and its ports are released.
    pub fn siprec_stop(&mut self, session: SessionId, reason: &str, out: &mut Vec<Action>) {
        let Some(mut call) = self.siprec.calls.remove(&session) else {
            return;
        };
        self.release_ports(session, &call.legs);
        if call.aborted {
            return;
        }
        // Says too how many streams sent anything: a session without media is a package
        // that says so.
        let heard = call.legs.iter().filter(|l| l.stream.is_some()).count();
        let end = serde_json::json!({ "siprec_end": reason, "streams_with_media": heard });
        Self::tag_call(&mut call, end.to_string().into_bytes(), out);
        self.finish(&mut call.rec, end_reason(reason), out);
    }

    /// A SIPREC recording whose package could not be made: its media is dropped as
    /// refused from now on. Returns whether `rec` was one.
    pub(super) fn abort_siprec(&mut self, rec: RecId) -> bool {
        for call in self.siprec.calls.values_mut() {
            if call.rec.id == rec && !call.aborted {
                call.aborted = true;
                call.rec.pending.clear();
                *self.counters.ended.entry("spool_error").or_default() += 1;
                return true;
            }
        }
        false
    }

    /// Opens a SIPREC recording's package (a first one, or a continuation) and returns
    /// the recording, empty.
    fn open_siprec(
        &mut self,
        now: u64,
        local: SocketAddr,
        continues: Option<RecId>,
        out: &mut Vec<Action>,
    ) -> Recording {
        let id = RecId(self.next_id);
        self.next_id += 1;
        self.counters.started += 1;
        out.push(Action::Open {
            rec: id,
            local,
            continues,
            source: None,
            started_us: now,
        });
        Recording::fresh(id, local, now)
    }

    /// Flush ticks and the maximum duration now cover one more recording.
    fn after_open(&mut self, now: u64) {
        if self.next_flush_us.is_none() {
            self.next_flush_us = Some(now + self.limits.flush_interval_us);
        }
        self.note_deadline(now + self.limits.max_recording_us);
    }

    /// Forgets the ports of a session's legs, those that are still its own.
    fn release_ports(&mut self, session: SessionId, legs: &[Leg]) {
        for (i, leg) in legs.iter().enumerate() {
            if let Some(p) = leg.port
                && self.siprec.by_port.get(&p) == Some(&(session, i))
            {
                self.siprec.by_port.remove(&p);
            }
        }
    }

    fn take_ports(&mut self, session: SessionId, legs: &[Leg]) {
        for (i, leg) in legs.iter().enumerate() {
            if let Some(p) = leg.port {
                self.siprec.by_port.insert(p, (session, i));
            }
        }
    }

    fn tag_call(call: &mut Call, json: Vec<u8>, out: &mut Vec<Action>) {
        hand_out(&mut call.rec, out);
        out.push(Action::Metadata {
            rec: call.rec.id,
            json: json.clone(),
        });
        // A continuation carries the metadata again: the last whole state is enough.
        call.rec.tags.clear();
        call.rec.tags.push(json);
    }

    fn mark_leg(
        limits: &super::Limits,
        rec: &mut Recording,
        now: u64,
        stream: usize,
        pause: bool,
        out: &mut Vec<Action>,
    ) {
        let e = Entry::Event {
            stream: u8::try_from(stream).expect("fewer than 255 streams"),
            time_us: now.saturating_sub(rec.started_us),
            event: if pause { Event::Pause } else { Event::Resume },
        };
        Self::push(limits, rec, &e, out);
    }

    /// A datagram on a SIPREC media port.
    pub(super) fn siprec_datagram(
        &mut self,
        now: u64,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<Action>,
    ) {
        if 1 + 8 + datagram.len() + ENTRY_HEADER_LEN > self.limits.max_chunk {
            return self.discard(Discard::TooLarge);
        }
        let port = local.port();
        let Some(&(session, index)) = self.siprec.by_port.get(&port).or_else(|| {
            self.siprec
                .by_port
                .get(&(port & !1))
                .filter(|_| port % 2 == 1)
        }) else {
            return self.discard(Discard::SiprecNoSession);
        };
        let kind = match classify(datagram) {
            Err(r) => return self.discard(Discard::Malformed(r)),
            Ok(Datagram::Rtp(_)) if port % 2 == 1 => {
                return self.discard(Discard::SiprecNoSession);
            }
            Ok(d) => d,
        };
        let limits = self.limits;
        let counters = &mut self.counters;
        let count = |counters: &mut super::Counters, d: Discard| {
            *counters.dropped.entry(d.label()).or_default() += 1;
        };
        let call = self
            .siprec
            .calls
            .get_mut(&session)
            .expect("a taken port belongs to a session");
        if call.aborted {
            return count(counters, Discard::Refused);
        }
        let leg = &mut call.legs[index];
        if !leg.sources.is_empty() && !leg.sources.contains(&remote.ip()) {
            return count(counters, Discard::SiprecSource);
        }
        let plain;
        let packet = match (&mut leg.srtp, &kind) {
            (None, _) if leg.sdes.is_some() => return count(counters, Discard::SrtpAuth),
            (None, _) => datagram,
            (Some(c), Datagram::Rtp(_)) => match c.rtp(datagram) {
                Ok(p) => {
                    plain = p;
                    &plain[..]
                }
                Err(_) => return count(counters, Discard::SrtpAuth),
            },
            (Some(c), Datagram::Rtcp(_)) => match c.rtcp(datagram) {
                Ok(p) => {
                    plain = p;
                    &plain[..]
                }
                Err(_) => return count(counters, Discard::SrtpAuth),
            },
        };
        // The decrypted packet is read again: its payload (and SRTCP's reports) are clear now.
        let kind = match classify(packet) {
            Ok(k) => k,
            Err(r) => return count(counters, Discard::Malformed(r)),
        };
        let stream = u8::try_from(index).expect("fewer than 255 streams");
        let t = now.saturating_sub(call.rec.started_us);
        if call
            .last_seen_report_us
            .is_none_or(|l| now >= l + SEEN_EVERY_US)
        {
            call.last_seen_report_us = Some(now);
            self.siprec.seen.push(session);
        }
        let rec = &mut call.rec;
        let h = match kind {
            Datagram::Rtcp(_) => {
                let e = Entry::Rtcp {
                    stream,
                    arrival_us: t,
                    packet,
                };
                Self::push(&limits, rec, &e, out);
                counters.rtcp_packets += 1;
                return;
            }
            Datagram::Rtp(h) => h,
        };
        rec.last_rtp_us = now;
        let outcome = match &mut leg.stream {
            Some(s) if s.ssrc == h.ssrc => s.seq.update(h.seq),
            Some(s) => {
                s.ssrc = h.ssrc;
                s.seq = SeqTracker::new(h.seq);
                let change = Entry::Event {
                    stream,
                    time_us: t,
                    event: Event::SsrcChange(h.ssrc),
                };
                Self::push(&limits, rec, &change, out);
                SeqOutcome::InOrder
            }
            None => {
                leg.local = Some(local);
                leg.stream = Some(Stream {
                    ssrc: h.ssrc,
                    remote,
                    payload_type: h.payload_type,
                    seq: SeqTracker::new(h.seq),
                    said_bye: false,
                });
                let opened = Entry::StreamOpened {
                    stream,
                    ssrc: h.ssrc,
                    local,
                    remote,
                    payload_type: h.payload_type,
                    label: &leg.label,
                };
                Self::push(&limits, rec, &opened, out);
                SeqOutcome::InOrder
            }
        };
        let packet = Packet {
            stream,
            t,
            outcome,
            paused: leg.paused,
            bytes: packet,
        };
        Self::take_rtp(counters, &limits, rec, packet, out);
    }

    /// The earliest maximum-duration deadline of the SIPREC recordings after `now`.
    pub(super) fn siprec_deadline(&self, now: u64) -> Option<u64> {
        self.siprec
            .calls
            .values()
            .map(|c| c.rec.started_us + self.limits.max_recording_us)
            .filter(|d| *d > now)
            .min()
    }

    /// Splits the SIPREC recordings at their maximum duration (a continuation with the
    /// same streams, announced again, and the metadata again).
    pub(super) fn siprec_split_due(&mut self, now: u64, out: &mut Vec<Action>) -> bool {
        let max = self.limits.max_recording_us;
        let due: Vec<SessionId> = self
            .siprec
            .calls
            .iter()
            .filter(|(_, c)| !c.aborted && now >= c.rec.started_us + max)
            .map(|(s, _)| *s)
            .collect();
        let limits = self.limits;
        for session in &due {
            let mut call = self.siprec.calls.remove(session).expect("listed above");
            // (A placeholder until the continuation opens, after the old one's end.)
            let placeholder = Recording::fresh(call.rec.id, call.rec.local, now);
            let mut old = std::mem::replace(&mut call.rec, placeholder);
            let tags = std::mem::take(&mut old.tags);
            let (local, old_id) = (old.local, old.id);
            // Not the last recording: the call itself goes on below.
            self.siprec.calls.insert(*session, call);
            self.finish(&mut old, EndReason::MaxDuration, out);
            let mut call = self.siprec.calls.remove(session).expect("put back above");
            call.rec = self.open_siprec(now, local, Some(old_id), out);
            for json in tags {
                Self::tag_call(&mut call, json, out);
            }
            for (i, leg) in call.legs.iter().enumerate() {
                let stream = u8::try_from(i).expect("fewer than 255 streams");
                if let (Some(s), Some(local)) = (&leg.stream, leg.local) {
                    let opened = Entry::StreamOpened {
                        stream,
                        ssrc: s.ssrc,
                        local,
                        remote: s.remote,
                        payload_type: s.payload_type,
                        label: &leg.label,
                    };
                    Self::push(&limits, &mut call.rec, &opened, out);
                }
                if leg.paused {
                    Self::mark_leg(&limits, &mut call.rec, now, i, true, out);
                }
            }
            self.siprec.calls.insert(*session, call);
        }
        if !due.is_empty() {
            self.note_deadline(now + max);
        }
        !due.is_empty()
    }

    /// Hands out every SIPREC recording's pending chunk; whether there was any.
    pub(super) fn siprec_flush(&mut self, out: &mut Vec<Action>) -> bool {
        let mut wrote = false;
        for call in self.siprec.calls.values_mut() {
            wrote |= hand_out(&mut call.rec, out);
        }
        wrote
    }

    /// Ends every SIPREC recording (the appliance stops; the SIP side is not told here).
    pub(super) fn siprec_shutdown(&mut self, out: &mut Vec<Action>) {
        let sessions: Vec<SessionId> = self.siprec.calls.keys().copied().collect();
        for s in sessions {
            let call = self.siprec.calls.remove(&s).expect("listed above");
            self.release_ports(s, &call.legs);
            if !call.aborted {
                let mut rec = call.rec;
                self.finish(&mut rec, EndReason::Shutdown, out);
            }
        }
    }

    /// Whether any recording (port or SIPREC) is in progress.
    pub(super) fn any_recording(&self) -> bool {
        !self.by_port.is_empty() || !self.siprec.calls.is_empty()
    }
}

/// The address a SIPREC recording names as its own: its first port (the appliance's
/// address is the listener's, not known here).
fn first_local(mut ports: impl Iterator<Item = u16>) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), ports.next().unwrap_or(0))
}

#[cfg(test)]
mod tests;
