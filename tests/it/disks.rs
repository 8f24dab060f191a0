//! Couriers on the disks people carry: exFAT, FAT32 and NTFS images on
//! loop devices, mounted with the FUSE drivers Debian ships (`exfat-fuse`,
//! `fusefat`, `ntfs-3g`). Root only; `.ci/run` installs the packages.

use crate::util::*;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A filesystem image mounted on a loop device, unmounted and detached
/// when dropped.
struct Mounted {
    dir: PathBuf,
    dev: String,
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Mounted {
    /// `kind`: "exfat", "fat32", "ntfs" or "ntfs-windows-names".
    fn new(t: &Scratch, kind: &str, mib: u64) -> Mounted {
        let img = t.path(&format!("{kind}.img"));
        fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
        match kind {
            "exfat" => run("mkfs.exfat", Command::new("mkfs.exfat").arg(&img)),
            "fat32" => run(
                "mkfs.vfat",
                Command::new("mkfs.vfat").args(["-F", "32"]).arg(&img),
            ),
            _ => run(
                "mkfs.ntfs",
                Command::new("mkfs.ntfs").args(["-F", "-Q"]).arg(&img),
            ),
        };
        let dev = run(
            "losetup",
            Command::new("losetup").args(["-f", "--show"]).arg(&img),
        );
        let dir = t.mkdir(&format!("mnt-{kind}"));
        let mount = match kind {
            "exfat" => run(
                "mount.exfat-fuse",
                Command::new("mount.exfat-fuse").arg(&dev).arg(&dir),
            ),
            "fat32" => run(
                "fusefat",
                Command::new("fusefat")
                    .args(["-o", "rw+"])
                    .arg(&dev)
                    .arg(&dir),
            ),
            "ntfs" => run("ntfs-3g", Command::new("ntfs-3g").arg(&dev).arg(&dir)),
            _ => run(
                "ntfs-3g",
                Command::new("ntfs-3g")
                    .args(["-o", "windows_names"])
                    .arg(&dev)
                    .arg(&dir),
            ),
        };
        drop(mount);
        Mounted { dir, dev }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Names the disks people carry refuse or fold, and a sparse image.
const ODD: &[&str] = &[
    "a:b.txt",
    "what?.txt",
    "x<y>|z.txt",
    "quote\".txt",
    "star*.txt",
    "trailing dot.",
    "trailing space ",
    "CON.txt",
    "nul",
    "Photo.JPG",
    "photo.jpg",
    "Dir/inner.txt",
    "dir/inner.txt",
    "d:ir/deep/file.txt",
    "\u{e9}t\u{e9}/na\u{ef}ve.txt",
    "\u{65e5}\u{672c}\u{8a9e}.txt",
    "tab\there.txt",
    "plain/ordinary.txt",
];

const SPARSE: &str = "images/disk.img";
const SPARSE_SIZE: u64 = 5 << 30;

fn odd_tree(root: &Path) {
    for (i, name) in ODD.iter().enumerate() {
        write(root, name, &data(i as u64 + 1, 100 + i * 997));
    }
    chmod(root, "a:b.txt", 0o755);
    chmod(root, "photo.jpg", 0o600);
    let f = fs::File::create({
        fs::create_dir_all(root.join("images")).unwrap();
        root.join(SPARSE)
    })
    .unwrap();
    f.set_len(SPARSE_SIZE).unwrap();
    f.write_all_at(b"boot sector", 0).unwrap();
    // 1.5 MiB of data: enough for 5 GiB of holes to travel as holes (a
    // sparse file travels so with at most 1 GiB + 4096 x its data of
    // holes, see `sparse::HOLE_RATIO`).
    f.write_all_at(&data(99, 1_500_000), 3 << 30).unwrap();
    f.write_all_at(b"the end", SPARSE_SIZE - 7).unwrap();
    drop(f);
    for (i, name) in ODD.iter().enumerate() {
        let t = filetime(1_500_000_000 + i as i64 * 3_601);
        fs::File::options()
            .write(true)
            .open(root.join(name))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

fn filetime(secs: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
}

/// The files of `root` as (name, size, mode, mtime, bytes); the sparse
/// image's bytes are only where its data is.
fn files(root: &Path) -> Vec<(String, u64, u32, i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.starts_with(".bitfog") {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = if rel == SPARSE {
                let f = fs::File::open(&p).unwrap();
                let mut b = vec![0u8; 11 + 1_500_000 + 7];
                f.read_exact_at(&mut b[..11], 0).unwrap();
                f.read_exact_at(&mut b[11..1_500_011], 3 << 30).unwrap();
                f.read_exact_at(&mut b[1_500_011..], SPARSE_SIZE - 7)
                    .unwrap();
                b
            } else {
                fs::read(&p).unwrap()
            };
            out.push((
                rel,
                m.len(),
                m.permissions().mode() & 0o777,
                m.mtime(),
                bytes,
            ));
        }
    }
    out.sort();
    out
}

/// One trip with no budget through a courier on `kind`: every name and
/// size arrives, nothing is left, the destination equals the source.
fn one_trip(kind: &str, says: &str) -> (Scratch, PathBuf, Mounted) {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    odd_tree(&src);
    let disk = Mounted::new(&t, kind, 192);
    let courier = disk.dir.join("trip");
    let c = courier.to_str().unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, c, "--json"]).ok();
    assert!(f.stderr.contains(says), "{kind}: {}", f.stderr);
    assert_eq!(
        (f.num("failed_files"), f.num("remaining_files")),
        (0, 0),
        "{kind}: {}",
        f.stderr
    );
    assert_eq!(f.num("fetched_files"), ODD.len() as u64 + 1);
    // The 5 GiB image took its data, not its size.
    let used = disk_used(&courier);
    assert!(used < 32 << 20, "{kind}: the courier holds {used} bytes");
    let s = bitfog(&["store", &t.s("src.db"), &du, c, "--json"]).ok();
    assert_eq!(
        (s.num("stored_files"), s.num("failed_files")),
        (ODD.len() as u64 + 1, 0),
        "{kind}: {}",
        s.stderr
    );
    let p = bitfog(&["plan", c, &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 0, "{kind}: {}", p.stdout);
    assert_eq!(files(&src), files(&dst), "{kind}: the trees differ");
    // The sparse image stays sparse at the destination, and hashes right.
    assert!(fs::metadata(dst.join(SPARSE)).unwrap().blocks() * 512 < 64 << 20);
    bitfog(&["builddb", &du, &t.s("dst.db")]).ok();
    let hash_of = |db: &str| -> String {
        let text = fs::read_to_string(t.path(db)).unwrap();
        let line = text.lines().find(|l| l.contains("disk.img")).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["sha256"].as_str().unwrap().to_string()
    };
    assert_eq!(hash_of("src.db"), hash_of("dst.db"));
    (t, courier, disk)
}

/// Bytes the files below `dir` take on its disk.
fn disk_used(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        total += if m.is_dir() {
            disk_used(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

/// The files of `.bitfog/names/`, as `BUCKET/FILE`.
fn held_files(courier: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for b in fs::read_dir(courier.join(".bitfog/names")).unwrap() {
        let b = b.unwrap();
        let bucket = b.file_name().to_string_lossy().into_owned();
        for f in fs::read_dir(b.path()).unwrap() {
            out.push(format!(
                "{bucket}/{}",
                f.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    out
}

/// What a person sees at the courier's top level (not bitfog's state).
fn visible(courier: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(courier)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".bitfog")
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs root, exfatprogs and exfat-fuse"]
fn an_exfat_courier_carries_every_name_and_the_holes_stay_out() {
    let (_t, courier, _disk) = one_trip("exfat", "the courier is exFAT");
    let seen = visible(&courier);
    assert!(seen.contains(&"plain".to_string()), "{seen:?}");
    assert!(
        seen.contains(&"CON.txt".to_string()),
        "exFAT takes it: {seen:?}"
    );
    assert!(!seen.iter().any(|n| n.contains(':')), "{seen:?}");
    let held = held_files(&courier);
    assert!(held.iter().any(|n| n.ends_with("-a_b.txt")), "{held:?}");
    assert!(
        held.iter().any(|n| n.ends_with("-disk.img.extents")),
        "{held:?}"
    );
}

#[test]
#[ignore = "needs root, dosfstools and fusefat"]
fn a_fat32_courier_carries_every_name_and_a_5_gib_sparse_file() {
    let (_t, courier, _disk) = one_trip("fat32", "files up to 2 GiB - 1 byte");
    let seen = visible(&courier);
    assert!(seen.contains(&"plain".to_string()), "{seen:?}");
}

#[test]
#[ignore = "needs root and ntfs-3g"]
fn an_ntfs_courier_keeps_posix_names_as_they_are() {
    let (_t, courier, _disk) = one_trip("ntfs", "");
    let seen = visible(&courier);
    for name in [
        "a:b.txt",
        "Photo.JPG",
        "photo.jpg",
        "CON.txt",
        "trailing dot.",
    ] {
        assert!(seen.contains(&name.to_string()), "{name}: {seen:?}");
    }
}

#[test]
#[ignore = "needs root and ntfs-3g"]
fn an_ntfs_courier_with_windows_names_carries_every_name() {
    let (_t, courier, _disk) = one_trip("ntfs-windows-names", "no names with :");
    let seen = visible(&courier);
    assert!(!seen.contains(&"CON.txt".to_string()), "{seen:?}");
    assert!(seen.contains(&"Photo.JPG".to_string()), "{seen:?}");
}

#[test]
#[ignore = "needs root, dosfstools and fusefat; writes 4 GiB through FUSE (about 3 min)"]
fn a_file_over_4_gib_crosses_fat32_in_pieces_in_one_trip() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    // 4 GiB + 3 MiB of data, each MiB stamped with its number, so a piece
    // joined out of order or twice shows.
    const MIB: u64 = 1 << 20;
    let total: u64 = 4096 + 3;
    {
        let f = fs::File::create(src.join("big.bin")).unwrap();
        let mut block = data(7, MIB as usize);
        for i in 0..total {
            block[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all_at(&block, i * MIB).unwrap();
        }
    }
    write(&src, "small.txt", b"beside it\n");
    let disk = Mounted::new(&t, "fat32", 4400);
    let courier = disk.dir.join("trip");
    let c = courier.to_str().unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, c, "--json"]).ok();
    assert_eq!(
        (f.num("failed_files"), f.num("remaining_files")),
        (0, 0),
        "{}",
        f.stderr
    );
    let pieces: Vec<u64> = fs::read_dir(courier.join(".bitfog/ranges"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".range"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    // fusefat writes no further than 2 GiB into a file, so pieces are
    // below that.
    assert_eq!(pieces.len(), 3, "{pieces:?}");
    assert!(pieces.iter().all(|&n| n < 1 << 31), "{pieces:?}");
    assert_eq!(pieces.iter().sum::<u64>(), total * MIB);
    let s = bitfog(&["store", &t.s("src.db"), &du, c, "--json"]).ok();
    assert_eq!(
        (s.num("stored_files"), s.num("failed_files")),
        (2, 0),
        "{}",
        s.stderr
    );
    let p = bitfog(&["plan", c, &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 0, "{}", p.stdout);
    let out = fs::File::open(dst.join("big.bin")).unwrap();
    assert_eq!(out.metadata().unwrap().len(), total * MIB);
    for i in [0, 1, 4095, 4096, total - 1] {
        let mut stamp = [0u8; 8];
        out.read_exact_at(&mut stamp, i * MIB).unwrap();
        assert_eq!(u64::from_le_bytes(stamp), i);
    }
    bitfog(&["builddb", &du, &t.s("dst.db")]).ok();
    let line = |db: &str| -> String {
        fs::read_to_string(t.path(db))
            .unwrap()
            .lines()
            .find(|l| l.contains("big.bin"))
            .unwrap()
            .split("\"mtime_ns\"")
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(line("src.db"), line("dst.db"));
}

#[test]
#[ignore = "needs root, exfatprogs and exfat-fuse"]
fn on_exfat_a_clash_across_trips_and_a_tampered_pack_lose_nothing() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "pics/photo.jpg", &data(1, 300_000));
    {
        let f = fs::File::create(src.join("vm.img")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&data(2, 2 << 20), 16 << 20).unwrap();
    }
    let disk = Mounted::new(&t, "exfat", 64);
    let courier = disk.dir.join("c");
    let c = courier.to_str().unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, c, "--json"]).ok();
    assert_eq!(f.num("fetched_files"), 2);
    assert!(courier.join("pics/photo.jpg").is_file());
    // The other spelling appears at the source before the courier leaves:
    // the next fetch keeps both.
    write(&src, "pics/Photo.JPG", &data(3, 200_000));
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, c, "--json"]).ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("remaining_files")),
        (1, 0),
        "{}",
        f.stderr
    );
    assert_eq!(
        fs::read(courier.join("pics/photo.jpg")).unwrap(),
        data(1, 300_000),
        "the first spelling is untouched"
    );
    let held = held_files(&courier);
    assert!(held.iter().any(|n| n.ends_with("-Photo.JPG")), "{held:?}");
    // A byte of the sparse image's pack changes on the way.
    let pack = held_files(&courier)
        .into_iter()
        .find(|p| p.ends_with("-vm.img.extents"))
        .map(|p| courier.join(".bitfog/names").join(p))
        .expect("the sparse image is kept as its extents");
    assert!(fs::metadata(&pack).unwrap().len() < 3 << 20);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[100] ^= 1;
    fs::write(&pack, &bytes).unwrap();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let s = bitfog(&["store", &t.s("src.db"), &du, c, "--json"]).code(1);
    assert_eq!((s.num("stored_files"), s.num("failed_files")), (2, 1));
    assert!(
        s.stderr.contains("'vm.img'") && s.stderr.contains("damaged"),
        "{}",
        s.stderr
    );
    assert!(!dst.join("vm.img").exists(), "nothing damaged appears");
    // The next trip replaces it.
    let f = bitfog(&["fetch", c, &su, c, "--json"]).ok();
    assert_eq!(f.num("fetched_files"), 1, "{}", f.stderr);
    bitfog(&["store", &t.s("src.db"), &du, c, "--json"]).ok();
    assert_eq!(files(&src), files(&dst));
}

#[test]
#[ignore = "needs root, exfatprogs and exfat-fuse"]
fn on_exfat_kill_9_mid_fetch_then_the_rerun_carries_every_name() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let t = Scratch::new();
    let src = t.mkdir("src");
    // Names the courier holds, names it cannot, and clashing spellings.
    for i in 0..60u64 {
        let name = match i % 3 {
            0 => format!("d/n:{i}.txt"),
            1 => format!("d/Same{i}.txt"),
            _ => format!("d/same{}.txt", i - 1),
        };
        write(&src, &name, &data(i, 40_000 + i as usize * 100));
    }
    write(&src, "big.bin", &data(99, 3 << 20));
    let disk = Mounted::new(&t, "exfat", 64);
    let dsts: Vec<PathBuf> = (1..=4).map(|i| t.mkdir(&format!("dst{i}"))).collect();
    let conf = format!(
        "{{\"src\":{{\"path\":{:?}}},{}}}",
        src.to_str().unwrap(),
        dsts.iter()
            .enumerate()
            .map(|(i, d)| format!(
                "\"dst{}\":{{\"path\":{:?},\"writable\":true}}",
                i + 1,
                d.to_str().unwrap()
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let server = Server::start(&t, "site", &conf);
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    // Killed after 1, 2, 3 and 4 MiB of 5.5: each run catches other
    // files between download, placing and recording.
    for mib in 1..=4u64 {
        let courier = disk.dir.join(format!("c{mib}"));
        let c = courier.to_str().unwrap();
        let dst = &dsts[mib as usize - 1];
        let relay = Relay::start(server.addr, Duration::from_millis(20));
        let mut child = cmd(&["fetch", &t.s("dest.db"), &relay.url("src"), c])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while relay.down_bytes.load(Ordering::SeqCst) < mib << 20 {
            assert!(Instant::now() < deadline, "download did not progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let f = bitfog(&["fetch", &t.s("dest.db"), &server.url("src"), c, "--json"]).ok();
        assert_eq!(
            (f.num("failed_files"), f.num("remaining_files")),
            (0, 0),
            "{}",
            f.stderr
        );
        let s = bitfog(&[
            "store",
            &t.s("src.db"),
            &server.url(&format!("dst{mib}")),
            c,
            "--json",
        ])
        .ok();
        assert_eq!((s.num("stored_files"), s.num("failed_files")), (61, 0));
        assert_eq!(files(&src), files(dst));
        // Nothing is left in .bitfog/names/ that no record names.
        let log = fs::read_to_string(courier.join(".bitfog/carried.jsonl")).unwrap();
        for n in held_files(&courier) {
            assert!(log.contains(&n), "{n} is in no record");
        }
    }
}

/// An encrypted courier on exFAT: every odd name and the sparse image
/// arrive, and the courier holds only random names and the image's data.
#[test]
#[ignore = "needs root, exfatprogs and exfat-fuse"]
fn an_encrypted_exfat_courier_carries_every_name() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    odd_tree(&src);
    let disk = Mounted::new(&t, "exfat", 192);
    let courier = disk.dir.join("trip");
    let c = courier.to_str().unwrap();
    let key = t.s("dest.key");
    let k = bitfog(&["keygen", "-o", &key]).ok();
    let recipient = k.stderr.trim().rsplit(' ').next().unwrap().to_string();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &su,
        c,
        "--encrypt-to",
        &recipient,
        "--json",
    ])
    .ok();
    assert_eq!(f.num("fetched_files"), ODD.len() as u64 + 1, "{f}");
    assert!(visible(&courier).is_empty(), "{:?}", visible(&courier));
    let held = held_files(&courier);
    assert!(
        held.iter().all(|n| n.len() <= 3 + 32 + ".extents".len()),
        "{held:?}"
    );
    assert!(disk_used(&courier) < 32 << 20, "the image's data only");
    let s = bitfog(&["store", c, &du, c, "-i", &key, "--json"]).ok();
    assert_eq!(s.num("failed_files"), 0, "{s}");
    assert_eq!(files(&src), files(&dst), "the trees differ");
}

/// A destination area on a filesystem that folds case (exFAT here): two
/// names that differ only in case would be one file there, one of them
/// holding the other's content. Each name that would clash is refused
/// with its reason, never stored over another, and the receipt says it
/// is still missing; `--delete` clears a destination name the source
/// does not have, and the next run stores the source's.
#[test]
#[ignore = "needs root, exfatprogs and exfat-fuse"]
fn a_destination_that_folds_case_never_makes_two_names_one_file() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    let disk = Mounted::new(&t, "exfat", 64);
    let dst = disk.dir.join("dst");
    fs::create_dir(&dst).unwrap();
    write(&src, "Photo.JPG", &data(1, 3_000));
    write(&src, "photo.jpg", &data(2, 4_000));
    write(&src, "dir/x", &data(3, 500));
    write(&dst, "DIR/y", &data(4, 700));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let head = |area: &str| get(server.addr, &format!("/{area}/"));
    assert_eq!(
        head("dst").header("x-bitfog-folds-case").as_deref(),
        Some("1")
    );
    assert_eq!(head("src").header("x-bitfog-folds-case"), None);
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let c = t.s("courier");
    bitfog(&["fetch", &t.s("dest.db"), &su, &c]).ok();
    let store = |delete: bool| {
        let mut cmd = vec!["store", "--json"];
        let db = t.s("src.db");
        cmd.extend([db.as_str(), du.as_str(), c.as_str()]);
        if delete {
            cmd.push("--delete");
        }
        bitfog(&cmd)
    };
    let s = store(false).code(1);
    assert_eq!(
        (s.num("stored_files"), s.num("failed_files")),
        (1, 2),
        "{s}"
    );
    assert!(
        s.stderr.contains("'photo.jpg': not stored: the destination's filesystem folds case, and SRCDB has another name")
            && s.stderr.contains("'dir/x': not stored: the destination's filesystem folds case, and it has a name the source does not"),
        "{s}"
    );
    assert_eq!(fs::read(dst.join("Photo.JPG")).unwrap(), data(1, 3_000));
    assert_eq!(fs::read(dst.join("DIR/y")).unwrap(), data(4, 700));
    // The receipt is honest: the way back carries both again.
    let p = bitfog(&["plan", &c, &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 2, "{p}");
    let s = store(true).code(1);
    assert_eq!(s.num("deleted_files"), 1, "{s}");
    let s = store(true).code(1);
    assert_eq!(
        (s.num("stored_files"), s.num("failed_files")),
        (1, 1),
        "{s}"
    );
    assert_eq!(fs::read(dst.join("dir/x")).unwrap(), data(3, 500));
    assert_eq!(fs::read(dst.join("Photo.JPG")).unwrap(), data(1, 3_000));
    let names: Vec<String> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["Photo.JPG", "dir"]);
}
