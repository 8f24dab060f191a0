//! The courier directory: layout, the record of carried files, partial
//! downloads, and safe paths inside it.
//!
//! Carried files sit at their relative names so a person can read them.
//! bitfog's own state lives in `COURIER/.bitfog/`:
//!
//! - `carried.jsonl`: one JSON line per file that was verified and renamed
//!   into place (name, size, mtime, sha256); the last line for a name wins
//!   and a torn last line is ignored;
//! - `partial/X/ID.part` and `partial/X/ID.json`: a download in progress
//!   and the entry (and ETag) it belongs to, ID being a hash of the name
//!   and X its first character (16 directories, so that parallel
//!   downloads do not all wait on one directory's lock; a courier of an
//!   older bitfog, with them in `partial/` itself, is moved over at open);
//! - `lock`: held (flock) by the one `fetch` or `store` using the courier.
//!
//! It never writes outside COURIER and never follows a symlink inside it.

pub(crate) mod copies;
pub(crate) mod deltas;
pub(crate) mod probe;
pub(crate) mod ranges;
pub(crate) mod seal;

use crate::beneath::{Dir, Kind, Root};
use crate::digest::{BUF_SIZE, CopyError, Hasher, Writeback, copy_hashing_apart};
use crate::error::{Error, Result, describe_io};
use crate::wire::manifest::Entry;
use crate::wire::paths::{COURIER_STATE, check_carried_name};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    /// Where the file is when not at its name: a file of
    /// `.bitfog/names/` (a name the courier cannot hold, one that clashes
    /// with another in case, or a sparse file kept as its data extents,
    /// `.extents`). Set by `Courier` from where it put the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) at: Option<String>,
}

impl Carried {
    pub(crate) fn of(e: &Entry) -> Carried {
        Carried {
            name: e.name.clone(),
            size: e.size,
            mtime: e.mtime,
            sha256: e.sha256.clone(),
            damaged: false,
            at: None,
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

/// The courier directory, opened once: its root and its state
/// directories are held as descriptors, and every file operation inside
/// it is relative to one of them and never follows a symlink (see
/// `beneath`). A courier is a disk from a stranger: a symlink, FIFO or
/// device planted anywhere in it is refused or replaced, never followed,
/// opened for writing, or waited on.
pub(crate) struct Courier {
    /// None only for a read-only look at a courier that does not exist.
    root: Option<Root>,
    /// `.bitfog/` and `.bitfog/partial/`: None only read-only, when absent.
    state: Option<Dir>,
    partial: Option<Dir>,
    /// `.bitfog/partial/0` to `f`, where downloads go (empty only
    /// read-only, when absent: then `partial` itself is looked at).
    shards: Vec<Dir>,
    log: Mutex<Option<File>>,
    /// Directories above carried names, opened by `parent` in this run
    /// (a bounded cache, by relative name).
    made: Mutex<HashMap<String, Arc<Dir>>>,
    /// Directories above carried names found absent in this run (a
    /// bounded cache, by relative name), and how many times `parent` has
    /// made directories: a lookup that began before one was made is not
    /// remembered as absent.
    absent: Mutex<(u64, HashSet<String>)>,
    /// Directories with renames not yet fsynced (see `sync`).
    dirty: Mutex<HashMap<String, Arc<Dir>>>,
    /// What the courier's filesystem holds (`probe`; a POSIX one until
    /// probed, but case folding is always found).
    traits: probe::Traits,
    /// Names kept in `.bitfog/names/`, and where.
    held: Mutex<HashMap<String, String>>,
    /// On a case-insensitive courier, who owns each folded path.
    fold: Mutex<Option<FoldMap>>,
    /// The keys of a sealed courier (see `seal`).
    seal: Option<seal::Seal>,
    /// For a dry run of `fetch --encrypt-to` on a courier not sealed yet:
    /// the age header its files will have, so the budget counts them.
    planned_header: Option<u64>,
    _lock: Option<File>,
}

/// The files of names the courier cannot hold as they are.
const NAMES: &str = "names";
/// The key `dirty` keeps `.bitfog/names/` under (no carried directory
/// has a NUL in its name).
const NAMES_KEY: &str = "\0names";
/// A sparse file kept as its framed data extents ends so.
pub(crate) const PACK_SUFFIX: &str = ".extents";

/// On a case-insensitive courier, the exact path that owns each path as
/// the filesystem folds it (files and the directories above them), as
/// 64-bit hashes: a name whose folded path another owns is kept in
/// `.bitfog/names/` instead of clobbering it.
#[derive(Default)]
struct FoldMap(HashMap<u64, u64>);

pub(crate) fn fold_key(path: &str) -> u64 {
    name_key(&path.to_lowercase())
}

/// The path and each directory above it.
pub(crate) fn prefixes(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('/')
        .map(move |(i, _)| &name[..i])
        .chain(std::iter::once(name))
}

impl FoldMap {
    /// Claims `name` and its directories; false (nothing claimed) when
    /// another path owns one of them.
    fn claim(&mut self, name: &str) -> bool {
        let clash =
            prefixes(name).any(|p| self.0.get(&fold_key(p)).is_some_and(|&o| o != name_key(p)));
        if !clash {
            for p in prefixes(name) {
                self.0.insert(fold_key(p), name_key(p));
            }
        }
        !clash
    }

    /// True unless another path owns `name`'s folded path.
    fn owns(&self, name: &str) -> bool {
        self.0
            .get(&fold_key(name))
            .is_none_or(|&o| o == name_key(name))
    }

    fn release(&mut self, name: &str) {
        if self.0.get(&fold_key(name)) == Some(&name_key(name)) {
            self.0.remove(&fold_key(name));
        }
    }
}

/// The file of `.bitfog/names/` a name is kept in: a hash of the name
/// and, for the person looking, its last component in safe characters,
/// in one of 256 directories by the hash's first two digits (a FAT32
/// directory holds at most 65,536 entries, a long name taking several,
/// and FUSE drivers scan a directory for every lookup).
pub(crate) fn held_name(name: &str, pack: bool) -> String {
    let mut h = Hasher::new();
    h.update(name.as_bytes());
    let last = name.rsplit('/').next().unwrap_or(name);
    let mut hint: String = last
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .take(60)
        .collect();
    while hint.ends_with('.') {
        hint.pop();
        hint.push('_');
    }
    let suffix = if pack { PACK_SUFFIX } else { "" };
    let hex = h.hex();
    format!("{}/{}-{hint}{suffix}", &hex[..2], &hex[..32])
}

/// True when a record's `at` is a name bitfog could have written: a
/// directory of two lower-case hex digits and one component of safe
/// characters in it.
fn sound_at(at: &str) -> bool {
    let Some((bucket, file)) = at.split_once('/') else {
        return false;
    };
    bucket.len() == 2
        && bucket
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && !file.is_empty()
        && file.len() <= 128
        && !file.starts_with('.')
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

const LOG: &str = "carried.jsonl";
/// The destination snapshot `fetch` keeps in `.bitfog/`, for `store
/// --delete`.
pub(crate) const SNAPSHOT: &str = "destdb.jsonl";
/// The destination's manifest as `store` left it, in `.bitfog/`: `fetch`
/// and `plan` take the courier directory in place of DESTDB and read this.
pub(crate) const RECEIPT: &str = "receipt.jsonl";
/// The source listing `fetch` last planned from, in `.bitfog/`: `store`
/// takes the courier directory in place of SRCDB and reads this.
pub(crate) const SOURCE: &str = "source.jsonl";
/// Directories above carried names kept open at once.
const OPEN_DIRS: usize = 256;

/// How many absent directories `parent` remembers.
const ABSENT_DIRS: usize = 65_536;
/// The longest record file bitfog reads back from the courier (a
/// partial download's sidecar, a range record).
const MAX_RECORD: u64 = 1 << 16;

impl Drop for Courier {
    fn drop(&mut self) {
        self.sync();
    }
}

/// Says what a path is when it should have been a directory.
fn not_a_dir(path: &Path, err: &io::Error) -> Error {
    let why = match err.raw_os_error() {
        Some(libc::ELOOP) => "a symlink, not a directory (never followed in a courier)".into(),
        Some(libc::ENOTDIR) => "not a directory".into(),
        _ => describe_io(err),
    };
    Error::usage(format!("'{}': {why}", path.display()))
}

/// True when the filesystem COURIER is on is mounted read-only (a disk
/// unplugged without being ejected, which ntfs-3g then mounts read-only;
/// write-protected media): `store` can still read it.
pub(crate) fn read_only_fs(root: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statvfs is a valid out-buffer.
    let mut st: crate::sys::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-buffer.
    if unsafe { crate::sys::statvfs(path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_flag & libc::ST_RDONLY != 0
}

/// What filesystems and desktops put on a fresh disk: a directory holding
/// only these may become a courier.
fn furniture(name: &[u8]) -> bool {
    matches!(
        name,
        b"lost+found"
            | b"System Volume Information"
            | b"$RECYCLE.BIN"
            | b".Trashes"
            | b".DS_Store"
            | b".Spotlight-V100"
            | b".fseventsd"
            | b".TemporaryItems"
    ) || name.starts_with(b".Trash-")
}

/// Refuses to make a courier of a directory that holds anything else than
/// `furniture`: `fetch` replaces what it finds at the names it carries and
/// removes what the destination no longer needs, so a mistyped COURIER (a
/// home directory, an area) would lose files. A courier (`.bitfog/`
/// there), an empty directory and one not there yet pass.
pub(crate) fn check_new(root: &Path) -> Result<()> {
    if fs::symlink_metadata(root.join(COURIER_STATE)).is_ok() {
        return Ok(());
    }
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !furniture(name.as_bytes()) {
            return Err(Error::usage(format!(
                "'{}' holds files and is not a courier (no .bitfog/; found '{}'): give an empty directory, such as '{}'",
                root.display(),
                name.to_string_lossy(),
                root.join("bitfog").display()
            )));
        }
    }
    Ok(())
}

impl Courier {
    /// Opens (with `create`, creates) COURIER for a run that changes it,
    /// and takes its lock. COURIER itself is the path the user gave (it
    /// may be a symlink); nothing below it is followed.
    pub(crate) fn open(root: &Path, create: bool) -> Result<Courier> {
        let what = format!("'{}'", root.display());
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::usage(format!("{what}: not a directory"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir_all(root).map_err(|e| Error::io(&what, &e))?
            }
            Err(e) => return Err(Error::usage(format!("{what}: {}", describe_io(&e)))),
        }
        let top =
            Root::open(root).map_err(|e| Error::usage(format!("{what}: {}", describe_io(&e))))?;
        let dir = top.dir(&[], false).map_err(|e| Error::io(&what, &e))?;
        if create {
            check_new(root)?;
        } else if matches!(dir.stat(COURIER_STATE.as_bytes()), Ok(None)) {
            return Err(Error::usage(format!(
                "{what} is not a courier: fetch has not filled it (no .bitfog/)"
            )));
        }
        let state = dir
            .open_dir(COURIER_STATE.as_bytes(), true)
            .map_err(|e| not_a_dir(&root.join(COURIER_STATE), &e))?;
        let partial =
            own_dir(&state, "partial").map_err(|e| not_a_dir(&state.path.join("partial"), &e))?;
        let lock = state.open_append(b"lock").map_err(|e| {
            Error::usage(format!(
                "'{}': {}",
                state.path.join("lock").display(),
                describe_io(&e)
            ))
        })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::failed(format!(
                "{what}: another bitfog is using this courier directory"
            )));
        }
        let traits = probe::Traits {
            case_insensitive: probe::folds_case(&state).unwrap_or_else(|_| shows_folding(&dir)),
            ..probe::Traits::default()
        };
        let shards =
            open_shards(&partial).map_err(|e| not_a_dir(&state.path.join("partial"), &e))?;
        let mut c = Courier {
            root: Some(top),
            state: Some(state),
            partial: Some(partial),
            shards,
            log: Mutex::new(None),
            made: Mutex::default(),
            absent: Mutex::default(),
            dirty: Mutex::default(),
            traits,
            held: Mutex::default(),
            fold: Mutex::default(),
            seal: None,
            planned_header: None,
            _lock: Some(lock),
        };
        c.unseal()?;
        c.load_names();
        Ok(c)
    }

    /// Opens COURIER to look at it only (dry runs): no lock, nothing made;
    /// a courier that is not there reads as empty.
    pub(crate) fn open_read(root: &Path) -> Result<Courier> {
        let what = format!("'{}'", root.display());
        let top = match Root::open(root) {
            Ok(r) => Some(r),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::usage(format!("{what}: {}", describe_io(&e)))),
        };
        let sub = |d: Option<&Dir>, name: &str| -> Result<Option<Dir>> {
            let Some(d) = d else { return Ok(None) };
            match d.open_dir(name.as_bytes(), false) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(not_a_dir(&d.path.join(name), &e)),
            }
        };
        let dir = match &top {
            Some(t) => Some(t.dir(&[], false).map_err(|e| Error::io(&what, &e))?),
            None => None,
        };
        let state = sub(dir.as_ref(), COURIER_STATE)?;
        let partial = sub(state.as_ref(), "partial")?;
        let mut shards = Vec::new();
        for x in SHARDS {
            match sub(partial.as_ref(), x)? {
                Some(d) => shards.push(d),
                None => break,
            }
        }
        if shards.len() != SHARDS.len() {
            shards.clear();
        }
        let traits = probe::Traits {
            case_insensitive: state.is_some() && dir.as_ref().is_some_and(shows_folding),
            ..probe::Traits::default()
        };
        let mut c = Courier {
            root: top,
            state,
            partial,
            shards,
            log: Mutex::new(None),
            made: Mutex::default(),
            absent: Mutex::default(),
            dirty: Mutex::default(),
            traits,
            held: Mutex::default(),
            fold: Mutex::default(),
            seal: None,
            planned_header: None,
            _lock: None,
        };
        c.unseal()?;
        c.load_names();
        Ok(c)
    }

    /// Finds what the courier's filesystem holds (see `probe`), once, by
    /// trying it; the person is told when it matters.
    pub(crate) fn probe(&mut self) -> Result<()> {
        let state = self.state_dir()?;
        let mut t = probe::probe(state).map_err(|e| {
            Error::io(
                format!(
                    "'{}' (finding what the courier holds)",
                    state.path.display()
                ),
                &e,
            )
        })?;
        let known = self.traits.case_insensitive;
        t.case_insensitive |= known;
        self.traits = t;
        // Folding found only now: who owns each folded path.
        if self.traits.case_insensitive && !known {
            self.load_names();
        }
        Ok(())
    }

    /// What the courier's filesystem holds.
    pub(crate) fn traits(&self) -> &probe::Traits {
        &self.traits
    }

    /// A sealed courier is unsealed as it is opened, with `--identity`
    /// (and for `fetch`, the keeper key kept at the source): a missing or
    /// wrong identity is a usage error before anything is read or written.
    fn unseal(&mut self) -> Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let id = seal::marker(state).map_err(|e| {
            Error::usage(format!(
                "'{}': {}; it cannot be read",
                state.path.display(),
                describe_io(&e)
            ))
        })?;
        if let Some(id) = id {
            self.seal = Some(seal::Seal::open(state, &id, seal::keeper_allowed())?);
        }
        Ok(())
    }

