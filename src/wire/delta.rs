//! Block signatures, deltas against them, and patching: the rsync
//! algorithm over bitfog's manifests. Formats and pure logic; the I/O
//! around them lives in `server`, `fetch` and `store`.
//!
//! A signature cuts a file into blocks of `block_size(size)` bytes (the
//! last may be shorter) and keeps, per block, a 32-bit rolling checksum
//! and the first 16 bytes of its SHA-256. A delta of a newer version
//! against it is a list of operations: copy a byte range of the old file,
//! or insert literal bytes. It names the old version (size, SHA-256) it
//! applies to and the new one it makes, and ends with the SHA-256 of
//! everything before, so a damaged delta is refused: by `store` before it
//! is sent, by the server before anything made from it appears.
//!
//! Wire and file formats (all integers big-endian):
//!
//! signature: a JSON line `{"size","block","strong":16,"blocks"}`, then
//! `blocks` records of 20 bytes (weak checksum u32, strong hash 16 bytes),
//! then a JSON line `{"sha256"}` of the whole file.
//!
//! delta: a JSON line (`DeltaHeader`), then operations:
//! `C` offset:u64 len:u64 (copy from the old file), `L` len:u32 bytes
//! (literal), and last `E` digest:32 (SHA-256 of all bytes before the
//! digest).

use crate::digest::Hasher;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

/// Content type of a signature (`GET /AREA/PATH?signature`).
pub(crate) const SIGNATURE_TYPE: &str = "application/x-bitfog-signature";
/// Content type of a PUT whose body is a delta.
pub(crate) const DELTA_TYPE: &str = "application/x-bitfog-delta";
/// Bytes of SHA-256 kept per block.
pub(crate) const STRONG: usize = 16;
/// Bytes per block in a signature.
pub(crate) const RECORD: usize = 4 + STRONG;
/// The longest literal operation.
const LITERAL_MAX: usize = 1 << 20;
/// The most blocks a signature may have.
const MAX_BLOCKS: u64 = 1 << 24;
/// The longest JSON line of a signature or delta.
pub(crate) const MAX_HEADER: usize = 64 * 1024;

/// The block size for a file of `size` bytes: the power of two at or
/// above its square root, from 8 KiB to 8 MiB. Signatures then take
/// 20 bytes per block: at most 0.25 % of a file of 64 MiB or more, and
/// less as files grow (see the table in docs/design.md).
pub(crate) fn block_size(size: u64) -> u64 {
    let root = (size as f64).sqrt().ceil() as u64;
    root.next_power_of_two().clamp(8 << 10, 8 << 20)
}

/// The number of blocks of a file.
pub(crate) fn block_count(size: u64, block: u64) -> u64 {
    size.div_ceil(block)
}

/// The rsync rolling checksum of a window: `a` sums the bytes, `b` sums
/// the running `a`, both with an offset so runs of zeros differ by length.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Rolling {
    a: u32,
    b: u32,
}

const CHAR_OFFSET: u32 = 31;

impl Rolling {
    /// The checksum of a whole window. `b`, the sum of the running `a`,
    /// is `L·Σx − Σi·x + offset·L(L+1)/2`: two plain sums the compiler
    /// vectorizes, several times faster than the running form.
    pub(crate) fn of(data: &[u8]) -> Rolling {
        let (mut sum, mut weighted) = (0u32, 0u32);
        for (i, &x) in data.iter().enumerate() {
            sum = sum.wrapping_add(u32::from(x));
            weighted = weighted.wrapping_add((i as u32).wrapping_mul(u32::from(x)));
        }
        let len = data.len() as u32;
        let a = sum.wrapping_add(CHAR_OFFSET.wrapping_mul(len));
        let tri = (u64::from(len) * (u64::from(len) + 1) / 2) as u32;
        let b = len
            .wrapping_mul(sum)
            .wrapping_sub(weighted)
            .wrapping_add(CHAR_OFFSET.wrapping_mul(tri));
        Rolling { a, b }
    }

    /// Slides a window of `len` bytes one byte on: `out` leaves, `inn`
    /// enters.
    #[inline]
    pub(crate) fn roll(&mut self, out: u8, inn: u8, len: u32) {
        let out = u32::from(out) + CHAR_OFFSET;
        self.a = self
            .a
            .wrapping_sub(out)
            .wrapping_add(u32::from(inn) + CHAR_OFFSET);
        self.b = self
            .b
            .wrapping_sub(len.wrapping_mul(out))
            .wrapping_add(self.a);
    }

