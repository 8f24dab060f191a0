//! Deltas: signatures at the destination, deltas in the courier, patches
//! applied by the destination server, and what happens when any of them
//! is stale, damaged or interrupted.

use crate::util::*;
use std::fs;
use std::path::Path;

const MIB: usize = 1 << 20;

/// Deltas in the courier: (file name, bytes).
fn courier_deltas(courier: &str) -> Vec<(std::path::PathBuf, u64)> {
    let dir = Path::new(courier).join(".bitfog/deltas");
    let mut out: Vec<_> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap())
                .map(|e| (e.path(), e.metadata().unwrap().len()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `old` with `len` bytes at `at` replaced by fresh ones.
fn overwrite(mut v: Vec<u8>, at: usize, len: usize, seed: u64) -> Vec<u8> {
    v[at..at + len].copy_from_slice(&data(seed, len));
    v
}

fn signed_builddb(du: &str, db: &str) -> Run {
    bitfog(&[
        "builddb",
        du,
        db,
        "--signatures",
        "--signature-min",
        "1M",
        "--json",
    ])
}

/// A site whose destination holds `old` and whose source holds `new` as
/// `name`, with `dest.db` signed, `src.db` built and the delta fetched
/// into the courier; gives the server, the destination's URL and the
/// courier.
fn delta_in_courier(t: &Scratch, name: &str, old: &[u8], new: &[u8]) -> (Server, String, String) {
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&dst, name, old);
    write(&src, name, new);
    let conf = t.path("site.json");
    fs::write(&conf, two_areas(&src, &dst)).unwrap();
    let server = Server::start_conf(&conf, &t.path("site.log"), &[]);
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");
    signed_builddb(&du, &t.s("dest.db")).ok();
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &courier]).ok();
    (server, du, courier)
}

#[test]
fn changed_files_travel_as_deltas_whatever_the_change() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let old = data(1, 6 * MIB);
    // In place: three overwrites.
    let mut inplace = overwrite(old.clone(), 100_000, 10_000, 2);
    inplace = overwrite(inplace, 3 * MIB, 20_000, 3);
    inplace = overwrite(inplace, 6 * MIB - 5_000, 5_000, 4);
    // Shifted: 4 KiB in near the start, 4 KiB out further on.
    let mut shifted = old.clone();
    shifted.splice(50_001..50_001, data(5, 4096));
    shifted.drain(4 * MIB..4 * MIB + 4096);
    // Grown: data before and after.
    let mut grown = data(6, 3000);
    grown.extend_from_slice(&old);
    grown.extend_from_slice(&data(7, 300_000));
    // Shrunk: a middle part and the tail gone.
    let mut shrunk = old.clone();
    shrunk.truncate(5 * MIB + 123);
    shrunk.drain(MIB..2 * MIB);
    for (name, new) in [
        ("vm/inplace.img", &inplace),
        ("vm/shifted.img", &shifted),
        ("vm/grown.img", &grown),
        ("vm/shrunk.img", &shrunk),
    ] {
        write(&dst, name, &old);
        write(&src, name, new);
    }
    // A duplicate of a changed file: made at the destination from it,
    // once it is patched.
    write(&src, "vm/inplace-copy.img", &inplace);
    // Below the signature threshold: carried whole.
    write(&dst, "small", &data(8, 100_000));
    write(&src, "small", &data(9, 100_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let courier = t.s("courier");

    let b = signed_builddb(&du, &t.s("dest.db")).ok();
    assert_eq!(b.num("signed_files"), 4, "{b}");
    let sig_bytes = fs::metadata(t.path("dest.db.sig")).unwrap().len();
    assert_eq!(b.num("signature_bytes"), sig_bytes);
    // 8 KiB blocks, 20 bytes each: well under 0.5 % of the data.
    assert!(sig_bytes * 200 < 4 * 6 * MIB as u64, "{sig_bytes}");
    bitfog(&["builddb", &su, &t.s("src.db")]).ok();

    // One whole file would not fit 1 MiB; the four deltas and the small
    // file do, so the budget counted the deltas' bytes.
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &su,
        &courier,
        "--max-bytes",
        "1M",
        "--json",
    ])
    .ok();
    assert_eq!(f.num("delta_files"), 4, "{f}");
    assert_eq!(f.num("remaining_files"), 0, "{f}");
    assert_eq!(f.num("fetched_files"), 5, "{f}");
    assert_eq!(f.num("instructed_files"), 1, "{f}");
    let deltas = courier_deltas(&courier);
    assert_eq!(deltas.len(), 4);
    let delta_bytes: u64 = deltas.iter().map(|d| d.1).sum();
    assert_eq!(f.num("delta_bytes"), delta_bytes, "{f}");
    assert_eq!(f.num("courier_bytes"), delta_bytes + 100_000, "{f}");
    // Each change costs its own bytes and a block or two around it.
    assert!(delta_bytes < 400_000, "{delta_bytes}");
    assert!(!Path::new(&courier).join("vm").exists(), "no whole copies");

    // A rerun keeps what it made.
    let again = bitfog(&["fetch", &t.s("dest.db"), &su, &courier, "--json"]).ok();
    assert_eq!(again.num("fetched_files"), 0, "{again}");
    assert_eq!(again.num("delta_files"), 4, "{again}");
    assert_eq!(again.num("instructed_files"), 1, "{again}");
    assert_eq!(courier_deltas(&courier), deltas);

    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(s.num("patched_files"), 4, "{s}");
    assert_eq!(s.num("copied_files"), 1, "{s}");
    assert_eq!(s.num("stored_files"), 6, "{s}");
    assert_eq!(s.num("delta_bytes"), delta_bytes, "{s}");
    assert_same_tree(&src, &dst);

    // The next trip removes the deltas the destination no longer needs.
    signed_builddb(&du, &t.s("dest.db")).ok();
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, &courier, "--json"]).ok();
    assert_eq!(f.num("remaining_files"), 0, "{f}");
    assert!(courier_deltas(&courier).is_empty());
}

