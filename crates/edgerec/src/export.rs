//! Decrypting recordings into the export layout:
//!
//! ```text
//! {out}/year=YYYY/month=MM/day=DD/conversation_id={id or "untagged"}/{recording id}.{wav|pcap}
//!                                                                   {recording id}_metadata.json
//!                                                                   {recording id}_{name}   (file packages)
//! ```
//!
//! The date is the UTC date of the package's *created* time; the conversation id comes from
//! the recording's metadata records (`conversation_id`).
//!
//! - **WAV**: 16-bit PCM at 8 kHz, one channel per stream, G.711 µ-law (PT 0) and A-law
//!   (PT 8) decoded. Each stream is placed on the recording's timeline by RTP timestamp,
//!   anchored at the arrival time of its first packet, so late starts, gaps and lost packets
//!   are silence and the legs stay aligned; any packet duration works (the payload length
//!   is the sample count). A timestamp that disagrees with arrival time by more than a
//!   second (an SSRC change, a sender restart) re-anchors the stream at its arrival.
//! - **pcap**: every recorded RTP and RTCP packet in an IPv4 or IPv6 + UDP frame
//!   (LINKTYPE_RAW) from the recorded remote address and port to the local one, at its
//!   arrival time. RTCP entries carry no addresses: they are written with the addresses of
//!   their stream (or the first stream) and both ports one up (the RTP+1 convention).
//! - **metadata**: public metadata, the merged metadata records, the end record, and per
//!   stream the packets, the loss, the duplicates and the reordering seen, the duration, and
//!   `unterminated` with a warning when the package had no end record.
//!
//! Two passes over each package: the first verifies it and surveys it (streams, counts,
//! events, the length of the audio) without keeping its packets; the second renders the
//! output as it reads, so memory stays bounded to a window of a few seconds of audio a
//! stream and a record at a time, whatever the recording says (the data key is unwrapped once
//! and kept for the second pass).
//!
//! Invariants: outputs are written 0600 to a temporary name and renamed into place only
//! when complete; a package that fails verification produces no output at all; only
//! verified plaintext is ever written. A recording's timeline is bounded by its own packets'
//! arrival times and capped (`max_span`, 24 h by default): one that would be longer fails on
//! its own, before anything is allocated or written for it. With OpenPGP recipients, every
//! output is encrypted as it is rendered: the plaintext passes through a pipe in memory to
//! the encryptor, never through the disk.
//!
//! A call recorded in several packages (the appliance restarted during it, or it reached the
//! maximum duration) is exported as one recording by default: the parts' media on one
//! timeline (each part at its own start, streams matched by SSRC or source address), named
//! after the first part, its metadata listing the parts (`join`; `--no-join` exports each
//! package on its own).
//!
//! Its modules: `bulk` (many packages at once, resumable, verified, from files or a store),
//! `join` (which packages make one call) and `pgp` (each output encrypted to OpenPGP
//! certificates as it is written).

#[cfg(feature = "appliance")]
pub(crate) mod bucket;
pub(crate) mod bulk;
pub(crate) mod join;
pub(crate) mod pgp;

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::Error;
use crate::media::rtp::{Datagram, RtpHeader, SeqOutcome, SeqTracker, classify};
use erec::clock::Utc;
use erec::crypto::Dek;
use erec::entries::{Entry, Event, NO_STREAM, entries};
use erec::format::{EndInfo, Kind, Wrap, parse_json_object};
use erec::keys::{KekId, UnwrapError, Unwrapper};
use erec::reader::{PackageReader, ReadMode};

/// The audio output format of `rtp` recordings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One channel per stream, 16-bit PCM.
    Wav,
    /// The original packets.
    Pcap,
}

/// The longest recording timeline exported by default (`export --max-span-secs`): a day,
/// six times the recorder's own maximum duration.
pub const DEFAULT_MAX_SPAN: Duration = Duration::from_secs(86_400);

/// How packages are exported.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    /// WAV or pcap, for `rtp` recordings.
    pub format: Format,
    /// Encrypt every output to these OpenPGP certificates (as `<name>.pgp`).
    pub pgp: Option<&'a crate::export::pgp::Recipients>,
    /// The longest timeline a recording may have (from its start to its last sample).
    pub max_span: Duration,
    /// Export only recordings of these media types (`--media-type`; empty: all).
    pub media_types: &'a [String],
    /// Export only recordings of these conversations (`--conversation`; empty: all).
    pub conversations: &'a [String],
    /// When each conversation began (the manifests' index): the platform layout files a
    /// recording by its conversation's start.
    pub conversation_starts: Option<&'a std::collections::HashMap<String, u64>>,
    /// edgerec's layout, or the platform's.
    pub layout: Layout<'a>,
}

/// Where an export's outputs go.
#[derive(Clone, Copy)]
pub enum Dest<'a> {
    /// A directory (outputs written to a temporary name and renamed into place).
    Dir(&'a Path),
    /// A bucket (outputs streamed up and confirmed by a `HEAD`).
    #[cfg(feature = "appliance")]
    Bucket(&'a bucket::Bucket),
}

/// The layout of an export (`--layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout<'a> {
    /// edgerec's: `year=/month=/day=/conversation_id=/`, by the recording's start day.
    Edgerec,
    /// The platform's bulk export: `{org}/year=/month=/day=/hour=/conversation_id=/`, by the
    /// hour the conversation began, and its `_metadata.json` fields.
    Platform {
        /// The organisation id: the first level.
        org: &'a str,
    },
}

/// An output in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Its path below the destination (`/`-separated).
    pub rel: String,
    /// How it is named to the operator: a path, or `s3://bucket/key`.
    pub shown: String,
    /// Its size.
    pub size: u64,
    /// A file's modification time (ns since the epoch); 0 for an object.
    pub mtime_ns: u128,
    /// An object's ETag.
    pub etag: Option<String>,
}

/// A recording's media type: the one its metadata gives, else `call` for a recorded call;
/// none for a file that gave none.
fn media_type(d: &Decoded) -> Option<String> {
    match d.metadata.get("media_type").and_then(Value::as_str) {
        Some(t) if crate::media::MEDIA_TYPES.contains(&t) => Some(t.to_string()),
        _ => (d.media != "file").then(|| "call".to_string()),
    }
}

/// What one export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The recording id.
    pub id: Uuid,
    /// The media output.
    pub media: Placed,
    /// The metadata output.
    pub metadata: Placed,
    /// False if the package had no end record (exported with a warning).
    pub terminated: bool,
}

