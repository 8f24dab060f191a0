//! The server: listings, ranges, uploads, symlinks, traversal, tokens,
//! and the HTTP layer's limits, each followed by a normal request.

use crate::util::*;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

fn site(t: &Scratch) -> (Server, std::path::PathBuf, std::path::PathBuf) {
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let server = Server::start(t, "site", &two_areas(&src, &dst));
    (server, src, dst)
}

#[test]
fn startup_line_index_and_listing() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    awkward_tree(&src);
    write(&src, "x/.bitfog-tmp-123", b"temp");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let first = server.log_text().lines().next().unwrap().to_string();
    assert_eq!(
        first,
        format!(
            "bitfog: listening on http://127.0.0.1:{}/",
            server.addr.port()
        )
    );

    let r = get(server.addr, "/");
    assert_eq!(
        (r.status, r.header("content-type").as_deref()),
        (200, Some("application/json"))
    );
    assert_eq!(
        serde_json::from_slice::<Vec<String>>(&r.body).unwrap(),
        ["dst", "src"]
    );

    let r = get(server.addr, "/src/");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let body = String::from_utf8(r.body).unwrap();
    let lines: Vec<serde_json::Value> = body
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (end, entries) = lines.split_last().unwrap();
    assert_eq!(end["end"], true);
    assert_eq!(end["count"].as_u64().unwrap() as usize, entries.len());
    let sum: u64 = entries.iter().map(|e| e["size"].as_u64().unwrap()).sum();
    assert_eq!(end["bytes"].as_u64().unwrap(), sum);
    let names: Vec<&str> = entries
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(names, sorted, "component-wise order");
    assert!(
        names.iter().position(|n| *n == "a").unwrap()
            < names.iter().position(|n| *n == "a.txt").unwrap()
    );
    assert!(
        !names.iter().any(|n| n.contains(".bitfog") || *n == "fifo"),
        "{names:?}"
    );
    let plain = entries.iter().find(|e| e["name"] == "plain.txt").unwrap();
    assert_eq!(
        plain["sha256"].as_str(),
        Some(sha256_hex(b"plain\n").as_str())
    );
    assert_eq!(
        (plain["size"].as_u64(), plain["mode"].as_u64()),
        (Some(6), Some(0o644))
    );
    let link = entries.iter().find(|e| e["name"] == "abs-link").unwrap();
    assert_eq!(
        (link["linkdest"].as_str(), link["size"].as_u64()),
        (Some("/etc/passwd"), Some(11))
    );
    assert!(link.get("sha256").is_none());
    let private = entries.iter().find(|e| e["name"] == "private").unwrap();
    assert_eq!(private["mode"].as_u64(), Some(0o600));
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn ranges_if_range_and_head() {
    let t = Scratch::new();
    let (server, src, _) = site(&t);
    let body = data(3, 1000);
    write(&src, "f", &body);
    let a = server.addr;
    let r = get(a, "/src/f");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    let etag = r.header("etag").unwrap();
    let lm = r.header("last-modified").unwrap();
    assert!(lm.ends_with(" GMT"), "{lm}");
    for (range, status, cr, slice) in [
        ("bytes=0-9", 206, "bytes 0-9/1000", 0..10),
        ("bytes=990-", 206, "bytes 990-999/1000", 990..1000),
        ("bytes=-5", 206, "bytes 995-999/1000", 995..1000),
        ("bytes=500-5000", 206, "bytes 500-999/1000", 500..1000),
    ] {
        let r = http(a, "GET", "/src/f", &[("Range", range)], b"");
        assert_eq!(r.status, status, "{range}");
        assert_eq!(r.header("content-range").as_deref(), Some(cr));
        assert_eq!(r.body, &body[slice]);
    }
    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let r = http(a, "GET", "/src/f", &[("Range", range)], b"");
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(r.header("content-range").as_deref(), Some("bytes */1000"));
    }
    for range in ["bytes=0-1,5-6", "bytes=x-y", "pages=1-2", "bytes=9-1"] {
        let r = http(a, "GET", "/src/f", &[("Range", range)], b"");
        assert_eq!((r.status, r.body.len()), (200, 1000), "{range}");
    }
    let r = http(
        a,
        "GET",
        "/src/f",
        &[("Range", "bytes=10-19"), ("If-Range", &etag)],
        b"",
    );
    assert_eq!((r.status, r.body.as_slice()), (206, &body[10..20]));
    let r = http(
        a,
        "GET",
        "/src/f",
        &[("Range", "bytes=10-19"), ("If-Range", &lm)],
        b"",
    );
    assert_eq!(r.status, 206);
    let r = http(
        a,
        "GET",
        "/src/f",
        &[("Range", "bytes=10-19"), ("If-Range", "\"other\"")],
        b"",
    );
    assert_eq!((r.status, r.body.len()), (200, 1000));
    let r = http(a, "HEAD", "/src/f", &[], b"");
    assert_eq!(
        (
            r.status,
            r.header("content-length").as_deref(),
            r.body.len()
        ),
        (200, Some("1000"), 0)
    );
    assert_eq!(get(a, "/src/missing").status, 404);
    write(&src, "d/x", b"x");
    assert!(matches!(get(a, "/src/d").status, 400 | 404));
}

