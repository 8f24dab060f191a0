//! `store`: uploads from the courier what the destination lacks according
//! to SRCDB, each file's SHA-256 checked before it leaves the courier.
//!
//! One bad file is reported and the others still go. Nothing is deleted at
//! the destination without `--delete`.

use crate::client::{AreaUrl, Client};
use crate::courier::ranges;
use crate::courier::{Carried, Courier, Plain, Spool};
use crate::digest::{Hasher, hash_reader};
use crate::error::{Error, Exit, Result, describe_io};
use crate::plan::{self, Pair};
use crate::ui::{Progress, Ui, files_bytes, human_bytes, n_files};
use crate::wire::manifest::{DbWriter, Entry, as_usage, open_db};
use crate::wire::paths::check_carried_name;
use std::collections::{HashMap, HashSet};

use crate::cmd::carry::{self, Failure};
use crate::courier::{RECEIPT, SNAPSHOT, SOURCE};

/// One name of the receipt being made: the entry the destination has
/// once the actions succeed, and whether that waits on an upload (then
/// `old` is what it keeps if the upload fails).
#[derive(Serialize, serde::Deserialize)]
struct ReceiptLine {
    e: Entry,
    #[serde(default)]
    up: bool,
    #[serde(default)]
    old: Option<Entry>,
}
use serde::Serialize;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub(crate) struct StoreOpts {
    pub(crate) srcdb: PathBuf,
    pub(crate) dest: AreaUrl,
    pub(crate) courier: PathBuf,
    pub(crate) delete: bool,
    /// Stop after this many deletions.
    pub(crate) max_delete: Option<u64>,
    pub(crate) dry_run: bool,
    /// `--other-dest`: DESTURL may be another area than the trip's.
    pub(crate) other_dest: bool,
    pub(crate) jobs: usize,
    /// How many files over the batch size may be sent at once (a courier
    /// on a spinning disk reads a few streams faster than many).
    pub(crate) big_jobs: usize,
    /// `--encrypt-to`: who the receipt of a sealed courier is for.
    pub(crate) seal: Option<Vec<crate::age::Recipient>>,
}

#[derive(Serialize, Default)]
struct StoreSummary {
    stored_files: u64,
    stored_bytes: u64,
    skipped_files: u64,
    failed_files: u64,
    deleted_files: u64,
    /// Deletions not done: past `--max-delete`, or the file changed at the
    /// destination since the snapshot `fetch` saw.
    kept_files: u64,
    /// Of `stored_files`, those the destination made from its own copies.
    copied_files: u64,
    /// Of `stored_files`, those made as hard links to another name of the
    /// same file (as the source has them).
    linked_files: u64,
    /// Of `stored_files`, those patched from their older version with a
    /// delta, and the delta bytes sent.
    patched_files: u64,
    delta_bytes: u64,
    /// Files whose content was there but whose mode or mtime changed
    /// (also counted in `skipped_files`).
    updated_files: u64,
    /// Files bigger than a trip that got ranges but are not complete yet.
    partial_files: u64,
    /// Directories made at the destination or given SRCDB's mode, mtime
    /// and owner.
    dirs_made: u64,
    /// Directories the source does not have, removed once empty
    /// (`--delete`).
    dirs_removed: u64,
    /// The destination server stopped answering; the run stopped there.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    server_gone: bool,
    /// Files the destination area excludes (it answered 403): not stored,
    /// not failures.
    excluded_files: u64,
    /// The destination's disk filled up (it answered 507); no upload was
    /// started after that.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disk_full: bool,
    /// Files SRCDB has that neither the destination nor the courier holds.
    missing_files: u64,
    missing_bytes: u64,
}

enum Action {
    Upload(Entry),
    Link(Entry),
    /// Made at the destination from its own file (`from`; the entry's own
    /// name for a change of mode or mtime alone).
    Copy(Entry, String),
    /// Appended range by range from `.bitfog/ranges/` (a file bigger than
    /// a trip).
    Ranges(Entry),
    /// Made at the destination from its older version and the delta in
    /// `.bitfog/deltas/`.
    Patch(Entry, String, u64),
    Delete(String),
    /// Made at the destination as another name of its file `from` (a hard
    /// link: the source's names of one file stay one file).
    HardLink(Entry, String),
}

impl Action {
    /// The name an upload stores.
    fn upload_name(&self) -> Option<&str> {
        match self {
            Action::Upload(e) => Some(&e.name),
            _ => None,
        }
    }
}

/// An upload, link or copy, as kept in the spool.
#[derive(Serialize, serde::Deserialize)]
struct Task {
    e: Entry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ranged: bool,
    /// The delta that makes this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delta: Option<(String, u64)>,
    /// `from` is a name this one is a hard link to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    hard: bool,
}

impl Task {
    /// An upload of `e` (or the making of its symlink).
    fn of(e: &Entry) -> Task {
        Task {
            e: e.clone(),
            from: None,
            ranged: false,
            delta: None,
            hard: false,
        }
    }

    fn action(self) -> Action {
        if self.ranged {
            return Action::Ranges(self.e);
        }
        if let Some((file, len)) = self.delta {
            return Action::Patch(self.e, file, len);
        }
        match self.from {
            Some(from) if self.hard => Action::HardLink(self.e, from),
            Some(from) => Action::Copy(self.e, from),
            None if self.e.is_symlink() => Action::Link(self.e),
            None => Action::Upload(self.e),
        }
    }
}

/// `bitfog store SRCDB DESTURL COURIER`: open the inputs, classify each
/// name of SRCDB against the destination's listing, choose deletions,
/// then either say what would happen (`--dry-run`) or do it by phases,
/// make the empty directories, leave the receipt and report.
pub(crate) fn store(ui: &Ui, client: &Client, opts: &StoreOpts) -> Result<Exit> {
    let (header, mut src) = open_db(&srcdb_path(&opts.srcdb)?)?;
    check_inputs(opts, header.source.is_none())?;
    let (dest_id, folds) = check_dest(client, opts, &header)?;
    if !opts.srcdb.is_dir() {
        check_against_courier(opts, &header)?;
    }
    let (courier, read_only) = open_courier(ui, opts)?;
    check_planned_dest(ui, opts, &courier, dest_id.as_deref())?;
    let mut listing = client.listing(&opts.dest)?;
    let mut plan = Plan::new(opts, &courier, read_only)?;
    plan.folds = folds.then(Folds::default);
    plan.classify(opts, &courier, &mut src, &mut listing)?;
    if opts.delete && src.end().is_some_and(|e| e.count == 0) {
        return Err(Error::usage(format!(
            "'{}' lists nothing; refusing --delete, which would empty the destination",
            opts.srcdb.display()
        )));
    }
    for msg in &plan.refused {
        ui.error(msg);
    }
    if plan.owners_unapplied {
        ui.log(format!(
            "{}: owners differ from SRCDB's and are left as they are: the area does not apply owners (it needs \"owners\": true in bitfog.json and a server running as root)",
            opts.dest
        ));
    }
    plan.sum.failed_files += plan.refused.len() as u64;
    // What SRCDB left out on purpose is not SRCDB's to delete.
    let kept = if opts.delete {
        protected(opts, &header, src.end().as_ref())?
    } else {
        Default::default()
    };
    plan.doomed.retain(|d| !kept.excludes(&d.name, false));
    let src_skipped = src.end().map_or(0, |e| e.skipped);
    let over_limit = plan.deletions(ui, opts, &courier, src_skipped)?;
    let dest_end = listing
        .end()
        .unwrap_or_else(|| crate::wire::manifest::End::new(0, 0, 0));
    let mut doomed = if opts.delete && src_skipped == 0 {
        doomed_dirs(&mut plan, src.end().as_ref(), &dest_end)
    } else {
        Vec::new()
    };
    doomed.retain(|d| !kept.excludes(d, true));
    check_mass_delete(opts, &plan, &dest_end, src.end().map_or(0, |e| e.count))?;
    if opts.dry_run {
        return Ok(dry_run(ui, plan, &doomed, over_limit));
    }
    let (mut sum, mut outcomes, unsure) = execute(ui, client, opts, &courier, &mut plan, doomed)?;
    if !sum.server_gone && !sum.disk_full {
        outcomes.made = make_dirs(
            ui,
            client,
            opts,
            src.end(),
            &dest_end,
            &mut outcomes.touched,
            &mut sum,
        );
    }
    let receipt = plan.receipt.take().expect("a receipt unless dry run");
    if read_only {
        ui.log("no receipt is left in the read-only courier: run builddb at the destination for the next fetch's DESTDB");
    } else {
        leave_receipt(
            ui,
            opts,
            &courier,
            (receipt, dest_end, outcomes),
            unsure,
            &mut sum,
        );
    }
    report(ui, opts, &sum);
    Ok(if sum.failed_files > 0 || over_limit {
        Exit::Failed
    } else {
        Exit::Done
    })
}

/// What the destination area is, from one HEAD: its identity and
/// whether its filesystem folds case. Refuses (exit 2) a read-only area
/// and an SRCDB of the destination itself.
fn check_dest(
    client: &Client,
    opts: &StoreOpts,
    header: &crate::wire::manifest::Header,
) -> Result<(Option<String>, bool)> {
    let (dest_id, folds, writable) = client.area_head(&opts.dest)?;
    if writable == Some(false) {
        return Err(Error::usage(format!(
            "{}: a read-only area (its bitfog.json does not say \"writable\": true); store writes only into a writable area",
            opts.dest
        )));
    }
    check_not_dest(opts, header, dest_id.as_deref())?;
    Ok((dest_id, folds))
}

/// Opens COURIER for the run, and says whether it is on a read-only
/// filesystem. A dry run neither locks nor writes anything in the
/// courier, and nor does a run from a read-only one.
fn open_courier(ui: &Ui, opts: &StoreOpts) -> Result<(Courier, bool)> {
    let read_only = !opts.dry_run && crate::courier::read_only_fs(&opts.courier);
    if !opts.dry_run && !read_only {
        return Ok((Courier::open(&opts.courier, false)?, false));
    }
    let courier = Courier::open_read(&opts.courier)?;
    if read_only {
        if courier.state_dir().is_err() {
            return Err(Error::usage(format!(
                "'{}' is not a courier: fetch has not filled it (no .bitfog/)",
                opts.courier.display()
            )));
        }
        ui.log(format!(
            "'{}' is on a read-only filesystem: storing from it without its lock, and leaving no receipt in it",
            opts.courier.display()
        ));
    }
    Ok((courier, read_only))
}

