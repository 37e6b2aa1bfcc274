//! The media plaintext of an `rtp` recording: a sequence of whole *entries*
//! (`type u8 ‖ length u16 ‖ body`) that never span chunks, so every chunk decodes alone.
//!
//! | type | body |
//! |---|---|
//! | 1 stream opened | stream u8 ‖ SSRC u32 ‖ local address ‖ remote address ‖ payload type u8 ‖ label (UTF-8, the rest) |
//! | 2 RTP packet | stream u8 ‖ arrival u64 ‖ the raw RTP packet |
//! | 3 event | stream u8 ‖ code u8 ‖ time u64 ‖ detail (1 gap: lost u32; 2 SSRC change: new SSRC u32; 3 pause, 4 resume: none) |
//! | 4 RTCP packet | stream u8 (0xFF: none) ‖ arrival u64 ‖ the raw RTCP packet |
//!
//! An address is `family u8 (4 or 6) ‖ 4 or 16 bytes ‖ port u16`; times are µs since the
//! package's *created*. Integers are big-endian.
//!
//! Invariants: encoding never produces an entry a decoder would refuse (bodies over 65,535
//! bytes are refused at encoding); decoding never panics, borrows from the chunk instead of
//! copying, and checks every length against what remains, so a chunk is either a sequence
//! of whole entries or an error naming the offset.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Stream index meaning "no stream" (RTCP that matches none).
pub const NO_STREAM: u8 = 0xFF;
/// Bytes before an entry's body: type and length.
pub const ENTRY_HEADER_LEN: usize = 3;

/// An event code of a type 3 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Packets were skipped: the count.
    Gap(u32),
    /// The stream's SSRC changed to this one.
    SsrcChange(u32),
    /// Recording paused (nothing stored until resume).
    Pause,
    /// Recording resumed.
    Resume,
}

/// One entry, borrowing its byte fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    /// Type 1: a stream begins.
    StreamOpened {
        /// Its index in the recording (0 ..= 254).
        stream: u8,
        /// Its first SSRC.
        ssrc: u32,
        /// The address the packets arrived at.
        local: SocketAddr,
        /// The address they came from.
        remote: SocketAddr,
        /// The payload type of its first packet.
        payload_type: u8,
        /// A free label (a leg name), UTF-8.
        label: &'a str,
    },
    /// Type 2: an RTP packet as received.
    Rtp {
        /// The stream it belongs to.
        stream: u8,
        /// Arrival, µs since created.
        arrival_us: u64,
        /// The raw packet.
        packet: &'a [u8],
    },
    /// Type 3: an event on a stream.
    Event {
        /// The stream.
        stream: u8,
        /// When, µs since created.
        time_us: u64,
        /// What.
        event: Event,
    },
    /// Type 4: an RTCP packet as received.
    Rtcp {
        /// The stream of its sender, or [`NO_STREAM`].
        stream: u8,
        /// Arrival, µs since created.
        arrival_us: u64,
        /// The raw compound packet.
        packet: &'a [u8],
    },
}

/// Why a chunk's entries did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed media entry at offset {offset}: {what}")]
pub struct EntryError {
    /// Where in the chunk.
    pub offset: usize,
    /// Which check.
    pub what: &'static str,
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn addr_len(a: &SocketAddr) -> usize {
    if a.is_ipv4() { 1 + 4 + 2 } else { 1 + 16 + 2 }
}

impl Entry<'_> {
    /// The entry's type byte.
    pub fn type_code(&self) -> u8 {
        match self {
            Entry::StreamOpened { .. } => 1,
            Entry::Rtp { .. } => 2,
            Entry::Event { .. } => 3,
            Entry::Rtcp { .. } => 4,
        }
    }

    /// For an RTP or RTCP entry: (stream, arrival µs, raw packet, is RTCP).
    pub fn as_packet(&self) -> Option<(u8, u64, &[u8], bool)> {
        match self {
            Entry::Rtp {
                stream,
                arrival_us,
                packet,
            } => Some((*stream, *arrival_us, packet, false)),
            Entry::Rtcp {
                stream,
                arrival_us,
                packet,
            } => Some((*stream, *arrival_us, packet, true)),
            _ => None,
        }
    }

