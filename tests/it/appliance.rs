//! `edgerec run` end to end: the real binary on loopback ports, real UDP, the spool, the
//! dir store; SIGTERM and kill -9.

use std::fs;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use erec::entries::{Entry, entries};
use erec::format::{EndReason, Kind};
use erec::reader::{PackageReader, ReadMode};

use crate::common::*;

/// Four consecutive free UDP ports on loopback.
pub fn free_ports() -> u16 {
    free_block(4)
}

/// The first of `n` consecutive UDP ports free on loopback (an even one), for an appliance
/// to bind. Taken below the kernel's ephemeral range (32768 and up on Linux), in blocks of
/// 64 handed out in turn to the tests of this process (from a place that depends on its
/// pid): a port found free is not taken meanwhile by another test's client socket or by a
/// parallel test's pick, as one from the ephemeral range could be.
pub fn free_block(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const BLOCKS: u32 = 12_000 / 64;
    let start = std::process::id() % BLOCKS;
    if n <= 64 {
        for _ in 0..BLOCKS {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let base = u16::try_from(FIRST + (start + k) % BLOCKS * 64).unwrap();
            if (base..base + n).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok()) {
                return base;
            }
        }
    }
    // More than a block (a benchmark's hundreds of streams): from the ephemeral range.
    for _ in 0..200 {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port() & !1;
        drop(probe);
        if !(1024..=65535 - n).contains(&base) {
            continue;
        }
        if (base..base + n).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} free ports");
}

pub struct Appliance {
    dir: tempfile::TempDir,
    pub base: u16,
    child: Option<Child>,
    log: mpsc::Receiver<String>,
    metrics: String,
    /// Whether the child gets `EDGEREC_LOG=debug`.
    log_env: bool,
}

impl Appliance {
    fn config(dir: &Path, base: u16, allow: &str, store: &str, upload: &str) -> PathBuf {
        let cfg = dir.join("edgerec.toml");
        fs::write(
            &cfg,
            format!(
                r#"
[recorder]
spool_dir = "spool"
flush_interval_ms = 200
idle_timeout_ms = 1500
[ingest]
ports = "{base}-{}"
allow = [{allow}]
{mode}
[keys]
public_key = "{}"
[store]
{store}
[upload]
rescan_secs = 3600
retry_initial_ms = 100
retry_max_ms = 1000
{upload}
[metrics]
listen = "127.0.0.1:0"
"#,
                base + 3,
                key_path("test-kek.pub.pem").display(),
                mode = ingest_mode_line(),
            ),
        )
        .unwrap();
        cfg
    }

    fn start() -> Appliance {
        Self::start_allowing("\"127.0.0.0/8\"")
    }

    fn start_allowing(allow: &str) -> Appliance {
        Self::start_with(allow, "path = \"store\"")
    }

    fn start_with(allow: &str, store: &str) -> Appliance {
        let mut a = Self::prepare(allow, store, "");
        a.spawn();
        a
    }

