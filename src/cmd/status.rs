//! `bitfog status COURIER|DB`: what a courier or a DB holds, read from
//! disk alone (no network). `--verify` re-reads and hashes everything a
//! courier carries against its records and marks what is damaged, so the
//! next `fetch` replaces it: a disk damaged in transit is found before it
//! leaves or as it arrives, not at `store`.

use crate::courier::ranges::{self, RangeRecord};
use crate::courier::{self, Carried, Courier, deltas};
use crate::digest::hash_reader;
use crate::error::{Error, Exit, Result, describe_io};
use crate::plan::{self, Need};
use crate::ui::{Ui, files_bytes, human_bytes, n_files};
use crate::wire::manifest::{Header, Reader};
use serde::Serialize;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// The summary of a courier.
#[derive(Serialize, Default)]
struct CourierStatus {
    /// Where it was filled from and for, and when.
    source: Option<String>,
    source_area_id: Option<String>,
    filled: Option<String>,
    destination: Option<String>,
    /// When `store` last emptied it (its receipt), if it has.
    stored: Option<String>,
    /// Whole files, ranges of files bigger than a trip, deltas, copy and
    /// link instructions, partial downloads; all of it on disk.
    files: u64,
    bytes: u64,
    ranges: u64,
    range_bytes: u64,
    deltas: u64,
    delta_bytes: u64,
    instructions: u64,
    partial_files: u64,
    partial_bytes: u64,
    disk_bytes: u64,
    /// What the source's listing has that neither the destination (as
    /// the receipt, else the snapshot `fetch` kept, says) nor the courier
    /// holds: for later trips.
    left_files: u64,
    left_bytes: u64,
    /// With `--verify`: items whose bytes do not match their record, and
    /// recorded files that are not there.
    damaged_files: u64,
    missing_files: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    verified: bool,
    /// An encrypted (sealed) courier, read with `--identity`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    encrypted: bool,
}

/// The summary of a DB.
#[derive(Serialize, Default)]
struct DbStatus {
    source: Option<String>,
    area_id: Option<String>,
    created: String,
    files: u64,
    bytes: u64,
    symlinks: u64,
    dirs: u64,
    skipped: u64,
    exclude: Vec<String>,
    largest: Vec<Largest>,
    signatures: bool,
    signature_bytes: u64,
    /// The DB is an age file (read with --identity).
    encrypted: bool,
}

#[derive(Serialize, Clone)]
struct Largest {
    name: String,
    size: u64,
}

/// How many of the largest files a DB's status names.
const LARGEST: usize = 5;

pub(crate) fn status(ui: &Ui, path: &Path, verify: bool) -> Result<Exit> {
    if path.is_dir() {
        return courier_status(ui, path, verify);
    }
    if verify {
        return Err(Error::usage(format!(
            "'{}' is not a directory: --verify checks a courier",
            path.display()
        )));
    }
    db_status(ui, path)
}

/// The header of a state file of the courier, and a reader of its entries.
fn state_db(c: &Courier, name: &str) -> Option<(Header, Reader<BufReader<File>>)> {
    let f = crate::age::open_plain(c.state_file(name)?).ok()?;
    let mut r = Reader::new(BufReader::new(f), format!("the courier's {name}"));
    let h = r.header().ok()?;
    Some((h, r))
}

