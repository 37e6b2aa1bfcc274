//! The recording state machine: which recording each datagram belongs to, which stream in
//! it, what it means for that stream's sequence, and when a recording starts, flushes and
//! ends. Sans-IO in the manner of quinn-proto: [`Sessions::handle`] takes
//! `(now, local, remote, datagram)` and pushes [`Action`]s; [`Sessions::poll_timeout`] says
//! when [`Sessions::handle_timeout`] must be called next. No socket, no file, no clock:
//! `now` is microseconds of a monotonic clock the driver owns, so every test of loss,
//! reordering, SSRC change, idle close and the maximum duration runs on a fake clock.
//!
//! Rules (docs/operations.md, "Ingest" and "Recorder"):
//! - Each local port records what arrives on it: all streams on one port while it is busy
//!   form one recording. RTP opens a recording; RTCP never does.
//! - A new SSRC from the remote address of an open stream is an SSRC change on that stream;
//!   from anywhere else it opens a new stream. At most 255 streams a recording.
//! - RTCP arriving on a recording's port, or on the next port up (RTP+1), is stored in that
//!   recording, with the stream of its sender's SSRC; a BYE ends the stream of its SSRC, and
//!   when every stream has said BYE the recording ends with reason RTCP BYE.
//! - A recording ends after the idle timeout without RTP, at shutdown, or at the maximum
//!   duration, where a new recording continues at once with the same streams and names its
//!   predecessor.
//! - Media entries are packed whole into chunks of at most `max_chunk` bytes; a chunk is
//!   handed out when the next entry would not fit, and every pending chunk at each flush
//!   tick, followed by one [`Action::Sync`] (group commit).
//! - Admission: RTP on a port without a recording makes it a *candidate*: its streams (SSRC
//!   and source address) are on probation, as RFC 3550 (A.1) validates a new source, and
//!   what arrives is held in memory (at most [`MAX_CANDIDATE_PACKETS`] datagrams and
//!   [`MAX_CANDIDATE_BYTES`] a port; when full, the streams heard from longest ago make
//!   room, so junk must outpace a call's 20 ms to push it out). It becomes a recording once
//!   one stream sent `min_packets` packets in sequence, none more than
//!   [`ADMISSION_WINDOW_US`] after the one before (copies of one packet do not count),
//!   within `starts_per_source` (that stream's address) and `starts_per_port`. Then
//!   everything held since the window before that run (other streams, RTCP to the port or
//!   the one above) is recorded with its own times, pauses that happened meanwhile at
//!   theirs, and a BYE among them ends the recording only after all are in: nothing
//!   admitted is lost. A stream silent for the window is forgotten and counted
//!   `not_admitted`, one over a rate `start_rate`: spoofed datagrams cannot make a package
//!   each.
//!
//! Invariants: every [`Action::Open`] is followed, eventually, by exactly one
//! [`Action::Close`] for the same recording, and all its [`Action::Chunk`]s come between the
//! two; a datagram is either stored in exactly one recording or counted in [`Counters`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;

use crate::media::rtp::{Datagram, Reject, SeqOutcome, SeqTracker, classify};

mod siprec;
use erec::entries::{ENTRY_HEADER_LEN, Entry, Event, NO_STREAM};
use erec::format::EndReason;

/// The timing and size rules of recording.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// A recording ends after this long without RTP.
    pub idle_timeout_us: u64,
    /// A recording is split after this long.
    pub max_recording_us: u64,
    /// Pending media is handed out at least this often.
    pub flush_interval_us: u64,
    /// The largest chunk of entries (the package's max chunk length).
    pub max_chunk: usize,
    /// RTP packets one stream must send in sequence (each within [`ADMISSION_WINDOW_US`] of
    /// the one before) before its port's recording starts (1: at the first).
    pub min_packets: usize,
    /// Recordings started a second from one source address.
    pub starts_per_source: edgerec_net::rate_limit::Limit,
    /// Recordings started a second on one port.
    pub starts_per_port: edgerec_net::rate_limit::Limit,
}

/// The longest a stream on probation may go without a packet (µs): a second.
pub const ADMISSION_WINDOW_US: u64 = 1_000_000;
/// Datagrams a candidate port holds at most.
pub const MAX_CANDIDATE_PACKETS: usize = 64;
/// Bytes of datagrams a candidate port holds at most (a G.711 packet is 172).
pub const MAX_CANDIDATE_BYTES: usize = 16 << 10;
/// RTCP datagrams a candidate port holds at most.
const MAX_CANDIDATE_RTCP: usize = 8;
/// Candidates are swept for silent streams at most this often (µs).
const CANDIDATE_SWEEP_US: u64 = 100_000;

/// A recording in progress, as the driver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecId(pub u64);

/// Why a datagram was not stored; the label of `edgerec_datagrams_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Discard {
    /// Malformed: see [`Reject`].
    Malformed(Reject),
    /// RTCP with no recording on its port or the port below.
    RtcpWithoutRecording,
    /// The recording has 255 streams already.
    TooManyStreams,
    /// Larger than one chunk can hold.
    TooLarge,
    /// Held by a candidate that never became a recording (fewer than `min_packets` in time).
    NotAdmitted,
    /// Held by a candidate whose start was over a rate (per source or per port).
    StartRate,
    /// Of a call whose recording was refused (see [`Sessions::set_refusal`]).
    Refused,
    /// On a SIPREC media port no session holds (or RTP on an RTCP port).
    SiprecNoSession,
    /// On a SIPREC session's port, from an address that is neither the offer's nor the
    /// client's.
    SiprecSource,
    /// SRTP (or SRTCP) that did not authenticate, or a replay.
    SrtpAuth,
}

impl Discard {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Discard::Malformed(r) => r.label(),
            Discard::RtcpWithoutRecording => "rtcp_without_recording",
            Discard::TooManyStreams => "too_many_streams",
            Discard::TooLarge => "too_large",
            Discard::NotAdmitted => "not_admitted",
            Discard::StartRate => "start_rate",
            Discard::Refused => "refused",
            Discard::SiprecNoSession => "siprec_no_session",
            Discard::SiprecSource => "siprec_source",
            Discard::SrtpAuth => "srtp_auth",
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a package for a new recording on `local` (fresh data key, header, spool file).
    Open {
        /// The recording.
        rec: RecId,
        /// The address it records.
        local: SocketAddr,
        /// The recording this one continues after a maximum-duration split.
        continues: Option<RecId>,
        /// The source address of the stream whose packets started it (`None` for a split
        /// or a SIPREC session): a call continued over a restart must come from it.
        source: Option<std::net::IpAddr>,
        /// The monotonic time its entry times count from: the arrival of its first datagram,
        /// which may be up to a second before this action (held while it was a candidate).
        /// Its creation time is the wall clock at that instant.
        started_us: u64,
    },
    /// Seal these whole entries as one media record and append it.
    Chunk {
        /// The recording.
        rec: RecId,
        /// Media plaintext: whole entries, at most `max_chunk` bytes.
        plaintext: Vec<u8>,
    },
    /// Seal one JSON object as a metadata record, after the media handed out before it.
    Metadata {
        /// The recording.
        rec: RecId,
        /// The JSON object.
        json: Vec<u8>,
    },
    /// Make every chunk appended since the last sync durable (one group commit).
    Sync,
    /// Write the end record and move the package to `ready/`.
    Close {
        /// The recording.
        rec: RecId,
        /// Why it ended.
        reason: EndReason,
    },
}

/// Counts for the metrics; never per recording.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// RTP packets stored.
    pub rtp_packets: u64,
    /// RTP packets found missing (gaps; some may arrive later, reordered).
    pub rtp_lost: u64,
    /// Duplicate RTP packets (counted, not stored).
    pub rtp_duplicates: u64,
    /// Late RTP packets (stored).
    pub rtp_reordered: u64,
    /// RTCP packets stored.
    pub rtcp_packets: u64,
    /// Datagrams not stored, by reason.
    pub dropped: HashMap<&'static str, u64>,
    /// Recordings started.
    pub started: u64,
    /// Calls whose recording was refused (never started), by reason.
    pub refused: HashMap<&'static str, u64>,
    /// Recordings ended, by reason.
    pub ended: HashMap<&'static str, u64>,
    /// RTP packets received while paused (not stored, by request).
    pub rtp_paused: u64,
}

#[derive(Debug)]
struct Stream {
    ssrc: u32,
    remote: SocketAddr,
    payload_type: u8,
    seq: SeqTracker,
    said_bye: bool,
}

/// Hashes a port for the per-datagram lookup: ports are not chosen by an attacker who could
/// aim at collisions in a way that matters (they are the appliance's own range), so a
/// multiplicative hash does instead of SipHash.
#[derive(Debug, Default)]
struct PortHasher(u64);

impl Hasher for PortHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u8(*b);
        }
    }
    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_u16(&mut self, p: u16) {
        self.0 = (self.0 ^ u64::from(p)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type PortMap<V> = HashMap<u16, V, BuildHasherDefault<PortHasher>>;

/// Hands out a recording's pending chunk, if it has one, leaving an empty one with the same
/// capacity (a recording's chunks are alike in size, so the next one grows without
/// reallocating). Returns whether it did.
fn hand_out(rec: &mut Recording, out: &mut Vec<Action>) -> bool {
    if rec.pending.is_empty() {
        return false;
    }
    let cap = rec.pending.len();
    out.push(Action::Chunk {
        rec: rec.id,
        plaintext: std::mem::replace(&mut rec.pending, Vec::with_capacity(cap)),
    });
    true
}

#[derive(Debug)]
struct Recording {
    id: RecId,
    local: SocketAddr,
    started_us: u64,
    last_rtp_us: u64,
    streams: Vec<Stream>,
    pending: Vec<u8>,
    /// The metadata given to it, handed again to a recording that continues it.
    tags: Vec<Vec<u8>>,
    /// Paused: RTP is tracked (streams, sequence numbers, idle time) but not stored.
    paused: bool,
}

impl Recording {
    /// A recording that starts now at `local`, with nothing in it yet.
    fn fresh(id: RecId, local: SocketAddr, now: u64) -> Recording {
        Recording {
            id,
            local,
            started_us: now,
            last_rtp_us: now,
            streams: Vec::new(),
            pending: Vec::new(),
            tags: Vec::new(),
            paused: false,
        }
    }

    /// Whether it has streams and every one said BYE.
    fn all_said_bye(&self) -> bool {
        !self.streams.is_empty() && self.streams.iter().all(|s| s.said_bye)
    }
}

/// What became of a pause or a resume for a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseApplied {
    /// The recording in progress on the port is paused (resumed) from now on; the event is
    /// in it.
    Now,
    /// No recording on the port: the next one starts paused (or not).
    Next,
    /// The port was in that state already: nothing changed.
    Unchanged,
}

/// What became of metadata given for a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tagged {
    /// Written into the recording in progress on the port.
    Now,
    /// No recording on the port: held for the next one that starts there.
    Held,
    /// Refused: larger than a record may be.
    TooLarge,
    /// Refused: already [`MAX_HELD`] documents wait for the port.
    TooManyHeld,
}

/// Metadata documents that may wait for a port's next recording.
pub const MAX_HELD: usize = 16;

