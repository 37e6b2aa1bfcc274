//! Feeds arbitrary bytes to every decoder of the package format: the header decoder, the
//! keyless walk, and the full streaming reader (strict and recovery) with an unwrapper that
//! answers with the test vectors' DEK, so inputs mutated from the committed vectors reach
//! the record checks past the header MAC. Nothing may panic; libFuzzer's -malloc_limit_mb
//! (set by the test command) catches an allocation beyond the declared limits.
#![no_main]

use std::io::Cursor;

use erec::crypto::Dek;
use erec::format::{self, Header, Wrap};
use erec::keys::{KekId, UnwrapError, Unwrapper};
use erec::reader::{PackageReader, ReadMode, open_stream};
use libfuzzer_sys::fuzz_target;

/// The DEK of `tests/vectors/MANIFEST.json` (bytes 0..31).
struct VectorDek;

impl Unwrapper for VectorDek {
    fn unwrap_dek(&self, _: &KekId, _: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        if sealed.first() == Some(&0) {
            return Err(UnwrapError::UnknownKey);
        }
        let dek: Vec<u8> = (0u8..32).collect();
        Dek::from_slice(&dek).ok_or(UnwrapError::Failed)
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    if let Ok(w) = format::walk(data, format::Tail::Strict) {
        assert!(w.valid_len as usize <= data.len());
        assert_eq!(w.valid_len as usize + w.torn_bytes as usize, data.len());
    }
    if let Ok(w) = format::walk(data, format::Tail::CutInvalid) {
        // What recovery keeps walks cleanly, with nothing torn.
        let kept = format::walk(&data[..w.valid_len as usize], format::Tail::Strict)
            .expect("the recovered prefix is well-formed");
        assert_eq!((kept.records, kept.torn_bytes), (w.records, 0));
    }
    for mode in [ReadMode::Strict, ReadMode::Recovery] {
        let mut sink = Vec::new();
        let _ = open_stream(Cursor::new(data), &VectorDek, mode, &mut sink, 1);
        // The record-at-a-time reader must agree with the streaming one.
        if let Ok(mut r) = PackageReader::new(Cursor::new(data), &VectorDek, mode) {
            let mut media = Vec::new();
            let mut ok = true;
            loop {
                match r.next_record() {
                    Ok(Some(rec)) => {
                        if rec.kind == format::Kind::Media {
                            media.extend_from_slice(&rec.plaintext);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                assert_eq!(media, sink, "the two readers disagree");
            }
        }
    }
});
