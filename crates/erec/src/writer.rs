//! The streaming package writer.
//!
//! [`Sealer`] is the sans-IO core: it makes the DEK, seals it to every recipient, derives the
//! package keys, builds the header and turns plaintext into encoded records, numbering them;
//! it keeps the counts the end record needs. It never sees a file: the caller appends the
//! bytes it returns wherever it likes (the recorder appends them to a spool file; the
//! [`seal_stream`] helper writes them to any `Write`, sealing on every core).
//!
//! Invariants:
//! - The DEK exists only inside [`Sealer::new`]; after that only the derived keys are held,
//!   zeroized on drop.
//! - Indexes are assigned by the sealer, 0, 1, 2 … with no gaps; a record longer than the
//!   package's max chunk or empty is refused, never split silently.
//! - [`Sealer::finish`] consumes the sealer: exactly one end record, with the true counts.
//!   A sealer dropped without `finish` leaves an unterminated package — what a crash leaves,
//!   and what readers report as such.

use std::io::{Read, Write};

use uuid::Uuid;

use crate::clock::now_ms;
use crate::crypto::{ChunkCipher, Dek, PackageKeys};
use crate::error::Error;
use crate::format::{
    EndInfo, EndReason, Header, Kind, MAX_MAX_CHUNK, MAX_RECIPIENTS, MIN_MAX_CHUNK, Metadata,
    RECORD_PREFIX_LEN, Recipient, TAG_LEN, Wrap,
};
use crate::keys::KekPublic;
use crate::pipeline::{BufPool, ordered_map};

/// What a package holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// RTP entries (calls).
    Rtp,
    /// A file's bytes (digital recordings, transcripts, anything sealed by `edgerec seal`).
    File,
}

impl Media {
    /// The value of the `"media"` key.
    pub fn name(self) -> &'static str {
        match self {
            Media::Rtp => "rtp",
            Media::File => "file",
        }
    }
}

/// How to seal a package.
#[derive(Debug, Clone)]
pub struct SealOptions {
    /// How the DEK is sealed to each recipient.
    pub wrap: Wrap,
    /// The largest record plaintext (4 KiB .. 16 MiB).
    pub max_chunk: u32,
    /// `"media"` of the public metadata.
    pub media: Media,
    /// Further public (non-sensitive) metadata keys; `"media"` is set from `media`.
    pub public: Metadata,
    /// The recording id; a fresh UUIDv7 when `None`.
    pub recording_id: Option<Uuid>,
    /// The creation time, unix ms; now when `None`.
    pub created_ms: Option<u64>,
}

impl Default for SealOptions {
    fn default() -> Self {
        SealOptions {
            wrap: Wrap::OaepSha256,
            // 1 MiB: large enough that the 41 bytes of overhead and the per-record setup are
            // negligible (0.004 %), small enough that reading stays a few MiB of memory.
            max_chunk: 1 << 20,
            media: Media::File,
            public: Metadata::new(),
            recording_id: None,
            created_ms: None,
        }
    }
}

/// Seals records of one package. See the module documentation.
#[derive(Debug)]
pub struct Sealer {
    header: Vec<u8>,
    recording_id: Uuid,
    max_chunk: u32,
    cipher: ChunkCipher,
    next_index: u32,
    plaintext_bytes: u64,
}

