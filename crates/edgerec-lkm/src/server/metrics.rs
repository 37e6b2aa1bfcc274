//! The key manager's own metrics (`edgerec lkm serve`), served by
//! `edgerec_net::metrics_http` on `[lkm] metrics_listen`.
//!
//! Invariant: labels carry outcomes, states and reasons only, never a credential id, a kek
//! id, a recording id or an address (cardinality stays fixed; nothing identifying leaks into
//! monitoring).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `{outcome}` of an unwrap.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnwrapOutcome {
    /// ok, failed, rate_limited, …
    pub outcome: String,
}

/// `{state}` of a key pair.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyStateLabel {
    /// active, retired, destroyed.
    pub state: String,
}

/// `{reason}` of a refusal.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyReason {
    /// authentication, role, rate_limit, connection_limit, timeout.
    pub reason: String,
}

/// The key manager's own metrics (`edgerec lkm serve`).
#[derive(Default)]
pub struct LkmMetrics {
    /// `edgerec_lkm_unwraps_total{outcome}`.
    pub unwraps: Family<UnwrapOutcome, Counter>,
    /// `edgerec_lkm_keys{state}`.
    pub keys: Family<KeyStateLabel, Gauge>,
    /// `edgerec_lkm_requests_denied_total{reason}`: authentication, role, rate_limit,
    /// connection_limit, timeout.
    pub denied: Family<DenyReason, Counter>,
    /// `edgerec_lkm_audit_write_errors_total`: batches of audit lines that could not be
    /// written (their requests refused).
    pub audit_write_errors: Counter,
    /// `edgerec_lkm_rotation_period_seconds`: the scheduled rotation's period (0: never).
    pub rotation_period: Gauge,
}

impl LkmMetrics {
    /// The key manager's metrics and their registry.
    pub fn new() -> (Arc<LkmMetrics>, Registry) {
        let m = LkmMetrics::default();
        m.zero_known_labels();
        let mut r = Registry::with_prefix("edgerec_lkm");
        r.register(
            "unwraps",
            "DEK unwraps asked of the key manager, by outcome",
            m.unwraps.clone(),
        );
        r.register(
            "keys",
            "Key pairs in the key store, by state",
            m.keys.clone(),
        );
        r.register(
            "requests_denied",
            "Requests and connections refused, by reason",
            m.denied.clone(),
        );
        r.register(
            "audit_write_errors",
            "Batches of audit lines that could not be written (their requests were refused)",
            m.audit_write_errors.clone(),
        );
        r.register(
            "rotation_period_seconds",
            "The scheduled key rotation's period (0: never)",
            m.rotation_period.clone(),
        );
        (Arc::new(m), r)
    }

    /// Creates, at 0, the series of the label values the alert rules and the dashboard
    /// (deploy/) look for: every family is listed from the first scrape.
    fn zero_known_labels(&self) {
        for outcome in [
            "ok",
            "failed",
            "rate_limited",
            "access_revoked",
            "protection_unavailable",
            "unknown_key",
            "destroyed",
        ] {
            drop(self.unwraps.get_or_create(&UnwrapOutcome {
                outcome: outcome.to_string(),
            }));
        }
        for reason in [
            "authentication",
            "role",
            "rate_limit",
            "connection_limit",
            "timeout",
        ] {
            drop(self.denied.get_or_create(&DenyReason {
                reason: reason.to_string(),
            }));
        }
        for state in ["active", "retired", "destroyed"] {
            drop(self.keys.get_or_create(&KeyStateLabel {
                state: state.to_string(),
            }));
        }
    }

    /// Counts one refusal.
    pub fn denied(&self, reason: &str) {
        self.denied
            .get_or_create(&DenyReason {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts one unwrap.
    pub fn unwrap(&self, outcome: &str) {
        self.unwraps
            .get_or_create(&UnwrapOutcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}