struct Stream {
    ssrc: u32,
    local: SocketAddr,
    remote: SocketAddr,
    payload_type: u8,
    /// False for an index below one opened that has not opened (yet): a SIPREC stream is
    /// its m-line, and the second may send before the first, or the first never.
    opened: bool,
}

/// One stream's counts, gathered in the first pass.
#[derive(Default)]
struct Counts {
    tracker: Option<SeqTracker>,
    ssrc: Option<u32>,
    packets: u64,
    reordered: u64,
    duplicates: u64,
    lost: u64,
    first: Option<u64>,
    last: u64,
    /// The payload types its packets carried that are not G.711 (at most 8 kept).
    others: Vec<u8>,
}

impl Counts {
    fn rtp(&mut self, h: &RtpHeader, arrival_us: u64) {
        self.packets += 1;
        if crate::media::g711::table(h.payload_type).is_none()
            && !self.others.contains(&h.payload_type)
            && self.others.len() < 8
        {
            self.others.push(h.payload_type);
        }
        self.first.get_or_insert(arrival_us);
        self.last = arrival_us;
        if self.ssrc != Some(h.ssrc) {
            if let Some(t) = self.tracker.take() {
                self.lost += t.lost();
            }
            self.ssrc = Some(h.ssrc);
            self.tracker = Some(SeqTracker::new(h.seq));
            return;
        }
        if let Some(t) = self.tracker.as_mut() {
            match t.update(h.seq) {
                SeqOutcome::Reordered => self.reordered += 1,
                SeqOutcome::Duplicate => self.duplicates += 1,
                _ => {}
            }
        }
    }

    fn lost(&self) -> u64 {
        self.lost + self.tracker.as_ref().map_or(0, SeqTracker::lost)
    }
}

/// Events listed in the metadata file at most; beyond, they are counted only.
const MAX_EVENTS: usize = 10_000;

/// What the first pass over an `rtp` recording found.
#[derive(Default)]
struct Survey {
    streams: Vec<Stream>,
    counts: Vec<Counts>,
    events: Vec<Value>,
    events_omitted: u64,
    /// Pause (true) and resume (false) events, µs, by stream ([`NO_STREAM`]: the whole
    /// recording, as a port's pause; a stream's own: a SIPREC stream made inactive).
    pauses: Vec<(u8, u64, bool)>,
    /// Where each stream index's samples end (packets may name a stream before it opens,
    /// or one never opened: only the streams opened count, at the end, as in the output).
    ends: Vec<u64>,
    placer: Placer,
}

impl Survey {
    /// The audio's length in samples: the end of the last sample of a stream opened.
    fn frames(&self) -> u64 {
        self.ends
            .iter()
            .take(self.streams.len())
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Takes one decoded entry; `max_frames` bounds the timeline.
    fn entry(&mut self, e: Entry, max_frames: u64) -> Result<(), Error> {
        if let Some((stream, arrival_us, packet, rtcp)) = e.as_packet() {
            if rtcp {
                return Ok(());
            }
            let i = usize::from(stream);
            let Ok(Datagram::Rtp(h)) = classify(packet) else {
                return Ok(());
            };
            if let Some(c) = self.counts.get_mut(i) {
                c.rtp(&h, arrival_us);
            }
            if let Some(pos) = self.placer.place(i, arrival_us, &h) {
                let end = pos.saturating_add(h.payload_len as u64);
                if end > max_frames {
                    return Err(Error::Invalid(format!(
                        "the recording's timeline runs to {:.0} s, past the {:.0} s allowed \
                         (--max-span-secs): not exported",
                        end as f64 / 8000.0,
                        max_frames as f64 / 8000.0
                    )));
                }
                if self.ends.len() <= i {
                    self.ends.resize(i + 1, 0);
                }
                self.ends[i] = self.ends[i].max(end);
            }
            return Ok(());
        }
        match e {
            Entry::StreamOpened {
                stream,
                ssrc,
                local,
                remote,
                payload_type,
                ..
            } => {
                let i = usize::from(stream);
                while self.streams.len() <= i {
                    self.streams.push(Stream {
                        ssrc: 0,
                        local: SocketAddr::from(([0, 0, 0, 0], 0)),
                        remote: SocketAddr::from(([0, 0, 0, 0], 0)),
                        payload_type: 0,
                        opened: false,
                    });
                    self.counts.push(Counts::default());
                }
                if !self.streams[i].opened {
                    self.streams[i] = Stream {
                        ssrc,
                        local,
                        remote,
                        payload_type,
                        opened: true,
                    };
                }
            }
            Entry::Event {
                stream,
                time_us,
                event,
            } => {
                if matches!(event, Event::Pause | Event::Resume) && self.pauses.len() < MAX_EVENTS {
                    self.pauses.push((stream, time_us, event == Event::Pause));
                }
                if self.events.len() >= MAX_EVENTS {
                    self.events_omitted += 1;
                    return Ok(());
                }
                self.events.push(json!({
                    "stream": stream,
                    "time_ms": time_us as f64 / 1000.0,
                    "event": match event {
                        Event::Gap(n) => json!({"gap": n}),
                        Event::SsrcChange(s) => json!({"ssrc_change": s}),
                        Event::Pause => json!("pause"),
                        Event::Resume => json!("resume"),
                    },
                }))
            }
            Entry::Rtp { .. } | Entry::Rtcp { .. } => {}
        }
        Ok(())
    }
}

/// The paused spans of a recording from its pause and resume events, in ms: `to_ms` is
/// `None` for a pause that lasted to the end. A resume without a pause, or a second pause,
/// changes nothing.
fn paused_spans(events: &[(u64, bool)]) -> Vec<(f64, Option<f64>)> {
    let mut spans = Vec::new();
    let mut from = None;
    for &(t, pause) in events {
        match (pause, from) {
            (true, None) => from = Some(t),
            (false, Some(f)) => {
                spans.push((f as f64 / 1000.0, Some(t as f64 / 1000.0)));
                from = None;
            }
            _ => {}
        }
    }
    if let Some(f) = from {
        spans.push((f as f64 / 1000.0, None));
    }
    spans
}

fn bad_entry(_: erec::entries::EntryError, record: u32) -> Error {
    Error::Package(erec::Error::Corrupt {
        what: "media entries do not decode",
        record: Some(record),
    })
}

/// Unwraps through `inner` once and gives the same data key again for the second pass (in
/// memory, zeroized when dropped): a key manager is asked once a package.
struct Remembered<'a> {
    inner: &'a dyn Unwrapper,
    /// One data key per part of a joined recording.
    got: std::sync::Mutex<Vec<(KekId, Vec<u8>, Dek)>>,
}

