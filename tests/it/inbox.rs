//! The inbox of `edgerec run`: files renamed into it are sealed as `file` packages,
//! delivered, and removed; what a crash leaves is sealed again, never lost, never doubled.

use std::fs;
use std::path::Path;

use erec::writer::{Media, SealOptions, Sealer};

use crate::appliance::{Appliance, files_with_ext, wait_stored};
use crate::common::*;

fn with_inbox() -> Appliance {
    let a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    let cfg = a.path("edgerec.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str("[inbox]\ndir = \"inbox\"\nrescan_secs = 3600\n");
    fs::write(&cfg, text).unwrap();
    fs::create_dir(a.path("inbox")).unwrap();
    fs::create_dir(a.path("staging")).unwrap();
    a
}

/// Drops a file into the inbox as writers must: written elsewhere, renamed in.
fn drop_in(a: &Appliance, name: &str, bytes: &[u8]) {
    let staged = a.path("staging").join(name);
    fs::write(&staged, bytes).unwrap();
    fs::rename(&staged, a.path("inbox").join(name)).unwrap();
}

/// Exports a store's packages; returns the restored files' (name, bytes) and metadata.
fn export_all(a: &Appliance, out: &str) -> Vec<(String, Vec<u8>, serde_json::Value)> {
    let out = a.path(out);
    let r = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        a.path("store").to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut got = Vec::new();
    for meta in files_with_ext(&out, "json")
        .into_iter()
        .filter(|p| p.to_str().unwrap().ends_with("_metadata.json"))
    {
        let m: serde_json::Value = serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
        let id = m["recording_id"].as_str().unwrap().to_string();
        let name = m["metadata"]["name"].as_str().unwrap().to_string();
        let file = meta.with_file_name(format!("{id}_{name}"));
        got.push((name, fs::read(&file).unwrap(), m));
    }
    got.sort_by(|x, y| x.0.cmp(&y.0));
    got
}

fn inbox_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir)
        .unwrap()
        .all(|e| e.unwrap().file_name() == ".edgerec")
        && fs::read_dir(dir.join(".edgerec")).unwrap().count() == 0
}

#[test]
fn files_dropped_while_down_and_while_running_are_sealed_delivered_and_removed() {
    let mut a = with_inbox();
    // Dropped while the appliance is down, with a sidecar of metadata.
    let transcript = fs::read(repo_path("samples/sample-transcript.txt")).unwrap();
    drop_in(
        &a,
        "chat-0001.txt.meta.json",
        br#"{"conversation_id":"conv-7","channel":"chat","media_type":"transcript"}"#,
    );
    drop_in(&a, "chat-0001.txt", &transcript);
    a.spawn();
    wait_stored(&a.path("store"), 1);
    // Dropped while it runs: taken at once (inotify), with no scan due for an hour.
    let voicemail: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    // A media type the platform has not: kept out, and said so.
    drop_in(&a, "voicemail 17.wav.meta.json", br#"{"media_type":"fax"}"#);
    drop_in(&a, "voicemail 17.wav", &voicemail);
    // A file written in place under a hidden name is not taken.
    fs::write(a.path("inbox/.being-written"), b"partial").unwrap();
    wait_stored(&a.path("store"), 2);
    a.wait_metric("edgerec_inbox_sealed_total", 2.0);
    a.sigterm();
    let got = export_all(&a, "export");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, "chat-0001.txt");
    assert!(got[0].1 == transcript, "byte for byte");
    assert_eq!(got[0].2["metadata"]["conversation_id"], "conv-7");
    assert_eq!(got[0].2["metadata"]["channel"], "chat");
    assert!(
        got[0].2["media"] == "file" || got[0].2["public_metadata"]["media"] == "file",
        "{}",
        got[0].2
    );
    assert_eq!(got[0].2["media_type"], "transcript");
    assert_eq!(got[1].0, "voicemail 17.wav");
    assert!(got[1].1 == voicemail, "byte for byte");
    assert_eq!(got[1].2["media_type"], serde_json::Value::Null);
    assert!(
        got[1].2["metadata"]["sidecar_error"]
            .as_str()
            .unwrap()
            .contains("media_type is none of"),
        "{}",
        got[1].2
    );
    // Selected by media type: only the transcript, beside its conversation.
    let out = a.path("transcripts");
    let r = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--media-type",
        "transcript",
        a.path("store").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("1 exported, 0 skipped (done before), 1 of other media types, 0 failed"),
        "{err}"
    );
    let only: Vec<_> = files_with_ext(&out, "txt");
    assert_eq!(only.len(), 1);
    assert!(
        only[0].to_str().unwrap().contains("conversation_id=conv-7"),
        "{}",
        only[0].display()
    );
    // Gone from the inbox once sealed; the hidden file stays.
    fs::remove_file(a.path("inbox/.being-written")).unwrap();
    assert!(inbox_is_empty(&a.path("inbox")));
    // The plaintext is nowhere in the spool or the store.
    for f in files_with_ext(&a.path("store"), "erec") {
        let bytes = fs::read(&f).unwrap();
        assert!(!bytes.windows(16).any(|w| w == &transcript[..16]));
    }
    // In the outcome journal as recordings of port 0, sealed whole and stored; no name.
    let doc = calls_json("--config", &a.path("edgerec.toml"));
    let calls = doc["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{doc}");
    for c in calls {
        assert_eq!(c["port"], 0, "{c}");
        assert_eq!(c["outcome"], "stored", "{c}");
        assert_eq!(c["ended"]["reason"], "complete", "{c}");
    }
    assert!(!doc.to_string().contains("voicemail"));
}

