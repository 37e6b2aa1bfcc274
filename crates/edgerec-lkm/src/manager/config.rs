//! `lkm.toml`: its keys, their defaults and bounds, validated into an [`LkmConfig`] whose
//! paths are resolved.
//!
//! Invariants: every error names the file, and a bad value its line (or says it is the
//! default), the way the appliance's `edgerec.toml` does ([`edgerec_net::config_text`]);
//! relative paths resolve against the file's own directory; KMS credentials are read here,
//! once, and never written anywhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgerec_net::config_text::ConfigText;
use serde::Deserialize;
use toml::Spanned;

/// Why `lkm.toml` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML, or a value in it, is wrong: `config FILE, line N: key = value: problem`.
    #[error("{0}")]
    Invalid(String),
    /// `[lkm.kms]` found no credentials.
    #[error(
        "config {}: lkm.kms needs credentials: credentials_file, or AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY in the environment",
        file.display()
    )]
    KmsCredentialsMissing {
        /// The file.
        file: PathBuf,
    },
    /// `[lkm.kms]`'s credentials file could not be used.
    #[error("config {}: lkm.kms.credentials_file {source}", file.display())]
    KmsCredentials {
        /// The file.
        file: PathBuf,
        /// Why.
        source: edgerec_net::aws::CredentialsError,
    },
}

/// Whether a scheduled rotation is due: the current key (made at `current_ms`, or none) is
/// older than the schedule's period at `now_ms`.
pub fn rotation_due(rotation: Rotation, current_ms: Option<u64>, now_ms: u64) -> bool {
    let Some(period) = rotation.period_ms() else {
        return false;
    };
    match current_ms {
        None => true,
        Some(made) => now_ms.saturating_sub(made) >= period,
    }
}

/// How often the key manager rotates on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// Only on `edgerec lkm rotate`.
    Never,
    /// Every day.
    Daily,
    /// Every week.
    Weekly,
    /// Every 30 days (the default: the platform recommends short intervals).
    Monthly,
    /// Every 365 days.
    Yearly,
}

impl Rotation {
    /// The period, in milliseconds; `None` for never.
    pub fn period_ms(self) -> Option<u64> {
        const DAY: u64 = 86_400_000;
        match self {
            Rotation::Never => None,
            Rotation::Daily => Some(DAY),
            Rotation::Weekly => Some(7 * DAY),
            Rotation::Monthly => Some(30 * DAY),
            Rotation::Yearly => Some(365 * DAY),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    lkm: RawLkm,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLkm {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    store_dir: PathBuf,
    master_key_file: Option<Spanned<PathBuf>>,
    kms: Option<RawKms>,
    credentials_file: PathBuf,
    audit_log: PathBuf,
    tls_cert: Option<Spanned<PathBuf>>,
    tls_key: Option<Spanned<PathBuf>>,
    #[serde(default = "default_rotation")]
    rotation: Rotation,
    #[serde(default = "default_skew")]
    skew_secs: Spanned<u64>,
    #[serde(default)]
    require_payload_hash: bool,
    #[serde(default = "default_key_cache")]
    key_cache_secs: Spanned<u64>,
    #[serde(default = "default_rate")]
    unwrap_rate_per_sec: Spanned<f64>,
    #[serde(default = "default_burst")]
    unwrap_burst: Spanned<f64>,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    demo: bool,
    #[serde(default = "default_keypair_rate")]
    keypair_rate_per_min: Spanned<f64>,
    #[serde(default = "default_read_rate")]
    read_rate_per_sec: Spanned<f64>,
    #[serde(default = "default_denial_lines")]
    audit_denials_per_sec: Spanned<f64>,
    header_read_timeout_secs: Option<Spanned<u64>>,
    idle_timeout_secs: Option<Spanned<u64>>,
    max_connections: Option<Spanned<usize>>,
    max_connections_per_address: Option<Spanned<usize>>,
}

/// `[lkm.kms]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKms {
    key_id: String,
    region: String,
    endpoint: Option<String>,
    organisation: String,
    credentials_file: Option<PathBuf>,
    profile: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "default_kms_timeout")]
    timeout_secs: u64,
}

fn default_kms_timeout() -> u64 {
    10
}

fn default_key_cache() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}

fn default_rate() -> Spanned<f64> {
    Spanned::new(0..0, 100.0)
}

fn default_burst() -> Spanned<f64> {
    Spanned::new(0..0, 200.0)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

fn default_rotation() -> Rotation {
    Rotation::Monthly
}

/// Five key pairs a minute and credential: the platform makes one per rotation; a client
/// making more is broken or hostile (each pair costs a key generation and becomes current).
fn default_keypair_rate() -> Spanned<f64> {
    Spanned::new(0..0, 5.0)
}

/// Ten reads of public keys a second and credential (bursts of fifty): a recorder asks once
/// a minute; each read is an audit line.
fn default_read_rate() -> Spanned<f64> {
    Spanned::new(0..0, 10.0)
}

/// Ten lines a second about refused requests (bursts of fifty): enough to see who knocks,
/// too few to fill a disk; beyond, one line a second with the count.
fn default_denial_lines() -> Spanned<f64> {
    Spanned::new(0..0, 10.0)
}

fn default_skew() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}

