//! A manifest: what an appliance vouches it recorded in one period, signed by its identity
//! (`appliance/identity.rs`) — the facts its outcome journal gained since the manifest before
//! (recordings started, ended, salvaged, stored with object key, size and SHA-256, failed;
//! refusals per reason and second), the ids of the recordings begun in it, and the SHA-256 of
//! the manifest before, so that a missing one is a gap in the chain. And the audit of a store
//! against the manifests in it ([`audit`]), which `edgerec verify-store` prints. Pure: bytes
//! and values in, values out; the writer is `appliance/manifests.rs`.
//!
//! On the wire (the plaintext of a `file` package, sealed to the KEKs like a recording), a
//! JSON object `{"manifest": TEXT, "ed25519": SIG}`: TEXT is the manifest's JSON as signed,
//! SIG the base64 Ed25519 signature over [`DOMAIN`] followed by TEXT, and the chain's SHA-256
//! is TEXT's.
//!
//! Invariants: a manifest is trusted only once its signature verifies under a key the caller
//! registered, and only for the appliance that key names; everything read from a manifest
//! before that (its `appliance` field) only selects the key to try. A recording is genuine
//! when a verified manifest lists its SHA-256; the latest fact of a recording wins.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::appliance::identity::{Identity, PublicIdentity};
use crate::appliance::outcomes::{Fact, Line, fold};

/// The value of `format`.
pub const FORMAT: &str = "edgerec-manifest/1";

/// What a signature covers before the manifest's text: a signature made for anything else
/// the identity may sign one day never verifies as a manifest's.
pub const DOMAIN: &[u8] = b"edgerec-manifest/1\0";

/// One manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The appliance id (16 hex digits).
    pub appliance: String,
    /// Its number in the appliance's chain, from 0.
    pub seq: u64,
    /// The period it covers: from the end of the one before (ms).
    pub from_ms: u64,
    /// To its making (ms).
    pub to_ms: u64,
    /// How often the appliance makes one (ms): a chain whose last one ended more than two
    /// periods ago has lost its newest, or its appliance is down.
    #[serde(default)]
    pub period_ms: u64,
    /// The SHA-256 of the manifest before (hex); none for the first.
    pub previous: Option<String>,
    /// The recordings begun in the period (their start is among `facts`).
    pub began: Vec<Uuid>,
    /// The journal's facts since the manifest before, in the journal's order.
    pub facts: Vec<Line>,
    /// Lines of the journal that could not be read (torn by a crash).
    #[serde(default)]
    pub unreadable_lines: usize,
    /// The conversation of each recording whose conversation id became known since the
    /// manifest before (the sealed index `export --conversation` searches; a later one for
    /// a recording replaces an earlier). Only inside the sealed manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conversations: Vec<(Uuid, String)>,
    /// Conversation ids the appliance could not hold for this manifest (more waiting than
    /// it keeps): those recordings are found by decrypting them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conversations_not_kept: u64,
    /// Since when (ms) the process that made it kept the conversations of the recordings it
    /// saw: an end it carries of a recording begun before then (in an earlier process) may
    /// have lost its conversation. None: a manifest of before the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversations_since_ms: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    manifest: String,
    ed25519: String,
}

/// The bytes to seal (the envelope) and the manifest's SHA-256 (the next one's `previous`).
pub fn sign(m: &Manifest, identity: &Identity) -> (Vec<u8>, String) {
    let text = serde_json::to_string(m).expect("a manifest always serializes");
    let signature = identity.sign(&[DOMAIN, text.as_bytes()].concat());
    let sha = hex::encode(Sha256::digest(text.as_bytes()));
    let envelope = Envelope {
        manifest: text,
        ed25519: STANDARD.encode(signature),
    };
    let mut bytes = serde_json::to_vec_pretty(&envelope).expect("an envelope always serializes");
    bytes.push(b'\n');
    (bytes, sha)
}

/// A manifest whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The manifest.
    pub manifest: Manifest,
    /// Its SHA-256 (hex).
    pub sha256: String,
}

