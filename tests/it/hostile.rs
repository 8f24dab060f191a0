//! Inputs from strangers: a courier disk prepared by someone else
//! (symlinks at every state path and above carried names, FIFOs, crafted
//! records) and a source whose listing cannot be complete. Nothing outside
//! the courier or the destination area may change, nothing may hang, and
//! an incomplete listing never decides a deletion.

use crate::util::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A directory of precious files that no bitfog command may touch.
fn victim(t: &Scratch, name: &str) -> PathBuf {
    let v = t.mkdir(name);
    write(&v, "file1.doc", b"precious one");
    write(&v, "keep/file2.doc", b"precious two");
    v
}

/// The id `fetch` gives a name's partial download.
fn partial_id(name: &str) -> String {
    sha256_hex(name.as_bytes())[..32].to_string()
}

/// Where a name's partial download lives: `partial/X/ID`.
fn partial_path(name: &str) -> String {
    let id = partial_id(name);
    format!("partial/{}/{id}", &id[..1])
}

fn append(path: &Path, line: &str) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// A source with small files, one bigger than the trip (ranges) and one
/// big enough to keep a sidecar; a first trip under a budget fills the
/// courier with records, ranges and held files.
fn first_trip(t: &Scratch) -> (Server, PathBuf, PathBuf) {
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for i in 0..6u64 {
        write(&src, &format!("d/f{i}"), &data(i, 3000 + 100 * i as usize));
    }
    write(&src, "big", &data(99, 3 << 20));
    let server = Server::start(t, "sites", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
        "--max-bytes",
        "2M",
    ])
    .ok();
    assert!(
        t.path("courier/.bitfog/ranges").is_dir(),
        "a range was carried"
    );
    (server, src, dst)
}

#[test]
fn a_courier_with_planted_symlinks_changes_nothing_outside_it() {
    let t = Scratch::new();
    let (server, src, dst) = first_trip(&t);
    let courier = t.path("courier");
    let state = courier.join(".bitfog");

    // A symlinked parent of a carried name, with a record that makes the
    // next fetch prune "sub/file1.doc".
    let sub = victim(&t, "victim-sub");
    symlink(&sub, courier.join("sub")).unwrap();
    append(
        &state.join("carried.jsonl"),
        "{\"name\":\"sub/file1.doc\",\"size\":12,\"mtime\":1,\"sha256\":null}\n",
    );
    // The state directories bitfog empties, as symlinks.
    let ranges = victim(&t, "victim-ranges");
    let deltas = victim(&t, "victim-deltas");
    fs::remove_dir_all(state.join("ranges")).unwrap();
    symlink(&ranges, state.join("ranges")).unwrap();
    symlink(&deltas, state.join("deltas")).unwrap();
    // A directory of partial downloads, as a symlink.
    let shard = victim(&t, "victim-shard");
    let used = [&partial_id("big2")[..1], &partial_id("d/f5")[..1]];
    let free = ["0", "1", "2"]
        .into_iter()
        .find(|x| !used.contains(x))
        .unwrap();
    fs::remove_dir_all(state.join("partial").join(free)).unwrap();
    symlink(&shard, state.join("partial").join(free)).unwrap();
    // Every temporary and state file bitfog writes, as a symlink to a file
    // outside.
    let files = victim(&t, "victim-files");
    let planted = [
        "wanted.tmp".to_string(),
        "held.tmp".into(),
        "destdb.jsonl.tmp".into(),
        "carried.jsonl.tmp".into(),
        "copies.jsonl.tmp".into(),
        "copies.jsonl.new".into(),
        "store.tmp".into(),
        "receipt.tmp".into(),
        format!("{}.json.tmp", partial_path("big2")),
        format!("{}.part", partial_path("d/f5")),
        // Where an older bitfog kept them.
        format!("partial/{}.part", partial_id("big2")),
    ];
    for (i, name) in planted.iter().enumerate() {
        write(&files, &format!("t{i}"), b"precious target");
        symlink(files.join(format!("t{i}")), state.join(name)).unwrap();
    }
    let before: Vec<_> = [&sub, &ranges, &deltas, &shard, &files]
        .iter()
        .map(|v| tree(v))
        .collect();

    // The source moves on; the next trips run over the planted courier.
    write(&src, "d/f0", b"changed at the source");
    write(&src, "big2", &data(7, 1_500_000));
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
        "--json",
    ]);
    assert_eq!(f.code, 0, "{f}");
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    bitfog(&[
        "store",
        &t.s("src.db"),
        &server.url("dst"),
        &t.s("courier"),
        "--delete",
    ])
    .ok();

    let after: Vec<_> = [&sub, &ranges, &deltas, &shard, &files]
        .iter()
        .map(|v| tree(v))
        .collect();
    assert_eq!(before, after, "nothing outside the courier changed");
    assert_same_tree(&src, &dst);
}

