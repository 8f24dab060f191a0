//! Usage, configuration and DB errors; help against the man page.

use crate::util::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileTypeExt;

#[test]
fn usage_errors_exit_2_with_one_line() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["fetch", "a.db"],
        &["plan", "a.db", "http://h/x/", "--bogus"],
        &["fetch", "a.db", "http://h/x/", "c", "--max-bytes", "12Q"],
        &["store", "a.db", "not-a-url", "c"],
        &["serve", "--addr", "nonsense"],
    ] {
        let r = bitfog(args).code(2);
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
        assert!(r.stderr.starts_with("bitfog: "), "{r}");
    }
    let h = bitfog(&["--help"]).ok();
    assert!(h.stdout.contains("usage: bitfog"));
    assert!(bitfog(&["--version"]).ok().stdout.starts_with("bitfog "));
    assert!(
        bitfog(&["--json", "--version"])
            .ok()
            .stdout
            .starts_with("bitfog ")
    );
    assert!(
        bitfog(&["fetch", "--help", "--json"])
            .ok()
            .stdout
            .contains("usage: bitfog fetch")
    );
    for c in [
        "serve", "builddb", "emptydb", "plan", "fetch", "store", "status", "keygen",
    ] {
        assert!(
            bitfog(&[c, "--help"])
                .ok()
                .stdout
                .contains(&format!("usage: bitfog {c}"))
        );
    }
}

#[test]
fn bad_configs_exit_2_naming_file_area_and_key() {
    let t = Scratch::new();
    let area = t.mkdir("area");
    let a = area.to_str().unwrap();
    for (text, needle) in [
        ("{ not json".to_string(), "invalid JSON"),
        (
            format!("{{\"vms\":{{\"path\":{a:?},\"writeable\":true}}}}"),
            "area 'vms': unknown key 'writeable'",
        ),
        (
            format!("{{\"vms\":{{\"path\":{a:?},\"checksum\":1}}}}"),
            "area 'vms': key 'checksum'",
        ),
        (
            "{\"vms\":{\"path\":\"/no/such/dir\"}}".to_string(),
            "area 'vms': key 'path'",
        ),
        (
            format!("{{\"bad/name\":{{\"path\":{a:?}}}}}"),
            "area 'bad/name'",
        ),
        (
            format!("{{\"vms\":{{\"path\":{a:?},\"exclude\":\"@eaDir\"}}}}"),
            "area 'vms': key 'exclude': expected an array of patterns",
        ),
        (
            format!("{{\"vms\":{{\"path\":{a:?},\"exclude\":[\"a//b\"]}}}}"),
            "area 'vms': key 'exclude': exclude pattern 'a//b'",
        ),
        (
            format!("{{\"vms\":{{\"path\":{a:?},\"owners\":\"yes\"}}}}"),
            "area 'vms': key 'owners'",
        ),
    ] {
        fs::write(t.path("bitfog.json"), &text).unwrap();
        let r = bitfog(&[
            "serve",
            "--conf",
            &t.s("bitfog.json"),
            "--addr",
            "127.0.0.1:0",
        ])
        .code(2);
        assert!(
            r.stderr.contains("bitfog.json") && r.stderr.contains(needle),
            "{r}"
        );
    }
    let r = bitfog(&[
        "serve",
        "--conf",
        &t.s("missing.json"),
        "--addr",
        "127.0.0.1:0",
    ])
    .code(2);
    assert!(r.stderr.contains("missing.json"), "{r}");
}

/// A DB path that names something else than a DB (a document, a FIFO, a
/// directory) is refused before the server is asked, and left as it was;
/// a DB, an empty file and a symlink (not what it points at) are replaced.
#[test]
fn a_db_path_naming_something_else_is_never_replaced() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "f", b"x");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let url = server.url("src");
    fs::write(t.path("thesis.txt"), "years of work\n").unwrap();
    let fifo = t.path("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    t.mkdir("dir");
    for (path, says) in [
        ("thesis.txt", "is not a bitfog DB"),
        ("fifo", "not a regular file"),
        ("dir", "is a directory"),
    ] {
        for cmd in [
            vec!["builddb", &url, &t.s(path)],
            vec!["emptydb", &t.s(path)],
        ] {
            let r = bitfog(&cmd).code(2);
            assert!(r.stderr.contains(says), "{r}");
            assert_eq!(r.stderr.lines().count(), 1, "{r}");
        }
    }
    assert_eq!(
        fs::read_to_string(t.path("thesis.txt")).unwrap(),
        "years of work\n"
    );
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    fs::write(t.path("empty.db"), "").unwrap();
    std::os::unix::fs::symlink(t.path("thesis.txt"), t.path("link.db")).unwrap();
    for path in ["empty.db", "link.db"] {
        bitfog(&["builddb", &url, &t.s(path)]).ok();
        bitfog(&["emptydb", &t.s(path)]).ok();
        assert!(
            fs::read_to_string(t.path(path))
                .unwrap()
                .starts_with("{\"bitfog\":")
        );
    }
    assert_eq!(
        fs::read_to_string(t.path("thesis.txt")).unwrap(),
        "years of work\n"
    );
}

