//! The offline package commands: `keygen`, `seal`, `open` and `inspect`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::io::{Output, input};
use crate::error::Error;
use erec::clock::Utc;
use erec::format::{Metadata, Tail, Walk, Wrap, walk};
use erec::keys::{KekId, KekPrivate, KekPublic, Unwrapper};
use erec::pipeline::default_workers;
use erec::reader::{ReadMode, open_stream};
use erec::recover::walk_file;
use erec::writer::{Media, SealOptions, Sealer, seal_stream};

/// `edgerec keygen --out DIR`.
pub fn keygen(out: &Path, bits: usize) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", out.display())))?;
    let key = KekPrivate::generate(bits)?;
    let id = key.public().id();
    let private_path = out.join(format!("{id}.pem"));
    let public_path = out.join(format!("{id}.pub.pem"));
    write_new(&private_path, 0o600, key.to_pem()?.as_bytes())?;
    write_new(&public_path, 0o644, key.public().to_pem().as_bytes())?;
    println!("{id}");
    eprintln!(
        "edgerec: wrote {} (public) and {} (PRIVATE).\n\
         edgerec: the private key must not stay on a recording appliance: move it to the key \
         manager or an offline safe. Losing it loses every recording sealed to it.",
        public_path.display(),
        private_path.display()
    );
    Ok(())
}

fn write_new(path: &Path, mode: u32, bytes: &[u8]) -> Result<(), Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// `edgerec seal --kek PUB [--kek PUB2] [--wrap W] IN OUT`.
pub fn seal(
    keks: &[PathBuf],
    wrap: Wrap,
    chunk_size: u32,
    threads: Option<usize>,
    input_path: &Path,
    output_path: &Path,
) -> Result<(), Error> {
    let recipients = keks
        .iter()
        .map(|p| KekPublic::from_file(p))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = SealOptions {
        wrap,
        max_chunk: chunk_size,
        media: Media::File,
        ..SealOptions::default()
    };
    let mut src = input(input_path)?;
    let mut sealer = Sealer::new(&recipients, &opts)?;
    let mut out = Output::create(output_path)?;
    let mut first = sealer.header_bytes().to_vec();
    if input_path.as_os_str() != "-"
        && let Some(name) = input_path.file_name()
    {
        let mut meta = Metadata::new();
        meta.insert("name".into(), name.to_string_lossy().into_owned().into());
        sealer.seal_metadata(&meta, &mut first)?;
    }
    out.writer().write_all(&first)?;
    let workers = threads.unwrap_or_else(default_workers);
    seal_stream(sealer, &mut src, out.writer(), true, workers)?;
    out.commit()
}

/// `edgerec open --key PRIV [--allow-unterminated] IN OUT`.
pub fn open(
    keys: &dyn Unwrapper,
    allow_unterminated: bool,
    threads: Option<usize>,
    input_path: &Path,
    output_path: &Path,
) -> Result<(), Error> {
    let src = input(input_path)?;
    let mode = if allow_unterminated {
        ReadMode::Recovery
    } else {
        ReadMode::Strict
    };
    let mut out = Output::create(output_path)?;
    let workers = threads.unwrap_or_else(default_workers);
    // On error `out` is dropped here, which removes the temporary file.
    let summary = open_stream(src, keys, mode, out.writer(), workers)?;
    out.commit()?;
    if !summary.terminated() {
        eprintln!(
            "edgerec: warning: the package is unterminated; wrote the {} verified records \
             before its end",
            summary.records
        );
    }
    Ok(())
}

/// `edgerec inspect [--json] FILE`.
pub fn inspect(path: &Path, as_json: bool) -> Result<(), Error> {
    let w = if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        io::stdin().read_to_end(&mut buf)?;
        let bytes = buf.len() as u64;
        (walk(&buf, Tail::Strict)?, bytes)
    } else {
        let f = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?;
        (walk_file(&f, Tail::Strict)?, f.metadata()?.len())
    };
    let (w, bytes) = w;
    let report = report(&w, bytes);
    let mut stdout = io::stdout().lock();
    if as_json {
        serde_json::to_writer_pretty(&mut stdout, &report).map_err(io::Error::from)?;
        writeln!(stdout)?;
    } else {
        write_text(&mut stdout, &w, &report)?;
    }
    Ok(())
}

