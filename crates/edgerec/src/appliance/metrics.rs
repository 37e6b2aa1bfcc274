//! The appliance's metrics (Prometheus text, crate prometheus-client) and its `/metrics`,
//! `/healthz` and `/readyz` endpoints.
//!
//! Invariants: no label carries a recording id, a conversation, an address or anything
//! else per recording (cardinality stays fixed, and no metadata leaks into monitoring);
//! "uploaded" is only ever counted after the store confirmed a package.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set of one label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason, outcome or state.
    pub reason: String,
}

/// `{mode}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestMode {
    /// `ring`, `recvmmsg` or `io_uring`.
    pub mode: String,
}

/// `{outcome}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UploadOutcome {
    /// stored, already_stored, retry, failed.
    pub outcome: String,
}

/// `{state}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpoolState {
    /// active, ready, failed, quarantine.
    pub state: String,
}

/// `{kek_id}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KekLabel {
    /// Hex kek id.
    pub kek_id: String,
}

/// `{version}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Version {
    /// The crate version.
    pub version: String,
}

/// `{method}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SipMethod {
    /// INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, or other.
    pub method: String,
}

/// `{code}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SipCode {
    /// The status code.
    pub code: String,
}

/// Every metric of the appliance.
#[derive(Debug)]
pub struct Metrics {
    /// Recordings in progress.
    pub recordings_active: Gauge,
    /// Recordings started.
    pub recordings_started: Counter,
    /// Recordings ended, by reason.
    pub recordings_ended: Family<Reason, Counter>,
    /// Recordings refused, by reason.
    pub recordings_refused: Family<Reason, Counter>,
    /// RTP packets stored.
    pub rtp_received: Counter,
    /// RTP packets found missing.
    pub rtp_lost: Counter,
    /// Duplicate RTP packets.
    pub rtp_duplicate: Counter,
    /// Late RTP packets.
    pub rtp_reordered: Counter,
    /// `edgerec_rtp_packets_paused_total`.
    pub rtp_paused: Counter,
    /// `edgerec_inbox_sealed_total`.
    pub inbox_sealed: Counter,
    /// `edgerec_inbox_errors_total{reason}`: `symlink` and `not_regular` (refused for good,
    /// moved to `.edgerec/refused/`), `io` and `seal` (the file stays and is tried again).
    pub inbox_errors: Family<Reason, Counter>,
    /// RTCP packets stored.
    pub rtcp: Counter,
    /// Datagrams not stored, by reason.
    pub datagrams_rejected: Family<Reason, Counter>,
    /// Media chunks sealed and written.
    pub chunks_written: Counter,
    /// Duration of each group commit.
    pub sync_duration: Histogram,
    /// Bytes in the spool.
    pub spool_bytes: Gauge,
    /// Files in the spool, by state.
    pub spool_files: Family<SpoolState, Gauge>,
    /// Bytes the spool may hold.
    pub spool_capacity: Gauge,
    /// Age of the oldest package waiting in `ready/`.
    pub spool_oldest_ready_age: Gauge,
    /// Uploads by outcome.
    pub uploads: Family<UploadOutcome, Counter>,
    /// Upload attempts that will be retried.
    pub upload_retries: Counter,
    /// Multipart parts the store confirmed.
    pub upload_parts: Counter,
    /// Orphaned multipart uploads aborted.
    pub multipart_orphans_aborted: Counter,
    /// Bytes the store confirmed.
    pub uploaded_bytes: Counter,
    /// Duration of each upload attempt.
    pub upload_duration: Histogram,
    /// From the end of a recording to the store's confirmation.
    pub recording_to_stored: Histogram,
    /// The KEK new recordings are sealed to (value 1).
    pub kek_info: Family<KekLabel, Gauge>,
    /// Age of that KEK in seconds (for a key file: since the file was last written).
    pub kek_age: Gauge,
    /// KEK files (or, later, key manager answers) that could not be read.
    pub kek_fetch_errors: Counter,
    /// `edgerec_siprec_sessions_active`.
    pub siprec_active: Gauge,
    /// `edgerec_siprec_sessions_total{outcome}`: `started`, how each ended (`bye`,
    /// `srs_bye_inactive`, `session_timer`, `no_ack`, `shutdown`) and how INVITEs were
    /// refused (`refused_busy`, `refused_disk`, `refused_not_acceptable`, ...).
    pub siprec_sessions: Family<UploadOutcome, Counter>,
    /// `edgerec_siprec_requests_total{method}`: SIP requests received.
    pub siprec_requests: Family<SipMethod, Counter>,
    /// `edgerec_siprec_responses_total{code}`: SIP responses sent.
    pub siprec_responses: Family<SipCode, Counter>,
    /// `edgerec_siprec_streams_declined_total{reason}`: offered streams answered with port 0.
    pub siprec_declined: Family<Reason, Counter>,
    /// `edgerec_siprec_dropped_total{reason}`: SIP datagrams or connections dropped
    /// (`denied_source`, `malformed`).
    pub siprec_dropped: Family<Reason, Counter>,
    /// `edgerec_config_reloads_total{reason}`: SIGHUP reloads, `applied` or `refused`.
    pub config_reloads: Family<Reason, Counter>,
    /// `edgerec_journal_datagrams_total{reason}`: datagrams of the crash journal
    /// (`appliance/journal.rs`): `replayed` from the last process, `unprotected` (recorded,
    /// but read while the journal was full), `unreadable` (left by the last process past a
    /// damaged entry).
    pub journal: Family<Reason, Counter>,
    /// `edgerec_outcomes_total{outcome}`: facts of the outcome journal
    /// (`appliance/outcomes.rs`): started, ended, salvaged, stored, failed, refused (by
    /// recording), lost (the journal's queue was full).
    pub outcomes: Family<UploadOutcome, Counter>,
    /// `edgerec_manifests_total{outcome}`: manifests (`appliance/manifests.rs`) `made`
    /// (sealed into the spool for the store) or `not_made` (no key to seal to, a spool
    /// error: tried again, nothing of the journal skipped); and their uploads, counted as
    /// recordings' are in `edgerec_uploads_total` (`stored`, `already_stored`, `retry`,
    /// `failed` — a manifest refused by the store).
    pub manifests: Family<UploadOutcome, Counter>,
    /// `edgerec_ingest_mode{mode}`: 1 for the way ingest reads (`appliance/ingest.rs`).
    pub ingest_mode: Family<IngestMode, Gauge>,
    /// Whether the spool is writable and under its quota (1) or not (0), for /readyz.
    ready: Arc<AtomicBool>,
    /// `edgerec_ready`: the same as a gauge, for alerting (`EdgerecNotReady`).
    pub ready_gauge: Gauge,
    /// Why not ready.
    not_ready_reason: std::sync::Mutex<String>,
}

fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> (Arc<Metrics>, Registry) {
        let m = Metrics {
            recordings_active: Gauge::default(),
            recordings_started: Counter::default(),
            recordings_ended: Family::default(),
            recordings_refused: Family::default(),
            rtp_received: Counter::default(),
            rtp_lost: Counter::default(),
            rtp_duplicate: Counter::default(),
            rtp_reordered: Counter::default(),
            rtp_paused: Counter::default(),
            inbox_sealed: Counter::default(),
            inbox_errors: Family::default(),
            rtcp: Counter::default(),
            datagrams_rejected: Family::default(),
            chunks_written: Counter::default(),
            sync_duration: seconds_buckets(),
            spool_bytes: Gauge::default(),
            spool_files: Family::default(),
            spool_capacity: Gauge::default(),
            spool_oldest_ready_age: Gauge::default(),
            uploads: Family::default(),
            upload_retries: Counter::default(),
            upload_parts: Counter::default(),
            multipart_orphans_aborted: Counter::default(),
            uploaded_bytes: Counter::default(),
            upload_duration: seconds_buckets(),
            recording_to_stored: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            kek_info: Family::default(),
            kek_age: Gauge::default(),
            kek_fetch_errors: Counter::default(),
            siprec_active: Gauge::default(),
            siprec_sessions: Family::default(),
            siprec_requests: Family::default(),
            siprec_responses: Family::default(),
            siprec_declined: Family::default(),
            siprec_dropped: Family::default(),
            config_reloads: Family::default(),
            journal: Family::default(),
            outcomes: Family::default(),
            manifests: Family::default(),
            ingest_mode: Family::default(),
            ready: Arc::new(AtomicBool::new(true)),
            ready_gauge: Gauge::default(),
            not_ready_reason: std::sync::Mutex::new(String::new()),
        };
        m.ready_gauge.set(1);
        m.zero_known_labels();
        let mut r = Registry::with_prefix("edgerec");
        let build: Family<Version, Gauge> = Family::default();
        build
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        r.register("build_info", "edgerec's version", build);
        r.register(
            "ready",
            "1 while new recordings are accepted (as /readyz); 0 while they are refused: spool \
             over its quota, short of free space, or not writable",
            m.ready_gauge.clone(),
        );
        r.register(
            "ingest_mode",
            "How ingest reads the RTP ports: 1 for the mode in use (ring: a packet ring; \
             recvmmsg: the sockets; io_uring: multishot receives)",
            m.ingest_mode.clone(),
        );
        r.register(
            "recordings_active",
            "Recordings in progress",
            m.recordings_active.clone(),
        );
        r.register(
            "recordings_started",
            "Recordings started",
            m.recordings_started.clone(),
        );
        r.register(
            "recordings_ended",
            "Recordings ended, by reason",
            m.recordings_ended.clone(),
        );
        r.register(
            "recordings_refused",
            "Recordings refused (spool full, package not creatable), by reason",
            m.recordings_refused.clone(),
        );
        r.register(
            "rtp_packets_received",
            "RTP packets stored",
            m.rtp_received.clone(),
        );
        r.register(
            "rtp_packets_lost",
            "RTP packets found missing",
            m.rtp_lost.clone(),
        );
        r.register(
            "rtp_packets_duplicate",
            "Duplicate RTP packets (not stored)",
            m.rtp_duplicate.clone(),
        );
        r.register(
            "rtp_packets_reordered",
            "Late RTP packets (stored)",
            m.rtp_reordered.clone(),
        );
        r.register(
            "rtp_packets_paused",
            "RTP packets received while recording was paused (not stored)",
            m.rtp_paused.clone(),
        );
        r.register("rtcp_packets", "RTCP packets stored", m.rtcp.clone());
        r.register(
            "siprec_sessions_active",
            "SIPREC recording sessions in progress",
            m.siprec_active.clone(),
        );
        r.register(
            "siprec_sessions",
            "SIPREC recording sessions: started, how they ended, how INVITEs were refused",
            m.siprec_sessions.clone(),
        );
        r.register(
            "siprec_requests",
            "SIP requests received, by method",
            m.siprec_requests.clone(),
        );
        r.register(
            "siprec_responses",
            "SIP responses sent, by status code",
            m.siprec_responses.clone(),
        );
        r.register(
            "siprec_streams_declined",
            "Offered SIPREC streams answered with port 0, by reason",
            m.siprec_declined.clone(),
        );
        r.register(
            "siprec_dropped",
            "SIP datagrams or connections dropped (denied_source, malformed)",
            m.siprec_dropped.clone(),
        );
        r.register(
            "config_reloads",
            "SIGHUP reloads of the config, by outcome (applied, refused)",
            m.config_reloads.clone(),
        );
        r.register(
            "outcomes",
            "Facts of the outcome journal: recordings started, ended, salvaged, stored, failed, \
             refused; lost (not written: its queue was full)",
            m.outcomes.clone(),
        );
        r.register(
            "manifests",
            "Manifests of the recordings, signed by the appliance: made (sealed for the store), \
             not_made (tried again); their uploads: stored, already_stored, retry, \
             failed (moved to failed/)",
            m.manifests.clone(),
        );
        r.register(
            "journal_datagrams",
            "Datagrams of the crash journal: replayed from the last process, unprotected \
             (recorded, read while the journal was full), unreadable (past a damaged entry)",
            m.journal.clone(),
        );
        r.register(
            "inbox_sealed",
            "Files of the inbox sealed into packages (and removed from it)",
            m.inbox_sealed.clone(),
        );
        r.register(
            "inbox_errors",
            "Inbox files not sealed, by reason (symlink and not_regular are refused for good; \
             io and seal stay and are tried again)",
            m.inbox_errors.clone(),
        );
        r.register(
            "datagrams_rejected",
            "Datagrams not stored, by reason",
            m.datagrams_rejected.clone(),
        );
        r.register(
            "chunks_written",
            "Media chunks sealed and written",
            m.chunks_written.clone(),
        );
        r.register(
            "sync_duration_seconds",
            "Duration of each group commit",
            m.sync_duration.clone(),
        );
        r.register("spool_bytes", "Bytes in the spool", m.spool_bytes.clone());
        r.register(
            "spool_files",
            "Package files in the spool, by state",
            m.spool_files.clone(),
        );
        r.register(
            "spool_capacity_bytes",
            "Bytes the spool may hold",
            m.spool_capacity.clone(),
        );
        r.register(
            "spool_oldest_ready_age_seconds",
            "Age of the oldest package waiting for the store",
            m.spool_oldest_ready_age.clone(),
        );
        r.register("uploads", "Uploads by outcome", m.uploads.clone());
        r.register(
            "upload_retries",
            "Upload attempts to be retried",
            m.upload_retries.clone(),
        );
        r.register(
            "upload_parts",
            "Multipart parts the store confirmed",
            m.upload_parts.clone(),
        );
        r.register(
            "multipart_orphans_aborted",
            "Multipart uploads no package referred to, aborted",
            m.multipart_orphans_aborted.clone(),
        );
        r.register(
            "uploaded_bytes",
            "Bytes the store confirmed",
            m.uploaded_bytes.clone(),
        );
        r.register(
            "upload_duration_seconds",
            "Duration of each upload attempt",
            m.upload_duration.clone(),
        );
        r.register(
            "recording_to_stored_seconds",
            "From the end of a recording to the store's confirmation",
            m.recording_to_stored.clone(),
        );
        r.register(
            "kek_info",
            "The KEK new recordings are sealed to",
            m.kek_info.clone(),
        );
        r.register(
            "kek_age_seconds",
            "Age of the KEK new recordings are sealed to",
            m.kek_age.clone(),
        );
        r.register(
            "kek_fetch_errors",
            "KEK files that changed but could not be read (the current key stays)",
            m.kek_fetch_errors.clone(),
        );
        (Arc::new(m), r)
    }

    /// Counts one more of a labelled counter.
    pub fn inc(family: &Family<Reason, Counter>, reason: &str, by: u64) {
        family
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc_by(by);
    }

    /// Creates, at 0, the series of the label values the alert rules and the dashboard
    /// (deploy/) look for: every family is listed from the first scrape (a family with no
    /// series is not), and `increase()` sees the first event after a start.
    fn zero_known_labels(&self) {
        let reasons = |f: &Family<Reason, Counter>, values: &[&str]| {
            for v in values {
                drop(f.get_or_create(&Reason {
                    reason: (*v).to_string(),
                }));
            }
        };
        let outcomes = |f: &Family<UploadOutcome, Counter>, values: &[&str]| {
            for v in values {
                drop(f.get_or_create(&UploadOutcome {
                    outcome: (*v).to_string(),
                }));
            }
        };
        reasons(
            &self.recordings_ended,
            &[
                "complete",
                "rtcp_bye",
                "idle_timeout",
                "max_duration",
                "shutdown",
                "error",
            ],
        );
        reasons(
            &self.recordings_refused,
            &["spool_full", "kek_stale", "finish_error"],
        );
        reasons(
            &self.datagrams_rejected,
            &[
                "socket_buffer_full",
                "overload",
                "too_large",
                "receive_error",
                "denied_source",
            ],
        );
        reasons(
            &self.inbox_errors,
            &["symlink", "not_regular", "io", "seal"],
        );
        reasons(&self.config_reloads, &["applied", "refused"]);
        reasons(&self.journal, &["replayed", "unprotected", "unreadable"]);
        reasons(
            &self.siprec_declined,
            &["no_port", "not_audio", "transport"],
        );
        reasons(&self.siprec_dropped, &["denied_source", "malformed"]);
        let delivered = ["stored", "already_stored", "retry", "failed"];
        outcomes(&self.uploads, &delivered);
        outcomes(&self.manifests, &["made", "not_made"]);
        outcomes(&self.manifests, &delivered);
        outcomes(
            &self.outcomes,
            &[
                "started", "ended", "salvaged", "stored", "failed", "refused", "lost",
            ],
        );
        outcomes(
            &self.siprec_sessions,
            &[
                "started",
                "refused_busy",
                "refused_disk",
                "refused_not_acceptable",
            ],
        );
        for state in ["active", "ready", "failed", "quarantine"] {
            drop(self.spool_files.get_or_create(&SpoolState {
                state: state.to_string(),
            }));
        }
        for method in ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE"] {
            drop(self.siprec_requests.get_or_create(&SipMethod {
                method: method.to_string(),
            }));
        }
        drop(self.siprec_responses.get_or_create(&SipCode {
            code: "200".to_string(),
        }));
    }

    /// Sets readiness; `why` says what is wrong when not ready.
    pub fn set_ready(&self, ready: bool, why: &str) {
        self.ready.store(ready, Ordering::Relaxed);
        self.ready_gauge.set(i64::from(ready));
        if let Ok(mut r) = self.not_ready_reason.lock() {
            *r = why.to_string();
        }
    }
}

impl edgerec_net::metrics_http::Readiness for Metrics {
    fn not_ready(&self) -> Option<String> {
        if self.ready.load(Ordering::Relaxed) {
            None
        } else {
            Some(
                self.not_ready_reason
                    .lock()
                    .map(|r| r.clone())
                    .unwrap_or_default(),
            )
        }
    }
}

/// Serves the metrics on `listener` (bound, non-blocking; inside the runtime); returns its
/// address and the server future.
pub fn serve(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    registry: Registry,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    edgerec_net::metrics_http::serve_registry_on(listener, Some(metrics), registry)
}
