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

    /// The digest's 32 bytes.
    pub(crate) fn digest(self) -> [u8; 32] {
        self.0.finalize().into()
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

/// The bytes `N * 2` hex digits spell (either case); `None` for any other
/// text.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// True for exactly 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Runs `f` with this thread's `BUF_SIZE` buffer: a fresh zeroed 256 KiB
/// per small file hashed or received was a measurable part of the time.
fn with_buf<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < BUF_SIZE {
                buf.resize(BUF_SIZE, 0);
            }
            f(&mut buf)
        }
        Err(_) => f(&mut vec![0u8; BUF_SIZE]),
    })
}

/// Hashes everything `reader` yields; returns the digest and the byte count.
pub(crate) fn hash_reader(mut reader: impl Read) -> io::Result<(String, u64)> {
    with_buf(|buf| {
        let mut hasher = Hasher::new();
        let mut total = 0u64;
        loop {
            let n = match reader.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok((hasher.hex(), total))
    })
}

/// A reader that fails once `cancel` is set: hashing for a client that
/// has gone away stops at the next buffer instead of running to the end
/// of a file that may take hours.
pub(crate) struct Cancellable<'a, R> {
    pub(crate) inner: R,
    pub(crate) cancel: &'a std::sync::atomic::AtomicBool,
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::other("abandoned"));
        }
        self.inner.read(buf)
    }
}

/// Copies above this size hash on a second thread while the first reads
/// and writes.
const OVERLAP_MIN: u64 = 8 << 20;

/// Copies `reader` into `writer` while hashing, stopping after `limit`
/// bytes. Returns the bytes copied; the caller compares with what it
/// expected. Errors keep their origin: `CopyError::Read` or `::Write`.
/// Large copies hash on a second thread, overlapped with the I/O.
pub(crate) fn copy_hashing(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    hasher: &mut Hasher,
    limit: u64,
    progress: impl FnMut(u64),
) -> Result<u64, CopyError> {
    copy_to(reader, Out::Here(writer), hasher, limit, progress)
}

/// `copy_hashing`, with a large copy's writes also on a thread of their
/// own: for a writer that costs (one that encrypts), or that the kernel
/// may stall under writeback.
pub(crate) fn copy_hashing_apart(
    reader: &mut dyn Read,
    writer: &mut (dyn Write + Send),
    hasher: &mut Hasher,
    limit: u64,
    progress: impl FnMut(u64),
) -> Result<u64, CopyError> {
    copy_to(reader, Out::Apart(writer), hasher, limit, progress)
}

fn copy_to(
    reader: &mut dyn Read,
    out: Out<'_>,
    hasher: &mut Hasher,
    limit: u64,
    progress: impl FnMut(u64),
) -> Result<u64, CopyError> {
    if limit >= OVERLAP_MIN {
        return copy_hashing_overlapped(reader, out, hasher, limit, progress);
    }
    let writer: &mut dyn Write = match out {
        Out::Here(w) => w,
        Out::Apart(w) => w,
    };
    copy_hashing_small(reader, writer, hasher, limit, progress)
}

/// Where an overlapped copy writes: on the reading thread, or on a thread
/// of its own.
enum Out<'a> {
    Here(&'a mut dyn Write),
    Apart(&'a mut (dyn Write + Send)),
}

fn copy_hashing_small(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    hasher: &mut Hasher,
    limit: u64,
    progress: impl FnMut(u64),
) -> Result<u64, CopyError> {
    with_buf(|buf| {
        let mut progress = progress;
        let mut total = 0u64;
        while total < limit {
            let want = (limit - total).min(BUF_SIZE as u64) as usize;
            let n = read_some(reader, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
            hasher.update(&buf[..n]);
            total += n as u64;
            progress(n as u64);
        }
        Ok(total)
    })
}

fn read_some(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize, CopyError> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map_err(CopyError::Read),
        }
    }
}