    /// The keys of a sealed courier; `None` for a plain one.
    pub(crate) fn sealed(&self) -> Option<&seal::Seal> {
        self.seal.as_ref()
    }

    /// Seals a courier that holds no trip yet for `recipients` (`fetch
    /// --encrypt-to`); says where a keeper key was kept, if one was made.
    pub(crate) fn seal_for(
        &mut self,
        recipients: &[crate::age::Recipient],
    ) -> Result<Option<std::path::PathBuf>> {
        let state = self
            .state_rw()
            .map_err(|e| Error::io("the courier's state directory", &e))?;
        let (seal, kept) = seal::Seal::create(state, recipients)?;
        self.seal = Some(seal);
        Ok(kept)
    }

    /// Who the courier's state files are encrypted to (`None`: plain).
    pub(crate) fn state_recipients(&self) -> Option<&[crate::age::Recipient]> {
        self.seal.as_ref().map(|s| s.readers.as_slice())
    }

    /// What a file of the courier says, as plain bytes, and how many: a
    /// carried file, range or delta of a sealed courier is decrypted as it
    /// is read (authenticated chunk by chunk: a changed, cut or foreign
    /// one is an `InvalidData` error, at open or on the way).
    pub(crate) fn plain(&self, file: File) -> io::Result<(Plain, u64)> {
        let total = file.metadata()?.len();
        let Some(s) = &self.seal else {
            return Ok((Plain::File(file), total));
        };
        let r = s.reader(file).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => io::Error::new(
                io::ErrorKind::InvalidData,
                "not encrypted for this courier (swapped in from elsewhere?)",
            ),
            _ => e,
        })?;
        let len = r.plain_len(total).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "cut short or extended (its size is not one its contents can have)",
            )
        })?;
        // A large file is decrypted ahead, overlapped with sending it.
        if len >= 8 << 20 {
            return Ok((Plain::Ahead(ReadAhead::start(r)), len));
        }
        Ok((Plain::Sealed(r), len))
    }

    /// Where the bytes of a new courier file go: `w`, through the
    /// recipients' encryption on a sealed courier.
    pub(crate) fn sink<W: Write>(&self, w: W) -> io::Result<Sink<W>> {
        Ok(match &self.seal {
            None => Sink::Plain(w),
            Some(s) => Sink::Sealed(s.object_writer(w)?),
        })
    }

    /// Copies `limit` bytes of `from` into the new courier file `file`
    /// from `offset` while hashing them (`copy_hashing_apart`), through
    /// the recipients' encryption on a sealed courier. The file is ended
    /// (an encrypted one's last chunk sealed) only when all `limit` bytes
    /// came; the second value is how ending it went.
    pub(crate) fn copy_in(
        &self,
        from: &mut dyn io::Read,
        (file, offset): (&File, u64),
        hasher: &mut Hasher,
        limit: u64,
        progress: impl FnMut(u64),
    ) -> (std::result::Result<u64, CopyError>, io::Result<()>) {
        let out = io::BufWriter::with_capacity(BUF_SIZE, Writeback::new(file, offset));
        let mut out = match self.sink(out) {
            Ok(out) => out,
            Err(e) => return (Err(CopyError::Write(e)), Ok(())),
        };
        let copied = copy_hashing_apart(from, &mut out, hasher, limit, progress);
        let ended = match copied {
            Ok(n) if n == limit => out.finish().map(drop),
            _ => Ok(()),
        };
        (copied, ended)
    }

    /// A small record of `.bitfog/` (a range record) as it is written:
    /// encrypted for the readers on a sealed courier.
    pub(crate) fn seal_record(&self, json: &[u8]) -> io::Result<Vec<u8>> {
        let Some(s) = &self.seal else {
            return Ok(json.to_vec());
        };
        let mut w = s.state_writer(Vec::new())?;
        w.write_all(json)?;
        w.finish()
    }

    /// A small JSON record of a state directory (see `read_record`),
    /// decrypted on a sealed courier.
    pub(crate) fn read_record<T: serde::de::DeserializeOwned>(
        &self,
        dir: &Dir,
        name: &str,
    ) -> Option<T> {
        let Some(s) = &self.seal else {
            return read_record(dir, name);
        };
        use std::io::Read;
        let f = dir.open_file(name.as_bytes()).ok()??;
        let mut buf = Vec::new();
        s.reader(f.take(MAX_RECORD + 1))
            .ok()?
            .read_to_end(&mut buf)
            .ok()?;
        serde_json::from_slice(&buf).ok()
    }

    /// Plans as if the courier were sealed for `recipients` (a dry run
    /// of the `fetch --encrypt-to` that will seal it).
    pub(crate) fn plan_sealed(&mut self, recipients: &[crate::age::Recipient]) {
        if self.seal.is_none() {
            self.planned_header = Some(crate::age::header_len(recipients));
        }
    }

    /// Bytes a file of `size` bytes takes in the courier.
    pub(crate) fn cost(&self, size: u64) -> u64 {
        match (&self.seal, self.planned_header) {
            (Some(s), _) => s.object_len(size),
            (None, Some(h)) => crate::age::sealed_len(h, size),
            (None, None) => size,
        }
    }

    /// The most bytes of a file that take at most `room` in the courier.
    pub(crate) fn room_for(&self, room: u64) -> u64 {
        if room >= u64::MAX / 2 {
            return room;
        }
        // The overhead grows with the size: that of `room` is enough.
        room.saturating_sub(self.cost(room) - room)
    }

    /// Reads from the record which names are kept in `.bitfog/names/`
    /// and, on a case-insensitive courier, who owns each folded path.
    fn load_names(&self) {
        let mut held = HashMap::new();
        let mut fold = self.traits.case_insensitive.then(FoldMap::default);
        if let Some(f) = self.state_file(LOG) {
            let mut r = BufReader::new(f);
            let mut line = Vec::new();
            let wanted = |l: &[u8]| l.windows(5).any(|w| w == b"\"at\":");
            loop {
                line.clear();
                match crate::wire::manifest::read_line_capped(
                    &mut r,
                    &mut line,
                    crate::wire::manifest::MAX_LINE,
                ) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // Most records are at their names: only those that are not,
                // or that may end one that was, need parsing.
                if fold.is_none() && held.is_empty() && !wanted(&line) {
                    continue;
                }
                let Ok(rec) = serde_json::from_slice::<Carried>(&line) else {
                    continue;
                };
                match rec.at.filter(|a| sound_at(a)) {
                    Some(at) => {
                        held.insert(rec.name, at);
                    }
                    None => {
                        held.remove(&rec.name);
                        if let (Some(f), false) = (fold.as_mut(), rec.damaged) {
                            f.claim(&rec.name);
                        }
                    }
                }
            }
        }
        *self.held.lock().expect("held names") = held;
        *self.fold.lock().expect("fold map") = fold;
    }

    /// Where `name` is kept in `.bitfog/names/`, when it is.
    pub(crate) fn held_at(&self, name: &str) -> Option<String> {
        self.held.lock().expect("held names").get(name).cloned()
    }

    /// True when the courier keeps `name` as its framed data extents.
    pub(crate) fn is_pack(&self, name: &str) -> bool {
        self.held_at(name).is_some_and(|a| a.ends_with(PACK_SUFFIX))
    }

    /// `.bitfog/names/`, made when `create`.
    fn names_dir(&self, create: bool) -> io::Result<Option<Arc<Dir>>> {
        if let Some(d) = self.made.lock().expect("made dirs").get(NAMES_KEY) {
            return Ok(Some(d.clone()));
        }
        let Some(d) = self.sub(NAMES, create)? else {
            return Ok(None);
        };
        let d = Arc::new(d);
        self.made
            .lock()
            .expect("made dirs")
            .insert(NAMES_KEY.to_string(), d.clone());
        Ok(Some(d))
    }

    /// The directory of `.bitfog/names/` a held file is in (made when
    /// `create`), the key `dirty` keeps it under, and the file's name.
    fn held_parent(
        &self,
        at: &str,
        create: bool,
    ) -> io::Result<(Option<Arc<Dir>>, String, String)> {
        let (bucket, file) = at.split_once('/').unwrap_or(("", at));
        let key = format!("{NAMES_KEY}/{bucket}");
        if let Some(d) = self.made.lock().expect("made dirs").get(&key) {
            return Ok((Some(d.clone()), key, file.to_string()));
        }
        let Some(names) = self.names_dir(create)? else {
            return Ok((None, key, file.to_string()));
        };
        let dir = match (bucket, create) {
            ("", _) => names,
            (b, true) => Arc::new(own_dir(&names, b)?),
            (b, false) => match names.open_dir(b.as_bytes(), false) {
                Ok(d) => Arc::new(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok((None, key, file.to_string()));
                }
                Err(e) => return Err(e),
            },
        };
        let mut made = self.made.lock().expect("made dirs");
        if made.len() >= OPEN_DIRS {
            made.clear();
        }
        made.insert(key.clone(), dir.clone());
        Ok((Some(dir), key, file.to_string()))
    }

    /// Removes what `.bitfog/names/` holds that no record names (a run
    /// killed between placing a file and recording it, a file pruned),
    /// and the directories that leaves empty.
    pub(crate) fn clean_names(&self) {
        let Ok(Some(dir)) = self.sub(NAMES, false) else {
            return;
        };
        let held: HashSet<String> = self
            .held
            .lock()
            .expect("held names")
            .values()
            .cloned()
            .collect();
        for (bucket, kind) in dir.names().unwrap_or_default() {
            let b = String::from_utf8_lossy(&bucket).into_owned();
            let sub = match kind {
                Some(Kind::Dir) => dir.open_dir(&bucket, false).ok(),
                _ => None,
            };
            let Some(sub) = sub else {
                let _ = dir.unlink(&bucket);
                continue;
            };
            for (name, _) in sub.names().unwrap_or_default() {
                let at = format!("{b}/{}", String::from_utf8_lossy(&name));
                if !held.contains(&at) {
                    let _ = sub.unlink(&name);
                }
            }
            let _ = dir.remove_dir(&bucket);
        }
        self.made.lock().expect("made dirs").clear();
    }

    fn state_rw(&self) -> io::Result<&Dir> {
        self.state
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// `.bitfog/` of a courier opened to change it.
    /// Makes every file written to the courier's disk durable at once.
    pub(crate) fn sync_fs(&self) -> io::Result<()> {
        self.state_rw()?.sync_fs()
    }

    pub(crate) fn state_dir(&self) -> Result<&Dir> {
        self.state_rw()
            .map_err(|e| Error::io("the courier's state directory", &e))
    }

    /// A directory of `.bitfog/` (`ranges`, `deltas`): `Ok(None)` when it
    /// is not there and `create` is false; a symlink or a non-directory in
    /// its place is an error.
    pub(crate) fn sub(&self, name: &str, create: bool) -> io::Result<Option<Dir>> {
        let Some(state) = &self.state else {
            return Ok(None);
        };
        if create {
            return own_dir(state, name).map(Some);
        }
        match state.open_dir(name.as_bytes(), false) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The record of carried files, last line per name winning.
    pub(crate) fn load_log(&self) -> LogIndex {
        LogIndex(LineIndex::from_file(self.state_file(LOG), |c: &Carried| {
            Some(name_key(&c.name))
        }))
    }

    /// A regular file of `.bitfog/`, if there is one (a symlink, FIFO or
    /// device there is not read).
    /// On a sealed courier it is decrypted (into an unnamed temporary
    /// file); one that does not decrypt, or is not encrypted, is not read.
    pub(crate) fn state_file(&self, name: &str) -> Option<File> {
        let f = self.state.as_ref()?.open_file(name.as_bytes()).ok()??;
        match &self.seal {
            None => Some(f),
            Some(s) if name == LOG => s.open_lines(f).ok(),
            Some(s) if crate::age::is_age(&f) => s.open_state(f).ok(),
            Some(_) => None,
        }
    }

    /// The record of carried files, read whole (dry runs).
    pub(crate) fn read_log(&self) -> HashMap<String, Carried> {
        let mut map = HashMap::new();
        let Some(f) = self.state_file(LOG) else {
            return map;
        };
        let mut r = BufReader::new(f);
        let mut line = Vec::new();
        loop {
            line.clear();
            if !crate::wire::manifest::read_line_capped(
                &mut r,
                &mut line,
                crate::wire::manifest::MAX_LINE,
            )
            .is_ok_and(|n| n > 0)
            {
                break;
            }
            if let Ok(rec) = serde_json::from_slice::<Carried>(&line) {
                map.insert(rec.name.clone(), rec);
            }
        }
        map
    }

    /// Removes a state file, so no stale one is taken for the truth.
    pub(crate) fn drop_state_file(&self, name: &str) {
        if let Some(state) = &self.state {
            let _ = state.unlink(name.as_bytes());
        }
    }

    /// Removes the receipt, so no stale one is taken for the truth.
    pub(crate) fn drop_receipt(&self) {
        if let Some(state) = &self.state {
            let _ = state.unlink(RECEIPT.as_bytes());
        }
    }

    /// A new, empty spool for this run, in `.bitfog/NAME.tmp`.
    /// On a sealed courier it is an unnamed file of the temporary
    /// directory instead: a spool holds names.
    pub(crate) fn spool<T>(&self, name: &str) -> Result<Spool<T>> {
        if self.seal.is_some() {
            return Spool::anonymous()
                .map_err(|e| Error::io("a spool in the temporary directory", &e));
        }
        let state = self
            .state_rw()
            .and_then(|s| s.try_clone())
            .map_err(|e| Error::io("the courier's state directory", &e))?;
        let name = format!("{name}.tmp");
        let what = format!("'{}'", state.path.join(&name).display());
        let file = state
            .create_fresh(name.as_bytes())
            .map_err(|e| Error::io(&what, &e))?;
        let read = file.try_clone().map_err(|e| Error::io(&what, &e))?;
        Ok(Spool::over(file, read, Some((state, name))))
    }

    /// Partial downloads present, each with what it belongs to (None: no
    /// readable sidecar) and how many bytes it holds.
    pub(crate) fn partials(&self) -> Vec<Partial> {
        let Some(root) = &self.partial else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // A read-only look at an older courier finds them in `partial/`.
        out.extend(self.partials_in(root));
        for dir in &self.shards {
            out.extend(self.partials_in(dir));
        }
        out
    }

    /// The partial downloads in one directory (see `partials`).
    fn partials_in(&self, dir: &Dir) -> Vec<Partial> {
        let names: Vec<_> = dir
            .names()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, kind)| *kind != Some(Kind::Dir))
            .collect();
        if self.seal.is_some() {
            // Not resumed: what a killed run left starts over (a look
            // that changes nothing only counts them).
            if self._lock.is_none() {
                return names
                    .iter()
                    .filter_map(|(n, _)| std::str::from_utf8(n).ok()?.strip_suffix(".part"))
                    .map(|id| Partial {
                        id: id.to_string(),
                        meta: None,
                        len: self.partial_len(id),
                    })
                    .collect();
            }
            for (name, _) in &names {
                let _ = dir.unlink(name);
            }
            return Vec::new();
        }
        let mut out = Vec::new();
        let has = |n: &str| {
            names
                .binary_search_by(|(x, _)| x.as_slice().cmp(n.as_bytes()))
                .is_ok()
        };
        for (name, _) in &names {
            let Ok(name) = std::str::from_utf8(name) else {
                let _ = dir.unlink(name);
                continue;
            };
            if let Some(id) = name.strip_suffix(".json") {
                let meta = read_record(dir, name);
                let len = self.partial_len(id);
                out.push(Partial {
                    id: id.to_string(),
                    meta,
                    len,
                });
            } else if let Some(id) = name.strip_suffix(".part") {
                if !has(&format!("{id}.json")) {
                    out.push(Partial {
                        id: id.to_string(),
                        meta: None,
                        len: self.partial_len(id),
                    });
                }
            } else {
                // Not bitfog's: a leftover temporary or something planted.
                let _ = dir.unlink(name.as_bytes());
            }
        }
        out
    }

    /// The directory of partial download `id`: its shard, or (read-only,
    /// an older courier) `partial/` itself.
    fn part_dir(&self, id: &str) -> Option<&Dir> {
        match id.bytes().next() {
            Some(b) if !self.shards.is_empty() => self.shards.get(shard_of(b)),
            _ => self.partial.as_ref(),
        }
    }

    /// The id of a name's partial download (on a sealed courier, one only
    /// the state key tells).
    pub(crate) fn partial_id(&self, name: &str) -> String {
        if let Some(s) = &self.seal {
            return s.name_for(&format!("partial\0{name}"));
        }
        let mut h = Hasher::new();
        h.update(name.as_bytes());
        h.hex()[..32].to_string()
    }

    /// Bytes a partial download holds (0 when none, or not a file).
    pub(crate) fn partial_len(&self, id: &str) -> u64 {
        self.part_dir(id)
            .and_then(|d| d.stat(format!("{id}.part").as_bytes()).ok().flatten())
            .filter(|m| m.kind == Kind::File)
            .map_or(0, |m| m.size)
    }

    /// Opens a partial download for reading and writing: the one there
    /// when `keep` and it is a regular file, else a fresh empty one.
    pub(crate) fn open_partial(&self, id: &str, keep: bool) -> io::Result<File> {
        let dir = self
            .part_dir(id)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let name = format!("{id}.part");
        if keep {
            if let Ok(Some(_)) = dir.open_file(name.as_bytes()) {
                return dir.open_rw(name.as_bytes());
            }
        }
        dir.create_fresh(name.as_bytes())
    }

    /// Writes a partial download's sidecar (what it belongs to).
    /// Not on a sealed courier: its downloads start over.
    pub(crate) fn write_sidecar(&self, id: &str, meta: &PartialMeta) -> io::Result<()> {
        if self.seal.is_some() {
            return Ok(());
        }
        let dir = self
            .part_dir(id)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        dir.write_atomic(&format!("{id}.json"), &serde_json::to_vec(meta)?, false)
    }

    /// Removes a partial download's sidecar.
    pub(crate) fn remove_sidecar(&self, id: &str) {
        if let Some(d) = self.part_dir(id) {
            let _ = d.unlink(format!("{id}.json").as_bytes());
        }
    }

    /// Removes a partial download and its sidecar.
    pub(crate) fn discard_partial(&self, id: &str) {
        if let Some(d) = self.part_dir(id) {
            let _ = d.unlink(format!("{id}.part").as_bytes());
            let _ = d.unlink(format!("{id}.json").as_bytes());
        }
    }

    /// Puts a complete partial download at its carried name: the
    /// directories above it are made (never through a symlink), and a
    /// directory in the way is an error.
    pub(crate) fn place(&self, id: &str, name: &str) -> io::Result<()> {
        self.place_as(id, name, false)
    }

    /// `place`, for a file that is its framed data extents when `pack`.
    /// A name the courier cannot hold as it is (see `probe`), one whose
    /// folded path another name owns on a case-insensitive courier, and a
    /// pack go to `.bitfog/names/` (`held_name`); the record says where.
    pub(crate) fn place_as(&self, id: &str, name: &str, pack: bool) -> io::Result<()> {
        let dir = self
            .part_dir(id)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        check_carried_name(name).map_err(|why| io::Error::other(why.reason()))?;
        let plain = !pack
            && self.seal.is_none()
            && self.traits.holds(name)
            && self
                .fold
                .lock()
                .expect("fold map")
                .as_mut()
                .is_none_or(|f| f.claim(name));
        let was = self.held_at(name);
        let at = (!plain).then(|| match &self.seal {
            // An opaque name: nothing in it tells the file.
            Some(_) => {
                let r = crate::digest::hex(&crate::age::random::<16>());
                let suffix = if pack { PACK_SUFFIX } else { "" };
                format!("{}/{r}{suffix}", &r[..2])
            }
            None => held_name(name, pack),
        });
        let (parent, key, last) = match &at {
            Some(at) => self.held_parent(at, true)?,
            None => {
                self.held.lock().expect("held names").remove(name);
                self.parent(name, true)?
            }
        };
        let parent = parent.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let in_the_way = || io::Error::other("a directory is in the way in the courier");
        // On a case-insensitive courier what is there may be spelled
        // otherwise (nobody's, or this name's older copy): it goes, so
        // the file is seen under its own spelling.
        if plain && self.traits.case_insensitive {
            match parent.stat(last.as_bytes())? {
                Some(m) if m.kind == Kind::Dir => return Err(in_the_way()),
                Some(_) => {
                    let _ = parent.unlink(last.as_bytes());
                }
                None => {}
            }
        }
        // A file is never renamed over a directory (EISDIR).
        dir.rename_to(format!("{id}.part").as_bytes(), &parent, last.as_bytes())
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EISDIR) => in_the_way(),
                _ => e,
            })?;
        if let Some(at) = at {
            self.held
                .lock()
                .expect("held names")
                .insert(name.to_string(), at);
        }
        // The copy it replaces elsewhere is not left behind.
        if let Some(old) = was.filter(|old| Some(old) != self.held_at(name).as_ref()) {
            if let Ok((Some(d), _, file)) = self.held_parent(&old, false) {
                let _ = d.unlink(file.as_bytes());
            }
        }
        self.dirty.lock().expect("dirty dirs").insert(key, parent);
        Ok(())
    }

    /// Bytes held in COURIER's files: everything but bitfog's own state,
    /// partial downloads included.
    pub(crate) fn usage(&self) -> u64 {
        let Some(root) = &self.root else { return 0 };
        let mut total = 0;
        crate::beneath::walk(
            root,
            |rel| rel != Path::new(COURIER_STATE),
            |found| {
                if let crate::beneath::Found::Item {
                    dir,
                    name,
                    kind: Kind::File,
                    ..
                } = found
                {
                    // A sparse file counts what it takes on disk.
                    if let Ok(Some(m)) = dir.stat(name) {
                        total += m.size.min(m.alloc);
                    }
                }
                true
            },
        );
        let part_bytes = self
            .partial
            .iter()
            .chain(&self.shards)
            .map(|d| dir_bytes(d, |n| n.ends_with(b".part")))
            .sum::<u64>();
        let held_bytes = self.sub(NAMES, false).ok().flatten().map_or(0, |d| {
            d.names()
                .unwrap_or_default()
                .iter()
                .filter(|(_, k)| *k == Some(Kind::Dir))
                .filter_map(|(b, _)| d.open_dir(b, false).ok())
                .map(|b| dir_bytes(&b, |_| true))
                .sum::<u64>()
        });
        total
            + part_bytes
            + held_bytes
            + crate::courier::ranges::usage(self)
            + crate::courier::deltas::usage(self)
    }

    /// Bytes free on the courier's disk, if it can tell.
    pub(crate) fn free_space(&self) -> Option<u64> {
        self.state.as_ref()?.free_space()
    }

    /// Keeps a copy of the destination snapshot this trip was planned
    /// from, for `store --delete`: byte for byte, so an encrypted DESTDB
    /// stays encrypted on the courier.
    /// On failure no snapshot is left, never a stale one.
    pub(crate) fn keep_snapshot(&self, db: &Path) -> io::Result<()> {
        let state = self.state_rw()?;
        let tmp = b"destdb.jsonl.tmp";
        let copied = (|| {
            let mut from = crate::wire::manifest::open_raw(db)?;
            let to = state.create_fresh(tmp)?;
            // On a sealed courier a plain DB is encrypted; an encrypted
            // one stays as it is.
            let sealed = match (&self.seal, crate::age::is_age(&from)) {
                (Some(s), false) => Some(&s.readers[..]),
                _ => None,
            };
            let mut to = crate::age::Sealed::new(to, sealed)?;
            io::copy(&mut from, &mut to)?;
            to.finish()?.sync_all()?;
            state.rename(tmp, SNAPSHOT.as_bytes())
        })();
        if copied.is_err() {
            let _ = state.unlink(tmp);
            let _ = state.unlink(SNAPSHOT.as_bytes());
        }
        copied
    }

    /// Starts a new record; `LogWriter::commit` puts it in place of the
    /// old one, atomically.
    pub(crate) fn new_log(&self) -> Result<LogWriter<'_>> {
        let tmp = "carried.jsonl.tmp";
        let state = self
            .state_rw()
            .map_err(|e| Error::io("the courier's state directory", &e))?;
        let what = format!("'{}'", state.path.join(tmp).display());
        let out = io::BufWriter::new(
            state
                .create_fresh(tmp.as_bytes())
                .map_err(|e| Error::io(&what, &e))?,
        );
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
        self.append_logs(std::slice::from_ref(rec))
    }

    /// Records many carried files in one write (a torn last line is
    /// dropped when the record is read).
    pub(crate) fn append_logs(&self, recs: &[Carried]) -> io::Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut guard = self.log.lock().expect("log lock");
        if guard.is_none() {
            *guard = Some(self.state_rw()?.open_append(LOG.as_bytes())?);
        }
        let mut lines = Vec::new();
        for rec in recs {
            let mut line = serde_json::to_vec(&self.located(rec))?;
            match &self.seal {
                Some(s) => lines.extend(s.seal_line(&line)),
                None => {
                    line.push(b'\n');
                    lines.extend(line);
                }
            }
        }
        let f = guard.as_mut().expect("opened above");
        f.write_all(&lines)
    }

    /// `rec` saying where the courier keeps the file now.
    /// A file recorded at its own name on a case-insensitive courier (one
    /// a killed run left unrecorded and `fetch` adopted) owns its folded
    /// path from now on.
    fn located(&self, rec: &Carried) -> Carried {
        let at = self.held_at(&rec.name);
        if let (None, false, Some(f)) = (
            &at,
            rec.damaged,
            self.fold.lock().expect("fold map").as_mut(),
        ) {
            f.claim(&rec.name);
        }
        Carried { at, ..rec.clone() }
    }

    /// Makes the record and every rename of this run durable.
    pub(crate) fn sync(&self) {
        if let Some(f) = self.log.lock().expect("log lock").as_ref() {
            let _ = f.sync_data();
        }
        for (_, dir) in self.dirty.lock().expect("dirty dirs").drain() {
            dir.sync();
        }
    }

    /// The directory above a carried name (made when `create`; `None`
    /// when it is not there), its relative name, and the name's last
    /// component. Each component is opened relative to the one above it
    /// without following a symlink.
    fn parent(&self, name: &str, create: bool) -> io::Result<(Option<Arc<Dir>>, String, String)> {
        let rel = check_carried_name(name).map_err(|why| io::Error::other(why.reason()))?;
        if let Some(at) = self.held_at(name) {
            return self.held_parent(&at, create);
        }
        let (dir_name, last) = match name.rsplit_once('/') {
            Some((d, l)) => (d.to_string(), l.to_string()),
            None => (String::new(), name.to_string()),
        };
        // A sealed courier keeps nothing at a carried name.
        if self.seal.is_some() {
            return Ok((None, dir_name, last));
        }
        // On a case-insensitive courier, what another name owns is not
        // this name's, whatever a lookup by this spelling finds.
        let others = self
            .fold
            .lock()
            .expect("fold map")
            .as_ref()
            .is_some_and(|f| !f.owns(name));
        if others && !create {
            return Ok((None, dir_name, last));
        }
        if let Some(d) = self.made.lock().expect("made dirs").get(&dir_name) {
            return Ok((Some(d.clone()), dir_name, last));
        }
        let Some(root) = &self.root else {
            return Ok((None, dir_name, last));
        };
        // A survey into an empty courier asks for every file's directory:
        // one failing lookup each is enough.
        let made_before = {
            let absent = self.absent.lock().expect("absent dirs");
            if !create && absent.1.contains(&dir_name) {
                return Ok((None, dir_name, last));
            }
            absent.0
        };
        let comps: Vec<&[u8]> = rel
            .parent()
            .into_iter()
            .flat_map(|p| p.iter())
            .map(|c| c.as_bytes())
            .collect();
        let found = root.dir(&comps, create);
        if create {
            let mut absent = self.absent.lock().expect("absent dirs");
            absent.0 += 1;
            absent.1.clear();
        }
        let dir = match found {
            Ok(d) => Arc::new(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => {
                let mut absent = self.absent.lock().expect("absent dirs");
                if absent.0 == made_before {
                    if absent.1.len() >= ABSENT_DIRS {
                        absent.1.clear();
                    }
                    absent.1.insert(dir_name.clone());
                }
                return Ok((None, dir_name, last));
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(io::Error::other(format!(
                    "a symlink is in the way of '{name}' in the courier (never followed)"
                )));
            }
            Err(e) => return Err(e),
        };
        let mut made = self.made.lock().expect("made dirs");
        if made.len() >= OPEN_DIRS {
            made.clear();
        }
        made.insert(dir_name.clone(), dir.clone());
        Ok((Some(dir), dir_name, last))
    }

    /// What the courier holds at a carried name, not following it; `None`
    /// when nothing is there.
    /// On a sealed courier its size is the plain size (`u64::MAX` when
    /// no plain size fits what it takes).
    pub(crate) fn carried_meta(&self, name: &str) -> io::Result<Option<crate::beneath::Meta>> {
        let meta = match self.parent(name, false)? {
            (Some(dir), _, last) => dir.stat(last.as_bytes())?,
            (None, ..) => None,
        };
        Ok(match (meta, &self.seal) {
            (Some(mut m), Some(s)) => {
                m.size = s.plain_len(m.size).unwrap_or(u64::MAX);
                Some(m)
            }
            (m, _) => m,
        })
    }

    /// Opens a carried file for reading, refusing symlinks anywhere below
    /// COURIER and anything but a regular file. `Ok(None)` when it is not
    /// there.
    pub(crate) fn open_carried(&self, name: &str) -> io::Result<Option<File>> {
        match self.parent(name, false) {
            Ok((Some(dir), _, last)) => dir.open_file(last.as_bytes()),
            Ok((None, ..)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The SHA-256 of the file a carried name holds (a pack's as the file
    /// it describes, `size` bytes); `Ok(None)` when it is not there.
    pub(crate) fn hash_carried(&self, name: &str, size: u64) -> io::Result<Option<String>> {
        // `fetch` cannot read a sealed courier's files, nor needs to.
        if self.seal.is_some() {
            return Ok(None);
        }
        let Some(f) = self.open_carried(name)? else {
            return Ok(None);
        };
        if self.is_pack(name) {
            return crate::wire::sparse::hash_pack(f, size).map(Some);
        }
        crate::digest::hash_reader(f).map(|(h, _)| Some(h))
    }

    /// Removes a carried file (a file, never what a symlink points to) and
    /// the directories it leaves empty.
    pub(crate) fn remove_carried(&self, name: &str) {
        let Ok((Some(dir), mut dir_name, last)) = self.parent(name, false) else {
            return;
        };
        if let Some(f) = self.fold.lock().expect("fold map").as_mut() {
            f.release(name);
        }
        if dir_name.starts_with(NAMES_KEY) {
            let _ = dir.unlink(last.as_bytes());
            self.held.lock().expect("held names").remove(name);
            return;
        }
        if !dir
            .stat(last.as_bytes())
            .is_ok_and(|m| m.is_some_and(|m| m.kind == Kind::File))
            || dir.unlink(last.as_bytes()).is_err()
        {
            return;
        }
        let Some(root) = &self.root else { return };
        // Empty directories above it go too, each removed from its parent
        // opened beneath the root.
        self.made.lock().expect("made dirs").clear();
        while !dir_name.is_empty() {
            let (up, leaf) = match dir_name.rsplit_once('/') {
                Some((u, l)) => (u.to_string(), l.to_string()),
                None => (String::new(), dir_name.clone()),
            };
            let comps: Vec<&[u8]> = up
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::as_bytes)
                .collect();
            match root.dir(&comps, false) {
                Ok(d) if d.remove_dir(leaf.as_bytes()).is_ok() => dir_name = up,
                _ => break,
            }
        }
    }
}

/// True when the filesystem of `root` (which holds `.bitfog`) folds case,
/// looked at without writing: `.BITFOG` is there too. (Inode numbers do
/// not tell: exfat-fuse gives each spelling its own.)
fn shows_folding(root: &Dir) -> bool {
    root.stat(COURIER_STATE.to_uppercase().as_bytes())
        .is_ok_and(|m| m.is_some_and(|m| m.kind == Kind::Dir))
}

/// Opens (making it if needed) a directory of bitfog's own in `.bitfog/`.
/// Whatever else holds its name there (a symlink, a file, a FIFO) was not
/// put there by bitfog: it is unlinked, never followed, and the directory
/// made in its place.
/// The directories of `partial/` downloads are spread over.
const SHARDS: [&str; 16] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "b", "c", "d", "e", "f",
];

/// The directory (an index into `SHARDS`) of an id starting with `b`: the
/// one named by that hex digit (an id is hex; anything else still lands
/// in one).
fn shard_of(b: u8) -> usize {
    char::from(b)
        .to_digit(16)
        .map_or(usize::from(b) % SHARDS.len(), |d| d as usize)
}

/// Opens (making them) the 16 directories of `partial/`, and moves what
/// an older bitfog left in `partial/` itself into them: a regular file
/// named as a download or its record goes to its shard, anything else is
/// removed (a courier is a disk from a stranger). Only with the lock.
fn open_shards(partial: &Dir) -> io::Result<Vec<Dir>> {
    let shards = SHARDS
        .iter()
        .map(|x| own_dir(partial, x))
        .collect::<io::Result<Vec<Dir>>>()?;
    for (name, _) in partial.names()? {
        if SHARDS.iter().any(|x| x.as_bytes() == name.as_slice()) {
            continue;
        }
        let ours = name.ends_with(b".part") || name.ends_with(b".json");
        let regular = matches!(partial.stat(&name), Ok(Some(m)) if m.kind == Kind::File);
        match name.first() {
            Some(&b) if ours && regular => {
                let shard = &shards[shard_of(b)];
                if partial.rename_to(&name, shard, &name).is_err() {
                    let _ = partial.unlink(&name);
                }
            }
            _ => {
                if partial.unlink(&name).is_err() {
                    let _ = partial.remove_dir(&name);
                }
            }
        }
    }
    Ok(shards)
}

fn own_dir(state: &Dir, name: &str) -> io::Result<Dir> {
    match state.open_dir(name.as_bytes(), true) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            state.unlink(name.as_bytes())?;
            state.open_dir(name.as_bytes(), true)
        }
        other => other,
    }
}

