//! Content the destination already has is never carried: when a missing
//! file's size and SHA-256 match a file DESTDB lists (a rename, a move, a
//! copy), or a file this trip carries anyway (a duplicate at the source),
//! `fetch` leaves an instruction in `COURIER/.bitfog/copies.jsonl` instead
//! of the bytes, and `store` asks the destination server to make the file
//! from its own copy (`PUT` with `X-Bitfog-From`).
//!
//! Memory stays small on large trees: DESTDB is indexed by the first 8
//! bytes of each hash with the line's offset (about 32 bytes a file), and
//! instructions go to a file as the merge finds them, in name order.

use crate::beneath::Dir;
use crate::courier::{COPIES, CopyInstr, LineIndex};
use crate::error::{Error, Result};
use crate::wire::manifest::Entry;
use crate::wire::paths::name_cmp;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, Write};
use std::path::Path;

/// The first 8 bytes of a hex SHA-256, as a map key.
fn key(sha: &str) -> Option<u64> {
    u64::from_str_radix(sha.get(..16)?, 16).ok()
}

/// DESTDB's files by hash.
pub(crate) struct DestIndex(LineIndex);

impl DestIndex {
    /// Indexes the files of the manifest at `db` that carry a hash. A
    /// line that does not parse is left out (the merge reports it).
    pub(crate) fn open(db: &Path) -> DestIndex {
        DestIndex(LineIndex::from_file(
            crate::wire::manifest::open_input(db).ok(),
            |e: &Entry| {
                e.linkdest.is_none().then_some(())?;
                key(e.sha256.as_deref()?)
            },
        ))
    }

    /// A destination file with the content of `e`, if DESTDB lists one.
    pub(crate) fn find(&self, e: &Entry) -> Option<String> {
        let sha = e.sha256.as_deref()?;
        let d: Entry = self.0.get(key(sha)?)?;
        (d.size == e.size && d.sha256.as_deref() == Some(sha) && d.name != e.name).then_some(d.name)
    }
}

/// Collects the instructions of one `fetch`.
pub(crate) struct Instructions {
    /// The needed and held files, for `duplicates`.
    pub(crate) twins: Twins,
    /// Copies from the destination's own files, in name order.
    dir: Dir,
    out: BufWriter<File>,
    pub(crate) from_dest: u64,
}

/// Finds the files of a trip that share content: each needed file's hash
/// (first 16 bytes; a false match needs a 128-bit collision) and index, 20
/// bytes a file, sorted once the merge is done.
#[derive(Default)]
pub(crate) struct Twins {
    seen: Vec<([u8; 16], u32)>,
}

/// Where the copies from the destination's files wait, in name order.
const TMP: &str = "copies.jsonl.tmp";

/// Marks a held file's index in `Twins::seen`.
const HELD: u32 = 1 << 31;

/// Where a duplicate's content is: a file the courier holds, or a needed
/// file (both by the caller's index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Held(usize),
    Needed(usize),
}

