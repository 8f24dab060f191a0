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

use crate::age::Recipient;
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
    /// A sealed courier's readers.
    seal: Option<Vec<Recipient>>,
}

/// Finds the files of a trip that share content: each needed file's hash
/// (first 16 bytes; a false match needs a 128-bit collision) and index, 20
/// bytes a file, sorted once the merge is done. Past `RUN` of them, each
/// batch is sorted and written to an anonymous scratch file and the
/// batches are merged at the end, so memory holds one batch (20 MiB)
/// however many files a tree has. The scratch file goes to the system's
/// temporary directory (never into a courier, which is reached only
/// through descriptors); where none can be made, the keys stay in memory.
pub(crate) struct Twins {
    seen: Vec<Key>,
    /// The sorted batches on disk, as (first record, records).
    spill: Option<(File, Vec<(u64, u64)>)>,
    /// Where the scratch file is made.
    spill_dir: std::path::PathBuf,
    run: usize,
}

/// A hash prefix and an index (`HELD` marks a held file's).
type Key = ([u8; 16], u32);

/// Keys in memory before a batch goes to disk.
const RUN: usize = 1 << 20;

impl Default for Twins {
    fn default() -> Twins {
        Twins::spilling_to(std::env::temp_dir(), RUN)
    }
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
    crate::digest::unhex(sha.get(..32)?)
}

impl Twins {
    /// Spills batches of `run` keys into an anonymous file in `dir`.
    pub(crate) fn spilling_to(dir: std::path::PathBuf, run: usize) -> Twins {
        Twins {
            seen: Vec::new(),
            spill: None,
            spill_dir: dir,
            run: run.max(1),
        }
    }

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
            if self.seen.len() >= self.run {
                self.write_batch();
            }
        }
    }

    /// Sorts the batch in memory and writes it to the scratch file; if
    /// that cannot be done, the keys stay in memory.
    fn write_batch(&mut self) {
        if self.spill.is_none() {
            match crate::beneath::anonymous_file(&self.spill_dir) {
                Ok(f) => self.spill = Some((f, Vec::new())),
                Err(_) => {
                    self.run = usize::MAX;
                    return;
                }
            }
        }
        let Some((file, runs)) = self.spill.as_mut() else {
            return;
        };
        self.seen.sort_unstable();
        let start = runs.last().map_or(0, |&(s, n)| s + n);
        let written = (|| -> io::Result<()> {
            let mut out = BufWriter::new(&*file);
            out.seek(io::SeekFrom::Start(start * 20))?;
            for (k, i) in &self.seen {
                out.write_all(k)?;
                out.write_all(&i.to_le_bytes())?;
            }
            out.flush()
        })();
        match written {
            Ok(()) => {
                runs.push((start, self.seen.len() as u64));
                self.seen.clear();
            }
            Err(_) => self.run = usize::MAX,
        }
    }

    /// Every key, in order: the batches on disk merged with the one in
    /// memory.
    fn sorted(&mut self) -> Box<dyn Iterator<Item = Key> + '_> {
        let mut seen = std::mem::take(&mut self.seen);
        seen.sort_unstable();
        let Some((file, runs)) = self.spill.as_ref() else {
            return Box::new(seen.into_iter());
        };
        let mut sources: Vec<Box<dyn Iterator<Item = Key> + '_>> = vec![Box::new(seen.into_iter())];
        for &(start, len) in runs {
            // Each batch read at its own offset (pread): the readers share
            // one file.
            let (mut at, end) = (start * 20, (start + len) * 20);
            let mut buf: Vec<u8> = Vec::new();
            let mut pos = 0;
            sources.push(Box::new(std::iter::from_fn(move || {
                if pos == buf.len() {
                    if at >= end {
                        return None;
                    }
                    let n = (end - at).min(20 * 3276) as usize;
                    buf.resize(n, 0);
                    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, at).ok()?;
                    at += n as u64;
                    pos = 0;
                }
                let rec = &buf[pos..pos + 20];
                pos += 20;
                let mut k = [0u8; 16];
                k.copy_from_slice(&rec[..16]);
                Some((k, u32::from_le_bytes([rec[16], rec[17], rec[18], rec[19]])))
            })));
        }
        Box::new(Merge::new(sources))
    }

    /// The needed files whose content another file of the trip has, as
    /// (duplicate, original) in duplicate order. A duplicate is a needed
    /// index; its original is a held file (`Origin::Held`) when the
    /// courier has one, else the first needed file with that content. The
    /// caller carries the original and leaves an instruction for each
    /// duplicate once the original is in the courier.
    pub(crate) fn duplicates(&mut self) -> Vec<(usize, Origin)> {
        let mut dups = Vec::new();
        // One content's indexes at a time: needed ones sort before held
        // ones (the flag is the top bit).
        let mut key: Option<[u8; 16]> = None;
        let mut group: Vec<u32> = Vec::new();
        let flush = |group: &mut Vec<u32>, dups: &mut Vec<(usize, Origin)>| {
            let origin = match group.iter().find(|&&i| i & HELD != 0) {
                Some(&i) => Origin::Held((i & !HELD) as usize),
                None => Origin::Needed(group[0] as usize),
            };
            for &i in group.iter().filter(|&&i| i & HELD == 0) {
                if origin != Origin::Needed(i as usize) {
                    dups.push((i as usize, origin));
                }
            }
            group.clear();
        };
        for (k, i) in self.sorted() {
            if key != Some(k) && !group.is_empty() {
                flush(&mut group, &mut dups);
            }
            key = Some(k);
            group.push(i);
        }
        if !group.is_empty() {
            flush(&mut group, &mut dups);
        }
        self.spill = None;
        dups.sort_unstable_by_key(|&(d, _)| d);
        dups
    }
}

