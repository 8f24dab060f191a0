//! The pure diff of two sorted manifests, and the budget fit. No I/O.
//!
//! Both inputs are in the contract's order, so they merge as streams;
//! only the entries that must be acted on are kept in memory.

use crate::wire::manifest::Entry;
use crate::wire::paths::{BadName, check_carried_name, name_cmp};
use std::cmp::Ordering;

/// One step of a merge of source and destination entries.
#[derive(Debug, PartialEq)]
pub(crate) enum Pair {
    /// Only the source has this name.
    Src(Entry),
    /// Only the destination has this name.
    Dst(Entry),
    /// Both have it.
    Both(Entry, Entry),
}

/// Merges two sorted entry streams, calling `f` for each name in order.
pub(crate) fn merge<E>(
    src: impl Iterator<Item = Result<Entry, E>>,
    dst: impl Iterator<Item = Result<Entry, E>>,
    mut f: impl FnMut(Pair) -> Result<(), E>,
) -> Result<(), E> {
    let mut src = src.peekable();
    let mut dst = dst.peekable();
    loop {
        let order = match (src.peek(), dst.peek()) {
            (None, None) => return Ok(()),
            (Some(Err(_)), _) => {
                return Err(src.next().and_then(Result::err).expect("peeked error"));
            }
            (_, Some(Err(_))) => {
                return Err(dst.next().and_then(Result::err).expect("peeked error"));
            }
            (Some(Ok(_)), None) => Ordering::Less,
            (None, Some(Ok(_))) => Ordering::Greater,
            (Some(Ok(s)), Some(Ok(d))) => name_cmp(&s.name, &d.name),
        };
        let pair = match order {
            Ordering::Less => Pair::Src(next_ok(&mut src)),
            Ordering::Greater => Pair::Dst(next_ok(&mut dst)),
            Ordering::Equal => Pair::Both(next_ok(&mut src), next_ok(&mut dst)),
        };
        f(pair)?;
    }
}

fn next_ok<E>(it: &mut impl Iterator<Item = Result<Entry, E>>) -> Entry {
    match it.next() {
        Some(Ok(e)) => e,
        _ => unreachable!("peeked an entry"),
    }
}

/// What the source has that the destination lacks, held in memory (the
/// commands stream instead; the tests check the merge with it).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Missing {
    /// Regular files to carry, in name order.
    pub(crate) files: Vec<Entry>,
    /// Symlinks to recreate (nothing to carry).
    pub(crate) links: u64,
    /// Names that may not be written under a local directory.
    pub(crate) refused: Vec<(String, BadName)>,
}

#[cfg(test)]
impl Missing {
    pub(crate) fn add(&mut self, need: Need) {
        match need {
            Need::Nothing => {}
            Need::File(e) => self.files.push(e),
            Need::Link => self.links += 1,
            Need::Refused(name, why) => self.refused.push((name, why)),
        }
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.files.iter().map(|e| e.size).sum()
    }
}

/// What one merge step asks of a trip.
pub(crate) enum Need {
    /// The destination has it (or only the destination has it).
    Nothing,
    /// A regular file to carry.
    File(Entry),
    /// A symlink to recreate at store (nothing to carry).
    Link,
    /// A name that may not be written under a local directory.
    Refused(String, BadName),
}

/// Decides what one merge step needs.
pub(crate) fn need(pair: Pair) -> Need {
    let src = match pair {
        Pair::Src(s) => s,
        Pair::Both(s, d) if !s.same_content(&d) => s,
        Pair::Both(..) | Pair::Dst(_) => return Need::Nothing,
    };
    if let Err(why) = check_carried_name(&src.name) {
        Need::Refused(src.name, why)
    } else if src.is_symlink() {
        Need::Link
    } else {
        Need::File(src)
    }
}

/// Folds one merge step into `Missing`.
#[cfg(test)]
pub(crate) fn note_missing(m: &mut Missing, pair: Pair) {
    m.add(need(pair));
}

