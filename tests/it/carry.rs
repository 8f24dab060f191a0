//! Carrying more per trip: the receipt store leaves for the way back,
//! trip counts, server-side copies for renames and duplicates, and
//! changes of mode or mtime applied without content.

use crate::util::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The entries of a manifest, without header and end line.
fn entries(db: &std::path::Path) -> Vec<serde_json::Value> {
    fs::read_to_string(db)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("name").is_some())
        .collect()
}

/// What a receipt must agree on with a fresh listing: names, sizes,
/// hashes and link targets; files also mode and mtime.
fn essence(db: &std::path::Path) -> Vec<String> {
    entries(db)
        .iter()
        .map(|e| match e.get("linkdest") {
            Some(to) => format!("{} -> {to}", e["name"]),
            None => format!(
                "{} {} {} {} {}",
                e["name"], e["size"], e["sha256"], e["mode"], e["mtime"]
            ),
        })
        .collect()
}

#[test]
fn the_receipt_replaces_builddb_on_the_way_back() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a/one", &data(1, 30_000));
    write(&src, "a/two", &data(2, 20_000));
    write(&src, "three", &data(3, 10_000));
    write(&src, "changed", b"new version\n");
    chmod(&src, "three", 0o640);
    std::os::unix::fs::symlink("a/one", src.join("link")).unwrap();
    write(&dst, "changed", b"old version\n");
    write(&dst, "extra", b"only at the destination\n");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");

    // No receipt yet: a directory is not a DESTDB.
    fs::create_dir_all(t.path("courier")).unwrap();
    let r = bitfog(&["fetch", &courier, &su, &courier]).code(2);
    assert!(r.stderr.contains("without a receipt"), "{r}");
    let r = bitfog(&["plan", &courier, &su]).code(2);
    assert!(r.stderr.contains("without a receipt"), "{r}");

    // Trip one: the budget holds two of the four files.
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let p = bitfog(&[
        "plan",
        &t.s("dest.db"),
        &su,
        "--max-bytes",
        "50000",
        "--json",
    ])
    .ok();
    assert_eq!((p.num("remaining_files"), p.num("trips")), (4, 2), "{p}");
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &su,
        &courier,
        "--max-bytes",
        "50000",
        "--json",
    ])
    .ok();
    assert_eq!(f.num("fetched_files"), 2, "{f}");
    // One courier copy goes bad on the way: store fails it, and the
    // receipt must not claim the destination has it.
    let mut bytes = fs::read(t.path("courier/a/one")).unwrap();
    bytes[7] ^= 1;
    fs::write(t.path("courier/a/one"), bytes).unwrap();
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).code(1);
    assert_eq!(
        (s.num("stored_files"), s.num("failed_files")),
        (2, 1),
        "{s}"
    );
    let receipt = t.path("courier/.bitfog/receipt.jsonl");
    bitfog(&["builddb", &du, &t.s("fresh.db")]).ok();
    assert_eq!(essence(&receipt), essence(&t.path("fresh.db")));
    let text = fs::read_to_string(&receipt).unwrap();
    assert!(
        text.starts_with(&format!("{{\"bitfog\":1,\"source\":\"{du}")),
        "{text}"
    );

    // Trip two, with no builddb: the courier stands in for DESTDB.
    let p = bitfog(&["plan", &courier, &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 3, "{p}");
    let f = bitfog(&["fetch", &courier, &su, &courier, "--json"]).ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("remaining_files")),
        (3, 0),
        "{f}"
    );
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(s.num("failed_files"), 0, "{s}");
    bitfog(&["builddb", &du, &t.s("fresh.db")]).ok();
    assert_eq!(essence(&receipt), essence(&t.path("fresh.db")));
    assert_eq!(fs::read(dst.join("changed")).unwrap(), b"new version\n");
    assert_eq!(
        fs::metadata(dst.join("three"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    assert!(
        dst.join("extra").exists(),
        "nothing is deleted without --delete"
    );

    // Nothing is left: the next fetch from the receipt carries nothing
    // and empties the courier of what the destination has.
    let f = bitfog(&["fetch", &courier, &su, &courier, "--json"]).ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("courier_files")),
        (0, 0),
        "{f}"
    );
    assert!(!t.path("courier/three").exists());
}