#[test]
fn traversal_and_symlink_escapes_are_refused() {
    let t = Scratch::new();
    let outside = t.mkdir("outside");
    write(&outside, "secret", b"TOPSECRET");
    let (server, src, dst) = site(&t);
    write(&src, "ok.txt", b"fine");
    std::os::unix::fs::symlink(&outside, src.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), src.join("filelink")).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("dirlink")).unwrap();
    let a = server.addr;
    // Positive control: a plain file is served, so an escape would show.
    assert_eq!(get(a, "/src/ok.txt").body, b"fine");
    assert_eq!(get(a, "/src/dirlink/../ok.txt").status, 400);
    let hostile = [
        "/src/../outside/secret",
        "/src/%2e%2e/outside/secret",
        "/src/%2E%2E%2Foutside%2Fsecret",
        "/src/..%2foutside%2fsecret",
        "/src/ok.txt/../../outside/secret",
        "/src/dirlink/secret",
        "/src/dirlink%2Fsecret",
        "/src/filelink",
        "/src//outside/secret",
        "/src/./ok.txt",
        "/src/%2fetc%2fpasswd",
        "/src/a%00b",
        "/src/..%5coutside%5csecret",
        "/src/%252e%252e/outside/secret",
        "/src/%",
        "/src/%zz",
        "/src/dirlink/",
        "/../outside/secret",
        "/%2e%2e/outside/secret",
    ];
    for path in hostile {
        for method in ["GET", "HEAD", "DELETE"] {
            let r = http(a, method, path, &[], b"");
            assert!(
                matches!(r.status, 400 | 404 | 405),
                "{method} {path} -> {}",
                r.status
            );
            assert!(
                !String::from_utf8_lossy(&r.body).contains("TOPSECRET"),
                "{method} {path} leaked"
            );
        }
    }
    for path in [
        "/dst/../escape",
        "/dst/%2e%2e/escape",
        "/dst/dirlink/planted",
        "/dst/dirlink%2fplanted",
        "/dst/a/%2e%2e/%2e%2e/escape",
    ] {
        let r = http(a, "PUT", path, &[], b"planted");
        assert!(matches!(r.status, 400 | 404), "PUT {path} -> {}", r.status);
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing written outside"
    );
    assert!(!t.path("escape").exists());
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"TOPSECRET");
    assert_serving(a);
}

