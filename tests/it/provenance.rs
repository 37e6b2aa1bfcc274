//! Proving a store complete and genuine (issue 16): a real appliance delivering to a real S3
//! server (SeaweedFS) with a short manifest period; calls, a full-spool refusal, a `kill -9`
//! mid-call (salvage) just after another call was stored and before any manifest listed it, a
//! recording that uses up its bounded attempts; then `edgerec verify-store` reports each, and
//! names each object deleted, altered or forged (sealed to the public KEK with `edgerec seal`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::appliance::{Appliance, is_manifest, loadgen, recordings_in, s3_store};
use crate::common::*;
use crate::s3::{SECRET_KEY, Weed};

/// Registers the appliance: its public key, as `identity show` prints it, in a file.
fn register(a: &Appliance) -> PathBuf {
    let cfg = a.path("edgerec.toml");
    let o = edgerec(&[
        "identity",
        "show",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let path = a.path("appliance.pub.pem");
    fs::write(&path, v["public_key_pem"].as_str().unwrap()).unwrap();
    path
}

/// `edgerec verify-store --json` of the appliance's store: the exit code and the report.
fn verify(a: &Appliance, appliance_key: &Path) -> (i32, serde_json::Value) {
    let cfg = a.path("edgerec.toml");
    let o = edgerec(&[
        "verify-store",
        "--store-config",
        cfg.to_str().unwrap(),
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--appliance-key",
        appliance_key.to_str().unwrap(),
        "--json",
    ]);
    let report = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap(), report)
}

/// The recording ids of a finding list of the report.
fn ids(report: &serde_json::Value, what: &str) -> Vec<String> {
    let mut v: Vec<String> = report[what]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap_or("-").to_string())
        .collect();
    v.sort();
    v
}

