//! The Local Key Manager's configuration (`lkm.toml`) and its administrator's acts: setting
//! up a key store, rotating, listing keys, issuing Hawk credentials, backing up and
//! restoring. Every act is written to the audit log.
//!
//! Invariants:
//! - Private keys exist in the clear only in memory; the store holds them sealed under the
//!   master key (see [`crate::at_rest`]), and a backup holds them sealed too.
//! - Credentials are issued only by these local commands (an administrator's act), never by
//!   anyone who can reach a port; a credential's key is shown once, at issue, and stored
//!   0600 beside the service.
//! - Relative paths in `lkm.toml` resolve against the file's own directory.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::at_rest::{MasterKey, Protector};
use crate::audit::{AuditLog, Event};
use crate::hawk_auth::Credential;
use crate::keystore::{KeyRecord, KeyStore};

/// Whether a scheduled rotation is due: the current key (made at `current_ms`, or none) is
/// older than the schedule's period at `now_ms`.
pub fn rotation_due(rotation: Rotation, current_ms: Option<u64>, now_ms: u64) -> bool {
    const DAY: u64 = 86_400_000;
    let period = match rotation {
        Rotation::Never => return false,
        Rotation::Daily => DAY,
        Rotation::Weekly => 7 * DAY,
        Rotation::Monthly => 30 * DAY,
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
    /// Every 30 days.
    Monthly,
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
    master_key_file: Option<PathBuf>,
    kms: Option<RawKms>,
    credentials_file: PathBuf,
    audit_log: PathBuf,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default = "default_rotation")]
    rotation: Rotation,
    #[serde(default = "default_skew")]
    skew_secs: u64,
    #[serde(default)]
    require_payload_hash: bool,
    #[serde(default = "default_key_cache")]
    key_cache_secs: u64,
    #[serde(default = "default_rate")]
    unwrap_rate_per_sec: f64,
    #[serde(default = "default_burst")]
    unwrap_burst: f64,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    demo: bool,
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

fn default_key_cache() -> u64 {
    60
}

fn default_rate() -> f64 {
    100.0
}