impl Unwrapper for Remembered<'_> {
    fn unwrap_dek(&self, kek_id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        self.unwrap_dek_for(&[0; 16], kek_id, wrap, sealed)
    }

    fn unwrap_dek_for(
        &self,
        recording: &[u8; 16],
        kek_id: &KekId,
        wrap: Wrap,
        sealed: &[u8],
    ) -> Result<Dek, UnwrapError> {
        if let Ok(got) = self.got.lock()
            && let Some((_, _, dek)) = got.iter().find(|(k, s, _)| k == kek_id && s == sealed)
        {
            return Ok(dek.clone());
        }
        let dek = if recording == &[0; 16] {
            self.inner.unwrap_dek(kek_id, wrap, sealed)?
        } else {
            self.inner.unwrap_dek_for(recording, kek_id, wrap, sealed)?
        };
        if let Ok(mut got) = self.got.lock() {
            got.push((*kek_id, sealed.to_vec(), dek.clone()));
        }
        Ok(dek)
    }

    fn held_ids(&self) -> Vec<KekId> {
        self.inner.held_ids()
    }
}

fn open_package(
    input: &Path,
    unwrapper: &dyn Unwrapper,
) -> Result<PackageReader<io::BufReader<File>>, Error> {
    let file = File::open(input)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", input.display())))?;
    Ok(PackageReader::new(
        io::BufReader::new(file),
        unwrapper,
        ReadMode::Recovery,
    )?)
}

/// Exports the package files of one call — a recording and those that continue it, in
/// order (`export::join`) — into `out` as one recording named after the first, in four
/// steps: [`decode`] (pass 1: every record of every part verified, the media surveyed on one
/// timeline), [`layout`] (where its outputs go and what they are called), [`render`] (pass
/// 2: WAV, pcap or the file, as it is read) and [`produce`] (written as is, or encrypted to
/// OpenPGP as it is written).
pub fn export_parts_to(
    inputs: &[PathBuf],
    unwrapper: &dyn Unwrapper,
    out: Dest<'_>,
    opts: &Options,
) -> Result<Option<Exported>, Error> {
    let keys = Remembered {
        inner: unwrapper,
        got: std::sync::Mutex::new(Vec::new()),
    };
    let mut d = decode(inputs, &keys, opts.max_span)?;
    if !opts.media_types.is_empty()
        && !media_type(&d).is_some_and(|t| opts.media_types.contains(&t))
    {
        return Ok(None);
    }
    let conversation = d.metadata.get("conversation_id").and_then(Value::as_str);
    if !opts.conversations.is_empty()
        && !conversation.is_some_and(|c| {
            // Sorted and without repeats (`--conversation`'s parser makes them so).
            opts.conversations
                .binary_search_by(|w| w.as_str().cmp(c))
                .is_ok()
        })
    {
        return Ok(None);
    }
    // The platform files a recording by its conversation's start, when the index knows it
    // (its first recording's id time, the same for every recording of it: a package's own
    // creation time may be a few ms off its id's), else by its own.
    let began_ms = conversation
        .and_then(|c| opts.conversation_starts?.get(c).copied())
        .unwrap_or(d.header.created_ms);
    let (dir, name) = layout(&d, opts.format, opts.layout, began_ms);
    let mut doc = describe(&d);
    let file = d.media == "file";
    // Checked before anything is written for it.
    let channels = d.survey.streams.len().max(1) as u64;
    if !file
        && opts.format == Format::Wav
        && d.survey.frames() * channels * 2 > u64::from(u32::MAX) - 36
    {
        return Err(Error::Invalid(format!(
            "{:.0} s of {channels} channels is more audio than a WAV file holds (4 GiB): \
             export it with --format pcap",
            d.survey.frames() as f64 / 8000.0
        )));
    }
    if !file
        && opts.format == Format::Wav
        && let Some(problem) = undecodable(&d)
    {
        return Err(Error::Invalid(format!(
            "{problem}, which WAV export cannot decode (G.711 only): export it with --format pcap"
        )));
    }
    if !file {
        describe_media(&mut d.survey, &mut doc);
    }
    // Pass 2: render into the output, as it is read.
    let (media, audio) = emit(out, &dir, &name, opts.pgp, |w| {
        render(&d, &keys, opts.format, w)
    })?;
    if let Some(a) = audio {
        doc["audio"] = a;
    }
    if let Layout::Platform { org } = opts.layout {
        doc = platform_metadata(&d, (org, began_ms), &name, doc);
    }
    let meta_name = format!("{}_metadata.json", d.id);
    let (metadata, ()) = emit(out, &dir, &meta_name, opts.pgp, |w| {
        serde_json::to_writer_pretty(&mut *w, &doc).map_err(io::Error::other)?;
        w.write_all(b"\n")?;
        Ok(())
    })?;
    Ok(Some(Exported {
        id: d.id,
        media,
        metadata,
        terminated: d.end.is_some(),
    }))
}

/// One package of a joined recording: where it sits on the whole's timeline and which of
/// the whole's streams each of its own is.
struct Part {
    path: PathBuf,
    id: Uuid,
    created_ms: u64,
    /// µs from the first part's start to this one's.
    offset_us: u64,
    /// Its stream index → the whole's (`None`, or beyond: the same index). The first part's
    /// streams are the whole's.
    streams: Vec<Option<u8>>,
    first: bool,
    records: u32,
    media_bytes: u64,
    end: Option<EndInfo>,
}

impl Part {
    fn stream(&self, s: u8) -> u8 {
        if s == NO_STREAM {
            return s;
        }
        self.streams
            .get(usize::from(s))
            .copied()
            .flatten()
            .unwrap_or(s)
    }

    /// The whole's stream for a stream this part opens: the stream of the same SSRC, else
    /// of the same source address, that no stream of this part took yet; else a new one.
    fn join_stream(
        &mut self,
        s: u8,
        ssrc: u32,
        remote: SocketAddr,
        survey: &Survey,
    ) -> Result<u8, Error> {
        let taken = |j: usize| self.streams.iter().any(|m| *m == u8::try_from(j).ok());
        let open = |j: &usize| survey.streams[*j].opened && !taken(*j);
        let found = (0..survey.streams.len())
            .filter(open)
            .find(|&j| survey.streams[j].ssrc == ssrc)
            .or_else(|| {
                (0..survey.streams.len())
                    .filter(open)
                    .find(|&j| survey.streams[j].remote == remote)
            })
            .unwrap_or(survey.streams.len());
        let j = u8::try_from(found)
            .ok()
            .filter(|j| *j != NO_STREAM)
            .ok_or_else(|| {
                Error::Invalid("the joined recording has more than 254 streams".into())
            })?;
        let i = usize::from(s);
        if self.streams.len() <= i {
            self.streams.resize(i + 1, None);
        }
        self.streams[i] = Some(j);
        Ok(j)
    }