#[test]
fn plan_counts_trips_and_files_too_big_for_one() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for (i, kib) in [60, 50, 40, 30, 20, 10, 200].iter().enumerate() {
        write(&src, &format!("f{i}"), &data(i as u64, kib * 1024));
    }
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("e.db")]).ok();
    let p = bitfog(&[
        "plan",
        &t.s("e.db"),
        &server.url("src"),
        "--max-bytes",
        "100K",
        "--json",
    ])
    .ok();
    // 60+40, 50+30+20, 10 (largest first, gaps filled); the 200K file
    // travels in ranges: 90K of room in the third trip, then two more.
    assert_eq!((p.num("trips"), p.num("too_big_files")), (5, 1), "{p}");
    let p = bitfog(&[
        "plan",
        &t.s("e.db"),
        &server.url("src"),
        "--max-bytes",
        "100K",
    ])
    .ok();
    assert!(p.stdout.contains("5 trips of 100.0 KiB"), "{p}");
    assert!(
        p.stdout
            .contains("1 file (200.0 KiB) bigger than one trip travels in ranges"),
        "{p}"
    );
    let p = bitfog(&["plan", &t.s("e.db"), &server.url("src"), "--json"]).ok();
    assert!(
        p.json().get("trips").is_none(),
        "trips only with --max-bytes: {p}"
    );
}

#[test]
fn renames_and_duplicates_travel_as_instructions() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..4 {
        write(&src, &format!("album/track{i}"), &data(10 + i, 1 << 20));
    }
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &courier]).ok();
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();

    // At the source: the directory is renamed, one track is copied, and
    // a new file arrives twice.
    fs::rename(src.join("album"), src.join("records")).unwrap();
    fs::copy(src.join("records/track0"), src.join("copy-of-track0")).unwrap();
    write(&src, "new/a", &data(99, 300_000));
    write(&src, "new/b", &data(99, 300_000));
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    // plan sees the renames and the copy of a file the destination has,
    // and the duplicate pair as one file to carry and an instruction.
    let p = bitfog(&["plan", &courier, &su, "--json"]).ok();
    assert_eq!(
        (p.num("remaining_files"), p.num("instructed_files")),
        (1, 6),
        "{p}"
    );
    let f = bitfog(&["fetch", &courier, &su, &courier, "--json"]).ok();
    assert_eq!(
        (
            f.num("fetched_files"),
            f.num("instructed_files"),
            f.num("remaining_files")
        ),
        (1, 6, 0),
        "{f}"
    );
    assert_eq!(
        f.num("courier_bytes"),
        300_000,
        "only the new content is carried: {f}"
    );
    let copies = fs::read_to_string(t.path("courier/.bitfog/copies.jsonl")).unwrap();
    assert!(copies.len() < 4096, "{copies}");
    // Fetch again (say, after an interruption): the duplicate is made
    // from the copy the courier now holds, not carried a second time.
    let f = bitfog(&["fetch", &courier, &su, &courier, "--json"]).ok();
    assert_eq!(
        (
            f.num("fetched_files"),
            f.num("instructed_files"),
            f.num("courier_bytes")
        ),
        (0, 6, 300_000),
        "{f}"
    );
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--delete", "--json"]).ok();
    assert_eq!(
        (
            s.num("stored_files"),
            s.num("copied_files"),
            s.num("deleted_files"),
            s.num("failed_files")
        ),
        (7, 6, 4, 0),
        "{s}"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn mode_or_mtime_alone_changes_without_content() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "script", &data(1, 50_000));
    write(&src, "notes", &data(2, 5_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &courier]).ok();
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();

    chmod(&src, "script", 0o755);
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(src.join("notes"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let f = bitfog(&["fetch", &courier, &su, &courier, "--json"]).ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("courier_bytes")),
        (0, 0),
        "{f}"
    );
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(
        (s.num("updated_files"), s.num("stored_files")),
        (2, 0),
        "{s}"
    );
    assert_same_tree(&src, &dst);
    let m = fs::metadata(dst.join("notes")).unwrap();
    assert_eq!(m.modified().unwrap(), when);
    // Nothing is left to do.
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(s.num("updated_files"), 0, "{s}");
}