    #[inline]
    pub(crate) fn digest(&self) -> u32 {
        (self.a & 0xffff) | (self.b << 16)
    }
}

/// The strong hash of a block.
pub(crate) fn strong(data: &[u8]) -> [u8; STRONG] {
    let full = Sha256::digest(data);
    let mut s = [0u8; STRONG];
    s.copy_from_slice(&full[..STRONG]);
    s
}

/// The first line of a signature.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct SigHeader {
    pub(crate) size: u64,
    pub(crate) block: u64,
    pub(crate) strong: usize,
    pub(crate) blocks: u64,
}

impl SigHeader {
    pub(crate) fn new(size: u64) -> SigHeader {
        let block = block_size(size);
        SigHeader {
            size,
            block,
            strong: STRONG,
            blocks: block_count(size, block),
        }
    }

    /// Refuses a header whose numbers do not fit together.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.strong != STRONG {
            return Err(format!("unknown strong hash length {}", self.strong));
        }
        if self.block == 0 || self.block > 1 << 30 {
            return Err(format!("bad block size {}", self.block));
        }
        if self.blocks != block_count(self.size, self.block) {
            return Err("block count does not match the size".into());
        }
        // 128 TiB at the largest block size: more is no signature of ours.
        if self.blocks > MAX_BLOCKS {
            return Err(format!("{} blocks is too many", self.blocks));
        }
        Ok(())
    }

    pub(crate) fn table_len(&self) -> u64 {
        self.blocks * RECORD as u64
    }
}

/// Computes a signature block by block; the file's bytes are written in.
pub(crate) struct SigWriter<W: Write> {
    block: usize,
    pending: Vec<u8>,
    out: W,
}

impl<W: Write> SigWriter<W> {
    pub(crate) fn new(block: u64, out: W) -> SigWriter<W> {
        SigWriter {
            block: block as usize,
            pending: Vec::new(),
            out,
        }
    }

    fn record(out: &mut W, data: &[u8]) -> io::Result<()> {
        let mut rec = [0u8; RECORD];
        rec[..4].copy_from_slice(&Rolling::of(data).digest().to_be_bytes());
        rec[4..].copy_from_slice(&strong(data));
        out.write_all(&rec)
    }

    /// Writes the last (short) block; gives back the output.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() {
            SigWriter::record(&mut self.out, &self.pending)?;
        }
        Ok(self.out)
    }
}

impl<W: Write> Write for SigWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        if !self.pending.is_empty() {
            let take = (self.block - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.block {
                SigWriter::record(&mut self.out, &self.pending)?;
                self.pending.clear();
            }
        }
        while data.len() >= self.block {
            SigWriter::record(&mut self.out, &data[..self.block])?;
            data = &data[self.block..];
        }
        self.pending.extend_from_slice(data);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A signature ready for matching.
pub(crate) struct Signature {
    pub(crate) size: u64,
    pub(crate) block: u64,
    strong: Vec<[u8; STRONG]>,
    /// (weak, block) of every full block, sorted by weak.
    index: Vec<(u32, u32)>,
    /// A bit per bucket of weak checksums present: most windows miss here.
    filter: Vec<u64>,
    filter_mask: u32,
}

impl Signature {
    /// Builds the matcher from a header and its record table.
    pub(crate) fn new(h: &SigHeader, table: &[u8]) -> Result<Signature, String> {
        h.check()?;
        if table.len() as u64 != h.table_len() || h.blocks > u64::from(u32::MAX) {
            return Err("signature table has the wrong length".into());
        }
        let mut weak: Vec<u32> = Vec::with_capacity(h.blocks as usize);
        let mut strong = Vec::with_capacity(h.blocks as usize);
        for rec in table.chunks_exact(RECORD) {
            weak.push(u32::from_be_bytes(rec[..4].try_into().expect("4 bytes")));
            strong.push(rec[4..].try_into().expect("16 bytes"));
        }
        let full = (h.size / h.block) as usize;
        let mut index: Vec<(u32, u32)> = (0..full).map(|j| (weak[j], j as u32)).collect();
        index.sort_unstable();
        let bits = (full * 16).next_power_of_two().max(1 << 12);
        let mut filter = vec![0u64; bits / 64];
        let filter_mask = (bits - 1) as u32;
        for &(w, _) in &index {
            let k = mix(w) & filter_mask;
            filter[(k / 64) as usize] |= 1 << (k % 64);
        }
        Ok(Signature {
            size: h.size,
            block: h.block,
            strong,
            index,
            filter,
            filter_mask,
        })
    }