    /// An entry of this part as an entry of the whole (streams and times moved).
    fn whole<'a>(&mut self, mut e: Entry<'a>, survey: &Survey) -> Result<Entry<'a>, Error> {
        let offset = self.offset_us;
        match &mut e {
            Entry::StreamOpened {
                stream,
                ssrc,
                remote,
                ..
            } => {
                if !self.first {
                    *stream = self.join_stream(*stream, *ssrc, *remote, survey)?;
                }
            }
            Entry::Rtp {
                stream,
                arrival_us: t,
                ..
            }
            | Entry::Rtcp {
                stream,
                arrival_us: t,
                ..
            }
            | Entry::Event {
                stream, time_us: t, ..
            } => {
                *stream = self.stream(*stream);
                *t = t.saturating_add(offset);
            }
        }
        Ok(e)
    }
}

/// What the first pass learnt of a recording (of all its parts).
struct Decoded {
    /// The first part's header.
    header: erec::format::Header,
    id: Uuid,
    public: serde_json::Map<String, Value>,
    /// `rtp` or `file`, as the header's public metadata says.
    media: String,
    survey: Survey,
    records: u32,
    media_bytes: u64,
    /// The last part's end.
    end: Option<EndInfo>,
    /// The metadata records of every part, merged (a later part's keys win).
    metadata: serde_json::Map<String, Value>,
    /// Every KEK the parts are sealed to.
    kek_ids: Vec<String>,
    parts: Vec<Part>,
}

/// Pass 1: every record of every part verified (as a recovery read: an unterminated package
/// — one cut by a crash, say — counts up to its last whole record), and the media surveyed
/// on one timeline without keeping a packet, its span bounded by `max_span`.
fn decode(inputs: &[PathBuf], keys: &dyn Unwrapper, max_span: Duration) -> Result<Decoded, Error> {
    let max_frames = max_span.as_secs().saturating_mul(8000);
    let mut d: Option<Decoded> = None;
    for input in inputs {
        let mut reader = open_package(input, keys)?;
        let header = reader.header().clone();
        let created_ms = header.created_ms;
        let d = d.get_or_insert_with(|| {
            let public = parse_json_object(&header.metadata).unwrap_or_default();
            let media = public
                .get("media")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            Decoded {
                id: Uuid::from_bytes(header.recording_id),
                header: header.clone(),
                public,
                media,
                survey: Survey::default(),
                records: 0,
                media_bytes: 0,
                end: None,
                metadata: serde_json::Map::new(),
                kek_ids: Vec::new(),
                parts: Vec::new(),
            }
        });
        for r in &header.recipients {
            let id = KekId(r.kek_id).to_hex();
            if !d.kek_ids.contains(&id) {
                d.kek_ids.push(id);
            }
        }
        let mut part = Part {
            path: input.clone(),
            id: Uuid::from_bytes(header.recording_id),
            created_ms,
            offset_us: created_ms
                .saturating_sub(d.header.created_ms)
                .saturating_mul(1000),
            streams: Vec::new(),
            first: d.parts.is_empty(),
            records: 0,
            media_bytes: 0,
            end: None,
        };
        while let Some(rec) = reader.next_record()? {
            part.records += 1;
            if rec.kind != Kind::Media {
                continue;
            }
            part.media_bytes += rec.plaintext.len() as u64;
            if d.media == "file" {
                continue;
            }
            for e in entries(&rec.plaintext) {
                let e = part.whole(e.map_err(|e| bad_entry(e, rec.index))?, &d.survey)?;
                d.survey.entry(e, max_frames)?;
            }
        }
        part.end = reader.end();
        d.records += part.records;
        d.media_bytes += part.media_bytes;
        d.end = part.end;
        for (k, v) in reader.metadata() {
            d.metadata.insert(k.clone(), v.clone());
        }
        d.parts.push(part);
    }
    d.ok_or_else(|| Error::Invalid("no package to export".into()))
}

/// Where a package's outputs go, below the destination (`year=/month=/day=/conversation_id=`
/// by its start day; the platform's `{org}/…/hour=/conversation_id=` by its start hour) and
/// its media output's name.
fn layout(d: &Decoded, format: Format, layout: Layout, began_ms: u64) -> (String, String) {
    let start = Utc::from_unix_ms(match layout {
        Layout::Edgerec => d.header.created_ms,
        Layout::Platform { .. } => began_ms,
    });
    let conversation = d
        .metadata
        .get("conversation_id")
        .and_then(Value::as_str)
        .map(sanitize)
        .unwrap_or_else(|| "untagged".to_string());
    let day = format!(
        "year={:04}/month={:02}/day={:02}",
        start.year, start.month, start.day
    );
    let dir = match layout {
        Layout::Edgerec => format!("{day}/conversation_id={conversation}"),
        Layout::Platform { org } => format!(
            "{org}/{day}/hour={:02}/conversation_id={conversation}",
            start.hms_ms.0
        ),
    };
    let original = d.metadata.get("name").and_then(Value::as_str);
    let name = match (d.media == "file", layout) {
        (true, Layout::Edgerec) => {
            format!(
                "{}_{}",
                d.id,
                original.map(sanitize).unwrap_or_else(|| "file".into())
            )
        }
        // The platform names every file by its recording id: the original's extension kept.
        (true, Layout::Platform { .. }) => format!("{}{}", d.id, extension(original)),
        (false, _) => {
            let ext = match format {
                Format::Wav => "wav",
                Format::Pcap => "pcap",
            };
            format!("{}.{ext}", d.id)
        }
    };
    (dir, name)
}

/// Whether `s` is an organisation id: 1–128 letters, digits, `-`, `_` and `.`, not
/// starting with a dot (it is a key's first level).
pub fn is_organisation_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
}

/// The extension of an original file name (`.txt`), if it has a short plain one.
fn extension(name: Option<&str>) -> String {
    name.and_then(|n| n.rsplit_once('.'))
        .map(|(_, e)| e)
        .filter(|e| (1..=10).contains(&e.len()) && e.bytes().all(|c| c.is_ascii_alphanumeric()))
        .map(|e| format!(".{}", e.to_ascii_lowercase()))
        .unwrap_or_default()
}

/// The platform's `mediaType` of an edgerec media type (`None`: the platform has none for
/// it — a transcript, or a file that gave no type).
fn platform_media_type(t: Option<&str>) -> Option<&'static str> {
    Some(match t? {
        "call" => "Call",
        "chat" => "Chat",
        "email" => "Email",
        "message" => "Message",
        "callback" => "Callback",
        "screen" => "Screen",
        _ => return None,
    })
}