    /// Configured (with extra `[upload]` lines), not started.
    pub fn prepare(allow: &str, store: &str, upload: &str) -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let base = free_ports();
        Self::config(dir.path(), base, allow, store, upload);
        Appliance {
            dir,
            base,
            child: None,
            log: mpsc::channel().1,
            metrics: String::new(),
            log_env: true,
        }
    }

    pub fn spawn(&mut self) {
        let cfg = self.dir.path().join("edgerec.toml");
        self.spawn_with(cfg.to_str().unwrap(), None);
    }

    /// Started without `EDGEREC_LOG`: the config's `[log] level` rules.
    pub fn spawn_logging_as_configured(&mut self) {
        self.log_env = false;
        self.spawn();
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) {
        signal(self.child.as_ref().unwrap(), "HUP");
    }

    /// Started from its own directory with `--config edgerec.toml`: every relative path of
    /// the config stays relative.
    pub fn spawn_from_its_dir(&mut self) {
        let dir = self.dir.path().to_path_buf();
        self.spawn_with("edgerec.toml", Some(&dir));
    }

    fn spawn_with(&mut self, config: &str, cwd: Option<&Path>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgerec"));
        cmd.args(["run", "--config", config])
            .env("EDGEREC_LOG", "debug")
            .stderr(Stdio::piped());
        if !self.log_env {
            cmd.env_remove("EDGEREC_LOG");
        }
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().unwrap();
        self.log = log_lines(child.stderr.take().unwrap());
        self.child = Some(child);
        let line = self.wait_log("metrics at");
        self.metrics = line
            .split("metrics_addr=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("the log names the metrics address")
            .to_string();
        self.wait_log("listening for RTP");
    }

    /// Seals to the key manager's current key (fetched every second) instead of the key
    /// file, with `extra` `[keys]` lines.
    fn keys_from(&self, lkm: &crate::lkm::Service, extra: &str) {
        let cfg = self.path("edgerec.toml");
        let text = fs::read_to_string(&cfg).unwrap().replace(
            &format!(
                "public_key = \"{}\"",
                key_path("test-kek.pub.pem").display()
            ),
            &format!(
                "source = \"lkm\"\nlkm_url = \"{}\"\nlkm_ca = \"{}\"\nlkm_credentials = \"{}\"\n\
                 refresh_secs = 1\n{extra}",
                lkm.url(),
                lkm.ca().display(),
                lkm.credentials().display()
            ),
        );
        fs::write(&cfg, text).unwrap();
    }

    /// GET a path of the metrics listener: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The value of one metric line (exact name with labels).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits until a metric reaches a value (observable state, not a sleep).
    pub fn wait_metric(&self, name: &str, at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric(name) < at_least {
            assert!(Instant::now() < deadline, "{name} stayed below {at_least}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a log line containing `what` (observable state, not a sleep).
    pub fn wait_log(&self, what: &str) -> String {
        self.wait_log_where(what, |line| line.contains(what))
    }

    /// The first log line from now on that `wanted` accepts (`what` names it in the panic).
    fn wait_log_where(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Ok(line) = self.log.recv_timeout(deadline - Instant::now()) {
            if wanted(&line) {
                return line;
            }
        }
        panic!("no log line with {what:?}");
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn sigterm(&mut self) {
        let mut child = self.child.take().unwrap();
        signal(&child, "TERM");
        assert!(child.wait().unwrap().success(), "exit 0 after SIGTERM");
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn rtp(seq: u16, ssrc: u32, fill: u8) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[fill; 160]);
    p
}

/// `edgerec loadgen --target 127.0.0.1 --ports PORTS ARGS…`.
pub fn loadgen(ports: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["loadgen", "--target", "127.0.0.1", "--ports", ports];
    all.extend_from_slice(args);
    edgerec(&all)
}

fn stored(store: &Path) -> Vec<PathBuf> {
    files_with_ext(store, "erec")
}

/// Whether a package of the spool is a manifest (its state names its object key).
pub fn is_manifest(package: &Path) -> bool {
    fs::read(package.with_extension("json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|s| s.get("object").is_some())
}

/// The keys of the recordings an S3 store holds under `prefix` (its manifests left out).
pub fn recordings_in(store: &edgerec::store::s3::S3Store, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .unwrap()
        .into_iter()
        .filter(|k| !edgerec::store::is_manifest(prefix, k))
        .collect()
}

/// Every file under `root` whose name ends `.ext` (manifests left out, in a store's
/// `manifests/` or the spool: they are not recordings).
pub fn files_with_ext(root: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n == "manifests") {
                continue;
            } else if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) && !(ext == "erec" && is_manifest(&p))
            {
                out.push(p);
            }
        }
    }
    out
}

pub fn wait_stored(store: &Path, n: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = stored(store);
        if s.len() >= n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} packages stored",
            s.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a stored package and returns (stream count, RTP packets per stream, end reason).
fn decode(path: &Path, mode: ReadMode) -> (usize, Vec<Vec<u16>>, Option<EndReason>) {
    let ring = ring(&["test"]);
    let mut r = PackageReader::new(fs::File::open(path).unwrap(), &ring, mode).unwrap();
    let mut streams = 0;
    let mut seqs: Vec<Vec<u16>> = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        assert_eq!(rec.kind, Kind::Media);
        for e in entries(&rec.plaintext) {
            match e.unwrap() {
                Entry::StreamOpened { stream, .. } => {
                    assert_eq!(usize::from(stream), streams);
                    streams += 1;
                    seqs.push(Vec::new());
                }
                Entry::Rtp { stream, packet, .. } => {
                    assert_eq!(&packet[12..], &[packet[12]; 160][..]);
                    seqs[usize::from(stream)].push(u16::from_be_bytes([packet[2], packet[3]]));
                }
                _ => {}
            }
        }
    }
    (streams, seqs, r.end().map(|e| e.reason))
}

#[test]
fn a_two_leg_call_is_recorded_sealed_and_stored() {
    let mut a = Appliance::start();
    let leg_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let leg_b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = a.base + 1;
    for i in 0..100u16 {
        leg_a
            .send_to(&rtp(i, 0xAAAA, 0x11), ("127.0.0.1", port))
            .unwrap();
        if i != 50 {
            leg_b
                .send_to(&rtp(1000 + i, 0xBBBB, 0x22), ("127.0.0.1", port))
                .unwrap();
        }
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The call ends by idle timeout; the package reaches the store without a signal.
    let files = wait_stored(&a.path("store"), 1);
    let (streams, seqs, end) = decode(&files[0], ReadMode::Strict);
    assert_eq!(streams, 2);
    assert_eq!(seqs[0], (0..100).collect::<Vec<_>>());
    assert_eq!(seqs[1].len(), 99);
    assert_eq!(end, Some(EndReason::IdleTimeout));
    // Only ciphertext anywhere: no run of the payload bytes in the stored package.
    let bytes = fs::read(&files[0]).unwrap();
    assert!(
        !bytes
            .windows(16)
            .any(|w| w == [0x11; 16] || w == [0x22; 16])
    );
    // The spool empties once the store confirmed (the package is in the store first: the
    // upload is journalled, then the spool's copy removed).
    eventually("the spool did not empty", || {
        fs::read_dir(a.path("spool/ready")).unwrap().count() == 0
    });
    // The metrics say so.
    // (Counts are published within 100 ms; the upload may be quicker.)
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 1.0);
    a.wait_metric(
        "edgerec_recordings_ended_total{reason=\"idle_timeout\"}",
        1.0,
    );
    assert_eq!(a.metric("edgerec_rtp_packets_received_total"), 199.0);
    assert_eq!(a.metric("edgerec_recordings_started_total"), 1.0);
    assert_eq!(a.metric("edgerec_recordings_active"), 0.0);
    assert!(a.metric("edgerec_chunks_written_total") >= 1.0);
    assert_eq!(a.get("/healthz").0, 200);
    let (status, body) = a.get("/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("edgerec_build_info{version="), "{body}");
    assert!(body.contains(&format!(
        "edgerec_kek_info{{kek_id=\"{}\"}} 1",
        public("test").id()
    )));
    a.wait_metric("edgerec_spool_capacity_bytes", 1.0);
    assert_eq!(a.get("/readyz").0, 200);
    a.sigterm();
}

#[test]
fn sigterm_ends_recordings_properly() {
    let mut a = Appliance::start();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Bad input first: it is counted and changes nothing.
    s.send_to(b"\x80\x00", ("127.0.0.1", a.base)).unwrap();
    s.send_to(&[0u8; 40], ("127.0.0.1", a.base)).unwrap();
    let mut bye_alone = vec![0x81, 203, 0, 1];
    bye_alone.extend_from_slice(&7u32.to_be_bytes());
    s.send_to(&bye_alone, ("127.0.0.1", a.base + 3)).unwrap();
    a.wait_metric(
        "edgerec_datagrams_rejected_total{reason=\"rtcp_without_recording\"}",
        1.0,
    );
    assert_eq!(
        a.metric("edgerec_datagrams_rejected_total{reason=\"short\"}"),
        1.0
    );
    assert_eq!(
        a.metric("edgerec_datagrams_rejected_total{reason=\"version\"}"),
        1.0
    );
    assert_eq!(a.metric("edgerec_recordings_started_total"), 0.0);
    for i in 0..20u16 {
        s.send_to(&rtp(i, 7, 0x33), ("127.0.0.1", a.base)).unwrap();
    }
    a.wait_log("recording started");
    a.sigterm();
    let files = wait_stored(&a.path("store"), 1);
    let (_, seqs, end) = decode(&files[0], ReadMode::Strict);
    assert_eq!(end, Some(EndReason::Shutdown));
    assert_eq!(seqs[0].len(), 20);
}

#[test]
fn kill_9_mid_call_then_restart_delivers_the_synced_part() {
    let mut a = Appliance::start();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u16 {
        s.send_to(&rtp(i, 9, 0x44), ("127.0.0.1", a.base + 2))
            .unwrap();
    }
    // Wait until a chunk was written and synced: the .part file grows past its header.
    let active = a.path("spool/active");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let grown = fs::read_dir(&active)
            .unwrap()
            .flatten()
            .any(|e| e.metadata().unwrap().len() > 1000);
        if grown {
            break;
        }
        assert!(Instant::now() < deadline, "no chunk written");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.wait_metric("edgerec_sync_duration_seconds_count", 1.0); // the group commit
    // Mid-recording, the spool holds only ciphertext: no run of the payload bytes anywhere.
    for e in fs::read_dir(&active).unwrap().flatten() {
        let bytes = fs::read(e.path()).unwrap();
        assert!(
            !bytes.windows(16).any(|w| w == [0x44; 16]),
            "plaintext in {:?}",
            e.path()
        );
    }
    a.kill9();
    a.spawn();
    let files = wait_stored(&a.path("store"), 1);
    let (_, seqs, end) = decode(&files[0], ReadMode::Recovery);
    assert_eq!(end, None, "unterminated");
    assert_eq!(
        seqs[0],
        (0..50).collect::<Vec<_>>(),
        "every synced packet is there"
    );
    a.sigterm();
}

/// Zero crossings per second of µ-law samples: twice the frequency of a pure tone.
fn tone_hz(payload: &[u8]) -> f64 {
    let pcm: Vec<i16> = payload
        .iter()
        .map(|b| edgerec::media::g711::ulaw_to_linear(*b))
        .collect();
    let crossings = pcm.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
    crossings as f64 / 2.0 / (pcm.len() as f64 / 8000.0)
}

#[test]
fn loadgen_calls_are_recorded_whole_with_their_tones() {
    let a = Appliance::start();
    let out = loadgen(
        &format!("{}-{}", a.base, a.base + 2),
        &["--streams", "6", "--seconds", "1"],
    );
    assert!(out.status.success());
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("packets_sent 300"), "{report}");
    let files = wait_stored(&a.path("store"), 3);
    assert_eq!(files.len(), 3, "one recording per port");
    let ring = ring(&["test"]);
    let mut total = 0;
    for f in files {
        let mut r =
            PackageReader::new(fs::File::open(&f).unwrap(), &ring, ReadMode::Strict).unwrap();
        let mut audio: Vec<Vec<u8>> = vec![Vec::new(); 2];
        while let Some(rec) = r.next_record().unwrap() {
            for e in entries(&rec.plaintext) {
                if let Entry::Rtp { stream, packet, .. } = e.unwrap() {
                    audio[usize::from(stream)].extend_from_slice(&packet[12..]);
                    total += 1;
                }
            }
        }
        assert_eq!(r.end().unwrap().reason, EndReason::IdleTimeout);
        // Leg 0 carries 1,000 Hz and leg 1 1,500 Hz (streams open in arrival order).
        let mut hz: Vec<f64> = audio.iter().map(|a| tone_hz(a)).collect();
        hz.sort_by(f64::total_cmp);
        assert!(
            (hz[0] - 1000.0).abs() < 20.0 && (hz[1] - 1500.0).abs() < 20.0,
            "{hz:?}"
        );
        assert_eq!(audio[0].len(), 50 * 160);
    }
    assert_eq!(total, 300, "every packet sent is in a package");
    assert_eq!(a.metric("edgerec_rtp_packets_lost_total"), 0.0);
    let mode = expected_ingest_mode();
    assert_eq!(
        a.metric(&format!("edgerec_ingest_mode{{mode=\"{mode}\"}}")),
        1.0,
        "read by {mode}"
    );
    export_checks(&a, 6);
}

/// Exports the store to WAV and pcap and checks both with independent readers.
fn export_checks(a: &Appliance, streams: usize) {
    let key = key_path("test-kek.pem");
    let store = a.path("store");
    let out = a.path("export");
    for format in ["wav", "pcap"] {
        let r = edgerec(&[
            "export",
            "--key",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--format",
            format,
            store.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let mut wavs = Vec::new();
    let mut pcaps = Vec::new();
    let mut metas = Vec::new();
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = p.to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".wav") {
                wavs.push(p);
            } else if name.ends_with(".pcap") {
                pcaps.push(p);
            } else if name.ends_with("_metadata.json") {
                metas.push(p);
            }
        }
    }
    assert_eq!(
        (wavs.len(), pcaps.len(), metas.len()),
        (streams / 2, streams / 2, streams / 2)
    );
    assert!(
        wavs[0]
            .to_string_lossy()
            .contains("/conversation_id=untagged/")
    );
    assert!(wavs[0].to_string_lossy().contains("/year="));
    for w in &wavs {
        let r = hound::WavReader::open(w).unwrap();
        let spec = r.spec();
        assert_eq!(
            (spec.channels, spec.sample_rate, spec.bits_per_sample),
            (2, 8000, 16)
        );
        let d = r.duration();
        assert!((7900..=8400).contains(&d), "about one second: {d} samples");
    }
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&metas[0]).unwrap()).unwrap();
    assert_eq!(m["terminated"], true);
    assert_eq!(m["end_reason"], "idle_timeout");
    assert_eq!(m["streams"][0]["packets"], 50);
    assert_eq!(m["streams"][0]["lost"], 0);
    assert_eq!(m["streams"][1]["codec"], "PCMU");
    // tshark decodes the pcap as RTP: two streams of 50 packets on the recorded port.
    let port = m["streams"][0]["local"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let pcap = pcaps
        .iter()
        .find(|p| {
            p.to_string_lossy()
                .contains(m["recording_id"].as_str().unwrap())
        })
        .unwrap();
    let t = Command::new("tshark")
        .args([
            "-r",
            pcap.to_str().unwrap(),
            "-d",
            &format!("udp.port=={port},rtp"),
            "-T",
            "fields",
            "-e",
            "rtp.ssrc",
            "-e",
            "rtp.p_type",
        ])
        .output()
        .expect("tshark is installed by the test command");
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let lines = String::from_utf8(t.stdout).unwrap();
    let rtp: Vec<_> = lines.lines().filter(|l| l.ends_with("\t0")).collect();
    assert_eq!(rtp.len(), 100, "{lines}");
    let mut ssrcs: Vec<_> = rtp.iter().map(|l| l.split('\t').next().unwrap()).collect();
    ssrcs.sort_unstable();
    ssrcs.dedup();
    assert_eq!(ssrcs.len(), 2);
}

#[test]
fn sources_outside_the_allow_list_are_counted_and_never_recorded() {
    let mut a = Appliance::start_allowing("\"10.0.0.0/8\", \"2001:db8::/32\"");
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..30u16 {
        s.send_to(&rtp(i, 5, 0x55), ("127.0.0.1", a.base)).unwrap();
    }
    a.wait_metric(
        "edgerec_datagrams_rejected_total{reason=\"denied_source\"}",
        30.0,
    );
    assert_eq!(a.metric("edgerec_recordings_started_total"), 0.0);
    a.sigterm();
    assert!(stored(&a.path("store")).is_empty());
    let active: Vec<_> = fs::read_dir(a.path("spool/active")).unwrap().collect();
    assert!(active.is_empty());
}

/// Sum of every `edgerec_datagrams_rejected_total{reason=...}` line.
fn rejected_total(body: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with("edgerec_datagrams_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric_in(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn bad_input_and_a_burst_to_one_port_are_counted_and_lose_nothing_accepted() {
    let mut a = Appliance::start();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0u64;
    let mut send = |data: &[u8], port: u16| {
        if s.send_to(data, ("127.0.0.1", port)).is_ok() {
            sent += 1;
        }
    };
    // A good stream on the first port, with bad input to the same port between its packets:
    // truncated RTP, wrong version, an RTP header claiming padding longer than the packet.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..100u16 {
        let good = rtp(i, 0x600d, 0x11);
        send(&good, a.base);
        send(&good[..8], a.base);
        let mut v1 = good.clone();
        v1[0] = 0x40;
        send(&v1, a.base);
        let mut pad = good.clone();
        pad[0] |= 0x20;
        *pad.last_mut().unwrap() = 200;
        send(&pad, a.base);
        // Random bytes to the fourth port (what looks like RTP there is recorded there).
        let len = 1 + (x % 300) as usize;
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        send(&junk, a.base + 3);
        if i % 5 == 4 {
            // Paced like a (fast) stream, so that this part is no burst.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // RTCP alone, to a port with no recording (neither on it nor on the port below).
    for _ in 0..10 {
        send(&[0x81, 203, 0, 1, 0, 0, 0, 9], a.base + 2);
    }
    a.wait_metric(
        "edgerec_datagrams_rejected_total{reason=\"rtcp_without_recording\"}",
        10.0,
    );
    // A burst to the second port from two senders at once, as fast as they can send.
    let port = a.base + 1;
    let other = std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        (0..20_000u32)
            .filter(|i| {
                s.send_to(
                    &rtp(*i as u16, 0xb0258, (i % 251) as u8),
                    ("127.0.0.1", port),
                )
                .is_ok()
            })
            .count() as u64
    });
    for i in 0..20_000u32 {
        send(&rtp(i as u16, 0xb0257, (i % 251) as u8), port);
    }
    sent += other.join().unwrap();
    // Every datagram sent is accounted for: stored, a duplicate, or rejected with a reason
    // (socket-buffer drops are read from the kernel every two seconds).
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (_, body) = a.get("/metrics");
        let accounted = metric_in(&body, "edgerec_rtp_packets_received_total")
            + metric_in(&body, "edgerec_rtcp_packets_total")
            + metric_in(&body, "edgerec_rtp_packets_duplicate_total")
            + rejected_total(&body);
        if accounted as u64 == sent {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "{accounted} of {sent} datagrams accounted for:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(a.get("/healthz").0, 200, "still running");
    for reason in [
        "short",
        "version",
        "malformed_rtp",
        "rtcp_without_recording",
    ] {
        assert!(
            body.contains(&format!(
                "edgerec_datagrams_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{body}"
        );
    }
    let received = metric_in(&body, "edgerec_rtp_packets_received_total") as usize;
    a.sigterm();

    // Nothing accepted is lost: every stored RTP packet is in a package, whole and in order.
    let mut in_packages = 0;
    let mut good = None;
    let mut burst = Vec::new();
    // Ended by the shutdown, not yet uploaded: those wait in spool/ready for the next start.
    let mut packages = stored(&a.path("store"));
    packages.extend(stored(&a.path("spool/ready")));
    for p in packages {
        let ring = ring(&["test"]);
        let mut r =
            PackageReader::new(fs::File::open(&p).unwrap(), &ring, ReadMode::Strict).unwrap();
        let mut by_ssrc: std::collections::HashMap<u32, Vec<u16>> = Default::default();
        while let Some(rec) = r.next_record().unwrap() {
            for e in entries(&rec.plaintext) {
                if let Entry::Rtp { packet, .. } = e.unwrap() {
                    in_packages += 1;
                    let ssrc = u32::from_be_bytes(packet[8..12].try_into().unwrap());
                    let seq = u16::from_be_bytes([packet[2], packet[3]]);
                    if [0x600d, 0xb0257, 0xb0258].contains(&ssrc) {
                        assert_eq!(packet.len(), 172);
                        assert_eq!(&packet[12..], &[packet[12]; 160][..], "payload intact");
                    }
                    by_ssrc.entry(ssrc).or_default().push(seq);
                }
            }
        }
        good = good.or(by_ssrc.remove(&0x600d));
        for ssrc in [0xb0257, 0xb0258] {
            if let Some(seqs) = by_ssrc.remove(&ssrc) {
                burst.push(seqs);
            }
        }
    }
    assert_eq!(
        in_packages, received,
        "every accepted packet is in a package"
    );
    assert_eq!(good.unwrap(), (0..100).collect::<Vec<u16>>());
    assert_eq!(burst.len(), 2, "both burst streams recorded");
    for seqs in burst {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    }
}

#[test]
fn the_sample_call_replays_into_one_recording_byte_for_byte() {
    let sample = repo_path("samples/sample-call.pcap");
    let (captured, _) = edgerec::tools::replay::read(fs::File::open(&sample).unwrap()).unwrap();
    let a = Appliance::start();
    let out = loadgen(
        &format!("{}-{}", a.base, a.base + 3),
        &["--replay", sample.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        report.contains(&format!("packets_sent {}", captured.len())),
        "{report}"
    );
    assert!(report.contains("sources 2"), "{report}");
    let files = wait_stored(&a.path("store"), 1);
    assert_eq!(files.len(), 1, "one call, one recording");
    let ring = ring(&["test"]);
    let mut r =
        PackageReader::new(fs::File::open(&files[0]).unwrap(), &ring, ReadMode::Strict).unwrap();
    let mut recorded = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        for e in entries(&rec.plaintext) {
            if let Entry::Rtp { packet, .. } = e.unwrap() {
                recorded.push(packet.to_vec());
            }
        }
    }
    let sent: Vec<Vec<u8>> = captured.into_iter().map(|d| d.payload).collect();
    assert_eq!(recorded, sent, "every packet, in order, byte for byte");
}

#[test]
fn a_package_sent_again_with_spool_retry_is_delivered_at_once() {
    let a = Appliance::start();
    // A refused package, as the uploader leaves it in failed/ (made in a spool of its own,
    // then moved in, so that nothing announces it).
    let other = tempfile::tempdir().unwrap();
    let side = edgerec::appliance::spool::Spool::open(other.path()).unwrap();
    let opts = erec::writer::SealOptions {
        media: erec::writer::Media::Rtp,
        ..Default::default()
    };
    let s = erec::writer::Sealer::new(&[public("test")], &opts).unwrap();
    let id = s.recording_id();
    let f = side.create(id, s.header_bytes()).unwrap();
    let mut end = Vec::new();
    s.finish(EndReason::Complete, 1, &mut end);
    side.finish(f, &end, 1).unwrap();
    let mut st = side
        .read_state(edgerec::appliance::spool::Place::Ready, id)
        .unwrap();
    st.last_error = Some("store refused the package: 403".into());
    side.write_state(edgerec::appliance::spool::Place::Ready, &st)
        .unwrap();
    for ext in ["erec", "json"] {
        fs::rename(
            other.path().join(format!("ready/{id}.{ext}")),
            a.path(&format!("spool/failed/{id}.{ext}")),
        )
        .unwrap();
    }
    let cfg = a.path("edgerec.toml");
    let out = edgerec(&["spool", "retry", "--config", cfg.to_str().unwrap(), "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The periodic scan is an hour away here: only the watch on ready/ can deliver it.
    let files = wait_stored(&a.path("store"), 1);
    assert!(files[0].ends_with(format!("{id}.erec")));
    // Then the spool lets go of its copy.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.path(&format!("spool/ready/{id}.json")).exists() {
        assert!(Instant::now() < deadline, "still in the spool");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `[store]` lines for `weed`, with a credentials file holding `secret`.
pub fn s3_store(weed: &crate::s3::Weed, secret: &str) -> String {
    let creds = weed.dir.path().join("credentials");
    fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
            crate::s3::ACCESS_KEY
        ),
    )
    .unwrap();
    format!(
        "kind = \"s3\"\nendpoint = \"{}\"\nbucket = \"edgerec\"\nprefix = \"calls/\"\ncredentials_file = \"{}\"",
        weed.endpoint,
        creds.display()
    )
}

/// RTP packets in a package.
fn rtp_packets(bytes: &[u8]) -> usize {
    rtp_packets_in(bytes, ReadMode::Strict)
}

/// RTP packets in a package, read in `mode`.
fn rtp_packets_in(bytes: &[u8], mode: ReadMode) -> usize {
    let ring = ring(&["test"]);
    let mut r = PackageReader::new(bytes, &ring, mode).unwrap();
    let mut packets = 0;
    while let Some(rec) = r.next_record().unwrap() {
        packets += entries(&rec.plaintext)
            .filter(|e| matches!(e, Ok(Entry::Rtp { .. })))
            .count();
    }
    packets
}

#[test]
fn calls_are_delivered_to_an_s3_store() {
    use crate::s3::{SECRET_KEY, Weed};
    let weed = Weed::start();
    let a = Appliance::start_with("\"127.0.0.0/8\"", &s3_store(&weed, SECRET_KEY));
    let out = loadgen(
        &format!("{}-{}", a.base, a.base),
        &["--streams", "2", "--seconds", "1"],
    );
    assert!(out.status.success());
    let line = a.wait_log("stored");
    let key = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("key="))
        .expect("the log names the object key")
        .trim_matches('"')
        .to_string();
    assert!(key.starts_with("calls/") && key.ends_with(".erec"), "{key}");
    let bytes = weed.store(SECRET_KEY).get(&key).unwrap();
    assert_eq!(
        rtp_packets(&bytes),
        100,
        "both legs, every packet, from the store"
    );
    // The store holds it before the uploader counts it: wait for the count.
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 1.0);
    assert_eq!(a.metric("edgerec_uploads_total{outcome=\"stored\"}"), 1.0);
}

#[test]
fn wrong_credentials_send_packages_to_failed_until_fixed_and_retried() {
    use crate::s3::{SECRET_KEY, Weed};
    let weed = Weed::start();
    let mut a = Appliance::start_with("\"127.0.0.0/8\"", &s3_store(&weed, "wrong-secret"));
    let out = loadgen(
        &format!("{}-{}", a.base, a.base + 1),
        &["--streams", "4", "--seconds", "1"],
    );
    assert!(out.status.success());
    // Refused for good: to failed/, counted, and the log says why.
    a.wait_metric("edgerec_uploads_total{outcome=\"failed\"}", 2.0);
    let why = a.wait_log("moved to failed/");
    assert!(why.contains("403"), "{why}");
    assert_eq!(
        fs::read_dir(a.path("spool/failed")).unwrap().count(),
        4,
        "2 packages + states"
    );
    assert!(recordings_in(&weed.store(SECRET_KEY), "calls/").is_empty());
    // The operator fixes the credentials, restarts, and sends the failed packages again.
    a.sigterm();
    let cfg = a.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    let creds = text
        .lines()
        .find_map(|l| l.strip_prefix("credentials_file = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {SECRET_KEY}\n",
            crate::s3::ACCESS_KEY
        ),
    )
    .unwrap();
    a.spawn();
    let out = edgerec(&["spool", "retry", "--config", cfg.to_str().unwrap(), "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 2.0);
    let store = weed.store(SECRET_KEY);
    let keys = recordings_in(&store, "calls/");
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert_eq!(rtp_packets(&store.get(&k).unwrap()), 100);
    }
}

#[test]
fn a_store_killed_under_load_gets_every_recording_exactly_once_after_it_returns() {
    use crate::s3::{SECRET_KEY, Weed};
    let mut weed = Weed::start();
    let a = Appliance::start_with("\"127.0.0.0/8\"", &s3_store(&weed, SECRET_KEY));
    // Four calls; the store dies (kill -9) while they are being recorded.
    let lg = {
        let ports = format!("{}-{}", a.base, a.base + 3);
        std::thread::spawn(move || loadgen(&ports, &["--streams", "8", "--seconds", "2"]))
    };
    a.wait_metric("edgerec_recordings_active", 4.0);
    weed.kill9();
    assert!(lg.join().unwrap().status.success());
    // The calls end and fail to upload, again and again, while the store is down.
    a.wait_metric("edgerec_upload_retries_total", 8.0);
    assert_eq!(a.metric("edgerec_uploads_total{outcome=\"failed\"}"), 0.0);
    weed.restart();
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 4.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_dir(a.path("spool/ready")).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the spool did not empty");
        std::thread::sleep(Duration::from_millis(20));
    }
    let store = weed.store(SECRET_KEY);
    let keys = recordings_in(&store, "calls/");
    assert_eq!(keys.len(), 4, "each recording once: {keys:?}");
    for k in keys {
        let bytes = store.get(&k).unwrap();
        assert_eq!(rtp_packets(&bytes), 200, "{k}");
    }
    // The store holds it before the uploader counts it: wait for the count.
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 4.0);
    assert_eq!(a.metric("edgerec_uploads_total{outcome=\"stored\"}"), 4.0);
}

#[test]
fn a_recorder_killed_during_multipart_uploads_resumes_them_after_restart() {
    use crate::s3::{SECRET_KEY, Weed};
    let weed = Weed::start();
    // Parts of 5 MiB above 5 MiB, and a slow link, so the kill lands mid-upload.
    let mut a = Appliance::prepare(
        "\"127.0.0.0/8\"",
        &s3_store(&weed, SECRET_KEY),
        "multipart_threshold_bytes = 5242880\nmultipart_part_bytes = 5242880\n\
         bandwidth_bytes_per_sec = 4194304",
    );
    // Two large packages (as a long call or a digital recording makes them) waiting in the
    // spool: sealed, and left in active/ as a crash would, so the start recovers them.
    let active = a.path("spool/active");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&active)
        .unwrap();
    fs::set_permissions(a.path("spool"), fs::Permissions::from_mode(0o700)).unwrap();
    let mut packages = Vec::new();
    for i in 0..2u8 {
        let plain = a.path(&format!("plain{i}"));
        let mut data = pattern((22 << 20) + 1000 * usize::from(i));
        data[0] = i;
        fs::write(&plain, &data).unwrap();
        let sealed = a.path(&format!("sealed{i}.erec"));
        let kek = key_path("test-kek.pub.pem");
        let out = edgerec(&[
            "seal",
            "--kek",
            kek.to_str().unwrap(),
            plain.to_str().unwrap(),
            sealed.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = edgerec(&["inspect", "--json", sealed.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id = info["recording_id"].as_str().unwrap().to_string();
        let part = active.join(format!("{id}.erec.part"));
        fs::copy(&sealed, &part).unwrap();
        fs::set_permissions(&part, fs::Permissions::from_mode(0o600)).unwrap();
        packages.push((id, fs::read(&sealed).unwrap()));
    }
    a.spawn();
    let parts_saved = |a: &Appliance| -> Vec<usize> {
        packages
            .iter()
            .map(|(id, _)| {
                fs::read(a.path(&format!("spool/ready/{id}.json")))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["multipart"]["parts"].as_array().map(Vec::len))
                    .unwrap_or(0)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while parts_saved(&a).contains(&0) {
        assert!(Instant::now() < deadline, "no part was confirmed");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill9();
    let saved: usize = parts_saved(&a).iter().sum();
    assert!(saved < 10, "killed mid-upload: {saved} of 10 parts");
    let cfg = a.path("edgerec.toml");
    let out = edgerec(&["spool", "list", "--config", cfg.to_str().unwrap()]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("of 5 parts stored"), "{listing}");
    let store = weed.store(SECRET_KEY);
    assert_eq!(store.list_uploads("calls/").unwrap().len(), 2);
    assert!(recordings_in(&store, "calls/").is_empty());
    // Restarted, on a free link: the uploads resume with the parts still missing.
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, text.replace("bandwidth_bytes_per_sec = 4194304", "")).unwrap();
    a.spawn();
    let line = a.wait_log("resuming multipart upload");
    assert!(!line.contains("parts_done=0"), "{line}");
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 2.0);
    assert_eq!(
        a.metric("edgerec_upload_parts_total"),
        (10 - saved) as f64,
        "only the missing parts went up again"
    );
    let keys = recordings_in(&store, "calls/");
    assert_eq!(keys.len(), 2, "each package once: {keys:?}");
    for (id, bytes) in &packages {
        let key = keys.iter().find(|k| k.contains(id.as_str())).unwrap();
        assert!(store.get(key).unwrap() == *bytes, "{key}: the sealed bytes");
    }
    assert!(
        store.list_uploads("calls/").unwrap().is_empty(),
        "no upload left behind"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_dir(a.path("spool/ready")).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the spool did not empty");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn store_faults_are_retried_and_a_lost_answer_is_recognised_as_stored() {
    use crate::proxy::{Fault, Proxy, Rule};
    use crate::s3::{SECRET_KEY, Weed};
    let weed = Weed::start();
    let proxy = Proxy::start(&weed.endpoint);
    let fault = |fault| Rule {
        method: "PUT",
        path_has: "/edgerec/calls/",
        fault,
    };
    proxy.add([
        fault(Fault::Status500),
        fault(Fault::Busy(1)),
        fault(Fault::Reset),
        fault(Fault::Hang),
        fault(Fault::LoseAnswer),
    ]);
    let store = s3_store(&weed, SECRET_KEY).replace(&weed.endpoint, &proxy.endpoint);
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", &store, "attempt_timeout_secs = 3");
    a.spawn();
    let out = loadgen(
        &format!("{}-{}", a.base, a.base + 3),
        &["--streams", "8", "--seconds", "1"],
    );
    assert!(out.status.success());
    // The 503's Retry-After (1 s) is the floor of the wait that follows it.
    // Only the retry line of the 503 itself: a recording id or a time may hold "503" too.
    let busy = a.wait_log_where("a retry after 503", |l| {
        l.contains("will retry") && (l.contains(": 503 ") || l.contains("HTTP 503"))
    });
    let wait: u64 = busy
        .split_whitespace()
        .find_map(|w| w.strip_prefix("wait_ms="))
        .and_then(|w| w.parse().ok())
        .expect("the retry names its wait");
    assert!(wait >= 1000, "{busy}");
    let done = |a: &Appliance| {
        a.metric("edgerec_uploads_total{outcome=\"stored\"}")
            + a.metric("edgerec_uploads_total{outcome=\"already_stored\"}")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while done(&a) < 4.0 {
        assert!(Instant::now() < deadline, "not every recording was stored");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.pending(), 0, "every fault fired: {:?}", proxy.fired());
    assert_eq!(
        a.metric("edgerec_uploads_total{outcome=\"already_stored\"}"),
        1.0,
        "the put whose answer was lost is found in the store, not sent twice"
    );
    assert!(a.metric("edgerec_upload_retries_total") >= 5.0);
    assert_eq!(a.metric("edgerec_uploads_total{outcome=\"failed\"}"), 0.0);
    let s3 = weed.store(SECRET_KEY);
    let keys = recordings_in(&s3, "calls/");
    assert_eq!(keys.len(), 4, "each recording once: {keys:?}");
    for k in keys {
        assert_eq!(rtp_packets(&s3.get(&k).unwrap()), 100, "{k}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_dir(a.path("spool/ready")).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the spool did not empty");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.sigterm();
}

#[test]
fn calls_are_delivered_to_an_http_store_over_mutual_tls() {
    use crate::http_store::{Receiver, TOKEN};
    let rx = Receiver::start();
    let token = rx.pki.path("token");
    fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let store = format!(
        "kind = \"http\"\nurl = \"{}\"\nprefix = \"site-a/\"\ntoken_file = \"{}\"\n\
         ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        rx.url,
        token.display(),
        rx.pki.path("ca.pem").display(),
        rx.pki.path("client.pem").display(),
        rx.pki.path("client.key").display(),
    );
    let mut a = Appliance::start_with("\"127.0.0.0/8\"", &store);
    let out = loadgen(
        &format!("{}-{}", a.base, a.base + 1),
        &["--streams", "4", "--seconds", "1"],
    );
    assert!(out.status.success());
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 2.0);
    let objects = rx.objects.lock().unwrap().clone();
    assert_eq!(objects.len(), 2);
    for (key, bytes) in objects {
        assert!(
            key.starts_with("site-a/") && key.ends_with(".erec"),
            "{key}"
        );
        assert_eq!(rtp_packets(&bytes), 100, "{key}");
    }
    a.sigterm();
}

#[test]
fn a_full_spool_file_system_refuses_new_calls_keeps_the_spooled_ones_and_recovers() {
    // The store is unreachable, so every package stays in the spool.
    let creds = tempfile::tempdir().unwrap();
    fs::write(
        creds.path().join("c"),
        "[default]\naws_access_key_id = x\naws_secret_access_key = y\n",
    )
    .unwrap();
    let store = format!(
        "kind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"edgerec\"\n\
         credentials_file = \"{}\"",
        creds.path().join("c").display()
    );
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", &store, "");
    let cfg = a.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(
        &cfg,
        text.replace(
            "idle_timeout_ms = 1500",
            "idle_timeout_ms = 1500\nmin_free_bytes = 2097152",
        ),
    )
    .unwrap();
    fs::create_dir(a.path("spool")).unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&a.path("spool"), "12m") else {
        return;
    };
    a.spawn();
    let ports = |i: u16| format!("{}-{}", a.base + i, a.base + i);
    let packages = |a: &Appliance| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(a.path("spool/ready"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "erec") && !is_manifest(p))
            .collect();
        v.sort();
        v
    };
    // Call A is recorded and waits in the spool.
    assert!(
        loadgen(&ports(0), &["--streams", "1", "--seconds", "1"])
            .status
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while packages(&a).is_empty() {
        assert!(Instant::now() < deadline, "call A did not reach ready/");
        std::thread::sleep(Duration::from_millis(20));
    }
    let call_a = packages(&a)[0].clone();
    let a_bytes = fs::read(&call_a).unwrap();
    // Call B is being recorded when the file system fills up.
    let call_b = {
        let p = ports(1);
        std::thread::spawn(move || loadgen(&p, &["--streams", "1", "--seconds", "4"]))
    };
    a.wait_metric("edgerec_recordings_active", 1.0);
    let chunks = a.metric("edgerec_chunks_written_total");
    a.wait_metric("edgerec_chunks_written_total", chunks + 1.0);
    {
        let mut ballast = fs::File::create(a.path("spool/ballast")).unwrap();
        let block = vec![0u8; 64 << 10];
        while ballast.write_all(&block).is_ok() {}
    }
    // B's next write fails (ENOSPC): it ends, counted, kept up to its last whole record.
    a.wait_metric(
        "edgerec_recordings_ended_total{reason=\"write_error\"}",
        1.0,
    );
    a.wait_log("write failed; recording ended");
    let deadline = Instant::now() + Duration::from_secs(30);
    while packages(&a).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "call B was not moved to ready/ while the disk is full"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // New calls are refused, /readyz says so, the appliance stays alive.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.get("/readyz").0 != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed ready on a full disk"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(call_b.join().unwrap().status.success());
    assert!(
        loadgen(&ports(2), &["--streams", "1", "--seconds", "1"])
            .status
            .success()
    );
    a.wait_metric(
        "edgerec_recordings_refused_total{reason=\"spool_full\"}",
        1.0,
    );
    assert_eq!(a.get("/healthz").0, 200);
    assert_eq!(fs::read(&call_a).unwrap(), a_bytes, "call A untouched");
    // Space comes back: recording resumes.
    fs::remove_file(a.path("spool/ballast")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.get("/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "/readyz did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = a.metric("edgerec_recordings_started_total");
    assert!(
        loadgen(&ports(3), &["--streams", "1", "--seconds", "1"])
            .status
            .success()
    );
    a.wait_metric("edgerec_recordings_started_total", started + 1.0);
    a.sigterm();
    // A restart rebuilds any state the full disk kept from being written.
    a.spawn();
    a.sigterm();
    let mut terminated = 0;
    let mut unterminated = Vec::new();
    for p in packages(&a) {
        let bytes = fs::read(&p).unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&fs::read(p.with_extension("json")).unwrap()).unwrap();
        assert_eq!(
            state["sha256"].as_str().unwrap(),
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            "{}",
            p.display()
        );
        if state["terminated"].as_bool().unwrap() {
            assert_eq!(rtp_packets(&bytes), 50, "{}", p.display());
            terminated += 1;
        } else {
            unterminated.push(rtp_packets_in(&bytes, ReadMode::Recovery));
        }
    }
    assert_eq!(terminated, 2, "calls A and D, whole");
    assert_eq!(unterminated.len(), 1, "call B, kept up to the full disk");
    assert!(
        unterminated[0] > 0 && unterminated[0] < 200,
        "{unterminated:?}"
    );
    assert!(
        fs::read_dir(a.path("spool/active"))
            .unwrap()
            .next()
            .is_none()
    );
    // The outcome journal, written on the full disk too: three calls in the spool (the store
    // never answered), B salvaged at its failed write, C refused for the full spool.
    let doc = calls_json("--config", &cfg);
    let calls = doc["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 3, "{doc}");
    assert!(calls.iter().all(|c| c["outcome"] == "spooled"), "{doc}");
    let salvaged: Vec<&serde_json::Value> =
        calls.iter().filter_map(|c| c.get("salvaged")).collect();
    assert_eq!(salvaged.len(), 1, "{doc}");
    assert!(
        salvaged[0]["why"]
            .as_str()
            .unwrap()
            .contains("write failed"),
        "{doc}"
    );
    let refused: u64 = doc["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == "spool_full")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(refused >= 1, "{doc}");
}

/// The hex kek ids a package is sealed to (`inspect --json`).
fn kek_ids(package: &Path) -> Vec<String> {
    let out = edgerec(&["inspect", "--json", package.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["kek_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn replacing_the_key_file_rotates_the_kek_for_new_recordings_only() {
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    let keys = a.path("keys");
    fs::create_dir(&keys).unwrap();
    let kek = keys.join("kek.pub.pem");
    fs::copy(key_path("test-kek.pub.pem"), &kek).unwrap();
    let cfg = a.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(
        &cfg,
        text.replace(
            &key_path("test-kek.pub.pem").display().to_string(),
            &kek.display().to_string(),
        ),
    )
    .unwrap();
    a.spawn();
    let (old_id, new_id) = (public("test").id().to_hex(), public("other").id().to_hex());
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{old_id}\"}}")),
        1.0
    );
    // Call 1 is in progress when the key is replaced (renamed over the file, as careful
    // tools do).
    let call1 = {
        let p = format!("{}-{}", a.base, a.base);
        std::thread::spawn(move || loadgen(&p, &["--streams", "1", "--seconds", "3"]))
    };
    a.wait_metric("edgerec_recordings_active", 1.0);
    let staged = keys.join(".kek.pub.pem.new");
    fs::copy(key_path("other-kek.pub.pem"), &staged).unwrap();
    fs::rename(&staged, &kek).unwrap();
    a.wait_log("KEK rotated");
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{new_id}\"}}")),
        1.0
    );
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{old_id}\"}}")),
        0.0
    );
    // Call 2 starts after the rotation.
    assert!(
        loadgen(
            &format!("{}-{}", a.base + 1, a.base + 1),
            &["--streams", "1", "--seconds", "1"]
        )
        .status
        .success()
    );
    assert!(call1.join().unwrap().status.success());
    // A broken file (written in place) is counted and the current key stays.
    fs::write(&kek, b"-----BEGIN PUBLIC KEY-----\nnot a key\n").unwrap();
    a.wait_metric("edgerec_kek_fetch_errors_total", 1.0);
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{new_id}\"}}")),
        1.0
    );
    let mut packages = wait_stored(&a.path("store"), 2);
    packages.sort(); // UUIDv7 names: call 1 first
    assert_eq!(
        kek_ids(&packages[0]),
        [old_id],
        "call 1 keeps the key it began with"
    );
    assert_eq!(
        kek_ids(&packages[1]),
        [new_id],
        "call 2 is sealed to the new key"
    );
    let out = a.path("call2.bin");
    let opened = edgerec(&[
        "open",
        "--key",
        key_path("other-kek.pem").to_str().unwrap(),
        packages[1].to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    a.sigterm();
}

/// The port a package's call came in on (public metadata).
fn port_of(package: &Path) -> u64 {
    let out = edgerec(&["inspect", "--json", package.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["public_metadata"]["port"].as_u64().unwrap()
}

/// `edgerec export` through the key manager: (exit code, stderr, media files written).
fn export_through(lkm: &crate::lkm::Service, store: &Path, out: &Path) -> (i32, String, usize) {
    let mut args = vec!["export".to_string()];
    args.extend(lkm.reading_args());
    args.extend([
        "--out".into(),
        out.display().to_string(),
        store.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = edgerec(&args);
    (
        r.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&r.stderr).into_owned(),
        files_with_ext(out, "wav").len(),
    )
}

#[test]
fn recording_through_the_key_manager_rotates_mid_load_and_rides_out_its_outage() {
    let mut lkm = crate::lkm::Service::start();
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    a.keys_from(&lkm, "max_age_secs = 3600");
    a.spawn();
    let (code, before, _) = lkm.admin(&["keys", "--json"]);
    assert_eq!(code, 0);
    let old_id = serde_json::from_str::<serde_json::Value>(&before).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{old_id}\"}}")),
        1.0
    );
    // Calls on the first two ports are in progress when the key manager rotates; calls on
    // the other two start after the recorder took the new key.
    let early = {
        let p = format!("{}-{}", a.base, a.base + 1);
        std::thread::spawn(move || loadgen(&p, &["--streams", "4", "--seconds", "3"]))
    };
    a.wait_metric("edgerec_recordings_active", 2.0);
    let (code, new_id, err) = lkm.admin(&["rotate"]);
    assert_eq!(code, 0, "{err}");
    let new_id = new_id.trim().to_string();
    let rotated = a.wait_log("KEK rotated by the key manager");
    assert!(rotated.contains(&new_id), "{rotated}");
    let late = loadgen(
        &format!("{}-{}", a.base + 2, a.base + 3),
        &["--streams", "4", "--seconds", "1"],
    );
    assert!(late.status.success());
    assert!(early.join().unwrap().status.success());
    let packages = wait_stored(&a.path("store"), 4);
    for p in &packages {
        let want = if port_of(p) < u64::from(a.base + 2) {
            &old_id
        } else {
            &new_id
        };
        assert_eq!(kek_ids(p), [want.as_str()], "{}", p.display());
    }
    // Every one of them exports through the key manager.
    let (code, err, media) = export_through(&lkm, &a.path("store"), &a.path("export1"));
    assert_eq!((code, media), (0, 4), "{err}");
    // The key manager goes down: recording goes on with the key in hand, also across a
    // restart of the recorder (from its cached key), and the failed fetches are counted.
    lkm.stop();
    a.wait_metric("edgerec_kek_fetch_errors_total", 1.0);
    a.sigterm();
    a.spawn();
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{new_id}\"}}")),
        1.0,
        "started with the cached key"
    );
    let during = loadgen(
        &format!("{}-{}", a.base, a.base),
        &["--streams", "2", "--seconds", "1"],
    );
    assert!(during.status.success());
    let packages = wait_stored(&a.path("store"), 5);
    assert_eq!(packages.len(), 5);
    // Export cannot unwrap while it is down: it fails clearly and writes no media.
    let (code, err, media) = export_through(&lkm, &a.path("store"), &a.path("export2"));
    assert_eq!((code, media), (1, 0), "{err}");
    assert!(
        err.contains("key manager") && err.contains("no answer"),
        "{err}"
    );
    // Back up: everything exports, the outage's recording included.
    lkm.restart();
    let (code, err, media) = export_through(&lkm, &a.path("store"), &a.path("export3"));
    assert_eq!((code, media), (0, 5), "{err}");
    a.sigterm();
}

