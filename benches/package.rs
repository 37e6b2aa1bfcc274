//! Seal and open throughput of the package format, in memory, for 1 MiB to 256 MiB inputs,
//! plus the two primitives the chunk cipher is made of. `cargo bench --bench package`.
//!
//! The whole-command comparison with `age` (a file on tmpfs, wall-clock) is
//! `benches/seal_vs_age.sh`.
// A test's or benchmark's unwrap is its report (the workspace denies it in the crates).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::io::Cursor;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use erec::crypto::{ChunkCipher, Dek, PackageKeys};
use erec::format::{Frame, Kind};
use erec::keys::{KekPrivate, KeyRing};
use erec::pipeline::default_workers;
use erec::reader::{ReadMode, open_stream};
use erec::writer::{SealOptions, Sealer, seal_stream};

const KEY: &str = include_str!("../tests/vectors/test-kek.pem");

fn primitives(c: &mut Criterion) {
    let dek = Dek::from_slice(&[1; 32]).expect("32 bytes");
    let cipher = ChunkCipher::new(PackageKeys::derive(&dek, &[2; 16]), [3; 8], [4; 32]);
    let chunk = vec![0x55u8; 1 << 20];
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("seal_1MiB_one_core", |b| {
        let mut rec = Vec::with_capacity(chunk.len() + 64);
        b.iter(|| {
            rec.clear();
            rec.extend_from_slice(&[0; 9]);
            rec.extend_from_slice(&chunk);
            cipher.seal_in_place(7, Kind::Media, &mut rec);
            black_box(&rec);
        })
    });
    let mut sealed = vec![0; 9];
    sealed.extend_from_slice(&chunk);
    cipher.seal_in_place(7, Kind::Media, &mut sealed);
    let frame = Frame::decode_prefix(sealed[..9].try_into().expect("9"), 1 << 20, 7).expect("ok");
    g.bench_function("open_1MiB_one_core", |b| {
        let mut buf = sealed[9..].to_vec();
        b.iter(|| {
            buf.copy_from_slice(&sealed[9..]);
            let (ct, tag) = buf.split_at_mut(chunk.len());
            cipher.open_in_place(&frame, ct, tag).expect("verifies");
            black_box(&buf);
        })
    });
    g.finish();
}

fn whole(c: &mut Criterion) {
    let key = KekPrivate::from_pem("bench", KEY).expect("committed test key");
    let mut ring = KeyRing::new();
    let public = key.public().clone();
    ring.add(key);
    let workers = default_workers();
    let mut g = c.benchmark_group("package");
    g.sample_size(10);
    for mib in [1usize, 16, 256] {
        let data = vec![0xA5u8; mib << 20];
        g.throughput(Throughput::Bytes(data.len() as u64));
        let seal = |d: &[u8], out: &mut Vec<u8>| {
            out.clear();
            let sealer = Sealer::new(std::slice::from_ref(&public), &SealOptions::default())
                .expect("sealer");
            seal_stream(sealer, &mut Cursor::new(d), out, false, workers).expect("seal");
        };
        let mut sealed = Vec::with_capacity(data.len() + (1 << 20));
        seal(&data, &mut sealed);
        let mut scratch = Vec::with_capacity(sealed.len());
        let id = BenchmarkId::new("seal", format!("{mib}MiB"));
        g.bench_with_input(id, &data, |b, d| b.iter(|| seal(d, &mut scratch)));
        let mut out = Vec::with_capacity(data.len());
        g.bench_with_input(
            BenchmarkId::new("open", format!("{mib}MiB")),
            &sealed,
            |b, s| {
                b.iter(|| {
                    out.clear();
                    open_stream(Cursor::new(s), &ring, ReadMode::Strict, &mut out, workers)
                        .expect("open");
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, primitives, whole);
criterion_main!(benches);
