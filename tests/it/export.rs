//! Bulk export from the recording store: a day of recordings from SeaweedFS, with a tampered
//! and an unterminated package among them; resumable.

use std::fs;
use std::path::Path;

use edgerec::store::Store;

use crate::appliance::{Appliance, files_with_ext, loadgen, s3_store};
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
    let keys = s3.list("calls/").unwrap();
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
struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    fn new() -> Gpg {
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

    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(args)
            .output()
            .expect("gpg is installed by the test command")
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
    use edgerec::entries::Entry;
    use edgerec::format::{EndReason, Kind};
    use edgerec::writer::{Media, SealOptions, Sealer};
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
    for i in 0..50u16 {
        let mut p = vec![0x80, 0];
        p.extend_from_slice(&i.to_be_bytes());
        p.extend_from_slice(&(u32::from(i) * 160).to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend((0..160).map(|j| if (j / 4 + i) % 2 == 0 { 0x10 } else { 0x90 }));
        Entry::Rtp {
            stream: 0,
            arrival_us: u64::from(i) * 20_000,
            packet: &p,
        }
        .encode(&mut chunk)
        .unwrap();
    }
    s.seal(Kind::Media, &chunk, &mut pkg).unwrap();
    s.finish(EndReason::Complete, edgerec::clock::now_ms(), &mut pkg);
    pkg
}
