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
use crate::paths::name_cmp;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
struct Record {
    name: String,
    size: u64,
    id: [i128; 4],
    sha256: String,
}

/// Where an area's cache lives.
#[derive(Debug, Clone)]
pub(crate) struct CacheFile {
    path: PathBuf,
}

impl CacheFile {
    /// The cache file for the area at `root` (named after the area and a
    /// hash of its path, so two configurations never share one).
    pub(crate) fn for_area(dir: &Path, area: &str, root: &Path) -> CacheFile {
        let mut h = crate::digest::Hasher::new();
        h.update(root.as_os_str().as_encoded_bytes());
        CacheFile {
            path: dir.join(format!("{area}.{}.hashes", &h.hex()[..16])),
        }
    }

    /// Opens the previous listing's records (empty when there are none).
    pub(crate) fn reader(&self) -> Lookup {
        Lookup {
            lines: File::open(&self.path)
                .ok()
                .map(|f| BufReader::new(f).lines()),
            next: None,
        }
    }

    /// Starts the next cache file; `commit` puts it in place.
    pub(crate) fn writer(&self) -> Option<Update> {
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let file = File::create(&tmp).ok()?;
        Some(Update {
            tmp,
            path: self.path.clone(),
            out: Some(BufWriter::new(file)),
        })
    }
}

/// Looks names up in a cache file, in name order.
pub(crate) struct Lookup {
    lines: Option<std::io::Lines<BufReader<File>>>,
    next: Option<Record>,
}

impl Lookup {
    /// The cached hash of `name` if its size and identity are unchanged.
    /// Names must be asked in contract order.
    pub(crate) fn get(&mut self, name: &str, size: u64, id: &[i128; 4]) -> Option<String> {
        loop {
            if self.next.is_none() {
                let line = self.lines.as_mut()?.next()?.ok()?;
                self.next = Some(serde_json::from_str(&line).ok()?);
            }
            let rec = self.next.as_ref()?;
            match name_cmp(&rec.name, name) {
                Ordering::Less => self.next = None,
                Ordering::Greater => return None,
                Ordering::Equal => {
                    let rec = self.next.take()?;
                    return (rec.size == size && rec.id == *id && is_sha256_hex(&rec.sha256))
                        .then_some(rec.sha256);
                }
            }
        }
    }
}

/// The cache file being written by a listing.
pub(crate) struct Update {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl Update {
    pub(crate) fn add(&mut self, name: &str, size: u64, id: &[i128; 4], sha256: &str) {
        let rec = Record {
            name: name.to_string(),
            size,
            id: *id,
            sha256: sha256.to_string(),
        };
        if let Some(out) = self.out.as_mut() {
            let ok = serde_json::to_writer(&mut *out, &rec).is_ok() && out.write_all(b"\n").is_ok();
            if !ok {
                self.out = None;
            }
        }
    }

    /// Puts the new cache in place (after a complete listing).
    pub(crate) fn commit(mut self) -> io::Result<()> {
        let out = self
            .out
            .take()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_only_unchanged_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheFile::for_area(dir.path(), "a", Path::new("/x"));
        let h = "a".repeat(64);
        let mut w = c.writer().unwrap();
        for name in ["a", "a/b", "a.txt", "b"] {
            w.add(name, 1, &[1, 2, 3, 4], &h);
        }
        w.commit().unwrap();
        let mut r = c.reader();
        assert_eq!(r.get("a", 1, &[1, 2, 3, 4]).as_deref(), Some(h.as_str()));
        assert_eq!(r.get("a/b", 1, &[1, 2, 3, 5]), None, "ctime changed");
        assert_eq!(r.get("a.txt", 2, &[1, 2, 3, 4]), None, "size changed");
        assert_eq!(r.get("aa", 1, &[1, 2, 3, 4]), None, "not cached");
        assert_eq!(r.get("b", 1, &[1, 2, 3, 4]).as_deref(), Some(h.as_str()));
        assert_eq!(r.get("c", 1, &[1, 2, 3, 4]), None);
        // An update dropped before commit leaves the old cache alone.
        drop(c.writer().unwrap());
        assert_eq!(
            c.reader().get("a", 1, &[1, 2, 3, 4]).as_deref(),
            Some(h.as_str())
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
