//! The EREC v1 package format: byte layout, limits and the structural (keyless) checks.
//!
//! This module owns the bytes. It has no key, no I/O and no clock: it encodes a header from
//! its fields, decodes a header or a record frame from a byte slice (answering
//! [`Decoded::Need`] when more bytes are needed, so callers read exactly what is asked), and
//! walks a whole package by its record lengths without any key ([`walk`]). The cryptography
//! that fills and checks the MAC and tag fields lives in [`crate::crypto`]; the streaming
//! reader and writer that combine both live in [`crate::reader`] and [`crate::writer`].
//!
//! Invariant: every length read from the input is checked against the limits below before
//! anything is allocated for it, and trailing bytes are never ignored.
//!
//! The specification is `docs/format.md` in the repository, included below.
#![doc = include_str!("../../../docs/format.md")]

use serde_json::{Map, Value};

/// The 8 magic bytes that open every package (PNG-style: high bit, name, CR LF, ^Z).
pub const MAGIC: [u8; 8] = [0x89, b'E', b'R', b'E', b'C', 0x0D, 0x0A, 0x1A];
/// The only version this implementation reads and writes.
pub const VERSION: u8 = 1;
/// Suite 1: HKDF-SHA256, AES-256-CTR, HMAC-SHA256.
pub const SUITE: u8 = 1;
/// Smallest allowed max chunk length.
pub const MIN_MAX_CHUNK: u32 = 4096;
/// Largest allowed max chunk length (16 MiB).
pub const MAX_MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Bytes of the record prefix: index, kind, length.
pub const RECORD_PREFIX_LEN: usize = 9;
/// Bytes of a tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;
/// Overhead of one record: prefix and tag.
pub const RECORD_OVERHEAD: usize = RECORD_PREFIX_LEN + TAG_LEN;
/// Plaintext length of the end record.
pub const END_LEN: usize = 21;
/// Bytes of a kek id.
pub const KEK_ID_LEN: usize = 32;
/// At most this many recipients.
pub const MAX_RECIPIENTS: usize = 4;
/// Sealed DEK lengths allowed: RSA-3072 .. RSA-4096 moduli.
pub const SEALED_DEK_MIN: usize = 384;
/// See [`SEALED_DEK_MIN`].
pub const SEALED_DEK_MAX: usize = 512;
/// Bytes before the first variable field: magic .. recipient count.
pub const FIXED_HEADER_LEN: usize = 8 + 1 + 1 + 2 + 16 + 8 + 4 + 8 + 1;
/// Bytes needed to learn the header length (magic, version, suite, length).
pub const HEADER_PREAMBLE_LEN: usize = 12;
/// Smallest header: one recipient with a 384-byte sealed DEK, `{"media":"rtp"}`, the MAC.
pub const MIN_HEADER_LEN: usize =
    FIXED_HEADER_LEN + KEK_ID_LEN + 1 + 2 + SEALED_DEK_MIN + 2 + 15 + TAG_LEN;

/// What a decoder says about the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The value and how many bytes of the input it used.
    Done(T, usize),
    /// At least this many bytes in all are needed before it can decide.
    Need(usize),
}

/// A structural failure: what is wrong with the bytes, with no secret involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The version or suite is not one this implementation knows.
    #[error("unsupported package version {version} or suite {suite}")]
    Unsupported {
        /// The version byte read.
        version: u8,
        /// The suite byte read.
        suite: u8,
    },
    /// Any other structural failure; the text names the check.
    #[error("{0}")]
    Corrupt(&'static str),
}

/// How a DEK is sealed to a recipient's RSA key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wrap {
    /// Wrap 1: RSA-OAEP with SHA-256, MGF1-SHA-256 and the label `EREC/dek` (the default).
    OaepSha256,
    /// Wrap 2: RSA-OAEP with SHA-1, MGF1-SHA-1 and no label, for contract LKMs.
    OaepSha1,
}

impl Wrap {
    /// The byte written in the header.
    pub fn code(self) -> u8 {
        match self {
            Wrap::OaepSha256 => 1,
            Wrap::OaepSha1 => 2,
        }
    }

