//! The age file format, v1 (<https://age-encryption.org/v1>), with X25519
//! recipients: what `builddb --encrypt-to` writes and what every command
//! reads with `--identity`, so that `age -d -i KEY` opens what bitfog
//! wrote and bitfog opens what `age -e -r RECIPIENT` wrote.
//!
//! A file is a text header that wraps a random 16-byte file key for each
//! recipient (an ephemeral X25519 share and the key sealed with
//! ChaCha20-Poly1305 under a key derived from the shared secret), a MAC
//! of the header, then a 16-byte nonce and the payload in chunks of 64
//! KiB, each sealed with ChaCha20-Poly1305 under a key derived from the
//! file key and the nonce; a chunk's nonce is its number and whether it is
//! the last, so chunks cannot be reordered, dropped or cut short unseen.
//! Built on the RustCrypto primitives (see the README's dependency table
//! for why not the `age` crate).

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use x25519_dalek::{PublicKey, StaticSecret};

/// How every age v1 file begins.
pub(crate) const MAGIC: &[u8] = b"age-encryption.org/v1\n";
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const X25519_INFO: &[u8] = b"age-encryption.org/v1/X25519";
/// A header longer than this, or with more stanzas, is refused unread.
const MAX_HEADER: usize = 64 * 1024;
const MAX_STANZAS: usize = 256;

/// Bytes from the kernel's CSPRNG.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most N - got bytes into our buffer.
        let n = unsafe { libc::getrandom(out[got..].as_mut_ptr().cast(), N - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", io::Error::last_os_error());
        }
    }
    out
}

fn hkdf(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA-256 length");
    out
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

// Base64 as age writes it: the standard alphabet, no padding, canonical.

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// Decodes canonical unpadded base64; anything else is `None`.
pub(crate) fn b64_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.bytes() {
        let v = B64.iter().position(|&x| x == b)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Canonical: the bits left over are zero.
    (acc & ((1 << bits) - 1) == 0).then_some(out)
}

// Bech32 (BIP 173), as age encodes keys.

const BECH32: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";

fn polymod(values: impl Iterator<Item = u8>) -> u32 {
    const GEN: [u32; 5] = [
        0x3b6a_57b2,
        0x2650_8e6d,
        0x1ea1_19fa,
        0x3d42_33dd,
        0x2a14_62b3,
    ];
    let mut chk = 1u32;
    for v in values {
        let top = chk >> 25;
        chk = ((chk & 0x01ff_ffff) << 5) ^ u32::from(v);
        for (i, g) in GEN.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk
}

fn hrp_expand(hrp: &str) -> Vec<u8> {
    let b = hrp.as_bytes();
    b.iter()
        .map(|c| c >> 5)
        .chain(std::iter::once(0))
        .chain(b.iter().map(|c| c & 31))
        .collect()
}

fn to_5bit(data: &[u8]) -> Vec<u8> {
    let (mut acc, mut bits, mut out) = (0u32, 0u32, Vec::new());
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(((acc >> bits) & 31) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (5 - bits)) & 31) as u8);
    }
    out
}

