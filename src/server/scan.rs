//! Walks an area and yields its entries in the contract's order.
//!
//! Regular files and symlinks become entries; directories are implied;
//! FIFOs, sockets and devices are skipped; names whose last component is
//! reserved (`.bitfog*`) are never yielded, nor are names the area
//! excludes (an excluded directory is not entered). It never follows a symlink,
//! never reads outside the area, and never writes.

use crate::beneath::{Dir, Found as Walked, Kind, Meta, Root};
use crate::digest::hash_reader;
use crate::server::hashcache::{CacheFile, Hit, Lookup, Update};
use crate::wire::exclude::Excludes;
use crate::wire::manifest::Entry;
use crate::wire::paths::is_reserved;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

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
    /// A courier directory inside the area (it holds `.bitfog/`), left
    /// out on purpose: its path, for the log. Not counted as skipped.
    Courier(String),
}

/// At most this many entries wait for their hashes at once.
const BATCH_ENTRIES: usize = 256;
/// A batch is hashed once this many bytes wait to be read.
const BATCH_BYTES: u64 = 256 << 20;
/// A batch holds at most this many directories open (each name waiting
/// for its `stat` keeps its directory's descriptor).
const BATCH_DIRS: usize = 64;
/// Helpers stat a batch alongside the walking thread from this many names
/// on; fewer are not worth waking them.
const STAT_SHARED_FROM: usize = 32;

/// Walks the area, calling `emit` for each item in order until it
/// returns false. Directories are read through descriptors beneath `root`
/// (see `beneath::walk`), so a directory swapped for a symlink mid-walk
/// is reported and skipped, never followed. A directory that cannot be
/// read (a permission, a name too long, too many open files, an I/O
/// error) is an `Item::Skipped`: the listing then says it is incomplete.
/// Reserved directories (`.bitfog*`) are never entered.
///
/// The walk collects names in batches; a batch's names are looked at
/// (`fstatat`) on several cores, files whose hash is not cached are
/// hashed on every core, then the batch is emitted in order.
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
    let lookup = cache.filter(|_| checksum).map(|c| c.reader());
    let mut batch = Batch {
        began: crate::server::hashcache::now_ns(),
        update: cache.zip(lookup.as_ref()).map(|(c, l)| c.writer(l)),
        lookup,
        checksum,
        ..Batch::default()
    };
    let mut open = true;
    let excluded =
        |rel: &Path, dir: bool| rel.to_str().is_some_and(|n| exclude.matches_itself(n, dir));
    let enter = |rel: &Path| {
        !rel.file_name().is_some_and(|n| is_reserved(n.as_bytes())) && !excluded(rel, true)
    };
    // A courier inside the area, while the walk is beneath it.
    let mut courier: Option<PathBuf> = None;
    crate::beneath::walk(root, enter, |found| {
        let rel = match &found {
            Walked::Unreadable { rel, .. } | Walked::Dir { rel, .. } | Walked::Item { rel, .. } => {
                *rel
            }
        };
        if courier.as_ref().is_some_and(|c| rel.starts_with(c)) {
            return true;
        }
        courier = None;
        match found {
            Walked::Dir { dir, rel, .. } if holds_courier_state(dir, rel) => {
                batch.push(Found::Ready(Item::Courier(shown(rel).to_string())));
                courier = Some(rel.to_path_buf());
            }
            Walked::Unreadable { rel, err } => {
                // An incomplete walk must not replace the cache.
                batch.update = None;
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
            Walked::Item { dir, rel, .. } => batch.push_name(dir, rel),
        }
        if batch.full() {
            open = batch.flush(cancel, &mut emit);
        }
        open
    });
    if !open || !batch.flush(cancel, &mut emit) {
        return;
    }
    if let Some(update) = batch.update.take() {
        let _ = update.commit();
    }
}

/// Whether the directory `rel` (not the area's root) is a courier: it
/// holds `.bitfog/carried.jsonl`, the record `fetch` keeps of what it
/// carried. A courier disk mounted inside a source area would otherwise
/// be listed, and its files carried into itself on every trip. A bare
/// `.bitfog` entry is only a reserved name, left out by itself.
fn holds_courier_state(dir: &Dir, rel: &Path) -> bool {
    let state = crate::wire::paths::COURIER_STATE.as_bytes();
    !rel.as_os_str().is_empty()
        && matches!(dir.kind(state), Ok(Some(Kind::Dir)))
        && dir
            .open_dir(state, false)
            .is_ok_and(|s| matches!(s.kind(b"carried.jsonl"), Ok(Some(Kind::File))))
}

