//! The appliance's configuration: one TOML file, read once at start and validated whole.
//!
//! Invariants:
//! - Unknown keys, wrong types and bad values are errors that name the key, the value and
//!   the line (`config FILE, line N: key = value: problem`), so a start fails with one clear
//!   line instead of running with a half-understood file.
//! - Relative paths resolve against the directory of the config file, never the working
//!   directory, so `edgerec run --config /etc/edgerec/edgerec.toml` behaves the same from
//!   anywhere.
//! - Every default is written here with the reason for its value.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::store::StoreKind;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use erec::format::{MAX_MAX_CHUNK, MIN_MAX_CHUNK, Wrap};

/// A configuration problem, already formatted for the one line the operator sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `[recorder]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recorder {
    /// Where packages wait: `active/`, `ready/`, `failed/`, `quarantine/`.
    pub spool_dir: PathBuf,
    /// Pending media is sealed, appended and synced at least this often. 1 s: a crash loses
    /// at most one second of audio, and one group commit a second costs little.
    pub flush_interval_ms: Spanned<u64>,
    /// A recording ends after this long without RTP. 5 s: longer than any jitter buffer or
    /// hold gap with comfort noise, short enough that a hung-up call is sealed promptly.
    pub idle_timeout_ms: Spanned<u64>,
    /// A recording is split after this long. 4 h: bounds one package (~460 MB of G.711 for
    /// two legs) and one data key's reach, while no ordinary call is split.
    pub max_recording_secs: Spanned<u64>,
    /// `data`: fdatasync every flush tick (the default: the crash guarantee needs it);
    /// `none`: leave it to the kernel (only for tests on tmpfs).
    pub sync: SyncMode,
    /// New recordings are refused above this many spool bytes. 10 GiB: a weekend of a
    /// small site's calls while the store is down.
    pub spool_max_bytes: Spanned<u64>,
    /// New recordings are refused when the spool's file system has less free. 1 GiB: room
    /// for the recordings in progress to finish.
    pub min_free_bytes: Spanned<u64>,
    /// Largest media record of a call package. 64 KiB: a chunk holds about 3.5 s of two
    /// G.711 legs, so a flush usually writes one record per recording, and memory per
    /// recording stays small.
    pub chunk_bytes: Spanned<u32>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            spool_dir: PathBuf::from("var/spool"),
            flush_interval_ms: Spanned::new(0..0, 1000),
            idle_timeout_ms: Spanned::new(0..0, 5000),
            max_recording_secs: Spanned::new(0..0, 14_400),
            sync: SyncMode::Data,
            spool_max_bytes: Spanned::new(0..0, 10 << 30),
            min_free_bytes: Spanned::new(0..0, 1 << 30),
            chunk_bytes: Spanned::new(0..0, 64 << 10),
        }
    }
}

/// `recorder.sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fdatasync per flush tick.
    Data,
    /// No sync calls.
    None,
}

/// `[ingest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ingest {
    /// Address to bind. Loopback by default: receiving from the network is a decision.
    pub bind: IpAddr,
    /// Port range `A-B` (or one port): each port records what arrives on it.
    pub ports: Spanned<String>,
    /// Source networks (CIDR) packets are taken from; empty means any, with a warning.
    pub allow: Vec<Spanned<String>>,
    /// RTP packets of one stream, in sequence, a port must receive before its recording
    /// starts (see `crates/edgerec/src/appliance/session.rs`, admission).
    #[serde(default = "default_min_packets")]
    pub min_packets: Spanned<usize>,
    /// Recordings started a second from one source address.
    #[serde(default = "default_starts_per_source")]
    pub max_starts_per_source_per_sec: Spanned<f64>,
    /// Recordings started a second on one port.
    #[serde(default = "default_starts_per_port")]
    pub max_starts_per_port_per_sec: Spanned<f64>,
    /// The crash journal's size in MiB (`appliance/journal.rs`): the datagrams read but not
    /// yet in a package file, kept in memory the service manager holds over a `kill -9`.
    /// Unset: sized from the port range and the flush interval; 0: no journal. Kept only
    /// under a service manager (`NOTIFY_SOCKET`).
    #[serde(default)]
    pub journal_mib: Option<Spanned<u64>>,
    /// How ingest reads (`crates/edgerec/src/appliance/ingest.rs`): `auto` (the ring where
    /// it can be had, else `recvmmsg`), `ring` (a packet ring; needs `CAP_NET_RAW`),
    /// `recvmmsg` (the sockets), `io_uring` (multishot receives).
    #[serde(default)]
    pub mode: crate::appliance::ingest::Mode,
    /// The packet ring's size in MiB (mode `ring`): what arrives while ingest is not
    /// reading (about 0.3 s of 10,000 streams at the default).
    #[serde(default = "default_ring_mib")]
    pub ring_mib: Spanned<usize>,
}

fn default_ring_mib() -> Spanned<usize> {
    Spanned::new(0..0, 32)
}

/// Three packets in sequence (60 ms of a call) before a recording starts: one spoofed
/// datagram cannot make a package, and a real call loses nothing (the three are recorded).
fn default_min_packets() -> Spanned<usize> {
    Spanned::new(0..0, 3)
}

/// One SBC may start a thousand calls a second.
fn default_starts_per_source() -> Spanned<f64> {
    Spanned::new(0..0, 1000.0)
}

/// A port takes a new call a few times a second at most.
fn default_starts_per_port() -> Spanned<f64> {
    Spanned::new(0..0, 5.0)
}

impl Default for Ingest {
    fn default() -> Self {
        Ingest {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ports: Spanned::new(0..0, "40000-40999".into()),
            allow: Vec::new(),
            min_packets: default_min_packets(),
            max_starts_per_source_per_sec: default_starts_per_source(),
            max_starts_per_port_per_sec: default_starts_per_port(),
            journal_mib: None,
            mode: crate::appliance::ingest::Mode::default(),
            ring_mib: default_ring_mib(),
        }
    }
}

/// `[keys]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    /// `file` (a public key file, watched) or `lkm` (the key manager's current key).
    #[serde(default = "default_source")]
    pub source: Spanned<String>,
    /// The KEK's public key file; watched, replacing it rotates the KEK.
    pub public_key: Option<PathBuf>,
    /// lkm: the key manager, `https://host:port`.
    pub lkm_url: Option<Spanned<String>>,
    /// lkm: the CA that issued the key manager's certificate (the only root trusted).
    pub lkm_ca: Option<PathBuf>,
    /// lkm: the Hawk credential file (`id:` and `key:` lines).
    pub lkm_credentials: Option<PathBuf>,
    /// lkm: how often the current key is fetched.
    #[serde(default = "default_refresh")]
    pub refresh_secs: Spanned<u64>,
    /// lkm: a cached key not confirmed by the key manager for this long is stale.
    #[serde(default = "default_max_age")]
    pub max_age_secs: Spanned<u64>,
    /// lkm: `keep` (record on with the stale key, warned and counted) or `refuse` (refuse
    /// new recordings until the key manager answers).
    #[serde(default = "default_on_stale")]
    pub on_stale: Spanned<String>,
    /// lkm: where the last good key is cached (default: `lkm-key.json` in the spool).
    pub cache_file: Option<PathBuf>,
    /// A second recipient of every data key.
    pub escrow_public_key: Option<PathBuf>,
    /// `oaep-sha256` (default) or `oaep-sha1` (for a KEK held by a contract LKM).
    #[serde(default = "default_wrap")]
    pub wrap: Spanned<String>,
    /// Seal to the committed demo key all the same (the samples do; nothing real may).
    #[serde(default)]
    pub demo: bool,
}

fn default_source() -> Spanned<String> {
    Spanned::new(0..0, "file".into())
}

fn default_refresh() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}

fn default_max_age() -> Spanned<u64> {
    Spanned::new(0..0, 86_400)
}

fn default_on_stale() -> Spanned<String> {
    Spanned::new(0..0, "keep".into())
}

/// Where new recordings' KEK comes from.
#[derive(Debug, Clone)]
pub enum KekSource {
    /// A public key file, watched: replacing it rotates.
    File(PathBuf),
    /// The key manager's current key, fetched at an interval and cached on disk.
    Lkm(LkmKeys),
}

/// `[keys] source = "lkm"`, validated.
#[derive(Debug, Clone)]
pub struct LkmKeys {
    /// How to reach the key manager.
    pub target: edgerec_lkm::client::LkmTarget,
    /// How often the current key is fetched.
    pub refresh: std::time::Duration,
    /// When a cached key counts as stale.
    pub max_age: std::time::Duration,
    /// Whether recording goes on with a stale key.
    pub on_stale: OnStale,
    /// The cache file.
    pub cache_file: PathBuf,
    /// Whether the committed demo key may be taken (`[keys] demo`).
    pub allow_demo: bool,
}

/// What a stale key means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    /// Record on with it (warned, `edgerec_kek_age_seconds` shows it).
    Keep,
    /// Refuse new recordings until the key manager answers.
    Refuse,
}

