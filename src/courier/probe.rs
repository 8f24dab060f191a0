//! What the courier's filesystem can hold, found by trying it.
//!
//! Portable disks come formatted exFAT, FAT32 or NTFS, and each refuses
//! something an ordinary Linux tree has: characters in names (`a:b.txt`),
//! names that differ only in case, holes, files of 4 GiB or more. `fetch`
//! tries each in a scratch directory of `.bitfog/` rather than trusting
//! the filesystem's name, and carries what the courier cannot hold in a
//! form it can (see `Courier::place`, `ranges`).

use crate::beneath::Dir;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::{Duration, UNIX_EPOCH};

/// The largest file a FAT filesystem holds.
pub(crate) const FAT_MAX: u64 = (1 << 32) - 1;
/// The largest file taken for safe on a volume that keeps no holes and
/// cannot be told (a FAT through FUSE among them): fusefat refuses writes
/// past 2 GiB.
pub(crate) const UNKNOWN_MAX: u64 = (1 << 31) - 1;

/// ASCII characters some filesystems refuse in a name (Windows' list).
const TRIED_CHARS: &[char] = &[':', '?', '<', '>', '|', '"', '*', '\\'];

/// Names Windows keeps for devices, alone or with any extension.
const DEVICES: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "COM1", "COM2", "COM3", "COM4", "COM5",
    "COM6", "COM7", "COM8", "COM9", "COM0", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7",
    "LPT8", "LPT9", "LPT0",
];

/// What the courier's filesystem holds. `Traits::default()` is a POSIX
/// filesystem: any name, case kept apart, holes, no size limit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Traits {
    /// What it is, for people ("exFAT", "ext4"); None when unknown.
    pub(crate) fs: Option<String>,
    /// `a` and `A` are one name.
    pub(crate) case_insensitive: bool,
    /// Of `TRIED_CHARS`, those refused.
    pub(crate) refused_chars: Vec<char>,
    /// Control characters (U+0001 to U+001F) refused.
    pub(crate) controls: bool,
    /// Characters outside ASCII refused (or changed).
    pub(crate) non_ascii: bool,
    /// A name ending in a dot or a space refused (or changed).
    pub(crate) trailing: bool,
    /// Device names (`CON`, `nul.txt`) refused.
    pub(crate) devices: bool,
    /// Holes are kept, and found again with SEEK_DATA.
    pub(crate) holes: bool,
    /// The largest file it holds; None when there is no limit that
    /// matters (at least 4 GiB).
    pub(crate) max_file: Option<u64>,
    /// How finely it keeps mtimes, in nanoseconds (None: not found).
    pub(crate) mtime_ns: Option<u64>,
    /// Permission bits are kept.
    pub(crate) modes: bool,
}

impl Default for Traits {
    fn default() -> Traits {
        Traits {
            fs: None,
            case_insensitive: false,
            refused_chars: Vec::new(),
            controls: false,
            non_ascii: false,
            trailing: false,
            devices: false,
            holes: true,
            max_file: None,
            mtime_ns: Some(1),
            modes: true,
        }
    }
}

impl Traits {
    /// True when the courier can hold `name` (a checked relative name)
    /// as it is: every component made only of characters it keeps, and
    /// none it refuses or changes. Case is `Courier`'s business.
    pub(crate) fn holds(&self, name: &str) -> bool {
        name.split('/').all(|c| self.holds_component(c))
    }

    fn holds_component(&self, c: &str) -> bool {
        if self.trailing && (c.ends_with('.') || c.ends_with(' ')) {
            return false;
        }
        if self.devices {
            let stem = c.split('.').next().unwrap_or(c).trim_end();
            if DEVICES.iter().any(|d| d.eq_ignore_ascii_case(stem)) {
                return false;
            }
        }
        c.chars().all(|ch| {
            if ch.is_ascii_control() && ch != '\x7f' {
                !self.controls
            } else if !ch.is_ascii() {
                !self.non_ascii
            } else {
                !self.refused_chars.contains(&ch)
            }
        })
    }

    /// True when the courier is an ordinary POSIX filesystem in every way
    /// that matters to a trip.
    pub(crate) fn plain(&self) -> bool {
        let posix = Traits {
            fs: self.fs.clone(),
            mtime_ns: self.mtime_ns,
            ..Traits::default()
        };
        *self == posix
    }