/// A relative path for the log (which escapes control characters).
fn shown(rel: &Path) -> std::path::Display<'_> {
    rel.display()
}

/// What the walk found at one path, before hashing.
enum Found {
    Ready(Item),
    /// A file or symlink not yet looked at: its place in `Batch::names`.
    Name(usize),
    /// A file to hash, already open; `id` goes to the cache with its hash.
    /// (A sparse file's entry has `alloc`: its holes are not read.)
    Hash(Entry, File, [i128; 4]),
    /// A file whose hash came from the cache (its record, to keep).
    Cached(Entry, Hit),
}

/// Items found and not yet emitted, with what turns them into entries.
#[derive(Default)]
struct Batch {
    items: Vec<Found>,
    /// The directory and path of each `Found::Name`.
    names: Vec<Named>,
    /// Directories held by `names`, and the last one pushed.
    dirs: usize,
    last_dir: Option<Arc<Dir>>,
    checksum: bool,
    lookup: Option<Lookup>,
    update: Option<Update>,
    /// When the listing began: hashes of files changed shortly before
    /// are not cached (`hashcache::settled`).
    began: i128,
    /// Link groups by device and inode, numbered from 1 as met.
    groups: std::collections::HashMap<(i128, i128), u64>,
    stats: Statters,
}

impl Batch {
    fn push(&mut self, f: Found) {
        self.items.push(f);
    }

    fn push_name(&mut self, dir: &Arc<Dir>, rel: &Path) {
        if !self.last_dir.as_ref().is_some_and(|d| Arc::ptr_eq(d, dir)) {
            self.dirs += 1;
            self.last_dir = Some(Arc::clone(dir));
        }
        self.items.push(Found::Name(self.names.len()));
        self.names.push((Arc::clone(dir), rel.to_path_buf()));
    }

    fn full(&self) -> bool {
        self.items.len() >= BATCH_ENTRIES || self.dirs >= BATCH_DIRS
    }

    /// Looks at the names that wait (on several cores), then hashes what
    /// is not cached (on every core), emits the batch in order and
    /// records the hashes in the cache update. False when `emit` asked to
    /// stop.
    fn flush(&mut self, cancel: &AtomicBool, emit: &mut impl FnMut(Item) -> bool) -> bool {
        let mut items = std::mem::take(&mut self.items);
        let (names, mut metas) = self.stats.stat_all(std::mem::take(&mut self.names));
        self.dirs = 0;
        self.last_dir = None;
        for found in &mut items {
            if let Found::Name(i) = *found {
                let (dir, rel) = &names[i];
                *found = self.entry(dir, rel, metas[i].take()).unwrap_or_else(|why| {
                    Found::Ready(Item::Skipped(format!("'{}': {why}", shown(rel))))
                });
            }
        }
        // Files are hashed (and the batch emitted) in parts of at most
        // BATCH_BYTES, so a listing of large files goes out as they are read.
        while !items.is_empty() {
            let mut bytes = 0;
            let end = (items.iter())
                .position(|f| {
                    if let Found::Hash(e, ..) = f {
                        bytes += e.size;
                    }
                    bytes >= BATCH_BYTES
                })
                .map_or(items.len(), |i| i + 1);
            if !self.finish(&mut items, end, cancel, emit) {
                return false;
            }
        }
        // The next batch reuses both vectors' room.
        self.items = items;
        self.names = names;
        self.names.clear();
        true
    }

