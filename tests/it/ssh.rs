//! The ssh transport: `ssh://` URLs against a real sshd on 127.0.0.1 with
//! its own host key, config and authorized key in a scratch directory
//! (nothing of the machine's own ssh setup is used or changed); the far
//! end runs `bitfog serve --stdio`. And `serve --stdio` on its own.

use crate::util::*;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
const NEEDS: &str = "needs sshd (openssh-server) and ssh (openssh-client); .ci/run installs them";

/// A private sshd, killed on drop.
struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
    user: String,
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bitfog-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(ok.success());
}

impl Sshd {
    fn start(t: &Scratch) -> Sshd {
        assert!(Path::new(SSHD).exists(), "{NEEDS}");
        // sshd's privilege separation directory (root only; as another
        // user sshd runs unprivileged and does not need it).
        let _ = fs::create_dir_all("/run/sshd");
        let dir = t.mkdir("sshd");
        keygen(&dir.join("host_key"));
        keygen(&dir.join("id"));
        keygen(&dir.join("other_id"));
        fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        let host_pub = fs::read_to_string(dir.join("host_key.pub")).unwrap();
        fs::write(
            dir.join("known_hosts"),
            format!("bitfog-test-sshd {host_pub}"),
        )
        .unwrap();
        fs::write(dir.join("empty_known_hosts"), "").unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 MaxStartups 100\nMaxSessions 100\nLogLevel INFO\n"
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(NEEDS);
        let mut sshd = Sshd {
            child,
            port,
            dir,
            user,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                sshd.child.try_wait().unwrap().is_none(),
                "sshd exited: {}",
                sshd.log()
            );
            assert!(Instant::now() < deadline, "sshd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// `--rsh`: our key and known hosts only, never a prompt.
    fn rsh_with(&self, key: &str, known_hosts: &str) -> String {
        let d = self.dir.display();
        format!(
            "ssh -F /dev/null -i {d}/{key} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o HostKeyAlias=bitfog-test-sshd -o UserKnownHostsFile={d}/{known_hosts} \
             -o StrictHostKeyChecking=yes -o GlobalKnownHostsFile=/dev/null -o LogLevel=ERROR"
        )
    }

    fn rsh(&self) -> String {
        self.rsh_with("id", "known_hosts")
    }

    /// `--remote-bitfog`: this build, on `conf`, its cache in the scratch.
    fn remote(&self, conf: &Path) -> String {
        format!(
            "{BIN} serve --stdio --conf {} --cache {}/cache",
            conf.display(),
            self.dir.display()
        )
    }

    fn url_at(&self, port: u16, area: &str) -> String {
        format!("ssh://{}@127.0.0.1:{port}/{area}/", self.user)
    }

    fn url(&self, area: &str) -> String {
        self.url_at(self.port, area)
    }

    /// Sessions sshd has accepted so far.
    fn sessions(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// bitfog with `--rsh` and `--remote-bitfog` set through the environment.
fn via(sshd: &Sshd, conf: &Path, args: &[&str]) -> Run {
    run_env(
        args,
        &[
            ("BITFOG_RSH", sshd.rsh()),
            ("BITFOG_REMOTE", sshd.remote(conf)),
        ],
    )
}

fn run_env(args: &[&str], env: &[(&str, String)]) -> Run {
    let mut c = cmd(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn conf(t: &Scratch, json: &str) -> PathBuf {
    let p = t.path("bitfog.json");
    fs::write(&p, json).unwrap();
    p
}

#[test]
#[ignore = "needs sshd (openssh-server)"]
fn a_whole_trip_with_both_sites_over_ssh() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    awkward_tree(&src);
    for i in 0..40 {
        write(
            &src,
            &format!("many/{i:02}.bin"),
            &data(i, 20_000 + i as usize),
        );
    }
    let conf = conf(&t, &two_areas(&src, &dst));
    let sshd = Sshd::start(&t);
    let (su, du) = (sshd.url("src"), sshd.url("dst"));

    let d = via(&sshd, &conf, &["builddb", &du, &t.s("dest.db"), "--json"]).ok();
    assert_eq!(d.num("files"), 0);
    let b = via(&sshd, &conf, &["builddb", &su, &t.s("src.db"), "--json"]).ok();
    assert_eq!(b.num("files"), 54);
    let db = fs::read_to_string(t.path("src.db")).unwrap();
    assert!(
        db.lines()
            .next()
            .unwrap()
            .contains(&format!("\"source\":\"{su}\"")),
        "the DB names the ssh URL: {}",
        db.lines().next().unwrap()
    );

    let p = via(&sshd, &conf, &["plan", &t.s("dest.db"), &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 51);
    let before = sshd.sessions();
    let f = via(
        &sshd,
        &conf,
        &[
            "fetch",
            &t.s("dest.db"),
            &su,
            &t.s("courier"),
            "--jobs",
            "4",
            "--json",
        ],
    )
    .ok();
    assert_eq!((f.num("fetched_files"), f.num("failed_files")), (51, 0));
    let opened = sshd.sessions() - before;
    assert!(
        (2..=6).contains(&opened),
        "--jobs 4 opens a few sessions, not one per file: {opened}"
    );

    let s = via(
        &sshd,
        &conf,
        &[
            "store",
            &t.s("src.db"),
            &du,
            &t.s("courier"),
            "--jobs",
            "4",
            "--json",
        ],
    )
    .ok();
    assert_eq!((s.num("stored_files"), s.num("failed_files")), (54, 0));
    assert_same_tree(&src, &dst);

    // Nothing left: the next plan over ssh carries nothing.
    via(&sshd, &conf, &["builddb", &du, &t.s("dest2.db")]).ok();
    let p = via(&sshd, &conf, &["plan", &t.s("dest2.db"), &su, "--json"]).ok();
    assert_eq!(p.num("remaining_files"), 0);
    // No far end lingers once the client is gone.
    wait_until("every serve --stdio has exited", || {
        stdio_servers(&conf).is_empty()
    });
}

/// The pids of `serve --stdio` processes on `conf`.
fn stdio_servers(conf: &Path) -> Vec<u32> {
    let conf = conf.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains("--stdio") && c.contains(&conf)
            })
        })
        .collect()
}

/// The `ssh` processes `pid` started.
fn ssh_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            let comm = fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
            if comm.trim() == "ssh" {
                out.push(c);
            }
        }
    }
    out
}