    /// One line for the person at the shell, when the courier is not an
    /// ordinary POSIX filesystem.
    pub(crate) fn describe(&self) -> Option<String> {
        if self.plain() {
            return None;
        }
        let mut what = Vec::new();
        if self.case_insensitive {
            what.push("case-insensitive".to_string());
        }
        let chars: Vec<String> = self.refused_chars.iter().map(|c| c.to_string()).collect();
        let mut refused: Vec<String> = (!chars.is_empty())
            .then(|| chars.join(" "))
            .into_iter()
            .collect();
        if self.controls {
            refused.push("control characters".into());
        }
        if self.non_ascii {
            refused.push("non-ASCII letters".into());
        }
        if self.trailing {
            refused.push("a trailing dot or space".into());
        }
        if self.devices {
            refused.push("device names (CON, NUL...)".into());
        }
        if !refused.is_empty() {
            what.push(format!("no names with {}", refused.join(", ")));
        }
        if !self.holes {
            what.push("no holes it can report".into());
        }
        if let Some(max) = self.max_file {
            what.push(format!(
                "files up to {}",
                match max.checked_add(1) {
                    Some(n) if n.is_power_of_two() && n >= 1 << 10 => {
                        let (unit, shift) = [("GiB", 30), ("MiB", 20), ("KiB", 10)]
                            .into_iter()
                            .find(|&(_, s)| n >= 1 << s)
                            .expect("at least 1 KiB");
                        format!("{} {unit} - 1 byte", n >> shift)
                    }
                    _ => crate::ui::human_bytes(max),
                }
            ));
        }
        if !self.modes {
            what.push("no permission bits".into());
        }
        if let Some(ns) = self.mtime_ns.filter(|&ns| ns >= 1_000_000) {
            what.push(format!("mtimes to {}", resolution(ns)));
        }
        let mut then = Vec::new();
        if self.case_insensitive || !refused.is_empty() {
            then.push("such names and names that clash in case travel under encoded names in .bitfog/names/");
        }
        if !self.holes {
            then.push("sparse files travel as their data extents");
        }
        if self.max_file.is_some() {
            then.push("bigger files travel in pieces");
        }
        let fs = self
            .fs
            .as_deref()
            .unwrap_or("a filesystem that is not POSIX");
        let mut line = format!("the courier is {fs}: {}", what.join(", "));
        if !then.is_empty() {
            line.push_str(&format!("; {}", then.join("; ")));
        }
        Some(line)
    }
}

fn resolution(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{} s", ns / 1_000_000_000)
    } else {
        format!("{} ms", ns / 1_000_000)
    }
}

/// Tries what the filesystem of `state` (the courier's `.bitfog/`) holds,
/// in a scratch directory `probe` made and removed inside it.
pub(crate) fn probe(state: &Dir) -> io::Result<Traits> {
    let _ = remove_scratch(state);
    state.mkdir(b"probe", 0o700)?;
    let dir = state.open_dir(b"probe", false)?;
    let found = try_all(&dir, state);
    drop(dir);
    let _ = remove_scratch(state);
    found
}

fn remove_scratch(state: &Dir) -> io::Result<()> {
    let dir = match state.open_dir(b"probe", false) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => return state.unlink(b"probe"),
    };
    for (name, _) in dir.names()? {
        let _ = dir.unlink(&name);
    }
    state.remove_dir(b"probe")
}

/// True when a file made under `name` is there under exactly that name.
fn keeps(dir: &Dir, name: &str) -> bool {
    let made = dir.create_fresh(name.as_bytes()).is_ok();
    let listed = made
        && dir
            .names()
            .is_ok_and(|n| n.iter().any(|(x, _)| x == name.as_bytes()));
    if made {
        let _ = dir.unlink(name.as_bytes());
        // A filesystem that changed the name made it under another one.
        for (other, _) in dir.names().unwrap_or_default() {
            let _ = dir.unlink(&other);
        }
    }
    listed
}

