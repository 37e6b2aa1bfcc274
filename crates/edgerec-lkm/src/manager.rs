//! The Local Key Manager's configuration (`lkm.toml`) and its administrator's acts: setting
//! up a key store, rotating, listing keys, issuing Hawk credentials, backing up and
//! restoring. Every act is written to the audit log.
//!
//! Invariants:
//! - Private keys exist in the clear only in memory; the store holds them sealed under the
//!   master key (see [`crate::at_rest`]), and a backup holds them sealed too.
//! - Credentials are issued only by these local commands (an administrator's act) or by an
//!   `admin` credential through the API; a credential's key is shown once, at issue, and
//!   stored 0600 beside the service. Each carries a role ([`crate::roles`]); an entry of
//!   before roles is read as `admin` if it said so, else as `platform` (what it could do),
//!   and named in a warning at every start until its role is set.
//! - The public demo credentials and demo master key are refused unless `demo = true`; the
//!   credentials file, the master key and the TLS key must be readable by their owner alone
//!   (not checked in demo mode: a fresh clone has them 0644).
//! - Relative paths in `lkm.toml` resolve against the file's own directory.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use edgerec_net::config_text::ConfigText;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use zeroize::Zeroizing;

use crate::at_rest::{MasterKey, Protector};
use crate::audit::{AuditKey, AuditLog, Event};
use crate::hawk_auth::Credential;
use crate::keystore::{KeyRecord, KeyStore};
use crate::roles::Role;

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
    pub fn load(file: &Path) -> Result<LkmConfig, String> {
        let shown = file.display();
        let text = std::fs::read_to_string(file).map_err(|e| format!("config {shown}: {e}"))?;
        Self::parse(file, &text)
    }

    /// Validates `lkm.toml`'s text as if read from `file` (paths resolve against its
    /// directory); every error names the file, and a bad value its line.
    pub fn parse(file: &Path, text: &str) -> Result<LkmConfig, String> {
        let shown = file.display();
        let cx = ConfigText { file, text };
        let raw: Raw = toml::from_str(text).map_err(|e| cx.parse_error(e.span(), e.message()))?;
        let bad = |key: &str,
                   v: &dyn std::fmt::Display,
                   span: std::ops::Range<usize>,
                   problem: &str| { cx.value_error(key, v, span, problem) };
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
                        return Err(format!(
                            "config {shown}: lkm.kms needs credentials: credentials_file, or \
                             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
                        ));
                    }
                    Err(e) => {
                        return Err(format!("config {shown}: lkm.kms.credentials_file {e}"));
                    }
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
                return Err(format!(
                    "config {shown}: lkm.master_key_file (or [lkm.kms]) is missing: what seals \
                     the private keys at rest"
                ));
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
        .map_err(|(key, why, span)| cx.parse_error(span, &format!("lkm.{key} = {why}")))?;
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

/// The key manager's state, opened for an administrator's act or for serving.
pub struct Lkm {
    /// Its configuration.
    pub config: LkmConfig,
    /// The key store.
    pub store: KeyStore,
    /// The audit log (keyed by the protector's audit key).
    pub audit: AuditLog,
}

/// The audit key of a protector ([`crate::at_rest::Protector::integrity_key`], purpose
/// `audit`).
pub fn audit_key(protector: &dyn Protector) -> Result<AuditKey, String> {
    protector
        .integrity_key("audit")
        .map(AuditKey::new)
        .map_err(|e| format!("the audit key: {e}"))
}

/// The protector `config` names: the master key (made first, with `init`, if there is none;
/// never replacing one), or KMS.
pub fn protector(config: &LkmConfig, init: bool) -> Result<Arc<dyn Protector>, String> {
    Ok(match &config.protection {
        Protection::MasterKey(mk) => {
            let key = if init && !mk.exists() {
                MasterKey::create(mk).map_err(|e| format!("lkm.master_key_file: {e}"))?
            } else if config.demo {
                eprintln!(
                    "edgerec: DEMO key store (lkm.demo = true): its master key is public; never \
                     seal real recordings to its keys"
                );
                MasterKey::from_demo_file(mk).map_err(|e| format!("lkm.master_key_file: {e}"))?
            } else {
                MasterKey::from_file(mk).map_err(|e| format!("lkm.master_key_file: {e}"))?
            };
            if key.is_demo() && !config.demo {
                return Err(format!(
                    "lkm.master_key_file {}: this is the public DEMO master key (from samples/): \
                     anyone can open what it seals. Make your own with edgerec lkm init on an \
                     empty key store, or set lkm.demo = true for a demonstration",
                    mk.display()
                ));
            }
            Arc::new(key)
        }
        Protection::Kms(k) => {
            Arc::new(crate::kms::Kms::new(k.clone()).map_err(|e| format!("lkm.kms: {e}"))?)
        }
    })
}

