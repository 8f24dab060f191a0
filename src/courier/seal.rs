//! Sealed couriers: a courier that is safe to lose.
//!
//! `fetch --encrypt-to RECIPIENT` seals a courier. From then on every
//! file bitfog writes into it is encrypted and authenticated, and nothing
//! in it names a carried file:
//!
//! - carried files (and ranges, packs, deltas) are age files for the
//!   recipients, each under a random name in `.bitfog/names/`;
//! - the records that map those names to paths are encrypted too: the
//!   state files (source manifest, copy instructions, range records, the
//!   destination snapshot, the receipt) are age files, and each line of
//!   the append-only `carried.jsonl` is sealed on its own with the
//!   courier's state key (ChaCha20-Poly1305, random nonce), so a line can
//!   still be appended and a torn last line still fails alone;
//! - the state key and the recipients are in `.bitfog/sealed.age`, an age
//!   file for the recipients and the courier's *readers*; `sealed.json`
//!   says only that the courier is sealed and its random id.
//!
//! The source needs no secret of the user's: when `fetch` has no
//! `--identity`, it makes a key of its own for the courier (the keeper,
//! kept at the source outside the courier, see `keeper_path`) that can
//! read the state files and never the carried files, so that a rerun after
//! kill -9 knows what the courier holds.

use crate::age::{self, Identity, Recipient};
use crate::beneath::Dir;
use crate::digest::{hex, unhex};
use crate::error::{Error, Result, describe_io};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Says that a courier is sealed, and its id (plain JSON).
pub(crate) const MARKER: &str = "sealed.json";
/// The courier's state key and recipients (an age file for its readers).
pub(crate) const KEYS: &str = "sealed.age";

#[derive(Serialize, Deserialize)]
struct Marker {
    bitfog_sealed: u32,
    courier: String,
}

#[derive(Serialize, Deserialize)]
struct Keys {
    courier: String,
    /// The state key, 64 hex digits.
    key: String,
    /// Who carried files are encrypted to.
    recipients: Vec<String>,
    /// Who state files are encrypted to: the recipients, and the keeper
    /// or the identities `fetch` was given.
    readers: Vec<String>,
    /// Whether `fetch` had an identity of the recipients: the source can
    /// read what is encrypted to them (a receipt).
    source_reads: bool,
}

/// The keys of a sealed courier, unsealed for this run.
pub(crate) struct Seal {
    key: [u8; 32],
    lines: ChaCha20Poly1305,
    pub(crate) recipients: Vec<Recipient>,
    pub(crate) readers: Vec<Recipient>,
    identities: Vec<Identity>,
    /// The recipients the keeper key file kept at this site says the
    /// courier was sealed for (the keeper vouches for them).
    kept_recipients: Option<Vec<Recipient>>,
    pub(crate) source_reads: bool,
    /// The length of a carried file's age header.
    object_header: u64,
}

/// Whether this run may unseal with a keeper key (`fetch` and its dry
/// runs: the source's side).
static KEEPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets this run use the keeper keys kept at this site.
pub(crate) fn allow_keeper() {
    KEEPER.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn keeper_allowed() -> bool {
    KEEPER.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the keeper keys of the couriers this user sealed without an
/// identity live: `$BITFOG_STATE_DIR`, else `$XDG_STATE_HOME/bitfog`, else
/// `~/.local/state/bitfog`; one file `couriers/ID.key` each (an age
/// identity file, mode 0600).
pub(crate) fn keeper_path(id: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("BITFOG_STATE_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d).join("bitfog"),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".local/state/bitfog"),
        },
    };
    Some(base.join("couriers").join(format!("{id}.key")))
}

fn keep_keeper(id: &str, key: &Identity, recipients: &[Recipient]) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = keeper_path(id).ok_or_else(|| {
        Error::usage("no HOME to keep the courier's key in; set BITFOG_STATE_DIR")
    })?;
    let dir = path.parent().expect("a file in a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("'{}'", dir.display()), &e))?;
    let text = format!(
        "# bitfog keeper of courier {id}: reads its state, never its files\n# public key: {}\n# recipients: {}\n{}\n",
        key.recipient(),
        recipients
            .iter()
            .map(Recipient::encode)
            .collect::<Vec<_>>()
            .join(" "),
        key.encode()
    );
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    })();
    written.map_err(|e| Error::io(format!("'{}'", path.display()), &e))?;
    Ok(path)
}

