//! Export into a bucket (`--out s3://…`): calls and digital recordings from SeaweedFS into
//! the platform's layout, every object encrypted server-side (confirmed by a HEAD), a large
//! output in parts, PGP on top; a second run uploads nothing.

use std::collections::BTreeMap;
use std::fs;

use edgerec::store::s3::S3Store;

use crate::appliance::{Appliance, loadgen, recordings_in, s3_store};
use crate::common::*;
use crate::export::Gpg;
use crate::s3::{SECRET_KEY, Weed};

/// Drops a file into the appliance's inbox as writers must: sidecar first, renamed in.
fn drop_in(a: &Appliance, name: &str, bytes: &[u8], sidecar: &str) {
    for (n, b) in [
        (format!("{name}.meta.json"), sidecar.as_bytes()),
        (name.to_string(), bytes),
    ] {
        let staged = a.path("staging").join(&n);
        fs::write(&staged, b).unwrap();
        fs::rename(&staged, a.path("inbox").join(&n)).unwrap();
    }
}

/// The objects under `prefix` but the export's own records, with their ETags.
fn outputs(s3: &S3Store, prefix: &str) -> BTreeMap<String, String> {
    s3.list(prefix)
        .unwrap()
        .into_iter()
        .filter(|k| !k.contains("/.edgerec-export/"))
        .map(|k| {
            let etag = s3.info(&k).unwrap().unwrap().etag;
            (k, etag)
        })
        .collect()
}

