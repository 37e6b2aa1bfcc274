//! `SIGHUP` (and `systemctl reload`): the config file and the files it names read again,
//! and what can change without new sockets applied while the appliance records on.
//!
//! Applied in place: `[store]` (kind, endpoint, credentials, CA, bandwidth; not `prefix`,
//! which names objects already begun), `[upload]` `retry_*`, `max_attempts` and
//! `rescan_secs`, `[keys]` (source, key files, the key manager's URL, CA, credentials and
//! timings; not `wrap`), `ingest.allow`, the control API's token (its `token_file` read
//! again), and `[log] level` (unless `EDGEREC_LOG` is set, which wins). Environment
//! variables are the process's: read at start only, a reload sees the same values.
//! Anything else that changed — a port range or listener (it needs new sockets), the spool,
//! the recorder's timings, `[siprec]`, `[inbox]` — refuses the whole reload with a line
//! naming the key ([`needs_restart`]), and the running config stays.
//!
//! Invariants: a reload is all or nothing — the new key source and store are made first,
//! from the files they name read again (either failing, or a key manager whose only key is
//! stale, refuses the reload, the running ones untouched), then everything is swapped; a datagram is never held up by it (ingest reads the allow list once a round
//! from a [`Live`] value); nothing secret is logged, only the names of the keys that changed.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use ipnet::IpNet;

use crate::appliance::config::Config;
use crate::appliance::control::ControlToken;
use crate::appliance::key_source::{self, KeySource};
use crate::appliance::metrics::Metrics;
use crate::appliance::shutdown::Shutdown;
use crate::appliance::uploader::UploadSettings;
use erec::keys::KekHandle;

/// A value the running appliance reads often and a reload replaces whole.
#[derive(Debug)]
pub struct Live<T> {
    value: RwLock<Arc<T>>,
}

impl<T> Live<T> {
    /// Holds `value`.
    pub fn new(value: T) -> Arc<Live<T>> {
        Arc::new(Live {
            value: RwLock::new(Arc::new(value)),
        })
    }

    /// The value now (a cheap clone of its `Arc`; take it once per round, not per item).
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.value.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the value; readers see it from their next [`Live::get`].
    pub fn set(&self, value: T) {
        *self.value.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

/// The keys whose change needs a restart, each with its value in a comparable form.
fn fixed(c: &Config) -> Vec<(&'static str, String)> {
    let r = &c.recorder;
    let control = c.control.as_ref();
    vec![
        ("ingest.ports", format!("{:?}", c.ports)),
        ("ingest.bind", c.ingest.bind.to_string()),
        ("ingest.journal_mib", format!("{:?}", c.journal_bytes())),
        ("metrics.listen", c.metrics.listen.to_string()),
        ("control.listen", format!("{:?}", control.map(|c| c.listen))),
        (
            "control (tls, limits)",
            format!(
                "{:?}",
                control.map(|c| (&c.tls, c.max_body_bytes, c.limits))
            ),
        ),
        ("siprec", format!("{:?}", c.siprec)),
        ("recorder.spool_dir", r.spool_dir.display().to_string()),
        ("identity.key_file", c.identity_key.display().to_string()),
        ("outcomes.keep_days", c.outcomes_keep_days.to_string()),
        (
            "outcomes.manifest_period_secs",
            c.manifest_period.as_secs().to_string(),
        ),
        (
            "recorder (timings, sizes, sync) or ingest admission limits",
            format!(
                "{:?}",
                (
                    c.limits(),
                    r.sync,
                    r.spool_max_bytes.get_ref(),
                    r.min_free_bytes.get_ref()
                )
            ),
        ),
        ("keys.wrap", format!("{:?}", c.wrap)),
        ("store.prefix", c.prefix.clone()),
        ("upload.concurrency", c.concurrency.to_string()),
        (
            "upload.abort_orphans_after_secs",
            format!("{:?}", c.abort_orphans_after),
        ),
        ("inbox", format!("{:?}", c.inbox)),
    ]
}

/// The first key changed from `old` to `new` that needs a restart, if any.
pub fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    fixed(old)
        .into_iter()
        .zip(fixed(new))
        .find(|((_, a), (_, b))| a != b)
        .map(|((key, _), _)| key)
}

/// What a reload applies in place: which parts changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// `[store]`.
    pub store: bool,
    /// `[upload]` retry policy or rescan interval.
    pub upload: bool,
    /// `[keys]`.
    pub keys: bool,
    /// `ingest.allow`.
    pub allow: bool,
    /// The control token.
    pub token: bool,
    /// `[log] level`.
    pub log: bool,
}

