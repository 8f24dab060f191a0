//! Moving bytes between a server and the courier's state directories:
//! byte ranges of files bigger than a trip (`download_range`,
//! `upload_range`) and deltas of changed files (`make_delta`). The
//! courier module knows how these live on disk; this one fetches and
//! sends them.

use crate::client::{AreaUrl, Client};
use crate::courier::ranges::{self, RangeRecord};
use crate::courier::{Courier, deltas};
use crate::digest::{CopyError, Hasher, copy_hashing_apart, hash_reader};
use crate::error::{describe_io, is_disk_full};
use crate::wire::delta::{self, DeltaHeader, Encoder, Signature};
use crate::wire::manifest::Entry;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why moving one file, range or delta did not complete, matched by
/// variant: a full disk stops the run cleanly; anything else fails that
/// item and the run goes on.
#[derive(Debug)]
pub(super) enum Failure {
    /// The disk being written (the courier's) is full.
    DiskFull,
    /// The source no longer has the listed version (size, hash or mtime
    /// changed, or the server sent more or other bytes).
    SourceChanged(String),
    /// What the courier holds does not match its record.
    Damaged(String),
    /// A delta would not be smaller than what it may take.
    TooBig,
    /// The other end answered with a refusal.
    Refused(String),
    /// The destination answered 507: its disk is full. The run stops
    /// starting uploads.
    DestFull(String),
    /// The destination area excludes the name (403): not stored, and not
    /// a failure of the run.
    Excluded,
    /// The server could not be reached or stopped answering: the run
    /// stops starting transfers.
    Unreachable(String),
    /// Any other failure of the disk or the network.
    Io(String),
}

impl Failure {
    /// A 507 from the destination.
    pub(super) fn dest_full(reason: &str) -> Failure {
        Failure::DestFull(format!("the destination disk is full ({reason})"))
    }

    /// A client error: one that says the server is gone is `Unreachable`.
    pub(super) fn client(err: crate::error::Error) -> Failure {
        if err.unreachable {
            Failure::Unreachable(err.to_string())
        } else {
            Failure::Io(err.to_string())
        }
    }

    /// An I/O error while doing `what`: a full disk is `DiskFull`.
    pub(super) fn io(what: &str, err: &io::Error) -> Failure {
        if is_disk_full(err) {
            Failure::DiskFull
        } else if crate::error::is_connection_lost(err) {
            Failure::Unreachable(format!("{what}: {}", describe_io(err)))
        } else if delta::is_too_big(err) {
            Failure::TooBig
        } else {
            Failure::Io(format!("{what}: {}", describe_io(err)))
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::DiskFull => f.write_str("the disk is full"),
            Failure::Excluded => f.write_str("the destination area excludes it"),
            Failure::TooBig => f.write_str("the delta would not be smaller than its limit"),
            Failure::SourceChanged(why)
            | Failure::Damaged(why)
            | Failure::Refused(why)
            | Failure::DestFull(why)
            | Failure::Unreachable(why)
            | Failure::Io(why) => f.write_str(why),
        }
    }
}

/// Downloads `len` bytes of `e` from `start` into the courier as a range.
pub(super) fn download_range(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    (start, len): (u64, u64),
    wire: &AtomicU64,
) -> Result<RangeRecord, Failure> {
    let why = Failure::io;
    let sha = e.sha256.clone().ok_or(Failure::Refused(
        "a range needs the file's SHA-256 in the listing".to_string(),
    ))?;
    let mut dl = client
        .get_range(src, &e.name, start, start + len - 1)
        .map_err(Failure::client)?;
    match dl.content_range {
        Some((a, b, total))
            if dl.status == 206 && a == start && b == start + len - 1 && total == e.size => {}
        _ => {
            return Err(Failure::SourceChanged(format!(
                "the server did not send bytes {start}-{} of {} (changed at the source?)",
                start + len - 1,
                e.size
            )));
        }
    }
    if dl.last_modified.is_some_and(|t| t != e.mtime) {
        return Err(Failure::SourceChanged(
            "modified at the source since the listing; not kept".into(),
        ));
    }
    let range = ranges::create(courier, e, &sha, start)
        .map_err(|err| why("cannot create range file", &err))?;
    let mut hasher = Hasher::new();
    let (copied, flushed) =
        courier.copy_in(&mut dl.body, (range.file(), 0), &mut hasher, len, |n| {
            wire.fetch_add(n, Ordering::Relaxed);
        });
    match copied {
        Ok(n) if n == len => flushed.map_err(|err| why("cannot write range file", &err))?,
        Ok(n) => {
            return Err(Failure::Io(format!(
                "download cut short after {n} of {len} bytes; rerun"
            )));
        }
        Err(CopyError::Write(err)) => return Err(why("cannot write range file", &err)),
        Err(CopyError::Read(err)) => {
            return Err(Failure::Io(format!(
                "download failed: {}",
                describe_io(&err)
            )));
        }
    }
    let rec = RangeRecord {
        name: e.name.clone(),
        size: e.size,
        sha256: sha,
        mode: e.mode,
        mtime: e.mtime,
        start,
        len,
        range_sha256: hasher.hex(),
    };
    ranges::keep(courier, range, &rec).map_err(|err| why("cannot record range", &err))?;
    Ok(rec)
}

