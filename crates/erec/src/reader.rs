//! The streaming package reader.
//!
//! [`open_header`] reads and checks the header, asks the [`Unwrapper`] for the DEK of a
//! recipient it holds, and verifies the header MAC. [`PackageReader`] then yields verified
//! records one at a time; [`open_stream`] decrypts a whole package to a `Write` on every
//! core. Both read one record frame at a time, so memory stays bounded by a few chunks
//! whatever the file claims.
//!
//! Invariants:
//! - Every length is checked against the header's limits before the bytes are read, and a
//!   record buffer grows only as bytes actually arrive.
//! - A record's tag is verified (constant time) before any of it is decrypted; only
//!   verified plaintext is released, in index order.
//! - Indexes must be consecutive from 0; the end record's counts must match what came
//!   before; nothing may follow it.
//! - A file that ends without the end record is *unterminated*: [`ReadMode::Strict`] fails
//!   with [`Error::Unterminated`] after releasing the verified prefix (the caller discards
//!   it), [`ReadMode::Recovery`] returns it as a result that says so.

use std::io::{ErrorKind, Read, Write};

use crate::crypto::{ChunkCipher, PackageKeys};
use crate::error::Error;
use crate::format::{
    Decoded, EndInfo, Frame, HEADER_PREAMBLE_LEN, Header, Kind, Metadata, RECORD_PREFIX_LEN,
    TAG_LEN, parse_json_object,
};
use crate::keys::{KekId, UnwrapError, Unwrapper};
use crate::pipeline::{BufPool, ordered_map};

/// Whether an unterminated package is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Unterminated is an error.
    Strict,
    /// Unterminated returns the verified prefix and says so.
    Recovery,
}

/// A header that has been authenticated, and the cipher for its records.
#[derive(Debug)]
pub struct Opened {
    /// The header fields.
    pub header: Header,
    /// The header's length in bytes.
    pub header_len: usize,
    /// The record cipher.
    pub cipher: ChunkCipher,
}

/// Reads until `buf` is full; returns how many bytes came before the end of input.
fn fill(src: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    crate::writer::read_full(src, buf)
}

/// Reads and authenticates the header. Errors: wrong key (no recipient is held by the
/// unwrapper), corrupt (structure, unwrap or MAC), unsupported, or the key source's own.
pub fn open_header(src: &mut impl Read, unwrapper: &dyn Unwrapper) -> Result<Opened, Error> {
    let mut buf = vec![0u8; HEADER_PREAMBLE_LEN];
    let n = fill(src, &mut buf)?;
    buf.truncate(n);
    let need = match Header::decode(&buf)? {
        Decoded::Need(need) if n == HEADER_PREAMBLE_LEN => need,
        // A header is never as short as its preamble, so `Done` cannot come here either.
        _ => return Err(Error::from_format(truncated_header(), None)),
    };
    buf.resize(need, 0);
    if fill(src, &mut buf[HEADER_PREAMBLE_LEN..])? != need - HEADER_PREAMBLE_LEN {
        return Err(Error::from_format(truncated_header(), None));
    }
    let (header, header_len) = match Header::decode(&buf)? {
        Decoded::Done(h, len) => (h, len),
        Decoded::Need(_) => return Err(Error::from_format(truncated_header(), None)),
    };
    let body = &buf[..header_len - TAG_LEN];
    let mut failed = false;
    let mut destroyed = None;
    for r in &header.recipients {
        match unwrapper.unwrap_dek_for(
            &header.recording_id,
            &KekId(r.kek_id),
            r.wrap,
            &r.sealed_dek,
        ) {
            Ok(dek) => {
                let keys = PackageKeys::derive(&dek, &header.recording_id);
                if !keys.verify_header_mac(body, &header.mac) {
                    failed = true;
                    continue;
                }
                let cipher = ChunkCipher::new(keys, header.nonce_prefix, header.mac);
                return Ok(Opened {
                    header,
                    header_len,
                    cipher,
                });
            }
            Err(UnwrapError::UnknownKey) => {}
            Err(UnwrapError::Destroyed) => destroyed = Some(KekId(r.kek_id)),
            Err(UnwrapError::Failed) => failed = true,
            Err(UnwrapError::Unavailable(why)) => return Err(Error::KeyUnavailable(why)),
        }
    }
    if failed {
        return Err(Error::auth(None));
    }
    if let Some(kek_id) = destroyed {
        return Err(Error::KeyDestroyed { kek_id });
    }
    Err(Error::WrongKey {
        recipients: header.recipients.iter().map(|r| KekId(r.kek_id)).collect(),
        offered: unwrapper.held_ids(),
    })
}

