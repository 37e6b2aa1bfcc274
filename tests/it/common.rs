//! Shared helpers: the committed test keys, the built binary, package building.

use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, mpsc};

use erec::Error;
use erec::crypto::Dek;
use erec::format::{KEK_ID_LEN, Wrap};
use erec::keys::{KekId, KekPrivate, KekPublic, KeyRing, UnwrapError, Unwrapper};
use erec::reader::{ReadMode, Summary, open_stream};
use erec::writer::{SealOptions, Sealer, seal_stream};

/// Waits until `f` holds, polling every 50 ms: 20 s at most, for a loaded CI machine.
pub fn eventually(why: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{why}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn vectors_dir() -> PathBuf {
    repo_path("tests/vectors")
}

pub fn key_path(name: &str) -> PathBuf {
    vectors_dir().join(name)
}

/// The committed key `tests/vectors/{name}-kek.pem`.
pub fn private(name: &str) -> KekPrivate {
    KekPrivate::from_file(&key_path(&format!("{name}-kek.pem"))).expect("committed key")
}

pub fn public(name: &str) -> KekPublic {
    KekPublic::from_file(&key_path(&format!("{name}-kek.pub.pem"))).expect("committed key")
}

pub fn ring(names: &[&str]) -> KeyRing {
    let mut r = KeyRing::new();
    for n in names {
        r.add(private(n));
    }
    r
}

/// An unwrapper that remembers what it unwrapped, so property tests pay for RSA once per
/// distinct sealed DEK rather than once per case.
pub struct CachingRing {
    ring: KeyRing,
    cache: Mutex<Vec<(Vec<u8>, Dek)>>,
}

impl CachingRing {
    pub fn new(names: &[&str]) -> Self {
        CachingRing {
            ring: ring(names),
            cache: Mutex::new(Vec::new()),
        }
    }
}

impl Unwrapper for CachingRing {
    fn unwrap_dek(&self, id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, UnwrapError> {
        let mut key = id.0.to_vec();
        key.push(wrap.code());
        key.extend_from_slice(sealed);
        if let Some((_, d)) = self.cache.lock().unwrap().iter().find(|(k, _)| *k == key) {
            return Ok(d.clone());
        }
        let dek = self.ring.unwrap_dek(id, wrap, sealed)?;
        self.cache.lock().unwrap().push((key, dek.clone()));
        Ok(dek)
    }

    fn held_ids(&self) -> Vec<KekId> {
        self.ring.held_ids()
    }
}

const _: () = assert!(KEK_ID_LEN == 32);

/// Seals `data` as a file package with the library, chunked at `max_chunk`.
pub fn seal_bytes(data: &[u8], recipients: &[KekPublic], max_chunk: u32) -> Vec<u8> {
    let opts = SealOptions {
        max_chunk,
        ..SealOptions::default()
    };
    let sealer = Sealer::new(recipients, &opts).expect("sealer");
    let mut out = Vec::new();
    seal_stream(sealer, &mut Cursor::new(data), &mut out, false, 2).expect("seal");
    out
}

/// Opens a package with the library; returns the media plaintext and the summary.
pub fn open_bytes(
    pkg: &[u8],
    unwrapper: &dyn Unwrapper,
    mode: ReadMode,
) -> Result<(Vec<u8>, Summary), Error> {
    let mut out = Vec::new();
    let s = open_stream(Cursor::new(pkg), unwrapper, mode, &mut out, 2)?;
    Ok((out, s))
}

/// Runs the built binary.
/// `edgerec calls list --json` of a spool (`--config FILE` or `--spool DIR`), parsed.
pub fn calls_json(flag: &str, at: &std::path::Path) -> serde_json::Value {
    let o = edgerec(&["calls", "list", flag, at.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

pub fn edgerec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args(args)
        .output()
        .expect("run edgerec")
}

/// Deterministic test data.
/// Seals `plain` into the `file` package `package` with `edgerec seal` to the test KEK;
/// returns its recording id.
pub fn seal_file(plain: &Path, package: &Path) -> uuid::Uuid {
    let o = edgerec(&[
        "seal",
        "--kek",
        key_path("test-kek.pub.pem").to_str().unwrap(),
        plain.to_str().unwrap(),
        package.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&edgerec(&["inspect", "--json", package.to_str().unwrap()]).stdout)
            .unwrap();
    uuid::Uuid::parse_str(v["recording_id"].as_str().unwrap()).unwrap()
}

pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A path in the repository (this test binary belongs to `crates/edgerec`, two levels down).
pub fn repo_path(p: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(p)
}

/// A tmpfs mounted for a test, unmounted (lazily) on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`. Without the privilege to mount (a developer's
    /// unprivileged run) it says so and gives `None`; `.ci/run` sets
    /// `EDGEREC_TEST_REQUIRE_MOUNT`, so there it fails instead.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        if out.status.success() {
            return Some(Tmpfs(dir.to_path_buf()));
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("EDGEREC_TEST_REQUIRE_MOUNT").is_none(),
            "cannot mount a tmpfs: {why}"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {why}");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The lines a child writes to `stream` (its stderr, say), as they come.
pub fn log_lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Sends `signal` (`TERM`, `HUP`, …) to `child` with kill(1).
pub fn signal(child: &std::process::Child, signal: &str) {
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{signal}");
}

/// The `[ingest] mode` line of the appliances the tests start: `EDGEREC_IT_INGEST_MODE`
/// when set (.ci/run runs the end-to-end tests of ingest once more with `recvmmsg`), else
/// none, so the default (`auto`) rules: the packet ring as root, as CI runs.
pub fn ingest_mode_line() -> String {
    std::env::var("EDGEREC_IT_INGEST_MODE")
        .map(|m| format!("mode = \"{m}\""))
        .unwrap_or_default()
}

/// The mode the appliances the tests start read by: the one `EDGEREC_IT_INGEST_MODE`
/// names, else what `auto` picks (the ring as root, the sockets otherwise).
pub fn expected_ingest_mode() -> String {
    std::env::var("EDGEREC_IT_INGEST_MODE").unwrap_or_else(|_| {
        // The effective user (root has CAP_NET_RAW on these machines).
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            })
            .unwrap_or(false);
        if root { "ring" } else { "recvmmsg" }.to_string()
    })
}
