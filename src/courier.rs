//! The courier directory: layout, the record of carried files, partial
//! downloads, and safe paths inside it.
//!
//! Carried files sit at their relative names so a person can read them.
//! bitfog's own state lives in `COURIER/.bitfog/`:
//!
//! - `carried.jsonl`: one JSON line per file that was verified and renamed
//!   into place (name, size, mtime, sha256); the last line for a name wins
//!   and a torn last line is ignored;
//! - `partial/ID.part` and `partial/ID.json`: a download in progress and
//!   the entry (and ETag) it belongs to, ID being a hash of the name;
//! - `lock`: held (flock) by the one `fetch` or `store` using the courier.
//!
//! It never writes outside COURIER and never follows a symlink inside it.

use crate::digest::Hasher;
use crate::error::{Error, Result, describe_io};
use crate::manifest::{Entry, parent_dir, sync_dir};
use crate::paths::{COURIER_STATE, check_carried_name};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What the record says of one carried file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Carried {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) mtime: i64,
    pub(crate) sha256: Option<String>,
    /// Set by `store` when the courier copy failed its check, so the next
    /// `fetch` replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) damaged: bool,
}

impl Carried {
    pub(crate) fn of(e: &Entry) -> Carried {
        Carried {
            name: e.name.clone(),
            size: e.size,
            mtime: e.mtime,
            sha256: e.sha256.clone(),
            damaged: false,
        }
    }

    /// True when this is the listed version of the file.
    pub(crate) fn matches(&self, e: &Entry) -> bool {
        !self.damaged
            && self.name == e.name
            && self.size == e.size
            && match (&self.sha256, &e.sha256) {
                (Some(a), Some(b)) => a == b,
                (None, None) => self.mtime == e.mtime,
                _ => false,
            }
    }
}

/// What a partial download belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PartialMeta {
    pub(crate) entry: Carried,
    pub(crate) etag: Option<String>,
}

pub(crate) struct Courier {
    root: PathBuf,
    state: PathBuf,
    log: Mutex<Option<File>>,
    /// Directories made or checked by `prepare` in this run.
    made: Mutex<HashSet<PathBuf>>,
    /// Directories with renames not yet fsynced (see `sync`).
    dirty: Mutex<HashSet<PathBuf>>,
    _lock: File,
}

const LOG: &str = "carried.jsonl";

impl Drop for Courier {
    fn drop(&mut self) {
        self.sync();
    }
}