/// The `_metadata.json` of the platform layout: the platform's fields at the top (see
/// docs/export.md for where each comes from), edgerec's own document under `edgerec`.
fn platform_metadata(
    d: &Decoded,
    (org, began_ms): (&str, u64),
    file_name: &str,
    edgerec: Value,
) -> Value {
    let text = |k: &str| {
        d.metadata
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let users: Vec<Value> = match d.metadata.get("user_ids") {
        Some(Value::Array(a)) => a.iter().filter(|v| v.is_string()).cloned().collect(),
        _ => ["user_id", "agent_id", "agent"]
            .iter()
            .find_map(|k| text(k))
            .map(|u| vec![Value::String(u)])
            .unwrap_or_default(),
    };
    let t = media_type(d);
    let mut doc = json!({
        "organizationId": org,
        "conversationId": text("conversation_id"),
        "recordingId": d.id.hyphenated().to_string(),
        "provider": "edge",
        "userIds": users,
        "conversationStartTime": Utc::from_unix_ms(began_ms).rfc3339(),
        "recordingStartTime": Utc::from_unix_ms(d.header.created_ms).rfc3339(),
        "fileName": file_name,
    });
    if let Some(m) = platform_media_type(t.as_deref()) {
        doc["mediaType"] = m.into();
    }
    if let Some(e) = d.end {
        doc["recordingEndTime"] = Utc::from_unix_ms(e.ended_ms).rfc3339().into();
        doc["durationMs"] = e.ended_ms.saturating_sub(d.header.created_ms).into();
    }
    doc["edgerec"] = edgerec;
    doc
}

/// The metadata document of an export: the recording's identity, keys, metadata and end;
/// for a joined one, each part (its package, where it starts, how it ended).
fn describe(d: &Decoded) -> Value {
    let mut doc = json!({
        "recording_id": d.id.hyphenated().to_string(),
        "created": Utc::from_unix_ms(d.header.created_ms).rfc3339(),
        "created_ms": d.header.created_ms,
        "media": d.media,
        "media_type": media_type(d),
        "kek_ids": d.kek_ids,
        "public_metadata": d.public,
        "metadata": d.metadata,
        "records": d.records,
        "media_bytes": d.media_bytes,
        "terminated": d.end.is_some(),
    });
    add_end(&mut doc, d.header.created_ms, d.end);
    if d.parts.len() > 1 {
        doc["parts"] = d
            .parts
            .iter()
            .map(|p| {
                let mut part = json!({
                    "recording_id": p.id.hyphenated().to_string(),
                    "created": Utc::from_unix_ms(p.created_ms).rfc3339(),
                    "offset_ms": p.offset_us as f64 / 1000.0,
                    "records": p.records,
                    "media_bytes": p.media_bytes,
                    "terminated": p.end.is_some(),
                });
                add_end(&mut part, p.created_ms, p.end);
                part
            })
            .collect::<Vec<_>>()
            .into();
        doc["parts_note"] = json!(
            "one call in several packages (a restart of the appliance, or its maximum \
             duration), joined: each part continues the one before; a part cut by a crash is \
             unterminated and the next one takes up the call"
        );
    }
    doc
}

/// A call's streams, events and paused spans into the metadata document (the events move
/// out of the survey).
fn describe_media(survey: &mut Survey, doc: &mut Value) {
    doc["streams"] = stream_stats(survey);
    doc["events"] = Value::Array(std::mem::take(&mut survey.events));
    if survey.events_omitted > 0 {
        doc["events_omitted"] = survey.events_omitted.into();
    }
    let mut by_stream: Vec<u8> = survey.pauses.iter().map(|p| p.0).collect();
    by_stream.sort_unstable();
    by_stream.dedup();
    let mut paused = Vec::new();
    for stream in by_stream {
        let events: Vec<(u64, bool)> = survey
            .pauses
            .iter()
            .filter(|p| p.0 == stream)
            .map(|p| (p.1, p.2))
            .collect();
        for (from, to) in paused_spans(&events) {
            let mut span = json!({ "from_ms": from, "to_ms": to });
            if stream != NO_STREAM {
                span["stream"] = stream.into();
            }
            paused.push(span);
        }
    }
    if !paused.is_empty() {
        doc["paused"] = paused.into();
        doc["paused_note"] = json!(
            "recording was paused on request over these spans (times from the recording's \
             start; to_ms null: to the end): no media was stored, the audio is silence there"
        );
    }
}

/// Pass 2: the media rendered into `w` as it is read — the file's bytes, a WAV file (one
/// channel per stream, silence where nothing was received) or a pcap capture; for WAV, what
/// the metadata says of the audio.
fn render(
    d: &Decoded,
    keys: &dyn Unwrapper,
    format: Format,
    w: &mut dyn Write,
) -> Result<Option<Value>, Error> {
    if d.media == "file" {
        for part in &d.parts {
            let mut reader = open_package(&part.path, keys)?;
            while let Some(rec) = reader.next_record()? {
                if rec.kind == Kind::Media {
                    w.write_all(&rec.plaintext)?;
                }
            }
        }
        return Ok(None);
    }
    match format {
        Format::Wav => {
            let n = d.survey.streams.len();
            let mut r = Renderer::new(n, d.survey.frames(), w)?;
            each_packet(d, keys, |stream, arrival_us, bytes, rtcp| {
                if !rtcp {
                    r.packet(usize::from(stream), arrival_us, bytes)?;
                }
                Ok(())
            })?;
            r.finish()?;
            Ok(Some(json!({
                "channels": n.max(1),
                "sample_rate": 8000,
                "samples": d.survey.frames(),
                "duration_s": d.survey.frames() as f64 / 8000.0,
            })))
        }
        Format::Pcap => {
            write_pcap(d, keys, w)?;
            Ok(None)
        }
    }
}

/// Calls `f` with every RTP and RTCP packet of the verified records of every part, in
/// order, on the whole's streams and timeline.
fn each_packet(
    d: &Decoded,
    keys: &dyn Unwrapper,
    mut f: impl FnMut(u8, u64, &[u8], bool) -> Result<(), Error>,
) -> Result<(), Error> {
    for part in &d.parts {
        let mut reader = open_package(&part.path, keys)?;
        while let Some(rec) = reader.next_record()? {
            if rec.kind != Kind::Media {
                continue;
            }
            for e in entries(&rec.plaintext) {
                let e = e.map_err(|e| bad_entry(e, rec.index))?;
                if let Some((stream, arrival_us, packet, rtcp)) = e.as_packet() {
                    let at = arrival_us.saturating_add(part.offset_us);
                    f(part.stream(stream), at, packet, rtcp)?;
                }
            }
        }
    }
    Ok(())
}

/// Writes the output `name` into `dir` (below the destination) through `fill`: as it is,
/// or with `pgp` encrypted as it is written (as `<name>.pgp`). Into a directory: a
/// temporary file, synced, renamed into place. Into a bucket: streamed up, confirmed.
fn emit<T>(
    out: Dest<'_>,
    dir: &str,
    name: &str,
    pgp: Option<&crate::export::pgp::Recipients>,
    fill: impl FnOnce(&mut dyn Write) -> Result<T, Error>,
) -> Result<(Placed, T), Error> {
    let file_name = match pgp {
        Some(_) => format!("{name}.pgp"),
        None => name.to_string(),
    };
    let rel = format!("{dir}/{file_name}");
    match out {
        Dest::Dir(root) => {
            let target = root.join(dir);
            fs::create_dir_all(&target)?;
            let mut tmp = temp_in(root)?;
            let made = {
                let mut w = BufWriter::with_capacity(1 << 16, tmp.as_file_mut());
                let made = through(pgp, name, &mut w, fill)?;
                w.flush()?;
                made
            };
            tmp.as_file().sync_all()?;
            let path = target.join(&file_name);
            persist(tmp, &path)?;
            let (size, mtime_ns) = crate::export::bulk::stamp(&path)?;
            let placed = Placed {
                rel,
                shown: path.display().to_string(),
                size,
                mtime_ns,
                etag: None,
            };
            Ok((placed, made))
        }
        #[cfg(feature = "appliance")]
        Dest::Bucket(b) => {
            let key = b.key(&rel);
            let mut w = b.writer(key.clone());
            let made = through(pgp, name, &mut w, fill)?;
            let written = w.finish()?;
            let placed = Placed {
                rel,
                shown: b.url(&key),
                size: written.size,
                mtime_ns: 0,
                etag: Some(written.etag),
            };
            Ok((placed, made))
        }
    }
}

/// Runs `fill` into `sink`: directly, or with `pgp` through a pipe in memory to the
/// encryptor on another thread (only ciphertext reaches `sink`). `name` is the literal
/// data's name inside the OpenPGP message.
fn through<T>(
    pgp: Option<&crate::export::pgp::Recipients>,
    name: &str,
    sink: &mut (dyn Write + Send),
    fill: impl FnOnce(&mut dyn Write) -> Result<T, Error>,
) -> Result<T, Error> {
    let Some(r) = pgp else {
        return fill(sink);
    };
    let (from, into) = io::pipe()?;
    std::thread::scope(|scope| {
        let encryptor = scope.spawn(move || {
            let mut sink = sink;
            r.encrypt_reader(from, name, &mut sink)?;
            sink.flush()?;
            Ok::<_, Error>(())
        });
        let made = {
            let mut w = BufWriter::with_capacity(1 << 16, into);
            let made = fill(&mut w);
            // Flushed and closed either way: the encryptor sees the end of its input.
            let flushed = w.flush();
            drop(w);
            made.and_then(|m| flushed.map(|()| m).map_err(Error::from))
        };
        let encrypted = encryptor
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the encryptor panicked".into())));
        let made = made?;
        encrypted?;
        Ok::<_, Error>(made)
    })
}

fn add_end(doc: &mut Value, created_ms: u64, end: Option<EndInfo>) {
    match end {
        Some(e) => {
            doc["end_reason"] = e.reason.name().into();
            doc["ended"] = Utc::from_unix_ms(e.ended_ms).rfc3339().into();
            doc["duration_s"] = (e.ended_ms.saturating_sub(created_ms) as f64 / 1000.0).into();
        }
        None => {
            doc["warning"] = "unterminated: the package has no end record (the recorder \
                              stopped abruptly); everything before the cut is exported"
                .into();
        }
    }
}

/// The longest name component taken from metadata, in bytes: with a recording id and `_`
/// before it (37 bytes) and `.pgp` after, a file name stays within the 255 bytes of Linux
/// file systems.
const MAX_NAME_BYTES: usize = 200;

/// A file name component from untrusted metadata: no separators, no leading dots, at most
/// [`MAX_NAME_BYTES`] bytes (cut on a character boundary).
fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches('.');
    let mut out = String::with_capacity(trimmed.len().min(MAX_NAME_BYTES));
    for c in trimmed.chars() {
        if out.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

fn temp_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".export.")
        .suffix(".partial")
        .tempfile_in(dir)
}

