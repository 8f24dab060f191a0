//! Manifest entries and the JSON-lines reader and writer shared by area
//! listings (over HTTP) and DB files (on disk).
//!
//! The reader validates as it streams: every line capped in length, names
//! in strictly increasing contract order, the end record present and
//! matching. It never holds more than one line in memory.

use crate::beneath::Dir;
use crate::digest::is_sha256_hex;
use crate::error::{Error, Result};
use crate::wire::paths::name_cmp;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The most entries a listing or DB may have; a longer one (an endless
/// listing from a hostile server) is refused rather than held.
pub(crate) const MAX_ENTRIES: u64 = 100_000_000;
/// The longest JSON line accepted (a 4 KiB name and a 4 KiB link target,
/// both fully escaped, fit with room to spare).
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// The end record may be longer, up to this.
pub(crate) const MAX_END_LINE: usize = 16 << 20;
/// Consecutive empty lines accepted: a server sends one every 10 s while it
/// hashes, so this is more than a day of hashing, and a flood of them ends
/// at once instead of never.
pub(crate) const MAX_BLANK_RUN: u64 = 10_000;
/// The manifest format version this build reads and writes.
pub(crate) const VERSION: u64 = 1;

/// One regular file or symlink below an area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) mode: u32,
    pub(crate) mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) linkdest: Option<String>,
    /// Bytes the file takes on disk, listed only for a sparse file (fewer
    /// than `size`): its holes are not carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) alloc: Option<u64>,
    /// Who owns it, and its mtime to the nanosecond (see `Owner`).
    #[serde(flatten)]
    pub(crate) meta: MoreMeta,
}

/// What an extended listing (`?meta=1`) adds to an entry or directory:
/// the nanoseconds of its mtime (`mtime` stays whole seconds for older
/// readers) and its owner and group, numeric and by name where the
/// source's system names them. All absent from older manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MoreMeta {
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub(crate) mtime_ns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    /// A file with more than one name: its link group, the same number
    /// for every name of one file within one listing (not an inode
    /// number, and not comparable between listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) hardlink: Option<u64>,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

impl MoreMeta {
    /// True when `dest` has the owner this asks for, as far as both say:
    /// by name where both have one (ids differ between systems), else by
    /// id.
    pub(crate) fn same_owner(&self, dest: &MoreMeta) -> bool {
        let same = |name: (&Option<String>, &Option<String>), id: (Option<u32>, Option<u32>)| match (
            name, id,
        ) {
            ((Some(a), Some(b)), _) => a == b,
            (_, (Some(a), Some(b))) => a == b,
            _ => true,
        };
        same((&self.user, &dest.user), (self.uid, dest.uid))
            && same((&self.group, &dest.group), (self.gid, dest.gid))
    }
}

impl Entry {
    pub(crate) fn is_symlink(&self) -> bool {
        self.linkdest.is_some()
    }

    /// True when `other` describes the same content: the same target for
    /// symlinks; for files the same size and SHA-256, or the same size and
    /// mtime when either side has no hash.
    pub(crate) fn same_content(&self, other: &Entry) -> bool {
        match (&self.linkdest, &other.linkdest) {
            (Some(a), Some(b)) => a == b,
            (None, None) => {
                self.size == other.size
                    && match (&self.sha256, &other.sha256) {
                        (Some(a), Some(b)) => a == b,
                        _ => self.mtime == other.mtime,
                    }
            }
            _ => false,
        }
    }
}

/// The last line of a listing or DB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct End {
    pub(crate) end: bool,
    pub(crate) count: u64,
    pub(crate) bytes: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) skipped: u64,
    /// Files arriving a range per trip, not yet complete at the area
    /// (see `PUT` with `Content-Range`). Not counted in `count`/`bytes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) partials: Vec<PartialUpload>,
    /// Directories, in the walk's order: the empty ones (`?dirs=1`), or
    /// every one, the root first as "" (`?dirs=1&alldirs=1`), so that
    /// their modes and mtimes travel. Not counted in `count`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) dirs: Vec<EmptyDir>,
    /// Empty directories the area has but `dirs` leaves out, so that the
    /// record stays well under what clients accept (`MAX_END_LINE`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) dirs_omitted: u64,
    /// Directories with entries (implied by them) whose mode and mtime
    /// `dirs` leaves out for the same reason.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) dirs_meta_omitted: u64,
    /// The listed area's identity (the server's `X-Bitfog-Area`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) area_id: Option<String>,
    /// The area applies the owners a write asks for (`"owners": true`,
    /// and its server may chown).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) owners: bool,
    /// The area's own exclude patterns (`"exclude"` in its bitfog.json),
    /// in an extended listing: names they match were left out, and
    /// `store --delete` leaves them alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) exclude: Vec<String>,
}

