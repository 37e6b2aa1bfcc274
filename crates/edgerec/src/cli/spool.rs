//! `edgerec spool list|show|retry`: what waits in the spool, one package's upload state, and
//! sending refused packages again.
//!
//! These read the spool's directories and state files only: they never open a package's
//! contents (they need no key) and never delete anything. `retry` moves a package from
//! `failed/` back to `ready/` with its attempts reset and its last error kept; a running
//! appliance takes it up at its next scan of `ready/`, a stopped one at its next start.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use uuid::Uuid;

use crate::Error;
use crate::appliance::spool::{Place, Spool, UploadState};
use erec::clock::{Utc, now_ms};

/// The spool of `--config FILE` or `--spool DIR`.
pub fn open(config: Option<&Path>, dir: Option<&Path>) -> Result<Spool, Error> {
    Spool::existing(&root(config, dir)?).map_err(|e| Error::Invalid(e.to_string()))
}

/// The spool directory of `--config FILE` (its `recorder.spool_dir`) or `--spool DIR`.
pub fn root(config: Option<&Path>, dir: Option<&Path>) -> Result<PathBuf, Error> {
    Ok(match (config, dir) {
        (_, Some(d)) => d.to_path_buf(),
        (Some(c), None) => {
            crate::appliance::config::Config::load(c)
                .map_err(|e| Error::Invalid(e.to_string()))?
                .recorder
                .spool_dir
        }
        (None, None) => {
            return Err(Error::Invalid(
                "say which spool: --config FILE or --spool DIR".into(),
            ));
        }
    })
}

fn when(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        Utc::from_unix_ms(ms).rfc3339()
    }
}

/// One line of `list`.
struct Row {
    place: &'static str,
    id: String,
    bytes: u64,
    state: Option<UploadState>,
    note: String,
}

fn rows(spool: &Spool) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    for (place, name) in [(Place::Ready, "ready"), (Place::Failed, "failed")] {
        for id in spool.list(place)? {
            let bytes = fs::metadata(spool.package_path(place, id)).map_or(0, |m| m.len());
            match spool.read_state(place, id) {
                Ok(st) => rows.push(Row {
                    place: name,
                    id: id.hyphenated().to_string(),
                    bytes,
                    note: match (&st.multipart, &st.last_error) {
                        (Some(m), e) => format!(
                            "{} of {} parts stored{}",
                            m.parts.len(),
                            st.size.div_ceil(m.part_bytes.max(1)),
                            e.as_ref().map(|e| format!("; {e}")).unwrap_or_default()
                        ),
                        (None, e) => e.clone().unwrap_or_default(),
                    },
                    state: Some(st),
                }),
                Err(e) => rows.push(Row {
                    place: name,
                    id: id.hyphenated().to_string(),
                    bytes,
                    state: None,
                    note: format!("no readable state: {e} (the next start rebuilds it)"),
                }),
            }
        }
    }
    for (place, name) in [(Place::Active, "active"), (Place::Quarantine, "quarantine")] {
        let mut entries: Vec<_> = fs::read_dir(spool.dir(place))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".erec.part") || (place == Place::Quarantine && !n.ends_with(".reason"))
            })
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let file = e.file_name().to_string_lossy().into_owned();
            let note = if place == Place::Quarantine {
                fs::read_to_string(spool.dir(place).join(format!("{file}.reason")))
                    .map(|r| r.trim().to_string())
                    .unwrap_or_default()
            } else {
                "recording".into()
            };
            rows.push(Row {
                place: name,
                id: file.trim_end_matches(".erec.part").to_string(),
                bytes: e.metadata().map_or(0, |m| m.len()),
                state: None,
                note,
            });
        }
    }
    Ok(rows)
}

/// `edgerec spool list`.
pub fn list(spool: &Spool, as_json: bool) -> Result<(), Error> {
    let rows = rows(spool)?;
    if as_json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "place": r.place,
                    "id": r.id,
                    "bytes": r.bytes,
                    "attempts": r.state.as_ref().map(|s| s.attempts),
                    "next_attempt_ms": r.state.as_ref().map(|s| s.next_attempt_ms),
                    "terminated": r.state.as_ref().map(|s| s.terminated),
                    "note": r.note,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON values always serialize")
        );
        return Ok(());
    }
    println!(
        "{:<10} {:<36} {:>12} {:>8} {:<24} note",
        "place", "id", "bytes", "attempts", "next attempt"
    );
    for r in &rows {
        let (attempts, next) = r.state.as_ref().map_or(("-".into(), "-".into()), |s| {
            (s.attempts.to_string(), when(s.next_attempt_ms))
        });
        println!(
            "{:<10} {:<36} {:>12} {:>8} {:<24} {}",
            r.place, r.id, r.bytes, attempts, next, r.note
        );
    }
    let count = |p: &str| rows.iter().filter(|r| r.place == p).count();
    eprintln!(
        "{} ready, {} failed, {} recording, {} quarantined",
        count("ready"),
        count("failed"),
        count("active"),
        count("quarantine")
    );
    Ok(())
}

fn find(spool: &Spool, id: &str) -> Result<(Uuid, Place), Error> {
    let id =
        Uuid::parse_str(id).map_err(|_| Error::Invalid(format!("{id}: not a recording id")))?;
    for place in [Place::Ready, Place::Failed] {
        if spool.package_path(place, id).exists() {
            return Ok((id, place));
        }
    }
    Err(Error::Invalid(format!(
        "{id}: not in the spool's ready/ or failed/ (already stored, or still recording)"
    )))
}

/// `edgerec spool show ID`.
pub fn show(spool: &Spool, id: &str) -> Result<(), Error> {
    let (id, place) = find(spool, id)?;
    let state = spool.read_state(place, id)?;
    let v = json!({
        "place": if place == Place::Ready { "ready" } else { "failed" },
        "package": spool.package_path(place, id),
        "object_key": state.object_key(""),
        "state": state,
        "ready_at": when(state.ready_ms),
        "next_attempt_at": when(state.next_attempt_ms),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&v).expect("JSON values always serialize")
    );
    Ok(())
}

/// `edgerec spool retry (ID… | --all)`: back from `failed/` to `ready/`.
pub fn retry(spool: &Spool, ids: &[String], all: bool) -> Result<(), Error> {
    let targets: Vec<Uuid> = if all {
        spool.list(Place::Failed)?
    } else {
        let mut v = Vec::new();
        for id in ids {
            match find(spool, id)? {
                (id, Place::Failed) => v.push(id),
                (id, _) => {
                    return Err(Error::Invalid(format!(
                        "{id} is in ready/, not failed/: it is being delivered"
                    )));
                }
            }
        }
        v
    };
    for id in &targets {
        let mut state = spool.read_state(Place::Failed, *id)?;
        state.attempts = 0;
        state.next_attempt_ms = now_ms();
        spool.write_state(Place::Failed, &state)?;
        spool.move_package(*id, Place::Failed, Place::Ready)?;
        println!("requeued {id}");
    }
    eprintln!(
        "{} package(s) back in ready/; a running appliance sends them at its next scan",
        targets.len()
    );
    Ok(())
}
