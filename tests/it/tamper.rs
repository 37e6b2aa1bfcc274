//! Round trips at the boundary sizes, and property tests: every single bit flip, every
//! dropped, duplicated, reordered or cut record and every truncation is detected.

use std::sync::OnceLock;

use erec::Error;
use erec::format::{Tail, walk};
use erec::reader::ReadMode;
use proptest::prelude::*;

use crate::common::*;

const CHUNK: u32 = 4096;

#[test]
fn round_trips_at_boundary_sizes() {
    let ring = CachingRing::new(&["test"]);
    let sizes = [0, 1, 4095, 4096, 4097, 3 * 4096, 50_000];
    for &n in &sizes {
        let data = pattern(n);
        let pkg = seal_bytes(&data, &[public("test")], CHUNK);
        let (out, s) = open_bytes(&pkg, &ring, ReadMode::Strict).expect("open");
        assert_eq!(out, data, "size {n}");
        assert_eq!(s.records as usize, n.div_ceil(4096), "size {n}");
        assert!(s.terminated());
        let w = walk(&pkg, Tail::Strict).expect("walk");
        assert!(w.terminated && w.torn_bytes == 0);
        assert_eq!(w.plaintext_bytes, n as u64);
    }
}

#[test]
fn every_recipient_opens_and_five_are_refused() {
    let names = ["test", "other", "r3", "r4"];
    let keys: Vec<_> = names.iter().map(|n| public(n)).collect();
    let data = pattern(10_000);
    let pkg = seal_bytes(&data, &keys, CHUNK);
    for n in names {
        let (out, _) = open_bytes(&pkg, &ring(&[n]), ReadMode::Strict).expect(n);
        assert_eq!(out, data);
    }
    let mut five = keys.clone();
    five.push(public("test"));
    let opts = erec::writer::SealOptions::default();
    assert!(erec::writer::Sealer::new(&five, &opts).is_err());
    let dup = [public("test"), public("test")];
    assert!(erec::writer::Sealer::new(&dup, &opts).is_err());
}

#[test]
fn wrong_key_is_reported_as_such() {
    let pkg = seal_bytes(b"secret", &[public("test")], CHUNK);
    match open_bytes(&pkg, &ring(&["other"]), ReadMode::Strict) {
        Err(Error::WrongKey {
            recipients,
            offered,
        }) => {
            assert_eq!(recipients, vec![public("test").id()]);
            assert_eq!(offered, vec![public("other").id()]);
        }
        other => panic!("expected wrong key, got {other:?}"),
    }
}

/// One package of 4 media records (and its parts) shared by the property tests.
struct Fixture {
    data: Vec<u8>,
    pkg: Vec<u8>,
    /// Byte offsets of each record: header end, record starts, file end.
    bounds: Vec<usize>,
    ring: CachingRing,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let data = pattern(3 * 4096 + 100);
        let pkg = seal_bytes(&data, &[public("test")], CHUNK);
        let w = walk(&pkg, Tail::Strict).expect("walk");
        let mut bounds = vec![w.header_len];
        let mut pos = w.header_len;
        while pos < pkg.len() {
            let len = u32::from_be_bytes(pkg[pos + 5..pos + 9].try_into().unwrap()) as usize;
            pos += 9 + len + 32;
            bounds.push(pos);
        }
        assert_eq!(bounds.len(), 6, "header + 4 media + end");
        Fixture {
            data,
            pkg,
            bounds,
            ring: CachingRing::new(&["test"]),
        }
    })
}

/// Checks a modified package: strict reading fails; recovery reading either fails or
/// yields a verified prefix of the original that it calls unterminated.
fn check_detected(f: &Fixture, modified: &[u8]) {
    let strict = open_bytes(modified, &f.ring, ReadMode::Strict);
    assert!(strict.is_err(), "strict open accepted a modified package");
    if let Ok((out, s)) = open_bytes(modified, &f.ring, ReadMode::Recovery) {
        assert!(!s.terminated(), "recovery called a modified package whole");
        assert!(
            f.data.starts_with(&out),
            "recovery released bytes not in the original"
        );
    }
}

