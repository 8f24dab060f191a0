//! Walks an area and yields its entries in the contract's order.
//!
//! Regular files and symlinks become entries; directories are implied;
//! FIFOs, sockets and devices are skipped; names whose last component is
//! reserved (`.bitfog*`) are never yielded. It never follows a symlink,
//! never reads outside the area, and never writes.

use crate::beneath::{Dir, Kind, Root};
use crate::digest::hash_reader;
use crate::hashcache::{CacheFile, Lookup, Update};
use crate::manifest::Entry;
use crate::paths::is_reserved;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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

/// Walks the area, calling `emit` for each item in order until it
/// returns false. jwalk only enumerates names; each entry's stat, link
/// target and contents are read relative to its directory resolved beneath
/// `root` (see `beneath`), so a directory swapped for a symlink mid-walk
/// yields a skipped entry, never a name, size or hash from outside.
///
/// With a hash cache, a file whose size and identity are unchanged since
/// the last complete listing is not read again, and the cache is replaced
/// when this walk completes.
pub(crate) fn scan(
    root: &Root,
    checksum: bool,
    cache: Option<&CacheFile>,
    mut emit: impl FnMut(Item) -> bool,
) {
    let mut cached: Option<(PathBuf, Dir)> = None;
    let mut hashes = cache.filter(|_| checksum).map(|c| (c.reader(), c.writer()));
    for dent in walker(root.path()) {
        let dent = match dent {
            Ok(d) => d,
            Err(e) => {
                if !emit(Item::Skipped(format!("walk error: {e}"))) {
                    return;
                }
                // An incomplete walk must not replace the cache.
                if let Some((_, update)) = hashes.as_mut() {
                    *update = None;
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
        let item = match entry_for(root, &mut cached, &path, checksum, hashes.as_mut()) {
            Ok(e) => Item::Entry(e),
            Err(why) => Item::Skipped(format!("'{}': {why}", path.display())),
        };
        if !emit(item) {
            return;
        }
    }
    if let Some((_, Some(update))) = hashes {
        let _ = update.commit();
    }
}

/// Builds the entry for one file or symlink.
fn entry_for(
    root: &Root,
    cached: &mut Option<(PathBuf, Dir)>,
    path: &Path,
    checksum: bool,
    hashes: Option<&mut (Lookup, Option<Update>)>,
) -> Result<Entry, String> {
    let io = |e: std::io::Error| crate::error::describe_io(&e);
    let rel = path
        .strip_prefix(root.path())
        .map_err(|_| "outside the area".to_string())?;
    let name = rel.to_str().ok_or("name is not valid UTF-8")?.to_string();
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    if cached.as_ref().is_none_or(|(p, _)| *p != parent) {
        let comps: Vec<&[u8]> = parent.iter().map(|c| c.as_bytes()).collect();
        let dir = root
            .dir(&comps, false)
            .map_err(|e| format!("directory changed during the listing ({})", io(e)))?;
        *cached = Some((parent, dir));
    }
    let (_, dir) = cached.as_ref().expect("cached above");
    let file_name = rel
        .file_name()
        .map(|n| n.as_bytes())
        .ok_or("no file name")?;
    let meta = dir.stat(file_name).map_err(io)?.ok_or("vanished")?;
    let mut entry = Entry {
        name,
        size: meta.size,
        mode: meta.mode,
        mtime: meta.mtime,
        sha256: None,
        linkdest: None,
    };
    match meta.kind {
        Kind::Symlink => {
            let target = String::from_utf8(dir.read_link(file_name).map_err(io)?)
                .map_err(|_| "symlink target is not valid UTF-8")?;
            entry.size = target.len() as u64;
            entry.linkdest = Some(target);
        }
        Kind::File if checksum => {
            let (lookup, update) = match hashes {
                Some((l, u)) => (Some(l), u.as_mut()),
                None => (None, None),
            };
            let hash = match lookup.and_then(|l| l.get(&entry.name, entry.size, &meta.identity)) {
                Some(h) => h,
                None => {
                    let (hash, n) =
                        hash_reader(dir.open_read(file_name).map_err(io)?).map_err(io)?;
                    if n != entry.size {
                        return Err("changed while it was hashed".into());
                    }
                    hash
                }
            };
            if let Some(u) = update {
                u.add(&entry.name, entry.size, &meta.identity, &hash);
            }
            entry.sha256 = Some(hash);
        }
        Kind::File => {}
        _ => return Err("not a regular file".into()),
    }
    Ok(entry)
}
