//! `bitfog status`: what a courier or a DB holds, offline; `--verify`
//! finds a courier damaged in transit before `store` does.

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};

/// The first file in `dir` whose name ends with `suffix`.
fn one(dir: &Path, suffix: &str) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no {suffix} in {}", dir.display()))
}

fn flip(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    b[at as usize] ^= 0xff;
    fs::write(path, b).unwrap();
}

#[test]
fn verify_names_a_damaged_file_range_and_delta_and_fetch_replaces_them() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    // A changed image (a delta), a file bigger than the budget (ranges),
    // a small file, and its duplicate (an instruction).
    let old = data(1, 2 << 20);
    let mut new = old.clone();
    new[1000..1100].copy_from_slice(&data(2, 100));
    write(&dst, "vm.img", &old);
    write(&src, "vm.img", &new);
    write(&src, "big", &data(3, 3_000_000));
    write(&src, "a", &data(4, 300_000));
    write(&src, "a-copy", &data(4, 300_000));
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let c = t.s("courier");
    bitfog(&[
        "builddb",
        &du,
        &t.s("dest.db"),
        "--signatures",
        "--signature-min",
        "1M",
    ])
    .ok();
    bitfog(&["fetch", &t.s("dest.db"), &su, &c, "--max-bytes", "2M"]).ok();

    // A clean courier: exit 0, and what it holds.
    let s = bitfog(&["status", &c, "--verify", "--json"]).ok();
    let j = s.json();
    assert_eq!(
        (
            j["files"].as_u64(),
            j["bytes"].as_u64(),
            j["ranges"].as_u64(),
            j["deltas"].as_u64(),
            j["instructions"].as_u64(),
            j["damaged_files"].as_u64(),
            j["missing_files"].as_u64()
        ),
        (
            Some(1),
            Some(300_000),
            Some(1),
            Some(1),
            Some(1),
            Some(0),
            Some(0)
        ),
        "{s}"
    );
    assert_eq!(j["source"], su.as_str());
    assert!(
        j["left_files"].as_u64().unwrap() >= 1,
        "the rest of big: {s}"
    );
    let human = bitfog(&["status", &c]).ok();
    assert!(
        human.stdout.contains(&format!("filled from {su}")),
        "{human}"
    );

    // A byte flipped in each kind of thing the courier carries.
    let state = t.path("courier/.bitfog");
    flip(&t.path("courier/a"), 12_345);
    flip(&one(&state.join("ranges"), ".range"), 7);
    let delta = one(&state.join("deltas"), ".delta");
    let len = fs::metadata(&delta).unwrap().len();
    flip(&delta, len / 2);
    let s = bitfog(&["status", &c, "--verify", "--json"]).code(1);
    assert_eq!(s.num("damaged_files"), 3, "{s}");
    for name in ["'a'", "'big'", "'vm.img'"] {
        assert!(s.stderr.contains(name), "{name} is named: {s}");
    }
    // The next fetch replaces each; the courier verifies clean again.
    bitfog(&["fetch", &t.s("dest.db"), &su, &c, "--max-bytes", "2M"]).ok();
    let s = bitfog(&["status", &c, "--verify", "--json"]).ok();
    assert_eq!(
        (
            s.num("damaged_files"),
            s.num("files"),
            s.num("ranges"),
            s.num("deltas")
        ),
        (0, 1, 1, 1),
        "{s}"
    );
    // And the trip completes as if nothing had happened.
    for _ in 0..4 {
        bitfog(&["store", &c, &du, &c]).ok();
        bitfog(&["fetch", &c, &su, &c, "--max-bytes", "2M"]).ok();
    }
    bitfog(&["store", &c, &du, &c]).ok();
    assert_same_tree(&src, &dst);
}

#[test]
fn status_of_a_db_and_of_what_is_not_a_courier() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "small", b"s");
    write(&src, "d/large", &data(1, 100_000));
    std::os::unix::fs::symlink("small", src.join("link")).unwrap();
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    bitfog(&["builddb", &server.url("src"), &t.s("src.db")]).ok();
    let s = bitfog(&["status", &t.s("src.db"), "--json"]).ok();
    let j = s.json();
    assert_eq!(j["source"], server.url("src").as_str());
    assert_eq!(
        (j["files"].as_u64(), j["symlinks"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(j["largest"][0]["name"], "d/large");
    assert_eq!(j["signatures"], false);
    assert!(j["area_id"].as_str().is_some_and(|i| i.len() == 32), "{s}");
    let h = bitfog(&["status", &t.s("src.db")]).ok();
    assert!(
        h.stdout.contains("2 files") && h.stdout.contains("d/large"),
        "{h}"
    );
    bitfog(&["emptydb", &t.s("e.db")]).ok();
    let e = bitfog(&["status", &t.s("e.db")]).ok();
    assert!(e.stdout.contains("an empty area (emptydb)"), "{e}");
    // A plain directory is not a courier; a DB has nothing to verify.
    let r = bitfog(&["status", &t.s("src")]).code(2);
    assert!(r.stderr.contains("is not a courier"), "{r}");
    bitfog(&["status", &t.s("src.db"), "--verify"]).code(2);
    bitfog(&["status", &t.s("nowhere.db")]).code(2);
}