#[test]
fn a_stale_key_refuses_new_recordings_when_the_policy_says_so() {
    let mut lkm = crate::lkm::Service::start();
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    a.keys_from(&lkm, "max_age_secs = 2\non_stale = \"refuse\"");
    a.spawn();
    // The key manager goes away; once the key is older than max_age_secs, calls are refused
    // and counted, nothing is sealed to a key nobody confirmed.
    lkm.stop();
    a.wait_log("the cached key is stale");
    let call = |port: u16| {
        loadgen(
            &format!("{port}-{port}"),
            &["--streams", "1", "--seconds", "0.5"],
        )
    };
    assert!(call(a.base).status.success());
    a.wait_metric(
        "edgerec_recordings_refused_total{reason=\"kek_stale\"}",
        1.0,
    );
    // Refused once, in one place: a refused call never started, and its datagrams are
    // accounted for (before, the session counted it started and its chunks vanished).
    assert_eq!(a.metric("edgerec_recordings_started_total"), 0.0);
    assert_eq!(
        a.metric("edgerec_recordings_refused_total{reason=\"kek_stale\"}"),
        1.0
    );
    a.wait_metric("edgerec_datagrams_rejected_total{reason=\"refused\"}", 20.0);
    // Back: recording resumes at the next fetch.
    lkm.restart();
    a.wait_log("new recordings are taken");
    assert!(call(a.base + 1).status.success());
    let stored = wait_stored(&a.path("store"), 1);
    a.sigterm();
    // Only the call after the key manager came back was sealed.
    assert_eq!(stored.len(), 1);
    assert_eq!(port_of(&stored[0]), u64::from(a.base + 1));
    assert!(files_with_ext(&a.path("spool"), "erec").is_empty());
}