#[test]
fn put_verifies_hash_and_applies_mode_and_mtime() {
    let t = Scratch::new();
    let (server, _, dst) = site(&t);
    let a = server.addr;
    let body = b"new content";
    let good = sha256_hex(body);
    let r = http(
        a,
        "PUT",
        "/dst/x/y.txt",
        &[("X-Bitfog-Sha256", &sha256_hex(b"other"))],
        body,
    );
    assert_eq!(r.status, 422);
    assert!(!dst.join("x/y.txt").exists());
    let r = http(
        a,
        "PUT",
        "/dst/x/y.txt",
        &[
            ("X-Bitfog-Sha256", &good),
            ("X-Bitfog-Mode", &(0o4751).to_string()),
            ("X-Bitfog-Mtime", "1000000000"),
        ],
        body,
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let m = fs::metadata(dst.join("x/y.txt")).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o7777, m.mtime()),
        (0o751, 1_000_000_000),
        "setuid dropped"
    );
    assert_eq!(fs::read(dst.join("x/y.txt")).unwrap(), body);
    // A wrong hash leaves the old file exactly as it was.
    let r = http(
        a,
        "PUT",
        "/dst/x/y.txt",
        &[("X-Bitfog-Sha256", &good)],
        b"tampered!!!",
    );
    assert_eq!(r.status, 422);
    assert_eq!(fs::read(dst.join("x/y.txt")).unwrap(), body);
    for (h, v) in [
        ("X-Bitfog-Sha256", "zz"),
        ("X-Bitfog-Mode", "rw"),
        ("X-Bitfog-Mtime", "yesterday"),
    ] {
        assert_eq!(
            http(a, "PUT", "/dst/z", &[(h, v)], b"1").status,
            400,
            "{h}: {v}"
        );
    }
    assert_eq!(http(a, "PUT", "/src/x", &[], b"1").status, 405);
    let r = http(a, "DELETE", "/src/x", &[], b"");
    assert_eq!(
        (r.status, r.header("allow").as_deref()),
        (405, Some("GET, HEAD"))
    );
    assert_eq!(http(a, "POST", "/dst/x", &[], b"").status, 405);
    assert_eq!(http(a, "DELETE", "/dst/x/y.txt", &[], b"").status, 204);
    assert_eq!(http(a, "DELETE", "/dst/x/y.txt", &[], b"").status, 404);
    assert_eq!(http(a, "PUT", "/dst/.bitfog-tmp-1", &[], b"1").status, 400);
    assert_eq!(http(a, "DELETE", "/dst/.bitfog-x", &[], b"").status, 400);
    assert_eq!(get(a, "/dst/.bitfog-x").status, 404);
    assert_no_temps(&dst);
}

fn assert_no_temps(root: &std::path::Path) {
    let leftovers: Vec<_> = tree(root)
        .into_iter()
        .filter(|e| e.0.contains(".bitfog"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left: {:?}",
        leftovers.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    for d in walk_all(root) {
        assert!(!d.contains(".bitfog-tmp"), "temporary file left: {d}");
    }
}

fn walk_all(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        out.push(e.path().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_all(&e.path()));
        }
    }
    out
}

#[test]
fn a_body_cut_short_changes_nothing() {
    let t = Scratch::new();
    let (server, _, dst) = site(&t);
    write(&dst, "f", b"old");
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"PUT /dst/f HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\npartial body")
        .unwrap();
    drop(s);
    wait_until("the server to finish with the cut PUT", || {
        server.log_text().contains("\"PUT /dst/f\"")
    });
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"old");
    assert_no_temps(&dst);
    assert_serving(server.addr);
}