/// The courier's id when `state` says it is sealed. A marker that does
/// not parse is an error: a sealed courier is never taken for a plain one.
pub(crate) fn marker(state: &Dir) -> io::Result<Option<String>> {
    let Some(f) = state.open_file(MARKER.as_bytes())? else {
        // Its key file without it: the marker was lost, not the seal.
        if state.stat(KEYS.as_bytes())?.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an encrypted courier whose {MARKER} is missing"),
            ));
        }
        return Ok(None);
    };
    let mut text = Vec::new();
    f.take(4096).read_to_end(&mut text)?;
    match serde_json::from_slice::<Marker>(&text) {
        Ok(m) if m.bitfog_sealed == 1 && unhex::<16>(&m.courier).is_some() => Ok(Some(m.courier)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{MARKER} is damaged"),
        )),
    }
}

impl Seal {
    fn from_keys(keys: Keys, identities: Vec<Identity>) -> Option<Seal> {
        let key = unhex::<32>(&keys.key)?;
        let parse = |v: &[String]| {
            v.iter()
                .map(|r| Recipient::parse(r))
                .collect::<Option<Vec<_>>>()
        };
        let recipients = parse(&keys.recipients).filter(|r| !r.is_empty())?;
        let readers = parse(&keys.readers).filter(|r| !r.is_empty())?;
        Some(Seal {
            lines: ChaCha20Poly1305::new(Key::from_slice(&derive(&key, "lines"))),
            key,
            object_header: age::header_len(&recipients),
            recipients,
            readers,
            identities,
            source_reads: keys.source_reads,
            kept_recipients: None,
        })
    }

