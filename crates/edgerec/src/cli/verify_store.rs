//! `edgerec verify-store`: reads the manifests of a `dir` or `s3` store, checks their
//! signatures under the registered appliance keys and their chains, and audits the store's
//! recordings against them (`appliance/manifest.rs` holds the audit; this module reads the
//! store and prints it). And the manifests `export --appliance-key` lets packages through by.
//!
//! Invariants: nothing read from the store is trusted before its signature verifies; a
//! manifest object is read only up to [`MAX_MANIFEST`] bytes; recordings are hashed as they
//! stream, never held whole. The exit code says how the store stands: 0 complete, 4 it does
//! not hold what was signed (tampered), 1 genuine but incomplete (refused, failed, waiting).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use erec::clock::Utc;
use erec::keys::Unwrapper;

use crate::Error;
use crate::appliance::identity::PublicIdentity;
use crate::appliance::manifest::{
    Finding, ManifestObject, RecordingObject, Report, Scope, Signed, audit, verify,
};
use crate::store::{MANIFESTS, Readable};

/// The largest manifest object read (a day of a busy appliance's facts is far less).
pub const MAX_MANIFEST: usize = 256 << 20;

/// The registered appliances' public keys (`edgerec identity show` of each).
pub fn registered(paths: &[PathBuf]) -> Result<Vec<PublicIdentity>, Error> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
            PublicIdentity::from_pem(&text).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: not an appliance's public key (Ed25519 SPKI PEM, as `edgerec identity show` prints it)",
                    p.display()
                ))
            })
        })
        .collect()
}

/// The store of an appliance config, opened for reading, and its prefix.
fn open_store(store_config: &Path) -> Result<(Readable, String), Error> {
    let cfg = crate::appliance::config::Config::load(store_config)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let store = cfg
        .store
        .open_readable()
        .map_err(|e| Error::Invalid(format!("{}: {e}", store_config.display())))?;
    Ok((store, cfg.prefix))
}

/// The plaintext of a manifest package's bytes, verified.
fn open_manifest(
    bytes: &[u8],
    keys: &dyn Unwrapper,
    registered: &[PublicIdentity],
) -> Result<Signed, String> {
    let mut plain = Vec::new();
    erec::reader::open_stream(bytes, keys, erec::reader::ReadMode::Strict, &mut plain, 1)
        .map_err(|e| e.to_string())?;
    verify(&plain, registered).map_err(|e| e.to_string())
}

/// Every manifest object of the store, read and verified.
pub fn manifests(
    store: &Readable,
    prefix: &str,
    keys: &dyn Unwrapper,
    registered: &[PublicIdentity],
) -> Result<Vec<ManifestObject>, Error> {
    let too_large = || format!("larger than {MAX_MANIFEST} bytes: not a manifest");
    let mut out = Vec::new();
    match store {
        Readable::Dir(root) => {
            let dir = root.join(prefix).join(MANIFESTS);
            if !dir.is_dir() {
                return Ok(out);
            }
            for path in crate::package_files::find_manifests(&dir)?.packages {
                let key = key_of(root, &path);
                let read = read_bounded(&path).and_then(|b| match b.len() > MAX_MANIFEST {
                    true => Err(too_large()),
                    false => open_manifest(&b, keys, registered),
                });
                out.push(ManifestObject { key, read });
            }
        }
        Readable::S3(s3) => {
            for key in s3
                .list(&format!("{prefix}{MANIFESTS}"))
                .map_err(|e| Error::Invalid(e.to_string()))?
            {
                let read = match s3.get_first(&key, MAX_MANIFEST + 1) {
                    Ok(b) if b.len() > MAX_MANIFEST => Err(too_large()),
                    Ok(b) => open_manifest(&b, keys, registered),
                    Err(e) => Err(e.to_string()),
                };
                out.push(ManifestObject { key, read });
            }
        }
    }
    Ok(out)
}

/// At most [`MAX_MANIFEST`] + 1 bytes of a file (whatever it grows to meanwhile).
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut b = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_MANIFEST as u64 + 1).read_to_end(&mut b))
        .map_err(|e| e.to_string())?;
    Ok(b)
}