/// A file being written into a directory of `.bitfog/` (a range, a
/// delta): it grows under a temporary name and appears under its own only
/// when `keep` has synced it. Dropped without `keep`, it leaves nothing.
pub(crate) struct NewFile {
    dir: Dir,
    tmp: String,
    name: String,
    file: File,
    kept: bool,
}

impl NewFile {
    /// Starts `name` in the `.bitfog/` directory `sub` (made if needed).
    pub(crate) fn create(courier: &Courier, sub: &str, name: String) -> io::Result<NewFile> {
        let dir = courier
            .sub(sub, true)?
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let tmp = match name.rsplit_once('.') {
            Some((base, _)) => format!("{base}.tmp"),
            None => format!("{name}.tmp"),
        };
        let file = dir.create_fresh(tmp.as_bytes())?;
        Ok(NewFile {
            dir,
            tmp,
            name,
            file,
            kept: false,
        })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the file and puts it under its name; then `record` (if any)
    /// is written beside it, atomically and synced, so a record never
    /// stands without its data.
    pub(crate) fn keep(mut self, record: Option<(&str, &[u8])>) -> io::Result<()> {
        self.file.sync_all()?;
        self.dir.rename(self.tmp.as_bytes(), self.name.as_bytes())?;
        if let Some((name, bytes)) = record {
            if let Err(e) = self.dir.write_atomic(name, bytes, true) {
                let _ = self.dir.unlink(self.name.as_bytes());
                return Err(e);
            }
        }
        self.dir.sync();
        self.kept = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = self.dir.unlink(self.tmp.as_bytes());
        }
    }
}