#[test]
fn symlinks_are_made_replaced_and_deleted_never_followed() {
    let t = Scratch::new();
    let (server, _, dst) = site(&t);
    let outside = t.mkdir("outside");
    write(&outside, "target", b"keep me");
    let a = server.addr;
    let link = |path, to: &str| {
        http(
            a,
            "PUT",
            path,
            &[("Content-Type", "application/symlink")],
            to.as_bytes(),
        )
    };
    assert_eq!(
        link("/dst/l", outside.join("target").to_str().unwrap()).status,
        204
    );
    assert_eq!(
        fs::read_link(dst.join("l")).unwrap(),
        outside.join("target")
    );
    assert_eq!(
        get(a, "/dst/l").status,
        404,
        "a symlink's target is never read"
    );
    // A PUT on the link replaces the link, not its target.
    assert_eq!(http(a, "PUT", "/dst/l", &[], b"replaced").status, 204);
    assert!(
        !fs::symlink_metadata(dst.join("l"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(outside.join("target")).unwrap(), b"keep me");
    assert_eq!(link("/dst/l2", "../outside/target").status, 204);
    assert_eq!(http(a, "DELETE", "/dst/l2", &[], b"").status, 204);
    assert!(fs::symlink_metadata(dst.join("l2")).is_err());
    assert_eq!(fs::read(outside.join("target")).unwrap(), b"keep me");
    assert_no_temps(&dst);
}

#[test]
fn token_areas_need_the_bearer_token() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    write(&src, "f", b"data");
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"token\":\"s3cret\"}}}}",
        src.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let a = server.addr;
    assert_eq!(get(a, "/src/f").status, 401);
    assert_eq!(get(a, "/src/").status, 401);
    assert_eq!(
        http(
            a,
            "GET",
            "/src/f",
            &[("Authorization", "Bearer wrong")],
            b""
        )
        .status,
        401
    );
    assert_eq!(
        http(
            a,
            "GET",
            "/src/f",
            &[("Authorization", "Bearer s3cret")],
            b""
        )
        .body,
        b"data"
    );
    let r = bitfog(&["builddb", &server.url("src"), &t.s("a.db")]).code(1);
    assert!(
        r.stderr.contains("HTTP 401")
            && r.stderr
                .contains("give this area's token with --token, or set BITFOG_TOKEN"),
        "{r}"
    );
    bitfog(&[
        "builddb",
        &server.url("src"),
        &t.s("a.db"),
        "--token",
        "s3cret",
    ])
    .ok();
    let out = cmd(&["builddb", &server.url("src"), &t.s("b.db")])
        .env("BITFOG_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn http_layer_limits_each_followed_by_a_normal_request() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    let dst = t.mkdir("dst");
    let conf = t.path("c.json");
    fs::write(&conf, two_areas(&src, &dst)).unwrap();
    let mut server = Server::start_conf(&conf, &t.path("c.log"), &["--threads", "2"]);
    let a = server.addr;
    let w = Duration::from_secs(3);
    // A huge Content-Length, closed unread: tiny_http died of this.
    let r = raw(
        a,
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999\r\n\r\n",
        Duration::from_millis(300),
    );
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 200"), "{r}");
    assert_serving(a);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert!(raw(a, big.as_bytes(), w).starts_with("HTTP/1.1 431"));
    assert_serving(a);
    let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
    assert!(
        raw(a, format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), w).starts_with("HTTP/1.1 431")
    );
    assert_serving(a);
    for cl in [
        "Content-Length: 5\r\nContent-Length: 5",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 12a",
        "Content-Length: -1",
        "Content-Length: +5",
        "Content-Length: 0x10",
    ] {
        let r = raw(
            a,
            format!("PUT /dst/f HTTP/1.1\r\nHost: t\r\n{cl}\r\n\r\nhello").as_bytes(),
            w,
        );
        assert!(r.starts_with("HTTP/1.1 400"), "{cl}: {r}");
        assert_serving(a);
    }
    let r = raw(a, b"PUT /dst/f HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", w);
    assert!(r.starts_with("HTTP/1.1 411"), "{r}");
    let r = raw(
        a,
        b"PUT /dst/f HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        w,
    );
    assert!(r.starts_with("HTTP/1.1 411"), "{r}");
    assert!(!dst.join("f").exists());
    assert!(raw(a, b"\x16\x03\x01garbage\r\n\r\n", w).starts_with("HTTP/1.1 400"));
    // Bare LF line endings are understood.
    assert!(
        raw(a, b"GET / HTTP/1.1\nHost: t\nConnection: close\n\n", w).starts_with("HTTP/1.1 200")
    );
    // Silent and idle clients, more than there are threads, starve no one.
    let mut idle = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(a).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
        }
        idle.push(s);
    }
    for _ in 0..5 {
        assert_serving(a);
    }
    // Pipelined requests are answered in order; a request hidden in a
    // body is data, never run.
    let r = raw(a, b"GET /src/ HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", w);
    assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
    let smuggled = b"DELETE /dst/keep HTTP/1.1\r\nHost: t\r\n\r\n";
    write(&dst, "keep", b"k");
    let mut req = format!(
        "PUT /dst/body HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        smuggled.len()
    )
    .into_bytes();
    req.extend_from_slice(smuggled);
    assert!(raw(a, &req, w).starts_with("HTTP/1.1 204"));
    assert_eq!(fs::read(dst.join("body")).unwrap(), smuggled);
    assert!(dst.join("keep").exists());
    let t0 = Instant::now();
    drop(idle);
    assert!(server.alive());
    assert_serving(a);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(server.terminate(), 0, "SIGTERM exits 0");
}