fn truncated_header() -> crate::format::FormatError {
    crate::format::FormatError::Corrupt("file ends inside the header")
}

/// One verified, decrypted record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its index.
    pub index: u32,
    /// Media or metadata (the end record is not returned as a record).
    pub kind: Kind,
    /// The plaintext.
    pub plaintext: Vec<u8>,
}

/// The structural half of reading records: frames in order, with their bytes, until the end
/// record and the end of the file. Knows nothing of keys.
struct FrameSource<R> {
    src: R,
    max_chunk: u32,
    next_index: u32,
    done: bool,
}

/// What the frame source found next.
enum Next {
    /// A whole record: its frame and its ciphertext followed by its tag.
    Record(Frame, Vec<u8>),
    /// The file ended at or inside a record, before any end record.
    Torn,
}

impl<R: Read> FrameSource<R> {
    fn next(&mut self, mut buf: Vec<u8>) -> Result<Option<Next>, Error> {
        if self.done {
            return Ok(None);
        }
        let mut prefix = [0u8; RECORD_PREFIX_LEN];
        let n = fill(&mut self.src, &mut prefix)?;
        if n < RECORD_PREFIX_LEN {
            self.done = true;
            return Ok(Some(Next::Torn));
        }
        let frame = Frame::decode_prefix(&prefix, self.max_chunk, self.next_index)
            .map_err(|e| Error::from_format(e, Some(self.next_index)))?;
        let want = frame.len as usize + TAG_LEN;
        // Read in steps of at most 1 MiB, then of what was already read: the buffer grows
        // only as bytes arrive, so a forged length costs nothing until the bytes exist. A
        // recycled buffer is not zeroed again (resize only fills what is new).
        let mut filled = 0;
        while filled < want {
            let step = (want - filled).min(filled.max(1 << 20));
            buf.resize(filled + step, 0);
            let n = fill(&mut self.src, &mut buf[filled..])?;
            filled += n;
            if n < step {
                self.done = true;
                return Ok(Some(Next::Torn));
            }
        }
        self.next_index += 1;
        if frame.kind == Kind::End {
            self.done = true;
            let mut one = [0u8; 1];
            loop {
                match self.src.read(&mut one) {
                    Ok(0) => break,
                    Ok(_) => {
                        return Err(Error::Corrupt {
                            what: "bytes after the end record",
                            record: Some(frame.index),
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(Some(Next::Record(frame, buf)))
    }
}

/// Checks the records in order: metadata objects merged, counts kept, end record checked.
#[derive(Debug, Default)]
struct Tally {
    records: u32,
    plaintext_bytes: u64,
    metadata: Metadata,
    end: Option<EndInfo>,
}

impl Tally {
    /// Takes one verified record in order. Returns the media plaintext to release, if any.
    fn take(&mut self, frame: &Frame, plaintext: &[u8]) -> Result<(), Error> {
        match frame.kind {
            Kind::Media => {}
            Kind::Metadata => {
                let obj = parse_json_object(plaintext).ok_or(Error::Corrupt {
                    what: "metadata record is not a JSON object",
                    record: Some(frame.index),
                })?;
                self.metadata.extend(obj);
            }
            Kind::End => {
                let end = EndInfo::decode(plaintext)
                    .map_err(|e| Error::from_format(e, Some(frame.index)))?;
                if end.records != self.records || end.plaintext_bytes != self.plaintext_bytes {
                    return Err(Error::Corrupt {
                        what: "end record counts do not match the records",
                        record: Some(frame.index),
                    });
                }
                self.end = Some(end);
                return Ok(());
            }
        }
        self.records += 1;
        self.plaintext_bytes += u64::from(frame.len);
        Ok(())
    }
}

/// What reading a whole package found.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The authenticated header.
    pub header: Header,
    /// Media and metadata records verified.
    pub records: u32,
    /// Their plaintext bytes (media and metadata).
    pub plaintext_bytes: u64,
    /// Media bytes written to the output.
    pub media_bytes: u64,
    /// The metadata records merged in index order (later keys win).
    pub metadata: Metadata,
    /// The end record, if the package is terminated.
    pub end: Option<EndInfo>,
}

impl Summary {
    /// Whether the end record was found.
    pub fn terminated(&self) -> bool {
        self.end.is_some()
    }
}

/// Reads records one at a time, verified. See the module documentation.
pub struct PackageReader<R> {
    opened: Opened,
    frames: FrameSource<R>,
    tally: Tally,
    mode: ReadMode,
}

impl<R: Read> PackageReader<R> {
    /// Reads and authenticates the header.
    pub fn new(mut src: R, unwrapper: &dyn Unwrapper, mode: ReadMode) -> Result<Self, Error> {
        let opened = open_header(&mut src, unwrapper)?;
        let max_chunk = opened.header.max_chunk;
        Ok(PackageReader {
            opened,
            frames: FrameSource {
                src,
                max_chunk,
                next_index: 0,
                done: false,
            },
            tally: Tally::default(),
            mode,
        })
    }

    /// The authenticated header.
    pub fn header(&self) -> &Header {
        &self.opened.header
    }

    /// The next verified media or metadata record; `None` after the end record (or, in
    /// recovery mode, at the end of an unterminated file: see [`PackageReader::end`]).
    pub fn next_record(&mut self) -> Result<Option<Record>, Error> {
        match self.frames.next(Vec::new())? {
            None => Ok(None),
            Some(Next::Torn) => self.torn().map(|()| None),
            Some(Next::Record(frame, mut buf)) => {
                let plaintext = verify(&self.opened.cipher, &frame, &mut buf)?;
                self.tally.take(&frame, plaintext)?;
                if frame.kind == Kind::End {
                    return Ok(None);
                }
                buf.truncate(frame.len as usize);
                Ok(Some(Record {
                    index: frame.index,
                    kind: frame.kind,
                    plaintext: buf,
                }))
            }
        }
    }

    fn torn(&self) -> Result<(), Error> {
        match self.mode {
            ReadMode::Strict => Err(Error::Unterminated {
                records: self.tally.records,
            }),
            ReadMode::Recovery => Ok(()),
        }
    }

    /// The end record, once [`PackageReader::next_record`] returned `None`; `None` if the
    /// package is unterminated.
    pub fn end(&self) -> Option<EndInfo> {
        self.tally.end
    }

    /// The metadata records merged so far.
    pub fn metadata(&self) -> &Metadata {
        &self.tally.metadata
    }
}

/// Verifies and decrypts one record in place; returns the plaintext.
fn verify<'a>(cipher: &ChunkCipher, frame: &Frame, buf: &'a mut [u8]) -> Result<&'a [u8], Error> {
    let (ct, tag) = buf.split_at_mut(frame.len as usize);
    cipher
        .open_in_place(frame, ct, tag)
        .map_err(|_| Error::auth(Some(frame.index)))?;
    Ok(ct)
}

/// Verifies and decrypts a whole package from `src`, writing the media plaintext to `out`,
/// on `workers` threads. In strict mode an unterminated package is an error after its
/// verified prefix was written; the caller must discard the output on any error.
pub fn open_stream(
    mut src: impl Read + Send,
    unwrapper: &dyn Unwrapper,
    mode: ReadMode,
    out: &mut impl Write,
    workers: usize,
) -> Result<Summary, Error> {
    let Opened { header, cipher, .. } = open_header(&mut src, unwrapper)?;
    let mut frames = FrameSource {
        src,
        max_chunk: header.max_chunk,
        next_index: 0,
        done: false,
    };
    let mut tally = Tally::default();
    let mut media_bytes = 0u64;
    let mut torn = false;
    let pool = BufPool::default();
    ordered_map(
        workers,
        || frames.next(pool.take()),
        |next| match next {
            Next::Torn => Ok(None),
            Next::Record(frame, mut buf) => {
                verify(&cipher, &frame, &mut buf)?;
                buf.truncate(frame.len as usize);
                Ok(Some((frame, buf)))
            }
        },
        |item| {
            let Some((frame, plaintext)) = item else {
                torn = true;
                return Ok(());
            };
            tally.take(&frame, &plaintext)?;
            if frame.kind == Kind::Media {
                out.write_all(&plaintext)?;
                media_bytes += plaintext.len() as u64;
            }
            pool.give(plaintext);
            Ok(())
        },
    )?;
    out.flush()?;
    if torn && mode == ReadMode::Strict {
        return Err(Error::Unterminated {
            records: tally.records,
        });
    }
    Ok(Summary {
        header,
        records: tally.records,
        plaintext_bytes: tally.plaintext_bytes,
        media_bytes,
        metadata: tally.metadata,
        end: tally.end,
    })
}