#[test]
fn calls_and_digital_recordings_export_into_a_bucket_in_the_platform_layout() {
    let weed = Weed::start();
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", &s3_store(&weed, SECRET_KEY), "");
    let cfg = a.path("edgerec.toml");
    let token = a.path("control.token");
    fs::write(&token, "export-test-token-0123456789\n").unwrap();
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[inbox]\ndir = \"inbox\"\n[control]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token.display()
    ));
    fs::write(&cfg, text).unwrap();
    fs::create_dir(a.path("inbox")).unwrap();
    fs::create_dir(a.path("staging")).unwrap();
    // A chat and its transcript in one conversation; a screen recording of 12 MiB in
    // another (more than two 5 MiB parts); two calls.
    let chat = b"agent: hello\ncustomer: hi\n".to_vec();
    let transcript = fs::read(repo_path("samples/sample-transcript.txt")).unwrap();
    let screen = pattern(12 << 20);
    drop_in(
        &a,
        "chat.txt",
        &chat,
        r#"{"media_type":"chat","conversation_id":"conv-7","agent":"u-1"}"#,
    );
    drop_in(
        &a,
        "chat-transcript.txt",
        &transcript,
        r#"{"media_type":"transcript","conversation_id":"conv-7"}"#,
    );
    drop_in(
        &a,
        "screen.bin",
        &screen,
        r#"{"media_type":"screen","conversation_id":"conv-8"}"#,
    );
    a.spawn();
    // The call on the first port belongs to the chat's conversation (tagged through the
    // control API before it starts); the other call has none.
    let tagged = reqwest::blocking::Client::new()
        .put(format!(
            "http://{}/v1/ports/{}/metadata",
            crate::control::control_addr(&a),
            a.base
        ))
        .bearer_auth("export-test-token-0123456789")
        .header("content-type", "application/json")
        .body(r#"{"conversation_id":"conv-7","agent":"u-2"}"#)
        .send()
        .unwrap();
    assert_eq!(tagged.status().as_u16(), 200);
    assert!(
        loadgen(
            &format!("{}-{}", a.base, a.base + 1),
            &["--streams", "4", "--seconds", "1"]
        )
        .status
        .success()
    );
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 5.0);
    a.sigterm();
    let s3 = weed.store(SECRET_KEY);
    assert_eq!(recordings_in(&s3, "calls/").len(), 5);
    // The bucket's endpoint and credentials; parts of 5 MiB; the organisation.
    let out_config = a.path("out.toml");
    let store = s3_store(&weed, SECRET_KEY)
        .lines()
        .filter(|l| !l.starts_with("bucket") && !l.starts_with("prefix"))
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(
        &out_config,
        format!(
            "[store]\n{store}\n[upload]\nmultipart_part_bytes = 5242880\n\
             [export]\norganisation_id = \"org-1\"\n"
        ),
    )
    .unwrap();
    let key = key_path("test-kek.pem");
    let export = |out: &str, more: &[&str]| {
        let mut args = vec![
            "export",
            "--key",
            key.to_str().unwrap(),
            "--store-config",
            cfg.to_str().unwrap(),
            "--out",
            out,
            "--out-config",
            out_config.to_str().unwrap(),
            "--sse",
            "s3",
            "--layout",
            "platform",
            "--jobs",
            "2",
        ];
        args.extend(more);
        let o = edgerec(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = export("s3://edgerec/exports", &[]);
    assert!(
        err.contains("export: 5 packages: 5 exported, 0 skipped"),
        "{err}"
    );
    let first = outputs(&s3, "exports/");
    assert_eq!(first.len(), 10, "a file and its metadata each: {first:?}");
    // Every object, the done-records too, encrypted server-side as asked.
    for k in s3.list("exports/").unwrap() {
        assert_eq!(
            s3.info(&k).unwrap().unwrap().sse.as_deref(),
            Some("AES256"),
            "{k}"
        );
    }
    // The platform's layout: org/year=/month=/day=/hour=/conversation_id=/<recording id>.
    let mut by_conversation: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for k in first.keys().filter(|k| k.ends_with("_metadata.json")) {
        let parts: Vec<&str> = k.split('/').collect();
        assert_eq!(parts.len(), 8, "{k}");
        assert_eq!(parts[1], "org-1");
        for (p, level) in parts[2..6].iter().zip(["year=", "month=", "day=", "hour="]) {
            assert!(p.starts_with(level), "{k}");
        }
        let m: serde_json::Value = serde_json::from_slice(&s3.get(k).unwrap()).unwrap();
        let id = m["recordingId"].as_str().unwrap();
        assert_eq!(parts[7], format!("{id}_metadata.json"));
        assert_eq!(m["organizationId"], "org-1");
        assert_eq!(m["provider"], "edge");
        assert_eq!(m["edgerec"]["recording_id"], id);
        // Its media file beside it, named by the recording id.
        let dir = parts[..7].join("/");
        let media: Vec<&String> = first
            .keys()
            .filter(|o| o.starts_with(&format!("{dir}/{id}")) && !o.ends_with(".json"))
            .collect();
        assert_eq!(media.len(), 1, "{k}: {first:?}");
        let conversation = parts[6].strip_prefix("conversation_id=").unwrap();
        by_conversation
            .entry(conversation.to_string())
            .or_default()
            .push(m);
    }
    let types = |c: &str| {
        let mut t: Vec<String> = by_conversation[c]
            .iter()
            .map(|m| m["mediaType"].as_str().unwrap_or("(none)").to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        types("conv-7"),
        ["(none)", "Call", "Chat"],
        "the transcript beside its call and chat"
    );
    assert_eq!(types("conv-8"), ["Screen"]);
    assert_eq!(types("untagged"), ["Call"]);
    let chat_meta = by_conversation["conv-7"]
        .iter()
        .find(|m| m["mediaType"] == "Chat")
        .unwrap();
    assert_eq!(chat_meta["userIds"], serde_json::json!(["u-1"]));
    assert_eq!(chat_meta["conversationId"], "conv-7");
    // The large one went up in parts and came back byte for byte.
    let screen_key = first.keys().find(|k| k.ends_with(".bin")).unwrap();
    assert!(
        first[screen_key].contains('-'),
        "a multipart ETag: {first:?}"
    );
    assert!(s3.get(screen_key).unwrap() == screen);
    // A second run uploads nothing.
    let err = export("s3://edgerec/exports", &[]);
    assert!(
        err.contains("export: 5 packages: 0 exported, 5 skipped"),
        "{err}"
    );
    assert_eq!(outputs(&s3, "exports/"), first, "nothing written again");
    // A done-record that names no outputs (forged, or damaged) does not count: that one
    // recording is exported again.
    let record = s3
        .list("exports/.edgerec-export/done/")
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let mut done: serde_json::Value = serde_json::from_slice(&s3.get(&record).unwrap()).unwrap();
    done["outputs"] = serde_json::json!([]);
    done["etags"] = serde_json::json!([]);
    s3.put_bytes(
        &record,
        serde_json::to_vec(&done).unwrap().into(),
        &[("x-amz-server-side-encryption", "AES256".to_string())],
    )
    .unwrap();
    let err = export("s3://edgerec/exports", &[]);
    assert!(
        err.contains("export: 5 packages: 1 exported, 4 skipped"),
        "{err}"
    );
    // PGP on top: every object is <name>.pgp, and gpg gives back the plain export's bytes.
    let gpg = Gpg::new();
    let cert = a.path("receiver.asc");
    let o = gpg.run(&["--armor", "--export", "receiver@example.com"]);
    assert!(o.status.success());
    fs::write(&cert, &o.stdout).unwrap();
    let err = export(
        "s3://edgerec/sealed/",
        &["--pgp-recipient", cert.to_str().unwrap()],
    );
    assert!(err.contains("5 exported"), "{err}");
    let sealed = outputs(&s3, "sealed/");
    assert_eq!(sealed.len(), 10);
    for k in first.keys() {
        let twin = format!("sealed/{}.pgp", k.strip_prefix("exports/").unwrap());
        assert!(sealed.contains_key(&twin), "{twin}: {sealed:?}");
        let enc = a.path("object.pgp");
        let dec = a.path("object");
        let _ = fs::remove_file(&dec);
        fs::write(&enc, s3.get(&twin).unwrap()).unwrap();
        let r = gpg.run(&[
            "--output",
            dec.to_str().unwrap(),
            "--decrypt",
            enc.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let plain = fs::read(&dec).unwrap();
        // Media and metadata alike: the plain export's bytes.
        assert!(
            plain == s3.get(k).unwrap(),
            "{k}: gpg gives back the exact file"
        );
    }
    // By conversation, through the sealed manifests: only conv-7's three recordings (a call,
    // a chat, its transcript) are even opened (the others are not counted), each filed by
    // the conversation's start.
    let show = edgerec(&["identity", "show", "--config", cfg.to_str().unwrap()]);
    assert!(show.status.success());
    let pem = a.path("appliance.pem");
    fs::write(&pem, &show.stdout).unwrap();
    let err = export(
        "s3://edgerec/conv7",
        &[
            "--conversation",
            "conv-7",
            "--appliance-key",
            pem.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains(
            "export: 3 packages: 3 exported, 0 skipped (done before), 0 of other conversations, 0 failed"
        ),
        "{err}"
    );
    let metas: Vec<serde_json::Value> = outputs(&s3, "conv7/")
        .keys()
        .filter(|k| k.ends_with("_metadata.json"))
        .map(|k| serde_json::from_slice(&s3.get(k).unwrap()).unwrap())
        .collect();
    assert_eq!(metas.len(), 3);
    let earliest = metas
        .iter()
        .map(|m| m["recordingStartTime"].as_str().unwrap().to_string())
        .min()
        .unwrap();
    // The conversation began with its first recording (its id's time, within moments of its
    // package's creation): every recording of it carries that time.
    let began = |m: &serde_json::Value| {
        erec::clock::parse_rfc3339_ms(m["conversationStartTime"].as_str().unwrap()).unwrap()
    };
    let earliest = erec::clock::parse_rfc3339_ms(&earliest).unwrap();
    for m in &metas {
        assert_eq!(m["conversationId"], "conv-7");
        assert_eq!(began(m), began(&metas[0]));
        assert!(began(m).abs_diff(earliest) < 1000, "{m}");
    }
}

#[test]
fn a_bucket_export_refuses_bad_destinations_before_it_reads_anything() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_path("test-kek.pem");
    let cfg = dir.path().join("out.toml");
    let run = |args: &[&str]| {
        let mut all = vec!["export", "--key", key.to_str().unwrap()];
        all.extend(args);
        all.push(dir.path().to_str().unwrap());
        let o = edgerec(&all);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--out", "s3://exports/x"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("needs --out-config"), "{err}");
    fs::write(
        &cfg,
        "[store]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\n",
    )
    .unwrap();
    let (code, err) = run(&[
        "--out",
        "s3://exports/x",
        "--out-config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("store.bucket") && err.contains("--out s3://"),
        "{err}"
    );
    let (code, err) = run(&[
        "--out",
        "s3://Exports/x",
        "--out-config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not an S3 bucket name"), "{err}");
    let out = dir.path().join("out");
    let (code, err) = run(&["--out", out.to_str().unwrap(), "--layout", "platform"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--org-id"), "{err}");
    let (code, err) = run(&["--out", out.to_str().unwrap(), "--sse", "s3"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("s3://BUCKET/PREFIX"), "{err}");
    let (code, err) = run(&["--out", out.to_str().unwrap(), "--org-id", "org-1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--layout platform"), "{err}");
    let (code, err) = run(&[
        "--out",
        "s3://exports/x",
        "--out-config",
        cfg.to_str().unwrap(),
        "--sse",
        "s3",
        "--sse-kms-key-id",
        "k",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--sse kms"), "{err}");
}

#[test]
fn sse_kms_is_asked_for_on_every_object_and_confirmed_against_motos_s3() {
    let moto = crate::kms::Moto::start();
    let key_id = moto.call(
        "CreateKey",
        serde_json::json!({ "Description": "export bucket" }),
    )["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let made = reqwest::blocking::Client::new()
        .put(format!("{}/exports", moto.endpoint))
        .send()
        .unwrap();
    assert!(made.status().is_success(), "{}", made.status());
    let dir = tempfile::tempdir().unwrap();
    // A small file and one of 6 MiB (two 5 MiB parts: the encryption asked at the start of
    // the multipart upload).
    let inputs = dir.path().join("in");
    fs::create_dir(&inputs).unwrap();
    for (name, bytes) in [
        ("small.txt", b"a chat, sealed".to_vec()),
        ("large.bin", pattern(6 << 20)),
    ] {
        let plain = dir.path().join(name);
        fs::write(&plain, bytes).unwrap();
        seal_file(&plain, &inputs.join(format!("{name}.erec")));
    }
    let creds = dir.path().join("credentials");
    fs::write(
        &creds,
        "[default]\naws_access_key_id = test\naws_secret_access_key = test\n",
    )
    .unwrap();
    let out_config = dir.path().join("out.toml");
    fs::write(
        &out_config,
        format!(
            "[store]\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n\
             [upload]\nmultipart_part_bytes = 5242880\n",
            moto.endpoint,
            creds.display()
        ),
    )
    .unwrap();
    let o = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        "s3://exports/kms",
        "--out-config",
        out_config.to_str().unwrap(),
        "--sse",
        "kms",
        "--sse-kms-key-id",
        &key_id,
        inputs.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("2 exported"), "{err}");
    let s3 = S3Store::new(edgerec::store::s3::S3Config {
        endpoint: moto.endpoint.clone(),
        region: "us-east-1".into(),
        bucket: "exports".into(),
        access_key: "test".into(),
        secret_key: zeroize::Zeroizing::new("test".into()),
        tls: Default::default(),
        timeout: std::time::Duration::from_secs(30),
        limit: None,
        multipart_threshold: 64 << 20,
        part_bytes: 16 << 20,
    })
    .unwrap();
    let keys = s3.list("kms/").unwrap();
    assert_eq!(
        keys.len(),
        6,
        "two outputs, their metadata, their done-records: {keys:?}"
    );
    for k in keys {
        let info = s3.info(&k).unwrap().unwrap();
        assert_eq!(info.sse.as_deref(), Some("aws:kms"), "{k}");
        assert!(
            info.sse_kms_key_id
                .as_deref()
                .is_some_and(|shown| shown.ends_with(&key_id)),
            "{k}: {info:?}"
        );
    }
}