fn default_wrap() -> Spanned<String> {
    Spanned::new(0..0, "oaep-sha256".into())
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `dir`, `http` or `s3`.
    #[serde(default = "default_kind")]
    pub kind: Spanned<String>,
    /// dir: the store's root directory.
    pub path: Option<PathBuf>,
    /// s3: `http(s)://host[:port]` of the S3 API (path-style requests).
    pub endpoint: Option<Spanned<String>>,
    /// s3: the SigV4 region. `us-east-1`: what most S3-compatible stores expect.
    pub region: Option<String>,
    /// s3: the bucket.
    pub bucket: Option<Spanned<String>>,
    /// s3: prefix of every object key (`recordings/` → `recordings/2026/11/29/<id>.erec`).
    pub prefix: Option<Spanned<String>>,
    /// s3: an AWS shared-credentials file; without it the credentials come from
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub credentials_file: Option<PathBuf>,
    /// s3: the profile in `credentials_file`. `default`.
    pub profile: Option<String>,
    /// http: where a package goes, `https://…/{key}` (`{key}` is its object key, prefix
    /// included).
    pub url: Option<Spanned<String>>,
    /// http: a file holding the bearer token; without it the token comes from
    /// `EDGEREC_STORE_TOKEN`.
    pub token_file: Option<PathBuf>,
    /// http, s3: a CA certificate (PEM) to trust for HTTPS besides the system's.
    pub ca_file: Option<PathBuf>,
    /// http, s3: a client certificate (PEM) for a store that asks for one.
    pub client_cert: Option<PathBuf>,
    /// http, s3: the client certificate's private key (PEM).
    pub client_key: Option<PathBuf>,
}

fn default_kind() -> Spanned<String> {
    Spanned::new(0..0, "dir".into())
}

/// `[upload]`: the retry policy of the uploader (see [`crate::store::retry`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpload {
    /// Upper bound of the first wait after a transient failure. 1 s: a store that blinked is
    /// tried again at once.
    pub retry_initial_ms: Spanned<u64>,
    /// Cap on any wait. 5 min: a store that comes back after an outage is found within
    /// minutes, and a thousand waiting packages cost a few attempts a second.
    pub retry_max_ms: Spanned<u64>,
    /// Give up on a package (to `failed/`) after this many attempts; 0, the default, retries
    /// forever: a recording must never be dropped because the store was down for a week.
    pub max_attempts: Spanned<u32>,
    /// `ready/` is scanned this often besides being watched. 30 s: a safety net for events
    /// the watcher missed, cheap even with thousands of packages waiting.
    pub rescan_secs: Spanned<u64>,
    /// The longest one request to the store may take. 300 s: a 1 GiB package at 30 Mbit/s.
    pub attempt_timeout_secs: Spanned<u64>,
    /// Uploads at once. 4: keeps a link busy across the round trips of small packages
    /// without crowding a store that is just coming back.
    pub concurrency: Spanned<u32>,
    /// Upload bandwidth for all uploads together, bytes a second; 0 (the default) leaves it
    /// to the network. Edge links carry live calls: set it below what they can spare.
    pub bandwidth_bytes_per_sec: Spanned<u64>,
    /// s3: packages of this size or more go up in parts, so that a lost connection costs
    /// one part, not the package, and a restart resumes. 64 MiB: about 18 hours of G.711
    /// call audio, so only long calls and large digital recordings use it.
    pub multipart_threshold_bytes: Spanned<u64>,
    /// s3: bytes per part. 16 MiB: a few seconds on a shared edge link, and S3's minimum is
    /// 5 MiB. Raised for a package that would need more than 10,000 parts.
    pub multipart_part_bytes: Spanned<u64>,
    /// s3: multipart uploads under the prefix that no package in the spool refers to are
    /// aborted once they are this old (a crash between starting one and saving its id, or a
    /// package sent to `failed/`). 24 h: never an upload another appliance sharing the
    /// prefix is still working on. 0 leaves them to the bucket's lifecycle rule.
    pub abort_orphans_after_secs: Spanned<u64>,
}

impl Default for RawUpload {
    fn default() -> Self {
        RawUpload {
            retry_initial_ms: Spanned::new(0..0, 1000),
            retry_max_ms: Spanned::new(0..0, 300_000),
            max_attempts: Spanned::new(0..0, 0),
            rescan_secs: Spanned::new(0..0, 30),
            attempt_timeout_secs: Spanned::new(0..0, 300),
            bandwidth_bytes_per_sec: Spanned::new(0..0, 0),
            concurrency: Spanned::new(0..0, 4),
            multipart_threshold_bytes: Spanned::new(0..0, 64 << 20),
            multipart_part_bytes: Spanned::new(0..0, 16 << 20),
            abort_orphans_after_secs: Spanned::new(0..0, 86_400),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `/metrics`, `/healthz`, `/readyz`. Loopback, the Prometheus convention's port range.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464),
        }
    }
}

/// `[log]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Spanned<String>>,
}

/// `[identity]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    key_file: Option<PathBuf>,
}

/// `[outcomes]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutcomes {
    keep_days: Option<Spanned<u32>>,
    manifest_period_secs: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    recorder: Recorder,
    #[serde(default)]
    ingest: Ingest,
    keys: Keys,
    store: RawStore,
    #[serde(default)]
    upload: RawUpload,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    inbox: RawInbox,
    #[serde(default)]
    siprec: RawSiprec,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    outcomes: RawOutcomes,
    #[serde(default)]
    identity: RawIdentity,
}

/// `[siprec]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSiprec {
    listen: Option<Spanned<SocketAddr>>,
    tls_listen: Option<Spanned<SocketAddr>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    media_ports: Option<Spanned<String>>,
    advertise: Option<Spanned<IpAddr>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    conversation_id_header: Option<Spanned<String>>,
    max_sessions: Option<Spanned<usize>>,
    inactivity_secs: Option<Spanned<u64>>,
}

/// `[siprec]`, validated: the SIPREC recording server (docs/siprec.md).
#[derive(Debug, Clone)]
pub struct Siprec {
    /// SIP over UDP and TCP.
    pub listen: SocketAddr,
    /// SIP over TLS, with its certificate chain and key (PEM).
    pub tls: Option<(SocketAddr, PathBuf, PathBuf)>,
    /// The media ports handed out in answers, first and last inclusive.
    pub media_ports: (u16, u16),
    /// The address put in the answers' `c=` and the Contact.
    pub advertise: IpAddr,
    /// The recording clients allowed (empty: any).
    pub allow: Vec<IpNet>,
    /// The SIP header whose value is a recording's conversation id.
    pub conversation_id_header: Option<String>,
    /// Recording sessions at once.
    pub max_sessions: usize,
    /// A session with no RTP for this long is ended with a BYE.
    pub inactivity: std::time::Duration,
}

/// `[inbox]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbox {
    dir: Option<PathBuf>,
    rescan_secs: Option<Spanned<u64>>,
}

/// `[inbox]`, validated: digital recordings and transcripts to seal.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The directory another system renames files into.
    pub dir: PathBuf,
    /// How often it is scanned besides being watched.
    pub rescan: std::time::Duration,
}

/// `[control]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    listen: Option<Spanned<SocketAddr>>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_body_bytes: Option<Spanned<usize>>,
    #[serde(default)]
    allow_plaintext: bool,
    header_read_timeout_secs: Option<Spanned<u64>>,
    idle_timeout_secs: Option<Spanned<u64>>,
    max_connections: Option<Spanned<usize>>,
    max_connections_per_address: Option<Spanned<usize>>,
}

/// `[control]`, validated: the control API (conversation metadata, pause and resume).
#[derive(Debug, Clone)]
pub struct Control {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The bearer token (from `token_file`, or `EDGEREC_CONTROL_TOKEN`).
    pub token: zeroize::Zeroizing<String>,
    /// TLS certificate chain and key (PEM), if it speaks HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The largest request body taken.
    pub max_body_bytes: usize,
    /// What clients may hold of the listener (`header_read_timeout_secs`, …).
    pub limits: edgerec_net::https::Limits,
}