/// An empty directory of an area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EmptyDir {
    pub(crate) name: String,
    pub(crate) mode: u32,
    pub(crate) mtime: i64,
    #[serde(flatten)]
    pub(crate) meta: MoreMeta,
}

/// A file bigger than a trip, arriving range by range: `have` bytes of
/// the `size`-byte file with this SHA-256 are at the destination, kept
/// out of sight until the last range arrives and the whole file verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartialUpload {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) have: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl End {
    pub(crate) fn new(count: u64, bytes: u64, skipped: u64) -> End {
        End {
            end: true,
            count,
            bytes,
            skipped,
            partials: Vec::new(),
            dirs: Vec::new(),
            dirs_omitted: 0,
            dirs_meta_omitted: 0,
            area_id: None,
            owners: false,
            exclude: Vec::new(),
        }
    }
}

/// Every field any line may carry; unknown fields are ignored.
#[derive(Deserialize)]
struct AnyLine {
    name: Option<String>,
    size: Option<u64>,
    mode: Option<u32>,
    mtime: Option<i64>,
    sha256: Option<String>,
    linkdest: Option<String>,
    end: Option<bool>,
    count: Option<u64>,
    bytes: Option<u64>,
    skipped: Option<u64>,
    #[serde(default)]
    partials: Vec<PartialUpload>,
    #[serde(default)]
    dirs: Vec<EmptyDir>,
    #[serde(default)]
    dirs_omitted: u64,
    #[serde(default)]
    dirs_meta_omitted: u64,
    area_id: Option<String>,
    #[serde(default)]
    owners: bool,
    #[serde(default)]
    exclude: Vec<String>,
    alloc: Option<u64>,
    #[serde(default)]
    mtime_ns: u32,
    uid: Option<u32>,
    gid: Option<u32>,
    user: Option<String>,
    group: Option<String>,
    hardlink: Option<u64>,
}

impl AnyLine {
    /// The end record this line is (its `count` and `bytes` checked by
    /// the caller).
    fn into_end(self, count: u64, bytes: u64) -> End {
        End {
            partials: self.partials,
            dirs: self.dirs,
            dirs_omitted: self.dirs_omitted,
            dirs_meta_omitted: self.dirs_meta_omitted,
            owners: self.owners,
            exclude: self.exclude,
            area_id: self.area_id,
            ..End::new(count, bytes, self.skipped.unwrap_or(0))
        }
    }
}

/// The header line of a DB file.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    pub(crate) bitfog: u64,
    pub(crate) source: Option<String>,
    pub(crate) created: String,
    /// The identity of the area the DB describes, when its server gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) area_id: Option<String>,
    /// The `--exclude` patterns the DB was made with: names they match
    /// were left out, and `store --delete` leaves them alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) exclude: Vec<String>,
}

/// Streams and validates entries from a listing or a DB body.
pub(crate) struct Reader<R> {
    input: R,
    origin: String,
    line_no: u64,
    buf: Vec<u8>,
    last: Option<String>,
    count: u64,
    bytes: u64,
    end: Option<End>,
    /// The area's identity, as its server named it when it sent the
    /// listing (`X-Bitfog-Area`); a DB's is in its header.
    pub(crate) area_id: Option<String>,
    /// The listed area applies owners (the server's `X-Bitfog-Owners`).
    pub(crate) owners: bool,
    /// The listing's entries carry the extended metadata (`?meta=1` was
    /// understood).
    pub(crate) extended: bool,
    /// Entries (and directories of the end record) these match are passed
    /// over, after the stream is checked whole (`--exclude`).
    pub(crate) exclude: crate::wire::exclude::Excludes,
}

