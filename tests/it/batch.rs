//! Many small files in one answer: `POST /AREA/?files`, and `fetch`
//! using it (and doing without it against an older server).

use crate::util::*;
use std::fs;

/// The items of an answer of many files: (head, body).
fn items(body: &[u8]) -> Vec<(serde_json::Value, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let nl = rest.iter().position(|&b| b == b'\n').expect("a head line");
        let head: serde_json::Value = serde_json::from_slice(&rest[..nl]).unwrap();
        rest = &rest[nl + 1..];
        if head["end"] == true {
            assert!(rest.is_empty(), "nothing after the end line");
            out.push((head, Vec::new()));
            return out;
        }
        let n = if head["status"] == 200 {
            head["size"].as_u64().unwrap() as usize
        } else {
            0
        };
        out.push((head, rest[..n].to_vec()));
        rest = &rest[n..];
    }
}

#[test]
fn post_files_answers_each_name_as_a_get_would() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a.txt", b"alpha");
    write(&src, "dir/b c.bin", &data(1, 70_000));
    write(&src, "empty", b"");
    write(&src, "skip.tmp", b"excluded");
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"exclude\":[\"*.tmp\"]}},\"dst\":{{\"path\":{:?},\"writable\":true}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let names = "a.txt\ndir/b%20c.bin\nempty\nmissing\ndir\nlink\nskip.tmp\n.bitfog-x\n../etc/passwd\n%zz\na.txt\n";
    let r = http(server.addr, "POST", "/src/?files", &[], names.as_bytes());
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-bitfog-files")
    );
    let got = items(&r.body);
    let status: Vec<u64> = got
        .iter()
        .map(|(h, _)| h["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        status,
        [200, 200, 200, 404, 404, 404, 404, 404, 400, 400, 200, 0]
    );
    assert_eq!(got[0].0["name"], "a.txt");
    assert_eq!(got[0].1, b"alpha");
    assert_eq!(
        got[1].0["name"], "dir/b%20c.bin",
        "names come back as asked"
    );
    assert_eq!(got[1].1, data(1, 70_000));
    assert_eq!(got[1].0["size"], 70_000);
    assert!(got[1].0["mtime"].as_i64().unwrap() > 0);
    assert_eq!(got[2].1, b"");
    assert_eq!(got[4].0["reason"], "not a regular file");
    assert_eq!(got[10].1, b"alpha");
    assert_eq!(got[11].0, serde_json::json!({"end": true, "files": 11}));

    // Only on an area's root, only as POST; GET of it is the listing.
    assert_eq!(
        http(server.addr, "POST", "/src/a.txt?files", &[], b"a.txt\n").status,
        405
    );
    assert_eq!(
        http(server.addr, "POST", "/src/", &[], b"a.txt\n").status,
        405
    );
    // Bounds: names and bytes.
    let many = "a.txt\n".repeat(1025);
    assert_eq!(
        http(server.addr, "POST", "/src/?files", &[], many.as_bytes()).status,
        413
    );
    assert_eq!(
        http(server.addr, "POST", "/src/?files", &[], &[0xff, b'\n']).status,
        400
    );
}

#[test]
fn post_files_needs_the_areas_token() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    write(&src, "a", b"a");
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"token\":\"s3cret\"}}}}",
        src.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    assert_eq!(
        http(server.addr, "POST", "/src/?files", &[], b"a\n").status,
        401
    );
    let r = http(
        server.addr,
        "POST",
        "/src/?files",
        &[("Authorization", "Bearer s3cret")],
        b"a\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(items(&r.body)[0].1, b"a");
}

#[test]
fn fetch_carries_small_files_many_to_a_request() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..300 {
        write(
            &src,
            &format!("d{}/f{i:03}", i % 7),
            &data(i, (i as usize * 37) % 5000),
        );
    }
    write(&src, "big.bin", &data(9, 3 << 20));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
        "--json",
    ])
    .ok();
    assert_eq!((f.num("fetched_files"), f.num("failed_files")), (301, 0));
    for i in 0..300 {
        let rel = format!("d{}/f{i:03}", i % 7);
        assert_eq!(
            fs::read(t.path("courier").join(&rel)).unwrap(),
            fs::read(src.join(&rel)).unwrap()
        );
    }
    let log = server.log_text();
    let posts = log.matches("\"POST /src/?files\" 200").count();
    let gets = log.matches("\"GET /src/").count();
    assert!(
        (3..=10).contains(&posts),
        "300 small files in a few requests: {posts} POSTs\n{log}"
    );
    assert!(
        gets <= 3,
        "the big file and the listing alone: {gets} GETs\n{log}"
    );
    bitfog(&[
        "store",
        &t.s("courier"),
        &server.url("dst"),
        &t.s("courier"),
    ])
    .ok();
    assert_same_tree(&src, &dst);
}

