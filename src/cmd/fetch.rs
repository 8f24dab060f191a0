//! `fetch` and `plan`: what the destination lacks, fitted into the budget
//! and downloaded into the courier, verified before it appears.
//!
//! A download goes to `.bitfog/partial/`, is hashed as it streams, and is
//! renamed to its final courier path only when its size and SHA-256 match
//! the listing. An interrupted download continues with a Range request
//! after re-hashing the bytes already on disk.

use crate::client::{AreaUrl, Client};
use crate::cmd::carry::{self, Failure};
use crate::courier::CopyInstr;
use crate::courier::copies::{DestIndex, Instructions, Origin};
use crate::courier::deltas;
use crate::courier::ranges::{self, RangeRecord};
use crate::courier::{self, Carried, Courier, PartialMeta};
use crate::digest::{BUF_SIZE, CopyError, Hasher, Writeback, copy_hashing};
use crate::error::{Exit, Result, describe_io};
use crate::plan::{self, Need};
use crate::ui::{Progress, Ui, files_bytes, human_bytes, n_files};
use crate::wire::delta::SigIndex;
use crate::wire::manifest::{Entry, as_usage, open_db};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

/// Files larger than this keep a sidecar so an interrupted download can
/// resume; smaller ones start over.
const RESUME_MIN: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) struct FetchOpts {
    pub(crate) destdb: PathBuf,
    pub(crate) src: AreaUrl,
    pub(crate) courier: PathBuf,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) dry_run: bool,
    pub(crate) jobs: usize,
}

/// The destination's version of a file the source changed: its size and
/// SHA-256 (when DESTDB has one).
pub(crate) type Old = (u64, Option<String>);

/// Reads DESTDB and the source listing and merges them as streams,
/// calling `f` with what each name needs and the destination's older
/// version of it, if any. Returns how many entries the source's listing
/// says it skipped (they are not carried); says so when there are any.
pub(crate) fn each_need(
    ui: &Ui,
    client: &Client,
    destdb: &Path,
    src: &AreaUrl,
    mut f: impl FnMut(Need, Option<Old>) -> Result<()>,
) -> Result<u64> {
    let (_, dst) = open_db(&destdb_path(destdb)?)?;
    let mut listing = client.listing(src)?;
    plan::merge(listing.by_ref(), dst.map(|r| r.map_err(as_usage)), |pair| {
        let old = match &pair {
            plan::Pair::Both(s, d) if !d.is_symlink() && !s.same_content(d) => {
                Some((d.size, d.sha256.clone()))
            }
            _ => None,
        };
        let need = plan::need(pair);
        if let Need::Refused(name, why) = &need {
            ui.error(format!("refusing '{name}': {}", why.reason()));
        }
        f(need, old)
    })?;
    let skipped = listing.end().map_or(0, |e| e.skipped);
    if skipped > 0 {
        ui.error(format!(
            "{src}: the source's listing skipped {skipped} entries it could not read (see its server log); they are not carried"
        ));
    }
    Ok(skipped)
}

/// DESTDB itself, or the receipt `store` left when DESTDB is a courier
/// directory.
pub(crate) fn destdb_path(destdb: &Path) -> Result<PathBuf> {
    if !destdb.is_dir() {
        return Ok(destdb.to_path_buf());
    }
    // The receipt is read where it is: a regular file in a real `.bitfog`
    // directory (a courier's symlinks are never followed).
    let held = Courier::open_read(destdb)?
        .state_file(crate::courier::RECEIPT)
        .is_some();
    if held {
        Ok(destdb
            .join(crate::wire::paths::COURIER_STATE)
            .join(crate::courier::RECEIPT))
    } else {
        Err(crate::error::Error::usage(format!(
            "'{}' is a directory without a receipt (store leaves one in a courier); give a DESTDB made by builddb or emptydb",
            destdb.display()
        )))
    }
}

#[derive(Serialize)]
struct PlanSummary {
    remaining_files: u64,
    remaining_bytes: u64,
    symlinks: u64,
    refused_files: u64,
    /// With --max-bytes: trips of that size the rest needs, and the files
    /// bigger than one trip (they travel in ranges; counted in `trips`).
    #[serde(skip_serializing_if = "Option::is_none")]
    trips: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    too_big_files: Option<u64>,
    /// Files the destination has under another name (renames, copies):
    /// fetch leaves instructions for them, not bytes.
    instructed_files: u64,
    /// Entries the source's listing left out (unreadable): not carried.
    skipped: u64,
}