/// Fits files into a byte budget, largest first; when the next one does
/// not fit, smaller ones that do still go. `need` says how many bytes an
/// item still needs (less than its size when part of it is already held).
/// Returns the indexes taken, in the order to fetch them.
pub(crate) fn fit_largest_first(
    sizes: &[u64],
    need: impl Fn(usize) -> u64,
    budget: u64,
) -> Vec<usize> {
    // 4 bytes an index (a listing holds at most 100,000,000 entries).
    let mut order: Vec<u32> = (0..sizes.len() as u32).collect();
    order.sort_by(|&a, &b| sizes[b as usize].cmp(&sizes[a as usize]).then(a.cmp(&b)));
    let mut left = budget;
    let mut taken = Vec::new();
    for i in order.into_iter().map(|i| i as usize) {
        let n = need(i);
        // u64::MAX says "not this trip", even against an unlimited budget.
        if n < u64::MAX && n <= left {
            left -= n;
            taken.push(i);
        }
    }
    taken
}

/// How many trips of `budget` bytes carry files of `sizes`, each trip
/// filled as `fetch` fills it (largest first, then whatever still fits).
/// Files bigger than the budget travel in ranges: they take the room the
/// others leave, then whole trips. Returns (trips, files bigger than one
/// trip, their bytes).
pub(crate) fn trips(sizes: &[u64], budget: u64) -> (u64, u64, u64) {
    let (fit_trips, too_big, too_big_bytes) = whole_trips(sizes, budget);
    let fit_bytes: u64 = sizes.iter().filter(|&&s| s <= budget).sum();
    let spare = (fit_trips * budget).saturating_sub(fit_bytes);
    let extra = too_big_bytes.saturating_sub(spare).div_ceil(budget.max(1));
    (fit_trips + extra, too_big, too_big_bytes)
}