fn persist(tmp: tempfile::NamedTempFile, dest: &Path) -> io::Result<()> {
    tmp.persist(dest).map(drop).map_err(|e| e.error)
}

fn stream_stats(survey: &Survey) -> Value {
    let mut out = Vec::new();
    for (i, (s, c)) in survey.streams.iter().zip(&survey.counts).enumerate() {
        out.push(json!({
            "index": i,
            "opened": s.opened,
            "ssrc": s.ssrc,
            "local": s.local.to_string(),
            "remote": s.remote.to_string(),
            "payload_type": s.payload_type,
            "codec": codec_name(s.payload_type),
            "packets": c.packets,
            "lost": c.lost(),
            "duplicates": c.duplicates,
            "reordered": c.reordered,
            "first_packet_ms": c.first.map(|f| f as f64 / 1000.0),
            "duration_s": c.first.map(|f| (c.last - f) as f64 / 1_000_000.0),
        }));
    }
    Value::Array(out)
}

/// A stream carrying audio WAV export cannot decode, named with its codec: a static
/// payload type other than G.711, comfort noise aside (RFC 3551), or a dynamic one the
/// recording's SIPREC metadata names as something other than telephone-events or comfort
/// noise. A dynamic payload type no metadata names is taken as telephone-events (what an
/// ingest-port call carries besides G.711), so its stream exports as it always did.
fn undecodable(d: &Decoded) -> Option<String> {
    let named = |stream: usize, pt: u8| -> Option<String> {
        let streams = d.metadata.get("siprec")?.get("streams")?.as_array()?;
        let s = streams
            .iter()
            .find(|s| s["stream"].as_u64() == Some(stream as u64))?;
        s["codecs"]
            .as_array()?
            .iter()
            .find(|c| c["payload_type"].as_u64() == Some(u64::from(pt)))
            .and_then(|c| c["name"].as_str().map(str::to_string))
    };
    for (i, c) in d.survey.counts.iter().enumerate() {
        for &pt in &c.others {
            let name =
                named(i, pt).or_else(|| crate::siprec::sdp::static_payload(pt).map(str::to_string));
            let Some(name) = name else { continue };
            let encoding = name.split('/').next().unwrap_or("").to_ascii_lowercase();
            if !matches!(encoding.as_str(), "telephone-event" | "cn") {
                return Some(format!("stream {i} carries {name} (payload type {pt})"));
            }
        }
    }
    None
}