#[test]
fn the_server_checks_a_copy_before_it_appears() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let body = data(5, 100_000);
    write(&dst, "orig", &body);
    write(&dst, "keep", b"keep me\n");
    std::os::unix::fs::symlink("orig", dst.join("link")).unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let good = sha256_hex(&body);
    let bad = sha256_hex(b"other");
    let put = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        http(server.addr, "PUT", path, headers, body).status
    };
    // Wrong hash: 422, nothing appears.
    assert_eq!(
        put(
            "/dst/copy",
            &[("X-Bitfog-From", "orig"), ("X-Bitfog-Sha256", &bad)],
            b""
        ),
        422
    );
    // No hash, a body, a missing source, a symlink source, a bad name.
    assert_eq!(put("/dst/copy", &[("X-Bitfog-From", "orig")], b""), 400);
    assert_eq!(
        put(
            "/dst/copy",
            &[("X-Bitfog-From", "orig"), ("X-Bitfog-Sha256", &good)],
            b"x"
        ),
        400
    );
    assert_eq!(
        put(
            "/dst/copy",
            &[("X-Bitfog-From", "nope"), ("X-Bitfog-Sha256", &good)],
            b""
        ),
        409
    );
    assert_eq!(
        put(
            "/dst/copy",
            &[("X-Bitfog-From", "link"), ("X-Bitfog-Sha256", &good)],
            b""
        ),
        409
    );
    assert_eq!(
        put(
            "/dst/copy",
            &[("X-Bitfog-From", "../src/x"), ("X-Bitfog-Sha256", &good)],
            b""
        ),
        400
    );
    // Over an existing file with a wrong hash: the old file stays.
    assert_eq!(
        put(
            "/dst/keep",
            &[("X-Bitfog-From", "orig"), ("X-Bitfog-Sha256", &bad)],
            b""
        ),
        422
    );
    assert_eq!(fs::read(dst.join("keep")).unwrap(), b"keep me\n");
    assert!(!dst.join("copy").exists());
    // A good copy, with mode and mtime; then a change of mode in place.
    let h = [
        ("X-Bitfog-From", "orig"),
        ("X-Bitfog-Sha256", good.as_str()),
        ("X-Bitfog-Mode", "416"),
        ("X-Bitfog-Mtime", "1234567890"),
    ];
    assert_eq!(put("/dst/sub/copy", &h, b""), 204);
    assert_eq!(fs::read(dst.join("sub/copy")).unwrap(), body);
    let m = fs::metadata(dst.join("sub/copy")).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o777, m.mtime()),
        (0o640, 1234567890)
    );
    let h = [
        ("X-Bitfog-From", "orig"),
        ("X-Bitfog-Sha256", good.as_str()),
        ("X-Bitfog-Mode", "384"),
    ];
    assert_eq!(put("/dst/orig", &h, b""), 204);
    assert_eq!(
        fs::metadata(dst.join("orig")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let names: Vec<String> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".bitfog")),
        "no temporary file is left: {names:?}"
    );
}

#[test]
#[ignore = "needs strace (.ci/run installs it)"]
fn kill_9_during_a_server_side_copy_leaves_everything_as_it_was() {
    require_strace();
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let body = data(6, 32 << 20);
    write(&dst, "orig", &body);
    let conf = t.path("site.json");
    fs::write(&conf, two_areas(&src, &dst)).unwrap();
    // Every write(2) waits 5 ms, so the 32 MiB copy takes about a second.
    let mut server = Server::start_shell(
        &conf,
        &t.path("site.log"),
        &[],
        "strace -f -o /dev/null -e trace=write -e inject=write:delay_enter=5000",
    );
    let addr = server.addr;
    let good = sha256_hex(&body);
    let putter = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let req = format!(
            "PUT /dst/copy HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nX-Bitfog-From: orig\r\nX-Bitfog-Sha256: {good}\r\n\r\n"
        );
        use std::io::{Read, Write};
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    });
    let temp = first_growing(
        &dst,
        |n| n.starts_with(".bitfog-tmp-"),
        "the copy never started",
    );
    kill_9_traced(&mut server);
    putter.join().unwrap();
    assert!(!dst.join("copy").exists(), "no file at the final path");
    assert_eq!(
        fs::read(dst.join("orig")).unwrap(),
        body,
        "the source is intact"
    );
    assert!(temp.exists(), "killed mid-copy");
    // The next server removes the leftover (in the background).
    restart_removing(&conf, &t.path("again.log"), &temp);
}

