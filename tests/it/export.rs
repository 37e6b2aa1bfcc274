//! Bulk export from the recording store: a day of recordings from SeaweedFS, with a tampered
//! and an unterminated package among them; resumable.

use std::fs;
use std::path::Path;

use edgerec::store::Store;

use crate::appliance::{Appliance, files_with_ext, loadgen, recordings_in, s3_store};
use crate::common::*;
use crate::s3::{SECRET_KEY, Weed};

#[test]
fn a_days_recordings_export_from_s3_skipping_the_tampered_and_a_second_run_does_nothing() {
    let weed = Weed::start();
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", &s3_store(&weed, SECRET_KEY), "");
    a.spawn();
    assert!(
        loadgen(
            &format!("{}-{}", a.base, a.base + 3),
            &["--streams", "8", "--seconds", "1"]
        )
        .status
        .success()
    );
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 4.0);
    a.sigterm();
    let s3 = weed.store(SECRET_KEY);
    let keys = recordings_in(&s3, "calls/");
    assert_eq!(keys.len(), 4);
    let day = keys[0]["calls/".len().."calls/yyyy/mm/dd/".len()].to_string();
    // Among them: a package with one byte changed, and one that ends without its end record.
    let put = |name: String, bytes: &[u8]| {
        let f = a.path("upload.erec");
        fs::write(&f, bytes).unwrap();
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(bytes).into();
        s3.put(&format!("calls/{day}{name}"), &f, &sha).unwrap();
    };
    let mut tampered = s3.get(&keys[0]).unwrap();
    let at = tampered.len() - 200;
    tampered[at] ^= 0x01;
    put(format!("{}.erec", uuid::Uuid::now_v7()), &tampered);
    let unterminated = fs::read(vectors_dir().join("unterminated.erec")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &edgerec(&[
            "inspect",
            "--json",
            vectors_dir().join("unterminated.erec").to_str().unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    put(
        format!("{}.erec", v["recording_id"].as_str().unwrap()),
        &unterminated,
    );
    // Something on another day is not exported.
    let f = a.path("upload.erec");
    let other_day = s3.get(&keys[1]).unwrap();
    fs::write(&f, &other_day).unwrap();
    let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&other_day).into();
    s3.put(
        &format!("calls/2020/01/01/{}.erec", uuid::Uuid::now_v7()),
        &f,
        &sha,
    )
    .unwrap();
    let date = day.trim_end_matches('/').replace('/', "-");
    let out = a.path("export");
    let export = || {
        edgerec(&[
            "export",
            "--key",
            key_path("test-kek.pem").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--store-config",
            a.path("edgerec.toml").to_str().unwrap(),
            "--from",
            &date,
            "--jobs",
            "3",
        ])
    };
    let first = export();
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    assert_eq!(
        first.status.code(),
        Some(4),
        "the tampered one fails the run: {err}"
    );
    assert!(
        err.contains("export: 6 packages: 5 exported, 0 skipped (done before), 1 failed"),
        "{err}"
    );
    assert!(
        err.contains("failed: s3:calls/") && err.contains("authentication failed"),
        "{err}"
    );
    assert_eq!(files_with_ext(&out, "wav").len(), 4, "every call");
    // The unterminated one is exported with the warning in its metadata.
    let metas: Vec<serde_json::Value> = files_with_ext(&out, "json")
        .iter()
        .filter(|p| p.to_str().unwrap().ends_with("_metadata.json"))
        .map(|p| serde_json::from_slice(&fs::read(p).unwrap()).unwrap())
        .collect();
    assert_eq!(metas.len(), 5);
    let warned: Vec<_> = metas.iter().filter(|m| m["warning"].is_string()).collect();
    assert_eq!(warned.len(), 1);
    assert_eq!(warned[0]["recording_id"], v["recording_id"]);
    // The calls are correct: two legs, 50 packets each, no loss.
    for m in metas.iter().filter(|m| m["media"] == "rtp") {
        let streams = m["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2, "{m}");
        for s in streams {
            assert_eq!(
                (s["packets"].as_u64(), s["lost"].as_u64()),
                (Some(50), Some(0)),
                "{m}"
            );
        }
    }
    // Nothing half-written, no plaintext temporary left, outputs 0600.
    for f in files_with_ext(&out, "wav") {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert!(files_with_ext(&out, "partial").is_empty());
    assert!(files_with_ext(&out.join(".edgerec-export/fetch"), "erec").is_empty());
    // A second run does nothing but verify; the tampered one fails again.
    let second = export();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("export: 6 packages: 0 exported, 5 skipped (done before), 1 failed"),
        "{err}"
    );
    // An output changed since is exported again.
    let wav = &files_with_ext(&out, "wav")[0];
    fs::write(wav, b"damaged").unwrap();
    let third = export();
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(err.contains("1 exported, 4 skipped"), "{err}");
    assert!(fs::read(wav).unwrap().len() > 1000);
}

/// A throwaway GnuPG home with one key pair (receiver), killed on drop.
pub struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    pub fn new() -> Gpg {
        let home = tempfile::Builder::new()
            .prefix("gpg")
            .tempdir_in("/tmp")
            .unwrap();
        let g = Gpg { home };
        let out = g.run(&[
            "--quick-gen-key",
            "Export Receiver <receiver@example.com>",
            "default",
            "default",
            "never",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        g
    }

    /// A home with one primary key that only certifies (no encryption subkey yet).
    fn new_bare(uid: &str) -> Gpg {
        let home = tempfile::Builder::new()
            .prefix("gpg")
            .tempdir_in("/tmp")
            .unwrap();
        let g = Gpg { home };
        // Made in the past, so that a subkey can be made (and expire) in the past too.
        let out = g.run(&[
            "--faked-system-time",
            "20190101T000000!",
            "--quick-gen-key",
            uid,
            "ed25519",
            "cert",
            "never",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        g
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_with_input(args, "")
    }

    fn run_with_input(&self, args: &[&str], input: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args([
                "--batch",
                "--yes",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
            ])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gpg is installed by the test command");
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
        child.wait_with_output().unwrap()
    }

    /// The primary key's fingerprint.
    fn fingerprint(&self, uid: &str) -> String {
        let out = self.run(&["--with-colons", "--list-keys", uid]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|l| l.split(':').find(|f| f.len() == 40))
            .unwrap()
            .to_string()
    }

    /// The subkeys' key ids (16 hex digits), in order.
    fn subkeys(&self, uid: &str) -> Vec<String> {
        let out = self.run(&["--with-colons", "--list-keys", uid]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("sub:"))
            .map(|l| l.split(':').nth(4).unwrap().to_uppercase())
            .collect()
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

#[test]
fn outputs_encrypted_to_a_pgp_recipient_decrypt_with_gpg_to_the_exact_files() {
    let gpg = Gpg::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("receiver.asc");
    let out = gpg.run(&["--armor", "--export", "receiver@example.com"]);
    assert!(out.status.success());
    fs::write(&cert, &out.stdout).unwrap();
    // A call and a sealed file.
    let inputs = dir.path().join("in");
    fs::create_dir(&inputs).unwrap();
    fs::write(inputs.join("call.erec"), call_package()).unwrap();
    let transcript = repo_path("samples/sample-transcript.txt");
    assert!(
        edgerec(&[
            "seal",
            "--kek",
            key_path("test-kek.pub.pem").to_str().unwrap(),
            transcript.to_str().unwrap(),
            inputs.join("file.erec").to_str().unwrap(),
        ])
        .status
        .success()
    );
    let key = key_path("test-kek.pem");
    let export = |out: &Path, pgp: bool| {
        let mut args = vec![
            "export",
            "--key",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if pgp {
            args.extend(["--pgp-recipient", cert.to_str().unwrap()]);
        }
        args.push(inputs.to_str().unwrap());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = edgerec(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    };
    let plain = dir.path().join("plain");
    let sealed = dir.path().join("sealed");
    export(&plain, false);
    export(&sealed, true);
    let files = |root: &Path| {
        let mut v: Vec<_> = walk_files(root)
            .into_iter()
            .filter(|p| !p.to_str().unwrap().contains(".edgerec-export"))
            .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        v.sort();
        v
    };
    let plain_files = files(&plain);
    let sealed_files = files(&sealed);
    assert_eq!(plain_files.len(), 4, "{plain_files:?}");
    assert_eq!(
        sealed_files,
        plain_files
            .iter()
            .map(|p| std::path::PathBuf::from(format!("{}.pgp", p.display())))
            .collect::<Vec<_>>(),
        "every output encrypted, none left in plaintext"
    );
    for p in &plain_files {
        let dec = dir.path().join("decrypted");
        let _ = fs::remove_file(&dec);
        let r = gpg.run(&[
            "--output",
            dec.to_str().unwrap(),
            "--decrypt",
            sealed
                .join(format!("{}.pgp", p.display()))
                .to_str()
                .unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(
            fs::read(&dec).unwrap() == fs::read(plain.join(p)).unwrap(),
            "{}: gpg gives back the exact file",
            p.display()
        );
    }
}

fn walk_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A one-second, one-leg G.711 call package sealed to the test key.
fn call_package() -> Vec<u8> {
    call_package_of((0..50u16).map(|i| u64::from(i) * 20_000))
}

/// A one-leg G.711 call package sealed to the test key (with nothing but its public half),
/// a 20 ms packet at each arrival time given (µs from its start).
fn call_package_of(arrivals: impl Iterator<Item = u64>) -> Vec<u8> {
    use erec::entries::Entry;
    use erec::format::{EndReason, Kind};
    use erec::writer::{Media, SealOptions, Sealer};
    let opts = SealOptions {
        media: Media::Rtp,
        ..SealOptions::default()
    };
    let mut s = Sealer::new(&[public("test")], &opts).unwrap();
    let mut pkg = s.header_bytes().to_vec();
    let (local, remote) = (
        "127.0.0.1:40000".parse().unwrap(),
        "127.0.0.1:5000".parse().unwrap(),
    );
    let mut chunk = Vec::new();
    Entry::StreamOpened {
        stream: 0,
        ssrc: 7,
        local,
        remote,
        payload_type: 0,
        label: "",
    }
    .encode(&mut chunk)
    .unwrap();
    for (i, arrival_us) in arrivals.enumerate() {
        let i = i as u32;
        let mut p = vec![0x80, 0];
        p.extend_from_slice(&(i as u16).to_be_bytes());
        p.extend_from_slice(&(i * 160).to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend((0..160).map(|j| {
            if (j / 4 + i).is_multiple_of(2) {
                0x10
            } else {
                0x90
            }
        }));
        Entry::Rtp {
            stream: 0,
            arrival_us,
            packet: &p,
        }
        .encode(&mut chunk)
        .unwrap();
        if chunk.len() > 60_000 {
            s.seal(Kind::Media, &chunk, &mut pkg).unwrap();
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        s.seal(Kind::Media, &chunk, &mut pkg).unwrap();
    }
    s.finish(EndReason::Complete, erec::clock::now_ms(), &mut pkg);
    pkg
}

/// One part of a one-leg call (SSRC 7) made at `created_ms` with the packets `seqs` (20 ms
/// apart from its start, timestamps running on), continuing `continues`.
fn call_part(
    id: uuid::Uuid,
    created_ms: u64,
    continues: Option<uuid::Uuid>,
    seqs: std::ops::Range<u16>,
) -> Vec<u8> {
    use erec::entries::Entry;
    use erec::format::{EndReason, Kind, Metadata};
    use erec::writer::{Media, SealOptions, Sealer};
    let mut meta = Metadata::new();
    meta.insert("port".into(), 40_000.into());
    if let Some(c) = continues {
        meta.insert("continues".into(), c.hyphenated().to_string().into());
    }
    let opts = SealOptions {
        media: Media::Rtp,
        recording_id: Some(id),
        created_ms: Some(created_ms),
        public: meta,
        ..SealOptions::default()
    };
    let mut s = Sealer::new(&[public("test")], &opts).unwrap();
    let mut pkg = s.header_bytes().to_vec();
    let mut chunk = Vec::new();
    Entry::StreamOpened {
        stream: 0,
        ssrc: 7,
        local: "127.0.0.1:40000".parse().unwrap(),
        remote: "127.0.0.1:5000".parse().unwrap(),
        payload_type: 0,
        label: "",
    }
    .encode(&mut chunk)
    .unwrap();
    let first = seqs.start;
    for seq in seqs {
        let mut p = vec![0x80, 0];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend([0x10; 160]);
        Entry::Rtp {
            stream: 0,
            arrival_us: u64::from(seq - first) * 20_000,
            packet: &p,
        }
        .encode(&mut chunk)
        .unwrap();
    }
    s.seal(Kind::Media, &chunk, &mut pkg).unwrap();
    s.finish(EndReason::MaxDuration, created_ms + 1000, &mut pkg);
    pkg
}

/// `edgerec export --format pcap --out OUT` with the test key, and `more`.
pub fn export_pcap(out: &Path, more: &[&str]) -> std::process::Output {
    let mut args = vec!["--format", "pcap"];
    args.extend_from_slice(more);
    export_to(out, &args)
}

/// `edgerec export --key test-kek.pem --out OUT MORE…`.
pub fn export_to(out: &Path, more: &[&str]) -> std::process::Output {
    let key = key_path("test-kek.pem");
    let mut args = vec![
        "export",
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    edgerec(&args)
}

/// The packets (SSRC, sequence) of an exported pcap.
pub fn pcap_packets(p: &Path) -> Vec<(u32, u16)> {
    let mut r = pcap_file::pcap::PcapReader::new(fs::File::open(p).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(pkt) = r.next_packet() {
        let pkt = pkt.unwrap();
        let ip = etherparse::SlicedPacket::from_ip(&pkt.data).unwrap();
        let Some(etherparse::TransportSlice::Udp(udp)) = ip.transport else {
            panic!("a UDP frame");
        };
        let rtp = udp.payload();
        out.push((
            u32::from_be_bytes(rtp[8..12].try_into().unwrap()),
            u16::from_be_bytes([rtp[2], rtp[3]]),
        ));
    }
    out
}

#[test]
fn a_call_in_several_packages_exports_as_one_recording_unless_told_not_to() {
    use uuid::{NoContext, Timestamp, Uuid};
    // A call across midnight, split twice (the maximum duration, or two restarts): its first
    // part on 2026-11-30, the others on 2026-12-01; and another call that day.
    let midnight = 1_796_083_200_000u64; // 2026-12-01T00:00:00Z
    let at = |ms: u64| {
        Uuid::new_v7(Timestamp::from_unix(
            NoContext,
            ms / 1000,
            (ms % 1000) as u32 * 1_000_000,
        ))
    };
    let (a, b, c, other) = (
        at(midnight - 1000),
        at(midnight),
        at(midnight + 1000),
        at(midnight + 5000),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("recordings");
    for (id, created, continues, seqs) in [
        (c, midnight + 1000, Some(b), 100..150),
        (a, midnight - 1000, None, 0..50),
        (other, midnight + 5000, None, 500..550),
        (b, midnight, Some(a), 50..100),
    ] {
        let path = store.join(edgerec::store::object_key("", id));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, call_part(id, created, continues, seqs)).unwrap();
    }
    let app = dir.path().join("edgerec.toml");
    fs::write(
        &app,
        format!(
            "[recorder]\nspool_dir = \"spool\"\n[keys]\npublic_key = \"{}\"\n[store]\npath = \"{}\"\n",
            key_path("test-kek.pub.pem").display(),
            store.display()
        ),
    )
    .unwrap();
    let export = |out: &Path, more: &[&str]| {
        let o = export_pcap(out, more);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };

    // By default: two recordings, the call named after its first part, every packet once
    // and in order, its metadata listing the parts.
    let joined = dir.path().join("joined");
    let err = export(&joined, &[store.to_str().unwrap()]);
    assert!(
        err.contains("export: 2 recordings from 4 packages (continuations joined): 2 exported"),
        "{err}"
    );
    let pcaps = files_with_ext(&joined, "pcap");
    assert_eq!(pcaps.len(), 2);
    let call = pcaps
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&a.to_string())
        })
        .expect("named after the first part");
    assert!(
        call.to_str().unwrap().contains("day=30"),
        "filed by its start"
    );
    let want: Vec<(u32, u16)> = (0..150).map(|s| (7, s)).collect();
    assert_eq!(pcap_packets(call), want);
    let doc: serde_json::Value = serde_json::from_slice(
        &fs::read(call.with_file_name(format!("{a}_metadata.json"))).unwrap(),
    )
    .unwrap();
    let parts: Vec<&str> = doc["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["recording_id"].as_str().unwrap())
        .collect();
    assert_eq!(parts, [a.to_string(), b.to_string(), c.to_string()]);
    assert_eq!(doc["parts"][2]["offset_ms"], 2000.0);
    assert_eq!(
        doc["streams"].as_array().unwrap().len(),
        1,
        "one leg, not three"
    );

    // Selected by a day on which only its later parts were made, the call comes whole.
    let by_day = dir.path().join("by_day");
    let err = export(
        &by_day,
        &[
            "--store-config",
            app.to_str().unwrap(),
            "--from",
            "2026-12-01",
        ],
    );
    assert!(err.contains("2 exported"), "{err}");
    let pcaps = files_with_ext(&by_day, "pcap");
    assert_eq!(pcaps.len(), 2);
    assert!(pcaps.iter().any(|p| pcap_packets(p) == want));
    // The day before holds only its first part: that call, and not the other.
    let before = dir.path().join("before");
    let err = export(
        &before,
        &[
            "--store-config",
            app.to_str().unwrap(),
            "--from",
            "2026-11-30",
        ],
    );
    assert!(
        err.contains("export: 1 recordings from 3 packages"),
        "{err}"
    );

    // --no-join: each package on its own, as before.
    let apart = dir.path().join("apart");
    let err = export(&apart, &["--no-join", store.to_str().unwrap()]);
    assert!(err.contains("export: 4 packages: 4 exported"), "{err}");
    assert_eq!(files_with_ext(&apart, "pcap").len(), 4);

    // A part that fails verification fails the call, and takes nothing else with it: the
    // other parts are exported on their own.
    let b_path = store.join(edgerec::store::object_key("", b));
    let mut bytes = fs::read(&b_path).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    fs::write(&b_path, bytes).unwrap();
    let bad = dir.path().join("bad");
    let o = export_pcap(&bad, &[store.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("1 exported") && err.contains("1 failed"),
        "{err}"
    );
    let mut got: Vec<Vec<(u32, u16)>> = files_with_ext(&bad, "pcap")
        .iter()
        .map(|p| pcap_packets(p))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (0..50).map(|s| (7, s)).collect::<Vec<_>>(),
            (100..150).map(|s| (7, s)).collect(),
            (500..550).map(|s| (7, s)).collect(),
        ]
    );
}

#[test]
fn a_package_claiming_days_of_audio_fails_alone_within_bounded_memory() {
    // Made with the public key alone: two packets 400,000 s apart, 6.4 GB of WAV asked for
    // (before: allocated whole, and the batch aborted with it).
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    fs::create_dir(&inputs).unwrap();
    fs::write(
        inputs.join("hostile.erec"),
        call_package_of([0, 400_000_000_000].into_iter()),
    )
    .unwrap();
    fs::write(inputs.join("good.erec"), call_package()).unwrap();
    let out = dir.path().join("out");
    // Within 2 GB of address space, as a small export host has.
    let run = |extra: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "ulimit -v 2000000; exec \"$0\" export --key \"$1\" --out \"$2\" {extra} \"$3\""
            ))
            .arg(env!("CARGO_BIN_EXE_edgerec"))
            .arg(key_path("test-kek.pem"))
            .arg(&out)
            .arg(&inputs)
            .output()
            .unwrap()
    };
    let r = run("");
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        r.status.code(),
        Some(1),
        "a failed package, not a crash: {err}"
    );
    assert!(
        err.contains("2 packages: 1 exported") && err.contains("past the 86400 s allowed"),
        "{err}"
    );
    assert_eq!(
        files_with_ext(&out, "wav").len(),
        1,
        "the good one is exported"
    );
    assert!(files_with_ext(&out, "partial").is_empty());
    // --max-span-secs lowers (or raises) the cap: the one-second call fails under half a
    // second.
    let r = run("--max-span-secs 0");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("0 exported"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

/// Every `.export.*.partial` in `out` now: its first bytes.
fn partials(out: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = fs::read_dir(out) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .filter_map(|e| {
            use std::io::Read;
            let mut head = vec![0u8; 64];
            let n = fs::File::open(e.path()).ok()?.read(&mut head).ok()?;
            head.truncate(n);
            Some(head)
        })
        .collect()
}

#[test]
fn a_pgp_export_never_puts_plaintext_on_disk_not_even_killed_midway() {
    let gpg = Gpg::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("receiver.asc");
    let exported = gpg.run(&["--armor", "--export", "receiver@example.com"]);
    fs::write(&cert, &exported.stdout).unwrap();
    // A twenty-minute call: 19 MB of WAV to render.
    let inputs = dir.path().join("in");
    fs::create_dir(&inputs).unwrap();
    fs::write(
        inputs.join("long.erec"),
        call_package_of((0..60_000u64).map(|i| i * 20_000)),
    )
    .unwrap();
    let out = dir.path().join("out");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_edgerec"))
            .args(["export", "--key"])
            .arg(key_path("test-kek.pem"))
            .arg("--out")
            .arg(&out)
            .arg("--pgp-recipient")
            .arg(&cert)
            .arg(&inputs)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Watched while it runs (before: the whole WAV was written in the clear first, then
    // encrypted), then killed once a temporary exists.
    let mut child = spawn();
    let mut seen = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen == 0 && std::time::Instant::now() < deadline {
        for head in partials(&out) {
            seen += 1;
            assert!(!head.starts_with(b"RIFF"), "a plaintext WAV on disk");
        }
    }
    assert!(seen > 0, "no temporary was ever seen");
    let _ = child.kill();
    let _ = child.wait();
    for head in partials(&out) {
        assert!(
            !head.starts_with(b"RIFF"),
            "a plaintext WAV left by the kill"
        );
    }
    // The next run removes what the killed one left and completes.
    let r = spawn().wait_with_output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(partials(&out).is_empty());
    let pgp = files_with_ext(&out, "pgp");
    assert_eq!(pgp.len(), 2, "{pgp:?}");
    let wav = pgp
        .iter()
        .find(|p| p.to_str().unwrap().ends_with(".wav.pgp"))
        .unwrap();
    let dec = dir.path().join("dec.wav");
    let r = gpg.run(&[
        "--output",
        dec.to_str().unwrap(),
        "--decrypt",
        wav.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let w = hound::WavReader::open(&dec).unwrap();
    assert_eq!(w.duration(), 60_000 * 160, "twenty minutes of one channel");
}

/// The key ids (16 hex digits) an OpenPGP message is encrypted to, as gpg lists them.
fn recipients_of(gpg: &Gpg, message: &Path) -> Vec<String> {
    let r = gpg.run(&["--list-packets", message.to_str().unwrap()]);
    String::from_utf8_lossy(&r.stdout)
        .lines()
        .filter_map(|l| l.split("keyid ").nth(1))
        .map(|k| k.trim().to_uppercase())
        .collect()
}

#[test]
fn pgp_exports_go_to_every_valid_encryption_key_and_never_to_an_expired_or_revoked_one() {
    let gpg = Gpg::new_bare("Counsel <counsel@example.com>");
    let fpr = gpg.fingerprint("counsel@example.com");
    // First an encryption subkey that expired (made in 2020 for a year), then one to be
    // revoked, then a good one (before: the first encryption-capable subkey was taken).
    let added = gpg.run(&[
        "--faked-system-time",
        "20200101T000000!",
        "--quick-add-key",
        &fpr,
        "cv25519",
        "encr",
        "1y",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    for _ in 0..2 {
        let added = gpg.run(&["--quick-add-key", &fpr, "cv25519", "encr", "never"]);
        assert!(
            added.status.success(),
            "{}",
            String::from_utf8_lossy(&added.stderr)
        );
    }
    let revoked = gpg.run_with_input(
        &["--command-fd", "0", "--edit-key", &fpr],
        "key 2\nrevkey\ny\n0\n\ny\nsave\n",
    );
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let subkeys = gpg.subkeys("counsel@example.com");
    assert_eq!(subkeys.len(), 3, "{subkeys:?}");
    let (expired, revoked, good) = (&subkeys[0], &subkeys[1], &subkeys[2]);
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("counsel.asc");
    fs::write(&cert, gpg.run(&["--armor", "--export", &fpr]).stdout).unwrap();
    let inputs = dir.path().join("in");
    fs::create_dir(&inputs).unwrap();
    fs::write(inputs.join("call.erec"), call_package()).unwrap();
    let out = dir.path().join("out");
    let r = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--pgp-recipient",
        cert.to_str().unwrap(),
        inputs.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for f in files_with_ext(&out, "pgp") {
        let to = recipients_of(&gpg, &f);
        assert_eq!(
            to,
            std::slice::from_ref(good),
            "{} to {to:?} (expired {expired}, revoked {revoked})",
            f.display()
        );
    }
    // A certificate whose every encryption key is expired or revoked is refused, and says so.
    let none = gpg.run_with_input(
        &["--command-fd", "0", "--edit-key", &fpr],
        "key 3\nrevkey\ny\n0\n\ny\nsave\n",
    );
    assert!(
        none.status.success(),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
    fs::write(&cert, gpg.run(&["--armor", "--export", &fpr]).stdout).unwrap();
    let r = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        dir.path().join("out2").to_str().unwrap(),
        "--pgp-recipient",
        cert.to_str().unwrap(),
        inputs.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("no key that may encrypt"), "{err}");
}

/// The peak resident memory (VmHWM, KiB) of a child, read until it exits; and its status.
/// Waits for `child`: its peak resident memory (KiB, its own `VmHWM`, read until it exits)
/// and its exit status. Not `getrusage`/`wait4`'s `ru_maxrss`: Linux carries the peak of the
/// memory a process had before `execve` into it, and a child spawned by this test process
/// starts in the test's memory (vfork), so it would report the test's peak, not the export's
/// (tried: 277 MiB for an export whose own peak is 24 MiB). benches/export_s3.sh measures
/// with `getrusage` from a small parent, where the two agree.
fn peak_kib(mut child: std::process::Child) -> (u64, std::process::ExitStatus) {
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        // A zombie's status has no memory lines: the last read before it is the peak.
        if let Ok(text) = fs::read_to_string(&status)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(s) = child.try_wait().unwrap() {
            return (peak, s);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_128_mib_file_package_exports_from_s3_in_bounded_memory() {
    let weed = Weed::start();
    let a = Appliance::prepare("\"127.0.0.0/8\"", &s3_store(&weed, SECRET_KEY), "");
    let plain = a.path("big.bin");
    let data = pattern(128 << 20);
    fs::write(&plain, &data).unwrap();
    let package = a.path("big.erec");
    let id = seal_file(&plain, &package);
    let key = edgerec::store::object_key("calls/", id);
    let sha: [u8; 32] = erec::crypto::sha256_file(&package).unwrap();
    weed.store(SECRET_KEY)
        .put_resumable(
            &key,
            &package,
            &sha,
            &mut edgerec::store::InMemory::default(),
        )
        .unwrap();
    fs::remove_file(&package).unwrap();
    // Hour precision: a window ending before the recording began selects nothing, one
    // around it selects it.
    let (secs, _) = id.get_timestamp().unwrap().to_unix();
    let hour = |s: u64| {
        let u = erec::clock::Utc::from_unix_ms(s * 1000);
        format!(
            "{:04}-{:02}-{:02}T{:02}:00Z",
            u.year, u.month, u.day, u.hms_ms.0
        )
    };
    let (before, from, to) = (hour(secs - 7200), hour(secs - 3600), hour(secs + 3600));
    let cfg = a.path("edgerec.toml");
    let key = key_path("test-kek.pem");
    let earlier = a.path("earlier");
    let o = edgerec(&[
        "export",
        "--key",
        key.to_str().unwrap(),
        "--out",
        earlier.to_str().unwrap(),
        "--store-config",
        cfg.to_str().unwrap(),
        "--from",
        &before,
        "--to",
        &from,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        files_with_ext(&earlier, "bin").is_empty(),
        "outside the window"
    );
    let out = a.path("export");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args([
            "export",
            "--key",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--store-config",
            cfg.to_str().unwrap(),
            "--from",
            &from,
            "--to",
            &to,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (peak, status) = peak_kib(child);
    eprintln!("export of a 128 MiB package from S3: peak resident memory {peak} KiB");
    assert!(status.success());
    let restored = files_with_ext(&out, "bin");
    assert_eq!(restored.len(), 1, "the original file restored");
    assert!(fs::read(&restored[0]).unwrap() == data, "byte for byte");
    assert!(
        peak > 0 && peak < 64 << 10,
        "peak resident memory {peak} KiB, over 64 MiB for a 128 MiB package"
    );
}

#[test]
fn an_object_whose_bytes_are_not_its_recorded_sha256_is_never_opened() {
    let weed = Weed::start();
    let a = Appliance::prepare("\"127.0.0.0/8\"", &s3_store(&weed, SECRET_KEY), "");
    let plain = a.path("note.txt");
    fs::write(&plain, b"a note, sealed").unwrap();
    let package = a.path("note.erec");
    let id = seal_file(&plain, &package);
    // Stored with another SHA-256 than its bytes' (as if changed after it was stored): the
    // mismatch shows only once the whole object has streamed in.
    weed.store(SECRET_KEY)
        .put_bytes(
            &edgerec::store::object_key("calls/", id),
            fs::read(&package).unwrap().into(),
            &[("x-amz-meta-erec-sha256", "00".repeat(32))],
        )
        .unwrap();
    let out = a.path("export");
    let o = export_to(
        &out,
        &["--store-config", a.path("edgerec.toml").to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("not the SHA-256 the store recorded"), "{err}");
    assert!(files_with_ext(&out, "txt").is_empty(), "nothing released");
    assert!(files_with_ext(&out.join(".edgerec-export/fetch"), "erec").is_empty());
}
