//! Bounded work: what one request may make a server do, what one server
//! may make a client hold, and how names from strangers are printed.

use crate::util::*;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

fn writable(t: &Scratch, extra: &str) -> (Server, std::path::PathBuf) {
    let dst = t.mkdir("dst");
    let server = Server::start(
        t,
        "site",
        &format!(
            "{{\"dst\":{{\"path\":{:?},\"writable\":true{extra}}}}}",
            dst.to_str().unwrap()
        ),
    );
    (server, dst)
}

#[test]
fn a_sparse_put_cannot_declare_more_holes_than_its_data_pays_for() {
    let t = Scratch::new();
    let (server, dst) = writable(&t, "");
    let sha = "0".repeat(64);
    let start = Instant::now();
    let r = http(
        server.addr,
        "PUT",
        "/dst/huge",
        &[
            ("Content-Type", "application/x-bitfog-extents"),
            ("X-Bitfog-Size", "17592186040320"),
            ("X-Bitfog-Sha256", &sha),
        ],
        b"",
    );
    assert_eq!(r.status, 413, "{}", r.head);
    assert!(start.elapsed() < Duration::from_secs(5), "refused at once");
    assert!(tree(&dst).is_empty(), "nothing was made");
    assert_eq!(
        get(server.addr, "/").status,
        200,
        "the server still answers"
    );
}

#[test]
fn a_body_bigger_than_the_free_space_is_refused_before_it_is_written() {
    let t = Scratch::new();
    let (server, dst) = writable(&t, "");
    // A declared length no disk has: refused before the body is awaited.
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"PUT /dst/big HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999999999999\r\n\r\nabc",
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 507"), "{text}");
    assert!(tree(&dst).is_empty());
}

#[test]
fn thousands_of_long_empty_directories_never_break_the_listing() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    // 4,500 empty directories with names of about 3.9 KB: their JSON is
    // longer than the 16 MiB end record a client accepts.
    let long: Vec<String> = (0..15)
        .map(|i| format!("{i:02}{}", "x".repeat(253)))
        .collect();
    let tail = long.join("/");
    for i in 0..4500 {
        fs::create_dir_all(src.join(format!("d{i:04}/{tail}"))).unwrap();
    }
    write(&src, "file", b"data");
    let dst = t.mkdir("dst");
    let server = Server::start(&t, "sites", &two_areas(&src, &dst));
    let b = bitfog(&["builddb", &server.url("src"), &t.s("src.db"), "--json"]).ok();
    assert_eq!(b.num("files"), 1);
    assert!(b.stderr.contains("more did not fit"), "{b}");
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    let end: serde_json::Value = serde_json::from_str(db.lines().last().unwrap()).unwrap();
    // Every directory is named or counted; the empty ones (which nothing
    // else implies) take the room first.
    let dirs = end["dirs"].as_array().unwrap();
    let leaves = dirs
        .iter()
        .filter(|d| d["name"].as_str().unwrap().ends_with(&tail))
        .count() as u64;
    let omitted = end["dirs_omitted"].as_u64().unwrap();
    let meta_omitted = end["dirs_meta_omitted"].as_u64().unwrap();
    assert_eq!(
        leaves + omitted,
        4500,
        "every empty directory is accounted for"
    );
    assert_eq!(
        dirs.len() as u64 + omitted + meta_omitted,
        4500 * 16 + 1,
        "and every other one"
    );
    assert_eq!(
        leaves,
        dirs.len() as u64,
        "no room is left to directories with entries"
    );
    assert!(db.lines().last().unwrap().len() < 16 << 20);
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["plan", &t.s("dest.db"), &server.url("src")]).ok();
}

/// The signature cache of `server`'s area: the files in its `.sigs` folder.
fn cached_signatures(t: &Scratch) -> usize {
    let cache = t.path("sites.hashcache");
    fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sigs"))
        .map(|p| fs::read_dir(p).unwrap().count())
        .sum()
}

#[test]
fn the_signature_cache_keeps_only_large_files_that_still_exist() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "small", &data(1, 100_000));
    for name in ["big1", "big2", "big3"] {
        let f = fs::File::create(src.join(name)).unwrap();
        f.set_len(16 << 20).unwrap();
    }
    let server = Server::start(&t, "sites", &two_areas(&src, &dst));
    let sign_all = || {
        for name in ["small", "big1", "big2", "big3"] {
            let r = get(server.addr, &format!("/src/{name}?signature"));
            assert_eq!(r.status, 200, "{name}");
        }
    };
    // Files changed less than 2 s ago are signed, not kept: a coarse
    // clock could give a second write the same ctime.
    sign_all();
    assert_eq!(cached_signatures(&t), 0, "fresh files are not kept");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    sign_all();
    assert_eq!(
        cached_signatures(&t),
        3,
        "small files are signed again, not kept"
    );
    fs::remove_file(src.join("big1")).unwrap();
    fs::remove_file(src.join("big2")).unwrap();
    assert_eq!(get(server.addr, "/src/").status, 200);
    assert_eq!(
        cached_signatures(&t),
        1,
        "a complete listing prunes the signatures of deleted files"
    );
}