impl<R: BufRead> Reader<R> {
    /// `origin` names the source in messages (a URL or a quoted path).
    pub(crate) fn new(input: R, origin: impl Into<String>) -> Reader<R> {
        Reader {
            input,
            origin: origin.into(),
            line_no: 0,
            buf: Vec::new(),
            last: None,
            count: 0,
            bytes: 0,
            end: None,
            area_id: None,
            owners: false,
            extended: false,
            exclude: Default::default(),
        }
    }

    /// The end record, once `next_entry` has returned `Ok(None)`
    /// (without the directories `exclude` matches).
    pub(crate) fn end(&self) -> Option<End> {
        let mut end = self.end.clone()?;
        if !self.exclude.is_empty() {
            end.dirs.retain(|d| !self.exclude.excludes(&d.name, true));
        }
        Some(end)
    }

    fn bad(&self, what: impl std::fmt::Display) -> Error {
        Error::failed(format!("{}: line {}: {what}", self.origin, self.line_no))
    }

    /// Reads the next non-empty line into `self.buf`; false at EOF.
    fn next_line(&mut self) -> Result<bool> {
        let mut blanks = 0u64;
        loop {
            self.buf.clear();
            self.line_no += 1;
            let n = read_line_capped(&mut self.input, &mut self.buf, MAX_END_LINE)
                .map_err(|e| Error::io(&self.origin, &e))?;
            if n == 0 {
                return Ok(false);
            }
            // Only the end record may be longer (it lists empty
            // directories and partial uploads).
            let long = self.buf.len() > MAX_LINE;
            let end = self.buf.starts_with(b"{\"end\":true");
            if end && self.buf.len() > MAX_END_LINE {
                return Err(self.bad(format!(
                    "end record longer than {MAX_END_LINE} bytes (more empty directories or partial uploads than a listing may name)"
                )));
            }
            if long && !end {
                return Err(self.bad(format!("line longer than {MAX_LINE} bytes")));
            }
            while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                self.buf.pop();
            }
            if !self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(true);
            }
            blanks += 1;
            if blanks > MAX_BLANK_RUN {
                return Err(self.bad(format!("more than {MAX_BLANK_RUN} empty lines in a row")));
            }
        }
    }

    /// Reads the header line of a DB file.
    pub(crate) fn header(&mut self) -> Result<Header> {
        if !self.next_line()? {
            return Err(self.bad("empty file, expected a bitfog header"));
        }
        let h: Header =
            serde_json::from_slice(&self.buf).map_err(|e| self.bad(format!("bad header: {e}")))?;
        if h.bitfog != VERSION {
            return Err(self.bad(format!("unknown manifest version {}", h.bitfog)));
        }
        Ok(h)
    }

    /// The next entry, or `Ok(None)` after a valid end record. A missing or
    /// mismatched end record is an error: the stream was truncated.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.end.is_some() {
            return Ok(None);
        }
        if !self.next_line()? {
            return Err(Error::failed(format!(
                "{}: truncated (no end record after {} entries)",
                self.origin, self.count
            )));
        }
        let line: AnyLine =
            serde_json::from_slice(&self.buf).map_err(|e| self.bad(format!("malformed: {e}")))?;
        if line.end == Some(true) {
            let (Some(count), Some(bytes)) = (line.count, line.bytes) else {
                return Err(self.bad("end record without count and bytes"));
            };
            if count != self.count || bytes != self.bytes {
                return Err(Error::failed(format!(
                    "{}: truncated or damaged: end record says {count} entries of {bytes} bytes, \
                     got {} entries of {} bytes",
                    self.origin, self.count, self.bytes
                )));
            }
            if self.next_line()? {
                return Err(self.bad("data after the end record"));
            }
            self.end = Some(line.into_end(count, bytes));
            return Ok(None);
        }
        let (Some(name), Some(size), Some(mode), Some(mtime)) =
            (line.name, line.size, line.mode, line.mtime)
        else {
            return Err(self.bad("entry needs name, size, mode and mtime"));
        };
        if let Some(h) = &line.sha256 {
            if !is_sha256_hex(h) {
                return Err(self.bad(format!("bad sha256 for '{name}'")));
            }
        }
        let mtime_ns = line.mtime_ns;
        // Groups are numbered from 1; an older server listed every linked
        // file of an area without checksums as group 0: no group at all.
        let hardlink = (line.hardlink)
            .filter(|&g| g > 0)
            .filter(|_| line.linkdest.is_none());
        if mtime_ns > 999_999_999 {
            return Err(self.bad(format!("bad mtime_ns for '{name}'")));
        }
        if line.linkdest.is_some() && line.sha256.is_some() {
            return Err(self.bad(format!("symlink '{name}' has a sha256")));
        }
        if let Some(last) = &self.last {
            if name_cmp(last, &name) != Ordering::Less {
                return Err(self.bad(format!("'{name}' is out of order or duplicated")));
            }
        }
        self.count += 1;
        if self.count > MAX_ENTRIES {
            return Err(self.bad(format!(
                "more than {MAX_ENTRIES} entries; bitfog carries at most that many per area"
            )));
        }
        self.bytes = self
            .bytes
            .checked_add(size)
            .ok_or_else(|| self.bad("byte total overflows"))?;
        self.last = Some(name.clone());
        Ok(Some(Entry {
            name,
            size,
            mode,
            mtime,
            sha256: line.sha256,
            linkdest: line.linkdest,
            // A file sparser than bitfog hashes travels as an ordinary one.
            alloc: line
                .alloc
                .filter(|&a| a < size && crate::wire::sparse::holes_within_bounds(size, a)),
            meta: MoreMeta {
                mtime_ns,
                uid: line.uid,
                gid: line.gid,
                user: line.user.filter(|n| crate::owners::is_owner_name(n)),
                group: line.group.filter(|n| crate::owners::is_owner_name(n)),
                hardlink,
            },
        }))
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Result<Entry>;
    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            match self.next_entry() {
                Ok(Some(e)) if self.exclude.excludes(&e.name, false) => continue,
                other => return other.transpose(),
            }
        }
    }
}