/// A validated configuration, paths resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[recorder]`, with `spool_dir` absolute.
    pub recorder: Recorder,
    /// `[ingest]`.
    pub ingest: Ingest,
    /// The ingest ports, first and last inclusive.
    pub ports: (u16, u16),
    /// The allowed source networks.
    pub allow: Vec<IpNet>,
    /// Where new recordings' KEK comes from.
    pub kek_source: KekSource,
    /// The escrow key file, absolute.
    pub escrow_public_key: Option<PathBuf>,
    /// Whether the committed demo key may be sealed to (`[keys] demo`).
    pub demo_keys: bool,
    /// The wrap.
    pub wrap: Wrap,
    /// The store.
    pub store: StoreKind,
    /// Prefix of every object key.
    pub prefix: String,
    /// The upload retry policy.
    pub retry: crate::store::retry::Policy,
    /// How often the uploader scans `ready/` besides watching it.
    pub rescan: std::time::Duration,
    /// Uploads at once.
    pub concurrency: usize,
    /// Multipart uploads no package refers to are aborted after this long (`None`: never).
    pub abort_orphans_after: Option<std::time::Duration>,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[log] level`: what is logged (an `EDGEREC_LOG` filter: `info`, `debug`,
    /// `edgerec=debug,info`); `EDGEREC_LOG` in the environment wins. `None`: info.
    pub log_level: Option<String>,
    /// `[outcomes] keep_days`: days of the outcome journal kept (30; 1 to 3660).
    pub outcomes_keep_days: u32,
    /// `[outcomes] manifest_period_secs`: how often a signed manifest of the recordings goes
    /// to the store (3600; 60 to 86400), on the period's UTC boundaries.
    pub manifest_period: std::time::Duration,
    /// `[identity] key_file`: the appliance's Ed25519 identity key (default `identity.key`
    /// in the spool directory; made at the first start).
    pub identity_key: PathBuf,
    /// `[control]`, if it has a `listen`.
    pub control: Option<Control>,
    /// `[inbox]`, if it has a `dir`.
    pub inbox: Option<InboxConfig>,
    /// `[siprec]`, if it has a `listen`.
    pub siprec: Option<Siprec>,
}

/// Builds the error text: file, line, key, value, problem.
struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    env: &'a dyn Environment,
}

impl Ctx<'_> {
    fn text(&self) -> edgerec_net::config_text::ConfigText<'_> {
        edgerec_net::config_text::ConfigText {
            file: self.file,
            text: self.text,
        }
    }

    fn err<T: std::fmt::Display>(&self, key: &str, v: &Spanned<T>, problem: &str) -> ConfigError {
        ConfigError(self.text().value_error(key, v.get_ref(), v.span(), problem))
    }

    fn positive(&self, key: &str, v: &Spanned<u64>) -> Result<(), ConfigError> {
        if *v.get_ref() == 0 {
            Err(self.err(key, v, "must be greater than 0"))
        } else {
            Ok(())
        }
    }

    fn missing(&self, key: &str, why: &str) -> ConfigError {
        ConfigError(format!(
            "config {}: {key} is missing: {why}",
            self.file.display()
        ))
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// Parses `A-B` or `A` into an inclusive port range.
pub fn parse_ports(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let p = s.trim().parse().ok()?;
            (p, p)
        }
    };
    (a > 0 && a <= b).then_some((a, b))
}

/// Where a config's secrets come from: environment variables and secret files. The
/// process's own in production ([`ProcessEnv`]); fixed values in tests, so validation is a
/// function of its inputs.
pub trait Environment {
    /// An environment variable, if set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;
    /// A secret file's text, held zeroized.
    fn read(&self, path: &Path) -> std::io::Result<zeroize::Zeroizing<String>>;
}

/// The process's environment and file system.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read(&self, path: &Path) -> std::io::Result<zeroize::Zeroizing<String>> {
        std::fs::read_to_string(path).map(zeroize::Zeroizing::new)
    }
}

/// `[recorder]`: every limit in its range.
fn check_recorder(cx: &Ctx<'_>, raw: &Raw) -> Result<(), ConfigError> {
    let r = &raw.recorder;
    cx.positive("recorder.flush_interval_ms", &r.flush_interval_ms)?;
    cx.positive("recorder.idle_timeout_ms", &r.idle_timeout_ms)?;
    cx.positive("recorder.max_recording_secs", &r.max_recording_secs)?;
    cx.positive("recorder.spool_max_bytes", &r.spool_max_bytes)?;
    if !(MIN_MAX_CHUNK..=MAX_MAX_CHUNK).contains(r.chunk_bytes.get_ref()) {
        return Err(cx.err(
            "recorder.chunk_bytes",
            &r.chunk_bytes,
            &format!("must be {MIN_MAX_CHUNK} to {MAX_MAX_CHUNK}"),
        ));
    }
    Ok(())
}

/// `[ingest]`: the port range, admission's limits, the sources allowed.
fn ingest_section(cx: &Ctx<'_>, raw: &Raw) -> Result<((u16, u16), Vec<IpNet>), ConfigError> {
    let ports = parse_ports(raw.ingest.ports.get_ref()).ok_or_else(|| {
        cx.err(
            "ingest.ports",
            &raw.ingest.ports,
            "not a port range A-B with 1 <= A <= B <= 65535",
        )
    })?;
    let i = &raw.ingest;
    if !(1..=10).contains(i.min_packets.get_ref()) {
        return Err(cx.err("ingest.min_packets", &i.min_packets, "must be 1 to 10"));
    }
    for (key, v) in [
        (
            "ingest.max_starts_per_source_per_sec",
            &i.max_starts_per_source_per_sec,
        ),
        (
            "ingest.max_starts_per_port_per_sec",
            &i.max_starts_per_port_per_sec,
        ),
    ] {
        if !(v.get_ref().is_finite() && *v.get_ref() > 0.0) {
            return Err(cx.err(key, v, "must be above 0"));
        }
    }
    if let Some(mib) = &i.journal_mib
        && *mib.get_ref() > crate::appliance::journal::MAX_CAPACITY >> 20
    {
        return Err(cx.err("ingest.journal_mib", mib, "must be at most 1024"));
    }
    if !(2..=1024).contains(i.ring_mib.get_ref()) {
        return Err(cx.err("ingest.ring_mib", &i.ring_mib, "must be 2 to 1024"));
    }
    let allow = allow_list(cx, "ingest.allow", &raw.ingest.allow)?;
    Ok((ports, allow))
}

/// `[keys]`: where the KEK comes from, and the wrap.
fn keys_section(cx: &Ctx<'_>, raw: &Raw) -> Result<(KekSource, Wrap), ConfigError> {
    let k = &raw.keys;
    let kek_source =
        match k.source.get_ref().as_str() {
            "file" => KekSource::File(k.public_key.as_deref().map(|p| cx.resolve(p)).ok_or_else(
                || cx.missing("keys.public_key", "the KEK public key file to seal to"),
            )?),
            "lkm" => {
                let url = k
                    .lkm_url
                    .as_ref()
                    .ok_or_else(|| cx.missing("keys.lkm_url", "the key manager's https URL"))?;
                if !url.get_ref().starts_with("https://") {
                    return Err(cx.err("keys.lkm_url", url, "must be an https:// URL"));
                }
                let credentials = k.lkm_credentials.as_deref().map(|p| cx.resolve(p));
                let credentials = credentials.ok_or_else(|| {
                    cx.missing(
                        "keys.lkm_credentials",
                        "the credential file edgerec lkm credentials add gave",
                    )
                })?;
                if *k.refresh_secs.get_ref() == 0 {
                    return Err(cx.err("keys.refresh_secs", &k.refresh_secs, "must be above 0"));
                }
                if k.max_age_secs.get_ref() < k.refresh_secs.get_ref() {
                    return Err(cx.err(
                        "keys.max_age_secs",
                        &k.max_age_secs,
                        "must be at least keys.refresh_secs",
                    ));
                }
                let on_stale = match k.on_stale.get_ref().as_str() {
                    "keep" => OnStale::Keep,
                    "refuse" => OnStale::Refuse,
                    _ => {
                        return Err(cx.err("keys.on_stale", &k.on_stale, "must be keep or refuse"));
                    }
                };
                KekSource::Lkm(LkmKeys {
                    target: edgerec_lkm::client::LkmTarget {
                        url: url.get_ref().clone(),
                        ca_file: k.lkm_ca.as_deref().map(|p| cx.resolve(p)),
                        credentials,
                        timeout: std::time::Duration::from_secs(10),
                        user: "edgerec-recorder".into(),
                    },
                    refresh: std::time::Duration::from_secs(*k.refresh_secs.get_ref()),
                    max_age: std::time::Duration::from_secs(*k.max_age_secs.get_ref()),
                    on_stale,
                    allow_demo: k.demo,
                    cache_file: k
                        .cache_file
                        .as_deref()
                        .map(|p| cx.resolve(p))
                        .unwrap_or_else(|| {
                            cx.resolve(&raw.recorder.spool_dir).join("lkm-key.json")
                        }),
                })
            }
            _ => return Err(cx.err("keys.source", &k.source, "must be file or lkm")),
        };
    let wrap = match raw.keys.wrap.get_ref().as_str() {
        "oaep-sha256" => Wrap::OaepSha256,
        "oaep-sha1" => Wrap::OaepSha1,
        _ => {
            return Err(cx.err(
                "keys.wrap",
                &raw.keys.wrap,
                "must be oaep-sha256 or oaep-sha1",
            ));
        }
    };
    Ok((kek_source, wrap))
}

/// `[store]` (with `[upload]`'s limits a store client needs): the store, its object key
/// prefix, and its secrets (through the environment).
fn store_section(cx: &Ctx<'_>, raw: &Raw) -> Result<(StoreKind, String), ConfigError> {
    let st = &raw.store;
    let mut prefix = String::new();
    let limit = Some(*raw.upload.bandwidth_bytes_per_sec.get_ref())
        .filter(|b| *b > 0)
        .map(crate::store::bandwidth::Limit::new);
    if let Some(p) = &st.prefix {
        if !p
            .get_ref()
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
        {
            return Err(cx.err("store.prefix", p, "only letters, digits and - _ . /"));
        }
        prefix = p.get_ref().clone();
    }
    let tls = store_tls(cx, st)?;
    let timeout = std::time::Duration::from_secs(*raw.upload.attempt_timeout_secs.get_ref());
    let store = match st.kind.get_ref().as_str() {
        "dir" => StoreKind::Dir(
            st.path
                .as_deref()
                .map(|p| cx.resolve(p))
                .ok_or_else(|| cx.missing("store.path", "the dir store's root directory"))?,
            limit,
        ),
        "s3" => StoreKind::S3(s3_store(cx, st, &raw.upload, tls, timeout, limit)?),
        "http" => http_store(cx, st, tls, timeout, limit)?,
        _ => {
            return Err(cx.err(
                "store.kind",
                &st.kind,
                "must be \"dir\", \"http\" or \"s3\"",
            ));
        }
    };
    Ok((store, prefix))
}

/// `[store]`'s TLS files (a CA, a client certificate and its key, which go together).
fn store_tls(cx: &Ctx<'_>, st: &RawStore) -> Result<crate::store::http::Tls, ConfigError> {
    let tls = crate::store::http::Tls {
        ca_file: st.ca_file.as_deref().map(|p| cx.resolve(p)),
        client_cert: st.client_cert.as_deref().map(|p| cx.resolve(p)),
        client_key: st.client_key.as_deref().map(|p| cx.resolve(p)),
    };
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(cx.missing(
            if tls.client_cert.is_some() {
                "store.client_key"
            } else {
                "store.client_cert"
            },
            "client_cert and client_key go together",
        ));
    }
    Ok(tls)
}

/// An export's `--out-config`: the `[store]` keys of an `s3` store but `bucket` and
/// `prefix` (the `--out s3://BUCKET/PREFIX` URL gives them), `[upload]`'s limits, and
/// `[export] organisation_id`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOut {
    store: RawStore,
    #[serde(default)]
    upload: RawUpload,
    #[serde(default)]
    export: RawExportOut,
}