/// Leaves the receipt in the courier, or says why there is none (and
/// counts a failure where one was due).
fn leave_receipt(
    ui: &Ui,
    opts: &StoreOpts,
    courier: &Courier,
    (receipt, dest_end, outcomes): (Spool<ReceiptLine>, crate::wire::manifest::End, Outcomes),
    unsure: bool,
    sum: &mut StoreSummary,
) {
    // An encrypted courier's receipt names the destination's files: it is
    // encrypted to `--encrypt-to`, or to the courier's recipients when the
    // source holds one of their identities, or not written.
    let receipt_to = match (courier.sealed(), &opts.seal) {
        (_, Some(r)) => Some(Some(r.as_slice())),
        (Some(s), None) if s.source_reads => Some(Some(s.recipients.as_slice())),
        (Some(_), None) => None,
        (None, None) => Some(None),
    };
    if receipt_to.is_none() {
        ui.log("no receipt is left in the encrypted courier: the source holds no identity to read it (give --encrypt-to RECIPIENT for one encrypted to it)");
        courier.drop_receipt();
    } else if unsure {
        ui.error("no receipt is left in the courier: an upload's outcome is unknown; run builddb at the destination");
        sum.failed_files += 1;
        courier.drop_receipt();
    } else if let Err(e) = write_receipt(
        courier,
        (&opts.dest, receipt_to.flatten()),
        receipt,
        dest_end,
        outcomes,
    ) {
        ui.error(format!("cannot leave the receipt in the courier: {e}"));
        sum.failed_files += 1;
        courier.drop_receipt();
    }
}

/// Deletions past which `--delete` wants `--max-delete` (see
/// `check_mass_delete`).
const MASS_DELETE_MIN: u64 = 100;

/// Refuses, before anything is touched, a `--delete` that would remove
/// more than half of the destination's files (and more than
/// `MASS_DELETE_MIN`) without `--max-delete`: a source volume that was not
/// mounted, or the wrong SRCDB, lists almost nothing, and the destination
/// copy would go with it.
fn check_mass_delete(
    opts: &StoreOpts,
    plan: &Plan,
    dest: &crate::wire::manifest::End,
    src_count: u64,
) -> Result<()> {
    let deleting = plan
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Delete(_)))
        .count() as u64;
    if opts.max_delete.is_some() || deleting <= MASS_DELETE_MIN || deleting * 2 <= dest.count {
        return Ok(());
    }
    Err(Error::usage(format!(
        "--delete would remove {deleting} of the destination's {} files, more than half ('{}' lists {src_count}): is the source's volume mounted, is this the right SRCDB? Nothing was touched; give --max-delete {deleting} to delete them",
        dest.count,
        opts.srcdb.display()
    )))
}

/// Refuses an SRCDB that describes the destination area itself (the two
/// DBs swapped), compared by identity, not URL.
fn check_not_dest(
    opts: &StoreOpts,
    header: &crate::wire::manifest::Header,
    dest_id: Option<&str>,
) -> Result<()> {
    let Some(id) = &header.area_id else {
        return Ok(());
    };
    if dest_id == Some(id.as_str()) {
        return Err(Error::usage(format!(
            "'{}' describes the destination area {} itself; give the source's DB (builddb at the source before fetch)",
            opts.srcdb.display(),
            opts.dest
        )));
    }
    Ok(())
}

/// Refuses a DESTURL that is another area than the one the courier's
/// trip was planned for (its destination snapshot names that area's
/// identity): a mistyped area would get files of the same names
/// replaced, and deletions judged by another area's snapshot.
/// `--other-dest` lets a destination that moved (a new disk or machine
/// gives it a new identity) take the courier.
fn check_planned_dest(
    ui: &Ui,
    opts: &StoreOpts,
    courier: &Courier,
    dest_id: Option<&str>,
) -> Result<()> {
    // A snapshot this run cannot read (an encrypted DESTDB's copy, no
    // --identity) says nothing here; --delete needs it and says so.
    let Ok(Some((planned, _))) = snapshot(opts, courier) else {
        return Ok(());
    };
    let Some(planned_id) = &planned.area_id else {
        return Ok(());
    };
    match dest_id {
        Some(id) if id != planned_id => {
            let was = planned.source.as_deref().unwrap_or("unknown");
            if opts.other_dest {
                ui.log(format!(
                    "{}: not the area the courier's trip was planned for ({was}); storing there as --other-dest asks",
                    opts.dest
                ));
                return Ok(());
            }
            Err(Error::usage(format!(
                "{}: not the area the courier's trip was planned for ({was}); give that area's URL, or --other-dest if this is it after a move",
                opts.dest
            )))
        }
        _ => Ok(()),
    }
}

/// The destination snapshot `fetch` kept in the courier, opened.
fn snapshot(
    opts: &StoreOpts,
    courier: &Courier,
) -> Result<
    Option<(
        crate::wire::manifest::Header,
        crate::wire::manifest::Reader<std::io::BufReader<std::fs::File>>,
    )>,
> {
    let Some(snapshot) = courier.state_file(SNAPSHOT) else {
        return Ok(None);
    };
    let origin = format!(
        "'{}'",
        opts.courier.join(".bitfog").join(SNAPSHOT).display()
    );
    let snapshot = crate::age::open_plain(snapshot)
        .map_err(|e| Error::usage(format!("{origin}: {}", crate::error::describe_io(&e))))?;
    crate::wire::manifest::open_db_file(snapshot, origin).map(Some)
}

/// The source manifest `fetch` left in courier `dir`, if there is one:
/// read where it is, a regular file in a real `.bitfog` directory.
fn courier_source(dir: &std::path::Path) -> Result<Option<PathBuf>> {
    let held = Courier::open_read(dir)?.state_file(SOURCE).is_some();
    Ok(held.then(|| dir.join(crate::wire::paths::COURIER_STATE).join(SOURCE)))
}

/// SRCDB itself, or the source manifest `fetch` left when SRCDB is a
/// courier directory.
fn srcdb_path(srcdb: &std::path::Path) -> Result<PathBuf> {
    if !srcdb.is_dir() {
        return Ok(srcdb.to_path_buf());
    }
    if let Some(path) = courier_source(srcdb)? {
        Ok(path)
    } else {
        Err(Error::usage(format!(
            "'{}' is a directory without a source manifest (fetch leaves one in a courier); give a SRCDB made by builddb at the source",
            srcdb.display()
        )))
    }
}

/// Refuses an explicit SRCDB that does not describe what the courier
/// holds: one of another area than the courier was filled from (exit 2),
/// or one older than the courier, which lacks files the courier carries
/// or lists them with other contents (exit 1; those files would be left
/// behind without a word). Nothing is touched either way.
fn check_against_courier(opts: &StoreOpts, header: &crate::wire::manifest::Header) -> Result<()> {
    if !opts.courier.is_dir() {
        return Ok(());
    }
    if let Some(path) = courier_source(&opts.courier)? {
        let (theirs, _) = open_db(&path)?;
        if let (Some(a), Some(b)) = (&theirs.area_id, &header.area_id) {
            if a != b {
                return Err(Error::usage(format!(
                    "'{}' describes another area ({}) than the courier was filled from ({}); give the courier itself as SRCDB, or that area's DB",
                    opts.srcdb.display(),
                    header.source.as_deref().unwrap_or("unknown"),
                    theirs.source.as_deref().unwrap_or("unknown"),
                )));
            }
        }
    }
    let courier = Courier::open_read(&opts.courier)?;
    let mut held: HashMap<String, crate::courier::Carried> = courier
        .read_log()
        .into_iter()
        .filter(|(name, c)| {
            !c.damaged
                && courier
                    .carried_meta(name)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.kind == crate::beneath::Kind::File)
        })
        .collect();
    let (_, entries) = open_db(&opts.srcdb)?;
    for e in entries {
        let e = e.map_err(as_usage)?;
        if held.get(&e.name).is_some_and(|c| c.matches(&e)) {
            held.remove(&e.name);
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    let mut names: Vec<&String> = held.keys().collect();
    names.sort();
    let shown: Vec<String> = names
        .iter()
        .take(3)
        .map(|n| format!("'{}'", crate::ui::escape(n)))
        .collect();
    let more = if names.len() > 3 { ", ..." } else { "" };
    Err(Error::failed(format!(
        "'{}' is older than the courier: {} it holds {} not in it or differ ({}{more}); run builddb at the source again, or give the courier itself as SRCDB",
        opts.srcdb.display(),
        crate::ui::n_files(names.len() as u64),
        if names.len() == 1 { "is" } else { "are" },
        shown.join(", ")
    )))
}

/// The names `--delete` leaves alone: those SRCDB's `--exclude` patterns
/// (its header) or its area's own (its end record) match.
fn protected(
    opts: &StoreOpts,
    header: &crate::wire::manifest::Header,
    end: Option<&crate::wire::manifest::End>,
) -> Result<crate::wire::exclude::Excludes> {
    let bad = |why: String| {
        Error::usage(format!(
            "'{}': {why}; cannot tell what it left out on purpose",
            opts.srcdb.display()
        ))
    };
    let own = crate::wire::exclude::Excludes::new(&header.exclude).map_err(bad)?;
    let area = crate::wire::exclude::Excludes::new(end.map_or(&[][..], |e| &e.exclude[..]))
        .map_err(bad)?;
    Ok(own.and(&area))
}

/// Refuses, before anything is touched, a `--delete` by a DB made by
/// `emptydb`, and a courier that is not there.
fn check_inputs(opts: &StoreOpts, from_emptydb: bool) -> Result<()> {
    if opts.delete && from_emptydb {
        return Err(Error::usage(format!(
            "'{}' was made by emptydb; refusing --delete, which would empty the destination",
            opts.srcdb.display()
        )));
    }
    if !opts.courier.is_dir() {
        return Err(Error::usage(format!(
            "'{}': courier directory not found",
            opts.courier.display()
        )));
    }
    Ok(())
}

fn spool_err(e: std::io::Error) -> Error {
    Error::io("the courier's plan spool", &e)
}

/// What `store` will do, decided name by name. Uploads, links and copies
/// go to a spool under `.bitfog/` (read back one at a time by the
/// workers, so a million-file courier is not held in memory); a dry run
/// keeps them in `actions`. Deletions are always in `actions`.
struct Plan {
    actions: Vec<Action>,
    spool: Option<Spool<Task>>,
    /// Which spooled tasks are copies and which hard links (they run in
    /// phases of their own).
    copy_at: Vec<bool>,
    hard_at: Vec<bool>,
    /// Link groups of SRCDB met so far: the first name (the one the others
    /// are linked to), its SHA-256, the destination's link group of that
    /// name when it stays as it is, and whether it is missing.
    leaders: HashMap<u64, Leader>,
    /// The receipt's lines: what the destination holds after this run,
    /// from its listing and the outcome of each action (no second
    /// listing, so nothing just stored is hashed again).
    receipt: Option<Spool<ReceiptLine>>,
    sum: StoreSummary,
    /// Bytes to upload, for the progress line.
    total_bytes: u64,
    refused: Vec<String>,
    /// Destination files SRCDB does not have (with `--delete`).
    doomed: Vec<Entry>,
    /// With `--delete`: the directories SRCDB's entries sit in, and the
    /// destination's.
    src_dirs: HashSet<String>,
    dst_dirs: HashSet<String>,
    /// The destination applies owners (its listing said so), and lists
    /// nanoseconds and owners.
    dest_owners: bool,
    dest_extended: bool,
    /// SRCDB names owners the destination will not apply.
    owners_unapplied: bool,
    /// On a destination whose filesystem folds case: who owns each
    /// folded path.
    folds: Option<Folds>,
}

/// Why a name is not stored on a destination that folds case: a name
/// there, and one of SRCDB.
const FOLDED: &str = "not stored: the destination's filesystem folds case, and it has a name the source does not that differs from this one (or a directory above it) only in case; store --delete removes that name, and the next run stores this one";
const FOLDED_TWICE: &str = "not stored: the destination's filesystem folds case, and SRCDB has another name that differs from this one (or a directory above it) only in case; one file there cannot be both";

/// On a destination whose filesystem folds case, the exact path that
/// owns each folded path (names and the directories above them), as
/// hashes, and whether that owner is a name only SRCDB has. A name SRCDB
/// alone has is stored only where it owns its folded path and every one
/// above it: two names one file there would leave one of them holding
/// the other's content, or none.
#[derive(Default)]
struct Folds {
    owners: HashMap<u64, (u64, bool)>,
    /// Folded paths a destination name met later took from a name SRCDB
    /// alone has: that name is not stored (`lost`).
    taken: HashSet<u64>,
}

impl Folds {
    /// A name the destination has.
    fn there(&mut self, name: &str) {
        use crate::courier::{fold_key, name_key, prefixes};
        for p in prefixes(name) {
            let (k, n) = (fold_key(p), name_key(p));
            if let Some((o, true)) = self.owners.insert(k, (n, false)) {
                if o != n {
                    self.taken.insert(k);
                }
            }
        }
    }

    /// A name SRCDB alone has; where another path owns its folded path
    /// or one above it, nothing is claimed and the reason is returned.
    fn new_name(&mut self, name: &str) -> Option<&'static str> {
        use crate::courier::{fold_key, name_key, prefixes};
        let clash = prefixes(name).find_map(|p| {
            self.owners
                .get(&fold_key(p))
                .filter(|&&(o, _)| o != name_key(p))
                .map(|&(_, src)| if src { FOLDED_TWICE } else { FOLDED })
        });
        if clash.is_none() {
            for p in prefixes(name) {
                self.owners
                    .entry(fold_key(p))
                    .or_insert((name_key(p), true));
            }
        }
        clash
    }

    /// True when a destination name met after `name` took its folded
    /// path or one above it.
    fn lost(&self, name: &str) -> bool {
        use crate::courier::{fold_key, name_key, prefixes};
        !self.taken.is_empty()
            && prefixes(name).any(|p| {
                let k = fold_key(p);
                self.taken.contains(&k)
                    && self.owners.get(&k).is_some_and(|&(o, _)| o != name_key(p))
            })
    }
}