    #[inline]
    fn may_have(&self, weak: u32) -> bool {
        let k = mix(weak) & self.filter_mask;
        self.filter[(k / 64) as usize] & (1 << (k % 64)) != 0
    }

    /// The full block with this weak checksum and strong hash, preferring
    /// `expected`.
    fn find(&self, weak: u32, data: &[u8], expected: Option<u32>) -> Option<u32> {
        if !self.may_have(weak) {
            return None;
        }
        let from = self.index.partition_point(|&(w, _)| w < weak);
        let same = self.index[from..].iter().take_while(|&&(w, _)| w == weak);
        let mut hash: Option<[u8; STRONG]> = None;
        let mut found = None;
        for &(_, j) in same {
            let s = *hash.get_or_insert_with(|| strong(data));
            if self.strong[j as usize] == s {
                if Some(j) == expected {
                    return Some(j);
                }
                found.get_or_insert(j);
            }
        }
        found
    }

    fn tail(&self) -> Option<(u32, u64)> {
        let len = self.size % self.block;
        (len > 0).then(|| ((self.size / self.block) as u32, len))
    }
}

fn mix(w: u32) -> u32 {
    w.wrapping_mul(0x9e37_79b1).rotate_left(15)
}

/// The first line of a delta: what it applies to and what it makes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct DeltaHeader {
    pub(crate) bitfog_delta: u32,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) mode: u32,
    pub(crate) mtime: i64,
    pub(crate) base_size: u64,
    pub(crate) base_sha256: String,
}

/// Why an encoder stopped early: the delta would not be smaller than its
/// limit. Carried inside the `io::Error` its writes fail with, and told
/// apart by type (`is_too_big`), never by message.
#[derive(Debug)]
pub(crate) struct TooBig;

impl std::fmt::Display for TooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the delta would not be smaller than its limit")
    }
}

impl std::error::Error for TooBig {}

/// True when `err` is an encoder's `TooBig`.
pub(crate) fn is_too_big(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<TooBig>())
}

/// Writes the delta of the bytes written in against a signature.
/// Output goes to `out`; writes fail with `TooBig` once the delta
/// would pass `limit` bytes.
pub(crate) struct Encoder<'s, W: Write> {
    sig: &'s Signature,
    out: W,
    hasher: Hasher,
    written: u64,
    limit: u64,
    buf: Vec<u8>,
    /// Start of the window in `buf`.
    pos: usize,
    /// Start of the literal bytes not yet written.
    lit: usize,
    /// The checksum of the window at `pos`, when known.
    roll: Option<Rolling>,
    /// The block after the last match.
    expected: Option<u32>,
    /// A copy not yet written, grown while matches are contiguous.
    copy: Option<(u64, u64)>,
    pub(crate) copied: u64,
    pub(crate) literal: u64,
}

