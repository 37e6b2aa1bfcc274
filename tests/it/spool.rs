//! The spool after a simulated crash: recovery cuts torn tails, keeps every synced record,
//! rebuilds missing state and quarantines what cannot be walked, without any key.

use std::fs;

use edgerec::appliance::spool::{Place, Recovery, Spool};
use erec::format::{EndReason, Kind};
use erec::reader::ReadMode;
use erec::writer::{Media, SealOptions, Sealer};
use uuid::Uuid;

use crate::common::*;

fn sealer() -> Sealer {
    let opts = SealOptions {
        media: Media::Rtp,
        max_chunk: 4096,
        ..SealOptions::default()
    };
    Sealer::new(&[public("test")], &opts).unwrap()
}

#[test]
fn a_crash_mid_recording_is_recovered_with_every_synced_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let mut s = sealer();
    let id = s.recording_id();
    let mut f = spool.create(id, s.header_bytes()).unwrap();
    for i in 0..3u8 {
        let mut rec = Vec::new();
        s.seal(Kind::Media, &[i; 1000], &mut rec).unwrap();
        f.append(&rec).unwrap();
    }
    f.sync().unwrap();
    // A fourth chunk only partly written when the power went.
    let mut rec = Vec::new();
    s.seal(Kind::Media, &[9; 1000], &mut rec).unwrap();
    f.append(&rec[..500]).unwrap();
    drop(f);
    drop(s);

    let done = spool.recover(1).unwrap();
    assert_eq!(
        done,
        vec![Recovery::Recovered {
            id,
            terminated: false,
            cut: 500
        }]
    );
    let state = spool.read_state(Place::Ready, id).unwrap();
    assert!(!state.terminated);
    assert_eq!(
        state.unterminated_reason.as_deref(),
        Some("recovered after a crash")
    );
    let pkg = fs::read(spool.package_path(Place::Ready, id)).unwrap();
    assert_eq!(state.size, pkg.len() as u64);
    let (out, summary) = open_bytes(&pkg, &ring(&["test"]), ReadMode::Recovery).unwrap();
    assert!(!summary.terminated());
    assert_eq!(out, [[0u8; 1000], [1; 1000], [2; 1000]].concat());
    // A second start finds nothing more to do.
    assert!(spool.recover(2).unwrap().is_empty());
}

#[test]
fn an_end_record_that_reached_the_disk_counts_as_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let mut s = sealer();
    let id = s.recording_id();
    let mut f = spool.create(id, s.header_bytes()).unwrap();
    let mut rec = Vec::new();
    s.seal(Kind::Media, b"abc", &mut rec).unwrap();
    s.finish(EndReason::Complete, 5, &mut rec);
    f.append(&rec).unwrap();
    f.sync().unwrap();
    drop(f); // crashed before the rename
    let done = spool.recover(1).unwrap();
    assert!(matches!(
        done[0],
        Recovery::Recovered {
            terminated: true,
            cut: 0,
            ..
        }
    ));
    assert!(spool.read_state(Place::Ready, id).unwrap().terminated);
}

#[test]
fn garbage_is_quarantined_and_missing_state_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let junk = Uuid::now_v7();
    fs::write(spool.package_path(Place::Active, junk), b"not a package").unwrap();
    fs::write(spool.dir(Place::Active).join("stray.tmp"), b"?").unwrap();
    // A finished package whose state file was lost.
    let s = sealer();
    let id = s.recording_id();
    let f = spool.create(id, s.header_bytes()).unwrap();
    let mut end = Vec::new();
    s.finish(EndReason::IdleTimeout, 9, &mut end);
    let st = spool.finish(f, &end, 3).unwrap();
    fs::remove_file(spool.state_path(Place::Ready, id)).unwrap();

    let done = spool.recover(4).unwrap();
    assert_eq!(done.len(), 3, "{done:?}");
    assert!(
        done.iter()
            .any(|r| matches!(r, Recovery::Quarantined { name, .. } if name == "stray.tmp"))
    );
    assert!(
        done.iter().any(
            |r| matches!(r, Recovery::Quarantined { reason, .. } if reason.contains("corrupt"))
        )
    );
    assert!(done.contains(&Recovery::StateRebuilt(id)));
    let rebuilt = spool.read_state(Place::Ready, id).unwrap();
    assert_eq!(
        (rebuilt.sha256, rebuilt.size, rebuilt.terminated),
        (st.sha256, st.size, true)
    );
    let q = spool.dir(Place::Quarantine);
    assert!(q.join(format!("{junk}.erec.part.reason")).exists());
    assert!(
        fs::read_dir(spool.dir(Place::Active))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn many_recordings_end_together_with_a_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let mut items = Vec::new();
    let mut ids = Vec::new();
    for i in 0..20u8 {
        let mut s = sealer();
        let mut f = spool.create(s.recording_id(), s.header_bytes()).unwrap();
        let mut rec = Vec::new();
        s.seal(Kind::Media, &[i; 100], &mut rec).unwrap();
        f.append(&rec).unwrap();
        ids.push(s.recording_id());
        let mut end = Vec::new();
        s.finish(EndReason::Shutdown, 7, &mut end);
        items.push((f, end));
    }
    let results = spool.finish_all(items, 9);
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    let mut listed = spool.list(Place::Ready).unwrap();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    for id in ids {
        let st = spool.read_state(Place::Ready, id).unwrap();
        let pkg = fs::read(spool.package_path(Place::Ready, id)).unwrap();
        assert_eq!(st.size, pkg.len() as u64);
        assert_eq!(
            st.sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&pkg))
        );
        let (_, s) = open_bytes(&pkg, &ring(&["test"]), ReadMode::Strict).unwrap();
        assert_eq!(s.end.unwrap().reason, EndReason::Shutdown);
    }
    assert!(
        fs::read_dir(spool.dir(Place::Active))
            .unwrap()
            .next()
            .is_none()
    );
}