impl Plan {
    fn new(opts: &StoreOpts, courier: &Courier, read_only: bool) -> Result<Plan> {
        fn anonymous<T>() -> Result<Spool<T>> {
            Spool::anonymous().map_err(|e| Error::io("a spool in the temporary directory", &e))
        }
        let (spool, receipt) = if opts.dry_run {
            (None, None)
        } else if read_only {
            (Some(anonymous()?), Some(anonymous()?))
        } else {
            let spool = courier.spool("store")?;
            // A run that dies leaves no receipt rather than a stale one.
            courier.drop_receipt();
            (Some(spool), Some(courier.spool("receipt")?))
        };
        Ok(Plan {
            actions: Vec::new(),
            spool,
            copy_at: Vec::new(),
            hard_at: Vec::new(),
            leaders: HashMap::new(),
            receipt,
            sum: StoreSummary::default(),
            total_bytes: 0,
            refused: Vec::new(),
            doomed: Vec::new(),
            src_dirs: HashSet::new(),
            dst_dirs: HashSet::new(),
            dest_owners: false,
            dest_extended: false,
            owners_unapplied: false,
            folds: None,
        })
    }

    /// Adds an upload, link or copy.
    fn task(&mut self, t: Task) -> Result<()> {
        match self.spool.as_mut() {
            Some(spool) => {
                self.copy_at.push(t.from.is_some() && !t.hard);
                self.hard_at.push(t.hard);
                spool.push(&t).map(drop).map_err(spool_err)
            }
            None => {
                self.actions.push(t.action());
                Ok(())
            }
        }
    }

    /// Notes a name for the receipt: `e` as the destination has it, or
    /// will have it if the action (`up`) succeeds; `old` if it fails.
    fn note(&mut self, e: Entry, up: bool, old: Option<Entry>) -> Result<()> {
        match self.receipt.as_mut() {
            Some(r) => r
                .push(&ReceiptLine { e, up, old })
                .map_err(spool_err)
                .map(drop),
            None => Ok(()),
        }
    }

    /// Stage 1: merges SRCDB with the destination's listing and decides
    /// what each name needs.
    fn classify(
        &mut self,
        opts: &StoreOpts,
        courier: &Courier,
        src: &mut DbReader,
        listing: &mut ListingReader,
    ) -> Result<()> {
        let mut found = Found {
            copies: crate::courier::Copies::open(courier),
            ranges: ranges::held(courier),
            deltas: crate::courier::deltas::held(courier),
        };
        self.dest_owners = listing.owners;
        self.dest_extended = listing.extended;
        plan::merge(
            src.by_ref().map(|r| r.map_err(as_usage)),
            listing.by_ref(),
            |pair| self.pair(opts, courier, &mut found, pair),
        )
    }

    /// Decides one name of the merge.
    fn pair(
        &mut self,
        opts: &StoreOpts,
        courier: &Courier,
        found: &mut Found,
        pair: Pair,
    ) -> Result<()> {
        if let Some(folds) = self.folds.as_mut() {
            match &pair {
                Pair::Both(s, _) => folds.there(&s.name),
                Pair::Dst(d) => folds.there(&d.name),
                Pair::Src(s) => {
                    if let Some(why) = folds.new_name(&s.name) {
                        self.refused.push(format!("'{}': {why}", s.name));
                        return Ok(());
                    }
                }
            }
        }
        if opts.delete {
            match &pair {
                Pair::Dst(d) => add_parents(&mut self.dst_dirs, &d.name),
                Pair::Src(s) => add_parents(&mut self.src_dirs, &s.name),
                Pair::Both(s, _) => {
                    add_parents(&mut self.src_dirs, &s.name);
                    add_parents(&mut self.dst_dirs, &s.name);
                }
            }
        }
        if let Pair::Src(s) | Pair::Both(s, _) = &pair {
            if s.meta.hardlink.is_some() {
                // Another name of a file met before links to it; a name
                // whose content differs (a listing that changed as it was
                // made, or one that lies) is stored as any file.
                let member = self
                    .leaders
                    .get(&group_of(s))
                    .map(|l| l.sha256 == s.sha256 && l.size == s.size);
                let (s, d) = pair_parts(pair);
                return match member {
                    Some(true) => self.link_member((s, d)),
                    Some(false) => self.src_name(courier, found, s, d),
                    None => self.leader(courier, found, s, d),
                };
            }
        }
        if let Pair::Dst(d) = pair {
            if opts.delete {
                self.doomed.push(d.clone());
            }
            return self.note(d, false, None);
        }
        let (s, d) = pair_parts(pair);
        self.src_name(courier, found, s, d)
    }

    /// A name of SRCDB: present at the destination, or a file to bring.
    fn src_name(
        &mut self,
        courier: &Courier,
        found: &mut Found,
        s: Entry,
        d: Option<Entry>,
    ) -> Result<()> {
        match d {
            Some(d) if s.same_content(&d) => self.present(s, d),
            d => self.pair_file(courier, found, s, d),
        }
    }

    /// The first name of a link group: decided like any file, and kept as
    /// what the group's other names are linked to.
    fn leader(
        &mut self,
        courier: &Courier,
        found: &mut Found,
        s: Entry,
        d: Option<Entry>,
    ) -> Result<()> {
        let (g, name, sha256, size) = (group_of(&s), s.name.clone(), s.sha256.clone(), s.size);
        let dest_group = d
            .as_ref()
            .filter(|d| s.same_content(d))
            .and_then(|d| d.meta.hardlink);
        let missing_before = self.sum.missing_files;
        self.src_name(courier, found, s, d)?;
        let missing = self.sum.missing_files > missing_before;
        self.leaders.insert(
            g,
            Leader {
                name,
                sha256,
                size,
                dest_group,
                missing,
            },
        );
        Ok(())
    }

    /// Another name of a link group whose first name was met: nothing to
    /// do when the destination has it as a name of the same file, else a
    /// hard link to the first name, after that is in place.
    fn link_member(&mut self, (s, d): (Entry, Option<Entry>)) -> Result<()> {
        let lead = &self.leaders[&group_of(&s)];
        if lead.missing {
            return self.note_missing(s, d);
        }
        let linked = d.as_ref().is_some_and(|d| {
            s.same_content(d) && d.meta.hardlink.is_some() && d.meta.hardlink == lead.dest_group
        });
        if linked {
            return self.note(d.expect("linked"), false, None);
        }
        let from = lead.name.clone();
        self.task(Task {
            from: Some(from),
            hard: true,
            ..Task::of(&s)
        })?;
        self.note(s, true, d)
    }

    /// A name whose content this trip does not bring: the destination
    /// keeps what it had under it.
    fn note_missing(&mut self, s: Entry, d: Option<Entry>) -> Result<()> {
        self.sum.missing_files += 1;
        self.sum.missing_bytes += s.size;
        d.map_or(Ok(()), |d| self.note(d, false, None))
    }

    /// A name the destination lacks or has with other content.
    fn pair_file(
        &mut self,
        courier: &Courier,
        found: &mut Found,
        s: Entry,
        d: Option<Entry>,
    ) -> Result<()> {
        let task = |from: Option<String>, ranged: bool, delta: Option<(String, u64)>| Task {
            from,
            ranged,
            delta,
            ..Task::of(&s)
        };
        if let Err(why) = check_carried_name(&s.name) {
            self.refused
                .push(format!("refusing '{}': {}", s.name, why.reason()));
        } else if s.is_symlink() || !matches!(courier.carried_meta(&s.name), Ok(None)) {
            if !s.is_symlink() {
                self.total_bytes += s.size;
            }
            self.task(task(None, false, None))?;
            return self.note(s, true, d);
        } else if let Some(from) = found.copies.find(&s) {
            self.task(task(Some(from), false, None))?;
            return self.note(s, true, d);
        } else if found.ranges.iter().any(|(_, r)| r.of(&s)) {
            self.task(task(None, true, None))?;
            return self.note(s, true, d);
        } else if let Some(h) = found.deltas.get(&s.name).filter(|h| h.makes(&s)) {
            let base_there = d
                .as_ref()
                .is_some_and(|d| !d.is_symlink() && h.applies_to(d.size, d.sha256.as_deref()));
            if base_there {
                self.task(task(None, false, Some((h.file.clone(), h.len))))?;
                return self.note(s, true, d);
            }
            self.refused.push(format!("'{}': {BASE_CHANGED}", s.name));
        } else {
            return self.note_missing(s, d);
        }
        // The destination keeps what it had under this name.
        d.map_or(Ok(()), |d| self.note(d, false, None))
    }

