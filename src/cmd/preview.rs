//! What the next trip would carry, decided without moving a byte: `plan`
//! (no courier) and `fetch --dry-run` (the courier as it stands) print the
//! same decision, made by the same code in the same order as `fetch`:
//! ranges of files under way, deltas, whole files largest first, then the
//! largest file bigger than a trip starts as a range. Renames and
//! duplicates are instructions (no bytes).
//!
//! Memory holds 10 bytes a missing file (its size, what is decided about
//! it) and 20 of each with a hash (to find duplicates); the entries wait in
//! an anonymous spool file.

use crate::client::{AreaUrl, Client};
use crate::cmd::fetch::{Old, destdb_path, each_need};
use crate::courier::copies::{DestIndex, Origin, Twins};
use crate::courier::ranges::{self, RangeRecord};
use crate::courier::{Carried, Courier, Spool, deltas};
use crate::error::{Error, Result};
use crate::plan::{self, Need};
use crate::ui::Ui;
use crate::wire::delta::SigIndex;
use crate::wire::manifest::{Entry, PartialUpload};
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

/// What the next trip does with one missing file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Act {
    /// Downloaded whole.
    Carry,
    /// Made at the destination from a file it has or the courier carries
    /// (a rename, a move, a duplicate): an instruction, no bytes.
    Copy,
    /// A delta against the destination's older version.
    Delta,
    /// A range of a file bigger than what the trip has left.
    Range,
    /// The courier holds it already (`fetch --dry-run`).
    Held,
    /// Left for a later trip.
    Later,
}

impl Act {
    pub(crate) fn word(self) -> &'static str {
        match self {
            Act::Carry => "carry",
            Act::Copy => "copy",
            Act::Delta => "delta",
            Act::Range => "range",
            Act::Held => "held",
            Act::Later => "later",
        }
    }
}

/// How the survey found a missing file, before the budget is applied.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    /// The destination has its content under another name.
    AtDest,
    /// The courier holds it (whole or as a delta).
    Held,
    /// Under way: begun at the destination or held as ranges.
    UnderWay,
    /// Changed, and the destination has a signed older version.
    DeltaBase,
    /// Needed whole.
    Needed,
}

/// The decision, file by file (same index as the spool).
pub(crate) struct Preview {
    files: Spool<Entry>,
    sizes: Vec<u64>,
    acts: Vec<Act>,
    /// Files whose content another file of the trip has, with where it
    /// is, in index order.
    dups: Vec<(usize, Origin)>,
    /// Bytes of a range this trip carries, by index.
    range_len: HashMap<usize, u64>,
    /// Bytes a range file still lacks after this trip, by index.
    range_left: HashMap<usize, u64>,
    /// Courier files the destination no longer lacks (`fetch --dry-run`):
    /// a run removes them.
    pub(crate) removed: Vec<(String, u64)>,
    /// Bytes the courier holds that stay.
    pub(crate) held_bytes: u64,
    pub(crate) symlinks: u64,
    pub(crate) refused: u64,
    pub(crate) skipped: u64,
    /// Bytes the trip had to give (the budget less what stays in the
    /// courier; `u64::MAX` without a budget).
    pub(crate) room: u64,
}

/// Figures for the summaries.
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Figures {
    /// Whole files and deltas this trip carries (deltas counted at their
    /// file's size, an upper bound: a delta's size is known once made).
    pub(crate) trip_files: u64,
    pub(crate) trip_bytes: u64,
    pub(crate) delta_files: u64,
    /// Ranges this trip carries: their bytes and files.
    pub(crate) range_bytes: u64,
    pub(crate) ranged_files: u64,
    /// Instructions this trip leaves (renames, duplicates).
    pub(crate) instructed_files: u64,
    /// What the courier already holds and keeps.
    pub(crate) held_files: u64,
    /// What is left for later trips (range files by what they still lack).
    pub(crate) later_files: u64,
    pub(crate) later_bytes: u64,
}

/// The courier's side of a dry run: what it holds.
struct Held<'c> {
    courier: &'c Courier,
    log: HashMap<String, Carried>,
    ranges: Vec<(String, RangeRecord)>,
    deltas: HashMap<String, deltas::Held>,
    partials: HashMap<String, u64>,
}