    /// The entry for a file or symlink (`rel`, in `dir`) and what its
    /// `fstatat` said; a file whose hash is not cached comes back open,
    /// to be hashed with its batch.
    fn entry(&mut self, dir: &Dir, rel: &Path, meta: Looked) -> Result<Found, String> {
        let io = |e: io::Error| crate::error::describe_io(&e);
        let file_name = rel.file_name().map_or(&[][..], |n| n.as_bytes());
        let name = rel.to_str().ok_or("name is not valid UTF-8")?.to_string();
        if name.len() > crate::wire::paths::MAX_NAME {
            return Err("name longer than 4096 bytes".into());
        }
        let meta = meta
            .ok_or("not looked at")?
            .map_err(io)?
            .ok_or("vanished")?;
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
                // Link groups are numbered from 1 as the walk meets them.
                hardlink: (meta.kind == Kind::File && meta.nlink > 1).then(|| {
                    let next = self.groups.len() as u64 + 1;
                    *self
                        .groups
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
            Kind::File if self.checksum => {
                let hit = self
                    .lookup
                    .as_mut()
                    .and_then(|l| l.get(&entry.name, entry.size, &meta.identity));
                match hit {
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

    /// Hashes what waits in `items[..end]`, on every core, then emits
    /// and removes them in order and records the hashes in the cache update.
    fn finish(
        &mut self,
        items: &mut Vec<Found>,
        end: usize,
        cancel: &AtomicBool,
        emit: &mut impl FnMut(Item) -> bool,
    ) -> bool {
        let mut hashes = hash_all(&items[..end], cancel).into_iter();
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        for found in items.drain(..end) {
            let item = match found {
                Found::Ready(item) => item,
                Found::Name(..) => unreachable!("looked at before"),
                Found::Cached(e, hit) => {
                    if let Some(u) = self.update.as_mut() {
                        u.keep(&hit);
                    }
                    Item::Entry(e)
                }
                Found::Hash(mut e, _, id) => match hashes.next().expect("one hash per file") {
                    Ok(h) => {
                        let settled = crate::server::hashcache::settled(&id, self.began);
                        if let Some(u) = self.update.as_mut().filter(|_| settled) {
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

/// At most this many threads look at a batch's names (the walking one
/// and its helpers).
const MAX_STATTERS: usize = 8;

/// A name waiting to be looked at: its directory and its path in the area.
type Named = (Arc<Dir>, PathBuf);
/// What `fstatat` said of a name (None: nobody looked).
type Looked = Option<io::Result<Option<Meta>>>;

/// Threads that look at a batch's names alongside the walking thread:
/// `fstatat` is most of a listing whose hashes are cached, and names
/// can be looked at in any order. Started for the first batch with
/// enough names, they live as long as the walk.
#[derive(Default)]
struct Statters {
    started: bool,
    /// Each helper's job queue and its answer that a job is done.
    helpers: Vec<(mpsc::Sender<Arc<StatJob>>, mpsc::Receiver<()>)>,
}

/// A batch's names being looked at: each thread takes a few at a time.
struct StatJob {
    names: Vec<Named>,
    next: AtomicUsize,
    metas: Vec<OnceLock<io::Result<Option<Meta>>>>,
}

impl StatJob {
    /// Looks at names until every one is taken.
    fn work(&self) {
        const TAKE: usize = 8;
        loop {
            let from = self.next.fetch_add(TAKE, Ordering::Relaxed);
            let Some(names) = self.names.get(from..(from + TAKE).min(self.names.len())) else {
                return;
            };
            for ((dir, rel), meta) in names.iter().zip(&self.metas[from..]) {
                let name = rel.file_name().map_or(&[][..], |n| n.as_bytes());
                let _ = meta.set(dir.stat(name));
            }
        }
    }
}

impl Statters {
    /// Starts the helpers; where a thread cannot be made, the walk does
    /// with fewer (or none).
    fn start(&mut self) {
        self.started = true;
        for _ in 1..cores().min(MAX_STATTERS) {
            let (jobs, take) = mpsc::channel::<Arc<StatJob>>();
            let (done, answers) = mpsc::channel();
            let helper = std::thread::Builder::new().spawn(move || {
                for job in take {
                    job.work();
                    // The names go back to the walk once every helper has
                    // let go of them.
                    drop(job);
                    if done.send(()).is_err() {
                        return;
                    }
                }
            });
            if helper.is_err() {
                return;
            }
            self.helpers.push((jobs, answers));
        }
    }

    /// `names` back, with what `fstatat` said of each (in order).
    fn stat_all(&mut self, names: Vec<Named>) -> (Vec<Named>, Vec<Looked>) {
        let shared = names.len() >= STAT_SHARED_FROM;
        if shared && !self.started {
            self.start();
        }
        let job = Arc::new(StatJob {
            metas: names.iter().map(|_| OnceLock::new()).collect(),
            names,
            next: AtomicUsize::new(0),
        });
        let sent: Vec<_> = (self.helpers.iter())
            .filter(|(jobs, _)| shared && jobs.send(Arc::clone(&job)).is_ok())
            .collect();
        job.work();
        for (_, answers) in sent {
            // A helper that is gone has let go of the job too.
            let _ = answers.recv();
        }
        let Ok(job) = Arc::try_unwrap(job) else {
            unreachable!("every helper answered or is gone")
        };
        let metas = job.metas.into_iter().map(OnceLock::into_inner).collect();
        (job.names, metas)
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