/// A sealed package in `ready/`.
fn ready_package(spool: &Spool) -> Uuid {
    let s = sealer();
    let id = s.recording_id();
    let f = spool.create(id, s.header_bytes()).unwrap();
    let mut end = Vec::new();
    s.finish(EndReason::Complete, 5, &mut end);
    spool.finish(f, &end, 1_000).unwrap();
    id
}

#[test]
fn spool_list_show_and_retry_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let root = dir.path().to_str().unwrap();
    // One waiting after two attempts, one refused for good, one being recorded.
    let waiting = ready_package(&spool);
    let mut st = spool.read_state(Place::Ready, waiting).unwrap();
    st.attempts = 2;
    st.last_error = Some("store unavailable: 503".into());
    spool.write_state(Place::Ready, &st).unwrap();
    let refused = ready_package(&spool);
    let mut st = spool.read_state(Place::Ready, refused).unwrap();
    st.attempts = 1;
    st.last_error = Some("store refused the package: 403 Forbidden".into());
    spool.write_state(Place::Ready, &st).unwrap();
    spool
        .move_package(refused, Place::Ready, Place::Failed)
        .unwrap();
    let recording = sealer();
    spool
        .create(recording.recording_id(), recording.header_bytes())
        .unwrap();

    let out = edgerec(&["spool", "list", "--spool", root, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |id: Uuid| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.hyphenated().to_string())
            .unwrap_or_else(|| panic!("{id} not listed: {rows}"))
            .clone()
    };
    assert_eq!(row(waiting)["place"], "ready");
    assert_eq!(row(waiting)["attempts"], 2);
    assert_eq!(row(refused)["place"], "failed");
    assert!(row(refused)["note"].as_str().unwrap().contains("403"));
    assert_eq!(row(recording.recording_id())["place"], "active");
    // The same through the appliance's config file.
    let cfg = dir.path().join("edgerec.toml");
    fs::write(
        &cfg,
        format!(
            "[recorder]\nspool_dir = \"{root}\"\n[keys]\npublic_key = \"k.pem\"\n[store]\npath = \"s\"\n"
        ),
    )
    .unwrap();
    let table = edgerec(&["spool", "list", "--config", cfg.to_str().unwrap()]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(String::from_utf8_lossy(&table.stdout).contains(&refused.to_string()));

    let out = edgerec(&["spool", "show", "--spool", root, &refused.to_string()]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["place"], "failed");
    assert!(
        shown["object_key"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{refused}.erec"))
    );

    // A package in ready/ is not retried (it is being delivered); a failed one is.
    let out = edgerec(&["spool", "retry", "--spool", root, &waiting.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let out = edgerec(&["spool", "retry", "--spool", root, "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(spool.package_path(Place::Ready, refused).exists());
    assert!(!spool.package_path(Place::Failed, refused).exists());
    let st = spool.read_state(Place::Ready, refused).unwrap();
    assert_eq!(st.attempts, 0);
    assert!(
        st.last_error.unwrap().contains("403"),
        "the last error is kept"
    );

    // Which spool must be said; a directory that is not one is refused.
    assert_eq!(edgerec(&["spool", "list"]).status.code(), Some(2));
    let empty = tempfile::tempdir().unwrap();
    let out = edgerec(&["spool", "list", "--spool", empty.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a spool"));
}
