//! Streaming SHA-256 over any `Read`, and the lowercase hex digest.
//!
//! Never reads a whole file into memory: everything streams through one
//! buffer of `BUF_SIZE` bytes.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};

/// The one buffer size for streaming file data.
pub(crate) const BUF_SIZE: usize = 256 * 1024;

/// An incremental SHA-256.
#[derive(Clone, Default)]
pub(crate) struct Hasher(Sha256);

impl Hasher {
    pub(crate) fn new() -> Hasher {
        Hasher(Sha256::new())
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest as 64 lowercase hex digits.
    pub(crate) fn hex(self) -> String {
        hex(&self.0.finalize())
    }
}

/// Lowercase hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// True for exactly 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hashes everything `reader` yields; returns the digest and the byte count.
pub(crate) fn hash_reader(mut reader: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.hex(), total))
}

/// Copies `reader` into `writer` while hashing, stopping after `limit`
/// bytes. Returns the bytes copied; the caller compares with what it
/// expected. Errors keep their origin: `CopyError::Read` or `::Write`.
pub(crate) fn copy_hashing(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    hasher: &mut Hasher,
    limit: u64,
    mut progress: impl FnMut(u64),
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    while total < limit {
        let want = (limit - total).min(BUF_SIZE as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
        hasher.update(&buf[..n]);
        total += n as u64;
        progress(n as u64);
    }
    Ok(total)
}

/// Which side of a copy failed.
#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let (h, n) = hash_reader(&b""[..]).unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            h,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let (h, _) = hash_reader(&b"abc"[..]).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&h));
        assert!(!is_sha256_hex(&h.to_uppercase()));
        assert!(!is_sha256_hex(&h[1..]));
    }

    #[test]
    fn copy_stops_at_limit() {
        let data = vec![7u8; 1000];
        let mut out = Vec::new();
        let mut h = Hasher::new();
        let n = copy_hashing(&mut &data[..], &mut out, &mut h, 600, |_| {}).unwrap();
        assert_eq!(n, 600);
        assert_eq!(out.len(), 600);
        assert_eq!(h.hex(), hash_reader(&data[..600]).unwrap().0);
    }
}