impl<'s, W: Write> Encoder<'s, W> {
    pub(crate) fn new(
        sig: &'s Signature,
        header: &DeltaHeader,
        out: W,
        limit: u64,
    ) -> io::Result<Encoder<'s, W>> {
        let mut e = Encoder {
            sig,
            out,
            hasher: Hasher::new(),
            written: 0,
            limit,
            buf: Vec::new(),
            pos: 0,
            lit: 0,
            roll: None,
            expected: None,
            copy: None,
            copied: 0,
            literal: 0,
        };
        let mut line = serde_json::to_vec(header).map_err(io::Error::other)?;
        line.push(b'\n');
        e.emit(&line)?;
        Ok(e)
    }

    fn emit(&mut self, data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(io::Error::other(TooBig));
        }
        self.hasher.update(data);
        self.out.write_all(data)
    }

    fn flush_copy(&mut self) -> io::Result<()> {
        if let Some((off, len)) = self.copy.take() {
            let mut op = [0u8; 17];
            op[0] = b'C';
            op[1..9].copy_from_slice(&off.to_be_bytes());
            op[9..].copy_from_slice(&len.to_be_bytes());
            self.emit(&op)?;
        }
        Ok(())
    }

    fn add_copy(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.copied += len;
        if let Some((o, l)) = &mut self.copy {
            if *o + *l == off {
                *l += len;
                return Ok(());
            }
        }
        self.flush_copy()?;
        self.copy = Some((off, len));
        Ok(())
    }

    /// Writes `buf[lit..to]` as literal operations.
    fn flush_literal(&mut self, to: usize) -> io::Result<()> {
        if to <= self.lit {
            return Ok(());
        }
        self.flush_copy()?;
        let mut at = self.lit;
        while at < to {
            let n = (to - at).min(LITERAL_MAX);
            let mut op = [0u8; 5];
            op[0] = b'L';
            op[1..].copy_from_slice(&(n as u32).to_be_bytes());
            self.emit(&op)?;
            let data = std::mem::take(&mut self.buf);
            let r = self.emit(&data[at..at + n]);
            self.buf = data;
            r?;
            at += n;
        }
        self.literal += (to - self.lit) as u64;
        self.lit = to;
        Ok(())
    }

    /// Matches as far as the buffered bytes allow.
    fn process(&mut self) -> io::Result<()> {
        let b = self.sig.block as usize;
        let full_blocks = (self.sig.size / self.sig.block) as u32;
        while self.pos + b <= self.buf.len() {
            let window = &self.buf[self.pos..self.pos + b];
            let mut hit = None;
            if self.roll.is_none() {
                // After a match, the next block is the likely one: its
                // strong hash alone decides, without a checksum.
                if let Some(j) = self.expected.filter(|&j| j < full_blocks) {
                    if self.sig.strong[j as usize] == strong(window) {
                        hit = Some(j);
                    }
                }
                if hit.is_none() {
                    self.roll = Some(Rolling::of(window));
                }
            }
            if hit.is_none() {
                let weak = self.roll.expect("computed above").digest();
                hit = self.sig.find(weak, window, self.expected);
            }
            if let Some(j) = hit {
                self.flush_literal(self.pos)?;
                self.add_copy(u64::from(j) * self.sig.block, self.sig.block)?;
                self.pos += b;
                self.lit = self.pos;
                self.roll = None;
                self.expected = Some(j + 1);
                continue;
            }
            if self.pos + b == self.buf.len() {
                // The next byte has not arrived yet.
                break;
            }
            let (out, inn) = (self.buf[self.pos], self.buf[self.pos + b]);
            self.roll
                .as_mut()
                .expect("computed above")
                .roll(out, inn, b as u32);
            self.pos += 1;
            if self.pos - self.lit >= LITERAL_MAX {
                self.flush_literal(self.pos)?;
            }
        }
        // Keep only what is still needed.
        let keep = self.lit.min(self.pos);
        if keep > 0 {
            self.buf.drain(..keep);
            self.pos -= keep;
            self.lit -= keep;
        }
        Ok(())
    }

    /// Ends the delta: the rest is literal, except a last short block of
    /// the old file found at the very end. Gives back the output and the
    /// delta's length.
    pub(crate) fn finish(mut self) -> io::Result<(W, u64)> {
        let len = self.buf.len();
        if let Some((j, tail)) = self.sig.tail() {
            let tail = tail as usize;
            if len - self.lit >= tail
                && strong(&self.buf[len - tail..]) == self.sig.strong[j as usize]
            {
                self.flush_literal(len - tail)?;
                self.add_copy(u64::from(j) * self.sig.block, tail as u64)?;
                self.lit = len;
            }
        }
        self.flush_literal(len)?;
        self.flush_copy()?;
        self.hasher.update(b"E");
        let digest = std::mem::take(&mut self.hasher).digest();
        let mut end = [0u8; 33];
        end[0] = b'E';
        end[1..].copy_from_slice(&digest);
        self.written += end.len() as u64;
        if self.written > self.limit {
            return Err(io::Error::other(TooBig));
        }
        self.out.write_all(&end)?;
        Ok((self.out, self.written))
    }
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.process()?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a delta's header line from its first bytes (the reader is left
/// at the first operation); the line's bytes are fed to `hasher`.
pub(crate) fn read_header(r: &mut impl Read, hasher: &mut Hasher) -> io::Result<DeltaHeader> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        r.read_exact(&mut byte)?;
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
        if line.len() > MAX_HEADER {
            return Err(bad("delta header too long"));
        }
    }
    hasher.update(&line);
    let h: DeltaHeader = serde_json::from_slice(&line).map_err(|e| bad(&format!("{e}")))?;
    if h.bitfog_delta != 1 {
        return Err(bad("unknown delta version"));
    }
    if !crate::digest::is_sha256_hex(&h.sha256) || !crate::digest::is_sha256_hex(&h.base_sha256) {
        return Err(bad("delta header without valid hashes"));
    }
    Ok(h)
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad delta: {why}"))
}

/// One operation of a delta, checked against its header.
enum Op {
    Copy { off: u64, len: u64 },
    Literal(u64),
    End,
}

/// Reads a delta's operations after its header: checks each one (inside
/// the old file, within the new size) and, at the end, the checksum and
/// the total. What `Patch` and `verify` share.
struct Ops<R> {
    body: R,
    /// Has seen every byte so far, the header line included.
    hasher: Hasher,
    base_size: u64,
    size: u64,
    /// Output bytes the operations so far make.
    made: u64,
}

