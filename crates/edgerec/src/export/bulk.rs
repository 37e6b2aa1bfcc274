//! Bulk export (`edgerec export` over many packages): package files, directories, a `dir`
//! store or an `s3` store (by the appliance config's `[store]`, optionally a UTC date range
//! over the `{prefix}{yyyy}/{mm}/{dd}/` key layout), exported in parallel into the export
//! layout, resumable, with progress and a summary of what failed and why.
//!
//! The packages are first grouped into calls ([`crate::export::join`], from their headers:
//! a file's first bytes, an S3 object's by a ranged GET), and each call is exported as one
//! recording; with a date range, the store is listed a day further on each side, and a
//! call is exported when any of its parts is in the range.
//!
//! Invariants:
//! - One bad call never stops the rest: each is exported, skipped or failed on its own,
//!   and every failure is reported with its reason.
//! - Resumable: after a call's outputs are in place,
//!   `<out>/.edgerec-export/done/<id>.<format>.json` (the first part's id) records what its
//!   packages were (each one's header MAC and size, or for S3 the `erec-sha256` the store
//!   holds, joined by `+`) and each output's path, size and modification time. A later run
//!   skips a call only if that record matches its packages and every output is still there,
//!   unchanged in size and time; anything else (a part more, say) is exported again. (An S3
//!   call already done is not even downloaded.)
//! - Packages fetched from S3 are ciphertext; they are checked against the `erec-sha256` the
//!   store holds for them before they are opened, and removed after.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::export::join::{Facts, calls};
use crate::export::{Exported, Format, export_parts_to};
use erec::keys::Unwrapper;

/// Where a package comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A package file.
    File(PathBuf),
    /// An object of the S3 store.
    #[cfg(feature = "appliance")]
    S3(String),
}

impl Source {
    /// How it is named in progress lines and the summary.
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            #[cfg(feature = "appliance")]
            Source::S3(k) => format!("s3:{k}"),
        }
    }
}

/// How a call is named in progress lines and the summary: its first package, and how many
/// continue it.
pub fn call_name(call: &[Source]) -> String {
    let first = call.first().map(Source::name).unwrap_or_default();
    match call.len() {
        0 | 1 => first,
        n => format!("{first} (+{} continuing it)", n - 1),
    }
}

/// The record of a finished export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// What the package was: `mac:<header MAC hex>:<size>`, or `sha256:<hex>` for S3.
    pub package: String,
    /// Each output: its path relative to the export's destination, size, and modification
    /// time (ns since the epoch; 0 for an object).
    pub outputs: Vec<(String, u64, u128)>,
    /// For a bucket, each output's ETag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etags: Vec<String>,
    /// What else shaped the outputs (the layout, the server-side encryption): a record
    /// made otherwise does not count.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub made_with: String,
}

/// Where an export writes.
pub enum Out {
    /// A directory: done-records in `<dir>/.edgerec-export/done/`.
    Dir(PathBuf),
    /// A bucket: done-records beside the outputs, under `{prefix}.edgerec-export/done/`.
    #[cfg(feature = "appliance")]
    Bucket(Box<crate::export::bucket::Bucket>),
}

impl Out {
    fn dest(&self) -> crate::export::Dest<'_> {
        match self {
            Out::Dir(d) => crate::export::Dest::Dir(d),
            #[cfg(feature = "appliance")]
            Out::Bucket(b) => crate::export::Dest::Bucket(b),
        }
    }
}

/// An output file's size and modification time (ns).
pub(crate) fn stamp(path: &Path) -> io::Result<(u64, u128)> {
    let m = fs::metadata(path)?;
    let t = m
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Ok((m.len(), t))
}

/// What became of one package.
#[derive(Debug)]
pub enum ExportOutcome {
    /// Exported now.
    Exported {
        /// The media output (a path, or `s3://bucket/key`).
        media: String,
        /// Whether the package was terminated (else the metadata says it was not).
        terminated: bool,
    },
    /// Exported before, and verified.
    Skipped,
    /// Not of the media types asked for (`--media-type`).
    NotSelected,
    /// Not exported: why.
    Failed(Error),
}

