//! Bulk export to WAV: 1,000 one-minute two-leg G.711 calls (sealed to the test key, in a
//! `dir`-store layout), exported by the release binary with a key file:
//! `cargo bench --bench export_wav` (prints recordings per second, CPU per recording and the
//! second, resumed run's time; nothing is asserted). `EXPORT_BENCH_CALLS` changes the count.
//!
//! Every call: 2 streams × 3,000 packets of 160 bytes µ-law (a tone), 20 ms apart, in 64 KiB
//! media records as the recorder writes them; about 1.2 MB sealed, 1.9 MB of WAV out.
// A test's or benchmark's unwrap is its report (the workspace denies it in the crates).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use erec::entries::Entry;
use erec::format::{EndReason, Kind};
use erec::keys::KekPublic;
use erec::writer::{Media, SealOptions, Sealer};

fn call(kek: &KekPublic) -> Vec<u8> {
    let opts = SealOptions {
        media: Media::Rtp,
        max_chunk: 65536,
        ..SealOptions::default()
    };
    let mut s = Sealer::new(std::slice::from_ref(kek), &opts).expect("a sealer");
    let mut pkg = s.header_bytes().to_vec();
    let local = "127.0.0.1:40000".parse().expect("an address");
    let mut chunk = Vec::with_capacity(65536);
    let flush = |chunk: &mut Vec<u8>, s: &mut Sealer, pkg: &mut Vec<u8>| {
        s.seal(Kind::Media, chunk, pkg).expect("a record");
        chunk.clear();
    };
    for leg in 0..2u8 {
        Entry::StreamOpened {
            stream: leg,
            ssrc: u32::from(leg) + 1,
            local,
            remote: format!("10.0.0.{}:5000", leg + 1)
                .parse()
                .expect("an address"),
            payload_type: 0,
            label: "",
        }
        .encode(&mut chunk)
        .expect("an entry");
    }
    let mut p = vec![0u8; 172];
    for i in 0..3000u16 {
        for leg in 0..2u8 {
            p[0] = 0x80;
            p[1] = 0;
            p[2..4].copy_from_slice(&i.to_be_bytes());
            p[4..8].copy_from_slice(&(u32::from(i) * 160).to_be_bytes());
            p[8..12].copy_from_slice(&(u32::from(leg) + 1).to_be_bytes());
            for (j, b) in p[12..].iter_mut().enumerate() {
                *b = if (j / (4 + usize::from(leg))) % 2 == 0 {
                    0x10
                } else {
                    0x90
                };
            }
            let e = Entry::Rtp {
                stream: leg,
                arrival_us: u64::from(i) * 20_000 + u64::from(leg),
                packet: &p,
            };
            if chunk.len() + e.encoded_len() > 65536 {
                flush(&mut chunk, &mut s, &mut pkg);
            }
            e.encode(&mut chunk).expect("an entry");
        }
    }
    flush(&mut chunk, &mut s, &mut pkg);
    s.finish(EndReason::RtcpBye, erec::clock::now_ms(), &mut pkg);
    pkg
}

fn children_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc");
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime: fields 16 and 17 (1-based), 13 and 14 after the command.
    (f[13].parse::<f64>().expect("cutime") + f[14].parse::<f64>().expect("cstime")) / 100.0
}

fn main() {
    let n: usize = std::env::var("EXPORT_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // The repository's top: this bench belongs to a crate two levels down.
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let kek = KekPublic::from_file(&repo.join("tests/vectors/test-kek.pub.pem")).expect("key");
    let dir = tempfile::tempdir().expect("a temporary directory");
    if let Ok(keep) = std::env::var("EXPORT_BENCH_KEEP") {
        eprintln!("keeping {} as {keep}", dir.path().display());
        let _ = std::fs::remove_file(&keep);
        std::os::unix::fs::symlink(dir.path(), &keep).expect("a link");
        std::mem::forget(dir.keep());
        return main_in(n, Path::new(&keep), &kek, repo);
    }
    main_in(n, dir.path(), &kek, repo);
}

fn main_in(n: usize, dir: &Path, kek: &KekPublic, repo: &Path) {
    let store = dir.join("store/calls/2026/11/30");
    std::fs::create_dir_all(&store).expect("the store");
    let t = Instant::now();
    for _ in 0..n {
        let id = uuid::Uuid::now_v7();
        std::fs::write(store.join(format!("{id}.erec")), call(kek)).expect("a package");
    }
    eprintln!(
        "sealed {n} one-minute calls in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let out = dir.join("export");
    let run = || {
        let cpu0 = children_cpu_seconds();
        let t = Instant::now();
        let r = Command::new(env!("CARGO_BIN_EXE_edgerec"))
            .args(["export", "--key"])
            .arg(repo.join("tests/vectors/test-kek.pem"))
            .arg("--out")
            .arg(&out)
            .arg(dir.join("store"))
            .output()
            .expect("edgerec export runs");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        (t.elapsed().as_secs_f64(), children_cpu_seconds() - cpu0)
    };
    let (wall, cpu) = run();
    let (again, _) = run();
    let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
    println!(
        "export to WAV: {n} one-minute calls in {wall:.2} s = {:.0} recordings/s on {cores} cores",
        n as f64 / wall
    );
    println!(
        "CPU: {cpu:.2} s = {:.1} ms per recording",
        cpu / n as f64 * 1000.0
    );
    println!("second run (all verified and skipped): {again:.2} s");
}