    /// A name whose content the destination has: nothing to do, or its
    /// mode and mtime to set in place.
    fn present(&mut self, s: Entry, d: Entry) -> Result<()> {
        self.sum.skipped_files += 1;
        let hash = s.sha256.clone().or_else(|| d.sha256.clone());
        let owner_differs = !s.meta.same_owner(&d.meta);
        if owner_differs && !self.dest_owners {
            self.owners_unapplied = true;
        }
        let meta_differs = s.mode & 0o777 != d.mode & 0o777
            || s.mtime != d.mtime
            || (self.dest_extended && s.meta.mtime_ns != d.meta.mtime_ns)
            || (owner_differs && self.dest_owners);
        if s.is_symlink() && meta_differs && self.dest_extended {
            // A symlink's mtime and owner are set as it is made again (by a
            // server that lists them, and so sets them).
            self.task(Task::of(&s))?;
            return self.note(s, true, Some(d));
        }
        if s.is_symlink() || !meta_differs || hash.is_none() {
            return self.note(d, false, None);
        }
        let now = Entry {
            mode: s.mode & 0o777,
            mtime: s.mtime,
            sha256: hash,
            meta: s.meta.clone(),
            ..d.clone()
        };
        self.task(Task {
            from: Some(now.name.clone()),
            ..Task::of(&now)
        })?;
        self.note(now, true, Some(d))
    }

    /// Stage 2: the deletions `--delete` may do (see `choose_deletions`);
    /// none at all when SRCDB's listing skipped entries. True when some
    /// were held back.
    fn deletions(
        &mut self,
        ui: &Ui,
        opts: &StoreOpts,
        courier: &Courier,
        src_skipped: u64,
    ) -> Result<bool> {
        let doomed = std::mem::take(&mut self.doomed);
        if opts.delete && src_skipped > 0 && !doomed.is_empty() {
            // Names the source could not list may be exactly these: a
            // listing that is not complete never decides a deletion.
            ui.error(format!(
                "not deleting anything: '{}' says its source listing skipped {src_skipped} entries it could not read (see the source server's log); fix that and run builddb again",
                opts.srcdb.display()
            ));
            self.sum.kept_files += doomed.len() as u64;
            return Ok(true);
        }
        choose_deletions(ui, opts, courier, doomed, &mut self.actions, &mut self.sum)
    }
}

/// What the courier holds besides files: instructions, ranges, deltas.
/// The first name of a link group of SRCDB (see `Plan::leaders`).
struct Leader {
    name: String,
    sha256: Option<String>,
    size: u64,
    dest_group: Option<u64>,
    missing: bool,
}

fn group_of(e: &Entry) -> u64 {
    e.meta.hardlink.unwrap_or(0)
}

fn pair_parts(pair: Pair) -> (Entry, Option<Entry>) {
    match pair {
        Pair::Src(s) => (s, None),
        Pair::Both(s, d) => (s, Some(d)),
        Pair::Dst(_) => unreachable!("only names SRCDB has"),
    }
}

struct Found {
    copies: crate::courier::Copies,
    ranges: Vec<(String, ranges::RangeRecord)>,
    deltas: HashMap<String, crate::courier::deltas::Held>,
}

type DbReader = crate::wire::manifest::Reader<std::io::BufReader<std::fs::File>>;
type ListingReader = crate::wire::manifest::Reader<
    std::io::BufReader<crate::client::Stall<ureq::BodyReader<'static>>>,
>;

/// `store --dry-run`: what would happen, and the summary it would give.
fn dry_run(ui: &Ui, plan: Plan, doomed_dirs: &[String], over_limit: bool) -> Exit {
    let mut sum = plan.sum;
    let mut human = String::new();
    for a in &plan.actions {
        let stores = match a {
            Action::Delete(_) => None,
            Action::Upload(e)
            | Action::Link(e)
            | Action::Copy(e, _)
            | Action::HardLink(e, _)
            | Action::Ranges(e)
            | Action::Patch(e, ..) => Some(&e.name),
        };
        if let (Some(f), Some(name)) = (&plan.folds, stores) {
            if f.lost(name) {
                ui.error(format!("'{name}': {FOLDED}"));
                sum.failed_files += 1;
                continue;
            }
        }
        human.push_str(&match a {
            Action::Upload(e) => format!("would upload '{}' ({})\n", e.name, human_bytes(e.size)),
            Action::Link(e) => format!(
                "would link '{}' -> '{}'\n",
                e.name,
                e.linkdest.as_deref().unwrap_or_default()
            ),
            Action::Ranges(e) => format!(
                "would send ranges of '{}' ({} in all)\n",
                e.name,
                human_bytes(e.size)
            ),
            Action::Patch(e, ..) => format!(
                "would patch '{}' with a delta ({})\n",
                e.name,
                human_bytes(e.size)
            ),
            Action::Copy(e, from) if *from == e.name => {
                format!("would set the mode and mtime of '{from}'\n")
            }
            Action::Copy(e, from) => {
                format!("would make '{}' from '{from}' at the destination\n", e.name)
            }
            Action::HardLink(e, from) => {
                format!(
                    "would make '{}' another name of '{from}' (a hard link)\n",
                    e.name
                )
            }
            Action::Delete(n) => format!("would delete '{n}'\n"),
        });
        count(&mut sum, a);
    }
    for d in doomed_dirs {
        human.push_str(&format!(
            "would remove the directory '{}' once empty\n",
            crate::ui::escape(d)
        ));
    }
    sum.dirs_removed = doomed_dirs.len() as u64;
    human.push_str("dry run: nothing was changed\n");
    ui.summary(
        &DryRun {
            dry_run: true,
            summary: &sum,
        },
        &human,
    );
    if sum.failed_files > 0 || over_limit {
        Exit::Failed
    } else {
        Exit::Done
    }
}

/// The phases' shared state: the plan's spool, what each action did.
struct Execution<'a> {
    ui: &'a Ui,
    client: &'a Client,
    opts: &'a StoreOpts,
    courier: &'a Courier,
    spool: &'a Spool<Task>,
    progress: Progress,
    results: Mutex<StoreSummary>,
    /// Names whose upload, link or copy failed, and names deleted: the
    /// receipt follows them.
    failed: Mutex<HashSet<String>>,
    deleted: Mutex<HashSet<String>>,
    /// Files sent as ranges: how much of each the destination holds now.
    ranged: Mutex<HashMap<String, (Entry, u64)>>,
    /// Set when an action could not be read back: the receipt cannot be
    /// vouched for.
    unsure: AtomicBool,
    /// Set when the destination server stopped answering: no more
    /// actions are tried, each left counts as failed (so the receipt
    /// leaves its name as the destination had it).
    gone: AtomicBool,
    /// Directories this run wrote in (whatever the outcome: a failed
    /// upload may have moved its directory's mtime too).
    touched: Mutex<HashSet<String>>,
    /// Set once the destination could not make a hard link.
    no_links: AtomicBool,
    /// Set when the destination said its disk is full: no more uploads,
    /// copies, ranges or patches are tried, each left counts as failed.
    full: AtomicBool,
    /// On a destination that folds case (see `Folds`).
    folds: Option<&'a Folds>,
}

