//! Sparse files: only their data extents travel, holes stay holes.
//!
//! The listing gives a sparse file's allocated bytes (`alloc`); `fetch`
//! asks the server where the data is (`GET PATH?extents`) and downloads
//! only that, writing each extent at its offset; `store` sends only the
//! extents in one framed body (`application/x-bitfog-extents`) and the
//! server writes them at their offsets. The SHA-256 still covers the whole
//! content: holes are hashed as zeros.

use crate::digest::{Hasher, hash_zeros};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// More data extents than this are described as one.
const MAX_EXTENTS: usize = 65536;

/// Holes are hashed as zeros (about 1.5 GB/s a core), so the holes a
/// sparse transfer may declare are bounded by the data it carries: at most
/// `HOLE_BASE` plus `HOLE_RATIO` bytes of hole per byte of data. A request
/// of a few bytes can then never cost hours of hashing. A file sparser
/// than that still travels, as an ordinary file (its zeros on the wire).
pub(crate) const HOLE_BASE: u64 = 1 << 30;
pub(crate) const HOLE_RATIO: u64 = 4096;

/// True when a file of `size` bytes with `data` bytes of data may travel
/// as a sparse file (see `HOLE_BASE`).
pub(crate) fn holes_within_bounds(size: u64, data: u64) -> bool {
    size.saturating_sub(data) <= HOLE_BASE.saturating_add(data.saturating_mul(HOLE_RATIO))
}

/// Where `file`'s data is, as `(start, len)` in order, from SEEK_DATA and
/// SEEK_HOLE. A filesystem that cannot tell (or a file with very many
/// extents) gives one extent covering everything.
pub(crate) fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let whole = || {
        if size > 0 {
            vec![(0, size)]
        } else {
            Vec::new()
        }
    };
    let mut list = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor the borrow keeps open.
        let data = unsafe { crate::sys::lseek(fd, pos as crate::sys::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                return whole();
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { crate::sys::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return whole();
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole <= pos || data >= size {
            break;
        }
        list.push((data, hole - data));
        if list.len() > MAX_EXTENTS {
            return whole();
        }
        pos = hole;
    }
    list
}

/// The SHA-256 of a sparse file's whole content, reading only its data
/// and hashing the holes as zeros (reading a hole costs the kernel a
/// zeroed page per 4 KiB: 8 GiB of holes took 20 s that way, against 5 s
/// of hashing). Returns the hash and the bytes covered.
pub(crate) fn hash_sparse(
    file: &File,
    size: u64,
    cancel: &std::sync::atomic::AtomicBool,
) -> io::Result<(String, u64)> {
    use crate::digest::hash_zeros_until;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; crate::digest::BUF_SIZE];
    let mut pos = 0u64;
    for (start, len) in data_extents(file, size) {
        hash_zeros_until(&mut hasher, start - pos, cancel)?;
        let mut done = 0u64;
        while done < len {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::other("abandoned"));
            }
            let want = ((len - done) as usize).min(buf.len());
            let n = file.read_at(&mut buf[..want], start + done)?;
            if n == 0 {
                return Ok((hasher.hex(), start + done));
            }
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        pos = start + len;
    }
    hash_zeros_until(&mut hasher, size - pos, cancel)?;
    Ok((hasher.hex(), size))
}

/// The bytes a framed extent body takes.
pub(crate) fn body_len(extents: &[(u64, u64)]) -> u64 {
    extents.iter().map(|(_, len)| 16 + len).sum()
}

/// Reads a file's extents as a framed body (START and LEN, 8 bytes each,
/// big-endian, then the bytes), hashing the whole content on the way:
/// holes as zeros. `hashed` ends as (hash, logical bytes covered).
pub(crate) struct ExtentBody {
    file: File,
    extents: Vec<(u64, u64)>,
    next: usize,
    /// Within the current extent: header bytes sent, data bytes sent.
    head_sent: usize,
    data_sent: u64,
    pub(crate) hashed: Arc<Mutex<(Hasher, u64)>>,
}

impl ExtentBody {
    pub(crate) fn new(file: File, extents: Vec<(u64, u64)>) -> ExtentBody {
        ExtentBody {
            file,
            extents,
            next: 0,
            head_sent: 0,
            data_sent: 0,
            hashed: Arc::new(Mutex::new((Hasher::new(), 0))),
        }
    }
}

