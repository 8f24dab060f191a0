//! Walks an area and yields its entries in the contract's order.
//!
//! Regular files and symlinks become entries; directories are implied;
//! FIFOs, sockets and devices are skipped; names whose last component is
//! reserved (`.bitfog*`) are never yielded, nor are names the area
//! excludes (an excluded directory is not entered). It never follows a symlink,
//! never reads outside the area, and never writes.

use crate::beneath::{Dir, Found as Walked, Kind, Root};
use crate::digest::hash_reader;
use crate::server::hashcache::{CacheFile, Hit, Lookup, Update};
use crate::wire::exclude::Excludes;
use crate::wire::manifest::Entry;
use crate::wire::paths::is_reserved;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What the walk found at one path.
pub(super) enum Item {
    Entry(Entry),
    /// A file arriving range by range (its record, with the full name).
    Partial(crate::wire::manifest::PartialUpload),
    /// A directory (the root as ""), and whether it has nothing in it.
    Dir(crate::wire::manifest::EmptyDir, bool),
    /// Left out of the listing (not UTF-8, unreadable, vanished): the
    /// reason, for the log; counted in the end record's `skipped`.
    Skipped(String),
}

/// At most this many entries wait for their hashes at once.
const BATCH_ENTRIES: usize = 256;
/// A batch is hashed once this many bytes wait to be read.
const BATCH_BYTES: u64 = 256 << 20;

/// Walks the area, calling `emit` for each item in order until it
/// returns false. Directories are read through descriptors beneath `root`
/// (see `beneath::walk`), so a directory swapped for a symlink mid-walk
/// is reported and skipped, never followed. A directory that cannot be
/// read (a permission, a name too long, too many open files, an I/O
/// error) is an `Item::Skipped`: the listing then says it is incomplete.
/// Reserved directories (`.bitfog*`) are never entered.
///
/// Files whose hash is not cached are hashed in batches on every core,
/// then emitted in order.
///
/// With a hash cache, a file whose size and identity are unchanged since
/// the last complete listing is not read again, and the cache is replaced
/// when this walk completes.
pub(super) fn scan(
    root: &Root,
    checksum: bool,
    exclude: &Excludes,
    cache: Option<&CacheFile>,
    cancel: &AtomicBool,
    mut emit: impl FnMut(Item) -> bool,
) {
    let mut lookup = cache.filter(|_| checksum).map(|c| c.reader());
    let mut update = cache.zip(lookup.as_ref()).map(|(c, l)| c.writer(l));
    let mut batch = Batch::default();
    // Link groups by device and inode, numbered from 1 as met.
    let mut groups: std::collections::HashMap<(i128, i128), u64> = Default::default();
    let mut open = true;
    let excluded =
        |rel: &Path, dir: bool| rel.to_str().is_some_and(|n| exclude.matches_itself(n, dir));
    let enter = |rel: &Path| {
        !rel.file_name().is_some_and(|n| is_reserved(n.as_bytes())) && !excluded(rel, true)
    };
    crate::beneath::walk(root, enter, |found| {
        match found {
            Walked::Unreadable { rel, err } => {
                // An incomplete walk must not replace the cache.
                update = None;
                batch.push(Found::Ready(Item::Skipped(format!(
                    "'{}': {}",
                    shown(rel),
                    crate::error::describe_io(&err)
                ))));
            }
            Walked::Dir { dir, rel, empty } => {
                if let Some(e) = dir_record(dir, rel) {
                    batch.push(Found::Ready(Item::Dir(e, empty)));
                }
            }
            Walked::Item { kind, .. } if !matches!(kind, Kind::File | Kind::Symlink) => {}
            Walked::Item { dir, rel, name, .. } if is_reserved(name) => {
                if let Some(p) = partial_record(dir, rel, name) {
                    batch.push(Found::Ready(Item::Partial(p)));
                }
            }
            Walked::Item { rel, .. } if excluded(rel, false) => {}
            Walked::Item { dir, rel, name, .. } => {
                let found = entry_for(dir, rel, name, checksum, lookup.as_mut(), &mut groups)
                    .unwrap_or_else(|why| {
                        Found::Ready(Item::Skipped(format!("'{}': {why}", shown(rel))))
                    });
                batch.push(found);
            }
        }
        if batch.full() {
            open = batch.flush(&mut update, cancel, &mut emit);
        }
        open
    });
    if !open || !batch.flush(&mut update, cancel, &mut emit) {
        return;
    }
    if let Some(update) = update {
        let _ = update.commit();
    }
}