fn codec_name(pt: u8) -> &'static str {
    match pt {
        0 => "PCMU",
        8 => "PCMA",
        _ => "unsupported",
    }
}

/// Where a stream's RTP timestamps sit on the recording's timeline.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    /// Extended timestamp at the anchor.
    ts: i64,
    /// Sample position at the anchor.
    pos: i64,
    /// The last timestamp seen (to extend the next across wrap-around).
    last_ts: u32,
    /// The last timestamp, extended.
    ext: i64,
    /// The SSRC the timestamps belong to.
    ssrc: u32,
}

/// Places each stream's samples on the recording's timeline (see the module docs): the same
/// packets in the same order give the same places, in both passes.
#[derive(Default)]
struct Placer {
    anchors: Vec<Option<Anchor>>,
}

impl Placer {
    /// Where the samples of an RTP packet of stream `i` start, if it carries G.711 and lands
    /// on the timeline (not before its start).
    fn place(&mut self, i: usize, arrival_us: u64, h: &RtpHeader) -> Option<u64> {
        crate::media::g711::table(h.payload_type)?;
        if self.anchors.len() <= i {
            self.anchors.resize(i + 1, None);
        }
        let arrival_pos =
            i64::try_from(arrival_us / 1000 * 8 + arrival_us % 1000 * 8 / 1000).unwrap_or(i64::MAX);
        let pos = match self.anchors[i].as_mut() {
            Some(a) if a.ssrc == h.ssrc => {
                a.ext += i64::from(h.timestamp.wrapping_sub(a.last_ts) as i32);
                a.last_ts = h.timestamp;
                let pos = a.pos.saturating_add(a.ext - a.ts);
                if (pos.saturating_sub(arrival_pos)).abs() > 8000 {
                    // The timestamp disagrees with the clock by over a second: re-anchor.
                    a.ts = a.ext;
                    a.pos = arrival_pos;
                    arrival_pos
                } else {
                    pos
                }
            }
            _ => {
                self.anchors[i] = Some(Anchor {
                    ts: 0,
                    pos: arrival_pos,
                    last_ts: h.timestamp,
                    ext: 0,
                    ssrc: h.ssrc,
                });
                arrival_pos
            }
        };
        u64::try_from(pos).ok()
    }
}

/// Frames of audio a stream keeps before they are written: 8 s. A sample lands at most a
/// second from its packet's arrival (the re-anchoring rule), and packets come in arrival
/// order, so whatever lies more than 4 s behind the newest packet is final.
const WINDOW: u64 = 64_000;

/// The streaming WAV renderer: packets in, 16-bit PCM frames out, with only a window of
/// each stream's samples in memory. The total length is known beforehand (the survey), so
/// the header is written first and nothing needs a seek.
struct Renderer<'w> {
    placer: Placer,
    channels: usize,
    /// Each stream's samples for the frames `base..base + WINDOW`.
    window: Vec<Vec<i16>>,
    base: u64,
    total: u64,
    out: &'w mut dyn Write,
    block: Vec<u8>,
}