#[test]
fn a_file_changed_after_its_signature_is_never_patched() {
    let t = Scratch::new();
    let old = data(11, 3 * MIB);
    let new = overwrite(old.clone(), MIB, 50_000, 12);
    let (server, du, courier) = delta_in_courier(&t, "disk.img", &old, &new);
    let (dst, su) = (t.path("dst"), server.url("src"));
    let (delta_path, _) = courier_deltas(&courier).remove(0);
    let delta = fs::read(&delta_path).unwrap();

    // Someone writes to the destination's file, keeping size and mtime.
    let mtime = fs::metadata(dst.join("disk.img"))
        .unwrap()
        .modified()
        .unwrap();
    let meddled = overwrite(old.clone(), 2 * MIB, 10, 13);
    fs::write(dst.join("disk.img"), &meddled).unwrap();
    fs::File::options()
        .write(true)
        .open(dst.join("disk.img"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();

    // The server refuses the delta itself (409) and changes nothing, even
    // though size and mtime look the same.
    let sha = sha256_hex(&new);
    let r = http(
        server.addr,
        "PUT",
        "/dst/disk.img",
        &[
            ("Content-Type", "application/x-bitfog-delta"),
            ("X-Bitfog-Sha256", &sha),
        ],
        &delta,
    );
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(fs::read(dst.join("disk.img")).unwrap(), meddled);

    // store sees it too, says so, exits 1 and leaves the file alone.
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier]).code(1);
    assert!(s.stderr.contains("changed after its signature"), "{s}");
    assert_eq!(fs::read(dst.join("disk.img")).unwrap(), meddled);
    assert!(
        fs::read_dir(&dst).unwrap().count() == 1,
        "no temporary file left"
    );

    // The next trip: a fresh signature (the cache missed the changed
    // file), a new delta against what is there now.
    let b = signed_builddb(&du, &t.s("dest.db")).ok();
    assert_eq!(b.num("signed_files"), 1, "{b}");
    let f = bitfog(&["fetch", &t.s("dest.db"), &su, &courier, "--json"]).ok();
    assert_eq!(f.num("delta_files"), 1, "{f}");
    assert_ne!(courier_deltas(&courier)[0].0, delta_path, "a new delta");
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();
    assert_eq!(fs::read(dst.join("disk.img")).unwrap(), new);
}