/// Reads one line of at most `cap` bytes (plus one, so the caller can see
/// that it was longer); the rest of an overlong line is not read.
pub(crate) fn read_line_capped(
    r: &mut impl BufRead,
    out: &mut Vec<u8>,
    cap: usize,
) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(total);
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        let room = (cap + 1).saturating_sub(out.len());
        out.extend_from_slice(&avail[..take.min(room)]);
        r.consume(take);
        total += take;
        if done || out.len() > cap {
            return Ok(total);
        }
    }
}

/// Opens a file bitfog reads as input (a DB, a receipt): a FIFO, device
/// or directory there is refused rather than waited on.
/// An encrypted DB (an age file) reads as its plain text, decrypted with
/// `--identity` (see `age::open_plain`).
pub(crate) fn open_input(path: &Path) -> io::Result<File> {
    crate::age::open_plain(open_raw(path)?)
}

/// A DB file as it is on disk (a regular file, never waited on).
pub(crate) fn open_raw(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    crate::beneath::regular(&f)?;
    Ok(f)
}

/// Opens a DB file and checks its header; exit 2 on anything wrong.
pub(crate) fn open_db(path: &Path) -> Result<(Header, Reader<BufReader<File>>)> {
    let origin = format!("'{}'", path.display());
    let file = open_input(path)
        .map_err(|e| Error::usage(format!("{origin}: {}", crate::error::describe_io(&e))))?;
    open_db_file(file, origin)
}

/// Reads a DB from an open file (`origin` names it in messages) and
/// checks its header; exit 2 on anything wrong.
pub(crate) fn open_db_file(
    file: File,
    origin: String,
) -> Result<(Header, Reader<BufReader<File>>)> {
    let mut reader = Reader::new(BufReader::with_capacity(256 * 1024, file), origin);
    let header = reader.header().map_err(as_usage)?;
    Ok((header, reader))
}

/// The end record of the DB at `path`, read from its last line only (the
/// merge that reads the whole DB checks it; this is for what comes first).
pub(crate) fn read_end(path: &Path) -> Option<End> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = open_input(path).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(MAX_END_LINE as u64 + 2);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = std::str::from_utf8(&tail).ok()?.trim_end();
    let last = text.rsplit('\n').next()?;
    let line: AnyLine = serde_json::from_str(last).ok()?;
    if line.end != Some(true) {
        return None;
    }
    let (count, bytes) = (line.count?, line.bytes?);
    Some(line.into_end(count, bytes))
}

/// A DB error is unusable input: exit 2.
pub(crate) fn as_usage(e: Error) -> Error {
    Error::usage(e.to_string())
}