/// A mistyped URL gets a line that says what to type instead.
#[test]
fn a_mistyped_url_is_told_what_is_there() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "sub/f", b"x");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let base = format!("http://{}/", server.addr);
    let free_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for (url, says) in [
        (
            format!("{base}sr/"),
            "no such area (this server has: dst, src)".to_string(),
        ),
        (
            format!("{base}src/sub/"),
            "a listing is of a whole area; its URL ends at the area's name (/src/)".into(),
        ),
        (
            format!("http://127.0.0.1:{free_port}/src/"),
            "connection refused (is bitfog serve running there".into(),
        ),
        (
            format!("https://{}/src/", server.addr),
            "the server answers plain HTTP there; use http://".into(),
        ),
    ] {
        let r = bitfog(&["builddb", &url, &t.s("x.db")]).code(1);
        assert!(r.stderr.contains(&says), "{r}");
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
    }
    assert!(!t.path("x.db").exists());
}

/// A store into an area that is not writable is one line and exit 2
/// before anything is sent, not a refusal per file.
#[test]
fn a_store_into_a_read_only_area_is_refused_up_front() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..5 {
        write(&src, &format!("f{i}"), b"x");
    }
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("e.db")]).ok();
    let c = t.s("c");
    bitfog(&["fetch", &t.s("e.db"), &server.url("src"), &c]).ok();
    let r = bitfog(&["store", &c, &server.url("src"), &c]).code(2);
    assert!(r.stderr.contains("a read-only area"), "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "{r}");
    let head = get(server.addr, "/dst/");
    assert_eq!(
        head.header("allow").as_deref(),
        Some("GET, HEAD, POST, PUT")
    );
    bitfog(&["store", &c, &server.url("dst"), &c]).ok();
}

#[test]
fn bad_dbs_exit_2() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "f", b"x");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let header = "{\"bitfog\":1,\"source\":null,\"created\":\"2026-01-01T00:00:00Z\"}\n";
    let entry = "{\"name\":\"f\",\"size\":1,\"mode\":420,\"mtime\":1}\n";
    for (name, text) in [
        ("no-end", format!("{header}{entry}")),
        ("count", format!("{header}{entry}{{\"end\":true,\"count\":2,\"bytes\":1}}\n")),
        ("version", "{\"bitfog\":9,\"source\":null,\"created\":\"x\"}\n{\"end\":true,\"count\":0,\"bytes\":0}\n".to_string()),
        ("malformed", format!("{header}{{\"name\":\n{{\"end\":true,\"count\":0,\"bytes\":0}}\n")),
        ("empty", String::new()),
        ("binary", "\u{0}\u{1}".to_string()),
    ] {
        let db = t.path(&format!("{name}.db"));
        fs::write(&db, text).unwrap();
        let db = db.to_str().unwrap();
        let r = bitfog(&["plan", db, &server.url("src")]).code(2);
        assert!(r.stderr.contains(db), "{r}");
        bitfog(&["fetch", db, &server.url("src"), &t.s("c")]).code(2);
        bitfog(&["store", db, &server.url("dst"), &t.s("c")]).code(2);
    }
    bitfog(&["plan", &t.s("nonexistent.db"), &server.url("src")]).code(2);
}