#[test]
fn a_damaged_delta_is_refused_and_made_again() {
    let t = Scratch::new();
    let old = data(21, 2 * MIB);
    let mut new = old.clone();
    new.splice(700_000..700_000, data(22, 30_000));
    let (server, du, courier) = delta_in_courier(&t, "f.img", &old, &new);
    let (dst, su) = (t.path("dst"), server.url("src"));
    let (delta_path, len) = courier_deltas(&courier).remove(0);
    let good = fs::read(&delta_path).unwrap();

    // A flipped byte in the literal data.
    let mut bad = good.clone();
    let at = (len / 2) as usize;
    bad[at] ^= 0x20;
    fs::write(&delta_path, &bad).unwrap();
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier]).code(1);
    assert!(s.stderr.contains("damaged delta"), "{s}");
    assert_eq!(fs::read(dst.join("f.img")).unwrap(), old);

    // Sent anyway, the server refuses it (422) and keeps the old file;
    // so does a delta cut short (400) and one for another result (400).
    let sha = sha256_hex(&new);
    let put = |body: &[u8], sha: &str| {
        http(
            server.addr,
            "PUT",
            "/dst/f.img",
            &[
                ("Content-Type", "application/x-bitfog-delta"),
                ("X-Bitfog-Sha256", sha),
            ],
            body,
        )
        .status
    };
    assert_eq!(put(&bad, &sha), 422);
    assert_eq!(put(&good[..good.len() - 10], &sha), 422);
    assert_eq!(put(&good, &sha256_hex(b"other")), 400);
    assert_eq!(put(b"not a delta\n", &sha), 400);
    // A symlink in the old file's place is not the version the delta
    // needs (it is never followed).
    std::os::unix::fs::symlink("f.img", dst.join("link.img")).unwrap();
    let r = http(
        server.addr,
        "PUT",
        "/dst/link.img",
        &[
            ("Content-Type", "application/x-bitfog-delta"),
            ("X-Bitfog-Sha256", &sha),
        ],
        &good,
    );
    assert_eq!(r.status, 409);
    fs::remove_file(dst.join("link.img")).unwrap();
    assert_eq!(fs::read(dst.join("f.img")).unwrap(), old);
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 1, "no temporary file");

    // The next fetch replaces it; then it applies.
    bitfog(&["fetch", &t.s("dest.db"), &su, &courier]).ok();
    assert_eq!(fs::read(&delta_path).unwrap(), good);
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();
    assert_eq!(fs::read(dst.join("f.img")).unwrap(), new);
}