/// `trips` for the files that fit whole, counting the others apart.
fn whole_trips(sizes: &[u64], budget: u64) -> (u64, u64, u64) {
    use std::collections::BTreeMap;
    let mut left_over = BTreeMap::<u64, u64>::new();
    let (mut unfit, mut unfit_bytes) = (0, 0);
    for &size in sizes {
        if size > budget {
            unfit += 1;
            unfit_bytes += size;
        } else {
            *left_over.entry(size).or_default() += 1;
        }
    }
    let mut trips = 0;
    while !left_over.is_empty() {
        trips += 1;
        let mut room = budget;
        // The largest remaining file that fits, until none does.
        while let Some((&size, count)) = left_over.range_mut(..=room).next_back() {
            let take = (*count).min(room.checked_div(size).unwrap_or(*count));
            *count -= take;
            room -= take * size;
            if *count == 0 {
                left_over.remove(&size);
            }
        }
    }
    (trips, unfit, unfit_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(name: &str, size: u64, sha: char) -> Entry {
        Entry {
            name: name.into(),
            size,
            mode: 0o644,
            mtime: 1,
            sha256: Some(sha.to_string().repeat(64)),
            linkdest: None,
            alloc: None,
            meta: Default::default(),
        }
    }

    fn link(name: &str, to: &str) -> Entry {
        Entry {
            name: name.into(),
            size: to.len() as u64,
            mode: 0o777,
            mtime: 1,
            sha256: None,
            linkdest: Some(to.into()),
            alloc: None,
            meta: Default::default(),
        }
    }

    fn missing(src: Vec<Entry>, dst: Vec<Entry>) -> Missing {
        let mut m = Missing::default();
        merge::<()>(src.into_iter().map(Ok), dst.into_iter().map(Ok), |p| {
            note_missing(&mut m, p);
            Ok(())
        })
        .unwrap();
        m
    }

    #[test]
    fn decides_what_is_present() {
        let src = vec![
            file("a", 1, 'a'),
            file("b", 2, 'b'),
            file("c", 3, 'c'),
            link("d", "x"),
            link("e", "y"),
            file("f/g", 4, 'f'),
            file("../evil", 1, 'e'),
        ];
        let mut src = src;
        src.sort_by(|a, b| name_cmp(&a.name, &b.name));
        let mut no_hash = file("c", 3, 'z');
        no_hash.sha256 = None;
        let dst = vec![
            file("a", 1, 'a'),
            file("b", 2, 'x'),
            no_hash,
            link("d", "x"),
            link("e", "other"),
            file("z", 9, 'z'),
        ];
        let m = missing(src, dst);
        let names: Vec<&str> = m.files.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "f/g"]);
        assert_eq!(m.links, 1);
        assert_eq!(m.refused.len(), 1);
        assert_eq!(m.bytes(), 6);
    }

    #[test]
    fn mtime_decides_without_hash() {
        let mut s = file("a", 1, 'a');
        let mut d = file("a", 1, 'b');
        s.sha256 = None;
        assert!(s.same_content(&d));
        d.mtime = 2;
        assert!(!s.same_content(&d));
        assert!(!file("a", 1, 'a').same_content(&link("a", "x")));
    }

    #[test]
    fn fits_largest_first_then_fills_gaps() {
        let sizes = [10, 50, 30, 5, 60];
        let taken = fit_largest_first(&sizes, |i| sizes[i], 70);
        assert_eq!(taken, [4, 0]);
        let taken = fit_largest_first(&sizes, |i| sizes[i], 100);
        assert_eq!(taken, [4, 2, 0]);
        let taken = fit_largest_first(&sizes, |i| if i == 1 { 1 } else { sizes[i] }, 15);
        assert_eq!(taken, [1, 0]);
    }

    #[test]
    fn counts_trips() {
        assert_eq!(trips(&[], 10), (0, 0, 0));
        assert_eq!(trips(&[10, 10, 10], 10), (3, 0, 0));
        assert_eq!(trips(&[6, 5, 4, 3, 2], 10), (2, 0, 0));
        assert_eq!(whole_trips(&[0, 0, 11, 3], 10), (1, 1, 11));
        // 3 of the first trip's room goes to ranges of the 11; 8 are left.
        assert_eq!(trips(&[0, 0, 11, 3], 10), (2, 1, 11));
        assert_eq!(trips(&[100], 30), (4, 1, 100));
    }

    proptest! {
        #[test]
        fn trips_match_repeated_fetches(sizes in prop::collection::vec(0u64..100, 0..60), budget in 1u64..300) {
            // What fetch would do trip after trip, with the greedy fit.
            let mut rest: Vec<u64> = sizes.iter().copied().filter(|&s| s <= budget).collect();
            let mut expect = 0;
            while !rest.is_empty() {
                let taken = fit_largest_first(&rest, |i| rest[i], budget);
                prop_assert!(!taken.is_empty());
                expect += 1;
                let mut keep = vec![true; rest.len()];
                for i in taken {
                    keep[i] = false;
                }
                rest = rest.iter().zip(keep).filter(|(_, k)| *k).map(|(s, _)| *s).collect();
            }
            let (n, unfit, _) = whole_trips(&sizes, budget);
            prop_assert_eq!(n, expect);
            prop_assert_eq!(unfit as usize, sizes.iter().filter(|&&s| s > budget).count());
            let total: u64 = sizes.iter().filter(|&&s| s <= budget).sum();
            prop_assert!(n >= total.div_ceil(budget));
        }

        #[test]
        fn fit_never_exceeds_budget(sizes in prop::collection::vec(0u64..1000, 0..40), budget in 0u64..5000) {
            let taken = fit_largest_first(&sizes, |i| sizes[i], budget);
            let sum: u64 = taken.iter().map(|&i| sizes[i]).sum();
            prop_assert!(sum <= budget);
            // Nothing left out would still have fit.
            let left = budget - sum;
            for (i, size) in sizes.iter().enumerate() {
                if !taken.contains(&i) {
                    prop_assert!(*size > left);
                }
            }
        }

        #[test]
        fn merge_sees_every_name_once(a in prop::collection::btree_set("[a-c]{1,3}", 0..12), b in prop::collection::btree_set("[a-c]{1,3}", 0..12)) {
            let src: Vec<Entry> = a.iter().map(|n| file(n, 1, 'a')).collect();
            let dst: Vec<Entry> = b.iter().map(|n| file(n, 1, 'a')).collect();
            let mut seen = Vec::new();
            merge::<()>(src.into_iter().map(Ok), dst.into_iter().map(Ok), |p| {
                let name = match &p { Pair::Src(e) | Pair::Dst(e) | Pair::Both(e, _) => e.name.clone() };
                match &p {
                    Pair::Src(_) => assert!(a.contains(&name) && !b.contains(&name)),
                    Pair::Dst(_) => assert!(!a.contains(&name) && b.contains(&name)),
                    Pair::Both(..) => assert!(a.contains(&name) && b.contains(&name)),
                }
                seen.push(name);
                Ok(())
            }).unwrap();
            let all: std::collections::BTreeSet<String> = a.union(&b).cloned().collect();
            prop_assert_eq!(seen, all.into_iter().collect::<Vec<_>>());
        }
    }
}
