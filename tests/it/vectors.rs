//! The committed test vectors in `tests/vectors/`: each is read by the library and by the
//! binary and must give the outcome `MANIFEST.json` records. The vectors are made by
//! `regenerate` below (ignored: run it only to change the vectors, then commit them):
//!
//! ```text
//! cargo test --test it -- --ignored vectors::regenerate
//! ```

use std::fs;

use erec::crypto::{ChunkCipher, Dek, PackageKeys};
use erec::format::{EndInfo, EndReason, Header, Kind, Recipient, Wrap};
use erec::keys::KekPublic;
use erec::reader::ReadMode;
use erec::{Error, format};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::*;

/// The DEK of every vector (bytes 0x00 .. 0x1f), published so that another implementation
/// can check its HKDF, CTR and HMAC without RSA.
const DEK: [u8; 32] = {
    let mut d = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        d[i] = i as u8;
        i += 1;
    }
    d
};
/// A UUIDv7 (timestamp 2025-11-29) with fixed random bits.
const ID: [u8; 16] = [
    0x01, 0x9a, 0xcd, 0x8c, 0x2c, 0x00, 0x7a, 0xbc, 0x8d, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
];
const NONCE: [u8; 8] = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];
const CREATED: u64 = 1_795_910_400_000;
const ENDED: u64 = CREATED + 60_000;

/// How to build one vector.
struct Spec {
    name: &'static str,
    expect: &'static str,
    what: &'static str,
    recipients: Vec<(KekPublic, Wrap)>,
    public: &'static str,
    max_chunk: u32,
    /// Records as (index, kind, plaintext); None index = next in order.
    records: Vec<(Option<u32>, Kind, Vec<u8>)>,
    /// The end record: None = unterminated; Some((reason code, records, bytes)) with
    /// None counts = the true counts.
    end: Option<(u8, Option<u32>, Option<u64>)>,
    /// A change to the finished bytes.
    patch: fn(&mut Vec<u8>, header_len: usize),
    /// The patch tears the last record: recovery returns the records before it.
    torn: bool,
}

fn base(name: &'static str, expect: &'static str, what: &'static str) -> Spec {
    Spec {
        name,
        expect,
        what,
        recipients: vec![(public("test"), Wrap::OaepSha256)],
        public: r#"{"media":"file"}"#,
        max_chunk: 4096,
        records: vec![(None, Kind::Media, pattern(1000))],
        end: Some((0, None, None)),
        patch: |_, _| {},
        torn: false,
    }
}

fn build(s: &Spec) -> Vec<u8> {
    let dek = Dek::from_slice(&DEK).expect("32 bytes");
    let mut header = Header {
        recording_id: ID,
        nonce_prefix: NONCE,
        max_chunk: s.max_chunk,
        created_ms: CREATED,
        recipients: s
            .recipients
            .iter()
            .map(|(k, w)| Recipient {
                kek_id: k.id().0,
                wrap: *w,
                sealed_dek: k.seal(&dek, *w).expect("seal"),
            })
            .collect(),
        metadata: s.public.as_bytes().to_vec(),
        mac: [0; 32],
    };
    let keys = PackageKeys::derive(&dek, &ID);
    header.mac = keys.header_mac(&header.encode_body());
    let cipher = ChunkCipher::new(keys, NONCE, header.mac);
    let mut out = header.encode();
    let header_len = out.len();
    let mut next = 0u32;
    let mut bytes = 0u64;
    for (index, kind, pt) in &s.records {
        let i = index.unwrap_or(next);
        cipher.seal_into(i, *kind, pt, &mut out);
        next = i + 1;
        bytes += pt.len() as u64;
    }
    if let Some((reason, records, plain)) = s.end {
        let mut end = EndInfo {
            plaintext_bytes: plain.unwrap_or(bytes),
            records: records.unwrap_or(next),
            reason: EndReason::Complete,
            ended_ms: ENDED,
        }
        .encode();
        end[12] = reason;
        cipher.seal_into(next, Kind::End, &end, &mut out);
    }
    (s.patch)(&mut out, header_len);
    out
}

