//! `store`: uploads from the courier what the destination lacks according
//! to SRCDB, each file's SHA-256 checked before it leaves the courier.
//!
//! One bad file is reported and the others still go. Nothing is deleted at
//! the destination without `--delete`.

use crate::client::{AreaUrl, Client};
use crate::courier::{Carried, Courier};
use crate::digest::hash_reader;
use crate::error::{Error, Exit, Result, describe_io};
use crate::manifest::{Entry, as_usage, open_db};
use crate::paths::check_carried_name;
use crate::plan::{self, Pair};
use crate::ui::{Progress, Ui, files_bytes, n_files};
use serde::Serialize;
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone)]
pub(crate) struct StoreOpts {
    pub(crate) srcdb: PathBuf,
    pub(crate) dest: AreaUrl,
    pub(crate) courier: PathBuf,
    pub(crate) delete: bool,
    pub(crate) jobs: usize,
}

#[derive(Serialize, Default)]
struct StoreSummary {
    stored_files: u64,
    stored_bytes: u64,
    skipped_files: u64,
    failed_files: u64,
    deleted_files: u64,
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
    let (_, src) = open_db(&opts.srcdb)?;
    if !opts.courier.is_dir() {
        return Err(Error::usage(format!(
            "'{}': courier directory not found",
            opts.courier.display()
        )));
    }
    let courier = Courier::open(&opts.courier, false)?;
    let listing = client.listing(&opts.dest)?;

    let mut sum = StoreSummary::default();
    let mut actions = Vec::new();
    let mut refused = Vec::new();
    plan::merge(src.map(|r| r.map_err(as_usage)), listing, |pair| {
        match pair {
            Pair::Both(s, d) if s.same_content(&d) => sum.skipped_files += 1,
            Pair::Src(s) | Pair::Both(s, _) => {
                if let Err(why) = check_carried_name(&s.name) {
                    refused.push(format!("refusing '{}': {}", s.name, why.reason()));
                } else if s.is_symlink() {
                    actions.push(Action::Link(s));
                } else if courier.path_of(&s.name).symlink_metadata().is_ok() {
                    actions.push(Action::Upload(s));
                } else {
                    sum.missing_files += 1;
                    sum.missing_bytes += s.size;
                }
            }
            Pair::Dst(d) if opts.delete => actions.push(Action::Delete(d.name)),
            Pair::Dst(_) => {}
        }
        Ok(())
    })?;
    for msg in &refused {
        ui.error(msg);
    }
    sum.failed_files += refused.len() as u64;

    // Deletions first, so a name can change from file to directory.
    let (deletes, rest): (Vec<Action>, Vec<Action>) = actions
        .into_iter()
        .partition(|a| matches!(a, Action::Delete(_)));
    let total_bytes = rest
        .iter()
        .map(|a| if let Action::Upload(e) = a { e.size } else { 0 })
        .sum();
    let progress = Progress::start(ui, "storing", rest.len() as u64, total_bytes);
    let results: Mutex<StoreSummary> = Mutex::new(sum);
    for batch in [deletes, rest] {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..opts.jobs.clamp(1, 64) {
                s.spawn(|| {
                    while let Some(action) = batch.get(next.fetch_add(1, Ordering::SeqCst)) {
                        let outcome = run(client, &courier, &opts.dest, action);
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
                    }
                });
            }
        });
    }
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
    Ok(if sum.failed_files > 0 {
        Exit::Failed
    } else {
        Exit::Done
    })
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
            if let Some(want) = &e.sha256 {
                let (got, _) = hash_reader(&mut file).map_err(open_err)?;
                if &got != want {
                    return damaged(format!(
                        "courier copy is damaged: sha256 {got}, SRCDB lists {want}"
                    ));
                }
                file.seek(SeekFrom::Start(0)).map_err(open_err)?;
            }
            client
                .put_file(dest, e, file)
                .map_err(|e| e.to_string())?
                .map_err(refused)
        }
    }
}