/// A `dir` store's object key of a file in it.
fn key_of(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The recording objects of the store (on `days`, all when `None`), each with its SHA-256.
fn recordings(
    store: &Readable,
    prefix: &str,
    days: Option<&[String]>,
) -> Result<Vec<RecordingObject>, Error> {
    use crate::export::bulk::Source;
    Ok(match store {
        Readable::Dir(root) => crate::export::bulk::from_dir_store(root, prefix, days)?
            .into_iter()
            .filter_map(|s| match s {
                Source::File(p) => Some(RecordingObject {
                    key: key_of(root, &p),
                    sha256: erec::crypto::sha256_file(&p)
                        .map(hex::encode)
                        .map_err(|e| e.to_string()),
                }),
                Source::S3(_) => None,
            })
            .collect(),
        Readable::S3(s3) => crate::export::bulk::from_s3_store(s3, prefix, days)
            .map_err(|e| Error::Invalid(e.to_string()))?
            .into_iter()
            .filter_map(|s| match s {
                Source::S3(key) => Some(RecordingObject {
                    sha256: s3.sha256_of(&key).map_err(|e| e.to_string()),
                    key,
                }),
                Source::File(_) => None,
            })
            .collect(),
    })
}

/// What `verify-store` is asked.
pub struct VerifyArgs<'a> {
    /// The appliance config whose `[store]` to verify.
    pub store_config: &'a Path,
    /// The registered appliances' public keys.
    pub appliance_keys: &'a [PathBuf],
    /// `--from` and `--to`: the recordings begun in those UTC days (inclusive) or between
    /// those times (the end exclusive).
    pub days: Option<(String, Option<String>)>,
    /// A JSON report instead of lines.
    pub json: bool,
}

/// `edgerec verify-store`.
pub fn verify_store(keys: &dyn Unwrapper, args: VerifyArgs<'_>) -> Result<(), Error> {
    let registered = registered(args.appliance_keys)?;
    let (store, prefix) = open_store(args.store_config)?;
    let window = match &args.days {
        Some((f, t)) => Some(
            crate::export::bulk::Window::parse(f, t.as_deref())
                .map_err(|e| Error::Invalid(e.to_string()))?,
        ),
        None => None,
    };
    // Every manifest, whatever the window: a recording's outcome may be in a later one, and
    // the chain is checked whole.
    let manifests = manifests(&store, &prefix, keys, &registered)?;
    let days = window.map(|w| w.day_prefixes());
    let objects: Vec<RecordingObject> = recordings(&store, &prefix, days.as_deref())?
        .into_iter()
        .filter(|o| window.is_none_or(|w| w.holds(&o.key)))
        .collect();
    // A recording belongs to the window by its start: its key's id when it was stored, else
    // when the journal first named it.
    let in_scope = |key: Option<&str>, first_ms: u64| -> bool {
        window.is_none_or(|w| match key {
            Some(k) => w.holds(k),
            None => (w.from_ms..w.to_ms).contains(&first_ms),
        })
    };
    let report = audit(
        manifests,
        objects,
        &Scope {
            in_scope: &in_scope,
            registered: registered.iter().map(PublicIdentity::id).collect(),
            now_ms: erec::clock::now_ms(),
        },
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report always serializes")
        );
    } else {
        print_report(&report);
    }
    let summary = format!(
        "{} recordings listed, {} in the store as signed",
        report.listed, report.intact
    );
    if report.tampered() {
        Err(Error::Unverified(format!(
            "verify-store: the store does not hold what its appliances signed ({summary})"
        )))
    } else if !report.complete() {
        Err(Error::Invalid(format!(
            "verify-store: incomplete: recordings refused, failed, not stored or unreadable, or a chain missing or stale ({summary})"
        )))
    } else {
        eprintln!("edgerec: verify-store: complete: {summary}");
        Ok(())
    }
}

fn when(ms: u64) -> String {
    let d = Utc::from_unix_ms(ms);
    let (h, m, s, _) = d.hms_ms;
    format!(
        "{:04}-{:02}-{:02}T{h:02}:{m:02}:{s:02}Z",
        d.year, d.month, d.day
    )
}

