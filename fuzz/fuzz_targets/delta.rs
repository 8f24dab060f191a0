//! Deltas: applying any bytes as a delta never panics and agrees with
//! `verify`; a delta made from any old/new pair rebuilds the new one.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/delta.rs"]
mod delta;
#[path = "../../src/digest.rs"]
mod digest;

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::sync::OnceLock;

/// The old file every hostile delta is applied to.
fn base() -> &'static std::fs::File {
    static BASE: OnceLock<std::fs::File> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut f = tempfile_in_tmp();
        f.write_all(&(0..100_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        f
    })
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("bitfog-fuzz-delta-{}", std::process::id()));
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

fn apply(d: &[u8], old: &std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut r = d;
    let mut hasher = digest::Hasher::new();
    let h = delta::read_header(&mut r, &mut hasher)?;
    let mut out = Vec::new();
    delta::Patch::new(&h, r, old, hasher)
        .take(64 << 20)
        .read_to_end(&mut out)?;
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    // Hostile: the bytes as a delta.
    let verified = delta::verify(data);
    let applied = apply(data, base());
    if let Ok(h) = &verified {
        if h.base_size <= 100_000 && h.size < 64 << 20 {
            let out = applied.expect("a verified delta applies");
            assert_eq!(out.len() as u64, h.size);
        }
    }
    // Honest: old and new from the input, a small block size.
    if data.len() < 2 {
        return;
    }
    let block = u64::from(data[0] % 64) + 1;
    let cut = usize::from(data[1]) * data.len() / 256;
    let (old, new) = data[2..].split_at(cut.saturating_sub(2).min(data.len() - 2));
    let h = delta::SigHeader {
        size: old.len() as u64,
        block,
        strong: delta::STRONG,
        blocks: delta::block_count(old.len() as u64, block),
    };
    let mut w = delta::SigWriter::new(block, Vec::new());
    w.write_all(old).unwrap();
    let table = w.finish().unwrap();
    let sig = delta::Signature::new(&h, &table).unwrap();
    let header = delta::DeltaHeader {
        bitfog_delta: 1,
        name: "f".into(),
        size: new.len() as u64,
        sha256: "0".repeat(64),
        mode: 0o644,
        mtime: 0,
        base_size: old.len() as u64,
        base_sha256: "0".repeat(64),
    };
    let mut e = delta::Encoder::new(&sig, &header, Vec::new(), u64::MAX).unwrap();
    e.write_all(new).unwrap();
    let (d, _) = e.finish().unwrap();
    let mut f = tempfile_in_tmp();
    f.write_all(old).unwrap();
    assert!(delta::verify(&d[..]).is_ok());
    assert_eq!(apply(&d, &f).unwrap(), new);
});
