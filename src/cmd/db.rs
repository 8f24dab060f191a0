//! `builddb` and `emptydb`: snapshots of an area written as manifests.

use crate::client::{AreaUrl, Client};
use crate::error::{Error, Exit, Result};
use crate::ui::{Ui, files_bytes, human_bytes, n_files};
use crate::wire::delta;
use crate::wire::manifest::{DbWriter, as_usage, open_db};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize)]
struct DbSummary {
    files: u64,
    bytes: u64,
    skipped: u64,
    /// With --signatures: files signed, and the signature file's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    signed_files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature_bytes: Option<u64>,
}

/// `bitfog builddb URL DB`: the DB is replaced only after the whole
/// listing arrived and checked out.
pub(crate) fn builddb(
    ui: &Ui,
    client: &Client,
    url: &AreaUrl,
    db: &Path,
    signatures: Option<u64>,
    seal: Option<&[crate::age::Recipient]>,
) -> Result<Exit> {
    // Before the server walks the area.
    crate::wire::manifest::check_replaceable(db)?;
    let mut listing = client.listing(url)?;
    let mut out = DbWriter::create(
        db,
        Some(url.as_str()),
        listing.area_id.as_deref(),
        client.exclude.texts(),
        seal,
    )?;
    // An encrypted DB cannot be read back here (no identity): the files
    // to sign wait in an unnamed scratch file instead.
    let spool_err = |e: std::io::Error| Error::io("a scratch file of the temporary directory", &e);
    let mut to_sign = match (signatures, seal) {
        (Some(_), Some(_)) => Some(
            crate::courier::Spool::<crate::wire::manifest::Entry>::anonymous()
                .map_err(spool_err)?,
        ),
        _ => None,
    };
    // The server hashes as it lists: the rate is its hashing.
    let progress = crate::ui::Progress::start(ui, "listing", 0, 0);
    for entry in listing.by_ref() {
        let entry = entry?;
        progress
            .files
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        progress
            .bytes
            .fetch_add(entry.size, std::sync::atomic::Ordering::Relaxed);
        out.entry(&entry)?;
        if let (Some(spool), Some(min)) = (to_sign.as_mut(), signatures) {
            if !entry.is_symlink() && entry.size >= min && entry.size > 0 {
                spool.push(&entry).map_err(spool_err)?;
            }
        }
    }
    progress.finish();
    let end = listing
        .end()
        .unwrap_or_else(|| crate::wire::manifest::End::new(0, 0, 0));
    let skipped = end.skipped;
    out.dirs = end.dirs;
    out.dirs_omitted = end.dirs_omitted;
    out.dirs_meta_omitted = end.dirs_meta_omitted;
    out.area_exclude = end.exclude;
    let (files, bytes) = out.commit_with(skipped, end.partials)?;
    if skipped > 0 {
        ui.error(format!(
            "{url}: the server left out {skipped} names it could not list (see its log)"
        ));
    }
    if end.dirs_meta_omitted > 0 {
        ui.error(format!(
            "{url}: the listing gives the mode and mtime of only some directories ({} more did not fit in its end record); those keep the destination's",
            end.dirs_meta_omitted
        ));
    }
    if end.dirs_omitted > 0 {
        ui.error(format!(
            "{url}: the listing names only some of the area's empty directories ({} more did not fit in its end record); those are not recreated by store",
            end.dirs_omitted
        ));
    }
    let mut human = format!("wrote '{}': {}\n", db.display(), files_bytes(files, bytes));
    let mut sum = DbSummary {
        files,
        bytes,
        skipped,
        signed_files: None,
        signature_bytes: None,
    };
    let mut exit = Exit::Done;
    if let Some(min) = signatures {
        let (signed, sig_bytes, failed) = sign(ui, client, url, db, min, seal, to_sign)?;
        human.push_str(&format!(
            "wrote '{}': signatures of {} ({})\n",
            delta::sig_path(db).display(),
            n_files(signed),
            human_bytes(sig_bytes)
        ));
        sum.signed_files = Some(signed);
        sum.signature_bytes = Some(sig_bytes);
        if failed > 0 {
            human.push_str(&format!("{} could not be signed\n", n_files(failed)));
            exit = Exit::Failed;
        }
    }
    ui.summary(&sum, &human);
    Ok(exit)
}