#[test]
fn the_demo_key_is_refused_at_start_and_on_a_key_change_unless_the_config_says_demo() {
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    // The key in a file of the appliance's own, so that it can be replaced.
    let kek = a.path("kek.pub.pem");
    fs::copy(key_path("test-kek.pub.pem"), &kek).unwrap();
    let cfg = a.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        &key_path("test-kek.pub.pem").display().to_string(),
        "kek.pub.pem",
    );
    let demo_key = repo_path("samples/demo-kek.pub.pem");
    // The committed demo key, whose private half is public: refused at start...
    fs::write(
        &cfg,
        text.replace("\"kek.pub.pem\"", &format!("\"{}\"", demo_key.display())),
    )
    .unwrap();
    let out = edgerec(&["run", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("DEMO key") && err.contains("demo = true"),
        "{err}"
    );
    // ...and when the key file is replaced by it while running: the key in hand stays.
    fs::write(&cfg, &text).unwrap();
    a.spawn();
    let ours = erec::keys::KekPublic::from_file(&kek)
        .unwrap()
        .id()
        .to_hex();
    let staged = a.path("demo.pub.pem.new");
    fs::copy(&demo_key, &staged).unwrap();
    fs::rename(&staged, &kek).unwrap();
    a.wait_metric("edgerec_kek_fetch_errors_total", 1.0);
    assert_eq!(
        a.metric(&format!("edgerec_kek_info{{kek_id=\"{ours}\"}}")),
        1.0
    );
    a.sigterm();
    // With demo = true (as the samples have it), it is taken.
    fs::write(
        &cfg,
        text.replace(
            "\"kek.pub.pem\"",
            &format!("\"{}\"\ndemo = true", demo_key.display()),
        ),
    )
    .unwrap();
    a.spawn();
    assert_eq!(
        a.metric(&format!(
            "edgerec_kek_info{{kek_id=\"{}\"}}",
            erec::keys::DEMO_KEK_ID
        )),
        1.0
    );
    a.sigterm();
}