/// One request: its first line and its body.
fn read_request(conn: &std::net::TcpStream) -> (String, Vec<u8>) {
    use std::io::{BufRead, BufReader, Read};
    let mut reader = BufReader::new(conn);
    let mut first = String::new();
    let _ = reader.read_line(&mut first);
    let mut len = 0usize;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        line.clear();
    }
    let mut body = vec![0; len];
    let _ = reader.read_exact(&mut body);
    (first, body)
}

/// A server that answers the listing, `POST ?files` with what `answer`
/// makes of the names asked (raw body bytes) and GETs of `files`.
fn fake(
    listing: String,
    answer: impl Fn(&[&str]) -> Vec<u8> + Send + 'static,
    files: Vec<(String, Vec<u8>)>,
) -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (first, body) = read_request(&conn);
            let target = first.split_whitespace().nth(1).unwrap_or("").to_string();
            let (ctype, bytes) = if first.starts_with("POST") {
                let text = String::from_utf8(body).unwrap();
                let names: Vec<&str> = text.lines().collect();
                ("application/x-bitfog-files", answer(&names))
            } else if target.starts_with("/src/?") || target == "/src/" {
                ("application/x-ndjson", listing.clone().into_bytes())
            } else {
                match files.iter().find(|(n, _)| target == format!("/src/{n}")) {
                    Some((_, b)) => ("application/octet-stream", b.clone()),
                    None => {
                        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        continue;
                    }
                }
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&bytes);
        }
    });
    addr
}

fn listing_of(files: &[(String, Vec<u8>)]) -> String {
    let mut lines: Vec<String> = files
        .iter()
        .map(|(n, b)| {
            format!(
                "{{\"name\":\"{n}\",\"size\":{},\"mode\":420,\"mtime\":1700000000,\"sha256\":\"{}\"}}",
                b.len(),
                sha256_hex(b)
            )
        })
        .collect();
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    lines.push(format!(
        "{{\"end\":true,\"count\":{},\"bytes\":{total}}}",
        files.len()
    ));
    lines.join("\n") + "\n"
}

fn item(name: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "{{\"name\":\"{name}\",\"status\":200,\"size\":{},\"mtime\":1700000000}}\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

#[test]
fn each_file_of_an_answer_is_verified_and_fails_alone() {
    let t = Scratch::new();
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), data(i, 200 + i as usize)))
        .collect();
    let known = files.clone();
    let answer = move |names: &[&str]| {
        let mut out = Vec::new();
        for &n in names {
            let b = known.iter().find(|(k, _)| k == n).unwrap().1.clone();
            match n {
                // Another size: its bytes are skipped whole.
                "f1" => out.extend(item(n, &data(7, 150))),
                // The same size, other bytes.
                "f2" => {
                    let mut other = b;
                    other[0] ^= 1;
                    out.extend(item(n, &other));
                }
                "f3" => out.extend(b"{\"name\":\"f3\",\"status\":404,\"reason\":\"not found\"}\n"),
                _ => out.extend(item(n, &b)),
            }
        }
        out.extend(format!("{{\"end\":true,\"files\":{}}}\n", names.len()).bytes());
        out
    };
    let b = |i: usize| files[i].1.clone();
    let addr = fake(listing_of(&files), answer, Vec::new());
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &format!("http://{addr}/src/"),
        &t.s("courier"),
        "--json",
        "--jobs",
        "1",
    ])
    .code(1);
    assert_eq!(
        (f.num("fetched_files"), f.num("failed_files")),
        (2, 3),
        "{f}"
    );
    assert!(f.stderr.contains("'f1': size changed"), "{f}");
    assert!(f.stderr.contains("'f2': sha256 mismatch"), "{f}");
    assert!(
        f.stderr.contains("'f3':") && f.stderr.contains("HTTP 404"),
        "{f}"
    );
    assert_eq!(fs::read(t.path("courier/f0")).unwrap(), b(0));
    assert_eq!(fs::read(t.path("courier/f4")).unwrap(), b(4));
    for n in ["f1", "f2", "f3"] {
        assert!(!t.path("courier").join(n).exists(), "{n} not kept");
    }
    let partials = partial_files(&t.path("courier"));
    assert_eq!(
        partials,
        Vec::<std::path::PathBuf>::new(),
        "nothing half-fetched is left"
    );
}

