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
//! Invariants: outputs are written 0600 to a temporary name and renamed into place only
//! when complete; a package that fails verification produces no output at all; only
//! verified plaintext is ever written.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::clock::Utc;
use crate::entries::{Entry, Event, NO_STREAM, entries};
use crate::error::Error;
use crate::format::{EndInfo, Kind, parse_json_object};
use crate::keys::{KekId, Unwrapper};
use crate::reader::{PackageReader, ReadMode};
use crate::rtp::{Datagram, SeqOutcome, SeqTracker, classify};

/// The audio output format of `rtp` recordings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One channel per stream, 16-bit PCM.
    Wav,
    /// The original packets.
    Pcap,
}

/// What one export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The recording id.
    pub id: Uuid,
    /// The media file written.
    pub media: PathBuf,
    /// The metadata file written.
    pub metadata: PathBuf,
    /// False if the package had no end record (exported with a warning).
    pub terminated: bool,
}

struct Stream {
    ssrc: u32,
    local: SocketAddr,
    remote: SocketAddr,
    payload_type: u8,
}

struct Packet {
    stream: u8,
    arrival_us: u64,
    bytes: Vec<u8>,
    rtcp: bool,
}

/// Everything an `rtp` recording holds, collected from its verified records.
#[derive(Default)]
struct Call {
    streams: Vec<Stream>,
    packets: Vec<Packet>,
    events: Vec<Value>,
    /// Pause (true) and resume (false) events of the whole recording, µs.
    pauses: Vec<(u64, bool)>,
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

fn bad_entry(_: crate::entries::EntryError, record: u32) -> Error {
    Error::Corrupt {
        what: "media entries do not decode",
        record: Some(record),
    }
}

/// Exports one package file into `out`.
pub fn export_file(
    input: &Path,
    unwrapper: &dyn Unwrapper,
    out: &Path,
    format: Format,
) -> Result<Exported, Error> {
    export_file_to(input, unwrapper, out, format, None)
}

/// Exports one package file into `out`, each output encrypted to `pgp` (as `<name>.pgp`)
/// when given.
pub fn export_file_to(
    input: &Path,
    unwrapper: &dyn Unwrapper,
    out: &Path,
    format: Format,
    pgp: Option<&crate::pgp_out::Recipients>,
) -> Result<Exported, Error> {
    let persist = |tmp: tempfile::NamedTempFile, dest: &Path| -> Result<PathBuf, Error> {
        match pgp {
            None => {
                persist(tmp, dest)?;
                Ok(dest.to_path_buf())
            }
            Some(r) => {
                let name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut sealed = temp_in(out)?;
                r.encrypt(
                    tmp.path(),
                    &name,
                    &mut io::BufWriter::new(sealed.as_file_mut()),
                )?;
                sealed.as_file().sync_all()?;
                let mut dest = dest.as_os_str().to_owned();
                dest.push(".pgp");
                let dest = PathBuf::from(dest);
                persist(sealed, &dest)?;
                drop(tmp); // the plaintext temporary is removed here
                Ok(dest)
            }
        }
    };
    let file = File::open(input)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", input.display())))?;
    let mut reader = PackageReader::new(io::BufReader::new(file), unwrapper, ReadMode::Recovery)?;
    let header = reader.header().clone();
    let id = Uuid::from_bytes(header.recording_id);
    let public = parse_json_object(&header.metadata).unwrap_or_default();
    let media = public.get("media").and_then(Value::as_str).unwrap_or("");
    fs::create_dir_all(out)?;
    let mut file_tmp: Option<tempfile::NamedTempFile> = None;
    let mut call = Call::default();
    let mut records = 0u32;
    let mut media_bytes = 0u64;
    while let Some(rec) = reader.next_record()? {
        records += 1;
        if rec.kind != Kind::Media {
            continue;
        }
        media_bytes += rec.plaintext.len() as u64;
        if media == "file" {
            let tmp = match file_tmp.as_mut() {
                Some(t) => t,
                None => file_tmp.insert(temp_in(out)?),
            };
            tmp.write_all(&rec.plaintext)?;
            continue;
        }
        for e in entries(&rec.plaintext) {
            let e = e.map_err(|e| bad_entry(e, rec.index))?;
            if let Some((stream, arrival_us, packet, rtcp)) = e.as_packet() {
                call.packets.push(Packet {
                    stream,
                    arrival_us,
                    bytes: packet.to_vec(),
                    rtcp,
                });
                continue;
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
                    if usize::from(stream) == call.streams.len() {
                        call.streams.push(Stream {
                            ssrc,
                            local,
                            remote,
                            payload_type,
                        });
                    }
                }
                Entry::Event {
                    stream,
                    time_us,
                    event,
                } => {
                    if stream == NO_STREAM && matches!(event, Event::Pause | Event::Resume) {
                        call.pauses.push((time_us, event == Event::Pause));
                    }
                    call.events.push(json!({
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
                Entry::Rtp { .. } | Entry::Rtcp { .. } => {} // taken above
            }
        }
    }
    let end = reader.end();
    let metadata = reader.metadata().clone();
    let day = Utc::from_unix_ms(header.created_ms);
    let conversation = metadata
        .get("conversation_id")
        .and_then(Value::as_str)
        .map(sanitize)
        .unwrap_or_else(|| "untagged".to_string());
    let dir = out
        .join(format!("year={:04}", day.year))
        .join(format!("month={:02}", day.month))
        .join(format!("day={:02}", day.day))
        .join(format!("conversation_id={conversation}"));
    fs::create_dir_all(&dir)?;
    let mut doc = json!({
        "recording_id": id.hyphenated().to_string(),
        "created": day.rfc3339(),
        "created_ms": header.created_ms,
        "media": media,
        "kek_ids": header.recipients.iter().map(|r| KekId(r.kek_id).to_hex()).collect::<Vec<_>>(),
        "public_metadata": public,
        "metadata": metadata,
        "records": records,
        "media_bytes": media_bytes,
        "terminated": end.is_some(),
    });
    add_end(&mut doc, header.created_ms, end);
    let media_path = if media == "file" {
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .map(sanitize)
            .unwrap_or_else(|| "file".to_string());
        let path = dir.join(format!("{id}_{name}"));
        let tmp = match file_tmp {
            Some(t) => t,
            None => temp_in(out)?,
        };
        persist(tmp, &path)?
    } else {
        doc["streams"] = stream_stats(&call);
        doc["events"] = Value::Array(std::mem::take(&mut call.events));
        let paused = paused_spans(&call.pauses);
        if !paused.is_empty() {
            doc["paused"] = paused
                .iter()
                .map(|(from, to)| json!({ "from_ms": from, "to_ms": to }))
                .collect();
            doc["paused_note"] = json!(
                "recording was paused on request over these spans (times from the recording's \
                 start; to_ms null: to the end): no media was stored, the audio is silence there"
            );
        }
        let (ext, tmp) = match format {
            Format::Wav => {
                let (tmp, audio) = write_wav(&call, out)?;
                doc["audio"] = audio;
                ("wav", tmp)
            }
            Format::Pcap => ("pcap", write_pcap(&call, header.created_ms, out)?),
        };
        let path = dir.join(format!("{id}.{ext}"));
        persist(tmp, &path)?
    };
    let meta_path = dir.join(format!("{id}_metadata.json"));
    let mut tmp = temp_in(out)?;
    serde_json::to_writer_pretty(&mut tmp, &doc).map_err(io::Error::other)?;
    tmp.write_all(b"\n")?;
    let meta_path = persist(tmp, &meta_path)?;
    Ok(Exported {
        id,
        media: media_path,
        metadata: meta_path,
        terminated: end.is_some(),
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

fn stream_stats(call: &Call) -> Value {
    let mut out = Vec::new();
    for (i, s) in call.streams.iter().enumerate() {
        let mut tracker: Option<SeqTracker> = None;
        let (mut packets, mut reordered, mut duplicates, mut lost) = (0u64, 0u64, 0u64, 0u64);
        let (mut first, mut last) = (None, 0u64);
        let mut ssrc = None;
        for p in call
            .packets
            .iter()
            .filter(|p| usize::from(p.stream) == i && !p.rtcp)
        {
            let Ok(Datagram::Rtp(h)) = classify(&p.bytes) else {
                continue;
            };
            packets += 1;
            first.get_or_insert(p.arrival_us);
            last = p.arrival_us;
            if ssrc != Some(h.ssrc) {
                if let Some(t) = tracker.take() {
                    lost += t.lost();
                }
                ssrc = Some(h.ssrc);
                tracker = Some(SeqTracker::new(h.seq));
                continue;
            }
            if let Some(t) = tracker.as_mut() {
                match t.update(h.seq) {
                    SeqOutcome::Reordered => reordered += 1,
                    SeqOutcome::Duplicate => duplicates += 1,
                    _ => {}
                }
            }
        }
        if let Some(t) = tracker {
            lost += t.lost();
        }
        out.push(json!({
            "index": i,
            "ssrc": s.ssrc,
            "local": s.local.to_string(),
            "remote": s.remote.to_string(),
            "payload_type": s.payload_type,
            "codec": codec_name(s.payload_type),
            "packets": packets,
            "lost": lost,
            "duplicates": duplicates,
            "reordered": reordered,
            "first_packet_ms": first.map(|f| f as f64 / 1000.0),
            "duration_s": first.map(|f| (last - f) as f64 / 1_000_000.0),
        }));
    }
    Value::Array(out)
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

/// Places each stream's samples on the recording's timeline (see the module docs).
fn render(call: &Call) -> Vec<Vec<i16>> {
    let mut channels: Vec<Vec<i16>> = vec![Vec::new(); call.streams.len()];
    let mut anchors: Vec<Option<Anchor>> = vec![None; call.streams.len()];
    for p in call.packets.iter().filter(|p| !p.rtcp) {
        let i = usize::from(p.stream);
        if i >= channels.len() {
            continue;
        }
        let Ok(Datagram::Rtp(h)) = classify(&p.bytes) else {
            continue;
        };
        let Some(decode) = crate::g711::table(h.payload_type) else {
            continue;
        };
        let arrival_pos = i64::try_from(p.arrival_us * 8 / 1000).unwrap_or(i64::MAX);
        let pos = match anchors[i].as_mut() {
            Some(a) if a.ssrc == h.ssrc => {
                a.ext += i64::from(h.timestamp.wrapping_sub(a.last_ts) as i32);
                a.last_ts = h.timestamp;
                let pos = a.pos + (a.ext - a.ts);
                if (pos - arrival_pos).abs() > 8000 {
                    // The timestamp disagrees with the clock by over a second: re-anchor.
                    a.ts = a.ext;
                    a.pos = arrival_pos;
                    arrival_pos
                } else {
                    pos
                }
            }
            _ => {
                anchors[i] = Some(Anchor {
                    ts: 0,
                    pos: arrival_pos,
                    last_ts: h.timestamp,
                    ext: 0,
                    ssrc: h.ssrc,
                });
                arrival_pos
            }
        };
        let Ok(pos) = usize::try_from(pos) else {
            continue;
        };
        let payload = &p.bytes[h.payload_offset..h.payload_offset + h.payload_len];
        let ch = &mut channels[i];
        if ch.len() < pos + payload.len() {
            ch.resize(pos + payload.len(), 0);
        }
        for (d, b) in ch[pos..pos + payload.len()].iter_mut().zip(payload) {
            *d = decode[usize::from(*b)];
        }
    }
    channels
}

fn write_wav(call: &Call, out: &Path) -> Result<(tempfile::NamedTempFile, Value), Error> {
    let channels = render(call);
    let len = channels.iter().map(Vec::len).max().unwrap_or(0);
    let n = u16::try_from(channels.len().max(1)).unwrap_or(u16::MAX);
    let spec = hound::WavSpec {
        channels: n,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let tmp = temp_in(out)?;
    {
        let w = BufWriter::with_capacity(1 << 16, tmp.as_file().try_clone()?);
        let mut wav = hound::WavWriter::new(w, spec).map_err(wav_err)?;
        if u32::try_from(len * usize::from(n)).is_err() {
            return Err(Error::Io(io::Error::other(
                "WAV: more samples than a WAV file holds",
            )));
        }
        // In blocks of frames through the 16-bit writer, which takes exactly the samples it
        // was sized for without a check per sample.
        const FRAMES: usize = 16384;
        let mut t = 0;
        while t < len {
            let frames = FRAMES.min(len - t);
            let block = u32::try_from(frames * usize::from(n)).expect("checked above");
            let mut samples = wav.get_i16_writer(block);
            for f in t..t + frames {
                for ch in &channels {
                    samples.write_sample(ch.get(f).copied().unwrap_or(0));
                }
                // A call without streams still has one (silent) channel.
                if channels.is_empty() {
                    samples.write_sample(0);
                }
            }
            samples.flush().map_err(wav_err)?;
            t += frames;
        }
        wav.finalize().map_err(wav_err)?;
    }
    let audio = json!({
        "channels": n,
        "sample_rate": 8000,
        "samples": len,
        "duration_s": len as f64 / 8000.0,
    });
    Ok((tmp, audio))
}

fn wav_err(e: hound::Error) -> Error {
    Error::Io(io::Error::other(format!("WAV: {e}")))
}

fn write_pcap(call: &Call, created_ms: u64, out: &Path) -> Result<tempfile::NamedTempFile, Error> {
    use pcap_file::DataLink;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let tmp = temp_in(out)?;
    let header = PcapHeader {
        datalink: DataLink::RAW,
        ..PcapHeader::default()
    };
    let pcap_err = |e: pcap_file::PcapError| Error::Io(io::Error::other(format!("pcap: {e}")));
    let mut w = PcapWriter::with_header(BufWriter::new(tmp.as_file().try_clone()?), header)
        .map_err(pcap_err)?;
    let mut frame = Vec::with_capacity(2048);
    for p in &call.packets {
        let stream = if p.stream == NO_STREAM {
            0
        } else {
            usize::from(p.stream)
        };
        let Some(s) = call.streams.get(stream) else {
            continue;
        };
        let (mut src, mut dst) = (s.remote, s.local);
        if p.rtcp {
            src.set_port(src.port().wrapping_add(1));
            dst.set_port(dst.port().wrapping_add(1));
        }
        frame.clear();
        if !udp_frame(src, dst, &p.bytes, &mut frame) {
            continue;
        }
        let ts = Duration::from_micros(created_ms * 1000 + p.arrival_us);
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        w.write_packet(&PcapPacket::new(ts, len, &frame))
            .map_err(pcap_err)?;
    }
    w.into_writer().flush()?;
    Ok(tmp)
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

/// Every `.erec` file under `path` (itself, if it is a file), sorted.
pub fn find_packages(path: &Path) -> io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            // The entry's own type: a symlink is neither followed nor taken (one to `/` would
            // walk the whole machine, one to a package outside the store would export it).
            let t = e.file_type()?;
            let p = e.path();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "erec") {
                found.push(p);
            }
        }
    }
    found.sort();
    Ok(found)
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

    fn call(packets: Vec<(u8, u64, Vec<u8>)>, streams: usize) -> Call {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        Call {
            streams: (0..streams)
                .map(|i| Stream {
                    ssrc: i as u32,
                    local: addr,
                    remote: addr,
                    payload_type: 0,
                })
                .collect(),
            packets: packets
                .into_iter()
                .map(|(stream, arrival_us, bytes)| Packet {
                    stream,
                    arrival_us,
                    bytes,
                    rtcp: false,
                })
                .collect(),
            events: Vec::new(),
            pauses: Vec::new(),
        }
    }

    #[test]
    fn streams_align_by_timestamp_with_silence_for_gaps_and_late_starts() {
        let loud = crate::g711::linear_to_ulaw(8000);
        let c = call(
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
        let ch = render(&c);
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
        let c = call(
            vec![
                (0, 0, rtp(0, 0, 7, &[0x00; 160], 0)),
                (0, 20_000, rtp(1, 4_000_000, 7, &[0x00; 160], 0)),
            ],
            1,
        );
        assert_eq!(
            render(&c)[0].len(),
            320,
            "placed at its arrival, not 500 s later"
        );
    }

    #[test]
    fn a_store_walk_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let day = dir.path().join("2026/11/30");
        fs::create_dir_all(&day).unwrap();
        fs::write(day.join("a.erec"), b"x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("theirs.erec"), b"y").unwrap();
        // A loop back to the root, a directory elsewhere, a package elsewhere.
        std::os::unix::fs::symlink(dir.path(), day.join("loop")).unwrap();
        std::os::unix::fs::symlink(outside.path(), day.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("theirs.erec"), day.join("b.erec")).unwrap();
        assert_eq!(find_packages(dir.path()).unwrap(), [day.join("a.erec")]);
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