/// A COURIER mistyped as a directory of someone's files (a home
/// directory, the source area itself) is refused before anything is
/// written: fetch would replace the files at the names it carries, and
/// prune files it adopted once the destination had them. store and
/// status --verify refuse a directory fetch never filled.
#[test]
fn a_directory_of_files_is_never_taken_for_a_courier() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "report.doc", b"the source's report");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let su = server.url("src");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    let home = t.mkdir("home");
    write(&home, "report.doc", b"my own report, another version");
    write(&home, "notes/today", b"notes");
    let before = (tree(&home), tree(&src));
    for dir in [&home, &src] {
        for extra in [&[][..], &["--dry-run"][..]] {
            let mut cmd = vec!["fetch", "--json"];
            let (db, d) = (t.s("dest.db"), dir.to_str().unwrap().to_string());
            cmd.extend([db.as_str(), su.as_str(), d.as_str()]);
            cmd.extend_from_slice(extra);
            let r = bitfog(&cmd).code(2);
            assert!(r.stderr.contains("holds files and is not a courier"), "{r}");
        }
    }
    assert_eq!((tree(&home), tree(&src)), before, "nothing written");
    for cmd in [
        vec![
            "store",
            &t.s("src.db"),
            &server.url("dst"),
            home.to_str().unwrap(),
        ],
        vec!["status", home.to_str().unwrap(), "--verify"],
    ] {
        let r = bitfog(&cmd).code(2);
        assert!(r.stderr.contains("is not a courier"), "{r}");
    }
    assert_eq!(tree(&home), before.0, "no .bitfog/ made");
    // A fresh disk's furniture is no obstacle.
    let disk = t.mkdir("disk/lost+found").parent().unwrap().to_path_buf();
    fs::create_dir(disk.join("System Volume Information")).unwrap();
    bitfog(&["fetch", &t.s("dest.db"), &su, disk.to_str().unwrap()]).ok();
    assert_eq!(
        fs::read(disk.join("report.doc")).unwrap(),
        b"the source's report"
    );
}

#[test]
fn fifos_in_a_courier_never_make_fetch_or_store_wait() {
    let t = Scratch::new();
    let (server, src, dst) = first_trip(&t);
    let state = t.path("courier/.bitfog");
    fs::create_dir_all(state.join("deltas")).unwrap();
    let fifo = |p: PathBuf| {
        let _ = fs::remove_file(&p);
        mkfifo(&p);
    };
    for name in [
        "deltas/x.delta",
        "partial/y.json",
        "partial/z.part",
        "ranges/r.json",
        "copies.jsonl",
        "destdb.jsonl",
        "receipt.jsonl",
        "source.jsonl",
    ] {
        fifo(state.join(name));
    }
    fifo(t.path("courier/d/f1"));

    // A courier whose receipt is a FIFO is no DESTDB.
    let r = bitfog_within(60, &["plan", &t.s("courier"), &server.url("src")]);
    assert_eq!(r.code, 2, "{r}");
    // A store over FIFOs refuses them by name and goes on.
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    let s = bitfog_within(
        60,
        &[
            "store",
            &t.s("src.db"),
            &server.url("dst"),
            &t.s("courier"),
            "--delete",
        ],
    );
    assert_eq!(s.code, 1, "{s}");
    assert!(
        s.stderr.contains("'d/f1'") && s.stderr.contains("FIFO"),
        "{s}"
    );
    // fetch replaces what it cannot use, and the trips complete.
    let f = bitfog_within(
        60,
        &[
            "fetch",
            &t.s("dest.db"),
            &server.url("src"),
            &t.s("courier"),
        ],
    );
    assert_eq!(f.code, 0, "{f}");
    bitfog_within(
        60,
        &[
            "store",
            &t.s("src.db"),
            &server.url("dst"),
            &t.s("courier"),
            "--delete",
        ],
    )
    .ok();
    assert_same_tree(&src, &dst);
    // A receipt now stands in the courier; a FIFO beside it as its
    // signatures is refused, not waited on.
    fifo(state.join("receipt.jsonl.sig"));
    let f = bitfog_within(
        60,
        &[
            "fetch",
            &t.s("courier"),
            &server.url("src"),
            &t.s("courier"),
        ],
    )
    .ok();
    assert!(f.stderr.contains("not a regular file"), "{f}");
}