#[test]
fn a_crash_between_sealing_and_removal_leaves_the_file_claimed_then_sealed_once() {
    let a = with_inbox();
    let mut a = a;
    let original = fs::read(repo_path("samples/sample-transcript.txt")).unwrap();
    // The state a crash leaves after the package was sealed (end record and all) but before
    // the claimed file was removed from the inbox.
    let id = uuid::Uuid::now_v7();
    fs::create_dir_all(a.path("inbox/.edgerec")).unwrap();
    fs::write(
        a.path(&format!("inbox/.edgerec/{id}.call-note.txt")),
        &original,
    )
    .unwrap();
    let active = a.path("spool/active");
    fs::create_dir_all(&active).unwrap();
    fs::set_permissions(
        a.path("spool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let sealed = {
        let opts = SealOptions {
            media: Media::File,
            recording_id: Some(id),
            ..SealOptions::default()
        };
        let s = Sealer::new(&[public("test")], &opts).unwrap();
        let mut out = s.header_bytes().to_vec();
        let mut input = &original[..];
        erec::writer::seal_stream(s, &mut input, &mut out, true, 1).unwrap();
        out
    };
    fs::write(active.join(format!("{id}.erec.part")), &sealed).unwrap();
    a.spawn();
    let stored = wait_stored(&a.path("store"), 1);
    a.wait_metric("edgerec_inbox_sealed_total", 1.0);
    // Everything the spool held is gone to the store: no second package under the same id
    // waits, and none was refused as a conflict.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !files_with_ext(&a.path("spool"), "erec").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool did not empty"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(a.metric("edgerec_uploads_total{outcome=\"failed\"}"), 0.0);
    // The store holds it before the uploader counts it: wait for the count.
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 1.0);
    assert_eq!(a.metric("edgerec_uploads_total{outcome=\"stored\"}"), 1.0);
    a.sigterm();
    assert_eq!(stored.len(), 1, "not doubled: {stored:?}");
    assert!(
        stored[0].to_str().unwrap().contains(&id.to_string()),
        "under its claimed id"
    );
    let got = export_all(&a, "export");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "call-note.txt");
    assert!(got[0].1 == original, "not lost: byte for byte");
    assert!(inbox_is_empty(&a.path("inbox")));
    assert!(files_with_ext(&a.path("spool"), "part").is_empty());
}

#[test]
fn a_symlink_or_fifo_renamed_in_is_refused_unread_and_a_relative_inbox_is_watched() {
    let mut a = with_inbox();
    // What the service can read and nobody should get: before, a symlink to it renamed into
    // the inbox was sealed into the store.
    let secret = a.path("service-secret.txt");
    fs::write(&secret, b"EDGEREC_CONTROL_TOKEN=never-sealed").unwrap();
    // Started with a relative config path: the inbox path is relative too.
    a.spawn_from_its_dir();
    std::os::unix::fs::symlink(&secret, a.path("staging/environ")).unwrap();
    fs::rename(a.path("staging/environ"), a.path("inbox/environ")).unwrap();
    let fifo = a.path("staging/pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    fs::rename(&fifo, a.path("inbox/pipe")).unwrap();
    // A regular file after them is taken at once (the watcher names it by absolute path).
    drop_in(&a, "after.txt", b"a transcript");
    wait_stored(&a.path("store"), 1);
    a.wait_metric("edgerec_inbox_errors_total{reason=\"symlink\"}", 1.0);
    a.wait_metric("edgerec_inbox_errors_total{reason=\"not_regular\"}", 1.0);
    // Both moved aside with their reasons, the symlink still a symlink (never followed).
    let refused = a.path("inbox/.edgerec/refused");
    let mut names: Vec<String> = fs::read_dir(&refused)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4, "{names:?}");
    let link = names.iter().find(|n| n.ends_with(".environ")).unwrap();
    assert!(
        fs::symlink_metadata(refused.join(link))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let why = fs::read_to_string(refused.join(format!("{link}.reason"))).unwrap();
    assert!(why.contains("symbolic link"), "{why}");
    let pipe = names.iter().find(|n| n.ends_with(".pipe")).unwrap();
    let why = fs::read_to_string(refused.join(format!("{pipe}.reason"))).unwrap();
    assert!(
        why.contains("FIFO") || why.contains("not a regular file"),
        "{why}"
    );
    a.sigterm();
    // One package only: the regular file.
    let got = export_all(&a, "export");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_slice()),
        ("after.txt", &b"a transcript"[..])
    );
}