    /// Unseals the courier whose `.bitfog/` is `state` (its marker says
    /// it is sealed, with `id`): with `--identity`, and for `fetch`
    /// (`keeper`) also with the key it kept at the source. A missing or
    /// wrong identity is a usage error (exit 2): nothing is done.
    pub(crate) fn open(state: &Dir, id: &str, keeper: bool) -> Result<Seal> {
        let courier = state
            .path
            .parent()
            .unwrap_or(&state.path)
            .display()
            .to_string();
        let mut ids: Vec<Identity> = age::identities().to_vec();
        let kept = keeper_path(id).filter(|p| keeper && p.exists());
        let mut kept_recipients = None;
        if let Some(p) = &kept {
            ids.extend(age::read_identities(p).map_err(Error::usage)?);
            kept_recipients = std::fs::read_to_string(p).ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("# recipients: "))
                    .and_then(|l| l.split(' ').map(Recipient::parse).collect())
            });
        }
        if ids.is_empty() {
            let hint = if keeper {
                "give --identity FILE (a key it is encrypted to), or run fetch where the courier was sealed (its keeper key is not here)"
            } else {
                "give --identity FILE (a key it is encrypted to)"
            };
            return Err(Error::usage(format!(
                "'{courier}' is an encrypted courier: {hint}"
            )));
        }
        let f = state
            .open_file(KEYS.as_bytes())
            .map_err(|e| Error::io(format!("'{}'", state.path.join(KEYS).display()), &e))?
            .ok_or_else(|| {
                Error::usage(format!(
                    "'{courier}' is an encrypted courier without its key file ({KEYS}): it cannot be read"
                ))
            })?;
        let mut text = Vec::new();
        let read = age::Reader::new(f, &ids).and_then(|r| r.take(1 << 16).read_to_end(&mut text));
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(Error::usage(format!(
                    "'{courier}' is encrypted to other keys than the --identity given (wrong identity?)"
                )));
            }
            Err(e) => {
                return Err(Error::usage(format!(
                    "'{courier}': its key file {KEYS} is damaged ({}); it cannot be read",
                    describe_io(&e)
                )));
            }
        }
        serde_json::from_slice::<Keys>(&text)
            .ok()
            .filter(|k| k.courier == id)
            .and_then(|k| Seal::from_keys(k, ids))
            .map(|s| Seal {
                kept_recipients,
                ..s
            })
            .ok_or_else(|| {
                Error::usage(format!(
                    "'{courier}': its key file {KEYS} does not describe this courier"
                ))
            })
    }

    /// Seals a courier that holds nothing yet for `recipients`. The
    /// identities `fetch` was given read its state; without any, a
    /// keeper key is made and kept at the source.
    pub(crate) fn create(state: &Dir, recipients: &[Recipient]) -> Result<(Seal, Option<PathBuf>)> {
        let id = hex(&age::random::<16>());
        let key = age::random::<32>();
        let mut ids: Vec<Identity> = age::identities().to_vec();
        let source_reads = ids.iter().any(|i| recipients.contains(&i.recipient()));
        let mut kept = None;
        if ids.is_empty() {
            let keeper = Identity::generate();
            kept = Some(keep_keeper(&id, &keeper, recipients)?);
            ids.push(keeper);
        }
        let mut readers = recipients.to_vec();
        for i in &ids {
            if !readers.contains(&i.recipient()) {
                readers.push(i.recipient());
            }
        }
        let keys = Keys {
            courier: id.clone(),
            key: hex(&key),
            recipients: recipients.iter().map(Recipient::encode).collect(),
            readers: readers.iter().map(Recipient::encode).collect(),
            source_reads,
        };
        let mut sealed = age::Writer::new(Vec::new(), &readers)
            .map_err(|e| Error::io("sealing the courier's keys", &e))?;
        sealed
            .write_all(&serde_json::to_vec(&keys).expect("keys serialize"))
            .map_err(|e| Error::io("sealing the courier's keys", &e))?;
        let sealed = sealed
            .finish()
            .map_err(|e| Error::io("sealing the courier's keys", &e))?;
        let what = |name: &str, e: io::Error| {
            Error::io(format!("'{}'", state.path.join(name).display()), &e)
        };
        state
            .write_atomic(KEYS, &sealed, true)
            .map_err(|e| what(KEYS, e))?;
        let marker = serde_json::to_vec(&Marker {
            bitfog_sealed: 1,
            courier: id.clone(),
        })
        .expect("marker serializes");
        state
            .write_atomic(MARKER, &marker, true)
            .map_err(|e| what(MARKER, e))?;
        let seal = Seal::from_keys(keys, ids).expect("keys just made");
        Ok((seal, kept))
    }

    /// Whether `fetch` may go on writing into this courier: a key file
    /// planted by someone else could name their own recipients or readers.
    /// Readers must be recipients or keys of this site's; recipients must
    /// be those `--encrypt-to` gives, else those the keeper kept here
    /// vouches for, else keys this site holds identities of.
    pub(crate) fn vouched(&self, given: Option<&[Recipient]>) -> std::result::Result<(), String> {
        let own: Vec<Recipient> = self.identities.iter().map(Identity::recipient).collect();
        if let Some(r) = self
            .readers
            .iter()
            .find(|r| !self.recipients.contains(r) && !own.contains(r))
        {
            return Err(format!(
                "its key file names a reader ({r}) that is neither a recipient nor a key of this site's (planted?)"
            ));
        }
        let same = |want: &[Recipient]| {
            want.iter().all(|r| self.recipients.contains(r))
                && self.recipients.iter().all(|r| want.contains(r))
        };
        match (given, &self.kept_recipients) {
            (Some(want), _) if !same(want) => Err(
                "it is encrypted to other recipients than --encrypt-to gives; store what it carries and empty it to change them".into(),
            ),
            (Some(_), _) => Ok(()),
            (None, Some(kept)) if same(kept) => Ok(()),
            (None, Some(_)) => Err(
                "its key file names other recipients than the keeper kept here says (planted?)".into(),
            ),
            (None, None) if self.recipients.iter().all(|r| own.contains(r)) => Ok(()),
            (None, None) => Err(
                "nothing here vouches for the recipients it names: give --encrypt-to RECIPIENT".into(),
            ),
        }
    }

    /// Who the courier's files are encrypted to, for the person.
    pub(crate) fn recipients_text(&self) -> String {
        self.recipients
            .iter()
            .map(Recipient::encode)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A name for `what` (a path, a range, a delta) that only the holders
    /// of the state key can tell: 32 hex digits of an HMAC.
    pub(crate) fn name_for(&self, what: &str) -> String {
        let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&derive(&self.key, "names"))
            .expect("any key length");
        m.update(what.as_bytes());
        hex(&m.finalize().into_bytes()[..16])
    }

    /// One record line sealed: base64 of a random nonce and the sealed
    /// text, and a newline.
    pub(crate) fn seal_line(&self, plain: &[u8]) -> Vec<u8> {
        let nonce = age::random::<12>();
        let mut body = plain.to_vec();
        let tag = self
            .lines
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"bitfog-line", &mut body)
            .expect("a line seals");
        let mut all = nonce.to_vec();
        all.extend_from_slice(&body);
        all.extend_from_slice(&tag);
        let mut line = age::b64_encode(&all).into_bytes();
        line.push(b'\n');
        line
    }

    /// A sealed line's text, if it is one this courier's key sealed.
    pub(crate) fn open_line(&self, line: &[u8]) -> Option<Vec<u8>> {
        let all = age::b64_decode(std::str::from_utf8(line).ok()?.trim_end())?;
        if all.len() < 12 + 16 {
            return None;
        }
        let (nonce, rest) = all.split_at(12);
        let (body, tag) = rest.split_at(rest.len() - 16);
        let mut body = body.to_vec();
        self.lines
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                b"bitfog-line",
                &mut body,
                Tag::from_slice(tag),
            )
            .ok()?;
        Some(body)
    }

    /// A file of sealed lines, opened as its plain lines in an unnamed
    /// file of the temporary directory; a line that does not open (torn,
    /// changed, another courier's) is left out.
    pub(crate) fn open_lines(&self, file: File) -> io::Result<File> {
        let mut plain = crate::beneath::anonymous_file(&std::env::temp_dir())?;
        let mut out = io::BufWriter::new(&mut plain);
        let mut r = BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            match crate::wire::manifest::read_line_capped(
                &mut r,
                &mut line,
                2 * crate::wire::manifest::MAX_LINE,
            ) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                break;
            }
            if let Some(text) = self.open_line(&line) {
                out.write_all(&text)?;
                out.write_all(b"\n")?;
            }
        }
        out.flush()?;
        drop(out);
        plain.rewind()?;
        Ok(plain)
    }

    /// A whole state file (an age file for the readers), opened as its
    /// plain text in an unnamed file of the temporary directory.
    pub(crate) fn open_state(&self, file: File) -> io::Result<File> {
        let mut plain = crate::beneath::anonymous_file(&std::env::temp_dir())?;
        io::copy(&mut self.reader(file)?, &mut plain)?;
        plain.rewind()?;
        Ok(plain)
    }

    /// Decrypts an age file of this courier as it is read.
    pub(crate) fn reader<R: Read>(&self, r: R) -> io::Result<age::Reader<R>> {
        age::Reader::new(r, &self.identities)
    }

    /// Encrypts a carried file (for the recipients only) as it is written.
    pub(crate) fn object_writer<W: Write>(&self, w: W) -> io::Result<age::Writer<W>> {
        age::Writer::new(w, &self.recipients)
    }

    /// Encrypts a state file (for the readers) as it is written.
    pub(crate) fn state_writer<W: Write>(&self, w: W) -> io::Result<age::Writer<W>> {
        age::Writer::new(w, &self.readers)
    }

    /// Bytes a carried file of `plain` bytes takes in the courier.
    pub(crate) fn object_len(&self, plain: u64) -> u64 {
        age::sealed_len(self.object_header, plain)
    }

    /// The plain size of a carried file that takes `total` bytes (`None`
    /// when no plain size gives that).
    pub(crate) fn plain_len(&self, total: u64) -> Option<u64> {
        age::plain_len(self.object_header, total)
    }
}

