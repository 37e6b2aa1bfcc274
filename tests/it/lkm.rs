//! The key manager's administration through the binary: init, rotate, keys, credentials,
//! backup and restore, each in the audit log; no private key in the clear on disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;

pub fn lkm(args: &[&str], config: &Path) -> (i32, String, String) {
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

pub fn keys(config: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = lkm(&["keys", "--json"], config);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

/// A key manager's `lkm.toml` in `dir` (a master key, everything beside the file); not set
/// up yet.
pub fn plain_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("lkm.toml");
    fs::write(
        &config,
        "[lkm]\nstore_dir = \"store\"\nmaster_key_file = \"master.key\"\n\
         credentials_file = \"credentials.json\"\naudit_log = \"audit.jsonl\"\n",
    )
    .unwrap();
    config
}

/// `edgerec lkm verify-audit [--config CONFIG] LOG`, checked to pass.
pub fn verify_audit_passes(config: Option<&Path>, log: &Path) -> String {
    let mut args = vec!["lkm", "verify-audit"];
    if let Some(c) = config {
        args.extend(["--config", c.to_str().unwrap()]);
    }
    args.push(log.to_str().unwrap());
    let out = edgerec(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_key_manager_is_set_up_rotated_backed_up_and_restored_by_its_administrator() {
    let dir = tempfile::tempdir().unwrap();
    let config = plain_config(dir.path());
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
    verify_audit_passes(None, &dir.path().join("audit.jsonl"));
    verify_audit_passes(Some(&config), &dir.path().join("audit.jsonl"));
    // Archived: a new log begins with a line naming the old one; both verify, and the key
    // manager carries on.
    let (code, archived, err) = lkm(&["audit-archive"], &config);
    assert_eq!(code, 0, "{err}");
    let archive = std::path::PathBuf::from(archived.trim());
    assert_eq!(fs::read_to_string(&archive).unwrap(), audit);
    let said = verify_audit_passes(Some(&config), &archive);
    assert!(said.contains("6 lines"), "{said}");
    let fresh = fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(fresh.lines().count(), 1);
    assert!(
        fresh.contains("\"action\":\"audit.archived\"")
            && fresh.contains(&format!("{}: 6 lines", archive.display())),
        "{fresh}"
    );
    assert_eq!(lkm(&["rotate"], &config).0, 0);
    let said = verify_audit_passes(Some(&config), &dir.path().join("audit.jsonl"));
    assert!(
        said.contains("2 lines") && said.contains("every line's MAC"),
        "{said}"
    );
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

/// A running `edgerec lkm serve` over TLS, with credentials of every role issued by the
/// command line: `recorder-1` (recorder), `reader-1` (decrypt), `platform-1` (platform),
/// `ops` (admin).
pub struct Service {
    child: Option<std::process::Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub pki: crate::http_store::Pki,
    pub recorder_key: String,
    pub reader_key: String,
    pub platform_key: String,
    pub admin_key: String,
    client: reqwest::blocking::Client,
    pub config: std::path::PathBuf,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn issued_key(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("key: "))
        .expect("the key is printed")
        .to_string()
}

impl Service {
    pub fn start() -> Service {
        Self::start_with("")
    }

    /// With `extra` lines in `[lkm]`.
    pub fn start_with(extra: &str) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::http_store::Pki::make();
        let config = dir.path().join("lkm.toml");
        // A [lkm.kms] table in `extra` replaces the master key.
        let master = if extra.contains("[lkm.kms]") {
            ""
        } else {
            "master_key_file = \"master.key\"\n"
        };
        fs::write(
            &config,
            format!(
                "[lkm]\nlisten = \"127.0.0.1:0\"\nstore_dir = \"store\"\n{master}\
                 credentials_file = \"credentials.json\"\naudit_log = \"log/audit.jsonl\"\n\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\n{extra}\n",
                pki.path("server.pem").display(),
                pki.path("server.key").display()
            ),
        )
        .unwrap();
        assert_eq!(lkm(&["init"], &config).0, 0);
        let issue = |args: &[&str], id: &str, file: &str| {
            let mut all = vec!["credentials", "add"];
            all.extend_from_slice(args);
            all.push(id);
            let key = issued_key(&lkm(&all, &config).1);
            fs::write(
                dir.path().join(file),
                format!("id: {id}\nkey: {key}\nalgorithm: sha256\n"),
            )
            .unwrap();
            key
        };
        let recorder_key = issue(&[], "recorder-1", "recorder.cred");
        let reader_key = issue(&["--role", "decrypt"], "reader-1", "reader.cred");
        let platform_key = issue(&["--role", "platform"], "platform-1", "platform.cred");
        let admin_key = issue(&["--admin"], "ops", "ops.cred");
        let ca = reqwest::Certificate::from_pem(&fs::read(pki.path("ca.pem")).unwrap()).unwrap();
        let client = reqwest::blocking::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let mut s = Service {
            child: None,
            port: 0,
            dir,
            pki,
            recorder_key,
            reader_key,
            platform_key,
            admin_key,
            client,
            config,
            log: Default::default(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgerec"))
            .args(["lkm", "serve", "--config", self.config.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        self.port = loop {
            let line = lines
                .next()
                .expect("the service logs where it listens")
                .unwrap();
            self.log.lock().unwrap().push(line.clone());
            if let Some(addr) = line.split("addr=").nth(1) {
                break addr
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
            }
        };
        let log = std::sync::Arc::clone(&self.log);
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                log.lock().unwrap().push(l);
            }
        });
        self.child = Some(child);
    }

    /// Kills the service (as a crash or an outage would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        let text = fs::read_to_string(&self.config).unwrap();
        let port = self.port;
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("listen = ") {
                    format!("listen = \"127.0.0.1:{port}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(&self.config, text).unwrap();
        self.spawn();
        assert_eq!(self.port, port);
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The recorder's credential file, as `lkm credentials add` printed it.
    pub fn credentials(&self) -> std::path::PathBuf {
        self.dir.path().join("recorder.cred")
    }

    /// The audit log (in `log/`, a directory of its own that a test may mount over).
    pub fn audit_path(&self) -> std::path::PathBuf {
        self.dir.path().join("log/audit.jsonl")
    }

    /// The decrypt credential's file (what `open` and `export` use).
    pub fn reader_credentials(&self) -> std::path::PathBuf {
        self.dir.path().join("reader.cred")
    }

    pub fn ca(&self) -> std::path::PathBuf {
        self.pki.path("ca.pem")
    }

    /// An administrator's command on this key manager.
    pub fn admin(&self, args: &[&str]) -> (i32, String, String) {
        lkm(args, &self.config)
    }

    /// Polls `GET /keypair` with a credential until it answers `status` (10 s at most).
    pub fn wait_status(&self, id: &str, key: &str, status: u16, why: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.call("GET", KEYPAIRS, None, id, key, true).0 != status {
            assert!(std::time::Instant::now() < deadline, "{why}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The `--lkm …` options of `open` and `export`.
    pub fn reading_args(&self) -> Vec<String> {
        vec![
            "--lkm".into(),
            self.url(),
            "--lkm-credentials".into(),
            self.reader_credentials().display().to_string(),
            "--lkm-ca".into(),
            self.ca().display().to_string(),
        ]
    }

    /// A request as a contract client makes it: Hawk-signed (with a payload hash if `hash`).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        id: &str,
        key: &str,
        hash: bool,
    ) -> (u16, serde_json::Value) {
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap())
            .unwrap_or_default();
        let auth = hawk_header(method, self.port, path, &bytes, id, key, hash);
        self.send(method, path, &bytes, Some(&auth))
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        bytes: &[u8],
        auth: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let url = format!("https://127.0.0.1:{}{path}", self.port);
        let mut req = self
            .client
            .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
            .header("PureCloud-User-Id", "user-42");
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        if !bytes.is_empty() {
            req = req
                .header("Content-Type", "application/json")
                .body(bytes.to_vec());
        }
        let r = req.send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }
}

pub fn hawk_header(
    method: &str,
    port: u16,
    path: &str,
    body: &[u8],
    id: &str,
    key: &str,
    hash: bool,
) -> String {
    let credentials = hawk::Credentials {
        id: id.to_string(),
        key: hawk::Key::new(key.as_bytes(), hawk::SHA256).unwrap(),
    };
    let payload = (hash && !body.is_empty())
        .then(|| hawk::PayloadHasher::hash("application/json", hawk::SHA256, body).unwrap());
    let h = hawk::RequestBuilder::new(method, "127.0.0.1", port, path)
        .hash(payload.as_deref())
        .request()
        .make_header(&credentials)
        .unwrap();
    format!("Hawk {h}")
}

/// The contract's endpoints the test calls most.
pub const KEYPAIRS: &str = "/key-management/v1/keypair";
pub const DECRYPT: &str = "/key-management/v1/decrypt";

#[test]
fn a_contract_client_creates_keys_and_unwraps_through_the_service() {
    use base64::Engine;
    use erec::format::Wrap;
    use erec::keys::KekPublic;
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = Service::start();
    // The platform's contract client holds a platform credential.
    let (rid, rkey) = ("platform-1", s.platform_key.clone());
    // POST keypair: {id, publicKey (base64 DER RSAPublicKey), dateCreated (a number)}.
    let (code, made) = s.call("POST", KEYPAIRS, None, rid, &rkey, true);
    assert_eq!(code, 200, "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    assert!(made["dateCreated"].is_u64(), "{made}");
    let public = KekPublic::from_der(
        "publicKey",
        &b64.decode(made["publicKey"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(public.id().to_hex(), id, "the keypair id is the kek id");
    assert_eq!(public.bits(), 3072);
    let (code, all) = s.call("GET", KEYPAIRS, None, rid, &rkey, true);
    assert_eq!(code, 200);
    assert_eq!(all.as_array().unwrap().len(), 2, "init's key and this one");
    let (code, one) = s.call(
        "GET",
        &format!("/key-management/v1/keypair/{id}"),
        None,
        rid,
        &rkey,
        true,
    );
    assert_eq!(
        (code, one["publicKey"].clone()),
        (200, made["publicKey"].clone())
    );
    let (code, cur) = s.call("GET", "/key-management/v1/current", None, rid, &rkey, true);
    assert_eq!(
        (code, cur["id"].as_str()),
        (200, Some(id.as_str())),
        "the newest key is current"
    );
    // Decrypt: a DEK wrapped RSA-OAEP-SHA1 (the contract's default), with and without a
    // payload hash; wrap 1 with decryptType "erec".
    let dek = erec::crypto::Dek::generate().unwrap();
    let want = b64.encode(dek.expose());
    for (wrap, ty, hash) in [
        (Wrap::OaepSha1, None, true),
        (Wrap::OaepSha1, None, false),
        (Wrap::OaepSha256, Some("erec"), true),
    ] {
        let sealed = b64.encode(public.seal(&dek, wrap).unwrap());
        let mut body =
            serde_json::json!({ "keypairId": id, "body": sealed, "recordingId": "rec-1" });
        if let Some(t) = ty {
            body["decryptType"] = t.into();
        }
        let (code, got) = s.call("POST", DECRYPT, Some(&body), rid, &rkey, hash);
        assert_eq!(
            (code, got["body"].as_str()),
            (200, Some(want.as_str())),
            "{ty:?} {hash}"
        );
    }
    // Every unwrap failure gets the same answer.
    let wrong_wrap = b64.encode(public.seal(&dek, Wrap::OaepSha256).unwrap());
    for bad in [wrong_wrap, b64.encode([7u8; 384]), "not base64".to_string()] {
        let body = serde_json::json!({ "keypairId": id, "body": bad });
        let (code, got) = s.call("POST", DECRYPT, Some(&body), rid, &rkey, true);
        assert_eq!(
            (code, got["message"].as_str()),
            (400, Some("decrypt failed"))
        );
    }
    let body = serde_json::json!({ "keypairId": "00".repeat(32), "body": "AAAA" });
    assert_eq!(
        s.call("POST", DECRYPT, Some(&body), rid, &rkey, true).0,
        404
    );
    // The authenticated OPTIONS the platform uses to check the endpoint.
    assert_eq!(s.call("OPTIONS", DECRYPT, None, rid, &rkey, true).0, 200);
    assert_eq!(s.send("OPTIONS", DECRYPT, b"", None).0, 401);
    // Bad, missing and replayed credentials are refused.
    assert_eq!(
        s.call("GET", KEYPAIRS, None, rid, "not-the-key", true).0,
        401
    );
    assert_eq!(s.call("GET", KEYPAIRS, None, "nobody", &rkey, true).0, 401);
    assert_eq!(s.send("GET", KEYPAIRS, b"", None).0, 401);
    let auth = hawk_header("GET", s.port, KEYPAIRS, b"", rid, &rkey, true);
    assert_eq!(s.send("GET", KEYPAIRS, b"", Some(&auth)).0, 200);
    assert_eq!(s.send("GET", KEYPAIRS, b"", Some(&auth)).0, 401, "a replay");
    // Credentials through the API: administrators only.
    let body = serde_json::json!({ "id": "platform-2", "role": "platform" });
    assert_eq!(
        s.call(
            "POST",
            "/key-management/v1/auth",
            Some(&body),
            rid,
            &rkey,
            true
        )
        .0,
        403
    );
    let (code, cred) = s.call(
        "POST",
        "/key-management/v1/auth",
        Some(&body),
        "ops",
        &s.admin_key,
        true,
    );
    assert_eq!((code, cred["algorithm"].as_str()), (200, Some("sha256")));
    assert_eq!(cred["authKey"].as_str().unwrap().len(), 43);
    assert_eq!(cred["role"], "platform");
    // Issued credentials work at once, with no restart: through the API and by the command
    // line while the service runs.
    let pkey = cred["authKey"].as_str().unwrap().to_string();
    assert_eq!(
        s.call("GET", KEYPAIRS, None, "platform-2", &pkey, true).0,
        200
    );
    let cli_key = issued_key(&s.admin(&["credentials", "add", "recorder-2"]).1);
    s.wait_status(
        "recorder-2",
        &cli_key,
        200,
        "the new credential is not taken",
    );
    // Revoked by the command line: refused within seconds, no restart.
    assert_eq!(s.admin(&["credentials", "remove", "recorder-2"]).0, 0);
    s.wait_status(
        "recorder-2",
        &cli_key,
        401,
        "the revoked credential still works",
    );
    // The audit log has every request, chained, with who asked.
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"action\":\"decrypt\"")
        && l.contains("\"user\":\"user-42\"")
        && l.contains("\"recording\":\"rec-1\"")
        && l.contains("\"outcome\":\"ok\"")));
    assert!(audit.contains("denied: replayed nonce"));
    verify_audit_passes(Some(&s.config), &s.audit_path());
    let _ = &s.pki;
}

/// The public key of keypair `id` as a PEM file in the service's directory.
fn public_pem(s: &Service, id: &str) -> std::path::PathBuf {
    use base64::Engine;
    let (code, kp) = s.call(
        "GET",
        &format!("{KEYPAIRS}/{id}"),
        None,
        "recorder-1",
        &s.recorder_key,
        true,
    );
    assert_eq!(code, 200, "{kp}");
    let der = base64::engine::general_purpose::STANDARD
        .decode(kp["publicKey"].as_str().unwrap())
        .unwrap();
    let key = erec::keys::KekPublic::from_der("publicKey", &der).unwrap();
    let path = s.dir.path().join(format!("{id}.pub.pem"));
    fs::write(&path, key.to_pem()).unwrap();
    path
}

/// The metrics the service serves on its `metrics_listen`.
pub fn service_metrics(s: &Service) -> String {
    let addr = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let found = s.log.lock().unwrap().iter().rev().find_map(|l| {
                l.split("bound=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_string)
            });
            if let Some(a) = found {
                break a;
            }
            assert!(std::time::Instant::now() < deadline, "no metrics listener");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    reqwest::blocking::get(format!("http://{addr}/metrics"))
        .unwrap()
        .text()
        .unwrap()
}

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn recordings_open_through_the_service_until_their_key_is_destroyed_after_a_census() {
    // Ten unwraps per credential for the whole test (no refill worth waiting for).
    let s = Service::start_with(
        "unwrap_rate_per_sec = 0.001\nunwrap_burst = 10\nmetrics_listen = \"127.0.0.1:0\"",
    );
    let a = keys(&s.config)[0]["id"].as_str().unwrap().to_string();
    let (code, b, _) = s.admin(&["rotate"]);
    assert_eq!(code, 0);
    let b = b.trim().to_string();
    // One recording sealed to each key, in a dir store.
    let day = s.dir.path().join("recordings/calls/2026/11/29");
    fs::create_dir_all(&day).unwrap();
    let original = repo_path("samples/sample-transcript.txt");
    for id in [&a, &b] {
        let pem = public_pem(&s, id);
        let out = edgerec(&[
            "seal",
            "--kek",
            pem.to_str().unwrap(),
            original.to_str().unwrap(),
            day.join(format!("{id}.erec")).to_str().unwrap(),
        ]);
        assert!(out.status.success());
    }
    let open = |id: &str| {
        let mut args = vec!["open".to_string()];
        args.extend(s.reading_args());
        args.push(day.join(format!("{id}.erec")).display().to_string());
        args.push("-".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        edgerec(&args)
    };
    for id in [&a, &b] {
        let out = open(id);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.stdout,
            fs::read(&original).unwrap(),
            "through the key manager"
        );
    }
    // The limit is per credential: another one with decrypt rights gets its ten, then 429.
    let junk = serde_json::json!({ "keypairId": a, "body": "AAAA" });
    let codes: Vec<u16> = (0..12)
        .map(|_| {
            s.call(
                "POST",
                DECRYPT,
                Some(&junk),
                "platform-1",
                &s.platform_key,
                true,
            )
            .0
        })
        .collect();
    assert_eq!(&codes[..10], [400; 10], "{codes:?}");
    assert_eq!(&codes[10..], [429, 429], "{codes:?}");
    // The store census, then the destruction.
    let app = s.dir.path().join("edgerec.toml");
    fs::write(
        &app,
        format!(
            "[recorder]\nspool_dir = \"spool\"\n[keys]\npublic_key = \"{}\"\n[store]\npath = \"recordings\"\n",
            public_pem(&s, &b).display()
        ),
    )
    .unwrap();
    let list = s.dir.path().join("sealed-to-a-alone.txt");
    let destroy = |extra: &[&str]| {
        let mut args = vec!["destroy", "--store-config", app.to_str().unwrap(), &a];
        args.extend_from_slice(extra);
        s.admin(&args)
    };
    let (code, out, err) = destroy(&["--list", list.to_str().unwrap()]);
    assert_eq!(code, 1, "refused: {err}");
    assert!(
        out.contains("1 of 2 recordings in the store are sealed to")
            && out.contains("1 of them to this key alone")
            && out.contains("unreadable for ever"),
        "{out} {err}"
    );
    assert!(err.contains("not destroyed"), "{err}");
    // The list names the one recording sealed to it alone.
    let inspect = edgerec(&[
        "inspect",
        "--json",
        day.join(format!("{a}.erec")).to_str().unwrap(),
    ]);
    let rec: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        fs::read_to_string(&list).unwrap(),
        format!("{}\n", rec["recording_id"].as_str().unwrap())
    );
    // Confirmed, but recordings sealed to it alone remain: still refused without --force.
    let (code, _, err) = destroy(&["--yes"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("sealed to this key alone") && err.contains("--force"),
        "{err}"
    );
    assert!(open(&a).status.success(), "still there");
    let (code, _, err) = destroy(&["--yes", "--force"]);
    assert_eq!(code, 0, "{err}");
    // Its recording can never be opened again, and says why; the other still opens.
    let out = open(&a);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key destroyed"), "{err}");
    assert!(open(&b).status.success());
    // Unwraps by outcome, and keys by state, in the service's metrics.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = service_metrics(&s);
        if metric(&text, "edgerec_lkm_keys{state=\"destroyed\"}") == 1.0 {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(metric(&text, "edgerec_lkm_keys{state=\"active\"}"), 1.0);
    assert_eq!(
        metric(&text, "edgerec_lkm_unwraps_total{outcome=\"ok\"}"),
        4.0
    );
    assert_eq!(
        metric(&text, "edgerec_lkm_unwraps_total{outcome=\"rate_limited\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "edgerec_lkm_unwraps_total{outcome=\"destroyed\"}"),
        1.0
    );
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert!(audit.contains("\"action\":\"destroy\""));
    assert!(audit.contains("refused: recordings remain"));
    assert!(audit.contains("started (--force)"));
    // Backup, lose the key store, restore: the service answers as before.
    let backup = s.dir.path().join("backup.json");
    assert_eq!(s.admin(&["backup", backup.to_str().unwrap()]).0, 0);
    fs::remove_dir_all(s.dir.path().join("store")).unwrap();
    let out = open(&b);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the key manager holds no key: {err}"
    );
    let (code, _, err) = s.admin(&["restore", backup.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let out = open(&b);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, fs::read(&original).unwrap());
}

/// Copies a directory tree with the modes a fresh clone has (0644 files, 0755 directories).
pub fn copy_as_cloned(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_as_cloned(&p, &dest);
        } else {
            fs::copy(&p, &dest).unwrap();
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

#[test]
fn the_sample_key_manager_runs_as_it_stands_and_opens_the_demo_keys_recordings() {
    // samples/ as a fresh clone has it, on free ports instead of 8443 and 9474.
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    copy_as_cloned(&repo_path("samples"), &samples);
    let config = samples.join("lkm.toml");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9474", "127.0.0.1:0");
    fs::write(&config, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgerec"))
        .args(["lkm", "serve", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port = {
        use std::io::BufRead;
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok);
        let mut seen = String::new();
        let port = loop {
            let Some(line) = lines.next() else {
                panic!("the sample did not start:\n{seen}")
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(addr) = line.split(" addr=").nth(1) {
                break addr
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .to_string();
            }
        };
        assert!(seen.contains("DEMO key store"), "{seen}");
        std::thread::spawn(move || lines.for_each(drop));
        port
    };
    // A file sealed to the demo key (what samples/edgerec.toml records with) opens through
    // the demo key manager with the demo credential, over TLS checked against the demo CA.
    let sealed = dir.path().join("t.erec");
    let original = samples.join("sample-transcript.txt");
    let out = edgerec(&[
        "seal",
        "--kek",
        samples.join("demo-kek.pub.pem").to_str().unwrap(),
        original.to_str().unwrap(),
        sealed.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let open_as = |cred: &str| {
        edgerec(&[
            "open",
            "--lkm",
            &format!("https://localhost:{port}"),
            "--lkm-credentials",
            samples.join(cred).to_str().unwrap(),
            "--lkm-ca",
            samples.join("lkm/demo-ca.pem").to_str().unwrap(),
            "--lkm-user",
            "auditor-7",
            sealed.to_str().unwrap(),
            "-",
        ])
    };
    let out = open_as("lkm/demo-decrypt.cred");
    // The recorder's credential (what samples/edgerec.toml holds) cannot decrypt.
    let refused = open_as("lkm/demo-recorder.cred");
    // A denial's audit line is written after the answer (denials never wait on the disk,
    // so a flood of them cannot stall the service): wait for it before stopping.
    let audit_file = dir.path().join("var/lkm/audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !fs::read_to_string(&audit_file)
        .unwrap_or_default()
        .contains("denied: role recorder")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, fs::read(&original).unwrap());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("403") && err.contains("role (recorder)"),
        "{err}"
    );
    assert!(refused.stdout.is_empty());
    let audit = fs::read_to_string(dir.path().join("var/lkm/audit.jsonl")).unwrap();
    let inspect = edgerec(&["inspect", "--json", sealed.to_str().unwrap()]);
    let rec: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"who\":\"demo-decrypt\"")
            && l.contains("\"user\":\"auditor-7\"")
            && l.contains(&format!(
                "\"recording\":\"{}\"",
                rec["recording_id"].as_str().unwrap()
            ))
            && l.contains("\"outcome\":\"ok\"")),
        "who opened which recording: {audit}"
    );
    assert!(
        audit.contains("\"who\":\"demo-recorder\"") && audit.contains("denied: role recorder"),
        "{audit}"
    );
    // Without demo = true, the public demo material is refused at start: the TLS key's
    // mode, then the credentials, then the master key.
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("demo = true", "demo = false");
    fs::write(&config, text).unwrap();
    let start = || {
        let out = edgerec(&["lkm", "serve", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = start();
    assert!(
        err.contains("lkm.tls_key") && err.contains("chmod 600"),
        "{err}"
    );
    for f in [
        "lkm/tls.DEMO-ONLY.key",
        "lkm/credentials.json",
        "lkm/master.DEMO-ONLY.key",
    ] {
        fs::set_permissions(samples.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    let err = start();
    assert!(err.contains("public DEMO key"), "{err}");
    fs::remove_file(samples.join("lkm/credentials.json")).unwrap();
    let err = start();
    assert!(err.contains("public DEMO master key"), "{err}");
}

#[test]
fn the_service_rotates_on_its_schedule() {
    let s = Service::start_with("rotation = \"daily\"");
    let first = keys(&s.config);
    assert_eq!(first.len(), 1);
    let id = first[0]["id"].as_str().unwrap().to_string();
    // The current key was made two days ago: the next scheduler round makes a new one.
    let record = s.dir.path().join(format!("store/keys/{id}.json"));
    let mut r: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    let two_days_ago = r["dateCreated"].as_u64().unwrap() - 2 * 86_400_000;
    r["dateCreated"] = two_days_ago.into();
    fs::write(&record, serde_json::to_vec(&r).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let now = loop {
        let now = keys(&s.config);
        if now.len() == 2 {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled rotation"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let current: Vec<_> = now.iter().filter(|k| k["current"] == true).collect();
    assert_ne!(current[0]["id"], id.as_str(), "the new key is current");
    assert!(
        now.iter().all(|k| k["state"] == "active"),
        "the old one still decrypts"
    );
    // Once: the new key is a day younger than the schedule.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(keys(&s.config).len(), 2);
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"action\":\"rotate.scheduled\"")
                && l.contains("\"outcome\":\"ok\""))
            .count(),
        1,
        "{audit}"
    );
    // Its line was on disk before the key existed.
    assert!(audit.contains("\"outcome\":\"started\""), "{audit}");
}
