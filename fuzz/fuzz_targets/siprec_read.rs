//! Feeds arbitrary bytes to the SIPREC recording server's decoders of what a recording client
//! sends: the body splitter (under a multipart type with a boundary taken from the input, and
//! as a single part) and the RFC 7865 metadata reader. Nothing may panic, every part lies
//! within the body and there are at most `MAX_PARTS`, and metadata stays within its bounds.
#![no_main]

use edgerec::siprec::{metadata, mime};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the boundary; the rest the body.
    let (boundary, body) = match data.iter().position(|b| *b == b'\n') {
        Some(n) => (String::from_utf8_lossy(&data[..n]).into_owned(), &data[n + 1..]),
        None => ("b".to_string(), data),
    };
    let ct = format!("multipart/mixed; boundary=\"{boundary}\"");
    for parts in [mime::parts(Some(&ct), body), mime::parts(None, body)] {
        let Ok(parts) = parts else { continue };
        assert!(parts.len() <= mime::MAX_PARTS);
        for p in parts {
            let (start, end) = (body.as_ptr() as usize, body.as_ptr() as usize + body.len());
            let at = p.body.as_ptr() as usize;
            assert!(p.body.is_empty() || (at >= start && at + p.body.len() <= end));
            if let Ok(m) = metadata::parse(p.body) {
                assert!(m.participants.len() <= metadata::MAX_ITEMS);
                assert!(m.streams.len() <= metadata::MAX_ITEMS);
                let _ = m.to_json();
            }
        }
    }
    if let Ok(mut m) = metadata::parse(data) {
        let update = m.clone();
        m.apply(update);
        assert!(m.sessions.len() <= metadata::MAX_ITEMS);
    }
});