#[test]
#[ignore = "needs strace (.ci/run installs it)"]
fn kill_9_while_patching_leaves_the_old_file() {
    require_strace();
    let t = Scratch::new();
    let old = data(31, 16 * MIB);
    let new = overwrite(old.clone(), 9 * MIB, 100_000, 32);
    let (server, _, courier) = delta_in_courier(&t, "big.img", &old, &new);
    drop(server);
    let (dst, conf) = (t.path("dst"), t.path("site.json"));

    // Every write(2) of the destination waits 5 ms: the patch takes seconds.
    let mut slow = Server::start_shell(
        &conf,
        &t.path("slow.log"),
        &[],
        "strace -f -o /dev/null -e trace=write -e inject=write:delay_enter=5000",
    );
    let store = {
        let (srcdb, du, courier) = (t.s("src.db"), slow.url("dst"), courier.clone());
        std::thread::spawn(move || bitfog(&["store", &srcdb, &du, &courier]))
    };
    let temp = first_growing(
        &dst,
        |n| n.starts_with(".bitfog-tmp-"),
        "the patch never started",
    );
    kill_9_traced(&mut slow);
    let s = store.join().unwrap();
    assert_eq!(s.code, 1, "{s}");
    assert_eq!(
        fs::read(dst.join("big.img")).unwrap(),
        old,
        "old file intact"
    );
    assert!(temp.exists(), "killed mid-patch");

    // A new server removes the leftover; the same delta then applies.
    let server = restart_removing(&conf, &t.path("again.log"), &temp);
    let s = bitfog(&[
        "store",
        &t.s("src.db"),
        &server.url("dst"),
        &courier,
        "--json",
    ])
    .ok();
    assert_eq!(s.num("patched_files"), 1, "{s}");
    assert_eq!(fs::read(dst.join("big.img")).unwrap(), new);
}

#[test]
fn signatures_follow_the_file_not_the_cache() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&dst, "a.img", &data(41, 2 * MIB));
    write(&dst, "tiny", b"below the threshold");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let du = server.url("dst");

    // The wire format: header line, 20-byte records, SHA-256 line.
    let r = get(server.addr, "/dst/a.img?signature");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/x-bitfog-signature")
    );
    let nl = r.body.iter().position(|&b| b == b'\n').unwrap();
    let head: serde_json::Value = serde_json::from_slice(&r.body[..nl]).unwrap();
    assert_eq!(head["size"], 2 * MIB as u64);
    assert_eq!(head["block"], 8192);
    let blocks = head["blocks"].as_u64().unwrap() as usize;
    assert_eq!(blocks, 256);
    let rest = &r.body[nl + 1 + blocks * 20..];
    let tail: serde_json::Value = serde_json::from_slice(rest).unwrap();
    assert_eq!(tail["sha256"], sha256_hex(&data(41, 2 * MIB)));
    // Cached: the same bytes again.
    assert_eq!(get(server.addr, "/dst/a.img?signature").body, r.body);
    assert_eq!(get(server.addr, "/dst/nope?signature").status, 404);
    assert_eq!(get(server.addr, "/dst/.bitfog-x?signature").status, 404);

    // Changed in place with size and mtime kept: a fresh signature.
    let mtime = fs::metadata(dst.join("a.img")).unwrap().modified().unwrap();
    let changed = overwrite(data(41, 2 * MIB), 0, 100, 42);
    fs::write(dst.join("a.img"), &changed).unwrap();
    fs::File::options()
        .write(true)
        .open(dst.join("a.img"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let b = signed_builddb(&du, &t.s("dest.db")).ok();
    assert_eq!(b.num("signed_files"), 1, "{b}");
    let sig = fs::read(t.path("dest.db.sig")).unwrap();
    let text = String::from_utf8_lossy(&sig);
    assert!(
        text.contains(&sha256_hex(&changed)),
        "signed the new content"
    );
    assert!(!text.contains("tiny"));

    // Without --signatures no signature file is written; a bad option is
    // a usage error.
    bitfog(&["builddb", &du, &t.s("plain.db")]).ok();
    assert!(!t.path("plain.db.sig").exists());
    let r = bitfog(&["builddb", &du, &t.s("x.db"), "--signature-min", "1M"]).code(2);
    assert!(r.stderr.contains("needs --signatures"), "{r}");
    let r = bitfog(&["fetch", "a", "b", "c", "--signatures"]).code(2);
    assert!(r.stderr.contains("does not apply"), "{r}");
}

#[test]
fn kill_9_while_making_a_delta_leaves_nothing_half_made() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let old = data(51, 8 * MIB);
    write(&dst, "vm.img", &old);
    let new = overwrite(old.clone(), 100, 3 * MIB, 52);
    write(&src, "vm.img", &new);
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let du = server.url("dst");
    let relay = Relay::start(server.addr, Duration::from_millis(8));
    let courier = t.s("courier");
    signed_builddb(&du, &t.s("dest.db")).ok();
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    let mut child = cmd(&["fetch", &t.s("dest.db"), &relay.url("src"), &courier])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.down_bytes.load(Ordering::SeqCst) < 5 * MIB as u64 {
        assert!(Instant::now() < deadline, "the delta did not progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = courier_deltas(&courier);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].0.extension().unwrap() == "tmp" && left[0].1 > 3 * MIB as u64,
        "a delta under way, under a temporary name: {left:?}"
    );
    // store finds no delta to send, so the file is left as it was.
    let s = bitfog(&["store", &t.s("src.db"), &du, &courier, "--json"]).ok();
    assert_eq!(s.num("missing_files"), 1, "{s}");
    assert_eq!(fs::read(dst.join("vm.img")).unwrap(), old);

    // The rerun starts the delta afresh and keeps only the finished one.
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &relay.url("src"),
        &courier,
        "--json",
    ])
    .ok();
    assert_eq!(f.num("delta_files"), 1, "{f}");
    let now = courier_deltas(&courier);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].0.extension().unwrap(), "delta");
    bitfog(&["store", &t.s("src.db"), &du, &courier]).ok();
    assert_eq!(fs::read(dst.join("vm.img")).unwrap(), new);
}

