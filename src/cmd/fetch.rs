//! `fetch` and `plan`: what the destination lacks, fitted into the budget
//! and downloaded into the courier, verified before it appears.
//!
//! A download goes to `.bitfog/partial/`, is hashed as it streams, and is
//! renamed to its final courier path only when its size and SHA-256 match
//! the listing. An interrupted download continues with a Range request
//! after re-hashing the bytes already on disk.

use crate::client::{AreaUrl, Client, Files, FilesItem};
use crate::cmd::carry::{self, Failure};
use crate::cmd::preview;
use crate::courier::CopyInstr;
use crate::courier::copies::{DestIndex, Instructions, Origin};
use crate::courier::deltas;
use crate::courier::ranges::{self, RangeRecord};
use crate::courier::{self, Carried, Courier, PartialMeta, Spool};
use crate::digest::{BUF_SIZE, CopyError, Hasher, Writeback, copy_hashing, copy_hashing_apart};
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

/// Files larger than this keep a sidecar so an interrupted download can
/// resume; smaller ones start over.
const RESUME_MIN: u64 = 1 << 20;

/// Small files are made durable in groups of this many files or bytes:
/// one `syncfs` for the group, then each is renamed into place and
/// recorded (see `Group`).
const GROUP_FILES: usize = 256;
const GROUP_BYTES: u64 = 64 << 20;
const GROUP_WAIT: Duration = Duration::from_millis(250);
/// Small files (up to `RESUME_MIN`) travel many to a request
/// (`POST /AREA/?files`): at most this many, and this many bytes.
const BATCH_FILES: usize = 128;
const BATCH_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub(crate) struct FetchOpts {
    pub(crate) destdb: PathBuf,
    pub(crate) src: AreaUrl,
    pub(crate) courier: PathBuf,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) dry_run: bool,
    pub(crate) jobs: usize,
    /// `--encrypt-to`: seal the courier for these.
    pub(crate) seal: Option<Vec<crate::age::Recipient>>,
}

/// The destination's version of a file the source changed: its size and
/// SHA-256 (when DESTDB has one).
pub(crate) type Old = (u64, Option<String>);

/// Reads DESTDB and the source listing and merges them as streams,
/// calling `f` with what each name needs and the destination's older
/// version of it, if any. Returns how many entries the source's listing
/// says it skipped (they are not carried); says so when there are any.
/// With `keep`, the listing is also kept in that courier as its source
/// manifest (`SOURCE`), which `store` can take in place of SRCDB.
pub(crate) fn each_need(
    ui: &Ui,
    client: &Client,
    destdb: &Path,
    src: &AreaUrl,
    keep: Option<&Courier>,
    mut f: impl FnMut(Need, Option<Old>) -> Result<()>,
) -> Result<u64> {
    let (_, dst) = open_db(&destdb_path(destdb)?)?;
    let mut listing = client.listing(src)?;
    let mut tee = match keep {
        Some(c) => Some(source_writer(
            c,
            src,
            listing.area_id.as_deref(),
            client.exclude.texts(),
        )?),
        None => None,
    };
    let mut tee_err = None;
    let entries = listing.by_ref().inspect(|r| {
        if let (Ok(e), Some(t), None) = (r, tee.as_mut(), &tee_err) {
            tee_err = t.entry(e).err();
        }
    });
    plan::merge(entries, dst.map(|r| r.map_err(as_usage)), |pair| {
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
    if let (Some(mut t), Some(end), Some(c)) = (tee, listing.end(), keep) {
        t.dirs = end.dirs.clone();
        t.dirs_omitted = end.dirs_omitted;
        t.dirs_meta_omitted = end.dirs_meta_omitted;
        t.area_exclude = end.exclude.clone();
        let kept = match tee_err {
            Some(e) => Err(e),
            None => t.commit_with(end.skipped, end.partials.clone()).map(drop),
        };
        if let Err(e) = kept {
            c.drop_state_file(crate::courier::SOURCE);
            ui.error(format!(
                "cannot keep the source's manifest in the courier ({e}); store will need SRCDB"
            ));
        }
    }
    if skipped > 0 {
        ui.error(format!(
            "{src}: the source's listing skipped {skipped} entries it could not read (see its server log); they are not carried"
        ));
    }
    Ok(skipped)
}

/// The courier's source manifest, written beside the state it describes.
fn source_writer(
    courier: &Courier,
    src: &AreaUrl,
    area_id: Option<&str>,
    exclude: Vec<String>,
) -> Result<crate::wire::manifest::DbWriter> {
    let state = courier
        .state_dir()?
        .try_clone()
        .map_err(|e| crate::error::Error::io("the courier's state directory", &e))?;
    crate::wire::manifest::DbWriter::create_in(
        state,
        crate::courier::SOURCE.as_bytes(),
        Some(src.as_str()),
        area_id,
        exclude,
        courier.state_recipients(),
    )
}

/// Refuses, before the courier is touched, a DESTDB that describes the
/// source area itself (the two DBs swapped): against it nothing would be
/// carried and the courier's unstored files would be pruned. Areas are
/// compared by identity, not URL, so `localhost` and `127.0.0.1` (or two
/// names of one NAS) cannot hide it. DBs without an identity (emptydb,
/// older DBs) pass.
pub(crate) fn check_destdb(client: &Client, destdb: &Path, src: &AreaUrl) -> Result<()> {
    let (header, _) = open_db(&destdb_path(destdb)?)?;
    let Some(dest_id) = header.area_id else {
        return Ok(());
    };
    if client.area_id(src)?.as_deref() == Some(dest_id.as_str()) {
        return Err(crate::error::Error::usage(format!(
            "'{}' describes the source area {src} itself (it was made from {}); give the destination's DB: builddb at the destination, or the courier after store",
            destdb.display(),
            header.source.as_deref().unwrap_or("it")
        )));
    }
    Ok(())
}

/// Refuses, before the courier is touched, a fetch from another source
/// area than the one whose trip the courier holds, while that trip is not
/// stored (no receipt at least as new as the source manifest): its files
/// are not in this area's listing and would be pruned from the courier.
/// Areas are compared by identity; a courier without one passes.
pub(crate) fn check_courier_source(client: &Client, courier: &Path, src: &AreaUrl) -> Result<()> {
    // What the courier's own opening repairs or refuses is its to say.
    let Ok(c) = Courier::open_read(courier) else {
        return Ok(());
    };
    let header = |name: &str| {
        let f = c.state_file(name)?;
        crate::wire::manifest::open_db_file(f, name.to_string())
            .ok()
            .map(|(h, _)| h)
    };
    let Some(held) = header(courier::SOURCE) else {
        return Ok(());
    };
    let Some(held_id) = &held.area_id else {
        return Ok(());
    };
    let stored = header(courier::RECEIPT).is_some_and(|r| r.created >= held.created);
    if stored || c.read_log().is_empty() {
        return Ok(());
    }
    match client.area_id(src)? {
        Some(id) if &id != held_id => Err(crate::error::Error::usage(format!(
            "'{}' holds a trip from another source area ({}) that is not stored yet; store it first, or give this area's trip a directory of its own",
            courier.display(),
            held.source.as_deref().unwrap_or("unknown")
        ))),
        _ => Ok(()),
    }
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
    /// Everything still to carry, over all trips.
    remaining_files: u64,
    remaining_bytes: u64,
    /// The next trip: whole files and deltas (as `fetch --dry-run`'s
    /// `fetched_files` and `fetched_bytes`), bytes of ranges, deltas.
    trip_files: u64,
    trip_bytes: u64,
    range_bytes: u64,
    delta_files: u64,
    symlinks: u64,
    refused_files: u64,
    /// With --max-bytes: trips of that size the rest needs, and the files
    /// bigger than one trip (they travel in ranges; counted in `trips`).
    #[serde(skip_serializing_if = "Option::is_none")]
    trips: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    too_big_files: Option<u64>,
    /// Files the next trip leaves as instructions (the destination has
    /// their content under another name, or the trip carries it once).
    instructed_files: u64,
    /// Entries the source's listing left out (unreadable): not carried.
    skipped: u64,
}

/// `bitfog plan DESTDB SRCURL`: the whole job and the next trip, decided
/// as `fetch --dry-run` decides it with an empty courier.
pub(crate) fn plan(
    ui: &Ui,
    client: &Client,
    destdb: &Path,
    src: &AreaUrl,
    max_bytes: Option<u64>,
) -> Result<Exit> {
    check_destdb(client, destdb, src)?;
    let p = preview::preview(ui, client, destdb, src, None, max_bytes)?;
    p.list(ui);
    let f = p.figures();
    let mut sum = PlanSummary {
        remaining_files: f.trip_files + f.later_files,
        remaining_bytes: f.trip_bytes + f.range_bytes + f.later_bytes,
        trip_files: f.trip_files,
        trip_bytes: f.trip_bytes,
        range_bytes: f.range_bytes,
        delta_files: f.delta_files,
        symlinks: p.symlinks,
        refused_files: p.refused,
        trips: None,
        too_big_files: None,
        instructed_files: f.instructed_files,
        skipped: p.skipped,
    };
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
            "{} made at the destination from content it has or the trip carries (renames, copies; nothing to carry)\n",
            n_files(sum.instructed_files)
        ));
    }
    if let Some(budget) = max_bytes {
        human.push_str(&format!(
            "the next trip carries {}{}\n",
            files_bytes(sum.trip_files, sum.trip_bytes),
            if sum.range_bytes > 0 {
                format!(
                    " and {} of a file bigger than a trip",
                    human_bytes(sum.range_bytes)
                )
            } else {
                String::new()
            }
        ));
        let (trips, too_big, too_big_bytes) = plan::trips(&p.into_job_sizes(), budget);
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
    /// The source server stopped answering; the run stopped there.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    server_gone: bool,
    /// Entries the source's listing left out (unreadable): not carried.
    skipped: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dry_run: bool,
}

