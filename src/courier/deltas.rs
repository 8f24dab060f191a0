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

use crate::courier::{Courier, NewFile, Plain};
use crate::digest::Hasher;
use crate::wire::delta::{self, DeltaHeader};
use crate::wire::manifest::Entry;
use std::collections::HashMap;
use std::io::{self, BufReader};

const DIR: &str = "deltas";

fn id(courier: &Courier, name: &str, sha: &str, base_sha: &str) -> String {
    if let Some(s) = courier.sealed() {
        return s.name_for(&format!("delta\0{name}\0{sha}\0{base_sha}"))[..24].to_string();
    }
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
            .and_then(|(f, _)| delta::verify(BufReader::new(f)))
            .is_ok_and(|h| h == self.header)
    }

    /// True when it applies to this version at the destination.
    pub(crate) fn applies_to(&self, size: u64, sha256: Option<&str>) -> bool {
        self.header.base_size == size && sha256.is_none_or(|h| h == self.header.base_sha256)
    }
}

/// Opens the delta `file` of `.bitfog/deltas/` (a regular file, never
/// through a link), as its plain bytes and their length.
pub(crate) fn open(courier: &Courier, file: &str) -> io::Result<(Plain, u64)> {
    let f = courier
        .sub(DIR, false)?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
        .open_file(file.as_bytes())?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    courier.plain(f)
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
        // A sealed delta the keeper cannot read is made again.
        let Ok(Some(file)) = dir.open_file(file_name.as_bytes()) else {
            continue;
        };
        let Ok((file, len)) = courier.plain(file) else {
            continue;
        };
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

/// A new delta of `name` (version `sha`) against the destination's
/// version `base_sha`, to be written and then kept (see `NewFile::keep`).
pub(crate) fn create(
    courier: &Courier,
    name: &str,
    sha: &str,
    base_sha: &str,
) -> io::Result<NewFile> {
    NewFile::create(
        courier,
        DIR,
        format!("{}.delta", id(courier, name, sha, base_sha)),
    )
}
