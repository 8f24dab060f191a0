//! Walks an area and yields its entries in the contract's order.
//!
//! Regular files and symlinks become entries; directories are implied;
//! FIFOs, sockets and devices are skipped; names whose last component is
//! reserved (`.bitfog*`) are never yielded. It never follows a symlink and
//! never writes.

use crate::digest::hash_reader;
use crate::manifest::Entry;
use crate::paths::is_reserved;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What the walk found at one path.
pub(crate) enum Item {
    Entry(Entry),
    /// Left out of the listing (not UTF-8, unreadable, vanished): the
    /// reason, for the log; counted in the end record's `skipped`.
    Skipped(String),
}

/// A walker that does not follow links, visits hidden files, and sorts
/// each directory's entries bytewise (jwalk's defaults differ).
pub(crate) fn walker(root: &Path) -> jwalk::WalkDir {
    jwalk::WalkDir::new(root)
        .sort(true)
        .skip_hidden(false)
        .follow_links(false)
}

/// Walks `root`, calling `emit` for each item in order until it returns
/// false.
pub(crate) fn scan(root: &Path, checksum: bool, mut emit: impl FnMut(Item) -> bool) {
    for dent in walker(root) {
        let dent = match dent {
            Ok(d) => d,
            Err(e) => {
                if !emit(Item::Skipped(format!("walk error: {e}"))) {
                    return;
                }
                continue;
            }
        };
        let ft = dent.file_type();
        if dent.depth() == 0 || ft.is_dir() || !(ft.is_file() || ft.is_symlink()) {
            continue;
        }
        if is_reserved(dent.file_name().as_bytes()) {
            continue;
        }
        let path = dent.path();
        let item = match entry_for(root, &path, checksum) {
            Ok(e) => Item::Entry(e),
            Err(why) => Item::Skipped(format!("'{}': {why}", path.display())),
        };
        if !emit(item) {
            return;
        }
    }
}

/// Builds the entry for one file or symlink.
fn entry_for(root: &Path, path: &Path, checksum: bool) -> Result<Entry, String> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| "outside the area".to_string())?;
    let name = rel.to_str().ok_or("name is not valid UTF-8")?.to_string();
    let meta = fs::symlink_metadata(path).map_err(|e| crate::error::describe_io(&e))?;
    let mut entry = Entry {
        name,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        sha256: None,
        linkdest: None,
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).map_err(|e| crate::error::describe_io(&e))?;
        let target = target.to_str().ok_or("symlink target is not valid UTF-8")?;
        entry.size = target.len() as u64;
        entry.linkdest = Some(target.to_string());
    } else if meta.file_type().is_file() {
        if checksum {
            let file = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| crate::error::describe_io(&e))?;
            let (hash, n) = hash_reader(file).map_err(|e| crate::error::describe_io(&e))?;
            if n != entry.size {
                return Err("changed while it was hashed".into());
            }
            entry.sha256 = Some(hash);
        }
    } else {
        return Err("not a regular file".into());
    }
    Ok(entry)
}
