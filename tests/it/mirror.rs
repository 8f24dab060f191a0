//! The destination ends as an exact mirror: names, contents, modes, owners
//! and nanosecond mtimes of files and directories, after renames and
//! deletions of directories.

use crate::util::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

/// `find -printf '%P %y %m %U %G %T@ %s\n'` of everything below `root`
/// (the root itself as ""; no size for directories, which is the
/// filesystem's business), sorted; with `owners` false the owner columns
/// are left out.
fn listing(root: &Path, owners: bool) -> Vec<String> {
    let who = if owners { " %U %G" } else { "" };
    let mut lines = Vec::new();
    for (kind, fmt) in [
        (["!", "-type", "d"], format!("%P %y %m{who} %T@ %s\\n")),
        (["-type", "d", "-true"], format!("%P %y %m{who} %T@\\n")),
    ] {
        let out = std::process::Command::new("find")
            .arg(root)
            .args(kind)
            .args(["-printf", &fmt])
            .output()
            .unwrap();
        assert!(out.status.success());
        lines.extend(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_string),
        );
    }
    lines.sort();
    lines
}

#[track_caller]
fn assert_mirror(src: &Path, dst: &Path, owners: bool) {
    assert_same_tree(src, dst);
    let (a, b) = (listing(src, owners), listing(dst, owners));
    let only = |x: &[String], y: &[String]| -> Vec<String> {
        x.iter().filter(|l| !y.contains(l)).cloned().collect()
    };
    assert!(
        a == b,
        "source only:\n{}\ndestination only:\n{}",
        only(&a, &b).join("\n"),
        only(&b, &a).join("\n")
    );
}

/// Sets a path's mtime to `secs` and `nanos`.
fn touch(p: &Path, secs: u64, nanos: u32) {
    let t = UNIX_EPOCH + Duration::new(secs, nanos);
    let f = fs::File::open(p).unwrap();
    f.set_modified(t).unwrap();
}

/// A tree with nanosecond mtimes everywhere, a private directory, an
/// empty one and a deep one; directories' mtimes set last.
fn make_source(src: &Path) {
    write(src, "photos/été 2024/a.jpg", &data(1, 20_000));
    write(src, "photos/été 2024/b.jpg", &data(2, 30_000));
    write(src, "deep/a/b/c/d/file", b"deep");
    write(src, "private/secret", b"s3cret");
    write(src, "top.txt", b"top");
    fs::create_dir_all(src.join("empty")).unwrap();
    chmod(src, "private/secret", 0o600);
    let mut n = 0;
    for f in [
        "photos/été 2024/a.jpg",
        "photos/été 2024/b.jpg",
        "deep/a/b/c/d/file",
        "private/secret",
        "top.txt",
    ] {
        n += 1;
        touch(&src.join(f), 1_700_000_000 + n, 123_456_789 + n as u32);
    }
    set_dir_times(src);
    chmod(src, "private", 0o700);
    chmod(src, "empty", 0o750);
}

/// Gives every directory below `root` (deepest first, then the root) an
/// mtime of its own to the nanosecond.
fn set_dir_times(root: &Path) {
    let out = std::process::Command::new("find")
        .arg(root)
        .args(["-depth", "-type", "d", "-print0"])
        .output()
        .unwrap();
    for (i, p) in out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let p = Path::new(std::str::from_utf8(p).unwrap());
        touch(p, 1_600_000_000 + i as u64, 987_654_321 - i as u32);
    }
}

/// Two trips: the first carries the tree; between them directories are
/// renamed and deleted, modes and mtimes change; the second, with
/// `--delete`, leaves no difference. Both trips use the courier as the
/// DB on either side (`fetch C SRC C`, `store C DEST C`).
fn two_trips(t: &Scratch, conf: &str, owners: bool, between: impl Fn(&Path)) {
    let (src, dst) = (t.path("src"), t.path("dst"));
    let server = Server::start(t, "site", conf);
    let (su, du) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    bitfog(&["fetch", &t.s("empty.db"), &su, &c]).ok();
    bitfog(&["store", &c, &du, &c]).ok();
    assert_mirror(&src, &dst, owners);

    between(&src);
    bitfog(&["fetch", &c, &su, &c]).ok();
    let s = bitfog(&["store", &c, &du, &c, "--delete", "--json"]).ok();
    assert!(s.num("dirs_removed") >= 5, "{s}");
    assert!(!dst.join("photos/été 2024").exists(), "{s}");
    assert!(!dst.join("deep/a").exists(), "{s}");
    assert_mirror(&src, &dst, owners);
    // A third run has nothing to do.
    bitfog(&["fetch", &c, &su, &c]).ok();
    let s = bitfog(&["store", &c, &du, &c, "--delete", "--json"]).ok();
    assert_eq!(
        (
            s.num("stored_files"),
            s.num("updated_files"),
            s.num("dirs_made")
        ),
        (0, 0, 0),
        "{s}"
    );
    assert_mirror(&src, &dst, owners);
}

