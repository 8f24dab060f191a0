//! The properties the fuzz targets (`fuzz/`) check, one function each,
//! here so that they run against the library's own parsers with the
//! crate's access. Each takes the fuzzer's bytes and panics when a
//! property breaks. Not a stable interface.

use crate::wire::{delta, manifest, paths, protocol};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::OnceLock;

/// Range, Content-Range, date and percent-decoding parsers: no panic,
/// and every answer inside the file.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) >> (data[0] % 64);
    let text = String::from_utf8_lossy(&data[8..]);
    match protocol::parse_range(&text, len) {
        protocol::RangeAsk::Part { start, end } => {
            assert!(start <= end && end < len);
            let cr = protocol::content_range(start, end, len);
            assert_eq!(protocol::parse_content_range(&cr), Some((start, end, len)));
        }
        protocol::RangeAsk::Whole | protocol::RangeAsk::Unsatisfiable => {}
    }
    let _ = protocol::parse_content_range(&text);
    if let Some(t) = protocol::parse_http_date(&text) {
        let _ = protocol::http_date(t);
    }
    if let Some(bytes) = protocol::percent_decode(&text) {
        assert!(bytes.len() <= text.len());
    }
}

/// Name validation: whatever is accepted is made of normal components
/// only and stays below any root it is joined to.
pub fn paths(data: &[u8]) {
    if let Ok(comps) = paths::components(data) {
        let mut p = Path::new("/root").to_path_buf();
        for c in &comps {
            assert!(
                !c.is_empty()
                    && *c != b"."
                    && *c != b".."
                    && !c.contains(&0)
                    && !c.contains(&b'\\')
            );
            p.push(OsStr::from_bytes(c));
        }
        assert!(p.starts_with("/root"));
        assert!(
            p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        );
        assert_eq!(p.components().count(), comps.len() + 2);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(rel) = paths::check_carried_name(text) {
            assert!(rel.is_relative());
            assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
        }
        let mid = text
            .char_indices()
            .nth(text.chars().count() / 2)
            .map_or(text.len(), |(i, _)| i);
        let (a, b) = text.split_at(mid);
        assert_eq!(paths::name_cmp(a, b), paths::name_cmp(b, a).reverse());
    }
}

/// The listing/DB reader: no panic on any input; what it accepts
/// round-trips through the writer's format.
pub fn manifest(data: &[u8]) {
    let entries: Result<Vec<manifest::Entry>, _> = manifest::Reader::new(data, "fuzz").collect();
    if let Ok(entries) = entries {
        let mut text = String::new();
        for e in &entries {
            text.push_str(&serde_json::to_string(e).expect("an entry serializes"));
            text.push('\n');
        }
        let bytes: u64 = entries.iter().map(|e| e.size).sum();
        text.push_str(&format!(
            "{{\"end\":true,\"count\":{},\"bytes\":{bytes}}}\n",
            entries.len()
        ));
        let again: Vec<manifest::Entry> = manifest::Reader::new(text.as_bytes(), "again")
            .collect::<Result<_, _>>()
            .expect("what was read reads again");
        assert_eq!(again, entries);
    }
}

/// Request-head handling: the event thread's completeness check and the
/// worker's parse never panic and agree with each other.
pub fn head(data: &[u8]) {
    let complete = matches!(
        crate::http::head_state(data, 16 * 1024),
        crate::http::Head::Complete
    );
    let parsed = crate::http::parse_head(data);
    if complete {
        let head = parsed.expect("a complete head parses");
        assert!(head.len <= data.len());
    }
}

/// The old file every hostile delta is applied to.
fn base() -> &'static std::fs::File {
    static BASE: OnceLock<std::fs::File> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut f = unnamed_file();
        f.write_all(
            &(0..100_000u32)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<_>>(),
        )
        .expect("write the base");
        f
    })
}

fn unnamed_file() -> std::fs::File {
    crate::beneath::anonymous_file(&std::env::temp_dir()).expect("a scratch file")
}

fn apply(d: &[u8], old: &std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut r = d;
    let mut hasher = crate::digest::Hasher::new();
    let h = delta::read_header(&mut r, &mut hasher)?;
    let mut out = Vec::new();
    delta::Patch::new(&h, r, old, hasher)
        .take(64 << 20)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// Deltas: applying any bytes as a delta never panics and agrees with
/// `verify`; a delta made from any old/new pair rebuilds the new one.
pub fn delta(data: &[u8]) {
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
    w.write_all(old).expect("sign");
    let table = w.finish().expect("sign");
    let sig = delta::Signature::new(&h, &table).expect("a signature of our own");
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
    let mut e = delta::Encoder::new(&sig, &header, Vec::new(), u64::MAX).expect("encoder");
    e.write_all(new).expect("encode");
    let (d, _) = e.finish().expect("encode");
    let mut f = unnamed_file();
    f.write_all(old).expect("write old");
    assert!(delta::verify(&d[..]).is_ok());
    assert_eq!(apply(&d, &f).expect("an honest delta applies"), new);
}

/// age files: any bytes read as an age file with a fixed identity never
/// panic and never yield more than they hold; the same bytes sealed for
/// that identity come back whole, and with one byte changed are refused.
pub fn age(data: &[u8]) {
    static ID: OnceLock<crate::age::Identity> = OnceLock::new();
    let id = ID.get_or_init(|| {
        crate::age::Identity::parse(
            "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX",
        )
        .expect("the spec's identity")
    });
    if let Ok(mut r) = crate::age::Reader::new(data, std::slice::from_ref(id)) {
        let mut out = Vec::new();
        if r.read_to_end(&mut out).is_ok() {
            assert!(out.len() <= data.len());
        }
    }
    let mut w = crate::age::Writer::new(Vec::new(), &[id.recipient()]).expect("to memory");
    w.write_all(data).expect("to memory");
    let mut sealed = w.finish().expect("to memory");
    let mut back = Vec::new();
    crate::age::Reader::new(&sealed[..], std::slice::from_ref(id))
        .and_then(|mut r| r.read_to_end(&mut back))
        .expect("a file sealed for the identity opens");
    assert_eq!(back, data);
    if let Some(&b) = data.first() {
        let i = b as usize * 7 % sealed.len();
        sealed[i] ^= 1;
        let opened = crate::age::Reader::new(&sealed[..], std::slice::from_ref(id))
            .and_then(|mut r| r.read_to_end(&mut Vec::new()));
        assert!(opened.is_err(), "byte {i} changed and still opened");
    }
}

#[cfg(test)]
mod tests {
    /// Each property holds for a few fixed inputs, so that the functions
    /// the fuzzers run are exercised by `cargo test` too.
    #[test]
    fn the_fuzzed_properties_hold_for_plain_inputs() {
        for data in [
            &b""[..],
            b"\0\0\0\0\0\0\x10\0bytes=0-9",
            b"a/b/../c",
            b"{\"name\":\"a\",\"size\":1,\"mode\":420,\"mtime\":1}\n{\"end\":true,\"count\":1,\"bytes\":1}\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x07\x80some old bytes and some new bytes",
        ] {
            super::range(data);
            super::paths(data);
            super::manifest(data);
            super::head(data);
            super::delta(data);
        }
    }
}
