//! Package files on disk: the one walk that finds every `*.erec` under a directory, for
//! export (files and the `dir` store) and the key census alike. Manifests
//! (`appliance/manifests.rs`) are not recordings: a walk skips a store's `manifests/` folder
//! (by where it is, not by what a file is called: a forger cannot hide a package from an
//! audit by its name).
//!
//! Invariant: a symlink is neither followed nor taken — one to `/` would walk the whole
//! machine, one to a package outside the store would export or count it; every entry is
//! judged by its own type, never by what it points to.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What a walk found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Every regular `*.erec` file, sorted.
    pub packages: Vec<PathBuf>,
    /// Entries that are neither a directory nor a package file (other files, symlinks).
    pub skipped: usize,
}

/// Every package file under `path` (itself, if it is not a directory); a `manifests/`
/// folder below it (a store's manifests) is skipped, counted once.
pub fn find(path: &Path) -> io::Result<Found> {
    walk(path, true)
}

/// Every package file under `dir`, a store's `manifests/` (`edgerec verify-store`).
#[cfg(feature = "appliance")]
pub fn find_manifests(dir: &Path) -> io::Result<Found> {
    walk(dir, false)
}

/// The regular `*.erec` files under `path` (`path` itself, if it is not a directory);
/// folders named `manifests` below it skipped when `skip_manifests`.
fn walk(path: &Path, skip_manifests: bool) -> io::Result<Found> {
    let mut found = Found::default();
    if !path.is_dir() {
        found.packages.push(path.to_path_buf());
        return Ok(found);
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            let p = e.path();
            if t.is_dir() && !(skip_manifests && e.file_name() == "manifests") {
                stack.push(p);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "erec") {
                found.packages.push(p);
            } else {
                found.skipped += 1;
            }
        }
    }
    found.packages.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_never_follows_a_symlink_and_counts_what_it_skips() {
        let dir = tempfile::tempdir().unwrap();
        let day = dir.path().join("2026/11/30");
        fs::create_dir_all(&day).unwrap();
        fs::write(day.join("a.erec"), b"x").unwrap();
        fs::write(day.join("notes.txt"), b"n").unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("theirs.erec"), b"y").unwrap();
        // A loop back to the root, a directory elsewhere, a package elsewhere.
        std::os::unix::fs::symlink(dir.path(), day.join("loop")).unwrap();
        std::os::unix::fs::symlink(outside.path(), day.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("theirs.erec"), day.join("b.erec")).unwrap();
        // A manifest is not a recording.
        let manifests = dir.path().join("manifests/2026/11/30/09");
        fs::create_dir_all(&manifests).unwrap();
        fs::write(manifests.join("0123456789abcdef.7.erec"), b"m").unwrap();
        let found = find(dir.path()).unwrap();
        assert_eq!(found.packages, [day.join("a.erec")]);
        assert_eq!(found.skipped, 5);
        // A file named directly is taken as it is.
        assert_eq!(
            find(&day.join("a.erec")).unwrap().packages,
            [day.join("a.erec")]
        );
    }
}