fn from_5bit(data: &[u8]) -> Option<Vec<u8>> {
    let (mut acc, mut bits, mut out) = (0u32, 0u32, Vec::new());
    for &v in data {
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (bits < 5 && acc & ((1 << bits) - 1) == 0).then_some(out)
}

/// `hrp` (lower case) and `data` as Bech32, in lower case.
fn bech32_encode(hrp: &str, data: &[u8]) -> String {
    let d = to_5bit(data);
    let chk = polymod(
        hrp_expand(hrp)
            .into_iter()
            .chain(d.iter().copied())
            .chain([0; 6]),
    ) ^ 1;
    let mut s = format!("{hrp}1");
    s.extend(d.iter().map(|&v| BECH32[v as usize] as char));
    s.extend((0..6).map(|i| BECH32[((chk >> (5 * (5 - i))) & 31) as usize] as char));
    s
}

/// The lower-case HRP and the data of a Bech32 string (all upper or all
/// lower case).
fn bech32_decode(s: &str) -> Option<(String, Vec<u8>)> {
    if s.chars().any(|c| c.is_ascii_lowercase()) && s.chars().any(|c| c.is_ascii_uppercase()) {
        return None;
    }
    let s = s.to_ascii_lowercase();
    let (hrp, rest) = s.rsplit_once('1')?;
    if hrp.is_empty() || rest.len() < 6 {
        return None;
    }
    let vals: Vec<u8> = rest
        .bytes()
        .map(|c| BECH32.iter().position(|&x| x == c).map(|p| p as u8))
        .collect::<Option<_>>()?;
    if polymod(hrp_expand(hrp).into_iter().chain(vals.iter().copied())) != 1 {
        return None;
    }
    Some((hrp.to_string(), from_5bit(&vals[..vals.len() - 6])?))
}

/// An X25519 identity: what decrypts.
#[derive(Clone)]
pub(crate) struct Identity(StaticSecret);

/// An X25519 recipient: what encrypts, public.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Recipient(PublicKey);

impl Identity {
    pub(crate) fn generate() -> Identity {
        Identity(StaticSecret::from(random::<32>()))
    }

    /// An `AGE-SECRET-KEY-1...` string.
    pub(crate) fn parse(s: &str) -> Option<Identity> {
        let (hrp, data) = bech32_decode(s)?;
        let key: [u8; 32] = data.try_into().ok()?;
        (hrp == "age-secret-key-").then(|| Identity(StaticSecret::from(key)))
    }

    pub(crate) fn encode(&self) -> String {
        bech32_encode("age-secret-key-", self.0.as_bytes()).to_ascii_uppercase()
    }

    pub(crate) fn recipient(&self) -> Recipient {
        Recipient(PublicKey::from(&self.0))
    }
}

impl Recipient {
    /// An `age1...` string.
    pub(crate) fn parse(s: &str) -> Option<Recipient> {
        let (hrp, data) = bech32_decode(s)?;
        let key: [u8; 32] = data.try_into().ok()?;
        (hrp == "age").then(|| Recipient(PublicKey::from(key)))
    }

    pub(crate) fn encode(&self) -> String {
        bech32_encode("age", self.0.as_bytes())
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

/// The keys of a file, one a line; blank lines and `#` comments are
/// skipped (the form `age-keygen` and `bitfog keygen` write). `parse`
/// reads one key; a line it cannot read is an error naming the line.
fn read_keys<T>(
    path: &Path,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("'{shown}': {}", crate::error::describe_io(&e)))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(parse(line).ok_or_else(|| format!("'{shown}' line {}: not {what}", i + 1))?);
    }
    if keys.is_empty() {
        return Err(format!("'{shown}': no {what} in it"));
    }
    Ok(keys)
}

/// The identities of an identity file (`AGE-SECRET-KEY-1...` lines).
pub(crate) fn read_identities(path: &Path) -> Result<Vec<Identity>, String> {
    read_keys(
        path,
        "an age identity (AGE-SECRET-KEY-1...)",
        Identity::parse,
    )
}

/// The recipients of a recipients file (`age1...` lines).
pub(crate) fn read_recipients(path: &Path) -> Result<Vec<Recipient>, String> {
    read_keys(path, "an age recipient (age1...)", Recipient::parse)
}

/// The header of a file for `recipients` (each wrapping `file_key`), with
/// its MAC line.
fn header(file_key: &[u8; 16], recipients: &[Recipient]) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    for r in recipients {
        let eph = StaticSecret::from(random::<32>());
        let share = PublicKey::from(&eph);
        let shared = eph.diffie_hellman(&r.0);
        let mut salt = share.as_bytes().to_vec();
        salt.extend_from_slice(r.0.as_bytes());
        let wrap = hkdf(shared.as_bytes(), &salt, X25519_INFO);
        let mut body = file_key.to_vec();
        let tag = ChaCha20Poly1305::new(Key::from_slice(&wrap))
            .encrypt_in_place_detached(Nonce::from_slice(&[0; 12]), b"", &mut body)
            .expect("a 16-byte key seals");
        body.extend_from_slice(&tag);
        h.extend_from_slice(format!("-> X25519 {}\n", b64_encode(share.as_bytes())).as_bytes());
        let text = b64_encode(&body);
        // Wrapped at 64 columns; the last line is shorter (here 43).
        for line in text.as_bytes().chunks(64) {
            h.extend_from_slice(line);
            h.push(b'\n');
        }
        if text.len() % 64 == 0 {
            h.push(b'\n');
        }
    }
    h.extend_from_slice(b"---");
    let mac = header_mac(file_key, &h);
    h.extend_from_slice(format!(" {}\n", b64_encode(&mac)).as_bytes());
    h
}

