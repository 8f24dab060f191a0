//! Test support: scratch directories, running the real binary, real
//! servers on 127.0.0.1:0, raw HTTP, a counting/cutting relay and a
//! scripted responder for client-side faults.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bitfog");

/// A per-test scratch directory.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("bitfog-it-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }
}

/// What a run of the binary produced.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn code(self, want: i32) -> Run {
        assert_eq!(self.code, want, "unexpected exit status\n{self}");
        self
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        self.code(0)
    }

    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{self}"))
    }

    /// The last line of stdout as JSON (after `-v` records).
    pub fn last_json(&self) -> serde_json::Value {
        let last = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e})\n{self}"))
    }

    #[track_caller]
    pub fn num(&self, key: &str) -> u64 {
        self.json()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no integer '{key}'\n{self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "command: bitfog {}\nexit: {}\n--- stdout\n{}--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("BITFOG_TOKEN")
        // Keeper keys of encrypted couriers, never in the real HOME.
        .env(
            "BITFOG_STATE_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("keepers"),
        )
        .stdin(Stdio::null());
    c
}

/// Runs bitfog to completion.
pub fn bitfog(args: &[&str]) -> Run {
    let out = cmd(args).output().unwrap();
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs bitfog, failing the test (after killing it) if it has not ended
/// within `secs`: for inputs that once made it wait forever.
#[track_caller]
pub fn bitfog_within(secs: u64, args: &[&str]) -> Run {
    let mut child = cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "bitfog {} still ran after {secs} s\n--- stderr\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// A running `bitfog serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    /// Writes `conf_json` beside the scratch dir and starts a server.
    pub fn start(scratch: &Scratch, name: &str, conf_json: &str) -> Server {
        let conf = scratch.path(&format!("{name}.json"));
        fs::write(&conf, conf_json).unwrap();
        Server::start_conf(&conf, &scratch.path(&format!("{name}.log")), &[])
    }

    pub fn start_conf(conf: &Path, log: &Path, extra: &[&str]) -> Server {
        Server::start_shell(conf, log, extra, "")
    }

    /// Like `start_conf`, after running `prefix` (e.g. `ulimit -n 64;`) in
    /// the shell that execs the server.
    pub fn start_shell(conf: &Path, log: &Path, extra: &[&str], prefix: &str) -> Server {
        let logf = fs::File::create(log).unwrap();
        // The hash cache goes beside the log, never into the real ~/.cache.
        let cache = log.with_extension("hashcache");
        let mut args = vec![
            "serve",
            "--conf",
            conf.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--cache",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut command = if prefix.is_empty() {
            cmd(&args)
        } else {
            let mut c = Command::new("sh");
            // "ulimit -n 64;" runs before the server; "strace ..." wraps it.
            let script = if prefix.trim_end().ends_with(';') {
                format!("{prefix} exec \"$0\" \"$@\"")
            } else {
                format!("exec {prefix} \"$0\" \"$@\"")
            };
            c.arg("-c").arg(script).arg(BIN).args(&args);
            c.env_remove("BITFOG_TOKEN").stdin(Stdio::null());
            // A group of its own, so Drop reaches the server under a
            // wrapper that forks it (strace): a tracer killed lets its
            // tracee run on.
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
            c
        };
        // Wrapped at once, so Drop kills and waits on every path.
        let mut server = Server {
            child: command.stdout(Stdio::null()).stderr(logf).spawn().unwrap(),
            addr: "0.0.0.0:0".parse().unwrap(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some((line, _)) = text.split_once('\n') {
                let rest = line
                    .strip_prefix("bitfog: listening on http://")
                    .unwrap_or_else(|| panic!("bad startup line: {line}"));
                server.addr = rest.trim_end_matches('/').parse().unwrap();
                return server;
            }
            assert!(Instant::now() < deadline, "server did not start: {text}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self, area: &str) -> String {
        format!("http://{}/{area}/", self.addr)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(mut self) -> i32 {
        unsafe_kill(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole group where the server was started under a wrapper
        // (nothing happens otherwise: it leads no group).
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unsafe_kill(pid: u32, sig: i32) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

/// A config with one read-only source area and one writable destination.
/// A configuration of the areas given as (name, path, writable).
pub fn areas(list: &[(&str, &Path, bool)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = list
        .iter()
        .map(|(name, path, writable)| {
            let mut area = serde_json::json!({"path": path.to_str().unwrap()});
            if *writable {
                area["writable"] = true.into();
            }
            (name.to_string(), area)
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

pub fn two_areas(src: &Path, dst: &Path) -> String {
    format!(
        "{{\"src\":{{\"path\":{:?}}},\"dst\":{{\"path\":{:?},\"writable\":true}}}}",
        src.to_str().unwrap(),
        dst.to_str().unwrap()
    )
}

/// Deterministic pseudo-random bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

pub fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

/// An awkward tree: spaces, UTF-8, empty files, modes, symlinks relative,
/// absolute and dangling, a hidden file, a FIFO that must be skipped.
pub fn awkward_tree(root: &Path) {
    write(root, "plain.txt", b"plain\n");
    write(root, "with space.txt", b"spaces\n");
    write(
        root,
        "\u{fc}n\u{ef}c\u{f8}d\u{e9}/\u{444}\u{430}\u{439}\u{43b}.bin",
        &data(1, 70_000),
    );
    write(root, "empty", b"");
    write(root, "dir/sub/deep.txt", b"deep\n");
    write(root, "dir/.hidden", b"hidden\n");
    write(root, "a", b"a before a.txt and a/ in order\n");
    write(root, "a.txt", b"a.txt\n");
    write(root, "big.bin", &data(2, 1_500_000));
    write(root, "private", b"secret-ish\n");
    chmod(root, "private", 0o600);
    write(root, "run.sh", b"#!/bin/sh\necho hi\n");
    chmod(root, "run.sh", 0o755);
    std::os::unix::fs::symlink("plain.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("no/such/target", root.join("dir/dangling")).unwrap();
    let fifo = root.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
}

/// Every regular file and symlink below `root`: (name, kind, mode, content
/// or target). FIFOs and the like are left out.
pub fn tree(root: &Path) -> Vec<(String, char, u32, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, char, u32, Vec<u8>)>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|d| d.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.starts_with(".bitfog") {
                continue;
            }
            if m.file_type().is_symlink() {
                out.push((
                    rel,
                    'l',
                    0,
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ));
            } else if m.is_dir() {
                walk(root, &p, out);
            } else if m.is_file() {
                out.push((
                    rel,
                    'f',
                    m.permissions().mode() & 0o777,
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

#[track_caller]
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    let names = |t: &[(String, char, u32, Vec<u8>)]| {
        t.iter()
            .map(|e| format!("{} {} {:o}", e.0, e.1, e.2))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&ta), names(&tb), "trees differ");
    assert!(ta == tb, "contents differ");
}

/// Sends raw bytes, half-closes only when `close`, reads the answer until
/// EOF or `wait`.
pub fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A simple HTTP/1.1 exchange with `Connection: close`.
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&bytes).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no response head");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut resp = Resp {
        status,
        head,
        body: out[split + 4..].to_vec(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        resp.body = dechunk(&resp.body);
    }
    resp
}

/// Decodes a chunked body; panics on bad framing.
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if n == 0 {
            assert_eq!(b, b"\r\n", "chunked body ends with an empty trailer");
            return out;
        }
        out.extend_from_slice(&b[..n]);
        assert_eq!(&b[n..n + 2], b"\r\n");
        b = &b[n + 2..];
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, &[], b"")
}

/// Polls `cond` until it holds, failing the test after 20 s with `what`.
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Checks the server still answers a normal request promptly.
#[track_caller]
pub fn assert_serving(addr: SocketAddr) {
    let t = Instant::now();
    let r = get(addr, "/");
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "slow answer: {:?}",
        t.elapsed()
    );
}

/// A TCP relay in front of a server: counts the bytes sent to clients,
/// can throttle them, and can cut every connection after some bytes.
pub struct Relay {
    pub addr: SocketAddr,
    pub down_bytes: Arc<AtomicU64>,
    pub up_bytes: Arc<AtomicU64>,
    pub cut_after: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// `delay` is slept after each 64 KiB sent downstream.
    pub fn start(target: SocketAddr, delay: Duration) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let down_bytes = Arc::new(AtomicU64::new(0));
        let up_bytes = Arc::new(AtomicU64::new(0));
        let cut_after = Arc::new(AtomicU64::new(u64::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let (db, ub, cut, st) = (
            down_bytes.clone(),
            up_bytes.clone(),
            cut_after.clone(),
            stop.clone(),
        );
        thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let ub = ub.clone();
                thread::spawn(move || pump(c2, u2, Some(ub), Duration::ZERO, None));
                let (db, cut) = (db.clone(), cut.clone());
                thread::spawn(move || pump(upstream, client, Some(db), delay, Some(cut)));
            }
        });
        Relay {
            addr,
            down_bytes,
            up_bytes,
            cut_after,
            stop,
        }
    }

    pub fn url(&self, area: &str) -> String {
        format!("http://{}/{area}/", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    count: Option<Arc<AtomicU64>>,
    delay: Duration,
    cut: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let (Some(c), Some(cut)) = (&count, &cut) {
            let before = c.load(Ordering::SeqCst);
            let limit = cut.load(Ordering::SeqCst);
            if before >= limit {
                break;
            }
            let n = n.min((limit - before) as usize);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            c.fetch_add(n as u64, Ordering::SeqCst);
        } else if to.write_all(&buf[..n]).is_err() {
            break;
        } else if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
        if !delay.is_zero() {
            thread::sleep(delay);
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A responder that answers every request with `response` (raw bytes),
/// optionally never closing.
pub fn responder(response: Vec<u8>, hang: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let response = response.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = conn.write_all(&response);
                if hang {
                    thread::sleep(Duration::from_secs(30));
                }
            });
        }
    });
    addr
}

/// An HTTP response with a fixed body.
pub fn ndjson_response(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
}

/// A scripted server: answers each request with the response of the first
/// route whose path prefix matches the request target, else 404.
pub fn routes(table: Vec<(String, Vec<u8>)>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let table = Arc::new(table);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let table = table.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let target = first.split_whitespace().nth(1).unwrap_or("").to_string();
                let resp = table
                    .iter()
                    // The query (bitfog asks listings with ?dirs=1) is not
                    // part of the route.
                    .find(|(p, _)| target.split('?').next() == Some(p.as_str()))
                    .map(|(_, r)| r.clone())
                    .unwrap_or_else(|| {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    });
                let _ = conn.write_all(&resp);
            });
        }
    });
    addr
}

/// A response with a body and optional Content-Length.
pub fn body_response(body: &[u8], length: Option<usize>) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n".to_vec();
    if let Some(n) = length {
        r.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// SHA-256 in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Waits (up to 20 s) for a non-empty file in `dir` whose name passes
/// `pick`: the sign that a slowed server is in the middle of writing it.
pub fn first_growing(
    dir: &std::path::Path,
    pick: impl Fn(&str) -> bool,
    what: &str,
) -> std::path::PathBuf {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let found = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).find(|e| {
            pick(&e.file_name().to_string_lossy()) && e.metadata().is_ok_and(|m| m.len() > 0)
        });
        if let Some(e) = found {
            return e.path();
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// SIGKILLs a server started under strace: the server itself, since
/// killing strace would only detach it.
pub fn kill_9_traced(server: &mut Server) {
    let tracer = server.child.id();
    let children = fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children")).unwrap();
    unsafe_kill(
        children.split_whitespace().next().unwrap().parse().unwrap(),
        9,
    );
    server.child.wait().unwrap();
}

/// Starts a server on `conf` again and waits (up to 10 s) for its startup
/// cleaning to remove `temp`, a temporary file a killed server left.
pub fn restart_removing(conf: &Path, log: &Path, temp: &Path) -> Server {
    let server = Server::start_conf(conf, log, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while temp.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!temp.exists(), "stale temporary file removed at startup");
    server
}

/// Fails the test at once, with the reason, when strace (which some fault
/// tests run the server under) is not installed.
#[track_caller]
pub fn require_strace() {
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "this test needs strace (apt-get install strace; .ci/run does)"
    );
}

/// The files in the courier's partial area (`.bitfog/partial/` and the
/// directories in it).
pub fn partial_files(courier: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![courier.join(".bitfog/partial")];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type().unwrap().is_dir() {
                true => dirs.push(e.path()),
                false => out.push(e.path()),
            }
        }
    }
    out
}

/// Bytes of the file that are on disk in the courier's partial area.
pub fn partial_bytes(courier: &std::path::Path) -> u64 {
    partial_files(courier)
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// `bitfog keygen -o FILE`: the identity file and its recipient.
pub fn keygen(t: &Scratch, name: &str) -> (String, String) {
    let path = t.s(name);
    let r = bitfog(&["keygen", "-o", &path]).ok();
    let recipient = r.stderr.trim().rsplit(' ').next().unwrap().to_string();
    assert!(recipient.starts_with("age1"), "{r}");
    (path, recipient)
}

/// Runs the `age` CLI on `input`; its output.
pub fn age_cli(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("age")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the age CLI (Debian's age package; .ci/run installs it)");
    // Fed from a thread: age writes while it reads, and a pipe holds
    // only so much.
    let feeder = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(&data).unwrap();
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    assert!(
        out.status.success(),
        "age {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