fn key128(sha: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(sha.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Twins {
    /// Notes a needed file (spool index `i`) for `duplicates`.
    pub(crate) fn needed(&mut self, e: &Entry, i: usize) {
        self.note(e, i, 0);
    }

    /// Notes a file the courier holds (index `i` in the caller's list of
    /// held files): a needed duplicate of it is made from it.
    pub(crate) fn held(&mut self, e: &Entry, i: usize) {
        self.note(e, i, HELD);
    }

    fn note(&mut self, e: &Entry, i: usize, flag: u32) {
        let i = u32::try_from(i).ok().filter(|i| i & HELD == 0);
        if let (Some(k), Some(i)) = (e.sha256.as_deref().and_then(key128), i) {
            self.seen.push((k, i | flag));
        }
    }

    /// The needed files whose content another file of the trip has, as
    /// (duplicate, original) in duplicate order. A duplicate is a needed
    /// index; its original is a held file (`Origin::Held`) when the
    /// courier has one, else the first needed file with that content. The
    /// caller carries the original and leaves an instruction for each
    /// duplicate once the original is in the courier.
    pub(crate) fn duplicates(&mut self) -> Vec<(usize, Origin)> {
        let mut seen = std::mem::take(&mut self.seen);
        seen.sort_unstable();
        let mut dups = Vec::new();
        for run in seen.chunk_by(|a, b| a.0 == b.0) {
            // Needed indexes sort before held ones (the flag is the top bit).
            let origin = match run.iter().find(|(_, i)| i & HELD != 0) {
                Some(&(_, i)) => Origin::Held((i & !HELD) as usize),
                None => Origin::Needed(run[0].1 as usize),
            };
            for &(_, i) in run.iter().filter(|(_, i)| i & HELD == 0) {
                if origin != Origin::Needed(i as usize) {
                    dups.push((i as usize, origin));
                }
            }
        }
        dups.sort_unstable_by_key(|&(d, _)| d);
        dups
    }
}

impl Instructions {
    /// Collects into the courier's state directory `state`.
    pub(crate) fn new(state: &Dir) -> Result<Instructions> {
        let what = |e: io::Error| Error::io("the courier's copy instructions", &e);
        let dir = state.try_clone().map_err(what)?;
        let file = dir.create_fresh(TMP.as_bytes()).map_err(what)?;
        Ok(Instructions {
            twins: Twins::default(),
            dir,
            out: BufWriter::new(file),
            from_dest: 0,
        })
    }

    /// True when the destination has the content of `e` under another
    /// name; the instruction is written now.
    pub(crate) fn at_dest(&mut self, e: &Entry, dest: &DestIndex) -> Result<bool> {
        match dest.find(e) {
            Some(from) => {
                self.write(e, from)?;
                self.from_dest += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn write(&mut self, e: &Entry, from: String) -> Result<()> {
        let rec = CopyInstr {
            name: e.name.clone(),
            from,
            size: e.size,
            sha256: e.sha256.clone().unwrap_or_default(),
            link: false,
        };
        let what = |e: io::Error| Error::io("the courier's copy instructions", &e);
        serde_json::to_writer(&mut self.out, &rec).map_err(|e| what(e.into()))?;
        self.out.write_all(b"\n").map_err(what)
    }

    /// Writes `COPIES`: the copies from the destination's files, merged in
    /// name order with `dups` (instructions for duplicates, in name
    /// order).
    pub(crate) fn finish(&mut self, dups: Vec<CopyInstr>) -> Result<()> {
        let what = |e: io::Error| Error::io("the courier's copy instructions", &e);
        self.out.flush().map_err(what)?;
        let new = format!("{COPIES}.new");
        let mut out = BufWriter::new(self.dir.create_fresh(new.as_bytes()).map_err(what)?);
        let mut dups = dups.into_iter().peekable();
        let mut written = self.out.get_ref().try_clone().map_err(what)?;
        written.seek(io::SeekFrom::Start(0)).map_err(what)?;
        let lines = BufReader::new(written).lines();
        for line in lines {
            let line = line.map_err(what)?;
            let rec: CopyInstr = serde_json::from_str(&line).map_err(|e| what(e.into()))?;
            while let Some(d) = dups.next_if(|d| name_cmp(&d.name, &rec.name).is_lt()) {
                serde_json::to_writer(&mut out, &d).map_err(|e| what(e.into()))?;
                out.write_all(b"\n").map_err(what)?;
            }
            out.write_all(line.as_bytes()).map_err(what)?;
            out.write_all(b"\n").map_err(what)?;
        }
        for d in dups {
            serde_json::to_writer(&mut out, &d).map_err(|e| what(e.into()))?;
            out.write_all(b"\n").map_err(what)?;
        }
        let file = out.into_inner().map_err(|e| what(e.into_error()))?;
        file.sync_all().map_err(what)?;
        self.dir
            .rename(new.as_bytes(), COPIES.as_bytes())
            .map_err(what)?;
        Ok(())
    }
}

impl Drop for Instructions {
    fn drop(&mut self) {
        let _ = self.dir.unlink(TMP.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn file(name: &str, size: u64, sha: &str) -> Entry {
        Entry {
            name: name.into(),
            size,
            mode: 0o644,
            mtime: 1,
            sha256: Some(sha.into()),
            linkdest: None,
            alloc: None,
            meta: Default::default(),
        }
    }

    #[test]
    fn finds_renames_and_duplicates_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            "a".repeat(64),
            "b".repeat(64),
            format!("{}{}", "a".repeat(16), "c".repeat(48)),
        );
        let db = dir.path().join("dest.db");
        let lines = [
            serde_json::to_string(&file("old/x", 5, &a)).unwrap(),
            serde_json::to_string(&file("same", 5, &b)).unwrap(),
        ];
        fs::write(
            &db,
            format!("{{\"bitfog\":1}}\n{}\n{}\n", lines[0], lines[1]),
        )
        .unwrap();
        let dest = DestIndex::open(&db);
        assert_eq!(dest.find(&file("new/x", 5, &a)).as_deref(), Some("old/x"));
        assert_eq!(dest.find(&file("new/x", 6, &a)), None, "size differs");
        assert_eq!(
            dest.find(&file("new/x", 5, &c)),
            None,
            "same 8-byte key, other hash"
        );
        assert_eq!(dest.find(&file("same", 5, &b)), None, "not from itself");

        let mut ins = Instructions::new(&Dir::open_path(dir.path()).unwrap()).unwrap();
        let orig = file("d1", 9, &c);
        assert!(!ins.at_dest(&orig, &dest).unwrap());
        ins.twins.needed(&orig, 0);
        ins.twins.needed(&file("d2", 9, &c), 1);
        assert!(ins.at_dest(&file("n", 5, &a), &dest).unwrap());
        ins.twins.needed(&file("other", 9, &b), 2);
        ins.twins.needed(&file("z", 9, &c), 3);
        ins.twins.held(&file("held", 5, &b), 0);
        assert_eq!(
            ins.twins.duplicates(),
            [
                (1, Origin::Needed(0)),
                (2, Origin::Held(0)),
                (3, Origin::Needed(0))
            ]
        );
        let dup = |name: &str| CopyInstr {
            name: name.into(),
            from: "d1".into(),
            size: 9,
            sha256: c.clone(),
            link: false,
        };
        ins.finish(vec![dup("d2"), dup("z")]).unwrap();
        let text = fs::read_to_string(dir.path().join(COPIES)).unwrap();
        let names: Vec<CopyInstr> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(&str, &str)> = names
            .iter()
            .map(|r| (r.name.as_str(), r.from.as_str()))
            .collect();
        assert_eq!(got, [("d2", "d1"), ("n", "old/x"), ("z", "d1")]);
    }
}