/// A stream on a candidate port, on probation as RFC 3550 (A.1) validates a new source:
/// admitted once `min_packets` of its packets came in sequence from one address, none more
/// than [`ADMISSION_WINDOW_US`] after the one before.
#[derive(Debug)]
struct Probe {
    ssrc: u32,
    from: SocketAddr,
    last_us: u64,
    max_seq: u16,
    /// Packets in sequence so far.
    run: usize,
    /// When the first of them arrived.
    run_from_us: u64,
}

impl Probe {
    /// The run after a packet of sequence number `seq`: one more for the next in sequence,
    /// one (starting over) for anything else.
    fn run_after(&self, seq: u16) -> usize {
        if seq == self.max_seq.wrapping_add(1) {
            self.run + 1
        } else {
            1
        }
    }

    fn advance(&mut self, now: u64, seq: u16, run: usize) {
        if run == 1 {
            self.run_from_us = now;
        }
        self.max_seq = seq;
        self.run = run;
        self.last_us = now;
    }
}

/// An RTP packet placed in its recording: see [`Sessions::take_rtp`].
struct Packet<'a> {
    stream: u8,
    /// Its time in the recording (µs).
    t: u64,
    outcome: SeqOutcome,
    /// Whether its stream (or port) is paused.
    paused: bool,
    bytes: &'a [u8],
}

/// A datagram a candidate holds.
#[derive(Debug)]
struct Held {
    at: u64,
    /// The local port it came to (RTCP may come to the port above).
    port: u16,
    from: SocketAddr,
    data: Vec<u8>,
    /// The stream it belongs to (with `from`); `None` for RTCP.
    ssrc: Option<u32>,
    /// Whether the port was paused when it came.
    paused: bool,
}

/// A port that received RTP but has no recording yet: its streams on probation and what it
/// holds for them, in arrival order, bounded by [`MAX_CANDIDATE_PACKETS`] and
/// [`MAX_CANDIDATE_BYTES`].
#[derive(Debug, Default)]
struct Candidate {
    probes: Vec<Probe>,
    held: Vec<Held>,
    bytes: usize,
}

impl Candidate {
    fn fits(&self, len: usize) -> bool {
        self.held.len() < MAX_CANDIDATE_PACKETS && self.bytes + len <= MAX_CANDIDATE_BYTES
    }

    fn hold(&mut self, x: Held) {
        self.bytes += x.data.len();
        self.held.push(x);
    }

    fn remove_held(&mut self, i: usize) -> u64 {
        let x = self.held.remove(i);
        self.bytes -= x.data.len();
        1
    }

    /// Forgets what `gone` selects; returns how many datagrams that was.
    fn drop_held(&mut self, gone: impl Fn(&Held) -> bool) -> u64 {
        let (before, mut freed) = (self.held.len(), 0);
        self.held.retain(|x| {
            let g = gone(x);
            if g {
                freed += x.data.len();
            }
            !g
        });
        self.bytes -= freed;
        (before - self.held.len()) as u64
    }

    /// Forgets stream `i` and its datagrams; returns how many datagrams that was.
    fn drop_probe(&mut self, i: usize) -> u64 {
        let p = self.probes.swap_remove(i);
        self.drop_held(|x| x.ssrc == Some(p.ssrc) && x.from == p.from)
    }

    /// When its first stream goes silent for the window.
    fn deadline(&self) -> Option<u64> {
        self.probes
            .iter()
            .map(|p| p.last_us + ADMISSION_WINDOW_US)
            .min()
    }
}

/// What holds media on a port ([`Sessions::holding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Nothing: all it took is handed out or dropped.
    Nothing,
    /// A candidate, until its call is admitted or forgotten.
    Candidate,
    /// A recording (its pending chunk).
    Recording,
}

/// All recordings in progress. See the module documentation.
#[derive(Debug)]
pub struct Sessions {
    limits: Limits,
    by_port: PortMap<Recording>,
    /// Metadata waiting for the next recording on a port.
    held: PortMap<Vec<Vec<u8>>>,
    /// Ports paused: no media is stored for them until resumed (a recording that starts on
    /// one starts paused).
    paused: PortMap<()>,
    next_id: u64,
    next_flush_us: Option<u64>,
    /// No recording ends idle or at its maximum duration before this (a lower bound: packets
    /// only push deadlines later), so timers cost one sweep over all recordings per actual
    /// deadline, not one per datagram.
    next_deadline_us: Option<u64>,
    counters: Counters,
    candidates: PortMap<Candidate>,
    /// A candidate's held datagrams are being recorded (see [`Sessions::admit`]).
    replaying: bool,
    /// The port whose recording or candidate took the last datagram handled, if one did.
    took: Option<u16>,
    /// The last datagram handled admitted a candidate (its held datagrams were recorded).
    admitted: bool,
    starts_by_source: edgerec_net::rate_limit::PerKey<std::net::IpAddr>,
    starts_by_port: edgerec_net::rate_limit::PerKey<u16>,
    /// Why no recording may start now (the driver's spool or key), if one may not.
    refusing: Option<&'static str>,
    /// Ports whose call was refused, when its last datagram came, and whether that refusal
    /// ends with the refusals (a call refused for a full spool may record once there is room;
    /// a call whose package could not be made stays refused until it goes quiet): the rest
    /// of that call is dropped as refused, and the refusal counted once.
    refused_ports: PortMap<RefusedCall>,
    /// The SIPREC recordings (see [`siprec`]).
    siprec: siprec::SiprecState,
}

/// A call whose datagrams are dropped as refused.
#[derive(Debug, Clone, Copy)]
struct RefusedCall {
    /// When its last datagram came (it stays refused until quiet for the idle timeout).
    last: u64,
    /// Refused because recordings could not start (let go when they can again), not
    /// because its own package could not be made.
    ends_with_refusals: bool,
}

impl Sessions {
    /// No recordings yet.
    pub fn new(limits: Limits) -> Sessions {
        Sessions {
            limits,
            by_port: PortMap::default(),
            held: PortMap::default(),
            paused: PortMap::default(),
            next_id: 0,
            next_flush_us: None,
            next_deadline_us: None,
            counters: Counters::default(),
            candidates: PortMap::default(),
            replaying: false,
            took: None,
            admitted: false,
            starts_by_source: edgerec_net::rate_limit::PerKey::new(
                limits.starts_per_source,
                10_000,
            ),
            starts_by_port: edgerec_net::rate_limit::PerKey::new(limits.starts_per_port, 10_000),
            refusing: None,
            refused_ports: PortMap::default(),
            siprec: siprec::SiprecState::default(),
        }
    }

    /// Whether recordings may start: `Some(reason)` while they may not (the spool is full,
    /// no usable key), `None` when they may again. The session is the one place a recording
    /// is admitted: a call that qualifies while this says no is refused (counted once, by
    /// reason, and never started), and the rest of it is dropped as `refused`; a call heard
    /// from after it goes quiet for the idle timeout, or after refusals end, is a new one.
    pub fn set_refusal(&mut self, reason: Option<&'static str>) {
        // Told at every message: the calls refused for a reason are let go once, when the
        // refusals end; aborted calls stay refused.
        if reason.is_none() && self.refusing.is_some() {
            self.refused_ports.retain(|_, r| !r.ends_with_refusals);
        }
        self.refusing = reason;
    }

    /// A recording the driver could not make after all (its package file could not be
    /// created): it ends at once as `spool_error`, nothing more is handed out for it, and
    /// the rest of its call is refused like one refused at its start.
    pub fn abort(&mut self, now: u64, rec: RecId) {
        if self.abort_siprec(rec) {
            return;
        }
        let Some(port) = self
            .by_port
            .iter()
            .find_map(|(p, r)| (r.id == rec).then_some(*p))
        else {
            return;
        };
        self.by_port.remove(&port);
        *self.counters.ended.entry("spool_error").or_default() += 1;
        self.refused_ports.insert(
            port,
            RefusedCall {
                last: now,
                ends_with_refusals: false,
            },
        );
        if !self.any_recording() {
            self.next_flush_us = None;
            self.next_deadline_us = self.candidate_deadline();
        }
    }

    /// Whether the call on `port` (no recording there) is one refused already: its datagram
    /// at `now` is dropped, and it stays refused until quiet for the idle timeout.
    fn refused_call(&mut self, now: u64, port: u16) -> bool {
        let idle = self.limits.idle_timeout_us;
        match self.refused_ports.get_mut(&port) {
            Some(r) if now.saturating_sub(r.last) < idle => {
                r.last = now;
                true
            }
            Some(_) => {
                self.refused_ports.remove(&port);
                false
            }
            None => false,
        }
    }

    /// Refuses the call on `port` if recordings may not start now: counts it once.
    fn refuse(&mut self, now: u64, port: u16) -> bool {
        let Some(reason) = self.refusing else {
            return false;
        };
        *self.counters.refused.entry(reason).or_default() += 1;
        self.refused_ports.insert(
            port,
            RefusedCall {
                last: now,
                ends_with_refusals: true,
            },
        );
        true
    }

    fn deadline(&self, r: &Recording) -> u64 {
        (r.last_rtp_us + self.limits.idle_timeout_us)
            .min(r.started_us + self.limits.max_recording_us)
    }

    fn note_deadline(&mut self, at: u64) {
        self.next_deadline_us = Some(self.next_deadline_us.map_or(at, |d| d.min(at)));
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Recordings in progress.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.by_port.len()
    }

    fn discard(&mut self, d: Discard) {
        self.discard_n(d, 1);
    }

    fn discard_n(&mut self, d: Discard, n: u64) {
        if n > 0 {
            *self.counters.dropped.entry(d.label()).or_default() += n;
        }
    }

    /// Whether a recording may start on `local` for `source` now: takes a start from both
    /// limits, or from neither.
    fn may_start(&mut self, now: u64, local: SocketAddr, source: SocketAddr) -> bool {
        let ms = now / 1000;
        let (port, ip) = (local.port(), source.ip());
        if !(self.starts_by_source.has_token(&ip, ms) && self.starts_by_port.has_token(&port, ms)) {
            return false;
        }
        self.starts_by_source.take(&ip, ms).is_ok() && self.starts_by_port.take(&port, ms).is_ok()
    }

