//! AWS Signature Version 4 for the S3 store and the KMS client, by the maintained
//! `aws-sigv4` crate (never hand-written).
//!
//! Invariant: the secret key is only handed to the signer; the headers returned carry the
//! signature, never the secret.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;

/// Which service's signing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// S3: `x-amz-content-sha256` sent, paths neither normalised nor encoded twice.
    S3,
    /// KMS (JSON over POST): the standard rules.
    Kms,
}

/// The headers that sign a request (`authorization`, `x-amz-date`, …), to add to it.
#[allow(clippy::too_many_arguments)]
pub fn signature_headers(
    service: Service,
    credentials: &aws_credential_types::Credentials,
    region: &str,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body_sha256: &str,
) -> Result<Vec<(String, String)>, String> {
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    let name = match service {
        Service::S3 => {
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
            "s3"
        }
        Service::Kms => "kms",
    };
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(name)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| format!("cannot sign: {e}"))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().map(|(k, v)| (*k, v.as_str())),
        SignableBody::Precomputed(body_sha256.to_string()),
    )
    .map_err(|e| format!("cannot sign {url}: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("cannot sign {url}: {e}"))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// AWS credentials from a key id and secret.
pub fn credentials(access_key: &str, secret_key: &str) -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(access_key, secret_key, None, None, "edgerec")
}