impl Execution<'_> {
    /// Counts an action's outcome and names a failure.
    fn record(&self, action: &Action, outcome: std::result::Result<(), Failure>) {
        let name = match action {
            Action::Upload(e)
            | Action::Link(e)
            | Action::Copy(e, _)
            | Action::HardLink(e, _)
            | Action::Ranges(e)
            | Action::Patch(e, ..) => &e.name,
            Action::Delete(n) => n,
        };
        let tried = !matches!(
            &outcome,
            Err(Failure::Unreachable(why) | Failure::DestFull(why)) if why == "not tried"
        );
        if tried {
            let parent = parent_of(name);
            let mut touched = self.touched.lock().expect("names");
            if !touched.contains(parent) {
                touched.insert(parent.to_string());
            }
        }
        match (action, &outcome) {
            (Action::Delete(_), Ok(())) => {
                self.deleted.lock().expect("names").insert(name.clone());
            }
            (Action::Delete(_), Err(_)) => {}
            (_, Err(_)) => {
                self.failed.lock().expect("names").insert(name.clone());
            }
            (_, Ok(())) => {}
        }
        let mut sum = self.results.lock().expect("summary");
        match outcome {
            Ok(()) => {
                count(&mut sum, action);
                if let Action::Upload(e) = action {
                    self.progress.bytes.fetch_add(e.size, Ordering::Relaxed);
                }
            }
            Err(Failure::Excluded) => {
                sum.excluded_files += 1;
            }
            Err(why) => {
                sum.failed_files += 1;
                drop(sum);
                if let Failure::DestFull(_) = why {
                    if !self.full.swap(true, Ordering::SeqCst) {
                        self.ui.error(format!(
                            "'{name}': {why}; stopping the uploads: what was stored is kept; free space at the destination and rerun store to continue"
                        ));
                    }
                    return self.progress_one(action);
                }
                // Once the server is gone, failures are not named one by one.
                let gone = self.gone.load(Ordering::SeqCst)
                    || matches!(why, Failure::Unreachable(_))
                    || self.dest_unreachable();
                if !gone {
                    self.ui.error(format!("'{name}': {why}"));
                } else if !self.gone.swap(true, Ordering::SeqCst) {
                    self.ui.error(format!(
                        "the destination server stopped answering ({why}); stopping: what was stored is kept, rerun store to continue"
                    ));
                }
            }
        }
        self.progress_one(action);
    }

    fn progress_one(&self, action: &Action) {
        if !matches!(action, Action::Delete(_)) {
            self.progress.files.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True when `action` would write data the full destination has no
    /// room for (deletions and symlinks still go).
    fn no_room_for(&self, action: &Action) -> bool {
        self.full.load(Ordering::SeqCst) && !matches!(action, Action::Delete(_) | Action::Link(_))
    }

    /// Runs `work(0..n)` on `--jobs` threads.
    fn phase(&self, n: usize, work: &(dyn Fn(usize) + Sync)) {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..self.opts.jobs.clamp(1, 64) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= n {
                            return;
                        }
                        work(i);
                    }
                });
            }
        });
    }

    /// Spooled action `i`; `None` (counted as a failure) when it cannot
    /// be read back.
    fn spooled(&self, i: usize) -> Option<Action> {
        match self.spool.get(i) {
            Ok(t) if self.folds.is_some_and(|f| f.lost(&t.e.name)) => {
                self.record(&t.action(), Err(Failure::Refused(FOLDED.into())));
                None
            }
            Ok(t) => Some(t.action()),
            Err(err) => {
                self.ui.error(format!(
                    "cannot read the courier's plan spool: {}",
                    describe_io(&err)
                ));
                self.results.lock().expect("summary").failed_files += 1;
                self.unsure.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// Does one action.
    fn run(&self, action: &Action) {
        if self.gone.load(Ordering::SeqCst) {
            return self.record(action, Err(Failure::Unreachable("not tried".into())));
        }
        if self.no_room_for(action) {
            return self.record(action, Err(Failure::DestFull("not tried".into())));
        }
        if let Action::HardLink(e, from) = action {
            return self.record(action, self.hard_link(e, from));
        }
        self.record(
            action,
            run(self.client, self.courier, &self.opts.dest, action),
        );
    }

    /// Does one action of the upload phase; one that reads a large file
    /// (or a delta, or ranges) from the courier waits for its turn at
    /// `big`.
    fn run_one(&self, action: Action, held: &[(String, ranges::RangeRecord)], big: &Gate) {
        let large = match &action {
            Action::Ranges(_) | Action::Patch(..) => true,
            Action::Upload(e) => e.size > BATCH_FILE_MAX,
            _ => false,
        };
        let _turn = large.then(|| big.enter());
        match action {
            Action::Ranges(e) => self.ranges(e, held),
            a => self.run(&a),
        }
    }

    /// Uploads small files many to a request; each alone when the server
    /// does not know `POST ?put` (and from then on), or when the request
    /// fails for another reason than a server gone.
    fn upload_many(&self, run: Vec<Action>, batches: &AtomicBool) {
        if self.gone.load(Ordering::SeqCst) || self.full.load(Ordering::SeqCst) {
            return run.iter().for_each(|a| self.run(a));
        }
        let mut sent = Vec::new();
        let mut files = Vec::new();
        for a in run {
            let Action::Upload(e) = &a else {
                self.run(&a);
                continue;
            };
            match checked_small(self.courier, e) {
                Ok(Some(f)) => {
                    files.push((e.clone(), f));
                    sent.push(a);
                }
                // Sparse: alone, as its data.
                Ok(None) => self.run(&a),
                Err(why) => self.record(&a, Err(why)),
            }
        }
        if sent.is_empty() {
            return;
        }
        match self.client.put_files(&self.opts.dest, files) {
            Ok(Some(outcomes)) => {
                let mut outcomes: HashMap<String, _> = outcomes.into_iter().collect();
                for a in &sent {
                    let outcome = match a.upload_name().and_then(|n| outcomes.remove(n)) {
                        Some(o) => match a {
                            Action::Upload(e) => judged(self.courier, e, o),
                            _ => o.map_err(refused),
                        },
                        None => Err(Failure::Io("the destination did not answer for it".into())),
                    };
                    self.record(a, outcome);
                }
            }
            Ok(None) => {
                batches.store(false, Ordering::Relaxed);
                sent.iter().for_each(|a| self.run(a));
            }
            Err(err) if err.unreachable => {
                let why = Failure::client(err);
                for a in &sent {
                    self.record(a, Err(Failure::Unreachable(why.to_string())));
                }
            }
            Err(_) => sent.iter().for_each(|a| self.run(a)),
        }
    }

    /// Makes `e` a hard link to `from` at the destination; where the
    /// destination cannot link (its file system, or an older server), a
    /// copy instead, said once.
    fn hard_link(&self, e: &Entry, from: &str) -> std::result::Result<(), Failure> {
        let dest = &self.opts.dest;
        match self.client.put_link(dest, e, from) {
            Err(err) => Err(Failure::client(err)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(r)) if r.status == 501 || r.status == 422 => {
                if !self.no_links.swap(true, Ordering::SeqCst) {
                    self.ui.log(format!(
                        "{dest}: the destination cannot make hard links ({}); the names of one file arrive as copies",
                        r.reason
                    ));
                }
                self.client
                    .put_copy(dest, e, from)
                    .map_err(Failure::client)?
                    .map_err(|r| copy_refused(from, r))
            }
            Ok(Err(r)) if r.status == 409 => Err(Failure::Refused(format!(
                "the destination does not have '{from}' to link to ({})",
                r.reason
            ))),
            Ok(Err(r)) => Err(refused(r)),
        }
    }

    /// After an action failed: true when the destination server does not
    /// answer at all.
    fn dest_unreachable(&self) -> bool {
        matches!(self.client.area_id(&self.opts.dest), Err(e) if e.unreachable)
    }

    /// Sends the ranges of `e`; a file still under way is not a failure,
    /// but the receipt shows its progress and not the file.
    fn ranges(&self, e: Entry, held: &[(String, ranges::RangeRecord)]) {
        if self.gone.load(Ordering::SeqCst) {
            return self.record(
                &Action::Ranges(e),
                Err(Failure::Unreachable("not tried".into())),
            );
        }
        if self.full.load(Ordering::SeqCst) {
            return self.record(
                &Action::Ranges(e),
                Err(Failure::DestFull("not tried".into())),
            );
        }
        match send_ranges(self.client, &self.opts.dest, self.courier, held, &e) {
            Ok(Some(have)) => {
                self.failed.lock().expect("names").insert(e.name.clone());
                self.ranged
                    .lock()
                    .expect("progress")
                    .insert(e.name.clone(), (e, have));
                self.results.lock().expect("summary").partial_files += 1;
            }
            Ok(None) => {
                let size = e.size;
                self.ranged
                    .lock()
                    .expect("progress")
                    .insert(e.name.clone(), (e.clone(), size));
                self.record(&Action::Ranges(e), Ok(()));
            }
            Err(why) => self.record(&Action::Ranges(e), Err(why)),
        }
    }
}

/// Stage 3: runs the plan in phases, each on `--jobs` threads: copies
/// (a renamed file's old name may be deleted next), deletions and then
/// the `doomed` directories emptied by them (so a name can change from
/// file to directory and back), uploads, links, ranges and patches, then
/// the copies whose source has arrived since. Returns the summary, what
/// happened to each name, and whether an outcome is unknown.
fn execute(
    ui: &Ui,
    client: &Client,
    opts: &StoreOpts,
    courier: &Courier,
    plan: &mut Plan,
    doomed: Vec<String>,
) -> Result<(StoreSummary, Outcomes, bool)> {
    let mut spool = plan.spool.take().expect("a spool unless dry run");
    spool.finish().map_err(spool_err)?;
    let held = ranges::held(courier);
    let deletes = std::mem::take(&mut plan.actions);
    let copy_at = &plan.copy_at;
    let hard_at = &plan.hard_at;
    let x = Execution {
        ui,
        client,
        opts,
        courier,
        spool: &spool,
        progress: Progress::start(ui, "storing", spool.len() as u64, plan.total_bytes),
        results: Mutex::new(std::mem::take(&mut plan.sum)),
        failed: Mutex::default(),
        deleted: Mutex::default(),
        ranged: Mutex::default(),
        unsure: AtomicBool::new(false),
        gone: AtomicBool::new(false),
        full: AtomicBool::new(false),
        touched: Mutex::default(),
        no_links: AtomicBool::new(false),
        folds: plan.folds.as_ref(),
    };
    // 1. Copies. One whose source is not there yet (a duplicate of a file
    //    this run uploads) is tried again at the end.
    let again: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    x.phase(spool.len(), &|i| {
        if let Some(Some(a @ Action::Copy(..))) = copy_at[i].then(|| x.spooled(i)) {
            if x.no_room_for(&a) {
                return x.record(&a, Err(Failure::DestFull("not tried".into())));
            }
            match run_copy(client, &opts.dest, &a) {
                Err(Retry) => again.lock().expect("again").push(i),
                Ok(outcome) => x.record(&a, outcome),
            }
        }
    });
    // 2. Deletions (only with --delete), then the directories SRCDB
    //    does not have, where empty by now: nothing this run writes goes
    //    into one, and one may stand where SRCDB has a file.
    x.phase(deletes.len(), &|i| x.run(&deletes[i]));
    let removed = if x.gone.load(Ordering::SeqCst) {
        HashSet::new()
    } else {
        remove_dirs(
            client,
            opts,
            doomed,
            &mut x.results.lock().expect("summary"),
        )
    };
    x.touched
        .lock()
        .expect("names")
        .extend(removed.iter().map(|d| parent_of(d).to_string()));
    // 3. Uploads (small ones many to a request), links, ranges and
    //    patches.
    let batches = AtomicBool::new(true);
    // The next index, and an action read but left for the next claim.
    let next: Mutex<(usize, Option<Action>)> = Mutex::new((0, None));
    let claim = || {
        let mut guard = next.lock().expect("next action");
        let (k, peeked) = &mut *guard;
        let mut run: Vec<Action> = Vec::new();
        let mut bytes = 0;
        loop {
            let a = match peeked.take() {
                Some(a) => a,
                None => {
                    let i = *k;
                    if i >= spool.len() {
                        break;
                    }
                    *k += 1;
                    if copy_at[i] || hard_at[i] {
                        continue;
                    }
                    match x.spooled(i) {
                        Some(a) => a,
                        None => continue,
                    }
                }
            };
            let small = match &a {
                Action::Upload(e) if batches.load(Ordering::Relaxed) => {
                    e.size <= BATCH_FILE_MAX && e.sha256.is_some()
                }
                _ => false,
            };
            let size = if let Action::Upload(e) = &a {
                e.size
            } else {
                0
            };
            if !run.is_empty() && (!small || run.len() == BATCH_FILES || bytes + size > BATCH_BYTES)
            {
                *peeked = Some(a);
                break;
            }
            bytes += size;
            run.push(a);
            if !small {
                break;
            }
        }
        run
    };
    // Files over the batch size read the courier as streams: at most
    // `big_jobs` of them at once.
    let big = Gate::new(opts.big_jobs.clamp(1, 64));
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.clamp(1, 64) {
            scope.spawn(|| {
                loop {
                    let mut run = claim();
                    match run.len() {
                        0 => return,
                        1 => x.run_one(run.pop().expect("one action"), &held, &big),
                        _ => x.upload_many(run, &batches),
                    }
                }
            });
        }
    });
    // 4. Copies whose source has arrived since.
    let again = again.into_inner().expect("again");
    x.phase(again.len(), &|k| {
        if let Some(a) = x.spooled(again[k]) {
            x.run(&a);
        }
    });
    // 5. Hard links, once the names they link to are in place.
    x.phase(spool.len(), &|i| {
        if hard_at[i] {
            if let Some(a) = x.spooled(i) {
                x.run(&a);
            }
        }
    });
    x.progress.finish();
    {
        let mut sum = x.results.lock().expect("summary");
        sum.server_gone = x.gone.load(Ordering::SeqCst);
        sum.disk_full = x.full.load(Ordering::SeqCst);
    }
    let outcomes = Outcomes {
        failed: x.failed.into_inner().expect("names"),
        deleted: x.deleted.into_inner().expect("names"),
        progress: x.ranged.into_inner().expect("progress"),
        made: Vec::new(),
        removed,
        touched: x.touched.into_inner().expect("names"),
    };
    Ok((
        x.results.into_inner().expect("summary"),
        outcomes,
        x.unsure.into_inner(),
    ))
}

/// Adds the directories `name` sits in.
fn add_parents(dirs: &mut HashSet<String>, name: &str) {
    let mut at = name;
    while let Some((parent, _)) = at.rsplit_once('/') {
        if !dirs.insert(parent.to_string()) {
            return;
        }
        at = parent;
    }
}

