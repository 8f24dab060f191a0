//! Files bigger than the courier: carried a byte range per trip.
//!
//! When a missing file does not fit in what is left of the budget, `fetch`
//! carries its next range into `COURIER/.bitfog/ranges/`: the bytes as
//! `ID-START.range` and, once they are complete and synced, a record
//! `ID-START.json` (`RangeRecord`: which file, which bytes, their own
//! SHA-256). `store` appends each range to a partial upload at the
//! destination (`PUT` with `Content-Range`), which keeps it out of sight
//! and lists its progress in the listing's end record (`partials`); the
//! next trip's `fetch` continues from there, so no range travels twice.
//! When the last range arrives the destination checks the whole file's
//! SHA-256 and only then makes it appear.

use crate::beneath::Kind;
use crate::client::{AreaUrl, Client};
use crate::courier::{Courier, read_record};
use crate::digest::{BUF_SIZE, CopyError, Hasher, Writeback, copy_hashing, hash_reader};
use crate::error::describe_io;
use crate::manifest::{Entry, PartialUpload};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// No range is started smaller than this unless it ends the file.
pub(crate) const MIN_RANGE: u64 = 1 << 20;

/// What one carried range is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct RangeRecord {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) mode: u32,
    pub(crate) mtime: i64,
    pub(crate) start: u64,
    pub(crate) len: u64,
    /// The SHA-256 of these `len` bytes, to tell a damaged courier copy.
    pub(crate) range_sha256: String,
}

impl RangeRecord {
    /// True when this range belongs to the listed version of `e`.
    pub(crate) fn of(&self, e: &Entry) -> bool {
        self.name == e.name && self.size == e.size && e.sha256.as_ref() == Some(&self.sha256)
    }

    pub(crate) fn end(&self) -> u64 {
        self.start + self.len
    }
}

const DIR: &str = "ranges";

fn id(name: &str, size: u64, sha: &str) -> String {
    let mut h = Hasher::new();
    h.update(format!("{name}\0{size}\0{sha}").as_bytes());
    h.hex()[..24].to_string()
}

/// The complete ranges in the courier, with the names of their data files
/// in `.bitfog/ranges/`. Anything else in the directory (a range cut
/// short, a record without data, something planted) is not a range.
pub(crate) fn held(courier: &Courier) -> Vec<(String, RangeRecord)> {
    let Ok(Some(dir)) = courier.sub(DIR, false) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, _) in dir.names().unwrap_or_default() {
        let Some(base) = std::str::from_utf8(&name)
            .ok()
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let data = format!("{base}.range");
        let Some(rec) = read_record::<RangeRecord>(&dir, &format!("{base}.json")) else {
            continue;
        };
        let sound = dir
            .stat(data.as_bytes())
            .ok()
            .flatten()
            .is_some_and(|m| m.kind == Kind::File && m.size == rec.len);
        if sound {
            out.push((data, rec));
        }
    }
    out.sort_by(|a, b| (&a.1.name, a.1.start).cmp(&(&b.1.name, b.1.start)));
    out
}

/// Bytes the range files take (for the budget), complete or not.
pub(crate) fn usage(courier: &Courier) -> u64 {
    courier.sub(DIR, false).ok().flatten().map_or(0, |d| {
        crate::courier::dir_bytes(&d, |n| n.ends_with(b".range") || n.ends_with(b".tmp"))
    })
}

/// Removes what is not a complete range in `keep` (by data file name):
/// data cut short, stray records, anything planted.
pub(crate) fn clean(courier: &Courier, keep: &[(String, RangeRecord)]) {
    let Ok(Some(dir)) = courier.sub(DIR, false) else {
        return;
    };
    for (name, _) in dir.names().unwrap_or_default() {
        let data = match std::str::from_utf8(&name)
            .ok()
            .and_then(|n| n.strip_suffix(".json"))
        {
            Some(base) => format!("{base}.range"),
            None => String::from_utf8_lossy(&name).into_owned(),
        };
        if !keep.iter().any(|(d, _)| *d == data) {
            let _ = dir.unlink(&name);
        }
    }
}

/// Where the next range of `e` starts: after what the destination has
/// and the ranges the courier holds right after it.
pub(crate) fn next_start(e: &Entry, dest: Option<&PartialUpload>, held: &[RangeRecord]) -> u64 {
    let mut at = dest
        .filter(|p| p.size == e.size && e.sha256.as_ref() == Some(&p.sha256))
        .map_or(0, |p| p.have);
    let mut mine: Vec<&RangeRecord> = held.iter().filter(|r| r.of(e)).collect();
    mine.sort_by_key(|r| r.start);
    for r in mine {
        if r.start <= at && r.end() > at {
            at = r.end();
        }
    }
    at
}

/// The destination's partial uploads by name.
pub(crate) fn by_name(partials: Vec<PartialUpload>) -> HashMap<String, PartialUpload> {
    partials.into_iter().map(|p| (p.name.clone(), p)).collect()
}

