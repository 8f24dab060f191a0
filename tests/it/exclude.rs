//! Excludes: an area's own (`"exclude"` in bitfog.json) and the client's
//! (`--exclude`): never listed, served, written or deleted, never carried,
//! and never removed by `store --delete`.

use crate::util::*;
use std::fs;

/// NAS clutter, in both sites.
fn clutter(root: &std::path::Path, tag: &[u8]) {
    write(root, "photos/@eaDir/a.jpg/SYNOFILE_THUMB_M.jpg", tag);
    write(root, "photos/.DS_Store", tag);
    write(root, "._a.jpg", tag);
    write(root, "#recycle/old.txt", tag);
    write(root, "Thumbs.db", tag);
}

const CLUTTER: &str = "[\"@eaDir\", \"#recycle\", \".DS_Store\", \"._*\", \"Thumbs.db\"]";

#[test]
fn an_areas_excludes_are_never_listed_served_written_carried_or_deleted() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "photos/a.jpg", b"photo");
    write(&src, "keep/x.txt", b"x");
    clutter(&src, b"source clutter");
    clutter(&dst, b"the destination's own");
    write(&dst, "gone.txt", b"deleted by --delete");
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"exclude\":{CLUTTER}}},\"dst\":{{\"path\":{:?},\"writable\":true,\"exclude\":{CLUTTER}}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let (su, du) = (server.url("src"), server.url("dst"));

    // Not listed (and not counted as skipped), not served.
    let listing = String::from_utf8(get(server.addr, "/src/").body).unwrap();
    assert!(
        !listing.contains("eaDir") && !listing.contains("DS_Store") && !listing.contains("recycle"),
        "{listing}"
    );
    assert!(listing.contains("\"count\":2,"), "{listing}");
    assert!(!listing.contains("skipped"), "{listing}");
    for p in [
        "/src/photos/.DS_Store",
        "/src/photos/@eaDir/a.jpg/SYNOFILE_THUMB_M.jpg",
        "/src/Thumbs.db",
        "/src/._a.jpg",
    ] {
        assert_eq!(get(server.addr, p).status, 404, "{p}");
    }
    // Not written, not deleted, not a copy's source.
    assert_eq!(
        http(server.addr, "PUT", "/dst/Thumbs.db", &[], b"x").status,
        403
    );
    assert_eq!(
        http(server.addr, "PUT", "/dst/a/#recycle/f", &[], b"x").status,
        403
    );
    assert_eq!(
        http(server.addr, "DELETE", "/dst/Thumbs.db", &[], b"").status,
        403
    );
    assert_eq!(
        http(server.addr, "DELETE", "/dst/#recycle", &[], b"").status,
        403
    );
    let copy = http(
        server.addr,
        "PUT",
        "/dst/stolen",
        &[
            ("X-Bitfog-From", "Thumbs.db"),
            ("X-Bitfog-Sha256", &sha256_hex(b"the destination's own")),
        ],
        b"",
    );
    assert_eq!(copy.status, 403);
    assert_eq!(
        fs::read(dst.join("Thumbs.db")).unwrap(),
        b"the destination's own"
    );

    // A trip with --delete: the clutter neither travels nor goes.
    let c = t.s("courier");
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, &c, "--json"]).ok();
    assert_eq!(f.num("fetched_files"), 2, "{f}");
    let s = bitfog(&["store", &c, &du, &c, "--delete", "--json"]).ok();
    assert_eq!(s.num("deleted_files"), 1, "only gone.txt: {s}");
    assert!(!dst.join("gone.txt").exists());
    for n in [
        "photos/@eaDir/a.jpg/SYNOFILE_THUMB_M.jpg",
        "photos/.DS_Store",
        "._a.jpg",
        "#recycle/old.txt",
        "Thumbs.db",
    ] {
        assert_eq!(
            fs::read(dst.join(n)).unwrap(),
            b"the destination's own",
            "{n}"
        );
    }
    assert_eq!(fs::read(dst.join("photos/a.jpg")).unwrap(), b"photo");
}