impl Read for ExtentBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(&(start, len)) = self.extents.get(self.next) else {
            return Ok(0);
        };
        if self.head_sent < 16 {
            let mut head = [0u8; 16];
            head[..8].copy_from_slice(&start.to_be_bytes());
            head[8..].copy_from_slice(&len.to_be_bytes());
            let n = (16 - self.head_sent).min(buf.len());
            buf[..n].copy_from_slice(&head[self.head_sent..self.head_sent + n]);
            self.head_sent += n;
            if self.head_sent == 16 {
                let mut h = self.hashed.lock().expect("hasher");
                let gap = start - h.1;
                hash_zeros(&mut h.0, gap);
                h.1 = start;
            }
            return Ok(n);
        }
        let want = ((len - self.data_sent) as usize).min(buf.len());
        let n = self
            .file
            .read_at(&mut buf[..want], start + self.data_sent)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "courier file shrank while it was sent",
            ));
        }
        {
            let mut h = self.hashed.lock().expect("hasher");
            h.0.update(&buf[..n]);
            h.1 += n as u64;
        }
        self.data_sent += n as u64;
        if self.data_sent == len {
            self.next += 1;
            self.head_sent = 0;
            self.data_sent = 0;
        }
        Ok(n)
    }
}

/// Reads a courier's pack (a sparse file kept as its framed data
/// extents, the body `ExtentBody` makes, on a courier that keeps no holes)
/// as it is, checking its frames and hashing the content they describe,
/// holes as zeros: `hashed` ends as (hash, logical bytes covered). A frame
/// out of order, empty, past `size` or cut short is an `InvalidData`
/// error, and `bad` is set: the copy is damaged.
pub(crate) struct PackBody<R> {
    inner: R,
    size: u64,
    head: [u8; 16],
    head_got: usize,
    /// Data bytes left in the current frame.
    left: u64,
    pub(crate) hashed: Arc<Mutex<(Hasher, u64)>>,
    pub(crate) bad: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the pack was read to its end (its end of file, or its
    /// length when that is known: an HTTP body of that length is not read
    /// past it), whole frames only.
    pub(crate) read_whole: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes read, and the pack's length when known.
    consumed: u64,
    len: Option<u64>,
}

impl<R: Read> PackBody<R> {
    /// A pack of `len` bytes, when that is known (`with_len`).
    pub(crate) fn with_len(inner: R, size: u64, len: u64) -> PackBody<R> {
        PackBody {
            len: Some(len),
            ..PackBody::new(inner, size)
        }
    }

    /// Counts `n` bytes read; at the known length, on a frame boundary,
    /// the pack was read whole.
    fn count(&mut self, n: usize) {
        self.consumed += n as u64;
        if Some(self.consumed) == self.len && self.left == 0 && self.head_got == 0 {
            self.read_whole
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(crate) fn new(inner: R, size: u64) -> PackBody<R> {
        PackBody {
            inner,
            size,
            head: [0; 16],
            head_got: 0,
            left: 0,
            hashed: Arc::new(Mutex::new((Hasher::new(), 0))),
            bad: Arc::default(),
            read_whole: Arc::default(),
            consumed: 0,
            len: None,
        }
    }

    fn damaged(&self, why: &str) -> io::Error {
        self.bad.store(true, std::sync::atomic::Ordering::Relaxed);
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad extent frame: {why}"),
        )
    }
}

impl<R: Read> Read for PackBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let want = (16 - self.head_got).min(buf.len());
            let n = self.inner.read(&mut buf[..want])?;
            if n == 0 {
                if self.head_got == 0 {
                    self.read_whole
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(0);
                }
                return Err(self.damaged("cut short"));
            }
            self.head[self.head_got..self.head_got + n].copy_from_slice(&buf[..n]);
            self.head_got += n;
            if self.head_got == 16 {
                self.head_got = 0;
                let start = u64::from_be_bytes(self.head[..8].try_into().expect("8 bytes"));
                let len = u64::from_be_bytes(self.head[8..].try_into().expect("8 bytes"));
                let at = self.hashed.lock().expect("hasher").1;
                if start < at || len == 0 || start.checked_add(len).is_none_or(|e| e > self.size) {
                    return Err(self.damaged("out of order or past the end"));
                }
                let mut h = self.hashed.lock().expect("hasher");
                hash_zeros(&mut h.0, start - at);
                h.1 = start;
                drop(h);
                self.left = len;
            }
            self.count(n);
            return Ok(n);
        }
        let want = (self.left.min(buf.len() as u64)) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(self.damaged("cut short"));
        }
        {
            let mut h = self.hashed.lock().expect("hasher");
            h.0.update(&buf[..n]);
            h.1 += n as u64;
        }
        self.left -= n as u64;
        self.count(n);
        Ok(n)
    }
}