impl Courier {
    /// Opens (with `create`, creates) COURIER and takes its lock.
    pub(crate) fn open(root: &Path, create: bool) -> Result<Courier> {
        let what = format!("'{}'", root.display());
        match fs::symlink_metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() && fs::metadata(root).is_ok_and(|m| m.is_dir()) => {
            }
            Ok(_) => return Err(Error::usage(format!("{what}: not a directory"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir_all(root).map_err(|e| Error::io(&what, &e))?
            }
            Err(e) => return Err(Error::usage(format!("{what}: {}", describe_io(&e)))),
        }
        let state = root.join(COURIER_STATE);
        for dir in [state.clone(), state.join("partial")] {
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("'{}'", dir.display()), &e)),
            }
            if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                return Err(Error::usage(format!(
                    "'{}': not a directory",
                    dir.display()
                )));
            }
        }
        let lock_path = state.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("'{}'", lock_path.display()), &e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::failed(format!(
                "{what}: another bitfog is using this courier directory"
            )));
        }
        Ok(Courier {
            root: root.to_path_buf(),
            state,
            log: Mutex::new(None),
            made: Mutex::default(),
            dirty: Mutex::default(),
            _lock: lock,
        })
    }

    /// The record of carried files, last line per name winning.
    pub(crate) fn load_log(&self) -> LogIndex {
        LogIndex::open(&self.state.join(LOG))
    }

    /// A path in the courier's state directory.
    pub(crate) fn state_path(&self, name: &str) -> PathBuf {
        self.state.join(name)
    }

    /// Removes the receipt, so no stale one is taken for the truth.
    pub(crate) fn drop_receipt(&self) {
        let _ = fs::remove_file(self.state.join(crate::store::RECEIPT));
    }

    /// A new, empty spool for this run, in `.bitfog/NAME.tmp`.
    pub(crate) fn spool<T>(&self, name: &str) -> Result<Spool<T>> {
        let path = self.state.join(format!("{name}.tmp"));
        let what = format!("'{}'", path.display());
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&what, &e))?;
        let read = file.try_clone().map_err(|e| Error::io(&what, &e))?;
        Ok(Spool {
            path,
            out: io::BufWriter::with_capacity(1 << 16, file),
            read,
            offsets: vec![0],
            line: Vec::new(),
            kind: std::marker::PhantomData,
        })
    }

    /// Partial downloads present: (part path, sidecar path, what it is).
    pub(crate) fn partials(&self) -> Vec<(PathBuf, PathBuf, Option<PartialMeta>)> {
        read_partials(&self.root)
    }

    /// Bytes held in COURIER's files: everything but bitfog's own state,
    /// partial downloads included.
    pub(crate) fn usage(&self) -> u64 {
        usage(&self.root)
    }

    /// Keeps a copy of the destination snapshot this trip was planned
    /// from, for `store --delete`.
    /// On failure no snapshot is left, never a stale one.
    pub(crate) fn keep_snapshot(&self, db: &Path) -> io::Result<()> {
        let path = self.state.join(crate::store::SNAPSHOT);
        let tmp = self.state.join("destdb.jsonl.tmp");
        let copied = fs::copy(db, &tmp)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &path));
        if copied.is_err() {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&path);
        }
        copied
    }
    /// Starts a new record; `LogWriter::commit` puts it in place of the
    /// old one, atomically.
    pub(crate) fn new_log(&self) -> Result<LogWriter<'_>> {
        let tmp = self.state.join("carried.jsonl.tmp");
        let what = format!("'{}'", tmp.display());
        let out = io::BufWriter::new(File::create(&tmp).map_err(|e| Error::io(&what, &e))?);
        Ok(LogWriter {
            courier: self,
            tmp,
            what,
            out: Some(out),
        })
    }

    /// Appends one record (after the file is in place). Not synced here:
    /// `sync` does that once per run. A record lost to a power cut only
    /// costs a re-hash, as `fetch` adopts an unrecorded file whose hash
    /// matches; a record whose rename was lost finds no file and refetches.
    pub(crate) fn append_log(&self, rec: &Carried) -> io::Result<()> {
        let mut guard = self.log.lock().expect("log lock");
        if guard.is_none() {
            *guard = Some(
                File::options()
                    .create(true)
                    .append(true)
                    .open(self.state.join(LOG))?,
            );
        }
        let mut line = serde_json::to_vec(rec)?;
        line.push(b'\n');
        let f = guard.as_mut().expect("opened above");
        f.write_all(&line)
    }

    /// Notes a rename into `dir`, to be made durable by `sync`.
    pub(crate) fn renamed_in(&self, dir: &Path) {
        self.dirty
            .lock()
            .expect("dirty dirs")
            .insert(dir.to_path_buf());
    }

    /// Makes the record and every rename of this run durable.
    pub(crate) fn sync(&self) {
        if let Some(f) = self.log.lock().expect("log lock").as_ref() {
            let _ = f.sync_data();
        }
        for dir in self.dirty.lock().expect("dirty dirs").drain() {
            sync_dir(&dir);
        }
    }

    /// The final path of a carried name (the name must be checked).
    pub(crate) fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The partial file and its sidecar for a name.
    pub(crate) fn partial_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let mut h = Hasher::new();
        h.update(name.as_bytes());
        let id = &h.hex()[..32];
        let dir = self.state.join("partial");
        (
            dir.join(format!("{id}.part")),
            dir.join(format!("{id}.json")),
        )
    }

    /// Makes the directories above a carried name, refusing symlinks and
    /// non-directories on the way; returns the final path.
    pub(crate) fn prepare(&self, name: &str) -> io::Result<PathBuf> {
        let rel = check_carried_name(name).map_err(|why| io::Error::other(why.reason()))?;
        let mut dir = self.root.clone();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len() - 1] {
            dir.push(c);
            if self.made.lock().expect("made dirs").contains(&dir) {
                continue;
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            if !fs::symlink_metadata(&dir)?.is_dir() {
                return Err(io::Error::other(format!(
                    "'{}' is not a directory",
                    dir.display()
                )));
            }
            self.made.lock().expect("made dirs").insert(dir.clone());
        }
        Ok(self.root.join(rel))
    }

    /// Opens a carried file for reading, refusing symlinks anywhere below
    /// COURIER. `Ok(None)` when it is not there.
    pub(crate) fn open_carried(&self, name: &str) -> io::Result<Option<File>> {
        let rel = check_carried_name(name).map_err(|why| io::Error::other(why.reason()))?;
        let mut dir = self.root.clone();
        let comps: Vec<_> = rel.components().collect();
        for c in &comps[..comps.len() - 1] {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "'{}' is not a directory",
                        dir.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.root.join(rel))
        {
            Ok(f) if f.metadata()?.is_file() => Ok(Some(f)),
            Ok(_) => Err(io::Error::other("not a regular file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a carried file and the directories it leaves empty.
    pub(crate) fn remove_carried(&self, name: &str) {
        if check_carried_name(name).is_err() {
            return;
        }
        let path = self.root.join(name);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) && fs::remove_file(&path).is_ok()
        {
            let mut dir = parent_dir(&path).to_path_buf();
            while dir != self.root && dir.starts_with(&self.root) && fs::remove_dir(&dir).is_ok() {
                dir.pop();
            }
        }
    }
}

/// A new record of carried files, being written.
pub(crate) struct LogWriter<'a> {
    courier: &'a Courier,
    tmp: PathBuf,
    what: String,
    /// None once committed.
    out: Option<io::BufWriter<File>>,
}

impl LogWriter<'_> {
    pub(crate) fn add(&mut self, rec: &Carried) -> Result<()> {
        let out = self.out.as_mut().expect("not committed");
        serde_json::to_writer(&mut *out, rec).map_err(|e| Error::io(&self.what, &e.into()))?;
        out.write_all(b"\n").map_err(|e| Error::io(&self.what, &e))
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        let what = self.what.clone();
        let file = self
            .out
            .take()
            .expect("not committed")
            .into_inner()
            .map_err(|e| Error::io(&what, e.error()))?;
        file.sync_all().map_err(|e| Error::io(&what, &e))?;
        let state = &self.courier.state;
        fs::rename(&self.tmp, state.join(LOG)).map_err(|e| Error::io(&what, &e))?;
        sync_dir(state);
        *self.courier.log.lock().expect("log lock") = None;
        Ok(())
    }
}