    /// The wrap for a header byte, if it is one.
    pub fn from_code(code: u8) -> Option<Wrap> {
        match code {
            1 => Some(Wrap::OaepSha256),
            2 => Some(Wrap::OaepSha1),
            _ => None,
        }
    }

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Wrap::OaepSha256 => "oaep-sha256",
            Wrap::OaepSha1 => "oaep-sha1",
        }
    }
}

/// The kind byte of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 0x01: media plaintext (RTP entries or file bytes).
    Media,
    /// 0x02: one JSON object of metadata.
    Metadata,
    /// 0x83: the end record, the one record with the FINAL bit.
    End,
}

impl Kind {
    /// The byte written in the record.
    pub fn code(self) -> u8 {
        match self {
            Kind::Media => 0x01,
            Kind::Metadata => 0x02,
            Kind::End => 0x83,
        }
    }

    /// The kind for a record byte; anything but the three exact values is corrupt.
    pub fn from_code(code: u8) -> Option<Kind> {
        match code {
            0x01 => Some(Kind::Media),
            0x02 => Some(Kind::Metadata),
            0x83 => Some(Kind::End),
            _ => None,
        }
    }
}

/// Why a recording ended, as stored in the end record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// 0: a sealed file, or an explicit stop.
    Complete,
    /// 1: RTCP BYE.
    RtcpBye,
    /// 2: no RTP for the idle timeout.
    IdleTimeout,
    /// 3: the maximum duration was reached (a continuation follows).
    MaxDuration,
    /// 4: the appliance shut down.
    Shutdown,
    /// 5: an error ended it.
    Error,
}

impl EndReason {
    /// All reasons in code order.
    pub const ALL: [EndReason; 6] = [
        EndReason::Complete,
        EndReason::RtcpBye,
        EndReason::IdleTimeout,
        EndReason::MaxDuration,
        EndReason::Shutdown,
        EndReason::Error,
    ];

    /// The byte stored in the end record.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The reason for a byte; codes above 5 are corrupt in v1.
    pub fn from_code(code: u8) -> Option<EndReason> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// The label used in metrics and JSON.
    pub fn name(self) -> &'static str {
        match self {
            EndReason::Complete => "complete",
            EndReason::RtcpBye => "rtcp_bye",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::MaxDuration => "max_duration",
            EndReason::Shutdown => "shutdown",
            EndReason::Error => "error",
        }
    }
}

/// One recipient of the DEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// SHA-256 of the recipient key's canonical SPKI DER.
    pub kek_id: [u8; KEK_ID_LEN],
    /// How the DEK is sealed.
    pub wrap: Wrap,
    /// The RSA-OAEP ciphertext of the DEK.
    pub sealed_dek: Vec<u8>,
}

/// A package header. [`Header::encode_body`] gives the bytes the MAC covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The recording id (UUIDv7 bytes).
    pub recording_id: [u8; 16],
    /// The random nonce prefix of every chunk IV.
    pub nonce_prefix: [u8; 8],
    /// The largest record plaintext allowed in this package.
    pub max_chunk: u32,
    /// Creation time, unix ms.
    pub created_ms: u64,
    /// 1 to 4 recipients with distinct kek ids.
    pub recipients: Vec<Recipient>,
    /// The public metadata, a JSON object, exactly as stored.
    pub metadata: Vec<u8>,
    /// The header MAC.
    pub mac: [u8; TAG_LEN],
}

/// The public metadata's parsed form, as checked by [`check_public_metadata`].
pub type Metadata = Map<String, Value>;

/// Checks public metadata against decision 4 and returns the parsed object.
pub fn check_public_metadata(bytes: &[u8]) -> Result<Metadata, FormatError> {
    let obj = parse_json_object(bytes)
        .ok_or(FormatError::Corrupt("public metadata is not a JSON object"))?;
    match obj.get("media").and_then(Value::as_str) {
        Some("rtp") | Some("file") => {}
        _ => {
            return Err(FormatError::Corrupt(
                "public metadata lacks a valid \"media\"",
            ));
        }
    }
    if obj.get("continues").is_some_and(|v| !v.is_string()) {
        return Err(FormatError::Corrupt(
            "public metadata \"continues\" is not a string",
        ));
    }
    Ok(obj)
}