/// The SHA-256 of the file a pack describes (`PackBody`), `size` bytes.
pub(crate) fn hash_pack(pack: impl Read, size: u64) -> io::Result<String> {
    let mut body = PackBody::new(io::BufReader::with_capacity(1 << 20, pack), size);
    io::copy(&mut body, &mut io::sink())?;
    let (mut h, at) = std::mem::take(&mut *body.hashed.lock().expect("hasher"));
    hash_zeros(&mut h, size - at);
    Ok(h.hex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_data_and_frames_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_at(&[7u8; 5000], 1 << 20).unwrap();
        f.write_at(&[9u8; 100], (6 << 20) + 3).unwrap();
        (&f).flush().unwrap();
        let f = File::open(&path).unwrap();
        let ext = data_extents(&f, 8 << 20);
        // Filesystems round extents to blocks; the data must be inside.
        assert!(!ext.is_empty());
        assert!(
            ext.iter()
                .any(|&(s, l)| s <= 1 << 20 && s + l >= (1 << 20) + 5000)
        );
        assert!(ext.iter().map(|e| e.1).sum::<u64>() < 8 << 20 || ext == [(0, 8 << 20)]);
        let mut body = ExtentBody::new(File::open(&path).unwrap(), ext.clone());
        let hashed = Arc::clone(&body.hashed);
        let mut out = Vec::new();
        body.read_to_end(&mut out).unwrap();
        assert_eq!(out.len() as u64, body_len(&ext));
        let (mut h, at) = std::mem::take(&mut *hashed.lock().unwrap());
        hash_zeros(&mut h, (8 << 20) - at);
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(h.hex(), crate::digest::hash_reader(&whole[..]).unwrap().0);
    }

    #[test]
    fn a_pack_hashes_as_its_file_and_bad_frames_are_damage() {
        let mut pack = Vec::new();
        for (start, data) in [(4096u64, &b"hello"[..]), (1 << 20, &b"world!"[..])] {
            pack.extend_from_slice(&start.to_be_bytes());
            pack.extend_from_slice(&(data.len() as u64).to_be_bytes());
            pack.extend_from_slice(data);
        }
        let size = 3 << 20;
        let mut whole = vec![0u8; size as usize];
        whole[4096..4101].copy_from_slice(b"hello");
        whole[1 << 20..(1 << 20) + 6].copy_from_slice(b"world!");
        let want = crate::digest::hash_reader(&whole[..]).unwrap().0;
        assert_eq!(hash_pack(&pack[..], size).unwrap(), want);
        // Cut, out of order, past the end: each refused.
        assert!(hash_pack(&pack[..pack.len() - 1], size).is_err());
        assert!(hash_pack(&pack[..20], size).is_err());
        let mut swapped = pack[21..].to_vec();
        swapped.extend_from_slice(&pack[..21]);
        assert!(hash_pack(&swapped[..], size).is_err());
        assert!(hash_pack(&pack[..], 4000).is_err());
        // Read whole at its length (an HTTP body is not read past it),
        // and only then.
        let mut whole = PackBody::with_len(&pack[..], size, pack.len() as u64);
        let done = Arc::clone(&whole.read_whole);
        let mut buf = vec![0u8; pack.len() - 1];
        whole.read_exact(&mut buf).unwrap();
        assert!(!done.load(std::sync::atomic::Ordering::Relaxed));
        whole.read_exact(&mut buf[..1]).unwrap();
        assert!(done.load(std::sync::atomic::Ordering::Relaxed));
        let body = PackBody::new(&pack[..20], size);
        let bad = Arc::clone(&body.bad);
        let mut body = body;
        assert!(io::copy(&mut body, &mut io::sink()).is_err());
        assert!(bad.load(std::sync::atomic::Ordering::Relaxed));
    }
}