#[test]
fn a_symlinked_state_directory_is_refused_before_anything_is_written() {
    let t = Scratch::new();
    let (server, _src, _dst) = first_trip(&t);
    let elsewhere = victim(&t, "victim-state");
    let state = t.path("courier/.bitfog");
    fs::rename(&state, t.path("old-state")).unwrap();
    symlink(&elsewhere, &state).unwrap();
    let before = tree(&elsewhere);
    for args in [
        vec!["fetch", "dest.db", "SRC", "courier"],
        vec!["store", "dest.db", "DST", "courier"],
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| match *a {
                "SRC" => server.url("src"),
                "DST" => server.url("dst"),
                "courier" | "dest.db" => t.s(a),
                other => other.to_string(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = bitfog_within(60, &args).code(2);
        assert!(r.stderr.contains("symlink"), "{r}");
    }
    assert_eq!(tree(&elsewhere), before);
}

/// Makes `depth` nested directories of 200-byte names below `root` (more
/// than PATH_MAX in all) with a file at the bottom, each made relative to
/// the one above it (Python's `dir_fd`), which PATH_MAX does not bound.
fn deep_tree(root: &Path, depth: usize) {
    let script = format!(
        "import os, sys\n\
         fd = os.open(sys.argv[1], os.O_RDONLY)\n\
         for _ in range({depth}):\n\
         \x20   os.mkdir('d' * 200, dir_fd=fd)\n\
         \x20   fd = os.open('d' * 200, os.O_RDONLY, dir_fd=fd)\n\
         f = os.open('file', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)\n\
         os.write(f, b'deep')\n"
    );
    let ok = std::process::Command::new("python3")
        .args(["-c", &script])
        .arg(root)
        .status()
        .expect("python3 makes the deep tree")
        .success();
    assert!(ok);
}

/// The unreadable part of a source must not read as "deleted there".
fn assert_delete_refused(t: &Scratch, server: &Server, dst: &Path, skipped_at_least: u64) {
    let b = bitfog(&["builddb", &server.url("src"), &t.s("src.db"), "--json"]).ok();
    assert!(b.num("skipped") >= skipped_at_least, "{b}");
    let p = bitfog(&["plan", &t.s("dest.db"), &server.url("src"), "--json"]).ok();
    assert!(p.num("skipped") >= skipped_at_least, "{p}");
    assert!(p.stderr.contains("skipped"), "{p}");
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &server.url("src"),
        &t.s("courier"),
        "--json",
    ])
    .ok();
    assert!(f.num("skipped") >= skipped_at_least, "{f}");
    let s = bitfog(&[
        "store",
        &t.s("src.db"),
        &server.url("dst"),
        &t.s("courier"),
        "--delete",
        "--json",
    ])
    .code(1);
    assert!(s.stderr.contains("not deleting anything"), "{s}");
    assert_eq!(s.num("deleted_files"), 0, "{s}");
    assert_eq!(
        fs::read(dst.join("b/y")).unwrap(),
        b"only copy of y",
        "the destination keeps what the source could not list"
    );
}