/// What the destination said to one range.
pub(super) enum Sent {
    /// It holds this many bytes of the file now.
    Partial(u64),
    /// The file is complete and verified at its path.
    Complete,
}

/// Sends one courier range of `e` (SRCDB's entry) to the destination,
/// after checking it.
pub(super) fn upload_range(
    client: &Client,
    dest: &AreaUrl,
    courier: &Courier,
    (data, rec): (&str, &RangeRecord),
    e: &Entry,
) -> Result<Sent, Failure> {
    let open = || {
        ranges::open(courier, data)
            .map(|(f, _)| f)
            .map_err(|e| Failure::io("cannot read courier range", &e))
    };
    // A sealed range that does not decrypt whole is damaged like one
    // whose hash is wrong.
    let (got, n) = match hash_reader(open()?) {
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Default::default(),
        other => other.map_err(|e| Failure::io("cannot read courier range", &e))?,
    };
    if n != rec.len || got != rec.range_sha256 {
        return Err(Failure::Damaged(format!(
            "courier range {}-{} is damaged; not uploaded (the next fetch carries it again)",
            rec.start,
            rec.end() - 1
        )));
    }
    match client
        .put_range(dest, e, (rec.start, rec.len), open()?)
        .map_err(Failure::client)?
    {
        Ok((204, _)) => Ok(Sent::Complete),
        Ok((_, have)) => Ok(Sent::Partial(have)),
        Err(r) if r.status == 422 => Err(Failure::Refused(format!(
            "the assembled file did not match its SHA-256 ({}); the destination dropped it and it starts over",
            r.reason
        ))),
        Err(r) if r.status == 507 => Err(Failure::dest_full(&r.reason)),
        Err(r) if r.status == 403 => Err(Failure::Excluded),
        Err(r) => Err(Failure::Refused(r.reason)),
    }
}

/// Reads the listed version of `e` from the source and keeps its delta
/// against the signature of the destination's version (`base`: its
/// SHA-256 and signature) if it stays within `limit` bytes. The bytes
/// read are checked against the listing's SHA-256: a file that changed
/// at the source leaves no delta.
pub(super) fn make_delta(
    client: &Client,
    src: &AreaUrl,
    courier: &Courier,
    e: &Entry,
    (base_sha, sig): (&str, &Signature),
    limit: u64,
    wire: &AtomicU64,
) -> Result<u64, Failure> {
    let sha = e
        .sha256
        .clone()
        .ok_or_else(|| Failure::Refused("a delta needs the file's SHA-256".into()))?;
    let mut dl = client.get(src, &e.name, 0, None).map_err(Failure::client)?;
    if dl.status != 200 || dl.content_length.is_some_and(|n| n != e.size) {
        return Err(Failure::SourceChanged(
            "the source no longer has the listed version".into(),
        ));
    }
    if dl.last_modified.is_some_and(|t| t != e.mtime) {
        return Err(Failure::SourceChanged(
            "modified at the source since the listing".into(),
        ));
    }
    let header = DeltaHeader {
        bitfog_delta: 1,
        name: e.name.clone(),
        size: e.size,
        sha256: sha.clone(),
        mode: e.mode & 0o777,
        mtime: e.mtime,
        base_size: sig.size,
        base_sha256: base_sha.to_string(),
    };
    let made = deltas::create(courier, &e.name, &sha, base_sha).map_err(|err| write_fail(&err))?;
    let out = courier
        .sink(io::BufWriter::with_capacity(1 << 20, made.file()))
        .map_err(|err| write_fail(&err))?;
    let mut enc = Encoder::new(sig, &header, out, limit).map_err(|err| write_fail(&err))?;
    let mut hasher = Hasher::new();
    let n = copy_hashing_apart(&mut dl.body, &mut enc, &mut hasher, e.size, |n| {
        wire.fetch_add(n, Ordering::Relaxed);
    })
    .map_err(|err| match err {
        CopyError::Write(err) => write_fail(&err),
        CopyError::Read(err) => Failure::io("download failed", &err),
    })?;
    if n != e.size {
        return Err(Failure::Io(format!(
            "download cut short after {n} of {} bytes",
            e.size
        )));
    }
    if hasher.hex() != sha {
        return Err(Failure::SourceChanged(
            "changed at the source while it was read; not kept".into(),
        ));
    }
    let (out, len) = enc.finish().map_err(|err| write_fail(&err))?;
    out.finish().map_err(|err| write_fail(&err))?;
    made.keep(None).map_err(|err| write_fail(&err))?;
    Ok(len)
}

fn write_fail(err: &io::Error) -> Failure {
    Failure::io("cannot write the delta", err)
}
