//! `store`: uploads from the courier what the destination lacks according
//! to SRCDB, each file's SHA-256 checked before it leaves the courier.
//!
//! One bad file is reported and the others still go. Nothing is deleted at
//! the destination without `--delete`.

use crate::client::{AreaUrl, Client};
use crate::courier::{Carried, Courier};
use crate::digest::{Hasher, hash_reader};
use crate::error::{Error, Exit, Result, describe_io};
use crate::manifest::{Entry, as_usage, open_db};
use crate::paths::check_carried_name;
use crate::plan::{self, Pair};
use crate::ui::{Progress, Ui, files_bytes, human_bytes, n_files};
use std::collections::HashMap;

/// The destination snapshot `fetch` keeps in `COURIER/.bitfog/`.
pub(crate) const SNAPSHOT: &str = "destdb.jsonl";
use serde::Serialize;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    pub(crate) jobs: usize,
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
    /// Files SRCDB has that neither the destination nor the courier holds.
    missing_files: u64,
    missing_bytes: u64,
}

enum Action {
    Upload(Entry),
    Link(Entry),
    Delete(String),
}

/// `bitfog store SRCDB DESTURL COURIER`.
pub(crate) fn store(ui: &Ui, client: &Client, opts: &StoreOpts) -> Result<Exit> {
    let (header, mut src) = open_db(&opts.srcdb)?;
    if opts.delete && header.source.is_none() {
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
    // A dry run neither locks nor writes anything in the courier.
    let courier = if opts.dry_run {
        None
    } else {
        Some(Courier::open(&opts.courier, false)?)
    };
    let listing = client.listing(&opts.dest)?;

    let mut sum = StoreSummary::default();
    // Uploads and links: in memory for a dry run; otherwise in a spool
    // under .bitfog/, read back one at a time by the workers, so a
    // million-file courier is not held in memory.
    let mut actions = Vec::new();
    let mut spool = match &courier {
        Some(c) => Some(c.spool()?),
        None => None,
    };
    let spool_err = |e: std::io::Error| Error::io("the courier's plan spool", &e);
    let mut total_bytes = 0;
    let mut refused = Vec::new();
    let mut doomed: Vec<Entry> = Vec::new();
    plan::merge(src.by_ref().map(|r| r.map_err(as_usage)), listing, |pair| {
        match pair {
            Pair::Both(s, d) if s.same_content(&d) => sum.skipped_files += 1,
            Pair::Src(s) | Pair::Both(s, _) => {
                if let Err(why) = check_carried_name(&s.name) {
                    refused.push(format!("refusing '{}': {}", s.name, why.reason()));
                } else if s.is_symlink() || opts.courier.join(&s.name).symlink_metadata().is_ok() {
                    if !s.is_symlink() {
                        total_bytes += s.size;
                    }
                    match spool.as_mut() {
                        Some(spool) => {
                            spool.push(&s).map_err(spool_err)?;
                        }
                        None if s.is_symlink() => actions.push(Action::Link(s)),
                        None => actions.push(Action::Upload(s)),
                    }
                } else {
                    sum.missing_files += 1;
                    sum.missing_bytes += s.size;
                }
            }
            Pair::Dst(d) if opts.delete => doomed.push(d),
            Pair::Dst(_) => {}
        }
        Ok(())
    })?;
    if opts.delete && src.end().is_some_and(|e| e.count == 0) {
        return Err(Error::usage(format!(
            "'{}' lists nothing; refusing --delete, which would empty the destination",
            opts.srcdb.display()
        )));
    }
    for msg in &refused {
        ui.error(msg);
    }
    sum.failed_files += refused.len() as u64;
    let over_limit = choose_deletions(ui, opts, doomed, &mut actions, &mut sum)?;

    if opts.dry_run {
        let mut human = String::new();
        for a in &actions {
            match a {
                Action::Upload(e) => human.push_str(&format!(
                    "would upload '{}' ({})\n",
                    e.name,
                    human_bytes(e.size)
                )),
                Action::Link(e) => human.push_str(&format!(
                    "would link '{}' -> '{}'\n",
                    e.name,
                    e.linkdest.as_deref().unwrap_or_default()
                )),
                Action::Delete(n) => human.push_str(&format!("would delete '{n}'\n")),
            }
            match a {
                Action::Upload(e) | Action::Link(e) => {
                    sum.stored_files += 1;
                    sum.stored_bytes += e.size;
                }
                Action::Delete(_) => sum.deleted_files += 1,
            }
        }
        human.push_str("dry run: nothing was changed\n");
        ui.summary(
            &DryRun {
                dry_run: true,
                summary: &sum,
            },
            &human,
        );
        return Ok(if sum.failed_files > 0 || over_limit {
            Exit::Failed
        } else {
            Exit::Done
        });
    }
    let courier = courier.expect("opened unless dry run");

    // Deletions (only with --delete; `actions` holds nothing else now) run
    // first, so a name can change from file to directory.
    let deletes = actions;
    let mut spool = spool.expect("a spool unless dry run");
    spool.finish().map_err(spool_err)?;
    let progress = Progress::start(ui, "storing", spool.len() as u64, total_bytes);
    let results: Mutex<StoreSummary> = Mutex::new(sum);
    let record = |action: &Action, outcome: std::result::Result<(), String>| {
        let mut sum = results.lock().expect("summary");
        match (action, outcome) {
            (Action::Upload(e), Ok(())) => {
                sum.stored_files += 1;
                sum.stored_bytes += e.size;
                progress.bytes.fetch_add(e.size, Ordering::Relaxed);
            }
            (Action::Link(e), Ok(())) => {
                sum.stored_files += 1;
                sum.stored_bytes += e.size;
            }
            (Action::Delete(_), Ok(())) => sum.deleted_files += 1,
            (a, Err(why)) => {
                let name = match a {
                    Action::Upload(e) | Action::Link(e) => &e.name,
                    Action::Delete(n) => n,
                };
                ui.error(format!("'{name}': {why}"));
                sum.failed_files += 1;
            }
        }
        if !matches!(action, Action::Delete(_)) {
            progress.files.fetch_add(1, Ordering::Relaxed);
        }
    };
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, 64) {
            s.spawn(|| {
                while let Some(action) = deletes.get(next.fetch_add(1, Ordering::SeqCst)) {
                    record(action, run(client, &courier, &opts.dest, action));
                }
            });
        }
    });
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, 64) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= spool.len() {
                        return;
                    }
                    match spool.get(i) {
                        Ok(e) if e.is_symlink() => {
                            let a = Action::Link(e);
                            record(&a, run(client, &courier, &opts.dest, &a));
                        }
                        Ok(e) => {
                            let a = Action::Upload(e);
                            record(&a, run(client, &courier, &opts.dest, &a));
                        }
                        Err(err) => {
                            ui.error(format!("cannot read the courier's plan spool: {}", describe_io(&err)));
                            results.lock().expect("summary").failed_files += 1;
                        }
                    }
                }
            });
        }
    });
    progress.finish();
    let sum = results.into_inner().expect("summary");

    let mut human = format!(
        "stored {}; {} already at the destination",
        files_bytes(sum.stored_files, sum.stored_bytes),
        n_files(sum.skipped_files)
    );
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
    if sum.failed_files > 0 {
        human.push_str(&format!("{} failed\n", n_files(sum.failed_files)));
    }
    ui.summary(&sum, &human);
    Ok(if sum.failed_files > 0 || over_limit {
        Exit::Failed
    } else {
        Exit::Done
    })
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
    doomed: Vec<Entry>,
    actions: &mut Vec<Action>,
    sum: &mut StoreSummary,
) -> Result<bool> {
    if doomed.is_empty() {
        return Ok(false);
    }
    let snapshot = opts.courier.join(".bitfog").join(SNAPSHOT);
    let mut allowed: Vec<Entry> = if snapshot.exists() {
        let mut known: HashMap<String, Entry> =
            doomed.into_iter().map(|e| (e.name.clone(), e)).collect();
        let mut keep = Vec::new();
        let (_, snap) = open_db(&snapshot)?;
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
        keep.sort_by(|a, b| crate::paths::name_cmp(&a.name, &b.name));
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
fn run(
    client: &Client,
    courier: &Courier,
    dest: &AreaUrl,
    action: &Action,
) -> std::result::Result<(), String> {
    let refused = |r: crate::client::Refused| match r.status {
        507 => format!("the destination disk is full ({})", r.reason),
        422 => format!(
            "the destination refused the content as changed ({})",
            r.reason
        ),
        _ => r.reason,
    };
    match action {
        Action::Delete(name) => client
            .delete(dest, name)
            .map_err(|e| e.to_string())?
            .map_err(refused),
        Action::Link(e) => client
            .put_symlink(dest, &e.name, e.linkdest.as_deref().unwrap_or_default())
            .map_err(|e| e.to_string())?
            .map_err(refused),
        Action::Upload(e) => {
            let open_err =
                |err: std::io::Error| format!("cannot read courier copy: {}", describe_io(&err));
            let mut file = courier
                .open_carried(&e.name)
                .map_err(open_err)?
                .ok_or("courier copy vanished")?;
            let len = file.metadata().map_err(open_err)?.len();
            let damaged = |why: String| {
                let mark = Carried {
                    damaged: true,
                    ..Carried::of(e)
                };
                let _ = courier.append_log(&mark);
                Err(format!("{why}; not uploaded (the next fetch replaces it)"))
            };
            if len != e.size {
                return damaged(format!(
                    "courier copy has {len} bytes, SRCDB lists {}",
                    e.size
                ));
            }
            let Some(want) = &e.sha256 else {
                return client
                    .put_file(dest, e, file)
                    .map_err(|e| e.to_string())?
                    .map_err(refused);
            };
            if e.size < STREAM_CHECK_MIN {
                let (got, _) = hash_reader(&mut file).map_err(open_err)?;
                if &got != want {
                    return damaged(format!(
                        "courier copy is damaged: sha256 {got}, SRCDB lists {want}"
                    ));
                }
                file.seek(SeekFrom::Start(0)).map_err(open_err)?;
                return client
                    .put_file(dest, e, file)
                    .map_err(|e| e.to_string())?
                    .map_err(refused);
            }
            // A large file is checked as it streams, saving a whole read
            // and hash pass; the server checks the same hash (it comes
            // as X-Bitfog-Sha256) before anything appears, so a damaged
            // copy is refused there (422) and never stored.
            let hasher = Arc::new(Mutex::new((Hasher::new(), 0u64)));
            let body = HashingReader {
                inner: file,
                hasher: Arc::clone(&hasher),
            };
            let sent = client.put_file(dest, e, body);
            let (h, read) = std::mem::take(&mut *hasher.lock().expect("hasher"));
            let got = h.hex();
            // Only a copy read to its end can be judged; a transfer cut
            // short says so below.
            if read == e.size && &got != want {
                return damaged(format!(
                    "courier copy is damaged: sha256 {got}, SRCDB lists {want}"
                ));
            }
            sent.map_err(|e| e.to_string())?.map_err(refused)
        }
    }
}

/// Files at least this large are hashed while they are sent instead of
/// in a pass of their own before.
const STREAM_CHECK_MIN: u64 = 8 << 20;

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    /// The hash so far and the bytes it covers.
    hasher: Arc<Mutex<(Hasher, u64)>>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut h = self.hasher.lock().expect("hasher");
        h.0.update(&buf[..n]);
        h.1 += n as u64;
        Ok(n)
    }
}
