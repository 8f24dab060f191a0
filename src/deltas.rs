//! Deltas in the courier: made by `fetch`, sent by `store`.
//!
//! When DESTDB comes with signatures (`builddb --signatures`, `DB.sig`)
//! and the destination has an older version of a file the source changed,
//! `fetch` reads the new version from the source, computes its delta
//! against the old version's signature (see `delta`) and keeps it in
//! `COURIER/.bitfog/deltas/ID.delta` when it is smaller than the file.
//! A delta is self-describing (its header names the file, both versions
//! and its own checksum), so nothing else records it. `store` checks it
//! and sends it to the destination, which patches the old file into a
//! temporary one and publishes the result only when its SHA-256 matches.

use crate::client::{AreaUrl, Client};
use crate::courier::Courier;
use crate::delta::{self, DeltaHeader, Encoder, Signature};
use crate::digest::{CopyError, Hasher, copy_hashing};
use crate::error::{describe_io, is_disk_full};
use crate::manifest::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::sync::atomic::{AtomicU64, Ordering};

const DIR: &str = "deltas";

fn id(name: &str, sha: &str, base_sha: &str) -> String {
    let mut h = Hasher::new();
    h.update(format!("{name}\0{sha}\0{base_sha}").as_bytes());
    h.hex()[..24].to_string()
}

/// A complete delta in the courier.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// Its file name in `.bitfog/deltas/`.
    pub(crate) file: String,
    pub(crate) header: DeltaHeader,
    pub(crate) len: u64,
}

impl Held {
    /// True when this delta makes the listed version of `e`.
    pub(crate) fn makes(&self, e: &Entry) -> bool {
        self.header.name == e.name
            && self.header.size == e.size
            && e.sha256.as_ref() == Some(&self.header.sha256)
    }

    /// True when the whole delta reads back sound (its end checksum).
    pub(crate) fn verify(&self, courier: &Courier) -> bool {
        open(courier, &self.file)
            .and_then(|f| delta::verify(BufReader::new(f)))
            .is_ok_and(|h| h == self.header)
    }

    /// True when it applies to this version at the destination.
    pub(crate) fn applies_to(&self, size: u64, sha256: Option<&str>) -> bool {
        self.header.base_size == size && sha256.is_none_or(|h| h == self.header.base_sha256)
    }
}