/// Why a manifest is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not a manifest's envelope or text.
    #[error("not a manifest: {0}")]
    Malformed(String),
    /// Of an appliance whose key was not given.
    #[error("a manifest of appliance {0}, whose public key was not given (--appliance-key)")]
    Unregistered(String),
    /// The signature does not verify: forged, or altered after signing.
    #[error("the signature of appliance {appliance}'s manifest {seq} does not verify")]
    BadSignature {
        /// The appliance it claims.
        appliance: String,
        /// The number it claims.
        seq: u64,
    },
}

/// The manifest in `bytes` (a package's plaintext), if its signature verifies under the key
/// of `registered` whose id it names.
pub fn verify(bytes: &[u8], registered: &[PublicIdentity]) -> Result<Signed, ManifestError> {
    let malformed = |e: serde_json::Error| ManifestError::Malformed(e.to_string());
    let envelope: Envelope = serde_json::from_slice(bytes).map_err(malformed)?;
    let signature = STANDARD
        .decode(&envelope.ed25519)
        .map_err(|e| ManifestError::Malformed(format!("ed25519: {e}")))?;
    // The signature first, under each registered key: nothing of the text is read before.
    let signed = [DOMAIN, envelope.manifest.as_bytes()].concat();
    let Some(key) = registered.iter().find(|k| k.verify(&signed, &signature)) else {
        // Unsigned: what it claims only names the finding.
        let claims: Manifest = serde_json::from_str(&envelope.manifest).map_err(malformed)?;
        return Err(if registered.iter().any(|k| k.id() == claims.appliance) {
            ManifestError::BadSignature {
                appliance: claims.appliance,
                seq: claims.seq,
            }
        } else {
            ManifestError::Unregistered(claims.appliance)
        });
    };
    let manifest: Manifest = serde_json::from_str(&envelope.manifest).map_err(malformed)?;
    if manifest.appliance != key.id() {
        // Signed, but by another registered appliance than the one it names.
        return Err(ManifestError::BadSignature {
            appliance: manifest.appliance,
            seq: manifest.seq,
        });
    }
    if manifest.format != FORMAT {
        return Err(ManifestError::Malformed(format!(
            "format {:?}, not {FORMAT:?}",
            manifest.format
        )));
    }
    Ok(Signed {
        sha256: hex::encode(Sha256::digest(envelope.manifest.as_bytes())),
        manifest,
    })
}

/// The manifest of one period: the journal's `facts` since the manifest before (`previous`,
/// `seq`, `from_ms` follow from it).
pub fn make(
    appliance: &str,
    (seq, previous): (u64, Option<String>),
    (from_ms, to_ms, period_ms): (u64, u64, u64),
    facts: Vec<Line>,
    unreadable_lines: usize,
) -> Manifest {
    let began = facts
        .iter()
        .filter_map(|l| match l.fact {
            Fact::Started { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    Manifest {
        format: FORMAT.into(),
        appliance: appliance.into(),
        seq,
        from_ms,
        to_ms,
        period_ms,
        previous,
        began,
        facts,
        unreadable_lines,
        conversations: Vec::new(),
        conversations_not_kept: 0,
        conversations_since_ms: None,
    }
}

/// A manifest object of the store, as read: verified, or why not.
#[derive(Debug, Clone)]
pub struct ManifestObject {
    /// Its object key.
    pub key: String,
    /// Its manifest, or why it is not taken (unreadable, unsigned, …).
    pub read: Result<Signed, String>,
}

/// A recording object of the store, as read: its SHA-256 (hex), or why it could not be read.
#[derive(Debug, Clone)]
pub struct RecordingObject {
    /// Its object key.
    pub key: String,
    /// Its SHA-256, hex.
    pub sha256: Result<String, String>,
}

/// One appliance's chain of manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Chain {
    /// The appliance id.
    pub appliance: String,
    /// The manifests read.
    pub manifests: usize,
    /// The first and last sequence numbers read.
    pub first: u64,
    /// The last.
    pub last: u64,
    /// The end of the last one's period (ms): a chain that ends long before now lost its
    /// latest manifests, or its appliance stopped.
    pub last_to_ms: u64,
    /// Sequence numbers missing, as inclusive ranges.
    pub gaps: Vec<(u64, u64)>,
    /// Manifests whose `previous` is not the SHA-256 of the one before, or of which two
    /// different ones were signed (a fork).
    pub broken: Vec<u64>,
    /// The last one ended more than two of its periods before the audit: the newest were
    /// deleted, or the appliance is down.
    pub stale: bool,
}

/// A finding about one recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The recording id (of its object key's name, for an object no manifest lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// Its object key, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What was found.
    pub why: String,
}

/// What `edgerec verify-store` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// One chain per appliance.
    pub chains: Vec<Chain>,
    /// Manifest objects not taken, and why.
    pub bad_manifests: Vec<Finding>,
    /// Recordings the manifests list (in the days asked for).
    pub listed: usize,
    /// Of them, in the store with the SHA-256 listed.
    pub intact: usize,
    /// Listed as stored, not in the store.
    pub missing: Vec<Finding>,
    /// In the store with another SHA-256 than listed.
    pub altered: Vec<Finding>,
    /// In the store, listed by no verified manifest: forged, or orphaned.
    pub unlisted: Vec<Finding>,
    /// The store refused them, or they used up their attempts (they wait in the spool's
    /// `failed/`).
    pub failed: Vec<Finding>,
    /// Not stored yet, as the last manifest knows them (still recording, or waiting in the
    /// spool).
    pub not_stored: Vec<Finding>,
    /// Cut by a crash or a failed write and kept up to their last whole record (stored or
    /// not: also counted above).
    pub salvaged: Vec<Finding>,
    /// Recordings refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Objects that could not be read.
    pub unreadable: Vec<Finding>,
}