fn specs() -> Vec<Spec> {
    let meta = |v: Value| serde_json::to_vec(&v).expect("json");
    vec![
        Spec {
            records: vec![],
            ..base("ok_empty", "ok", "no media records: an empty file")
        },
        Spec {
            records: vec![(None, Kind::Media, vec![0x42])],
            ..base("ok_one_byte", "ok", "one media record of one byte")
        },
        Spec {
            records: vec![(None, Kind::Media, pattern(4096))],
            ..base("ok_one_full_chunk", "ok", "one record of exactly max chunk")
        },
        Spec {
            records: (0..5)
                .map(|i| (None, Kind::Media, pattern(if i < 4 { 4096 } else { 7 })))
                .collect(),
            end: Some((3, None, None)),
            ..base(
                "ok_many_chunks",
                "ok",
                "five records, end reason 3 (max duration)",
            )
        },
        Spec {
            recipients: vec![
                (public("other"), Wrap::OaepSha256),
                (public("test"), Wrap::OaepSha256),
            ],
            ..base(
                "ok_two_recipients",
                "ok",
                "test-kek is the second recipient",
            )
        },
        Spec {
            recipients: vec![(public("test"), Wrap::OaepSha1)],
            ..base("ok_wrap2", "ok", "wrap 2: RSA-OAEP-SHA1, no label")
        },
        Spec {
            public: r#"{"media":"rtp","appliance":"edge-1","continues":"019acd8c-2c00-7abc-8def-0123456789aa"}"#,
            records: vec![
                (
                    None,
                    Kind::Metadata,
                    meta(json!({"conversation_id": "c-1", "tag": "a"})),
                ),
                (None, Kind::Media, pattern(300)),
                (None, Kind::Metadata, meta(json!({"tag": "b"}))),
            ],
            end: Some((1, None, None)),
            ..base(
                "ok_rtp_metadata",
                "ok",
                "rtp media with two metadata records merged",
            )
        },
        Spec {
            records: vec![
                (None, Kind::Media, pattern(4096)),
                (None, Kind::Media, pattern(10)),
            ],
            end: None,
            ..base(
                "unterminated",
                "unterminated",
                "two records and no end record",
            )
        },
        Spec {
            records: vec![
                (None, Kind::Media, pattern(4096)),
                (None, Kind::Media, pattern(10)),
            ],
            end: None,
            patch: |b, _| b.truncate(b.len() - 20),
            torn: true,
            ..base(
                "unterminated_torn",
                "unterminated",
                "a torn last record after a crash",
            )
        },
        Spec {
            recipients: vec![(public("other"), Wrap::OaepSha256)],
            ..base("fail_wrong_key", "wrong_key", "sealed to other-kek only")
        },
        Spec {
            patch: |b, _| b[30] ^= 0x01,
            ..base("fail_header_mac", "corrupt", "a nonce prefix byte changed")
        },
        Spec {
            patch: |b, h| b[h - 1] ^= 0x80,
            ..base(
                "fail_header_mac_tag",
                "corrupt",
                "the header MAC itself changed",
            )
        },
        Spec {
            patch: |b, _| b[100] ^= 0x01,
            ..base(
                "fail_unwrap",
                "corrupt",
                "a sealed DEK byte changed: unwrap fails",
            )
        },
        Spec {
            patch: |b, _| b[60] ^= 0x01,
            ..base("fail_kek_id", "wrong_key", "the recipient's kek id changed")
        },
        Spec {
            patch: |b, h| b[h + 20] ^= 0x01,
            ..base(
                "fail_tag",
                "corrupt",
                "a ciphertext byte of record 0 changed",
            )
        },
        Spec {
            records: vec![
                (None, Kind::Media, pattern(10)),
                (Some(2), Kind::Media, pattern(10)),
            ],
            ..base(
                "fail_index_gap",
                "corrupt",
                "indexes 0, 2: a record missing",
            )
        },
        Spec {
            records: vec![
                (Some(1), Kind::Media, pattern(10)),
                (Some(0), Kind::Media, pattern(10)),
            ],
            end: Some((0, Some(2), None)),
            ..base("fail_reordered", "corrupt", "records 1 and 0 swapped")
        },
        Spec {
            records: vec![
                (None, Kind::Media, pattern(10)),
                (Some(0), Kind::Media, pattern(10)),
            ],
            ..base("fail_duplicate", "corrupt", "record 0 twice")
        },
        Spec {
            end: Some((0, Some(5), None)),
            ..base(
                "fail_end_records",
                "corrupt",
                "the end record claims 5 records",
            )
        },
        Spec {
            end: Some((0, None, Some(999))),
            ..base(
                "fail_end_bytes",
                "corrupt",
                "the end record claims 999 bytes",
            )
        },
        Spec {
            end: Some((9, None, None)),
            ..base(
                "fail_end_reason",
                "corrupt",
                "end reason 9 is not defined in v1",
            )
        },
        Spec {
            patch: |b, _| b.push(0),
            ..base("fail_trailing", "corrupt", "a byte after the end record")
        },
        Spec {
            records: vec![(None, Kind::Metadata, b"not json".to_vec())],
            ..base(
                "fail_metadata_json",
                "corrupt",
                "a metadata record that is not JSON",
            )
        },
        Spec {
            patch: |b, h| b[h + 4] = 0x03,
            ..base(
                "fail_kind",
                "corrupt",
                "record kind 0x03 (end without FINAL)",
            )
        },
        Spec {
            patch: |b, h| b[h + 5..h + 9].copy_from_slice(&4097u32.to_be_bytes()),
            ..base("fail_length", "corrupt", "record length above max chunk")
        },
        Spec {
            patch: |b, _| b[0] = 0x88,
            ..base("fail_magic", "corrupt", "not the EREC magic")
        },
        Spec {
            patch: |b, _| b.truncate(200),
            ..base(
                "fail_truncated_header",
                "corrupt",
                "the file ends inside the header",
            )
        },
        Spec {
            patch: |b, _| b[8] = 2,
            ..base("fail_version", "unsupported", "version 2")
        },
        Spec {
            patch: |b, _| b[9] = 7,
            ..base("fail_suite", "unsupported", "suite 7")
        },
    ]
}

