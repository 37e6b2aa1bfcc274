//! The uploader thread: moves packages from `ready/` to the store, and deletes the spool's
//! copy only after the store confirmed the package's SHA-256.
//!
//! This is the first, plain version for the `dir` store: packages are taken oldest first,
//! as the recorder announces them and from a scan of `ready/` at start and every
//! `rescan` interval; a transient failure is retried with capped exponential backoff,
//! forever; a refusal or a conflict moves the package to `failed/` with the reason. Attempts,
//! the next attempt time and the last error are written to the package's state file, so a
//! restart continues where it stopped.
//!
//! Invariant: a package leaves the spool only through [`Spool::remove_stored`] after
//! [`Store::put`] returned `Ok`; nothing here deletes a package otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use uuid::Uuid;

use crate::clock::now_ms;
use crate::metrics::{Metrics, Outcome};
use crate::spool::{Place, Spool};
use crate::store::{Store, StoreError, Stored, object_key};

/// Backoff before attempt `n + 1` after `n` failed ones: 1 s doubling to a 5 min cap.
pub fn backoff_ms(attempts: u32) -> u64 {
    1000u64.saturating_mul(1 << attempts.min(9)).min(300_000)
}

/// Runs until `stop` is set (checked between packages) or the sender is gone.
pub fn run(
    spool: Spool,
    store: Arc<dyn Store>,
    prefix: String,
    rx: Receiver<Uuid>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    rescan: Duration,
) {
    // Each queued package with its next attempt time, read from its state file once and
    // then kept here, so a long outage does not re-read every state file on every loop.
    let mut queue: BTreeMap<Uuid, Option<u64>> = BTreeMap::new();
    let mut last_scan = None;
    while !stop.load(Ordering::Relaxed) {
        if last_scan.is_none_or(|t: std::time::Instant| t.elapsed() >= rescan) {
            match spool.list(Place::Ready) {
                Ok(ids) => {
                    for id in ids {
                        queue.entry(id).or_insert(None);
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot list the spool"),
            }
            last_scan = Some(std::time::Instant::now());
        }
        let now = now_ms();
        let mut gone = Vec::new();
        let mut due = None;
        for (id, next) in queue.iter_mut() {
            let at = match *next {
                Some(at) => at,
                None => match spool.read_state(Place::Ready, *id) {
                    Ok(s) => *next.insert(s.next_attempt_ms),
                    Err(_) => {
                        gone.push(*id); // stored or moved meanwhile
                        continue;
                    }
                },
            };
            if at <= now {
                due = Some(*id);
                break;
            }
        }
        for id in gone {
            queue.remove(&id);
        }
        let Some(id) = due else {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(id) => {
                    queue.entry(id).or_insert(None);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if queue.is_empty() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            while let Ok(id) = rx.try_recv() {
                queue.entry(id).or_insert(None);
            }
            continue;
        };
        queue.remove(&id);
        if let Some(next) = upload_one(&spool, store.as_ref(), &prefix, id, &metrics) {
            queue.insert(id, Some(next));
        }
    }
}

/// One attempt. Returns the next attempt time if the package stays in `ready/`.
fn upload_one(
    spool: &Spool,
    store: &dyn Store,
    prefix: &str,
    id: Uuid,
    metrics: &Metrics,
) -> Option<u64> {
    let Ok(mut state) = spool.read_state(Place::Ready, id) else {
        return None; // gone meanwhile (stored, or moved by an operator)
    };
    let key = object_key(prefix, id);
    let path = spool.package_path(Place::Ready, id);
    let sha: [u8; 32] = match hex::decode(&state.sha256)
        .ok()
        .and_then(|v| v.try_into().ok())
    {
        Some(s) => s,
        None => {
            tracing::error!(recording = %id, "state file has no valid SHA-256");
            return None;
        }
    };
    state.attempts += 1;
    let started = std::time::Instant::now();
    let result = store.put(&key, &path, &sha);
    metrics
        .upload_duration
        .observe(started.elapsed().as_secs_f64());
    let outcome = |o: &str| {
        metrics
            .uploads
            .get_or_create(&Outcome { outcome: o.into() })
            .inc();
    };
    match result {
        Ok(how) => match spool.remove_stored(id) {
            Ok(()) => {
                outcome(match how {
                    Stored::Written => "stored",
                    Stored::AlreadyThere => "already_stored",
                });
                metrics.uploaded_bytes.inc_by(state.size);
                let age_ms = now_ms().saturating_sub(state.ready_ms);
                metrics.recording_to_stored.observe(age_ms as f64 / 1000.0);
                tracing::info!(recording = %id, key, ?how, "stored");
                None
            }
            Err(e) => {
                tracing::error!(recording = %id, error = %e, "stored, but cannot remove from the spool");
                None
            }
        },
        Err(StoreError::Transient(why)) => {
            outcome("retry");
            metrics.upload_retries.inc();
            state.next_attempt_ms = now_ms() + backoff_ms(state.attempts);
            tracing::warn!(recording = %id, attempts = state.attempts, error = %why, "upload failed; will retry");
            state.last_error = Some(why);
            if let Err(e) = spool.write_state(Place::Ready, &state) {
                tracing::error!(recording = %id, error = %e, "cannot write upload state");
            }
            Some(state.next_attempt_ms)
        }
        Err(e) => {
            outcome("failed");
            tracing::error!(recording = %id, error = %e, "store refused the package; moved to failed/");
            state.last_error = Some(e.to_string());
            let moved = spool
                .write_state(Place::Ready, &state)
                .and_then(|()| spool.move_package(id, Place::Ready, Place::Failed));
            if let Err(e) = moved {
                tracing::error!(recording = %id, error = %e, "cannot move to failed/");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff_ms(0), 1000);
        assert_eq!(backoff_ms(1), 2000);
        assert_eq!(backoff_ms(8), 256_000);
        assert_eq!(backoff_ms(9), 300_000);
        assert_eq!(backoff_ms(u32::MAX), 300_000);
    }
}