#[test]
fn an_answer_cut_short_leaves_the_rest_to_plain_gets() {
    let t = Scratch::new();
    let files: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("f{i}"), data(i, 300))).collect();
    let known = files.clone();
    // Two files, then the third cut short.
    let answer = move |names: &[&str]| {
        let mut out = Vec::new();
        for &n in &names[..3] {
            out.extend(item(n, &known.iter().find(|(k, _)| k == n).unwrap().1));
        }
        out.truncate(out.len() - 200);
        out
    };
    let addr = fake(listing_of(&files), answer, files.clone());
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &format!("http://{addr}/src/"),
        &t.s("courier"),
        "--json",
        "--jobs",
        "1",
    ]);
    let f = f.ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("failed_files")),
        (5, 0),
        "the cut file and the rest, each alone: {f}"
    );
    for (n, b) in &files {
        assert_eq!(&fs::read(t.path("courier").join(n)).unwrap(), b, "{n}");
    }
}

#[test]
fn fetch_does_without_post_files_against_an_older_server() {
    let t = Scratch::new();
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), data(i, 100 + i as usize)))
        .collect();
    let mut lines: Vec<String> = files
        .iter()
        .map(|(n, b)| {
            format!(
                "{{\"name\":\"{n}\",\"size\":{},\"mode\":420,\"mtime\":1700000000,\"sha256\":\"{}\"}}",
                b.len(),
                sha256_hex(b)
            )
        })
        .collect();
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    lines.push(format!("{{\"end\":true,\"count\":5,\"bytes\":{total}}}"));
    let mut table = vec![(
        "/src/".to_string(),
        ndjson_response(&(lines.join("\n") + "\n")),
    )];
    for (n, b) in &files {
        table.push((format!("/src/{n}"), body_response(b, Some(b.len()))));
    }
    // An older server answers the listing's path whatever the method: a
    // POST gets the listing back, not many files.
    let addr = routes(table);
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &format!("http://{addr}/src/"),
        &t.s("courier"),
        "--json",
    ])
    .ok();
    assert_eq!(
        (f.num("fetched_files"), f.num("failed_files")),
        (5, 0),
        "{f}"
    );
    for (n, b) in &files {
        assert_eq!(&fs::read(t.path("courier").join(n)).unwrap(), b);
    }
}