impl Lkm {
    /// Opens the key manager of `config`; with `init`, makes a master key first if there is
    /// none (never replacing one).
    pub fn open(config: LkmConfig, init: bool) -> Result<Lkm, String> {
        let protector = protector(&config, init)?;
        let store = KeyStore::open(&config.store_dir, Arc::clone(&protector))
            .map_err(|e| format!("lkm.store_dir {}: {e}", config.store_dir.display()))?
            .with_skew(config.skew_secs * 1000);
        if let Some(dir) = config.audit_log.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("lkm.audit_log: {}: {e}", dir.display()))?;
        }
        // A new integrity key only where nothing was keyed yet (a new key manager, or the
        // first start after an upgrade): one made later could not verify the lines before.
        if init || !log_is_keyed(&config.audit_log)? {
            protector
                .prepare_integrity()
                .map_err(|e| format!("the integrity key: {e}"))?;
        }
        let key = audit_key(protector.as_ref())?;
        let seq = keying_point(&store, &key, &config.audit_log)?;
        let audit = AuditLog::open(&config.audit_log, Some(key))
            .map_err(|e| format!("lkm.audit_log: {e}"))?;
        crate::audit::check_keying(&audit.chain(), seq).map_err(|e| {
            format!(
                "lkm.audit_log {}: {e}; not appending to a broken log",
                config.audit_log.display()
            )
        })?;
        Ok(Lkm {
            config,
            store,
            audit,
        })
    }

    /// The key store alone, without the audit log: for `lkm restore`, which may have to
    /// bring back the integrity key that keys the log before the log can be opened.
    pub fn open_store(config: &LkmConfig) -> Result<KeyStore, String> {
        let protector = protector(config, false)?;
        Ok(KeyStore::open(&config.store_dir, protector)
            .map_err(|e| format!("lkm.store_dir {}: {e}", config.store_dir.display()))?
            .with_skew(config.skew_secs * 1000))
    }

    /// Writes an administrator's act to the audit log (synced before it returns).
    pub fn record(&mut self, action: &str, key: Option<&str>, outcome: &str) -> Result<(), String> {
        self.audit
            .append(
                &Event {
                    who: "admin".into(),
                    user: Some(crate::client::os_user()),
                    action: action.into(),
                    key: key.map(str::to_string),
                    recording: None,
                    outcome: outcome.into(),
                },
                erec::clock::now_ms(),
            )
            .map(|_| ())
            .map_err(|e| format!("lkm.audit_log: {e}"))
    }

    /// Makes a new key pair, the current one from now on.
    pub fn rotate(&mut self, action: &str) -> Result<KeyRecord, String> {
        match self.store.generate(erec::clock::now_ms()) {
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

/// Where the audit log's keying starts (its first keyed line's `seq`), as the key store
/// records it; recorded now if the log holds no keyed line yet (a new key manager, or the
/// first start after an upgrade). A keyed log with no record is refused: its record was lost
/// with the key store (restore it from a backup), or removed to pass off a log stripped of
/// its MACs.
pub fn keying_point(store: &KeyStore, key: &AuditKey, log: &Path) -> Result<u64, String> {
    let shown = log.display();
    if let Some(text) = store.audit_marker().map_err(|e| e.to_string())? {
        return crate::audit::read_keying_marker(key, &text).map_err(|e| {
            format!("the audit log's keying record in the key store: {e}; not appending")
        });
    }
    let text = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("lkm.audit_log {shown}: {e}")),
    };
    // A torn last line is cut when the log is opened: it does not count.
    let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let chain = crate::audit::verify(&String::from_utf8_lossy(&text[..whole]))
        .map_err(|e| format!("lkm.audit_log {shown}: {e}; not appending to a broken log"))?;
    if let Some(line) = chain.keyed_from {
        return Err(format!(
            "lkm.audit_log {shown} is keyed from line {line}, but the key store has no record \
             of where keying starts (audit-keyed.json): restore the key store from a backup \
             (edgerec lkm restore), or, if you know the log is intact, move it aside to start a \
             new one"
        ));
    }
    store
        .set_audit_marker(&crate::audit::keying_marker(key, chain.next_seq))
        .map_err(|e| e.to_string())?;
    Ok(chain.next_seq)
}