impl Report {
    /// Whether the store holds something other than what the appliances signed: a manifest
    /// missing in a chain, broken, forged or unreadable; a recording missing, altered or
    /// unlisted.
    pub fn tampered(&self) -> bool {
        self.chains
            .iter()
            .any(|c| !c.gaps.is_empty() || !c.broken.is_empty())
            || !self.bad_manifests.is_empty()
            || !self.missing.is_empty()
            || !self.altered.is_empty()
            || !self.unlisted.is_empty()
    }

    /// Whether every call the appliances saw is in the store, genuine: nothing tampered,
    /// refused, failed, waiting or unreadable, and every registered appliance's chain there
    /// and current (one with no manifest, or a stale one, may have lost its newest).
    pub fn complete(&self) -> bool {
        !self.tampered()
            && self.chains.iter().all(|c| c.manifests > 0 && !c.stale)
            && self.failed.is_empty()
            && self.not_stored.is_empty()
            && self.refused.is_empty()
            && self.unreadable.is_empty()
    }
}

/// The recording id an object key names (`…/{id}.erec`).
fn id_of_key(key: &str) -> Option<Uuid> {
    Uuid::parse_str(key.rsplit('/').next()?.strip_suffix(".erec")?).ok()
}

/// What the audit is asked: which recordings belong to the days asked for, which
/// appliances are registered, and when it is.
pub struct Scope<'a> {
    /// Whether a recording belongs to the days asked for (by its object key when it was
    /// stored, else by when the journal first named it, ms).
    pub in_scope: &'a dyn Fn(Option<&str>, u64) -> bool,
    /// The registered appliances' ids: each has a chain in the report, if only an empty one.
    pub registered: Vec<String>,
    /// Now (ms), to tell a stale chain.
    pub now_ms: u64,
}