fn courier_status(ui: &Ui, path: &Path, verify: bool) -> Result<Exit> {
    let c = if verify {
        Courier::open(path, false)?
    } else {
        Courier::open_read(path)?
    };
    if c.state_file(courier::SOURCE).is_none() && c.read_log().is_empty() {
        let has_state = path.join(crate::wire::paths::COURIER_STATE).is_dir();
        if !has_state {
            return Err(Error::usage(format!(
                "'{}' is not a courier: fetch has not filled it (no .bitfog/)",
                path.display()
            )));
        }
    }
    let mut st = CourierStatus {
        encrypted: c.sealed().is_some(),
        ..CourierStatus::default()
    };
    let source = state_db(&c, courier::SOURCE);
    if let Some((h, _)) = &source {
        st.source = h.source.clone();
        st.source_area_id = h.area_id.clone();
        st.filled = Some(h.created.clone());
    }
    let receipt = state_db(&c, courier::RECEIPT);
    let snapshot = state_db(&c, courier::SNAPSHOT);
    if let Some((h, _)) = &receipt {
        st.destination = h.source.clone();
        st.stored = Some(h.created.clone());
    } else if let Some((h, _)) = &snapshot {
        st.destination = h.source.clone();
    }
    let snapshot_empty =
        receipt.is_none() && snapshot.as_ref().is_some_and(|(h, _)| h.source.is_none());
    // What the courier holds.
    let log = c.read_log();
    let mut held: Vec<&Carried> = log.values().filter(|r| !r.damaged).collect();
    held.sort_by(|a, b| a.name.cmp(&b.name));
    let mut present = Vec::new();
    for r in held {
        match c.carried_meta(&r.name) {
            Ok(Some(m))
                if m.kind == crate::beneath::Kind::File
                    && (m.size == r.size || c.is_pack(&r.name)) =>
            {
                st.files += 1;
                st.bytes += r.size;
                present.push(r.clone());
            }
            _ => {
                st.missing_files += 1;
                ui.error(format!(
                    "'{}': recorded but missing from the courier",
                    r.name
                ));
            }
        }
    }
    let range_list = ranges::held(&c);
    st.ranges = range_list.len() as u64;
    st.range_bytes = range_list.iter().map(|(_, r)| r.len).sum();
    let delta_list = deltas::held(&c);
    st.deltas = delta_list.len() as u64;
    st.delta_bytes = delta_list.values().map(|d| d.len).sum();
    st.instructions = courier::count_copies(&c);
    for p in c.partials() {
        st.partial_files += 1;
        st.partial_bytes += p.len;
    }
    st.disk_bytes = st.bytes + st.range_bytes + st.delta_bytes + st.partial_bytes;
    if verify {
        st.verified = true;
        verify_all(ui, &c, &present, &range_list, &delta_list, &mut st);
    }
    if let (Some((_, src)), Some((_, dst))) = (source, receipt.or(snapshot)) {
        let held = Holdings {
            courier: &c,
            log: &log,
            ranges: &range_list,
            deltas: &delta_list,
        };
        if let Err(e) = left_for_later(&held, src, dst, &mut st) {
            ui.error(format!("cannot tell what is left: {e}"));
        }
    }
    let human = courier_lines(path, &st, snapshot_empty, verify);
    let bad = verify && st.damaged_files + st.missing_files > 0;
    ui.summary(&st, &human);
    Ok(if bad { Exit::Failed } else { Exit::Done })
}

/// What a courier holds, by kind.
struct Holdings<'a> {
    courier: &'a Courier,
    log: &'a std::collections::HashMap<String, Carried>,
    ranges: &'a [(String, RangeRecord)],
    deltas: &'a std::collections::HashMap<String, deltas::Held>,
}

/// Counts what the source manifest `src` lists that neither the
/// destination (`dst`: the receipt, else the snapshot) nor the courier
/// has: a ranged file by the bytes its ranges lack.
fn left_for_later(
    held: &Holdings,
    src: Reader<BufReader<File>>,
    dst: Reader<BufReader<File>>,
    st: &mut CourierStatus,
) -> Result<()> {
    let mut copies = courier::Copies::open(held.courier);
    let recs: Vec<RangeRecord> = held.ranges.iter().map(|(_, r)| r.clone()).collect();
    plan::merge(
        src.map(|r| r.map_err(crate::wire::manifest::as_usage)),
        dst.map(|r| r.map_err(crate::wire::manifest::as_usage)),
        |pair| {
            let Need::File(e) = plan::need(pair) else {
                return Ok(());
            };
            let whole = held.log.get(&e.name).is_some_and(|r| r.matches(&e))
                || held.deltas.get(&e.name).is_some_and(|d| d.makes(&e))
                || copies.find(&e).is_some();
            let left = if whole {
                0
            } else {
                e.size - ranges::next_start(&e, None, &recs).min(e.size)
            };
            if left > 0 || (e.size == 0 && !whole) {
                st.left_files += 1;
                st.left_bytes += left;
            }
            Ok(())
        },
    )
}

