//! Feeds arbitrary bytes to the media decoders: datagram classification (RTP / RTCP), the
//! sequence tracker, and the entry decoder of `rtp` recordings. Nothing may panic, and
//! decoding then encoding a well-formed chunk gives back the same bytes.
#![no_main]

use erec::entries::entries;
use edgerec::media::rtp::{Datagram, SeqTracker, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Datagram::Rtp(h)) = classify(data) {
        assert!(h.payload_offset + h.payload_len <= data.len());
    }
    let mut seqs = data
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]));
    if let Some(first) = seqs.next() {
        let mut t = SeqTracker::new(first);
        for s in seqs {
            t.update(s);
            // Only late packets from before the first can make received exceed expected.
            assert!(t.received() <= t.expected() + u64::from(edgerec::media::rtp::MAX_MISORDER));
        }
    }
    let decoded: Result<Vec<_>, _> = entries(data).collect();
    if let Ok(list) = decoded {
        let mut again = Vec::new();
        for e in &list {
            e.encode(&mut again).expect("a decoded entry fits");
        }
        assert_eq!(again, data, "decode then encode is identity");
    }
});