/// What seals the key store's private keys at rest.
#[derive(Debug, Clone)]
pub enum Protection {
    /// A master key file (0600, 64 hex digits).
    MasterKey(PathBuf),
    /// AWS KMS (`[lkm.kms]`).
    Kms(crate::at_rest::kms::KmsConfig),
}

/// A validated `lkm.toml`, paths resolved.
#[derive(Debug, Clone)]
pub struct LkmConfig {
    /// Where the service listens (`lkm serve`). Loopback by default.
    pub listen: SocketAddr,
    /// The key store's directory (0700).
    pub store_dir: PathBuf,
    /// What seals the private keys at rest.
    pub protection: Protection,
    /// The Hawk credentials (0600).
    pub credentials_file: PathBuf,
    /// The audit log (JSON lines, hash-chained, 0600).
    pub audit_log: PathBuf,
    /// The TLS certificate chain and key (PEM) of the service.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Scheduled rotation.
    pub rotation: Rotation,
    /// Allowed clock skew of Hawk-signed requests, seconds.
    pub skew_secs: u64,
    /// Whether a request with a body must carry its Hawk payload hash (a hash sent is always
    /// checked). Off by default: contract clients need not send one.
    pub require_payload_hash: bool,
    /// How long an opened private key stays in memory; a KMS withdrawing access is obeyed
    /// within this time (0: every unwrap asks the protector).
    pub key_cache_secs: u64,
    /// Unwraps per second and credential, and the burst above it.
    pub unwrap_limit: edgerec_net::rate_limit::Limit,
    /// Plain-HTTP `/metrics` listener (loopback), if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The committed demo key store: its master key is public, so its file mode is not
    /// checked, and every start says so.
    pub demo: bool,
    /// Key pairs made through the API, per credential (`keypair_rate_per_min`).
    pub keypair_limit: edgerec_net::rate_limit::Limit,
    /// Reads of public keys, per credential (`read_rate_per_sec`, bursts of five times).
    pub read_limit: edgerec_net::rate_limit::Limit,
    /// Audit lines about refused requests (`audit_denials_per_sec`, bursts of five times).
    pub audit_denials: edgerec_net::rate_limit::Limit,
    /// What clients may hold of the service (`header_read_timeout_secs`, …).
    pub server: edgerec_net::https::Limits,
}