fn rename_and_delete(src: &Path) {
    fs::rename(src.join("photos/été 2024"), src.join("photos/summer 2024")).unwrap();
    fs::remove_dir_all(src.join("deep/a")).unwrap();
    write(src, "deep/new.txt", b"new");
    chmod(src, "photos", 0o711);
    touch(&src.join("top.txt"), 1_750_000_000, 1);
    set_dir_times(src);
}

#[test]
fn a_trip_after_directory_renames_and_deletions_leaves_an_exact_mirror() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    make_source(&src);
    two_trips(&t, &two_areas(&src, &dst), false, rename_and_delete);
    let m = fs::metadata(dst.join("private")).unwrap();
    assert_eq!(m.mode() & 0o777, 0o700, "a private directory stays private");
    let m = fs::metadata(dst.join("photos/summer 2024/a.jpg")).unwrap();
    assert_eq!(m.mtime_nsec(), 123_456_790, "to the nanosecond");
}

#[test]
#[ignore = "needs root (chown)"]
fn owners_travel_where_the_destination_area_applies_them() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it chowns"
    );
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    make_source(&src);
    let chown = |rel: &str, uid: u32, gid: u32| {
        std::os::unix::fs::lchown(src.join(rel), Some(uid), Some(gid)).unwrap();
    };
    chown("top.txt", 1000, 1000);
    chown("private", 1001, 1002);
    chown("private/secret", 1001, 1002);
    chown("photos/été 2024/b.jpg", 0, 1000);
    std::os::unix::fs::symlink("top.txt", src.join("link")).unwrap();
    chown("link", 1003, 1003);
    set_dir_times(&src);
    let conf = format!(
        "{{\"src\":{{\"path\":{:?}}},\"dst\":{{\"path\":{:?},\"writable\":true,\"owners\":true}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    two_trips(&t, &conf, true, |src| {
        rename_and_delete(src);
        std::os::unix::fs::lchown(src.join("top.txt"), Some(1005), Some(1005)).unwrap();
        set_dir_times(src);
    });
    assert_eq!(fs::metadata(dst.join("top.txt")).unwrap().uid(), 1005);
}

#[test]
fn without_owners_the_destination_says_so_once() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", b"a");
    write(&src, "b", b"b");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    bitfog(&["fetch", &t.s("empty.db"), &su, &c]).ok();
    bitfog(&["store", &c, &du, &c]).ok();
    // The listing names owners; a plain one stays as the SPEC shows it.
    let ext = String::from_utf8(get(server.addr, "/src/?dirs=1&alldirs=1&meta=1").body).unwrap();
    assert!(ext.lines().next().unwrap().contains("\"uid\":"), "{ext}");
    let plain = String::from_utf8(get(server.addr, "/src/").body).unwrap();
    assert!(
        !plain.contains("\"uid\"") && !plain.contains("mtime_ns"),
        "{plain}"
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        for n in ["a", "b"] {
            std::os::unix::fs::lchown(src.join(n), Some(4242), Some(4242)).unwrap();
        }
        bitfog(&["fetch", &c, &su, &c]).ok();
        let s = bitfog(&["store", &c, &du, &c]).ok();
        let said: Vec<&str> = s.stderr.lines().filter(|l| l.contains("owners")).collect();
        assert_eq!(said.len(), 1, "{s}");
        assert!(said[0].contains("\"owners\": true"), "{s}");
        assert_eq!(
            fs::metadata(dst.join("a")).unwrap().uid(),
            0,
            "left as it was"
        );
    }
}
