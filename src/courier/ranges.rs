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
use crate::courier::{Courier, NewFile};
use crate::digest::Hasher;
use crate::wire::manifest::{Entry, PartialUpload};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;

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

fn id(courier: &Courier, name: &str, size: u64, sha: &str) -> String {
    if let Some(s) = courier.sealed() {
        return s.name_for(&format!("range\0{name}\0{size}\0{sha}"))[..24].to_string();
    }
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
        let Some(rec) = courier.read_record::<RangeRecord>(&dir, &format!("{base}.json")) else {
            continue;
        };
        let sound = dir
            .stat(data.as_bytes())
            .ok()
            .flatten()
            .is_some_and(|m| m.kind == Kind::File && m.size == courier.cost(rec.len));
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
/// True when the range data file `data` holds the bytes `rec` describes
/// (its length and SHA-256).
pub(crate) fn verify(courier: &Courier, data: &str, rec: &RangeRecord) -> bool {
    let Ok(Some(dir)) = courier.sub(DIR, false) else {
        return false;
    };
    let Ok(Some(f)) = dir.open_file(data.as_bytes()) else {
        return false;
    };
    let Ok((f, _)) = courier.plain(f) else {
        return false;
    };
    crate::digest::hash_reader(f).is_ok_and(|(h, n)| n == rec.len && h == rec.range_sha256)
}

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

/// A new range of `e` from `start`, to be written and then kept with
/// its record (see `NewFile::keep`).
pub(crate) fn create(courier: &Courier, e: &Entry, sha: &str, start: u64) -> io::Result<NewFile> {
    let base = format!("{}-{start}", id(courier, &e.name, e.size, sha));
    NewFile::create(courier, DIR, format!("{base}.range"))
}

/// Keeps a range written through `create`, with its record.
pub(crate) fn keep(courier: &Courier, range: NewFile, rec: &RangeRecord) -> io::Result<()> {
    let base = format!(
        "{}-{}",
        id(courier, &rec.name, rec.size, &rec.sha256),
        rec.start
    );
    let record = courier.seal_record(&serde_json::to_vec(rec)?)?;
    range.keep(Some((&format!("{base}.json"), &record)))
}

/// Opens the range data file `data` (a regular file, never a link), as
/// its plain bytes and their length.
pub(crate) fn open(courier: &Courier, data: &str) -> io::Result<(crate::courier::Plain, u64)> {
    let f = courier
        .sub(DIR, false)?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
        .open_file(data.as_bytes())?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    courier.plain(f)
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
            meta: Default::default(),
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