/// Why `--from`/`--to` name no days.
#[cfg(feature = "appliance")]
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DateRangeError {
    /// A bound is not a date.
    #[error("{0}: not a UTC day (2026-11-30) or time (2026-11-30T10:00Z)")]
    NotADate(String),
    /// `--from` is a time and `--to` is missing.
    #[error("--from {0} is a time: give --to too (the end, exclusive)")]
    NeedsTo(String),
    /// The range ends before it starts.
    #[error("--to {to} is before --from {from}")]
    Backwards {
        /// `--from`.
        from: String,
        /// `--to`.
        to: String,
    },
    /// The range is longer than ten years (each day is a listing).
    #[error("a date range of more than ten years")]
    TooLong,
}

#[cfg(feature = "appliance")]
const DAY_MS: u64 = 86_400_000;

/// The key prefix `yyyy/mm/dd/` of the UTC day of `ms`.
#[cfg(feature = "appliance")]
fn day_prefix(ms: u64) -> String {
    let u = erec::clock::Utc::from_unix_ms(ms);
    format!("{:04}/{:02}/{:02}/", u.year, u.month, u.day)
}

/// A bound of `--from`/`--to`: its time (ms) and whether it is a whole day.
#[cfg(feature = "appliance")]
fn bound(s: &str) -> Option<(u64, bool)> {
    use erec::clock::parse_rfc3339_ms;
    if let Some(ms) = parse_rfc3339_ms(&format!("{s}T00:00:00Z")) {
        return Some((ms, true));
    }
    if let Some(ms) = parse_rfc3339_ms(s) {
        return Some((ms, false));
    }
    // To the minute (2026-11-30T10:00Z) or the hour (2026-11-30T10Z).
    let head = s.strip_suffix('Z')?;
    let full = match head.len() {
        16 => format!("{head}:00Z"),
        13 => format!("{head}:00:00Z"),
        _ => return None,
    };
    parse_rfc3339_ms(&full).map(|ms| (ms, false))
}

/// The time window of `--from`/`--to`: UTC days (`YYYY-MM-DD`; `--to` inclusive, `--from`
/// alone one day) or instants (`2026-11-30T10:00Z`, to the hour, minute or second; start
/// inclusive, end exclusive). Days select what their listings hold (as they always did);
/// times select a package by its recording's start (its UUIDv7).
#[cfg(feature = "appliance")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The first millisecond.
    pub from_ms: u64,
    /// The first millisecond after it.
    pub to_ms: u64,
    /// Whole days: the days' listings are the selection.
    pub days: bool,
}

#[cfg(feature = "appliance")]
impl Window {
    /// The window of `--from FROM [--to TO]`.
    pub fn parse(from: &str, to: Option<&str>) -> Result<Window, DateRangeError> {
        let not = |s: &str| DateRangeError::NotADate(s.to_string());
        let (from_ms, from_day) = bound(from).ok_or_else(|| not(from))?;
        let (to_ms, to_day) = match to {
            None if from_day => (from_ms + DAY_MS, true),
            None => return Err(DateRangeError::NeedsTo(from.to_string())),
            Some(t) => match bound(t).ok_or_else(|| not(t))? {
                (ms, true) => (ms + DAY_MS, true),
                (ms, false) => (ms, false),
            },
        };
        if to_ms <= from_ms {
            return Err(DateRangeError::Backwards {
                from: from.to_string(),
                to: to.unwrap_or(from).to_string(),
            });
        }
        if (to_ms - from_ms) / DAY_MS > 3660 {
            return Err(DateRangeError::TooLong);
        }
        Ok(Window {
            from_ms,
            to_ms,
            days: from_day && to_day,
        })
    }

    /// The UTC days it touches, as key prefixes `yyyy/mm/dd/`.
    pub fn day_prefixes(&self) -> Vec<String> {
        let (first, last) = (self.from_ms / DAY_MS, (self.to_ms - 1) / DAY_MS);
        (first..=last).map(|d| day_prefix(d * DAY_MS)).collect()
    }

    /// The day before it and the day after it, as key prefixes: listed too, so that a call
    /// across midnight finds its other part.
    pub fn days_around(&self) -> Vec<String> {
        vec![
            day_prefix(self.from_ms.saturating_sub(DAY_MS)),
            day_prefix((self.to_ms - 1).saturating_add(DAY_MS)),
        ]
    }

    /// Whether the recording a package file or key names (`…/{id}.erec`) began in it (for
    /// days: whether its day's listing chose it); one whose name is not an id is taken.
    pub fn holds(&self, name: &str) -> bool {
        if self.days {
            return true;
        }
        let Some(ms) = id_of(name).and_then(|u| uuid_ms(&u)) else {
            return true;
        };
        (self.from_ms..self.to_ms).contains(&ms)
    }
}