impl Changes {
    /// The changes from `old` to `new` (both valid; [`needs_restart`] found nothing).
    pub fn between(old: &Config, new: &Config) -> Changes {
        let differs = |a: String, b: String| a != b;
        Changes {
            store: differs(format!("{:?}", old.store), format!("{:?}", new.store)),
            upload: old.retry != new.retry || old.rescan != new.rescan,
            keys: differs(
                format!(
                    "{:?}",
                    (&old.kek_source, &old.escrow_public_key, old.demo_keys)
                ),
                format!(
                    "{:?}",
                    (&new.kek_source, &new.escrow_public_key, new.demo_keys)
                ),
            ),
            allow: old.allow != new.allow,
            token: old.control.as_ref().map(|c| c.token.as_bytes())
                != new.control.as_ref().map(|c| c.token.as_bytes()),
            log: old.log_level != new.log_level,
        }
    }

    /// The names of what changed, for the log.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.store, "store"),
            (self.upload, "upload"),
            (self.keys, "keys"),
            (self.allow, "ingest.allow"),
            (self.token, "control token"),
            (self.log, "log.level"),
        ]
        .into_iter()
        .filter_map(|(changed, name)| changed.then_some(name))
        .collect()
    }
}

/// Sets the log filter (`[log] level`); an error says why not.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where the config is reloaded from, and how the level is set.
pub struct ReloadFrom {
    /// The config file.
    pub path: PathBuf,
    /// Sets the log level; `None` when `EDGEREC_LOG` rules it.
    pub set_log_level: Option<SetLogLevel>,
}

/// Everything a reload replaces, and the config it was made from.
pub struct Reloadable {
    /// Where from.
    pub from: ReloadFrom,
    /// The config in force.
    pub current: Config,
    /// `ingest.allow`, as ingest reads it.
    pub allow: Arc<Live<Vec<IpNet>>>,
    /// The uploader's store and policy.
    pub upload: Arc<Live<UploadSettings>>,
    /// The control API's token, if it runs.
    pub token: Option<Arc<ControlToken>>,
    /// The recipients new recordings are sealed to.
    pub keks: KekHandle,
    /// Their source, running.
    pub keys: KeySource,
    /// The key file, for the age metric.
    pub kek_file: Arc<Live<Option<PathBuf>>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The appliance's stop (a new key source stops with it).
    pub shutdown: Shutdown,
}

impl Reloadable {
    /// Reads the config again and applies it, all or nothing; the error says why not (one
    /// line, naming the key).
    pub async fn reload(&mut self) -> Result<Changes, String> {
        let path = self.from.path.clone();
        let new = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if let Some(key) = needs_restart(&self.current, &new) {
            return Err(format!(
                "{key} changed, which needs a restart (systemctl restart edgerec keeps the \
                 sockets: no packet is lost)"
            ));
        }
        let changes = Changes::between(&self.current, &new);
        // What can fail, first, changing nothing: the key (the file or the key manager) and
        // the store, both made anew from the files they name (a credential or certificate
        // rotated in place is read again even where the config text did not change).
        let prepared = key_source::prepare(&new).await.map_err(|e| e.to_string())?;
        if !prepared.usable() {
            return Err(
                "keys: the key manager did not answer and its cached key is stale; \
                        the key in use stays"
                    .into(),
            );
        }
        let store = crate::appliance::run::open_store(&new)
            .await
            .map_err(|e| e.to_string())?;
        let source = prepared
            .start(&new, &self.keks, &self.metrics, &self.shutdown)
            .map_err(|e| e.to_string())?;
        // Then everything is swapped: the old key source stopped before the new key applies.
        drop(std::mem::replace(&mut self.keys, source));
        self.keys.apply(&self.keks, &self.metrics);
        self.kek_file.set(self.keys.file.clone());
        self.upload.set(UploadSettings {
            store,
            policy: new.retry,
            rescan: new.rescan,
        });
        if changes.allow {
            self.allow.set(new.allow.clone());
        }
        if let (Some(token), Some(control)) = (&self.token, &new.control)
            && changes.token
        {
            token.set(&control.token);
        }
        if changes.log {
            self.set_log_level(new.log_level.as_deref());
        }
        self.current = new;
        Ok(changes)
    }