#[test]
fn a_path_longer_than_path_max_is_skipped_and_blocks_deletion() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", b"a");
    deep_tree(&src, 24);
    write(&dst, "b/y", b"only copy of y");
    let server = Server::start(&t, "sites", &two_areas(&src, &dst));
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    assert_delete_refused(&t, &server, &dst, 1);
    assert!(server.log_text().contains("listing skips"));
}

#[test]
#[ignore = "needs root: runs the server as nobody (setpriv)"]
fn an_unreadable_source_directory_is_skipped_and_blocks_deletion() {
    use std::os::unix::fs::PermissionsExt;
    let t = Scratch::new();
    fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", b"a");
    write(&src, "b/y", b"y at the source");
    write(&src, "b/z", b"z at the source");
    write(&dst, "b/y", b"only copy of y");
    write(&dst, "b/z", b"only copy of z");
    for d in [&src, &dst, &dst.join("b")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    for f in ["b/y", "b/z"] {
        fs::set_permissions(dst.join(f), fs::Permissions::from_mode(0o666)).unwrap();
    }
    fs::set_permissions(src.join("b"), fs::Permissions::from_mode(0o000)).unwrap();
    let conf = t.path("sites.json");
    fs::write(&conf, two_areas(&src, &dst)).unwrap();
    let server = Server::start_shell(
        &conf,
        &t.path("sites.log"),
        &[],
        "setpriv --reuid=65534 --regid=65534 --clear-groups",
    );
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    assert_delete_refused(&t, &server, &dst, 1);
    assert!(fs::read(dst.join("b/z")).is_ok());
    let log = server.log_text();
    assert!(
        log.contains("listing skips 'b': permission denied"),
        "the server names the directory: {log}"
    );
}

#[test]
fn running_out_of_descriptors_is_skipped_and_blocks_deletion() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    for d in 0..40 {
        for f in 0..5 {
            write(&src, &format!("d{d:02}/e/f{f}"), b"x");
        }
    }
    write(&dst, "b/y", b"only copy of y");
    let conf = t.path("sites.json");
    fs::write(&conf, two_areas(&src, &dst)).unwrap();
    // 20 descriptors: the walk runs out of them (EMFILE) part of the way.
    let server = Server::start_shell(&conf, &t.path("sites.log"), &[], "ulimit -n 20;");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let b = bitfog(&["builddb", &server.url("src"), &t.s("src.db"), "--json"]).ok();
    assert!(b.num("skipped") > 0, "{b}");
    assert!(server.log_text().contains("too many open files"));
    let s = bitfog(&[
        "store",
        &t.s("src.db"),
        &server.url("dst"),
        &t.s("courier-none"),
        "--delete",
        "--dry-run",
    ]);
    assert_eq!(s.code, 2, "no courier: {s}");
    fs::create_dir_all(t.path("courier/.bitfog")).unwrap();
    let s = bitfog(&[
        "store",
        &t.s("src.db"),
        &server.url("dst"),
        &t.s("courier"),
        "--delete",
        "--json",
    ])
    .code(1);
    assert!(s.stderr.contains("not deleting anything"), "{s}");
    assert_eq!(fs::read(dst.join("b/y")).unwrap(), b"only copy of y");
}