fn default_burst() -> f64 {
    200.0
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

fn default_rotation() -> Rotation {
    Rotation::Never
}

fn default_skew() -> u64 {
    60
}

/// What seals the key store's private keys at rest.
#[derive(Debug, Clone)]
pub enum Protection {
    /// A master key file (0600, 64 hex digits).
    MasterKey(PathBuf),
    /// AWS KMS (`[lkm.kms]`).
    Kms(crate::kms::KmsConfig),
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
    pub unwrap_limit: crate::rate_limit::Limit,
    /// Plain-HTTP `/metrics` listener (loopback), if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The committed demo key store: its master key is public, so its file mode is not
    /// checked, and every start says so.
    pub demo: bool,
}

impl LkmConfig {
    /// Reads and validates `lkm.toml`.
    pub fn load(file: &Path) -> Result<LkmConfig, String> {
        let shown = file.display();
        let text = std::fs::read_to_string(file).map_err(|e| format!("config {shown}: {e}"))?;
        let raw: Raw = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(", line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            format!("config {shown}{line}: {}", e.message().trim_end())
        })?;
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
            (Some(c), Some(k)) => Some((resolve(&c), resolve(&k))),
            (None, None) => None,
            _ => {
                return Err(format!(
                    "config {shown}: lkm.tls_cert and lkm.tls_key go together"
                ));
            }
        };
        if !(1..=600).contains(&l.skew_secs) {
            return Err(format!(
                "config {shown}: lkm.skew_secs = {}: must be 1 to 600",
                l.skew_secs
            ));
        }
        let protection = match (&l.master_key_file, l.kms) {
            (Some(m), None) => Protection::MasterKey(resolve(m)),
            (None, Some(k)) => {
                let (access_key, secret_key) = match &k.credentials_file {
                    Some(f) => {
                        let f = resolve(f);
                        let text = Zeroizing::new(std::fs::read_to_string(&f).map_err(|e| {
                            format!(
                                "config {shown}: lkm.kms.credentials_file {}: {e}",
                                f.display()
                            )
                        })?);
                        let profile = k.profile.as_deref().unwrap_or("default");
                        crate::s3::credentials_from_file(&text, profile).ok_or_else(|| {
                            format!(
                                "config {shown}: lkm.kms.credentials_file {}: no \
                                 aws_access_key_id and aws_secret_access_key in [{profile}]",
                                f.display()
                            )
                        })?
                    }
                    None => match (
                        std::env::var("AWS_ACCESS_KEY_ID"),
                        std::env::var("AWS_SECRET_ACCESS_KEY"),
                    ) {
                        (Ok(a), Ok(s)) => (a, Zeroizing::new(s)),
                        _ => {
                            return Err(format!(
                                "config {shown}: lkm.kms needs credentials: credentials_file, or \
                                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
                            ));
                        }
                    },
                };
                if k.organisation.is_empty() || k.key_id.is_empty() || k.region.is_empty() {
                    return Err(format!(
                        "config {shown}: lkm.kms.key_id, region and organisation must not be empty"
                    ));
                }
                Protection::Kms(crate::kms::KmsConfig {
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
                })
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "config {shown}: lkm.master_key_file and [lkm.kms] exclude each other: the \
                     private keys are sealed by one of them"
                ));
            }
            (None, None) => {
                return Err(format!(
                    "config {shown}: lkm.master_key_file (or [lkm.kms]) is missing: what seals \
                     the private keys at rest"
                ));
            }
        };
        if l.key_cache_secs > 86_400 {
            return Err(format!(
                "config {shown}: lkm.key_cache_secs = {}: at most 86400",
                l.key_cache_secs
            ));
        }
        if !(l.unwrap_rate_per_sec > 0.0 && l.unwrap_rate_per_sec.is_finite()) {
            return Err(format!(
                "config {shown}: lkm.unwrap_rate_per_sec = {}: must be above 0",
                l.unwrap_rate_per_sec
            ));
        }
        if !(l.unwrap_burst >= 1.0 && l.unwrap_burst.is_finite()) {
            return Err(format!(
                "config {shown}: lkm.unwrap_burst = {}: must be at least 1",
                l.unwrap_burst
            ));
        }
        Ok(LkmConfig {
            key_cache_secs: l.key_cache_secs,
            unwrap_limit: crate::rate_limit::Limit {
                rate: l.unwrap_rate_per_sec,
                burst: l.unwrap_burst,
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
            skew_secs: l.skew_secs,
            require_payload_hash: l.require_payload_hash,
        })
    }
}

/// The key manager's state, opened for an administrator's act or for serving.
pub struct Lkm {
    /// Its configuration.
    pub config: LkmConfig,
    /// The key store.
    pub store: KeyStore,
    /// The audit log.
    pub audit: AuditLog,
}

/// One stored credential (the key base64).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCredential {
    key: String,
    #[serde(default)]
    admin: bool,
}

impl Lkm {
    /// Opens the key manager of `config`; with `init`, makes a master key first if there is
    /// none (never replacing one).
    pub fn open(config: LkmConfig, init: bool) -> Result<Lkm, String> {
        let protector: Arc<dyn Protector> = match &config.protection {
            Protection::MasterKey(mk) => Arc::new(if init && !mk.exists() {
                MasterKey::create(mk).map_err(|e| format!("lkm.master_key_file: {e}"))?
            } else if config.demo {
                eprintln!(
                    "edgerec: DEMO key store (lkm.demo = true): its master key is public; never \
                     seal real recordings to its keys"
                );
                MasterKey::from_demo_file(mk).map_err(|e| format!("lkm.master_key_file: {e}"))?
            } else {
                MasterKey::from_file(mk).map_err(|e| format!("lkm.master_key_file: {e}"))?
            }),
            Protection::Kms(k) => {
                Arc::new(crate::kms::Kms::new(k.clone()).map_err(|e| format!("lkm.kms: {e}"))?)
            }
        };
        let store = KeyStore::open(&config.store_dir, protector)
            .map_err(|e| format!("lkm.store_dir {}: {e}", config.store_dir.display()))?;
        if let Some(dir) = config.audit_log.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("lkm.audit_log: {}: {e}", dir.display()))?;
        }
        let audit = AuditLog::open(&config.audit_log).map_err(|e| format!("lkm.audit_log: {e}"))?;
        Ok(Lkm {
            config,
            store,
            audit,
        })
    }

    /// Writes an administrator's act to the audit log.
    pub fn record(&mut self, action: &str, key: Option<&str>, outcome: &str) -> Result<(), String> {
        let who = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "unknown".into());
        self.audit
            .append(
                &Event {
                    who: "admin".into(),
                    user: Some(who),
                    action: action.into(),
                    key: key.map(str::to_string),
                    recording: None,
                    outcome: outcome.into(),
                },
                crate::clock::now_ms(),
            )
            .map(|_| ())
            .map_err(|e| format!("lkm.audit_log: {e}"))
    }

    /// Makes a new key pair, the current one from now on.
    pub fn rotate(&mut self, action: &str) -> Result<KeyRecord, String> {
        match self.store.generate(crate::clock::now_ms()) {
            Ok(r) => {
                self.record(action, Some(&r.id), "ok")?;
                Ok(r)
            }
            Err(e) => {
                self.record(action, None, "failed")?;
                Err(e.to_string())
            }
        }
    }
}