/// Parses bytes as a UTF-8 JSON object, or `None`.
pub fn parse_json_object(bytes: &[u8]) -> Option<Metadata> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Checks that 16 bytes are a UUIDv7 with the RFC 9562 variant (decision 1).
pub fn is_uuid_v7(id: &[u8; 16]) -> bool {
    id[6] >> 4 == 7 && id[8] >> 6 == 0b10
}

impl Header {
    /// The encoded length of the whole header, MAC included.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN
            + self
                .recipients
                .iter()
                .map(|r| KEK_ID_LEN + 1 + 2 + r.sealed_dek.len())
                .sum::<usize>()
            + 2
            + self.metadata.len()
            + TAG_LEN
    }

    /// Checks the fields a writer controls; the same rules the decoder enforces.
    pub fn validate(&self) -> Result<(), FormatError> {
        if !is_uuid_v7(&self.recording_id) {
            return Err(FormatError::Corrupt("recording id is not a UUIDv7"));
        }
        if !(MIN_MAX_CHUNK..=MAX_MAX_CHUNK).contains(&self.max_chunk) {
            return Err(FormatError::Corrupt("max chunk length out of range"));
        }
        if self.recipients.is_empty() || self.recipients.len() > MAX_RECIPIENTS {
            return Err(FormatError::Corrupt("recipient count out of range"));
        }
        for (i, r) in self.recipients.iter().enumerate() {
            if !(SEALED_DEK_MIN..=SEALED_DEK_MAX).contains(&r.sealed_dek.len()) {
                return Err(FormatError::Corrupt("sealed DEK length out of range"));
            }
            if self.recipients[..i].iter().any(|o| o.kek_id == r.kek_id) {
                return Err(FormatError::Corrupt("duplicate recipient kek id"));
            }
        }
        if self.metadata.len() > usize::from(u16::MAX) {
            return Err(FormatError::Corrupt("public metadata too long"));
        }
        check_public_metadata(&self.metadata)?;
        if self.encoded_len() > usize::from(u16::MAX) {
            return Err(FormatError::Corrupt("header too long"));
        }
        Ok(())
    }

    /// The header bytes before the MAC (what the MAC covers). Call [`Header::validate`]
    /// first: lengths that do not fit their fields are a programming error here.
    pub fn encode_body(&self) -> Vec<u8> {
        let len = self.encoded_len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(SUITE);
        out.extend_from_slice(&u16_len(len).to_be_bytes());
        out.extend_from_slice(&self.recording_id);
        out.extend_from_slice(&self.nonce_prefix);
        out.extend_from_slice(&self.max_chunk.to_be_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.push(u8::try_from(self.recipients.len()).expect("validated: at most 4 recipients"));
        for r in &self.recipients {
            out.extend_from_slice(&r.kek_id);
            out.push(r.wrap.code());
            out.extend_from_slice(&u16_len(r.sealed_dek.len()).to_be_bytes());
            out.extend_from_slice(&r.sealed_dek);
        }
        out.extend_from_slice(&u16_len(self.metadata.len()).to_be_bytes());
        out.extend_from_slice(&self.metadata);
        out
    }

    /// The whole header: body and MAC.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_body();
        out.extend_from_slice(&self.mac);
        out
    }

    /// Decodes a header from the start of `buf`. Answers `Need(n)` until `buf` holds the
    /// whole header (at most 65,535 bytes); never allocates more than the header's own size.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Header>, FormatError> {
        if buf.len() < HEADER_PREAMBLE_LEN {
            // Check what we already have, so that garbage fails fast.
            if !MAGIC.starts_with(&buf[..buf.len().min(8)]) {
                return Err(FormatError::Corrupt("not an EREC package (bad magic)"));
            }
            return Ok(Decoded::Need(HEADER_PREAMBLE_LEN));
        }
        if buf[..8] != MAGIC {
            return Err(FormatError::Corrupt("not an EREC package (bad magic)"));
        }
        let (version, suite) = (buf[8], buf[9]);
        if version != VERSION || suite != SUITE {
            return Err(FormatError::Unsupported { version, suite });
        }
        let len = usize::from(u16::from_be_bytes([buf[10], buf[11]]));
        if len < MIN_HEADER_LEN {
            return Err(FormatError::Corrupt("header length too small"));
        }
        if buf.len() < len {
            return Ok(Decoded::Need(len));
        }
        let mut r = Reader::new(&buf[HEADER_PREAMBLE_LEN..len]);
        let recording_id = r.array::<16>()?;
        if !is_uuid_v7(&recording_id) {
            return Err(FormatError::Corrupt("recording id is not a UUIDv7"));
        }
        let nonce_prefix = r.array::<8>()?;
        let max_chunk = r.u32()?;
        if !(MIN_MAX_CHUNK..=MAX_MAX_CHUNK).contains(&max_chunk) {
            return Err(FormatError::Corrupt("max chunk length out of range"));
        }
        let created_ms = r.u64()?;
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_RECIPIENTS {
            return Err(FormatError::Corrupt("recipient count out of range"));
        }
        let mut recipients: Vec<Recipient> = Vec::with_capacity(n);
        for _ in 0..n {
            let kek_id = r.array::<KEK_ID_LEN>()?;
            let wrap = Wrap::from_code(r.u8()?).ok_or(FormatError::Corrupt("unknown wrap"))?;
            let sealed_len = usize::from(r.u16()?);
            if !(SEALED_DEK_MIN..=SEALED_DEK_MAX).contains(&sealed_len) {
                return Err(FormatError::Corrupt("sealed DEK length out of range"));
            }
            let sealed_dek = r.bytes(sealed_len)?.to_vec();
            if recipients.iter().any(|o| o.kek_id == kek_id) {
                return Err(FormatError::Corrupt("duplicate recipient kek id"));
            }
            recipients.push(Recipient {
                kek_id,
                wrap,
                sealed_dek,
            });
        }
        let meta_len = usize::from(r.u16()?);
        let metadata = r.bytes(meta_len)?.to_vec();
        check_public_metadata(&metadata)?;
        let mac = r.array::<TAG_LEN>()?;
        if !r.is_empty() {
            return Err(FormatError::Corrupt(
                "header length does not match its fields",
            ));
        }
        let header = Header {
            recording_id,
            nonce_prefix,
            max_chunk,
            created_ms,
            recipients,
            metadata,
            mac,
        };
        Ok(Decoded::Done(header, len))
    }
}