    /// Body length in bytes.
    pub fn body_len(&self) -> usize {
        match self {
            Entry::StreamOpened {
                local,
                remote,
                label,
                ..
            } => 1 + 4 + addr_len(local) + addr_len(remote) + 1 + label.len(),
            Entry::Rtp { packet, .. } | Entry::Rtcp { packet, .. } => 1 + 8 + packet.len(),
            Entry::Event { event, .. } => {
                1 + 1
                    + 8
                    + match event {
                        Event::Gap(_) | Event::SsrcChange(_) => 4,
                        Event::Pause | Event::Resume => 0,
                    }
            }
        }
    }

    /// Encoded length: header and body.
    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER_LEN + self.body_len()
    }

    /// Appends the encoded entry; `None` (nothing written) if the body exceeds 65,535 bytes.
    pub fn encode(&self, out: &mut Vec<u8>) -> Option<()> {
        let len = u16::try_from(self.body_len()).ok()?;
        out.reserve(ENTRY_HEADER_LEN + usize::from(len));
        out.push(self.type_code());
        out.extend_from_slice(&len.to_be_bytes());
        match self {
            Entry::StreamOpened {
                stream,
                ssrc,
                local,
                remote,
                payload_type,
                label,
            } => {
                out.push(*stream);
                out.extend_from_slice(&ssrc.to_be_bytes());
                put_addr(out, local);
                put_addr(out, remote);
                out.push(*payload_type);
                out.extend_from_slice(label.as_bytes());
            }
            Entry::Rtp {
                stream,
                arrival_us,
                packet,
            }
            | Entry::Rtcp {
                stream,
                arrival_us,
                packet,
            } => {
                out.push(*stream);
                out.extend_from_slice(&arrival_us.to_be_bytes());
                out.extend_from_slice(packet);
            }
            Entry::Event {
                stream,
                time_us,
                event,
            } => {
                let (code, detail) = match event {
                    Event::Gap(n) => (1, Some(*n)),
                    Event::SsrcChange(s) => (2, Some(*s)),
                    Event::Pause => (3, None),
                    Event::Resume => (4, None),
                };
                out.push(*stream);
                out.push(code);
                out.extend_from_slice(&time_us.to_be_bytes());
                if let Some(d) = detail {
                    out.extend_from_slice(&d.to_be_bytes());
                }
            }
        }
        Some(())
    }
}

/// Iterates over the entries of one chunk of media plaintext.
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The entries of one chunk.
pub fn entries(chunk: &[u8]) -> Entries<'_> {
    Entries { buf: chunk, pos: 0 }
}

struct Body<'a> {
    b: &'a [u8],
    offset: usize,
}

impl<'a> Body<'a> {
    fn err(&self, what: &'static str) -> EntryError {
        EntryError {
            offset: self.offset,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EntryError> {
        if self.b.len() < n {
            return Err(self.err("entry body too short"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> Result<u8, EntryError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, EntryError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, EntryError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn addr(&mut self) -> Result<SocketAddr, EntryError> {
        let ip = match self.u8()? {
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(self.take(4)?);
                IpAddr::V4(Ipv4Addr::from(a))
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => return Err(self.err("address family is not 4 or 6")),
        };
        let p = self.take(2)?;
        Ok(SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])))
    }

    fn done(&self) -> Result<(), EntryError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err("bytes left over in an entry"))
        }
    }
}