#[test]
fn a_long_listing_is_spooled_not_held_by_a_dry_run() {
    let t = Scratch::new();
    // 400,000 entries with long names, from a scripted server.
    let n = 400_000u64;
    let mut body = String::with_capacity(90 * n as usize);
    let pad = "p".repeat(120);
    for i in 0..n {
        body.push_str(&format!(
            "{{\"name\":\"{pad}{i:07}\",\"size\":1,\"mode\":420,\"mtime\":1}}\n"
        ));
    }
    body.push_str(&format!("{{\"end\":true,\"count\":{n},\"bytes\":{n}}}\n"));
    let addr = routes(vec![("/src/".into(), ndjson_response(&body))]);
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    // Peak memory of the child, from the kernel's accounting.
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n\
                  print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script, BIN, "fetch", "--dry-run", "--json"])
        .arg(t.path("dest.db"))
        .arg(format!("http://{addr}/src/"))
        .arg(t.path("courier"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    assert_eq!(f.next(), Some("0"), "{text}");
    let kib: u64 = f.next().unwrap().parse().unwrap();
    // The entries alone take about 60 MB in memory.
    assert!(kib < 40 << 10, "peak RSS {kib} KiB for {n} entries");
}

#[test]
fn names_cannot_drive_the_terminal() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let evil = "evil\u{1b}]0;pwned\u{7}\u{1b}[2J.txt";
    write(&src, evil, b"payload");
    let server = Server::start(&t, "sites", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    let p = bitfog(&["plan", "-v", &t.s("dest.db"), &server.url("src")]).ok();
    assert!(p.stdout.contains("evil\\x1b]0;pwned\\x07"), "{p}");
    bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
    ])
    .ok();
    fs::write(t.path("courier").join(evil), b"damaged").unwrap();
    let s = bitfog(&["store", &t.s("src.db"), &server.url("dst"), &t.s("courier")]).code(1);
    for out in [&p.stdout, &p.stderr, &s.stdout, &s.stderr] {
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{s}");
    }
    assert!(
        s.stderr.contains("evil\\x1b]0;pwned\\x07\\x1b[2J.txt"),
        "{s}"
    );
}

#[test]
fn reserved_names_are_refused_in_every_component() {
    let t = Scratch::new();
    let (server, dst) = writable(&t, "");
    write(&dst, ".bitfog-x/inside", b"server state");
    write(&dst, "a/.bitfog/inside", b"server state");
    write(&dst, "visible", b"v");
    for path in ["/dst/.bitfog-x/inside", "/dst/a/.bitfog/inside"] {
        assert_eq!(get(server.addr, path).status, 404, "{path}");
        assert_eq!(http(server.addr, "DELETE", path, &[], b"").status, 400);
    }
    let r = http(server.addr, "PUT", "/dst/.bitfog-part-0123/x", &[], b"x");
    assert_eq!(r.status, 400);
    assert!(!dst.join(".bitfog-part-0123").exists(), "no directory made");
    let listing = String::from_utf8(get(server.addr, "/dst/").body).unwrap();
    assert!(
        listing.contains("\"visible\"") && !listing.contains("inside"),
        "{listing}"
    );
}

#[test]
fn a_partial_upload_not_extended_for_90_days_expires() {
    let t = Scratch::new();
    let (server, dst) = writable(&t, "");
    let whole = data(3, 4096);
    let sha = sha256_hex(&whole);
    let r = http(
        server.addr,
        "PUT",
        "/dst/f",
        &[
            ("Content-Range", "bytes 0-1023/4096"),
            ("X-Bitfog-Sha256", &sha),
        ],
        &whole[..1024],
    );
    assert_eq!(r.status, 202, "{}", r.head);
    let parts: Vec<_> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".bitfog-part-"))
        .collect();
    assert_eq!(parts.len(), 2, "data and record");
    drop(server);
    // A fresh one stays; one untouched for 100 days goes at startup.
    let touch = |p: &Path, ago: &str| {
        assert!(
            std::process::Command::new("touch")
                .args(["-d", ago])
                .arg(p)
                .status()
                .unwrap()
                .success()
        )
    };
    for p in &parts {
        touch(p, "89 days ago");
    }
    let conf = t.path("site.json");
    let server = Server::start_conf(&conf, &t.path("site2.log"), &[]);
    assert_eq!(get(server.addr, "/").status, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(parts.iter().all(|p| p.exists()), "89 days: kept");
    drop(server);
    for p in &parts {
        touch(p, "100 days ago");
    }
    let _server = restart_removing(&conf, &t.path("site3.log"), &parts[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while parts[1].exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!parts[1].exists(), "the record goes too");
}

#[test]
fn repeated_wrong_tokens_make_the_address_wait() {
    let t = Scratch::new();
    let (server, _dst) = writable(&t, ",\"token\":\"s3cret\"");
    let with = |tok: &str| {
        http(
            server.addr,
            "GET",
            "/dst/",
            &[("Authorization", &format!("Bearer {tok}"))],
            b"",
        )
    };
    assert_eq!(with("s3cret").status, 200);
    for _ in 0..5 {
        assert_eq!(with("guess").status, 401);
    }
    assert_eq!(with("guess").status, 401, "the sixth still answers 401...");
    let r = with("s3cret");
    assert_eq!(
        r.status, 429,
        "...and then the address waits, right token or not"
    );
    assert!(r.header("retry-after").is_some());
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        with("s3cret").status,
        200,
        "after the wait, a right token works"
    );
    assert_eq!(with("guess").status, 401, "and the count starts over");
}
