//! The key manager's administration through the binary: init, rotate, keys, credentials,
//! backup and restore, each in the audit log; no private key in the clear on disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;

fn lkm(args: &[&str], config: &Path) -> (i32, String, String) {
    let mut all = vec!["lkm"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().unwrap()]);
    let out = edgerec(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keys(config: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = lkm(&["keys", "--json"], config);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

#[test]
fn the_key_manager_is_set_up_rotated_backed_up_and_restored_by_its_administrator() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lkm.toml");
    fs::write(
        &config,
        "[lkm]\nstore_dir = \"store\"\nmaster_key_file = \"master.key\"\n\
         credentials_file = \"credentials.json\"\naudit_log = \"audit.jsonl\"\n",
    )
    .unwrap();
    let (code, first, err) = lkm(&["init"], &config);
    assert_eq!(code, 0, "{err}");
    let first = first.trim().to_string();
    assert_eq!(first.len(), 64);
    let mode = |p: &str| {
        fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("master.key"), 0o600);
    assert_eq!(mode("store"), 0o700);
    let (code, _, err) = lkm(&["init"], &config);
    assert_eq!(code, 1, "set up once: {err}");
    let (code, second, _) = lkm(&["rotate"], &config);
    assert_eq!(code, 0);
    let second = second.trim().to_string();
    let listed = keys(&config);
    assert_eq!(listed.len(), 2);
    let current: Vec<_> = listed.iter().filter(|k| k["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(
        current[0]["id"],
        second.as_str(),
        "the newest key is current"
    );
    assert!(listed.iter().all(|k| k["state"] == "active"));
    // Credentials: issued once each, shown once, stored 0600.
    let (code, issued, _) = lkm(&["credentials", "add", "recorder-1"], &config);
    assert_eq!(code, 0);
    assert!(
        issued.contains("id: recorder-1") && issued.contains("key: "),
        "{issued}"
    );
    let (code, _, err) = lkm(&["credentials", "add", "recorder-1"], &config);
    assert_eq!(code, 1, "{err}");
    assert_eq!(mode("credentials.json"), 0o600);
    // Backup, lose the store, restore: both keys back.
    let backup = dir.path().join("backup.json");
    let (code, _, err) = lkm(&["backup", backup.to_str().unwrap()], &config);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode("backup.json"), 0o600);
    fs::remove_dir_all(dir.path().join("store")).unwrap();
    assert!(keys(&config).is_empty());
    let (code, _, err) = lkm(&["restore", backup.to_str().unwrap()], &config);
    assert_eq!(code, 0, "{err}");
    let ids: Vec<_> = keys(&config)
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [first.clone(), second.clone()]);
    // No private key in the clear anywhere on disk.
    for e in walk(dir.path()) {
        let text = String::from_utf8_lossy(&fs::read(&e).unwrap()).into_owned();
        assert!(!text.contains("PRIVATE KEY"), "{}", e.display());
    }
    // Every act is in the audit log, and its chain is intact.
    let audit = fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        actions,
        [
            "init",
            "rotate",
            "credentials.add",
            "credentials.add",
            "backup",
            "restore"
        ]
    );
    assert!(audit.contains(&format!("\"key\":\"{first}\"")));
    let out = edgerec(&[
        "lkm",
        "verify-audit",
        dir.path().join("audit.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