/// An item of a `POST /AREA/?put` body.
fn put_item(name: &str, body: &[u8], sha: &str) -> Vec<u8> {
    let mut v = format!(
        "{{\"name\":\"{name}\",\"size\":{},\"headers\":{{\"X-Bitfog-Sha256\":\"{sha}\",\"X-Bitfog-Mode\":\"384\",\"X-Bitfog-Mtime\":\"1700000000\"}}}}\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

#[test]
fn post_put_stores_each_file_as_a_put_would() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    fs::create_dir_all(dst.join("dir/in-the-way")).unwrap();
    let conf = format!(
        "{{\"src\":{{\"path\":{:?}}},\"dst\":{{\"path\":{:?},\"writable\":true,\"exclude\":[\"*.tmp\"]}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let a = data(1, 5000);
    let mut body = put_item("new/a%20b.bin", &a, &sha256_hex(&a));
    body.extend(put_item("bad-hash", b"xyz", &sha256_hex(b"other")));
    body.extend(put_item(".bitfog-x", b"r", &sha256_hex(b"r")));
    body.extend(put_item("skip.tmp", b"e", &sha256_hex(b"e")));
    body.extend(put_item("dir/in-the-way", b"d", &sha256_hex(b"d")));
    body.extend(put_item("a/../b", b"p", &sha256_hex(b"p")));
    body.extend(put_item("empty", b"", &sha256_hex(b"")));
    body.extend(b"{\"end\":true}\n");
    let r = http(server.addr, "POST", "/dst/?put", &[], &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let lines: Vec<serde_json::Value> = String::from_utf8(r.body.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let status = |n: &str| {
        lines
            .iter()
            .find(|l| l["name"] == n)
            .unwrap_or_else(|| panic!("{n} answered: {lines:?}"))["status"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(status("new/a%20b.bin"), 204);
    assert_eq!(status("bad-hash"), 422);
    assert_eq!(status(".bitfog-x"), 400);
    assert_eq!(status("skip.tmp"), 403);
    assert_eq!(status("dir/in-the-way"), 409);
    assert_eq!(status("a/../b"), 400);
    assert_eq!(status("empty"), 204);
    assert_eq!(lines.last().unwrap(), &serde_json::json!({"end": true}));
    assert_eq!(fs::read(dst.join("new/a b.bin")).unwrap(), a);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = fs::metadata(dst.join("new/a b.bin")).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o777, m.mtime()),
        (0o600, 1_700_000_000)
    );
    assert!(!dst.join("bad-hash").exists() && !dst.join("skip.tmp").exists());
    let mut left = Vec::new();
    for e in walk(&dst) {
        if e.contains(".bitfog") {
            left.push(e);
        }
    }
    assert!(left.is_empty(), "no temporary file left: {left:?}");

    // A body cut short stores nothing.
    let mut cut = put_item("c1", b"one", &sha256_hex(b"one"));
    cut.extend(&put_item("c2", b"two", &sha256_hex(b"two"))[..20]);
    let r = http(server.addr, "POST", "/dst/?put", &[], &cut);
    assert_eq!(r.status, 400);
    assert!(
        !dst.join("c1").exists(),
        "nothing of a cut request is stored"
    );
    // Read-only areas take none.
    assert_eq!(
        http(server.addr, "POST", "/src/?put", &[], &body).status,
        405
    );
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        out.push(p.to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn store_sends_small_files_many_to_a_request() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..300 {
        write(
            &src,
            &format!("d{}/f{i:03}", i % 7),
            &data(i, (i as usize * 41) % 6000),
        );
    }
    write(&src, "big.bin", &data(9, 3 << 20));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &server.url("src"), &t.s("c")]).ok();
    let before = server.log_text().len();
    let s = bitfog(&["store", &t.s("c"), &server.url("dst"), &t.s("c"), "--json"]).ok();
    assert_eq!((s.num("stored_files"), s.num("failed_files")), (301, 0));
    assert_same_tree(&src, &dst);
    let log = server.log_text()[before..].to_string();
    let posts = log.matches("\"POST /dst/?put\" 200").count();
    let puts = log.matches("\"PUT /dst/").count();
    assert!((3..=10).contains(&posts), "{posts} POSTs\n{log}");
    assert!(
        puts <= 25,
        "the big file and the directories alone: {puts} PUTs\n{log}"
    );
}

#[test]
fn store_does_without_post_put_against_an_older_server() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    let t = Scratch::new();
    let src = t.mkdir("src");
    for i in 0..5 {
        write(&src, &format!("f{i}"), &data(i, 100));
    }
    let server = Server::start(&t, "site", &two_areas(&src, &t.mkdir("dst")));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &server.url("src"), &t.s("c")]).ok();
    // An older destination: an empty listing, PUTs stored, POST unknown.
    let puts = Arc::new(Mutex::new(Vec::<String>::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = puts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (first, _) = read_request(&conn);
            let resp: &[u8] = if first.starts_with("POST") {
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD, PUT\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else if first.starts_with("PUT") {
                seen.lock().unwrap().push(first.clone());
                b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: 33\r\nConnection: close\r\n\r\n{\"end\":true,\"count\":0,\"bytes\":0}\n"
            };
            let _ = conn.write_all(resp);
        }
    });
    let s = bitfog(&[
        "store",
        &t.s("c"),
        &format!("http://{addr}/dst/"),
        &t.s("c"),
        "--json",
    ])
    .ok();
    assert_eq!(
        (s.num("stored_files"), s.num("failed_files")),
        (5, 0),
        "{s}"
    );
    let puts = puts.lock().unwrap();
    assert_eq!(
        puts.iter().filter(|l| l.starts_with("PUT /dst/f")).count(),
        5,
        "each file PUT alone: {puts:?}"
    );
}
