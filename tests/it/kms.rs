//! KMS mode of the key manager against moto's KMS (`moto_server`, real Encrypt and Decrypt
//! with ciphertext blobs and encryption contexts), and a proxy that answers as KMS does
//! when the organisation withdraws access (moto does not refuse Decrypt for a disabled key).

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::lkm::Service;
use crate::proxy::Proxy;

/// A running `moto_server` on a free loopback port.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub fn start() -> Moto {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server on PATH (pip install \"moto[server]\"; .ci/run does)");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: another one
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto {
                        child,
                        endpoint: format!("http://127.0.0.1:{port}"),
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not come up");
    }

    /// One KMS call made directly (moto does not check signatures; the key manager's own
    /// calls are signed).
    pub fn call(&self, action: &str, body: serde_json::Value) -> serde_json::Value {
        let (code, answer) = self.try_call(action, body);
        assert_eq!(code, 200, "{action}: {answer}");
        answer
    }

    /// One KMS call: (status, JSON answer).
    pub fn try_call(&self, action: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}/", self.endpoint))
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", format!("TrentService.{action}"))
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=test/20261130/us-east-1/kms/aws4_request, \
                 SignedHeaders=host, Signature=00",
            )
            .body(body.to_string())
            .send()
            .unwrap();
        let code = r.status().as_u16();
        let text = r.text().unwrap_or_default();
        (
            code,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }
}

#[test]
fn kms_sealed_keys_stop_unwrapping_when_access_is_withdrawn_and_work_again_when_granted() {
    let moto = Moto::start();
    let key_id = moto.call(
        "CreateKey",
        serde_json::json!({ "Description": "edgerec lkm" }),
    )["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let gate = Proxy::start(&moto.endpoint);
    let creds = tempfile::NamedTempFile::new().unwrap();
    fs::write(
        creds.path(),
        "[default]\naws_access_key_id = AKIDEDGEREC\naws_secret_access_key = kms-test-secret\n",
    )
    .unwrap();
    let s = Service::start_with(&format!(
        "key_cache_secs = 0\nunwrap_rate_per_sec = 1000\n[lkm.kms]\nkey_id = \"{key_id}\"\n\
         region = \"us-east-1\"\nendpoint = \"{}\"\norganisation = \"acme\"\n\
         credentials_file = \"{}\"\n",
        gate.endpoint,
        creds.path().display()
    ));
    // The key made by `lkm init` is sealed by KMS, not by a master key (there is none).
    assert!(!s.dir.path().join("master.key").exists());
    let record = fs::read_dir(s.dir.path().join("store/keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let record: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    let blob = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(record["sealedPrivateKey"].as_str().unwrap())
            .unwrap()
    };
    assert!(blob.starts_with(b"EKMS1"), "a KMS blob: {record}");
    let id = record["id"].as_str().unwrap().to_string();
    // A file sealed to it opens through the key manager while KMS grants Decrypt.
    let pem = s.dir.path().join("kek.pub.pem");
    {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(record["publicKey"].as_str().unwrap())
            .unwrap();
        fs::write(
            &pem,
            erec::keys::KekPublic::from_der("k", &der).unwrap().to_pem(),
        )
        .unwrap();
    }
    let original = repo_path("samples/sample-transcript.txt");
    let sealed = s.dir.path().join("t.erec");
    assert!(
        edgerec(&[
            "seal",
            "--kek",
            pem.to_str().unwrap(),
            original.to_str().unwrap(),
            sealed.to_str().unwrap()
        ])
        .status
        .success()
    );
    let open = || {
        let mut args = vec!["open".to_string()];
        args.extend(s.reading_args());
        args.extend([sealed.display().to_string(), "-".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        edgerec(&args)
    };
    let opens = || {
        let out = open();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(out.stdout, fs::read(&original).unwrap());
    };
    opens();
    // The organisation withdraws access, three ways KMS says so: every unwrap fails with
    // "access revoked", and nothing is written.
    for kind in [
        "DisabledException",
        "AccessDeniedException",
        "KMSInvalidStateException",
    ] {
        gate.refuse(Some((
            400,
            &format!(r#"{{"__type":"{kind}","message":"arn:aws:kms:us-east-1:123456789012:key/{key_id}: withdrawn"}}"#),
        )));
        let out = open();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{kind}: {err}");
        assert!(err.contains("access revoked"), "{kind}: {err}");
        assert!(out.stdout.is_empty());
    }
    // Granted again: it works again, with no restart.
    gate.refuse(None);
    opens();
    let audit = fs::read_to_string(s.audit_path()).unwrap();
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"outcome\":\"access_revoked\"") && l.contains(&id))
            .count(),
        3,
        "{audit}"
    );
    // The audit log is keyed by a data key KMS sealed: checked with the config, it verifies.
    let said = crate::lkm::verify_audit_passes(Some(&s.config), &s.audit_path());
    assert!(said.contains("every line's MAC verified"), "{said}");
    // A backup carries that data key (sealed), so losing the whole key store loses neither
    // the keys nor the means to check the backup and the log.
    let backup = s.dir.path().join("backup.json");
    let (code, _, err) = s.admin(&["backup", backup.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&backup).unwrap()).unwrap();
    assert!(doc["integrityKey"].is_string(), "{doc}");
    fs::remove_dir_all(s.dir.path().join("store")).unwrap();
    let (code, _, err) = s.admin(&["rotate"]);
    assert_eq!(code, 1, "no integrity key: the log cannot be extended");
    assert!(err.contains("edgerec lkm restore"), "{err}");
    let (code, _, err) = s.admin(&["restore", backup.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(s.dir.path().join("store/integrity.kms").exists());
    opens();
    crate::lkm::verify_audit_passes(Some(&s.config), &s.audit_path());
    // The encryption context binds a blob to its key record: under another kek id (or
    // another organisation) KMS does not open it.
    let raw = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&blob[5..])
    };
    let decrypt = |context: serde_json::Value| {
        moto.try_call(
            "Decrypt",
            serde_json::json!({ "CiphertextBlob": raw, "EncryptionContext": context }),
        )
    };
    assert_eq!(
        decrypt(serde_json::json!({ "organisation": "acme", "kek": id })).0,
        200
    );
    let (code, why) =
        decrypt(serde_json::json!({ "organisation": "acme", "kek": "00".repeat(32) }));
    assert_eq!(code, 400, "{why}");
    assert_eq!(
        decrypt(serde_json::json!({ "organisation": "globex", "kek": id })).0,
        400
    );
}