impl<R: Read> Ops<R> {
    fn new(h: &DeltaHeader, body: R, hasher: Hasher) -> Ops<R> {
        Ops {
            body,
            hasher,
            base_size: h.base_size,
            size: h.size,
            made: 0,
        }
    }

    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.body.read_exact(buf).map_err(cut_short)?;
        self.hasher.update(buf);
        Ok(())
    }

    /// Counts `len` more output bytes.
    fn grow(&mut self, len: u64) -> io::Result<()> {
        match self.made.checked_add(len) {
            Some(m) if m <= self.size => {
                self.made = m;
                Ok(())
            }
            _ => Err(bad("longer than the header says")),
        }
    }

    fn next(&mut self) -> io::Result<Op> {
        let mut tag = [0u8; 1];
        self.take(&mut tag)?;
        match tag[0] {
            b'C' => {
                let mut n = [0u8; 16];
                self.take(&mut n)?;
                let off = u64::from_be_bytes(n[..8].try_into().expect("8 bytes"));
                let len = u64::from_be_bytes(n[8..].try_into().expect("8 bytes"));
                let inside = off.checked_add(len).is_some_and(|e| e <= self.base_size);
                if !inside || len == 0 {
                    return Err(bad("copy outside the old file"));
                }
                self.grow(len)?;
                Ok(Op::Copy { off, len })
            }
            b'L' => {
                let mut n = [0u8; 4];
                self.take(&mut n)?;
                let len = u64::from(u32::from_be_bytes(n));
                if len == 0 || len > LITERAL_MAX as u64 {
                    return Err(bad("bad literal length"));
                }
                self.grow(len)?;
                Ok(Op::Literal(len))
            }
            b'E' => {
                let mut digest = [0u8; 32];
                self.body.read_exact(&mut digest).map_err(cut_short)?;
                if std::mem::take(&mut self.hasher).digest() != digest {
                    return Err(bad("checksum mismatch (damaged delta)"));
                }
                if self.made != self.size {
                    return Err(bad("output size does not match the header"));
                }
                Ok(Op::End)
            }
            _ => Err(bad("unknown operation")),
        }
    }

    /// Some of a literal's bytes, into `buf`.
    fn literal(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.body.read(buf)?;
        if n == 0 {
            return Err(bad("cut short"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn cut_short(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        bad("cut short")
    } else {
        e
    }
}

/// Where a `Patch` stands within the current operation.
enum At {
    Next,
    Copy { off: u64, left: u64 },
    Literal { left: u64 },
    Done,
}

/// The new file's bytes, made from a delta's operations (read from
/// `body`, after its header) and the old file (`base`). Reads fail with
/// `InvalidData` on a malformed or damaged delta; `Ok(0)` comes only
/// after a valid end, once the output is exactly `size` bytes.
pub(crate) struct Patch<'a, R: Read> {
    ops: Ops<R>,
    base: &'a std::fs::File,
    at: At,
}

impl<'a, R: Read> Patch<'a, R> {
    /// `hasher` has seen the header line.
    pub(crate) fn new(
        h: &DeltaHeader,
        body: R,
        base: &'a std::fs::File,
        hasher: Hasher,
    ) -> Patch<'a, R> {
        Patch {
            ops: Ops::new(h, body, hasher),
            base,
            at: At::Next,
        }
    }
}

impl<R: Read> Read for Patch<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (n, rest) = match self.at {
                At::Done => return Ok(0),
                At::Next => {
                    self.at = match self.ops.next()? {
                        Op::Copy { off, len } => At::Copy { off, left: len },
                        Op::Literal(len) => At::Literal { left: len },
                        Op::End => At::Done,
                    };
                    continue;
                }
                At::Copy { off, left } => {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = self.base.read_at(&mut buf[..want], off)?;
                    if n == 0 {
                        return Err(bad("the old file is shorter than the delta needs"));
                    }
                    let n64 = n as u64;
                    (
                        n,
                        (left > n64).then(|| At::Copy {
                            off: off + n64,
                            left: left - n64,
                        }),
                    )
                }
                At::Literal { left } => {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = self.ops.literal(&mut buf[..want])?;
                    let n64 = n as u64;
                    (n, (left > n64).then(|| At::Literal { left: left - n64 }))
                }
            };
            self.at = rest.unwrap_or(At::Next);
            return Ok(n);
        }
    }
}

