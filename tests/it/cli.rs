//! The four offline commands through the built binary, with keys made by `openssl`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn openssl(args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed by the test command");
    assert!(st.success(), "openssl {args:?}");
}

#[test]
fn keygen_writes_a_pair_whose_id_openssl_agrees_with() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = edgerec(&["keygen", "--out", s(&keys)]);
    let id = ok(&out).trim().to_string();
    assert_eq!(id.len(), 64);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must not stay on a recording appliance")
    );
    let private = keys.join(format!("{id}.pem"));
    let public = keys.join(format!("{id}.pub.pem"));
    assert_eq!(
        fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // kek id = SHA-256 of the SPKI DER, as openssl writes it.
    let der = dir.path().join("pub.der");
    openssl(&[
        "pkey",
        "-pubin",
        "-in",
        s(&public),
        "-outform",
        "DER",
        "-out",
        s(&der),
    ]);
    assert_eq!(hex::encode(Sha256::digest(fs::read(&der).unwrap())), id);
    // openssl reads our private key and finds it consistent, 3072 bits.
    let text = Command::new("openssl")
        .args(["pkey", "-in", s(&private), "-noout", "-text"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("3072 bit"));
}

#[test]
fn seal_and_open_with_openssl_keys_in_every_pem_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pkcs8 = d.join("k.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:3072",
        "-out",
        s(&pkcs8),
    ]);
    let spki = d.join("k.pub.pem");
    openssl(&["pkey", "-in", s(&pkcs8), "-pubout", "-out", s(&spki)]);
    let pkcs1 = d.join("k.rsa.pem");
    openssl(&["rsa", "-in", s(&pkcs8), "-traditional", "-out", s(&pkcs1)]);
    let pkcs1_pub = d.join("k.rsa.pub.pem");
    openssl(&[
        "rsa",
        "-in",
        s(&pkcs8),
        "-RSAPublicKey_out",
        "-out",
        s(&pkcs1_pub),
    ]);

    let data = pattern(3_000_001);
    let input = d.join("call.wav");
    fs::write(&input, &data).unwrap();
    for (i, (public, private)) in [(&spki, &pkcs1), (&pkcs1_pub, &pkcs8)].iter().enumerate() {
        let pkg = d.join(format!("p{i}.erec"));
        ok(&edgerec(&[
            "seal",
            "--kek",
            s(public),
            "--chunk-size",
            "65536",
            s(&input),
            s(&pkg),
        ]));
        let out = d.join(format!("p{i}.out"));
        ok(&edgerec(&["open", "--key", s(private), s(&pkg), s(&out)]));
        assert_eq!(fs::read(&out).unwrap(), data);
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[test]
fn inspect_reports_the_contract_fields_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chat.txt");
    fs::write(&input, b"hello").unwrap();
    let pkg = dir.path().join("chat.erec");
    let test = key_path("test-kek.pub.pem");
    let other = key_path("other-kek.pub.pem");
    ok(&edgerec(&[
        "seal",
        "--kek",
        s(&test),
        "--kek",
        s(&other),
        "--wrap",
        "oaep-sha1",
        s(&input),
        s(&pkg),
    ]));
    let j: Value = serde_json::from_str(&ok(&edgerec(&["inspect", "--json", s(&pkg)]))).unwrap();
    for field in [
        "recording_id",
        "created_ms",
        "media",
        "kek_ids",
        "wraps",
        "max_chunk",
        "records",
        "terminated",
        "bytes",
    ] {
        assert!(j.get(field).is_some(), "inspect --json lacks {field}");
    }
    assert_eq!(j["media"], "file");
    assert_eq!(j["kek_ids"][0], public("test").id().to_hex());
    assert_eq!(j["kek_ids"][1], public("other").id().to_hex());
    assert_eq!(j["wraps"], serde_json::json!(["oaep-sha1", "oaep-sha1"]));
    assert_eq!(j["records"], 2, "the name record and one media record");
    assert_eq!(j["terminated"], true);
    assert_eq!(j["bytes"], fs::metadata(&pkg).unwrap().len());
    let uuid = j["recording_id"].as_str().unwrap();
    assert_eq!(uuid.len(), 36);
    assert_eq!(&uuid[14..15], "7", "a UUIDv7");
    let text = ok(&edgerec(&["inspect", s(&pkg)]));
    assert!(text.contains("terminated") && text.contains(uuid));
    // Both recipients open it; the file name travels in a metadata record, not in the clear.
    for k in ["test-kek.pem", "other-kek.pem"] {
        let out = dir.path().join(format!("{k}.out"));
        ok(&edgerec(&[
            "open",
            "--key",
            s(&key_path(k)),
            s(&pkg),
            s(&out),
        ]));
        assert_eq!(fs::read(&out).unwrap(), b"hello");
    }
    assert!(!fs::read(&pkg).unwrap().windows(8).any(|w| w == b"chat.txt"));
}

