//! Feeds arbitrary bytes to the media decoders: datagram classification (RTP / RTCP), the
//! sequence tracker, the entry decoder of `rtp` recordings, and the crash journal's ring
//! read back by the next process (bytes a killed process left). Nothing may panic, decoding
//! then encoding a well-formed chunk gives back the same bytes, and a replayed datagram
//! lies within the ring.
#![no_main]

use erec::entries::entries;
use edgerec::media::journal::Ring;
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
    if data.len() >= 4 {
        // A ring of 4 KiB with the tail and head the first bytes give, the rest its bytes.
        let cap = 4096;
        let tail = u64::from(u16::from_le_bytes([data[0], data[1]])) * 8;
        let head = tail + u64::from(u16::from_le_bytes([data[2], data[3]])) % (cap + 1);
        if let Ok(mut ring) = Ring::from_parts(cap, tail, head, &data[4..]) {
            let (replay, _) = ring.take_over();
            for (pos, d) in &replay {
                assert!(*pos >= tail && *pos < head);
                assert!(d.data.len() as u64 <= cap);
            }
            let (again, _) = ring.take_over();
            assert_eq!(again, replay, "taken over twice, the same replay");
        }
    }
});