fn decode_body(kind: u8, body: &[u8], offset: usize) -> Result<Entry<'_>, EntryError> {
    let mut b = Body { b: body, offset };
    let e = match kind {
        1 => {
            let stream = b.u8()?;
            let ssrc = b.u32()?;
            let local = b.addr()?;
            let remote = b.addr()?;
            let payload_type = b.u8()?;
            let label = std::str::from_utf8(b.b).map_err(|_| b.err("label is not UTF-8"))?;
            b.b = &[];
            Entry::StreamOpened {
                stream,
                ssrc,
                local,
                remote,
                payload_type,
                label,
            }
        }
        2 | 4 => {
            let stream = b.u8()?;
            let arrival_us = b.u64()?;
            let packet = std::mem::take(&mut b.b);
            if kind == 2 {
                Entry::Rtp {
                    stream,
                    arrival_us,
                    packet,
                }
            } else {
                Entry::Rtcp {
                    stream,
                    arrival_us,
                    packet,
                }
            }
        }
        3 => {
            let stream = b.u8()?;
            let code = b.u8()?;
            let time_us = b.u64()?;
            let event = match code {
                1 => Event::Gap(b.u32()?),
                2 => Event::SsrcChange(b.u32()?),
                3 => Event::Pause,
                4 => Event::Resume,
                _ => return Err(b.err("unknown event code")),
            };
            Entry::Event {
                stream,
                time_us,
                event,
            }
        }
        _ => return Err(b.err("unknown entry type")),
    };
    b.done()?;
    Ok(e)
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, EntryError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let offset = self.pos;
        if rest.len() < ENTRY_HEADER_LEN {
            self.pos = self.buf.len();
            return Some(Err(EntryError {
                offset,
                what: "entry header cut short",
            }));
        }
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        if rest.len() < ENTRY_HEADER_LEN + len {
            self.pos = self.buf.len();
            return Some(Err(EntryError {
                offset,
                what: "entry runs past the chunk",
            }));
        }
        self.pos += ENTRY_HEADER_LEN + len;
        let r = decode_body(
            rest[0],
            &rest[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + len],
            offset,
        );
        if r.is_err() {
            self.pos = self.buf.len();
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Entry<'static>> {
        vec![
            Entry::StreamOpened {
                stream: 0,
                ssrc: 0x0102_0304,
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "[2001:db8::1]:5004".parse().unwrap(),
                payload_type: 8,
                label: "leg-a ☎",
            },
            Entry::Rtp {
                stream: 0,
                arrival_us: 20_000,
                packet: &[0x80, 8, 0, 1, 0, 0, 0, 160, 1, 2, 3, 4, 0xd5],
            },
            Entry::Event {
                stream: 0,
                time_us: 40_000,
                event: Event::Gap(3),
            },
            Entry::Event {
                stream: 1,
                time_us: 41_000,
                event: Event::SsrcChange(9),
            },
            Entry::Event {
                stream: 1,
                time_us: 42_000,
                event: Event::Pause,
            },
            Entry::Event {
                stream: 1,
                time_us: 43_000,
                event: Event::Resume,
            },
            Entry::Rtcp {
                stream: NO_STREAM,
                arrival_us: 50_000,
                packet: &[0x81, 203, 0, 1, 1, 2, 3, 4],
            },
        ]
    }

    #[test]
    fn every_entry_round_trips() {
        let mut buf = Vec::new();
        for e in all() {
            let before = buf.len();
            e.encode(&mut buf).unwrap();
            assert_eq!(buf.len() - before, e.encoded_len());
        }
        let back: Vec<_> = entries(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, all());
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let big = vec![0u8; 65_535];
        let e = Entry::Rtp {
            stream: 0,
            arrival_us: 0,
            packet: &big,
        };
        let mut buf = Vec::new();
        assert!(e.encode(&mut buf).is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_chunks_are_errors_with_offsets() {
        let mut buf = Vec::new();
        all()[1].encode(&mut buf).unwrap();
        let good = buf.len();
        for (bytes, what) in [
            (vec![9, 0, 0], "unknown entry type"),
            (vec![2, 0, 5, 0, 0], "entry runs past the chunk"),
            (vec![2, 0], "entry header cut short"),
            (
                vec![3, 0, 10, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0],
                "unknown event code",
            ),
            (
                vec![3, 0, 11, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "bytes left over in an entry",
            ),
            (vec![2, 0, 4, 0, 0, 0, 0], "entry body too short"),
        ] {
            let mut chunk = buf.clone();
            chunk.extend_from_slice(&bytes);
            let r: Vec<_> = entries(&chunk).collect();
            assert_eq!(r.len(), 2, "{what}");
            assert_eq!(r[1], Err(EntryError { offset: good, what }));
        }
        let mut opened = Vec::new();
        all()[0].encode(&mut opened).unwrap();
        opened[3 + 5] = 5; // address family 5
        assert_eq!(
            entries(&opened).next(),
            Some(Err(EntryError {
                offset: 0,
                what: "address family is not 4 or 6"
            }))
        );
    }

    #[test]
    fn the_committed_fuzz_seed_decodes_whole_and_encodes_back() {
        // fuzz/seeds/media_decode/entries-chunk.bin: a stream, an RTP packet, a gap, a
        // pause and an RTCP packet, as the recorder writes them.
        let chunk = include_bytes!("../../../fuzz/seeds/media_decode/entries-chunk.bin");
        let list: Vec<Entry> = entries(chunk).collect::<Result<_, _>>().unwrap();
        assert_eq!(list.len(), 5);
        let mut again = Vec::new();
        for e in &list {
            e.encode(&mut again).unwrap();
        }
        assert_eq!(&again[..], &chunk[..]);
    }
}
