//! The server's SHA-256 cache: one file per area, outside the area.
//!
//! Each record holds a name, the file's size and identity (device, inode,
//! mtime and ctime in nanoseconds) and its hash. Any write to a file
//! changes its ctime, so a changed file always misses and is hashed again;
//! a stale hash is never served. Records are written in the contract's
//! name order during a listing, so the next listing merges them with its
//! walk as a stream, holding one record in memory. A cache file is
//! replaced by rename only after a listing completed; a damaged one is
//! treated as empty.

use crate::digest::is_sha256_hex;
use crate::wire::paths::name_cmp;
use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

/// The first line of a cache file; a file without it (an older format,
/// or damage) is treated as empty.
const HEADER: &[u8] = b"bitfog hash cache 2\n";

/// One record, parsed from a line
/// `SHA256 SIZE DEV INO MTIME_NS CTIME_NS NAME`: plain text, because
/// a warm listing reads one per file and JSON parsing was a third of it.
/// Names holding a newline are never cached (they are hashed each time).
struct Record {
    /// Where the line starts in its cache file.
    at: u64,
    line: Vec<u8>,
    size: u64,
    id: [i128; 4],
    /// Where the name starts in `line` (it runs to the newline).
    name_at: usize,
}

impl Record {
    fn parse(at: u64, line: Vec<u8>) -> Option<Record> {
        let text = std::str::from_utf8(&line).ok()?.strip_suffix('\n')?;
        let mut f = text.splitn(7, ' ');
        let sha = f.next()?;
        if !is_sha256_hex(sha) {
            return None;
        }
        let size = f.next()?.parse().ok()?;
        let mut id = [0i128; 4];
        for v in &mut id {
            *v = f.next()?.parse().ok()?;
        }
        let name = f.next()?;
        let name_at = text.len() - name.len();
        Some(Record {
            at,
            line,
            size,
            id,
            name_at,
        })
    }

    fn name(&self) -> &str {
        // Checked as UTF-8 in `parse`; the newline is not part of the name.
        std::str::from_utf8(&self.line[self.name_at..self.line.len() - 1]).unwrap_or("")
    }

    fn sha256(&self) -> &str {
        std::str::from_utf8(&self.line[..64]).unwrap_or("")
    }
}

/// A file changed less than this long before it was looked at is hashed
/// (or signed) but not cached. A kernel stamps ctime from a clock that
/// ticks every 4-10 ms (before Linux 6.13's fine-grained timestamps, and
/// NAS kernels are older; a network file system's server may be coarser
/// still): a second write within the tick of the one seen, same size,
/// would leave the identity the caches key on unchanged.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

/// Now, in nanoseconds since the epoch (as identities count).
pub(super) fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Whether a file of identity `id`, looked at `seen` (`now_ns`), may be
/// cached: its ctime is older than `SETTLED` then.
pub(super) fn settled(id: &[i128; 4], seen: i128) -> bool {
    id[3] < seen - SETTLED.as_nanos() as i128
}

/// A temporary name beside `path`, unique to this process and call: two
/// requests may write the same cache entry at once.
fn unique_tmp(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, AtomicOrdering::Relaxed);
    path.with_extension(format!("tmp{}-{n}", std::process::id()))
}

/// Where an area's cache lives.
#[derive(Debug, Clone)]
pub(super) struct CacheFile {
    path: PathBuf,
}

impl CacheFile {
    /// The cache file for the area at `root` (named after the area and a
    /// hash of its path, so two configurations never share one).
    pub(super) fn for_area(dir: &Path, area: &str, root: &Path) -> CacheFile {
        let mut h = crate::digest::Hasher::new();
        h.update(root.as_os_str().as_encoded_bytes());
        CacheFile {
            path: dir.join(format!("{area}.{}.hashes", &h.hex()[..16])),
        }
    }

