//! The key manager tried as an attacker would (issue 11): each test reproduces one attack
//! that worked on the code before and checks it no longer does.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::lkm::{
    DECRYPT, KEYPAIRS, Service, hawk_header, keys, lkm, metric, plain_config, service_metrics,
    verify_audit_passes,
};

const AUTH: &str = "/key-management/v1/auth";

/// The service's metric `name`, once it reaches `at_least`.
fn wait_metric(s: &Service, name: &str, at_least: f64) -> String {
    let mut text = String::new();
    eventually(&format!("{name} < {at_least}"), || {
        text = service_metrics(s);
        metric(&text, name) >= at_least
    });
    text
}

#[test]
fn a_recorders_credential_reads_public_keys_and_can_never_decrypt_or_make_keys() {
    let s = Service::start_with("metrics_listen = \"127.0.0.1:0\"");
    let (rid, rkey) = ("recorder-1", s.recorder_key.clone());
    let current = s.call("GET", "/key-management/v1/current", None, rid, &rkey, true);
    assert_eq!(current.0, 200, "what a recorder needs");
    let id = current.1["id"].as_str().unwrap().to_string();
    assert_eq!(s.call("GET", KEYPAIRS, None, rid, &rkey, true).0, 200);
    assert_eq!(
        s.call("GET", &format!("{KEYPAIRS}/{id}"), None, rid, &rkey, true)
            .0,
        200
    );
    assert_eq!(s.call("OPTIONS", DECRYPT, None, rid, &rkey, true).0, 200);
    // What every appliance's credential could do before: unwrap any recording's DEK, make
    // its own key current for every recorder, issue credentials.
    let sealed = {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(current.1["publicKey"].as_str().unwrap())
            .unwrap();
        let k = erec::keys::KekPublic::from_der("k", &der).unwrap();
        let dek = erec::crypto::Dek::generate().unwrap();
        base64::engine::general_purpose::STANDARD
            .encode(k.seal(&dek, erec::format::Wrap::OaepSha256).unwrap())
    };
    let unwrap = serde_json::json!({ "keypairId": id, "body": sealed, "decryptType": "erec" });
    let (code, answer) = s.call("POST", DECRYPT, Some(&unwrap), rid, &rkey, true);
    assert_eq!(code, 403, "{answer}");
    assert!(answer.get("body").is_none());
    assert_eq!(s.call("POST", KEYPAIRS, None, rid, &rkey, true).0, 403);
    let issue = serde_json::json!({ "id": "mine", "role": "admin" });
    assert_eq!(s.call("POST", AUTH, Some(&issue), rid, &rkey, true).0, 403);
    assert_eq!(keys(&s.config).len(), 1, "no key pair was made");
    // A decrypt credential unwraps but makes no keys; a platform one does both.
    let (code, dek) = s.call(
        "POST",
        DECRYPT,
        Some(&unwrap),
        "reader-1",
        &s.reader_key,
        true,
    );
    assert_eq!((code, dek["body"].is_string()), (200, true), "{dek}");
    assert_eq!(
        s.call("POST", KEYPAIRS, None, "reader-1", &s.reader_key, true)
            .0,
        403
    );
    assert_eq!(
        s.call("POST", KEYPAIRS, None, "platform-1", &s.platform_key, true)
            .0,
        200
    );
    assert_eq!(
        s.call(
            "POST",
            AUTH,
            Some(&issue),
            "platform-1",
            &s.platform_key,
            true
        )
        .0,
        403,
        "only an administrator issues credentials"
    );
    // An administrator's credential issued through the API is a recorder's unless it says.
    let (code, cred) = s.call(
        "POST",
        AUTH,
        Some(&serde_json::json!({ "id": "rec-9" })),
        "ops",
        &s.admin_key,
        true,
    );
    assert_eq!((code, cred["role"].as_str()), (200, Some("recorder")));
    let key9 = cred["authKey"].as_str().unwrap().to_string();
    assert_eq!(
        s.call("POST", DECRYPT, Some(&unwrap), "rec-9", &key9, true)
            .0,
        403
    );
    // Load balancers ask without credentials.
    assert_eq!(s.send("GET", "/key-management/v1/health", b"", None).0, 200);
    // Every refusal is a line and a count.
    let text = wait_metric(
        &s,
        "edgerec_lkm_requests_denied_total{reason=\"role\"}",
        6.0,
    );
    assert_eq!(
        metric(&text, "edgerec_lkm_rotation_period_seconds"),
        30.0 * 86_400.0,
        "monthly by default"
    );
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"who\":\"recorder-1\"")
            && l.contains("\"action\":\"decrypt\"")
            && l.contains("denied: role recorder may not (needs decrypt)")),
        "{audit}"
    );
    let listed = lkm(&["credentials", "list"], &s.config).1;
    for (id, role) in [
        ("recorder-1", "recorder"),
        ("reader-1", "decrypt"),
        ("platform-1", "platform"),
        ("ops", "admin"),
        ("rec-9", "recorder"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(id) && l.trim_end().ends_with(role)),
            "{listed}"
        );
    }
    assert!(!listed.contains(&s.recorder_key), "never a key: {listed}");
}