#[test]
fn an_area_replaced_under_a_running_server_is_refused_until_it_is_back() {
    // A NAS volume mounted over the area's directory after the server
    // started, or the directory replaced: the server must not go on
    // listing or filling the one it opened, which nobody sees any more.
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "a", b"a");
    write(&dst, "kept", b"only copy");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let old = t.path("dst-opened");
    fs::rename(&dst, &old).unwrap();
    fs::create_dir(&dst).unwrap();
    let r = get(server.addr, "/dst/");
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 503, "{body}");
    assert!(
        body.contains("area 'dst'") && body.contains("restart bitfog serve"),
        "{body}"
    );
    // Nothing is written to either directory.
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    let c = t.s("courier");
    bitfog(&["fetch", &t.s("empty.db"), &server.url("src"), &c]).ok();
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    let s = bitfog(&["store", &t.s("src.db"), &server.url("dst"), &c, "--delete"]);
    assert_ne!(s.code, 0, "{s}");
    assert!(s.stderr.contains("restart bitfog serve"), "{s}");
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 0);
    assert_eq!(fs::read(old.join("kept")).unwrap(), b"only copy");
    assert!(!old.join("a").exists());
    // The directory it opened back at its path: served again.
    fs::remove_dir(&dst).unwrap();
    fs::rename(&old, &dst).unwrap();
    assert_eq!(get(server.addr, "/dst/").status, 200);
    bitfog(&["store", &t.s("src.db"), &server.url("dst"), &c]).ok();
    assert_eq!(fs::read(dst.join("a")).unwrap(), b"a");
    assert_eq!(fs::read(dst.join("kept")).unwrap(), b"only copy");
}

#[test]
fn a_replaced_area_with_a_token_names_its_path_only_to_a_client_with_the_token() {
    let t = Scratch::new();
    let dst = t.mkdir("dst");
    let conf = format!(
        "{{\"dst\":{{\"path\":{:?},\"writable\":true,\"token\":\"s3cret\"}}}}",
        dst.to_str().unwrap()
    );
    let server = Server::start(&t, "site", &conf);
    fs::rename(&dst, t.path("dst-opened")).unwrap();
    fs::create_dir(&dst).unwrap();
    let path = dst.to_str().unwrap();
    let anon = http(server.addr, "GET", "/dst/", &[], b"");
    assert_eq!(anon.status, 401);
    assert!(!String::from_utf8_lossy(&anon.body).contains(path));
    let auth = [("Authorization", "Bearer s3cret")];
    let known = http(server.addr, "GET", "/dst/", &auth, b"");
    assert_eq!(known.status, 503);
    assert!(String::from_utf8_lossy(&known.body).contains(path));
}

#[test]
fn a_courier_inside_the_source_area_is_left_out_not_carried_into_itself() {
    // The courier disk plugged into the source NAS, mounted inside the
    // area being served: each trip would otherwise carry the courier's
    // own files into it again, one level deeper.
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "photos/a.jpg", &data(1, 50_000));
    write(&src, "b.txt", b"b");
    // A bare reserved name is not a courier: its directory is listed.
    fs::create_dir_all(src.join("keep/.bitfog")).unwrap();
    write(&src, "keep/y", b"y");
    let courier = src.join("usb/courier");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let c = courier.to_str().unwrap();
    bitfog(&["emptydb", &t.s("empty.db")]).ok();
    for _ in 0..2 {
        bitfog(&["fetch", &t.s("empty.db"), &server.url("src"), c]).ok();
    }
    let listing = String::from_utf8(get(server.addr, "/src/").body).unwrap();
    assert!(!listing.contains("usb/courier"), "{listing}");
    assert!(listing.contains("\"photos/a.jpg\"") && listing.contains("\"b.txt\""));
    assert!(listing.contains("\"keep/y\""), "{listing}");
    assert!(!courier.join("usb").exists(), "nothing carried into itself");
    assert_eq!(
        fs::read(courier.join("photos/a.jpg")).unwrap(),
        data(1, 50_000)
    );
    assert!(
        server
            .log_text()
            .contains("listing leaves out 'usb/courier': a courier"),
        "{}",
        server.log_text()
    );
    // The courier is not a part of the area that is missing: a store with
    // --delete goes ahead, and the destination ends as the source's data.
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    bitfog(&["store", &t.s("src.db"), &server.url("dst"), c, "--delete"]).ok();
    assert_eq!(fs::read(dst.join("photos/a.jpg")).unwrap(), data(1, 50_000));
    assert_eq!(fs::read(dst.join("b.txt")).unwrap(), b"b");
    // `usb` is a directory of the source's; the courier in it is not.
    assert!(!dst.join("usb/courier").exists());
}