impl Drop for LogWriter<'_> {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The record of carried files, last line per name winning, indexed by
/// a 64-bit hash of each name and read back from the file on lookup: a
/// million records cost about 32 MB instead of 450. Two names sharing a
/// hash only lose the older record, which is safe: `fetch` then adopts
/// the file after checking its hash, or leaves it unpruned.
pub(crate) struct LogIndex(LineIndex);

/// A JSON-lines file indexed by a 64-bit key of each line's record, with
/// the line's offset: about 32 bytes a line in memory, the record read
/// back from the file on lookup. A later line with the same key replaces
/// an earlier one; a torn last line (no newline) and lines that do not
/// parse are left out.
pub(crate) struct LineIndex {
    file: Option<File>,
    at: HashMap<u64, (u64, u32)>,
}

impl LineIndex {
    pub(crate) fn build<T: serde::de::DeserializeOwned>(
        path: &Path,
        key: impl Fn(&T) -> Option<u64>,
    ) -> LineIndex {
        let mut at = HashMap::new();
        let file = File::open(path).ok();
        if let Some(f) = &file {
            let mut r = BufReader::new(f);
            let mut line = Vec::new();
            let mut offset = 0u64;
            loop {
                line.clear();
                let n = match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if line.ends_with(b"\n") {
                    if let Some(k) = serde_json::from_slice::<T>(&line)
                        .ok()
                        .as_ref()
                        .and_then(&key)
                    {
                        at.insert(k, (offset, n as u32));
                    }
                }
                offset += n as u64;
            }
        }
        LineIndex { file, at }
    }

    fn read<T: serde::de::DeserializeOwned>(&self, &(offset, len): &(u64, u32)) -> Option<T> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len as usize];
        self.file.as_ref()?.read_exact_at(&mut buf, offset).ok()?;
        serde_json::from_slice(&buf).ok()
    }

    /// The record indexed under `key`, if any.
    pub(crate) fn get<T: serde::de::DeserializeOwned>(&self, key: u64) -> Option<T> {
        self.read(self.at.get(&key)?)
    }

    pub(crate) fn remove(&mut self, key: u64) {
        self.at.remove(&key);
    }

    /// Every record still indexed.
    pub(crate) fn values<T: serde::de::DeserializeOwned>(&self) -> impl Iterator<Item = T> + '_ {
        self.at.values().filter_map(|at| self.read(at))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.at.len()
    }
}

