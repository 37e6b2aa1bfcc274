//! `edgerec loadgen --replay` reads a pcap file: any bytes give datagrams or an error, never
//! a panic, and the port mapping never overflows.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((datagrams, _skipped)) = edgerec::tools::replay::read(data) {
        let n = datagrams.len();
        if let Ok(r) = edgerec::tools::replay::Replay::new(datagrams, 40_000, 65_535) {
            assert_eq!(r.datagrams().len(), n);
            assert!(r.datagrams().iter().all(|d| d.port >= 40_000));
            assert!(r.datagrams().windows(2).all(|w| w[0].offset <= w[1].offset));
        }
    }
});