impl LkmConfig {
    /// Reads and validates `lkm.toml`.
    pub fn load(file: &Path) -> Result<LkmConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Validates `lkm.toml`'s text as if read from `file` (paths resolve against its
    /// directory); every error names the file, and a bad value its line.
    pub fn parse(file: &Path, text: &str) -> Result<LkmConfig, ConfigError> {
        let cx = ConfigText { file, text };
        let raw: Raw = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid(cx.parse_error(e.span(), e.message())))?;
        let bad =
            |key: &str, v: &dyn std::fmt::Display, span: std::ops::Range<usize>, problem: &str| {
                ConfigError::Invalid(cx.value_error(key, v, span, problem))
            };
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let l = raw.lkm;
        let tls = match (l.tls_cert, l.tls_key) {
            (Some(c), Some(k)) => Some((resolve(c.get_ref()), resolve(k.get_ref()))),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                return Err(bad(
                    "lkm.tls_cert / lkm.tls_key",
                    &one.get_ref().display(),
                    one.span(),
                    "the certificate and its key go together",
                ));
            }
        };
        if !(1..=600).contains(l.skew_secs.get_ref()) {
            return Err(bad(
                "lkm.skew_secs",
                l.skew_secs.get_ref(),
                l.skew_secs.span(),
                "must be 1 to 600",
            ));
        }
        let protection = match (&l.master_key_file, l.kms) {
            (Some(m), None) => Protection::MasterKey(resolve(m.get_ref())),
            (None, Some(k)) => {
                let credentials_file = k.credentials_file.as_ref().map(|f| resolve(f));
                let found = edgerec_net::aws::resolve_credentials(
                    credentials_file.as_deref(),
                    k.profile.as_deref(),
                );
                let (access_key, secret_key) = match found {
                    Ok(c) => (c.access_key, c.secret_key),
                    Err(edgerec_net::aws::CredentialsError::Missing) => {
                        return Err(ConfigError::KmsCredentialsMissing {
                            file: file.to_path_buf(),
                        });
                    }
                    Err(source) => {
                        return Err(ConfigError::KmsCredentials {
                            file: file.to_path_buf(),
                            source,
                        });
                    }
                };
                if k.organisation.is_empty() || k.key_id.is_empty() || k.region.is_empty() {
                    return Err(ConfigError::Invalid(cx.error(
                        "lkm.kms.key_id, region and organisation must not be empty",
                    )));
                }
                Protection::Kms(crate::at_rest::kms::KmsConfig {
                    endpoint: k
                        .endpoint
                        .unwrap_or_else(|| format!("https://kms.{}.amazonaws.com", k.region)),
                    region: k.region,
                    key_id: k.key_id,
                    organisation: k.organisation,
                    access_key,
                    secret_key,
                    ca_file: k.ca_file.map(|p| resolve(&p)),
                    timeout: std::time::Duration::from_secs(k.timeout_secs.clamp(1, 300)),
                    integrity_file: resolve(&l.store_dir).join("integrity.kms"),
                })
            }
            (Some(m), Some(_)) => {
                return Err(bad(
                    "lkm.master_key_file",
                    &m.get_ref().display(),
                    m.span(),
                    "excludes [lkm.kms]: the private keys are sealed by one of them",
                ));
            }
            (None, None) => {
                return Err(ConfigError::Invalid(cx.error(
                    "lkm.master_key_file (or [lkm.kms]) is missing: what seals the private keys \
                     at rest",
                )));
            }
        };
        if *l.key_cache_secs.get_ref() > 86_400 {
            return Err(bad(
                "lkm.key_cache_secs",
                l.key_cache_secs.get_ref(),
                l.key_cache_secs.span(),
                "at most 86400",
            ));
        }
        for (key, v, least) in [
            ("lkm.unwrap_rate_per_sec", &l.unwrap_rate_per_sec, None),
            ("lkm.unwrap_burst", &l.unwrap_burst, Some(1.0)),
            ("lkm.keypair_rate_per_min", &l.keypair_rate_per_min, None),
            ("lkm.read_rate_per_sec", &l.read_rate_per_sec, None),
            ("lkm.audit_denials_per_sec", &l.audit_denials_per_sec, None),
        ] {
            let x = *v.get_ref();
            let fits = x.is_finite() && least.map_or(x > 0.0, |m| x >= m);
            if !fits {
                let problem = match least {
                    Some(_) => "must be at least 1",
                    None => "must be above 0",
                };
                return Err(bad(key, &x, v.span(), problem));
            }
        }
        let at = |v: &Option<Spanned<u64>>| v.as_ref().map(|v| (*v.get_ref(), v.span()));
        let at_n = |v: &Option<Spanned<usize>>| v.as_ref().map(|v| (*v.get_ref(), v.span()));
        let server = edgerec_net::https::Limits::from_config_at(
            at(&l.header_read_timeout_secs),
            at(&l.idle_timeout_secs),
            at_n(&l.max_connections),
            at_n(&l.max_connections_per_address),
        )
        .map_err(|(key, why, span)| {
            ConfigError::Invalid(cx.parse_error(span, &format!("lkm.{key} = {why}")))
        })?;
        Ok(LkmConfig {
            keypair_limit: edgerec_net::rate_limit::Limit {
                rate: l.keypair_rate_per_min.get_ref() / 60.0,
                burst: l.keypair_rate_per_min.get_ref().max(1.0),
            },
            read_limit: edgerec_net::rate_limit::Limit {
                rate: *l.read_rate_per_sec.get_ref(),
                burst: (l.read_rate_per_sec.get_ref() * 5.0).max(1.0),
            },
            audit_denials: edgerec_net::rate_limit::Limit {
                rate: *l.audit_denials_per_sec.get_ref(),
                burst: (l.audit_denials_per_sec.get_ref() * 5.0).max(1.0),
            },
            server,
            key_cache_secs: *l.key_cache_secs.get_ref(),
            unwrap_limit: edgerec_net::rate_limit::Limit {
                rate: *l.unwrap_rate_per_sec.get_ref(),
                burst: *l.unwrap_burst.get_ref(),
            },
            metrics_listen: l.metrics_listen,
            demo: l.demo,
            listen: l.listen,
            store_dir: resolve(&l.store_dir),
            protection,
            credentials_file: resolve(&l.credentials_file),
            audit_log: resolve(&l.audit_log),
            tls,
            rotation: l.rotation,
            skew_secs: *l.skew_secs.get_ref(),
            require_payload_hash: l.require_payload_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_resolve_paths_and_name_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("lkm.toml");
        std::fs::write(
            &f,
            "[lkm]\nstore_dir = \"store\"\nmaster_key_file = \"/etc/m.key\"\n\
             credentials_file = \"c.json\"\naudit_log = \"audit.jsonl\"\nrotation = \"weekly\"\n",
        )
        .unwrap();
        let c = LkmConfig::load(&f).unwrap();
        assert_eq!(c.store_dir, dir.path().join("store"));
        assert!(matches!(&c.protection, Protection::MasterKey(m) if m == Path::new("/etc/m.key")));
        assert_eq!(c.rotation, Rotation::Weekly);
        assert_eq!(c.listen, default_listen());
        // Without a rotation key: monthly, as the platform recommends short intervals.
        std::fs::write(
            &f,
            "[lkm]\nstore_dir = \"s\"\nmaster_key_file = \"m\"\ncredentials_file = \"c\"\n\
             audit_log = \"a\"\n",
        )
        .unwrap();
        let c = LkmConfig::load(&f).unwrap();
        assert_eq!(c.rotation, Rotation::Monthly);
        assert_eq!(c.server, edgerec_net::https::Limits::default());
        std::fs::write(&f, "[lkm]\nstore_dir = \"s\"\nbogus = 1\n").unwrap();
        let e = LkmConfig::load(&f).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        std::fs::write(
            &f,
            "[lkm]\nstore_dir = \"s\"\nmaster_key_file = \"m\"\ncredentials_file = \"c\"\n\
             audit_log = \"a\"\nrotation = \"hourly\"\n",
        )
        .unwrap();
        assert!(
            LkmConfig::load(&f)
                .unwrap_err()
                .to_string()
                .contains("hourly")
        );
    }

    #[test]
    fn every_bad_value_is_named_with_its_line() {
        let base = "[lkm]\nstore_dir = \"s\"\nmaster_key_file = \"m\"\ncredentials_file = \"c\"\n\
                    audit_log = \"a\"\n";
        let f = Path::new("/etc/edgerec/lkm.toml");
        for (line, expect) in [
            (
                "skew_secs = 0",
                "line 6: lkm.skew_secs = 0: must be 1 to 600",
            ),
            (
                "key_cache_secs = 90000",
                "line 6: lkm.key_cache_secs = 90000: at most 86400",
            ),
            (
                "unwrap_rate_per_sec = 0.0",
                "line 6: lkm.unwrap_rate_per_sec = 0: must be above 0",
            ),
            (
                "unwrap_burst = 0.5",
                "line 6: lkm.unwrap_burst = 0.5: must be at least 1",
            ),
            (
                "keypair_rate_per_min = -1.0",
                "line 6: lkm.keypair_rate_per_min = -1: must be above 0",
            ),
            (
                "read_rate_per_sec = 0.0",
                "line 6: lkm.read_rate_per_sec = 0",
            ),
            (
                "audit_denials_per_sec = 0.0",
                "line 6: lkm.audit_denials_per_sec = 0",
            ),
            (
                "idle_timeout_secs = 0",
                "line 6: lkm.idle_timeout_secs = 0: must be 1 to 3600",
            ),
            (
                "tls_cert = \"t.pem\"",
                "line 6: lkm.tls_cert / lkm.tls_key = t.pem: the certificate",
            ),
        ] {
            let e = LkmConfig::parse(f, &format!("{base}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("config /etc/edgerec/lkm.toml, "), "{e}");
            assert!(e.contains(expect), "{line}: {e}");
        }
        let e = LkmConfig::parse(
            f,
            &format!("{base}[lkm.kms]\nkey_id = \"k\"\nregion = \"r\"\norganisation = \"o\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 3: lkm.master_key_file = m: excludes [lkm.kms]"),
            "{e}"
        );
    }

    #[test]
    fn scheduled_rotation_is_due_once_the_current_key_is_a_period_old() {
        const DAY: u64 = 86_400_000;
        let made = 1_000 * DAY;
        assert!(!rotation_due(Rotation::Never, Some(made), made + 400 * DAY));
        assert!(!rotation_due(Rotation::Never, None, made));
        assert!(
            rotation_due(Rotation::Daily, None, made),
            "no key yet: make one"
        );
        assert!(!rotation_due(Rotation::Daily, Some(made), made + DAY - 1));
        assert!(rotation_due(Rotation::Daily, Some(made), made + DAY));
        assert!(!rotation_due(Rotation::Weekly, Some(made), made + 6 * DAY));
        assert!(rotation_due(Rotation::Weekly, Some(made), made + 7 * DAY));
        assert!(!rotation_due(
            Rotation::Monthly,
            Some(made),
            made + 29 * DAY
        ));
        assert!(rotation_due(Rotation::Monthly, Some(made), made + 30 * DAY));
        assert!(!rotation_due(
            Rotation::Yearly,
            Some(made),
            made + 364 * DAY
        ));
        assert!(rotation_due(Rotation::Yearly, Some(made), made + 365 * DAY));
        assert!(
            !rotation_due(Rotation::Daily, Some(made), made - DAY),
            "a key from the future (clock set back) is not rotated in a loop"
        );
    }
}