#[test]
fn a_truncated_listing_is_refused_and_the_old_db_kept() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "f", b"x");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["builddb", &server.url("src"), &t.s("a.db")]).ok();
    let before = fs::read(t.path("a.db")).unwrap();
    let entry = "{\"name\":\"f\",\"size\":1,\"mode\":420,\"mtime\":1}\n";
    for body in [
        entry.to_string(),
        format!("{entry}{{\"end\":true,\"count\":5,\"bytes\":1}}\n"),
        format!("{entry}{{\"end\":true,\"count\":1,\"bytes\":999}}\n"),
        format!("{entry}{entry}{{\"end\":true,\"count\":2,\"bytes\":2}}\n"),
        format!(
            "{{\"name\":\"x\",\"size\":1,\"mode\":420,\"mtime\":1,\"pad\":\"{}\"}}\n",
            "p".repeat(100_000)
        ),
    ] {
        let addr = responder(ndjson_response(&body), false);
        let r = bitfog(&["builddb", &format!("http://{addr}/src/"), &t.s("a.db")]).code(1);
        assert_eq!(r.stderr.lines().count(), 1, "{r}");
        assert_eq!(
            fs::read(t.path("a.db")).unwrap(),
            before,
            "old DB untouched"
        );
        bitfog(&[
            "fetch",
            &t.s("a.db"),
            &format!("http://{addr}/src/"),
            &t.s("c"),
        ])
        .code(1);
    }
    let left: Vec<_> = fs::read_dir(t.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(left.is_empty(), "no temporary DB left behind");
    // A server that is unreachable, or redirects, fails with exit 1.
    let redirect = responder(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n"
            .to_vec(),
        false,
    );
    bitfog(&["builddb", &format!("http://{redirect}/src/"), &t.s("a.db")]).code(1);
    bitfog(&["builddb", "http://127.0.0.1:1/src/", &t.s("a.db")]).code(1);
    assert_eq!(fs::read(t.path("a.db")).unwrap(), before);
}

fn options_in(text: &str) -> BTreeSet<String> {
    let text = text
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "");
    let mut out = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        let long = word.starts_with("--")
            && word.len() > 3
            && word[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-');
        let short =
            word.len() == 2 && word.starts_with('-') && word.as_bytes()[1].is_ascii_alphabetic();
        if long || short {
            out.insert(word.to_string());
        }
    }
    out
}

#[test]
fn help_and_man_page_name_the_same_options() {
    let mut help = options_in(&bitfog(&["--help"]).stdout);
    for c in [
        "serve", "builddb", "emptydb", "plan", "fetch", "store", "status", "keygen",
    ] {
        help.extend(options_in(&bitfog(&[c, "--help"]).stdout));
    }
    let man = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/bitfog.1")).unwrap();
    // The examples also show other tools' command lines.
    let others = ["ssh ", "mkfs.", "mount", "ntfs-3g ", ".B age "];
    let ours: String = man
        .lines()
        .filter(|l| !others.iter().any(|o| l.starts_with(o)))
        .map(|l| format!("{l}\n"))
        .collect();
    let man_opts = options_in(&ours);
    assert_eq!(help, man_opts, "--help and man/bitfog.1 disagree");
    assert!(help.contains("--max-bytes") && help.contains("--token") && help.contains("-q"));
}

#[test]
fn man_page_renders_without_warnings() {
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/man/bitfog.1");
    let Ok(out) = std::process::Command::new("groff")
        .args(["-man", "-ww", "-z", page])
        .output()
    else {
        panic!("groff is needed for this test (apt-get install groff-base)");
    };
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failing_json_run_still_prints_one_object_with_error_and_exit() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "good", b"good");
    write(&src, "bad", b"will be damaged");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let one_object = |r: &Run| {
        assert_eq!(r.stdout.lines().count(), 1, "{r}");
        r.json()
    };
    // Usage (exit 2), before any command runs.
    let r = bitfog(&["plan", "--json", &t.s("dest.db")]).code(2);
    let j = one_object(&r);
    assert_eq!(j["exit"], 2);
    assert!(
        j["error"].as_str().unwrap().contains("missing argument"),
        "{r}"
    );
    // A server that cannot be reached (exit 1): no summary, the reason.
    let r = bitfog(&["builddb", "http://127.0.0.1:1/src/", &t.s("x.db"), "--json"]).code(1);
    let j = one_object(&r);
    assert_eq!(j["exit"], 1);
    assert!(j["error"].as_str().unwrap().contains("127.0.0.1:1"), "{r}");
    // A store in which one file fails: the summary, with error and exit.
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
    ])
    .ok();
    fs::write(t.path("courier/bad"), b"damaged in transit").unwrap();
    let r = bitfog(&[
        "store",
        &t.s("src.db"),
        &server.url("dst"),
        &t.s("courier"),
        "--json",
    ])
    .code(1);
    let j = one_object(&r);
    assert_eq!(
        (j["stored_files"].as_u64(), j["failed_files"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(j["exit"], 1);
    assert!(j["error"].as_str().unwrap().contains("'bad'"), "{r}");
    // A run that succeeds prints its summary as before.
    let r = bitfog(&["plan", &t.s("dest.db"), &server.url("src"), "--json"]).ok();
    assert!(one_object(&r).get("exit").is_none(), "{r}");
}

#[test]
fn json_verbose_plans_are_one_record_per_file_then_the_summary() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", b"aaaa");
    write(&src, "b/c", b"cc");
    write(&dst, "old", b"aaaa");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["builddb", &server.url("dst"), &t.s("dest.db")]).ok();
    let lines = |r: &Run| -> Vec<serde_json::Value> {
        r.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{r}")))
            .collect()
    };
    let p = bitfog(&["plan", &t.s("dest.db"), &server.url("src"), "--json", "-v"]).ok();
    let v = lines(&p);
    assert_eq!(v.len(), 3, "{p}");
    assert_eq!(v[0]["name"], "a");
    assert_eq!(
        v[0]["action"], "copy",
        "the destination has its content as 'old'"
    );
    assert_eq!(
        (&v[1]["name"], &v[1]["size"], &v[1]["action"]),
        (&"b/c".into(), &2.into(), &"carry".into())
    );
    assert_eq!(v[2]["remaining_files"], 1);
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
        "--dry-run",
        "--json",
        "-v",
    ])
    .ok();
    let v = lines(&f);
    assert!(
        v.iter()
            .any(|r| r["name"] == "b/c" && r["action"] == "carry"),
        "{f}"
    );
    assert_eq!(v.last().unwrap()["dry_run"], true);
}