/// Which end of an ssh session dies mid-file.
#[derive(Clone, Copy, Debug)]
enum Dies {
    /// The client's `ssh`.
    Ssh,
    /// The far end's `serve --stdio`.
    FarEnd,
}

/// A fetch whose session dies mid-file exits 1 naming the file, keeps
/// the partial and nothing unverified; the rerun resumes from it.
fn killed_mid_file_resumes(dies: Dies) {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    let size = 8 << 20;
    write(&src, "big.img", &data(7, size));
    let conf = conf(&t, &two_areas(&src, &dst));
    let sshd = Sshd::start(&t);
    // A slow path to sshd, so the kill lands mid-file.
    let relay = Relay::start(sshd.addr(), Duration::from_millis(8));
    let su = sshd.url_at(relay.addr.port(), "src");
    bitfog(&["emptydb", &t.s("dest.db")]).ok();
    let courier = t.path("courier");
    let args = ["fetch", &t.s("dest.db"), &su, &t.s("courier"), "--json"];
    let mut c = cmd(&args);
    c.env("BITFOG_RSH", sshd.rsh())
        .env("BITFOG_REMOTE", sshd.remote(&conf))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id();
    wait_until("a partial file grows", || partial_bytes(&courier) > 1 << 20);
    let killed = match dies {
        Dies::Ssh => ssh_children(pid),
        Dies::FarEnd => stdio_servers(&conf),
    };
    assert!(!killed.is_empty(), "{dies:?}: something to kill");
    for p in killed {
        unsafe_kill(p, 9);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{dies:?}: {stderr}");
    assert!(stderr.contains("big.img"), "{dies:?}: {stderr}");
    assert!(!courier.join("big.img").exists(), "nothing unverified kept");
    let held = partial_bytes(&courier);
    assert!(held > 1 << 20, "{dies:?}: the partial is kept: {held}");

    let f = via(
        &sshd,
        &conf,
        &[
            "fetch",
            &t.s("dest.db"),
            &sshd.url("src"),
            &t.s("courier"),
            "--json",
        ],
    )
    .ok();
    assert_eq!(f.num("fetched_files"), 1);
    assert_eq!(fs::read(courier.join("big.img")).unwrap(), data(7, size));
    assert!(
        f.num("downloaded_bytes") <= (size as u64 - held) + (64 << 10),
        "{dies:?}: resumed from the partial: {} downloaded, {held} were held\n{f}",
        f.num("downloaded_bytes")
    );
}

#[test]
#[ignore = "needs sshd (openssh-server)"]
fn a_fetch_whose_ssh_is_killed_resumes_on_rerun() {
    killed_mid_file_resumes(Dies::Ssh);
}

#[test]
#[ignore = "needs sshd (openssh-server)"]
fn a_fetch_whose_far_end_dies_resumes_on_rerun() {
    killed_mid_file_resumes(Dies::FarEnd);
}

#[test]
#[ignore = "needs sshd (openssh-server)"]
fn ssh_failures_are_one_clear_line() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    write(&src, "a", b"a");
    let conf = conf(&t, &format!("{{\"src\":{{\"path\":{:?}}}}}", src));
    let sshd = Sshd::start(&t);
    let su = sshd.url("src");
    let db = t.s("x.db");
    let one_line = |r: &Run, what: &str, want: &[&str]| {
        assert_eq!(r.code, 1, "{what}: exit 1\n{r}");
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: one line\n{r}");
        for w in want {
            assert!(lines[0].contains(w), "{what}: '{w}' in the line\n{r}");
        }
        assert!(!Path::new(&db).exists(), "{what}: no DB written");
    };
    let remote = sshd.remote(&conf);
    let with = |rsh: String, remote: &str, url: &str| {
        run_env(
            &["builddb", url, &db],
            &[("BITFOG_RSH", rsh), ("BITFOG_REMOTE", remote.to_string())],
        )
    };

    let r = with(sshd.rsh_with("id", "empty_known_hosts"), &remote, &su);
    one_line(
        &r,
        "unknown host key",
        &["ssh://", "ssh failed", "Host key verification failed"],
    );
    let r = with(sshd.rsh_with("other_id", "known_hosts"), &remote, &su);
    one_line(&r, "refused login", &["ssh failed", "Permission denied"]);
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = with(sshd.rsh(), &remote, &sshd.url_at(closed, "src"));
    one_line(&r, "no route", &["ssh failed", "Connection refused"]);
    let r = with("no-such-ssh-here".into(), &remote, &su);
    one_line(&r, "no ssh", &["no-such-ssh-here", "--rsh"]);

    let r = with(sshd.rsh(), "/nonexistent/bitfog serve --stdio", &su);
    one_line(
        &r,
        "missing remote binary",
        &["/nonexistent/bitfog serve --stdio", "--remote-bitfog"],
    );
    let r = with(sshd.rsh(), "true", &su);
    one_line(
        &r,
        "a remote that answers nothing",
        &["without answering", "--remote-bitfog"],
    );
    let r = with(sshd.rsh(), &format!("{BIN} --version"), &su);
    one_line(&r, "a remote that answers no HTTP", &["--remote-bitfog"]);
    let r = with(
        sshd.rsh(),
        &format!("{BIN} serve --stdio --conf /nonexistent.json"),
        &su,
    );
    one_line(
        &r,
        "a remote that fails",
        &["/nonexistent.json", "--remote-bitfog"],
    );

    // With -v the far end's log is shown as it comes; without, never.
    let quiet = via(&sshd, &conf, &["builddb", &su, &db]).ok();
    assert!(!quiet.stderr.contains("\"GET /src/"), "{quiet}");
    let loud = via(&sshd, &conf, &["builddb", &su, &db, "-v"]).ok();
    assert!(
        loud.stderr
            .lines()
            .any(|l| l.contains(&sshd.url_at(sshd.port, "")[..20]) && l.contains("\"GET /src/")),
        "{loud}"
    );

    // A host ssh could read as an option is refused before ssh runs.
    let r = bitfog(&["builddb", "ssh://-oProxyCommand=touch%20x/src/", &db]).code(2);
    assert!(r.stderr.contains("not an area URL"), "{r}");
    let r = bitfog(&["builddb", &su, &db, "--rsh", "'ssh"]).code(2);
    assert!(r.stderr.contains("--rsh"), "{r}");
}