/// Checks a whole delta (header, operations, end checksum) without an old
/// file; returns its header.
pub(crate) fn verify(mut r: impl Read) -> io::Result<DeltaHeader> {
    let mut hasher = Hasher::new();
    let h = read_header(&mut r, &mut hasher)?;
    let mut ops = Ops::new(&h, r, hasher);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match ops.next()? {
            Op::Copy { .. } => {}
            Op::Literal(mut left) => {
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    left -= ops.literal(&mut chunk[..k])? as u64;
                }
            }
            Op::End => {
                if ops.body.read(&mut [0u8; 1])? != 0 {
                    return Err(bad("bytes after the end"));
                }
                return Ok(h);
            }
        }
    }
}

/// Files from this size on are signed by default.
pub(crate) const SIGNATURE_MIN: u64 = 64 << 20;

/// A file's record in a signature file: its name and SHA-256 with the
/// server's header, followed in the file by the record table.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct SigRecord {
    pub(crate) name: String,
    pub(crate) sha256: String,
    #[serde(flatten)]
    pub(crate) header: SigHeader,
}

/// The signature file that belongs to a DB: `DB.sig`.
pub(crate) fn sig_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_os_string();
    p.push(".sig");
    PathBuf::from(p)
}

const SIG_FILE_VERSION: u32 = 1;

/// Writes a signature file: a header line
/// `{"bitfog_signatures":1,"source":URL}`, then per file a `SigRecord`
/// line and its table. Written to a temporary file and renamed into
/// place, like the DB.
pub(crate) struct SigFileWriter {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<io::BufWriter<crate::age::Sealed>>,
}

impl SigFileWriter {
    /// With `seal`, encrypted to those recipients, as its DB is.
    pub(crate) fn create(
        db: &Path,
        source: &str,
        seal: Option<&[crate::age::Recipient]>,
    ) -> io::Result<SigFileWriter> {
        let path = sig_path(db);
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut out = io::BufWriter::new(crate::age::Sealed::new(File::create(&tmp)?, seal)?);
        let head = serde_json::json!({ "bitfog_signatures": SIG_FILE_VERSION, "source": source });
        writeln!(out, "{head}")?;
        Ok(SigFileWriter {
            tmp,
            path,
            out: Some(out),
        })
    }

    pub(crate) fn add(&mut self, rec: &SigRecord, table: &[u8]) -> io::Result<()> {
        let out = self.out.as_mut().expect("open until commit");
        serde_json::to_writer(&mut *out, rec).map_err(io::Error::other)?;
        out.write_all(b"\n")?;
        out.write_all(table)
    }