/// The destination's partial uploads, from a fresh builddb's end record.
fn partials(du: &str, t: &Scratch) -> Vec<(String, u64)> {
    bitfog(&["builddb", du, &t.s("probe.db")]).ok();
    let text = fs::read_to_string(t.path("probe.db")).unwrap();
    let end: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    end.get("partials")
        .and_then(|p| p.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["have"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_file_bigger_than_the_courier_arrives_over_several_trips() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let body = data(42, 10 << 20);
    write(&src, "disk/image.raw", &body);
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let mut carried = Vec::new();
    for trip in 1..=4 {
        let destdb = if trip == 1 {
            t.s("dest.db")
        } else {
            courier.clone()
        };
        let f = bitfog(&[
            "fetch",
            &destdb,
            &su,
            &courier,
            "--max-bytes",
            "3M",
            "--json",
        ])
        .ok();
        carried.push(f.num("range_bytes"));
        assert!(f.num("courier_bytes") <= 3 << 20, "{f}");
        let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
        if trip < 4 {
            assert!(
                !dst.join("disk/image.raw").exists(),
                "not before the last range"
            );
            assert_eq!(s.num("partial_files"), 1, "{s}");
            assert_eq!(
                partials(&du, &t),
                [("disk/image.raw".to_string(), trip * (3 << 20))]
            );
            let receipt = fs::read_to_string(t.path("courier/.bitfog/receipt.jsonl")).unwrap();
            assert!(
                receipt.contains(&format!("\"have\":{}", trip * (3 << 20))),
                "{receipt}"
            );
        } else {
            assert_eq!(s.num("stored_files"), 1, "{s}");
        }
    }
    assert_eq!(
        carried,
        [3 << 20, 3 << 20, 3 << 20, 1 << 20],
        "no range twice"
    );
    assert_eq!(fs::read(dst.join("disk/image.raw")).unwrap(), body);
    assert!(partials(&du, &t).is_empty());
    let names: Vec<String> = fs::read_dir(dst.join("disk"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["image.raw"], "no partial upload is left behind");
    // Nothing more to carry.
    let f = bitfog(&["fetch", &courier, &su, &courier, "--json"]).ok();
    assert_eq!(
        (f.num("remaining_files"), f.num("courier_bytes")),
        (0, 0),
        "{f}"
    );
}

#[test]
#[ignore = "needs strace (.ci/run installs it)"]
fn a_damaged_range_and_a_server_killed_mid_range_lose_nothing() {
    require_strace();
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let body = data(43, 12 << 20);
    write(&src, "big", &body);
    let src_server = Server::start(&t, "src-site", &two_areas(&src, &t.mkdir("unused")));
    let su = src_server.url("src");
    let conf = t.path("dst.json");
    fs::write(&conf, two_areas(&t.mkdir("unused2"), &dst)).unwrap();
    let courier = t.s("courier");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &courier, "--max-bytes", "8M"]).ok();
    let range = fs::read_dir(t.path("courier/.bitfog/ranges"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_none_or(|x| x != "json"))
        .unwrap();

    // A damaged range is refused before it leaves; nothing arrives.
    let good = fs::read(&range).unwrap();
    let mut bad = good.clone();
    bad[1000] ^= 1;
    fs::write(&range, &bad).unwrap();
    let dst_server = Server::start_conf(&conf, &t.path("d1.log"), &[]);
    let du = dst_server.url("dst");
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier]).code(1);
    assert!(s.stderr.contains("damaged"), "{s}");
    assert!(partials(&du, &t).is_empty());
    fs::write(&range, &good).unwrap();
    drop(dst_server);

    // The destination dies mid-range (every write slowed, then kill -9).
    let mut slow = Server::start_shell(
        &conf,
        &t.path("d2.log"),
        &[],
        "strace -f -o /dev/null -e trace=write,pwrite64 -e inject=write:delay_enter=3000",
    );
    let du = slow.url("dst");
    let store = {
        let (srcdb, du, courier) = (t.s("src.db"), du.clone(), courier.clone());
        std::thread::spawn(move || bitfog(&["store", &srcdb, &du, &courier]))
    };
    first_growing(
        &dst,
        |n| n.starts_with(".bitfog-part-") && !n.ends_with(".json"),
        "the upload never started",
    );
    kill_9_traced(&mut slow);
    let s = store.join().unwrap();
    assert_eq!(s.code, 1, "{s}");
    assert!(!dst.join("big").exists());

    // A new server takes the range again from the start of what it holds.
    let dst_server = Server::start_conf(&conf, &t.path("d3.log"), &[]);
    let du = dst_server.url("dst");
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();
    assert_eq!(partials(&du, &t), [("big".to_string(), 8 << 20)]);
    // The rest, and the whole file verifies.
    let f = bitfog(&[
        "fetch",
        &courier,
        &su,
        &courier,
        "--max-bytes",
        "8M",
        "--json",
    ])
    .ok();
    assert_eq!(f.num("range_bytes"), 4 << 20, "{f}");
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();
    assert_eq!(fs::read(dst.join("big")).unwrap(), body);
}