fn u16_len(n: usize) -> u16 {
    u16::try_from(n).expect("validated: header fields fit in u16 lengths")
}

/// A record frame as found in the bytes: still encrypted, not yet authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The record index.
    pub index: u32,
    /// The record kind.
    pub kind: Kind,
    /// The ciphertext length L.
    pub len: u32,
}

impl Frame {
    /// Total bytes of the record on disk.
    pub fn total_len(&self) -> usize {
        RECORD_OVERHEAD + self.len as usize
    }

    /// The 9 prefix bytes.
    pub fn prefix(&self) -> [u8; RECORD_PREFIX_LEN] {
        let mut p = [0u8; RECORD_PREFIX_LEN];
        p[..4].copy_from_slice(&self.index.to_be_bytes());
        p[4] = self.kind.code();
        p[5..].copy_from_slice(&self.len.to_be_bytes());
        p
    }

    /// Decodes and checks the 9-byte prefix of a record (kind, and length against
    /// `max_chunk`), so the caller knows how many more bytes to read before it reads them.
    /// `expected_index` is the index this record must carry.
    pub fn decode_prefix(
        prefix: &[u8; RECORD_PREFIX_LEN],
        max_chunk: u32,
        expected_index: u32,
    ) -> Result<Frame, FormatError> {
        let index = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let kind = Kind::from_code(prefix[4]).ok_or(FormatError::Corrupt("unknown record kind"))?;
        let len = u32::from_be_bytes([prefix[5], prefix[6], prefix[7], prefix[8]]);
        match kind {
            Kind::Media | Kind::Metadata if len == 0 || len > max_chunk => {
                return Err(FormatError::Corrupt("record length out of range"));
            }
            Kind::End if len as usize != END_LEN => {
                return Err(FormatError::Corrupt("end record length is not 21"));
            }
            _ => {}
        }
        if index != expected_index {
            return Err(FormatError::Corrupt("record index out of sequence"));
        }
        Ok(Frame { index, kind, len })
    }
}