/// Audits the store: the chains of `manifests` (by appliance, every one read from the
/// first), and the recordings they list against `objects` (the recording objects the store
/// holds in the days asked for).
pub fn audit(
    manifests: Vec<ManifestObject>,
    objects: Vec<RecordingObject>,
    scope: &Scope<'_>,
) -> Report {
    let in_scope = scope.in_scope;
    let mut report = Report::default();
    let mut by_appliance: BTreeMap<String, BTreeMap<u64, Signed>> = scope
        .registered
        .iter()
        .map(|id| (id.clone(), BTreeMap::new()))
        .collect();
    let mut forks: Vec<(String, u64)> = Vec::new();
    for m in manifests {
        let signed = match m.read {
            Ok(s) => s,
            Err(why) => {
                report.bad_manifests.push(Finding {
                    id: None,
                    key: Some(m.key),
                    why,
                });
                continue;
            }
        };
        // The key must name what the signed text says: a manifest copied to another key is
        // not taken twice.
        let (appliance, seq) = (signed.manifest.appliance.clone(), signed.manifest.seq);
        let named = crate::store::manifest_names(&m.key);
        if named.as_ref() != Some(&(appliance.clone(), seq)) {
            report.bad_manifests.push(Finding {
                id: None,
                key: Some(m.key),
                why: format!(
                    "holds appliance {appliance}'s manifest {seq}, which belongs under another key"
                ),
            });
            continue;
        }
        let chain = by_appliance.entry(appliance.clone()).or_default();
        match chain.get(&seq) {
            Some(other) if other.sha256 != signed.sha256 => {
                report.bad_manifests.push(Finding {
                    id: None,
                    key: Some(m.key),
                    why: format!(
                        "a second, different manifest {seq} of appliance {appliance}: a fork \
                         (its identity key used by two appliances, or a spool restored from a backup)"
                    ),
                });
                forks.push((appliance, seq));
            }
            Some(_) => {}
            None => {
                chain.insert(seq, signed);
            }
        }
    }
    let mut calls = Vec::new();
    let mut refusals = Vec::new();
    for (appliance, chain) in &by_appliance {
        let mut c = Chain {
            appliance: appliance.clone(),
            manifests: chain.len(),
            ..Chain::default()
        };
        let mut before: Option<&Signed> = None;
        let mut facts = Vec::new();
        for (seq, m) in chain {
            match before {
                None => {
                    c.first = *seq;
                    if *seq > 0 {
                        c.gaps.push((0, seq - 1));
                    } else if m.manifest.previous.is_some() {
                        c.broken.push(*seq);
                    }
                }
                Some(b) if b.manifest.seq + 1 < *seq => {
                    c.gaps.push((b.manifest.seq + 1, seq - 1));
                }
                Some(b) => {
                    if m.manifest.previous.as_deref() != Some(b.sha256.as_str()) {
                        c.broken.push(*seq);
                    }
                }
            }
            c.last = *seq;
            c.last_to_ms = m.manifest.to_ms;
            c.stale = m.manifest.period_ms > 0
                && m.manifest
                    .to_ms
                    .saturating_add(m.manifest.period_ms.saturating_mul(2))
                    < scope.now_ms;
            before = Some(m);
            facts.extend(m.manifest.facts.iter().cloned());
        }
        c.broken.extend(
            forks
                .iter()
                .filter(|(a, _)| a == appliance)
                .map(|(_, s)| *s),
        );
        c.broken.sort_unstable();
        c.broken.dedup();
        // Each appliance's facts on their own: one appliance's word never changes what
        // another's says of a recording.
        let (mut cs, mut rs) = fold(facts);
        calls.append(&mut cs);
        refusals.append(&mut rs);
        report.chains.push(c);
    }
    // In chain order per appliance, the latest fact of each recording won (a stored retry
    // after a failure).
    for line in refusals {
        if let Fact::Refused { reason, count } = line.fact
            && in_scope(None, line.at_ms)
        {
            *report.refused.entry(reason).or_default() += count;
        }
    }
    let objects: HashMap<String, Result<String, String>> =
        objects.into_iter().map(|o| (o.key, o.sha256)).collect();
    let mut listed_keys = BTreeSet::new();
    for call in calls {
        let stored = call.stored.as_ref().and_then(|s| match &s.what {
            Fact::Stored { key, sha256, .. } => Some((key.clone(), sha256.clone())),
            _ => None,
        });
        if !in_scope(stored.as_ref().map(|(k, _)| k.as_str()), call.first_ms()) {
            continue;
        }
        report.listed += 1;
        let finding = |key: Option<&str>, why: String| Finding {
            id: Some(call.id),
            key: key.map(str::to_string),
            why,
        };
        if let Some(Fact::Salvaged { why, bytes, .. }) = call.salvaged.as_ref().map(|w| &w.what) {
            report
                .salvaged
                .push(finding(None, format!("{why} ({bytes} bytes kept)")));
        }
        match (call.outcome, &stored) {
            ("stored", Some((key, sha))) => {
                listed_keys.insert(key.clone());
                match objects.get(key) {
                    None => report.missing.push(finding(
                        Some(key),
                        "listed as stored; not in the store".into(),
                    )),
                    Some(Err(why)) => report.unreadable.push(finding(Some(key), why.clone())),
                    Some(Ok(found)) if found != sha => report
                        .altered
                        .push(finding(Some(key), format!("SHA-256 {found}, listed {sha}"))),
                    Some(Ok(_)) => report.intact += 1,
                }
            }
            ("failed", _) => {
                let why = match call.failed.as_ref().map(|w| &w.what) {
                    Some(Fact::Failed { reason, .. }) => reason.clone(),
                    _ => "failed".into(),
                };
                report.failed.push(finding(None, why));
            }
            (outcome, _) => report.not_stored.push(finding(
                None,
                match outcome {
                    "recording" => "still recording at the last manifest".into(),
                    _ => "ended; waiting in the appliance's spool at the last manifest".into(),
                },
            )),
        }
    }
    for (key, read) in objects {
        if listed_keys.contains(&key) {
            continue;
        }
        match read {
            Err(why) => report.unreadable.push(Finding {
                id: id_of_key(&key),
                key: Some(key),
                why,
            }),
            Ok(_) => report.unlisted.push(Finding {
                id: id_of_key(&key),
                key: Some(key),
                why: "no verified manifest lists it: forged, or orphaned".into(),
            }),
        }
    }
    report.unlisted.sort_by(|a, b| a.key.cmp(&b.key));
    report
}