fn man_page() -> String {
    fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/bitfog.1")).unwrap()
}

#[test]
fn the_man_page_carries_the_version_of_the_package() {
    let man = man_page();
    let th = man.lines().find(|l| l.starts_with(".TH ")).unwrap();
    assert!(
        th.contains(&format!("\"bitfog {}\"", env!("CARGO_PKG_VERSION"))),
        "{th}"
    );
}

#[test]
fn json_output_in_the_man_page_names_every_key() {
    let man = man_page().replace("\\-", "-");
    let section = &man[man.find(".SH JSON OUTPUT").unwrap()..man.find(".SH ENVIRONMENT").unwrap()];
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", &data(1, 1000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let runs = [
        bitfog(&["emptydb", &t.s("dest.db"), "--json"]),
        bitfog(&["builddb", &su, &t.s("src.db"), "--json", "--signatures"]),
        bitfog(&["plan", &t.s("dest.db"), &su, "--json", "--max-bytes", "1M"]),
        bitfog(&[
            "fetch",
            &t.s("dest.db"),
            &su,
            &t.s("c"),
            "--json",
            "--dry-run",
        ]),
        bitfog(&["fetch", &t.s("dest.db"), &su, &t.s("c"), "--json"]),
        bitfog(&[
            "store",
            &t.s("src.db"),
            &du,
            &t.s("c"),
            "--json",
            "--dry-run",
        ]),
        bitfog(&["store", &t.s("src.db"), &du, &t.s("c"), "--json"]),
        bitfog(&["status", &t.s("c"), "--json", "--verify"]),
        bitfog(&["status", &t.s("src.db"), "--json"]),
    ];
    for r in runs {
        let r = r.ok();
        for key in r.json().as_object().unwrap().keys() {
            assert!(
                section.contains(key.as_str()),
                "JSON OUTPUT lacks '{key}' ({r})"
            );
        }
    }
}

#[test]
fn the_completions_offer_every_option_of_every_command() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/completions/");
    let bash = fs::read_to_string(format!("{dir}bitfog.bash")).unwrap();
    let zsh = fs::read_to_string(format!("{dir}_bitfog")).unwrap();
    for c in [
        "serve", "builddb", "emptydb", "plan", "fetch", "store", "status", "keygen",
    ] {
        let help = bitfog(&[c, "--help"]).ok().stdout;
        // The bash line for this command, and the zsh function.
        let line = bash
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{c})")))
            .unwrap_or_else(|| panic!("bash: no case for {c}"));
        let func = &zsh[zsh.find(&format!("_bitfog_{c}() {{")).unwrap()..];
        let func = &func[..func.find("\n}").unwrap()];
        for opt in options_in(&help) {
            if ["-h", "--help", "-q", "--quiet", "-V", "--version"].contains(&opt.as_str()) {
                continue;
            }
            assert!(line.contains(&opt), "bash completion of {c} lacks {opt}");
            let zsh_has = func.contains(&opt)
                || (["--json", "--token", "--cacert", "--rsh", "--remote-bitfog"]
                    .contains(&opt.as_str())
                    && func.contains("$client"))
                || (["-i", "--identity"].contains(&opt.as_str()) && func.contains("$identity"))
                || (["--encrypt-to", "--encrypt-to-file"].contains(&opt.as_str())
                    && func.contains("$seal"));
            assert!(zsh_has, "zsh completion of {c} lacks {opt}");
        }
    }
    let ok = std::process::Command::new("bash")
        .args(["-n", &format!("{dir}bitfog.bash")])
        .status()
        .unwrap()
        .success();
    assert!(ok, "bash syntax");
}