#[test]
fn the_source_areas_excludes_protect_the_destination_too() {
    // Only the source excludes the clutter: the DB says so, and --delete
    // leaves the destination's own clutter alone.
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a.txt", b"a");
    clutter(&src, b"source clutter");
    clutter(&dst, b"the destination's own");
    write(&dst, "gone.txt", b"deleted by --delete");
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"exclude\":{CLUTTER}}},\"dst\":{{\"path\":{:?},\"writable\":true}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    assert!(
        db.lines()
            .last()
            .unwrap()
            .contains("\"exclude\":[\"@eaDir\""),
        "{db}"
    );
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    let c = t.s("courier");
    bitfog(&["fetch", &t.s("dest.db"), &su, &c]).ok();
    let s = bitfog(&["store", &t.s("src.db"), &du, &c, "--delete", "--json"]).ok();
    assert_eq!(s.num("deleted_files"), 1, "{s}");
    assert!(!dst.join("gone.txt").exists());
    assert_eq!(
        fs::read(dst.join("Thumbs.db")).unwrap(),
        b"the destination's own"
    );
    assert!(
        dst.join("photos/@eaDir/a.jpg").is_dir(),
        "an excluded directory stays"
    );
}

#[test]
fn client_excludes_are_recorded_and_honoured_by_store_delete() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a.txt", b"a");
    write(&src, "b.tmp", b"scratch");
    write(&src, "cache/c", b"cache");
    write(&src, "deep/cache/keep", b"only /cache/ is anchored");
    write(&dst, "own.tmp", b"the destination's own");
    write(&dst, "cache/own", b"the destination's own");
    write(&dst, "gone.txt", b"deleted by --delete");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let ex = ["--exclude", "*.tmp", "--exclude", "/cache/"];
    let b = bitfog(&[&["builddb", &su, &t.s("src.db"), "--json"][..], &ex].concat()).ok();
    assert_eq!(b.num("files"), 2, "{b}");
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    assert!(
        db.lines()
            .next()
            .unwrap()
            .contains("\"exclude\":[\"*.tmp\",\"/cache/\"]"),
        "{db}"
    );
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    let p = bitfog(&[&["plan", &t.s("dest.db"), &su, "--json"][..], &ex].concat()).ok();
    assert_eq!(p.num("remaining_files"), 2, "{p}");
    let c = t.s("courier");
    let f = bitfog(&[&["fetch", &t.s("dest.db"), &su, &c, "--json"][..], &ex].concat()).ok();
    assert_eq!(f.num("fetched_files"), 2, "{f}");
    assert!(!t.path("courier/b.tmp").exists() && !t.path("courier/cache").exists());
    // By the builddb DB and by the courier's own source manifest alike.
    for srcdb in [t.s("src.db"), c.clone()] {
        let s = bitfog(&["store", &srcdb, &du, &c, "--delete", "--dry-run", "--json"]).ok();
        assert_eq!(s.num("deleted_files"), 1, "only gone.txt: {s}");
    }
    bitfog(&["store", &c, &du, &c, "--delete"]).ok();
    assert!(!dst.join("gone.txt").exists());
    assert_eq!(
        fs::read(dst.join("own.tmp")).unwrap(),
        b"the destination's own"
    );
    assert_eq!(
        fs::read(dst.join("cache/own")).unwrap(),
        b"the destination's own"
    );
    assert_eq!(
        fs::read(dst.join("deep/cache/keep")).unwrap(),
        b"only /cache/ is anchored"
    );
    // A pattern that names nothing is a usage error.
    let r = bitfog(&["plan", &t.s("dest.db"), &su, "--exclude", "a//b"]).code(2);
    assert!(r.stderr.contains("exclude pattern 'a//b'"), "{r}");
    bitfog(&["store", &c, &du, &c, "--exclude", "x"]).code(2);
}

#[test]
fn names_only_the_destination_excludes_are_not_stored_and_not_failures() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a.txt", b"a");
    write(&src, "Thumbs.db", b"the source's clutter");
    write(&src, "@eaDir/x/thumb", b"the source's clutter");
    let conf = format!(
        "{{\"src\":{{\"path\":{:?}}},\"dst\":{{\"path\":{:?},\"writable\":true,\"exclude\":{CLUTTER}}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let (su, du) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &c]).ok();
    let s = bitfog(&["store", &c, &du, &c, "--json"]).ok();
    assert_eq!(
        (
            s.num("stored_files"),
            s.num("excluded_files"),
            s.num("failed_files")
        ),
        (1, 2, 0),
        "{s}"
    );
    assert!(!dst.join("Thumbs.db").exists() && !dst.join("@eaDir").exists());
}
