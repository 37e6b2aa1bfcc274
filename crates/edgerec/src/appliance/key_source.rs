//! Where new recordings' KEK comes from, started at start-up and again when a reload changes
//! `[keys]`: the key file (loaded, then its directory watched: [`crate::appliance::kek_watch`])
//! or the key manager (fetched at start and every `refresh_secs` on a thread of its own:
//! [`crate::appliance::kek_fetch`]); with the escrow key as a second recipient either way.
//!
//! Invariants: a source is only ever started into the one [`KekHandle`] the recorder and the
//! inbox read; it replaces the handle's keys only once it has a usable key (the demo key is
//! refused unless allowed), so a source that fails to start leaves the running one in place;
//! a stopped source (dropped [`KeySource`]) changes the handle no more.

use std::path::PathBuf;
use std::sync::Arc;

use crate::appliance::config::{Config, KekSource};
use crate::appliance::kek_watch::refuse_demo;
use crate::appliance::metrics::{KekLabel, Metrics};
use crate::appliance::run::RunError;
use crate::appliance::shutdown::Shutdown;
use erec::keys::{KekHandle, KekPublic};

/// A running key source; dropping it stops it.
pub struct KeySource {
    /// The key file's watch (`source = "file"`).
    _watch: Option<notify::RecommendedWatcher>,
    /// The key manager fetcher's own stop (`source = "lkm"`).
    fetcher: Option<Shutdown>,
    /// The key file, for the age metric (`source = "file"`).
    pub file: Option<PathBuf>,
}

impl Drop for KeySource {
    fn drop(&mut self) {
        if let Some(stop) = &self.fetcher {
            stop.trigger();
        }
    }
}

/// Starts `config`'s key source into `handle`: the key loaded or fetched (and the handle's
/// keys replaced by it), then watched or fetched again until the source is dropped or
/// `shutdown`.
pub async fn start(
    config: &Config,
    handle: &KekHandle,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Result<KeySource, RunError> {
    let escrow = match &config.escrow_public_key {
        Some(e) => Some(KekPublic::from_file(e).map_err(RunError::io("keys.escrow_public_key"))?),
        None => None,
    };
    let source = match &config.kek_source {
        KekSource::File(path) => {
            let kek = KekPublic::from_file(path).map_err(RunError::io("keys.public_key"))?;
            refuse_demo(&kek, config.demo_keys).map_err(RunError::io("keys.public_key"))?;
            // Watched before the key is taken: a replacement from now on is seen.
            let watch = crate::appliance::kek_watch::watch(
                path.clone(),
                config.escrow_public_key.clone(),
                handle.clone(),
                Arc::clone(metrics),
                config.demo_keys,
            )
            .map_err(RunError::io("keys.public_key: cannot watch its directory"))?;
            let mut keks = vec![kek];
            keks.extend(escrow);
            handle.replace(keks);
            KeySource {
                _watch: Some(watch),
                fetcher: None,
                file: Some(path.clone()),
            }
        }
        KekSource::Lkm(lkm) => {
            let lkm = lkm.clone();
            let (m, h) = (Arc::clone(metrics), handle.clone());
            // Its own stop, triggered by the appliance's too.
            let stop = Shutdown::new();
            let (own, all) = (stop.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = all.triggered() => own.trigger(),
                    () = own.triggered() => {}
                }
            });
            // The blocking HTTP client is made and kept on threads of its own, never
            // dropped in the async context.
            let fetcher_stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                let now = erec::clock::now_ms();
                let (fetcher, keks) =
                    crate::appliance::kek_fetch::Fetcher::start(&lkm, escrow, now)
                        .map_err(RunError::io("keys.lkm_url"))?;
                if let Some(k) = keks.first() {
                    refuse_demo(k, lkm.allow_demo).map_err(RunError::io("keys.lkm_url"))?;
                }
                if keks.is_empty() {
                    tracing::error!(
                        kek_id = fetcher.kek_id(),
                        "no usable KEK: the cached key is stale"
                    );
                }
                fetcher.publish(&m, now);
                h.replace(keks);
                fetcher
                    .spawn(h, m, fetcher_stop)
                    .map_err(RunError::io("keys.lkm_url: cannot start the key fetcher"))?;
                Ok::<_, RunError>(())
            })
            .await
            .map_err(RunError::io("keys"))?
            .inspect_err(|_| stop.trigger())?;
            KeySource {
                _watch: None,
                fetcher: Some(stop),
                file: None,
            }
        }
    };
    if let Some(k) = handle.current().first() {
        tracing::info!(kek_id = %k.id(), "sealing to KEK");
        metrics.kek_info.clear();
        metrics
            .kek_info
            .get_or_create(&KekLabel {
                kek_id: k.id().to_hex(),
            })
            .set(1);
    }
    Ok(source)
}