/// `bitfog fetch DESTDB SRCURL COURIER`: read what the destination says,
/// survey what it lacks against what the courier holds, prune the rest,
/// measure the room, then carry: ranges of files under way, deltas, whole
/// files largest first, duplicates as instructions; then the summary.
pub(crate) fn fetch(ui: &Ui, client: &Client, opts: &FetchOpts) -> Result<Exit> {
    // The source's side: a courier sealed here without an identity is
    // read with the keeper key kept here.
    crate::courier::seal::allow_keeper();
    check_destdb(client, &opts.destdb, &opts.src)?;
    check_courier_source(client, &opts.courier, &opts.src)?;
    crate::courier::check_new(&opts.courier)?;
    if opts.dry_run {
        return dry_run(ui, client, opts);
    }
    let mut courier = Courier::open(&opts.courier, true)?;
    seal_courier(ui, &mut courier, opts)?;
    courier.probe()?;
    if let Some(line) = courier.traits().describe() {
        ui.log(line);
    }
    let courier = courier;
    let dest = Dest::read(ui, &opts.destdb)?;
    let mut survey = survey(ui, client, opts, &courier, &dest)?;
    let dups = survey.instrs.twins.duplicates();
    let kept_ranges = prune(ui, &courier, &dest, &mut survey)?;
    let trip = Trip {
        ui,
        client,
        opts,
        courier: &courier,
        disk_full: AtomicBool::new(false),
        server_gone: AtomicBool::new(false),
        wire: AtomicU64::new(0),
        fails: AtomicU64::new(0),
    };
    let room = Room::measure(&courier, opts.max_bytes);
    let mut avail = room.trip;
    let mut planned = plan_ranges(&courier, &survey, &dest, &kept_ranges, &mut avail);
    let made = trip.make_deltas(&survey, &dest, &dups, &mut avail);
    let picked = select(&trip, &survey, &dups, &made, &room, avail);
    if let Some(next) = next_big_range(&courier, &survey, &dups, &made, &picked, &room) {
        planned.push(next);
    }
    let planned = in_pieces(planned, piece_len(&courier));
    let done = trip.download_all(&survey, &picked);
    let ranged = trip.carry_ranges(&planned, &survey.range_files);
    courier.sync();
    let dup = instructions(&trip, &mut survey, &dups, &done, &made);
    let sum = summarize(
        &trip,
        &survey,
        &dest,
        (&done, &made, &picked, &dup, &ranged),
    );
    report(ui, &sum);
    Ok(if sum.failed_files > 0 {
        Exit::Failed
    } else {
        Exit::Done
    })
}

/// Seals a courier that holds no trip yet when `--encrypt-to` is given;
/// a sealed courier stays sealed, to the same recipients.
fn seal_courier(ui: &Ui, courier: &mut Courier, opts: &FetchOpts) -> Result<()> {
    if let (true, Some(want)) = (check_seal(ui, courier, opts)?, &opts.seal) {
        if let Some(kept) = courier.seal_for(want)? {
            ui.log(crate::courier::seal::said_keeper(&kept));
        }
    }
    Ok(())
}

/// What `seal_courier` refuses (exit 2), and whether the courier is to be
/// sealed now; a dry run asks the same.
fn check_seal(ui: &Ui, courier: &Courier, opts: &FetchOpts) -> Result<bool> {
    let shown = opts.courier.display();
    if let Some(s) = courier.sealed() {
        s.vouched(opts.seal.as_deref())
            .map_err(|why| crate::error::Error::usage(format!("'{shown}': {why}")))?;
        if opts.seal.is_none() {
            ui.log(format!(
                "'{shown}' is an encrypted courier; it stays encrypted, to {}",
                s.recipients_text()
            ));
        }
        return Ok(false);
    }
    if opts.seal.is_none() {
        return Ok(false);
    }
    let holds_trip = !courier.read_log().is_empty()
        || !ranges::held(courier).is_empty()
        || !deltas::held(courier).is_empty();
    if holds_trip {
        return Err(crate::error::Error::usage(format!(
            "'{shown}' holds a trip that is not encrypted: store it and empty the courier (or take another) to carry one encrypted"
        )));
    }
    Ok(true)
}

/// What DESTDB says besides its entries: where it is (itself or a
/// courier's receipt), the content it has by hash, its partial uploads and
/// its signatures.
struct Dest {
    path: PathBuf,
    index: DestIndex,
    partials: HashMap<String, crate::wire::manifest::PartialUpload>,
    signatures: Option<SigIndex>,
}

impl Dest {
    fn read(ui: &Ui, destdb: &Path) -> Result<Dest> {
        let path = destdb_path(destdb)?;
        // Files arriving a range per trip that the destination has begun
        // (its partial uploads, from DESTDB's end record).
        let partials = ranges::by_name(
            crate::wire::manifest::read_end(&path)
                .map(|e| e.partials)
                .unwrap_or_default(),
        );
        let signatures = match SigIndex::open(&path) {
            Ok(s) => s,
            Err(why) => {
                ui.error(format!("{why}; changed files are carried whole"));
                None
            }
        };
        Ok(Dest {
            index: DestIndex::open(&path),
            path,
            partials,
            signatures,
        })
    }

    /// True when the destination has begun `e` (a partial upload of this
    /// version).
    fn has_begun(&self, e: &Entry) -> bool {
        self.partials
            .get(&e.name)
            .is_some_and(|p| p.size == e.size && e.sha256.as_ref() == Some(&p.sha256))
    }
}

/// Files and bytes.
#[derive(Default, Clone, Copy)]
struct Tally {
    files: u64,
    bytes: u64,
}

/// What the survey found, name by name, in one pass over DESTDB and the
/// source's listing. Missing files wait in a spool with only their size
/// and courier cost in memory (same index in `needed`, `sizes`, `costs`).
struct Survey<'c> {
    /// Missing and not held: the candidates for this trip.
    needed: Spool<Entry>,
    sizes: Vec<u64>,
    /// What each takes in the courier: a sparse file its data.
    costs: Vec<u64>,
    /// Held by the courier (whole or as a delta), for duplicates made from
    /// them.
    held_names: Spool<Entry>,
    held: Tally,
    /// Deltas the courier holds and keeps: files, bytes, and the bytes of
    /// the files they make.
    deltas_held: Tally,
    deltas_held_covers: u64,
    kept_deltas: Vec<String>,
    /// Partial downloads to continue, by needed index: bytes held, and what
    /// they belong to.
    resume: HashMap<usize, (u64, PartialMeta)>,
    /// Changed files the destination has a signed older version of:
    /// needed index, old size and SHA-256.
    delta_cands: Vec<(usize, u64, String)>,
    /// Files arriving a range per trip.
    range_files: Vec<Entry>,
    instrs: Instructions,
    refused: u64,
    skipped: u64,
    /// What the courier carried before and is not accounted for yet, the
    /// fresh record being written, and partial downloads not claimed yet.
    log: courier::LogIndex,
    new_log: Option<courier::LogWriter<'c>>,
    partials: HashMap<String, courier::Partial>,
    /// Small verified downloads a killed run had not placed (by partial
    /// id, with their length), and those adopted (id, record).
    unplaced: HashMap<String, u64>,
    adopted: Vec<(String, Carried)>,
}