/// Downloads `len` bytes of `e` from `start` into the courier as a range.
/// Errors are one-line reasons; a full disk says so (`Err(None)`).
pub(crate) fn download(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    start: u64,
    len: u64,
    wire: &AtomicU64,
) -> Result<RangeRecord, Option<String>> {
    let why = |what: &str, err: &io::Error| {
        if crate::error::is_disk_full(err) {
            None
        } else {
            Some(format!("{what}: {}", describe_io(err)))
        }
    };
    let sha = e.sha256.clone().ok_or(Some(
        "a range needs the file's SHA-256 in the listing".to_string(),
    ))?;
    let d = courier
        .sub(DIR, true)
        .map_err(|err| why("cannot create the ranges directory", &err))?
        .ok_or_else(|| Some("no ranges directory".to_string()))?;
    let base = format!("{}-{start}", id(&e.name, e.size, &sha));
    let (data, tmp) = (format!("{base}.range"), format!("{base}.tmp"));
    let mut dl = client
        .get_range(src, &e.name, start, start + len - 1)
        .map_err(|err| Some(err.to_string()))?;
    match dl.content_range {
        Some((a, b, total))
            if dl.status == 206 && a == start && b == start + len - 1 && total == e.size => {}
        _ => {
            return Err(Some(format!(
                "the server did not send bytes {start}-{} of {} (changed at the source?)",
                start + len - 1,
                e.size
            )));
        }
    }
    if dl.last_modified.is_some_and(|t| t != e.mtime) {
        return Err(Some(
            "modified at the source since the listing; not kept".into(),
        ));
    }
    let file = d
        .create_fresh(tmp.as_bytes())
        .map_err(|err| why("cannot create range file", &err))?;
    let mut hasher = Hasher::new();
    let mut out = io::BufWriter::with_capacity(BUF_SIZE, Writeback::new(&file, 0));
    let copied = copy_hashing(&mut dl.body, &mut out, &mut hasher, len, |n| {
        wire.fetch_add(n, Ordering::Relaxed);
    });
    let flushed = out.flush();
    drop(out);
    let result = match copied {
        Ok(n) if n == len => flushed.map_err(|err| why("cannot write range file", &err)),
        Ok(n) => Err(Some(format!(
            "download cut short after {n} of {len} bytes; rerun"
        ))),
        Err(CopyError::Write(err)) => Err(why("cannot write range file", &err)),
        Err(CopyError::Read(err)) => Err(Some(format!("download failed: {}", describe_io(&err)))),
    };
    if let Err(err) = result.and_then(|()| {
        file.sync_all()
            .map_err(|err| why("cannot sync range file", &err))
    }) {
        let _ = d.unlink(tmp.as_bytes());
        return Err(err);
    }
    let rec = RangeRecord {
        name: e.name.clone(),
        size: e.size,
        sha256: sha,
        mode: e.mode,
        mtime: e.mtime,
        start,
        len,
        range_sha256: hasher.hex(),
    };
    let written = d
        .rename(tmp.as_bytes(), data.as_bytes())
        .and_then(|()| d.write_atomic(&format!("{base}.json"), &serde_json::to_vec(&rec)?, true));
    if let Err(err) = written {
        let _ = d.unlink(data.as_bytes());
        return Err(why("cannot record range", &err));
    }
    d.sync();
    Ok(rec)
}

/// What the destination said to one range.
pub(crate) enum Sent {
    /// It holds this many bytes of the file now.
    Partial(u64),
    /// The file is complete and verified at its path.
    Complete,
}

/// Sends one courier range to the destination, after checking it.
pub(crate) fn upload(
    client: &Client,
    dest: &AreaUrl,
    courier: &Courier,
    data: &str,
    rec: &RangeRecord,
) -> Result<Sent, String> {
    let open = || {
        courier
            .sub(DIR, false)
            .and_then(|d| d.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT)))
            .and_then(|d| d.open_file(data.as_bytes()))
            .and_then(|f| f.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT)))
            .map_err(|e| format!("cannot read courier range: {}", describe_io(&e)))
    };
    let file = open()?;
    let (got, n) = hash_reader(&file)
        .map_err(|e| format!("cannot read courier range: {}", describe_io(&e)))?;
    if n != rec.len || got != rec.range_sha256 {
        return Err(format!(
            "courier range {}-{} is damaged; not uploaded (the next fetch carries it again)",
            rec.start,
            rec.end() - 1
        ));
    }
    let file = open()?;
    match client
        .put_range(dest, rec, file)
        .map_err(|e| e.to_string())?
    {
        Ok((204, _)) => Ok(Sent::Complete),
        Ok((_, have)) => Ok(Sent::Partial(have)),
        Err(r) if r.status == 422 => Err(format!(
            "the assembled file did not match its SHA-256 ({}); the destination dropped it and it starts over",
            r.reason
        )),
        Err(r) => Err(r.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: u64, len: u64) -> RangeRecord {
        RangeRecord {
            name: "f".into(),
            size: 100,
            sha256: "a".repeat(64),
            mode: 0o644,
            mtime: 1,
            start,
            len,
            range_sha256: String::new(),
        }
    }

    #[test]
    fn continues_after_the_destination_and_the_courier() {
        let e = Entry {
            name: "f".into(),
            size: 100,
            mode: 0o644,
            mtime: 1,
            sha256: Some("a".repeat(64)),
            linkdest: None,
            alloc: None,
        };
        let have = |n| PartialUpload {
            name: "f".into(),
            size: 100,
            sha256: "a".repeat(64),
            have: n,
        };
        assert_eq!(next_start(&e, None, &[]), 0);
        assert_eq!(next_start(&e, Some(&have(30)), &[]), 30);
        assert_eq!(
            next_start(&e, Some(&have(30)), &[rec(30, 30), rec(60, 10)]),
            70
        );
        assert_eq!(
            next_start(&e, Some(&have(30)), &[rec(70, 10)]),
            30,
            "a gap stops it"
        );
        let mut other = have(90);
        other.sha256 = "b".repeat(64);
        assert_eq!(next_start(&e, Some(&other), &[]), 0, "another version");
    }
}