#[test]
#[ignore = "needs a TMPDIR whose filesystem keeps holes"]
fn sparse_images_travel_without_their_holes() {
    use std::os::unix::fs::FileExt;
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    // 32 MiB of which 3 MiB are data, in two extents.
    let img = fs::File::create(src.join("vm.img")).unwrap();
    img.set_len(32 << 20).unwrap();
    img.write_all_at(&data(7, 2 << 20), 1 << 20).unwrap();
    img.write_all_at(&data(8, 1 << 20), 20 << 20).unwrap();
    drop(img);
    let src_alloc = fs::metadata(src.join("vm.img")).unwrap().blocks() * 512;
    assert!(
        src_alloc < 16 << 20,
        "this test needs a TMPDIR whose filesystem keeps holes"
    );
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let relay = Relay::start(server.addr, std::time::Duration::ZERO);
    let (su, du) = (relay.url("src"), relay.url("dst"));
    let courier = t.s("courier");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    assert!(db.contains(&format!("\"alloc\":{src_alloc}")), "{db}");

    // The budget counts allocated bytes: 4 MiB holds the 32 MiB image.
    let before = relay.down_bytes.load(std::sync::atomic::Ordering::SeqCst);
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &su,
        &courier,
        "--max-bytes",
        "4M",
        "--json",
    ])
    .ok();
    assert_eq!(f.num("fetched_files"), 1, "{f}");
    let down = relay.down_bytes.load(std::sync::atomic::Ordering::SeqCst) - before;
    let data_bytes = 3u64 << 20;
    assert!(
        down < data_bytes + data_bytes / 20 + 64 * 1024,
        "{down} bytes came down for {data_bytes}"
    );
    let cm = fs::metadata(t.path("courier/vm.img")).unwrap();
    assert_eq!(cm.len(), 32 << 20);
    assert!(
        cm.blocks() * 512 <= src_alloc + src_alloc / 50,
        "courier copy takes {}",
        cm.blocks() * 512
    );
    assert_eq!(
        fs::read(t.path("courier/vm.img")).unwrap(),
        fs::read(src.join("vm.img")).unwrap()
    );

    let before = relay.up_bytes.load(std::sync::atomic::Ordering::SeqCst);
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();
    let up = relay.up_bytes.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        up < data_bytes + data_bytes / 20,
        "{up} bytes went up for {data_bytes}"
    );
    let dm = fs::metadata(dst.join("vm.img")).unwrap();
    assert!(
        dm.blocks() * 512 <= src_alloc + src_alloc / 50,
        "destination copy takes {}",
        dm.blocks() * 512
    );
    assert_eq!(
        fs::read(dst.join("vm.img")).unwrap(),
        fs::read(src.join("vm.img")).unwrap()
    );

    // A damaged sparse courier copy is named and not stored.
    fs::remove_file(dst.join("vm.img")).unwrap();
    let c = fs::OpenOptions::new()
        .write(true)
        .open(t.path("courier/vm.img"))
        .unwrap();
    c.write_all_at(b"X", (1 << 20) + 10).unwrap();
    drop(c);
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier]).code(1);
    assert!(s.stderr.contains("damaged"), "{s}");
    assert!(!dst.join("vm.img").exists());
}

