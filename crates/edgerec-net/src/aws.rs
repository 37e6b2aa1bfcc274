//! AWS for the S3 store and the key manager's KMS client: Signature Version 4 by the
//! maintained `aws-sigv4` crate (never hand-written), and the one way both find their
//! credentials ([`resolve_credentials`]).
//!
//! Invariants: the secret key is only handed to the signer; the headers returned carry the
//! signature, never the secret. Secrets are held in zeroizing buffers, the credentials
//! file's text included.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use zeroize::Zeroizing;

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

/// Why a request could not be signed (nothing was sent).
#[derive(Debug, thiserror::Error)]
#[error("cannot sign {url}: {source}")]
pub struct SigningError {
    /// The request's URL.
    pub url: String,
    /// What the signer said.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

// The request's parts as the signer takes them, one argument each: a struct for one call
// site would only rename them.
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
) -> Result<Vec<(String, String)>, SigningError> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| SigningError {
        url: url.to_string(),
        source: e,
    };
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
        .map_err(|e| failed(e.into()))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().map(|(k, v)| (*k, v.as_str())),
        SignableBody::Precomputed(body_sha256.to_string()),
    )
    .map_err(|e| failed(e.into()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| failed(e.into()))?
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

/// Reads `aws_access_key_id` and `aws_secret_access_key` of `profile` from a file in the
/// AWS shared-credentials format (`[profile]` sections of `key = value` lines).
pub fn credentials_from_file(text: &str, profile: &str) -> Option<(String, Zeroizing<String>)> {
    let mut section = None;
    let (mut id, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        if section.as_deref() != Some(profile) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(Zeroizing::new(v.trim().to_string())),
                _ => {}
            }
        }
    }
    Some((id?, secret?))
}

/// A key id and its secret.
pub struct AwsCredentials {
    /// `aws_access_key_id`.
    pub access_key: String,
    /// `aws_secret_access_key`.
    pub secret_key: Zeroizing<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// Why no credentials were found; the caller names the config key.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The credentials file cannot be read.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has no key id and secret in the profile.
    #[error("{}: no aws_access_key_id and aws_secret_access_key in profile [{profile}]", path.display())]
    NotInProfile {
        /// The file.
        path: PathBuf,
        /// The profile looked for.
        profile: String,
    },
    /// No file named, and the environment has no (non-empty) credentials.
    #[error(
        "a shared-credentials file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
    )]
    Missing,
}

/// Credentials from a shared-credentials file's `profile` (default `default`), or, without
/// a file, from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (both non-empty), of the
/// process.
pub fn resolve_credentials(
    file: Option<&Path>,
    profile: Option<&str>,
) -> Result<AwsCredentials, CredentialsError> {
    resolve_credentials_with(
        file,
        profile,
        |name| std::env::var(name).ok(),
        |path| std::fs::read_to_string(path).map(Zeroizing::new),
    )
}

/// [`resolve_credentials`] with the environment and the file reading given: `var` looks up
/// a variable, `read` a file's text.
pub fn resolve_credentials_with(
    file: Option<&Path>,
    profile: Option<&str>,
    var: impl Fn(&str) -> Option<String>,
    read: impl Fn(&Path) -> std::io::Result<Zeroizing<String>>,
) -> Result<AwsCredentials, CredentialsError> {
    let Some(path) = file else {
        return match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key), Some(secret)) if !access_key.is_empty() && !secret.is_empty() => {
                Ok(AwsCredentials {
                    access_key,
                    secret_key: Zeroizing::new(secret),
                })
            }
            _ => Err(CredentialsError::Missing),
        };
    };
    let text = read(path).map_err(|source| CredentialsError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let profile = profile.unwrap_or("default");
    let (access_key, secret_key) =
        credentials_from_file(&text, profile).ok_or_else(|| CredentialsError::NotInProfile {
            path: path.to_path_buf(),
            profile: profile.to_string(),
        })?;
    Ok(AwsCredentials {
        access_key,
        secret_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_credentials_files_are_read_by_profile() {
        let text = "\
# comment
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = s3cr3t

[recorder]
aws_access_key_id=AKIDREC
aws_secret_access_key=other
";
        let (id, secret) = credentials_from_file(text, "default").unwrap();
        assert_eq!((id.as_str(), secret.as_str()), ("AKIDDEFAULT", "s3cr3t"));
        let (id, _) = credentials_from_file(text, "recorder").unwrap();
        assert_eq!(id, "AKIDREC");
        assert!(credentials_from_file(text, "missing").is_none());
        assert!(credentials_from_file("[default]\naws_access_key_id = x\n", "default").is_none());
    }

    #[test]
    fn a_named_file_is_read_by_profile_and_its_problems_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "[recorder]\naws_access_key_id = AKID\naws_secret_access_key = s3cr3t-value\n",
        )
        .unwrap();
        let c = resolve_credentials(Some(&f), Some("recorder")).unwrap();
        assert_eq!(
            (c.access_key.as_str(), c.secret_key.as_str()),
            ("AKID", "s3cr3t-value")
        );
        assert!(
            !format!("{c:?}").contains("s3cr3t"),
            "the secret is never printed"
        );
        let e = resolve_credentials(Some(&f), None).unwrap_err().to_string();
        assert!(e.contains("profile [default]"), "{e}");
        let e = resolve_credentials(Some(&dir.path().join("none")), None).unwrap_err();
        assert!(matches!(e, CredentialsError::Unreadable { .. }));
    }
}