impl Held<'_> {
    fn file_len(&self, name: &str) -> Option<u64> {
        self.courier
            .carried_meta(name)
            .ok()
            .flatten()
            .filter(|m| m.kind == crate::beneath::Kind::File)
            .map(|m| m.size)
    }

    /// True when the courier's file has the size of `e` (a pack, the
    /// size of its data).
    fn sized(&self, e: &Entry) -> bool {
        self.file_len(&e.name)
            .is_some_and(|n| n == e.size || self.courier.is_pack(&e.name))
    }

    fn holds(&self, e: &Entry) -> bool {
        self.log.get(&e.name).is_some_and(|c| c.matches(e)) && self.sized(e)
    }

    fn holds_delta(&self, e: &Entry, base: Option<&(u64, String)>) -> bool {
        let (Some(h), Some((size, sha))) = (self.deltas.get(&e.name), base) else {
            return false;
        };
        h.makes(e) && h.applies_to(*size, Some(sha))
    }
}

fn spool_err(e: io::Error) -> Error {
    Error::io("a scratch file for the plan", &e)
}

/// Decides the next trip for DESTDB and the source `src`, against
/// `courier` as it stands (or an empty one), within `max_bytes`.
pub(crate) fn preview(
    ui: &Ui,
    client: &Client,
    destdb: &Path,
    src: &AreaUrl,
    courier: Option<&Courier>,
    max_bytes: Option<u64>,
) -> Result<Preview> {
    let path = destdb_path(destdb)?;
    let dest_index = DestIndex::open(&path);
    let dest_partials: HashMap<String, PartialUpload> = ranges::by_name(
        crate::wire::manifest::read_end(&path)
            .map(|e| e.partials)
            .unwrap_or_default(),
    );
    let signatures = SigIndex::open(&path).ok().flatten();
    let held = courier.map(|c| Held {
        courier: c,
        log: c.read_log(),
        ranges: ranges::held(c),
        deltas: deltas::held(c),
        partials: c
            .partials()
            .into_iter()
            .filter_map(|p| Some((p.meta?.entry.name, p.len)))
            .collect(),
    });
    let mut p = Preview {
        files: Spool::anonymous().map_err(spool_err)?,
        sizes: Vec::new(),
        acts: Vec::new(),
        dups: Vec::new(),
        range_len: HashMap::new(),
        range_left: HashMap::new(),
        removed: Vec::new(),
        held_bytes: 0,
        symlinks: 0,
        refused: 0,
        skipped: 0,
        room: 0,
    };
    let mut found: Vec<Found> = Vec::new();
    let mut twins = Twins::default();
    let mut kept = std::collections::HashSet::new();
    // Bytes of a partial download each needed file resumes from.
    let mut resume: HashMap<usize, u64> = HashMap::new();
    p.skipped = each_need(ui, client, destdb, src, None, |need, old: Option<Old>| {
        match need {
            Need::File(e) => {
                let base = old.filter(|_| e.sha256.is_some()).and_then(|(size, sha)| {
                    Some((
                        size,
                        signatures.as_ref()?.base(&e.name, size, sha.as_deref())?,
                    ))
                });
                let i = p.files.push(&e).map_err(spool_err)?;
                let f = if dest_index.find(&e).is_some() {
                    Found::AtDest
                } else if held
                    .as_ref()
                    .is_some_and(|h| h.holds(&e) || h.holds_delta(&e, base.as_ref()))
                {
                    twins.held(&e, i);
                    kept.insert(e.name.clone());
                    Found::Held
                } else if dest_partials
                    .get(&e.name)
                    .is_some_and(|d| d.size == e.size && e.sha256.as_ref() == Some(&d.sha256))
                    || held
                        .as_ref()
                        .is_some_and(|h| h.ranges.iter().any(|(_, r)| r.of(&e)))
                {
                    Found::UnderWay
                } else {
                    twins.needed(&e, i);
                    let have = held
                        .as_ref()
                        .and_then(|h| h.partials.get(&e.name).copied())
                        .map_or(0, |n| n.min(e.size));
                    if have > 0 {
                        resume.insert(i, have);
                    }
                    if base.is_some() && have == 0 {
                        Found::DeltaBase
                    } else {
                        Found::Needed
                    }
                };
                if f == Found::Held {
                    p.held_bytes += e.size;
                }
                p.sizes.push(e.size);
                found.push(f);
            }
            Need::Link => p.symlinks += 1,
            Need::Refused(..) => p.refused += 1,
            Need::Nothing => {}
        }
        Ok(())
    })?;
    p.files.finish().map_err(spool_err)?;
    // What a run would remove from the courier, and what stays.
    let mut usage = 0;
    if let Some(h) = &held {
        let mut freed = 0;
        let mut gone: Vec<&Carried> = h.log.values().filter(|c| !kept.contains(&c.name)).collect();
        gone.sort_by(|a, b| a.name.cmp(&b.name));
        for c in gone {
            if h.file_len(&c.name).is_some() {
                p.removed.push((c.name.clone(), c.size));
                freed += c.size;
            }
        }
        usage = h.courier.usage().saturating_sub(freed);
    }
    p.room = max_bytes.map_or(u64::MAX, |max| max.saturating_sub(usage));
    p.dups = twins.duplicates();
    p.decide(&found, &resume, &dest_partials, held.as_ref());
    Ok(p)
}