    /// Holds an RTP datagram for a port with no recording; opens the recording (and records
    /// everything held) once one of its streams qualifies.
    fn candidate(
        &mut self,
        now: u64,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        h: crate::media::rtp::RtpHeader,
        out: &mut Vec<Action>,
    ) {
        let port = local.port();
        if datagram.len() > MAX_CANDIDATE_BYTES {
            return self.discard(Discard::NotAdmitted);
        }
        let paused = self.paused.contains_key(&port);
        let (mut not_admitted, mut rtcp_dropped) = (0u64, 0u64);
        let c = self.candidates.entry(port).or_default();
        let mine = |p: &Probe| p.ssrc == h.ssrc && p.from == remote;
        if let Some(i) = c.probes.iter().position(mine)
            && now >= c.probes[i].last_us + ADMISSION_WINDOW_US
        {
            // Silent for the window (not swept yet): it starts over.
            not_admitted += c.drop_probe(i);
        }
        if c.probes.iter().any(|p| mine(p) && p.max_seq == h.seq) {
            // A copy of the last packet: as a recording would, counted and not kept.
            self.counters.rtp_duplicates += 1;
            return self.discard_n(Discard::NotAdmitted, not_admitted);
        }
        let fresh = !c.probes.iter().any(mine);
        let run = c
            .probes
            .iter()
            .find(|p| mine(p))
            .map_or(1, |p| p.run_after(h.seq));
        // Room: refused if this stream alone fills the hold; else held RTCP goes first, then
        // the streams heard from longest ago (a call sends every 20 ms: junk must outpace
        // it to push it out).
        let (own, own_bytes) = c
            .held
            .iter()
            .filter(|x| x.ssrc == Some(h.ssrc) && x.from == remote)
            .fold((0, 0), |(n, b), x| (n + 1, b + x.data.len()));
        let refused =
            own >= MAX_CANDIDATE_PACKETS || own_bytes + datagram.len() > MAX_CANDIDATE_BYTES;
        while !refused && !c.fits(datagram.len()) {
            if let Some(i) = c.held.iter().position(|x| x.ssrc.is_none()) {
                rtcp_dropped += c.remove_held(i);
                continue;
            }
            let oldest = c
                .probes
                .iter()
                .enumerate()
                .filter(|(_, p)| !mine(p))
                .min_by_key(|(_, p)| p.last_us)
                .map(|(i, _)| i)
                .expect("what is held beyond this stream's own belongs to another");
            not_admitted += c.drop_probe(oldest);
        }
        if refused {
            not_admitted += 1;
        } else {
            match c.probes.iter_mut().find(|p| mine(p)) {
                Some(p) => p.advance(now, h.seq, run),
                None => c.probes.push(Probe {
                    ssrc: h.ssrc,
                    from: remote,
                    last_us: now,
                    max_seq: h.seq,
                    run: 1,
                    run_from_us: now,
                }),
            }
            c.hold(Held {
                at: now,
                port,
                from: remote,
                data: datagram.to_vec(),
                ssrc: Some(h.ssrc),
                paused,
            });
            self.took = Some(port);
        }
        if c.probes.is_empty() {
            rtcp_dropped += c.held.len() as u64;
            self.candidates.remove(&port);
        }
        self.discard_n(Discard::NotAdmitted, not_admitted);
        self.discard_n(Discard::RtcpWithoutRecording, rtcp_dropped);
        if refused {
            return;
        }
        if fresh {
            self.note_deadline(now + ADMISSION_WINDOW_US);
        }
        if run < self.limits.min_packets {
            return;
        }
        if self.refuse(now, port) {
            // A call, admitted, whose recording may not start: everything it held goes.
            let c = self.candidates.remove(&port).expect("held above");
            let n = c.held.len() as u64;
            self.took = None;
            return self.discard_n(Discard::Refused, n);
        }
        if !self.may_start(now, local, remote) {
            // Only this stream's datagrams go; the port's other streams stay on probation.
            let c = self.candidates.get_mut(&port).expect("held above");
            let i = c.probes.iter().position(mine).expect("advanced above");
            let n = c.drop_probe(i);
            let rtcp = c.probes.is_empty().then_some(c.held.len() as u64);
            if rtcp.is_some() {
                self.candidates.remove(&port);
            }
            self.took = None;
            self.discard_n(Discard::StartRate, n);
            self.discard_n(Discard::RtcpWithoutRecording, rtcp.unwrap_or(0));
            return;
        }
        let mut c = self.candidates.remove(&port).expect("held above");
        // What came more than the window before the qualifying run is not part of the call
        // (a stream that stayed on probation long, out of sequence): it is not recorded.
        let run_from = c
            .probes
            .iter()
            .find(|p| mine(p))
            .map_or(now, |p| p.run_from_us);
        let stale = c.drop_held(|x| x.at + ADMISSION_WINDOW_US < run_from);
        self.discard_n(Discard::NotAdmitted, stale);
        self.admit(now, local, c, out);
    }

    /// Opens the recording of a candidate that qualified and records what it held, in
    /// arrival order with their own times, pausing and resuming where the port was paused
    /// or resumed meanwhile.
    ///
    /// A BYE among them ends nothing while they are replayed (the recording would end
    /// before the call that made it qualify); if every stream said BYE by the end of the
    /// replay, the recording ends then.
    fn admit(&mut self, now: u64, local: SocketAddr, c: Candidate, out: &mut Vec<Action>) {
        let port = local.port();
        self.admitted = true;
        let first = c.held.iter().find(|x| x.ssrc.is_some());
        let first_us = first.map_or(now, |x| x.at);
        let source = first.map(|x| x.from.ip());
        self.open(
            first_us,
            local,
            None,
            source,
            first.is_some_and(|x| x.paused),
            out,
        );
        self.replaying = true;
        for x in c.held {
            if self
                .by_port
                .get(&port)
                .is_some_and(|r| r.paused != x.paused)
            {
                self.mark(x.at, port, x.paused, out);
            }
            let to = SocketAddr::new(local.ip(), x.port);
            self.handle(x.at, to, x.from, &x.data, out);
        }
        self.replaying = false;
        let paused = self.paused.contains_key(&port);
        if self.by_port.get(&port).is_some_and(|r| r.paused != paused) {
            self.mark(now, port, paused, out);
        }
        if self.by_port.get(&port).is_some_and(Recording::all_said_bye) {
            self.close(port, EndReason::RtcpBye, out);
        }
    }

    /// Holds RTCP for a candidate on its port or the port below (RTP+1); RTCP alone never
    /// makes a candidate.
    fn hold_rtcp(&mut self, now: u64, local: SocketAddr, remote: SocketAddr, datagram: &[u8]) {
        let port = local.port();
        let target = [Some(port), port.checked_sub(1)]
            .into_iter()
            .flatten()
            .find(|p| self.candidates.contains_key(p));
        let Some(target) = target else {
            return self.discard(Discard::RtcpWithoutRecording);
        };
        let paused = self.paused.contains_key(&target);
        let c = self.candidates.get_mut(&target).expect("found above");
        if c.held.iter().filter(|x| x.ssrc.is_none()).count() >= MAX_CANDIDATE_RTCP
            || !c.fits(datagram.len())
        {
            return self.discard(Discard::RtcpWithoutRecording);
        }
        c.hold(Held {
            at: now,
            port,
            from: remote,
            data: datagram.to_vec(),
            ssrc: None,
            paused,
        });
        self.took = Some(target);
    }

    /// Forgets the streams on probation that were silent for the window at `now` (all of
    /// them, at shutdown), counting their datagrams as not admitted, and the RTCP held as long.
    fn expire_candidates(&mut self, now: Option<u64>) {
        let due = |t: u64| now.is_none_or(|n| n >= t + ADMISSION_WINDOW_US);
        let (mut not_admitted, mut rtcp) = (0u64, 0u64);
        self.candidates.retain(|_, c| {
            let mut i = 0;
            while i < c.probes.len() {
                if due(c.probes[i].last_us) {
                    not_admitted += c.drop_probe(i);
                } else {
                    i += 1;
                }
            }
            if c.probes.is_empty() {
                rtcp += c.held.len() as u64;
                return false;
            }
            rtcp += c.drop_held(|x| x.ssrc.is_none() && due(x.at));
            true
        });
        self.discard_n(Discard::NotAdmitted, not_admitted);
        self.discard_n(Discard::RtcpWithoutRecording, rtcp);
    }

    /// When the first stream on probation goes silent for the window, if any is.
    fn candidate_deadline(&self) -> Option<u64> {
        self.candidates
            .values()
            .filter_map(Candidate::deadline)
            .min()
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        now: u64,
        local: SocketAddr,
        continues: Option<RecId>,
        source: Option<std::net::IpAddr>,
        paused: bool,
        out: &mut Vec<Action>,
    ) {
        let id = RecId(self.next_id);
        self.next_id += 1;
        self.counters.started += 1;
        out.push(Action::Open {
            rec: id,
            local,
            continues,
            source,
            started_us: now,
        });
        self.by_port
            .insert(local.port(), Recording::fresh(id, local, now));
        if paused {
            self.mark(now, local.port(), true, out);
        }
        for json in self.held.remove(&local.port()).unwrap_or_default() {
            self.tag(local.port(), json, out);
        }
        if self.next_flush_us.is_none() {
            self.next_flush_us = Some(now + self.limits.flush_interval_us);
        }
        self.note_deadline(
            (now + self.limits.idle_timeout_us).min(now + self.limits.max_recording_us),
        );
    }

    /// Appends an entry to a recording's pending chunk, handing out the chunk first if the
    /// entry would not fit. Returns false (nothing stored) if it can never fit.
    fn push(limits: &Limits, rec: &mut Recording, e: &Entry<'_>, out: &mut Vec<Action>) -> bool {
        let len = e.encoded_len();
        if len > limits.max_chunk || len - ENTRY_HEADER_LEN > usize::from(u16::MAX) {
            return false;
        }
        if rec.pending.len() + len > limits.max_chunk {
            hand_out(rec, out);
        }
        e.encode(&mut rec.pending)
            .expect("body length checked against u16 above");
        true
    }

    fn close(&mut self, port: u16, reason: EndReason, out: &mut Vec<Action>) -> Option<Recording> {
        let mut rec = self.by_port.remove(&port)?;
        self.finish(&mut rec, reason, out);
        Some(rec)
    }

    /// Ends a recording no longer in `by_port` (or SIPREC's calls): its last chunk, its
    /// end, its count; timers stop when it was the last.
    fn finish(&mut self, rec: &mut Recording, reason: EndReason, out: &mut Vec<Action>) {
        hand_out(rec, out);
        out.push(Action::Close {
            rec: rec.id,
            reason,
        });
        *self.counters.ended.entry(reason.name()).or_default() += 1;
        if !self.any_recording() {
            self.next_flush_us = None;
            // Candidates on other ports still expire on time.
            self.next_deadline_us = self.candidate_deadline();
        }
    }

    /// Ends a recording at the maximum duration and continues it at once in a new one that
    /// carries the same streams (announced again, so each package decodes alone).
    fn split(&mut self, now: u64, port: u16, out: &mut Vec<Action>) {
        let Some(old) = self.close(port, EndReason::MaxDuration, out) else {
            return;
        };
        if self.refuse(now, port) {
            // Its continuation may not start: the rest of the call is refused.
            return;
        }
        let paused = self.paused.contains_key(&port);
        self.open(now, old.local, Some(old.id), None, paused, out);
        for json in old.tags {
            self.tag(port, json, out);
        }
        let limits = self.limits;
        self.note_deadline(old.last_rtp_us + limits.idle_timeout_us);
        let rec = self.by_port.get_mut(&port).expect("just opened");
        rec.last_rtp_us = old.last_rtp_us;
        for (i, s) in old.streams.into_iter().enumerate() {
            let opened = Entry::StreamOpened {
                stream: u8::try_from(i).expect("at most 255 streams"),
                ssrc: s.ssrc,
                local: rec.local,
                remote: s.remote,
                payload_type: s.payload_type,
                label: "",
            };
            Self::push(&limits, rec, &opened, out);
            rec.streams.push(s);
        }
    }

    /// Pauses recording on `port` (a caller reads out card details): from now on its RTP is
    /// not stored, in the recording in progress and in any that starts there, until
    /// [`Sessions::resume`]. The pause is an event in the recording (stream
    /// [`NO_STREAM`]), so the export can say where the silence comes from.
    pub fn pause(&mut self, now: u64, port: u16, out: &mut Vec<Action>) -> PauseApplied {
        if self.paused.insert(port, ()).is_some() {
            return PauseApplied::Unchanged;
        }
        self.mark(now, port, true, out)
    }