/// The decoded plaintext of an end record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndInfo {
    /// Sum of L over the records before the end record.
    pub plaintext_bytes: u64,
    /// Number of records before the end record.
    pub records: u32,
    /// Why the recording ended.
    pub reason: EndReason,
    /// When it ended, unix ms.
    pub ended_ms: u64,
}

impl EndInfo {
    /// The 21 plaintext bytes.
    pub fn encode(&self) -> [u8; END_LEN] {
        let mut b = [0u8; END_LEN];
        b[..8].copy_from_slice(&self.plaintext_bytes.to_be_bytes());
        b[8..12].copy_from_slice(&self.records.to_be_bytes());
        b[12] = self.reason.code();
        b[13..].copy_from_slice(&self.ended_ms.to_be_bytes());
        b
    }

    /// Decodes the 21 plaintext bytes (after the tag was verified).
    pub fn decode(b: &[u8]) -> Result<EndInfo, FormatError> {
        let mut r = Reader::new(b);
        let plaintext_bytes = r.u64()?;
        let records = r.u32()?;
        let reason =
            EndReason::from_code(r.u8()?).ok_or(FormatError::Corrupt("unknown end reason"))?;
        let ended_ms = r.u64()?;
        if !r.is_empty() {
            return Err(FormatError::Corrupt("end record length is not 21"));
        }
        Ok(EndInfo {
            plaintext_bytes,
            records,
            reason,
            ended_ms,
        })
    }
}

/// What a keyless walk of a whole package found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// The header (its MAC not checked: that needs the key).
    pub header: Header,
    /// Header length in bytes.
    pub header_len: usize,
    /// Media and metadata records that are structurally whole.
    pub records: u32,
    /// Sum of their L.
    pub plaintext_bytes: u64,
    /// Whether the end record is present (then nothing follows it).
    pub terminated: bool,
    /// Bytes from the start up to the end of the last whole record: the length to keep.
    pub valid_len: u64,
    /// Bytes after `valid_len`: a torn tail (0 when terminated).
    pub torn_bytes: u64,
}

/// Why a keyless walk stopped: the bytes are wrong, or reading them failed.
#[derive(Debug)]
pub enum WalkError<E> {
    /// A structural failure.
    Format(FormatError),
    /// The caller's read failed.
    Read(E),
}

impl<E> From<FormatError> for WalkError<E> {
    fn from(e: FormatError) -> Self {
        WalkError::Format(e)
    }
}

/// Walks a package of `len` bytes by its record lengths, with no key: checks the header
/// structure and every record frame, stops at a torn tail. Tags are not checked (they need
/// the key). `read_at(offset, buf)` must fill `buf` from `offset`; it is only asked for
/// ranges inside `len`, at most 65,535 bytes at once, so a file is walked with a few reads
/// per record and no buffer the size of a chunk. Crash recovery and `inspect` use this.
pub fn walk_by<E>(
    len: u64,
    tail: Tail,
    mut read_at: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Walk, WalkError<E>> {
    let truncated = FormatError::Corrupt("file ends inside the header");
    let mut pre = [0u8; HEADER_PREAMBLE_LEN];
    let avail = usize::try_from(len.min(HEADER_PREAMBLE_LEN as u64)).expect("at most 12");
    read_at(0, &mut pre[..avail]).map_err(WalkError::Read)?;
    let need = match Header::decode(&pre[..avail])? {
        Decoded::Need(n) if avail == HEADER_PREAMBLE_LEN && n as u64 <= len => n,
        _ => return Err(truncated.into()),
    };
    let mut hbuf = vec![0u8; need];
    read_at(0, &mut hbuf).map_err(WalkError::Read)?;
    let (header, header_len) = match Header::decode(&hbuf)? {
        Decoded::Done(h, n) => (h, n),
        Decoded::Need(_) => return Err(truncated.into()),
    };
    let mut pos = header_len as u64;
    let mut records = 0u32;
    let mut plaintext_bytes = 0u64;
    let mut terminated = false;
    while len - pos >= RECORD_PREFIX_LEN as u64 {
        let mut prefix = [0u8; RECORD_PREFIX_LEN];
        read_at(pos, &mut prefix).map_err(WalkError::Read)?;
        let frame = match Frame::decode_prefix(&prefix, header.max_chunk, records) {
            Ok(f) => f,
            Err(_) if tail == Tail::CutInvalid => break, // garbage a crash left: torn
            Err(e) => return Err(e.into()),
        };
        if len - pos < frame.total_len() as u64 {
            break; // torn tail
        }
        pos += frame.total_len() as u64;
        if frame.kind == Kind::End {
            terminated = true;
            if pos != len {
                return Err(FormatError::Corrupt("bytes after the end record").into());
            }
            break;
        }
        records = records
            .checked_add(1)
            .ok_or(FormatError::Corrupt("too many records"))?;
        plaintext_bytes += u64::from(frame.len);
    }
    Ok(Walk {
        header,
        header_len,
        records,
        plaintext_bytes,
        terminated,
        valid_len: pos,
        torn_bytes: len - pos,
    })
}

/// How [`walk_by`] treats a record frame that fails the structural checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// It is corrupt (what readers and `inspect` do).
    Strict,
    /// It starts the torn tail (crash recovery: a crash can leave zeroed or stale blocks
    /// after the last record that reached the disk). See decision 7.
    CutInvalid,
}