#[test]
fn a_hostile_server_cannot_pass_off_a_signature() {
    let t = Scratch::new();
    let sha = "ab".repeat(32);
    let big = 100 * MIB as u64;
    let huge = 1u64 << 60;
    let listing = format!(
        "{{\"name\":\"cut\",\"size\":{big},\"mode\":420,\"mtime\":1,\"sha256\":\"{sha}\"}}\n\
         {{\"name\":\"huge\",\"size\":{huge},\"mode\":420,\"mtime\":1,\"sha256\":\"{sha}\"}}\n\
         {{\"name\":\"plain\",\"size\":{big},\"mode\":420,\"mtime\":1,\"sha256\":\"{sha}\"}}\n\
         {{\"end\":true,\"count\":3,\"bytes\":{}}}\n",
        2 * big + huge
    );
    let sig = |head: &str, body_len: usize, declared: usize| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-bitfog-signature\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n{head}\n"
        )
        .into_bytes();
        r.extend(std::iter::repeat_n(7u8, body_len));
        r
    };
    let addr = routes(vec![
        ("/a/".into(), ndjson_response(&listing)),
        // A table cut short.
        (
            "/a/cut".into(),
            sig(
                r#"{"size":104857600,"block":16384,"strong":16,"blocks":6400}"#,
                100,
                200_000,
            ),
        ),
        // A header that promises 2^30 blocks.
        (
            "/a/huge".into(),
            sig(
                r#"{"size":1152921504606846976,"block":1073741824,"strong":16,"blocks":1073741824}"#,
                10,
                1 << 30,
            ),
        ),
        // An older server: the file itself.
        ("/a/plain".into(), body_response(&[1u8; 4096], Some(4096))),
    ]);
    let url = format!("http://{addr}/a/");
    let r = bitfog(&["builddb", &url, &t.s("x.db"), "--signatures", "--json"]).code(1);
    assert_eq!(r.num("signed_files"), 0, "{r}");
    assert_eq!(r.num("files"), 3, "{r}");
    assert!(
        r.stderr.contains("'cut': no signature") && r.stderr.contains("cut short"),
        "{r}"
    );
    assert!(r.stderr.contains("too many"), "{r}");
    assert!(r.stderr.contains("does not make signatures"), "{r}");
    // The DB is written; the signature file holds no record.
    assert!(t.path("x.db").exists());
    let sigs = fs::read_to_string(t.path("x.db.sig")).unwrap();
    assert_eq!(sigs.lines().count(), 1, "{sigs}");
}