fn print_report(r: &Report) {
    for c in &r.chains {
        if c.manifests == 0 {
            println!(
                "NO MANIFEST appliance {}: none in the store (not started yet, or its manifests were deleted)",
                c.appliance
            );
            continue;
        }
        if c.stale {
            println!(
                "STALE       appliance {}: its last manifest ended {}, more than two periods ago (the newest were deleted, or it is down)",
                c.appliance,
                when(c.last_to_ms)
            );
        }
        let state = if c.gaps.is_empty() && c.broken.is_empty() {
            "chain intact"
        } else {
            "CHAIN BROKEN"
        };
        println!(
            "appliance {}: manifests {}..={} ({} read), {state}; the last covers to {}",
            c.appliance,
            c.first,
            c.last,
            c.manifests,
            when(c.last_to_ms)
        );
        for (a, b) in &c.gaps {
            println!(
                "GAP         appliance {}: manifests {a}..={b} missing",
                c.appliance
            );
        }
        for s in &c.broken {
            println!(
                "BROKEN      appliance {}: manifest {s} does not follow the one before (its previous SHA-256 differs)",
                c.appliance
            );
        }
    }
    let lines: [(&str, &Vec<Finding>); 8] = [
        ("BAD MANIFEST", &r.bad_manifests),
        ("MISSING", &r.missing),
        ("ALTERED", &r.altered),
        ("UNLISTED", &r.unlisted),
        ("FAILED", &r.failed),
        ("NOT STORED", &r.not_stored),
        ("UNREADABLE", &r.unreadable),
        ("salvaged", &r.salvaged),
    ];
    for (what, findings) in lines {
        for f in findings {
            let id = f.id.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
            match &f.key {
                Some(k) => println!("{what:<11} {id} {k}: {}", f.why),
                None => println!("{what:<11} {id}: {}", f.why),
            }
        }
    }
    for (reason, count) in &r.refused {
        println!("REFUSED     {count} recordings: {reason}");
    }
    println!(
        "{} recordings listed, {} in the store as signed",
        r.listed, r.intact
    );
}

/// What the verified manifests of a store give an export.
pub struct ExportIndex {
    /// The SHA-256s (hex) of every package they list as stored (`--appliance-key`).
    pub genuine: BTreeSet<String>,
    /// Each recording's conversation, from the sealed index (`--conversation`, and the
    /// platform layout's conversation start).
    pub conversation_of: std::collections::HashMap<uuid::Uuid, String>,
    /// Recordings the index vouches have no conversation. Any other recording not in
    /// `conversation_of` is one whose conversation it does not know: an export by
    /// conversation decrypts it to tell.
    pub none: BTreeSet<uuid::Uuid>,
}

impl ExportIndex {
    /// Whether an export of `wanted` conversations (sorted) must open the recording `id`:
    /// unless the index gives it another conversation, or vouches it has none.
    pub fn may_belong(&self, id: &uuid::Uuid, wanted: &[String]) -> bool {
        match self.conversation_of.get(id) {
            Some(c) => wanted.binary_search(c).is_ok(),
            None => !self.none.contains(id),
        }
    }
}

impl ExportIndex {
    /// When each conversation began: its earliest recording's start (a UUIDv7's time).
    pub fn starts(&self) -> std::collections::HashMap<String, u64> {
        let mut starts = std::collections::HashMap::new();
        for (id, c) in &self.conversation_of {
            if let Some(ms) = crate::export::bulk::uuid_ms(id) {
                starts
                    .entry(c.clone())
                    .and_modify(|m: &mut u64| *m = (*m).min(ms))
                    .or_insert(ms);
            }
        }
        starts
    }
}

/// The verified manifests of the store, read for an export (manifests that do not verify are
/// named on standard error and lend nothing).
pub fn export_index(
    store_config: &Path,
    appliance_keys: &[PathBuf],
    keys: &dyn Unwrapper,
) -> Result<ExportIndex, Error> {
    let registered = registered(appliance_keys)?;
    let (store, prefix) = open_store(store_config)?;
    let mut signed = Vec::new();
    for m in manifests(&store, &prefix, keys, &registered)? {
        match m.read {
            Ok(s) => signed.push(s),
            Err(why) => eprintln!("edgerec: manifest {} not taken: {why}", m.key),
        }
    }
    let (conversation_of, none) = crate::appliance::manifest::conversation_index(&signed);
    Ok(ExportIndex {
        genuine: crate::appliance::manifest::listed_digests(&signed),
        conversation_of,
        none,
    })
}
