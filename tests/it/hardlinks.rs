//! Hard links arrive as hard links: snapshot trees made of links (as
//! rsnapshot and `rsync --link-dest` make them) do not multiply.

use crate::util::*;
use std::fs;
use std::path::Path;

/// `find -printf '%P %n\n'` of the regular files below `root`: each name
/// with its link count, sorted.
fn link_counts(root: &Path) -> Vec<String> {
    let out = std::process::Command::new("find")
        .arg(root)
        .args(["-type", "f", "-printf", "%P %n\\n"])
        .output()
        .unwrap();
    let mut v: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Bytes `du` counts below `root` (each file once, however many names).
fn du(root: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(root)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn link(root: &Path, from: &str, to: &str) {
    let to = root.join(to);
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::hard_link(root.join(from), to).unwrap();
}

/// Three snapshots: some files linked three times, some twice, some not
/// at all.
fn snapshots(src: &Path) {
    for i in 0..6 {
        write(src, &format!("daily.0/f{i}"), &data(10 + i, 200_000));
    }
    for i in 0..6 {
        link(src, &format!("daily.0/f{i}"), &format!("daily.1/f{i}"));
    }
    write(src, "daily.1/f6", &data(20, 150_000));
    for i in 0..3 {
        link(src, &format!("daily.0/f{i}"), &format!("daily.2/f{i}"));
    }
    link(src, "daily.1/f6", "daily.2/f6");
    write(src, "daily.2/f7", &data(21, 100_000));
    write(src, "lonely", &data(22, 50_000));
}

#[track_caller]
fn assert_linked_alike(src: &Path, dst: &Path) {
    assert_same_tree(src, dst);
    assert_eq!(link_counts(src), link_counts(dst), "link counts differ");
    let (a, b) = (du(src), du(dst));
    assert!(a.abs_diff(b) * 100 <= a, "du: source {a}, destination {b}");
}

#[test]
fn linked_snapshots_arrive_linked_and_a_new_one_carries_only_its_new_content() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    snapshots(&src);
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du_) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    // The listing names each file's link group.
    let listing = String::from_utf8(get(server.addr, "/src/?meta=1").body).unwrap();
    let group = |name: &str| -> serde_json::Value {
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("\"name\":\"{name}\"")))
            .unwrap();
        serde_json::from_str::<serde_json::Value>(line).unwrap()["hardlink"].clone()
    };
    assert_eq!(group("daily.0/f1"), group("daily.2/f1"));
    assert_ne!(group("daily.0/f1"), group("daily.0/f2"));
    assert!(group("lonely").is_null() && group("daily.2/f7").is_null());
    let plain = String::from_utf8(get(server.addr, "/src/").body).unwrap();
    assert!(!plain.contains("hardlink"), "{plain}");

    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    let p = bitfog(&["plan", &t.s("empty.db"), &su, "--json"]).ok();
    let f = bitfog(&["fetch", &t.s("empty.db"), &su, &c, "--json"]).ok();
    // Each file's content travels once; its other names cost nothing.
    let once = 6 * 200_000 + 150_000 + 100_000 + 50_000;
    assert_eq!(f.num("fetched_bytes"), once, "{f}");
    assert_eq!(p.num("trip_bytes"), once, "{p}");
    assert_eq!(f.num("instructed_files"), 6 + 3 + 1, "{f}");
    let copies = fs::read_to_string(t.path("courier/.bitfog/copies.jsonl")).unwrap();
    assert_eq!(copies.matches("\"link\":true").count(), 10, "{copies}");
    let s = bitfog(&["store", &c, &du_, &c, "--json"]).ok();
    assert_eq!(s.num("linked_files"), 10, "{s}");
    assert_linked_alike(&src, &dst);

    // A new snapshot: links to the last one, and one new file.
    for i in 0..3 {
        link(&src, &format!("daily.2/f{i}"), &format!("daily.3/f{i}"));
    }
    link(&src, "daily.2/f7", "daily.3/f7");
    write(&src, "daily.3/f8", &data(23, 70_000));
    let f = bitfog(&["fetch", &c, &su, &c, "--json"]).ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("fetched_bytes")),
        (1, 70_000),
        "{f}"
    );
    let s = bitfog(&["store", &c, &du_, &c, "--json"]).ok();
    assert_eq!(s.num("linked_files"), 4, "{s}");
    assert_linked_alike(&src, &dst);
    // Nothing is left to do; deleting a name removes that link only.
    fs::remove_file(src.join("daily.0/f0")).unwrap();
    bitfog(&["fetch", &c, &su, &c]).ok();
    let s = bitfog(&["store", &c, &du_, &c, "--delete", "--json"]).ok();
    assert_eq!(
        (s.num("stored_files"), s.num("deleted_files")),
        (0, 1),
        "{s}"
    );
    assert_linked_alike(&src, &dst);
    // A changed file changes all its names, as at the source.
    fs::write(src.join("daily.1/f1"), data(24, 210_000)).unwrap();
    bitfog(&["fetch", &c, &su, &c]).ok();
    bitfog(&["store", &c, &du_, &c, "--delete"]).ok();
    assert_linked_alike(&src, &dst);
}