fn header_mac(file_key: &[u8; 16], header_to_dashes: &[u8]) -> [u8; 32] {
    let key = hkdf(file_key, b"", b"header");
    let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&key).expect("any key length");
    m.update(header_to_dashes);
    m.finalize().into_bytes().into()
}

fn payload_cipher(file_key: &[u8; 16], nonce: &[u8; 16]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(Key::from_slice(&hkdf(file_key, nonce, b"payload")))
}

fn chunk_nonce(counter: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Bytes an age file of `plain` bytes takes after a header of `header`
/// bytes: the nonce, the data, and a tag for each 64 KiB chunk (at
/// least one).
pub(crate) fn sealed_len(header: u64, plain: u64) -> u64 {
    header + 16 + plain + plain.div_ceil(CHUNK as u64).max(1) * TAG as u64
}

/// The plain length of an age file of `total` bytes whose header takes
/// `header`; `None` when no plain length gives that size.
pub(crate) fn plain_len(header: u64, total: u64) -> Option<u64> {
    let payload = total.checked_sub(header + 16)?;
    let chunks = payload.div_ceil((CHUNK + TAG) as u64).max(1);
    let plain = payload.checked_sub(chunks * TAG as u64)?;
    (sealed_len(header, plain) == total).then_some(plain)
}

/// The length of the header `Writer` writes for `recipients`.
pub(crate) fn header_len(recipients: &[Recipient]) -> u64 {
    header(&[0; 16], recipients).len() as u64
}

/// Encrypts what is written to it into `out` as an age file for the
/// recipients; `finish` seals the last chunk (without it the file is cut
/// short, and every reader refuses it).
pub(crate) struct Writer<W: Write> {
    out: W,
    cipher: ChaCha20Poly1305,
    counter: u64,
    /// Sealed chunks, then the plain text of the chunk being filled (from
    /// `start`): sealed in place, and written a few chunks at a time, so
    /// that a buffered writer below passes them on without a copy.
    buf: Vec<u8>,
    start: usize,
}

/// Sealed chunks `Writer` gathers before it writes them.
const WRITE_CHUNKS: usize = 4;

impl<W: Write> Writer<W> {
    pub(crate) fn new(mut out: W, recipients: &[Recipient]) -> io::Result<Writer<W>> {
        assert!(!recipients.is_empty(), "an age file needs a recipient");
        let file_key = random::<16>();
        let nonce = random::<16>();
        out.write_all(&header(&file_key, recipients))?;
        out.write_all(&nonce)?;
        Ok(Writer {
            out,
            cipher: payload_cipher(&file_key, &nonce),
            counter: 0,
            buf: Vec::with_capacity(WRITE_CHUNKS * (CHUNK + TAG)),
            start: 0,
        })
    }

    fn seal(&mut self, last: bool) -> io::Result<()> {
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&chunk_nonce(self.counter, last)),
                b"",
                &mut self.buf[self.start..],
            )
            .map_err(|_| io::Error::other("chunk too long to seal"))?;
        self.buf.extend_from_slice(&tag);
        self.counter += 1;
        if last || self.buf.len() >= WRITE_CHUNKS * (CHUNK + TAG) {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        self.start = self.buf.len();
        Ok(())
    }

    /// Seals the last chunk and gives back the output.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.seal(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more follows: the last chunk
        // is marked as such, and only `finish` knows which it is.
        if self.buf.len() - self.start == CHUNK {
            self.seal(false)?;
        }
        let n = data.len().min(CHUNK - (self.buf.len() - self.start));
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    /// Writes the chunks sealed so far (the one being filled waits).
    fn flush(&mut self) -> io::Result<()> {
        if self.start > 0 {
            self.out.write_all(&self.buf[..self.start])?;
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.out.flush()
    }
}

/// Decrypts an age file as it is read: every chunk is authenticated
/// before a byte of it is given out, and a file cut short, extended,
/// reordered or changed anywhere is an `InvalidData` error.
pub(crate) struct Reader<R: Read> {
    inner: BufReader<R>,
    cipher: ChaCha20Poly1305,
    counter: u64,
    plain: Vec<u8>,
    at: usize,
    done: bool,
    header_len: u64,
}

impl<R: Read> Reader<R> {
    /// Reads the header and unwraps the file key with one of `identities`.
    pub(crate) fn new(inner: R, identities: &[Identity]) -> io::Result<Reader<R>> {
        let mut inner = BufReader::with_capacity(CHUNK + TAG + 1, inner);
        let (file_key, header_len) = read_header(&mut inner, identities)?;
        let mut nonce = [0u8; 16];
        inner
            .read_exact(&mut nonce)
            .map_err(|_| invalid("cut short after its header"))?;
        Ok(Reader {
            inner,
            cipher: payload_cipher(&file_key, &nonce),
            counter: 0,
            plain: Vec::with_capacity(CHUNK + TAG),
            at: 0,
            done: false,
            header_len,
        })
    }

    /// The plain length of this file, were it `total` bytes long in all
    /// (`None` when no plain length makes that size: it is damaged).
    pub(crate) fn plain_len(&self, total: u64) -> Option<u64> {
        plain_len(self.header_len, total)
    }

    /// Decrypts the next chunk into `plain`.
    fn next_chunk(&mut self) -> io::Result<()> {
        self.plain.clear();
        self.at = 0;
        let mut got = 0;
        self.plain.resize(CHUNK + TAG, 0);
        while got < CHUNK + TAG {
            match self.inner.read(&mut self.plain[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.plain.truncate(got);
        // A full chunk is the last when nothing follows it.
        let last = got < CHUNK + TAG || self.inner.fill_buf()?.is_empty();
        if got < TAG || (last && got == TAG && self.counter > 0) {
            return Err(invalid("cut short (its last chunk is missing)"));
        }
        let (data, tag) = self.plain.split_at_mut(got - TAG);
        let tag = Tag::clone_from_slice(tag);
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&chunk_nonce(self.counter, last)),
                b"",
                data,
                &tag,
            )
            .map_err(|_| invalid(format!("damaged at chunk {}", self.counter)))?;
        self.plain.truncate(got - TAG);
        self.counter += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = buf.len().min(self.plain.len() - self.at);
        buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// One header line, without its newline; the header so far grows by it.
fn header_line(r: &mut impl BufRead, seen: &mut Vec<u8>) -> io::Result<String> {
    let start = seen.len();
    let n = r
        .take((MAX_HEADER - start.min(MAX_HEADER)) as u64)
        .read_until(b'\n', seen)?;
    if n == 0 || seen.last() != Some(&b'\n') {
        return Err(invalid(
            "not an age file (its header is cut short or too long)",
        ));
    }
    let line = std::str::from_utf8(&seen[start..seen.len() - 1])
        .map_err(|_| invalid("not an age file (its header is not text)"))?;
    Ok(line.to_string())
}

/// Parses a v1 header and returns the file key one of `identities`
/// unwraps, after checking the header's MAC.
fn read_header(r: &mut impl BufRead, identities: &[Identity]) -> io::Result<([u8; 16], u64)> {
    let mut seen = Vec::new();
    if header_line(r, &mut seen)? != "age-encryption.org/v1" {
        return Err(invalid("not an age v1 file"));
    }
    let mut stanzas: Vec<(Vec<String>, Vec<u8>)> = Vec::new();
    let mac = loop {
        let line = header_line(r, &mut seen)?;
        if let Some(mac) = line.strip_prefix("--- ") {
            break mac.to_string();
        }
        let Some(args) = line.strip_prefix("-> ") else {
            return Err(invalid("not an age file (a header line it cannot read)"));
        };
        if stanzas.len() == MAX_STANZAS {
            return Err(invalid("too many recipients in its header"));
        }
        let args: Vec<String> = args.split(' ').map(str::to_string).collect();
        if args.iter().any(|a| a.is_empty()) {
            return Err(invalid("an empty stanza argument in its header"));
        }
        let mut body = String::new();
        loop {
            let l = header_line(r, &mut seen)?;
            if l.len() > 64 {
                return Err(invalid("a stanza line longer than 64 columns"));
            }
            body.push_str(&l);
            if l.len() < 64 {
                break;
            }
        }
        let body = b64_decode(&body).ok_or_else(|| invalid("a stanza body that is not base64"))?;
        stanzas.push((args, body));
    };
    // The MAC covers the header up to and including "---".
    let dashes = seen.len() - mac.len() - 2;
    let mac = b64_decode(&mac)
        .filter(|m| m.len() == 32)
        .ok_or_else(|| invalid("a header MAC that is not 32 bytes of base64"))?;
    let mut tried = 0;
    for (args, body) in &stanzas {
        if args.first().map(String::as_str) != Some("X25519") {
            continue;
        }
        let share: [u8; 32] = match (args.len(), args.get(1).and_then(|a| b64_decode(a))) {
            (2, Some(s)) if s.len() == 32 && body.len() == 32 => s.try_into().expect("32 bytes"),
            _ => return Err(invalid("a malformed X25519 stanza")),
        };
        for id in identities {
            tried += 1;
            let shared = id.0.diffie_hellman(&PublicKey::from(share));
            if shared.as_bytes() == &[0u8; 32] {
                return Err(invalid("an X25519 stanza with a low-order share"));
            }
            let mut salt = share.to_vec();
            salt.extend_from_slice(id.recipient().0.as_bytes());
            let wrap = hkdf(shared.as_bytes(), &salt, X25519_INFO);
            let mut key = body[..16].to_vec();
            let opened = ChaCha20Poly1305::new(Key::from_slice(&wrap)).decrypt_in_place_detached(
                Nonce::from_slice(&[0; 12]),
                b"",
                &mut key,
                Tag::from_slice(&body[16..]),
            );
            if opened.is_ok() {
                let file_key: [u8; 16] = key.try_into().expect("16 bytes");
                if header_mac(&file_key, &seen[..dashes]) != mac[..] {
                    return Err(invalid("its header was changed (the MAC does not match)"));
                }
                return Ok((file_key, seen.len() as u64));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        if tried == 0 {
            "encrypted to no X25519 recipient".to_string()
        } else {
            "encrypted to other recipients than the identity given (wrong --identity?)".to_string()
        },
    ))
}

/// The identities `--identity` gave, for every encrypted file a command
/// reads, and the files they came from (for messages).
static IDENTITIES: OnceLock<(Vec<Identity>, Vec<PathBuf>)> = OnceLock::new();

/// Reads the identity files once for the whole run.
pub(crate) fn set_identities(files: &[PathBuf]) -> Result<(), String> {
    let mut ids = Vec::new();
    for f in files {
        ids.extend(read_identities(f)?);
    }
    let _ = IDENTITIES.set((ids, files.to_vec()));
    Ok(())
}

/// The identities `--identity` gave (none when it was not given).
pub(crate) fn identities() -> &'static [Identity] {
    IDENTITIES.get().map_or(&[], |(ids, _)| ids.as_slice())
}

/// True when `file` starts as an age file does.
pub(crate) fn is_age(file: &File) -> bool {
    let mut head = [0u8; MAGIC.len()];
    file.read_exact_at(&mut head, 0).is_ok() && head == MAGIC
}

/// Decrypted copies of the encrypted inputs of this run, by the identity
/// of the encrypted file.
static PLAIN: OnceLock<Mutex<Vec<Decrypted>>> = OnceLock::new();

/// An encrypted input (by its file identity) and its plain text.
type Decrypted = ([i128; 4], File);

/// `file` to read as plain text: itself when it is not encrypted; else its
/// plain text, decrypted with `--identity` into an unnamed file of the
/// temporary directory (never beside it) and reopened for each reader.
/// A missing or wrong identity, or a damaged file, is an error that says
/// so.
pub(crate) fn open_plain(file: File) -> io::Result<File> {
    if !is_age(&file) {
        return Ok(file);
    }
    let meta = file.metadata()?;
    let id = crate::beneath::identity(&meta);
    let cache = PLAIN.get_or_init(Mutex::default);
    let mut cache = cache.lock().expect("decrypted inputs");
    if let Some((_, f)) = cache.iter().find(|(i, _)| *i == id) {
        return reopen(f);
    }
    let Some((ids, _)) = IDENTITIES.get().filter(|(ids, _)| !ids.is_empty()) else {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "encrypted (age); give --identity FILE",
        ));
    };
    let mut plain = crate::beneath::anonymous_file(&std::env::temp_dir())?;
    let mut reader = Reader::new(&file, ids)?;
    io::copy(&mut reader, &mut plain)?;
    plain.rewind()?;
    let out = reopen(&plain)?;
    cache.push((id, plain));
    Ok(out)
}

/// A second open file description of `f` (its own offset).
fn reopen(f: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Where a DB is written: as it is, or sealed for recipients.
pub(crate) enum Sealed {
    Plain(File),
    Age(Writer<File>),
}

impl Sealed {
    pub(crate) fn new(file: File, recipients: Option<&[Recipient]>) -> io::Result<Sealed> {
        Ok(match recipients {
            Some(r) => Sealed::Age(Writer::new(file, r)?),
            None => Sealed::Plain(file),
        })
    }

    /// Ends the file (the last chunk sealed) and gives it back.
    pub(crate) fn finish(self) -> io::Result<File> {
        match self {
            Sealed::Plain(f) => Ok(f),
            Sealed::Age(w) => w.finish(),
        }
    }
}

impl Write for Sealed {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealed::Plain(f) => f.write(data),
            Sealed::Age(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealed::Plain(f) => f.flush(),
            Sealed::Age(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_spec_s_key_pair() {
        // From age-encryption.org/v1, "The X25519 recipient type".
        let id = Identity::parse(
            "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX",
        )
        .unwrap();
        assert_eq!(
            id.recipient().encode(),
            "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
        );
        assert_eq!(
            id.encode(),
            "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
        );
        assert!(
            Identity::parse(
                "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEY"
            )
            .is_none()
        );
        assert!(
            Recipient::parse("age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwJ")
                .is_none()
        );
        let r = id.recipient();
        assert_eq!(Recipient::parse(&r.encode()), Some(r));
    }

    #[test]
    fn base64_is_canonical() {
        for n in 0..40 {
            let d: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64_decode(&b64_encode(&d)).unwrap(), d);
        }
        assert_eq!(b64_encode(b"\xff"), "/w");
        assert!(b64_decode("/x").is_none(), "non-zero padding bits");
        assert!(b64_decode("/w==").is_none());
        assert!(b64_decode("A").is_none());
    }

    fn seal(data: &[u8], to: &[Recipient]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), to).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    fn open(file: &[u8], ids: &[Identity]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Reader::new(file, ids)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn wrong_identity_and_changed_header_are_refused() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let file = seal(b"secret", &[a.recipient()]);
        assert_eq!(
            open(&file, &[b, Identity::generate()]).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(open(&file, &[a]).unwrap(), b"secret");
        let two = seal(
            b"both",
            &[
                Identity::generate().recipient(),
                Identity::generate().recipient(),
            ],
        );
        assert!(two.starts_with(MAGIC));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any length, across chunk edges, comes back; any byte changed,
        /// any end cut off, anything appended is refused.
        #[test]
        fn round_trip_and_every_change_is_refused(
            len in prop_oneof![0usize..200, (CHUNK - 2)..(CHUNK + 2), (2 * CHUNK - 1)..(2 * CHUNK + 1)],
            flip in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let id = Identity::generate();
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let file = seal(&data, &[id.recipient()]);
            prop_assert_eq!(open(&file, std::slice::from_ref(&id)).unwrap(), data);
            let mut bad = file.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 0x20;
            prop_assert!(open(&bad, std::slice::from_ref(&id)).is_err(), "byte {} of {}", i, file.len());
            let short = &file[..cut.index(file.len())];
            prop_assert!(open(short, std::slice::from_ref(&id)).is_err());
            let mut long = file.clone();
            long.push(0);
            prop_assert!(open(&long, &[id]).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Written in any pieces, flushed anywhere between them, a file
        /// reads back whole, and its length is what `sealed_len` says
        /// (and `plain_len` inverts it).
        #[test]
        fn any_pieces_and_flushes_give_the_same_file(
            pieces in prop::collection::vec((0usize..100_000, any::<bool>()), 0..12),
        ) {
            let id = Identity::generate();
            let total: usize = pieces.iter().map(|p| p.0).sum();
            let data: Vec<u8> = (0..total).map(|i| (i * 13 % 251) as u8).collect();
            let mut w = Writer::new(Vec::new(), &[id.recipient()]).unwrap();
            let mut at = 0;
            for (n, flush) in pieces {
                w.write_all(&data[at..at + n]).unwrap();
                if flush {
                    w.flush().unwrap();
                }
                at += n;
            }
            let file = w.finish().unwrap();
            let header = header_len(&[id.recipient()]);
            prop_assert_eq!(file.len() as u64, sealed_len(header, total as u64));
            prop_assert_eq!(plain_len(header, file.len() as u64), Some(total as u64));
            prop_assert_eq!(open(&file, &[id]).unwrap(), data);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The fuzz target's property on short inputs, real age files
        /// (sealed for the fuzz identity, then changed) among them.
        #[test]
        fn the_fuzz_property_holds(garbage in prop::collection::vec(any::<u8>(), 0..300), flip in any::<u16>()) {
            crate::fuzzing::age(&garbage);
            let id = Identity::parse(
                "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX",
            ).unwrap();
            let mut file = seal(&garbage, &[id.recipient()]);
            crate::fuzzing::age(&file);
            let i = flip as usize % file.len();
            file[i] ^= 0x80;
            crate::fuzzing::age(&file);
        }
    }

    /// Throughput, by hand: `cargo test --release --lib measure_age_speed --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, by hand"]
    fn measure_age_speed() {
        let id = Identity::generate();
        let block = vec![7u8; 1 << 20];
        let total = 1024usize;
        let t = std::time::Instant::now();
        let mut w = Writer::new(io::sink(), &[id.recipient()]).unwrap();
        for _ in 0..total {
            w.write_all(&block).unwrap();
        }
        w.finish().unwrap();
        let enc = t.elapsed().as_secs_f64();
        let sealed = seal(&vec![7u8; 256 << 20], &[id.recipient()]);
        let t = std::time::Instant::now();
        let mut r = Reader::new(&sealed[..], &[id]).unwrap();
        let n = io::copy(&mut r, &mut io::sink()).unwrap();
        let dec = t.elapsed().as_secs_f64();
        eprintln!(
            "encrypt {:.0} MB/s, decrypt {:.0} MB/s",
            (total << 20) as f64 / enc / 1e6,
            n as f64 / dec / 1e6
        );
    }
}