/// Writes a DB atomically: a temporary file beside the target, renamed
/// into place by `commit`. Dropped without commit, it leaves no trace.
/// The temporary file is created new (never through a symlink) in the
/// target's directory, held open.
pub(crate) struct DbWriter {
    dir: Dir,
    name: Vec<u8>,
    tmp: Vec<u8>,
    out: Option<BufWriter<crate::age::Sealed>>,
    count: u64,
    bytes: u64,
    /// Directories for the end record, and how many more there are that
    /// the record leaves out (empty ones; others).
    pub(crate) dirs: Vec<EmptyDir>,
    pub(crate) dirs_omitted: u64,
    pub(crate) dirs_meta_omitted: u64,
    /// The listed area's own exclude patterns, for the end record.
    pub(crate) area_exclude: Vec<String>,
}

/// Removes what an interrupted writer of the same DB left (`STEM` and the
/// PID of a process that is gone); a live one's file stays.
fn remove_stale_temps(dir: &Dir, stem: &[u8]) {
    for (n, _) in dir.names().unwrap_or_default() {
        let Some(pid) = n
            .strip_prefix(stem)
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        if crate::sys::process_gone(pid) {
            let _ = dir.unlink(&n);
        }
    }
}

/// Refuses to replace what `path` names unless it is a DB (plain or
/// encrypted), an empty file or a symlink (the link is replaced, never
/// what it points at): a DB path mistyped onto a document, a FIFO or a
/// device would be lost.
pub(crate) fn check_replaceable(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        // Nothing there, or nothing to look at: writing says what fails.
        Err(_) => return Ok(()),
    };
    let shown = path.display();
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        return Err(Error::usage(format!(
            "'{shown}' is a directory; give the DB a file name"
        )));
    }
    if !meta.is_file() {
        return Err(Error::usage(format!(
            "'{shown}': not a regular file; a DB is not written in its place"
        )));
    }
    let mut head = Vec::new();
    {
        use io::Read;
        let _ = File::open(path).and_then(|f| f.take(64).read_to_end(&mut head));
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let json_db = first.starts_with(b"{")
        && String::from_utf8_lossy(&first[1..])
            .trim_start()
            .starts_with("\"bitfog\"");
    if meta.len() == 0 || json_db || head.starts_with(b"age-encryption.org/") {
        return Ok(());
    }
    Err(Error::usage(format!(
        "'{shown}' exists and is not a bitfog DB; it is not replaced (give another path, or remove it first)"
    )))
}