fn spool_err(e: io::Error) -> crate::error::Error {
    crate::error::Error::io("the courier's plan spool", &e)
}

/// Stage 1: one pass over DESTDB and the source's listing, deciding for
/// each missing file whether the destination can make it (an
/// instruction), the courier holds it (whole or as a delta), it is under
/// way (ranges), or it is needed.
fn survey<'c>(
    ui: &Ui,
    client: &Client,
    opts: &FetchOpts,
    courier: &'c Courier,
    dest: &Dest,
) -> Result<Survey<'c>> {
    let mut partials = HashMap::new();
    // Small files a killed run had verified but not yet placed (see
    // `Group`): adopted below when their bytes still hash right.
    let mut unplaced = HashMap::new();
    for p in courier.partials() {
        match &p.meta {
            Some(m) => {
                partials.insert(m.entry.name.clone(), p);
            }
            None if p.len <= RESUME_MIN => {
                unplaced.insert(p.id, p.len);
            }
            None => courier.discard_partial(&p.id),
        }
    }
    let mut s = Survey {
        needed: courier.spool("wanted")?,
        sizes: Vec::new(),
        costs: Vec::new(),
        held_names: courier.spool("held")?,
        held: Tally::default(),
        deltas_held: Tally::default(),
        deltas_held_covers: 0,
        kept_deltas: Vec::new(),
        resume: HashMap::new(),
        delta_cands: Vec::new(),
        range_files: Vec::new(),
        instrs: Instructions::new(courier.state_dir()?, courier.state_recipients())?,
        refused: 0,
        skipped: 0,
        log: courier.load_log(),
        new_log: Some(courier.new_log()?),
        partials,
        unplaced,
        adopted: Vec::new(),
    };
    let held_ranges = ranges::held(courier);
    let held_deltas = deltas::held(courier);
    s.skipped = each_need(
        ui,
        client,
        &opts.destdb,
        &opts.src,
        Some(courier),
        |need, old| match need {
            Need::File(e) => s.file(ui, courier, dest, (&held_ranges, &held_deltas), e, old),
            Need::Refused(..) => {
                s.refused += 1;
                Ok(())
            }
            Need::Link | Need::Nothing => Ok(()),
        },
    )?;
    s.needed.finish().map_err(spool_err)?;
    s.held_names.finish().map_err(spool_err)?;
    s.place_adopted(ui, courier)?;
    Ok(s)
}

impl Survey<'_> {
    /// Classifies one missing file (see `survey`).
    fn file(
        &mut self,
        ui: &Ui,
        courier: &Courier,
        dest: &Dest,
        (held_ranges, held_deltas): (&[(String, RangeRecord)], &HashMap<String, deltas::Held>),
        e: Entry,
        old: Option<Old>,
    ) -> Result<()> {
        if self.instrs.at_dest(&e, &dest.index)? {
            return Ok(());
        }
        let held = is_held(ui, courier, &self.log, &e);
        if held || self.adopt(courier, &e) {
            self.log.forget(&e.name);
            // An adopted file is recorded once it is in place, where the
            // courier decides (its name or `.bitfog/names/`).
            if held {
                self.new_log
                    .as_mut()
                    .expect("open until pruned")
                    .add(&Carried::of(&e))?;
            }
            let h = self.held_names.push(&e).map_err(spool_err)?;
            self.instrs.twins.held(&e, h);
            self.held.files += 1;
            self.held.bytes += e.size;
            return Ok(());
        }
        // The destination's version this file can be a delta of.
        let base = old.filter(|_| e.sha256.is_some()).and_then(|(size, sha)| {
            Some((
                size,
                dest.signatures
                    .as_ref()?
                    .base(&e.name, size, sha.as_deref())?,
            ))
        });
        if let Some((size, sha)) = &base {
            // Checked whole (deltas are small): a damaged one is made again.
            let held = held_deltas
                .get(&e.name)
                .filter(|h| h.makes(&e) && h.applies_to(*size, Some(sha)))
                .filter(|h| {
                    let sound = h.verify(courier);
                    if !sound {
                        ui.log(format!("replacing the damaged delta of '{}'", e.name));
                    }
                    sound
                });
            if let Some(h) = held {
                self.kept_deltas.push(h.file.clone());
                self.deltas_held.files += 1;
                self.deltas_held.bytes += h.len;
                self.deltas_held_covers += e.size;
                // Its duplicates are made from it once patched.
                let at = self.held_names.push(&e).map_err(spool_err)?;
                self.instrs.twins.held(&e, at);
                return Ok(());
            }
        }
        // Under way: begun at the destination or held as ranges; or
        // bigger than the courier holds in one file (FAT), so in pieces.
        if dest.has_begun(&e)
            || held_ranges.iter().any(|(_, r)| r.of(&e))
            || (e.sha256.is_some() && !fits_one_file(courier, &e))
        {
            self.range_files.push(e);
            return Ok(());
        }
        let i = self.needed.push(&e).map_err(spool_err)?;
        self.sizes.push(e.size);
        self.costs
            .push(courier.cost(e.alloc.map_or(e.size, |a| a.min(e.size))));
        self.instrs.twins.needed(&e, i);
        if let Some(p) = self.partials.remove(&e.name) {
            match p.meta {
                Some(meta) if meta.entry.matches(&e) => {
                    self.resume.insert(i, (p.len.min(e.size), meta));
                }
                _ => courier.discard_partial(&p.id),
            }
        }
        // A download under way is finished rather than replaced.
        if let Some((size, sha)) = base.filter(|_| !self.resume.contains_key(&i)) {
            self.delta_cands.push((i, size, sha));
        }
        Ok(())
    }

    /// True when a killed run left `e` verified in `.bitfog/partial/` and
    /// its bytes still hash right: it is placed with the others after the
    /// survey (`place_adopted`), not downloaded again.
    fn adopt(&mut self, courier: &Courier, e: &Entry) -> bool {
        let id = courier.partial_id(&e.name);
        let Some(len) = self.unplaced.remove(&id) else {
            return false;
        };
        let sound = len == e.size
            && e.sha256.as_ref().is_some_and(|want| {
                courier.open_partial(&id, true).is_ok_and(|f| {
                    prepare(e, &f).is_ok()
                        && crate::digest::hash_reader(&f).is_ok_and(|(h, n)| &h == want && n == len)
                })
            });
        if sound {
            self.adopted.push((id, Carried::of(e)));
        } else {
            courier.discard_partial(&id);
        }
        sound
    }

    /// Makes the adopted files durable together and puts them in place;
    /// drops the unplaced partial downloads nothing needed.
    fn place_adopted(&mut self, ui: &Ui, courier: &Courier) -> Result<()> {
        for (id, _) in self.unplaced.drain() {
            courier.discard_partial(&id);
        }
        if self.adopted.is_empty() {
            return Ok(());
        }
        let synced = courier.sync_fs();
        for (id, rec) in std::mem::take(&mut self.adopted) {
            let name = &rec.name;
            let placed = synced.is_ok() && courier.place(&id, name).is_ok();
            if placed {
                self.new_log
                    .as_mut()
                    .expect("open until pruned")
                    .add(&rec)?;
            } else {
                courier.discard_partial(&id);
                ui.error(format!(
                    "'{name}': cannot keep what the last run fetched; the next run fetches it again"
                ));
            }
        }
        Ok(())
    }

    /// Bytes a needed file still needs in the courier (less what a
    /// partial download holds).
    fn partial_len(&self, i: usize) -> u64 {
        self.resume.get(&i).map_or(0, |(len, _)| *len)
    }
}