    /// Opens the previous listing's records (empty when there are none).
    pub(super) fn reader(&self) -> Lookup {
        let lines = File::open(&self.path)
            .ok()
            .map(BufReader::new)
            .and_then(|mut r| {
                let mut first = Vec::new();
                r.read_until(b'\n', &mut first).ok()?;
                (first == HEADER).then_some(r)
            });
        Lookup {
            lines,
            at: HEADER.len() as u64,
            next: None,
        }
    }

    /// Starts the next cache, which `commit` puts in place. It shares
    /// what it can with the file `lookup` reads: while every record is
    /// kept in order, nothing is written, and a listing that changed
    /// nothing leaves the cache file as it was.
    pub(super) fn writer(&self, lookup: &Lookup) -> Update {
        Update {
            // Two listings of one area may overlap.
            tmp: unique_tmp(&self.path),
            path: self.path.clone(),
            old: (lookup.lines.as_ref()).and_then(|r| r.get_ref().try_clone().ok()),
            same: HEADER.len() as u64,
            out: None,
            failed: false,
        }
    }
}

/// Looks names up in a cache file, in name order.
pub(super) struct Lookup {
    lines: Option<BufReader<File>>,
    /// Where the next line starts.
    at: u64,
    next: Option<Record>,
}

impl Lookup {
    /// The cached record of `name` if its size and identity are
    /// unchanged. Names must be asked in contract order.
    pub(super) fn get(&mut self, name: &str, size: u64, id: &[i128; 4]) -> Option<Hit> {
        loop {
            if self.next.is_none() {
                let mut line = Vec::with_capacity(160);
                let n = self.lines.as_mut()?.read_until(b'\n', &mut line).ok()?;
                if n == 0 {
                    self.lines = None;
                    return None;
                }
                // A damaged record ends the cache: what follows is hashed.
                self.next = Record::parse(self.at, line);
                self.at += n as u64;
                if self.next.is_none() {
                    self.lines = None;
                    return None;
                }
            }
            let rec = self.next.as_ref()?;
            match name_cmp(rec.name(), name) {
                Ordering::Less => self.next = None,
                Ordering::Greater => return None,
                Ordering::Equal => {
                    let rec = self.next.take()?;
                    return (rec.size == size && rec.id == *id).then_some(Hit(rec));
                }
            }
        }
    }
}

/// A record that matched: its hash, and its line for the next cache.
pub(super) struct Hit(Record);

impl Hit {
    pub(super) fn sha256(&self) -> &str {
        self.0.sha256()
    }
}

/// The cache file being written by a listing.
pub(super) struct Update {
    tmp: PathBuf,
    path: PathBuf,
    /// The cache file the listing reads, and how much of it (from the
    /// start) the new one holds unchanged so far.
    old: Option<File>,
    same: u64,
    /// The new file, once it differs from the old one.
    out: Option<BufWriter<File>>,
    failed: bool,
}

impl Update {
    pub(super) fn add(&mut self, name: &str, size: u64, id: &[i128; 4], sha256: &str) {
        if name.contains('\n') || !is_sha256_hex(sha256) {
            return;
        }
        if let Some(out) = self.differ() {
            let [dev, ino, mtime, ctime] = id;
            if writeln!(out, "{sha256} {size} {dev} {ino} {mtime} {ctime} {name}").is_err() {
                self.failed = true;
            }
        }
    }

    /// Carries a matched record over as it was read: a warm listing
    /// formats no number for the cache, and writes nothing while the
    /// records it keeps follow each other in the old file.
    pub(super) fn keep(&mut self, hit: &Hit) {
        let line = &hit.0.line;
        if self.out.is_none() && !self.failed && self.old.is_some() && hit.0.at == self.same {
            self.same += line.len() as u64;
            return;
        }
        if let Some(out) = self.differ() {
            if out.write_all(line).is_err() {
                self.failed = true;
            }
        }
    }

    /// The new file, started (with what it shares with the old one) on
    /// the first difference; None once a write failed.
    fn differ(&mut self) -> Option<&mut BufWriter<File>> {
        if self.out.is_none() && !self.failed {
            match self.start() {
                Ok(out) => self.out = Some(out),
                Err(_) => self.failed = true,
            }
        }
        self.out.as_mut().filter(|_| !self.failed)
    }