fn media_of(spec: &Spec) -> Vec<u8> {
    let whole = spec.records.len() - usize::from(spec.torn);
    spec.records[..whole]
        .iter()
        .filter(|(_, k, _)| *k == Kind::Media)
        .flat_map(|(_, _, p)| p.clone())
        .collect()
}

#[test]
#[ignore = "rewrites tests/vectors; run by hand to change the vectors"]
fn regenerate() {
    let dir = vectors_dir();
    let mut manifest = Vec::new();
    for spec in specs() {
        let bytes = build(&spec);
        fs::write(dir.join(format!("{}.erec", spec.name)), &bytes).expect("write vector");
        let mut entry = json!({
            "file": format!("{}.erec", spec.name),
            "expect": spec.expect,
            "what": spec.what,
            "sha256": hex::encode(Sha256::digest(&bytes)),
        });
        if matches!(spec.expect, "ok" | "unterminated") {
            let media = media_of(&spec);
            entry["media_len"] = media.len().into();
            entry["media_sha256"] = hex::encode(Sha256::digest(&media)).into();
        }
        manifest.push(entry);
    }
    let doc = json!({
        "key": "test-kek.pem",
        "dek_hex": hex::encode(DEK),
        "recording_id": uuid::Uuid::from_bytes(ID).to_string(),
        "nonce_prefix_hex": hex::encode(NONCE),
        "vectors": manifest,
    });
    let text = serde_json::to_string_pretty(&doc).expect("json") + "\n";
    fs::write(dir.join("MANIFEST.json"), text).expect("write manifest");
}

fn manifest() -> Value {
    let text = fs::read_to_string(vectors_dir().join("MANIFEST.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest is JSON")
}

fn outcome(r: &Result<(Vec<u8>, erec::reader::Summary), Error>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(Error::WrongKey { .. }) => "wrong_key",
        Err(Error::Corrupt { .. }) => "corrupt",
        Err(Error::Unterminated { .. }) => "unterminated",
        Err(Error::Unsupported { .. }) => "unsupported",
        Err(_) => "other",
    }
}

#[test]
fn every_vector_gives_its_outcome_in_the_library() {
    let m = manifest();
    let ring = ring(&["test"]);
    let vectors = m["vectors"].as_array().expect("list");
    assert!(vectors.len() >= 25);
    let kinds: std::collections::BTreeSet<_> = vectors
        .iter()
        .map(|v| v["expect"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["corrupt", "ok", "unsupported", "unterminated", "wrong_key"]
    );
    for v in vectors {
        let file = v["file"].as_str().unwrap();
        let bytes = fs::read(vectors_dir().join(file)).expect(file);
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            v["sha256"],
            "{file} changed"
        );
        let expect = v["expect"].as_str().unwrap();
        let strict = open_bytes(&bytes, &ring, ReadMode::Strict);
        assert_eq!(outcome(&strict), expect, "{file}: {:?}", strict.err());
        if matches!(expect, "ok" | "unterminated") {
            let (out, s) = open_bytes(&bytes, &ring, ReadMode::Recovery).expect(file);
            assert_eq!(s.terminated(), expect == "ok", "{file}");
            assert_eq!(out.len() as u64, v["media_len"].as_u64().unwrap(), "{file}");
            assert_eq!(
                hex::encode(Sha256::digest(&out)),
                v["media_sha256"],
                "{file}"
            );
        }
        // The keyless walk agrees on terminated / unterminated where the structure is sound.
        if let Ok(w) = format::walk(&bytes, format::Tail::Strict) {
            if expect == "ok" {
                assert!(w.terminated, "{file}");
            }
            if expect == "unterminated" {
                assert!(!w.terminated, "{file}");
            }
        }
    }
}

#[test]
fn metadata_records_merge_later_wins() {
    let bytes = fs::read(vectors_dir().join("ok_rtp_metadata.erec")).unwrap();
    let (_, s) = open_bytes(&bytes, &ring(&["test"]), ReadMode::Strict).unwrap();
    assert_eq!(s.metadata["conversation_id"], "c-1");
    assert_eq!(s.metadata["tag"], "b");
    assert_eq!(s.end.unwrap().reason, EndReason::RtcpBye);
}

#[test]
fn every_vector_gives_its_exit_code_in_the_binary() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let key = key_path("test-kek.pem");
    for v in m["vectors"].as_array().unwrap() {
        let file = v["file"].as_str().unwrap();
        let expect = v["expect"].as_str().unwrap();
        let code = match expect {
            "ok" => 0,
            "wrong_key" => 3,
            "corrupt" => 4,
            "unterminated" => 5,
            "unsupported" => 6,
            _ => unreachable!(),
        };
        let out = dir.path().join(format!("{file}.out"));
        let r = edgerec(&[
            "open",
            "--key",
            key.to_str().unwrap(),
            vectors_dir().join(file).to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            r.status.code(),
            Some(code),
            "{file}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(out.exists(), code == 0, "{file}: output file left behind");
    }
    // Nothing half-written remains either.
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 7, "only the seven ok outputs: {left:?}");
}