    /// Applies `[log] level` (info when unset), unless `EDGEREC_LOG` rules.
    pub fn set_log_level(&self, level: Option<&str>) {
        match &self.from.set_log_level {
            Some(set) => {
                if let Err(e) = set(level.unwrap_or("info")) {
                    tracing::warn!(error = %e, "log.level: not applied");
                }
                tracing::debug!("log level set from the config");
            }
            None if level.is_some() => {
                tracing::info!("log.level is not applied: EDGEREC_LOG is set and wins");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[recorder]
spool_dir = "var/spool"
[ingest]
ports = "40000-40009"
allow = ["10.0.0.0/8"]
[keys]
public_key = "keys/kek.pub.pem"
[store]
kind = "dir"
path = "/srv/store"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("/etc/edgerec/edgerec.toml"), text).unwrap()
    }

    fn with(from: &str, to: &str) -> Config {
        assert!(BASE.contains(from), "{from}");
        parse(&BASE.replace(from, to))
    }

    #[test]
    fn a_change_that_needs_new_sockets_or_a_restart_is_named() {
        let old = parse(BASE);
        assert_eq!(needs_restart(&old, &parse(BASE)), None);
        let cases = [
            (
                "ports = \"40000-40009\"",
                "ports = \"40000-40019\"",
                "ingest.ports",
            ),
            (
                "[ingest]\n",
                "[ingest]\nbind = \"192.0.2.1\"\n",
                "ingest.bind",
            ),
            (
                "spool_dir = \"var/spool\"",
                "spool_dir = \"var/other\"",
                "recorder.spool_dir",
            ),
            (
                "[recorder]\n",
                "[recorder]\nflush_interval_ms = 200\n",
                "recorder (timings, sizes, sync) or ingest admission limits",
            ),
            (
                "path = \"/srv/store\"",
                "path = \"/srv/store\"\nprefix = \"site-b/\"",
                "store.prefix",
            ),
            ("[keys]\n", "[keys]\nwrap = \"oaep-sha1\"\n", "keys.wrap"),
        ];
        for (from, to, key) in cases {
            assert_eq!(needs_restart(&old, &with(from, to)), Some(key), "{to}");
        }
        let metrics = parse(&format!("{BASE}[metrics]\nlisten = \"127.0.0.1:9999\"\n"));
        assert_eq!(needs_restart(&old, &metrics), Some("metrics.listen"));
    }

    #[test]
    fn what_a_reload_applies_is_told_apart() {
        let old = parse(BASE);
        assert_eq!(Changes::between(&old, &parse(BASE)), Changes::default());
        let c = Changes::between(
            &old,
            &with("allow = [\"10.0.0.0/8\"]", "allow = [\"127.0.0.0/8\"]"),
        );
        assert_eq!(c.names(), ["ingest.allow"]);
        let c = Changes::between(&old, &with("/srv/store", "/srv/store2"));
        assert_eq!(c.names(), ["store"]);
        let c = Changes::between(&old, &with("kek.pub.pem", "other.pub.pem"));
        assert_eq!(c.names(), ["keys"]);
        let c = Changes::between(&old, &parse(&format!("{BASE}[upload]\nmax_attempts = 3\n")));
        assert_eq!(c.names(), ["upload"]);
        let c = Changes::between(&old, &parse(&format!("{BASE}[log]\nlevel = \"debug\"\n")));
        assert_eq!(c.names(), ["log.level"]);
        assert_eq!(
            needs_restart(&old, &parse(&format!("{BASE}[log]\nlevel = \"debug\"\n"))),
            None
        );
    }

    #[test]
    fn a_live_value_is_replaced_whole_for_the_next_reader() {
        let live = Live::new(vec![1, 2]);
        let before = live.get();
        live.set(vec![3]);
        assert_eq!(*before, [1, 2], "a reader keeps what it took");
        assert_eq!(*live.get(), [3]);
    }
}