impl Sealer {
    /// Makes a fresh DEK, seals it to `recipients` (1 to 4, distinct) and builds the header.
    pub fn new(recipients: &[KekPublic], opts: &SealOptions) -> Result<Sealer, Error> {
        if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
            return Err(Error::Invalid(format!(
                "a package has 1 to {MAX_RECIPIENTS} recipients, not {}",
                recipients.len()
            )));
        }
        if !(MIN_MAX_CHUNK..=MAX_MAX_CHUNK).contains(&opts.max_chunk) {
            return Err(Error::Invalid(format!(
                "chunk size {} is outside {MIN_MAX_CHUNK} ..= {MAX_MAX_CHUNK}",
                opts.max_chunk
            )));
        }
        let recording_id = opts.recording_id.unwrap_or_else(Uuid::now_v7);
        let dek = Dek::generate().map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let mut sealed = Vec::with_capacity(recipients.len());
        for k in recipients {
            if sealed.iter().any(|r: &Recipient| r.kek_id == k.id().0) {
                return Err(Error::Invalid(format!("recipient {} given twice", k.id())));
            }
            sealed.push(Recipient {
                kek_id: k.id().0,
                wrap: opts.wrap,
                sealed_dek: k.seal(&dek, opts.wrap)?,
            });
        }
        let mut public = opts.public.clone();
        public.insert("media".into(), opts.media.name().into());
        let metadata = serde_json::to_vec(&public).expect("a JSON map always serializes");
        let mut nonce_prefix = [0u8; 8];
        getrandom::fill(&mut nonce_prefix).map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let mut header = Header {
            recording_id: *recording_id.as_bytes(),
            nonce_prefix,
            max_chunk: opts.max_chunk,
            created_ms: opts.created_ms.unwrap_or_else(now_ms),
            recipients: sealed,
            metadata,
            mac: [0; 32],
        };
        header
            .validate()
            .map_err(|e| Error::Invalid(format!("cannot build the header: {e}")))?;
        let keys = PackageKeys::derive(&dek, &header.recording_id);
        drop(dek);
        let body = header.encode_body();
        header.mac = keys.header_mac(&body);
        let cipher = ChunkCipher::new(keys, header.nonce_prefix, header.mac);
        Ok(Sealer {
            header: header.encode(),
            recording_id,
            max_chunk: opts.max_chunk,
            cipher,
            next_index: 0,
            plaintext_bytes: 0,
        })
    }

    /// The header bytes, to be written first.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    /// The recording id.
    pub fn recording_id(&self) -> Uuid {
        self.recording_id
    }

    /// The largest plaintext one record may hold.
    pub fn max_chunk(&self) -> usize {
        self.max_chunk as usize
    }

    /// Records sealed so far (the index the next one gets).
    pub fn records(&self) -> u32 {
        self.next_index
    }

    /// Plaintext bytes sealed so far.
    pub fn plaintext_bytes(&self) -> u64 {
        self.plaintext_bytes
    }

    /// The cipher, for sealing reserved records on other threads.
    pub fn cipher(&self) -> &ChunkCipher {
        &self.cipher
    }

    /// Reserves the next index for a record of `len` plaintext bytes and counts it. The
    /// caller must then seal exactly that record with [`ChunkCipher::seal_into`] and write
    /// records in index order. [`Sealer::seal`] does both at once.
    pub fn reserve(&mut self, len: usize) -> Result<u32, Error> {
        if len == 0 || len > self.max_chunk() {
            return Err(Error::Invalid(format!(
                "record of {len} bytes; records hold 1 to {} bytes",
                self.max_chunk
            )));
        }
        let index = self.next_index;
        self.next_index = index
            .checked_add(1)
            .filter(|n| *n < u32::MAX)
            .ok_or_else(|| Error::Invalid("package has the most records it can hold".into()))?;
        self.plaintext_bytes += len as u64;
        Ok(index)
    }

    /// Seals one media or metadata record and appends its bytes to `out`.
    pub fn seal(&mut self, kind: Kind, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if kind == Kind::End {
            return Err(Error::Invalid(
                "the end record is written by finish()".into(),
            ));
        }
        let index = self.reserve(plaintext.len())?;
        self.cipher.seal_into(index, kind, plaintext, out);
        Ok(())
    }

    /// Seals a metadata record holding one JSON object.
    pub fn seal_metadata(&mut self, meta: &Metadata, out: &mut Vec<u8>) -> Result<(), Error> {
        let bytes = serde_json::to_vec(meta).expect("a JSON map always serializes");
        self.seal(Kind::Metadata, &bytes, out)
    }

    /// Appends the end record and consumes the sealer.
    pub fn finish(self, reason: EndReason, ended_ms: u64, out: &mut Vec<u8>) -> EndInfo {
        let end = EndInfo {
            plaintext_bytes: self.plaintext_bytes,
            records: self.next_index,
            reason,
            ended_ms,
        };
        self.cipher
            .seal_into(self.next_index, Kind::End, &end.encode(), out);
        end
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Seals everything `input` holds as media records of full chunks (the last may be
/// shorter), on `workers` threads, writing header, records and end record to `output`.
/// Records already sealed through `sealer` (metadata at index 0, say) must have been
/// written to `output` by the caller after the header; pass `header_written = true` then.
pub fn seal_stream(
    mut sealer: Sealer,
    input: &mut (impl Read + Send),
    output: &mut impl Write,
    header_written: bool,
    workers: usize,
) -> Result<EndInfo, Error> {
    if !header_written {
        output.write_all(sealer.header_bytes())?;
    }
    let chunk = sealer.max_chunk();
    let cipher = sealer.cipher;
    let mut next_index = sealer.next_index;
    let mut plaintext_bytes = sealer.plaintext_bytes;
    let pool = BufPool::default();
    ordered_map(
        workers,
        || -> Result<Option<(u32, Vec<u8>)>, Error> {
            let mut buf = pool.take();
            // A recycled record is longer than this already: nothing is zeroed then.
            buf.resize(RECORD_PREFIX_LEN + chunk, 0);
            buf.reserve_exact(TAG_LEN);
            let n = read_full(input, &mut buf[RECORD_PREFIX_LEN..])?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(RECORD_PREFIX_LEN + n);
            let index = next_index;
            next_index = next_index
                .checked_add(1)
                .filter(|n| *n < u32::MAX)
                .ok_or_else(|| Error::Invalid("input too large for one package".into()))?;
            plaintext_bytes += n as u64;
            Ok(Some((index, buf)))
        },
        |(index, mut buf)| {
            cipher.seal_in_place(index, Kind::Media, &mut buf);
            Ok(buf)
        },
        |rec| {
            output.write_all(&rec)?;
            pool.give(rec);
            Ok(())
        },
    )?;
    sealer.cipher = cipher;
    sealer.next_index = next_index;
    sealer.plaintext_bytes = plaintext_bytes;
    let mut end = Vec::new();
    let info = sealer.finish(EndReason::Complete, now_ms(), &mut end);
    output.write_all(&end)?;
    output.flush()?;
    Ok(info)
}