#[test]
fn expect_continue_and_keep_alive() {
    let t = Scratch::new();
    let (server, _, dst) = site(&t);
    let r = raw(
        server.addr,
        b"PUT /dst/e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
        Duration::from_millis(500),
    );
    assert!(
        r.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204"),
        "{r}"
    );
    assert_eq!(fs::read(dst.join("e")).unwrap(), b"ok");
}

#[test]
fn stale_temporary_files_are_removed_at_startup() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&dst, "a/.bitfog-tmp-deadbeef-0", b"half an upload");
    write(&src, ".bitfog-tmp-x", b"read-only areas are left alone");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let deadline = Instant::now() + Duration::from_secs(5);
    while dst.join("a/.bitfog-tmp-deadbeef-0").exists() {
        assert!(Instant::now() < deadline, "stale temp not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(src.join(".bitfog-tmp-x").exists());
    assert_eq!(server.terminate(), 0);
}

#[test]
fn connection_cap_and_descriptor_exhaustion() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    write(&src, "f", &data(1, 5000));
    let conf = t.path("c.json");
    fs::write(
        &conf,
        format!("{{\"src\":{{\"path\":{:?}}}}}", src.to_str().unwrap()),
    )
    .unwrap();
    // 64 descriptors: the server caps itself at 32 connections.
    let mut server = Server::start_shell(&conf, &t.path("c.log"), &[], "ulimit -n 64;");
    let a = server.addr;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(TcpStream::connect(a).unwrap());
    }
    // The event thread takes the connections in as it gets to them.
    let mut answer = String::new();
    wait_until("a 503 once the connections are held", || {
        answer = raw(
            a,
            b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
            Duration::from_secs(2),
        );
        answer.starts_with("HTTP/1.1 503")
    });
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.ends_with("too many open connections\n"),
        "{answer}"
    );
    drop(held);
    // A probe may still meet a connection the server is closing (a
    // reset): only a 200 counts.
    wait_until("the server to serve again", || {
        raw(
            a,
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .starts_with("HTTP/1.1 200")
    });
    assert!(server.alive(), "the server survives a connection flood");
    assert_serving(a);
    assert_eq!(get(a, "/src/f").body, data(1, 5000));
}

#[test]
fn a_directory_raced_against_a_symlink_never_lets_a_request_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let t = Scratch::new();
    let (src, dst, outside) = (t.mkdir("src"), t.mkdir("dst"), t.mkdir("outside"));
    write(&src, "d/f", b"INSIDE");
    write(&outside, "f", b"OUTSIDE");
    write(&outside, "only-outside", b"OUTSIDE");
    fs::create_dir(dst.join("d")).unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let stop = Arc::new(AtomicBool::new(false));
    let path_based_escapes = Arc::new(AtomicU64::new(0));
    // Swap src/d and dst/d with symlinks to `outside`, over and over.
    let swapper = {
        let (src, dst, outside, stop, esc) = (
            src.clone(),
            dst.clone(),
            outside.clone(),
            stop.clone(),
            path_based_escapes.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for area in [&src, &dst] {
                    let (d, real) = (area.join("d"), area.join("d.real"));
                    if fs::rename(&d, &real).is_err() {
                        continue;
                    }
                    if std::os::unix::fs::symlink(&outside, &d).is_ok() {
                        // Positive control: a path-based open does go outside.
                        if fs::read(src.join("d/f")).is_ok_and(|b| b == b"OUTSIDE") {
                            esc.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = fs::remove_file(&d);
                    }
                    // A PUT may have made a new `d` in a gap: keep it aside,
                    // inside the area.
                    if fs::rename(&real, &d).is_err() {
                        let aside = area.join(format!("d.made.{}", esc.load(Ordering::SeqCst)));
                        let _ = fs::rename(&d, &aside);
                        fs::rename(&real, &d).unwrap();
                    }
                }
            }
        })
    };
    let (mut inside, mut outside_seen) = (0, 0);
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut n = 0;
    while Instant::now() < deadline {
        let r = get(server.addr, "/src/d/f");
        if r.body == b"INSIDE" {
            inside += 1;
        }
        if r.body == b"OUTSIDE" {
            outside_seen += 1;
        }
        http(
            server.addr,
            "PUT",
            &format!("/dst/d/new{n}"),
            &[],
            b"planted",
        );
        let listing = String::from_utf8(get(server.addr, "/src/").body).unwrap();
        assert!(
            !listing.contains("only-outside") && !listing.contains(&sha256_hex(b"OUTSIDE")),
            "a listing went outside: {listing}"
        );
        n += 1;
    }
    stop.store(true, Ordering::SeqCst);
    swapper.join().unwrap();
    assert_eq!(outside_seen, 0, "a GET read through the symlink");
    let mut planted: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    planted.sort();
    assert_eq!(
        planted,
        ["f", "only-outside"],
        "a PUT wrote through the symlink"
    );
    assert!(inside > 0, "requests got through between swaps");
    assert!(
        path_based_escapes.load(Ordering::SeqCst) > 0,
        "the race window exists"
    );
}