/// Writes `DB.sig`: the signatures of the DB's files of `min` bytes or
/// more, asked of the server one by one. A file that changed since the
/// listing (its signature names another SHA-256) or cannot be signed is
/// named and left out; fetch then carries it whole. Returns the files
/// signed, the signature file's size and the failures.
fn sign(
    ui: &Ui,
    client: &Client,
    url: &AreaUrl,
    db: &Path,
    min: u64,
    seal: Option<&[crate::age::Recipient]>,
    spooled: Option<crate::courier::Spool<crate::wire::manifest::Entry>>,
) -> Result<(u64, u64, u64)> {
    let io_err = |e: std::io::Error| Error::io(delta::sig_path(db).display().to_string(), &e);
    let mut out = delta::SigFileWriter::create(db, url.as_str(), seal).map_err(io_err)?;
    // Read back from the DB just written (or, encrypted, from the scratch
    // spool) rather than kept from the listing: memory stays bounded
    // however low --signature-min goes.
    let entries: Box<dyn Iterator<Item = Result<crate::wire::manifest::Entry>>> = match spooled {
        Some(mut spool) => {
            spool.finish().map_err(io_err)?;
            Box::new((0..spool.len()).map(move |i| spool.get(i).map_err(io_err)))
        }
        None => Box::new(open_db(db)?.1.map(|e| e.map_err(as_usage))),
    };
    let (mut signed, mut failed) = (0u64, 0u64);
    for e in entries {
        let e = e?;
        if e.is_symlink() || e.size < min || e.size == 0 {
            continue;
        }
        let (header, table, sha256) = match client.signature(url, &e.name) {
            Ok(s) => s,
            Err(err) => {
                ui.error(format!("'{}': no signature: {err}", e.name));
                failed += 1;
                continue;
            }
        };
        if header.size != e.size || e.sha256.as_ref().is_some_and(|h| *h != sha256) {
            ui.error(format!(
                "'{}': changed since the listing; no signature (run builddb again)",
                e.name
            ));
            failed += 1;
            continue;
        }
        let rec = delta::SigRecord {
            name: e.name.clone(),
            sha256,
            header,
        };
        out.add(&rec, &table).map_err(io_err)?;
        signed += 1;
    }
    out.commit().map_err(io_err)?;
    let bytes = std::fs::metadata(delta::sig_path(db)).map_or(0, |m| m.len());
    Ok((signed, bytes, failed))
}

/// `bitfog emptydb DB`.
pub(crate) fn emptydb(ui: &Ui, db: &Path, seal: Option<&[crate::age::Recipient]>) -> Result<Exit> {
    DbWriter::create(db, None, None, Vec::new(), seal)?.commit(0)?;
    ui.summary(
        &DbSummary {
            files: 0,
            bytes: 0,
            skipped: 0,
            signed_files: None,
            signature_bytes: None,
        },
        &format!("wrote '{}': empty\n", db.display()),
    );
    Ok(Exit::Done)
}

/// `bitfog keygen`: a new age identity, to standard output or a new file
/// (mode 0600, never over an existing one); its recipient on stderr.
pub(crate) fn keygen(ui: &Ui, out: Option<&Path>) -> Result<Exit> {
    let id = crate::age::Identity::generate();
    let recipient = id.recipient();
    let text = format!(
        "# created: {}\n# public key: {recipient}\n{}\n",
        crate::wire::protocol::rfc3339(crate::wire::manifest::now_secs()),
        id.encode()
    );
    match out {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let what = format!("'{}'", path.display());
            let mut f = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Error::usage(format!(
                        "{what}: already exists; keygen never replaces a key"
                    )),
                    _ => Error::io(&what, &e),
                })?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(&what, &e))?;
            ui.log(format!("public key: {recipient}"));
        }
        None => {
            crate::ui::print_stdout(&text);
            ui.log(format!("public key: {recipient}"));
        }
    }
    Ok(Exit::Done)
}