impl Preview {
    /// Applies the budget in `fetch`'s order.
    fn decide(
        &mut self,
        found: &[Found],
        resume: &HashMap<usize, u64>,
        dest_partials: &HashMap<String, PartialUpload>,
        held: Option<&Held>,
    ) {
        let n = found.len();
        let mut avail = self.room;
        // What a file of n bytes takes in the courier (more, encrypted),
        // and the most bytes of a file that fit in `room`.
        let cost = |n: u64| held.map_or(n, |h| h.courier.cost(n));
        let room_for = |room: u64| held.map_or(room, |h| h.courier.room_for(room));
        self.acts = found
            .iter()
            .map(|f| match f {
                Found::AtDest => Act::Copy,
                Found::Held => Act::Held,
                _ => Act::Later,
            })
            .collect();
        // Files under way get the budget first, a range each.
        let held_recs: Vec<RangeRecord> = held
            .map(|h| h.ranges.iter().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default();
        let min_range = ranges::MIN_RANGE.min(avail);
        for i in (0..n).filter(|&i| found[i] == Found::UnderWay) {
            let Ok(e) = self.files.get(i) else { continue };
            let start = ranges::next_start(&e, dest_partials.get(&e.name), &held_recs);
            let left = e.size.saturating_sub(start);
            let len = left.min(room_for(avail));
            if left == 0 {
                self.acts[i] = Act::Held;
            } else if len == left || (len > 0 && len >= min_range) {
                self.acts[i] = Act::Range;
                self.range_len.insert(i, len);
                avail = avail.saturating_sub(cost(len));
                if left > len {
                    self.range_left.insert(i, left - len);
                }
            } else {
                self.range_left.insert(i, left);
            }
        }
        // Deltas, largest file first, counted at their file's size.
        let mut cands: Vec<usize> = (0..n)
            .filter(|&i| found[i] == Found::DeltaBase && !self.is_dup(i))
            .collect();
        cands.sort_by_key(|&i| std::cmp::Reverse(self.sizes[i]));
        for i in cands {
            if cost(self.sizes[i]) <= avail {
                avail -= cost(self.sizes[i]);
                self.acts[i] = Act::Delta;
            }
        }
        // Whole files, largest first; what fits of the rest still goes.
        let have = |i: usize| resume.get(&i).copied().unwrap_or(0);
        let open = |p: &Preview, i: usize| {
            matches!(found[i], Found::Needed | Found::DeltaBase)
                && !p.is_dup(i)
                && p.acts[i] == Act::Later
        };
        let taken = plan::fit_largest_first(
            &self.sizes,
            |i| {
                if open(self, i) {
                    cost(self.sizes[i]) - have(i)
                } else {
                    u64::MAX
                }
            },
            avail,
        );
        for i in taken {
            avail -= cost(self.sizes[i]) - have(i);
            self.acts[i] = Act::Carry;
        }
        // What is left starts the largest file bigger than a whole trip.
        if avail > 0 && avail >= ranges::MIN_RANGE.min(self.room) {
            let largest = (0..n)
                .filter(|&i| open(self, i))
                .max_by(|&a, &b| self.sizes[a].cmp(&self.sizes[b]).then(b.cmp(&a)));
            let big = largest.filter(|&i| {
                self.sizes[i] > self.room
                    && have(i) == 0
                    && self.files.get(i).is_ok_and(|e| e.sha256.is_some())
            });
            if let Some(i) = big.filter(|_| room_for(avail) > 0) {
                let len = room_for(avail);
                self.acts[i] = Act::Range;
                self.range_len.insert(i, len);
                self.range_left.insert(i, self.sizes[i] - len);
            }
        }
        // Duplicates are instructions once their original travels.
        for k in 0..self.dups.len() {
            let (d, orig) = self.dups[k];
            let made = match orig {
                Origin::Held(_) => true,
                Origin::Needed(o) => matches!(self.acts[o], Act::Carry | Act::Delta),
            };
            if made {
                self.acts[d] = Act::Copy;
            }
        }
    }

    fn is_dup(&self, i: usize) -> bool {
        self.dups.binary_search_by_key(&i, |&(d, _)| d).is_ok()
    }

    /// The figures the summaries print.
    pub(crate) fn figures(&self) -> Figures {
        let mut f = Figures::default();
        for (i, act) in self.acts.iter().enumerate() {
            let size = self.sizes[i];
            match act {
                Act::Carry | Act::Delta => {
                    f.trip_files += 1;
                    f.trip_bytes += size;
                    f.delta_files += u64::from(*act == Act::Delta);
                }
                Act::Copy => f.instructed_files += 1,
                Act::Held => f.held_files += 1,
                Act::Range => {
                    f.range_bytes += self.range_len.get(&i).copied().unwrap_or(0);
                    f.ranged_files += 1;
                }
                Act::Later => {}
            }
            if let Some(left) = self.range_left.get(&i) {
                f.later_files += 1;
                f.later_bytes += left;
            } else if *act == Act::Later {
                f.later_files += 1;
                f.later_bytes += size;
            }
        }
        f
    }

    /// Sizes of every file still to carry over the whole job, duplicates
    /// and renames left out (they are instructions on whichever trip
    /// carries their original): for counting trips. Made in place, so a
    /// plan of millions of entries holds the sizes once.
    pub(crate) fn into_job_sizes(mut self) -> Vec<u64> {
        let (acts, dups) = (&self.acts, &self.dups);
        let mut i = 0;
        self.sizes.retain(|_| {
            let dup = dups.binary_search_by_key(&i, |&(d, _)| d).is_ok();
            let keep = !matches!(acts[i], Act::Copy | Act::Held) && !dup;
            i += 1;
            keep
        });
        std::mem::take(&mut self.sizes)
    }

    /// Each file with what the trip does with it, in name order: `-v`.
    /// A person gets `ACTION SIZE NAME` lines; `--json` a record
    /// `{"name","size","action"}` each (`range` adds `bytes`, what this
    /// trip carries of it). A closed stdout ends the list, not the run.
    pub(crate) fn list(&self, ui: &Ui) {
        if !ui.verbose || ui.quiet {
            return;
        }
        let mut out = io::BufWriter::new(io::stdout().lock());
        let mut line = |name: &str, size: u64, act: &str, bytes: Option<u64>| -> bool {
            let text = if ui.json {
                let mut rec = serde_json::json!({ "name": name, "size": size, "action": act });
                if let Some(b) = bytes {
                    rec["bytes"] = b.into();
                }
                format!("{rec}\n")
            } else {
                format!("{act:<6} {size:>14} {}\n", crate::ui::escape(name))
            };
            out.write_all(text.as_bytes()).is_ok()
        };
        for (name, size) in &self.removed {
            if !line(name, *size, "remove", None) {
                return;
            }
        }
        for (i, act) in self.acts.iter().enumerate() {
            let Ok(e) = self.files.get(i) else { break };
            if !line(&e.name, e.size, act.word(), self.range_len.get(&i).copied()) {
                return;
            }
        }
        let _ = out.flush();
    }
}