/// The recording id a package file or key names (`…/{id}.erec`).
#[cfg(feature = "appliance")]
pub fn id_of(name: &str) -> Option<uuid::Uuid> {
    name.rsplit('/')
        .next()
        .and_then(|n| n.strip_suffix(".erec"))
        .and_then(|n| uuid::Uuid::parse_str(n).ok())
}

/// A UUIDv7's time (unix ms).
#[cfg(feature = "appliance")]
pub fn uuid_ms(id: &uuid::Uuid) -> Option<u64> {
    let (s, n) = id.get_timestamp()?.to_unix();
    Some(s * 1000 + u64::from(n / 1_000_000))
}

/// The packages of the inputs (files and directories searched for `*.erec`).
pub fn from_paths(inputs: &[PathBuf]) -> io::Result<Vec<Source>> {
    let mut out = Vec::new();
    for i in inputs {
        out.extend(
            crate::package_files::find(i)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", i.display())))?
                .packages
                .into_iter()
                .map(Source::File),
        );
    }
    Ok(out)
}

/// The packages of a `dir` store under `prefix`, on `days` (all when `None`).
#[cfg(feature = "appliance")]
pub fn from_dir_store(
    root: &Path,
    prefix: &str,
    days: Option<&[String]>,
) -> io::Result<Vec<Source>> {
    let base = root.join(prefix);
    match days {
        None => from_paths(&[base]),
        Some(days) => {
            let dirs: Vec<PathBuf> = days
                .iter()
                .map(|d| base.join(d))
                // A day that is a symlink is not followed (a store walk never is).
                .filter(|d| fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()))
                .collect();
            from_paths(&dirs)
        }
    }
}

/// The packages of an S3 store under `prefix`, on `days` (all when `None`).
#[cfg(feature = "appliance")]
pub fn from_s3_store(
    store: &crate::store::s3::S3Store,
    prefix: &str,
    days: Option<&[String]>,
) -> Result<Vec<Source>, crate::store::StoreError> {
    let prefixes: Vec<String> = match days {
        None => vec![prefix.to_string()],
        Some(d) => d.iter().map(|d| format!("{prefix}{d}")).collect(),
    };
    let mut out = Vec::new();
    for p in prefixes {
        out.extend(
            store
                .list(&p)?
                .into_iter()
                .filter(|k| k.ends_with(".erec") && !crate::store::is_manifest(prefix, k))
                .map(Source::S3),
        );
    }
    Ok(out)
}

/// Exports packages into `out`.
pub struct Exporter<'a> {
    /// The key source.
    pub keys: &'a dyn Unwrapper,
    /// The destination.
    pub out: Out,
    /// Where packages fetched from S3 (ciphertext) and checked copies wait while they are
    /// exported: `<dir>/.edgerec-export` for a directory, a private temporary directory for
    /// a bucket.
    pub scratch: PathBuf,
    /// WAV or pcap.
    pub format: Format,
    /// Encrypt every output to these OpenPGP certificates.
    pub pgp: Option<crate::export::pgp::Recipients>,
    /// The longest recording timeline exported (`--max-span-secs`).
    pub max_span: std::time::Duration,
    /// The S3 store, for S3 sources.
    #[cfg(feature = "appliance")]
    pub s3: Option<crate::store::s3::S3Store>,
    /// With `--appliance-key`: the SHA-256s (hex) the verified manifests list; a package
    /// not among them is refused.
    pub genuine: Option<std::collections::BTreeSet<String>>,
    /// `--media-type`: only recordings of these (empty: all).
    pub media_types: Vec<String>,
    /// `--conversation`: only recordings of these (empty: all).
    pub conversations: Vec<String>,
    /// When each conversation began (from the manifests' sealed index), for the platform
    /// layout; without it a recording is filed by its own start.
    pub conversation_starts: Option<std::collections::HashMap<String, u64>>,
    /// `--layout platform`: the organisation id (else edgerec's layout).
    pub platform_org: Option<String>,
}

