//! Unwraps per second through the Local Key Manager over TLS, against OpenSSL's RSA-3072
//! private operations per second measured in the same run, both per core.
//! `cargo bench --bench lkm_unwraps` (prints its figures; nothing is asserted).
//!
//! The key manager (`edgerec lkm serve`, release build, the demo TLS certificate, a fresh
//! key store) is driven by `CLIENTS` threads, each a Hawk-signing client over its own
//! keep-alive TLS connection, unwrapping DEKs sealed to the current key (wrap 1, decryptType
//! "erec"). Every request goes the whole way: TLS, Hawk check with the nonce cache, rate
//! limit, the key's state read from the store, the constant-time OAEP unwrap, the audit log
//! line (written and synced). Per core = unwraps divided by the CPU seconds the service
//! process used (user + system, from /proc), so the clients' own work on the same machine
//! does not count against it. OpenSSL: `openssl speed -seconds 5 rsa3072`, one process, its
//! sign/s (the RSA private operation).
// A test's or benchmark's unwrap is its report (the workspace denies it in the crates).
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgerec_lkm::client::{LkmClient, LkmTarget};
use erec::crypto::Dek;
use erec::format::Wrap;

const CLIENTS: usize = 8;
const SECONDS: u64 = 10;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the service runs");
    // Fields after the command name (which is in parentheses): utime is the 14th field.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0 // USER_HZ
}

fn edgerec(args: &[&str], config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args(args)
        .args(["--config", config.to_str().expect("utf-8 path")])
        .output()
        .expect("edgerec runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl_rsa3072_private_per_s() -> f64 {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "5", "rsa3072"])
        .stderr(Stdio::null())
        .output()
        .expect("openssl on PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("rsa 3072 bits") || l.starts_with("rsa  3072 bits"))
        .expect("openssl speed prints an rsa 3072 line");
    // rsa 3072 bits <sign s> <verify s> <sign/s> <verify/s> (OpenSSL 3.0); later versions
    // add encrypt/decrypt columns after sign/verify: sign/s is the first rate either way.
    let after = line.split_once("bits").expect("rsa 3072 bits ...").1;
    let nums: Vec<f64> = after
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches('s').parse().ok())
        .collect();
    let seconds_columns = nums.iter().take_while(|n| **n < 1.0).count();
    nums[seconds_columns]
}

fn main() {
    // The repository's top: this bench belongs to a crate two levels down.
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("lkm.toml");
    // The demo certificate, its key copied 0600 (a key manager outside demo mode refuses a
    // TLS key others can read; a fresh clone has it 0644).
    let tls_key = dir.path().join("tls.key");
    std::fs::copy(repo.join("samples/lkm/tls.DEMO-ONLY.key"), &tls_key).expect("key copied");
    std::fs::set_permissions(
        &tls_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("key mode");
    std::fs::write(
        &config,
        format!(
            "[lkm]\nlisten = \"127.0.0.1:0\"\nstore_dir = \"store\"\nmaster_key_file = \"master.key\"\n\
             credentials_file = \"credentials.json\"\naudit_log = \"audit.jsonl\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\nunwrap_rate_per_sec = 1000000\nunwrap_burst = 1000000\n",
            repo.join("samples/lkm/tls.pem").display(),
            tls_key.display()
        ),
    )
    .expect("config written");
    edgerec(&["lkm", "init"], &config);
    let issued = edgerec(
        &["lkm", "credentials", "add", "--role", "decrypt", "bench"],
        &config,
    );
    let cred = dir.path().join("bench.cred");
    std::fs::write(&cred, issued).expect("credential written");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args([
            "lkm",
            "serve",
            "--config",
            config.to_str().expect("utf-8 path"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("the service starts");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = String::new();
    let port = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the service did not start:\n{seen}"))
            .expect("a line");
        seen.push_str(&line);
        seen.push('\n');
        if let Some(a) = line.split(" addr=").nth(1) {
            break a
                .split_whitespace()
                .next()
                .and_then(|a| a.rsplit(':').next())
                .expect("an address")
                .to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let target = LkmTarget {
        url: format!("https://localhost:{port}"),
        ca_file: Some(repo.join("samples/lkm/demo-ca.pem")),
        credentials: cred,
        timeout: Duration::from_secs(30),
        user: "bench".into(),
    };
    let probe = LkmClient::new(&target).expect("a client");
    let kek = probe.current().expect("the current key").kek;
    let id = kek.id();
    let sealed: Arc<Vec<(Vec<u8>, [u8; 32])>> = Arc::new(
        (0..256)
            .map(|_| {
                let dek = Dek::generate().expect("randomness");
                let s = kek.seal(&dek, Wrap::OaepSha256).expect("seal");
                let mut plain = [0u8; 32];
                plain.copy_from_slice(dek.expose());
                (s, plain)
            })
            .collect(),
    );
    // Warm up (connections, the opened key).
    probe
        .decrypt(&id, Wrap::OaepSha256, &sealed[0].0, None)
        .expect("an unwrap");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let server = child.id();
    let cpu0 = cpu_seconds(server);
    let t0 = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (stop, done, sealed, target) = (
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&sealed),
                target.clone(),
            );
            std::thread::spawn(move || {
                let client = LkmClient::new(&target).expect("a client");
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let (s, plain) = &sealed[i % sealed.len()];
                    let dek = client
                        .decrypt(&id, Wrap::OaepSha256, s, Some("bench"))
                        .expect("an unwrap");
                    assert_eq!(dek.expose(), plain, "the DEK comes back");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += CLIENTS;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(SECONDS));
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server) - cpu0;
    for w in workers {
        w.join().expect("a client thread");
    }
    let _ = child.kill();
    let _ = child.wait();
    let ossl = openssl_rsa3072_private_per_s();
    let per_core = n as f64 / cpu;
    println!(
        "lkm unwraps over TLS: {n} in {wall:.1} s with {CLIENTS} clients = {:.0}/s on {} cores \
         (clients on the same machine)",
        n as f64 / wall,
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    println!(
        "lkm service CPU: {cpu:.2} s = {:.0} us per unwrap = {per_core:.0} unwraps per core-second",
        cpu / n as f64 * 1e6
    );
    println!("openssl speed rsa3072 (one core): {ossl:.0} private ops/s");
    println!(
        "ratio (per core): {:.0} % of OpenSSL",
        per_core / ossl * 100.0
    );
}