/// Opens the delta `file` of `.bitfog/deltas/` (a regular file, never
/// through a link).
pub(crate) fn open(courier: &Courier, file: &str) -> io::Result<File> {
    courier
        .sub(DIR, false)?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
        .open_file(file.as_bytes())?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// The complete deltas in the courier, by file name (their headers only;
/// `delta::verify` checks one whole).
pub(crate) fn held(courier: &Courier) -> HashMap<String, Held> {
    let mut out = HashMap::new();
    let Ok(Some(dir)) = courier.sub(DIR, false) else {
        return out;
    };
    for (name, _) in dir.names().unwrap_or_default() {
        let Ok(file_name) = String::from_utf8(name) else {
            continue;
        };
        if !file_name.ends_with(".delta") {
            continue;
        }
        let Ok(Some(file)) = dir.open_file(file_name.as_bytes()) else {
            continue;
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if let Ok(header) = delta::read_header(&mut BufReader::new(file), &mut Hasher::new()) {
            let held = Held {
                file: file_name,
                header,
                len,
            };
            out.insert(held.header.name.clone(), held);
        }
    }
    out
}

/// Bytes the deltas take (for the budget), complete or not.
pub(crate) fn usage(courier: &Courier) -> u64 {
    courier
        .sub(DIR, false)
        .ok()
        .flatten()
        .map_or(0, |d| crate::courier::dir_bytes(&d, |_| true))
}

/// Removes everything in the deltas directory but `keep` (file names).
pub(crate) fn clean(courier: &Courier, keep: &[String]) {
    let Ok(Some(dir)) = courier.sub(DIR, false) else {
        return;
    };
    for (name, _) in dir.names().unwrap_or_default() {
        if !keep.iter().any(|k| k.as_bytes() == name.as_slice()) {
            let _ = dir.unlink(&name);
        }
    }
}

/// Why no delta was kept.
pub(crate) enum NoDelta {
    /// It would not have been smaller than its limit.
    TooBig,
    DiskFull,
    Failed(String),
}

/// Reads the listed version of `e` from the source and keeps its delta
/// against the signature of the destination's version (`base`: its
/// SHA-256 and signature) if it stays
/// within `limit` bytes. The bytes read are checked against the listing's
/// SHA-256: a file that changed at the source leaves no delta.
pub(crate) fn make(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    (base_sha, sig): (&str, &Signature),
    limit: u64,
    wire: &AtomicU64,
) -> Result<u64, NoDelta> {
    let io_fail = |what: &str, err: &io::Error| {
        if is_disk_full(err) {
            NoDelta::DiskFull
        } else {
            NoDelta::Failed(format!("{what}: {}", describe_io(err)))
        }
    };
    let sha = e
        .sha256
        .clone()
        .ok_or_else(|| NoDelta::Failed("a delta needs the file's SHA-256".into()))?;
    let d = courier
        .sub(DIR, true)
        .map_err(|err| io_fail("cannot create the deltas directory", &err))?
        .ok_or_else(|| NoDelta::Failed("no deltas directory".into()))?;
    let base = id(&e.name, &sha, base_sha);
    let (path, tmp) = (format!("{base}.delta"), format!("{base}.tmp"));
    let mut dl = client
        .get(src, &e.name, 0, None)
        .map_err(|err| NoDelta::Failed(err.to_string()))?;
    if dl.status != 200 || dl.content_length.is_some_and(|n| n != e.size) {
        return Err(NoDelta::Failed(
            "the source no longer has the listed version".into(),
        ));
    }
    if dl.last_modified.is_some_and(|t| t != e.mtime) {
        return Err(NoDelta::Failed(
            "modified at the source since the listing".into(),
        ));
    }
    let header = DeltaHeader {
        bitfog_delta: 1,
        name: e.name.clone(),
        size: e.size,
        sha256: sha.clone(),
        mode: e.mode & 0o777,
        mtime: e.mtime,
        base_size: sig.size,
        base_sha256: base_sha.to_string(),
    };
    let file = d
        .create_fresh(tmp.as_bytes())
        .map_err(|err| io_fail("cannot create the delta", &err))?;
    let result = (|| {
        let out = io::BufWriter::with_capacity(1 << 20, &file);
        let mut enc = Encoder::new(sig, &header, out, limit).map_err(|err| write_fail(&err))?;
        let mut hasher = Hasher::new();
        let n = copy_hashing(&mut dl.body, &mut enc, &mut hasher, e.size, |n| {
            wire.fetch_add(n, Ordering::Relaxed);
        })
        .map_err(|err| match err {
            CopyError::Write(err) => write_fail(&err),
            CopyError::Read(err) => {
                NoDelta::Failed(format!("download failed: {}", describe_io(&err)))
            }
        })?;
        if n != e.size {
            return Err(NoDelta::Failed(format!(
                "download cut short after {n} of {} bytes",
                e.size
            )));
        }
        if hasher.hex() != sha {
            return Err(NoDelta::Failed(
                "changed at the source while it was read; not kept".into(),
            ));
        }
        let (mut out, len) = enc.finish().map_err(|err| write_fail(&err))?;
        out.flush().map_err(|err| write_fail(&err))?;
        drop(out);
        file.sync_all().map_err(|err| write_fail(&err))?;
        Ok(len)
    })();
    let len = match result {
        Ok(len) => len,
        Err(why) => {
            let _ = d.unlink(tmp.as_bytes());
            return Err(why);
        }
    };
    if let Err(err) = d.rename(tmp.as_bytes(), path.as_bytes()) {
        let _ = d.unlink(tmp.as_bytes());
        return Err(io_fail("cannot keep the delta", &err));
    }
    d.sync();
    Ok(len)
}

fn write_fail(err: &io::Error) -> NoDelta {
    if err.to_string() == delta::TOO_BIG {
        NoDelta::TooBig
    } else if is_disk_full(err) {
        NoDelta::DiskFull
    } else {
        NoDelta::Failed(format!("cannot write the delta: {}", describe_io(err)))
    }
}
