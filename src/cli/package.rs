//! The offline package commands: `keygen`, `seal`, `open` and `inspect`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::io::{Output, input};
use crate::clock::Utc;
use crate::error::Error;
use crate::format::{Metadata, Tail, Walk, Wrap, walk};
use crate::keys::{KekId, KekPrivate, KekPublic, Unwrapper};
use crate::pipeline::default_workers;
use crate::reader::{ReadMode, open_stream};
use crate::recover::walk_file;
use crate::writer::{Media, SealOptions, Sealer, seal_stream};

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
        "version": crate::format::VERSION,
        "suite": crate::format::SUITE,
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
/// failure (3 wrong key, 4 corrupt, …), or 0.
pub fn export(
    keys: &dyn Unwrapper,
    out: &Path,
    format: super::FormatArg,
    inputs: &[PathBuf],
) -> Result<(), Error> {
    use crate::export::{Format, export_file, find_packages};
    let format = match format {
        super::FormatArg::Wav => Format::Wav,
        super::FormatArg::Pcap => Format::Pcap,
    };
    let mut files = Vec::new();
    for i in inputs {
        files.extend(
            find_packages(i).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot read {}: {e}", i.display()))
            })?,
        );
    }
    let (mut ok, mut first_err) = (0usize, None);
    for f in &files {
        match export_file(f, keys, out, format) {
            Ok(x) => {
                ok += 1;
                let warn = if x.terminated {
                    ""
                } else {
                    " (unterminated: see its metadata)"
                };
                eprintln!("exported {} -> {}{warn}", f.display(), x.media.display());
            }
            Err(e) => {
                eprintln!("edgerec: {}: {e}", f.display());
                first_err.get_or_insert(e);
            }
        }
    }
    let failed = files.len() - ok;
    eprintln!("export: {ok} exported, {failed} failed");
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