/// The destination's directories SRCDB does not have, deepest first;
/// none when SRCDB may not name all of its empty directories.
fn doomed_dirs(
    plan: &mut Plan,
    src_end: Option<&crate::wire::manifest::End>,
    dest_end: &crate::wire::manifest::End,
) -> Vec<String> {
    let Some(src_end) = src_end.filter(|e| e.dirs_omitted == 0) else {
        return Vec::new();
    };
    let mut src_dirs = std::mem::take(&mut plan.src_dirs);
    for d in &src_end.dirs {
        src_dirs.insert(d.name.clone());
        add_parents(&mut src_dirs, &d.name);
    }
    let mut dst_dirs = std::mem::take(&mut plan.dst_dirs);
    for d in &dest_end.dirs {
        dst_dirs.insert(d.name.clone());
        add_parents(&mut dst_dirs, &d.name);
    }
    let mut doomed: Vec<String> = dst_dirs
        .into_iter()
        .filter(|d| {
            !d.is_empty()
                && !src_dirs.contains(d)
                && !d
                    .split('/')
                    .any(|c| crate::wire::paths::is_reserved(c.as_bytes()))
        })
        .collect();
    doomed.sort_by(|a, b| {
        let depth = |s: &str| s.matches('/').count();
        depth(b).cmp(&depth(a)).then_with(|| b.cmp(a))
    });
    doomed
}

/// Removes each directory in `doomed` that is empty by now; one with
/// anything in it (a file kept or new at the destination) stays.
fn remove_dirs(
    client: &Client,
    opts: &StoreOpts,
    doomed: Vec<String>,
    sum: &mut StoreSummary,
) -> HashSet<String> {
    let mut removed = HashSet::new();
    for d in doomed {
        if let Ok(Ok(())) = client.delete(&opts.dest, &d) {
            sum.dirs_removed += 1;
            removed.insert(d);
        }
    }
    removed
}

/// Stage 4: the directories of SRCDB (every one, when its server named
/// them all; else the empty ones) that the destination does not have as
/// listed, or that this run wrote in: made if missing, and given SRCDB's
/// mode and mtime. Deepest first and after every file, so nothing written
/// later moves an mtime, and a directory is made before its parent's
/// mtime is set. Returns those made or set.
fn make_dirs(
    ui: &Ui,
    client: &Client,
    opts: &StoreOpts,
    src_end: Option<crate::wire::manifest::End>,
    dest_end: &crate::wire::manifest::End,
    touched: &mut HashSet<String>,
    sum: &mut StoreSummary,
) -> Vec<crate::wire::manifest::EmptyDir> {
    let mut dirs = src_end.map(|e| e.dirs).unwrap_or_default();
    dirs.sort_by(|a, b| {
        let depth = |s: &str| s.matches('/').count() + usize::from(!s.is_empty());
        depth(&b.name)
            .cmp(&depth(&a.name))
            .then_with(|| b.name.cmp(&a.name))
    });
    let there: HashMap<&str, &crate::wire::manifest::EmptyDir> =
        dest_end.dirs.iter().map(|d| (d.name.as_str(), d)).collect();
    let excluded = crate::wire::exclude::Excludes::new(&dest_end.exclude).unwrap_or_default();
    // The area's root only where the destination names it (a server that
    // lists every directory, and so sets the root's with a PUT to it).
    let root_known = dest_end.dirs.iter().any(|d| d.name.is_empty());
    let mut made = Vec::new();
    for d in dirs
        .into_iter()
        .filter(|d| !excluded.excludes(&d.name, true) && (root_known || !d.name.is_empty()))
    {
        let listed = there.get(d.name.as_str());
        // Nanoseconds and owners count where the destination lists them.
        let same = listed.is_some_and(|x| {
            let extended = x.meta.uid.is_some();
            x.mode & 0o777 == d.mode & 0o777
                && x.mtime == d.mtime
                && (!extended || x.meta.mtime_ns == d.meta.mtime_ns)
                && (!dest_end.owners || d.meta.same_owner(&x.meta))
        });
        if same && !touched.contains(&d.name) {
            continue;
        }
        if !d.name.is_empty() {
            if let Err(why) = check_carried_name(&d.name) {
                ui.error(format!("refusing directory '{}': {}", d.name, why.reason()));
                sum.failed_files += 1;
                continue;
            }
        }
        match client.put_dir(&opts.dest, &d) {
            Ok(Ok(())) => {
                sum.dirs_made += 1;
                if listed.is_none() {
                    // Making it wrote in its parent.
                    touched.insert(parent_of(&d.name).to_string());
                }
                made.push(d);
            }
            Ok(Err(r)) => {
                ui.error(format!("directory '{}': {}", d.name, r.reason));
                sum.failed_files += 1;
            }
            Err(e) => {
                ui.error(format!("directory '{}': {e}", d.name));
                sum.failed_files += 1;
            }
        }
    }
    made
}

/// The directory a name is in ("" for the area's root).
fn parent_of(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(p, _)| p)
}

/// The summary, as JSON or as lines for a person.
fn report(ui: &Ui, opts: &StoreOpts, sum: &StoreSummary) {
    let mut human = format!(
        "stored {}; {} already at the destination",
        files_bytes(sum.stored_files, sum.stored_bytes),
        n_files(sum.skipped_files)
    );
    if sum.patched_files > 0 {
        human.push_str(&format!(
            " ({} patched with deltas of {})",
            n_files(sum.patched_files),
            human_bytes(sum.delta_bytes)
        ));
    }
    if opts.delete {
        human.push_str(&format!("; deleted {}", sum.deleted_files));
    }
    human.push('\n');
    if sum.missing_files > 0 {
        human.push_str(&format!(
            "{} not in the courier yet; carry them on a later trip\n",
            files_bytes(sum.missing_files, sum.missing_bytes)
        ));
    }
    if sum.server_gone {
        human.push_str(
            "stopped: the destination server stopped answering; rerun store to continue\n",
        );
    }
    if sum.disk_full {
        human.push_str(
            "stopped: the destination disk is full; free space there and rerun store to continue\n",
        );
    }
    if sum.excluded_files > 0 {
        human.push_str(&format!(
            "{} not stored: the destination area excludes them (exclude them at the source too)\n",
            n_files(sum.excluded_files)
        ));
    }
    if sum.failed_files > 0 {
        human.push_str(&format!("{} failed\n", n_files(sum.failed_files)));
    }
    ui.summary(sum, &human);
}

/// What a run did, for the receipt: names whose upload, link, copy or
/// ranges did not complete, names deleted, how far each file sent as
/// ranges got, and the empty directories made.
struct Outcomes {
    failed: HashSet<String>,
    deleted: HashSet<String>,
    progress: HashMap<String, (Entry, u64)>,
    made: Vec<crate::wire::manifest::EmptyDir>,
    /// Directories removed (`--delete`).
    removed: HashSet<String>,
    /// Directories this run wrote in (their mtime moved).
    touched: HashSet<String>,
}

/// Writes `COURIER/.bitfog/receipt.jsonl`: the destination's manifest
/// after this run, from its listing at the start and what each action did.
fn write_receipt(
    courier: &Courier,
    (dest, seal): (&AreaUrl, Option<&[crate::age::Recipient]>),
    mut lines: Spool<ReceiptLine>,
    listed: crate::wire::manifest::End,
    outcomes: Outcomes,
) -> Result<()> {
    let Outcomes {
        failed,
        deleted,
        progress,
        made,
        removed,
        ..
    } = outcomes;
    // Directories: those listed and not removed, and those made or set
    // (as SRCDB has them).
    let dirs: std::collections::BTreeMap<String, crate::wire::manifest::EmptyDir> = listed
        .dirs
        .iter()
        .filter(|d| !removed.contains(&d.name))
        .chain(&made)
        .map(|d| (d.name.clone(), d.clone()))
        .collect();
    // The destination's partial uploads, as this run left them.
    let mut partials: Vec<crate::wire::manifest::PartialUpload> = listed
        .partials
        .into_iter()
        .filter(|p| !progress.contains_key(&p.name))
        .collect();
    for (name, (e, have)) in progress {
        if have < e.size {
            partials.push(crate::wire::manifest::PartialUpload {
                name,
                size: e.size,
                sha256: e.sha256.unwrap_or_default(),
                have,
            });
        }
    }
    partials.sort_by(|a, b| crate::wire::paths::name_cmp(&a.name, &b.name));
    let what = |e: std::io::Error| Error::io("the courier's receipt spool", &e);
    lines.finish().map_err(what)?;
    let state = courier
        .state_dir()?
        .try_clone()
        .map_err(|e| Error::io("the courier's state directory", &e))?;
    let mut out = DbWriter::create_in(
        state,
        RECEIPT.as_bytes(),
        Some(dest.as_str()),
        listed.area_id.as_deref(),
        Vec::new(),
        seal,
    )?;
    for i in 0..lines.len() {
        let line = lines.get(i).map_err(what)?;
        let e = if line.up && failed.contains(&line.e.name) {
            line.old
        } else if !line.up && deleted.contains(&line.e.name) {
            None
        } else if line.up && !line.e.is_symlink() {
            // What the server makes of the mode it was sent.
            Some(Entry {
                mode: line.e.mode & 0o777,
                ..line.e
            })
        } else {
            Some(line.e)
        };
        if let Some(mut e) = e {
            // Link groups are numbered per listing: SRCDB's and the
            // destination's cannot share one manifest.
            e.meta.hardlink = None;
            out.entry(&e)?;
        }
    }
    let mut dirs: Vec<_> = dirs.into_values().collect();
    dirs.sort_by(|a, b| crate::wire::paths::name_cmp(&a.name, &b.name));
    out.dirs = dirs;
    out.dirs_omitted = listed.dirs_omitted;
    out.dirs_meta_omitted = listed.dirs_meta_omitted;
    out.area_exclude = listed.exclude;
    out.commit_with(listed.skipped, partials)?;
    Ok(())
}

#[derive(Serialize)]
struct DryRun<'a> {
    dry_run: bool,
    #[serde(flatten)]
    summary: &'a StoreSummary,
}

/// Picks the destination files `--delete` may remove: only those that
/// still match the destination snapshot `fetch` kept in the courier (a file
/// written or changed at the destination since is kept), and at most
/// `--max-delete` of them. Returns true when the limit held some back.
fn choose_deletions(
    ui: &Ui,
    opts: &StoreOpts,
    courier: &Courier,
    doomed: Vec<Entry>,
    actions: &mut Vec<Action>,
    sum: &mut StoreSummary,
) -> Result<bool> {
    if doomed.is_empty() {
        return Ok(false);
    }
    let mut allowed: Vec<Entry> = if let Some((_, snap)) = snapshot(opts, courier)? {
        let mut known: HashMap<String, Entry> =
            doomed.into_iter().map(|e| (e.name.clone(), e)).collect();
        let mut keep = Vec::new();
        for entry in snap {
            let entry = entry.map_err(as_usage)?;
            if let Some(now) = known.remove(&entry.name) {
                if now.same_content(&entry) {
                    keep.push(now);
                } else {
                    ui.error(format!(
                        "not deleting '{}': it changed at the destination since the trip began",
                        now.name
                    ));
                    sum.kept_files += 1;
                }
            }
        }
        for name in known.into_keys() {
            ui.error(format!(
                "not deleting '{name}': it appeared at the destination after the trip began"
            ));
            sum.kept_files += 1;
        }
        keep.sort_by(|a, b| crate::wire::paths::name_cmp(&a.name, &b.name));
        keep
    } else {
        ui.log("no destination snapshot in the courier (fetch keeps one); deleting by SRCDB alone");
        doomed
    };
    let mut over = false;
    if let Some(max) = opts.max_delete {
        if allowed.len() as u64 > max {
            ui.error(format!(
                "--max-delete {max}: {} files to delete; deleting the first {max} only",
                allowed.len()
            ));
            sum.kept_files += allowed.len() as u64 - max;
            allowed.truncate(max as usize);
            over = true;
        }
    }
    actions.extend(allowed.into_iter().map(|e| Action::Delete(e.name)));
    Ok(over)
}