/// Where a new courier file's bytes go: as they are, or encrypted for a
/// sealed courier's recipients. `finish` ends the file (an encrypted one
/// is cut short without it, and refused by every reader).
pub(crate) enum Sink<W: Write> {
    Plain(W),
    Sealed(crate::age::Writer<W>),
}

impl<W: Write> Sink<W> {
    pub(crate) fn finish(self) -> io::Result<W> {
        let mut w = match self {
            Sink::Plain(w) => w,
            Sink::Sealed(s) => s.finish()?,
        };
        w.flush()?;
        Ok(w)
    }
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Sealed(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Sealed(s) => s.flush(),
        }
    }
}

/// A courier file's plain bytes: the file itself, or a sealed courier's
/// file decrypted as it is read (a large one ahead, on a thread of its
/// own, so decrypting overlaps with sending).
pub(crate) enum Plain {
    File(File),
    Sealed(crate::age::Reader<File>),
    Ahead(ReadAhead),
}

impl io::Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Plain::File(f) => f.read(buf),
            Plain::Sealed(r) => r.read(buf),
            Plain::Ahead(r) => r.read(buf),
        }
    }
}

/// Reads `inner` on a thread of its own, a few buffers ahead of the
/// reader; an error reaches the reader where it happened, with its kind.
/// Dropped early, the thread stops at its next buffer.
pub(crate) struct ReadAhead {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl ReadAhead {
    fn start(mut inner: impl io::Read + Send + 'static) -> ReadAhead {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; crate::digest::BUF_SIZE];
                let mut n = 0;
                let got = loop {
                    match inner.read(&mut buf[n..]) {
                        Ok(0) => break Ok(()),
                        Ok(k) => {
                            n += k;
                            if n == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(n);
                let end = n == 0;
                let sent = match got {
                    // What was read before an error is given first.
                    Err(e) => {
                        if n > 0 {
                            let _ = tx.send(Ok(buf));
                        }
                        let _ = tx.send(Err(e));
                        return;
                    }
                    Ok(()) => tx.send(Ok(buf)),
                };
                if sent.is_err() || end {
                    return;
                }
            }
        });
        ReadAhead {
            rx,
            buf: Vec::new(),
            at: 0,
            done: false,
        }
    }
}

impl io::Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.done = b.is_empty();
                    self.buf = b;
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the reading thread stopped"));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A partial download in the courier.
pub(crate) struct Partial {
    pub(crate) id: String,
    pub(crate) meta: Option<PartialMeta>,
    pub(crate) len: u64,
}

/// A small JSON record of a state directory (a sidecar, a range record):
/// `None` unless it is a regular file of at most `MAX_RECORD` bytes that
/// parses.
pub(crate) fn read_record<T: serde::de::DeserializeOwned>(dir: &Dir, name: &str) -> Option<T> {
    use std::io::Read;
    let f = dir.open_file(name.as_bytes()).ok()??;
    let mut buf = Vec::new();
    f.take(MAX_RECORD + 1).read_to_end(&mut buf).ok()?;
    if buf.len() as u64 > MAX_RECORD {
        return None;
    }
    serde_json::from_slice(&buf).ok()
}

/// A new record of carried files, being written.
pub(crate) struct LogWriter<'a> {
    courier: &'a Courier,
    tmp: &'static str,
    what: String,
    /// None once committed.
    out: Option<io::BufWriter<File>>,
}