/// Stage 2: what the courier carried and the destination no longer
/// lacks goes (files, partial downloads, deltas, ranges the destination
/// has); the fresh record replaces the old; the destination snapshot is
/// kept for `store --delete`. Returns the ranges kept.
fn prune(
    ui: &Ui,
    courier: &Courier,
    dest: &Dest,
    s: &mut Survey,
) -> Result<Vec<(String, RangeRecord)>> {
    for (_, p) in s.partials.drain() {
        courier.discard_partial(&p.id);
    }
    for c in s.log.remaining() {
        courier.remove_carried(&c.name);
    }
    deltas::clean(courier, &s.kept_deltas);
    s.new_log.take().expect("pruned once").commit()?;
    courier.clean_names();
    if let Err(e) = courier.keep_snapshot(&dest.path) {
        ui.error(format!(
            "cannot keep the destination snapshot in the courier ({}); store --delete will go by SRCDB alone",
            describe_io(&e)
        ));
    }
    // Ranges the destination still lacks are kept; the rest is removed.
    let dest_have = |e: &Entry| ranges::next_start(e, dest.partials.get(&e.name), &[]);
    let kept: Vec<(String, RangeRecord)> = ranges::held(courier)
        .into_iter()
        .filter(|(_, r)| {
            s.range_files
                .iter()
                .any(|f| r.of(f) && r.end() > dest_have(f))
        })
        .collect();
    ranges::clean(courier, &kept);
    Ok(kept)
}

/// How much this trip may put in the courier.
struct Room {
    /// Bytes the courier holds now.
    usage: u64,
    /// What `--max-bytes` leaves (unbounded without it).
    budget: u64,
    /// What the disk leaves, less a reserve.
    disk: u64,
    /// The smaller of the two.
    trip: u64,
}

impl Room {
    fn measure(courier: &Courier, max_bytes: Option<u64>) -> Room {
        let usage = courier.usage();
        let budget = max_bytes.map_or(u64::MAX, |max| max.saturating_sub(usage));
        // Plan for the space the disk has, too, so files that fit are
        // chosen instead of running into a full disk with several half-done.
        let disk = courier.free_space().map_or(u64::MAX, |free| {
            let reserve = (free / 100).clamp(1 << 20, 64 << 20);
            free.saturating_sub(reserve)
        });
        Room {
            usage,
            budget,
            disk,
            trip: budget.min(disk),
        }
    }
}

/// True when the courier holds `e` in one file: no size limit, or a copy
/// (a sparse file's data where it keeps no holes) within it.
fn fits_one_file(courier: &Courier, e: &Entry) -> bool {
    let Some(max) = courier.traits().max_file else {
        return true;
    };
    let sparse = e.alloc.filter(|&a| a < e.size && e.sha256.is_some());
    match sparse {
        // The frames take 16 bytes an extent; 1 MiB covers 65,536 of them.
        Some(data) if !courier.traits().holes => data.saturating_add(1 << 20) <= max,
        _ => e.size <= max,
    }
}

/// The longest range a courier with a largest file of `max` holds: whole
/// MiB, so ranges stay aligned.
fn piece_len(courier: &Courier) -> u64 {
    courier
        .traits()
        .max_file
        .map_or(u64::MAX, |max| (max & !((1 << 20) - 1)).max(1 << 20))
}

/// Splits ranges longer than the courier holds into pieces that follow
/// one another.
fn in_pieces(planned: Vec<PlannedRange>, piece: u64) -> Vec<PlannedRange> {
    let mut out = Vec::with_capacity(planned.len());
    for (e, start, len) in planned {
        let mut at = start;
        while at < start + len {
            let n = piece.min(start + len - at);
            out.push((e.clone(), at, n));
            at += n;
        }
    }
    out
}

/// A byte range to carry: the file, where it starts, how long it is.
type PlannedRange = (Entry, u64, u64);

/// Stage 3: files under way get the budget first, a range each, from
/// where the destination and the courier stand.
fn plan_ranges(
    courier: &Courier,
    s: &Survey,
    dest: &Dest,
    kept: &[(String, RangeRecord)],
    avail: &mut u64,
) -> Vec<PlannedRange> {
    let kept_recs: Vec<RangeRecord> = kept.iter().map(|(_, r)| r.clone()).collect();
    // No range smaller than 1 MiB starts, unless a whole trip is smaller.
    let min_range = ranges::MIN_RANGE.min(*avail);
    let mut planned = Vec::new();
    for f in &s.range_files {
        let start = ranges::next_start(f, dest.partials.get(&f.name), &kept_recs);
        let len = (f.size - start).min(courier.room_for(*avail));
        if len > 0 && (len == f.size - start || len >= min_range) {
            planned.push((f.clone(), start, len));
            *avail = avail.saturating_sub(courier.cost(len));
        }
    }
    planned
}

/// One fetch run's shared state, for the stages that move bytes.
struct Trip<'a> {
    ui: &'a Ui,
    client: &'a Client,
    opts: &'a FetchOpts,
    courier: &'a Courier,
    disk_full: AtomicBool,
    /// Set when the source server stopped answering.
    server_gone: AtomicBool,
    /// Bytes over the wire.
    wire: AtomicU64,
    fails: AtomicU64,
}