impl DbWriter {
    /// A DB at a path the user named; refused where something else than
    /// a DB is there (`check_replaceable`).
    /// With `seal`, the DB is written encrypted to those recipients (an
    /// age file), never in plain text.
    pub(crate) fn create(
        path: &Path,
        source: Option<&str>,
        area_id: Option<&str>,
        exclude: Vec<String>,
        seal: Option<&[crate::age::Recipient]>,
    ) -> Result<DbWriter> {
        check_replaceable(path)?;
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::usage(format!("'{}': not a file name", path.display())))?;
        let parent = parent_dir(path);
        let dir =
            Dir::open_path(parent).map_err(|e| Error::io(format!("'{}'", parent.display()), &e))?;
        DbWriter::create_in(dir, file_name.as_bytes(), source, area_id, exclude, seal)
    }

    /// A DB named `name` in `dir`.
    pub(crate) fn create_in(
        dir: Dir,
        name: &[u8],
        source: Option<&str>,
        area_id: Option<&str>,
        exclude: Vec<String>,
        seal: Option<&[crate::age::Recipient]>,
    ) -> Result<DbWriter> {
        let mut stem = b".".to_vec();
        stem.extend_from_slice(name);
        stem.extend_from_slice(b".bitfog-tmp-");
        remove_stale_temps(&dir, &stem);
        let mut tmp = stem;
        tmp.extend_from_slice(std::process::id().to_string().as_bytes());
        let file = dir.create_fresh(&tmp).map_err(|e| {
            Error::io(
                format!("'{}'", dir.path.join(OsStr::from_bytes(&tmp)).display()),
                &e,
            )
        })?;
        let what = format!("'{}'", dir.path.join(OsStr::from_bytes(&tmp)).display());
        let out = crate::age::Sealed::new(file, seal).map_err(|e| Error::io(&what, &e))?;
        let mut w = DbWriter {
            dir,
            name: name.to_vec(),
            tmp,
            out: Some(BufWriter::new(out)),
            count: 0,
            bytes: 0,
            dirs: Vec::new(),
            dirs_omitted: 0,
            dirs_meta_omitted: 0,
            area_exclude: Vec::new(),
        };
        let header = Header {
            bitfog: VERSION,
            source: source.map(str::to_string),
            created: crate::wire::protocol::rfc3339(now_secs()),
            area_id: area_id.map(str::to_string),
            exclude,
        };
        w.line(&header)?;
        Ok(w)
    }

    fn what(&self, name: &[u8]) -> String {
        format!(
            "'{}'",
            self.dir.path.join(OsStr::from_bytes(name)).display()
        )
    }

    fn line(&mut self, value: &impl Serialize) -> Result<()> {
        let out = self.out.as_mut().expect("writer used after commit");
        serde_json::to_writer(&mut *out, value)
            .map_err(io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            // Named only on failure: a DB has a line per file.
            .map_err(|e| Error::io(self.what(&self.tmp), &e))
    }

    pub(crate) fn entry(&mut self, e: &Entry) -> Result<()> {
        self.count += 1;
        self.bytes = self.bytes.saturating_add(e.size);
        self.line(e)
    }

    /// Writes the end record, syncs, and renames into place.
    pub(crate) fn commit(self, skipped: u64) -> Result<(u64, u64)> {
        self.commit_with(skipped, Vec::new())
    }

    /// `commit`, naming the area's partial uploads in the end record.
    pub(crate) fn commit_with(
        mut self,
        skipped: u64,
        partials: Vec<PartialUpload>,
    ) -> Result<(u64, u64)> {
        let mut end = End::new(self.count, self.bytes, skipped);
        end.partials = partials;
        end.dirs = std::mem::take(&mut self.dirs);
        end.dirs_omitted = self.dirs_omitted;
        end.dirs_meta_omitted = self.dirs_meta_omitted;
        end.exclude = std::mem::take(&mut self.area_exclude);
        self.line(&end)?;
        let out = self.out.take().expect("commit twice");
        let what = self.what(&self.tmp);
        let file = out.into_inner().map_err(|e| Error::io(&what, e.error()))?;
        let file = file.finish().map_err(|e| Error::io(&what, &e))?;
        file.sync_all().map_err(|e| Error::io(&what, &e))?;
        if let Err(e) = self.dir.rename(&self.tmp, &self.name) {
            let _ = self.dir.unlink(&self.tmp);
            return Err(Error::io(self.what(&self.name), &e));
        }
        self.dir.sync();
        Ok((self.count, self.bytes))
    }
}