impl LogWriter<'_> {
    pub(crate) fn add(&mut self, rec: &Carried) -> Result<()> {
        let rec = self.courier.located(rec);
        let out = self.out.as_mut().expect("not committed");
        let mut line = serde_json::to_vec(&rec).map_err(|e| Error::io(&self.what, &e.into()))?;
        if let Some(s) = &self.courier.seal {
            line = s.seal_line(&line);
        } else {
            line.push(b'\n');
        }
        out.write_all(&line).map_err(|e| Error::io(&self.what, &e))
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
        let state = self.courier.state_rw().map_err(|e| Error::io(&what, &e))?;
        state
            .rename(self.tmp.as_bytes(), LOG.as_bytes())
            .map_err(|e| Error::io(&what, &e))?;
        state.sync();
        *self.courier.log.lock().expect("log lock") = None;
        Ok(())
    }
}

impl Drop for LogWriter<'_> {
    fn drop(&mut self) {
        if let (Some(_), Some(state)) = (&self.out, &self.courier.state) {
            let _ = state.unlink(self.tmp.as_bytes());
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
    /// Indexes the lines of `file` (none when it is `None`). Lines longer
    /// than `manifest::MAX_LINE` are left out, unread.
    pub(crate) fn from_file<T: serde::de::DeserializeOwned>(
        file: Option<File>,
        key: impl Fn(&T) -> Option<u64>,
    ) -> LineIndex {
        let mut at = HashMap::new();
        if let Some(f) = &file {
            let mut r = BufReader::new(f);
            let mut line = Vec::new();
            let mut offset = 0u64;
            loop {
                line.clear();
                let n = match crate::wire::manifest::read_line_capped(
                    &mut r,
                    &mut line,
                    crate::wire::manifest::MAX_LINE,
                ) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if line.ends_with(b"\n") && line.len() <= crate::wire::manifest::MAX_LINE {
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

pub(crate) fn name_key(name: &str) -> u64 {
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
    /// `name` and `from` are names of one file at the source (one link
    /// group): the destination makes `name` a hard link, not a copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) link: bool,
}

/// How many instructions the courier holds.
pub(crate) fn count_copies(courier: &Courier) -> u64 {
    courier
        .state_file(COPIES)
        .map(|f| BufReader::new(f).split(b'\n').count() as u64)
        .unwrap_or(0)
}

/// Reads `COPIES` as a stream, looked up in name order.
pub(crate) struct Copies {
    lines: Option<BufReader<File>>,
    next: Option<CopyInstr>,
}

impl Copies {
    pub(crate) fn open(courier: &Courier) -> Copies {
        let lines = courier.state_file(COPIES).map(BufReader::new);
        Copies { lines, next: None }
    }

    /// The next instruction; a line too long or not an instruction ends
    /// the stream.
    fn read(&mut self) -> Option<CopyInstr> {
        let r = self.lines.as_mut()?;
        let mut line = Vec::new();
        let n =
            crate::wire::manifest::read_line_capped(r, &mut line, crate::wire::manifest::MAX_LINE)
                .ok()?;
        if n == 0 || line.len() > crate::wire::manifest::MAX_LINE {
            return None;
        }
        serde_json::from_slice(&line).ok()
    }

    /// Where the destination can make `e` from, if `fetch` left an
    /// instruction for this version of it. Asked in contract order.
    pub(crate) fn find(&mut self, e: &Entry) -> Option<String> {
        loop {
            if self.next.is_none() {
                self.next = Some(self.read()?);
            }
            let rec = self.next.as_ref()?;
            match crate::wire::paths::name_cmp(&rec.name, &e.name) {
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
    /// Where it has a name, removed on drop (none when anonymous).
    named: Option<(Dir, String)>,
    out: io::BufWriter<File>,
    read: File,
    /// Where each entry starts; the last value is where the file ends.
    offsets: Vec<u64>,
    line: Vec<u8>,
    kind: std::marker::PhantomData<T>,
}

impl<T> Spool<T> {
    fn over(file: File, read: File, named: Option<(Dir, String)>) -> Spool<T> {
        Spool {
            named,
            out: io::BufWriter::with_capacity(1 << 16, file),
            read,
            offsets: vec![0],
            line: Vec::new(),
            kind: std::marker::PhantomData,
        }
    }

    /// A spool in an unnamed file of the temporary directory (`TMPDIR`),
    /// gone when it is dropped or the process dies: for runs that write
    /// nothing in the courier.
    pub(crate) fn anonymous() -> io::Result<Spool<T>> {
        let file = crate::beneath::anonymous_file(&std::env::temp_dir())?;
        let read = file.try_clone()?;
        Ok(Spool::over(file, read, None))
    }
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

    /// Ends the writing; `get` works after this. A named spool is read
    /// through a descriptor opened anew: fusefat (FAT32) answers reads
    /// on the descriptor that wrote with zeros past its first page, and
    /// reads the same bytes right through a fresh one.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        self.out.flush()?;
        if let Some((dir, name)) = &self.named {
            self.read = dir
                .open_file(name.as_bytes())?
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        }
        Ok(())
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
        if let Some((dir, name)) = &self.named {
            let _ = dir.unlink(name.as_bytes());
        }
    }
}

/// Bytes of the regular files directly in `dir` whose names pass `count`.
pub(crate) fn dir_bytes(dir: &Dir, count: impl Fn(&[u8]) -> bool) -> u64 {
    dir.names()
        .unwrap_or_default()
        .iter()
        .filter(|(n, _)| count(n))
        .filter_map(|(n, _)| dir.stat(n).ok().flatten())
        .filter(|m| m.kind == Kind::File)
        .map(|m| m.size)
        .sum()
}

#[cfg(test)]
mod read_ahead_tests {
    use super::ReadAhead;
    use std::io::{self, Read};

    /// Gives `ok` bytes, then fails with `kind`.
    struct Failing {
        left: usize,
        kind: io::ErrorKind,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::new(self.kind, "failed here"));
            }
            let n = buf.len().min(self.left).min(1000);
            buf[..n].fill(7);
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn gives_every_byte_then_the_error_in_its_place() {
        for ok in [0, 1, 999, 300_000, 1 << 20] {
            let mut r = ReadAhead::start(Failing {
                left: ok,
                kind: io::ErrorKind::InvalidData,
            });
            let mut got = Vec::new();
            let err = r.read_to_end(&mut got).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(got.len(), ok);
        }
        let data: Vec<u8> = (0..700_000u32).map(|i| i as u8).collect();
        let mut got = Vec::new();
        ReadAhead::start(io::Cursor::new(data.clone()))
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_download_lives_in_the_directory_of_its_first_digit() {
        for (b, want) in [
            (b'0', "0"),
            (b'9', "9"),
            (b'a', "a"),
            (b'f', "f"),
            (b'F', "f"),
        ] {
            assert_eq!(SHARDS[shard_of(b)], want);
        }
        assert!(shard_of(b'z') < SHARDS.len() && shard_of(0xff) < SHARDS.len());
    }
    use std::io::Read;

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
            at: None,
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
        let part = |id: &str| {
            c.open_partial(id, false).unwrap();
        };
        part("a");
        assert!(c.place("a", "link/x").is_err());
        assert!(c.place("a", "../x").is_err());
        assert!(c.place("a", ".bitfog/x").is_err());
        c.place("a", "d/e/f").unwrap();
        assert!(dir.path().join("d/e/f").is_file());
        fs::write(outside.path().join("x"), "secret").unwrap();
        assert!(c.open_carried("link/x").is_err());
        std::os::unix::fs::symlink(outside.path().join("x"), dir.path().join("y")).unwrap();
        assert!(c.open_carried("y").is_err());
        assert!(c.open_carried("nope").unwrap().is_none());
        c.remove_carried("link/x");
        c.remove_carried("y");
        assert!(
            outside.path().join("x").is_file(),
            "never removed through a link"
        );
        assert!(
            fs::symlink_metadata(dir.path().join("y")).is_ok(),
            "a link is not a carried file"
        );
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_found_absent_is_found_once_made_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let c = Courier::open(dir.path(), true).unwrap();
        // More directories than stay open, so that most are looked up
        // again after they were made.
        let names: Vec<String> = (0..OPEN_DIRS + 44).map(|i| format!("d{i}/e/a")).collect();
        for name in &names {
            assert!(c.carried_meta(name).unwrap().is_none());
        }
        for (i, name) in names.iter().enumerate() {
            let id = format!("{i:x}");
            c.open_partial(&id, false).unwrap();
            c.place(&id, name).unwrap();
        }
        for name in &names {
            assert!(c.carried_meta(name).unwrap().is_some(), "{name}");
        }
        assert!(c.carried_meta("d0/e/b").unwrap().is_none());
        fs::create_dir(dir.path().join("d0/e/b")).unwrap();
        c.open_partial("b", false).unwrap();
        let err = c.place("b", "d0/e/b").unwrap_err();
        assert!(
            err.to_string().contains("a directory is in the way"),
            "{err}"
        );
        assert!(dir.path().join("d0/e/b").is_dir());
        assert!(c.carried_meta("x/a").unwrap().is_none());
    }

    #[test]
    fn names_the_courier_cannot_hold_go_to_names_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Courier::open(dir.path(), true).unwrap();
        c.traits.refused_chars = vec![':'];
        c.traits.case_insensitive = true;
        *c.fold.lock().unwrap() = Some(FoldMap::default());
        let part = |id: &str, bytes: &[u8]| {
            c.open_partial(id, false).unwrap().write_all(bytes).unwrap();
        };
        part("1", b"colon");
        c.place("1", "d/a:b.txt").unwrap();
        part("2", b"upper");
        c.place("2", "d/Photo.JPG").unwrap();
        part("3", b"lower");
        c.place("3", "d/photo.jpg").unwrap();
        assert!(dir.path().join("d/Photo.JPG").is_file());
        assert!(!dir.path().join("d/a:b.txt").exists());
        assert!(!dir.path().join("d/photo.jpg").exists());
        let at = c.held_at("d/photo.jpg").unwrap();
        assert!(at.ends_with("-photo.jpg") && sound_at(&at), "{at}");
        assert_eq!(&at[2..3], "/", "in a directory of its own: {at}");
        assert!(c.held_at("d/a:b.txt").unwrap().ends_with("-a_b.txt"));
        let read = |name: &str| {
            let mut s = String::new();
            c.open_carried(name)
                .unwrap()
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        assert_eq!(read("d/a:b.txt"), "colon");
        assert_eq!(read("d/Photo.JPG"), "upper");
        assert_eq!(read("d/photo.jpg"), "lower");
        // The record says where; a courier opened again reads it back.
        for name in ["d/a:b.txt", "d/Photo.JPG", "d/photo.jpg"] {
            c.append_log(&Carried {
                name: name.into(),
                size: 5,
                mtime: 0,
                sha256: None,
                damaged: false,
                at: None,
            })
            .unwrap();
        }
        c.sync();
        drop(c);
        let c = Courier::open(dir.path(), true).unwrap();
        assert_eq!(c.held_at("d/photo.jpg").as_deref(), Some(at.as_str()));
        assert!(c.held_at("d/Photo.JPG").is_none());
        // An orphan goes; what a record names stays.
        fs::write(dir.path().join(".bitfog/names/stray"), "x").unwrap();
        fs::create_dir(dir.path().join(".bitfog/names/00")).unwrap();
        fs::write(dir.path().join(".bitfog/names/00/stray"), "x").unwrap();
        c.clean_names();
        let left: usize = fs::read_dir(dir.path().join(".bitfog/names"))
            .unwrap()
            .map(|b| fs::read_dir(b.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(left, 2);
        assert!(!dir.path().join(".bitfog/names/00").exists());
        c.remove_carried("d/photo.jpg");
        assert!(c.open_carried("d/photo.jpg").unwrap().is_none());
        assert!(c.open_carried("d/Photo.JPG").unwrap().is_some());
    }

    #[test]
    fn a_crafted_record_cannot_point_outside_names() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "secret").unwrap();
        fs::create_dir_all(dir.path().join(".bitfog/names")).unwrap();
        let evil = format!("../../../..{}/secret", outside.path().display());
        let lines: String = [
            evil.as_str(),
            "..",
            "ab/.hidden",
            "a/b",
            "",
            "ab/../x",
            "AB/x",
        ]
        .iter()
        .enumerate()
        .map(|(i, at)| {
            format!("{{\"name\":\"f{i}\",\"size\":6,\"mtime\":0,\"sha256\":null,\"at\":{at:?}}}\n")
        })
        .collect();
        fs::write(dir.path().join(".bitfog/carried.jsonl"), lines).unwrap();
        let c = Courier::open(dir.path(), true).unwrap();
        for i in 0..7 {
            let name = format!("f{i}");
            assert!(c.held_at(&name).is_none(), "{name}");
            assert!(c.open_carried(&name).unwrap().is_none());
            c.remove_carried(&name);
        }
        assert!(outside.path().join("secret").is_file());
    }

    proptest::proptest! {
        /// However names arrive, no two kept at their own names on a
        /// case-insensitive courier fold to one path, nor a file to a
        /// directory another spells otherwise.
        #[test]
        fn the_fold_map_never_lets_two_spellings_share_a_path(
            names in proptest::collection::vec("[aAbB]{1,2}(/[aAbB]{1,2}){0,2}", 1..24)
        ) {
            let mut f = FoldMap::default();
            let mut plain: Vec<String> = Vec::new();
            for n in &names {
                if f.claim(n) {
                    plain.push(n.clone());
                }
            }
            for a in &plain {
                for b in &plain {
                    for pa in prefixes(a) {
                        for pb in prefixes(b) {
                            if pa != pb {
                                proptest::prop_assert_ne!(pa.to_lowercase(), pb.to_lowercase());
                            }
                        }
                    }
                }
            }
            // The same spelling again is always its own.
            for n in &plain {
                proptest::prop_assert!(f.claim(n) && f.owns(n));
            }
        }

        /// A held name is a name every courier holds, and one per name.
        #[test]
        fn held_names_are_safe_everywhere(name in "\\PC{1,80}(/\\PC{1,20}){0,2}", pack: bool) {
            let strict = probe::Traits {
                refused_chars: vec![':', '?', '<', '>', '|', '"', '*', '\\'],
                controls: true,
                non_ascii: true,
                trailing: true,
                devices: true,
                ..probe::Traits::default()
            };
            let h = held_name(&name, pack);
            proptest::prop_assert!(strict.holds(&h) && sound_at(&h), "{h:?}");
            proptest::prop_assert_ne!(h, held_name(&format!("{name}x"), pack));
        }
    }
}