    fn start(&self) -> io::Result<BufWriter<File>> {
        let mut out = BufWriter::new(File::create(&self.tmp)?);
        let Some(old) = &self.old else {
            out.write_all(HEADER)?;
            return Ok(out);
        };
        // Positioned reads: the descriptor shares its offset with the
        // reader's.
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0;
        while at < self.same {
            let n = (self.same - at).min(buf.len() as u64) as usize;
            old.read_exact_at(&mut buf[..n], at)?;
            out.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(out)
    }

    /// Puts the new cache in place (after a complete listing); a cache
    /// that holds the old one's records and no more stays as it is.
    pub(super) fn commit(mut self) -> io::Result<()> {
        let unchanged = self.out.is_none()
            && !self.failed
            && (self.old.as_ref())
                .is_some_and(|f| f.metadata().is_ok_and(|m| m.len() == self.same));
        if unchanged {
            return Ok(());
        }
        self.differ();
        let out = (self.out.take())
            .filter(|_| !self.failed)
            .ok_or_else(|| io::Error::other("cache write failed"))?;
        out.into_inner()
            .map_err(|e| io::Error::other(e.to_string()))?
            .sync_data()?;
        fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for Update {
    fn drop(&mut self) {
        if self.out.is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Removes what a killed server left half written in the cache directory:
/// a temporary cache file (`AREA.HASH.tmpPID-N`, or `AREA.HASH.tmpPID`
/// from older versions; likewise in each area's signature directory)
/// whose process is gone.
pub(super) fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() && name.as_bytes().ends_with(b".sigs") {
            remove_stale_temps(&e.path());
            continue;
        }
        let pid = (name.to_str())
            .and_then(|n| n.rsplit_once(".tmp"))
            .map(|(_, t)| t.split_once('-').map_or(t, |(pid, _)| pid))
            .and_then(|pid| pid.parse::<i32>().ok())
            .filter(|&pid| pid > 0);
        let Some(pid) = pid else { continue };
        if kind.is_file() && crate::sys::process_gone(pid) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/bitfog`, else
/// `~/.cache/bitfog`.
pub(crate) fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("bitfog"))
}

/// The server's signature cache: one file per large file signed, in a
/// directory per area beside the hash cache. A file is named after a hash
/// of the file's name and holds a JSON line (`CachedSig`: the file's size
/// and identity, its SHA-256 and the signature header) and the record
/// table. A file whose size or identity changed misses, exactly as in the
/// hash cache, so a stale signature is never served.
/// Files smaller than this get no cached signature.
const SIG_CACHE_MIN: u64 = 16 << 20;
/// The signature cache of an area holds at most this many files...
const SIG_CACHE_FILES: usize = 100_000;
/// ...and this many bytes (a 1 GiB file's signature takes 640 KiB); the
/// oldest go first.
const SIG_CACHE_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub(super) struct SigCache {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedSig {
    /// Device, inode, mtime and ctime (ns), space-separated.
    id: String,
    sha256: String,
    #[serde(flatten)]
    header: crate::wire::delta::SigHeader,
}

fn id_text(id: &[i128; 4]) -> String {
    format!("{} {} {} {}", id[0], id[1], id[2], id[3])
}

impl SigCache {
    pub(super) fn for_area(dir: &Path, area: &str, root: &Path) -> SigCache {
        let hashes = CacheFile::for_area(dir, area, root).path;
        SigCache {
            dir: hashes.with_extension("sigs"),
        }
    }

    /// The cache file's name for an area name.
    pub(super) fn key(name: &[u8]) -> String {
        let mut h = crate::digest::Hasher::new();
        h.update(name);
        h.hex()[..32].to_string()
    }

    fn path(&self, name: &[u8]) -> PathBuf {
        self.dir.join(SigCache::key(name))
    }

    /// True when a file of `size` bytes is worth keeping a signature of:
    /// smaller ones are signed again on request, which costs little.
    pub(super) fn worth(size: u64) -> bool {
        size >= SIG_CACHE_MIN
    }

    /// The cached signatures, with their mtime (for eviction) and size.
    fn entries(&self) -> Vec<(std::time::SystemTime, u64, PathBuf)> {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|d| d.file_name().len() == 32)
            .filter_map(|d| {
                let m = d.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), d.path()))
            })
            .collect()
    }

    /// Removes the oldest signatures until the cache holds at most
    /// `SIG_CACHE_FILES` files and `SIG_CACHE_BYTES` bytes.
    fn evict(&self) {
        let mut all = self.entries();
        let mut bytes: u64 = all.iter().map(|e| e.1).sum();
        if all.len() <= SIG_CACHE_FILES && bytes <= SIG_CACHE_BYTES {
            return;
        }
        all.sort();
        let mut left = all.len();
        for (_, len, path) in all {
            if left <= SIG_CACHE_FILES && bytes <= SIG_CACHE_BYTES {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                left -= 1;
                bytes -= len;
            }
        }
    }

    /// After a complete listing: removes the signatures of files the
    /// area no longer has (`keep` holds the keys of those it has).
    pub(super) fn prune(&self, keep: &std::collections::HashSet<String>) {
        for (_, _, path) in self.entries() {
            let stale = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !keep.contains(n));
            if stale {
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// The cached SHA-256 and signature of `name` (relative path) if its
    /// size and identity are unchanged; the reader is at the table.
    pub(super) fn get(
        &self,
        name: &[u8],
        size: u64,
        id: &[i128; 4],
    ) -> Option<(String, crate::wire::delta::SigHeader, BufReader<File>)> {
        let mut r = BufReader::new(File::open(self.path(name)).ok()?);
        let mut line = Vec::new();
        (&mut r)
            .take(crate::wire::delta::MAX_HEADER as u64)
            .read_until(b'\n', &mut line)
            .ok()?;
        let c: CachedSig = serde_json::from_slice(&line).ok()?;
        let fits = c.header.size == size && c.id == id_text(id) && c.header.check().is_ok();
        fits.then_some((c.sha256, c.header, r))
    }

    /// Keeps a signature (written to a temporary file, then renamed).
    pub(super) fn put(
        &self,
        name: &[u8],
        id: &[i128; 4],
        sha256: &str,
        header: &crate::wire::delta::SigHeader,
        table: &[u8],
    ) -> io::Result<()> {
        if !SigCache::worth(header.size) {
            return Ok(());
        }
        fs::create_dir_all(&self.dir)?;
        let path = self.path(name);
        let tmp = unique_tmp(&path);
        let c = CachedSig {
            id: id_text(id),
            sha256: sha256.to_string(),
            header: header.clone(),
        };
        let mut out = BufWriter::new(File::create(&tmp)?);
        let written = serde_json::to_writer(&mut out, &c)
            .map_err(io::Error::other)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.write_all(table))
            .and_then(|()| out.flush());
        match written.and_then(|()| fs::rename(&tmp, &path)) {
            Ok(()) => {
                self.evict();
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Lookup {
        fn sha(&mut self, name: &str, size: u64, id: &[i128; 4]) -> Option<String> {
            self.get(name, size, id).map(|h| h.sha256().to_string())
        }
    }

    #[test]
    fn a_kept_record_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
        let h = "c".repeat(64);
        let mut w = c.writer(&c.reader());
        w.add("a b", 3, &[-5, i128::MAX, 0, 7], &h);
        w.add("z", 4, &[1, 2, 3, 4], &h);
        w.commit().unwrap();
        let before = fs::read(&c.path).unwrap();
        let mut r = c.reader();
        let mut w = c.writer(&r);
        w.keep(&r.get("a b", 3, &[-5, i128::MAX, 0, 7]).unwrap());
        w.keep(&r.get("z", 4, &[1, 2, 3, 4]).unwrap());
        w.commit().unwrap();
        assert_eq!(fs::read(&c.path).unwrap(), before);
    }

    #[test]
    fn hits_only_unchanged_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
        let h = "a".repeat(64);
        let mut w = c.writer(&c.reader());
        for name in ["a", "a/b", "a.txt", "b"] {
            w.add(name, 1, &[1, 2, 3, 4], &h);
        }
        w.commit().unwrap();
        let mut r = c.reader();
        assert_eq!(r.sha("a", 1, &[1, 2, 3, 4]).as_deref(), Some(h.as_str()));
        assert_eq!(r.sha("a/b", 1, &[1, 2, 3, 5]), None, "ctime changed");
        assert_eq!(r.sha("a.txt", 2, &[1, 2, 3, 4]), None, "size changed");
        assert_eq!(r.sha("aa", 1, &[1, 2, 3, 4]), None, "not cached");
        assert_eq!(r.sha("b", 1, &[1, 2, 3, 4]).as_deref(), Some(h.as_str()));
        assert_eq!(r.sha("c", 1, &[1, 2, 3, 4]), None);
        // An update dropped before commit leaves the old cache alone.
        drop(c.writer(&c.reader()));
        assert_eq!(
            c.reader().sha("a", 1, &[1, 2, 3, 4]).as_deref(),
            Some(h.as_str())
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn odd_names_and_old_or_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
        let h = "b".repeat(64);
        let mut w = c.writer(&c.reader());
        for name in ["a b  c", "n\nl", "z"] {
            w.add(name, 7, &[-1, 2, 3, 4], &h);
        }
        w.commit().unwrap();
        let mut r = c.reader();
        assert_eq!(
            r.sha("a b  c", 7, &[-1, 2, 3, 4]).as_deref(),
            Some(h.as_str())
        );
        assert_eq!(r.sha("n\nl", 7, &[-1, 2, 3, 4]), None, "never cached");
        assert_eq!(r.sha("z", 7, &[-1, 2, 3, 4]).as_deref(), Some(h.as_str()));

        // A file of the older JSON format reads as empty.
        let old = format!("{{\"name\":\"z\",\"size\":7,\"id\":[-1,2,3,4],\"sha256\":\"{h}\"}}\n");
        fs::write(&c.path, old).unwrap();
        assert_eq!(c.reader().sha("z", 7, &[-1, 2, 3, 4]), None);
        // A damaged record ends the cache there.
        let text = format!(
            "{}{h} 7 -1 2 3 4 a\n{h} x 1 2 3 4 b\n{h} 7 -1 2 3 4 c\n",
            std::str::from_utf8(HEADER).unwrap()
        );
        fs::write(&c.path, text).unwrap();
        let mut r = c.reader();
        assert!(r.sha("a", 7, &[-1, 2, 3, 4]).is_some());
        assert_eq!(r.sha("c", 7, &[-1, 2, 3, 4]), None);
    }

    /// One listing's view of a file: present, and whether its identity
    /// is the one cached.
    #[derive(Debug, Clone, Copy)]
    enum Then {
        Gone,
        Same,
        Changed,
    }

    proptest::proptest! {
        /// Whatever a listing keeps, drops, changes or adds, the new
        /// cache holds exactly its records, in order; one that changed
        /// nothing leaves the file (its inode) as it was.
        #[test]
        fn an_update_holds_exactly_the_listing(
            old in proptest::collection::btree_set("[a-d]{1,3}", 0..12),
            then in proptest::collection::vec(0u8..3, 12),
            added in proptest::collection::btree_set("[a-d]{1,3}", 0..4),
        ) {
            use std::os::unix::fs::MetadataExt;
            let dir = tempfile::tempdir().unwrap();
            let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
            let h = "e".repeat(64);
            let id = |n: &str, v: i128| [1, n.len() as i128, v, 4];
            let mut w = c.writer(&c.reader());
            for n in &old {
                w.add(n, 1, &id(n, 0), &h);
            }
            w.commit().unwrap();
            let ino = fs::metadata(&c.path).unwrap().ino();
            // The next listing, in name order.
            let mut now = std::collections::BTreeMap::new();
            for (n, t) in old.iter().zip(&then) {
                let t = [Then::Gone, Then::Same, Then::Changed][*t as usize];
                if !matches!(t, Then::Gone) {
                    now.insert(n.clone(), t);
                }
            }
            for n in &added {
                now.entry(n.clone()).or_insert(Then::Changed);
            }
            let mut r = c.reader();
            let mut w = c.writer(&r);
            let mut want = HEADER.to_vec();
            for (n, t) in &now {
                let v = if matches!(t, Then::Same) { 0 } else { 1 };
                let [d, i, m, ct] = id(n, v);
                want.extend(format!("{h} 1 {d} {i} {m} {ct} {n}\n").bytes());
                match r.get(n, 1, &id(n, v)) {
                    Some(hit) => w.keep(&hit),
                    None => w.add(n, 1, &id(n, v), &h),
                }
            }
            let unchanged = now.len() == old.len() && now.values().all(|t| matches!(t, Then::Same));
            w.commit().unwrap();
            proptest::prop_assert_eq!(fs::read(&c.path).unwrap(), want);
            proptest::prop_assert_eq!(fs::metadata(&c.path).unwrap().ino() == ino, unchanged);
            proptest::prop_assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        }
    }

    #[test]
    fn overlapping_listings_write_files_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
        let (mut one, mut two) = (c.writer(&c.reader()), c.writer(&c.reader()));
        let h = "f".repeat(64);
        one.add("x", 1, &[1, 2, 3, 4], &h);
        two.add("y", 1, &[1, 2, 3, 4], &h);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        one.commit().unwrap();
        two.commit().unwrap();
        let mut r = c.reader();
        assert!(r.sha("x", 1, &[1, 2, 3, 4]).is_none());
        assert!(r.sha("y", 1, &[1, 2, 3, 4]).is_some());
    }

    #[test]
    fn an_update_that_could_not_be_written_is_not_taken_for_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
        let h = "d".repeat(64);
        let mut w = c.writer(&c.reader());
        w.add("b", 1, &[1, 2, 3, 4], &h);
        w.commit().unwrap();
        let before = fs::read(&c.path).unwrap();
        let mut r = c.reader();
        let mut w = c.writer(&r);
        // Its temporary file cannot be made: a directory holds the name.
        fs::create_dir(&w.tmp).unwrap();
        w.add("a", 1, &[1, 2, 3, 4], &h);
        w.keep(&r.get("b", 1, &[1, 2, 3, 4]).unwrap());
        assert!(w.commit().is_err(), "a record went unwritten");
        assert_eq!(fs::read(&c.path).unwrap(), before);
    }

    #[test]
    fn a_killed_servers_temporary_files_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        // A PID no process has (above the kernel's pid_max).
        let gone = 1 << 30;
        let me = std::process::id();
        let names = [
            format!("a.0123456789abcdef.tmp{gone}-3"),
            format!("a.0123456789abcdef.tmp{gone}"),
            format!("a.0123456789abcdef.tmp{me}-0"),
            "a.0123456789abcdef.hashes".to_string(),
            "tmp7.0123456789abcdef.hashes".to_string(),
        ];
        for n in &names {
            fs::write(dir.path().join(n), "x").unwrap();
        }
        fs::create_dir(dir.path().join(format!("b.tmp{gone}"))).unwrap();
        let sigs = dir.path().join("a.0123456789abcdef.sigs");
        fs::create_dir(&sigs).unwrap();
        let key = "0".repeat(32);
        fs::write(sigs.join(&key), "x").unwrap();
        fs::write(sigs.join(format!("{key}.tmp{gone}-0")), "x").unwrap();
        remove_stale_temps(dir.path());
        assert_eq!(fs::read_dir(&sigs).unwrap().count(), 1);
        assert!(sigs.join(&key).exists());
        fs::remove_dir_all(&sigs).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            names[2].clone(),
            names[3].clone(),
            names[4].clone(),
            format!("b.tmp{gone}"),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