impl Drop for DbWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.dir.unlink(&self.tmp);
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    fn read_all(text: &str) -> Result<Vec<Entry>> {
        Reader::new(text.as_bytes(), "test").collect()
    }

    #[test]
    fn a_file_sparser_than_bitfog_hashes_is_not_treated_as_sparse() {
        let line = |size: u64, alloc: u64| {
            format!(
                "{{\"name\":\"a\",\"size\":{size},\"mode\":420,\"mtime\":5,\"alloc\":{alloc}}}\n{{\"end\":true,\"count\":1,\"bytes\":{size}}}\n"
            )
        };
        let alloc = |size, alloc| read_all(&line(size, alloc)).unwrap()[0].alloc;
        assert_eq!(
            alloc(100 << 20, 4096),
            Some(4096),
            "100 MiB, a block of data"
        );
        assert_eq!(alloc(17_592_186_040_320, 4096), None, "16 TiB of holes");
        assert_eq!(alloc(4096, 4096), None, "not sparse at all");
    }

    #[test]
    fn validates_listings() {
        let ok = "{\"name\":\"a\",\"size\":3,\"mode\":420,\"mtime\":5,\"extra\":1}\n\n{\"end\":true,\"count\":1,\"bytes\":3}\n";
        assert_eq!(read_all(ok).unwrap().len(), 1);
        for bad in [
            "",
            "{\"name\":\"a\",\"size\":3,\"mode\":420,\"mtime\":5}\n",
            "{\"end\":true,\"count\":2,\"bytes\":0}\n",
            "{\"name\":\"b\",\"size\":0,\"mode\":420,\"mtime\":5}\n{\"name\":\"a\",\"size\":0,\"mode\":420,\"mtime\":5}\n{\"end\":true,\"count\":2,\"bytes\":0}\n",
            "{\"name\":\"a\",\"size\":0,\"mode\":420,\"mtime\":5}\n{\"name\":\"a\",\"size\":0,\"mode\":420,\"mtime\":5}\n{\"end\":true,\"count\":2,\"bytes\":0}\n",
            "{\"name\":\"a\",\"size\":0,\"mode\":420,\"mtime\":5,\"sha256\":\"XYZ\"}\n{\"end\":true,\"count\":1,\"bytes\":0}\n",
            "not json\n",
            "{\"end\":true,\"count\":0,\"bytes\":0}\n{\"name\":\"a\",\"size\":0,\"mode\":420,\"mtime\":5}\n",
        ] {
            assert!(read_all(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn a_flood_of_empty_lines_ends() {
        let flood = "\n".repeat(MAX_BLANK_RUN as usize + 1);
        assert!(read_all(&flood).is_err());
        let patient = format!(
            "{}{{\"end\":true,\"count\":0,\"bytes\":0}}\n",
            "\n".repeat(1000)
        );
        assert!(read_all(&patient).unwrap().is_empty());
    }

    #[test]
    fn overlong_line_is_refused() {
        let long = format!(
            "{{\"name\":\"{}\",\"size\":0,\"mode\":420,\"mtime\":5}}\n",
            "x".repeat(MAX_LINE)
        );
        assert!(read_all(&long).is_err());
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            "[a-z\u{e9} ]{1,5}(/[a-z\"\\\\]{1,3}){0,2}",
            any::<u64>(),
            0u32..0o7777,
            any::<i64>(),
            prop::option::of("[0-9a-f]{64}"),
            prop::option::of("[^\0]{0,10}"),
        )
            .prop_map(|(name, size, mode, mtime, sha256, linkdest)| {
                let sha256 = if linkdest.is_some() { None } else { sha256 };
                let size = size >> 16;
                // Some files sparse: fewer bytes allocated than their size.
                let alloc =
                    (linkdest.is_none() && size % 3 == 0 && size > 4096).then_some(size / 2);
                Entry {
                    name,
                    size,
                    mode,
                    mtime,
                    sha256,
                    linkdest,
                    alloc,
                    meta: Default::default(),
                }
            })
    }

    #[test]
    fn only_the_end_record_may_be_long() {
        let dirs: Vec<String> = (0..5000)
            .map(|i| format!("{{\"name\":\"dir/number-{i:06}\",\"mode\":493,\"mtime\":1}}"))
            .collect();
        let end = format!(
            "{{\"end\":true,\"count\":0,\"bytes\":0,\"dirs\":[{}]}}\n",
            dirs.join(",")
        );
        assert!(end.len() > MAX_LINE);
        let text = format!("{{\"bitfog\":1,\"source\":null,\"created\":\"x\"}}\n{end}");
        let mut r = Reader::new(text.as_bytes(), "t");
        r.header().unwrap();
        assert!(r.next_entry().unwrap().is_none());
        assert_eq!(r.end().unwrap().dirs.len(), 5000);
        let long_entry = format!(
            "{{\"bitfog\":1,\"source\":null,\"created\":\"x\"}}\n{{\"name\":\"{}\",\"size\":1,\"mode\":1,\"mtime\":1}}\n",
            "x".repeat(MAX_LINE)
        );
        let mut r = Reader::new(long_entry.as_bytes(), "t");
        r.header().unwrap();
        assert!(r.next_entry().is_err());
    }

    proptest! {
        #[test]
        fn db_round_trips(mut entries in prop::collection::vec(entry(), 0..20)) {
            entries.sort_by(|a, b| name_cmp(&a.name, &b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.db");
            let mut w = DbWriter::create(&path, Some("http://h/a/"), None, Vec::new(), None).unwrap();
            for e in &entries {
                w.entry(e).unwrap();
            }
            w.commit(0).unwrap();
            let (h, r) = open_db(&path).unwrap();
            prop_assert_eq!(h.source.as_deref(), Some("http://h/a/"));
            let back: Vec<Entry> = r.collect::<Result<_>>().unwrap();
            prop_assert_eq!(back, entries);
            prop_assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }
}