/// `copy_hashing` with the hash on its own thread, and with `Out::Apart`
/// the writing on another: this thread fills a buffer and writes it or
/// passes it to the writer, then to the hasher, which hands it back. Six
/// buffers circulate, so no stage waits while another has work.
fn copy_hashing_overlapped(
    reader: &mut dyn Read,
    out: Out<'_>,
    hasher: &mut Hasher,
    limit: u64,
    mut progress: impl FnMut(u64),
) -> Result<u64, CopyError> {
    use std::sync::mpsc;
    const BUFFERS: usize = 6;
    let (read_tx, read_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (written_tx, written_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx
            .send(vec![0u8; BUF_SIZE])
            .expect("room for every buffer");
    }
    let mut h = std::mem::take(hasher);
    let (result, written, h) = std::thread::scope(|s| {
        let hashing = s.spawn(move || {
            for (buf, n) in written_rx {
                h.update(&buf[..n]);
                if free_tx.send(buf).is_err() {
                    break;
                }
            }
            h
        });
        // Only what was written is hashed: a write that fails ends both.
        let (mut here, writing) = match out {
            Out::Here(w) => (Some((w, written_tx)), None),
            Out::Apart(writer) => {
                let writing = s.spawn(move || -> io::Result<()> {
                    for (buf, n) in read_rx {
                        writer.write_all(&buf[..n])?;
                        if written_tx.send((buf, n)).is_err() {
                            break;
                        }
                    }
                    Ok(())
                });
                (None, Some(writing))
            }
        };
        let mut total = 0u64;
        let result = (|| {
            while total < limit {
                let Ok(mut buf) = free_rx.recv() else { break };
                // Fill the buffer (a socket yields a few KiB per read), so
                // the writer and the hasher get large pieces.
                let want = (limit - total).min(BUF_SIZE as u64) as usize;
                let mut n = 0;
                while n < want {
                    let got = read_some(reader, &mut buf[n..want])?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
                if n == 0 {
                    break;
                }
                let sent = match here.as_mut() {
                    Some((w, to_hash)) => {
                        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
                        to_hash.send((buf, n)).is_ok()
                    }
                    None => read_tx.send((buf, n)).is_ok(),
                };
                if !sent {
                    break;
                }
                total += n as u64;
                progress(n as u64);
                if n < want {
                    break;
                }
            }
            Ok(total)
        })();
        drop(read_tx);
        drop(here);
        let written = writing.map_or(Ok(()), |w| w.join().expect("writer thread"));
        (result, written, hashing.join().expect("hasher thread"))
    });
    *hasher = h;
    written.map_err(CopyError::Write)?;
    result
}

/// A file writer that starts the disk write of every `WRITEBACK_STEP`
/// bytes as soon as they are written (`sync_file_range`), so the fsync
/// that makes a large file durable finds little left to do instead of
/// the whole file.
pub(crate) struct Writeback<'a> {
    file: &'a std::fs::File,
    /// Where the range not yet handed to the disk starts.
    flushed: u64,
    written: u64,
}

const WRITEBACK_STEP: u64 = 32 << 20;

impl<'a> Writeback<'a> {
    /// Writes at the file's current position, which is `start`.
    pub(crate) fn new(file: &'a std::fs::File, start: u64) -> Writeback<'a> {
        Writeback {
            file,
            flushed: start,
            written: start,
        }
    }
}

impl Write for Writeback<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let n = (&mut &*self.file).write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed >= WRITEBACK_STEP {
            // SAFETY: a plain syscall on a descriptor the borrow keeps open.
            // Only a hint: errors show up again at fsync.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (self.written - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.flushed = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Feeds `n` zero bytes (a hole) to the hash.
/// `hash_zeros`, stopping early (with an error) once `cancel` is set.
pub(crate) fn hash_zeros_until(
    hasher: &mut Hasher,
    mut n: u64,
    cancel: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
    const STEP: u64 = 64 << 20;
    while n > 0 {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::other("abandoned"));
        }
        let k = n.min(STEP);
        hash_zeros(hasher, k);
        n -= k;
    }
    Ok(())
}

pub(crate) fn hash_zeros(hasher: &mut Hasher, mut n: u64) {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
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

    #[test]
    fn overlapped_copy_matches_and_stops() {
        let data: Vec<u8> = (0..(OVERLAP_MIN as usize * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for apart in [false, true] {
            for limit in [OVERLAP_MIN, data.len() as u64, data.len() as u64 + 10] {
                let mut out = Vec::new();
                let mut h = Hasher::new();
                // A reader that yields odd-sized pieces, like a socket.
                let mut src = io::BufReader::with_capacity(4093, &data[..]);
                let n = match apart {
                    false => copy_hashing(&mut src, &mut out, &mut h, limit, |_| {}),
                    true => copy_hashing_apart(&mut src, &mut out, &mut h, limit, |_| {}),
                }
                .unwrap();
                let want = limit.min(data.len() as u64);
                assert_eq!(n, want);
                assert_eq!(out, &data[..want as usize]);
                assert_eq!(h.hex(), hash_reader(&data[..want as usize]).unwrap().0);
            }
            // A write error comes back as such.
            let mut h = Hasher::new();
            let mut full = [0u8; 1000];
            let (mut src, len) = (&data[..], data.len() as u64);
            let r = match apart {
                false => copy_hashing(&mut src, &mut &mut full[..], &mut h, len, |_| {}),
                true => copy_hashing_apart(&mut src, &mut &mut full[..], &mut h, len, |_| {}),
            };
            assert!(matches!(r, Err(CopyError::Write(_))));
        }
    }
}