/// The lines for a person.
fn courier_lines(path: &Path, st: &CourierStatus, snapshot_empty: bool, verify: bool) -> String {
    let mut human = format!("courier '{}'\n", path.display());
    if st.encrypted {
        human.push_str("  encrypted (age): names and contents open only with its identity\n");
    }
    match (&st.source, &st.filled) {
        (Some(s), Some(when)) => human.push_str(&format!("  filled from {s} on {when}\n")),
        _ => human.push_str("  filled from: unknown (no source manifest)\n"),
    }
    match &st.destination {
        Some(d) => human.push_str(&format!("  for {d}\n")),
        None if snapshot_empty => {
            human.push_str("  for a destination that was empty (emptydb)\n");
        }
        None => {}
    }
    if let Some(when) = &st.stored {
        human.push_str(&format!("  stored there on {when} (the receipt)\n"));
    }
    human.push_str(&format!(
        "  holds {}, {} of ranges ({}), {} of deltas ({}), {}, {} of partial downloads; {} on disk\n",
        files_bytes(st.files, st.bytes),
        human_bytes(st.range_bytes),
        st.ranges,
        human_bytes(st.delta_bytes),
        st.deltas,
        plural(st.instructions, "instruction"),
        human_bytes(st.partial_bytes),
        human_bytes(st.disk_bytes)
    ));
    human.push_str(&format!(
        "  left for later trips: {}\n",
        files_bytes(st.left_files, st.left_bytes)
    ));
    if verify {
        human.push_str(&if st.damaged_files + st.missing_files == 0 {
            "  verified: every file, range and delta matches its record\n".to_string()
        } else {
            format!(
                "  verified: {} damaged, {} missing; the next fetch replaces them\n",
                n_files(st.damaged_files),
                n_files(st.missing_files)
            )
        });
    }
    human
}

fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Hashes every carried file, range and delta against its record; what
/// does not match is named and marked (a file in the record, a range or
/// delta removed), so the next `fetch` carries it again.
fn verify_all(
    ui: &Ui,
    c: &Courier,
    files: &[Carried],
    range_list: &[(String, RangeRecord)],
    delta_list: &std::collections::HashMap<String, deltas::Held>,
    st: &mut CourierStatus,
) {
    for r in files {
        // A sealed courier's file is decrypted as it is hashed.
        let got = c.open_carried(&r.name).ok().flatten().map(|f| {
            let (f, _) = c.plain(f)?;
            if c.is_pack(&r.name) {
                crate::wire::sparse::hash_pack(f, r.size).map(|h| (h, r.size))
            } else {
                hash_reader(f)
            }
        });
        let why = match (got, &r.sha256) {
            (Some(Ok((h, n))), Some(want)) if &h == want && n == r.size => None,
            (Some(Ok((_, n))), None) if n == r.size => None,
            (Some(Ok((h, _))), Some(want)) => Some(format!("sha256 {h}, its record says {want}")),
            (Some(Ok((_, n))), None) => Some(format!("{n} bytes, its record says {}", r.size)),
            (Some(Err(e)), _) => Some(format!("cannot read it: {}", describe_io(&e))),
            (None, _) => Some("cannot open it".to_string()),
        };
        if let Some(why) = why {
            st.damaged_files += 1;
            let mark = Carried {
                damaged: true,
                ..r.clone()
            };
            let _ = c.append_log(&mark);
            ui.error(format!(
                "'{}': damaged ({why}); the next fetch replaces it",
                r.name
            ));
        }
    }
    let mut sound_ranges = Vec::new();
    for (data, rec) in range_list {
        if ranges::verify(c, data, rec) {
            sound_ranges.push((data.clone(), rec.clone()));
        } else {
            st.damaged_files += 1;
            ui.error(format!(
                "'{}': the range of bytes {}-{} is damaged; removed, the next fetch carries it again",
                rec.name,
                rec.start,
                rec.end() - 1
            ));
        }
    }
    if sound_ranges.len() < range_list.len() {
        ranges::clean(c, &sound_ranges);
    }
    let mut sound_deltas = Vec::new();
    for (name, h) in delta_list {
        if h.verify(c) {
            sound_deltas.push(h.file.clone());
        } else {
            st.damaged_files += 1;
            ui.error(format!(
                "'{name}': its delta is damaged; removed, the next fetch makes it again"
            ));
        }
    }
    if sound_deltas.len() < delta_list.len() {
        deltas::clean(c, &sound_deltas);
    }
}

