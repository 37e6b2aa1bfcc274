//! Where new recordings' KEK comes from, started at start-up and again at every reload: the
//! key file (loaded, then its directory watched: [`crate::appliance::kek_watch`]) or the key
//! manager (fetched at start and every `refresh_secs` on a thread of its own:
//! [`crate::appliance::kek_fetch`]); with the escrow key as a second recipient either way.
//!
//! In two steps, so a reload is all or nothing: [`prepare`] loads or fetches the key and
//! changes nothing; [`Prepared::start`] starts the watch or the fetcher without touching the
//! keys in use; only [`KeySource::apply`] replaces them, after the old source was stopped
//! (a stopped fetcher's round still in flight changes the keys no more).
//!
//! Invariants: a source only ever writes the one [`KekHandle`] the recorder and the inbox
//! read; the demo key is refused unless allowed; a stopped source (a dropped [`KeySource`])
//! changes the handle no more.

use std::path::PathBuf;
use std::sync::Arc;

use crate::appliance::config::{Config, KekSource};
use crate::appliance::kek_fetch::Fetcher;
use crate::appliance::kek_watch::refuse_demo;
use crate::appliance::metrics::{KekLabel, Metrics};
use crate::appliance::run::RunError;
use crate::appliance::shutdown::Shutdown;
use erec::keys::{KekHandle, KekPublic};

/// A key loaded or fetched, its source not yet running.
pub struct Prepared {
    keks: Vec<KekPublic>,
    fetcher: Option<Fetcher>,
}

impl Prepared {
    /// Whether it has a key to seal to (a key manager's cached key may be stale).
    pub fn usable(&self) -> bool {
        !self.keks.is_empty()
    }

    /// Starts the source (the key file watched, or the fetcher's thread, whose first round
    /// comes after `refresh_secs`) without changing the keys in use.
    pub fn start(
        self,
        config: &Config,
        handle: &KekHandle,
        metrics: &Arc<Metrics>,
        shutdown: &Shutdown,
    ) -> Result<KeySource, RunError> {
        let Prepared { keks, fetcher } = self;
        let source = match (&config.kek_source, fetcher) {
            (KekSource::Lkm(_), Some(fetcher)) => {
                // Its own stop, triggered by the appliance's too.
                let stop = Shutdown::new();
                let (own, all) = (stop.clone(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = all.triggered() => own.trigger(),
                        () = own.triggered() => {}
                    }
                });
                fetcher.publish(metrics, erec::clock::now_ms());
                if let Err(e) = fetcher.spawn(handle.clone(), Arc::clone(metrics), stop.clone()) {
                    stop.trigger();
                    return Err(RunError::io("keys.lkm_url: cannot start the key fetcher")(
                        e,
                    ));
                }
                KeySource {
                    keks,
                    _watch: None,
                    fetcher: Some(stop),
                    file: None,
                }
            }
            (KekSource::File(path), _) => {
                let watch = crate::appliance::kek_watch::watch(
                    path.clone(),
                    config.escrow_public_key.clone(),
                    handle.clone(),
                    Arc::clone(metrics),
                    config.demo_keys,
                )
                .map_err(RunError::io("keys.public_key: cannot watch its directory"))?;
                KeySource {
                    keks,
                    _watch: Some(watch),
                    fetcher: None,
                    file: Some(path.clone()),
                }
            }
            (KekSource::Lkm(_), None) => {
                return Err(RunError::Start("keys: no key manager fetcher".into()));
            }
        };
        Ok(source)
    }
}

/// A running key source; dropping it stops it.
pub struct KeySource {
    /// The key it started with, until [`KeySource::apply`].
    keks: Vec<KekPublic>,
    /// The key file's watch (`source = "file"`).
    _watch: Option<notify::RecommendedWatcher>,
    /// The key manager fetcher's own stop (`source = "lkm"`).
    fetcher: Option<Shutdown>,
    /// The key file, for the age metric (`source = "file"`).
    pub file: Option<PathBuf>,
}

impl KeySource {
    /// Makes its key the one new recordings are sealed to.
    pub fn apply(&mut self, handle: &KekHandle, metrics: &Metrics) {
        handle.replace(std::mem::take(&mut self.keks));
        metrics.kek_info.clear();
        if let Some(k) = handle.current().first() {
            tracing::info!(kek_id = %k.id(), "sealing to KEK");
            metrics
                .kek_info
                .get_or_create(&KekLabel {
                    kek_id: k.id().to_hex(),
                })
                .set(1);
        }
    }
}

impl Drop for KeySource {
    fn drop(&mut self) {
        if let Some(stop) = &self.fetcher {
            stop.trigger();
        }
    }
}

/// Loads `config`'s key (the file) or fetches it (the key manager; its cached key when it
/// does not answer), with the escrow key; changes nothing.
pub async fn prepare(config: &Config) -> Result<Prepared, RunError> {
    let escrow = match &config.escrow_public_key {
        Some(e) => Some(KekPublic::from_file(e).map_err(RunError::io("keys.escrow_public_key"))?),
        None => None,
    };
    match &config.kek_source {
        KekSource::File(path) => {
            let kek = KekPublic::from_file(path).map_err(RunError::io("keys.public_key"))?;
            refuse_demo(&kek, config.demo_keys).map_err(RunError::io("keys.public_key"))?;
            let mut keks = vec![kek];
            keks.extend(escrow);
            Ok(Prepared {
                keks,
                fetcher: None,
            })
        }
        KekSource::Lkm(lkm) => {
            let lkm = lkm.clone();
            // The blocking HTTP client is made and kept on threads of its own, never
            // dropped in the async context.
            tokio::task::spawn_blocking(move || {
                let now = erec::clock::now_ms();
                let (fetcher, keks) =
                    Fetcher::start(&lkm, escrow, now).map_err(RunError::io("keys.lkm_url"))?;
                if let Some(k) = keks.first() {
                    refuse_demo(k, lkm.allow_demo).map_err(RunError::io("keys.lkm_url"))?;
                }
                if keks.is_empty() {
                    tracing::error!(
                        kek_id = fetcher.kek_id(),
                        "no usable KEK: the cached key is stale"
                    );
                }
                Ok(Prepared {
                    keks,
                    fetcher: Some(fetcher),
                })
            })
            .await
            .map_err(RunError::io("keys"))?
        }
    }
}