fn try_all(dir: &Dir, state: &Dir) -> io::Result<Traits> {
    if !keeps(dir, "plain-name.txt") {
        return Err(io::Error::other("cannot make a file in the courier"));
    }
    let mut t = Traits {
        refused_chars: TRIED_CHARS
            .iter()
            .copied()
            .filter(|c| !keeps(dir, &format!("a{c}b")))
            .collect(),
        controls: ["a\x01b", "a\tb", "a\x1fb"].iter().any(|n| !keeps(dir, n)),
        non_ascii: ["caf\u{e9}", "\u{65e5}\u{672c}", "\u{1f600}", "e\u{301}"]
            .iter()
            .any(|n| !keeps(dir, n)),
        trailing: ["dot.", "space "].iter().any(|n| !keeps(dir, n)),
        devices: ["CON", "con.txt", "NUL", "aux.c", "COM1", "LPT1.txt"]
            .iter()
            .any(|n| !keeps(dir, n)),
        ..Traits::default()
    };
    t.case_insensitive = folds_case(dir)?;
    let f = dir.create_fresh(b"holes")?;
    f.write_all_at(b"x", 1 << 20)?;
    let holes = f.metadata()?.blocks() * 512 < 1 << 20;
    // Holes count only where they can be found again: ntfs-3g keeps them
    // but its SEEK_DATA says all is data.
    // SAFETY: lseek on a descriptor `f` keeps open.
    let found = unsafe { crate::sys::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) } > 0;
    t.holes = holes && found;
    t.modes = f
        .set_permissions(std::fs::Permissions::from_mode(0o640))
        .is_ok()
        && f.metadata()?.mode() & 0o777 == 0o640;
    t.mtime_ns = mtime_resolution(&f);
    let magic = state.fs_magic();
    let mount = mount_of(&state.path);
    t.fs = fs_name(magic, mount.as_ref());
    t.max_file = if holes {
        // Cheap where holes are kept: the file stays empty.
        let big = 1u64 << 32;
        match f.set_len(big).and_then(|()| f.metadata()) {
            Ok(m) if m.len() == big => None,
            _ => Some(FAT_MAX),
        }
    } else {
        // Without holes that would write 4 GiB of zeros (exFAT does):
        // the volume says instead. The kernel's FAT holds 4 GiB - 1; a
        // FAT through FUSE, or a volume that cannot tell, gets 2 GiB - 1,
        // the most every FAT driver writes (fusefat fails past 2 GiB), as
        // pieces cost little; the rest have no limit that matters.
        match t.fs.as_deref() {
            Some("FAT") => Some(FAT_MAX),
            Some(fs) if fs.starts_with("FAT") || fs.starts_with("a FUSE") => Some(UNKNOWN_MAX),
            Some(_) => None,
            None => Some(UNKNOWN_MAX),
        }
    };
    drop(f);
    dir.unlink(b"holes")?;
    Ok(t)
}