/// `[export]` of an `--out-config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExportOut {
    /// The first level of `--layout platform` (`--org-id` overrides it).
    organisation_id: Option<Spanned<String>>,
}

/// A bucket an export writes to: its client, and the organisation id of the platform
/// layout if the file gives one.
#[derive(Debug)]
pub struct OutConfig {
    /// The client config (`bucket` from the URL).
    pub s3: crate::store::s3::S3Config,
    /// `[export] organisation_id`.
    pub organisation_id: Option<String>,
}

/// Whether `s` is an S3 bucket name (3–63 lower-case letters, digits, `-` and `.`).
pub fn is_bucket_name(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
}

impl OutConfig {
    /// Reads and validates an `--out-config` for `bucket`.
    pub fn load(file: &Path, bucket: &str) -> Result<OutConfig, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", file.display())))?;
        OutConfig::validate(file, &text, &ProcessEnv, bucket)
    }

    /// Validates `--out-config` text for `bucket` (already checked as a bucket name), its
    /// credentials taken from `env`.
    pub fn validate(
        file: &Path,
        text: &str,
        env: &dyn Environment,
        bucket: &str,
    ) -> Result<OutConfig, ConfigError> {
        let cx = Ctx { file, text, env };
        let raw: RawOut = toml::from_str(text)
            .map_err(|e| ConfigError(cx.text().parse_error(e.span(), e.message())))?;
        let st = &raw.store;
        // `kind` may be left out (the default, "dir", is no bucket) or say "s3".
        let kind = &st.kind;
        if kind.span() != (0..0) && kind.get_ref() != "s3" {
            return Err(cx.err(
                "store.kind",
                kind,
                "must be \"s3\": an export writes to a bucket",
            ));
        }
        for (key, v) in [("store.bucket", &st.bucket), ("store.prefix", &st.prefix)] {
            if let Some(v) = v {
                return Err(cx.err(
                    key,
                    v,
                    "is given by the --out s3://BUCKET/PREFIX URL: remove it from the file",
                ));
            }
        }
        if st.path.is_some() || st.url.is_some() || st.token_file.is_some() {
            return Err(ConfigError(format!(
                "config {}: store.path, store.url and store.token_file are not keys of an \
                 s3 bucket",
                file.display()
            )));
        }
        part_bytes(&cx, &raw.upload)?;
        cx.positive(
            "upload.attempt_timeout_secs",
            &raw.upload.attempt_timeout_secs,
        )?;
        let organisation_id = match &raw.export.organisation_id {
            Some(o) if !crate::export::is_organisation_id(o.get_ref()) => {
                return Err(cx.err(
                    "export.organisation_id",
                    o,
                    "must be 1 to 128 letters, digits, - _ . (not starting with a dot)",
                ));
            }
            o => o.as_ref().map(|o| o.get_ref().clone()),
        };
        let mut st = st.clone();
        st.bucket = Some(Spanned::new(0..0, bucket.to_string()));
        let tls = store_tls(&cx, &st)?;
        let timeout = std::time::Duration::from_secs(*raw.upload.attempt_timeout_secs.get_ref());
        let limit = Some(*raw.upload.bandwidth_bytes_per_sec.get_ref())
            .filter(|b| *b > 0)
            .map(crate::store::bandwidth::Limit::new);
        Ok(OutConfig {
            s3: s3_store(&cx, &st, &raw.upload, tls, timeout, limit)?,
            organisation_id,
        })
    }
}

/// `[store]` of kind `s3`: the endpoint, bucket and credentials (read now, from the file or
/// the environment).
fn s3_store(
    cx: &Ctx<'_>,
    st: &RawStore,
    upload: &RawUpload,
    tls: crate::store::http::Tls,
    timeout: std::time::Duration,
    limit: Option<crate::store::bandwidth::Limit>,
) -> Result<crate::store::s3::S3Config, ConfigError> {
    let endpoint = st
        .endpoint
        .as_ref()
        .ok_or_else(|| cx.missing("store.endpoint", "the S3 API's http(s) URL"))?;
    let e = endpoint.get_ref().trim_end_matches('/');
    if !(e.starts_with("http://") || e.starts_with("https://")) || e.contains('?') {
        return Err(cx.err("store.endpoint", endpoint, "must be http(s)://host[:port]"));
    }
    let bucket = st
        .bucket
        .as_ref()
        .ok_or_else(|| cx.missing("store.bucket", "the bucket packages go to"))?;
    let b = bucket.get_ref();
    if !is_bucket_name(b) {
        return Err(cx.err("store.bucket", bucket, "not an S3 bucket name"));
    }
    let credentials_file = st.credentials_file.as_ref().map(|f| cx.resolve(f));
    let found = edgerec_net::aws::resolve_credentials_with(
        credentials_file.as_deref(),
        st.profile.as_deref(),
        |name| cx.env.var(name),
        |path| cx.env.read(path),
    );
    let (access_key, secret_key) = match found {
        Ok(c) => (c.access_key, c.secret_key),
        Err(edgerec_net::aws::CredentialsError::Missing) => {
            return Err(cx.missing(
                "store.credentials_file",
                "S3 credentials: a shared-credentials file, or \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment",
            ));
        }
        Err(e) => {
            return Err(ConfigError(format!(
                "config {}: store.credentials_file {e}",
                cx.file.display()
            )));
        }
    };
    Ok(crate::store::s3::S3Config {
        endpoint: e.to_string(),
        region: st.region.clone().unwrap_or_else(|| "us-east-1".into()),
        bucket: b.clone(),
        access_key,
        secret_key,
        tls,
        timeout,
        limit,
        multipart_threshold: *upload.multipart_threshold_bytes.get_ref(),
        part_bytes: *upload.multipart_part_bytes.get_ref(),
    })
}

/// `[store]` of kind `http`: the URL template and a bearer token (read now) or a client
/// certificate.
fn http_store(
    cx: &Ctx<'_>,
    st: &RawStore,
    tls: crate::store::http::Tls,
    timeout: std::time::Duration,
    limit: Option<crate::store::bandwidth::Limit>,
) -> Result<StoreKind, ConfigError> {
    let url = st
        .url
        .as_ref()
        .ok_or_else(|| cx.missing("store.url", "where packages go, https://…/{key}"))?;
    crate::store::http::check_template(url.get_ref())
        .map_err(|why| cx.err("store.url", url, why))?;
    let token = match &st.token_file {
        Some(f) => {
            let f = cx.resolve(f);
            let text = cx.env.read(&f).map_err(|e| {
                ConfigError(format!(
                    "config {}: store.token_file {}: {e}",
                    cx.file.display(),
                    f.display()
                ))
            })?;
            Some(zeroize::Zeroizing::new(text.trim().to_string()))
        }
        None => cx
            .env
            .var("EDGEREC_STORE_TOKEN")
            .map(|t| zeroize::Zeroizing::new(t.trim().to_string())),
    }
    .filter(|t| !t.is_empty());
    if token.is_none() && tls.client_cert.is_none() {
        return Err(cx.missing(
            "store.token_file",
            "a bearer token (token_file, or EDGEREC_STORE_TOKEN in the \
             environment) or a client certificate (client_cert, client_key)",
        ));
    }
    Ok(StoreKind::Http(crate::store::http::HttpConfig {
        url: url.get_ref().clone(),
        token,
        tls,
        timeout,
        limit,
    }))
}

/// `[upload] multipart_part_bytes` within S3's limits on a part.
fn part_bytes(cx: &Ctx<'_>, u: &RawUpload) -> Result<(), ConfigError> {
    const MIB: u64 = 1 << 20;
    if !(5 * MIB..=5 * 1024 * MIB).contains(u.multipart_part_bytes.get_ref()) {
        return Err(cx.err(
            "upload.multipart_part_bytes",
            &u.multipart_part_bytes,
            "must be 5 MiB (5242880) to 5 GiB: S3's limits on a part",
        ));
    }
    Ok(())
}

