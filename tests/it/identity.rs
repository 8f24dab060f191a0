//! Wrong DBs caught by area identity, whatever URL reaches the server.

use crate::util::*;
use std::fs;

fn header(db: &std::path::Path) -> serde_json::Value {
    let text = fs::read_to_string(db).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[test]
fn swapped_dbs_are_refused_before_anything_is_touched() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "new", &data(1, 5_000));
    write(&dst, "only-at-dest", &data(2, 5_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    // The same server under another name: identity, not URL, decides.
    let other = |u: String| u.replace("127.0.0.1", "localhost");
    let (src_url, dst_url) = (server.url("src"), server.url("dst"));
    bitfog(&["builddb", &src_url, &t.s("src.db")]).ok();
    bitfog(&["builddb", &dst_url, &t.s("dst.db")]).ok();
    let (hs, hd) = (header(&t.path("src.db")), header(&t.path("dst.db")));
    let id = |h: &serde_json::Value| h["area_id"].as_str().unwrap().to_string();
    assert_eq!(id(&hs).len(), 32, "{hs}");
    assert_ne!(id(&hs), id(&hd));
    // The extended end record carries it too; a plain listing's does not.
    let end = |target: &str| {
        let body = String::from_utf8(get(server.addr, target).body).unwrap();
        serde_json::from_str::<serde_json::Value>(body.lines().last().unwrap()).unwrap()
    };
    assert_eq!(end("/src/?dirs=1")["area_id"], hs["area_id"]);
    assert!(end("/src/").get("area_id").is_none());
    // The same area reached by another name has the same identity.
    bitfog(&["builddb", &other(src_url.clone()), &t.s("src2.db")]).ok();
    assert_eq!(id(&header(&t.path("src2.db"))), id(&hs));

    // The source's DB given as DESTDB.
    for cmd in [
        vec!["plan", &t.s("src.db"), &other(src_url.clone())],
        vec![
            "fetch",
            &t.s("src.db"),
            &other(src_url.clone()),
            &t.s("courier"),
        ],
        vec![
            "fetch",
            &t.s("src.db"),
            &other(src_url.clone()),
            &t.s("courier"),
            "--dry-run",
        ],
    ] {
        let r = bitfog(&cmd).code(2);
        assert!(r.stderr.contains("describes the source area"), "{r}");
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
    }
    assert!(!t.path("courier").exists(), "fetch touched the courier");

    // A real trip, then the destination's DB given as SRCDB.
    bitfog(&["fetch", &t.s("dst.db"), &src_url, &t.s("courier")]).ok();
    let before = (tree(&dst), tree(&t.path("courier")));
    let (dst_db, dst_other, courier) = (t.s("dst.db"), other(dst_url.clone()), t.s("courier"));
    for extra in [&[][..], &["--delete"][..], &["--dry-run", "--delete"][..]] {
        let mut cmd = vec!["store", &dst_db, &dst_other, &courier];
        cmd.extend_from_slice(extra);
        let r = bitfog(&cmd).code(2);
        assert!(r.stderr.contains("describes the destination area"), "{r}");
    }
    assert_eq!((tree(&dst), tree(&t.path("courier"))), before);

    // The right DBs work; the receipt names the destination, so it is a
    // good DESTDB on the way back, and a bad SRCDB for the destination.
    bitfog(&["store", &t.s("src.db"), &dst_url, &t.s("courier")]).ok();
    assert_eq!(fs::read(dst.join("new")).unwrap(), data(1, 5_000));
    let receipt = t.path("courier/.bitfog/receipt.jsonl");
    assert_eq!(id(&header(&receipt)), id(&hd));
    bitfog(&["plan", &t.s("courier"), &src_url]).ok();
    let r = bitfog(&["plan", &t.s("courier"), &dst_url]).code(2);
    assert!(r.stderr.contains("describes the source area"), "{r}");
}

#[test]
fn dbs_without_an_identity_still_work() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "f", &data(3, 4_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("e.db")]).ok();
    assert!(header(&t.path("e.db")).get("area_id").is_none());
    // An older DB: a header with no area_id.
    bitfog(&["builddb", &server.url("src"), &t.s("old.db")]).ok();
    let text = fs::read_to_string(t.path("old.db")).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let mut h: serde_json::Value = serde_json::from_str(first).unwrap();
    h.as_object_mut().unwrap().remove("area_id");
    fs::write(t.path("old.db"), format!("{h}\n{rest}")).unwrap();
    bitfog(&["fetch", &t.s("e.db"), &server.url("src"), &t.s("c")]).ok();
    bitfog(&["store", &t.s("old.db"), &server.url("dst"), &t.s("c")]).ok();
    assert_eq!(fs::read(dst.join("f")).unwrap(), data(3, 4_000));
}