/// A key for one use, derived from the state key.
fn derive(key: &[u8; 32], what: &str) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key).expect("any key length");
    m.update(b"bitfog-sealed-courier/");
    m.update(what.as_bytes());
    m.finalize().into_bytes().into()
}

/// Says where a keeper key was made, for the person.
pub(crate) fn said_keeper(path: &Path) -> String {
    format!(
        "the courier is encrypted; its state is readable here with the key kept in '{}' (it cannot read the carried files)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal() -> Seal {
        let id = Identity::generate();
        let keys = Keys {
            courier: "00".repeat(16),
            key: "11".repeat(32),
            recipients: vec![id.recipient().encode()],
            readers: vec![id.recipient().encode()],
            source_reads: true,
        };
        Seal::from_keys(keys, vec![id]).unwrap()
    }

    #[test]
    fn lines_open_only_whole_and_unchanged() {
        let s = seal();
        let line = s.seal_line(b"{\"name\":\"secret.txt\"}");
        assert!(!line.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.open_line(&line).unwrap(), b"{\"name\":\"secret.txt\"}");
        let mut bad = line.clone();
        bad[20] = if bad[20] == b'A' { b'B' } else { b'A' };
        assert!(s.open_line(&bad).is_none());
        assert!(s.open_line(&line[..line.len() - 5]).is_none());
        assert!(seal().open_line(&line).is_some(), "same key, same courier");
    }

    proptest::proptest! {
        /// What fits a room, encrypted, never takes more than the room,
        /// and misses it by a few bytes in 4 MiB.
        #[test]
        fn room_for_never_overflows(room in 0u64..(1 << 40)) {
            let s = seal();
            let fits = room.saturating_sub(s.object_len(room) - room);
            if fits > 0 {
                proptest::prop_assert!(s.object_len(fits) <= room);
            }
            let slack = 64 + room / (1 << 22);
            proptest::prop_assert!(s.object_len(fits + slack) > room || room < s.object_len(0));
        }
    }

    #[test]
    fn object_lengths_invert() {
        let s = seal();
        for plain in [0, 1, 65535, 65536, 65537, 3 << 20, (1 << 30) + 7] {
            assert_eq!(s.plain_len(s.object_len(plain)), Some(plain));
        }
        assert_eq!(s.plain_len(3), None);
    }
}
