//! Bulk export from the recording store: a day of recordings from SeaweedFS, with a tampered
//! and an unterminated package among them; resumable.

use std::fs;

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