#[test]
fn a_link_group_that_does_not_fit_completes_on_the_next_trip() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a/g1", &data(1, 300_000));
    link(&src, "a/g1", "b/g1");
    link(&src, "a/g1", "c/g1");
    write(&src, "a/g2", &data(2, 250_000));
    link(&src, "a/g2", "b/g2");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du_) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    let f = bitfog(&[
        "fetch",
        &t.s("empty.db"),
        &su,
        &c,
        "--max-bytes",
        "400000",
        "--json",
    ])
    .ok();
    assert_eq!(f.num("fetched_files"), 1, "{f}");
    let s = bitfog(&["store", &c, &du_, &c, "--json"]).ok();
    assert_eq!(
        (s.num("linked_files"), s.num("missing_files")),
        (2, 2),
        "{s}"
    );
    let f = bitfog(&["fetch", &c, &su, &c, "--max-bytes", "400000", "--json"]).ok();
    assert_eq!(f.num("fetched_files"), 1, "{f}");
    let s = bitfog(&["store", &c, &du_, &c, "--json"]).ok();
    assert_eq!(
        (s.num("linked_files"), s.num("missing_files")),
        (1, 0),
        "{s}"
    );
    assert_linked_alike(&src, &dst);
}

#[test]
fn a_link_request_never_leaves_the_area() {
    let t = Scratch::new();
    let (src, dst, outside) = (t.mkdir("src"), t.mkdir("dst"), t.mkdir("outside"));
    write(&outside, "secret", b"outside");
    write(&dst, "inside", b"inside");
    std::os::unix::fs::symlink(outside.join("secret"), dst.join("door")).unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let sha = sha256_hex(b"outside");
    for (from, status) in [
        ("..%2Foutside%2Fsecret", 400),
        ("%2Fetc%2Fpasswd", 400),
        (".bitfog-x", 400),
        ("door", 409),
        ("missing", 409),
    ] {
        let r = http(
            server.addr,
            "PUT",
            "/dst/stolen",
            &[
                ("X-Bitfog-Link", from),
                ("X-Bitfog-Size", "7"),
                ("X-Bitfog-Sha256", &sha),
            ],
            b"",
        );
        assert_eq!(r.status, status, "{from}");
        assert!(!dst.join("stolen").exists(), "{from}");
    }
    // Within the area, a link is made; the wrong size is refused.
    let ok = |size: &str| {
        http(
            server.addr,
            "PUT",
            "/dst/again",
            &[
                ("X-Bitfog-Link", "inside"),
                ("X-Bitfog-Size", size),
                ("X-Bitfog-Sha256", &sha256_hex(b"inside")),
            ],
            b"",
        )
        .status
    };
    assert_eq!(ok("5"), 409);
    assert_eq!(ok("6"), 204);
    assert_eq!(link_counts(&dst), ["again 2", "inside 2"]);
    // A read-only area answers 405.
    let r = http(
        server.addr,
        "PUT",
        "/src/x",
        &[("X-Bitfog-Link", "y"), ("X-Bitfog-Size", "1")],
        b"",
    );
    assert_eq!(r.status, 405);
}