#[test]
fn credentials_of_before_roles_keep_working_warned_about_until_an_operator_sets_them() {
    let s = Service::start();
    // The file as an earlier edgerec wrote it: an appliance's credential with admin false.
    let file = s.dir.path().join("credentials.json");
    let mut all: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    let old_key = "an-appliance-key-from-before-roles-000000000";
    all["appliance-7"] = serde_json::json!({ "key": old_key, "admin": false });
    all["ops"] = serde_json::json!({ "key": s.admin_key, "admin": true });
    fs::write(&file, serde_json::to_vec_pretty(&all).unwrap()).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    // Read as platform (what it could do), named at every start.
    s.wait_status("appliance-7", old_key, 200, "the old entry is not taken");
    let mut s = s;
    s.stop();
    s.restart();
    eventually("no warning names the credential", || {
        s.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("credential=appliance-7") && l.contains("no role"))
    });
    let listed = s.admin(&["credentials", "list"]).1;
    assert!(listed.contains("no role set"), "{listed}");
    let junk = serde_json::json!({ "keypairId": "00".repeat(32), "body": "AAAA" });
    assert_eq!(
        s.call("POST", DECRYPT, Some(&junk), "appliance-7", old_key, true)
            .0,
        404,
        "still allowed to decrypt"
    );
    // The upgrade step: set the appliance's role; the old administrator stays one.
    let (code, _, err) = s.admin(&["credentials", "set-role", "appliance-7", "recorder"]);
    assert_eq!(code, 0, "{err}");
    eventually("set-role is not applied", || {
        s.call("POST", DECRYPT, Some(&junk), "appliance-7", old_key, true)
            .0
            == 403
    });
    let listed = s.admin(&["credentials", "list", "--json"]).1;
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let role = |id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| (c["role"].clone(), c["roleSet"].clone()))
            .unwrap()
    };
    assert_eq!(role("appliance-7"), ("recorder".into(), true.into()));
    assert_eq!(role("ops"), ("admin".into(), true.into()));
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert!(
        audit.contains("ok: appliance-7 from unset (platform) to recorder"),
        "{audit}"
    );
}

#[test]
fn key_pairs_made_through_the_api_are_limited_per_credential() {
    // Before: 18 key pairs in 4 s, each the current key for every recorder.
    let s = Service::start_with("keypair_rate_per_min = 2");
    let make = || {
        s.call("POST", KEYPAIRS, None, "platform-1", &s.platform_key, true)
            .0
    };
    assert_eq!([make(), make()], [200, 200]);
    let url = format!("{}{KEYPAIRS}", s.url());
    let auth = hawk_header(
        "POST",
        s.port,
        KEYPAIRS,
        b"",
        "platform-1",
        &s.platform_key,
        true,
    );
    let ca = reqwest::Certificate::from_pem(&fs::read(s.ca()).unwrap()).unwrap();
    let r = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
        .post(url)
        .header("Authorization", auth)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    assert_eq!(keys(&s.config).len(), 3, "init's and two");
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("keypair.create") && l.contains("\"outcome\":\"ok\""))
            .count(),
        2
    );
}

