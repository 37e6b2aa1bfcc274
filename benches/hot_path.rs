//! The recorder's per-packet work taken apart, for two decisions in docs/performance.md
//! ("The recorder"): the RTP header parse — the hand-written `media::rtp::classify` against
//! the `rtp` crate of webrtc-rs in its sans-IO successor `rtc-rtp`, which the appliance
//! already links through `rtc-srtp` — and the store's integrity check — SHA-256, the running
//! digest the recorder keeps of every package, against CRC64/NVME and CRC32C, the cheaper
//! checksums S3 also accepts. `cargo bench --bench hot_path`.
// A test's or benchmark's unwrap is its report (the workspace denies it in the crates).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edgerec::media::rtp::{Datagram, classify};
use rtc_shared::marshal::Unmarshal;
use sha2::{Digest, Sha256};

/// A 20 ms G.711 packet as loadgen sends it: 12 bytes of header, 160 of payload.
fn packet() -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&4711u16.to_be_bytes());
    p.extend_from_slice(&(160u32 * 4711).to_be_bytes());
    p.extend_from_slice(&0x5EED_0001u32.to_be_bytes());
    p.extend((0..160u32).map(|i| (i * 37 % 251) as u8));
    p
}

/// `rtc-rtp`'s parse of `p` as a `T` (a header alone, or a whole packet).
fn unmarshal<T: Unmarshal>(mut p: &[u8]) -> T {
    T::unmarshal(&mut p).unwrap()
}

fn rtp_parse(c: &mut Criterion) {
    let p = packet();
    let mut g = c.benchmark_group("rtp_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hand_written_classify", |b| {
        b.iter(|| match classify(black_box(&p)) {
            Ok(Datagram::Rtp(h)) => h.seq,
            _ => unreachable!("a valid RTP packet"),
        })
    });
    g.bench_function("rtc_rtp_header", |b| {
        b.iter(|| unmarshal::<rtc_rtp::header::Header>(black_box(&p)).sequence_number)
    });
    g.bench_function("rtc_rtp_packet", |b| {
        b.iter(|| {
            unmarshal::<rtc_rtp::packet::Packet>(black_box(&p))
                .payload
                .len()
        })
    });
    g.finish();
}

fn integrity(c: &mut Criterion) {
    use crc_fast::{CrcAlgorithm, checksum};
    let mut g = c.benchmark_group("store_integrity");
    // One datagram's record, and a chunk of a two-leg call's second (what one write adds).
    for size in [172usize, 16 << 10] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 256) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("sha256", size), &data, |b, d| {
            b.iter(|| Sha256::digest(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("crc64nvme", size), &data, |b, d| {
            b.iter(|| checksum(CrcAlgorithm::Crc64Nvme, black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("crc32c", size), &data, |b, d| {
            b.iter(|| checksum(CrcAlgorithm::Crc32Iscsi, black_box(d)))
        });
    }
    g.finish();
}

criterion_group!(benches, rtp_parse, integrity);
criterion_main!(benches);