fn report(w: &Walk, bytes: u64) -> serde_json::Value {
    let h = &w.header;
    let public: serde_json::Value =
        serde_json::from_slice(&h.metadata).expect("walk checked the metadata is JSON");
    json!({
        "recording_id": uuid::Uuid::from_bytes(h.recording_id).hyphenated().to_string(),
        "created_ms": h.created_ms,
        "media": public.get("media"),
        "kek_ids": h.recipients.iter().map(|r| KekId(r.kek_id).to_hex()).collect::<Vec<_>>(),
        "wraps": h.recipients.iter().map(|r| r.wrap.name()).collect::<Vec<_>>(),
        "max_chunk": h.max_chunk,
        "records": w.records,
        "terminated": w.terminated,
        "bytes": bytes,
        "version": erec::format::VERSION,
        "suite": erec::format::SUITE,
        "header_bytes": w.header_len,
        "record_plaintext_bytes": w.plaintext_bytes,
        "torn_bytes": w.torn_bytes,
        "public_metadata": public,
    })
}

fn write_text(out: &mut impl Write, w: &Walk, r: &serde_json::Value) -> io::Result<()> {
    let h = &w.header;
    writeln!(
        out,
        "recording id   {}",
        r["recording_id"].as_str().unwrap_or("")
    )?;
    writeln!(
        out,
        "created        {} ({} ms)",
        Utc::from_unix_ms(h.created_ms).rfc3339(),
        h.created_ms
    )?;
    writeln!(out, "media          {}", r["media"].as_str().unwrap_or("?"))?;
    for rec in &h.recipients {
        writeln!(
            out,
            "recipient      {} ({})",
            KekId(rec.kek_id),
            rec.wrap.name()
        )?;
    }
    writeln!(out, "max chunk      {} bytes", h.max_chunk)?;
    let state = if w.terminated {
        "terminated".to_string()
    } else if w.torn_bytes > 0 {
        format!("UNTERMINATED, {} torn bytes at the end", w.torn_bytes)
    } else {
        "UNTERMINATED".to_string()
    };
    writeln!(out, "records        {} ({state})", w.records)?;
    writeln!(out, "bytes          {}", r["bytes"])?;
    writeln!(out, "public meta    {}", r["public_metadata"])?;
    writeln!(
        out,
        "(tags and the header MAC need the key: `edgerec open` verifies them)"
    )
}

/// `edgerec export --key PRIV --out DIR [--format wav|pcap] INPUT...`: every package is
/// tried; one that fails is reported and the rest go on. The exit code is that of the first
/// What `export` reads.
pub struct ExportFrom {
    /// Package files and directories.
    pub inputs: Vec<PathBuf>,
    /// An appliance config whose store to read.
    #[cfg(feature = "appliance")]
    pub store_config: Option<PathBuf>,
    /// `--from` and `--to`: UTC days (inclusive) or times (the end exclusive).
    #[cfg(feature = "appliance")]
    pub days: Option<(String, Option<String>)>,
    /// OpenPGP certificates to encrypt every output to.
    pub pgp_recipients: Vec<PathBuf>,
    /// The longest recording timeline exported.
    pub max_span: std::time::Duration,
    /// `--media-type`: only recordings of these (empty: all).
    pub media_types: Vec<String>,
    /// `--conversation`: only recordings of these conversations (empty: all).
    pub conversations: Vec<String>,
    /// Join the packages of one call into one recording (`--no-join`: false).
    pub join: bool,
    /// `--appliance-key`: export only packages a signed manifest of these appliances lists
    /// (the manifests of the `store_config` store).
    #[cfg(feature = "appliance")]
    pub appliance_keys: Vec<PathBuf>,
}