/// The ids of the calls whose outcome the journal gives as `outcome`.
fn journal(a: &Appliance, outcome: &str) -> Vec<String> {
    let calls = calls_json("--config", &a.path("edgerec.toml"));
    let mut v: Vec<String> = calls["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == outcome)
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Every manifest in the store, decrypted, as (key, manifest).
fn manifests(weed: &Weed) -> Vec<(String, serde_json::Value)> {
    let s3 = weed.store(SECRET_KEY);
    let ring = ring(&["test"]);
    s3.list("calls/manifests/")
        .unwrap()
        .into_iter()
        .map(|k| {
            let (plain, _) =
                open_bytes(&s3.get(&k).unwrap(), &ring, erec::reader::ReadMode::Strict).unwrap();
            let envelope: serde_json::Value = serde_json::from_slice(&plain).unwrap();
            let m = serde_json::from_str(envelope["manifest"].as_str().unwrap()).unwrap();
            (k, m)
        })
        .collect()
}

/// Sends the manifests a store outage left in `failed/` again (the recordings stay there).
fn retry_failed_manifests(a: &Appliance) {
    let failed = a.path("spool/failed");
    for e in fs::read_dir(&failed).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "erec") && is_manifest(&p) {
            let id = p.file_stem().unwrap().to_str().unwrap().to_string();
            let cfg = a.path("edgerec.toml");
            let o = edgerec(&["spool", "retry", "--config", cfg.to_str().unwrap(), &id]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

/// Starts the appliance with a manifest a minute (and `recorder` lines); its public key,
/// registered.
fn start_with_a_minute_period(a: &mut Appliance, recorder: &str) -> PathBuf {
    let cfg = a.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        "idle_timeout_ms = 1500",
        &format!("idle_timeout_ms = 1500\n{recorder}"),
    );
    fs::write(
        &cfg,
        format!("{text}\n[outcomes]\nmanifest_period_secs = 60\n"),
    )
    .unwrap();
    a.spawn();
    register(a)
}

fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn verify_store_accounts_for_every_call_and_names_every_object_deleted_altered_or_forged() {
    let mut weed = Weed::start();
    let mut a = Appliance::prepare(
        "\"127.0.0.0/8\"",
        &s3_store(&weed, SECRET_KEY),
        "max_attempts = 3",
    );
    let cfg = a.path("edgerec.toml");
    let pubkey = start_with_a_minute_period(&mut a, "spool_max_bytes = 67108864");
    let base = a.base;
    let ports = move |i: u16| format!("{}-{}", base + i, base + i);
    let call = |i: u16, secs: &str| loadgen(&ports(i), &["--streams", "2", "--seconds", secs]);

    // Two calls, stored.
    assert!(call(0, "1").status.success());
    assert!(call(1, "1").status.success());
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 2.0);

    // A call ends and is stored, another is under way: kill -9 before a manifest lists
    // either (the period is a minute; a boundary may pass, and then the stored one is
    // listed already, which must not list it twice).
    let long = {
        let p = ports(2);
        std::thread::spawn(move || loadgen(&p, &["--streams", "2", "--seconds", "5"]))
    };
    assert!(call(3, "1").status.success());
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 3.0);
    let chunks = a.metric("edgerec_chunks_written_total");
    a.wait_metric("edgerec_chunks_written_total", chunks + 2.0);
    a.kill9();
    assert!(long.join().unwrap().status.success());
    a.spawn();
    // The cut call is salvaged and delivered.
    a.wait_metric("edgerec_uploads_total{outcome=\"stored\"}", 1.0);
    // A planned restart: its stop delivers a manifest.
    a.sigterm();
    a.spawn();

    // The spool over its quota: a call is refused.
    let ballast = a.path("spool/quarantine/ballast");
    fs::File::create(&ballast)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    until("/readyz stayed ready over the quota", || {
        a.get("/readyz").0 == 503
    });
    assert!(call(0, "1").status.success());
    a.wait_metric(
        "edgerec_recordings_refused_total{reason=\"spool_full\"}",
        1.0,
    );
    fs::remove_file(&ballast).unwrap();
    until("/readyz did not recover", || a.get("/readyz").0 == 200);

    // The store goes away: a call uses up its three attempts and waits in failed/.
    weed.kill9();
    assert!(call(1, "1").status.success());
    a.wait_metric("edgerec_uploads_total{outcome=\"failed\"}", 1.0);
    weed.restart();
    retry_failed_manifests(&a);

    // A graceful stop delivers the manifest of what the appliance has.
    a.sigterm();
    let stored = journal(&a, "stored");
    let failed = journal(&a, "failed");
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let salvaged: Vec<String> = calls_json("--config", &cfg)["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("salvaged").is_some())
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(salvaged.len(), 1);

    // Every recording is in exactly one manifest's `began`, and in some manifest's facts.
    let all = manifests(&weed);
    assert!(all.len() >= 2, "the two stops' at least");
    let mut began: Vec<String> = all
        .iter()
        .flat_map(|(_, m)| m["began"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    began.sort();
    let mut recorded = [stored.clone(), failed.clone()].concat();
    recorded.sort();
    assert_eq!(
        began, recorded,
        "each recording begun in exactly one manifest"
    );
    for id in &recorded {
        assert!(
            all.iter()
                .any(|(_, m)| m["facts"].to_string().contains(id.as_str())),
            "{id} in no manifest"
        );
    }

    // verify-store: genuine, incomplete (a refusal, a failure), each named.
    let (code, r) = verify(&a, &pubkey);
    assert_eq!(code, 1, "genuine but incomplete: {r:#}");
    assert_eq!(r["chains"].as_array().unwrap().len(), 1);
    assert!(
        r["chains"][0]["gaps"].as_array().unwrap().is_empty(),
        "{r:#}"
    );
    assert!(
        r["chains"][0]["broken"].as_array().unwrap().is_empty(),
        "{r:#}"
    );
    assert_eq!(r["listed"], 5);
    assert_eq!(r["intact"], 4);
    assert_eq!(ids(&r, "failed"), failed);
    assert!(
        r["failed"][0]["why"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{r:#}"
    );
    assert_eq!(ids(&r, "salvaged"), salvaged);
    assert!(r["refused"]["spool_full"].as_u64().unwrap() >= 1, "{r:#}");
    for clean in [
        "missing",
        "altered",
        "unlisted",
        "bad_manifests",
        "not_stored",
    ] {
        assert!(r[clean].as_array().unwrap().is_empty(), "{clean}: {r:#}");
    }

    // Tampering: one object deleted, one replaced by other bytes, one forged and added.
    let s3 = weed.store(SECRET_KEY);
    let keys = recordings_in(&s3, "calls/");
    let key_of = |id: &str| keys.iter().find(|k| k.contains(id)).unwrap().clone();
    let (deleted, altered) = (key_of(&stored[0]), key_of(&stored[1]));
    let filer = reqwest::blocking::Client::new();
    let remove = |key: &str| {
        let r = filer
            .delete(format!("{}/buckets/edgerec/{key}", weed.filer))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    };
    remove(&deleted);
    let mut bytes = s3.get(&altered).unwrap();
    remove(&altered);
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    let put = |key: &str, bytes: &[u8]| {
        let f = a.path("upload.erec");
        fs::write(&f, bytes).unwrap();
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(bytes).into();
        use edgerec::store::Store;
        s3.put(key, &f, &sha).unwrap();
    };
    put(&altered, &bytes);
    let plain = a.path("forged.wav");
    fs::write(&plain, pattern(4000)).unwrap();
    let forged_file = a.path("forged.erec");
    seal_file(&plain, &forged_file);
    let forged_id = uuid::Uuid::now_v7().to_string();
    let day = &deleted["calls/".len().."calls/yyyy/mm/dd/".len()];
    let forged = format!("calls/{day}{forged_id}.erec");
    put(&forged, &fs::read(&forged_file).unwrap());

    let (code, r) = verify(&a, &pubkey);
    assert_eq!(code, 4, "tampered: {r:#}");
    assert_eq!(ids(&r, "missing"), [stored[0].clone()]);
    assert_eq!(r["missing"][0]["key"], deleted.as_str());
    assert_eq!(ids(&r, "altered"), [stored[1].clone()]);
    assert_eq!(ids(&r, "unlisted"), std::slice::from_ref(&forged_id));
    assert_eq!(r["unlisted"][0]["key"], forged.as_str());

    // Export with the appliance's key lets the genuine through and refuses the forgery.
    let out = a.path("export");
    let o = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--store-config",
        cfg.to_str().unwrap(),
        "--appliance-key",
        pubkey.to_str().unwrap(),
        "--no-join",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("no signed manifest"), "{stderr}");
    let exported: Vec<PathBuf> = crate::appliance::files_with_ext(&out, "json")
        .into_iter()
        .filter(|p| !p.starts_with(out.join(".edgerec-export")))
        .collect();
    let names: String = exported.iter().map(|p| p.display().to_string()).collect();
    assert!(
        !names.contains(&forged_id),
        "the forgery was exported: {names}"
    );
    assert!(
        names.contains(&stored[2]) || names.contains(&stored[3]),
        "the genuine ones exported: {names}"
    );

    // A manifest deleted from the middle of the chain is a gap.
    let middle = all
        .iter()
        .find(|(_, m)| m["seq"] == 0)
        .map(|(k, _)| k.clone())
        .unwrap();
    remove(&middle);
    let (code, r) = verify(&a, &pubkey);
    assert_eq!(code, 4);
    assert_eq!(
        r["chains"][0]["gaps"][0],
        serde_json::json!([0, 0]),
        "{r:#}"
    );
}

#[test]
fn an_idle_appliance_signs_a_manifest_every_period_and_its_store_verifies_complete() {
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    let pubkey = start_with_a_minute_period(&mut a, "");
    // The first period's boundary is at most a minute away.
    let deadline = Instant::now() + Duration::from_secs(90);
    while a.metric("edgerec_manifests_total{outcome=\"stored\"}") < 1.0 {
        assert!(Instant::now() < deadline, "no manifest in a period");
        std::thread::sleep(Duration::from_millis(200));
    }
    a.sigterm();
    let mut manifests: Vec<String> = Vec::new();
    let mut stack = vec![a.path("store/manifests")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                manifests.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    manifests.sort();
    assert_eq!(
        manifests.len(),
        2,
        "the period's and the stop's: {manifests:?}"
    );
    assert!(manifests[0].ends_with(".0.erec") && manifests[1].ends_with(".1.erec"));
    let (code, r) = verify(&a, &pubkey);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["listed"], 0);
}