#[test]
fn empty_directories_are_listed_in_the_end_record_and_recreated() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "full/file", b"x");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    chmod(&src, "empty", 0o750);
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000);
    fs::File::open(src.join("empty"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");

    // Without ?dirs=1 the end record is as the SPEC shows it.
    let plain = String::from_utf8(get(server.addr, "/src/").body).unwrap();
    assert_eq!(
        plain.lines().last().unwrap(),
        "{\"end\":true,\"count\":1,\"bytes\":1}"
    );
    // Entries stay files and symlinks; the end record names empty dirs.
    let listing = get(server.addr, "/src/?dirs=1");
    let text = String::from_utf8(listing.body).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with("{\"name\"")).count(),
        1,
        "{text}"
    );
    let end: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let names: Vec<&str> = end["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a/b/c", "empty"], "{text}");
    assert_eq!(end["count"], 1);
    // Asked for all of them, it names every directory, the root first.
    let listing = get(server.addr, "/src/?dirs=1&alldirs=1");
    let text = String::from_utf8(listing.body).unwrap();
    let end: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let names: Vec<&str> = end["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["", "a", "a/b", "a/b/c", "empty", "full"], "{text}");

    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let b = bitfog(&["builddb", &su, &t.s("src.db"), "--json"]).ok();
    assert_eq!(b.num("files"), 1);
    assert!(
        fs::read_to_string(t.path("src.db"))
            .unwrap()
            .contains("{\"name\":\"a/b/c\"")
    );
    bitfog(&["fetch", &t.s("dest.db"), &su, &courier]).ok();
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(
        s.num("dirs_made"),
        6,
        "every directory made or given its mode and mtime: {s}"
    );
    assert!(dst.join("a/b/c").is_dir());
    let m = fs::metadata(dst.join("empty")).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o777, m.modified().unwrap()),
        (0o750, when)
    );
    let receipt = fs::read_to_string(t.path("courier/.bitfog/receipt.jsonl")).unwrap();
    assert!(receipt.contains("{\"name\":\"a/b/c\""), "{receipt}");
    // Done once.
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(s.num("dirs_made"), 0, "{s}");
}

#[test]
fn sizes_read_as_in_rsync_kb_is_1000_and_k_is_1024() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "f", &data(7, 1010));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("e.db")]).ok();
    let too_big = |size: &str| {
        let p = bitfog(&[
            "plan",
            &t.s("e.db"),
            &server.url("src"),
            "--max-bytes",
            size,
            "--json",
        ])
        .ok();
        p.num("too_big_files")
    };
    for (size, want) in [
        ("1KB", 1),
        ("1kb", 1),
        ("1K", 0),
        ("1KiB", 0),
        ("1.01KB", 0),
    ] {
        assert_eq!(too_big(size), want, "--max-bytes {size}");
    }
}

/// Every directory under `root`, relative, sorted.
fn dirs(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn delete_removes_directories_the_source_does_not_have_and_keeps_its_own() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "keep/a", b"a");
    write(&src, "photos/été 2024/p1", &data(1, 3000));
    fs::create_dir_all(src.join("src-empty/inner")).unwrap();
    fs::create_dir_all(src.join("keep/empty-too")).unwrap();
    write(&dst, "keep/a", b"a");
    write(&dst, "photos/summer/p1", &data(1, 3000));
    write(&dst, "deep/a/b/c/d/file", b"gone");
    fs::create_dir_all(dst.join("dst-empty/x")).unwrap();
    fs::create_dir_all(dst.join("src-empty")).unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &t.s("c")]).ok();
    // Without --delete, nothing goes.
    bitfog(&["store", &t.s("c"), &du, &t.s("c")]).ok();
    assert!(dst.join("deep/a/b/c/d").is_dir() && dst.join("dst-empty/x").is_dir());
    // A file written at the destination keeps its directory.
    write(&dst, "deep/a/new-here", b"n");
    let before = dirs(&dst);
    let d = bitfog(&["store", &t.s("c"), &du, &t.s("c"), "--delete", "--dry-run"]).ok();
    assert!(
        d.stdout
            .contains("would remove the directory 'deep/a/b/c/d' once empty")
            && !d.stdout.contains("'keep'")
            && !d.stdout.contains("'src-empty'"),
        "{d}"
    );
    assert_eq!(dirs(&dst), before, "a dry run removes nothing");
    let s = bitfog(&["store", &t.s("c"), &du, &t.s("c"), "--delete", "--json"]).ok();
    // deep/a/b/c/d, c, b; dst-empty/x, dst-empty; photos/summer.
    assert_eq!(s.num("dirs_removed"), 6, "{s}");
    assert_eq!(
        dirs(&dst),
        [
            "deep",
            "deep/a",
            "keep",
            "keep/empty-too",
            "photos",
            "photos/été 2024",
            "src-empty",
            "src-empty/inner"
        ]
    );
    fs::remove_file(dst.join("deep/a/new-here")).unwrap();
    // The receipt agrees: the way back plans nothing, and a fresh
    // --delete trip now leaves an exact mirror.
    let p = bitfog(&["plan", &t.s("c"), &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 0, "{p}");
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    bitfog(&["store", &t.s("src.db"), &du, &t.s("c"), "--delete"]).ok();
    assert_eq!(dirs(&dst), dirs(&src));
    assert_same_tree(&src, &dst);
}