fn db_status(ui: &Ui, path: &Path) -> Result<Exit> {
    let (h, entries) = crate::wire::manifest::open_db(path)?;
    let encrypted = std::fs::File::open(path).is_ok_and(|f| crate::age::is_age(&f));
    let mut st = DbStatus {
        encrypted,
        source: h.source.clone(),
        area_id: h.area_id.clone(),
        created: h.created.clone(),
        exclude: h.exclude.clone(),
        ..Default::default()
    };
    let mut entries = entries;
    for e in entries.by_ref() {
        let e = e.map_err(crate::wire::manifest::as_usage)?;
        if e.is_symlink() {
            st.symlinks += 1;
            continue;
        }
        st.files += 1;
        st.bytes += e.size;
        let small = st.largest.len() == LARGEST && st.largest[LARGEST - 1].size >= e.size;
        if !small {
            st.largest.push(Largest {
                name: e.name,
                size: e.size,
            });
            st.largest.sort_by_key(|l| std::cmp::Reverse(l.size));
            st.largest.truncate(LARGEST);
        }
    }
    if let Some(end) = entries.end() {
        st.skipped = end.skipped;
        st.dirs = end.dirs.iter().filter(|d| !d.name.is_empty()).count() as u64;
    }
    let sig = {
        let mut p = path.as_os_str().to_owned();
        p.push(".sig");
        std::path::PathBuf::from(p)
    };
    if let Ok(m) = std::fs::metadata(&sig) {
        st.signatures = m.is_file();
        st.signature_bytes = m.len();
    }
    let what = match &st.source {
        Some(s) => format!("the area {s}"),
        None => "an empty area (emptydb)".to_string(),
    };
    let mut human = format!("DB '{}': {what}", path.display());
    if let Some(id) = &st.area_id {
        human.push_str(&format!(" (identity {id})"));
    }
    human.push_str(&format!(", made {}\n", st.created));
    if st.encrypted {
        human.push_str("  encrypted (age)\n");
    }
    human.push_str(&format!(
        "  {}, {}{}\n",
        files_bytes(st.files, st.bytes),
        plural(st.symlinks, "symlink"),
        if st.dirs > 0 {
            format!(
                ", {}",
                plural(st.dirs, "directory").replace("directorys", "directories")
            )
        } else {
            String::new()
        }
    ));
    if st.skipped > 0 {
        human.push_str(&format!(
            "  the listing skipped {} it could not read\n",
            plural(st.skipped, "entry").replace("entrys", "entries")
        ));
    }
    if !st.largest.is_empty() {
        human.push_str("  largest:\n");
        for l in &st.largest {
            human.push_str(&format!("    {:>10}  {}\n", human_bytes(l.size), l.name));
        }
    }
    if !st.exclude.is_empty() {
        human.push_str(&format!("  made with --exclude {}\n", st.exclude.join(" ")));
    }
    human.push_str(&if st.signatures {
        format!(
            "  signatures: '{}' ({})\n",
            sig.display(),
            human_bytes(st.signature_bytes)
        )
    } else {
        "  no signatures beside it (builddb --signatures makes them)\n".to_string()
    });
    ui.summary(&st, &human);
    Ok(Exit::Done)
}