#[test]
#[ignore = "needs sshd (openssh-server)"]
fn tokens_still_apply_over_ssh() {
    let t = Scratch::new();
    let src = t.mkdir("src");
    write(&src, "a", b"a");
    let conf = conf(
        &t,
        &format!("{{\"src\":{{\"path\":{:?},\"token\":\"s3cret\"}}}}", src),
    );
    let sshd = Sshd::start(&t);
    let su = sshd.url("src");
    let r = via(&sshd, &conf, &["builddb", &su, &t.s("x.db")]).code(1);
    assert!(r.stderr.contains("401"), "{r}");
    via(
        &sshd,
        &conf,
        &["builddb", &su, &t.s("x.db"), "--token", "s3cret"],
    )
    .ok();
}

#[test]
fn serve_stdio_answers_on_stdout_and_exits_at_the_end_of_input() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    write(&src, "hello.txt", b"hello\n");
    let conf = conf(&t, &two_areas(&src, &dst));
    let mut child = cmd(&[
        "serve",
        "--stdio",
        "--conf",
        &conf.to_string_lossy(),
        "--cache",
        "none",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let requests = "GET /src/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n\
                    PUT /dst/new.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nnew\
                    GET /src/ HTTP/1.1\r\nHost: x\r\n\r\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(requests.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.starts_with("HTTP/1.1 200 OK\r\n"),
        "stdout is the protocol: {stdout}"
    );
    assert_eq!(stdout.matches("HTTP/1.1 ").count(), 3, "{stdout}");
    assert!(stdout.contains("\r\n\r\nhello\n"), "{stdout}");
    assert!(
        stdout.contains("HTTP/1.1 201") || stdout.contains("HTTP/1.1 204"),
        "{stdout}"
    );
    assert!(stdout.contains("\"name\":\"hello.txt\""), "{stdout}");
    assert!(
        !stdout.contains("listening") && !stderr.contains("listening"),
        "{stderr}"
    );
    assert_eq!(fs::read(dst.join("new.txt")).unwrap(), b"new");
    assert_eq!(
        stderr.matches("\"GET /src/").count(),
        2,
        "the log: {stderr}"
    );

    // An upload cut short by the end of input leaves nothing behind.
    let mut child = cmd(&[
        "serve",
        "--stdio",
        "--conf",
        &conf.to_string_lossy(),
        "--cache",
        "none",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"PUT /dst/cut.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly this",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let left: Vec<_> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["new.txt"], "no partial upload kept");

    // Files rather than pipes for stdin and stdout (no splice): the same.
    fs::write(t.path("requests"), requests).unwrap();
    let status = cmd(&[
        "serve",
        "--stdio",
        "--conf",
        &conf.to_string_lossy(),
        "--cache",
        "none",
        "-q",
    ])
    .stdin(fs::File::open(t.path("requests")).unwrap())
    .stdout(fs::File::create(t.path("answers")).unwrap())
    .status()
    .unwrap();
    assert!(status.success());
    let answers = fs::read_to_string(t.path("answers")).unwrap();
    assert_eq!(answers.matches("HTTP/1.1 ").count(), 3, "{answers}");
    assert!(answers.contains("\r\n\r\nhello\n"), "{answers}");

    let r = bitfog(&["serve", "--stdio", "--addr", ":0"]).code(2);
    assert!(r.stderr.contains("--stdio"), "{r}");
}

#[test]
fn a_server_leaves_the_temporary_files_of_live_servers_alone() {
    let t = Scratch::new();
    let (src, dst) = (t.mkdir("src"), t.mkdir("dst"));
    // Another server (this test's process stands in) is writing one; a
    // dead one left the other.
    let live = format!(".bitfog-tmp-{:x}_1234-0", std::process::id());
    let dead = ".bitfog-tmp-3fffff_1234-0";
    write(&dst, &live, b"being written");
    write(&dst, dead, b"left by a crash");
    let conf = conf(&t, &two_areas(&src, &dst));
    let mut child = cmd(&[
        "serve",
        "--stdio",
        "--conf",
        &conf.to_string_lossy(),
        "--cache",
        "none",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_until("the stale temporary file is removed", || {
        !dst.join(dead).exists()
    });
    drop(child.stdin.take());
    child.wait().unwrap();
    assert!(dst.join(&live).exists(), "a live server's file is kept");
}