/// The SHA-256s (hex) of every package the verified `manifests` list as stored: what
/// `export --appliance-key` lets through.
pub fn listed_digests(manifests: &[Signed]) -> BTreeSet<String> {
    manifests
        .iter()
        .flat_map(|m| &m.manifest.facts)
        .filter_map(|l| match &l.fact {
            Fact::Stored { sha256, .. } => Some(sha256.clone()),
            _ => None,
        })
        .collect()
}

/// The sealed conversation index of verified manifests: each recording's conversation (the
/// latest its own appliance's manifests gave), and the recordings the index vouches have
/// none. Everything else — a recording salvaged after a crash, one still open, one whose
/// end was put into a manifest by a process that did not see it begin (its conversation may
/// have died with the process before it), one ended in a manifest written before the index
/// existed, one of an appliance that could not hold every id, one no manifest names — is for
/// an export by conversation to decrypt and tell. A recording ended in a manifest of a
/// process that saw it begin, with no conversation noted, has none: its conversation would
/// have been noted before its end, and the manifest that took the end took it too.
pub fn conversation_index(manifests: &[Signed]) -> (HashMap<Uuid, String>, BTreeSet<Uuid>) {
    let mut ordered: Vec<&Signed> = manifests.iter().collect();
    ordered.sort_by(|a, b| {
        (&a.manifest.appliance, a.manifest.seq).cmp(&(&b.manifest.appliance, b.manifest.seq))
    });
    let mut by_appliance: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in &ordered {
        by_appliance
            .entry(&m.manifest.appliance)
            .or_default()
            .push(&m.manifest);
    }
    let mut of = HashMap::new();
    let mut none = BTreeSet::new();
    for chain in by_appliance.values() {
        // Facts folded across the appliance's manifests: a recording's end may be in a later
        // manifest than its start.
        let (calls, _) = fold(chain.iter().flat_map(|m| m.facts.iter().cloned()).collect());
        let own: BTreeSet<Uuid> = calls.iter().map(|c| c.id).collect();
        let mut tagged = HashMap::new();
        // Where each end was put into a manifest: since when that manifest's process kept
        // conversations (none before the index existed).
        let mut ended_under = HashMap::new();
        let lossy = chain.iter().any(|m| m.conversations_not_kept > 0);
        for m in chain {
            // An appliance speaks only for its own recordings.
            for (id, c) in m.conversations.iter().filter(|(id, _)| own.contains(id)) {
                tagged.insert(*id, c.clone());
            }
            for l in &m.facts {
                if let Fact::Ended { id, .. } = l.fact {
                    ended_under.insert(id, m.conversations_since_ms);
                }
            }
        }
        for c in calls {
            if tagged.contains_key(&c.id) {
                continue;
            }
            let witnessed = match (ended_under.get(&c.id), c.started_ms) {
                (Some(Some(since)), Some(started)) => *since <= started,
                _ => false,
            };
            if witnessed && c.salvaged.is_none() && !lossy {
                none.insert(c.id);
            }
        }
        of.extend(tagged);
    }
    (of, none)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &std::path::Path, name: &str) -> Identity {
        Identity::load_or_create(&dir.join(name)).unwrap().0
    }

    fn line(at_ms: u64, fact: Fact) -> Line {
        Line { at_ms, fact }
    }

    #[test]
    fn the_conversation_index_vouches_only_for_what_its_process_saw() {
        let ids: Vec<Uuid> = (1..=8).map(Uuid::from_u128).collect();
        let (a, b, c, d, e, f, g, h) = (
            ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], ids[6], ids[7],
        );
        let started = |id| Fact::Started {
            id,
            port: 0,
            continues: None,
        };
        let ended = |id| Fact::Ended {
            id,
            reason: "complete".into(),
        };
        // Manifests of appliance "x" made by a process keeping conversations since `since`;
        // facts at time `at`.
        let signed = |appliance: &str,
                      seq,
                      since: Option<u64>,
                      facts: Vec<(u64, Fact)>,
                      convs: Vec<(Uuid, &str)>| {
            let mut m = make(
                appliance,
                (seq, None),
                (0, 1, 1),
                facts.into_iter().map(|(at, f)| line(at, f)).collect(),
                0,
            );
            m.conversations = convs.into_iter().map(|(i, c)| (i, c.to_string())).collect();
            m.conversations_since_ms = since;
            Signed {
                manifest: m,
                sha256: String::new(),
            }
        };
        // a: tagged, relabelled later; b: ended untagged in the process that saw it begin
        // (has none); c: salvaged; d: still open; e: begun by a process that crashed, its end
        // carried by the next (its conversation may be lost); f: ended in a manifest of
        // before the index; g: of appliance "y", relabelled by "x" (refused); h: named by no
        // manifest at all (not in the index).
        let first = signed(
            "x",
            0,
            Some(100),
            vec![
                (100, started(a)),
                (100, started(b)),
                (100, started(c)),
                (100, started(d)),
                (110, ended(b)),
                (100, started(e)),
            ],
            vec![(a, "conv-1")],
        );
        let second = signed(
            "x",
            1,
            Some(200),
            vec![
                (200, ended(a)),
                (
                    200,
                    Fact::Salvaged {
                        id: c,
                        why: "crash".into(),
                        bytes: 1,
                    },
                ),
                (150, ended(e)),
            ],
            vec![(a, "conv-2"), (g, "conv-1")],
        );
        let old = signed(
            "y",
            0,
            None,
            vec![
                (5, started(f)),
                (6, ended(f)),
                (5, started(g)),
                (6, ended(g)),
            ],
            vec![],
        );
        // Whatever order they are read in, the later manifest's word wins.
        let (of, none) = conversation_index(&[second.clone(), first.clone(), old.clone()]);
        assert_eq!(of.len(), 1, "{of:?}");
        assert_eq!(of[&a], "conv-2");
        assert_eq!(none, BTreeSet::from([b]), "{none:?}");
        assert!(!none.contains(&h) && !of.contains_key(&h));
        // An appliance that could not hold every id vouches for no untagged recording.
        let mut lossy = second;
        lossy.manifest.conversations_not_kept = 3;
        let (_, none) = conversation_index(&[first, lossy, old]);
        assert!(none.is_empty());
    }

    fn stored(id: Uuid, key: &str, sha: &str) -> Fact {
        Fact::Stored {
            id,
            key: key.into(),
            bytes: 10,
            sha256: sha.into(),
        }
    }

    fn started(id: Uuid) -> Fact {
        Fact::Started {
            id,
            port: 40_000,
            continues: None,
        }
    }

    /// Signs a chain of manifests, one per list of facts.
    fn chain(me: &Identity, periods: Vec<Vec<Line>>) -> Vec<ManifestObject> {
        let mut previous = None;
        let mut out = Vec::new();
        for (seq, facts) in periods.into_iter().enumerate() {
            let seq = seq as u64;
            let m = make(
                &me.id(),
                (seq, previous.clone()),
                (seq * 60_000, (seq + 1) * 60_000, 60_000),
                facts,
                0,
            );
            let (bytes, sha) = sign(&m, me);
            let public = PublicIdentity::from_pem(&me.public_pem()).unwrap();
            let read = verify(&bytes, &[public]).map_err(|e| e.to_string());
            assert_eq!(read.as_ref().unwrap().sha256, sha);
            out.push(ManifestObject {
                key: format!(
                    "rec/{}",
                    crate::store::manifest_object(&me.id(), seq, (seq + 1) * 60_000)
                ),
                read,
            });
            previous = Some(sha);
        }
        out
    }

    fn everything(_: Option<&str>, _: u64) -> bool {
        true
    }

    fn all() -> Scope<'static> {
        Scope {
            in_scope: &everything,
            registered: vec![],
            now_ms: 0,
        }
    }

    #[test]
    fn a_signature_verifies_only_under_its_own_key_and_only_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (me, other) = (identity(dir.path(), "a"), identity(dir.path(), "b"));
        let m = make(&me.id(), (0, None), (0, 1, 60_000), vec![], 0);
        let (bytes, _) = sign(&m, &me);
        let mine = PublicIdentity::from_pem(&me.public_pem()).unwrap();
        let theirs = PublicIdentity::from_pem(&other.public_pem()).unwrap();
        assert_eq!(
            verify(&bytes, &[theirs.clone(), mine.clone()])
                .unwrap()
                .manifest,
            m
        );
        assert_eq!(
            verify(&bytes, std::slice::from_ref(&theirs)),
            Err(ManifestError::Unregistered(me.id()))
        );
        // Another appliance's key signing a manifest that claims to be mine.
        let (forged, _) = sign(&m, &other);
        assert_eq!(
            verify(&forged, &[mine.clone(), theirs]),
            Err(ManifestError::BadSignature {
                appliance: me.id(),
                seq: 0
            })
        );
        // One digit of the signed text changed.
        let text = String::from_utf8(bytes)
            .unwrap()
            .replacen("\\\"seq\\\":0", "\\\"seq\\\":1", 1);
        assert!(matches!(
            verify(text.as_bytes(), std::slice::from_ref(&mine)),
            Err(ManifestError::BadSignature { seq: 1, .. })
        ));
        assert!(matches!(
            verify(b"{}", &[mine]),
            Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn the_audit_names_every_recording_missing_altered_unlisted_failed_or_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity(dir.path(), "a");
        let id = |n| Uuid::from_u128(n);
        let key = |n: u128| format!("rec/2026/12/01/{}.erec", id(n));
        let manifests = chain(
            &me,
            vec![
                vec![
                    line(1, started(id(1))),
                    line(2, started(id(2))),
                    line(3, started(id(3))),
                    line(4, stored(id(1), &key(1), "aa")),
                    line(
                        5,
                        Fact::Failed {
                            id: id(3),
                            reason: "gave up after 3 attempts".into(),
                        },
                    ),
                ],
                vec![
                    line(60_001, stored(id(2), &key(2), "bb")),
                    line(60_002, started(id(4))),
                    line(60_003, stored(id(4), &key(4), "dd")),
                    line(60_004, started(id(5))),
                    line(
                        60_005,
                        Fact::Refused {
                            reason: "spool_full".into(),
                            count: 2,
                        },
                    ),
                ],
                vec![
                    // A retry of 3 from failed/ stored it after all.
                    line(120_001, stored(id(3), &key(3), "cc")),
                ],
            ],
        );
        let obj = |k: String, sha: &str| RecordingObject {
            key: k,
            sha256: Ok(sha.into()),
        };
        let objects = vec![
            obj(key(1), "aa"),
            obj(key(2), "b0"),
            obj(key(3), "cc"),
            obj(key(9), "99"),
        ];
        let r = audit(manifests.clone(), objects.clone(), &all());
        assert_eq!(r.chains.len(), 1);
        assert!(r.chains[0].gaps.is_empty() && r.chains[0].broken.is_empty());
        assert_eq!((r.listed, r.intact), (5, 2));
        let ids = |f: &[Finding]| f.iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids(&r.missing), [Some(id(4))]);
        assert_eq!(ids(&r.altered), [Some(id(2))]);
        assert_eq!(ids(&r.unlisted), [Some(id(9))]);
        assert!(r.failed.is_empty(), "stored on a retry");
        assert_eq!(ids(&r.not_stored), [Some(id(5))]);
        assert_eq!(r.refused.get("spool_full"), Some(&2));
        assert!(r.tampered() && !r.complete());

        // The middle manifest deleted: a gap, and what only it said is not known.
        let mut gap = manifests.clone();
        gap.remove(1);
        let r = audit(gap, objects.clone(), &all());
        assert_eq!(r.chains[0].gaps, [(1, 1)]);
        // A manifest copied over another's key: not taken.
        let mut copied = manifests.clone();
        copied[1].read = copied[2].read.clone();
        let r = audit(copied, objects, &all());
        assert_eq!(r.bad_manifests.len(), 1);
        assert_eq!(r.chains[0].gaps, [(1, 1)]);
    }

    #[test]
    fn a_manifest_signed_after_another_one_was_dropped_breaks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity(dir.path(), "a");
        let mut first = chain(&me, vec![vec![], vec![]]);
        let second = chain(
            &me,
            vec![vec![], vec![line(1, started(Uuid::from_u128(1)))]],
        );
        // Manifest 1 of another history (its `previous` is not manifest 0 here).
        let mut m = second[1].read.clone().unwrap();
        m.manifest.previous = Some("00".repeat(32));
        first[1].read = Ok(m);
        let r = audit(first, vec![], &all());
        assert_eq!(r.chains[0].broken, [1]);
        assert!(r.tampered());
    }

    #[test]
    fn a_wiped_store_a_stale_chain_and_a_fork_are_never_complete() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity(dir.path(), "a");
        // Every manifest and recording deleted: the registered appliance has no chain.
        let wiped = audit(
            vec![],
            vec![],
            &Scope {
                registered: vec![me.id()],
                ..all()
            },
        );
        assert_eq!(wiped.chains[0].manifests, 0);
        assert!(!wiped.complete());
        // The newest manifests deleted: the chain ends two periods before now.
        let manifests = chain(&me, vec![vec![], vec![]]);
        let at = |now_ms| audit(manifests.clone(), vec![], &Scope { now_ms, ..all() });
        assert!(at(120_000 + 120_000).complete());
        let stale = at(120_000 + 120_001);
        assert!(stale.chains[0].stale && !stale.complete() && !stale.tampered());
        // Two different manifests of one number: a fork.
        let other = chain(&me, vec![vec![line(5, started(Uuid::from_u128(5)))]]);
        let mut forked = manifests.clone();
        forked.push(other[0].clone());
        let r = audit(forked, vec![], &all());
        assert_eq!(r.chains[0].broken, [0]);
        assert!(r.tampered());
    }

    #[test]
    fn a_store_that_holds_what_was_signed_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity(dir.path(), "a");
        let id = Uuid::from_u128(7);
        let key = format!("rec/2026/12/01/{id}.erec");
        let manifests = chain(
            &me,
            vec![
                vec![line(1, started(id))],
                vec![line(60_001, stored(id, &key, "77"))],
            ],
        );
        let objects = vec![RecordingObject {
            key,
            sha256: Ok("77".into()),
        }];
        let r = audit(manifests.clone(), objects, &all());
        assert!(r.complete(), "{r:?}");
        assert_eq!(
            listed_digests(&[manifests[1].read.clone().unwrap()]),
            BTreeSet::from(["77".to_string()])
        );
    }
}