impl Trip<'_> {
    /// Says once that the source server is gone, and stops what follows.
    fn stop_server_gone(&self, why: &str) {
        if !self.server_gone.swap(true, Ordering::SeqCst) {
            self.ui.error(format!(
                "the source server stopped answering ({why}); stopping: every file verified so far is kept, rerun fetch to continue"
            ));
        }
    }

    /// After a transfer failed: true when the source server does not
    /// answer at all (a connection cut mid-body looks like any other
    /// failure until asked).
    fn source_unreachable(&self) -> bool {
        matches!(self.client.area_id(&self.opts.src), Err(e) if e.unreachable)
    }

    /// After a transfer failed: true, and the run stops (said once), when
    /// the source server is gone.
    fn server_lost(&self, why: &Failure) -> bool {
        let lost = self.server_gone.load(Ordering::SeqCst)
            || matches!(why, Failure::Unreachable(_))
            || self.source_unreachable();
        if lost {
            self.stop_server_gone(&why.to_string());
        }
        lost
    }

    /// True once the run must start no more transfers.
    fn stopping(&self) -> bool {
        self.disk_full.load(Ordering::SeqCst) || self.server_gone.load(Ordering::SeqCst)
    }

    /// Says once that the courier disk is full, and stops what follows.
    fn stop_disk_full(&self) {
        if !self.disk_full.swap(true, Ordering::SeqCst) {
            self.ui.error(format!(
                "'{}': the courier disk is full; stopping (complete files are kept)",
                self.opts.courier.display()
            ));
        }
    }

    /// Stage 4: deltas go first, largest file first: each brings a whole
    /// file up to date for a fraction of its bytes. One that would not be
    /// smaller than the file (or than what is left of the budget) is
    /// dropped, and the file competes whole. Returns the deltas made, by
    /// needed index, with their bytes.
    fn make_deltas(
        &self,
        s: &Survey,
        dest: &Dest,
        dups: &[(usize, Origin)],
        avail: &mut u64,
    ) -> HashMap<usize, u64> {
        let mut made = HashMap::new();
        // Another name of one file (a hard link) is linked at the
        // destination to the name its content travels under, never patched.
        let is_dup = |i: usize| dups.binary_search_by_key(&i, |&(d, _)| d).is_ok();
        let mut cands: Vec<&(usize, u64, String)> = s.delta_cands.iter().collect();
        cands.sort_by_key(|&&(i, _, _)| std::cmp::Reverse(s.sizes[i]));
        let total: u64 = cands.iter().map(|&&(i, _, _)| s.sizes[i]).sum();
        let progress = Progress::start(self.ui, "making deltas", cands.len() as u64, total);
        for &&(i, base_size, ref base_sha) in &cands {
            if *avail == 0 {
                break;
            }
            let Ok(e) = s.needed.get(i) else { continue };
            if e.meta.hardlink.is_some() && is_dup(i) {
                continue;
            }
            let Some((_, sig)) = dest
                .signatures
                .as_ref()
                .and_then(|sigs| sigs.get(&e.name, base_size, Some(base_sha)))
            else {
                continue;
            };
            let limit = self
                .courier
                .room_for((*avail).min(s.costs[i].saturating_sub(1)));
            let before = progress.bytes.load(Ordering::Relaxed);
            let outcome = carry::make_delta(
                self.client,
                &self.opts.src,
                self.courier,
                &e,
                (base_sha, &sig),
                limit,
                &progress.bytes,
            );
            self.wire.fetch_add(
                progress.bytes.load(Ordering::Relaxed) - before,
                Ordering::Relaxed,
            );
            progress.files.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Ok(len) => {
                    *avail = avail.saturating_sub(self.courier.cost(len));
                    made.insert(i, len);
                    if self.ui.verbose {
                        self.ui.log(format!(
                            "made a delta of '{}': {} for {}",
                            e.name,
                            human_bytes(len),
                            human_bytes(e.size)
                        ));
                    }
                }
                Err(Failure::TooBig) => {
                    if self.ui.verbose {
                        self.ui.log(format!(
                            "'{}': a delta would not be smaller than {}; the file travels whole",
                            e.name,
                            human_bytes(limit)
                        ));
                    }
                }
                Err(Failure::DiskFull) => {
                    self.stop_disk_full();
                    break;
                }
                Err(Failure::Unreachable(why)) => {
                    self.stop_server_gone(&why);
                    self.fails.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(why) => {
                    self.ui.log(format!(
                        "'{}': no delta: {why}; the file travels whole",
                        e.name
                    ));
                }
            }
        }
        progress.finish();
        made
    }

    /// Stage 6: downloads the picked files on `--jobs` threads; returns
    /// the needed indexes completed.
    fn download_all(&self, s: &Survey, picked: &Picked) -> Vec<usize> {
        let progress =
            Progress::start(self.ui, "fetching", picked.files.len() as u64, picked.bytes);
        let next = Mutex::new(0usize);
        // Until the server turns out not to know `?files`.
        let batches = AtomicBool::new(true);
        // The next file to fetch, or the next run of small files.
        let claim = || {
            let mut k = next.lock().expect("next file");
            let mut run = Vec::new();
            let mut bytes = 0;
            while let Some(&i) = picked.files.get(*k) {
                let small = batches.load(Ordering::Relaxed)
                    && s.sizes[i] <= RESUME_MIN
                    && s.costs[i] == self.courier.cost(s.sizes[i])
                    && !s.resume.contains_key(&i);
                if !run.is_empty()
                    && (!small || run.len() == BATCH_FILES || bytes + s.sizes[i] > BATCH_BYTES)
                {
                    break;
                }
                run.push(i);
                bytes += s.sizes[i];
                *k += 1;
                if !small {
                    break;
                }
            }
            run
        };
        let done: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        let group = Group::new(self.courier);
        std::thread::scope(|scope| {
            for _ in 0..self.opts.jobs.clamp(1, 64) {
                scope.spawn(|| {
                    while !self.stopping() {
                        let placed = match claim().as_slice() {
                            [] => return,
                            &[i] => {
                                if self.download_one(s, i, &progress, &group) {
                                    vec![i]
                                } else {
                                    vec![]
                                }
                            }
                            run => self.download_many(s, run, &progress, &group, &batches),
                        };
                        done.lock().expect("done list").extend(placed);
                    }
                });
            }
        });
        group.commit_rest(self);
        progress.finish();
        let mut done = done.into_inner().expect("done list");
        done.extend(group.placed.into_inner().expect("placed list"));
        done
    }

    /// Downloads needed file `i`; true when it is in place (false when it
    /// failed, or waits in `group` to be made durable with others).
    fn download_one(&self, s: &Survey, i: usize, progress: &Progress, group: &Group) -> bool {
        let e = match s.needed.get(i) {
            Ok(e) => e,
            Err(err) => {
                self.ui.error(format!(
                    "cannot read the courier's plan spool: {}",
                    describe_io(&err)
                ));
                self.fails.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        let resume = s.resume.get(&i).map(|(_, m)| m);
        let outcome = download(
            self.client,
            &self.opts.src,
            self.courier,
            &e,
            resume,
            (&self.wire, &progress.bytes),
            (group, i),
        );
        self.settle(&e, outcome, progress, group)
    }

    /// Small files, many to a request; each alone when the server does
    /// not know `?files` (and from then on), for those a cut answer left,
    /// and when the request fails for another reason than a server gone.
    /// Returns the needed indexes placed.
    fn download_many(
        &self,
        s: &Survey,
        run: &[usize],
        progress: &Progress,
        group: &Group,
        batches: &AtomicBool,
    ) -> Vec<usize> {
        let alone = |from: &[usize]| {
            from.iter()
                .take_while(|_| !self.stopping())
                .filter(|&&i| self.download_one(s, i, progress, group))
                .copied()
                .collect::<Vec<usize>>()
        };
        let Ok(entries) = run
            .iter()
            .map(|&i| s.needed.get(i))
            .collect::<io::Result<Vec<Entry>>>()
        else {
            return alone(run);
        };
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let mut answer = match self.client.get_files(&self.opts.src, &names) {
            Ok(Some(a)) => a,
            Ok(None) => {
                batches.store(false, Ordering::Relaxed);
                return alone(run);
            }
            Err(err) => {
                let why = Failure::client(err);
                if self.server_lost(&why) {
                    self.fails.fetch_add(run.len() as u64, Ordering::Relaxed);
                    return Vec::new();
                }
                return alone(run);
            }
        };
        let mut placed = Vec::new();
        for (k, (&i, e)) in run.iter().zip(&entries).enumerate() {
            let (outcome, intact) = match answer.next_item() {
                Ok(FilesItem::File { name, size, mtime }) if name == e.name => {
                    self.receive(&mut answer, e, size, mtime, progress, group, i)
                }
                Ok(FilesItem::Refused { name, why }) if name == e.name => {
                    (Err(Failure::Io(why)), true)
                }
                // Cut short, or not what was asked: the rest alone.
                _ => (Err(Failure::Io(String::new())), false),
            };
            if !intact {
                // A cut answer: this file and the rest alone, unless the
                // server is gone or the courier disk failed.
                match outcome {
                    Err(why @ (Failure::Unreachable(_) | Failure::DiskFull)) => {
                        self.settle(e, Err(why), progress, group);
                        placed.extend(alone(&run[k + 1..]));
                    }
                    _ => placed.extend(alone(&run[k..])),
                }
                return placed;
            }
            if self.settle(e, outcome, progress, group) {
                placed.push(i);
            }
        }
        if matches!(answer.next_item(), Ok(FilesItem::End)) {
            answer.finish();
        }
        placed
    }

    /// Receives one file of an answer of many into the courier, verified,
    /// to wait in `group`. Also says whether the answer can still be read
    /// (the file's bytes were all read, whatever became of them).
    #[allow(clippy::too_many_arguments)]
    fn receive(
        &self,
        answer: &mut Files,
        e: &Entry,
        size: u64,
        mtime: i64,
        progress: &Progress,
        group: &Group,
        index: usize,
    ) -> (std::result::Result<bool, Failure>, bool) {
        let skip = |answer: &mut Files| {
            io::copy(&mut answer.body(size), &mut io::sink()).is_ok_and(|n| n == size)
        };
        if size != e.size {
            let intact = skip(answer);
            return (
                Err(Failure::SourceChanged(
                    "size changed at the source since the listing".into(),
                )),
                intact,
            );
        }
        let id = self.courier.partial_id(&e.name);
        let part = match self.courier.open_partial(&id, false) {
            Ok(p) => p,
            Err(err) => {
                let intact = skip(answer);
                return (Err(Failure::io("cannot open partial file", &err)), intact);
            }
        };
        let mut hasher = Hasher::new();
        let (copied, flushed) =
            self.courier
                .copy_in(&mut answer.body(size), (&part, 0), &mut hasher, size, |n| {
                    self.wire.fetch_add(n, Ordering::Relaxed);
                    progress.bytes.fetch_add(n, Ordering::Relaxed);
                });
        let failed = match copied {
            Ok(n) if n == size => flushed
                .err()
                .map(|err| (Failure::io("cannot write courier file", &err), true)),
            Ok(n) => Some((
                Failure::Io(format!("download cut short after {n} of {size} bytes")),
                false,
            )),
            Err(CopyError::Write(err)) => {
                Some((Failure::io("cannot write courier file", &err), false))
            }
            Err(CopyError::Read(err)) => Some((read_failure(&err), false)),
        };
        if let Some((why, intact)) = failed {
            self.courier.discard_partial(&id);
            return (Err(why), intact);
        }
        if let Err(why) = listed_version(e, &hasher.hex(), Some(mtime)) {
            self.courier.discard_partial(&id);
            return (Err(why), true);
        }
        (group.add(e, part, id, index).map(|()| false), true)
    }

    /// Counts and reports how one download ended; true when the file is
    /// in place (false when it failed, or waits in `group`).
    fn settle(
        &self,
        e: &Entry,
        outcome: std::result::Result<bool, Failure>,
        progress: &Progress,
        group: &Group,
    ) -> bool {
        if outcome.is_err() && e.size <= RESUME_MIN {
            // A small file's partial cannot resume: drop it.
            self.courier
                .discard_partial(&self.courier.partial_id(&e.name));
        }
        match outcome {
            Ok(placed) => {
                if self.ui.verbose {
                    self.ui
                        .log(format!("fetched '{}' ({})", e.name, human_bytes(e.size)));
                }
                progress.files.fetch_add(1, Ordering::Relaxed);
                if !placed {
                    group.commit_if_full(self);
                }
                placed
            }
            Err(Failure::DiskFull) => {
                self.stop_disk_full();
                false
            }
            Err(why) if self.server_lost(&why) => {
                self.fails.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(why) => {
                self.ui.error(format!("'{}': {why}", e.name));
                self.fails.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Stage 7: the planned ranges, one after another.
    fn carry_ranges(&self, planned: &[PlannedRange], range_files: &[Entry]) -> Ranged {
        let mut r = Ranged::default();
        for (e, start, len) in planned {
            if self.stopping() {
                break;
            }
            let got = carry::download_range(
                self.client,
                &self.opts.src,
                self.courier,
                e,
                (*start, *len),
                &self.wire,
            );
            match got {
                Ok(_) => {
                    r.bytes += len;
                    if !range_files.iter().any(|f| f.name == e.name) {
                        r.of_needed += len;
                    }
                    if self.ui.verbose {
                        self.ui.log(format!(
                            "fetched bytes {start}-{} of '{}' ({} of {})",
                            start + len - 1,
                            e.name,
                            human_bytes(*len),
                            human_bytes(e.size)
                        ));
                    }
                }
                Err(Failure::DiskFull) => self.stop_disk_full(),
                Err(why) if self.server_lost(&why) => {
                    self.fails.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    self.ui
                        .error(format!("'{}' (bytes from {start}): {why}", e.name));
                    self.fails.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

/// Bytes carried as ranges by this run, and of them those of files not
/// under way before (a needed file started this trip).
#[derive(Default)]
struct Ranged {
    bytes: u64,
    of_needed: u64,
}

/// The whole files picked for this trip.
struct Picked {
    /// Needed indexes, in the order to fetch them.
    files: Vec<usize>,
    /// Bytes they still need in the courier.
    bytes: u64,
    /// True when the disk, rather than `--max-bytes`, left files behind.
    disk_bound: bool,
    /// What is left of the trip after them.
    left: u64,
}

/// Stage 5: fits the needed files (not duplicates, not carried as deltas)
/// into what is left, largest first, and says what decided it.
fn select(
    trip: &Trip,
    s: &Survey,
    dups: &[(usize, Origin)],
    made: &HashMap<usize, u64>,
    room: &Room,
    avail: u64,
) -> Picked {
    let is_dup = |i: usize| dups.binary_search_by_key(&i, |&(d, _)| d).is_ok();
    let need = |i: usize| {
        if is_dup(i) || made.contains_key(&i) {
            u64::MAX
        } else {
            s.costs[i] - s.partial_len(i)
        }
    };
    let files = plan::fit_largest_first(&s.costs, need, avail);
    let bytes: u64 = files.iter().map(|&i| s.costs[i] - s.partial_len(i)).sum();
    let disk_bound = room.disk < room.budget
        && plan::fit_largest_first(&s.costs, need, room.budget).len() > files.len();
    let ui = trip.ui;
    if disk_bound {
        ui.log(format!(
            "the courier disk is full after {}; {} of free space is kept in reserve",
            files_bytes(files.len() as u64, bytes),
            human_bytes(
                trip.courier
                    .free_space()
                    .unwrap_or(0)
                    .saturating_sub(room.disk)
            )
        ));
    }
    if let Some(max) = trip.opts.max_bytes {
        let fit = files_bytes(files.len() as u64, bytes);
        let whole = s.needed.len() - made.len();
        let what = if made.is_empty() {
            format!("{fit} fit of {whole} missing")
        } else {
            format!(
                "deltas of {} ({}), then {fit} of {whole} missing whole",
                n_files(made.len() as u64),
                human_bytes(made.values().sum())
            )
        };
        ui.log(format!(
            "courier holds {} of a {} budget; {what}",
            human_bytes(room.usage),
            human_bytes(max),
        ));
    }
    Picked {
        files,
        bytes,
        disk_bound,
        left: avail - bytes,
    }
}

/// What is left of the budget after the picked files starts the largest
/// file bigger than a whole trip: it arrives over several trips. A file
/// that fits a trip waits for one, to travel whole and verified.
fn next_big_range(
    courier: &Courier,
    s: &Survey,
    dups: &[(usize, Origin)],
    made: &HashMap<usize, u64>,
    picked: &Picked,
    room: &Room,
) -> Option<PlannedRange> {
    let left = picked.left;
    if left == 0 || left < ranges::MIN_RANGE.min(room.trip) {
        return None;
    }
    let is_dup = |i: usize| dups.binary_search_by_key(&i, |&(d, _)| d).is_ok();
    let taken: HashSet<usize> = picked.files.iter().copied().collect();
    let mut order: Vec<usize> = (0..s.sizes.len())
        .filter(|&i| !taken.contains(&i) && !is_dup(i) && !made.contains_key(&i))
        .collect();
    order.sort_by(|&a, &b| s.sizes[b].cmp(&s.sizes[a]));
    let &i = order.first().filter(|&&i| {
        s.sizes[i] > room.trip
            && s.costs[i] == courier.cost(s.sizes[i])
            && !s.resume.contains_key(&i)
    })?;
    let e = s.needed.get(i).ok()?;
    let len = courier.room_for(left);
    (e.sha256.is_some() && len > 0).then_some((e, 0, len))
}

/// Duplicates that became instructions: files and bytes, and how many
/// instructions point at the destination's own files.
struct Dups {
    files: u64,
    bytes: u64,
    from_dest: u64,
}

/// Stage 8: duplicates of files held or fetched become instructions to
/// copy them at the destination; the rest wait for the trip that carries
/// their original. A duplicate carried as a delta stands in for its
/// original when the original did not travel.
fn instructions(
    trip: &Trip,
    s: &mut Survey,
    dups: &[(usize, Origin)],
    done: &[usize],
    made: &HashMap<usize, u64>,
) -> Dups {
    let fetched: HashSet<usize> = done.iter().copied().chain(made.keys().copied()).collect();
    let mut stand_in: std::collections::BTreeMap<usize, usize> = Default::default();
    for &(d, orig) in dups {
        if let Origin::Needed(n) = orig {
            if made.contains_key(&d) && !fetched.contains(&n) {
                stand_in.entry(n).or_insert(d);
            }
        }
    }
    let mut out = Dups {
        files: 0,
        bytes: 0,
        from_dest: s.instrs.from_dest,
    };
    let mut copies = Vec::new();
    let mut instruct = |name: usize, from: io::Result<Entry>| {
        if let (Ok(e), Ok(o)) = (s.needed.get(name), from) {
            out.files += 1;
            out.bytes += e.size;
            copies.push(CopyInstr {
                link: e.meta.hardlink.is_some() && e.meta.hardlink == o.meta.hardlink,
                name: e.name,
                from: o.name,
                size: e.size,
                sha256: e.sha256.unwrap_or_default(),
            });
        }
    };
    for &(d, orig) in dups {
        if made.contains_key(&d) {
            continue;
        }
        let original = match orig {
            Origin::Held(h) => s.held_names.get(h),
            Origin::Needed(n) if fetched.contains(&n) => s.needed.get(n),
            Origin::Needed(n) => match stand_in.get(&n) {
                Some(&d) => s.needed.get(d),
                None => continue,
            },
        };
        instruct(d, original);
    }
    for (&n, &d) in &stand_in {
        instruct(n, s.needed.get(d));
    }
    if let Err(e) = s.instrs.finish(copies) {
        trip.ui.error(format!(
            "{e}; renamed and duplicate files are carried whole on a later trip"
        ));
        trip.fails.fetch_add(1, Ordering::Relaxed);
    }
    out
}

/// Stage 9: the run's figures: what it fetched, what the courier holds,
/// what is left (files under way counted by what they still lack).
fn summarize(
    trip: &Trip,
    s: &Survey,
    dest: &Dest,
    (done, made, picked, dup, ranged): (&[usize], &HashMap<usize, u64>, &Picked, &Dups, &Ranged),
) -> FetchSummary {
    let whole_bytes: u64 = done.iter().map(|&i| s.sizes[i]).sum();
    let new_delta_bytes: u64 = made.values().sum();
    let delta_covers: u64 = made.keys().map(|&i| s.sizes[i]).sum();
    let mut sum = FetchSummary {
        fetched_files: (done.len() + made.len()) as u64,
        fetched_bytes: whole_bytes + new_delta_bytes,
        delta_files: s.deltas_held.files + made.len() as u64,
        delta_bytes: s.deltas_held.bytes + new_delta_bytes,
        delta_file_bytes: s.deltas_held_covers + delta_covers,
        failed_files: s.refused + trip.fails.load(Ordering::Relaxed),
        downloaded_bytes: trip.wire.load(Ordering::Relaxed),
        disk_full: trip.disk_full.load(Ordering::SeqCst) || picked.disk_bound,
        server_gone: trip.server_gone.load(Ordering::SeqCst),
        skipped: s.skipped,
        ..Default::default()
    };
    sum.courier_files = s.held.files + s.deltas_held.files + sum.fetched_files;
    sum.courier_bytes = s.held.bytes + s.deltas_held.bytes + sum.fetched_bytes;
    sum.remaining_files = (s.needed.len() - done.len() - made.len()) as u64 - dup.files;
    sum.remaining_bytes = s.sizes.iter().sum::<u64>() - whole_bytes - delta_covers - dup.bytes;
    sum.instructed_files = courier::count_copies(trip.courier).max(dup.from_dest);
    // Files under way: what is left of each after this run's ranges.
    let now_held = ranges::held(trip.courier);
    let now_recs: Vec<RangeRecord> = now_held.iter().map(|(_, r)| r.clone()).collect();
    for f in &s.range_files {
        let at = ranges::next_start(f, dest.partials.get(&f.name), &now_recs);
        if at < f.size {
            sum.remaining_files += 1;
            sum.remaining_bytes += f.size - at;
        }
    }
    sum.remaining_bytes -= ranged.of_needed;
    sum.range_bytes = ranged.bytes;
    sum.ranged_files = now_held
        .iter()
        .map(|(_, r)| r.name.as_str())
        .collect::<HashSet<_>>()
        .len() as u64;
    sum.courier_bytes += now_held.iter().map(|(_, r)| r.len).sum::<u64>();
    sum.budget_stop = sum.remaining_files > 0 && picked.files.len() + made.len() < s.needed.len();
    sum
}

/// The summary, as JSON or as lines for a person.
fn report(ui: &Ui, sum: &FetchSummary) {
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
        let why = if sum.server_gone {
            "stopped: the source server stopped answering; "
        } else if sum.disk_full {
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
    ui.summary(sum, &human);
}

/// `fetch --dry-run`: what a run would fetch and remove, decided as
/// `plan` decides it, against what the courier holds (no file is hashed,
/// created or removed, and no lock is taken).
fn dry_run(ui: &Ui, client: &Client, opts: &FetchOpts) -> Result<Exit> {
    let mut c = Courier::open_read(&opts.courier)?;
    if let (true, Some(r)) = (check_seal(ui, &c, opts)?, &opts.seal) {
        c.plan_sealed(r);
    }
    let p = preview::preview(
        ui,
        client,
        &opts.destdb,
        &opts.src,
        Some(&c),
        opts.max_bytes,
    )?;
    p.list(ui);
    let f = p.figures();
    let sum = FetchSummary {
        fetched_files: f.trip_files,
        fetched_bytes: f.trip_bytes,
        courier_files: f.held_files + f.trip_files,
        courier_bytes: p.held_bytes + f.trip_bytes,
        remaining_files: f.later_files,
        remaining_bytes: f.later_bytes,
        failed_files: p.refused,
        instructed_files: f.instructed_files,
        range_bytes: f.range_bytes,
        ranged_files: f.ranged_files,
        delta_files: f.delta_files,
        budget_stop: f.later_files > 0,
        skipped: p.skipped,
        dry_run: true,
        ..Default::default()
    };
    let mut human = String::new();
    if !p.removed.is_empty() {
        human.push_str(&format!(
            "dry run: would remove {} the destination no longer lacks from the courier\n",
            files_bytes(
                p.removed.len() as u64,
                p.removed.iter().map(|(_, n)| n).sum()
            )
        ));
    }
    human.push_str(&format!(
        "dry run: would fetch {}{}; {} would be left for the next trip\n",
        files_bytes(sum.fetched_files, sum.fetched_bytes),
        if sum.range_bytes > 0 {
            format!(" and {} as ranges", human_bytes(sum.range_bytes))
        } else {
            String::new()
        },
        files_bytes(sum.remaining_files, sum.remaining_bytes)
    ));
    if sum.instructed_files > 0 {
        human.push_str(&format!(
            "dry run: {} would be made at the destination from content it has or the trip carries\n",
            n_files(sum.instructed_files)
        ));
    }
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
    // A pack's size is its data's, not the file's.
    let size_ok = meta.size == e.size || courier.is_pack(&e.name);
    if size_ok && log.get(&e.name).is_some_and(|c| c.matches(e)) {
        return true;
    }
    if size_ok {
        if let (Some(want), Ok(Some(got))) = (&e.sha256, courier.hash_carried(&e.name, e.size)) {
            if &got == want {
                return courier.append_log(&Carried::of(e)).is_ok();
            }
        }
    }
    ui.log(format!("replacing stale courier copy of '{}'", e.name));
    courier.remove_carried(&e.name);
    false
}

/// Downloads one file into the courier (resuming a partial one). True
/// when it is in place; false when, verified, it waits in `group` to be
/// made durable and placed with others (a small file).
fn download(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    resume: Option<&PartialMeta>,
    (wire, shown): (&AtomicU64, &AtomicU64),
    (group, index): (&Group, usize),
) -> std::result::Result<bool, Failure> {
    if e.alloc.is_some_and(|a| a < e.size) && e.sha256.is_some() {
        return download_sparse(client, src, courier, e, wire, shown).map(|()| true);
    }
    let id = courier.partial_id(&e.name);
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
            .map_err(Failure::client)?;
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
        let (copied, flushed) =
            courier.copy_in(&mut dl.body, (&part, offset), &mut hasher, want, |n| {
                wire.fetch_add(n, Ordering::Relaxed);
                shown.fetch_add(n, Ordering::Relaxed);
            });
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
            Err(CopyError::Read(err)) => return Err(read_failure(&err)),
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

    if let Err(why) = listed_version(e, &hasher.hex(), last_modified) {
        courier.discard_partial(&id);
        return Err(why);
    }
    if e.size <= RESUME_MIN {
        group.add(e, part, id, index)?;
        return Ok(false);
    }
    finish(courier, e, part, &id).map(|()| true)
}

/// A download that stopped reading: the server gone, or another failure
/// a rerun resumes from.
fn read_failure(err: &io::Error) -> Failure {
    if crate::error::is_connection_lost(err) {
        Failure::Unreachable(format!("download failed: {}", describe_io(err)))
    } else {
        Failure::Io(format!(
            "download failed: {}; rerun to resume",
            describe_io(err)
        ))
    }
}

/// Whether the bytes received (their SHA-256, and the mtime the server
/// gave) are the listed version of `e`: by hash, or for an area that
/// lists none, by mtime.
fn listed_version(e: &Entry, got: &str, mtime: Option<i64>) -> std::result::Result<(), Failure> {
    let why = match &e.sha256 {
        Some(want) if want == got => return Ok(()),
        Some(want) => {
            format!("sha256 mismatch: got {got}, listed {want} (changed at the source?); not kept")
        }
        None if mtime.is_none_or(|t| t == e.mtime) => return Ok(()),
        None => "modified at the source since the listing; not kept".into(),
    };
    Err(Failure::SourceChanged(why))
}

/// A verified small file waiting: its needed index, entry and partial id.
type Waiting = (usize, Entry, String);

/// Small files waiting to be made durable together. Each is complete and
/// verified in `.bitfog/partial/`; a group is made durable with one
/// `syncfs` (instead of an fsync each, which the file system's journal
/// serialises), then each is renamed into place and recorded. A run
/// killed before that leaves them as partial downloads, which the next
/// run discards: only a durable, verified file ever appears at its final
/// path, and only such a file is recorded.
struct Group<'c> {
    courier: &'c Courier,
    /// (needed index, entry, partial id), their bytes, and since when the
    /// first has waited.
    pending: Mutex<(Vec<Waiting>, u64)>,
    since: Mutex<Option<std::time::Instant>>,
    /// Needed indexes placed.
    placed: Mutex<Vec<usize>>,
}

impl<'c> Group<'c> {
    fn new(courier: &'c Courier) -> Group<'c> {
        Group {
            courier,
            pending: Mutex::new((Vec::new(), 0)),
            since: Mutex::new(None),
            placed: Mutex::new(Vec::new()),
        }
    }

    /// Sets the file's mode and mtime and queues it.
    fn add(
        &self,
        e: &Entry,
        part: File,
        id: String,
        index: usize,
    ) -> std::result::Result<(), Failure> {
        prepare(e, &part)?;
        drop(part);
        let mut p = self.pending.lock().expect("pending files");
        p.0.push((index, e.clone(), id));
        p.1 += e.size;
        self.since
            .lock()
            .expect("pending since")
            .get_or_insert_with(std::time::Instant::now);
        Ok(())
    }

    /// Commits the queue when it is full, or its first file has waited
    /// `GROUP_WAIT` (a slow link places files as they come).
    fn commit_if_full(&self, trip: &Trip) {
        let batch = {
            let mut p = self.pending.lock().expect("pending files");
            let mut since = self.since.lock().expect("pending since");
            let waited = since.is_some_and(|t| t.elapsed() >= GROUP_WAIT);
            if p.0.len() < GROUP_FILES && p.1 < GROUP_BYTES && !waited {
                return;
            }
            *since = None;
            std::mem::take(&mut *p).0
        };
        self.commit(trip, batch);
    }

    /// Commits whatever waits (the end of the downloads).
    fn commit_rest(&self, trip: &Trip) {
        let batch = std::mem::take(&mut *self.pending.lock().expect("pending files")).0;
        self.commit(trip, batch);
    }

    fn commit(&self, trip: &Trip, batch: Vec<Waiting>) {
        if batch.is_empty() {
            return;
        }
        if let Err(err) = self.courier.sync_fs() {
            let why = Failure::io("cannot sync the courier", &err);
            if matches!(why, Failure::DiskFull) {
                trip.stop_disk_full();
            } else {
                trip.ui.error(format!(
                    "{why}; {} files are fetched again by the next run",
                    batch.len()
                ));
            }
            trip.fails.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for (_, _, id) in &batch {
                self.courier.discard_partial(id);
            }
            return;
        }
        let mut placed = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        for (i, e, id) in batch {
            match self.courier.place(&id, &e.name) {
                Ok(()) => {
                    placed.push(i);
                    records.push(Carried::of(&e));
                }
                Err(err) => {
                    let why = Failure::io("cannot move into place", &err);
                    trip.ui.error(format!("'{}': {why}", e.name));
                    trip.fails.fetch_add(1, Ordering::Relaxed);
                    self.courier.discard_partial(&id);
                }
            }
        }
        // One write for the group's records. Files placed but not
        // recorded are adopted by the next run once their hashes check.
        if let Err(err) = self.courier.append_logs(&records) {
            let why = Failure::io("cannot record carried files", &err);
            trip.ui.error(format!(
                "{why}; {} files are checked again by the next run",
                records.len()
            ));
            trip.fails
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            return;
        }
        self.placed.lock().expect("placed list").extend(placed);
    }
}

/// Gives a verified courier file its mode and mtime.
fn prepare(e: &Entry, part: &File) -> std::result::Result<(), Failure> {
    // For the person looking only: the mode travels in the records, and
    // a courier without permission bits (FAT) refuses it.
    let _ = part.set_permissions(fs::Permissions::from_mode((e.mode & 0o777) | 0o600));
    let mtime = if e.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(e.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
    };
    // Both times: exfat-fuse refuses a change of the mtime alone.
    let _ = part.set_times(fs::FileTimes::new().set_accessed(mtime).set_modified(mtime));
    Ok(())
}

/// Puts a verified partial file in place: mode, mtime, fsync, rename, and
/// the record of what the courier carries.
fn finish(courier: &Courier, e: &Entry, part: File, id: &str) -> std::result::Result<(), Failure> {
    finish_as(courier, e, part, id, false)
}

/// `finish`, for a file kept as its framed data extents when `pack`.
fn finish_as(
    courier: &Courier,
    e: &Entry,
    part: File,
    id: &str,
    pack: bool,
) -> std::result::Result<(), Failure> {
    // A sealed courier's files tell nothing of theirs.
    if courier.sealed().is_none() {
        prepare(e, &part)?;
    }
    part.sync_all()
        .map_err(|err| Failure::io("cannot sync courier file", &err))?;
    drop(part);
    courier
        .place_as(id, &e.name, pack)
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
/// interrupted one starts over. A courier that keeps no holes (exFAT,
/// FAT) gets the extents framed one after another instead (the body a
/// sparse `PUT` sends, see `sparse::ExtentBody`), in `.bitfog/names/`:
/// what it takes is the data, not the file's size.
fn download_sparse(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    wire: &AtomicU64,
    shown: &AtomicU64,
) -> std::result::Result<(), Failure> {
    let id = courier.partial_id(&e.name);
    let (size, extents) = client.extents(src, &e.name).map_err(Failure::client)?;
    if size != e.size {
        return Err(Failure::SourceChanged(
            "size changed at the source since the listing".into(),
        ));
    }
    let part = courier
        .open_partial(&id, false)
        .map_err(|err| Failure::io("cannot open partial file", &err))?;
    // A sealed courier keeps every sparse file as its extents, encrypted.
    let pack = !courier.traits().holes || courier.sealed().is_some();
    if !pack {
        part.set_len(e.size)
            .map_err(|err| Failure::io("cannot size partial file", &err))?;
    }
    let write_err = |err: io::Error| Failure::io("cannot write courier file", &err);
    // A pack is written in one stream, frame after frame.
    let mut packer = match pack {
        true => Some(
            courier
                .sink(io::BufWriter::with_capacity(
                    BUF_SIZE,
                    Writeback::new(&part, 0),
                ))
                .map_err(write_err)?,
        ),
        false => None,
    };
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
            .map_err(Failure::client)?;
        let whole = dl.content_range == Some((start, start + len - 1, size));
        if dl.status != 206 || !whole || dl.last_modified.is_some_and(|t| t != e.mtime) {
            courier.discard_partial(&id);
            return Err(Failure::SourceChanged(
                "changed at the source since the listing; not kept".into(),
            ));
        }
        let count = |n| {
            wire.fetch_add(n, Ordering::Relaxed);
            shown.fetch_add(n, Ordering::Relaxed);
        };
        let (copied, flushed) = match packer.as_mut() {
            Some(out) => {
                let mut head = [0u8; 16];
                head[..8].copy_from_slice(&start.to_be_bytes());
                head[8..].copy_from_slice(&len.to_be_bytes());
                out.write_all(&head).map_err(write_err)?;
                let copied = copy_hashing_apart(&mut dl.body, out, &mut hasher, len, count);
                (copied, Ok(()))
            }
            None => {
                (&part)
                    .seek(SeekFrom::Start(start))
                    .map_err(|err| Failure::io("cannot seek partial file", &err))?;
                let mut out = io::BufWriter::with_capacity(BUF_SIZE, Writeback::new(&part, start));
                let copied = copy_hashing(&mut dl.body, &mut out, &mut hasher, len, count);
                (copied, out.flush())
            }
        };
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
    if let Some(out) = packer.take() {
        out.finish().map_err(write_err)?;
    }
    drop(packer);
    crate::digest::hash_zeros(&mut hasher, size - pos);
    let got = hasher.hex();
    if e.sha256.as_deref() != Some(got.as_str()) {
        courier.discard_partial(&id);
        return Err(Failure::SourceChanged(format!(
            "sha256 mismatch: got {got} (changed at the source?); not kept"
        )));
    }
    finish_as(courier, e, part, &id, pack)
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