/// Does one action; the error is the one-line reason.
/// Sends the courier's ranges of `e` in order. `Ok(None)`: the file is
/// complete and verified at the destination; `Ok(Some(have))`: it holds
/// that many bytes of it so far.
fn send_ranges(
    client: &Client,
    dest: &AreaUrl,
    courier: &Courier,
    held: &[(String, ranges::RangeRecord)],
    e: &Entry,
) -> std::result::Result<Option<u64>, Failure> {
    let mut have = None;
    for (data, rec) in held.iter().filter(|(_, r)| r.of(e)) {
        match carry::upload_range(client, dest, courier, (data, rec), e)? {
            carry::Sent::Complete => return Ok(None),
            carry::Sent::Partial(h) => have = Some(h),
        }
    }
    Ok(have)
}

/// Counts a successful action in the summary.
fn count(sum: &mut StoreSummary, action: &Action) {
    match action {
        Action::Upload(e) | Action::Link(e) | Action::Ranges(e) => {
            sum.stored_files += 1;
            sum.stored_bytes += e.size;
        }
        Action::Patch(e, _, len) => {
            sum.stored_files += 1;
            sum.stored_bytes += e.size;
            sum.patched_files += 1;
            sum.delta_bytes += len;
        }
        Action::Copy(e, from) if *from == e.name => sum.updated_files += 1,
        Action::Copy(e, _) => {
            sum.stored_files += 1;
            sum.stored_bytes += e.size;
            sum.copied_files += 1;
        }
        Action::HardLink(e, _) => {
            sum.stored_files += 1;
            sum.stored_bytes += e.size;
            sum.linked_files += 1;
        }
        Action::Delete(_) => sum.deleted_files += 1,
    }
}

/// A copy to try again later: its source is not at the destination yet.
struct Retry;

/// A copy's first try: a missing source (409) may be a file this run
/// has yet to upload, and a source with other content (422) one it has
/// yet to patch with a delta.
fn run_copy(
    client: &Client,
    dest: &AreaUrl,
    action: &Action,
) -> std::result::Result<std::result::Result<(), Failure>, Retry> {
    let Action::Copy(e, from) = action else {
        unreachable!("only copies")
    };
    match client.put_copy(dest, e, from) {
        Ok(Err(r)) if r.status == 409 || r.status == 422 => Err(Retry),
        Ok(Err(r)) => Ok(Err(copy_refused(from, r))),
        Ok(Ok(())) => Ok(Ok(())),
        Err(e) => Ok(Err(Failure::client(e))),
    }
}

fn copy_refused(from: &str, r: crate::client::Refused) -> Failure {
    Failure::Refused(match r.status {
        409 | 422 => format!(
            "the destination no longer has '{from}' as listed ({}); the next fetch carries the file",
            r.reason
        ),
        405 | 400 => format!(
            "the destination cannot make files from its own copies ({}); carry the file",
            r.reason
        ),
        507 => return Failure::dest_full(&r.reason),
        403 => return Failure::Excluded,
        _ => r.reason,
    })
}

fn run(
    client: &Client,
    courier: &Courier,
    dest: &AreaUrl,
    action: &Action,
) -> std::result::Result<(), Failure> {
    match action {
        Action::Ranges(_) => Err(Failure::Io("ranges are sent by send_ranges".into())),
        Action::Patch(e, file, _) => patch(client, courier, dest, e, file),
        Action::Copy(e, from) => client
            .put_copy(dest, e, from)
            .map_err(Failure::client)?
            .map_err(|r| copy_refused(from, r)),
        Action::Delete(name) => client
            .delete(dest, name)
            .map_err(Failure::client)?
            .map_err(refused),
        Action::Link(e) => client
            .put_symlink(dest, e)
            .map_err(Failure::client)?
            .map_err(refused),
        Action::Upload(e) => upload(client, courier, dest, e),
        Action::HardLink(..) => Err(Failure::Io("hard links are made by hard_link".into())),
    }
}

/// The refusal of an upload, in words: a full disk, changed content.
fn refused(r: crate::client::Refused) -> Failure {
    Failure::Refused(match r.status {
        507 => return Failure::dest_full(&r.reason),
        403 => return Failure::Excluded,
        422 => format!(
            "the destination refused the content as changed ({})",
            r.reason
        ),
        _ => r.reason,
    })
}

/// Sends a delta, checked whole first (a damaged one is not sent; the
/// destination would refuse it too).
fn patch(
    client: &Client,
    courier: &Courier,
    dest: &AreaUrl,
    e: &Entry,
    file: &str,
) -> std::result::Result<(), Failure> {
    let open_err = |err: std::io::Error| match err.kind() {
        std::io::ErrorKind::InvalidData => Failure::Damaged(format!(
            "damaged delta in the courier ({}); not sent, the next fetch makes a new one",
            describe_io(&err)
        )),
        _ => Failure::io("cannot read the delta", &err),
    };
    // The whole delta is checked before it leaves: a damaged one
    // is not sent (the destination would refuse it too).
    let header = crate::courier::deltas::open(courier, file)
        .map_err(open_err)
        .and_then(|(f, _)| {
            crate::wire::delta::verify(std::io::BufReader::new(f)).map_err(|err| {
                Failure::Damaged(format!(
                    "damaged delta in the courier ({err}); not sent, the next fetch makes a new one"
                ))
            })
        })?;
    if !header.name.eq(&e.name) || header.sha256 != e.sha256.clone().unwrap_or_default() {
        return Err(Failure::Damaged(
            "the delta in the courier is for another version; not sent".into(),
        ));
    }
    let (file, len) = crate::courier::deltas::open(courier, file).map_err(open_err)?;
    match client
        .put_delta(dest, e, file, len)
        .map_err(Failure::client)?
    {
        Ok(()) => Ok(()),
        Err(r) if r.status == 409 => {
            Err(Failure::Refused(format!("{BASE_CHANGED} ({})", r.reason)))
        }
        Err(r) if r.status == 400 || r.status == 405 => Err(Failure::Refused(format!(
            "the destination cannot apply deltas ({}); carry the file whole",
            r.reason
        ))),
        Err(r) => Err(refused(r)),
    }
}

/// Uploads a courier file, checking its SHA-256 against SRCDB's: before
/// it is sent when small, while it is sent when large (the server checks
/// the same hash before anything appears); a sparse file as its data
/// extents. A damaged copy is marked for the next fetch.
/// Small files go many to a request: up to this size each, this many
/// files and this many bytes.
const BATCH_FILE_MAX: u64 = 1 << 20;
const BATCH_FILES: usize = 128;
const BATCH_BYTES: u64 = 8 << 20;

/// Whether a courier copy keeps at least 1 MiB of holes: it then travels
/// as its data extents.
fn looks_sparse(meta: &std::fs::Metadata) -> bool {
    std::os::unix::fs::MetadataExt::blocks(meta) * 512 + (1 << 20) <= meta.len()
}

/// The courier's copy of `e`, open for reading.
fn open_copy(courier: &Courier, e: &Entry) -> std::result::Result<std::fs::File, Failure> {
    courier
        .open_carried(&e.name)
        .map_err(|err| Failure::io("cannot read courier copy", &err))?
        .ok_or(Failure::Damaged("courier copy vanished".into()))
}

/// Records the courier's copy of `e` as damaged (the next fetch replaces
/// it) and says why it is not uploaded.
fn mark_damaged(courier: &Courier, e: &Entry, why: &str) -> Failure {
    let mark = Carried {
        damaged: true,
        ..Carried::of(e)
    };
    let _ = courier.append_log(&mark);
    Failure::Damaged(format!("{why}; not uploaded (the next fetch replaces it)"))
}

/// The courier copy of `e` as its plain bytes (decrypted as it is read
/// on a sealed courier) and their length; one that does not decrypt is
/// marked damaged.
fn open_contents(courier: &Courier, e: &Entry) -> std::result::Result<(Plain, u64), Failure> {
    courier
        .plain(open_copy(courier, e)?)
        .map_err(|err| read_failure(courier, e, &err))
}

/// A failed read of the courier copy of `e`: data that does not decrypt
/// marks it damaged; anything else is an I/O failure.
fn read_failure(courier: &Courier, e: &Entry, err: &std::io::Error) -> Failure {
    match err.kind() {
        std::io::ErrorKind::InvalidData => mark_damaged(
            courier,
            e,
            &format!("courier copy is damaged: {}", describe_io(err)),
        ),
        _ => Failure::io("cannot read courier copy", err),
    }
}

/// A small file of a sealed courier, decrypted whole (into an unnamed
/// file of the temporary directory, every chunk authenticated); the
/// server checks its SHA-256.
fn checked_sealed(
    courier: &Courier,
    e: &Entry,
) -> std::result::Result<Option<std::fs::File>, Failure> {
    let (mut from, len) = open_contents(courier, e)?;
    if len != e.size {
        return Err(mark_damaged(
            courier,
            e,
            &format!("courier copy has {len} bytes, SRCDB lists {}", e.size),
        ));
    }
    let tmp_err =
        |err: std::io::Error| Failure::io("cannot decrypt into the temporary directory", &err);
    let mut plain = crate::beneath::anonymous_file(&std::env::temp_dir()).map_err(tmp_err)?;
    match std::io::copy(&mut from, &mut plain) {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
            return Err(mark_damaged(
                courier,
                e,
                &format!("courier copy is damaged: {}", describe_io(&err)),
            ));
        }
        Err(err) => return Err(tmp_err(err)),
    }
    plain.seek(SeekFrom::Start(0)).map_err(tmp_err)?;
    Ok(Some(plain))
}

/// A small courier copy, open, checked against SRCDB's size (marked
/// damaged otherwise) and ready to send from its start; `None` when it is
/// sparse (it travels alone, as its data). Its SHA-256 is checked by the
/// server, and a refusal of it by [`judged`].
fn checked_small(
    courier: &Courier,
    e: &Entry,
) -> std::result::Result<Option<std::fs::File>, Failure> {
    let open_err = |err: std::io::Error| Failure::io("cannot read courier copy", &err);
    if courier.is_pack(&e.name) {
        return Ok(None);
    }
    if courier.sealed().is_some() {
        return checked_sealed(courier, e);
    }
    let mut file = open_copy(courier, e)?;
    let meta = file.metadata().map_err(open_err)?;
    let damaged = |why: String| Err(mark_damaged(courier, e, &why));
    if meta.len() != e.size {
        return damaged(format!(
            "courier copy has {} bytes, SRCDB lists {}",
            meta.len(),
            e.size
        ));
    }
    if looks_sparse(&meta) {
        return Ok(None);
    }
    if e.sha256.is_none() {
        // Every file of a batch is checked by the server against its
        // hash; one without cannot travel there.
        let (got, _) = hash_reader(&mut file).map_err(open_err)?;
        return damaged(format!(
            "courier copy is damaged: sha256 {got}, SRCDB lists none"
        ));
    }
    Ok(Some(file))
}