    /// Resumes recording on `port`.
    pub fn resume(&mut self, now: u64, port: u16, out: &mut Vec<Action>) -> PauseApplied {
        if self.paused.remove(&port).is_none() {
            return PauseApplied::Unchanged;
        }
        self.mark(now, port, false, out)
    }

    /// Whether `port` is paused.
    #[cfg(test)]
    pub fn is_paused(&self, port: u16) -> bool {
        self.paused.contains_key(&port)
    }

    fn mark(&mut self, now: u64, port: u16, pause: bool, out: &mut Vec<Action>) -> PauseApplied {
        let limits = self.limits;
        let Some(rec) = self.by_port.get_mut(&port) else {
            return PauseApplied::Next;
        };
        rec.paused = pause;
        let e = Entry::Event {
            stream: NO_STREAM,
            time_us: now.saturating_sub(rec.started_us),
            event: if pause { Event::Pause } else { Event::Resume },
        };
        Self::push(&limits, rec, &e, out);
        PauseApplied::Now
    }

    /// Takes a metadata document (one JSON object) for the recording on `port`: written now
    /// if one is in progress (after the media before it), else held for the next recording
    /// there. A recording that continues another at the maximum duration carries its
    /// metadata again, so each package stands alone.
    pub fn metadata(&mut self, port: u16, json: Vec<u8>, out: &mut Vec<Action>) -> Tagged {
        if json.is_empty() || json.len() > self.limits.max_chunk {
            return Tagged::TooLarge;
        }
        if self.by_port.contains_key(&port) {
            self.tag(port, json, out);
            return Tagged::Now;
        }
        let held = self.held.entry(port).or_default();
        if held.len() >= MAX_HELD {
            return Tagged::TooManyHeld;
        }
        held.push(json);
        Tagged::Held
    }

    fn tag(&mut self, port: u16, json: Vec<u8>, out: &mut Vec<Action>) {
        let Some(rec) = self.by_port.get_mut(&port) else {
            return;
        };
        hand_out(rec, out);
        out.push(Action::Metadata {
            rec: rec.id,
            json: json.clone(),
        });
        rec.tags.push(json);
    }

    /// Takes one datagram that arrived at `local` from `remote` at monotonic time `now` (µs).
    pub fn handle(
        &mut self,
        now: u64,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<Action>,
    ) {
        self.took = None;
        if !self.replaying {
            self.admitted = false;
        }
        if self.is_siprec_port(local.port()) {
            return self.siprec_datagram(now, local, remote, datagram, out);
        }
        match classify(datagram) {
            Err(r) => self.discard(Discard::Malformed(r)),
            Ok(Datagram::Rtp(h)) => self.rtp(now, local, remote, datagram, h, out),
            Ok(Datagram::Rtcp(info)) => self.rtcp(now, local, remote, datagram, &info, out),
        }
    }

    fn rtp(
        &mut self,
        now: u64,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        h: crate::media::rtp::RtpHeader,
        out: &mut Vec<Action>,
    ) {
        if 1 + 8 + datagram.len() + ENTRY_HEADER_LEN > self.limits.max_chunk {
            return self.discard(Discard::TooLarge);
        }
        let port = local.port();
        if !self.by_port.contains_key(&port) && self.refused_call(now, port) {
            return self.discard(Discard::Refused);
        }
        match self.by_port.get(&port) {
            None if self.limits.min_packets > 1 => {
                return self.candidate(now, local, remote, datagram, h, out);
            }
            None => {
                if self.refuse(now, port) {
                    return self.discard(Discard::Refused);
                }
                if !self.may_start(now, local, remote) {
                    return self.discard(Discard::StartRate);
                }
                let paused = self.paused.contains_key(&port);
                self.open(now, local, None, Some(remote.ip()), paused, out)
            }
            Some(r) if now.saturating_sub(r.started_us) >= self.limits.max_recording_us => {
                self.split(now, port, out);
                if !self.by_port.contains_key(&port) {
                    // Its continuation was refused.
                    return self.discard(Discard::Refused);
                }
            }
            Some(_) => {}
        }
        let limits = self.limits;
        let rec = self.by_port.get_mut(&port).expect("opened above");
        rec.last_rtp_us = now;
        let t = now.saturating_sub(rec.started_us);
        let known = rec
            .streams
            .iter()
            .position(|s| s.ssrc == h.ssrc)
            .or_else(|| rec.streams.iter().position(|s| s.remote == remote));
        let mut fresh = true;
        let index = match known {
            Some(i) if rec.streams[i].ssrc == h.ssrc => {
                fresh = false;
                i
            }
            Some(i) => {
                // A new SSRC from the address of an open stream: the same leg, re-keyed.
                let s = &mut rec.streams[i];
                s.ssrc = h.ssrc;
                s.seq = SeqTracker::new(h.seq);
                s.said_bye = false;
                let change = Entry::Event {
                    stream: u8::try_from(i).expect("at most 255 streams"),
                    time_us: t,
                    event: Event::SsrcChange(h.ssrc),
                };
                Self::push(&limits, rec, &change, out);
                i
            }
            None => {
                if rec.streams.len() >= usize::from(NO_STREAM) {
                    return self.discard(Discard::TooManyStreams);
                }
                let i = rec.streams.len();
                rec.streams.push(Stream {
                    ssrc: h.ssrc,
                    remote,
                    payload_type: h.payload_type,
                    seq: SeqTracker::new(h.seq),
                    said_bye: false,
                });
                let opened = Entry::StreamOpened {
                    stream: u8::try_from(i).expect("fewer than 255 streams"),
                    ssrc: h.ssrc,
                    local,
                    remote,
                    payload_type: h.payload_type,
                    label: "",
                };
                Self::push(&limits, rec, &opened, out);
                i
            }
        };
        let stream = u8::try_from(index).expect("at most 255 streams");
        let outcome = if fresh {
            SeqOutcome::InOrder
        } else {
            rec.streams[index].seq.update(h.seq)
        };
        let paused = rec.paused;
        if !paused && !matches!(outcome, SeqOutcome::Duplicate) {
            self.took = Some(port);
        }
        let packet = Packet {
            stream,
            t,
            outcome,
            paused,
            bytes: datagram,
        };
        Self::take_rtp(&mut self.counters, &limits, rec, packet, out);
    }

    /// Records an RTP packet whose stream and sequence outcome are known: a gap is an
    /// event before it, a duplicate is counted and not stored, a paused one counted only.
    fn take_rtp(
        counters: &mut Counters,
        limits: &Limits,
        rec: &mut Recording,
        p: Packet<'_>,
        out: &mut Vec<Action>,
    ) {
        match p.outcome {
            SeqOutcome::Duplicate => {
                counters.rtp_duplicates += 1;
                return;
            }
            SeqOutcome::Gap { lost } => {
                counters.rtp_lost += u64::from(lost);
                let gap = Entry::Event {
                    stream: p.stream,
                    time_us: p.t,
                    event: Event::Gap(lost),
                };
                Self::push(limits, rec, &gap, out);
            }
            SeqOutcome::Reordered => {
                counters.rtp_reordered += 1;
                counters.rtp_lost = counters.rtp_lost.saturating_sub(1);
            }
            SeqOutcome::InOrder | SeqOutcome::Stray | SeqOutcome::Restart => {}
        }
        if p.paused {
            counters.rtp_paused += 1;
            return;
        }
        let entry = Entry::Rtp {
            stream: p.stream,
            arrival_us: p.t,
            packet: p.bytes,
        };
        Self::push(limits, rec, &entry, out);
        counters.rtp_packets += 1;
    }

    fn rtcp(
        &mut self,
        now: u64,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        info: &crate::media::rtp::RtcpInfo,
        out: &mut Vec<Action>,
    ) {
        if 1 + 8 + datagram.len() + ENTRY_HEADER_LEN > self.limits.max_chunk {
            return self.discard(Discard::TooLarge);
        }
        let port = local.port();
        let port = if self.by_port.contains_key(&port) {
            port
        } else {
            match port.checked_sub(1) {
                Some(p) if self.by_port.contains_key(&p) => p,
                _ => return self.hold_rtcp(now, local, remote, datagram),
            }
        };
        let limits = self.limits;
        let rec = self.by_port.get_mut(&port).expect("checked above");
        let stream = info
            .sender_ssrc
            .and_then(|ssrc| rec.streams.iter().position(|s| s.ssrc == ssrc))
            .map_or(NO_STREAM, |i| u8::try_from(i).expect("at most 255 streams"));
        let entry = Entry::Rtcp {
            stream,
            arrival_us: now.saturating_sub(rec.started_us),
            packet: datagram,
        };
        Self::push(&limits, rec, &entry, out);
        self.took = Some(port);
        self.counters.rtcp_packets += 1;
        for ssrc in &info.bye {
            if let Some(s) = rec.streams.iter_mut().find(|s| s.ssrc == *ssrc) {
                s.said_bye = true;
            }
        }
        if !info.bye.is_empty() && !self.replaying && rec.all_said_bye() {
            self.close(port, EndReason::RtcpBye, out);
        }
    }

    /// The port whose recording or candidate took the datagram [`Sessions::handle`] was last
    /// given (stored, or held until its call is admitted); `None` if it was counted and
    /// dropped (malformed, a duplicate, paused, refused, over a limit) or is a SIPREC
    /// session's. The driver's datagram journal notes it.
    pub fn took(&self) -> Option<u16> {
        self.took
    }

    /// Whether the datagram [`Sessions::handle`] was last given admitted a candidate: the
    /// datagrams it held (read earlier) were recorded then, and a chunk handed out meanwhile
    /// may leave some of them pending.
    pub fn admitted(&self) -> bool {
        self.admitted
    }

    /// What holds media on `port` in memory: its recording, a candidate, or nothing.
    pub fn holding(&self, port: u16) -> Holding {
        if self.by_port.contains_key(&port) {
            Holding::Recording
        } else if self.candidates.contains_key(&port) {
            Holding::Candidate
        } else {
            Holding::Nothing
        }
    }