/// `bitfog plan DESTDB SRCURL`. Streams: with `-v` each file is printed
/// as the merge finds it, so a million-entry plan holds one entry.
pub(crate) fn plan(
    ui: &Ui,
    client: &Client,
    destdb: &Path,
    src: &AreaUrl,
    max_bytes: Option<u64>,
) -> Result<Exit> {
    let mut sum = PlanSummary {
        remaining_files: 0,
        remaining_bytes: 0,
        symlinks: 0,
        refused_files: 0,
        trips: None,
        too_big_files: None,
        instructed_files: 0,
        skipped: 0,
    };
    // Sizes only, for counting trips: 8 bytes a file.
    let mut sizes = Vec::new();
    // Content the destination has under another name is not carried.
    let dest_index = DestIndex::open(&destdb_path(destdb)?);
    let list = ui.verbose && !ui.json && !ui.quiet;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut out_ok = true;
    sum.skipped = each_need(ui, client, destdb, src, |need, _| {
        match need {
            Need::Nothing => {}
            Need::File(e) if dest_index.find(&e).is_some() => sum.instructed_files += 1,
            Need::File(e) => {
                sum.remaining_files += 1;
                sum.remaining_bytes += e.size;
                if max_bytes.is_some() {
                    sizes.push(e.size);
                }
                if list && out_ok {
                    out_ok = writeln!(out, "{:>14} {}", e.size, crate::ui::escape(&e.name)).is_ok();
                }
            }
            Need::Link => sum.symlinks += 1,
            Need::Refused(..) => sum.refused_files += 1,
        }
        Ok(())
    })?;
    let _ = out.flush();
    drop(out);
    let mut human = format!(
        "{} to carry\n",
        files_bytes(sum.remaining_files, sum.remaining_bytes)
    );
    if sum.symlinks > 0 {
        human.push_str(&format!(
            "{} symlinks to recreate at store (nothing to carry)\n",
            sum.symlinks
        ));
    }
    if sum.instructed_files > 0 {
        human.push_str(&format!(
            "{} the destination has under other names (nothing to carry)\n",
            n_files(sum.instructed_files)
        ));
    }
    if let Some(budget) = max_bytes {
        let (trips, too_big, too_big_bytes) = plan::trips(&sizes, budget);
        sum.trips = Some(trips);
        sum.too_big_files = Some(too_big);
        human.push_str(&format!(
            "{trips} trip{} of {} carry it\n",
            if trips == 1 { "" } else { "s" },
            human_bytes(budget)
        ));
        if too_big > 0 {
            human.push_str(&format!(
                "{} bigger than one trip travels in ranges\n",
                files_bytes(too_big, too_big_bytes)
            ));
        }
    }
    ui.summary(&sum, &human);
    Ok(if sum.refused_files == 0 {
        Exit::Done
    } else {
        Exit::Failed
    })
}

#[derive(Serialize, Default)]
struct FetchSummary {
    fetched_files: u64,
    fetched_bytes: u64,
    courier_files: u64,
    courier_bytes: u64,
    remaining_files: u64,
    remaining_bytes: u64,
    failed_files: u64,
    downloaded_bytes: u64,
    /// Files the destination will make from its own copies (renames,
    /// moves, duplicates): instructions in the courier, no bytes.
    instructed_files: u64,
    /// Bytes of files bigger than a trip carried as ranges by this run,
    /// and how many files the courier holds ranges of.
    range_bytes: u64,
    ranged_files: u64,
    /// Files the courier holds deltas of (made by this run or kept), the
    /// deltas' bytes and the bytes of the files they make.
    delta_files: u64,
    delta_bytes: u64,
    delta_file_bytes: u64,
    budget_stop: bool,
    disk_full: bool,
    /// Entries the source's listing left out (unreadable): not carried.
    skipped: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dry_run: bool,
}