/// Merges sorted streams into one sorted stream.
struct Merge<'a> {
    sources: Vec<Box<dyn Iterator<Item = Key> + 'a>>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(Key, usize)>>,
}

impl<'a> Merge<'a> {
    fn new(mut sources: Vec<Box<dyn Iterator<Item = Key> + 'a>>) -> Merge<'a> {
        let mut heap = std::collections::BinaryHeap::new();
        for (n, s) in sources.iter_mut().enumerate() {
            if let Some(k) = s.next() {
                heap.push(std::cmp::Reverse((k, n)));
            }
        }
        Merge { sources, heap }
    }
}

impl Iterator for Merge<'_> {
    type Item = Key;
    fn next(&mut self) -> Option<Key> {
        let std::cmp::Reverse((k, n)) = self.heap.pop()?;
        if let Some(next) = self.sources[n].next() {
            self.heap.push(std::cmp::Reverse((next, n)));
        }
        Some(k)
    }
}

impl Instructions {
    /// Collects into the courier's state directory `state`.
    /// On a sealed courier (`seal`: its readers) they are collected in
    /// the temporary directory and written encrypted.
    pub(crate) fn new(state: &Dir, seal: Option<&[Recipient]>) -> Result<Instructions> {
        let what = |e: io::Error| Error::io("the courier's copy instructions", &e);
        let dir = state.try_clone().map_err(what)?;
        let file = match seal {
            Some(_) => crate::beneath::anonymous_file(&std::env::temp_dir()).map_err(what)?,
            None => dir.create_fresh(TMP.as_bytes()).map_err(what)?,
        };
        Ok(Instructions {
            twins: Twins::default(),
            dir,
            out: BufWriter::new(file),
            from_dest: 0,
            seal: seal.map(<[Recipient]>::to_vec),
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
        let file = self.dir.create_fresh(new.as_bytes()).map_err(what)?;
        let mut out =
            BufWriter::new(crate::age::Sealed::new(file, self.seal.as_deref()).map_err(what)?);
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
        file.finish().map_err(what)?.sync_all().map_err(what)?;
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

    proptest::proptest! {
        /// Batches spilled to disk and merged find exactly the duplicates
        /// one sort in memory finds.
        #[test]
        fn spilled_batches_find_the_same_duplicates(
            files in proptest::collection::vec((0u8..6, proptest::bool::ANY), 0..60),
            run in 1usize..8,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut small = Twins::spilling_to(dir.path().to_path_buf(), run);
            let mut whole = Twins::spilling_to(dir.path().to_path_buf(), usize::MAX);
            for (i, &(content, held)) in files.iter().enumerate() {
                let e = file(&format!("f{i}"), 1, &format!("{content:x}").repeat(64));
                if held {
                    small.held(&e, i);
                    whole.held(&e, i);
                } else {
                    small.needed(&e, i);
                    whole.needed(&e, i);
                }
            }
            proptest::prop_assert_eq!(small.duplicates(), whole.duplicates());
        }
    }

    #[test]
    fn batches_bigger_than_a_read_merge_whole() {
        // Batches of 5,000 keys (100,000 bytes: more than one read each).
        let dir = tempfile::tempdir().unwrap();
        let mut t = Twins::spilling_to(dir.path().to_path_buf(), 5_000);
        for i in 0..12_000 {
            let content = format!("{:032x}{:032x}", i % 4_000, 0);
            t.needed(&file(&format!("f{i}"), 1, &content), i);
        }
        let dups = t.duplicates();
        assert_eq!(dups.len(), 8_000);
        assert!(dups.iter().all(|&(d, o)| o == Origin::Needed(d % 4_000)));
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

        let mut ins = Instructions::new(&Dir::open_path(dir.path()).unwrap(), None).unwrap();
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