/// Bytes the process has read with read(2) and friends so far.
fn rchar(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_hash_cache_spares_unchanged_files_and_never_serves_a_stale_hash() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..8 {
        write(&src, &format!("d/f{i}"), &data(i, 1 << 20));
    }
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let pid = server.child.id();
    let list = || String::from_utf8(get(server.addr, "/src/").body).unwrap();
    // A file changed less than 2 s before a listing is hashed each time
    // (its ctime could yet be shared by a second write): listed right, read
    // again, not cached.
    let before = rchar(pid);
    let fresh = (list(), list());
    assert!(
        rchar(pid) - before >= 16 << 20,
        "fresh files are read each time"
    );
    assert_eq!(fresh.0, fresh.1);
    std::thread::sleep(Duration::from_millis(2100));
    let before = rchar(pid);
    let first = list();
    let cold = rchar(pid) - before;
    assert!(
        cold >= 8 << 20,
        "the first listing hashes every file ({cold} bytes read)"
    );
    let before = rchar(pid);
    let second = list();
    let warm = rchar(pid) - before;
    assert_eq!(first, second);
    assert!(
        warm < 256 << 10,
        "a second listing reads no file contents ({warm} bytes read)"
    );
    // Same size, same mtime, new content: ctime gives it away.
    let path = src.join("d/f3");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let mut changed = data(3, 1 << 20);
    changed[100] ^= 1;
    fs::write(&path, &changed).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let third = list();
    assert!(
        third.contains(&sha256_hex(&changed)),
        "the changed file got its new hash"
    );
    assert!(!third.contains(&sha256_hex(&data(3, 1 << 20))));
    let cache_dir = t.path("site.hashcache");
    assert_eq!(
        fs::read_dir(&cache_dir).unwrap().count(),
        1,
        "one cache file for the area, outside it"
    );
    assert!(tree(&src).iter().all(|e| !e.0.contains("hashes")));
}

#[test]
fn a_signal_right_after_the_startup_line_still_exits_0() {
    for signal in [2, 15] {
        let t = Scratch::new();
        let src = t.mkdir("src");
        let server = Server::start(
            &t,
            "site",
            &format!("{{\"src\":{{\"path\":{:?}}}}}", src.to_str().unwrap()),
        );
        let mut server = server;
        unsafe_kill(server.child.id(), signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = server.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "signal {signal} ignored");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "signal {signal}");
    }
}

#[test]
fn the_log_says_when_names_the_areas_and_warns_without_a_hash_cache() {
    use std::io::BufRead;
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"exclude\":[\"@eaDir\",\"._*\"]}},\"dst\":{{\"path\":{:?},\"writable\":true}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    fs::write(t.path("c.json"), conf).unwrap();
    let mut child = cmd(&[
        "serve",
        "--conf",
        &t.s("c.json"),
        "--addr",
        "127.0.0.1:0",
        "--cache",
        "none",
    ])
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next = || lines.next().unwrap().unwrap();
    let first = next();
    assert!(
        first.starts_with("bitfog: listening on http://127.0.0.1:"),
        "{first}"
    );
    let addr = listening_addr(&first);
    let rest = [next(), next(), next()];
    let _ = get(addr, "/");
    let request = next();
    let _ = child.kill();
    let _ = child.wait();
    // RFC 3339 UTC: 2026-11-30T12:34:56Z
    let stamped = |l: &str| {
        let (time, msg) = l.split_once(' ').unwrap();
        time.len() == 20
            && time.ends_with('Z')
            && time.as_bytes()[10] == b'T'
            && msg.starts_with("bitfog: ")
    };
    for l in rest.iter().chain([&request]) {
        assert!(stamped(l), "{l}");
    }
    assert!(
        rest[0].contains("area 'dst'") && rest[0].contains("(writable, no token, no excludes)"),
        "{}",
        rest[0]
    );
    assert!(
        rest[1].contains("area 'src'")
            && rest[1].contains("(read-only, no token, excludes @eaDir ._*)"),
        "{}",
        rest[1]
    );
    assert!(rest[2].contains("the hash cache is off (--cache none)"));
    assert!(request.contains("\"GET /\" 200"), "{request}");
}