fn records(f: &Fixture) -> Vec<&[u8]> {
    f.bounds.windows(2).map(|w| &f.pkg[w[0]..w[1]]).collect()
}

fn assemble(f: &Fixture, recs: &[&[u8]]) -> Vec<u8> {
    let mut out = f.pkg[..f.bounds[0]].to_vec();
    for r in recs {
        out.extend_from_slice(r);
    }
    out
}

#[test]
fn the_fixture_itself_opens() {
    let f = fixture();
    let (out, s) = open_bytes(&f.pkg, &f.ring, ReadMode::Strict).unwrap();
    assert_eq!(out, f.data);
    assert!(s.terminated());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bit_flip_is_detected(pos in 0usize..100_000, bit in 0u8..8) {
        let f = fixture();
        let mut m = f.pkg.clone();
        let pos = pos % m.len();
        m[pos] ^= 1 << bit;
        check_detected(f, &m);
    }

    #[test]
    fn any_truncation_is_detected(cut in 0usize..100_000) {
        let f = fixture();
        let cut = cut % f.pkg.len();
        check_detected(f, &f.pkg[..cut]);
    }

    #[test]
    fn dropped_duplicated_or_moved_records_are_detected(
        op in 0u8..3, a in 0usize..5, b in 0usize..5,
    ) {
        let f = fixture();
        let mut recs = records(f);
        match op {
            0 => { recs.remove(a); }
            1 => { let r = recs[a]; recs.insert(b, r); }
            _ => {
                prop_assume!(a != b);
                recs.swap(a, b);
            }
        }
        check_detected(f, &assemble(f, &recs));
    }

    #[test]
    fn appended_bytes_are_detected(extra in proptest::collection::vec(any::<u8>(), 1..64)) {
        let f = fixture();
        let mut m = f.pkg.clone();
        m.extend_from_slice(&extra);
        check_detected(f, &m);
    }
}

#[test]
fn records_from_another_package_are_rejected() {
    let f = fixture();
    let other = seal_bytes(&f.data, &[public("test")], CHUNK);
    let w = walk(&other, Tail::Strict).unwrap();
    // Same key, same layout: the second record of another package in place of ours.
    let mut m = f.pkg[..f.bounds[1]].to_vec();
    let len = f.bounds[2] - f.bounds[1];
    let start = w.header_len + (f.bounds[1] - f.bounds[0]);
    m.extend_from_slice(&other[start..start + len]);
    m.extend_from_slice(&f.pkg[f.bounds[2]..]);
    check_detected(f, &m);
}

#[test]
fn crash_recovery_cuts_the_torn_tail_and_keeps_every_whole_record() {
    use erec::recover::cut_torn_tail;
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // Cut inside record 2 (a crash mid-append), then zeroes a file system may leave.
    let cases: [(usize, usize); 3] = [
        (f.bounds[3] - 7, 0),
        (f.bounds[3], 4096),
        (f.bounds[1] + 3, 0),
    ];
    for (cut, zeros) in cases {
        let path = dir.path().join("p.erec.part");
        let mut bytes = f.pkg[..cut].to_vec();
        bytes.extend(std::iter::repeat_n(0u8, zeros));
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let r = cut_torn_tail(&file).unwrap();
        assert!(!r.walk.terminated);
        let kept = std::fs::read(&path).unwrap();
        let whole = *f.bounds.iter().filter(|b| **b <= cut).max().unwrap();
        assert_eq!(kept.len(), whole, "cut {cut} zeros {zeros}");
        assert_eq!(r.cut_bytes as usize, bytes.len() - whole);
        // What remains opens in recovery mode to exactly the records that were whole.
        let (out, s) = open_bytes(&kept, &f.ring, ReadMode::Recovery).unwrap();
        assert!(!s.terminated());
        assert_eq!(out, f.data[..out.len()]);
        assert_eq!(
            s.records as usize,
            f.bounds.iter().filter(|b| **b <= cut).count() - 1
        );
    }
    // A terminated package is left untouched.
    let path = dir.path().join("whole.erec");
    std::fs::write(&path, &f.pkg).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert_eq!(cut_torn_tail(&file).unwrap().cut_bytes, 0);
    assert_eq!(std::fs::read(&path).unwrap(), f.pkg);
}
