//! The `http` store against a receiving server written here from the contract in the README:
//! HTTPS with a CA, server and client certificates the test makes with `openssl`, a client
//! certificate it demands, a bearer token; it verifies `Content-Digest` before it answers,
//! never overwrites, and shows `Repr-Digest` on `HEAD`. A "lying" mode answers 201 without
//! keeping the object, which the store must not take for a confirmation.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use edgerec::store::http::{HttpConfig, HttpStore, Tls};
use edgerec::store::{Store, StoreError, Stored};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::common::*;
use crate::proxy::read_request;

pub const TOKEN: &str = "test-bearer-token-0123456789";

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made by `openssl`.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn make() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl is installed by the test command");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=edgerec test CA"],
        ]
        .concat());
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(
                dir.path().join(format!("{name}.ext")),
                format!("basicConstraints=CA:FALSE\n{ext}"),
            )
            .unwrap();
            let (key, csr, pem, extf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            run(&[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ]);
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The receiving server; objects by key.
pub struct Receiver {
    pub url: String,
    pub objects: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub lie: Arc<AtomicBool>,
    pub pki: Pki,
}

impl Receiver {
    pub fn start() -> Receiver {
        let pki = Pki::make();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .unwrap();
        let certs = CertificateDer::pem_file_iter(pki.path("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}/rec/{{key}}", listener.local_addr().unwrap());
        let objects: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let lie = Arc::new(AtomicBool::new(false));
        let (o, l) = (Arc::clone(&objects), Arc::clone(&lie));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (o, l, config) = (Arc::clone(&o), Arc::clone(&l), Arc::clone(&config));
                std::thread::spawn(move || {
                    let Ok(tls) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut s = rustls::StreamOwned::new(tls, conn);
                    while let Some((head, body)) = read_request(&mut s) {
                        let answer = handle(&head, &body, &o, &l);
                        if s.write_all(&answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver {
            url,
            objects,
            lie,
            pki,
        }
    }

    pub fn config(&self, token: &str) -> HttpConfig {
        HttpConfig {
            url: self.url.clone(),
            token: Some(Zeroizing::new(token.into())),
            tls: Tls {
                ca_file: Some(self.pki.path("ca.pem")),
                client_cert: Some(self.pki.path("client.pem")),
                client_key: Some(self.pki.path("client.key")),
            },
            timeout: Duration::from_secs(10),
            limit: None,
        }
    }
}

fn answer(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn handle(
    head: &[u8],
    body: &[u8],
    objects: &Mutex<HashMap<String, Vec<u8>>>,
    lie: &AtomicBool,
) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let header = |name: &str| {
        text.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return answer("401 Unauthorized", &[], b"bad or missing bearer token");
    }
    let Some(key) = target.strip_prefix("/rec/") else {
        return answer("404 Not Found", &[], b"");
    };
    let b64 =
        |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes));
    let mut objects = objects.lock().unwrap();
    match method {
        "PUT" => {
            let want = header("content-digest").and_then(|d| {
                d.strip_prefix("sha-256=:")?
                    .strip_suffix(':')
                    .map(str::to_string)
            });
            if want.as_deref() != Some(b64(body).as_str()) {
                return answer(
                    "400 Bad Request",
                    &[],
                    b"Content-Digest does not match the body",
                );
            }
            if objects.contains_key(key) {
                return answer("412 Precondition Failed", &[], b"exists");
            }
            if !lie.load(Ordering::Relaxed) {
                objects.insert(key.to_string(), body.to_vec());
            }
            answer("201 Created", &[], b"")
        }
        "HEAD" => match objects.get(key) {
            Some(o) => answer(
                "200 OK",
                &[
                    ("Content-Length", o.len().to_string()),
                    ("Repr-Digest", format!("sha-256=:{}:", b64(o))),
                ],
                b"",
            ),
            None => answer("404 Not Found", &[("Content-Length", "0".into())], b""),
        },
        _ => answer("405 Method Not Allowed", &[], b""),
    }
}

fn file(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, [u8; 32]) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    (p, Sha256::digest(bytes).into())
}

#[test]
fn http_puts_over_mutual_tls_verify_and_never_overwrite() {
    let rx = Receiver::start();
    let store = HttpStore::new(rx.config(TOKEN)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(2 << 20);
    let (p, sha) = file(tmp.path(), "a", &data);
    let key = "calls/2026/11/29/a.erec";
    assert_eq!(store.put(key, &p, &sha).unwrap(), Stored::Written);
    assert!(
        rx.objects.lock().unwrap()[key] == data,
        "the server holds the bytes"
    );
    // A retry after a lost answer: recognised, nothing written twice.
    assert_eq!(store.put(key, &p, &sha).unwrap(), Stored::AlreadyThere);
    // Another package under the key: a conflict, not overwritten.
    let (pb, sb) = file(tmp.path(), "b", b"other");
    match store.put(key, &pb, &sb) {
        Err(StoreError::Conflict { existing, .. }) => assert_eq!(existing, hex::encode(sha)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Bytes that do not match the SHA-256 the spool has: the server refuses them.
    let claimed: [u8; 32] = Sha256::digest(b"what was sealed").into();
    match store.put("calls/x.erec", &pb, &claimed) {
        Err(StoreError::Permanent(why)) => assert!(why.contains("400"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A wrong token: refused for good, with the server's reason.
    let wrong = HttpStore::new(rx.config("not-the-token")).unwrap();
    match wrong.put("calls/y.erec", &p, &sha) {
        Err(StoreError::Permanent(why)) => {
            assert!(why.contains("401 Unauthorized"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // No client certificate: the server does not even talk (a transient failure: the
    // operator fixes the config, the package waits).
    let mut cfg = rx.config(TOKEN);
    cfg.tls.client_cert = None;
    cfg.tls.client_key = None;
    let anonymous = HttpStore::new(cfg).unwrap();
    assert!(matches!(
        anonymous.put("calls/z.erec", &p, &sha),
        Err(StoreError::Transient { .. })
    ));
    // A server whose 201 is not backed by the object: not taken for stored.
    rx.lie.store(true, Ordering::Relaxed);
    match store.put("calls/lie.erec", &p, &sha) {
        Err(StoreError::Transient { why, .. }) => {
            assert!(why.contains("does not show the object"), "{why}")
        }
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert_eq!(rx.objects.lock().unwrap().len(), 1);
}
