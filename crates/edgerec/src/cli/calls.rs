//! `edgerec calls list|show`: what became of every recording and refusal, from the outcome
//! journal in the spool (`appliance/outcomes.rs`). Reads only that journal: no key, no
//! package, nothing written.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::Error;
use crate::appliance::outcomes::{Call, Fact, dir_of, fold, read};
use erec::clock::Utc;

/// The outcomes an `--outcome` filter may name.
const OUTCOMES: [&str; 6] = [
    "recording",
    "spooled",
    "stored",
    "failed",
    "salvaged",
    "refused",
];

/// The journal's directory for `--config FILE` or `--spool DIR`.
fn journal_dir(config: Option<&Path>, spool: Option<&Path>) -> Result<PathBuf, Error> {
    let root = super::spool::root(config, spool)?;
    let dir = dir_of(&root);
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no outcome journal (has the appliance run with this spool?)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// `--since`: RFC 3339, or a day (its start, UTC).
fn since_ms(since: &str) -> Result<u64, Error> {
    erec::clock::parse_rfc3339_ms(since)
        .or_else(|| erec::clock::parse_rfc3339_ms(&format!("{since}T00:00:00Z")))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "--since {since}: not a time (2026-11-30T10:00:00Z) or a day (2026-11-30)"
            ))
        })
}

fn when(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| Utc::from_unix_ms(ms).rfc3339())
}

/// What a row of the table says after the outcome.
fn detail(c: &Call) -> String {
    let mut d = Vec::new();
    if let Some(p) = c.continues {
        d.push(format!("continues {p}"));
    }
    for fact in [&c.ended, &c.salvaged].into_iter().flatten() {
        match &fact.what {
            Fact::Ended { reason, .. } => d.push(format!("ended {reason}")),
            Fact::Salvaged { why, .. } => d.push(format!("salvaged: {why}")),
            _ => {}
        }
    }
    let last = match c.outcome {
        "stored" => c.stored.as_ref(),
        "failed" => c.failed.as_ref(),
        _ => None,
    };
    match last.map(|f| &f.what) {
        Some(Fact::Stored { key, bytes, .. }) => d.push(format!("{key} ({bytes} bytes)")),
        Some(Fact::Failed { reason, .. }) => d.push(reason.clone()),
        _ => {}
    }
    d.join("; ")
}

/// `edgerec calls list`.
pub fn list(
    config: Option<&Path>,
    spool: Option<&Path>,
    since: Option<&str>,
    outcome: Option<&str>,
    json: bool,
) -> Result<(), Error> {
    if let Some(o) = outcome
        && !OUTCOMES.contains(&o)
    {
        return Err(Error::Invalid(format!(
            "--outcome {o}: one of {}",
            OUTCOMES.join(", ")
        )));
    }
    let since = since.map(since_ms).transpose()?;
    // Every day is read and folded (a call's start may be days before its store); then
    // the calls started since, and the refusals since, are shown.
    let (lines, torn) = read(&journal_dir(config, spool)?)?;
    let (mut calls, mut refusals) = fold(lines);
    if let Some(s) = since {
        calls.retain(|c| c.first_ms() >= s);
        refusals.retain(|l| l.at_ms >= s);
    }
    if let Some(o) = outcome {
        calls.retain(|c| c.is(o));
        if o != "refused" {
            refusals.clear();
        } else {
            calls.clear();
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let refusals: Vec<_> = refusals
            .iter()
            .filter_map(|l| match &l.fact {
                Fact::Refused { reason, count } => Some(json!({
                    "second": Utc::from_unix_ms(l.at_ms).rfc3339(),
                    "reason": reason,
                    "count": count,
                })),
                _ => None,
            })
            .collect();
        serde_json::to_writer_pretty(
            &mut out,
            &json!({ "calls": calls, "refusals": refusals, "unreadable_lines": torn }),
        )
        .map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24}  {:<36}  {:>5}  {:<9}  detail",
        "started", "recording", "port", "outcome"
    )?;
    for c in &calls {
        writeln!(
            out,
            "{:<24}  {:<36}  {:>5}  {:<9}  {}",
            when(c.started_ms),
            c.id.hyphenated().to_string(),
            c.port.map_or("-".into(), |p| p.to_string()),
            c.outcome,
            detail(c)
        )?;
    }
    for l in &refusals {
        if let Fact::Refused { reason, count } = &l.fact {
            writeln!(
                out,
                "{:<24}  {:<36}  {:>5}  {:<9}  {count} recording(s): {reason}",
                when(Some(l.at_ms)),
                "-",
                "-",
                "refused"
            )?;
        }
    }
    if torn > 0 {
        writeln!(out, "({torn} unreadable line(s) skipped: torn by a crash)")?;
    }
    Ok(())
}

/// `edgerec calls show ID`.
pub fn show(config: Option<&Path>, spool: Option<&Path>, id: &str) -> Result<(), Error> {
    let id = uuid::Uuid::parse_str(id)
        .map_err(|_| Error::Invalid(format!("{id}: not a recording id")))?;
    let (lines, _) = read(&journal_dir(config, spool)?)?;
    let mine: Vec<_> = lines
        .into_iter()
        .filter(|l| l.fact.id() == Some(id))
        .collect();
    if mine.is_empty() {
        return Err(Error::Invalid(format!(
            "{id}: the outcome journal does not name it (or its days are past keep_days)"
        )));
    }
    let facts = mine.clone();
    let (calls, _) = fold(mine);
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &json!({ "call": calls[0], "facts": facts }))
        .map_err(std::io::Error::other)?;
    writeln!(out)?;
    Ok(())
}