/// `bitfog fetch DESTDB SRCURL COURIER`.
pub(crate) fn fetch(ui: &Ui, client: &Client, opts: &FetchOpts) -> Result<Exit> {
    if opts.dry_run {
        return dry_run(ui, client, opts);
    }
    let courier = Courier::open(&opts.courier, true)?;
    let mut failed = 0u64;

    // What the courier already holds of what is missing is kept (and
    // rewritten into a fresh record); what is missing and not held goes to
    // the spool, with only its size in memory. The rest of what bitfog
    // carried earlier is pruned (the destination has it now, or the
    // source no longer lists that version).
    let mut log = courier.load_log();
    let mut new_log = courier.new_log()?;
    let (mut held_files, mut held_bytes) = (0u64, 0u64);
    let mut needed = courier.spool("wanted")?;
    // What the courier holds, for duplicates made from it.
    let mut held_names = courier.spool("held")?;
    let mut sizes: Vec<u64> = Vec::new();
    let mut costs: Vec<u64> = Vec::new();
    // Partial downloads: keep those of a needed version, drop the rest.
    let mut partials: HashMap<String, courier::Partial> = HashMap::new();
    for p in courier.partials() {
        match &p.meta {
            Some(m) => {
                partials.insert(m.entry.name.clone(), p);
            }
            None => courier.discard_partial(&p.id),
        }
    }
    let mut resume: std::collections::HashMap<usize, (u64, PartialMeta)> =
        std::collections::HashMap::new();
    let spool_err = |e: io::Error| crate::error::Error::io("the courier's plan spool", &e);
    // Content the destination already has, or that this trip carries
    // under another name, becomes an instruction instead of bytes.
    let dest_index = DestIndex::open(&destdb_path(&opts.destdb)?);
    let mut instrs = Instructions::new(courier.state_dir()?)?;
    // Files arriving a range per trip: those the destination has begun
    // (its partial uploads, from DESTDB's end record) or the courier holds
    // ranges of. They are carried on from where they stand.
    let dest_partials = ranges::by_name(
        crate::wire::manifest::read_end(&destdb_path(&opts.destdb)?)
            .map(|e| e.partials)
            .unwrap_or_default(),
    );
    let held_ranges = ranges::held(&courier);
    let in_progress = |e: &Entry| {
        dest_partials
            .get(&e.name)
            .is_some_and(|p| p.size == e.size && e.sha256.as_ref() == Some(&p.sha256))
            || held_ranges.iter().any(|(_, r)| r.of(e))
    };
    let mut range_files: Vec<Entry> = Vec::new();
    // Signatures of the destination's large files (DESTDB.sig), and the
    // deltas the courier holds.
    let signatures = match SigIndex::open(&destdb_path(&opts.destdb)?) {
        Ok(s) => s,
        Err(why) => {
            ui.error(format!("{why}; changed files are carried whole"));
            None
        }
    };
    let held_deltas = deltas::held(&courier);
    let mut kept_deltas: Vec<String> = Vec::new();
    let (mut delta_held_files, mut delta_held_bytes, mut delta_held_covers) = (0u64, 0u64, 0u64);
    // Changed files the destination has a signed older version of:
    // candidates for a delta (needed index, old size and SHA-256).
    let mut delta_cands: Vec<(usize, u64, String)> = Vec::new();
    let src_skipped = each_need(ui, client, &opts.destdb, &opts.src, |need, old| {
        match need {
            Need::File(e) => {
                if instrs.at_dest(&e, &dest_index)? {
                    return Ok(());
                }
                if is_held(ui, &courier, &log, &e) {
                    log.forget(&e.name);
                    new_log.add(&Carried::of(&e))?;
                    let h = held_names.push(&e).map_err(spool_err)?;
                    instrs.held(&e, h);
                    held_files += 1;
                    held_bytes += e.size;
                    return Ok(());
                }
                // The destination's version this file can be a delta of.
                let base = old.filter(|_| e.sha256.is_some()).and_then(|(size, sha)| {
                    Some((
                        size,
                        signatures.as_ref()?.base(&e.name, size, sha.as_deref())?,
                    ))
                });
                if let Some((size, sha)) = &base {
                    // Checked whole (deltas are small): a damaged one is
                    // made again.
                    let held = held_deltas
                        .get(&e.name)
                        .filter(|h| h.makes(&e) && h.applies_to(*size, Some(sha)))
                        .filter(|h| {
                            let sound = h.verify(&courier);
                            if !sound {
                                ui.log(format!("replacing the damaged delta of '{}'", e.name));
                            }
                            sound
                        });
                    if let Some(h) = held {
                        kept_deltas.push(h.file.clone());
                        delta_held_files += 1;
                        delta_held_bytes += h.len;
                        delta_held_covers += e.size;
                        // Its duplicates are made from it once patched.
                        let at = held_names.push(&e).map_err(spool_err)?;
                        instrs.held(&e, at);
                        return Ok(());
                    }
                }
                if in_progress(&e) {
                    range_files.push(e);
                    return Ok(());
                }
                let i = needed.push(&e).map_err(spool_err)?;
                sizes.push(e.size);
                // What it takes in the courier: a sparse file its data.
                costs.push(e.alloc.map_or(e.size, |a| a.min(e.size)));
                instrs.needed(&e, i);
                if let Some(p) = partials.remove(&e.name) {
                    match p.meta {
                        Some(meta) if meta.entry.matches(&e) => {
                            resume.insert(i, (p.len.min(e.size), meta));
                        }
                        _ => courier.discard_partial(&p.id),
                    }
                }
                // A download under way is finished rather than replaced.
                if let Some((size, sha)) = base.filter(|_| !resume.contains_key(&i)) {
                    delta_cands.push((i, size, sha));
                }
            }
            Need::Refused(..) => failed += 1,
            Need::Link | Need::Nothing => {}
        }
        Ok(())
    })?;
    needed.finish().map_err(spool_err)?;
    held_names.finish().map_err(spool_err)?;
    // A needed file with the content of an earlier one is not carried: its
    // original is, and an instruction makes the duplicate from it.
    let dups = instrs.duplicates();
    let is_dup = |i: usize| dups.binary_search_by_key(&i, |&(d, _)| d).is_ok();
    for p in partials.into_values() {
        courier.discard_partial(&p.id);
    }
    for c in log.remaining() {
        courier.remove_carried(&c.name);
    }
    deltas::clean(&courier, &kept_deltas);
    drop(log);
    new_log.commit()?;
    if let Err(e) = courier.keep_snapshot(&destdb_path(&opts.destdb)?) {
        ui.error(format!(
            "cannot keep the destination snapshot in the courier ({}); store --delete will go by SRCDB alone",
            describe_io(&e)
        ));
    }
    let partial_len = |i: usize| resume.get(&i).map_or(0, |(len, _)| *len);

    // Ranges the destination still lacks are kept; the rest is removed.
    let dest_have = |e: &Entry| ranges::next_start(e, dest_partials.get(&e.name), &[]);
    let kept_ranges: Vec<(String, RangeRecord)> = held_ranges
        .iter()
        .filter(|(_, r)| {
            range_files
                .iter()
                .any(|f| r.of(f) && r.end() > dest_have(f))
        })
        .cloned()
        .collect();
    ranges::clean(&courier, &kept_ranges);
    let kept_recs: Vec<RangeRecord> = kept_ranges.iter().map(|(_, r)| r.clone()).collect();

    let usage = courier.usage();
    let budget = opts
        .max_bytes
        .map_or(u64::MAX, |max| max.saturating_sub(usage));
    // Plan for the space the disk has, too, so files that fit are chosen
    // instead of running into a full disk with several half-done.
    let room = courier.free_space().map_or(u64::MAX, |free| {
        let reserve = (free / 100).clamp(1 << 20, 64 << 20);
        free.saturating_sub(reserve)
    });
    // Files under way get the budget first, a range each.
    let trip_room = budget.min(room);
    let mut avail = trip_room;
    // No range smaller than 1 MiB starts, unless a whole trip is smaller.
    let min_range = ranges::MIN_RANGE.min(avail);
    let mut planned: Vec<(Entry, u64, u64)> = Vec::new();
    for f in &range_files {
        let start = ranges::next_start(f, dest_partials.get(&f.name), &kept_recs);
        let len = (f.size - start).min(avail);
        if len > 0 && (len == f.size - start || len >= min_range) {
            planned.push((f.clone(), start, len));
            avail -= len;
        }
    }
    // Deltas go first: each brings a whole file up to date for a fraction
    // of its bytes. One that would not be smaller than the file (or than
    // what is left of the budget) is dropped, and the file competes below.
    let disk_full = AtomicBool::new(false);
    let wire = AtomicU64::new(0);
    let mut delta_done: HashMap<usize, u64> = HashMap::new();
    delta_cands.sort_by_key(|&(i, _, _)| std::cmp::Reverse(sizes[i]));
    let delta_total: u64 = delta_cands.iter().map(|&(i, _, _)| sizes[i]).sum();
    let delta_progress =
        Progress::start(ui, "making deltas", delta_cands.len() as u64, delta_total);
    for (i, base_size, base_sha) in &delta_cands {
        let i = *i;
        if avail == 0 {
            break;
        }
        let Ok(e) = needed.get(i) else { continue };
        let Some((_, sig)) = signatures
            .as_ref()
            .and_then(|s| s.get(&e.name, *base_size, Some(base_sha)))
        else {
            continue;
        };
        let limit = avail.min(costs[i].saturating_sub(1));
        let before = delta_progress.bytes.load(Ordering::Relaxed);
        let made = carry::make_delta(
            client,
            &opts.src,
            &courier,
            &e,
            (base_sha, &sig),
            limit,
            &delta_progress.bytes,
        );
        wire.fetch_add(
            delta_progress.bytes.load(Ordering::Relaxed) - before,
            Ordering::Relaxed,
        );
        delta_progress.files.fetch_add(1, Ordering::Relaxed);
        match made {
            Ok(len) => {
                avail -= len;
                delta_done.insert(i, len);
                if ui.verbose {
                    ui.log(format!(
                        "made a delta of '{}': {} for {}",
                        e.name,
                        human_bytes(len),
                        human_bytes(e.size)
                    ));
                }
            }
            Err(Failure::TooBig) => {
                if ui.verbose {
                    ui.log(format!(
                        "'{}': a delta would not be smaller than {}; the file travels whole",
                        e.name,
                        human_bytes(limit)
                    ));
                }
            }
            Err(Failure::DiskFull) => {
                disk_full.store(true, Ordering::SeqCst);
                ui.error(format!(
                    "'{}': the courier disk is full; stopping (complete files are kept)",
                    opts.courier.display()
                ));
                break;
            }
            Err(why) => {
                ui.log(format!(
                    "'{}': no delta: {why}; the file travels whole",
                    e.name
                ));
            }
        }
    }
    delta_progress.finish();
    let need = |i: usize| {
        if is_dup(i) || delta_done.contains_key(&i) {
            u64::MAX
        } else {
            costs[i] - partial_len(i)
        }
    };
    let taken = plan::fit_largest_first(&costs, need, avail);
    // Did the disk, rather than --max-bytes, leave files behind?
    let disk_bound =
        room < budget && plan::fit_largest_first(&costs, need, budget).len() > taken.len();
    if disk_bound {
        ui.log(format!(
            "the courier disk is full after {}; {} of free space is kept in reserve",
            files_bytes(
                taken.len() as u64,
                taken.iter().map(|&i| costs[i] - partial_len(i)).sum()
            ),
            human_bytes(courier.free_space().unwrap_or(0).saturating_sub(room))
        ));
    }
    let total_bytes: u64 = taken.iter().map(|&i| costs[i] - partial_len(i)).sum();
    if let Some(max) = opts.max_bytes {
        let fit = files_bytes(taken.len() as u64, total_bytes);
        let whole = needed.len() - delta_done.len();
        let what = if delta_done.is_empty() {
            format!("{fit} fit of {whole} missing")
        } else {
            format!(
                "deltas of {} ({}), then {fit} of {whole} missing whole",
                n_files(delta_done.len() as u64),
                human_bytes(delta_done.values().sum())
            )
        };
        ui.log(format!(
            "courier holds {} of a {} budget; {what}",
            human_bytes(usage),
            human_bytes(max),
        ));
    }

    // What is left of the budget starts the largest file bigger than a
    // whole trip: it arrives over several trips. A file that fits a trip
    // waits for one, to travel whole and verified.
    let left = avail - total_bytes;
    if left >= min_range && left > 0 {
        let is_taken: std::collections::HashSet<usize> = taken.iter().copied().collect();
        let mut order: Vec<usize> = (0..sizes.len())
            .filter(|&i| !is_taken.contains(&i) && !is_dup(i) && !delta_done.contains_key(&i))
            .collect();
        order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]));
        if let Some(&i) = order
            .first()
            .filter(|&&i| sizes[i] > trip_room && costs[i] == sizes[i] && !resume.contains_key(&i))
        {
            if let Ok(e) = needed.get(i) {
                if e.sha256.is_some() {
                    planned.push((e, 0, left));
                }
            }
        }
    }

    let progress = Progress::start(ui, "fetching", taken.len() as u64, total_bytes);
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let fails = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, 64) {
            s.spawn(|| {
                loop {
                    if disk_full.load(Ordering::SeqCst) {
                        return;
                    }
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = taken.get(k) else { return };
                    let e = match needed.get(i) {
                        Ok(e) => e,
                        Err(err) => {
                            ui.error(format!("cannot read the courier's plan spool: {}", describe_io(&err)));
                            fails.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let e = &e;
                    let outcome = download(client, &opts.src, &courier, e, resume.get(&i).map(|(_, m)| m), &wire, &progress.bytes);
                    if outcome.is_err() && e.size <= RESUME_MIN {
                        // A small file's partial cannot resume: drop it.
                        courier.discard_partial(&Courier::partial_id(&e.name));
                    }
                    match outcome {
                        Ok(()) => {
                            if ui.verbose {
                                ui.log(format!("fetched '{}' ({})", e.name, human_bytes(e.size)));
                            }
                            progress.files.fetch_add(1, Ordering::Relaxed);
                            done.lock().expect("done list").push(i);
                        }
                        Err(Failure::DiskFull) => {
                            if !disk_full.swap(true, Ordering::SeqCst) {
                                ui.error(format!(
                                    "'{}': the courier disk is full; stopping (complete files are kept)",
                                    opts.courier.display()
                                ));
                            }
                        }
                        Err(why) => {
                            ui.error(format!("'{}': {why}", e.name));
                            fails.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    progress.finish();
    // Ranges, one after another.
    let mut range_bytes = 0u64;
    let mut new_range_of_needed = 0u64;
    for (e, start, len) in &planned {
        if disk_full.load(Ordering::SeqCst) {
            break;
        }
        match carry::download_range(client, &opts.src, &courier, e, (*start, *len), &wire) {
            Ok(_) => {
                range_bytes += len;
                if !range_files.iter().any(|f| f.name == e.name) {
                    new_range_of_needed += len;
                }
                if ui.verbose {
                    ui.log(format!(
                        "fetched bytes {start}-{} of '{}' ({} of {})",
                        start + len - 1,
                        e.name,
                        human_bytes(*len),
                        human_bytes(e.size)
                    ));
                }
            }
            Err(Failure::DiskFull) => {
                disk_full.store(true, Ordering::SeqCst);
                ui.error(format!(
                    "'{}': the courier disk is full; stopping (complete files are kept)",
                    opts.courier.display()
                ));
            }
            Err(why) => {
                ui.error(format!("'{}' (bytes from {start}): {why}", e.name));
                fails.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    courier.sync();

    let done = done.into_inner().expect("done list");
    // Duplicates of files held or fetched become instructions; the rest
    // wait for the trip that carries their original.
    let fetched: std::collections::HashSet<usize> = done
        .iter()
        .copied()
        .chain(delta_done.keys().copied())
        .collect();
    let from_dest = instrs.from_dest;
    let mut dup_instrs = Vec::new();
    let (mut dup_files, mut dup_bytes) = (0u64, 0u64);
    // A duplicate carried as a delta stands in for its original when the
    // original did not travel: the original is made from it.
    let mut stand_in: std::collections::BTreeMap<usize, usize> = Default::default();
    for &(d, orig) in &dups {
        if let Origin::Needed(n) = orig {
            if delta_done.contains_key(&d) && !fetched.contains(&n) {
                stand_in.entry(n).or_insert(d);
            }
        }
    }
    let mut instruct = |name: usize, from: std::io::Result<Entry>| {
        if let (Ok(e), Ok(o)) = (needed.get(name), from) {
            dup_files += 1;
            dup_bytes += e.size;
            dup_instrs.push(CopyInstr {
                name: e.name,
                from: o.name,
                size: e.size,
                sha256: e.sha256.unwrap_or_default(),
            });
        }
    };
    for &(d, orig) in &dups {
        if delta_done.contains_key(&d) {
            continue;
        }
        let original = match orig {
            Origin::Held(h) => held_names.get(h),
            Origin::Needed(n) if fetched.contains(&n) => needed.get(n),
            Origin::Needed(n) => match stand_in.get(&n) {
                Some(&s) => needed.get(s),
                None => continue,
            },
        };
        instruct(d, original);
    }
    for (&n, &s) in &stand_in {
        instruct(n, needed.get(s));
    }
    if let Err(e) = instrs.finish(dup_instrs) {
        ui.error(format!(
            "{e}; renamed and duplicate files are carried whole on a later trip"
        ));
        fails.fetch_add(1, Ordering::Relaxed);
    }
    let whole_bytes: u64 = done.iter().map(|&i| sizes[i]).sum();
    let new_delta_bytes: u64 = delta_done.values().sum();
    let delta_covers: u64 = delta_done.keys().map(|&i| sizes[i]).sum();
    let mut sum = FetchSummary {
        fetched_files: (done.len() + delta_done.len()) as u64,
        fetched_bytes: whole_bytes + new_delta_bytes,
        delta_files: delta_held_files + delta_done.len() as u64,
        delta_bytes: delta_held_bytes + new_delta_bytes,
        delta_file_bytes: delta_held_covers + delta_covers,
        failed_files: failed + fails.load(Ordering::Relaxed),
        downloaded_bytes: wire.load(Ordering::Relaxed),
        disk_full: disk_full.load(Ordering::SeqCst) || disk_bound,
        skipped: src_skipped,
        ..Default::default()
    };
    sum.courier_files = held_files + delta_held_files + sum.fetched_files;
    sum.courier_bytes = held_bytes + delta_held_bytes + sum.fetched_bytes;
    sum.remaining_files = (needed.len() - done.len() - delta_done.len()) as u64 - dup_files;
    sum.remaining_bytes = sizes.iter().sum::<u64>() - whole_bytes - delta_covers - dup_bytes;
    sum.instructed_files = courier::count_copies(&courier).max(from_dest);
    // Files under way: what is left of each after this run's ranges.
    let now_held = ranges::held(&courier);
    let now_recs: Vec<RangeRecord> = now_held.iter().map(|(_, r)| r.clone()).collect();
    for f in &range_files {
        let at = ranges::next_start(f, dest_partials.get(&f.name), &now_recs);
        if at < f.size {
            sum.remaining_files += 1;
            sum.remaining_bytes += f.size - at;
        }
    }
    sum.remaining_bytes -= new_range_of_needed;
    sum.range_bytes = range_bytes;
    sum.ranged_files = now_held
        .iter()
        .map(|(_, r)| r.name.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    sum.courier_bytes += now_held.iter().map(|(_, r)| r.len).sum::<u64>();
    sum.budget_stop = sum.remaining_files > 0 && taken.len() + delta_done.len() < needed.len();

    let mut human = format!(
        "fetched {}; the courier holds {} for the destination\n",
        files_bytes(sum.fetched_files, sum.fetched_bytes),
        files_bytes(sum.courier_files, sum.courier_bytes)
    );
    if sum.range_bytes > 0 || sum.ranged_files > 0 {
        human.push_str(&format!(
            "carried {} as ranges; the courier holds ranges of {} bigger than what the budget had left\n",
            human_bytes(sum.range_bytes),
            n_files(sum.ranged_files)
        ));
    }
    if sum.delta_files > 0 {
        human.push_str(&format!(
            "{} {} as deltas: {} in the courier for {} of files\n",
            n_files(sum.delta_files),
            if sum.delta_files == 1 {
                "travels"
            } else {
                "travel"
            },
            human_bytes(sum.delta_bytes),
            human_bytes(sum.delta_file_bytes)
        ));
    }
    if sum.instructed_files > 0 {
        human.push_str(&format!(
            "{} will be made at the destination from files it has (renames, copies)\n",
            n_files(sum.instructed_files)
        ));
    }
    if sum.remaining_files > 0 {
        let why = if sum.disk_full {
            "the courier disk filled up; "
        } else if sum.budget_stop {
            "stopped at the budget; "
        } else {
            ""
        };
        human.push_str(&format!(
            "{why}{} {} left for the next trip\n",
            files_bytes(sum.remaining_files, sum.remaining_bytes),
            if sum.remaining_files == 1 {
                "is"
            } else {
                "are"
            }
        ));
    } else {
        human.push_str("nothing is left to carry\n");
    }
    if sum.failed_files > 0 {
        human.push_str(&format!("{} failed\n", n_files(sum.failed_files)));
    }
    ui.summary(&sum, &human);
    Ok(if sum.failed_files > 0 {
        Exit::Failed
    } else {
        Exit::Done
    })
}

/// `fetch --dry-run`: what a run would fetch and remove, from the record
/// alone (no file is hashed, created or removed, and no lock is taken).
/// The missing entries wait in an anonymous spool file, so memory holds
/// 8 bytes of each however long the listing.
fn dry_run(ui: &Ui, client: &Client, opts: &FetchOpts) -> Result<Exit> {
    let c = Courier::open_read(&opts.courier)?;
    let log = c.read_log();
    let file_len = |name: &str| {
        c.carried_meta(name)
            .ok()
            .flatten()
            .filter(|m| m.kind == crate::beneath::Kind::File)
            .map(|m| m.size)
    };
    let spool_err = |e: io::Error| crate::error::Error::io("a scratch file for the plan", &e);
    let mut needed: courier::Spool<Entry> = courier::Spool::anonymous().map_err(spool_err)?;
    let mut sizes: Vec<u64> = Vec::new();
    let mut keep: HashSet<String> = HashSet::new();
    let (mut held_bytes, mut refused) = (0u64, 0u64);
    let skipped = each_need(ui, client, &opts.destdb, &opts.src, |need, _| {
        match need {
            Need::File(e) => {
                let held = log.get(&e.name).is_some_and(|c| c.matches(&e))
                    && file_len(&e.name) == Some(e.size);
                if held {
                    held_bytes += e.size;
                    keep.insert(e.name);
                } else {
                    needed.push(&e).map_err(spool_err)?;
                    sizes.push(e.size);
                }
            }
            Need::Refused(..) => refused += 1,
            Need::Link | Need::Nothing => {}
        }
        Ok(())
    })?;
    needed.finish().map_err(spool_err)?;
    let mut human = String::new();
    let mut freed = 0;
    for c in log.values().filter(|c| !keep.contains(&c.name)) {
        if file_len(&c.name).is_some() {
            human.push_str(&format!("would remove '{}' from the courier\n", c.name));
            freed += c.size;
        }
    }
    let partial: HashMap<String, u64> = c
        .partials()
        .into_iter()
        .filter_map(|p| Some((p.meta?.entry.name, p.len)))
        .collect();
    let usage = c.usage().saturating_sub(freed);
    let budget = opts
        .max_bytes
        .map_or(u64::MAX, |max| max.saturating_sub(usage));
    let have = |i: usize| {
        needed
            .get(i)
            .ok()
            .and_then(|e| partial.get(&e.name).copied())
            .unwrap_or(0)
            .min(sizes[i])
    };
    let taken = if partial.is_empty() {
        plan::fit_largest_first(&sizes, |i| sizes[i], budget)
    } else {
        plan::fit_largest_first(&sizes, |i| sizes[i] - have(i), budget)
    };
    // The files it would fetch are listed as they are read back, never
    // gathered in memory.
    if !ui.json {
        crate::ui::print_stdout(&crate::ui::escape_lines(&human));
        human.clear();
        let mut out = io::BufWriter::new(io::stdout().lock());
        for &i in &taken {
            let e = needed.get(i).map_err(spool_err)?;
            let line = format!("would fetch '{}' ({})\n", e.name, human_bytes(e.size));
            if out
                .write_all(crate::ui::escape_lines(&line).as_bytes())
                .is_err()
            {
                break;
            }
        }
        let _ = out.flush();
    }
    let fetched_bytes: u64 = taken.iter().map(|&i| sizes[i]).sum();
    let sum = FetchSummary {
        fetched_files: taken.len() as u64,
        fetched_bytes,
        courier_files: (keep.len() + taken.len()) as u64,
        courier_bytes: held_bytes + fetched_bytes,
        remaining_files: (sizes.len() - taken.len()) as u64,
        remaining_bytes: sizes.iter().sum::<u64>() - fetched_bytes,
        failed_files: refused,
        budget_stop: taken.len() < sizes.len(),
        skipped,
        dry_run: true,
        ..Default::default()
    };
    human.push_str(&format!(
        "dry run: would fetch {}; {} would be left for the next trip\n",
        files_bytes(sum.fetched_files, sum.fetched_bytes),
        files_bytes(sum.remaining_files, sum.remaining_bytes)
    ));
    ui.summary(&sum, &human);
    Ok(if sum.failed_files > 0 {
        Exit::Failed
    } else {
        Exit::Done
    })
}

/// True when the courier already holds the listed version of `e`. A file
/// found in place but not in the record (a run killed between rename and
/// record) is adopted after its hash checks; anything else there is stale.
fn is_held(ui: &Ui, courier: &Courier, log: &courier::LogIndex, e: &Entry) -> bool {
    let Ok(Some(meta)) = courier.carried_meta(&e.name) else {
        return false;
    };
    if meta.kind != crate::beneath::Kind::File {
        return false;
    }
    if meta.size == e.size && log.get(&e.name).is_some_and(|c| c.matches(e)) {
        return true;
    }
    if meta.size == e.size {
        if let (Some(want), Ok(Some(f))) = (&e.sha256, courier.open_carried(&e.name)) {
            if crate::digest::hash_reader(f).is_ok_and(|(h, _)| &h == want) {
                return courier.append_log(&Carried::of(e)).is_ok();
            }
        }
    }
    ui.log(format!("replacing stale courier copy of '{}'", e.name));
    courier.remove_carried(&e.name);
    false
}

/// Downloads one file into the courier (resuming a partial one).
fn download(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    resume: Option<&PartialMeta>,
    wire: &AtomicU64,
    shown: &AtomicU64,
) -> std::result::Result<(), Failure> {
    if e.alloc.is_some_and(|a| a < e.size) && e.sha256.is_some() {
        return download_sparse(client, src, courier, e, wire, shown);
    }
    let id = Courier::partial_id(&e.name);
    let mut meta = resume.cloned().unwrap_or(PartialMeta {
        entry: Carried::of(e),
        etag: None,
    });
    let mut part = courier
        .open_partial(&id, resume.is_some())
        .map_err(|err| Failure::io("cannot open partial file", &err))?;
    let mut hasher = Hasher::new();
    // Only a partial that belongs to this version is continued.
    let mut offset = if resume.is_some() {
        rehash_prefix(&mut part, e.size, &mut hasher)
            .map_err(|err| Failure::io("cannot read partial file", &err))?
    } else {
        0
    };
    if offset == 0 {
        hasher = Hasher::new();
    }
    part.set_len(offset)
        .map_err(|err| Failure::io("cannot truncate partial file", &err))?;
    part.seek(SeekFrom::Start(offset))
        .map_err(|err| Failure::io("cannot seek partial file", &err))?;

    let mut last_modified = None;
    if offset < e.size || e.size == 0 {
        let mut dl = client
            .get(src, &e.name, offset, meta.etag.as_deref())
            .map_err(|err| Failure::Io(err.to_string()))?;
        match (dl.status, dl.content_range) {
            (206, Some((start, _, total))) if start == offset && total == e.size => {}
            (200, _) => {
                if offset > 0 {
                    // The source no longer matches what we hold: start over.
                    offset = 0;
                    hasher = Hasher::new();
                    part.set_len(0)
                        .map_err(|err| Failure::io("cannot truncate partial file", &err))?;
                    part.seek(SeekFrom::Start(0))
                        .map_err(|err| Failure::io("cannot seek partial file", &err))?;
                }
                if dl.content_length.is_some_and(|n| n != e.size) {
                    courier.discard_partial(&id);
                    return Err(Failure::SourceChanged(
                        "size changed at the source since the listing".into(),
                    ));
                }
            }
            (status, _) => {
                return Err(Failure::Refused(format!(
                    "unexpected answer {status} to a range request"
                )));
            }
        }
        last_modified = dl.last_modified;
        // Small files are simply downloaded again after an interruption;
        // a sidecar for each would cost a file creation and an unlink.
        if e.size > RESUME_MIN && (dl.etag != meta.etag || resume.is_none()) {
            meta.etag = dl.etag.clone();
            courier
                .write_sidecar(&id, &meta)
                .map_err(|err| Failure::io("cannot write partial state", &err))?;
        }
        let want = e.size - offset;
        let mut out = io::BufWriter::with_capacity(BUF_SIZE, Writeback::new(&part, offset));
        let copied = copy_hashing(&mut dl.body, &mut out, &mut hasher, want, |n| {
            wire.fetch_add(n, Ordering::Relaxed);
            shown.fetch_add(n, Ordering::Relaxed);
        });
        let flushed = out.flush();
        match copied {
            Ok(n) if n == want => {}
            Ok(n) => {
                return Err(Failure::Io(format!(
                    "download cut short after {} of {} bytes; rerun to resume",
                    offset + n,
                    e.size
                )));
            }
            Err(CopyError::Write(err)) => {
                return Err(Failure::io("cannot write courier file", &err));
            }
            Err(CopyError::Read(err)) => {
                return Err(Failure::Io(format!(
                    "download failed: {}; rerun to resume",
                    describe_io(&err)
                )));
            }
        }
        flushed.map_err(|err| Failure::io("cannot write courier file", &err))?;
        let mut extra = [0u8; 1];
        if matches!(dl.body.read(&mut extra), Ok(n) if n > 0) {
            courier.discard_partial(&id);
            return Err(Failure::SourceChanged(
                "the server sent more bytes than listed (changed at the source?)".into(),
            ));
        }
    }

    let got = hasher.hex();
    let verified = match &e.sha256 {
        Some(want) => *want == got,
        None => last_modified.is_none_or(|t| t == e.mtime),
    };
    if !verified {
        courier.discard_partial(&id);
        return Err(Failure::SourceChanged(match &e.sha256 {
            Some(want) => format!(
                "sha256 mismatch: got {got}, listed {want} (changed at the source?); not kept"
            ),
            None => "modified at the source since the listing; not kept".into(),
        }));
    }
    finish(courier, e, part, &id)
}

/// Puts a verified partial file in place: mode, mtime, fsync, rename, and
/// the record of what the courier carries.
fn finish(courier: &Courier, e: &Entry, part: File, id: &str) -> std::result::Result<(), Failure> {
    part.set_permissions(fs::Permissions::from_mode((e.mode & 0o777) | 0o600))
        .map_err(|err| Failure::io("cannot set mode", &err))?;
    let mtime = if e.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(e.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
    };
    let _ = part.set_modified(mtime);
    part.sync_all()
        .map_err(|err| Failure::io("cannot sync courier file", &err))?;
    drop(part);
    courier
        .place(id, &e.name)
        .map_err(|err| Failure::io("cannot move into place", &err))?;
    if e.size > RESUME_MIN {
        courier.remove_sidecar(id);
    }
    courier
        .append_log(&Carried::of(e))
        .map_err(|err| Failure::io("cannot record carried file", &err))?;
    Ok(())
}

/// Downloads a sparse file: only its data extents travel and are written
/// at their offsets, so the courier copy keeps the holes; the SHA-256
/// still covers the whole content (holes hash as zeros). Not resumed: an
/// interrupted one starts over.
fn download_sparse(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    wire: &AtomicU64,
    shown: &AtomicU64,
) -> std::result::Result<(), Failure> {
    let id = Courier::partial_id(&e.name);
    let (size, extents) = client
        .extents(src, &e.name)
        .map_err(|err| Failure::Io(err.to_string()))?;
    if size != e.size {
        return Err(Failure::SourceChanged(
            "size changed at the source since the listing".into(),
        ));
    }
    let part = courier
        .open_partial(&id, false)
        .map_err(|err| Failure::io("cannot open partial file", &err))?;
    part.set_len(e.size)
        .map_err(|err| Failure::io("cannot size partial file", &err))?;
    let mut hasher = Hasher::new();
    let mut pos = 0u64;
    for (start, len) in extents {
        if start < pos || len == 0 || start.checked_add(len).is_none_or(|end| end > size) {
            courier.discard_partial(&id);
            return Err(Failure::Io("the server sent a bad extent list".into()));
        }
        crate::digest::hash_zeros(&mut hasher, start - pos);
        let mut dl = client
            .get_range(src, &e.name, start, start + len - 1)
            .map_err(|err| Failure::Io(err.to_string()))?;
        let whole = dl.content_range == Some((start, start + len - 1, size));
        if dl.status != 206 || !whole || dl.last_modified.is_some_and(|t| t != e.mtime) {
            courier.discard_partial(&id);
            return Err(Failure::SourceChanged(
                "changed at the source since the listing; not kept".into(),
            ));
        }
        (&part)
            .seek(SeekFrom::Start(start))
            .map_err(|err| Failure::io("cannot seek partial file", &err))?;
        let mut out = io::BufWriter::with_capacity(BUF_SIZE, Writeback::new(&part, start));
        let copied = copy_hashing(&mut dl.body, &mut out, &mut hasher, len, |n| {
            wire.fetch_add(n, Ordering::Relaxed);
            shown.fetch_add(n, Ordering::Relaxed);
        });
        let flushed = out.flush();
        drop(out);
        match copied {
            Ok(n) if n == len => {
                flushed.map_err(|err| Failure::io("cannot write courier file", &err))?
            }
            Ok(_) | Err(CopyError::Read(_)) => {
                courier.discard_partial(&id);
                return Err(Failure::Io("download cut short; rerun".into()));
            }
            Err(CopyError::Write(err)) => {
                return Err(Failure::io("cannot write courier file", &err));
            }
        }
        pos = start + len;
    }
    crate::digest::hash_zeros(&mut hasher, size - pos);
    let got = hasher.hex();
    if e.sha256.as_deref() != Some(got.as_str()) {
        courier.discard_partial(&id);
        return Err(Failure::SourceChanged(format!(
            "sha256 mismatch: got {got} (changed at the source?); not kept"
        )));
    }
    finish(courier, e, part, &id)
}

/// Hashes the bytes already in a partial file (at most `size`); returns
/// how many there are.
fn rehash_prefix(part: &mut File, size: u64, hasher: &mut Hasher) -> io::Result<u64> {
    part.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    let mut limited = (&mut *part).take(size);
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}
