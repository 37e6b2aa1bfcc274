//! Keyless crash recovery of a package file: walk its records by their lengths and cut the
//! torn tail, so that what remains is a well-formed (if unterminated) package.
//!
//! Invariants: needs no key and reads no plaintext; never touches a terminated package;
//! never cuts into the header or a whole record; never grows or rewrites a byte, only
//! shortens the file to the end of its last whole record and syncs it. A file whose header
//! is unreadable is left as it is and reported, so that the caller can quarantine it
//! instead of crash-looping on it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::Error;
use crate::format::{Tail, Walk, WalkError, walk_by};

/// What recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The walk before cutting.
    pub walk: Walk,
    /// Bytes removed from the end of the file.
    pub cut_bytes: u64,
}

/// Walks a package file by its record lengths with a few small reads per record.
pub fn walk_file(file: &File, tail: Tail) -> Result<Walk, Error> {
    let len = file.metadata()?.len();
    walk_by(len, tail, |off, buf| file.read_exact_at(buf, off)).map_err(|e| match e {
        WalkError::Format(e) => Error::from(e),
        WalkError::Read(e) => Error::Io(e),
    })
}

/// Walks `file` (opened for reading and writing) and cuts its torn tail.
pub fn cut_torn_tail(file: &File) -> Result<Recovered, Error> {
    let walk = walk_file(file, Tail::CutInvalid)?;
    let cut_bytes = walk.torn_bytes;
    if cut_bytes > 0 {
        file.set_len(walk.valid_len)?;
        file.sync_all()?;
    }
    Ok(Recovered { walk, cut_bytes })
}