impl LogIndex {
    fn open(path: &Path) -> LogIndex {
        LogIndex(LineIndex::build(path, |c: &Carried| {
            Some(name_key(&c.name))
        }))
    }

    /// The record for `name`, if any.
    pub(crate) fn get(&self, name: &str) -> Option<Carried> {
        let rec: Carried = self.0.get(name_key(name))?;
        (rec.name == name).then_some(rec)
    }

    /// Drops `name` from the index (it is accounted for).
    pub(crate) fn forget(&mut self, name: &str) {
        if self.get(name).is_some() {
            self.0.remove(name_key(name));
        }
    }

    /// The records not forgotten.
    pub(crate) fn remaining(&self) -> impl Iterator<Item = Carried> + '_ {
        self.0.values()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

fn name_key(name: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(name)
}

/// Instructions `fetch` leaves in `.bitfog/` instead of a file's bytes,
/// one JSON line each in name order: make `name` at the destination from
/// its file `from`, which has the same size and SHA-256.
pub(crate) const COPIES: &str = "copies.jsonl";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct CopyInstr {
    pub(crate) name: String,
    pub(crate) from: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
}

/// How many instructions the courier holds.
pub(crate) fn count_copies(root: &Path) -> u64 {
    File::open(root.join(COURIER_STATE).join(COPIES))
        .map(|f| BufReader::new(f).lines().count() as u64)
        .unwrap_or(0)
}

/// Reads `COPIES` as a stream, looked up in name order.
pub(crate) struct Copies {
    lines: Option<std::io::Lines<BufReader<File>>>,
    next: Option<CopyInstr>,
}

impl Copies {
    pub(crate) fn open(courier_root: &Path) -> Copies {
        let lines = File::open(courier_root.join(COURIER_STATE).join(COPIES))
            .ok()
            .map(|f| BufReader::new(f).lines());
        Copies { lines, next: None }
    }

    /// Where the destination can make `e` from, if `fetch` left an
    /// instruction for this version of it. Asked in contract order.
    pub(crate) fn find(&mut self, e: &Entry) -> Option<String> {
        loop {
            if self.next.is_none() {
                let line = self.lines.as_mut()?.next()?.ok()?;
                self.next = Some(serde_json::from_str(&line).ok()?);
            }
            let rec = self.next.as_ref()?;
            match crate::paths::name_cmp(&rec.name, &e.name) {
                std::cmp::Ordering::Less => self.next = None,
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Equal => {
                    let rec = self.next.take()?;
                    return (rec.size == e.size && e.sha256.as_ref() == Some(&rec.sha256))
                        .then_some(rec.from);
                }
            }
        }
    }
}

/// Records (entries by default) written to a scratch file under
/// `.bitfog/` and read back by index, so planning over a million entries
/// holds 8 bytes for each instead of the entry. The file is removed when
/// the spool is dropped.
pub(crate) struct Spool<T = Entry> {
    path: PathBuf,
    out: io::BufWriter<File>,
    read: File,
    /// Where each entry starts; the last value is where the file ends.
    offsets: Vec<u64>,
    line: Vec<u8>,
    kind: std::marker::PhantomData<T>,
}

impl<T: Serialize + serde::de::DeserializeOwned> Spool<T> {
    pub(crate) fn push(&mut self, e: &T) -> io::Result<usize> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, e)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        let end = self.offsets.last().copied().unwrap_or(0) + self.line.len() as u64;
        self.offsets.push(end);
        Ok(self.offsets.len() - 2)
    }

    pub(crate) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Ends the writing; `get` works after this.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub(crate) fn get(&self, i: usize) -> io::Result<T> {
        use std::os::unix::fs::FileExt;
        let (start, end) = (self.offsets[i], self.offsets[i + 1]);
        let mut buf = vec![0u8; (end - start) as usize];
        self.read.read_exact_at(&mut buf, start)?;
        Ok(serde_json::from_slice(&buf)?)
    }
}