/// `[upload]`: the retry policy, multipart sizes, concurrency.
fn upload_section(cx: &Ctx<'_>, raw: &Raw) -> Result<crate::store::retry::Policy, ConfigError> {
    let u = &raw.upload;
    cx.positive("upload.retry_initial_ms", &u.retry_initial_ms)?;
    cx.positive("upload.rescan_secs", &u.rescan_secs)?;
    cx.positive("upload.attempt_timeout_secs", &u.attempt_timeout_secs)?;
    part_bytes(cx, u)?;
    if u.multipart_threshold_bytes.get_ref() < u.multipart_part_bytes.get_ref() {
        return Err(cx.err(
            "upload.multipart_threshold_bytes",
            &u.multipart_threshold_bytes,
            "must be at least upload.multipart_part_bytes",
        ));
    }
    if !(1..=64).contains(u.concurrency.get_ref()) {
        return Err(cx.err("upload.concurrency", &u.concurrency, "must be 1 to 64"));
    }
    if u.retry_max_ms.get_ref() < u.retry_initial_ms.get_ref() {
        return Err(cx.err(
            "upload.retry_max_ms",
            &u.retry_max_ms,
            "must be at least upload.retry_initial_ms",
        ));
    }
    let retry = crate::store::retry::Policy {
        initial: std::time::Duration::from_millis(*u.retry_initial_ms.get_ref()),
        max: std::time::Duration::from_millis(*u.retry_max_ms.get_ref()),
        max_attempts: Some(*u.max_attempts.get_ref()).filter(|n| *n > 0),
    };
    Ok(retry)
}

/// `[control]`, if it listens: its token (through the environment), TLS and limits.
fn control_section(cx: &Ctx<'_>, raw: &Raw) -> Result<Option<Control>, ConfigError> {
    let control = match &raw.control.listen {
        None => None,
        Some(listen_at) => {
            let listen = listen_at.get_ref();
            let c = &raw.control;
            let token = match (&c.token_file, cx.env.var("EDGEREC_CONTROL_TOKEN")) {
                (_, Some(t)) if !t.trim().is_empty() => {
                    zeroize::Zeroizing::new(t.trim().to_string())
                }
                (Some(f), _) => {
                    let f = cx.resolve(f);
                    let text = cx.env.read(&f).map_err(|e| {
                        ConfigError(format!(
                            "config {}: control.token_file {}: {e}",
                            cx.file.display(),
                            f.display()
                        ))
                    })?;
                    zeroize::Zeroizing::new(text.trim().to_string())
                }
                (None, _) => {
                    return Err(cx.missing(
                        "control.token_file",
                        "the control API needs a bearer token (or EDGEREC_CONTROL_TOKEN)",
                    ));
                }
            };
            if token.len() < 16 {
                return Err(ConfigError(format!(
                    "config {}: the control token is shorter than 16 characters",
                    cx.file.display()
                )));
            }
            let tls = match (&c.tls_cert, &c.tls_key) {
                (Some(a), Some(b)) => Some((cx.resolve(a), cx.resolve(b))),
                (None, None) => None,
                _ => {
                    return Err(ConfigError(format!(
                        "config {}: control.tls_cert and control.tls_key go together",
                        cx.file.display()
                    )));
                }
            };
            let max_body_bytes = match &c.max_body_bytes {
                Some(m) if !(256..=1 << 20).contains(m.get_ref()) => {
                    return Err(cx.err("control.max_body_bytes", m, "must be 256 to 1048576"));
                }
                Some(m) => *m.get_ref(),
                None => 16 << 10,
            };
            // The bearer token travels in every request: in the clear only on loopback,
            // unless the operator says the network is trusted.
            if tls.is_none() && !listen.ip().is_loopback() && !c.allow_plaintext {
                return Err(cx.err(
                    "control.listen",
                    listen_at,
                    "not a loopback address, and no TLS (control.tls_cert, control.tls_key): \
                     the bearer token would cross the network in the clear; add TLS, or \
                     set control.allow_plaintext = true if the network is trusted",
                ));
            }
            let at = |v: &Option<Spanned<u64>>| v.as_ref().map(|v| (*v.get_ref(), v.span()));
            let at_n = |v: &Option<Spanned<usize>>| v.as_ref().map(|v| (*v.get_ref(), v.span()));
            let limits = edgerec_net::https::Limits::from_config_at(
                at(&c.header_read_timeout_secs),
                at(&c.idle_timeout_secs),
                at_n(&c.max_connections),
                at_n(&c.max_connections_per_address),
            )
            .map_err(|(key, why, span)| {
                ConfigError(
                    cx.text()
                        .parse_error(span, &format!("control.{key} = {why}")),
                )
            })?;
            Some(Control {
                listen: *listen,
                token,
                tls,
                max_body_bytes,
                limits,
            })
        }
    };
    Ok(control)
}

/// Networks and addresses of an `allow` list.
fn allow_list(
    cx: &Ctx<'_>,
    key: &str,
    list: &[Spanned<String>],
) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|c| {
            let s = c.get_ref().trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| cx.err(key, c, "not a CIDR network or address"))
        })
        .collect()
}

/// `[siprec]`, if it listens: its ports apart from the ingest ports, the address it
/// advertises, TLS, who may record to it and its bounds.
fn siprec_section(
    cx: &Ctx<'_>,
    raw: &Raw,
    ingest: (u16, u16),
) -> Result<Option<Siprec>, ConfigError> {
    let r = &raw.siprec;
    let Some(listen) = &r.listen else {
        let set = r.tls_listen.is_some()
            || r.media_ports.is_some()
            || r.advertise.is_some()
            || r.max_sessions.is_some();
        return if set {
            Err(cx.missing(
                "siprec.listen",
                "the SIPREC server needs an address to listen on",
            ))
        } else {
            Ok(None)
        };
    };
    let Some(mp) = &r.media_ports else {
        return Err(cx.missing(
            "siprec.media_ports",
            "the SIPREC server needs ports for the media it answers (e.g. \"41000-41999\")",
        ));
    };
    let media_ports = parse_ports(mp.get_ref())
        .filter(|(a, b)| b > a)
        .ok_or_else(|| {
            cx.err(
                "siprec.media_ports",
                mp,
                "not a port range A-B with 1 <= A < B <= 65535 (a stream takes an even port and \
                 the odd one above)",
            )
        })?;
    if media_ports.0 <= ingest.1 && ingest.0 <= media_ports.1 {
        return Err(cx.err(
            "siprec.media_ports",
            mp,
            &format!(
                "overlaps ingest.ports {}-{}: the SIPREC media ports must be apart",
                ingest.0, ingest.1
            ),
        ));
    }
    let advertise = match &r.advertise {
        Some(a) if a.get_ref().is_unspecified() => {
            return Err(cx.err(
                "siprec.advertise",
                a,
                "must be an address clients can reach",
            ));
        }
        Some(a) => *a.get_ref(),
        None if listen.get_ref().ip().is_unspecified() => {
            return Err(cx.missing(
                "siprec.advertise",
                "siprec.listen is a wildcard address: say which address clients send media to",
            ));
        }
        None => listen.get_ref().ip(),
    };
    let tls = match (&r.tls_listen, &r.tls_cert, &r.tls_key) {
        (None, None, None) => None,
        (Some(l), Some(c), Some(k)) => Some((*l.get_ref(), cx.resolve(c), cx.resolve(k))),
        _ => {
            return Err(ConfigError(format!(
                "config {}: siprec.tls_listen, siprec.tls_cert and siprec.tls_key go together",
                cx.file.display()
            )));
        }
    };
    let header = match &r.conversation_id_header {
        Some(h)
            if h.get_ref().is_empty()
                || !h
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') =>
        {
            return Err(cx.err(
                "siprec.conversation_id_header",
                h,
                "not a SIP header name (letters, digits, '-', '_', '.')",
            ));
        }
        h => h.as_ref().map(|h| h.get_ref().clone()),
    };
    let max_sessions = match &r.max_sessions {
        Some(m) if !(1..=10_000).contains(m.get_ref()) => {
            return Err(cx.err("siprec.max_sessions", m, "must be 1 to 10000"));
        }
        Some(m) => *m.get_ref(),
        None => 100,
    };
    let inactivity = match &r.inactivity_secs {
        Some(i) if !(5..=86_400).contains(i.get_ref()) => {
            return Err(cx.err("siprec.inactivity_secs", i, "must be 5 to 86400"));
        }
        Some(i) => *i.get_ref(),
        None => 60,
    };
    Ok(Some(Siprec {
        listen: *listen.get_ref(),
        tls,
        media_ports,
        advertise,
        allow: allow_list(cx, "siprec.allow", &r.allow)?,
        conversation_id_header: header,
        max_sessions,
        inactivity: std::time::Duration::from_secs(inactivity),
    }))
}

/// `[inbox]`, if configured.
fn inbox_section(cx: &Ctx<'_>, raw: &Raw) -> Result<Option<InboxConfig>, ConfigError> {
    let inbox = match &raw.inbox.dir {
        None => None,
        Some(d) => {
            let rescan = match &raw.inbox.rescan_secs {
                Some(r) if !(1..=3600).contains(r.get_ref()) => {
                    return Err(cx.err("inbox.rescan_secs", r, "must be 1 to 3600"));
                }
                Some(r) => *r.get_ref(),
                None => 30,
            };
            Some(InboxConfig {
                dir: cx.resolve(d),
                rescan: std::time::Duration::from_secs(rescan),
            })
        }
    };
    Ok(inbox)
}