/// A courier stored into another area than its trip was planned for (a
/// mistyped area name) is refused before anything is touched: files of
/// the same names there would be replaced. `--other-dest` takes an area
/// that moved, and its deletions still keep what the snapshot never saw.
#[test]
fn a_courier_stored_into_another_area_than_planned_is_refused() {
    let t = Scratch::new();
    let (src, dst, dst2) = (t.mkdir("src"), t.mkdir("dst"), t.mkdir("dst2"));
    write(&src, "IMG_0001.jpg", &data(1, 6_000));
    write(&dst, "gone", &data(2, 100));
    write(&dst2, "IMG_0001.jpg", &data(3, 6_000));
    write(&dst2, "precious", &data(4, 100));
    let conf = areas(&[
        ("src", &src, false),
        ("dst", &dst, true),
        ("dst2", &dst2, true),
    ]);
    let server = Server::start(&t, "site", &conf);
    let (su, du, du2) = (server.url("src"), server.url("dst"), server.url("dst2"));
    let c = t.s("courier");
    bitfog(&["builddb", &du, &t.s("dst.db")]).ok();
    bitfog(&["fetch", &t.s("dst.db"), &su, &c]).ok();
    let before = (tree(&dst2), tree(&t.path("courier")));
    for extra in [&[][..], &["--delete"][..], &["--dry-run"][..]] {
        let mut cmd = vec!["store", &c, &du2, &c];
        cmd.extend_from_slice(extra);
        let r = bitfog(&cmd).code(2);
        assert!(
            r.stderr
                .contains("not the area the courier's trip was planned for")
                && r.stderr.contains(&du)
                && r.stderr.contains("--other-dest"),
            "{r}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
    }
    assert_eq!((tree(&dst2), tree(&t.path("courier"))), before);
    // The same area under another name is the planned one.
    let other = du.replace("127.0.0.1", "localhost");
    bitfog(&["store", &c, &other, &c, "--dry-run"]).ok();
    // Told so, the other area takes it; what the snapshot never saw stays.
    let s = bitfog(&["store", &c, &du2, &c, "--other-dest", "--delete", "--json"]).ok();
    assert_eq!(s.num("kept_files"), 1, "{s}");
    assert!(s.stderr.contains("as --other-dest asks"), "{s}");
    assert_eq!(fs::read(dst2.join("IMG_0001.jpg")).unwrap(), data(1, 6_000));
    assert_eq!(fs::read(dst2.join("precious")).unwrap(), data(4, 100));
    // The planned area, as ever.
    bitfog(&["store", &c, &du, &c, "--delete"]).ok();
    assert_same_tree(&src, &dst);
}

/// A courier holding one area's trip, not stored yet, is not refilled
/// from another area (its files would be pruned as not needed there);
/// once stored, it is.
#[test]
fn a_courier_holding_another_areas_trip_is_not_refilled_until_stored() {
    let t = Scratch::new();
    let (a, b, dst) = (t.mkdir("a"), t.mkdir("b"), t.mkdir("dst"));
    write(&a, "from-a", &data(1, 7_000));
    write(&b, "from-b", &data(2, 7_000));
    let conf = areas(&[("a", &a, false), ("b", &b, false), ("dst", &dst, true)]);
    let server = Server::start(&t, "site", &conf);
    let (ua, ub, du) = (server.url("a"), server.url("b"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["builddb", &du, &t.s("dst.db")]).ok();
    bitfog(&["fetch", &t.s("dst.db"), &ua, &c]).ok();
    let before = tree(&t.path("courier"));
    let dst_db = t.s("dst.db");
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut cmd = vec!["fetch", &dst_db, &ub, &c];
        cmd.extend_from_slice(extra);
        let r = bitfog(&cmd).code(2);
        assert!(
            r.stderr.contains("holds a trip from another source area")
                && r.stderr.contains(&ua)
                && r.stderr.contains("store it first"),
            "{r}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
    }
    assert_eq!(tree(&t.path("courier")), before, "nothing pruned");
    // The same area again is its next trip.
    bitfog(&["fetch", &t.s("dst.db"), &ua, &c]).ok();
    bitfog(&["store", &c, &du, &c]).ok();
    assert_eq!(fs::read(dst.join("from-a")).unwrap(), data(1, 7_000));
    // Stored: the directory may carry the other area's trip now.
    bitfog(&["fetch", &t.s("dst.db"), &ub, &c]).ok();
    assert_eq!(fs::read(t.path("courier/from-b")).unwrap(), data(2, 7_000));
}

#[test]
fn the_courier_carries_its_own_source_manifest() {
    let t = Scratch::new();
    let (src, dst, other) = (t.mkdir("src"), t.mkdir("dst"), t.mkdir("other"));
    write(&src, "a/one", &data(1, 9_000));
    write(&src, "two", &data(2, 7_000));
    write(&other, "x", &data(3, 100));
    let conf = areas(&[
        ("src", &src, false),
        ("dst", &dst, true),
        ("other", &other, false),
    ]);
    let server = Server::start(&t, "site", &conf);
    let (su, du) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&["emptydb", &t.s("e.db")]).ok();
    // An SRCDB made before the source changed.
    bitfog(&["builddb", &su, &t.s("stale.db")]).ok();
    bitfog(&["builddb", &server.url("other"), &t.s("other.db")]).ok();
    write(&src, "three", &data(4, 3_000));
    write(&src, "two", &data(5, 7_000));

    // Two commands, no builddb at the source.
    bitfog(&["fetch", &t.s("e.db"), &su, &c]).ok();
    let manifest = t.path("courier/.bitfog/source.jsonl");
    assert_eq!(header(&manifest)["source"], su.as_str());

    // Wrong SRCDBs are refused and change nothing.
    let before = (tree(&dst), tree(&t.path("courier")));
    let r = bitfog(&["store", &t.s("stale.db"), &du, &c]).code(1);
    assert!(
        r.stderr.contains("older than the courier")
            && r.stderr.contains("'three'")
            && r.stderr.contains("'two'")
            && !r.stderr.contains("'a/one'"),
        "{r}"
    );
    let r = bitfog(&["store", &t.s("other.db"), &du, &c]).code(2);
    assert!(r.stderr.contains("another area"), "{r}");
    assert_eq!((tree(&dst), tree(&t.path("courier"))), before);

    bitfog(&["store", &c, &du, &c]).ok();
    assert_eq!(tree(&dst), tree(&src));

    // A directory without a manifest is not taken for an SRCDB.
    let r = bitfog(&["store", &t.s("e.db").replace("e.db", ""), &du, &c]).code(2);
    assert!(r.stderr.contains("without a source manifest"), "{r}");
}