    /// When [`Sessions::handle_timeout`] must run next (µs), if anything is in progress.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.next_deadline_us
            .into_iter()
            .chain(self.next_flush_us)
            .min()
    }

    /// Candidates waiting to become recordings (for the tests and the gauges).
    #[cfg(test)]
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Ends idle recordings, splits those at the maximum duration, and at each flush tick
    /// hands out every pending chunk followed by one [`Action::Sync`].
    pub fn handle_timeout(&mut self, now: u64, out: &mut Vec<Action>) {
        let mut idle: Vec<u16> = Vec::new();
        let mut long: Vec<u16> = Vec::new();
        let due = self.next_deadline_us.is_some_and(|d| now >= d);
        if due {
            self.next_deadline_us = None;
            self.expire_candidates(Some(now));
            if let Some(d) = self.candidate_deadline() {
                self.note_deadline(d.max(now + CANDIDATE_SWEEP_US));
            }
            for (port, r) in &self.by_port {
                if now >= r.last_rtp_us + self.limits.idle_timeout_us {
                    idle.push(*port);
                } else if now >= r.started_us + self.limits.max_recording_us {
                    long.push(*port);
                }
            }
            // The exact next deadline of the recordings that go on (those split below note
            // their own when they reopen).
            let next = self
                .by_port
                .values()
                .filter(|r| {
                    now < r.last_rtp_us + self.limits.idle_timeout_us
                        && now < r.started_us + self.limits.max_recording_us
                })
                .map(|r| self.deadline(r))
                .chain(self.siprec_deadline(now))
                .min();
            self.next_deadline_us = match (next, self.next_deadline_us) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        idle.sort_unstable();
        long.sort_unstable();
        let mut wrote = !idle.is_empty() || !long.is_empty();
        if due {
            // SIPREC recordings at their maximum duration (they note their next deadline).
            wrote |= self.siprec_split_due(now, out);
        }
        for port in idle {
            self.close(port, EndReason::IdleTimeout, out);
        }
        for port in long {
            self.split(now, port, out);
        }
        if self.next_flush_us.is_some_and(|t| now >= t) {
            let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
            ports.sort_unstable();
            for port in ports {
                let rec = self.by_port.get_mut(&port).expect("listed above");
                wrote |= hand_out(rec, out);
            }
            wrote |= self.siprec_flush(out);
            self.next_flush_us = self
                .any_recording()
                .then_some(now + self.limits.flush_interval_us);
        }
        if wrote {
            out.push(Action::Sync);
        }
    }

    /// Ends every recording (reason shutdown), then one sync. Candidates are counted as not
    /// admitted.
    pub fn shutdown(&mut self, out: &mut Vec<Action>) {
        self.expire_candidates(None);
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        for port in ports {
            self.close(port, EndReason::Shutdown, out);
        }
        self.siprec_shutdown(out);
        out.push(Action::Sync);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use erec::entries::entries;

    const MS: u64 = 1000;

    const FREE: edgerec_net::rate_limit::Limit = edgerec_net::rate_limit::Limit {
        rate: 1e9,
        burst: 1e9,
    };

    fn limits() -> Limits {
        Limits {
            idle_timeout_us: 5000 * MS,
            max_recording_us: 60_000 * MS,
            flush_interval_us: 1000 * MS,
            max_chunk: 4096,
            min_packets: 1,
            starts_per_source: FREE,
            starts_per_port: FREE,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
        let mut p = vec![0x80, 0];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(&[0xff; 160]);
        p
    }

    fn bye(ssrc: u32) -> Vec<u8> {
        let mut p = vec![0x81, 203, 0, 1];
        p.extend_from_slice(&ssrc.to_be_bytes());
        p
    }

    /// Drives the machine and keeps what a driver would: the chunks of each recording.
    struct Harness {
        s: Sessions,
        actions: Vec<Action>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(limits())
        }

        fn with(l: Limits) -> Self {
            Harness {
                s: Sessions::new(l),
                actions: Vec::new(),
            }
        }

        fn send(&mut self, now: u64, port: u16, from: &str, d: &[u8]) {
            let local = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
            self.s.handle(now, local, addr(from), d, &mut self.actions);
        }

        fn tick_until(&mut self, until: u64) {
            while let Some(t) = self.s.poll_timeout() {
                if t > until {
                    break;
                }
                self.s.handle_timeout(t, &mut self.actions);
            }
        }

        /// Packets `seqs` of a stream, 20 ms apart from `at`.
        fn call(&mut self, at: u64, port: u16, from: &str, ssrc: u32, seqs: std::ops::Range<u16>) {
            let first = seqs.start;
            for seq in seqs {
                self.send(
                    at + u64::from(seq - first) * 20 * MS,
                    port,
                    from,
                    &rtp(seq, ssrc),
                );
            }
        }

        /// When each recording's entry times start.
        fn started(&self) -> Vec<u64> {
            self.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Open { started_us, .. } => Some(*started_us),
                    _ => None,
                })
                .collect()
        }

        fn opens(&self) -> Vec<(RecId, Option<RecId>)> {
            self.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Open { rec, continues, .. } => Some((*rec, *continues)),
                    _ => None,
                })
                .collect()
        }

        fn closes(&self) -> Vec<(RecId, EndReason)> {
            self.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Close { rec, reason } => Some((*rec, *reason)),
                    _ => None,
                })
                .collect()
        }

        /// Every entry of a recording, as (type, stream, detail) for easy comparison.
        fn entries_of(&self, rec: RecId) -> Vec<(u8, u8, u64)> {
            let mut v = Vec::new();
            for a in &self.actions {
                if let Action::Chunk { rec: r, plaintext } = a {
                    assert!(plaintext.len() <= limits().max_chunk);
                    if *r != rec {
                        continue;
                    }
                    for e in entries(plaintext) {
                        v.push(match e.unwrap() {
                            Entry::StreamOpened { stream, ssrc, .. } => {
                                (1, stream, u64::from(ssrc))
                            }
                            Entry::Rtp { stream, packet, .. } => (
                                2,
                                stream,
                                u64::from(u16::from_be_bytes([packet[2], packet[3]])),
                            ),
                            Entry::Event { stream, event, .. } => match event {
                                Event::Gap(n) => (3, stream, u64::from(n)),
                                Event::SsrcChange(s) => (30, stream, u64::from(s)),
                                Event::Pause => (32, stream, 0),
                                Event::Resume => (33, stream, 0),
                            },
                            Entry::Rtcp { stream, .. } => (4, stream, 0),
                        });
                    }
                }
            }
            v
        }
    }

    #[test]
    fn a_paused_port_stores_no_media_until_resumed_and_the_recording_says_so() {
        let mut h = Harness::new();
        // 8 s of a call; paused from 100 ms to 7 s, longer than the idle timeout.
        for i in 0..400u16 {
            let t = u64::from(i) * 20 * MS;
            if i == 5 {
                assert_eq!(h.s.pause(t, 40000, &mut h.actions), PauseApplied::Now);
                assert_eq!(h.s.pause(t, 40000, &mut h.actions), PauseApplied::Unchanged);
                assert!(h.s.is_paused(40000));
            }
            if i == 350 {
                assert_eq!(h.s.resume(t, 40000, &mut h.actions), PauseApplied::Now);
            }
            h.send(t, 40000, "10.0.0.1:5000", &rtp(i, 0xA));
        }
        assert_eq!(h.s.counters().rtp_paused, 345);
        assert_eq!(h.s.counters().rtp_lost, 0, "a pause is not loss");
        // A pause for a port with no recording: the next one there starts paused.
        assert_eq!(
            h.s.pause(8_000 * MS, 40002, &mut h.actions),
            PauseApplied::Next
        );
        for i in 0..10u16 {
            let t = 8_000 * MS + u64::from(i) * 20 * MS;
            if i == 5 {
                assert_eq!(h.s.resume(t, 40002, &mut h.actions), PauseApplied::Now);
            }
            h.send(t, 40002, "10.0.0.2:5000", &rtp(i, 0xB));
        }
        assert_eq!(
            h.s.resume(9_000 * MS, 40002, &mut h.actions),
            PauseApplied::Unchanged
        );
        h.tick_until(20_000 * MS);
        assert_eq!(
            h.closes(),
            vec![
                (RecId(0), EndReason::IdleTimeout),
                (RecId(1), EndReason::IdleTimeout)
            ],
            "the paused call did not end idle"
        );
        let mut want = vec![(1, 0, 0xA)];
        want.extend((0..5).map(|i| (2, 0, i)));
        want.push((32, NO_STREAM, 0));
        want.push((33, NO_STREAM, 0));
        want.extend((350..400).map(|i| (2, 0, i)));
        assert_eq!(h.entries_of(RecId(0)), want);
        let mut want = vec![(32, NO_STREAM, 0), (1, 0, 0xB), (33, NO_STREAM, 0)];
        want.extend((5..10).map(|i| (2, 0, i)));
        assert_eq!(h.entries_of(RecId(1)), want);
    }

    fn admitting(min_packets: usize, per_source: f64, per_port: f64) -> Limits {
        let rate = |r: f64| edgerec_net::rate_limit::Limit { rate: r, burst: r };
        Limits {
            min_packets,
            starts_per_source: rate(per_source),
            starts_per_port: rate(per_port),
            ..limits()
        }
    }

    /// What the driver's crash journal is told of each datagram: the port whose recording
    /// or candidate took it, or none when it was counted and dropped.
    #[test]
    fn each_datagram_is_owned_by_the_port_that_holds_it_or_by_none() {
        let mut h = Harness::with(admitting(3, 1e9, 1e9));
        let from = "10.0.0.1:5000";
        h.send(0, 40_000, from, &rtp(1, 7));
        assert_eq!(h.s.took(), Some(40_000), "held by the candidate");
        assert_eq!(h.s.holding(40_000), Holding::Candidate);
        h.send(5 * MS, 40_001, "10.0.0.1:5001", &bye(8));
        assert_eq!(h.s.took(), Some(40_000), "RTCP held for the port below");
        h.send(20 * MS, 40_000, from, &rtp(2, 7));
        h.send(40 * MS, 40_000, from, &rtp(3, 7));
        assert_eq!(h.s.took(), Some(40_000), "admitted: in the recording");
        assert_eq!(h.s.holding(40_000), Holding::Recording);
        h.send(60 * MS, 40_000, from, &rtp(3, 7));
        assert_eq!(h.s.took(), None, "a duplicate is dropped");
        h.send(60 * MS, 40_000, from, &[0x80, 0]);
        assert_eq!(h.s.took(), None, "malformed");
        h.send(80 * MS, 40_000, from, &rtp(4, 7));
        assert_eq!(h.s.took(), Some(40_000));
        assert_eq!(h.s.holding(40_002), Holding::Nothing);
    }

    /// `copies` of one RTP packet and a BYE to each of `ports` ports, a millisecond apart.
    fn spoof(h: &mut Harness, ports: u16, copies: usize) {
        for port in 0..ports {
            let (at, to) = (u64::from(port) * MS, 40000 + port);
            for _ in 0..copies {
                h.send(at, to, "10.0.0.66:4000", &rtp(1, 9));
            }
            h.send(at, to, "10.0.0.66:4001", &bye(9));
        }
    }

    #[test]
    fn a_candidate_expires_on_time_after_the_last_recording_ends() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        for i in 0..3u16 {
            h.send(u64::from(i) * MS, 40000, "10.0.0.5:4000", &rtp(i, 7));
        }
        assert_eq!(h.opens().len(), 1);
        // A lone packet on another port just before the recording goes idle.
        h.send(4_990 * MS, 40002, "10.0.0.66:4000", &rtp(1, 9));
        h.tick_until(20_000 * MS);
        assert_eq!(
            h.s.candidates(),
            0,
            "the candidate's deadline survived the close"
        );
        assert_eq!(h.s.counters().dropped.get("not_admitted"), Some(&1));
    }

    #[test]
    fn spoofed_datagrams_make_no_package_and_an_admitted_call_loses_nothing() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        // Before: one RTP datagram and a BYE made a package, on every port, 3,000 in 2.4 s.
        spoof(&mut h, 200, 1);
        h.tick_until(2_000 * MS);
        assert!(h.opens().is_empty(), "no package for a packet");
        let c = h.s.counters();
        assert_eq!(c.dropped.get("not_admitted"), Some(&200));
        assert_eq!(c.dropped.get("rtcp_without_recording"), Some(&200));
        assert_eq!(
            h.s.candidates(),
            0,
            "every candidate forgotten after its second"
        );
        // A real call: recorded from its first packet once its third arrived.
        for seq in 0..5u16 {
            h.send(
                3_000 * MS + u64::from(seq) * 20 * MS,
                40000,
                "10.0.0.5:5000",
                &rtp(seq, 7),
            );
        }
        let opens = h.opens();
        assert_eq!(opens.len(), 1);
        h.s.shutdown(&mut h.actions);
        let got = h.entries_of(opens[0].0);
        let seqs: Vec<u64> = got.iter().filter(|e| e.0 == 2).map(|e| e.2).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4], "the held packets are in it: {got:?}");
        // Its times run from its first packet.
        let first = h.actions.iter().find_map(|a| match a {
            Action::Chunk { plaintext, .. } => entries(plaintext).find_map(|e| match e.unwrap() {
                Entry::Rtp { arrival_us, .. } => Some(arrival_us),
                _ => None,
            }),
            _ => None,
        });
        assert_eq!(first, Some(0));
    }

    fn rtp_seqs(h: &Harness, rec: RecId) -> Vec<u64> {
        h.entries_of(rec)
            .iter()
            .filter(|e| e.0 == 2)
            .map(|e| e.2)
            .collect()
    }

    #[test]
    fn copies_of_one_packet_are_not_a_stream() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        // Three copies of one packet and a BYE, on each port (made a package each before
        // sequence numbers counted).
        spoof(&mut h, 50, 3);
        // Nor is a run broken by a jump.
        for seq in [1u16, 2, 7, 8] {
            h.send(100 * MS, 40100, "10.0.0.66:4000", &rtp(seq, 9));
        }
        h.tick_until(3_000 * MS);
        assert!(h.opens().is_empty());
        let c = h.s.counters();
        assert_eq!(c.dropped.get("not_admitted"), Some(&54));
        assert_eq!(c.rtp_duplicates, 100, "copies are counted, not held");
        assert_eq!(c.dropped.get("rtcp_without_recording"), Some(&50));
        assert_eq!(h.s.candidates(), 0);
    }

    #[test]
    fn junk_filling_a_port_cannot_lock_a_real_call_out() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        let junk = |h: &mut Harness, at: u64, n: u32| {
            for i in 0..n {
                h.send(at, 40000, "10.0.0.66:4000", &rtp(1, 1000 + i));
            }
        };
        junk(&mut h, 0, 64);
        // A call starts while the port is full, and fresh junk keeps coming between its
        // packets.
        for seq in 0..3u16 {
            h.send(
                10 * MS + u64::from(seq) * 20 * MS,
                40000,
                "10.0.0.5:5000",
                &rtp(seq, 7),
            );
            let at = 11 * MS + u64::from(seq) * 20 * MS;
            for i in 0..60 {
                h.send(
                    at,
                    40000,
                    "10.0.0.66:4000",
                    &rtp(1, 2000 + u32::from(seq) * 100 + i),
                );
            }
        }
        assert_eq!(h.opens().len(), 1);
        h.s.shutdown(&mut h.actions);
        let e = h.entries_of(h.opens()[0].0);
        let real = e
            .iter()
            .find(|x| x.0 == 1 && x.2 == 7)
            .expect("the call's stream")
            .1;
        let seqs: Vec<u64> = e
            .iter()
            .filter(|x| x.0 == 2 && x.1 == real)
            .map(|x| x.2)
            .collect();
        assert_eq!(seqs, [0, 1, 2], "the call whole");
        // Memory stayed bounded, in datagrams and in bytes, whatever their size.
        let mut h = Harness::with(Limits {
            max_chunk: 65536,
            ..admitting(3, 1000.0, 5.0)
        });
        let mut big = rtp(1, 9);
        big.resize(9000, 0);
        for i in 0..100u32 {
            big[8..12].copy_from_slice(&i.to_be_bytes());
            h.send(0, 40000, "10.0.0.66:4000", &big);
            let c = &h.s.candidates[&40000];
            assert!(c.bytes <= MAX_CANDIDATE_BYTES && c.held.len() <= MAX_CANDIDATE_PACKETS);
        }
        assert_eq!(h.s.counters().dropped.get("not_admitted"), Some(&99));
    }

    #[test]
    fn a_bye_held_with_a_call_ends_nothing_while_it_is_replayed() {
        // Spoofed RTP + BYE, then a call within the second: one recording, the call's,
        // which the BYE (of another SSRC) does not end.
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        spoof(&mut h, 1, 1);
        h.call(10 * MS, 40000, "10.0.0.5:5000", 7, 0..3);
        assert_eq!(h.opens().len(), 1);
        assert!(h.closes().is_empty(), "{:?}", h.closes());
        // The call's own BYE ends it.
        h.send(100 * MS, 40000, "10.0.0.5:5001", &bye(7));
        assert_eq!(h.closes(), [(RecId(0), EndReason::RtcpBye)]);
        // A BYE that outlived its stray stream: the recording starts at the call's first
        // packet, not at the BYE, and is not ended by the next BYE of nobody.
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        h.send(0, 40002, "10.0.0.66:4000", &rtp(1, 9));
        h.send(500 * MS, 40002, "10.0.0.66:4001", &bye(9));
        for seq in 0..3u16 {
            let at = 900 * MS + u64::from(seq) * 100 * MS;
            h.tick_until(at);
            h.send(at, 40002, "10.0.0.5:5000", &rtp(seq, 7));
        }
        assert_eq!(h.started()[0], 900 * MS);
        h.send(1_200 * MS, 40002, "10.0.0.66:4001", &bye(9));
        assert!(h.closes().is_empty());
    }

    #[test]
    fn junk_in_sequence_cannot_lock_a_call_out_either() {
        // 32 streams of two packets in sequence fill the hold; a call that starts among
        // them pushes out the junk heard from longest ago.
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        for i in 0..32u32 {
            h.send(0, 40000, "10.0.0.66:4000", &rtp(0, 100 + i));
            h.send(0, 40000, "10.0.0.66:4000", &rtp(1, 100 + i));
        }
        h.call(10 * MS, 40000, "10.0.0.5:5000", 7, 0..3);
        assert_eq!(h.opens().len(), 1);
        // A stream out of sequence for seconds, then in sequence: what it sent more than
        // the window before its run is not recorded ahead of the call.
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        for i in 0..10u16 {
            h.send(
                u64::from(i) * 500 * MS,
                40000,
                "10.0.0.5:5000",
                &rtp(i * 2, 7),
            );
        }
        for seq in 100..103u16 {
            h.send(
                5_000 * MS + u64::from(seq) * MS,
                40000,
                "10.0.0.5:5000",
                &rtp(seq, 7),
            );
        }
        assert_eq!(h.started()[0], 4_500 * MS);
        assert_eq!(h.s.counters().dropped.get("not_admitted"), Some(&9));
    }

    #[test]
    fn a_stray_packet_does_not_shorten_a_later_calls_window() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        h.send(0, 40000, "10.0.0.66:4000", &rtp(1, 9));
        // A call whose first packets straddle the stray one's second.
        for (seq, ms) in [(0u16, 980u64), (1, 1_000), (2, 1_020), (3, 1_040)] {
            h.tick_until(ms * MS);
            h.send(ms * MS, 40000, "10.0.0.5:5000", &rtp(seq, 7));
        }
        let opens = h.opens();
        assert_eq!(opens.len(), 1);
        h.s.shutdown(&mut h.actions);
        assert_eq!(rtp_seqs(&h, opens[0].0), [0, 1, 2, 3]);
        // Its creation time is its first packet's arrival (held meanwhile), not the open.
        assert_eq!(h.started()[0], 980 * MS);
    }

    #[test]
    fn a_pause_or_resume_while_a_port_is_a_candidate_applies_where_it_happened() {
        // Three packets of a call at 1, 20 and 40 ms; the port paused (or resumed) at 30 ms,
        // when it was still a candidate.
        let call = |paused_before: bool| {
            let mut h = Harness::with(admitting(3, 1000.0, 5.0));
            if paused_before {
                assert_eq!(h.s.pause(0, 40000, &mut h.actions), PauseApplied::Next);
            }
            h.send(MS, 40000, "10.0.0.5:5000", &rtp(0, 7));
            h.send(20 * MS, 40000, "10.0.0.5:5000", &rtp(1, 7));
            if paused_before {
                h.s.resume(30 * MS, 40000, &mut h.actions);
            } else {
                h.s.pause(30 * MS, 40000, &mut h.actions);
            }
            h.send(40 * MS, 40000, "10.0.0.5:5000", &rtp(2, 7));
            h.s.shutdown(&mut h.actions);
            let events: Vec<u64> = h
                .actions
                .iter()
                .filter_map(|a| match a {
                    Action::Chunk { plaintext, .. } => Some(entries(plaintext)),
                    _ => None,
                })
                .flatten()
                .filter_map(|e| match e.unwrap() {
                    Entry::Event { time_us, .. } => Some(time_us),
                    _ => None,
                })
                .collect();
            (
                h.entries_of(h.opens()[0].0),
                h.s.counters().rtp_paused,
                events,
            )
        };
        // Resumed: what came while paused is not stored (it was before: the recording
        // opened unpaused and took it).
        let (entries, paused, at) = call(true);
        assert_eq!(
            entries,
            [(32, NO_STREAM, 0), (1, 0, 7), (33, NO_STREAM, 0), (2, 0, 2)]
        );
        assert_eq!((paused, at), (2, vec![0, 39 * MS]));
        // Paused: what came before is stored, the pause follows (it was at 0, and took it).
        let (entries, paused, at) = call(false);
        assert_eq!(
            entries,
            [(1, 0, 7), (2, 0, 0), (2, 0, 1), (32, NO_STREAM, 0)]
        );
        assert_eq!((paused, at), (1, vec![39 * MS]), "at the packet after it");
    }

    #[test]
    fn rtcp_while_a_port_is_a_candidate_is_recorded_once_it_starts() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        h.send(0, 40000, "10.0.0.5:5000", &rtp(0, 7));
        h.send(5 * MS, 40001, "10.0.0.5:5001", &bye(8));
        h.send(20 * MS, 40000, "10.0.0.5:5000", &rtp(1, 7));
        h.send(40 * MS, 40000, "10.0.0.5:5000", &rtp(2, 7));
        h.s.shutdown(&mut h.actions);
        assert_eq!(h.s.counters().rtcp_packets, 1);
        assert!(h.s.counters().dropped.is_empty());
    }

    #[test]
    fn a_start_over_the_rate_drops_only_that_stream() {
        let mut h = Harness::with(admitting(3, 1.0, 100.0));
        for seq in 0..3u16 {
            h.send(u64::from(seq) * MS, 40000, "10.0.0.1:5000", &rtp(seq, 1));
        }
        assert_eq!(h.opens().len(), 1, "10.0.0.1 has used its start");
        // On another port, a leg from 10.0.0.2 (two packets so far) and one from 10.0.0.1.
        h.send(10 * MS, 40002, "10.0.0.2:5000", &rtp(0, 2));
        h.send(11 * MS, 40002, "10.0.0.2:5000", &rtp(1, 2));
        for seq in 0..3u16 {
            h.send(
                12 * MS + u64::from(seq),
                40002,
                "10.0.0.1:5000",
                &rtp(seq, 3),
            );
        }
        assert_eq!(h.opens().len(), 1);
        assert_eq!(h.s.counters().dropped.get("start_rate"), Some(&3));
        // The other leg qualifies on its own source's limit, with both its packets.
        h.send(30 * MS, 40002, "10.0.0.2:5000", &rtp(2, 2));
        assert_eq!(h.opens().len(), 2);
        h.s.shutdown(&mut h.actions);
        assert_eq!(rtp_seqs(&h, h.opens()[1].0), [0, 1, 2]);
    }

    #[test]
    fn one_packet_each_of_many_ssrcs_never_makes_a_recording() {
        let mut h = Harness::with(admitting(3, 1000.0, 5.0));
        // Spoofed starts on one port, a new SSRC each: held up to the bound, never admitted.
        for i in 0..500u32 {
            h.send(u64::from(i) * MS, 40000, "10.0.0.66:4000", &rtp(1, 100 + i));
        }
        assert!(h.opens().is_empty());
        // A real stream among them still starts at its third packet, with all three held.
        h.send(600 * MS, 40001, "10.0.0.66:4000", &rtp(1, 900));
        h.call(601 * MS, 40001, "10.0.0.5:5000", 7, 0..3);
        assert_eq!(h.opens().len(), 1);
        h.tick_until(5_000 * MS);
        h.s.shutdown(&mut h.actions);
        assert_eq!(h.s.counters().dropped.get("not_admitted"), Some(&500));
        assert_eq!(
            h.s.counters().rtp_packets,
            4,
            "the stray one on its port went in too"
        );
    }

    #[test]
    fn starts_are_limited_per_port_and_per_source() {
        let rate = |rate: f64, burst: f64| edgerec_net::rate_limit::Limit { rate, burst };
        let mut h = Harness::with(Limits {
            min_packets: 3,
            starts_per_source: rate(1.0, 3.0),
            starts_per_port: rate(1.0, 2.0),
            ..limits()
        });
        let call = |h: &mut Harness, at: u64, port: u16, from: &str| {
            for seq in 0..3u16 {
                h.send(at + u64::from(seq) * 20 * MS, port, from, &rtp(seq, 7));
            }
            h.send(at + 60 * MS, port, from, &bye(7));
        };
        // Three calls one after another on one port within a second: the third is over.
        call(&mut h, 0, 40000, "10.0.0.1:5000");
        call(&mut h, 100 * MS, 40000, "10.0.0.1:5000");
        call(&mut h, 200 * MS, 40000, "10.0.0.2:5000");
        assert_eq!(h.opens().len(), 2);
        assert_eq!(h.s.counters().dropped.get("start_rate"), Some(&3));
        // One source over three ports: its fourth start in the second is over (the first
        // port's two count too).
        call(&mut h, 300 * MS, 40001, "10.0.0.1:5000");
        call(&mut h, 400 * MS, 40002, "10.0.0.1:5000");
        assert_eq!(h.opens().len(), 3);
        assert_eq!(h.s.counters().dropped.get("start_rate"), Some(&6));
        // A second later both have refilled.
        call(&mut h, 1_500 * MS, 40002, "10.0.0.1:5000");
        assert_eq!(h.opens().len(), 4);
    }

    #[test]
    fn two_legs_on_one_port_are_one_recording_ending_idle() {
        let mut h = Harness::new();
        for i in 0..10u16 {
            h.send(u64::from(i) * 20 * MS, 40000, "10.0.0.1:5000", &rtp(i, 0xA));
            h.send(
                u64::from(i) * 20 * MS + 1,
                40000,
                "10.0.0.2:6000",
                &rtp(100 + i, 0xB),
            );
        }
        h.tick_until(10_000 * MS);
        let rec = RecId(0);
        assert_eq!(h.opens(), vec![(rec, None)]);
        assert_eq!(h.closes(), vec![(rec, EndReason::IdleTimeout)]);
        let e = h.entries_of(rec);
        assert_eq!(e[0], (1, 0, 0xA));
        assert_eq!(e[1], (2, 0, 0));
        assert_eq!(e[2], (1, 1, 0xB));
        assert_eq!(e.iter().filter(|x| x.0 == 2).count(), 20);
        assert_eq!(h.s.counters().rtp_packets, 20);
        // Flush ticks came with a sync each; the close came after the last chunk.
        let last_chunk = h
            .actions
            .iter()
            .rposition(|a| matches!(a, Action::Chunk { .. }));
        let close = h
            .actions
            .iter()
            .position(|a| matches!(a, Action::Close { .. }));
        assert!(last_chunk < close);
        assert!(h.actions.contains(&Action::Sync));
        assert_eq!(h.s.active(), 0);
        assert_eq!(h.s.poll_timeout(), None);
    }

    #[test]
    fn loss_reorder_duplicates_are_recorded_and_counted() {
        let mut h = Harness::new();
        for (i, seq) in [1u16, 2, 5, 4, 4, 6].into_iter().enumerate() {
            h.send(i as u64 * 20 * MS, 40000, "10.0.0.1:5000", &rtp(seq, 7));
        }
        h.s.shutdown(&mut h.actions);
        let e = h.entries_of(RecId(0));
        let kinds: Vec<_> = e.iter().map(|x| (x.0, x.2)).collect();
        assert_eq!(
            kinds,
            vec![(1, 7), (2, 1), (2, 2), (3, 2), (2, 5), (2, 4), (2, 6)],
            "gap of 2 before 5, late 4 stored once, duplicate 4 dropped"
        );
        let c = h.s.counters();
        assert_eq!(
            (c.rtp_packets, c.rtp_lost, c.rtp_reordered, c.rtp_duplicates),
            (5, 1, 1, 1)
        );
        assert_eq!(h.closes(), vec![(RecId(0), EndReason::Shutdown)]);
    }

    #[test]
    fn ssrc_change_from_the_same_address_stays_one_stream() {
        let mut h = Harness::new();
        h.send(0, 40000, "10.0.0.1:5000", &rtp(1, 0xA));
        h.send(20 * MS, 40000, "10.0.0.1:5000", &rtp(900, 0xC));
        h.send(40 * MS, 40000, "10.0.0.1:5000", &rtp(901, 0xC));
        h.send(60 * MS, 40000, "10.0.0.9:5000", &rtp(1, 0xD));
        h.s.shutdown(&mut h.actions);
        let e = h.entries_of(RecId(0));
        assert_eq!(
            e,
            vec![
                (1, 0, 0xA),
                (2, 0, 1),
                (30, 0, 0xC),
                (2, 0, 900),
                (2, 0, 901),
                (1, 1, 0xD),
                (2, 1, 1)
            ]
        );
        assert_eq!(h.s.counters().rtp_lost, 0, "an SSRC change is no loss");
    }

    #[test]
    fn rtcp_goes_to_the_recording_below_and_bye_ends_it() {
        let mut h = Harness::new();
        h.send(0, 40001, "10.0.0.1:5001", &bye(0xA));
        assert_eq!(
            h.s.counters().dropped["rtcp_without_recording"],
            1,
            "RTCP opens nothing"
        );
        assert!(h.opens().is_empty());
        h.send(0, 40000, "10.0.0.1:5000", &rtp(1, 0xA));
        h.send(MS, 40000, "10.0.0.2:5000", &rtp(1, 0xB));
        h.send(2 * MS, 40001, "10.0.0.1:5001", &bye(0xA));
        assert!(h.closes().is_empty(), "one leg said BYE, the other goes on");
        h.send(3 * MS, 40000, "10.0.0.2:5001", &bye(0xB));
        assert_eq!(h.closes(), vec![(RecId(0), EndReason::RtcpBye)]);
        let e = h.entries_of(RecId(0));
        assert!(e.contains(&(4, 0, 0)) && e.contains(&(4, 1, 0)));
        assert_eq!(h.s.counters().rtcp_packets, 2);
    }

    #[test]
    fn max_duration_splits_into_a_continuation_with_the_same_streams() {
        let mut h = Harness::new();
        let mut t = 0;
        for i in 0..3001u16 {
            t = u64::from(i) * 20 * MS;
            h.send(t, 40000, "10.0.0.1:5000", &rtp(i, 0xA));
        }
        // 60 s at 20 ms: the packet at 60 000 ms starts the continuation.
        assert_eq!(
            h.opens(),
            vec![(RecId(0), None), (RecId(1), Some(RecId(0)))]
        );
        assert_eq!(h.closes(), vec![(RecId(0), EndReason::MaxDuration)]);
        h.tick_until(t + 10_000 * MS);
        assert_eq!(
            h.closes(),
            vec![
                (RecId(0), EndReason::MaxDuration),
                (RecId(1), EndReason::IdleTimeout)
            ]
        );
        let second = h.entries_of(RecId(1));
        assert_eq!(second[0], (1, 0, 0xA), "the stream is announced again");
        assert_eq!(second[1], (2, 0, 3000));
        assert!(!second.iter().any(|x| x.0 == 3), "no gap across the split");
        assert_eq!(
            h.entries_of(RecId(0)).iter().filter(|x| x.0 == 2).count(),
            3000
        );
    }

    #[test]
    fn chunks_never_exceed_the_limit_and_entries_stay_whole() {
        let mut h = Harness::new();
        for i in 0..100u16 {
            h.send(u64::from(i), 40000, "10.0.0.1:5000", &rtp(i, 1));
        }
        h.s.shutdown(&mut h.actions);
        let chunks: Vec<_> = h
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Chunk { .. }))
            .collect();
        assert!(chunks.len() >= 5, "100 × 184 bytes in 4 KiB chunks");
        assert_eq!(
            h.entries_of(RecId(0)).iter().filter(|x| x.0 == 2).count(),
            100
        );
    }

    #[test]
    fn malformed_and_oversized_datagrams_are_counted() {
        let mut h = Harness::new();
        h.send(0, 40000, "10.0.0.1:5000", &[0x80, 0, 1]);
        h.send(0, 40000, "10.0.0.1:5000", &[0x00; 40]);
        let mut big = rtp(1, 1);
        big.resize(5000, 0);
        h.send(0, 40000, "10.0.0.1:5000", &big);
        let d = &h.s.counters().dropped;
        assert_eq!((d["short"], d["version"], d["too_large"]), (1, 1, 1));
        assert!(h.actions.is_empty(), "nothing opened");
    }

    #[test]
    fn at_most_255_streams() {
        let mut h = Harness::new();
        for i in 0..300u32 {
            let from = format!("10.0.{}.{}:5000", i / 256, i % 256);
            h.send(u64::from(i), 40000, &from, &rtp(1, i));
        }
        assert_eq!(h.s.counters().dropped["too_many_streams"], 45);
        h.s.shutdown(&mut h.actions);
        assert_eq!(
            h.entries_of(RecId(0)).iter().filter(|x| x.0 == 1).count(),
            255
        );
    }

    fn refused(h: &Harness, reason: &str) -> u64 {
        h.s.counters().refused.get(reason).copied().unwrap_or(0)
    }

    fn dropped(h: &Harness, reason: &str) -> u64 {
        h.s.counters().dropped.get(reason).copied().unwrap_or(0)
    }

    #[test]
    fn a_call_that_qualifies_while_refusing_is_refused_once_and_never_started() {
        let mut h = Harness::with(Limits {
            min_packets: 3,
            ..limits()
        });
        h.s.set_refusal(Some("spool_full"));
        h.call(0, 40000, "10.0.0.1:5000", 7, 0..10);
        assert!(h.opens().is_empty(), "no package for a refused call");
        assert_eq!(h.s.counters().started, 0);
        assert_eq!(refused(&h, "spool_full"), 1, "counted once, not per packet");
        assert_eq!(
            dropped(&h, "refused"),
            10,
            "every datagram of it accounted for"
        );
        // The spool has room again: the rest of the call is recorded (after admission).
        h.s.set_refusal(None);
        h.call(200 * MS, 40000, "10.0.0.1:5000", 7, 10..20);
        assert_eq!(h.opens().len(), 1);
        assert_eq!(h.s.counters().started, 1);
        assert_eq!(refused(&h, "spool_full"), 1);
    }

    #[test]
    fn without_admission_a_refused_call_counts_once_until_it_goes_quiet() {
        let mut h = Harness::new();
        h.s.set_refusal(Some("kek_stale"));
        h.call(0, 40000, "10.0.0.1:5000", 7, 0..5);
        assert_eq!(refused(&h, "kek_stale"), 1);
        assert_eq!(dropped(&h, "refused"), 5);
        // Quiet for the idle timeout: the next packet there is a new call, refused anew.
        h.call(
            100 * MS + limits().idle_timeout_us,
            40000,
            "10.0.0.1:5000",
            9,
            0..2,
        );
        assert_eq!(refused(&h, "kek_stale"), 2);
        assert!(h.opens().is_empty());
        assert_eq!(h.s.counters().started, 0);
        assert!(
            h.s.counters().ended.is_empty(),
            "nothing ended that never started"
        );
    }

    #[test]
    fn an_aborted_recording_ends_once_and_its_call_is_refused_after() {
        let mut h = Harness::new();
        h.call(0, 40000, "10.0.0.1:5000", 7, 0..3);
        let rec = h.opens()[0].0;
        h.s.abort(60 * MS, rec);
        assert_eq!(h.s.active(), 0);
        assert_eq!(h.s.counters().ended.get("spool_error"), Some(&1));
        let before = h.actions.len();
        // The recorder tells the session at every message that recordings may start: that
        // does not let the aborted call make a second package.
        h.s.set_refusal(None);
        h.call(80 * MS, 40000, "10.0.0.1:5000", 7, 3..6);
        h.s.set_refusal(None);
        h.tick_until(20_000 * MS);
        h.s.shutdown(&mut h.actions);
        assert!(
            h.actions[before..]
                .iter()
                .all(|a| matches!(a, Action::Sync)),
            "nothing more for it, no second package: {:?}",
            &h.actions[before..]
        );
        assert_eq!(dropped(&h, "refused"), 3);
        assert_eq!(h.s.counters().started, 1);
        let ended: u64 = h.s.counters().ended.values().sum();
        assert_eq!(ended, 1, "started once, ended once");
    }

    #[test]
    fn a_continuation_refused_at_the_maximum_duration_ends_the_recording_there() {
        let l = limits();
        let mut h = Harness::new();
        h.send(0, 40000, "10.0.0.1:5000", &rtp(0, 7));
        h.s.set_refusal(Some("spool_full"));
        let mut seq = 1u16;
        let mut now = 0;
        while now < l.max_recording_us + 100 * MS {
            now += 20 * MS;
            h.tick_until(now);
            h.send(now, 40000, "10.0.0.1:5000", &rtp(seq, 7));
            seq += 1;
        }
        assert_eq!(h.opens().len(), 1, "no continuation");
        assert_eq!(h.closes(), [(RecId(0), EndReason::MaxDuration)]);
        assert_eq!(refused(&h, "spool_full"), 1);
        assert!(dropped(&h, "refused") >= 4);
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Input {
        Rtp {
            port: u16,
            from: u8,
            ssrc: u8,
            seq: u16,
        },
        Bye {
            port: u16,
            from: u8,
            ssrc: u8,
        },
        Junk(Vec<u8>),
        Tag(u16),
        Wait(u64),
        /// Packets in sequence, 20 ms apart.
        Call {
            port: u16,
            from: u8,
            ssrc: u8,
            n: u16,
        },
        Pause(u16, bool),
        /// Recordings may (false) or may not (true) start.
        Refuse(bool),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            8 => (0u16..3, 0u8..4, 0u8..4, 0u16..40)
                .prop_map(|(port, from, ssrc, seq)| Input::Rtp { port, from, ssrc, seq }),
            1 => (0u16..4, 0u8..4, 0u8..4).prop_map(|(port, from, ssrc)| Input::Bye { port, from, ssrc }),
            1 => proptest::collection::vec(any::<u8>(), 0..30).prop_map(Input::Junk),
            2 => (0u64..8000).prop_map(|ms| Input::Wait(ms * MS)),
            1 => (0u16..3).prop_map(Input::Tag),
            2 => (0u16..3, 0u8..4, 0u8..4, 1u16..6)
                .prop_map(|(port, from, ssrc, n)| Input::Call { port, from, ssrc, n }),
            1 => (0u16..3, any::<bool>()).prop_map(|(port, p)| Input::Pause(port, p)),
            1 => any::<bool>().prop_map(Input::Refuse),
        ]
    }

    /// The order of chunks and metadata of a recording: 'c' for a media chunk, the JSON
    /// text for a metadata record.
    fn records_of(h: &Harness, rec: RecId) -> Vec<String> {
        h.actions
            .iter()
            .filter_map(|a| match a {
                Action::Chunk { rec: r, .. } if *r == rec => Some("c".to_string()),
                Action::Metadata { rec: r, json } if *r == rec => {
                    Some(String::from_utf8(json.clone()).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn metadata_goes_in_order_now_or_waits_for_the_next_recording_on_its_port() {
        let mut h = Harness::new();
        // Before any call: held.
        assert_eq!(
            h.s.metadata(
                40000,
                br#"{"conversation_id":"c1"}"#.to_vec(),
                &mut h.actions
            ),
            Tagged::Held
        );
        assert!(h.actions.is_empty());
        h.send(0, 40000, "10.0.0.1:5000", &rtp(1, 7));
        let rec = h.opens()[0].0;
        // Given when the recording opens, before its media.
        assert_eq!(records_of(&h, rec), [r#"{"conversation_id":"c1"}"#]);
        // During the call: the media before it is handed out first.
        h.send(20 * MS, 40000, "10.0.0.1:5000", &rtp(2, 7));
        assert_eq!(
            h.s.metadata(40000, br#"{"agent":"a"}"#.to_vec(), &mut h.actions),
            Tagged::Now
        );
        h.send(40 * MS, 40000, "10.0.0.1:5000", &rtp(3, 7));
        h.s.shutdown(&mut h.actions);
        assert_eq!(
            records_of(&h, rec),
            [r#"{"conversation_id":"c1"}"#, "c", r#"{"agent":"a"}"#, "c"]
        );
        // Held documents are bounded, and so is their size.
        let mut h = Harness::new();
        for _ in 0..MAX_HELD {
            assert_eq!(
                h.s.metadata(1, b"{}".to_vec(), &mut h.actions),
                Tagged::Held
            );
        }
        assert_eq!(
            h.s.metadata(1, b"{}".to_vec(), &mut h.actions),
            Tagged::TooManyHeld
        );
        assert_eq!(
            h.s.metadata(2, vec![b' '; limits().max_chunk + 1], &mut h.actions),
            Tagged::TooLarge
        );
    }

    #[test]
    fn a_recording_continued_at_the_maximum_duration_carries_its_metadata_again() {
        let mut h = Harness::new();
        h.send(0, 40000, "10.0.0.1:5000", &rtp(1, 7));
        h.s.metadata(
            40000,
            br#"{"conversation_id":"c1"}"#.to_vec(),
            &mut h.actions,
        );
        let mut seq = 2u16;
        let mut now = 0;
        while h.opens().len() < 2 {
            now += 20 * MS;
            h.tick_until(now);
            h.send(now, 40000, "10.0.0.1:5000", &rtp(seq, 7));
            seq += 1;
        }
        let (second, continues) = h.opens()[1];
        assert_eq!(continues, Some(h.opens()[0].0));
        assert_eq!(records_of(&h, second)[0], r#"{"conversation_id":"c1"}"#);
    }

    proptest! {
        #[test]
        fn every_open_closes_once_and_every_datagram_is_accounted(
            inputs in proptest::collection::vec(input(), 1..200),
            min_packets in prop_oneof![Just(1usize), Just(3usize)],
        ) {
            // With admission too: held datagrams end up recorded or counted.
            let mut h = Harness::with(Limits { min_packets, ..limits() });
            let mut now = 0u64;
            let mut sent = 0u64;
            for i in inputs {
                match i {
                    Input::Rtp { port, from, ssrc, seq } => {
                        sent += 1;
                        h.send(now, 40000 + port, &format!("10.0.0.{from}:5000"), &rtp(seq, u32::from(ssrc)));
                    }
                    Input::Bye { port, from, ssrc } => {
                        sent += 1;
                        h.send(now, 40000 + port, &format!("10.0.0.{from}:5001"), &bye(u32::from(ssrc)));
                    }
                    Input::Junk(j) => {
                        sent += 1;
                        h.send(now, 40000, "10.0.0.9:9", &j);
                    }
                    Input::Wait(d) => {
                        now += d;
                        h.tick_until(now);
                    }
                    Input::Tag(port) => {
                        h.s.metadata(40000 + port, b"{}".to_vec(), &mut h.actions);
                    }
                    Input::Call { port, from, ssrc, n } => {
                        for seq in 0..n {
                            sent += 1;
                            now += 20 * MS;
                            h.tick_until(now);
                            h.send(now, 40000 + port, &format!("10.0.0.{from}:5000"), &rtp(seq, u32::from(ssrc)));
                        }
                    }
                    Input::Refuse(r) => h.s.set_refusal(r.then_some("spool_full")),
                    Input::Pause(port, p) => {
                        if p {
                            h.s.pause(now, 40000 + port, &mut h.actions);
                        } else {
                            h.s.resume(now, 40000 + port, &mut h.actions);
                        }
                    }
                }
                // The timer is never later than the true next deadline of any recording.
                let truth = h.s.by_port.values().map(|r| h.s.deadline(r)).min();
                if let Some(t) = truth {
                    prop_assert!(h.s.poll_timeout().is_some_and(|p| p <= t));
                }
                now += 1;
            }
            h.s.shutdown(&mut h.actions);
            // Open/close pairing, chunks only in between.
            let mut open = std::collections::HashSet::new();
            let mut closed = std::collections::HashSet::new();
            let mut stored = 0u64;
            for a in &h.actions {
                match a {
                    Action::Open { rec, .. } => prop_assert!(open.insert(*rec)),
                    Action::Close { rec, .. } => {
                        prop_assert!(open.contains(rec));
                        prop_assert!(closed.insert(*rec));
                    }
                    Action::Chunk { rec, plaintext } => {
                        prop_assert!(open.contains(rec) && !closed.contains(rec));
                        prop_assert!(!plaintext.is_empty() && plaintext.len() <= limits().max_chunk);
                        for e in entries(plaintext) {
                            if matches!(e.unwrap(), Entry::Rtp { .. } | Entry::Rtcp { .. }) {
                                stored += 1;
                            }
                        }
                    }
                    Action::Metadata { rec, .. } => {
                        prop_assert!(open.contains(rec) && !closed.contains(rec));
                    }
                    Action::Sync => {}
                }
            }
            prop_assert_eq!(&open, &closed);
            let c = h.s.counters();
            let dropped: u64 = c.dropped.values().sum();
            prop_assert_eq!(stored + dropped + c.rtp_duplicates + c.rtp_paused, sent);
            prop_assert_eq!(h.s.candidates(), 0);
            prop_assert_eq!(stored, c.rtp_packets + c.rtcp_packets);
        }
    }
}
