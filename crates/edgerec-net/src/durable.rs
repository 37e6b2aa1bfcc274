//! Small files replaced whole and durably (a key record, the credentials, the key cache, a
//! spool state file), and the one way edgerec makes a temporary file beside its target.
//!
//! Invariants:
//! - After [`replace_file`] returns, the file holds exactly the new bytes and survives a
//!   crash; before, it holds exactly the old ones. It is written under a temporary name,
//!   synced, renamed over the old one, and its directory synced.
//! - A temporary name is unique (`.<name>.<16 hex digits>.tmp`, random), created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`: two writers never share one (the fixed `<name>.tmp` of
//!   before let a second writer truncate the first's), and a symlink planted under the name
//!   is never followed. [`is_temp_name`] recognises the leftovers of a crash.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Creates a new, empty file under a unique temporary name in `path`'s directory, for
/// writing and then renaming over `path`; `mode` is its permission bits.
pub fn create_temp(path: &Path, mode: u32) -> std::io::Result<(File, PathBuf)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    loop {
        let tmp = dir.join(format!(
            ".{name}.{:016x}.tmp",
            getrandom::u64().map_err(std::io::Error::other)?
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            // 64 random bits: a collision is another writer's file; draw again.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot create {}: {e}", tmp.display()),
                ));
            }
        }
    }
}

/// Whether a directory entry's name is one [`create_temp`] makes (a crash's leftover).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name.len() > 22
        && name.ends_with(".tmp")
        && name[..name.len() - 4]
            .rsplit_once('.')
            .is_some_and(|(_, hex)| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Replaces `path` with `bytes` atomically and durably; the file is 0600.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (mut f, tmp) = create_temp(path, 0o600)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot write {}: {e}", path.display()),
        ));
    }
    sync_dir(match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    })
}

/// A secret's file that is not its owner's alone.
#[derive(Debug, thiserror::Error)]
pub enum OwnerOnlyError {
    /// It cannot be looked at.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Its group or others may read or write it; the message says how to mend it.
    #[error("{}: mode {mode:o}: {what} must be readable by its owner alone (chmod 600)", path.display())]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What it is ("a master key file", …).
        what: String,
    },
}

/// Checks that a secret's file (`what`: "a master key file", …) can be read by its owner
/// alone (no group or other permission bits).
pub fn check_owner_only(path: &Path, what: &str) -> Result<(), OwnerOnlyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| OwnerOnlyError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(OwnerOnlyError::TooOpen {
            path: path.to_path_buf(),
            mode,
            what: what.to_string(),
        });
    }
    Ok(())
}

/// Makes a directory's entries (a rename, a new or removed file) durable; an error names
/// the directory.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot sync {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_is_replaced_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        replace_file(&p, b"one").unwrap();
        replace_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn temporary_names_are_unique_exclusive_and_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let (_, a) = create_temp(&p, 0o600).unwrap();
        let (_, b) = create_temp(&p, 0o600).unwrap();
        assert_ne!(a, b, "two writers never share a temporary");
        for t in [&a, &b] {
            let name = t.file_name().unwrap().to_str().unwrap();
            assert!(
                name.starts_with(".state.json.") && is_temp_name(name),
                "{name}"
            );
        }
        assert!(!is_temp_name("state.json"));
        assert!(!is_temp_name(".state.json.tmp"), "not one of ours");
        // A symlink where the temporary would go is never followed (O_EXCL | O_NOFOLLOW):
        // only a fresh name is ever written.
        let target = dir.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join(".x.0123456789abcdef.tmp");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&link)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(40), "ELOOP: {e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