impl<T> Drop for Spool<T> {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The record of carried files in COURIER, last line per name winning.
/// Reads only.
pub(crate) fn read_log(root: &Path) -> HashMap<String, Carried> {
    let mut map = HashMap::new();
    if let Ok(f) = File::open(root.join(COURIER_STATE).join(LOG)) {
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            if let Ok(rec) = serde_json::from_str::<Carried>(&line) {
                map.insert(rec.name.clone(), rec);
            }
        }
    }
    map
}

/// Bytes available to unprivileged writers on the filesystem holding
/// `dir`; `None` if it cannot tell.
pub(crate) fn free_space(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid out-buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-buffer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Partial downloads in COURIER: (part path, sidecar path, what it is).
pub(crate) fn read_partials(root: &Path) -> Vec<(PathBuf, PathBuf, Option<PartialMeta>)> {
    let dir = root.join(COURIER_STATE).join("partial");
    let mut out = Vec::new();
    for dent in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let p = dent.path();
        if p.extension().is_some_and(|x| x == "json") {
            let meta = fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            out.push((p.with_extension("part"), p, meta));
        } else if p.extension().is_some_and(|x| x == "part") && !p.with_extension("json").exists() {
            out.push((p.clone(), p.with_extension("json"), None));
        }
    }
    out
}

/// Bytes of the regular files in `dir` (not below it) whose paths pass
/// `count`.
pub(crate) fn dir_bytes(dir: &Path, count: impl Fn(&Path) -> bool) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|d| count(&d.path()))
        .filter_map(|d| d.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Bytes held in COURIER's files: everything but bitfog's own state,
/// partial downloads included.
pub(crate) fn usage(root: &Path) -> u64 {
    let state = root.join(COURIER_STATE);
    let mut total = 0;
    for dent in crate::scan::walker(root).into_iter().flatten() {
        if dent.depth() == 1 && dent.file_name() == COURIER_STATE {
            continue;
        }
        if dent.file_type().is_file() && !dent.path().starts_with(&state) {
            // A sparse file counts what it takes on disk.
            total += fs::symlink_metadata(dent.path())
                .map(|m| {
                    m.len()
                        .min(std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                })
                .unwrap_or(0);
        }
    }
    for (part, _, _) in read_partials(root) {
        total += fs::symlink_metadata(part).map(|m| m.len()).unwrap_or(0);
    }
    total + crate::ranges::usage(root) + crate::deltas::usage(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_survives_a_torn_line_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let c = Courier::open(dir.path(), true).unwrap();
        let a = Carried {
            name: "a".into(),
            size: 1,
            mtime: 2,
            sha256: None,
            damaged: false,
        };
        let mut b = a.clone();
        b.name = "b/c".into();
        c.append_log(&a).unwrap();
        c.append_log(&b).unwrap();
        let mut f = File::options()
            .append(true)
            .open(dir.path().join(".bitfog/carried.jsonl"))
            .unwrap();
        f.write_all(b"{\"name\":\"x\",\"si").unwrap();
        let log = c.load_log();
        assert_eq!(log.len(), 2);
        assert_eq!(log.get("b/c").map(|r| r.name).as_deref(), Some("b/c"));
        assert!(log.get("x").is_none(), "a torn line is not a record");
        let mut w = c.new_log().unwrap();
        w.add(&a).unwrap();
        w.commit().unwrap();
        let mut log = c.load_log();
        assert_eq!(log.len(), 1);
        log.forget("a");
        assert_eq!(log.remaining().count(), 0);
        assert!(
            Courier::open(dir.path(), false).is_err(),
            "the lock is exclusive"
        );
    }

    #[test]
    fn refuses_symlinked_directories() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let c = Courier::open(dir.path(), true).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        assert!(c.prepare("link/x").is_err());
        assert!(c.prepare("../x").is_err());
        assert!(c.prepare(".bitfog/x").is_err());
        assert_eq!(c.prepare("d/e/f").unwrap(), dir.path().join("d/e/f"));
        fs::write(outside.path().join("x"), "secret").unwrap();
        assert!(c.open_carried("link/x").is_err());
        std::os::unix::fs::symlink(outside.path().join("x"), dir.path().join("y")).unwrap();
        assert!(c.open_carried("y").is_err());
        assert!(c.open_carried("nope").unwrap().is_none());
    }
}