#[test]
#[ignore = "needs root (mounts a tmpfs)"]
fn where_the_destination_cannot_link_the_names_arrive_as_copies() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it mounts a tmpfs"
    );
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a/f", &data(1, 100_000));
    link(&src, "a/f", "m/f");
    // m/ at the destination is another file system: no link can cross.
    let m = dst.join("m");
    fs::create_dir_all(&m).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8M", "tmpfs", m.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(m.clone());
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du_) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    bitfog(&["fetch", &t.s("empty.db"), &su, &c]).ok();
    let s = bitfog(&["store", &c, &du_, &c, "--json"]).ok();
    assert!(s.stderr.contains("cannot make hard links"), "{s}");
    assert_eq!(s.num("failed_files"), 0, "{s}");
    assert_same_tree(&src, &dst);
}

#[test]
fn a_listing_that_calls_different_files_one_file_gets_each_stored_as_itself() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", &data(1, 10_000));
    write(&src, "b", &data(2, 20_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du_) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    bitfog(&["fetch", &t.s("empty.db"), &su, &c]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    // The DB now claims a and b are names of one file.
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    let lying: String = db
        .lines()
        .map(|l| {
            if l.starts_with("{\"name\":\"a\"") || l.starts_with("{\"name\":\"b\"") {
                format!("{},\"hardlink\":1}}\n", l.trim_end_matches('}'))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_eq!(lying.matches("\"hardlink\":1").count(), 2, "{lying}");
    fs::write(t.path("src.db"), lying).unwrap();
    let s = bitfog(&["store", &t.s("src.db"), &du_, &c, "--json"]).ok();
    assert_eq!(
        (s.num("stored_files"), s.num("linked_files")),
        (2, 0),
        "{s}"
    );
    assert_same_tree(&src, &dst);
    assert_eq!(link_counts(&dst), ["a 1", "b 1"]);
}

#[test]
fn without_checksums_two_linked_files_stay_two_files() {
    // Two files of one size and mtime, each with two names: with no
    // SHA-256 in the listing, only the link group tells them apart.
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", &data(1, 4096));
    write(&src, "b", &data(2, 4096));
    link(&src, "a", "a2");
    link(&src, "b", "b2");
    let mtime = fs::metadata(src.join("a")).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(src.join("b"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let conf = two_areas(&src, &dst).replacen("\"}", "\",\"checksum\":false}", 1);
    assert!(conf.contains("\"checksum\":false"), "{conf}");
    let server = Server::start(&t, "site", &conf);
    let listing = String::from_utf8(get(server.addr, "/src/?meta=1").body).unwrap();
    assert!(!listing.contains("sha256"), "{listing}");
    assert!(!listing.contains("\"hardlink\":0"), "{listing}");
    let (su, du_) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    bitfog(&["fetch", &t.s("empty.db"), &su, &c]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let s = bitfog(&["store", &t.s("src.db"), &du_, &c, "--json"]).ok();
    assert_eq!(s.num("linked_files"), 2, "{s}");
    assert_linked_alike(&src, &dst);
    assert_eq!(link_counts(&dst), ["a 2", "a2 2", "b 2", "b2 2"]);

    // A DB from an older server called all four group 0: they arrive as
    // four files, each itself.
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    let old = db
        .replace("\"hardlink\":1", "\"hardlink\":0")
        .replace("\"hardlink\":2", "\"hardlink\":0");
    assert_eq!(old.matches("\"hardlink\":0").count(), 4, "{old}");
    fs::write(t.path("old.db"), old).unwrap();
    for n in ["a", "a2", "b", "b2"] {
        fs::remove_file(dst.join(n)).unwrap();
    }
    let s = bitfog(&["store", &t.s("old.db"), &du_, &c, "--json"]).ok();
    assert_eq!(s.num("linked_files"), 0, "{s}");
    assert_same_tree(&src, &dst);
}