#[test]
fn refused_requests_cannot_flood_the_audit_log_or_the_nonce_cache() {
    let s = Service::start_with("metrics_listen = \"127.0.0.1:0\"");
    let before = fs::metadata(s.audit_path()).unwrap().len();
    let flood = Instant::now();
    let ca = reqwest::Certificate::from_pem(&fs::read(s.ca()).unwrap()).unwrap();
    let http = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("{}{KEYPAIRS}", s.url());
    // A signed request with a nonce of 1,000 characters is refused before it is kept
    // (before: kept, 380 KB each, 300 MB for 400 requests).
    let signed = {
        let credentials = hawk::Credentials {
            id: "recorder-1".into(),
            key: hawk::Key::new(s.recorder_key.as_bytes(), hawk::SHA256).unwrap(),
        };
        let h = hawk::RequestBuilder::new("GET", "127.0.0.1", s.port, KEYPAIRS)
            .request()
            .make_header_full(
                &credentials,
                std::time::SystemTime::now(),
                "n".repeat(1_000),
            )
            .unwrap();
        format!("Hawk {h}")
    };
    assert_eq!(s.send("GET", KEYPAIRS, b"", Some(&signed)).0, 401);
    // Before: 50 requests with ~400 KB claimed ids and users wrote 20 MB, synced line by line.
    let huge = format!(
        "Hawk id=\"{}\", ts=\"1\", nonce=\"n\", mac=\"m\"",
        "x".repeat(400_000)
    );
    for _ in 0..5 {
        let status = http
            .get(&url)
            .header("Authorization", &huge)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        assert!(status == 431 || status == 0, "{status}");
    }
    // Requests whose head fits: many, each with a long id and user, from no credential.
    let long = format!(
        "Hawk id=\"{}\", ts=\"1\", nonce=\"n\", mac=\"m\"",
        "y".repeat(1_500)
    );
    for _ in 0..300 {
        let r = http
            .get(&url)
            .header("Authorization", &long)
            .header("PureCloud-User-Id", "u".repeat(8_000))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    // The refusals are counted; the lines about them stop at the limit and one line says
    // how many more there were.
    wait_metric(
        &s,
        "edgerec_lkm_requests_denied_total{reason=\"authentication\"}",
        301.0,
    );
    let mut audit = String::new();
    eventually("no summary line", || {
        audit = fs::read_to_string(s.audit_path()).unwrap();
        audit.contains("denials.suppressed")
    });
    // The default limit: bursts of 50 lines, 10 a second after; a loaded machine that
    // takes longer over the flood may write more, at that rate.
    let secs = flood.elapsed().as_secs_f64().ceil() as usize;
    let allowed = (50 + 10 * secs + 2).max(120);
    let grown = fs::metadata(s.audit_path()).unwrap().len() - before;
    let bound = (64 * 1024).max(allowed as u64 * 550);
    assert!(grown < bound, "the audit log grew by {grown} bytes");
    let written = audit.lines().filter(|l| l.contains("denied: ")).count();
    assert!((40..=allowed).contains(&written), "{written} denial lines");
    for l in audit.lines() {
        assert!(l.len() < 1_500, "a line of {} bytes", l.len());
    }
    assert!(audit.contains("denied: nonce too long"), "{audit}");
    // The log is whole, keyed, and the service still answers.
    verify_audit_passes(Some(&s.config), &s.audit_path());
    assert_eq!(
        s.call("GET", KEYPAIRS, None, "recorder-1", &s.recorder_key, true)
            .0,
        200
    );
}

#[test]
fn an_unwrap_the_audit_log_cannot_record_is_refused_and_a_torn_line_is_repaired() {
    let mut s = Service::start_with("metrics_listen = \"127.0.0.1:0\"\nkey_cache_secs = 0");
    // The audit log on a file system of its own, as a small disk.
    s.stop();
    let log_dir = s.dir.path().join("log");
    let saved = fs::read(s.audit_path()).unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&log_dir, "1m") else {
        return;
    };
    fs::write(s.audit_path(), &saved).unwrap();
    fs::set_permissions(s.audit_path(), fs::Permissions::from_mode(0o600)).unwrap();
    s.restart();
    let id = keys(&s.config)[0]["id"].as_str().unwrap().to_string();
    let sealed = {
        use base64::Engine;
        let (_, kp) = s.call(
            "GET",
            &format!("{KEYPAIRS}/{id}"),
            None,
            "reader-1",
            &s.reader_key,
            true,
        );
        let der = base64::engine::general_purpose::STANDARD
            .decode(kp["publicKey"].as_str().unwrap())
            .unwrap();
        let k = erec::keys::KekPublic::from_der("k", &der).unwrap();
        let dek = erec::crypto::Dek::generate().unwrap();
        base64::engine::general_purpose::STANDARD
            .encode(k.seal(&dek, erec::format::Wrap::OaepSha256).unwrap())
    };
    let unwrap = serde_json::json!({ "keypairId": id, "body": sealed, "decryptType": "erec" });
    let ask = |s: &Service| {
        s.call(
            "POST",
            DECRYPT,
            Some(&unwrap),
            "reader-1",
            &s.reader_key,
            true,
        )
    };
    assert_eq!(ask(&s).0, 200);
    // The disk fills up: an unwrap is refused, never answered unaudited (before: 200 with
    // the key, the failure only logged).
    let filler = log_dir.join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
        let _ = f.write_all(&[0u8; 1]);
    }
    // (The log's last page may still take a few lines.)
    let (code, answer) = (0..64)
        .map(|_| ask(&s))
        .find(|(code, _)| *code != 200)
        .expect("the full disk is never noticed");
    assert_eq!(code, 503, "{answer}");
    assert!(answer.get("body").is_none());
    wait_metric(&s, "edgerec_lkm_audit_write_errors_total", 1.0);
    // Space again: unwraps work again, with no restart.
    fs::remove_file(&filler).unwrap();
    assert_eq!(ask(&s).0, 200);
    // A crash in the middle of a line (what a full disk left before, after which the service
    // would not start): the torn line is cut at start, and the cut is the next line.
    s.stop();
    let torn = "{\"seq\":99,\"time\":\"2026-11-30T0";
    fs::OpenOptions::new()
        .append(true)
        .open(s.audit_path())
        .unwrap()
        .write_all(torn.as_bytes())
        .unwrap();
    s.restart();
    assert_eq!(ask(&s).0, 200);
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"action\":\"audit.repair\"")
                && l.contains(&format!("{} bytes", torn.len()))),
        "{audit}"
    );
    verify_audit_passes(Some(&s.config), &s.audit_path());
    s.stop();
}