/// A `--delete` that would remove most of the destination (a source
/// volume that was not mounted lists almost nothing) is refused before
/// anything is touched, unless `--max-delete` says how many may go.
#[test]
fn a_delete_that_would_remove_most_of_the_destination_needs_max_delete() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..150 {
        write(&dst, &format!("d{}/f{i}", i % 7), &data(i, 100));
    }
    for i in 0..10 {
        write(&src, &format!("d{}/f{i}", i % 7), &data(i, 100));
    }
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &t.s("c")]).ok();
    let before = tree(&dst);
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut cmd = vec!["store", "--delete"];
        let c = t.s("c");
        cmd.extend([c.as_str(), du.as_str(), c.as_str()]);
        cmd.extend_from_slice(extra);
        let r = bitfog(&cmd).code(2);
        assert!(
            r.stderr
                .contains("--delete would remove 140 of the destination's 150 files")
                && r.stderr.contains("--max-delete 140"),
            "{r}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
    }
    assert_eq!(tree(&dst), before, "nothing touched");
    let c = t.s("c");
    let s = bitfog(&[
        "store",
        &c,
        &du,
        &c,
        "--delete",
        "--max-delete",
        "140",
        "--json",
    ])
    .ok();
    assert_eq!(s.num("deleted_files"), 140, "{s}");
    assert_same_tree(&src, &dst);
}

/// A name that is a directory at the destination and a file or a symlink
/// at the source, or the other way round, is mirrored by one `store
/// --delete`: the directory is emptied and removed before the file
/// arrives. Without `--delete` the directory stays and the file fails.
#[test]
fn a_name_that_changed_between_file_and_directory_is_mirrored_in_one_run() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "x", b"now a file");
    write(&dst, "x/inner", b"old");
    write(&dst, "x/sub/deeper", b"old too");
    fs::create_dir_all(dst.join("x/empty")).unwrap();
    std::os::unix::fs::symlink("x", src.join("l")).unwrap();
    write(&dst, "l/f", b"old");
    write(&src, "y/f", b"now in a directory");
    write(&dst, "y", b"was a file");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    bitfog(&["builddb", &du, &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &t.s("c")]).ok();
    let kept = bitfog(&["store", &t.s("src.db"), &du, &t.s("c"), "--json"]).code(1);
    // x, l, y/f and the directory y.
    assert_eq!(kept.num("failed_files"), 4, "{kept}");
    assert!(dst.join("x/inner").is_file() && dst.join("l/f").is_file());
    let s = bitfog(&[
        "store",
        &t.s("src.db"),
        &du,
        &t.s("c"),
        "--delete",
        "--json",
    ])
    .ok();
    assert_eq!(s.num("failed_files"), 0, "{s}");
    // x/empty, x/sub, x and l.
    assert_eq!(s.num("dirs_removed"), 4, "{s}");
    assert_same_tree(&src, &dst);
    assert_eq!(
        fs::read_link(dst.join("l")).unwrap(),
        std::path::Path::new("x")
    );
    // The receipt agrees: the way back plans nothing.
    let p = bitfog(&["plan", &t.s("c"), &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 0, "{p}");
}

