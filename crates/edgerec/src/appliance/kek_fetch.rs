//! Rotation by the key manager (`[keys] source = "lkm"`): the current public key is fetched
//! from the Local Key Manager over TLS (its CA pinned) every `refresh_secs`, and the last
//! good one is cached on disk, so recording goes on through a key manager outage and
//! across restarts. A new key becomes the KEK of every recording started from then on;
//! recordings in progress keep theirs.
//!
//! Invariants:
//! - Public keys only: the cache holds what `GET …/current` returned (id, public key, its
//!   date) and when it was last confirmed; nothing here ever sees a private key.
//! - The cache is replaced atomically (temporary file, fsync, rename), 0600; a cache that
//!   does not parse, or whose public key is not the key of its id, is not used.
//! - A key not confirmed for `max_age_secs` is stale: with `on_stale = "keep"` recording goes
//!   on with it (logged once, `edgerec_kek_age_seconds` rises); with `"refuse"` new
//!   recordings are refused (`recordings_refused_total{reason="kek_stale"}`) until the key
//!   manager answers again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::appliance::config::{LkmKeys, OnStale};
use crate::appliance::metrics::{KekLabel, Metrics};
use crate::appliance::shutdown::Shutdown;
use edgerec_lkm::client::{CurrentKey, LkmClient};
use erec::keys::{KekHandle, KekPublic};

/// The cache file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CachedKey {
    /// The kek id (hex).
    pub id: String,
    /// base64 of the DER RSAPublicKey, as the key manager publishes it.
    pub public_key: String,
    /// When the key pair was made, unix ms.
    pub date_created: u64,
    /// When the key manager last confirmed it as current, unix ms.
    pub confirmed_at: u64,
}

/// What to do with the key in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Confirmed recently enough.
    Fresh,
    /// Stale, and the policy says record on with it.
    StaleKept,
    /// Stale, and the policy says refuse new recordings.
    StaleRefused,
}

/// Whether a key confirmed at `confirmed_at` is still to be used at `now_ms`.
pub fn verdict(confirmed_at: u64, now_ms: u64, max_age: Duration, on_stale: OnStale) -> Freshness {
    let age = now_ms.saturating_sub(confirmed_at);
    if u128::from(age) <= max_age.as_millis() {
        Freshness::Fresh
    } else if on_stale == OnStale::Keep {
        Freshness::StaleKept
    } else {
        Freshness::StaleRefused
    }
}

impl CachedKey {
    fn of(key: &CurrentKey, now_ms: u64) -> CachedKey {
        CachedKey {
            id: key.kek.id().to_hex(),
            public_key: base64::engine::general_purpose::STANDARD.encode(key.kek.to_pkcs1_der()),
            date_created: key.date_created,
            confirmed_at: now_ms,
        }
    }

    /// The public key, checked against the id.
    pub fn kek(&self) -> Result<KekPublic, CachedKeyError> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(&self.public_key)
            .map_err(CachedKeyError::Base64)?;
        let kek = KekPublic::from_der("the cached key", &der)?;
        if kek.id().to_hex() != self.id {
            return Err(CachedKeyError::WrongId);
        }
        Ok(kek)
    }
}

/// What is wrong with a cached key.
#[derive(Debug, thiserror::Error)]
pub enum CachedKeyError {
    /// Its `publicKey` is not base64.
    #[error("publicKey: {0}")]
    Base64(base64::DecodeError),
    /// Its key is not a usable RSA public key.
    #[error(transparent)]
    Key(#[from] erec::keys::KeyError),
    /// Its key is not the one its id names.
    #[error("its public key is not the key of its id")]
    WrongId,
}

/// Why the key cache could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The cache file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a cached key's JSON.
    #[error("{}: {source}", path.display())]
    Json {
        /// The cache file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Its key is not usable.
    #[error("{}: {source}", path.display())]
    Key {
        /// The cache file.
        path: PathBuf,
        /// Why.
        source: CachedKeyError,
    },
}

/// Reads the cache; `None` if there is none.
pub fn read_cache(path: &Path) -> Result<Option<(KekPublic, CachedKey)>, CacheError> {
    let at = || path.to_path_buf();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Io { path: at(), source }),
    };
    let c: CachedKey =
        serde_json::from_slice(&bytes).map_err(|source| CacheError::Json { path: at(), source })?;
    let kek = c
        .kek()
        .map_err(|source| CacheError::Key { path: at(), source })?;
    Ok(Some((kek, c)))
}

/// Replaces the cache atomically.
pub fn write_cache(path: &Path, c: &CachedKey) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?;
    edgerec_net::durable::replace_file(path, &bytes)
}