impl<'w> Renderer<'w> {
    fn new(streams: usize, total: u64, out: &'w mut dyn Write) -> io::Result<Renderer<'w>> {
        let channels = streams.max(1);
        let data = total * channels as u64 * 2;
        let data = u32::try_from(data).map_err(|_| io::Error::other("WAV: too long"))?;
        // The canonical 44-byte header of 16-bit PCM at 8 kHz.
        let mut h = Vec::with_capacity(44);
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&(36 + data).to_le_bytes());
        h.extend_from_slice(b"WAVEfmt ");
        h.extend_from_slice(&16u32.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&(channels as u16).to_le_bytes());
        h.extend_from_slice(&8000u32.to_le_bytes());
        h.extend_from_slice(&(8000 * 2 * channels as u32).to_le_bytes());
        h.extend_from_slice(&(2 * channels as u16).to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(b"data");
        h.extend_from_slice(&data.to_le_bytes());
        out.write_all(&h)?;
        Ok(Renderer {
            placer: Placer::default(),
            channels,
            window: vec![vec![0; WINDOW as usize]; streams],
            base: 0,
            total,
            out,
            block: Vec::new(),
        })
    }

    /// Writes the frames `base..until` (as far as the total) and moves the window on, at
    /// most a window's worth at a time (a long silence is written in pieces).
    fn flush_to(&mut self, until: u64) -> io::Result<()> {
        let until = until.min(self.total).max(self.base);
        while self.base < until {
            let n = (until - self.base).min(WINDOW) as usize;
            self.block.clear();
            self.block.reserve(n * self.channels * 2);
            for f in 0..n {
                if self.window.is_empty() {
                    self.block.extend_from_slice(&[0, 0]);
                }
                for ch in &self.window {
                    self.block.extend_from_slice(&ch[f].to_le_bytes());
                }
            }
            self.out.write_all(&self.block)?;
            for ch in &mut self.window {
                ch.copy_within(n.., 0);
                let len = ch.len();
                ch[len - n..].fill(0);
            }
            self.base += n as u64;
        }
        Ok(())
    }

    fn packet(&mut self, stream: usize, arrival_us: u64, bytes: &[u8]) -> Result<(), Error> {
        if stream >= self.window.len() {
            return Ok(());
        }
        let Ok(Datagram::Rtp(h)) = classify(bytes) else {
            return Ok(());
        };
        let Some(pos) = self.placer.place(stream, arrival_us, &h) else {
            return Ok(());
        };
        let Some(decode) = crate::media::g711::table(h.payload_type) else {
            return Ok(());
        };
        let payload = &bytes[h.payload_offset..h.payload_offset + h.payload_len];
        let end = pos.saturating_add(payload.len() as u64).min(self.total);
        // Move the window on by halves until the packet fits in it.
        while end > self.base + WINDOW {
            let half = self.base + WINDOW / 2;
            self.flush_to(half.max(end - WINDOW))?;
        }
        // Samples before the window were written already (a packet more than 4 s late).
        let skip = self.base.saturating_sub(pos) as usize;
        let ch = &mut self.window[stream];
        for (k, b) in payload.iter().enumerate().skip(skip) {
            let f = pos + k as u64;
            if f >= end {
                break;
            }
            ch[(f - self.base) as usize] = decode[usize::from(*b)];
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        self.flush_to(self.total)
    }
}

fn write_pcap(d: &Decoded, keys: &dyn Unwrapper, out: &mut dyn Write) -> Result<(), Error> {
    let (streams, created_ms) = (&d.survey.streams, d.header.created_ms);
    use pcap_file::DataLink;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let header = PcapHeader {
        datalink: DataLink::RAW,
        ..PcapHeader::default()
    };
    let pcap_err = |e: pcap_file::PcapError| Error::Io(io::Error::other(format!("pcap: {e}")));
    let mut w = PcapWriter::with_header(out, header).map_err(pcap_err)?;
    let mut frame = Vec::with_capacity(2048);
    each_packet(d, keys, |stream, arrival_us, bytes, rtcp| {
        let stream = if stream == NO_STREAM {
            0
        } else {
            usize::from(stream)
        };
        let Some(s) = streams.get(stream) else {
            return Ok(());
        };
        let (mut src, mut dst) = (s.remote, s.local);
        if rtcp {
            src.set_port(src.port().wrapping_add(1));
            dst.set_port(dst.port().wrapping_add(1));
        }
        frame.clear();
        if !udp_frame(src, dst, bytes, &mut frame) {
            return Ok(());
        }
        let ts = Duration::from_micros(created_ms.saturating_mul(1000).saturating_add(arrival_us));
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        w.write_packet(&PcapPacket::new(ts, len, &frame))
            .map_err(pcap_err)?;
        Ok(())
    })
}

/// An IPv4 or IPv6 + UDP frame, checksums computed. False if the families differ.
fn udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8], out: &mut Vec<u8>) -> bool {
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
        }
        _ => return false,
    };
    b.udp(src.port(), dst.port()).write(out, payload).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16, ts: u32, ssrc: u32, payload: &[u8], pt: u8) -> Vec<u8> {
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn pause_and_resume_events_make_spans() {
        assert_eq!(
            paused_spans(&[(100_000, true), (7_000_000, false), (8_000_000, true)]),
            vec![(100.0, Some(7000.0)), (8000.0, None)]
        );
        assert_eq!(
            paused_spans(&[(1, false), (2_000, true), (3_000, true), (5_000, false)]),
            vec![(2.0, Some(5.0))],
            "a stray resume and a second pause change nothing"
        );
        assert!(paused_spans(&[]).is_empty());
    }

    /// What both passes make of `packets` for a recording of `streams` streams: the
    /// survey's length, then the rendered WAV read back, a sample vector per channel.
    fn render(packets: Vec<(u8, u64, Vec<u8>)>, streams: usize) -> Vec<Vec<i16>> {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut survey = Survey::default();
        for s in 0..streams {
            survey
                .entry(
                    Entry::StreamOpened {
                        stream: s as u8,
                        ssrc: s as u32,
                        local: addr,
                        remote: addr,
                        payload_type: 0,
                        label: "",
                    },
                    u64::MAX,
                )
                .unwrap();
        }
        for (stream, arrival_us, packet) in &packets {
            survey
                .entry(
                    Entry::Rtp {
                        stream: *stream,
                        arrival_us: *arrival_us,
                        packet,
                    },
                    u64::MAX,
                )
                .unwrap();
        }
        let mut wav = Vec::new();
        let mut r = Renderer::new(streams, survey.frames(), &mut wav).unwrap();
        for (stream, arrival_us, packet) in &packets {
            r.packet(usize::from(*stream), *arrival_us, packet).unwrap();
        }
        r.finish().unwrap();
        let read = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
        let n = usize::from(read.spec().channels);
        let samples: Vec<i16> = read.into_samples::<i16>().map(Result::unwrap).collect();
        let mut out = vec![Vec::new(); n];
        for (k, v) in samples.into_iter().enumerate() {
            out[k % n].push(v);
        }
        // Each stream's own length, as the renderer of before gave it (silence after its
        // last sample is the WAV's padding).
        for (ch, end) in out.iter_mut().zip(&survey.ends) {
            ch.truncate(*end as usize);
        }
        out
    }

    #[test]
    fn streams_align_by_timestamp_with_silence_for_gaps_and_late_starts() {
        let loud = crate::media::g711::linear_to_ulaw(8000);
        let ch = render(
            vec![
                // Stream 0: packets 0, 1, (2 lost), 3 of 160 samples each.
                (0, 0, rtp(0, 1000, 7, &[loud; 160], 0)),
                (0, 20_000, rtp(1, 1160, 7, &[loud; 160], 0)),
                (0, 60_000, rtp(3, 1480, 7, &[loud; 160], 0)),
                // Stream 1 starts 40 ms late, with 10 ms packets (80 samples).
                (1, 40_000, rtp(9, 5, 8, &[loud; 80], 0)),
                (1, 50_000, rtp(10, 85, 8, &[loud; 80], 0)),
            ],
            2,
        );
        assert_eq!(ch[0].len(), 640);
        assert!(ch[0][..320].iter().all(|s| *s > 7000));
        assert!(
            ch[0][320..480].iter().all(|s| *s == 0),
            "the lost packet is silence"
        );
        assert!(ch[0][480..].iter().all(|s| *s > 7000));
        assert_eq!(ch[1].len(), 480);
        assert!(
            ch[1][..320].iter().all(|s| *s == 0),
            "a late start is silence"
        );
        assert!(ch[1][320..].iter().all(|s| *s > 7000));
    }

    #[test]
    fn a_timestamp_jump_reanchors_at_arrival() {
        let ch = render(
            vec![
                (0, 0, rtp(0, 0, 7, &[0x00; 160], 0)),
                (0, 20_000, rtp(1, 4_000_000, 7, &[0x00; 160], 0)),
            ],
            1,
        );
        assert_eq!(ch[0].len(), 320, "placed at its arrival, not 500 s later");
    }

    #[test]
    fn file_names_from_metadata_are_made_safe() {
        assert_eq!(sanitize("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(sanitize("chat.txt"), "chat.txt");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize(".hidden"), "hidden");
        // Cut by bytes, not characters: 200 four-byte characters would be 800 bytes, far
        // past a file name's 255.
        let emoji = sanitize(&"😀".repeat(200));
        assert_eq!(emoji.len(), 200);
        assert_eq!(emoji, "😀".repeat(50));
        let mixed = sanitize(&format!("a{}", "é".repeat(150)));
        assert!(mixed.len() <= 200 && mixed.is_char_boundary(mixed.len()));
    }
}
