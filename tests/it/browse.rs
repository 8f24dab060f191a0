//! People can look: an HTML page of a directory for a browser, Basic auth
//! with the token, and every other client's answers unchanged.

use crate::util::*;
use std::fs;

const FIREFOX: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

fn page(server: &Server, path: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![("Accept", FIREFOX)];
    h.extend_from_slice(extra);
    http(server.addr, "GET", path, &h, b"")
}

fn text(r: &Resp) -> String {
    String::from_utf8(r.body.clone()).unwrap()
}

/// The `href` values of a page, in order.
fn links(html: &str) -> Vec<String> {
    html.split("href=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].to_string())
        .collect()
}

#[test]
fn a_browser_gets_a_page_per_directory_with_links_that_work() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "photos/2024/a.jpg", b"jpeg bytes");
    write(&src, "photos/été 2024/b.jpg", b"b");
    write(&src, "<script>alert(1)<script>.txt", b"x");
    write(&src, "\"><img src=x>", b"y");
    write(&src, "@eaDir/thumb", b"excluded");
    write(&src, ".bitfog-state", b"reserved");
    std::os::unix::fs::symlink("/etc/passwd", src.join("a-link")).unwrap();
    let conf = format!(
        "{{\"src\":{{\"path\":{:?},\"exclude\":[\"@eaDir\"]}},\"dst\":{{\"path\":{:?},\"writable\":true}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);

    // The areas.
    let r = page(&server, "/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Content-Type").unwrap(),
        "text/html; charset=utf-8"
    );
    assert_eq!(links(&text(&r)), ["dst/", "src/"]);

    // The area: its directories and files, names as text, nothing else.
    let r = page(&server, "/src/", &[]);
    assert_eq!(r.status, 200, "{}", text(&r));
    let html = text(&r);
    assert!(
        !html.contains("<script>alert") && !html.contains("<img src=x>"),
        "{html}"
    );
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;script&gt;.txt"),
        "{html}"
    );
    assert!(html.contains("&quot;&gt;&lt;img src=x&gt;"), "{html}");
    for hidden in ["a-link", "@eaDir", ".bitfog"] {
        assert!(!html.contains(hidden), "{hidden}: {html}");
    }
    let l = links(&html);
    assert!(l.contains(&"photos/".to_string()), "{l:?}");
    assert!(
        l.contains(&"%3Cscript%3Ealert%281%29%3Cscript%3E.txt".to_string()),
        "{l:?}"
    );
    assert!(
        html.contains("2 files") && html.contains("1 directory"),
        "{html}"
    );

    // Following the links, down to a file's bytes.
    let photos = text(&page(&server, "/src/photos/", &[]));
    let l = links(&photos);
    assert_eq!(l, ["../", "2024/", "%C3%A9t%C3%A9%202024/"], "{photos}");
    let sub = page(&server, &format!("/src/photos/{}", l[2]), &[]);
    assert_eq!(links(&text(&sub)), ["../", "b.jpg"]);
    let year = text(&page(&server, "/src/photos/2024/", &[]));
    assert_eq!(links(&year), ["../", "a.jpg"]);
    let file = page(&server, "/src/photos/2024/a.jpg", &[]);
    assert_eq!(file.body, b"jpeg bytes");
    assert_eq!(page(&server, "/src/@eaDir/", &[]).status, 404);
    assert_eq!(page(&server, "/src/nowhere/", &[]).status, 404);

    // Everyone else gets exactly what they got before.
    let plain = get(server.addr, "/src/");
    let any = http(server.addr, "GET", "/src/", &[("Accept", "*/*")], b"");
    assert_eq!(
        plain.header("Content-Type").unwrap(),
        "application/x-ndjson"
    );
    assert_eq!(plain.body, any.body);
    assert!(
        text(&plain)
            .lines()
            .last()
            .unwrap()
            .starts_with("{\"end\":true,")
    );
    assert_eq!(get(server.addr, "/src/photos/").status, 400);
    assert_eq!(text(&get(server.addr, "/")), "[\"dst\",\"src\"]\n");
}

#[test]
fn a_page_never_hashes_even_with_a_cold_cache() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "big", &data(1, 64 << 20));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let cache = t.path("site.hashcache");
    let started = std::time::Instant::now();
    let r = page(&server, "/src/", &[]);
    assert_eq!(r.status, 200);
    assert!(text(&r).contains("64.0 MiB"), "{}", text(&r));
    let hashed = |p: &std::path::Path| fs::read_dir(p).map_or(0, |d| d.count());
    assert_eq!(hashed(&cache), 0, "an HTML page wrote no hash cache");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // A listing does hash, and caches it.
    assert_eq!(get(server.addr, "/src/").status, 200);
    wait_until("the listing's cache", || hashed(&cache) > 0);
}

#[test]
fn a_token_area_asks_a_browser_for_the_token_as_a_password() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    write(&src, "f", b"secret file");
    let conf = format!(
        "{{\"tok\":{{\"path\":{:?},\"token\":\"s3cret-token\"}}}}",
        src.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    let r = page(&server, "/tok/", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("WWW-Authenticate").unwrap(),
        "Basic realm=\"bitfog tok\""
    );
    // base64("anyone:s3cret-token") and base64("anyone:wrong")
    let good = "Basic YW55b25lOnMzY3JldC10b2tlbg==";
    let bad = "Basic YW55b25lOndyb25n";
    assert_eq!(
        page(&server, "/tok/", &[("Authorization", bad)]).status,
        401
    );
    let r = page(&server, "/tok/", &[("Authorization", good)]);
    assert_eq!(r.status, 200);
    assert_eq!(links(&text(&r)), ["/", "f"]);
    let r = http(
        server.addr,
        "GET",
        "/tok/f",
        &[("Authorization", good)],
        b"",
    );
    assert_eq!(r.body, b"secret file");
    // Other clients are still told about the bearer token, which works.
    let r = get(server.addr, "/tok/");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("WWW-Authenticate").unwrap(), "Bearer");
    let bearer = http(
        server.addr,
        "GET",
        "/tok/f",
        &[("Authorization", "Bearer s3cret-token")],
        b"",
    );
    assert_eq!(bearer.body, b"secret file");
    assert!(!server.log_text().contains("s3cret"), "no token in the log");
}
