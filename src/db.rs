//! `builddb` and `emptydb`: snapshots of an area written as manifests.

use crate::client::{AreaUrl, Client};
use crate::error::{Exit, Result};
use crate::manifest::DbWriter;
use crate::ui::{Ui, files_bytes};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize)]
struct DbSummary {
    files: u64,
    bytes: u64,
    skipped: u64,
}

/// `bitfog builddb URL DB`: the DB is replaced only after the whole
/// listing arrived and checked out.
pub(crate) fn builddb(ui: &Ui, client: &Client, url: &AreaUrl, db: &Path) -> Result<Exit> {
    let mut listing = client.listing(url)?;
    let mut out = DbWriter::create(db, Some(url.as_str()))?;
    for entry in listing.by_ref() {
        out.entry(&entry?)?;
    }
    let end = listing
        .end()
        .unwrap_or_else(|| crate::manifest::End::new(0, 0, 0));
    let skipped = end.skipped;
    out.dirs = end.dirs;
    let (files, bytes) = out.commit_with(skipped, end.partials)?;
    if skipped > 0 {
        ui.error(format!(
            "{url}: the server left out {skipped} names it could not list (see its log)"
        ));
    }
    let human = format!("wrote '{}': {}\n", db.display(), files_bytes(files, bytes));
    ui.summary(
        &DbSummary {
            files,
            bytes,
            skipped,
        },
        &human,
    );
    Ok(Exit::Done)
}

/// `bitfog emptydb DB`.
pub(crate) fn emptydb(ui: &Ui, db: &Path) -> Result<Exit> {
    DbWriter::create(db, None)?.commit(0)?;
    ui.summary(
        &DbSummary {
            files: 0,
            bytes: 0,
            skipped: 0,
        },
        &format!("wrote '{}': empty\n", db.display()),
    );
    Ok(Exit::Done)
}