fn upload(
    client: &Client,
    courier: &Courier,
    dest: &AreaUrl,
    e: &Entry,
) -> std::result::Result<(), Failure> {
    let open_err = |err: std::io::Error| Failure::io("cannot read courier copy", &err);
    if courier.is_pack(&e.name) {
        return upload_pack(client, courier, dest, e);
    }
    if courier.sealed().is_some() {
        return upload_sealed(client, courier, dest, e);
    }
    let file = open_copy(courier, e)?;
    let len = file.metadata().map_err(open_err)?.len();
    let damaged = |why: String| Err(mark_damaged(courier, e, &why));
    if len != e.size {
        return damaged(format!(
            "courier copy has {len} bytes, SRCDB lists {}",
            e.size
        ));
    }
    let sparse = file.metadata().is_ok_and(|m| looks_sparse(&m));
    let extents = match sparse {
        true => crate::wire::sparse::data_extents(&file, e.size),
        false => Vec::new(),
    };
    let data: u64 = extents.iter().map(|&(_, l)| l).sum();
    let sparse = sparse && crate::wire::sparse::holes_within_bounds(e.size, data);
    if let (true, Some(want)) = (sparse, &e.sha256) {
        // Only the data extents travel; the hash covers the whole
        // content (holes as zeros) and is checked on both sides.
        let body_len = crate::wire::sparse::body_len(&extents);
        let data_end = extents.last().map_or(0, |&(s, l)| s + l);
        let body = crate::wire::sparse::ExtentBody::new(file, extents);
        let hashed = Arc::clone(&body.hashed);
        let sent = client.put_sparse(dest, e, body, body_len);
        let at = hashed.lock().expect("hasher").1;
        // Only a copy read to its end can be judged.
        if let Some(got) = whole_sparse_hash(&hashed, e, at == data_end) {
            if &got != want {
                return damaged(format!(
                    "courier copy is damaged: sha256 {got}, SRCDB lists {want}"
                ));
            }
        }
        return sent.map_err(Failure::client)?.map_err(refused);
    }
    // Sent as it is, without a hash pass here: the server checks the
    // same hash (it comes as X-Bitfog-Sha256) before anything appears
    // and refuses a mismatch (422), so a damaged copy is never stored.
    // Only a refusal makes the copy worth hashing here, to tell a
    // damaged courier copy from bytes changed on the way.
    let sent = client.put_file(dest, e, file).map_err(Failure::client)?;
    judged(courier, e, sent)
}

/// The outcome of an upload the destination checked against the entry's
/// SHA-256: a refusal for a mismatch (422) hashes the courier copy, and a
/// copy that does not match is marked damaged.
fn judged(
    courier: &Courier,
    e: &Entry,
    sent: std::result::Result<(), crate::client::Refused>,
) -> std::result::Result<(), Failure> {
    let Err(r) = sent else { return Ok(()) };
    if r.status == 422 {
        if let Some(want) = &e.sha256 {
            let (mut from, _) = open_contents(courier, e)?;
            let (got, _) = hash_reader(&mut from).map_err(|err| read_failure(courier, e, &err))?;
            if &got != want {
                return Err(mark_damaged(
                    courier,
                    e,
                    &format!("courier copy is damaged: sha256 {got}, SRCDB lists {want}"),
                ));
            }
        }
    }
    Err(refused(r))
}

/// Sends a file of a sealed courier, decrypted as it streams: its SHA-256
/// is checked on the way (and by the server before anything appears), and
/// a chunk that fails to decrypt cuts the upload short, so the server
/// stores nothing.
fn upload_sealed(
    client: &Client,
    courier: &Courier,
    dest: &AreaUrl,
    e: &Entry,
) -> std::result::Result<(), Failure> {
    let (from, len) = open_contents(courier, e)?;
    if len != e.size {
        return Err(mark_damaged(
            courier,
            e,
            &format!("courier copy has {len} bytes, SRCDB lists {}", e.size),
        ));
    }
    let bad = Arc::new(AtomicBool::new(false));
    let body = Watched {
        inner: from,
        bad: Arc::clone(&bad),
    };
    let sent = client.put_file(dest, e, body);
    if bad.load(Ordering::Relaxed) {
        return Err(mark_damaged(
            courier,
            e,
            "courier copy is damaged: it does not decrypt whole",
        ));
    }
    // Decrypting authenticates every chunk; the server checks the
    // content's SHA-256 (a copy swapped for another file's shows there).
    judged(courier, e, sent.map_err(Failure::client)?)
}

/// Notes a read that fails as damaged data (an encrypted file that does
/// not decrypt), so it is told from a transfer cut short.
struct Watched<R> {
    inner: R,
    bad: Arc<AtomicBool>,
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                self.bad.store(true, Ordering::Relaxed);
            }
        })
    }
}

/// Sends a sparse file the courier keeps as its framed data extents (a
/// courier without holes): the pack is the body a sparse `PUT` sends, so
/// it goes as it is, its frames checked and the content they describe
/// hashed on the way (and again by the server before anything appears).
fn upload_pack(
    client: &Client,
    courier: &Courier,
    dest: &AreaUrl,
    e: &Entry,
) -> std::result::Result<(), Failure> {
    let (file, len) = open_contents(courier, e)?;
    let sealed_bad = Arc::new(AtomicBool::new(false));
    let file = Watched {
        inner: file,
        bad: Arc::clone(&sealed_bad),
    };
    let Some(want) = &e.sha256 else {
        return Err(mark_damaged(
            courier,
            e,
            "a sparse copy without a SHA-256 to check",
        ));
    };
    let body = crate::wire::sparse::PackBody::with_len(
        std::io::BufReader::with_capacity(1 << 20, file),
        e.size,
        len,
    );
    let (hashed, bad, whole) = (
        Arc::clone(&body.hashed),
        Arc::clone(&body.bad),
        Arc::clone(&body.read_whole),
    );
    let sent = client.put_sparse(dest, e, body, len);
    if bad.load(Ordering::Relaxed) || sealed_bad.load(Ordering::Relaxed) {
        return Err(mark_damaged(
            courier,
            e,
            "courier copy is damaged: its extent frames do not describe the file",
        ));
    }
    // Only a pack read to its end can be judged (a destination that
    // refuses early reads only some of it).
    if let Some(got) = whole_sparse_hash(&hashed, e, whole.load(Ordering::Relaxed)) {
        if &got != want {
            return Err(mark_damaged(
                courier,
                e,
                &format!("courier copy is damaged: sha256 {got}, SRCDB lists {want}"),
            ));
        }
    }
    sent.map_err(Failure::client)?.map_err(refused)
}

/// The SHA-256 of a sparse upload's content from what its body hashed
/// (holes after the last extent as zeros), when the body was read whole.
fn whole_sparse_hash(hashed: &Mutex<(Hasher, u64)>, e: &Entry, read_whole: bool) -> Option<String> {
    if !read_whole {
        return None;
    }
    let (mut h, at) = std::mem::take(&mut *hashed.lock().expect("hasher"));
    crate::digest::hash_zeros(&mut h, e.size.saturating_sub(at));
    Some(h.hex())
}

/// At most so many threads inside at once.
struct Gate {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Gate {
    fn new(n: usize) -> Gate {
        Gate {
            free: Mutex::new(n),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits for a place; it is given back when the turn is dropped.
    fn enter(&self) -> Turn<'_> {
        let mut free = self.free.lock().expect("gate");
        while *free == 0 {
            free = self.freed.wait(free).expect("gate");
        }
        *free -= 1;
        Turn(self)
    }
}

struct Turn<'g>(&'g Gate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("gate") += 1;
        self.0.freed.notify_one();
    }
}

/// Why a delta is not applied when the destination's file is not the
/// version it was made against.
const BASE_CHANGED: &str = "the destination's file changed after its signature was taken; nothing was changed, and the next fetch carries the file whole or as a new delta";

#[cfg(test)]
mod tests {
    use super::Folds;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Where a name is: at the destination only, in SRCDB only, or both.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Side {
        Dst,
        Src,
        Both,
    }

    fn paths(names: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = names
            .iter()
            .flat_map(|n| crate::courier::prefixes(n).map(str::to_string))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// No two different paths (names and the directories above them)
    /// are one path where case folds.
    fn one_spelling_each(names: &[&str]) -> bool {
        let mut seen = BTreeMap::new();
        paths(names).into_iter().all(|p| {
            seen.insert(p.to_lowercase(), p.clone())
                .is_none_or(|q| q == p)
        })
    }

    proptest! {
        /// Whatever the names, what the destination ends with (its names,
        /// and SRCDB's names stored) holds one spelling of each folded
        /// path: no name is stored over another.
        #[test]
        fn no_two_names_become_one_file(
            raw in proptest::collection::vec(("[aAb]{1,2}(/[aAb]{1,2}){0,2}", 0..3u8), 1..12)
        ) {
            let mut by_name = BTreeMap::new();
            for (n, s) in raw {
                let side = [Side::Dst, Side::Src, Side::Both][s as usize];
                by_name.entry(n).or_insert(side);
            }
            // What a folding destination can hold: one spelling each.
            let mut there: Vec<&str> = Vec::new();
            let mut names: Vec<(String, Side)> = Vec::new();
            for (n, side) in &by_name {
                if *side != Side::Src {
                    let mut with = there.clone();
                    with.push(n);
                    if !one_spelling_each(&with) {
                        continue;
                    }
                    there.push(n);
                }
                names.push((n.clone(), *side));
            }
            names.sort_by(|a, b| crate::wire::paths::name_cmp(&a.0, &b.0));
            let mut f = Folds::default();
            let mut claimed = Vec::new();
            for (n, side) in &names {
                match side {
                    Side::Src => {
                        if f.new_name(n).is_none() {
                            claimed.push(n.clone());
                        }
                    }
                    _ => f.there(n),
                }
            }
            let stored: Vec<&String> = claimed.iter().filter(|n| !f.lost(n)).collect();
            let mut all: Vec<&str> = there.clone();
            all.extend(stored.iter().map(|s| s.as_str()));
            prop_assert!(one_spelling_each(&all), "{:?} -> {:?}", names, all);
            // A SRCDB name with no other spelling around is always stored.
            for (n, side) in &names {
                let alone = names.iter().all(|(m, _)| {
                    m == n || one_spelling_each(&[m.as_str(), n.as_str()])
                });
                if *side == Side::Src && alone {
                    prop_assert!(stored.contains(&n), "{n} was refused alone");
                }
            }
        }
    }
}