/// Why the key fetcher has no key to start with.
#[derive(Debug, thiserror::Error)]
pub enum FetchStartError {
    /// The key manager's client could not be set up.
    #[error(transparent)]
    Client(#[from] edgerec_lkm::client::SetupError),
    /// The key manager's answer could not be cached.
    #[error("keys.cache_file {}: {source}", path.display())]
    WriteCache {
        /// The cache file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key manager did not answer, and the cache could not be read.
    #[error(transparent)]
    ReadCache(#[from] CacheError),
    /// The key manager did not answer, and no key is cached.
    #[error("{source}; and there is no cached key ({}) to record with", cache.display())]
    NoKey {
        /// The cache file.
        cache: std::path::PathBuf,
        /// Why the key manager did not answer.
        source: edgerec_lkm::client::LkmClientError,
    },
}

/// The key fetcher, after its first answer (or the cache) gave a key.
pub struct Fetcher {
    cfg: LkmKeys,
    client: LkmClient,
    escrow: Option<KekPublic>,
    cached: CachedKey,
    stale_logged: bool,
    /// Once triggered (the source replaced by a reload, or the appliance stopping), a round
    /// still in flight changes the keys no more.
    stopped: Option<Shutdown>,
}

impl Fetcher {
    /// Asks the key manager for the current key at start; when it cannot answer, takes the
    /// cached key. Returns the fetcher and the recipients to start with.
    pub fn start(
        cfg: &LkmKeys,
        escrow: Option<KekPublic>,
        now_ms: u64,
    ) -> Result<(Fetcher, Vec<KekPublic>), FetchStartError> {
        let client = LkmClient::new(&cfg.target)?;
        let (kek, cached) = match client.current() {
            Ok(k) => {
                let c = CachedKey::of(&k, now_ms);
                write_cache(&cfg.cache_file, &c).map_err(|source| FetchStartError::WriteCache {
                    path: cfg.cache_file.clone(),
                    source,
                })?;
                tracing::info!(kek_id = %c.id, url = %cfg.target.url, "current key from the key manager");
                (k.kek, c)
            }
            Err(e) => match read_cache(&cfg.cache_file)? {
                Some((kek, c)) => {
                    tracing::warn!(error = %e, kek_id = %c.id, "the key manager does not answer: recording with the cached key");
                    (kek, c)
                }
                None => {
                    return Err(FetchStartError::NoKey {
                        cache: cfg.cache_file.clone(),
                        source: e,
                    });
                }
            },
        };
        let mut f = Fetcher {
            cfg: cfg.clone(),
            client,
            escrow,
            cached,
            stale_logged: false,
            stopped: None,
        };
        let keks = match f.judge(now_ms) {
            Freshness::StaleRefused => Vec::new(),
            _ => f.recipients(kek),
        };
        Ok((f, keks))
    }

    fn recipients(&self, kek: KekPublic) -> Vec<KekPublic> {
        let mut keks = vec![kek];
        keks.extend(self.escrow.clone());
        keks
    }

    fn judge(&mut self, now_ms: u64) -> Freshness {
        let v = verdict(
            self.cached.confirmed_at,
            now_ms,
            self.cfg.max_age,
            self.cfg.on_stale,
        );
        if v != Freshness::Fresh && !self.stale_logged {
            self.stale_logged = true;
            let age_s = now_ms.saturating_sub(self.cached.confirmed_at) / 1000;
            match v {
                Freshness::StaleRefused => {
                    tracing::error!(kek_id = %self.cached.id, age_s, "the cached key is stale (keys.on_stale = refuse): new recordings are refused until the key manager answers")
                }
                _ => {
                    tracing::warn!(kek_id = %self.cached.id, age_s, "the cached key is stale (keys.on_stale = keep): recording goes on with it")
                }
            }
        }
        v
    }

    /// The id of the key in hand.
    pub fn kek_id(&self) -> &str {
        &self.cached.id
    }

    /// One round: ask the key manager, rotate if its key changed, cache, apply the stale
    /// policy. Returns whether the key manager answered.
    pub fn round(&mut self, handle: &KekHandle, metrics: &Metrics, now_ms: u64) -> bool {
        // The committed demo key is refused unless the config allows it: treated as a key
        // manager that did not answer (counted; the key in hand stays).
        let current = self.client.current().and_then(|k| {
            crate::appliance::kek_watch::refuse_demo(&k.kek, self.cfg.allow_demo)
                .map(|()| k)
                .map_err(|e| edgerec_lkm::client::LkmClientError::BadAnswer {
                    url: self.cfg.target.url.clone(),
                    why: format!("its current key: {e}"),
                })
        });
        let answered = match current {
            Ok(k) => {
                let c = CachedKey::of(&k, now_ms);
                let rotated_from = (c.id != self.cached.id).then(|| self.cached.id.clone());
                if let Err(e) = write_cache(&self.cfg.cache_file, &c) {
                    tracing::error!(error = %e, file = %self.cfg.cache_file.display(), "cannot cache the current key");
                }
                self.cached = c;
                self.stale_logged = false;
                let before = handle.current();
                if before.first().map(|k| k.id()) != Some(k.kek.id()) {
                    self.replace(handle, self.recipients(k.kek));
                    if before.is_empty() {
                        tracing::info!(kek_id = %self.cached.id, "the key manager confirmed a key again: new recordings are taken");
                    }
                }
                // Said once the new key is in use (said before, a recording started while the
                // cache was written went to the old key after the line).
                if let Some(from) = rotated_from {
                    tracing::info!(
                        from = %from,
                        to = %self.cached.id,
                        "KEK rotated by the key manager: new recordings are sealed to the new key"
                    );
                    metrics
                        .kek_info
                        .get_or_create(&KekLabel { kek_id: from })
                        .set(0);
                }
                true
            }
            Err(e) => {
                metrics.kek_fetch_errors.inc();
                tracing::warn!(error = %e, kek_id = %self.cached.id, "cannot fetch the current key; the cached one stays");
                match self.judge(now_ms) {
                    Freshness::StaleRefused => {
                        if !handle.current().is_empty() {
                            self.replace(handle, Vec::new());
                        }
                    }
                    _ => {
                        if handle.current().is_empty()
                            && let Ok(kek) = self.cached.kek()
                        {
                            self.replace(handle, self.recipients(kek));
                        }
                    }
                }
                false
            }
        };
        self.publish(metrics, now_ms);
        answered
    }

    /// Replaces the recipients, unless this fetcher was stopped meanwhile.
    fn replace(&self, handle: &KekHandle, keks: Vec<KekPublic>) {
        if !self.stopped.as_ref().is_some_and(Shutdown::is_triggered) {
            handle.replace(keks);
        }
    }

    /// The key in hand into `edgerec_kek_info` and `edgerec_kek_age_seconds` (the key pair's
    /// age since the key manager made it).
    pub fn publish(&self, metrics: &Metrics, now_ms: u64) {
        metrics
            .kek_info
            .get_or_create(&KekLabel {
                kek_id: self.cached.id.clone(),
            })
            .set(1);
        let age = now_ms.saturating_sub(self.cached.date_created) / 1000;
        metrics.kek_age.set(i64::try_from(age).unwrap_or(i64::MAX));
    }

    /// Runs rounds every `refresh_secs` on a thread of its own until `stop`.
    pub fn spawn(
        mut self,
        handle: KekHandle,
        metrics: Arc<Metrics>,
        stop: Shutdown,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        self.stopped = Some(stop.clone());
        std::thread::Builder::new()
            .name("kek-fetch".into())
            .spawn(move || {
                while !stop.wait(self.cfg.refresh) {
                    self.round(&handle, &metrics, erec::clock::now_ms());
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_stale_after_max_age_and_the_policy_decides() {
        let max = Duration::from_secs(60);
        assert_eq!(
            verdict(1_000, 61_000, max, OnStale::Refuse),
            Freshness::Fresh
        );
        assert_eq!(
            verdict(1_000, 61_001, max, OnStale::Refuse),
            Freshness::StaleRefused
        );
        assert_eq!(
            verdict(1_000, 61_001, max, OnStale::Keep),
            Freshness::StaleKept
        );
        assert_eq!(
            verdict(90_000, 1_000, max, OnStale::Refuse),
            Freshness::Fresh,
            "a clock set back does not make a key stale"
        );
    }

    #[test]
    fn the_cache_round_trips_and_a_wrong_key_for_its_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lkm-key.json");
        assert!(read_cache(&path).unwrap().is_none());
        let pem = std::fs::read_to_string(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .join("tests/vectors/test-kek.pub.pem"),
        )
        .unwrap();
        let kek = KekPublic::from_pem("test", &pem).unwrap();
        let c = CachedKey::of(
            &CurrentKey {
                kek: kek.clone(),
                date_created: 5,
            },
            7,
        );
        write_cache(&path, &c).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (back, cached) = read_cache(&path).unwrap().unwrap();
        assert_eq!((back.id(), cached), (kek.id(), c.clone()));
        let mut wrong = c;
        wrong.id = "00".repeat(32);
        write_cache(&path, &wrong).unwrap();
        assert!(
            read_cache(&path)
                .unwrap_err()
                .to_string()
                .contains("not the key of its id")
        );
        std::fs::write(&path, b"{").unwrap();
        assert!(read_cache(&path).is_err());
    }
}