/// Parses an audit log into its lines' JSON objects.
fn lines(text: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The log's lines again, each `prev` recomputed over the line before (as someone who
/// removed lines would do).
fn rechained(mut all: Vec<serde_json::Map<String, serde_json::Value>>) -> String {
    use sha2::Digest;
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (i, l) in all.iter_mut().enumerate() {
        l.insert("seq".into(), (i as u64).into());
        l.insert("prev".into(), prev.clone().into());
        // Field order as written: serde_json keeps insertion order only with its
        // preserve_order feature, so the line is rebuilt in the log's order.
        let order = [
            "seq",
            "time",
            "who",
            "user",
            "action",
            "key",
            "recording",
            "outcome",
            "prev",
            "mac",
        ];
        let mut text = String::from("{");
        for k in order {
            if let Some(v) = l.get(k) {
                if text.len() > 1 {
                    text.push(',');
                }
                text.push_str(&format!("\"{k}\":{v}"));
            }
        }
        text.push('}');
        prev = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        out.push_str(&text);
        out.push('\n');
    }
    out
}

#[test]
fn lines_removed_from_the_audit_log_with_the_hashes_recomputed_are_found_by_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = plain_config(dir.path());
    // A log of before keying: three unkeyed lines, continued by the upgraded key manager.
    let path = dir.path().join("audit.jsonl");
    {
        let mut old = edgerec_lkm::audit::AuditLog::open(&path, None).unwrap();
        for i in 0..3 {
            old.append(
                &edgerec_lkm::audit::Event {
                    who: "admin".into(),
                    user: None,
                    action: "rotate".into(),
                    key: None,
                    recording: None,
                    outcome: format!("ok {i}"),
                },
                1_796_000_000_000 + i,
            )
            .unwrap();
        }
    }
    assert_eq!(lkm(&["init"], &config).0, 0);
    for id in ["a", "b", "c"] {
        assert_eq!(lkm(&["credentials", "add", id], &config).0, 0);
    }
    let said = verify_audit_passes(Some(&config), &path);
    assert!(
        said.contains("7 lines") && said.contains("from line 4") && said.contains("lines 1 to 3"),
        "{said}"
    );
    // Someone removes the credential issued to "b" and recomputes every hash after it.
    let text = fs::read_to_string(&path).unwrap();
    let mut all = lines(&text);
    let gone = all
        .iter()
        .position(|l| l["outcome"].as_str().unwrap().contains("ok: b as"))
        .unwrap();
    all.remove(gone);
    fs::write(&path, rechained(all)).unwrap();
    // The unkeyed chain is whole again; the keyed check finds the first rewritten line.
    verify_audit_passes(None, &path);
    let out = edgerec(&[
        "lkm",
        "verify-audit",
        "--config",
        config.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("line {}", gone + 1)) && err.contains("audit key"),
        "{err}"
    );
    // And the key manager refuses to extend the forged log.
    let (code, _, err) = lkm(&["rotate"], &config);
    assert_eq!(code, 1);
    assert!(err.contains("broken log"), "{err}");
    // Stripping every MAC as well, to pass the whole log off as one written before keying:
    // the key store records where keying began.
    let mut all = lines(&text);
    all.remove(gone);
    for l in &mut all {
        l.remove("mac");
    }
    fs::write(&path, rechained(all)).unwrap();
    verify_audit_passes(None, &path);
    let out = edgerec(&[
        "lkm",
        "verify-audit",
        "--config",
        config.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("line 4") && err.contains("MACs were removed"),
        "{err}"
    );
    let (code, _, err) = lkm(&["rotate"], &config);
    assert_eq!(code, 1);
    assert!(err.contains("MACs were removed"), "{err}");
}

/// A key manager on a config of its own in `dir` (master key), its first key made.
fn key_manager(dir: &Path) -> std::path::PathBuf {
    let config = plain_config(dir);
    assert_eq!(lkm(&["init"], &config).0, 0);
    config
}

fn current(config: &Path) -> String {
    keys(config)
        .into_iter()
        .find(|k| k["current"] == true)
        .map(|k| k["id"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn a_tampered_backup_cannot_plant_a_key_and_a_destroyed_key_comes_back_retired() {
    let dir = tempfile::tempdir().unwrap();
    let config = key_manager(dir.path());
    let first = current(&config);
    let backup = dir.path().join("backup.json");
    let (code, _, err) = lkm(&["backup", backup.to_str().unwrap()], &config);
    assert_eq!(code, 0, "{err}");
    // The attacker's own key pair (made by a key manager of theirs), dated a year ahead.
    let theirs = tempfile::tempdir().unwrap();
    let their_config = key_manager(theirs.path());
    let their_id = current(&their_config);
    let mut record: serde_json::Value = serde_json::from_slice(
        &fs::read(theirs.path().join(format!("store/keys/{their_id}.json"))).unwrap(),
    )
    .unwrap();
    let year_ahead = record["dateCreated"].as_u64().unwrap() + 365 * 86_400_000;
    record["dateCreated"] = year_ahead.into();
    let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(&backup).unwrap()).unwrap();
    doc["records"].as_array_mut().unwrap().push(record.clone());
    let tampered = dir.path().join("tampered.json");
    fs::write(&tampered, serde_json::to_vec(&doc).unwrap()).unwrap();
    let restore = |file: &Path, extra: &[&str]| {
        let mut args = vec!["restore"];
        args.extend_from_slice(extra);
        args.push(file.to_str().unwrap());
        lkm(&args, &config)
    };
    let (code, _, err) = restore(&tampered, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("MAC does not verify"), "{err}");
    // The same record in a backup of the older kind (no MAC): refused unless accepted, and
    // then refused for its date, and dated now, because its private key does not open here.
    let bare = dir.path().join("bare.json");
    fs::write(&bare, serde_json::to_vec(&vec![record.clone()]).unwrap()).unwrap();
    let (code, _, err) = restore(&bare, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--accept-unauthenticated"), "{err}");
    let (code, _, err) = restore(&bare, &["--accept-unauthenticated"]);
    assert_eq!(code, 1);
    assert!(err.contains("dated in the future"), "{err}");
    record["dateCreated"] = (year_ahead - 365 * 86_400_000).into();
    fs::write(&bare, serde_json::to_vec(&vec![record]).unwrap()).unwrap();
    let (code, _, err) = restore(&bare, &["--accept-unauthenticated"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not open"), "{err}");
    assert_eq!(keys(&config).len(), 1, "nothing planted");
    assert_eq!(current(&config), first);
    // A key dated ahead written straight into the store is not current either.
    let (code, _, _) = lkm(&["rotate"], &config);
    assert_eq!(code, 0);
    let second = current(&config);
    let path = dir.path().join(format!("store/keys/{second}.json"));
    let mut r: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    r["dateCreated"] = year_ahead.into();
    fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
    assert_eq!(
        current(&config),
        first,
        "a key from the future never takes over"
    );
    // A key destroyed by mistake comes back from the backup made before, retired.
    let app = dir.path().join("edgerec.toml");
    fs::create_dir_all(dir.path().join("recordings")).unwrap();
    fs::write(
        &app,
        format!(
            "[recorder]\nspool_dir = \"spool\"\n[keys]\npublic_key = \"{}\"\n[store]\npath = \"recordings\"\n",
            repo_path("samples/demo-kek.pub.pem").display()
        ),
    )
    .unwrap();
    let (code, _, err) = lkm(
        &[
            "destroy",
            "--store-config",
            app.to_str().unwrap(),
            "--yes",
            &first,
        ],
        &config,
    );
    assert_eq!(code, 0, "{err}");
    let state = |id: &str| {
        keys(&config)
            .into_iter()
            .find(|k| k["id"] == id)
            .map(|k| k["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state(&first), "destroyed");
    let (code, _, err) = restore(&backup, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(state(&first), "destroyed", "plain restore never overwrites");
    let (code, _, err) = restore(&backup, &["--undestroy", &first]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(state(&first), "retired");
    let audit = fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"action\":\"restore.undestroy\""),
        "{audit}"
    );
    // It decrypts again: sealed to it, opened through a service on this key store.
    let backup_after = dir.path().join("after.json");
    assert_eq!(
        lkm(&["backup", backup_after.to_str().unwrap()], &config).0,
        0
    );
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&backup_after).unwrap()).unwrap();
    let restored = r["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == first.as_str())
        .unwrap();
    assert!(restored["sealedPrivateKey"].is_string());
}

/// A TLS client of the service's CA, connected from `from` (a loopback address).
fn tls_to(
    s: &Service,
    from: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(s.ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let sock = connect_from(from, s.port);
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "127.0.0.1".try_into().unwrap())
            .unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// A TCP connection to the service's port from the address `from` (every 127.x address is
/// this machine's), so that a test can be two clients; std cannot bind before connecting,
/// the `nix` crate the package already has can.
fn connect_from(from: &str, port: u16) -> std::net::TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let local: std::net::SocketAddrV4 = format!("{from}:0").parse().unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::from(local)).unwrap();
    let remote: std::net::SocketAddrV4 = format!("127.0.0.1:{port}").parse().unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(remote)).unwrap();
    std::net::TcpStream::from(fd)
}

/// Whether the server has closed `conn` (a read ends, or fails).
fn closed(conn: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) -> bool {
    let mut b = [0u8; 256];
    matches!(conn.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn half_sent_requests_and_idle_connections_cannot_lock_clients_out() {
    let s = Service::start_with(
        "metrics_listen = \"127.0.0.1:0\"\nheader_read_timeout_secs = 3\nidle_timeout_secs = 2\n\
         max_connections = 100\nmax_connections_per_address = 20",
    );
    // An attacker on 127.0.0.2 opens 25 connections and sends half a request on each
    // (before: 242 such connections held every descriptor, for ever). The header timeout
    // (3 s) outlasts the 25 handshakes on a loaded machine, so no place is given back
    // before the last five are turned away.
    let started = Instant::now();
    let mut held = Vec::new();
    let mut turned_away = 0;
    for _ in 0..25 {
        let mut c = tls_to(&s, "127.0.0.2");
        match c.write_all(b"GET /key-management/v1/keypair HTTP/1.1\r\nHost: 127.0.0.1\r\n") {
            Ok(()) => held.push(c),
            Err(_) => turned_away += 1,
        }
    }
    // Only 20 from one address; a client elsewhere is served meanwhile.
    assert_eq!(
        s.call("GET", KEYPAIRS, None, "recorder-1", &s.recorder_key, true)
            .0,
        200
    );
    let mut cut = 0;
    for c in &mut held {
        if closed(c) {
            cut += 1;
        }
    }
    assert_eq!(cut + turned_away, 25, "every half-sent request is cut");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cut after the header timeout, not held: {:?}",
        started.elapsed()
    );
    wait_metric(
        &s,
        "edgerec_lkm_requests_denied_total{reason=\"connection_limit\"}",
        5.0,
    );
    // Counted as the server lets each go, which may come just after the client sees it
    // closed (read once, the count came up one short under a loaded test run).
    wait_metric(
        &s,
        "edgerec_lkm_requests_denied_total{reason=\"timeout\"}",
        20.0,
    );
    // A kept-alive connection that goes quiet is closed after the idle timeout.
    let mut idle = tls_to(&s, "127.0.0.1");
    let auth = hawk_header(
        "GET",
        s.port,
        KEYPAIRS,
        b"",
        "recorder-1",
        &s.recorder_key,
        true,
    );
    write!(
        idle,
        "GET {KEYPAIRS} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: {auth}\r\n\r\n",
        s.port
    )
    .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let quiet = Instant::now();
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(1_500) && after < Duration::from_secs(10),
        "{after:?}"
    );
}