    pub(crate) fn commit(mut self) -> io::Result<()> {
        let out = self.out.take().expect("open until commit");
        out.into_inner()
            .map_err(|e| io::Error::other(e.to_string()))?
            .finish()?
            .sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for SigFileWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The records of a signature file, by name; tables are read on demand.
pub(crate) struct SigIndex {
    file: File,
    at: HashMap<String, (u64, SigRecord)>,
}

impl SigIndex {
    /// Reads the records of `DB.sig`; `Ok(None)` when there is none.
    pub(crate) fn open(db: &Path) -> Result<Option<SigIndex>, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = sig_path(db);
        // Non-blocking, and a regular file only: a FIFO planted beside a
        // receipt in a courier is refused, not waited on.
        let opened = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path);
        let file = match opened {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => crate::age::open_plain(f)
                .map_err(|e| format!("'{}': {}", path.display(), crate::error::describe_io(&e)))?,
            Ok(_) => return Err(format!("'{}': not a regular file", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("'{}': {e}", path.display())),
        };
        let bad = |why: String| format!("'{}': {why}", path.display());
        let mut r = io::BufReader::new(&file);
        let mut line = Vec::new();
        let mut pos = 0u64;
        let next_line = |r: &mut io::BufReader<&File>, line: &mut Vec<u8>| {
            line.clear();
            let n = r
                .by_ref()
                .take(MAX_HEADER as u64)
                .read_until(b'\n', line)
                .map_err(|e| bad(e.to_string()))?;
            Ok::<usize, String>(n)
        };
        pos += next_line(&mut r, &mut line)? as u64;
        let head: serde_json::Value =
            serde_json::from_slice(&line).map_err(|_| bad("not a signature file".into()))?;
        if head.get("bitfog_signatures").and_then(|v| v.as_u64()) != Some(1) {
            return Err(bad("not a signature file of a known version".into()));
        }
        let mut at = HashMap::new();
        loop {
            let n = next_line(&mut r, &mut line)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            let rec: SigRecord = serde_json::from_slice(&line)
                .map_err(|e| bad(format!("bad record at byte {}: {e}", pos - n as u64)))?;
            rec.header
                .check()
                .map_err(|why| bad(format!("'{}': {why}", rec.name)))?;
            let len = rec.header.table_len();
            r.seek_relative(len as i64)
                .map_err(|e| bad(e.to_string()))?;
            at.insert(rec.name.clone(), (pos, rec));
            pos += len;
        }
        let end = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        if pos != end {
            return Err(bad("cut short".into()));
        }
        Ok(Some(SigIndex { file, at }))
    }

    /// The SHA-256 of the signed version of `name` if it is the version
    /// DESTDB lists (size, and SHA-256 when known).
    pub(crate) fn base(&self, name: &str, size: u64, sha256: Option<&str>) -> Option<String> {
        let (_, rec) = self.at.get(name)?;
        let same = rec.header.size == size && sha256.is_none_or(|h| h == rec.sha256);
        same.then(|| rec.sha256.clone())
    }

    /// The signature of `name` if it was made of this version (size, and
    /// SHA-256 when known).
    pub(crate) fn get(
        &self,
        name: &str,
        size: u64,
        sha256: Option<&str>,
    ) -> Option<(String, Signature)> {
        use std::os::unix::fs::FileExt;
        let (offset, rec) = self.at.get(name)?;
        if rec.header.size != size || sha256.is_some_and(|h| h != rec.sha256) {
            return None;
        }
        let mut table = vec![0u8; rec.header.table_len() as usize];
        self.file.read_exact_at(&mut table, *offset).ok()?;
        let sig = Signature::new(&rec.header, &table).ok()?;
        Some((rec.sha256.clone(), sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signature_of(old: &[u8], block: u64) -> Signature {
        let h = SigHeader {
            size: old.len() as u64,
            block,
            strong: STRONG,
            blocks: block_count(old.len() as u64, block),
        };
        let mut w = SigWriter::new(block, Vec::new());
        w.write_all(old).unwrap();
        let table = w.finish().unwrap();
        Signature::new(&h, &table).unwrap()
    }

    fn header(new: &[u8], old: &[u8]) -> DeltaHeader {
        DeltaHeader {
            bitfog_delta: 1,
            name: "f".into(),
            size: new.len() as u64,
            sha256: crate::digest::hash_reader(new).unwrap().0,
            mode: 0o644,
            mtime: 0,
            base_size: old.len() as u64,
            base_sha256: crate::digest::hash_reader(old).unwrap().0,
        }
    }

    /// Encodes in pieces of `step` bytes; returns the delta and the
    /// literal byte count.
    fn delta(old: &[u8], new: &[u8], block: u64, step: usize) -> (Vec<u8>, u64) {
        let sig = signature_of(old, block);
        let mut e = Encoder::new(&sig, &header(new, old), Vec::new(), u64::MAX).unwrap();
        for piece in new.chunks(step.max(1)) {
            e.write_all(piece).unwrap();
        }
        let literal = e.literal;
        let (out, len) = e.finish().unwrap();
        assert_eq!(out.len() as u64, len);
        (out, literal)
    }

    fn apply(old: &[u8], d: &[u8]) -> io::Result<Vec<u8>> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(old).unwrap();
        let mut r = d;
        let mut hasher = Hasher::new();
        let h = read_header(&mut r, &mut hasher)?;
        let mut out = Vec::new();
        Patch::new(&h, r, &f, hasher).read_to_end(&mut out)?;
        Ok(out)
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = (seed << 1) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The running form the closed form must equal.
    fn running(data: &[u8]) -> Rolling {
        let (mut a, mut b) = (0u32, 0u32);
        for &x in data {
            a = a.wrapping_add(u32::from(x) + CHAR_OFFSET);
            b = b.wrapping_add(a);
        }
        Rolling { a, b }
    }

    proptest! {
        #[test]
        fn closed_form_checksum_is_the_running_one(data in prop::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert_eq!(Rolling::of(&data), running(&data));
        }
    }

    #[test]
    fn closed_form_checksum_holds_for_long_windows() {
        // Long enough for every sum to wrap.
        let data = vec![255u8; 9 << 20];
        assert_eq!(Rolling::of(&data), running(&data));
    }

    #[test]
    fn rolling_matches_a_fresh_sum() {
        let data = noise(300, 7);
        let len = 64;
        let mut r = Rolling::of(&data[..len]);
        for i in 0..data.len() - len {
            r.roll(data[i], data[i + len], len as u32);
            assert_eq!(r, Rolling::of(&data[i + 1..i + 1 + len]));
        }
    }

    #[test]
    fn block_sizes_keep_signatures_small() {
        assert_eq!(block_size(0), 8 << 10);
        assert_eq!(block_size(1 << 30), 32 << 10);
        assert_eq!(block_size(100 << 30), 512 << 10);
        for size in [64u64 << 20, (64 << 20) + 1, 1 << 30, 5 << 40] {
            let h = SigHeader::new(size);
            assert!(h.table_len() * 400 <= size, "{size}: {}", h.table_len());
        }
    }

    #[test]
    fn finds_shifted_blocks_and_carries_only_changes() {
        let old = noise(64 * 1024 + 100, 1);
        let mut new = old.clone();
        new.splice(5000..5000, noise(300, 2)); // insertion
        new.drain(40_000..40_500); // deletion
        new[60_000..60_010].copy_from_slice(&[9; 10]); // overwrite
        let (d, literal) = delta(&old, &new, 1024, 777);
        assert_eq!(apply(&old, &d).unwrap(), new);
        // Each change costs its own bytes and at most two blocks.
        assert!(literal <= 300 + 10 + 6 * 1024, "literal {literal}");
        assert!(d.len() < 8 * 1024, "delta {}", d.len());
    }

    #[test]
    fn damaged_or_mismatched_deltas_are_refused() {
        let old = noise(20_000, 3);
        let mut new = old.clone();
        new[100] ^= 1;
        let (d, _) = delta(&old, &new, 1024, 4096);
        assert!(verify(&d[..]).is_ok());
        for at in [d.len() / 2, d.len() - 1, d.len() - 40] {
            let mut bad = d.clone();
            bad[at] ^= 0x40;
            assert!(verify(&bad[..]).is_err(), "flip at {at}");
            assert!(apply(&old, &bad).is_err(), "flip at {at}");
        }
        assert!(verify(&d[..d.len() - 5]).is_err());
        assert!(apply(&old, &d[..d.len() - 5]).is_err());
        // An old file shorter than the delta needs.
        assert!(apply(&old[..10_000], &d).is_err());
    }

    #[test]
    fn a_changed_file_stops_at_the_limit() {
        let old = noise(50_000, 4);
        let new = noise(50_000, 5);
        let sig = signature_of(&old, 1024);
        let mut e = Encoder::new(&sig, &header(&new, &old), Vec::new(), 40_000).unwrap();
        let err = e.write_all(&new).and_then(|_| e.finish().map(drop));
        assert!(is_too_big(&err.unwrap_err()));
    }

    #[test]
    fn the_weak_index_knows_every_full_block() {
        let old = noise(10 * 1024, 6);
        let sig = signature_of(&old, 1024);
        for j in 0..10 {
            let w = &old[j * 1024..(j + 1) * 1024];
            assert_eq!(sig.find(Rolling::of(w).digest(), w, None), Some(j as u32));
        }
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Insert(usize, Vec<u8>),
        Delete(usize, usize),
        Overwrite(usize, Vec<u8>),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..300))
                .prop_map(|(a, v)| Edit::Insert(a, v)),
            (any::<usize>(), 1usize..400).prop_map(|(a, n)| Edit::Delete(a, n)),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..200))
                .prop_map(|(a, v)| Edit::Overwrite(a, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn patch_of_delta_makes_the_new_file(
            size in 0usize..6000,
            seed in any::<u64>(),
            zeros in any::<bool>(),
            edits in prop::collection::vec(edit(), 0..6),
            block in prop::sample::select(vec![16u64, 64, 256, 1000]),
            step in 1usize..3000,
        ) {
            // Runs of zeros make many blocks alike.
            let old = if zeros { vec![0u8; size] } else { noise(size, seed) };
            let mut new = old.clone();
            for e in edits {
                match e {
                    Edit::Insert(a, v) => { let a = a % (new.len() + 1); new.splice(a..a, v); }
                    Edit::Delete(a, n) => {
                        if !new.is_empty() {
                            let a = a % new.len();
                            let b = (a + n).min(new.len());
                            new.drain(a..b);
                        }
                    }
                    Edit::Overwrite(a, v) => {
                        let a = a % (new.len() + 1);
                        let b = (a + v.len()).min(new.len());
                        new[a..b].copy_from_slice(&v[..b - a]);
                    }
                }
            }
            let (d, _) = delta(&old, &new, block, step);
            prop_assert!(verify(&d[..]).is_ok());
            prop_assert_eq!(apply(&old, &d).unwrap(), new);
        }
    }
}
