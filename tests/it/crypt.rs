//! Encrypted DBs in the age format: written by `builddb --encrypt-to`,
//! read with `--identity`, and interchangeable with the `age` CLI both
//! ways.

use crate::util::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

const MIB: usize = 1 << 20;

/// The DB's lines but its header (which says when it was made).
fn entries(db: &[u8]) -> Vec<String> {
    String::from_utf8(db.to_vec())
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn keygen_writes_a_private_identity_once() {
    let t = Scratch::new();
    let (path, recipient) = keygen(&t, "key.txt");
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(&format!("# public key: {recipient}\n")),
        "{text}"
    );
    let secret = text.lines().last().unwrap();
    assert!(
        secret.starts_with("AGE-SECRET-KEY-1") && secret.len() == 74,
        "{secret}"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = bitfog(&["keygen", "-o", &path]).code(2);
    assert!(again.stderr.contains("already exists"), "{again}");
    assert_eq!(fs::read_to_string(&path).unwrap(), text, "never replaced");
    let out = bitfog(&["keygen"]).ok();
    assert!(out.stdout.contains("AGE-SECRET-KEY-1"), "{out}");
    assert_ne!(out.stdout, text);
}

#[test]
fn encrypted_dbs_without_the_identity_are_a_clear_error() {
    let t = Scratch::new();
    let (key, recipient) = keygen(&t, "key.txt");
    let (other, _) = keygen(&t, "other.txt");
    bitfog(&["emptydb", &t.s("dest.db"), "--encrypt-to", &recipient]).ok();
    let raw = fs::read(t.path("dest.db")).unwrap();
    assert!(raw.starts_with(b"age-encryption.org/v1\n"));
    let missing = bitfog(&["status", &t.s("dest.db")]).code(2);
    assert!(missing.stderr.contains("give --identity"), "{missing}");
    let wrong = bitfog(&["status", &t.s("dest.db"), "--identity", &other]).code(2);
    assert!(wrong.stderr.contains("wrong --identity"), "{wrong}");
    let st = bitfog(&[
        "status",
        &t.s("dest.db"),
        "-i",
        &other,
        "-i",
        &key,
        "--json",
    ])
    .ok();
    assert_eq!(st.json()["encrypted"], true, "{st}");
    // Damaged anywhere, or cut short: refused, exit 2.
    for (what, bytes) in [
        ("changed", {
            let mut b = raw.clone();
            let i = b.len() - 20;
            b[i] ^= 1;
            b
        }),
        ("cut", raw[..raw.len() - 1].to_vec()),
        ("header", {
            let mut b = raw.clone();
            b[30] ^= 1;
            b
        }),
    ] {
        fs::write(t.path("bad.db"), &bytes).unwrap();
        let r = bitfog(&["status", &t.s("bad.db"), "-i", &key]).code(2);
        assert!(r.stderr.contains("'"), "{what}: {r}");
    }
    let bad_key = t.path("bad-key.txt");
    fs::write(&bad_key, "age1notakey\n").unwrap();
    let r = bitfog(&["status", &t.s("dest.db"), "-i", bad_key.to_str().unwrap()]).code(2);
    assert!(r.stderr.contains("not an age identity"), "{r}");
    let r = bitfog(&["emptydb", &t.s("x.db"), "--encrypt-to", "age1nope"]).code(2);
    assert!(
        r.stderr.contains("--encrypt-to takes an age recipient"),
        "{r}"
    );
    assert!(!t.path("x.db").exists());
}

/// A trip planned from an encrypted DESTDB keeps it encrypted in the
/// courier: `store` without the identity still stores (it cannot read the
/// snapshot to check the area), and with it refuses another area.
#[test]
fn an_encrypted_destdb_in_the_courier_needs_no_identity_to_store() {
    let t = Scratch::new();
    let (src, dst, other) = (t.mkdir("src"), t.mkdir("dst"), t.mkdir("other"));
    write(&src, "f", &data(1, 5_000));
    let conf = areas(&[
        ("src", &src, false),
        ("dst", &dst, true),
        ("other", &other, true),
    ]);
    let server = Server::start(&t, "site", &conf);
    let (su, du, ou) = (server.url("src"), server.url("dst"), server.url("other"));
    let (key, recipient) = keygen(&t, "key.txt");
    bitfog(&["builddb", &du, &t.s("dest.db"), "--encrypt-to", &recipient]).ok();
    let c = t.s("c");
    bitfog(&["fetch", &t.s("dest.db"), &su, &c, "-i", &key]).ok();
    let r = bitfog(&["store", &c, &ou, &c, "-i", &key]).code(2);
    assert!(
        r.stderr
            .contains("not the area the courier's trip was planned for"),
        "{r}"
    );
    bitfog(&["store", &c, &du, &c]).ok();
    assert_eq!(fs::read(dst.join("f")).unwrap(), data(1, 5_000));
}

#[test]
#[ignore = "needs the age CLI"]
fn a_trip_with_encrypted_dbs_and_the_age_cli_both_ways() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    awkward_tree(&src);
    let old = data(5, 3 * MIB);
    let mut new = old.clone();
    new[MIB..MIB + 4096].copy_from_slice(&data(6, 4096));
    write(&src, "vm/disk.img", &new);
    write(&dst, "vm/disk.img", &old);
    write(&dst, "gone.txt", b"only at the destination\n");
    let server = Server::start(&t, "site", &two_areas(&src, &dst));
    let (su, du) = (server.url("src"), server.url("dst"));
    let (key, recipient) = keygen(&t, "key.txt");
    let recipients = t.path("recipients.txt");
    fs::write(&recipients, format!("# the site's key\n{recipient}\n")).unwrap();

    // The destination's DB and its signatures, encrypted.
    bitfog(&[
        "builddb",
        &du,
        &t.s("dest.db"),
        "--signatures",
        "--signature-min",
        "1M",
        "--encrypt-to-file",
        recipients.to_str().unwrap(),
    ])
    .ok();
    for f in ["dest.db", "dest.db.sig"] {
        let raw = fs::read(t.path(f)).unwrap();
        assert!(raw.starts_with(b"age-encryption.org/v1\n"), "{f}");
        assert!(!contains(&raw, b"disk.img"), "{f} names a file");
    }
    // age opens what bitfog wrote: the same DB a plain builddb writes.
    bitfog(&["builddb", &du, &t.s("plain-dest.db")]).ok();
    let opened = age_cli(&["-d", "-i", &key, &t.s("dest.db")], None);
    assert_eq!(
        entries(&opened),
        entries(&fs::read(t.path("plain-dest.db")).unwrap())
    );
    // bitfog opens what age wrote.
    bitfog(&["builddb", &su, &t.s("plain-src.db")]).ok();
    let sealed = age_cli(
        &["-e", "-r", &recipient],
        Some(&fs::read(t.path("plain-src.db")).unwrap()),
    );
    fs::write(t.path("src.db"), sealed).unwrap();

    let p = bitfog(&["plan", &t.s("dest.db"), &su, "--json", "-i", &key]).ok();
    assert!(p.num("remaining_files") > 0);
    let f = bitfog(&[
        "fetch",
        &t.s("dest.db"),
        &su,
        &t.s("courier"),
        "--json",
        "-i",
        &key,
    ])
    .ok();
    assert_eq!(f.num("delta_files"), 1, "the signatures were read: {f}");
    // The destination's DB went onto the courier as it was: encrypted;
    // --delete reads it with the identity.
    let snapshot = fs::read(t.path("courier/.bitfog/destdb.jsonl")).unwrap();
    assert!(snapshot.starts_with(b"age-encryption.org/v1\n"));
    let s = bitfog(&[
        "store",
        &t.s("src.db"),
        &du,
        &t.s("courier"),
        "--delete",
        "--json",
        "-i",
        &key,
    ])
    .ok();
    assert_eq!((s.num("failed_files"), s.num("deleted_files")), (0, 1));
    assert_same_tree(&src, &dst);
    // Without the identity nothing starts.
    let r = bitfog(&["store", &t.s("src.db"), &du, &t.s("courier")]).code(2);
    assert!(r.stderr.contains("give --identity"), "{r}");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