#[test]
fn stdin_and_stdout_work() {
    let data = pattern(200_000);
    let test = key_path("test-kek.pub.pem");
    let mut seal = Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args(["seal", "--kek", s(&test), "-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    seal.stdin.take().unwrap().write_all(&data).unwrap();
    let sealed = seal.wait_with_output().unwrap();
    assert!(sealed.status.success());
    let mut open = Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args(["open", "--key", s(&key_path("test-kek.pem")), "-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    open.stdin
        .take()
        .unwrap()
        .write_all(&sealed.stdout)
        .unwrap();
    let opened = open.wait_with_output().unwrap();
    assert!(opened.status.success());
    assert_eq!(opened.stdout, data);
}

#[test]
fn unterminated_needs_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("cut.erec");
    let full = seal_bytes(&pattern(10_000), &[public("test")], 4096);
    fs::write(&pkg, &full[..full.len() - 100]).unwrap();
    let key = key_path("test-kek.pem");
    let out = dir.path().join("out");
    let strict = edgerec(&["open", "--key", s(&key), s(&pkg), s(&out)]);
    assert_eq!(strict.status.code(), Some(5));
    assert!(!out.exists());
    let rec = edgerec(&[
        "open",
        "--key",
        s(&key),
        "--allow-unterminated",
        s(&pkg),
        s(&out),
    ]);
    ok(&rec);
    assert!(String::from_utf8_lossy(&rec.stderr).contains("unterminated"));
    assert_eq!(fs::read(&out).unwrap(), pattern(8192));
    let j: Value = serde_json::from_str(&ok(&edgerec(&["inspect", "--json", s(&pkg)]))).unwrap();
    assert_eq!(j["terminated"], false);
    assert_eq!(j["records"], 2);
}

#[test]
fn bad_keys_and_usage_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    fs::write(&input, b"x").unwrap();
    let out = dir.path().join("out.erec");
    let weak = edgerec(&[
        "seal",
        "--kek",
        s(&key_path("weak-2048.pub.pem")),
        s(&input),
        s(&out),
    ]);
    assert_eq!(weak.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&weak.stderr).contains("2048 bits"));
    assert!(!out.exists());
    let private_as_public = edgerec(&[
        "seal",
        "--kek",
        s(&key_path("test-kek.pem")),
        s(&input),
        s(&out),
    ]);
    assert_eq!(private_as_public.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&private_as_public.stderr).contains("private key"));
    let missing = edgerec(&["open", "--key", "/nonexistent.pem", s(&input), s(&out)]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent.pem"));
    assert_eq!(
        edgerec(&["seal", s(&input), s(&out)]).status.code(),
        Some(2)
    );
    assert_eq!(edgerec(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(edgerec(&["--help"]).status.code(), Some(0));
    let five: Vec<String> = ["test", "other", "r3", "r4", "test"]
        .iter()
        .map(|n| key_path(&format!("{n}-kek.pub.pem")).display().to_string())
        .collect();
    let mut args = vec!["seal"];
    for k in &five {
        args.extend(["--kek", k]);
    }
    args.extend([s(&input), s(&out)]);
    assert_eq!(edgerec(&args).status.code(), Some(1));
    // A 4096-bit key in PKCS#1 form works.
    ok(&edgerec(&[
        "seal",
        "--kek",
        s(&key_path("r4096-kek.pkcs1.pub.pem")),
        s(&input),
        s(&out),
    ]));
    let plain = dir.path().join("plain");
    ok(&edgerec(&[
        "open",
        "--key",
        s(&key_path("r4096-kek.pkcs1.pem")),
        s(&out),
        s(&plain),
    ]));
    assert_eq!(fs::read(&plain).unwrap(), b"x");
}

#[test]
fn inspect_of_garbage_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("junk");
    fs::write(&f, b"this is not a package at all, just text").unwrap();
    let r = edgerec(&["inspect", s(&f)]);
    assert_eq!(r.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&r.stderr).contains("corrupt"));
    fs::write(&f, b"").unwrap();
    assert_eq!(edgerec(&["inspect", s(&f)]).status.code(), Some(4));
}

#[test]
fn core_dumps_are_disabled_while_keys_are_in_memory() {
    // `open` waiting on standard input holds its private key in memory.
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args(["open", "--key", s(&key_path("test-kek.pem")), "-", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    // Wait for the process to have set its limit (observable state, not a sleep).
    let mut line = String::new();
    for _ in 0..500 {
        let text = fs::read_to_string(&limits).unwrap_or_default();
        line = text
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap_or("")
            .to_string();
        let f: Vec<_> = line.split_whitespace().collect();
        if f.get(4..6) == Some(&["0", "0"][..]) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(child.stdin.take());
    let _ = child.wait();
    let fields: Vec<_> = line.split_whitespace().collect();
    assert_eq!(fields.get(4..6), Some(&["0", "0"][..]), "{line}");
}

#[test]
fn export_restores_a_sealed_file_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("transcript.txt");
    let data = pattern(70_000);
    fs::write(&input, &data).unwrap();
    let pkg = dir.path().join("t.erec");
    ok(&edgerec(&[
        "seal",
        "--kek",
        s(&key_path("test-kek.pub.pem")),
        s(&input),
        s(&pkg),
    ]));
    let j: Value = serde_json::from_str(&ok(&edgerec(&["inspect", "--json", s(&pkg)]))).unwrap();
    let id = j["recording_id"].as_str().unwrap().to_string();
    let out = dir.path().join("out");
    let r = edgerec(&[
        "export",
        "--key",
        s(&key_path("test-kek.pem")),
        "--out",
        s(&out),
        s(&pkg),
    ]);
    ok(&r);
    let day = erec::clock::Utc::from_unix_ms(j["created_ms"].as_u64().unwrap());
    let folder = out.join(format!(
        "year={:04}/month={:02}/day={:02}/conversation_id=untagged",
        day.year, day.month, day.day
    ));
    assert_eq!(
        fs::read(folder.join(format!("{id}_transcript.txt"))).unwrap(),
        data
    );
    let m: Value =
        serde_json::from_slice(&fs::read(folder.join(format!("{id}_metadata.json"))).unwrap())
            .unwrap();
    assert_eq!(m["media"], "file");
    assert_eq!(m["metadata"]["name"], "transcript.txt");
    assert_eq!(m["end_reason"], "complete");
    // A wrong key exports nothing and says so with exit code 3.
    let out2 = dir.path().join("out2");
    let r = edgerec(&[
        "export",
        "--key",
        s(&key_path("other-kek.pem")),
        "--out",
        s(&out2),
        s(&pkg),
    ]);
    assert_eq!(r.status.code(), Some(3));
    let left: Vec<_> = fs::read_dir(&out2)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn lkm_verify_audit_reports_an_intact_chain_and_names_a_changed_line() {
    use edgerec_lkm::audit::{AuditLog, Event};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, None).unwrap();
    for (i, outcome) in ["ok", "denied", "ok"].into_iter().enumerate() {
        log.append(
            &Event {
                who: "recorder-1".into(),
                user: None,
                action: "decrypt".into(),
                key: Some("ab".repeat(32)),
                recording: Some(format!("rec-{i}")),
                outcome: outcome.into(),
            },
            1_796_051_045_000 + i as u64,
        )
        .unwrap();
    }
    let last = hex::encode(log.chain().last_hash);
    let p = path.to_str().unwrap();
    let out = edgerec(&["lkm", "verify-audit", p]);
    assert_eq!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("3 lines, chain intact") && said.contains(&last),
        "{said}"
    );
    // Someone hides the refusal.
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen("\"denied\"", "\"ok\"", 1)).unwrap();
    let out = edgerec(&["lkm", "verify-audit", p]);
    assert_eq!(out.status.code(), Some(4), "corrupt");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("line 2"), "{err}");
}

#[test]
fn check_config_validates_without_starting_anything() {
    let sample = repo_path("samples/edgerec.toml");
    let ok = edgerec(&["check-config", "--config", sample.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("valid") && out.contains("ingest ports"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("edgerec.toml");
    let text = std::fs::read_to_string(&sample).unwrap().replace(
        "[metrics]",
        "[siprec]\nlisten = \"127.0.0.1:5060\"\n\n[metrics]",
    );
    std::fs::write(&bad, text).unwrap();
    let err = edgerec(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(err.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&err.stderr);
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    assert!(msg.contains("siprec.media_ports is missing"), "{msg}");
}