/// A relative path for the log (which escapes control characters).
fn shown(rel: &Path) -> std::path::Display<'_> {
    rel.display()
}

/// What the walk found at one path, before hashing.
enum Found {
    Ready(Item),
    /// A file to hash, already open; `id` goes to the cache with its hash.
    /// (A sparse file's entry has `alloc`: its holes are not read.)
    Hash(Entry, File, [i128; 4]),
    /// A file whose hash came from the cache (its record, to keep).
    Cached(Entry, Hit),
}

#[derive(Default)]
struct Batch {
    items: Vec<Found>,
    bytes: u64,
}

impl Batch {
    fn push(&mut self, f: Found) {
        if let Found::Hash(e, ..) = &f {
            self.bytes += e.size;
        }
        self.items.push(f);
    }

    fn full(&self) -> bool {
        self.items.len() >= BATCH_ENTRIES || self.bytes >= BATCH_BYTES
    }

    /// Hashes what waits, on every core, then emits the batch in order
    /// and records the hashes in the cache update. False when `emit`
    /// asked to stop.
    fn flush(
        &mut self,
        update: &mut Option<Update>,
        cancel: &AtomicBool,
        emit: &mut impl FnMut(Item) -> bool,
    ) -> bool {
        let items = std::mem::take(&mut self.items);
        self.bytes = 0;
        let mut hashes = hash_all(&items, cancel).into_iter();
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        for found in items {
            let item = match found {
                Found::Ready(item) => item,
                Found::Cached(e, hit) => {
                    if let Some(u) = update.as_mut() {
                        u.keep(&hit);
                    }
                    Item::Entry(e)
                }
                Found::Hash(mut e, _, id) => match hashes.next().expect("one hash per file") {
                    Ok(h) => {
                        if let Some(u) = update.as_mut() {
                            u.add(&e.name, e.size, &id, &h);
                        }
                        e.sha256 = Some(h);
                        Item::Entry(e)
                    }
                    Err(why) => Item::Skipped(format!("'{}': {why}", e.name)),
                },
            };
            if !emit(item) {
                return false;
            }
        }
        true
    }
}

/// The cores this process may use, asked once: the standard library
/// reads the cgroup's files each time.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The SHA-256 of each `Found::Hash` in `items`, in order, computed by
/// one thread per core taking files from a shared index.
/// Stops early (every result an error) once `cancel` is set.
fn hash_all(items: &[Found], cancel: &AtomicBool) -> Vec<Result<String, String>> {
    let files: Vec<(&File, u64, bool)> = items
        .iter()
        .filter_map(|f| match f {
            Found::Hash(e, file, _) => Some((file, e.size, e.alloc.is_some())),
            _ => None,
        })
        .collect();
    let hash_one = |(file, size, sparse): (&File, u64, bool)| -> Result<String, String> {
        let io = |e: std::io::Error| crate::error::describe_io(&e);
        let (hash, n) = if sparse {
            let (hash, n) = crate::wire::sparse::hash_sparse(file, size, cancel).map_err(io)?;
            // It reads only up to the listed size: see whether it grew.
            (
                hash,
                if file.metadata().map_err(io)?.len() == size {
                    n
                } else {
                    u64::MAX
                },
            )
        } else {
            hash_reader(crate::digest::Cancellable {
                inner: file,
                cancel,
            })
            .map_err(io)?
        };
        if n != size {
            return Err("changed while it was hashed".into());
        }
        Ok(hash)
    };
    let threads = cores().min(files.len());
    if threads <= 1 {
        return files.into_iter().map(hash_one).collect();
    }
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<Result<String, String>>>> =
        files.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&f) = files.get(i) else { return };
                    *out[i].lock().expect("hash slot") = Some(hash_one(f));
                }
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .expect("hash slot")
                .unwrap_or_else(|| Err("not hashed".into()))
        })
        .collect()
}