#[test]
fn spoofed_call_starts_make_no_packages_and_a_real_call_is_whole() {
    let mut a = Appliance::start();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // 3,000 "calls" of one RTP datagram and a BYE each, over the four ports (before: 3,000
    // packages in 2.4 s).
    for i in 0..3_000u32 {
        let port = a.base + (i % 4) as u16;
        let ssrc = 0x5000_0000 + i;
        let _ = s.send_to(&rtp(1, ssrc, 0x55), ("127.0.0.1", port));
        let mut bye = vec![0x81, 203, 0, 1];
        bye.extend_from_slice(&ssrc.to_be_bytes());
        let _ = s.send_to(&bye, ("127.0.0.1", port));
    }
    // Every datagram is accounted for (kernel socket-buffer drops included), and no
    // recording was started: the lone packets were held as candidates and dropped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = a.get("/metrics");
        let accounted = metric_in(&body, "edgerec_rtp_packets_received_total")
            + metric_in(&body, "edgerec_rtcp_packets_total")
            + metric_in(&body, "edgerec_rtp_packets_duplicate_total")
            + rejected_total(&body);
        if accounted as u64 == 6_000
            && metric_in(
                &body,
                "edgerec_datagrams_rejected_total{reason=\"not_admitted\"}",
            ) > 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{accounted} of 6000 datagrams accounted for:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.metric("edgerec_recordings_started_total"), 0.0);
    // A real call afterwards is recorded from its first packet.
    for i in 0..20u16 {
        s.send_to(&rtp(i, 7, 0x33), ("127.0.0.1", a.base)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    a.wait_log("recording started");
    a.sigterm();
    let files = wait_stored(&a.path("store"), 1);
    assert_eq!(files.len(), 1);
    let (_, seqs, _) = decode(&files[0], ReadMode::Strict);
    assert_eq!(seqs[0].len(), 20, "nothing admitted is lost");
}