/// `[log]`: the level, checked to be a filter `EDGEREC_LOG` would take.
fn log_section(cx: &Ctx<'_>, raw: &Raw) -> Result<Option<String>, ConfigError> {
    let Some(level) = &raw.log.level else {
        return Ok(None);
    };
    tracing_subscriber::EnvFilter::try_new(level.get_ref()).map_err(|e| {
        cx.err(
            "log.level",
            level,
            &format!("is not a log filter ({e}); e.g. \"info\", \"debug\", \"edgerec=debug,info\""),
        )
    })?;
    Ok(Some(level.get_ref().clone()))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", file.display())))?;
        Self::parse(file, &text)
    }

    /// Validates config text as if read from `file` (paths resolve against its directory),
    /// its secrets read from the process's environment and files.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::validate(file, text, &ProcessEnv)
    }

    /// Validates config text as if read from `file`, in three stages: the TOML read into
    /// its raw tables, each section checked by a function of its own, the secrets (store
    /// credentials, bearer tokens) taken from `env` — the process's environment and files
    /// in production, fixed values in a test. No other ambient state is read.
    pub fn validate(file: &Path, text: &str, env: &dyn Environment) -> Result<Config, ConfigError> {
        let cx = Ctx { file, text, env };
        let raw: Raw = toml::from_str(text)
            .map_err(|e| ConfigError(cx.text().parse_error(e.span(), e.message())))?;
        check_recorder(&cx, &raw)?;
        let (ports, allow) = ingest_section(&cx, &raw)?;
        let (kek_source, wrap) = keys_section(&cx, &raw)?;
        let (store, prefix) = store_section(&cx, &raw)?;
        let retry = upload_section(&cx, &raw)?;
        let control = control_section(&cx, &raw)?;
        let inbox = inbox_section(&cx, &raw)?;
        let siprec = siprec_section(&cx, &raw, ports)?;
        let log_level = log_section(&cx, &raw)?;
        let outcomes_keep_days = match &raw.outcomes.keep_days {
            Some(d) if !(1..=3660).contains(d.get_ref()) => {
                return Err(cx.err("outcomes.keep_days", d, "must be 1 to 3660"));
            }
            Some(d) => *d.get_ref(),
            None => 30,
        };
        let manifest_period = match &raw.outcomes.manifest_period_secs {
            Some(p) if !(60..=86_400).contains(p.get_ref()) => {
                return Err(cx.err("outcomes.manifest_period_secs", p, "must be 60 to 86400"));
            }
            Some(p) => std::time::Duration::from_secs(*p.get_ref()),
            None => std::time::Duration::from_secs(3600),
        };
        let mut recorder = raw.recorder.clone();
        recorder.spool_dir = cx.resolve(&recorder.spool_dir);
        let identity_key = match &raw.identity.key_file {
            Some(f) => cx.resolve(f),
            None => recorder.spool_dir.join("identity.key"),
        };
        Ok(Config {
            escrow_public_key: raw.keys.escrow_public_key.as_deref().map(|p| cx.resolve(p)),
            demo_keys: raw.keys.demo,
            recorder,
            ingest: raw.ingest,
            ports,
            allow,
            kek_source,
            control,
            inbox,
            siprec,
            wrap,
            store,
            prefix,
            retry,
            rescan: std::time::Duration::from_secs(*raw.upload.rescan_secs.get_ref()),
            concurrency: *raw.upload.concurrency.get_ref() as usize,
            abort_orphans_after: Some(*raw.upload.abort_orphans_after_secs.get_ref())
                .filter(|s| *s > 0)
                .map(std::time::Duration::from_secs),
            metrics: raw.metrics,
            log_level,
            outcomes_keep_days,
            manifest_period,
            identity_key,
        })
    }

    /// The crash journal's size in bytes (`[ingest] journal_mib`, or from the port count and
    /// the flush interval); `None`: none is kept.
    pub fn journal_bytes(&self) -> Option<u64> {
        match &self.ingest.journal_mib {
            Some(mib) if *mib.get_ref() == 0 => None,
            Some(mib) => Some(mib.get_ref() << 20),
            None => Some(crate::appliance::journal::default_capacity(
                u64::from(self.ports.1 - self.ports.0) + 1,
                std::time::Duration::from_millis(*self.recorder.flush_interval_ms.get_ref()),
            )),
        }
    }

    /// The recording limits the session state machine works with.
    pub fn limits(&self) -> crate::appliance::session::Limits {
        let r = &self.recorder;
        let rate = |per_sec: f64| edgerec_net::rate_limit::Limit {
            rate: per_sec,
            burst: per_sec.max(1.0),
        };
        crate::appliance::session::Limits {
            idle_timeout_us: r.idle_timeout_ms.get_ref() * 1000,
            max_recording_us: r.max_recording_secs.get_ref() * 1_000_000,
            flush_interval_us: r.flush_interval_ms.get_ref() * 1000,
            max_chunk: *r.chunk_bytes.get_ref() as usize,
            min_packets: *self.ingest.min_packets.get_ref(),
            starts_per_source: rate(*self.ingest.max_starts_per_source_per_sec.get_ref()),
            starts_per_port: rate(*self.ingest.max_starts_per_port_per_sec.get_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[recorder]
spool_dir = "var/spool"
flush_interval_ms = 500

[ingest]
ports = "40000-40009"
allow = ["10.0.0.0/8", "192.0.2.7"]

[keys]
public_key = "keys/kek.pub.pem"

[store]
kind = "dir"
path = "/srv/store"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/edgerec/edgerec.toml"), text)
    }

    /// Fixed secrets: what a test gives, nothing of the process's.
    #[derive(Default)]
    struct FakeEnv {
        vars: Vec<(&'static str, &'static str)>,
        files: Vec<(&'static str, &'static str)>,
    }

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }

        fn read(&self, path: &Path) -> std::io::Result<zeroize::Zeroizing<String>> {
            self.files
                .iter()
                .find(|(p, _)| Path::new(p) == path)
                .map(|(_, t)| zeroize::Zeroizing::new(t.to_string()))
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn an_export_buckets_config_is_an_s3_store_without_bucket_or_prefix() {
        let file = Path::new("/etc/edgerec/export.toml");
        let env = FakeEnv {
            vars: vec![
                ("AWS_ACCESS_KEY_ID", "AKID"),
                ("AWS_SECRET_ACCESS_KEY", "s3cret"),
            ],
            ..FakeEnv::default()
        };
        let good = "[store]\nendpoint = \"https://s3.example/\"\nregion = \"eu-west-1\"\n\
                    [upload]\nmultipart_part_bytes = 5242880\n\
                    [export]\norganisation_id = \"org-1\"\n";
        let c = OutConfig::validate(file, good, &env, "exports").unwrap();
        assert_eq!(
            (
                c.s3.bucket.as_str(),
                c.s3.endpoint.as_str(),
                c.s3.part_bytes
            ),
            ("exports", "https://s3.example", 5 << 20)
        );
        assert_eq!(c.organisation_id.as_deref(), Some("org-1"));
        let err = |text: &str| {
            OutConfig::validate(file, text, &env, "exports")
                .unwrap_err()
                .to_string()
        };
        let e = err(&good.replace("[store]\n", "[store]\nbucket = \"b\"\n"));
        assert!(
            e.contains("store.bucket") && e.contains("--out s3://"),
            "{e}"
        );
        let e = err(&good.replace("[store]\n", "[store]\nprefix = \"p/\"\n"));
        assert!(e.contains("store.prefix"), "{e}");
        let e = err(&good.replace("[store]\n", "[store]\nkind = \"dir\"\n"));
        assert!(e.contains("store.kind"), "{e}");
        let e = err(&good.replace("org-1", "../x"));
        assert!(e.contains("export.organisation_id"), "{e}");
        let e = err(&good.replace("5242880", "1024"));
        assert!(e.contains("multipart_part_bytes"), "{e}");
        let e = err(&good.replace("[export]", "[recorder]"));
        assert!(e.contains("recorder"), "{e}");
        let e = OutConfig::validate(file, good, &FakeEnv::default(), "exports")
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials"), "{e}");
    }

    #[test]
    fn secrets_come_from_the_environment_given_and_nowhere_else() {
        let file = Path::new("/etc/edgerec/edgerec.toml");
        let s3 = "[keys]\npublic_key = \"k.pem\"\n[store]\nkind = \"s3\"\n\
                  endpoint = \"https://s3.example\"\nbucket = \"recs\"\n\
                  [control]\nlisten = \"127.0.0.1:9001\"\n";
        let env = FakeEnv {
            vars: vec![
                ("AWS_ACCESS_KEY_ID", "AKID"),
                ("AWS_SECRET_ACCESS_KEY", "s3cret"),
                ("EDGEREC_CONTROL_TOKEN", "0123456789abcdef-token"),
            ],
            ..FakeEnv::default()
        };
        let c = Config::validate(file, s3, &env).unwrap();
        assert!(
            matches!(&c.store, StoreKind::S3(s) if s.access_key == "AKID" && s.secret_key.as_str() == "s3cret")
        );
        assert_eq!(c.control.unwrap().token.as_str(), "0123456789abcdef-token");
        // Without them, each is named as missing, whatever the process's environment holds.
        let e = Config::validate(file, s3, &FakeEnv::default()).unwrap_err();
        assert!(e.0.contains("store.credentials_file is missing"), "{e}");
        // Secret files are read through it too, relative to the config's directory.
        let http = "[keys]\npublic_key = \"k.pem\"\n[store]\nkind = \"http\"\n\
                    url = \"https://rec.example/{key}\"\ntoken_file = \"store.token\"\n";
        let env = FakeEnv {
            files: vec![("/etc/edgerec/store.token", "bearer-from-a-file\n")],
            ..FakeEnv::default()
        };
        let c = Config::validate(file, http, &env).unwrap();
        assert!(
            matches!(&c.store, StoreKind::Http(h) if h.token.as_deref().map(String::as_str) == Some("bearer-from-a-file"))
        );
        let e = Config::validate(file, http, &FakeEnv::default()).unwrap_err();
        assert!(
            e.0.contains("store.token_file /etc/edgerec/store.token"),
            "{e}"
        );
    }

    #[test]
    fn a_good_file_with_defaults_and_resolved_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.ports, (40000, 40009));
        assert_eq!(c.allow.len(), 2);
        assert_eq!(c.recorder.spool_dir, Path::new("/etc/edgerec/var/spool"));
        assert!(
            matches!(&c.kek_source, KekSource::File(p) if p == Path::new("/etc/edgerec/keys/kek.pub.pem"))
        );
        assert!(matches!(&c.store, StoreKind::Dir(p, None) if p == Path::new("/srv/store")));
        assert_eq!(c.wrap, Wrap::OaepSha256);
        let l = c.limits();
        assert_eq!(
            (l.flush_interval_us, l.idle_timeout_us),
            (500_000, 5_000_000)
        );
        assert_eq!(c.metrics.listen, "127.0.0.1:9464".parse().unwrap());
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().0
    }

    #[test]
    fn errors_name_key_value_and_line() {
        let e = err(&GOOD.replace(
            "flush_interval_ms = 500",
            "flush_interval_ms = 500\nbogus = 1",
        ));
        assert!(e.contains("line 5") && e.contains("bogus"), "{e}");
        let e = err(&GOOD.replace("40000-40009", "40009-40000"));
        assert!(
            e.contains("line 7") && e.contains("ingest.ports = 40009-40000"),
            "{e}"
        );
        let e = err(&GOOD.replace("10.0.0.0/8", "10.0.0.0/99"));
        assert!(
            e.contains("line 8") && e.contains("ingest.allow = 10.0.0.0/99"),
            "{e}"
        );
        let e = err(&GOOD.replace("flush_interval_ms = 500", "flush_interval_ms = 0"));
        assert!(e.contains("line 4") && e.contains("greater than 0"), "{e}");
        let e = err(&GOOD.replace("40000-40009\"", "40000-40009\"\nmin_packets = 0"));
        assert!(
            e.contains("ingest.min_packets = 0") && e.contains("1 to 10"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "40000-40009\"",
            "40000-40009\"\nmax_starts_per_port_per_sec = -1",
        ));
        assert!(
            e.contains("ingest.max_starts_per_port_per_sec = -1") && e.contains("above 0"),
            "{e}"
        );
        let e = err(&GOOD.replace("flush_interval_ms = 500", "flush_interval_ms = \"fast\""));
        assert!(e.contains("line 4") && e.contains("invalid type"), "{e}");
        let e = err(&GOOD.replace("kind = \"dir\"", "kind = \"nfs\""));
        assert!(e.contains("store.kind = nfs"), "{e}");
        let e = err(&GOOD.replace("kind = \"dir\"", "kind = \"s3\""));
        assert!(e.contains("store.endpoint is missing"), "{e}");
        let s3 = GOOD.replace(
            "kind = \"dir\"",
            "kind = \"s3\"\nendpoint = \"http://127.0.0.1:8333\"\nbucket = \"Bad_Bucket\"",
        );
        let e = err(&s3);
        assert!(e.contains("store.bucket = Bad_Bucket"), "{e}");
        let http =
            |lines: &str| GOOD.replace("kind = \"dir\"", &format!("kind = \"http\"\n{lines}"));
        let e = err(&http(""));
        assert!(e.contains("store.url is missing"), "{e}");
        let e = err(&http("url = \"https://s.example/rec/\""));
        assert!(
            e.contains("store.url = https://s.example/rec/") && e.contains("{key}"),
            "{e}"
        );
        let e = err(&http("url = \"https://s.example/{key}\""));
        assert!(e.contains("store.token_file is missing"), "{e}");
        let e = err(&http(
            "url = \"https://s.example/{key}\"\nclient_cert = \"c.pem\"",
        ));
        assert!(e.contains("store.client_key is missing"), "{e}");
        let e = err(&http(
            "url = \"https://s.example/{key}\"\ntoken_file = \"/nonexistent/token\"",
        ));
        assert!(e.contains("store.token_file /nonexistent/token"), "{e}");
        let c = parse(&http(
            "url = \"https://s.example/{key}\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"",
        ))
        .unwrap();
        match c.store {
            StoreKind::Http(h) => {
                assert_eq!(h.tls.client_key, Some(PathBuf::from("/etc/edgerec/k.pem")));
                assert!(h.token.is_none());
            }
            other => panic!("{other:?}"),
        }
        let e = err(&GOOD.replace("public_key = \"keys/kek.pub.pem\"", ""));
        assert!(e.contains("keys.public_key is missing"), "{e}");
        let e = err(&GOOD.replace("[keys]", "[keys]\nwrap = \"rsa\""));
        assert!(e.contains("keys.wrap = rsa"), "{e}");
        let e = err("[recorder]\n");
        assert!(e.contains("keys"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[upload]\nretry_initial_ms = 500\nretry_max_ms = 100\n"
        ));
        assert!(
            e.contains("line 19") && e.contains("upload.retry_max_ms = 100"),
            "{e}"
        );
        let e = err(&format!("{GOOD}\n[upload]\nconcurrency = 0\n"));
        assert!(e.contains("upload.concurrency = 0"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[upload]\nmultipart_part_bytes = 1048576\n"
        ));
        assert!(e.contains("upload.multipart_part_bytes = 1048576"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[upload]\nmultipart_threshold_bytes = 6000000\nmultipart_part_bytes = 8000000\n"
        ));
        assert!(e.contains("upload.multipart_threshold_bytes"), "{e}");
        let e = err(&format!("{GOOD}\n[upload]\nparallelism = 9\n"));
        assert!(e.contains("parallelism"), "{e}");
    }

    #[test]
    fn the_control_api_needs_a_long_enough_token_and_takes_its_limits() {
        assert!(
            parse(GOOD).unwrap().control.is_none(),
            "off without a listen"
        );
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef-long-enough\n").unwrap();
        let with = |extra: &str| {
            format!(
                "{GOOD}\n[control]\nlisten = \"127.0.0.1:9465\"\ntoken_file = \"{}\"\n{extra}",
                token.display()
            )
        };
        let c = parse(&with("")).unwrap().control.unwrap();
        assert_eq!(c.token.as_str(), "0123456789abcdef-long-enough");
        assert_eq!(c.max_body_bytes, 16 << 10);
        assert!(c.tls.is_none());
        let e = err(&with("max_body_bytes = 10"));
        assert!(e.contains("control.max_body_bytes = 10"), "{e}");
        let e = err(&with("tls_cert = \"c.pem\""));
        assert!(e.contains("go together"), "{e}");
        assert_eq!(c.limits, edgerec_net::https::Limits::default());
        let c = parse(&with(
            "header_read_timeout_secs = 3\nmax_connections_per_address = 8",
        ))
        .unwrap()
        .control
        .unwrap();
        assert_eq!(
            c.limits.header_read_timeout,
            std::time::Duration::from_secs(3)
        );
        assert_eq!(c.limits.max_connections_per_address, 8);
        let e = err(&with("idle_timeout_secs = 0"));
        assert!(
            e.contains("control.idle_timeout_secs = 0") && e.contains("line"),
            "{e}"
        );
        // The token in the clear off loopback: only when the operator says so.
        let open = |extra: &str| {
            format!(
                "{GOOD}\n[control]\nlisten = \"0.0.0.0:9465\"\ntoken_file = \"{}\"\n{extra}",
                token.display()
            )
        };
        let e = err(&open(""));
        assert!(
            e.contains("control.listen") && e.contains("allow_plaintext"),
            "{e}"
        );
        assert!(parse(&open("allow_plaintext = true")).is_ok());
        assert!(parse(&open("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"")).is_ok());
        std::fs::write(&token, "short").unwrap();
        assert!(err(&with("")).contains("shorter than 16"));
        let e = err(&format!("{GOOD}\n[control]\nlisten = \"127.0.0.1:9465\"\n"));
        assert!(e.contains("control.token_file is missing"), "{e}");
    }

    #[test]
    fn the_key_manager_source_takes_its_keys_and_names_what_is_missing() {
        let lkm = GOOD.replace(
            "public_key = \"keys/kek.pub.pem\"",
            "source = \"lkm\"\nlkm_url = \"https://lkm.example:8443\"\nlkm_ca = \"ca.pem\"\n\
             lkm_credentials = \"rec.cred\"\nrefresh_secs = 30\nmax_age_secs = 600\n\
             on_stale = \"refuse\"",
        );
        let c = parse(&lkm).unwrap();
        let KekSource::Lkm(k) = &c.kek_source else {
            panic!("{:?}", c.kek_source)
        };
        assert_eq!(k.target.url, "https://lkm.example:8443");
        assert_eq!(
            k.target.ca_file.as_deref(),
            Some(Path::new("/etc/edgerec/ca.pem"))
        );
        assert_eq!(k.target.credentials, Path::new("/etc/edgerec/rec.cred"));
        assert_eq!(k.refresh, std::time::Duration::from_secs(30));
        assert_eq!(k.max_age, std::time::Duration::from_secs(600));
        assert_eq!(k.on_stale, OnStale::Refuse);
        assert!(k.cache_file.ends_with("lkm-key.json"), "{:?}", k.cache_file);
        let e = err(&lkm.replace("lkm_url = \"https://lkm.example:8443\"\n", ""));
        assert!(e.contains("keys.lkm_url is missing"), "{e}");
        let e = err(&lkm.replace("https://lkm", "http://lkm"));
        assert!(e.contains("must be an https"), "{e}");
        let e = err(&lkm.replace("lkm_credentials = \"rec.cred\"\n", ""));
        assert!(e.contains("keys.lkm_credentials is missing"), "{e}");
        let e = err(&lkm.replace("max_age_secs = 600", "max_age_secs = 10"));
        assert!(e.contains("keys.max_age_secs = 10"), "{e}");
        let e = err(&lkm.replace("\"refuse\"", "\"panic\""));
        assert!(e.contains("keys.on_stale = panic"), "{e}");
        let e = err(&lkm.replace("\"lkm\"", "\"vault\""));
        assert!(e.contains("keys.source = vault"), "{e}");
    }

    #[test]
    fn the_retry_policy_defaults_to_forever_and_takes_its_keys() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.retry, crate::store::retry::Policy::default());
        let c = parse(&format!(
            "{GOOD}\n[upload]\nretry_initial_ms = 200\nretry_max_ms = 60000\nmax_attempts = 10\n"
        ))
        .unwrap();
        assert_eq!(c.retry.initial, std::time::Duration::from_millis(200));
        assert_eq!(c.retry.max, std::time::Duration::from_secs(60));
        assert_eq!(c.retry.max_attempts, Some(10));
    }

    #[test]
    fn a_log_level_is_checked_as_a_filter() {
        let c = parse(&format!("{GOOD}\n[log]\nlevel = \"edgerec=debug,info\"\n")).unwrap();
        assert_eq!(c.log_level.as_deref(), Some("edgerec=debug,info"));
        assert_eq!(parse(GOOD).unwrap().log_level, None);
        let e = parse(&format!("{GOOD}\n[log]\nlevel = \"edgerec=loud\"\n")).unwrap_err();
        assert!(
            e.0.contains("log.level") && e.0.contains("not a log filter"),
            "{e}"
        );
    }

    #[test]
    fn outcome_retention_and_the_journal_size_are_bounded() {
        assert_eq!(parse(GOOD).unwrap().outcomes_keep_days, 30);
        let c = parse(&format!("{GOOD}\n[outcomes]\nkeep_days = 400\n")).unwrap();
        assert_eq!(c.outcomes_keep_days, 400);
        assert_eq!(c.manifest_period.as_secs(), 3600);
        let c = parse(&format!("{GOOD}\n[outcomes]\nmanifest_period_secs = 60\n")).unwrap();
        assert_eq!(c.manifest_period.as_secs(), 60);
        let e = parse(&format!("{GOOD}\n[outcomes]\nmanifest_period_secs = 59\n")).unwrap_err();
        assert!(
            e.0.contains("outcomes.manifest_period_secs") && e.0.contains("60 to 86400"),
            "{}",
            e.0
        );
        let e = parse(&format!("{GOOD}\n[outcomes]\nkeep_days = 0\n")).unwrap_err();
        assert!(
            e.0.contains("outcomes.keep_days") && e.0.contains("1 to 3660"),
            "{e}"
        );
        let c = parse(&GOOD.replace("[ingest]", "[ingest]\njournal_mib = 0")).unwrap();
        assert_eq!(c.journal_bytes(), None);
        let e = parse(&GOOD.replace("[ingest]", "[ingest]\njournal_mib = 4096")).unwrap_err();
        assert!(e.0.contains("ingest.journal_mib"), "{e}");
    }

    #[test]
    fn ingest_modes_and_the_ring_size_are_checked() {
        use crate::appliance::ingest::Mode;
        let c = parse(GOOD).unwrap();
        assert_eq!(c.ingest.mode, Mode::Auto, "the default");
        assert_eq!(*c.ingest.ring_mib.get_ref(), 32);
        for (text, mode) in [
            ("ring", Mode::Ring),
            ("recvmmsg", Mode::Recvmmsg),
            ("io_uring", Mode::IoUring),
            ("auto", Mode::Auto),
        ] {
            let c =
                parse(&GOOD.replace("[ingest]", &format!("[ingest]\nmode = \"{text}\""))).unwrap();
            assert_eq!(c.ingest.mode, mode);
            assert_eq!(mode.name(), text);
        }
        let e = parse(&GOOD.replace("[ingest]", "[ingest]\nmode = \"epoll\"")).unwrap_err();
        // serde names the line and the modes there are.
        assert!(e.0.contains("epoll") && e.0.contains("recvmmsg"), "{e}");
        for bad in ["1", "2048"] {
            let e = parse(&GOOD.replace("[ingest]", &format!("[ingest]\nring_mib = {bad}")))
                .unwrap_err();
            assert!(e.0.contains("ingest.ring_mib"), "{e}");
        }
    }

    #[test]
    fn the_sample_config_is_valid() {
        let file =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("samples/edgerec.toml");
        let c = Config::load(&file).unwrap();
        let KekSource::File(public_key) = &c.kek_source else {
            panic!("the sample seals to a key file")
        };
        assert!(public_key.ends_with("samples/demo-kek.pub.pem"));
        erec::keys::KekPublic::from_file(public_key).unwrap();
        assert_eq!(
            c.recorder.spool_dir,
            file.parent().unwrap().join("../var/spool")
        );
    }

    #[test]
    fn the_sample_siprec_section_is_valid_once_uncommented() {
        let file =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("samples/edgerec.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let mut on = false;
        let mut lines = Vec::new();
        for l in text.lines() {
            on = (on || l == "# [siprec]") && !l.is_empty();
            let key = l
                .strip_prefix("# ")
                .filter(|k| k.starts_with('[') || k.split(" = ").count() > 1);
            lines.push(match key {
                Some(k) if on => k,
                _ => l,
            });
        }
        let s = Config::parse(&file, &lines.join("\n"))
            .unwrap()
            .siprec
            .unwrap();
        assert_eq!(s.media_ports, (41000, 41999));
        assert_eq!(
            s.conversation_id_header.as_deref(),
            Some("X-Conversation-Id")
        );
        assert!(s.tls.is_some());
    }

    #[test]
    fn the_siprec_server_is_checked_key_by_key() {
        assert!(parse(GOOD).unwrap().siprec.is_none());
        let with = |body: &str| format!("{GOOD}\n[siprec]\n{body}");
        let c = parse(&with(
            "listen = \"127.0.0.1:5060\"\nmedia_ports = \"41000-41099\"\n\
             allow = [\"192.0.2.0/24\"]\nconversation_id_header = \"X-Conversation-Id\"",
        ))
        .unwrap()
        .siprec
        .unwrap();
        assert_eq!(c.media_ports, (41000, 41099));
        assert_eq!(
            c.advertise.to_string(),
            "127.0.0.1",
            "defaults to listen's address"
        );
        assert_eq!(c.max_sessions, 100);
        assert_eq!(c.inactivity.as_secs(), 60);
        assert_eq!(c.allow.len(), 1);
        assert_eq!(
            c.conversation_id_header.as_deref(),
            Some("X-Conversation-Id")
        );
        for (body, wanted) in [
            ("media_ports = \"41000-41099\"", "siprec.listen is missing"),
            (
                "listen = \"127.0.0.1:5060\"",
                "siprec.media_ports is missing",
            ),
            (
                "listen = \"127.0.0.1:5060\"\nmedia_ports = \"40008-40100\"",
                "overlaps ingest.ports 40000-40009",
            ),
            (
                "listen = \"0.0.0.0:5060\"\nmedia_ports = \"41000-41099\"",
                "siprec.advertise is missing",
            ),
            (
                "listen = \"127.0.0.1:5060\"\nmedia_ports = \"41000-41000\"",
                "siprec.media_ports = 41000-41000",
            ),
            (
                "listen = \"127.0.0.1:5060\"\nmedia_ports = \"41000-41099\"\nmax_sessions = 0",
                "siprec.max_sessions = 0",
            ),
            (
                "listen = \"127.0.0.1:5060\"\nmedia_ports = \"41000-41099\"\nallow = [\"nope\"]",
                "siprec.allow = nope",
            ),
            (
                "listen = \"127.0.0.1:5060\"\nmedia_ports = \"41000-41099\"\n\
                 conversation_id_header = \"X Bad\"",
                "siprec.conversation_id_header",
            ),
            (
                "listen = \"127.0.0.1:5060\"\nmedia_ports = \"41000-41099\"\n\
                 tls_listen = \"127.0.0.1:5061\"",
                "go together",
            ),
        ] {
            let e = err(&with(body));
            assert!(e.contains(wanted), "{body}: {e}");
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_ports("40000-40999"), Some((40000, 40999)));
        assert_eq!(parse_ports(" 5004 "), Some((5004, 5004)));
        for bad in ["0-10", "10-9", "a-b", "70000", "1-70000", ""] {
            assert_eq!(parse_ports(bad), None, "{bad}");
        }
    }
}
