//! The one HTTPS client builder: the stores (`s3`, `http`), KMS and the key manager's client
//! all get their blocking reqwest client (rustls) here.
//!
//! Invariants: TLS is verified always (there is no switch to turn verification off); a
//! client certificate's private key is held in a zeroizing buffer while the identity is
//! built from it; a connection attempt gives up after the connect timeout, a request after
//! the request timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

/// TLS settings of a client.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// A CA certificate (PEM) to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) for servers that ask for one, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub client_key: Option<PathBuf>,
}

/// Which certificate authorities a client trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The system's, and `Tls::ca_file` besides (stores, KMS).
    SystemAndCa,
    /// `Tls::ca_file` alone when given (the key manager's pinned CA), else the system's.
    CaOnly,
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A certificate or key file cannot be read.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CA file that holds no PEM certificate.
    #[error("{}: not a PEM certificate{why}", path.display())]
    NotACertificate {
        /// The file.
        path: PathBuf,
        /// Why, when the parser said (": …").
        why: String,
    },
    /// A client certificate and key that do not make an identity.
    #[error("{} / {}: not a PEM certificate and key: {source}", cert.display(), key.display())]
    NotAnIdentity {
        /// The certificate chain.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
        /// Why.
        source: reqwest::Error,
    },
    /// One of the client certificate and key without the other.
    #[error("client_cert and client_key go together")]
    Unpaired,
    /// The TLS stack refused the settings.
    #[error("{0}")]
    Build(reqwest::Error),
}

/// A blocking HTTPS client: `connect` to connect, `timeout` per request, the CA and client
/// certificate of `tls`, trusting as `trust` says.
pub fn client(
    tls: &Tls,
    trust: Trust,
    connect: Duration,
    timeout: Duration,
) -> Result<reqwest::blocking::Client, ClientError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ClientError::Unreadable {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut b = reqwest::blocking::Client::builder()
        .connect_timeout(connect)
        .timeout(timeout);
    if let Some(ca) = &tls.ca_file {
        // Every certificate of the file; a file with none is an error here, not a client
        // that trusts nothing (or nothing more) and fails at its first connection.
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|e| {
            ClientError::NotACertificate {
                path: ca.clone(),
                why: format!(": {e}"),
            }
        })?;
        if certs.is_empty() {
            return Err(ClientError::NotACertificate {
                path: ca.clone(),
                why: String::new(),
            });
        }
        b = match trust {
            Trust::SystemAndCa => certs.into_iter().fold(b, |b, c| b.add_root_certificate(c)),
            Trust::CaOnly => b.tls_certs_only(certs),
        };
    }
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            // The key is secret: held zeroized while the identity is built from it.
            let mut pem = Zeroizing::new(read(key)?);
            pem.extend_from_slice(b"\n");
            pem.extend_from_slice(&read(cert)?);
            let id =
                reqwest::Identity::from_pem(&pem).map_err(|source| ClientError::NotAnIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?;
            b = b.identity(id);
        }
        (None, None) => {}
        _ => return Err(ClientError::Unpaired),
    }
    b.build().map_err(ClientError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_unpaired_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = Duration::from_secs(1);
        let missing = Tls {
            ca_file: Some(dir.path().join("none.pem")),
            ..Tls::default()
        };
        let e = client(&missing, Trust::SystemAndCa, s, s).unwrap_err();
        assert!(e.to_string().contains("none.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = client(
            &Tls {
                ca_file: Some(junk),
                ..Tls::default()
            },
            Trust::CaOnly,
            s,
            s,
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::NotACertificate { .. }), "{e}");
        let half = Tls {
            client_cert: Some(dir.path().join("c.pem")),
            ..Tls::default()
        };
        assert!(matches!(
            client(&half, Trust::SystemAndCa, s, s),
            Err(ClientError::Unpaired)
        ));
        assert!(client(&Tls::default(), Trust::SystemAndCa, s, s).is_ok());
    }
}