/// The conversation ids of `--conversation` and `--conversations FILE` (one a line, blank
/// lines and `#` comments ignored; at most 1,000,000 ids of at most 256 characters), sorted
/// and without repeats.
#[cfg(feature = "appliance")]
pub fn conversation_ids(mut ids: Vec<String>, file: Option<&Path>) -> Result<Vec<String>, Error> {
    use std::io::Read;
    const MAX_FILE: u64 = 256 << 20;
    const MAX_IDS: usize = 1_000_000;
    if let Some(f) = file {
        let mut text = String::new();
        fs::File::open(f)
            .and_then(|h| h.take(MAX_FILE + 1).read_to_string(&mut text))
            .map_err(|e| Error::Invalid(format!("--conversations {}: {e}", f.display())))?;
        if text.len() as u64 > MAX_FILE {
            return Err(Error::Invalid(format!(
                "--conversations {}: larger than 256 MiB",
                f.display()
            )));
        }
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            // Counted as they are taken: a file of a hundred million ids is refused before
            // it is held.
            if ids.len() >= MAX_IDS {
                return Err(Error::Invalid(format!(
                    "--conversations {}: more than 1,000,000 conversation ids",
                    f.display()
                )));
            }
            ids.push(line.to_string());
        }
    }
    if ids.len() > MAX_IDS {
        return Err(Error::Invalid(
            "more than 1,000,000 conversation ids".into(),
        ));
    }
    if let Some(long) = ids
        .iter()
        .find(|i| i.chars().count() > crate::appliance::outcomes::MAX_CONVERSATION_ID)
    {
        return Err(Error::Invalid(format!(
            "conversation id {}…: longer than 256 characters",
            long.chars().take(40).collect::<String>()
        )));
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Where `export` writes.
pub struct ExportTo {
    /// A directory, or `s3://BUCKET/PREFIX`.
    pub out: PathBuf,
    /// For a bucket: its endpoint and credentials.
    #[cfg(feature = "appliance")]
    pub out_config: Option<PathBuf>,
    /// For a bucket: the server-side encryption asked of every object.
    #[cfg(feature = "appliance")]
    pub sse: crate::export::bucket::Sse,
    /// `--layout platform`.
    pub platform: bool,
    /// `--org-id`.
    pub org_id: Option<String>,
    /// For a bucket: where packages fetched from a store wait (`--scratch`; default a
    /// temporary directory under `$TMPDIR`).
    #[cfg(feature = "appliance")]
    pub scratch: Option<PathBuf>,
}

/// The destination of an export, the directory its scratch files go to (held: a temporary
/// one is removed when it drops), and the organisation id of the platform layout.
struct Destination {
    out: crate::export::bulk::Out,
    scratch: PathBuf,
    _temporary: Option<tempfile::TempDir>,
    org: Option<String>,
}

impl ExportTo {
    /// Opens the destination: a directory (made, cleared of a crashed run's temporaries) or
    /// a bucket (its out-config read).
    fn open(self) -> Result<Destination, Error> {
        if self.org_id.is_some() && !self.platform {
            return Err(Error::Invalid(
                "--org-id is the first level of --layout platform: give that too".into(),
            ));
        }
        let org_of = |org: Option<String>| -> Result<Option<String>, Error> {
            match (self.platform, org) {
                (false, _) => Ok(None),
                (true, Some(o)) if crate::export::is_organisation_id(&o) => Ok(Some(o)),
                (true, Some(o)) => Err(Error::Invalid(format!(
                    "--org-id {o:?}: 1 to 128 letters, digits, - _ . (not starting with a dot)"
                ))),
                (true, None) => Err(Error::Invalid(
                    "--layout platform needs an organisation id: --org-id ID, or [export] \
                     organisation_id in the --out-config"
                        .into(),
                )),
            }
        };
        let text = self.out.to_string_lossy().into_owned();
        if text.starts_with("s3://") {
            #[cfg(feature = "appliance")]
            {
                let (bucket, prefix) =
                    crate::export::bucket::parse_url(&text).map_err(Error::Invalid)?;
                let file = self.out_config.as_ref().ok_or_else(|| {
                    Error::Invalid(format!(
                        "--out {text} needs --out-config FILE: the bucket's endpoint and \
                         credentials ([store] as an appliance's s3 store, without bucket and \
                         prefix)"
                    ))
                })?;
                let cfg = crate::appliance::config::OutConfig::load(file, &bucket)
                    .map_err(|e| Error::Invalid(e.to_string()))?;
                let org = org_of(self.org_id.clone().or(cfg.organisation_id))?;

                let b = crate::export::bucket::Bucket::new(cfg.s3, prefix, self.sse.clone())?;
                let mut scratch = tempfile::Builder::new();
                scratch.prefix("edgerec-export.");
                let tmp = match &self.scratch {
                    Some(dir) => scratch.tempdir_in(dir)?,
                    None => scratch.tempdir()?,
                };
                return Ok(Destination {
                    out: crate::export::bulk::Out::Bucket(Box::new(b)),
                    scratch: tmp.path().to_path_buf(),
                    _temporary: Some(tmp),
                    org,
                });
            }
            #[cfg(not(feature = "appliance"))]
            return Err(Error::Invalid(format!(
                "--out {text}: this build has no S3 client (the appliance feature)"
            )));
        }
        #[cfg(feature = "appliance")]
        if self.out_config.is_some() || self.sse != crate::export::bucket::Sse::None {
            return Err(Error::Invalid(
                "--out-config and --sse are for an s3://BUCKET/PREFIX --out".into(),
            ));
        }
        let org = org_of(self.org_id.clone())?;
        fs::create_dir_all(&self.out)?;
        remove_partials(&self.out);
        Ok(Destination {
            scratch: self.out.join(".edgerec-export"),
            out: crate::export::bulk::Out::Dir(self.out),
            _temporary: None,
            org,
        })
    }
}

/// Removes what an export stopped by a crash left in `out`: its temporaries (ciphertext
/// only, in a PGP export) are never taken for outputs.
fn remove_partials(out: &Path) {
    let Ok(entries) = fs::read_dir(out) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".export.")
            && name.ends_with(".partial")
            && e.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// `edgerec export`: every package of the inputs and the store, in parallel, resumable,
/// with progress on a terminal (plain lines otherwise) and a summary of failures.
pub fn export(
    keys: &dyn Unwrapper,
    to: ExportTo,
    format: super::FormatArg,
    from: ExportFrom,
    jobs: Option<usize>,
) -> Result<(), Error> {
    use crate::export::Format;
    use crate::export::bulk::{ExportOutcome, Exporter};
    use std::io::IsTerminal;
    let format = match format {
        super::FormatArg::Wav => Format::Wav,
        super::FormatArg::Pcap => Format::Pcap,
    };
    // The destination first: a bad one is refused before any package is read.
    let dest = to.open()?;
    #[cfg_attr(not(feature = "appliance"), allow(unused_mut))]
    let mut sources = crate::export::bulk::from_paths(&from.inputs)?;
    // Packages named on the command line go whatever --from and --to say.
    let named: std::collections::HashSet<String> = sources.iter().map(|s| s.name()).collect();
    // With a date range, the days around it are listed too (a call across midnight joins
    // its part from the day before or after); only calls with a part in the range go.
    #[cfg_attr(not(feature = "appliance"), allow(unused_mut))]
    let mut around: std::collections::HashSet<String> = std::collections::HashSet::new();
    #[cfg(feature = "appliance")]
    let mut s3 = None;
    #[cfg(feature = "appliance")]
    let mut window: Option<crate::export::bulk::Window> = None;
    #[cfg(feature = "appliance")]
    if let Some(cfg) = &from.store_config {
        let cfg = crate::appliance::config::Config::load(cfg)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let (days, margin) = match &from.days {
            Some((f, t)) => {
                let w = crate::export::bulk::Window::parse(f, t.as_deref())
                    .map_err(|e| Error::Invalid(e.to_string()))?;
                window = Some(w);
                let margin = match from.join {
                    true => w.days_around(),
                    false => Vec::new(),
                };
                (Some(w.day_prefixes()), margin)
            }
            None => (None, Vec::new()),
        };
        match cfg
            .store
            .open_readable()
            .map_err(|e| Error::Invalid(e.to_string()))?
        {
            crate::store::Readable::Dir(root) => {
                sources.extend(crate::export::bulk::from_dir_store(
                    &root,
                    &cfg.prefix,
                    days.as_deref(),
                )?);
                if !margin.is_empty() {
                    let more =
                        crate::export::bulk::from_dir_store(&root, &cfg.prefix, Some(&margin))?;
                    around.extend(more.iter().map(|s| s.name()));
                    sources.extend(more);
                }
            }
            crate::store::Readable::S3(store) => {
                let listed = |days: Option<&[String]>| {
                    crate::export::bulk::from_s3_store(&store, &cfg.prefix, days)
                        .map_err(|e| Error::Invalid(e.to_string()))
                };
                sources.extend(listed(days.as_deref())?);
                if !margin.is_empty() {
                    let more = listed(Some(&margin))?;
                    around.extend(more.iter().map(|s| s.name()));
                    sources.extend(more);
                }
                s3 = Some(*store);
            }
        }
    }
    let pgp = match from.pgp_recipients.is_empty() {
        true => None,
        false => Some(crate::export::pgp::Recipients::load(&from.pgp_recipients)?),
    };

    #[cfg(feature = "appliance")]
    let index = match (&from.store_config, from.appliance_keys.is_empty()) {
        (_, true) if !from.conversations.is_empty() => {
            return Err(Error::Invalid(
                "--conversation needs --store-config and --appliance-key: a conversation's \
                 recordings are found through the store's signed, sealed manifests"
                    .into(),
            ));
        }
        (_, true) => None,
        (Some(cfg), false) => Some(super::verify_store::export_index(
            cfg,
            &from.appliance_keys,
            keys,
        )?),
        (None, false) => {
            return Err(Error::Invalid(
                "--appliance-key needs --store-config: the manifests are read from the store"
                    .into(),
            ));
        }
    };
    #[cfg(feature = "appliance")]
    let mut index = index;
    #[cfg(feature = "appliance")]
    let (genuine, conversation_starts) = match &mut index {
        Some(ix) => (Some(std::mem::take(&mut ix.genuine)), Some(ix.starts())),
        None => (None, None),
    };
    #[cfg(not(feature = "appliance"))]
    let (genuine, conversation_starts) = (None, None);

    let exporter = Exporter {
        keys,
        out: dest.out,
        scratch: dest.scratch,
        platform_org: dest.org,
        format,
        pgp,
        max_span: from.max_span,
        media_types: from.media_types.clone(),
        conversations: from.conversations.clone(),
        conversation_starts,
        #[cfg(feature = "appliance")]
        s3,
        genuine,
    };
    // A call goes when a part of it was listed for the range (not only for the days around
    // it) and began in the window, and (by conversation) the index chose it.
    // By conversation: the recordings the index gives it, and those whose conversation it
    // does not know (decrypted to tell); none of the others is opened.
    #[cfg(feature = "appliance")]
    let chosen = |name: &str| match &index {
        Some(ix) if !from.conversations.is_empty() => crate::export::bulk::id_of(name)
            .is_none_or(|id| ix.may_belong(&id, &from.conversations)),
        _ => true,
    };
    #[cfg(feature = "appliance")]
    let in_window = |name: &str| window.is_none_or(|w| w.holds(name)) && chosen(name);
    #[cfg(not(feature = "appliance"))]
    let in_window = |_: &str| true;
    let calls = exporter.calls(sources, from.join, |s| {
        let name = s.name();
        !around.contains(&name) && (named.contains(&name) || in_window(&name))
    });
    let (total, packages) = (calls.len(), calls.iter().map(Vec::len).sum::<usize>());
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} ETA {eta} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        b
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    };
    let name = crate::export::bulk::call_name;
    let results = exporter.all(calls, jobs.unwrap_or_else(default_workers), |src, o| {
        match o {
            ExportOutcome::Exported { media, terminated } => {
                let warn = if *terminated {
                    ""
                } else {
                    " (unterminated: see its metadata)"
                };
                if bar.is_none() || !*terminated {
                    say(format!("exported {} -> {}{warn}", name(src), media));
                }
            }
            ExportOutcome::Skipped => {
                if bar.is_none() {
                    say(format!("skipped {} (exported before, verified)", name(src)));
                }
            }
            ExportOutcome::NotSelected => {}
            ExportOutcome::Failed(e) => say(format!("FAILED {}: {e}", name(src))),
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let count = |f: fn(&ExportOutcome) -> bool| results.iter().filter(|(_, o)| f(o)).count();
    let exported = count(|o| matches!(o, ExportOutcome::Exported { .. }));
    let skipped = count(|o| matches!(o, ExportOutcome::Skipped));
    let not_selected = count(|o| matches!(o, ExportOutcome::NotSelected));
    let mut failed: Vec<_> = results
        .into_iter()
        .filter_map(|(s, o)| match o {
            ExportOutcome::Failed(e) => Some((s, e)),
            _ => None,
        })
        .collect();
    let what = match packages == total {
        true => format!("{total} packages"),
        false => format!("{total} recordings from {packages} packages (continuations joined)"),
    };
    let other = match (from.media_types.is_empty(), from.conversations.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!(", {not_selected} of other media types"),
        (true, false) => format!(", {not_selected} of other conversations"),
        (false, false) => format!(", {not_selected} of other media types or conversations"),
    };
    eprintln!(
        "export: {what}: {exported} exported, {skipped} skipped (done before){other}, {} failed",
        failed.len()
    );
    for (s, e) in &failed {
        eprintln!("  failed: {}: {e}", name(s));
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(failed.swap_remove(0).1),
    }
}

#[cfg(all(test, feature = "appliance"))]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_come_from_the_options_and_a_file_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ids.txt");
        fs::write(&f, "# legal hold 17\nconv-2\n\n  conv-1  \nconv-2\n").unwrap();
        assert_eq!(
            conversation_ids(vec!["conv-3".into()], Some(&f)).unwrap(),
            ["conv-1", "conv-2", "conv-3"]
        );
        // 256 characters, however many bytes, and not one more.
        let long = "ü".repeat(256);
        assert_eq!(conversation_ids(vec![long.clone()], None).unwrap(), [long]);
        assert!(conversation_ids(vec!["ü".repeat(257)], None).is_err());
        let many: String = (0..1_000_001).map(|i| format!("c{i}\n")).collect();
        fs::write(&f, many).unwrap();
        let e = conversation_ids(Vec::new(), Some(&f))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1,000,000"), "{e}");
        assert!(conversation_ids(Vec::new(), Some(&dir.path().join("none"))).is_err());
    }
}