#[test]
fn delete_removes_an_empty_directory_only_and_answers_name_the_area() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    fs::create_dir_all(dst.join("empty")).unwrap();
    write(&dst, "full/f", b"x");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let a = server.addr;
    assert_eq!(http(a, "DELETE", "/dst/full", &[], b"").status, 409);
    assert!(dst.join("full/f").is_file());
    assert_eq!(http(a, "DELETE", "/dst/empty", &[], b"").status, 204);
    assert!(!dst.join("empty").exists());
    assert_eq!(http(a, "DELETE", "/dst/empty", &[], b"").status, 404);
    // Every answer about an area names its identity.
    let id = |path: &str| {
        http(a, "GET", path, &[], b"")
            .header("X-Bitfog-Area")
            .unwrap()
    };
    assert_eq!(id("/src/nothing").len(), 32);
    assert_ne!(id("/src/nothing"), id("/dst/nothing"));
    assert_eq!(id("/src/"), id("/src/nothing"));
}

#[test]
fn a_hash_cache_inside_an_area_is_refused_or_left_off_and_nothing_is_made_there() {
    use std::io::BufRead;
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "f", b"data");
    fs::write(t.path("c.json"), two_areas(&src, &dst)).unwrap();
    // Named with --cache (through a path that is not yet there): exit 2,
    // before the startup line, and nothing made in the area.
    let named = dst.join("x/../cache");
    let r = bitfog(&[
        "serve",
        "--conf",
        &t.s("c.json"),
        "--addr",
        "127.0.0.1:0",
        "--cache",
        named.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{r}");
    assert!(!r.stderr.contains("listening on"), "{r}");
    assert!(
        r.stderr.contains("is inside area 'dst'") && r.stderr.contains("--cache none"),
        "{r}"
    );
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 0);
    // The default one (HOME is the source area): served without a cache,
    // said in the log, and listings hold only the area's own file.
    let mut child = cmd(&["serve", "--conf", &t.s("c.json"), "--addr", "127.0.0.1:0"])
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", &src)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = listening_addr(&first);
    let warned = (0..3)
        .map(|_| lines.next().unwrap().unwrap())
        .any(|l| l.contains("is inside area 'src'") && l.contains("hashing every listing in full"));
    let listing = String::from_utf8(get(addr, "/src/").body).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "the log says why the cache is off");
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert_eq!(tree(&src).len(), 1, "nothing made in the area");
}

/// The address in a server's startup line.
fn listening_addr(first: &str) -> std::net::SocketAddr {
    first
        .trim_start_matches("bitfog: listening on http://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Two areas where one lies inside the other (or is the same directory)
/// and one is writable: the log says so at startup, once per pair;
/// overlapping read-only areas are left alone.
#[test]
fn overlapping_areas_with_a_writable_one_are_named_in_the_log() {
    let t = Scratch::new();
    let (all, inner) = (t.mkdir("all"), t.mkdir("all/inner"));
    let other = t.mkdir("other/deep");
    let conf = areas(&[
        ("all", &all, false),
        ("inner", &inner, true),
        ("ro", &t.path("other"), false),
        ("deep", &other, false),
    ]);
    let server = Server::start(&t, "site", &conf);
    wait_until("the startup warnings", || {
        server.log_text().contains("lies inside")
    });
    let log = server.log_text();
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("lies inside")).collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("area 'inner'") && warned[0].contains("area 'all'"),
        "{log}"
    );
}
