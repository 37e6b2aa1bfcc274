//! Feeds arbitrary text to the parsers of text from outside: what a store answers (the
//! fields of an S3 XML answer with entity resolution, RFC 9530 digest fields, the `Initiated`
//! times of a multipart listing, `Retry-After` values, KMS error answers), key manager
//! credential files and audit logs (unkeyed and keyed). Nothing may panic,
//! every field found lies within the text it came from (unescaping only shortens), and a log
//! that verifies has as many lines as it says.
#![no_main]

use edgerec_net::answers::{
    credential, kms_error, parse_retry_after, sha256_of_digest, unescape, xml_all,
};
use erec::clock::parse_rfc3339_ms;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for tag in ["Key", "UploadId", "ETag", "Part", "Upload", "Code", "Message"] {
        for field in xml_all(&text, tag) {
            assert!(field.len() <= text.len());
            let _ = parse_rfc3339_ms(&field);
        }
    }
    assert!(unescape(&text).len() <= text.len());
    let _ = sha256_of_digest(&text);
    if let Some((kind, message)) = kms_error(data) {
        assert!(!kind.is_empty() && message.chars().count() <= 300);
    }
    if let Some((id, key)) = credential(&text) {
        assert!(!id.is_empty() && !key.is_empty());
    }
    let _ = parse_rfc3339_ms(&text);
    if let Ok(chain) = edgerec_lkm::audit::verify(&text) {
        assert_eq!(chain.next_seq, text.matches('\n').count() as u64);
    }
    // Keyed: whatever verifies under a key also verifies without it.
    let key = edgerec_lkm::audit::AuditKey::from_bytes([7u8; 32]);
    if let Ok(keyed) = edgerec_lkm::audit::verify_keyed(&text, Some(&key)) {
        assert_eq!(edgerec_lkm::audit::verify(&text).map(|c| c.next_seq), Ok(keyed.next_seq));
    }
    let _ = parse_retry_after(&text, std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000));
});