fn read_credentials(path: &Path) -> Result<BTreeMap<String, StoredCredential>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The credentials the service accepts. A credential's key is its text: the contract's
/// clients (the platform's `apiKey`) use the string they were given as the Hawk key.
pub fn load_credentials(path: &Path) -> Result<HashMap<String, Credential>, String> {
    Ok(read_credentials(path)?
        .into_iter()
        .map(|(id, c)| {
            let key = Zeroizing::new(c.key.as_bytes().to_vec());
            (
                id,
                Credential {
                    key,
                    admin: c.admin,
                },
            )
        })
        .collect())
}

/// Revokes a credential (the file rewritten without it, 0600, atomically).
pub fn remove_credential(path: &Path, id: &str) -> Result<(), String> {
    let mut all = read_credentials(path)?;
    if all.remove(id).is_none() {
        return Err(format!("no credential {id}"));
    }
    let text = Zeroizing::new(serde_json::to_vec_pretty(&all).map_err(|e| e.to_string())?);
    crate::durable::replace_file(path, &text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Issues a Hawk credential: a key of 256 random bits written as 43 base64url characters,
/// stored (0600, written to a temporary name and renamed) and returned for the administrator
/// to hand to the client, which uses that text as its Hawk key (algorithm sha256). An id that
/// exists is refused.
pub fn add_credential(path: &Path, id: &str, admin: bool) -> Result<Zeroizing<String>, String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "credential id {id:?}: 1 to 64 letters, digits, - _ ."
        ));
    }
    let mut all = read_credentials(path)?;
    if all.contains_key(id) {
        return Err(format!("credential {id} exists already"));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| e.to_string())?;
    let encoded =
        Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_ref()));
    all.insert(
        id.to_string(),
        StoredCredential {
            key: encoded.to_string(),
            admin,
        },
    );
    let text = Zeroizing::new(serde_json::to_vec_pretty(&all).map_err(|e| e.to_string())?);
    crate::durable::replace_file(path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(encoded)
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
        std::fs::write(&f, "[lkm]\nstore_dir = \"s\"\nbogus = 1\n").unwrap();
        let e = LkmConfig::load(&f).unwrap_err();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        std::fs::write(
            &f,
            "[lkm]\nstore_dir = \"s\"\nmaster_key_file = \"m\"\ncredentials_file = \"c\"\n\
             audit_log = \"a\"\nrotation = \"hourly\"\n",
        )
        .unwrap();
        assert!(LkmConfig::load(&f).unwrap_err().contains("hourly"));
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
        assert!(
            !rotation_due(Rotation::Daily, Some(made), made - DAY),
            "a key from the future (clock set back) is not rotated in a loop"
        );
    }

    #[test]
    fn credentials_are_issued_once_each_and_load_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let k = add_credential(&path, "recorder-1", false).unwrap();
        add_credential(&path, "ops", true).unwrap();
        assert!(add_credential(&path, "recorder-1", false).is_err());
        assert!(add_credential(&path, "bad id", false).is_err());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let all = load_credentials(&path).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all["recorder-1"].key.as_slice(),
            k.as_bytes(),
            "the text is the key"
        );
        assert_eq!(k.len(), 43);
        assert!(all["ops"].admin && !all["recorder-1"].admin);
        remove_credential(&path, "recorder-1").unwrap();
        assert!(remove_credential(&path, "recorder-1").is_err(), "gone");
        assert_eq!(
            load_credentials(&path).unwrap().keys().collect::<Vec<_>>(),
            ["ops"]
        );
    }
}