/// True when a file made in `dir` as `Case.tmp` is found as `CASE.TMP`
/// (neither spelling left there first: a `CASE.TMP` planted on a
/// case-sensitive courier must not pass for folding).
pub(crate) fn folds_case(dir: &Dir) -> io::Result<bool> {
    for name in [&b"CASE.TMP"[..], b"Case.tmp"] {
        match dir.unlink(name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    dir.create_fresh(b"Case.tmp")?;
    let folded = dir.stat(b"CASE.TMP").map(|m| m.is_some());
    dir.unlink(b"Case.tmp")?;
    folded
}

/// How finely a file's mtime is kept, from one set to 1 s + 123456789 ns
/// past an odd second.
fn mtime_resolution(f: &File) -> Option<u64> {
    let set: u64 = 1_000_000_001_123_456_789;
    // Both times: exfat-fuse refuses a change of the mtime alone.
    let t = UNIX_EPOCH + Duration::from_nanos(set);
    f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
        .ok()?;
    let got = f.metadata().ok()?.modified().ok()?;
    let got = got.duration_since(UNIX_EPOCH).ok()?.as_nanos() as u64;
    [
        1,
        100,
        1_000,
        1_000_000,
        10_000_000,
        1_000_000_000,
        2_000_000_000,
    ]
    .into_iter()
    .find(|r| set - set % r == got)
}

/// The mount a path is on: its filesystem type and source, from
/// `/proc/self/mountinfo` (the longest mount point above the path).
fn mount_of(path: &std::path::Path) -> Option<(String, String)> {
    let path = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String, String)> = None;
    for line in info.lines() {
        let (left, right) = line.split_once(" - ")?;
        let point = unescape(left.split(' ').nth(4)?);
        let mut r = right.split(' ');
        let (fstype, source) = (r.next()?, r.next()?);
        if path.starts_with(&point) && best.as_ref().is_none_or(|b| point.len() >= b.0) {
            best = Some((point.len(), fstype.to_string(), unescape(source)));
        }
    }
    best.map(|(_, t, s)| (t, s))
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the filesystem is called, from its magic number, or for FUSE
/// from the mount's type or the volume's boot sector.
fn fs_name(magic: Option<u64>, mount: Option<&(String, String)>) -> Option<String> {
    let named = match magic? {
        0xEF53 => "ext4",
        0x5846_5342 => "XFS",
        0x9123_683E => "Btrfs",
        0x0102_1994 => "tmpfs",
        0x4d44 => "FAT",
        0x2011_BAB0 => "exFAT",
        0x5346_544e | 0x7366_746e => "NTFS",
        0x6573_5546 => return fuse_name(mount?),
        0x794c_7630 => "overlayfs",
        0x6969 => "NFS",
        0xFF53_4D42 | 0xFE53_4D42 => "SMB",
        0x2FC1_2FC1 => "ZFS",
        _ => return None,
    };
    Some(named.to_string())
}

fn fuse_name((fstype, source): &(String, String)) -> Option<String> {
    let sub = fstype.strip_prefix("fuse.").unwrap_or("");
    let lower = sub.to_ascii_lowercase();
    let from_type = if lower.contains("exfat") {
        Some("exFAT")
    } else if lower.contains("ntfs") {
        Some("NTFS")
    } else if lower.contains("fat") {
        Some("FAT")
    } else {
        None
    };
    let boot = boot_sector_name(source);
    let named = boot.or(from_type.map(str::to_string));
    Some(match named {
        Some(n) => format!("{n} (FUSE)"),
        None if sub.is_empty() => "a FUSE filesystem".to_string(),
        None => format!("{sub} (FUSE)"),
    })
}

/// The filesystem a block device's boot sector names, if it can be read.
fn boot_sector_name(source: &str) -> Option<String> {
    if !source.starts_with("/dev/") {
        return None;
    }
    use std::os::unix::fs::FileTypeExt;
    let mut f = File::open(source).ok()?;
    if !f.metadata().ok()?.file_type().is_block_device() {
        return None;
    }
    let mut b = [0u8; 512];
    f.read_exact(&mut b).ok()?;
    Some(
        if &b[3..11] == b"EXFAT   " {
            "exFAT"
        } else if &b[3..11] == b"NTFS    " {
            "NTFS"
        } else if &b[82..90] == b"FAT32   " {
            "FAT32"
        } else if &b[54..62] == b"FAT16   " || &b[54..62] == b"FAT12   " {
            "FAT"
        } else {
            return None;
        }
        .to_string(),
    )
}

/// What is at `name` in `dir`, for tests.
#[cfg(test)]
fn kind(dir: &Dir, name: &str) -> Option<crate::beneath::Kind> {
    dir.kind(name.as_bytes()).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_posix_filesystem_holds_everything_and_leaves_no_scratch() {
        let tmp = tempfile::tempdir().unwrap();
        let state = Dir::open_path(tmp.path()).unwrap();
        let t = probe(&state).unwrap();
        assert!(!t.case_insensitive && t.refused_chars.is_empty() && !t.devices);
        assert!(t.holds("a:b/CON.txt") && t.holds("what?.") && t.holds("\u{e9}/x\u{1}"));
        assert_eq!(t.max_file, None);
        assert!(kind(&state, "probe").is_none());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn windows_rules_refuse_what_windows_refuses() {
        let t = Traits {
            refused_chars: TRIED_CHARS.to_vec(),
            controls: true,
            trailing: true,
            devices: true,
            case_insensitive: true,
            holes: false,
            max_file: Some(FAT_MAX),
            ..Traits::default()
        };
        for bad in [
            "a:b.txt",
            "what?.txt",
            "x<y>|z.txt",
            "quote\".txt",
            "dot.",
            "d/space ",
            "CON.txt",
            "con",
            "dir/nul.tar.gz",
            "a\tb",
            "a\\b",
            "COM1 .txt",
        ] {
            assert!(!t.holds(bad), "{bad:?}");
        }
        for good in [
            "CONSOLE.txt",
            "a.b",
            "\u{e9}t\u{e9}.txt",
            "Photo.JPG",
            ".hidden",
        ] {
            assert!(t.holds(good), "{good:?}");
        }
        let line = t.describe().unwrap();
        assert!(
            line.contains("case-insensitive") && line.contains("pieces"),
            "{line}"
        );
        assert!(Traits::default().describe().is_none());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/my\040disk"), "/mnt/my disk");
        assert_eq!(unescape(r"a\\b"), r"a\\b");
    }

    #[test]
    fn a_planted_spelling_does_not_pass_for_folding() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("CASE.TMP"), "planted").unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        assert!(!folds_case(&dir).unwrap());
        std::fs::create_dir(tmp.path().join("CASE.TMP")).unwrap();
        assert!(
            folds_case(&dir).is_err(),
            "a directory in the way is an error, not a yes"
        );
    }
}