impl Exporter<'_> {
    /// The record of `id` exported in this exporter's format and layout (WAV and pcap of
    /// one recording are two exports), below the destination.
    fn done_rel(&self, id: &str) -> String {
        let format = match (self.format, self.pgp.is_some()) {
            (Format::Wav, false) => "wav",
            (Format::Pcap, false) => "pcap",
            (Format::Wav, true) => "wav.pgp",
            (Format::Pcap, true) => "pcap.pgp",
        };
        let layout = match self.platform_org {
            Some(_) => ".platform",
            None => "",
        };
        format!(".edgerec-export/done/{id}.{format}{layout}.json")
    }

    /// What shaped the outputs besides the format: the server-side encryption, whether the
    /// platform layout filed them by the index's conversation starts, and the layout.
    fn made_with(&self) -> String {
        let mut m = Vec::new();
        #[cfg(feature = "appliance")]
        if let Out::Bucket(b) = &self.out {
            m.extend(b.sse().label());
        }
        if let Some(org) = &self.platform_org {
            if self.conversation_starts.is_some() {
                m.push("starts=index".to_string());
            }
            m.push(format!("layout=platform:{org}"));
        }
        m.join(" ")
    }

    /// Whether the record of `id` matches the package and every output is intact: exactly
    /// the two outputs this recording has (its media named by its id, its metadata), each
    /// unchanged (a file's size and time; an object's size, ETag and encryption). A record
    /// that cannot be read from a bucket is an error, not a reason to export again unseen.
    fn is_done(&self, id: &str, package: &str) -> Result<bool, Error> {
        let rel = self.done_rel(id);
        let bytes = match &self.out {
            Out::Dir(dir) => fs::read(dir.join(&rel)).ok(),
            #[cfg(feature = "appliance")]
            Out::Bucket(b) => b.get_small(&b.key(&rel))?,
        };
        let Some(done) = bytes.and_then(|b| serde_json::from_slice::<Done>(&b).ok()) else {
            return Ok(false);
        };
        let pgp = if self.pgp.is_some() { ".pgp" } else { "" };
        let named =
            |rel: &str, want: &dyn Fn(&str) -> bool| rel.rsplit('/').next().is_some_and(want);
        let expected = done.outputs.len() == 2
            && named(&done.outputs[0].0, &|n| {
                n.starts_with(id) && n.ends_with(pgp) && !n.ends_with("_metadata.json")
            })
            && named(&done.outputs[1].0, &|n| {
                n == format!("{id}_metadata.json{pgp}")
            });
        if !expected || done.package != package || done.made_with != self.made_with() {
            return Ok(false);
        }
        Ok(match &self.out {
            Out::Dir(dir) => done
                .outputs
                .iter()
                .all(|(p, size, time)| stamp(&dir.join(p)).is_ok_and(|s| s == (*size, *time))),
            #[cfg(feature = "appliance")]
            Out::Bucket(b) => {
                if done.etags.len() != done.outputs.len() {
                    return Ok(false);
                }
                for ((p, size, _), etag) in done.outputs.iter().zip(&done.etags) {
                    let intact = b.info(&b.key(p))?.is_some_and(|i| {
                        i.size == *size && &i.etag == etag && b.sse().mismatch(&i).is_none()
                    });
                    if !intact {
                        return Ok(false);
                    }
                }
                true
            }
        })
    }

    /// Records a finished export (atomically; not synced: a record lost in a crash only
    /// means the package is exported again).
    fn record(&self, x: &Exported, package: String) -> Result<(), Error> {
        let outputs = [&x.media, &x.metadata];
        let done = Done {
            package,
            outputs: outputs
                .iter()
                .map(|p| (p.rel.clone(), p.size, p.mtime_ns))
                .collect(),
            etags: outputs.iter().filter_map(|p| p.etag.clone()).collect(),
            made_with: self.made_with(),
        };
        let bytes = serde_json::to_vec(&done).map_err(io::Error::other)?;
        let rel = self.done_rel(&x.id.to_string());
        match &self.out {
            Out::Dir(dir) => {
                let path = dir.join(rel);
                fs::create_dir_all(path.parent().expect("done/ has a parent"))?;
                edgerec_net::durable::replace_file(&path, &bytes)?;
            }
            #[cfg(feature = "appliance")]
            Out::Bucket(b) => {
                b.put_small(&b.key(&rel), bytes)?;
            }
        }
        Ok(())
    }

    /// A package file's recording id and identity (`mac:<header MAC>:<size>`), from its
    /// header (keyless); `None` if it has no readable header.
    fn identify(path: &Path) -> Option<(String, String)> {
        Self::header(path).map(|(h, size)| {
            let id = uuid::Uuid::from_bytes(h.recording_id).to_string();
            (id, format!("mac:{}:{size}", hex::encode(h.mac)))
        })
    }

    /// A package file's header (keyless) and size; `None` if it has no readable header.
    fn header(path: &Path) -> Option<(erec::format::Header, u64)> {
        use erec::format::{Decoded, Header};
        use std::io::Read;
        let mut f = fs::File::open(path).ok()?;
        let size = f.metadata().ok()?.len();
        let mut buf = Vec::new();
        loop {
            let want = match Header::decode(&buf).ok()? {
                Decoded::Done(h, _) => return Some((h, size)),
                Decoded::Need(n) if n > buf.len() && n <= 1 << 20 => n,
                Decoded::Need(_) => return None,
            };
            let have = buf.len();
            buf.resize(want, 0);
            f.read_exact(&mut buf[have..]).ok()?;
        }
    }

    /// What a package's header says of its place in a call (keyless: a file's first bytes,
    /// an S3 object's by a ranged GET); `None` if it cannot be read (the export says why).
    fn facts(&self, source: &Source) -> Option<Facts> {
        let h = match source {
            Source::File(p) => Self::header(p)?.0,
            #[cfg(feature = "appliance")]
            Source::S3(key) => {
                let store = self.s3.as_ref()?;
                crate::store::census::header_of(|n| store.get_first(key, n)).ok()?
            }
        };
        Some(Facts::of(h.recording_id, h.created_ms, &h.metadata))
    }

    /// The calls among `sources` (each its parts in order; with `join` false, each package
    /// on its own), keeping those with a part `wanted` (a store's listing of the days asked
    /// for, when the listing also holds the days around them).
    pub fn calls(
        &self,
        sources: Vec<Source>,
        join: bool,
        wanted: impl Fn(&Source) -> bool,
    ) -> Vec<Vec<Source>> {
        let groups = if join {
            let facts: Vec<Option<Facts>> = sources.iter().map(|s| self.facts(s)).collect();
            calls(&facts)
        } else {
            (0..sources.len()).map(|i| vec![i]).collect()
        };
        let mut slots: Vec<Option<Source>> = sources.into_iter().map(Some).collect();
        groups
            .into_iter()
            .filter_map(|g| {
                let call: Vec<Source> = g.iter().filter_map(|&i| slots[i].take()).collect();
                call.iter().any(&wanted).then_some(call)
            })
            .collect()
    }

    /// Exports (or skips) one call.
    pub fn one(&self, call: &[Source]) -> ExportOutcome {
        match self.try_one(call) {
            Ok(o) => o,
            Err(e) => ExportOutcome::Failed(e),
        }
    }

    fn try_one(&self, call: &[Source]) -> Result<ExportOutcome, Error> {
        let mut ids = Vec::new();
        let mut identities = Vec::new();
        for source in call {
            let (id, identity) = match source {
                Source::File(p) => match Self::identify(p) {
                    Some((id, identity)) => (Some(id), identity),
                    // Not a package header: the export says what is wrong with it.
                    None => return self.export(std::slice::from_ref(p), None),
                },
                #[cfg(feature = "appliance")]
                Source::S3(key) => {
                    let (identity, id) = self.s3_identity(key)?;
                    (id, identity)
                }
            };
            ids.push(id);
            identities.push(identity);
        }
        let identity = identities.join("+");
        if let Some(Some(id)) = ids.first()
            && self.is_done(id, &identity)?
        {
            return Ok(ExportOutcome::Skipped);
        }
        let mut paths = Vec::new();
        let mut _fetched: Vec<tempfile::NamedTempFile> = Vec::new();
        for (source, _identity) in call.iter().zip(&identities) {
            match source {
                Source::File(p) => paths.push(p.clone()),
                #[cfg(feature = "appliance")]
                Source::S3(key) => {
                    let tmp = self.fetch(key, _identity)?;
                    paths.push(tmp.path().to_path_buf());
                    _fetched.push(tmp);
                }
            }
        }
        match self.export(&paths, Some(identity)) {
            Err(joined) if paths.len() > 1 => {
                // One bad part (a package that fails verification, or one whose header
                // names a call it does not belong to) or a call too long for one output
                // must not take the others with it: each part goes on its own.
                let mut outcome = Err(joined);
                for ((path, id), identity) in paths.iter().zip(&ids).zip(identities) {
                    let done = match id {
                        Some(id) => self.is_done(id, &identity),
                        None => Ok(false),
                    };
                    let one = match done {
                        Ok(true) => Ok(ExportOutcome::Skipped),
                        Ok(false) => self.export(std::slice::from_ref(path), Some(identity)),
                        Err(e) => Err(e),
                    };
                    outcome = match (outcome, one) {
                        // The first part's outcome, unless a part failed.
                        (Err(_), o) if path == &paths[0] => o,
                        (o, Ok(_)) => o,
                        (_, Err(e)) => Err(e),
                    };
                }
                outcome
            }
            o => o,
        }
    }

    fn export(&self, paths: &[PathBuf], identity: Option<String>) -> Result<ExportOutcome, Error> {
        // With --appliance-key, what is exported is a private copy whose SHA-256 a signed
        // manifest lists: the store's file cannot change between the check and the export.
        let mut copies = Vec::new();
        let checked: Vec<PathBuf>;
        let paths = match &self.genuine {
            None => paths,
            Some(genuine) => {
                let dir = self.scratch.join("fetch");
                fs::create_dir_all(&dir)?;
                for p in paths {
                    let mut copy = tempfile::Builder::new().suffix(".erec").tempfile_in(&dir)?;
                    io::copy(&mut fs::File::open(p)?, copy.as_file_mut())?;
                    let sha = hex::encode(erec::crypto::sha256_file(copy.path())?);
                    if !genuine.contains(&sha) {
                        return Err(Error::Unverified(format!(
                            "{}: SHA-256 {sha}, which no signed manifest of a registered \
                             appliance lists: not exported (forged, or not yet in a manifest)",
                            p.display()
                        )));
                    }
                    copies.push(copy);
                }
                checked = copies.iter().map(|c| c.path().to_path_buf()).collect();
                &checked[..]
            }
        };
        let opts = crate::export::Options {
            format: self.format,
            pgp: self.pgp.as_ref(),
            max_span: self.max_span,
            media_types: &self.media_types,
            conversations: &self.conversations,
            conversation_starts: self.conversation_starts.as_ref(),
            layout: match &self.platform_org {
                Some(org) => crate::export::Layout::Platform { org },
                None => crate::export::Layout::Edgerec,
            },
        };
        let Some(x) = export_parts_to(paths, self.keys, self.out.dest(), &opts)? else {
            return Ok(ExportOutcome::NotSelected);
        };
        if let Some(identity) = identity {
            self.record(&x, identity)?;
        }
        Ok(ExportOutcome::Exported {
            media: x.media.shown,
            terminated: x.terminated,
        })
    }

    /// An S3 package's identity (`sha256:` of the `erec-sha256` the store holds) and the
    /// recording id its key names.
    #[cfg(feature = "appliance")]
    fn s3_identity(&self, key: &str) -> Result<(String, Option<String>), Error> {
        let store = self
            .s3
            .as_ref()
            .ok_or_else(|| Error::Invalid("no S3 store configured".into()))?;
        let sha = store
            .object_sha256(key)
            .map_err(|e| Error::Invalid(format!("s3:{key}: {e}")))?
            .ok_or_else(|| Error::Invalid(format!("s3:{key}: the object has no erec-sha256")))?;
        let id = key
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix(".erec"))
            .and_then(|n| uuid::Uuid::parse_str(n).ok())
            .map(|u| u.to_string());
        Ok((format!("sha256:{sha}"), id))
    }

    /// Downloads an S3 package into a temporary file (ciphertext, 0600), streamed (memory
    /// stays at a buffer whatever its size), and checks it against the SHA-256 the store
    /// holds for it once the last byte is in: nothing of it is opened before that holds.
    #[cfg(feature = "appliance")]
    fn fetch(&self, key: &str, identity: &str) -> Result<tempfile::NamedTempFile, Error> {
        let store = self
            .s3
            .as_ref()
            .ok_or_else(|| Error::Invalid("no S3 store configured".into()))?;
        let dir = self.scratch.join("fetch");
        fs::create_dir_all(&dir)?;
        let mut tmp = tempfile::Builder::new().suffix(".erec").tempfile_in(&dir)?;
        let sha = {
            let mut w = io::BufWriter::new(tmp.as_file_mut());
            let sha = store
                .get_to(key, &mut w)
                .map_err(|e| Error::Invalid(format!("s3:{key}: {e}")))?;
            io::Write::flush(&mut w)?;
            sha
        };
        if identity.strip_prefix("sha256:") != Some(sha.as_str()) {
            // The temporary file goes with `tmp`.
            return Err(Error::Package(erec::Error::Corrupt {
                what: "the object's bytes are not the SHA-256 the store recorded for it",
                record: None,
            }));
        }
        Ok(tmp)
    }

    /// Exports every call with `jobs` workers; `report` sees each outcome as it comes.
    pub fn all(
        &self,
        calls: Vec<Vec<Source>>,
        jobs: usize,
        mut report: impl FnMut(&[Source], &ExportOutcome),
    ) -> Vec<(Vec<Source>, ExportOutcome)> {
        let queue = Mutex::new(calls.into_iter().collect::<VecDeque<_>>());
        let (tx, rx) = mpsc::channel();
        let mut results = Vec::new();
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                let (queue, tx) = (&queue, tx.clone());
                s.spawn(move || {
                    loop {
                        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                        let Some(src) = next else { break };
                        let outcome = self.one(&src);
                        if tx.send((src, outcome)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            for (src, outcome) in rx {
                report(&src, &outcome);
                results.push((src, outcome));
            }
        });
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_ranges_become_day_prefixes_and_hours_select_within_them() {
        let w = |f: &str, t: &str| Window::parse(f, Some(t));
        assert_eq!(
            w("2026-11-29", "2026-12-01").unwrap().day_prefixes(),
            ["2026/11/29/", "2026/11/30/", "2026/12/01/"]
        );
        assert_eq!(
            w("2028-02-28", "2028-03-01").unwrap().day_prefixes().len(),
            3
        );
        assert!(w("2026-12-01", "2026-11-29").is_err());
        assert!(w("yesterday", "2026-11-29").is_err());
        assert_eq!(
            w("2026-12-01", "2026-12-31").unwrap().days_around(),
            ["2026/11/30/", "2027/01/01/"]
        );
        assert_eq!(
            Window::parse("2026-12-01", None).unwrap().day_prefixes(),
            ["2026/12/01/"]
        );
        // Hours: start inclusive, end exclusive; the days they touch are listed.
        let h = w("2026-11-30T10:00Z", "2026-11-30T12:00Z").unwrap();
        assert_eq!(h.day_prefixes(), ["2026/11/30/"]);
        assert_eq!(
            w("2026-11-30T23Z", "2026-12-01T00:00:00Z")
                .unwrap()
                .day_prefixes(),
            ["2026/11/30/"]
        );
        assert_eq!(
            Window::parse("2026-11-30T10:00Z", None),
            Err(DateRangeError::NeedsTo("2026-11-30T10:00Z".into()))
        );
        let at = |t: &str| {
            let ms = erec::clock::parse_rfc3339_ms(t).unwrap();
            let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
                uuid::NoContext,
                ms / 1000,
                (ms % 1000) as u32 * 1_000_000,
            ));
            format!("calls/2026/11/30/{id}.erec")
        };
        assert!(h.holds(&at("2026-11-30T10:00:00Z")));
        assert!(h.holds(&at("2026-11-30T11:59:59.999Z")));
        assert!(!h.holds(&at("2026-11-30T12:00:00Z")));
        assert!(!h.holds(&at("2026-11-30T09:59:59.999Z")));
        assert!(h.holds("calls/2026/11/30/not-an-id.erec"));
        // Days keep their meaning: what their listings hold.
        let d = w("2026-11-30", "2026-11-30").unwrap();
        assert!(d.days && d.holds(&at("2020-01-01T00:00:00Z")));
    }

    #[test]
    fn packages_are_identified_by_their_header_whatever_the_file_is_called() {
        let vectors =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/vectors");
        let (id, identity) = Exporter::identify(&vectors.join("ok_one_byte.erec")).unwrap();
        assert_eq!(id.len(), 36);
        assert!(
            identity.starts_with("mac:") && identity.len() > 70,
            "{identity}"
        );
        let (_, other) = Exporter::identify(&vectors.join("ok_empty.erec")).unwrap();
        assert_ne!(identity, other);
        assert_eq!(Exporter::identify(&vectors.join("fail_magic.erec")), None);
        assert_eq!(Exporter::identify(&vectors.join("MANIFEST.json")), None);
    }
}