/// A directory's name (relative, UTF-8), mode and mtime.
fn dir_record(dir: &Dir, rel: &Path) -> Option<crate::wire::manifest::EmptyDir> {
    let name = rel.to_str()?.to_string();
    let m = dir.own_meta().ok()?;
    Some(crate::wire::manifest::EmptyDir {
        name,
        mode: m.mode,
        mtime: m.mtime,
        meta: crate::wire::manifest::MoreMeta {
            mtime_ns: m.mtime_ns,
            uid: Some(m.uid),
            gid: Some(m.gid),
            user: None,
            group: None,
            hardlink: None,
        },
    })
}

/// The record of a partial upload (`.bitfog-part-*.json`, written by the
/// server), with the name made relative to the area.
fn partial_record(
    dir: &Dir,
    rel: &Path,
    file_name: &[u8],
) -> Option<crate::wire::manifest::PartialUpload> {
    if !(file_name.starts_with(b".bitfog-part-") && file_name.ends_with(b".json")) {
        return None;
    }
    let file = dir.open_file(file_name).ok()??;
    let mut p: crate::wire::manifest::PartialUpload =
        serde_json::from_reader(std::io::Read::take(file, 1 << 16)).ok()?;
    if p.name.contains('/') || crate::wire::paths::is_reserved(p.name.as_bytes()) {
        return None;
    }
    let parent = rel.parent().unwrap_or(Path::new("")).to_str()?;
    if !parent.is_empty() {
        p.name = format!("{parent}/{}", p.name);
    }
    Some(p)
}

/// Builds the entry for one file or symlink; a file whose hash is not
/// cached comes back open, to be hashed with its batch.
fn entry_for(
    dir: &Dir,
    rel: &Path,
    file_name: &[u8],
    checksum: bool,
    lookup: Option<&mut Lookup>,
    groups: &mut std::collections::HashMap<(i128, i128), u64>,
) -> Result<Found, String> {
    let io = |e: std::io::Error| crate::error::describe_io(&e);
    let name = rel.to_str().ok_or("name is not valid UTF-8")?.to_string();
    if name.len() > crate::wire::paths::MAX_NAME {
        return Err("name longer than 4096 bytes".into());
    }
    let meta = dir.stat(file_name).map_err(io)?.ok_or("vanished")?;
    let mut entry = Entry {
        name,
        size: meta.size,
        mode: meta.mode,
        mtime: meta.mtime,
        sha256: None,
        linkdest: None,
        alloc: (meta.kind == Kind::File && meta.alloc < meta.size).then_some(meta.alloc),
        meta: crate::wire::manifest::MoreMeta {
            mtime_ns: meta.mtime_ns,
            uid: Some(meta.uid),
            gid: Some(meta.gid),
            user: None,
            group: None,
            // Groups are numbered from 1 as the walk meets them, whether
            // or not the area has checksums.
            hardlink: (meta.kind == Kind::File && meta.nlink > 1).then(|| {
                let next = groups.len() as u64 + 1;
                *groups
                    .entry((meta.identity[0], meta.identity[1]))
                    .or_insert(next)
            }),
        },
    };
    match meta.kind {
        Kind::Symlink => {
            let target = String::from_utf8(dir.read_link(file_name).map_err(io)?)
                .map_err(|_| "symlink target is not valid UTF-8")?;
            entry.size = target.len() as u64;
            entry.linkdest = Some(target);
            Ok(Found::Ready(Item::Entry(entry)))
        }
        Kind::File if checksum => {
            match lookup.and_then(|l| l.get(&entry.name, entry.size, &meta.identity)) {
                Some(hit) => {
                    entry.sha256 = Some(hit.sha256().to_string());
                    Ok(Found::Cached(entry, hit))
                }
                None => {
                    let file = dir.open_read(file_name).map_err(io)?;
                    Ok(Found::Hash(entry, file, meta.identity))
                }
            }
        }
        Kind::File => Ok(Found::Ready(Item::Entry(entry))),
        _ => Err("not a regular file".into()),
    }
}