/// Whether the audit log at `path` holds keyed lines already (a missing log holds none).
fn log_is_keyed(path: &Path) -> Result<bool, String> {
    match std::fs::read(path) {
        Ok(b) => Ok(b.windows(7).any(|w| w == b"\"mac\":\"")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("lkm.audit_log {}: {e}", path.display())),
    }
}

/// One stored credential (the key base64).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCredential {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    /// Before roles: `true` made an administrator. Read, never written again (a role is).
    #[serde(default, skip_serializing)]
    admin: bool,
}

/// SHA-256 of the keys of the committed demo credentials (`samples/lkm/credentials.json`):
/// public, so refused unless `demo = true`.
const DEMO_CREDENTIALS_SHA256: [&str; 3] = [
    "697b7a5a51bf4567276c88a4e2d0efea30915eb5b765b88ad616418c8d09900f",
    "3eab3cc6dda3ec8f5dbd701b8f43a64704c080711256bddb2677a67c3c7d4532",
    "dd2c3b7e143416944afd63fac0a95f7bb79f592300ac0709c6e51a680887c5d9",
];

/// The credentials file's entries, an entry of before roles read as `admin` (it said so) or
/// left without a role (read as `platform`).
fn read_credentials(path: &Path) -> Result<BTreeMap<String, StoredCredential>, String> {
    match std::fs::read(path) {
        Ok(b) => {
            let b = Zeroizing::new(b);
            let mut all: BTreeMap<String, StoredCredential> =
                serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?;
            for c in all.values_mut() {
                if c.admin && c.role.is_none() {
                    c.role = Some(Role::Admin);
                }
            }
            Ok(all)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Runs `change` on the credentials file's entries under an exclusive lock (a lock file
/// beside it: the file itself is replaced, not written), and writes the result: two
/// administrators' changes at once (a command and `POST /auth`) never undo each other, a
/// revocation included.
fn change_credentials<T>(
    path: &Path,
    change: impl FnOnce(&mut BTreeMap<String, StoredCredential>) -> Result<T, String>,
) -> Result<T, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock)
        .map_err(|e| format!("{}.lock: {e}", path.display()))?;
    lock.lock()
        .map_err(|e| format!("{}.lock: {e}", path.display()))?;
    let mut all = read_credentials(path)?;
    let out = change(&mut all)?;
    write_credentials(path, &all)?;
    Ok(out)
}

fn write_credentials(path: &Path, all: &BTreeMap<String, StoredCredential>) -> Result<(), String> {
    let text = Zeroizing::new(serde_json::to_vec_pretty(all).map_err(|e| e.to_string())?);
    edgerec_net::durable::replace_file(path, &text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The credentials the service accepts.
pub struct Credentials {
    /// By id. A credential's key is its text: the contract's clients (the platform's
    /// `apiKey`) use the string they were given as the Hawk key.
    pub all: HashMap<String, Credential>,
    /// Entries of before roles with no role set (read as `platform`): the service warns at
    /// every start until an operator sets theirs.
    pub unset: Vec<String>,
}

/// Loads the credentials file for the service: owner-only (unless `demo`), the demo
/// credentials refused unless `demo`.
pub fn load_credentials(path: &Path, demo: bool) -> Result<Credentials, String> {
    use sha2::Digest;
    if !demo && path.exists() {
        edgerec_net::durable::check_owner_only(path, "the credentials file")
            .map_err(|e| format!("lkm.credentials_file {e}"))?;
    }
    let mut out = Credentials {
        all: HashMap::new(),
        unset: Vec::new(),
    };
    for (id, c) in read_credentials(path)? {
        let hash = hex::encode(sha2::Sha256::digest(c.key.as_bytes()));
        if !demo && DEMO_CREDENTIALS_SHA256.contains(&hash.as_str()) {
            return Err(format!(
                "lkm.credentials_file {}: credential {id} has the public DEMO key (from \
                 samples/): anyone can use it. Remove it (edgerec lkm credentials remove {id}) \
                 and issue your own, or set lkm.demo = true for a demonstration",
                path.display()
            ));
        }
        let role = c.role.unwrap_or_else(|| {
            out.unset.push(id.clone());
            Role::Platform
        });
        let key = Zeroizing::new(c.key.as_bytes().to_vec());
        out.all.insert(id, Credential { key, role });
    }
    Ok(out)
}

/// Every credential's id and role (`None`: an entry of before roles, read as `platform`);
/// never a key.
pub fn list_credentials(path: &Path) -> Result<Vec<(String, Option<Role>)>, String> {
    Ok(read_credentials(path)?
        .into_iter()
        .map(|(id, c)| (id, c.role))
        .collect())
}

/// Sets a credential's role (the file rewritten atomically); returns the role it had.
pub fn set_role(path: &Path, id: &str, role: Role) -> Result<Option<Role>, String> {
    change_credentials(path, |all| {
        let c = all
            .get_mut(id)
            .ok_or_else(|| format!("no credential {id}"))?;
        Ok(c.role.replace(role))
    })
}

/// Revokes a credential (the file rewritten without it, 0600, atomically).
pub fn remove_credential(path: &Path, id: &str) -> Result<(), String> {
    change_credentials(path, |all| match all.remove(id) {
        Some(_) => Ok(()),
        None => Err(format!("no credential {id}")),
    })
}

/// Issues a Hawk credential with `role`: a key of 256 random bits written as 43 base64url
/// characters, stored (0600, written to a temporary name and renamed) and returned for the
/// administrator to hand to the client, which uses that text as its Hawk key (algorithm
/// sha256). An id that exists is refused.
pub fn add_credential(path: &Path, id: &str, role: Role) -> Result<Zeroizing<String>, String> {
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
    change_credentials(path, |all| {
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
                role: Some(role),
                admin: false,
            },
        );
        Ok(encoded)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
            let e = LkmConfig::parse(f, &format!("{base}{line}\n")).unwrap_err();
            assert!(e.starts_with("config /etc/edgerec/lkm.toml, "), "{e}");
            assert!(e.contains(expect), "{line}: {e}");
        }
        let e = LkmConfig::parse(
            f,
            &format!("{base}[lkm.kms]\nkey_id = \"k\"\nregion = \"r\"\norganisation = \"o\"\n"),
        )
        .unwrap_err();
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

    #[test]
    fn credentials_are_issued_once_each_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let k = add_credential(&path, "recorder-1", Role::Recorder).unwrap();
        add_credential(&path, "ops", Role::Admin).unwrap();
        assert!(add_credential(&path, "recorder-1", Role::Recorder).is_err());
        assert!(add_credential(&path, "bad id", Role::Recorder).is_err());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let all = load_credentials(&path, false).unwrap().all;
        assert_eq!(all.len(), 2);
        assert_eq!(
            all["recorder-1"].key.as_slice(),
            k.as_bytes(),
            "the text is the key"
        );
        assert_eq!(k.len(), 43);
        assert_eq!(
            (all["ops"].role, all["recorder-1"].role),
            (Role::Admin, Role::Recorder)
        );
        remove_credential(&path, "recorder-1").unwrap();
        assert!(remove_credential(&path, "recorder-1").is_err(), "gone");
        assert_eq!(
            load_credentials(&path, false)
                .unwrap()
                .all
                .keys()
                .collect::<Vec<_>>(),
            ["ops"]
        );
    }

    #[test]
    fn credentials_of_before_roles_keep_what_they_could_do_until_their_role_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        std::fs::write(
            &path,
            r#"{"ops": {"key": "k1", "admin": true}, "rec-7": {"key": "k2", "admin": false},
                "old": {"key": "k3"}}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load_credentials(&path, false).unwrap();
        assert_eq!(c.all["ops"].role, Role::Admin);
        assert_eq!(c.all["rec-7"].role, Role::Platform, "today's behaviour");
        assert_eq!(c.unset, ["old", "rec-7"]);
        assert_eq!(set_role(&path, "rec-7", Role::Recorder).unwrap(), None);
        // A rewrite keeps the administrator an administrator.
        let listed = list_credentials(&path).unwrap();
        assert_eq!(
            listed,
            [
                ("old".to_string(), None),
                ("ops".to_string(), Some(Role::Admin)),
                ("rec-7".to_string(), Some(Role::Recorder))
            ]
        );
        let c = load_credentials(&path, false).unwrap();
        assert_eq!(
            (c.all["rec-7"].role, c.unset),
            (Role::Recorder, vec!["old".to_string()])
        );
        assert!(set_role(&path, "nobody", Role::Admin).is_err());
    }

    #[test]
    fn demo_credentials_and_loose_modes_are_refused_outside_demo_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        std::fs::copy(
            Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../samples/lkm/credentials.json"
            )),
            &path,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_credentials(&path, false).err().unwrap();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_credentials(&path, false).err().unwrap();
        assert!(e.contains("public DEMO key"), "{e}");
        let demo = load_credentials(&path, true).unwrap();
        assert_eq!(demo.all["demo-recorder"].role, Role::Recorder);
        assert_eq!(demo.all["demo-decrypt"].role, Role::Decrypt);
        assert!(demo.unset.is_empty());
    }
}
