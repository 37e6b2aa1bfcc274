//! Inputs and outputs of the offline commands: `-` for standard input or output, and files
//! written all-or-nothing.
//!
//! Invariant: an output file appears under its name only once it is complete (written to a
//! 0600 temporary file beside it, then renamed); on any error the temporary file is
//! removed, so a failed `open` leaves no plaintext and no output file behind.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::error::Error;

fn is_dash(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// Opens the input: a file, or standard input for `-`.
pub fn input(path: &Path) -> Result<Box<dyn Read + Send>, Error> {
    if is_dash(path) {
        return Ok(Box::new(io::stdin()));
    }
    let f = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    Ok(Box::new(BufReader::with_capacity(64 * 1024, f)))
}

/// An output being written: a temporary file to be renamed, or standard output.
pub enum Output {
    /// Standard output (its own descriptor, so writes bypass the line buffer).
    Stdout(File),
    /// A temporary file beside the destination.
    File {
        /// The temporary file, removed on drop unless persisted.
        tmp: NamedTempFile,
        /// The destination.
        dest: PathBuf,
    },
}

impl Output {
    /// Starts an output for `path` (`-` is standard output).
    pub fn create(path: &Path) -> Result<Output, Error> {
        if is_dash(path) {
            let fd = io::stdout().as_fd().try_clone_to_owned()?;
            return Ok(Output::Stdout(File::from(fd)));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{} is not a file name", path.display())))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create a file in {}: {e}", dir.display()),
                )
            })?;
        Ok(Output::File {
            tmp,
            dest: path.to_path_buf(),
        })
    }

    /// The writer.
    pub fn writer(&mut self) -> &mut File {
        match self {
            Output::Stdout(f) => f,
            Output::File { tmp, .. } => tmp.as_file_mut(),
        }
    }

    /// Makes the output visible: sync and rename for a file, flush for standard output.
    pub fn commit(self) -> Result<(), Error> {
        match self {
            Output::Stdout(mut f) => f.flush()?,
            Output::File { tmp, dest } => {
                // Renamed into place only when complete. Not fsynced: like cp, age or gpg,
                // the offline tools leave durability to the file system; the spool (which
                // must survive a crash) syncs on its own terms.
                tmp.persist(&dest).map_err(|e| {
                    io::Error::new(
                        e.error.kind(),
                        format!("cannot write {}: {}", dest.display(), e.error),
                    )
                })?;
            }
        }
        Ok(())
    }
}