/// [`walk_by`] over bytes in memory.
pub fn walk(buf: &[u8], tail: Tail) -> Result<Walk, FormatError> {
    let r = walk_by(buf.len() as u64, tail, |off, out| {
        let off = usize::try_from(off).expect("offset below a slice length");
        out.copy_from_slice(&buf[off..off + out.len()]);
        Ok::<(), std::convert::Infallible>(())
    });
    match r {
        Ok(w) => Ok(w),
        Err(WalkError::Format(e)) => Err(e),
        Err(WalkError::Read(never)) => match never {},
    }
}

/// A bounded reader over a byte slice: every read is checked against what remains.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.buf.len() < n {
            return Err(FormatError::Corrupt("field runs past the header length"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        Ok(self.bytes(N)?.try_into().expect("bytes(N) returns N bytes"))
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> Header {
        let mut id = [0x11u8; 16];
        id[6] = 0x70;
        id[8] = 0x80;
        Header {
            recording_id: id,
            nonce_prefix: [2; 8],
            max_chunk: 65536,
            created_ms: 1_700_000_000_000,
            recipients: vec![Recipient {
                kek_id: [3; 32],
                wrap: Wrap::OaepSha256,
                sealed_dek: vec![4; 384],
            }],
            metadata: br#"{"media":"rtp"}"#.to_vec(),
            mac: [5; 32],
        }
    }

    #[test]
    fn header_round_trip_and_min_len() {
        let h = sample_header();
        h.validate().unwrap();
        let bytes = h.encode();
        assert_eq!(bytes.len(), MIN_HEADER_LEN);
        assert_eq!(
            Header::decode(&bytes).unwrap(),
            Decoded::Done(h, bytes.len())
        );
    }

    #[test]
    fn header_asks_for_more_until_complete() {
        let bytes = sample_header().encode();
        assert_eq!(Header::decode(&bytes[..3]).unwrap(), Decoded::Need(12));
        assert_eq!(
            Header::decode(&bytes[..20]).unwrap(),
            Decoded::Need(bytes.len())
        );
        assert!(Header::decode(&[0u8; 3]).is_err());
    }

    #[test]
    fn header_rejects_each_bad_field() {
        let good = sample_header();
        let unsupported = |b: &mut Vec<u8>| b[8] = 2;
        let mut b = good.encode();
        unsupported(&mut b);
        assert_eq!(
            Header::decode(&b),
            Err(FormatError::Unsupported {
                version: 2,
                suite: 1
            })
        );
        type Mutation = Box<dyn Fn(&mut Header)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("v4 id", Box::new(|h| h.recording_id[6] = 0x40)),
            ("chunk small", Box::new(|h| h.max_chunk = 4095)),
            ("chunk big", Box::new(|h| h.max_chunk = MAX_MAX_CHUNK + 1)),
            ("no recipients", Box::new(|h| h.recipients.clear())),
            (
                "dup",
                Box::new(|h| {
                    let r = h.recipients[0].clone();
                    h.recipients.push(r)
                }),
            ),
            (
                "short dek",
                Box::new(|h| h.recipients[0].sealed_dek = vec![0; 383]),
            ),
            (
                "long dek",
                Box::new(|h| h.recipients[0].sealed_dek = vec![0; 513]),
            ),
            ("not json", Box::new(|h| h.metadata = b"nope".to_vec())),
            ("array", Box::new(|h| h.metadata = b"[1]".to_vec())),
            ("no media", Box::new(|h| h.metadata = b"{\"a\":1}".to_vec())),
            (
                "bad media",
                Box::new(|h| h.metadata = b"{\"media\":\"x\"}".to_vec()),
            ),
            (
                "continues",
                Box::new(|h| h.metadata = br#"{"media":"rtp","continues":1}"#.to_vec()),
            ),
        ];
        for (name, mutate) in cases {
            let mut h = good.clone();
            mutate(&mut h);
            assert!(h.validate().is_err(), "{name} validated");
            // Encode anyway (bypassing validate) where lengths still fit, and decode.
            if h.recipients.len() <= 4 && !h.recipients.is_empty() {
                let bytes = h.encode();
                assert!(
                    matches!(Header::decode(&bytes), Err(FormatError::Corrupt(_))),
                    "{name} decoded"
                );
            }
        }
    }

    #[test]
    fn header_length_must_match() {
        let mut b = sample_header().encode();
        b.push(0);
        let len = (b.len() as u16).to_be_bytes();
        b[10..12].copy_from_slice(&len);
        assert!(Header::decode(&b).is_err());
    }

    #[test]
    fn frame_prefix_checks() {
        let f = Frame {
            index: 7,
            kind: Kind::Media,
            len: 100,
        };
        assert_eq!(Frame::decode_prefix(&f.prefix(), 4096, 7), Ok(f));
        assert!(Frame::decode_prefix(&f.prefix(), 4096, 8).is_err());
        assert!(Frame::decode_prefix(&f.prefix(), 99, 7).is_err());
        let mut p = f.prefix();
        p[4] = 0x03;
        assert!(Frame::decode_prefix(&p, 4096, 7).is_err());
        let zero = Frame { len: 0, ..f };
        assert!(Frame::decode_prefix(&zero.prefix(), 4096, 7).is_err());
        let end = Frame {
            index: 7,
            kind: Kind::End,
            len: 21,
        };
        assert!(Frame::decode_prefix(&end.prefix(), 4096, 7).is_ok());
        let bad_end = Frame { len: 22, ..end };
        assert!(Frame::decode_prefix(&bad_end.prefix(), 4096, 7).is_err());
    }

    #[test]
    fn end_info_round_trip() {
        let e = EndInfo {
            plaintext_bytes: 1 << 40,
            records: 3,
            reason: EndReason::Shutdown,
            ended_ms: 42,
        };
        assert_eq!(EndInfo::decode(&e.encode()), Ok(e));
        let mut b = e.encode();
        b[12] = 6;
        assert!(EndInfo::decode(&b).is_err());
    }

    #[test]
    fn walk_finds_torn_tail() {
        let h = sample_header();
        let mut b = h.encode();
        let f = Frame {
            index: 0,
            kind: Kind::Media,
            len: 10,
        };
        b.extend_from_slice(&f.prefix());
        b.extend_from_slice(&[0; 10 + 32]);
        let whole = b.len();
        b.extend_from_slice(&[0, 0, 0, 1, 1]);
        let w = walk(&b, Tail::Strict).unwrap();
        assert_eq!((w.records, w.terminated), (1, false));
        assert_eq!(w.valid_len as usize, whole);
        assert_eq!(w.torn_bytes, 5);
        // Zeroes after a crash: corrupt to a reader, a torn tail to recovery.
        b.truncate(whole);
        b.extend_from_slice(&[0; 100]);
        assert!(walk(&b, Tail::Strict).is_err());
        let w = walk(&b, Tail::CutInvalid).unwrap();
        assert_eq!((w.valid_len as usize, w.torn_bytes), (whole, 100));
    }
}