#[test]
fn plan_and_fetch_dry_run_decide_the_same_trip_as_fetch() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    // A rename (the destination has new/x as old/x), a duplicate pair, a
    // file bigger than the smaller budgets, and files of several sizes.
    write(&dst, "old/x", &data(1, 300_000));
    write(&src, "new/x", &data(1, 300_000));
    write(&src, "big", &data(2, 8_000_000));
    write(&src, "m1", &data(3, 2_000_000));
    write(&src, "m2", &data(4, 1_500_000));
    write(&src, "s1", &data(5, 500_000));
    write(&src, "s1-copy", &data(5, 500_000));
    write(&src, "s2", &data(6, 100_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let su = server.url("src");
    bitfog(&["builddb", &server.url("dst"), &t.s("dest.db")]).ok();
    let actions = |r: &Run| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = r
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|j| j.get("action").is_some())
            .map(|j| {
                (
                    j["name"].as_str().unwrap().into(),
                    j["action"].as_str().unwrap().into(),
                )
            })
            .collect();
        v.sort();
        v
    };
    for (k, budget) in ["1M", "3M", "4M", "6M", "12M", ""].into_iter().enumerate() {
        let mut max: Vec<&str> = vec![];
        if !budget.is_empty() {
            max = vec!["--max-bytes", budget];
        }
        let courier = t.s(&format!("courier{k}"));
        let with = |args: &[&str]| -> Vec<String> {
            args.iter().chain(&max).map(|s| s.to_string()).collect()
        };
        let run = |args: Vec<String>| bitfog(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let p = run(with(&["plan", &t.s("dest.db"), &su, "--json", "-v"])).ok();
        let d = run(with(&[
            "fetch",
            &t.s("dest.db"),
            &su,
            &courier,
            "--dry-run",
            "--json",
            "-v",
        ]))
        .ok();
        let f = run(with(&["fetch", &t.s("dest.db"), &su, &courier, "--json"])).ok();
        let (pj, dj, fj) = (p.last_json(), d.last_json(), f.last_json());
        let trip = (
            pj["trip_files"].as_u64(),
            pj["trip_bytes"].as_u64(),
            pj["range_bytes"].as_u64(),
        );
        assert_eq!(
            trip,
            (
                dj["fetched_files"].as_u64(),
                dj["fetched_bytes"].as_u64(),
                dj["range_bytes"].as_u64()
            ),
            "budget {budget}: plan and fetch --dry-run\n{p}\n{d}"
        );
        assert_eq!(
            trip,
            (
                fj["fetched_files"].as_u64(),
                fj["fetched_bytes"].as_u64(),
                fj["range_bytes"].as_u64()
            ),
            "budget {budget}: plan and the fetch itself\n{p}\n{f}"
        );
        assert_eq!(
            (
                pj["instructed_files"].as_u64(),
                dj["instructed_files"].as_u64()
            ),
            (
                fj["instructed_files"].as_u64(),
                fj["instructed_files"].as_u64()
            ),
            "budget {budget}: instructions\n{p}\n{d}\n{f}"
        );
        let (pa, da) = (actions(&p), actions(&d));
        assert_eq!(pa, da, "budget {budget}: the same action for each file");
        assert!(pa.contains(&("new/x".into(), "copy".into())), "{p}");
        // What the trip carries is what the courier then holds.
        for (name, act) in &pa {
            let there = t.path(&courier).join(name).exists();
            assert_eq!(
                there,
                act == "carry",
                "budget {budget}: '{name}' ({act})\n{p}"
            );
        }
    }
    // At 3M: the largest files that fit go whole, the duplicate is an
    // instruction, the 8 MB file waits; at 6M what is left starts it.
    let p = bitfog(&[
        "plan",
        &t.s("dest.db"),
        &su,
        "--json",
        "-v",
        "--max-bytes",
        "3M",
    ])
    .ok();
    let want: Vec<(String, String)> = [
        ("big", "later"),
        ("m1", "carry"),
        ("m2", "later"),
        ("new/x", "copy"),
        ("s1", "carry"),
        ("s1-copy", "copy"),
        ("s2", "carry"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(actions(&p), want, "{p}");
    let p = bitfog(&["plan", &t.s("dest.db"), &su, "-v", "--max-bytes", "6M"]).ok();
    assert!(
        p.stdout
            .lines()
            .any(|l| l.starts_with("range ") && l.ends_with(" big")),
        "{p}"
    );
}
