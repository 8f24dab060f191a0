//! `ssh://[USER@]HOST[:PORT]/AREA/`: HTTP over an ssh session to
//! `bitfog serve --stdio` at the far end, as rsync and git run their
//! remote half. Authentication, encryption, host keys, `ProxyJump` and
//! `ControlMaster` are the user's own ssh setup.
//!
//! An ssh area's requests go to a stand-in URL,
//! `http://sN.ssh.bitfog.invalid/AREA/` (`.invalid` never resolves), on an
//! agent whose only connector starts `ssh [-p PORT] [USER@]HOST COMMAND`
//! with one end of a socket pair as its stdin and stdout; ureq speaks
//! HTTP/1.1 over the other end as over TCP, and pools one session per
//! connection (`--jobs N`: up to N sessions). Messages show the ssh URL.
//!
//! ssh's stderr (and the far end's log) is kept, shown with `-v`, and
//! named when a session fails: ssh's own message when ssh fails (exit
//! 255), `--remote-bitfog` when the far end's command is missing or is not
//! a bitfog that serves stdio.

use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport,
};

/// The stand-in host of ssh target N is `sN` + this.
const STAND_IN: &str = ".ssh.bitfog.invalid";
/// The far end's command unless `--remote-bitfog` or `BITFOG_REMOTE` says.
pub(crate) const DEFAULT_REMOTE: &str = "bitfog serve --stdio";
/// Lines of a session's stderr kept for its failure message.
const KEEP_LINES: usize = 20;
/// How long a session that closed may take to exit before its failure is
/// described without its exit status.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How to reach ssh areas: `--rsh`, `--remote-bitfog`, `-v`.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The ssh command and its own options.
    pub(crate) rsh: Vec<String>,
    /// The far end's command, one string for its shell.
    pub(crate) remote: String,
    /// Show each session's stderr as it comes.
    pub(crate) verbose: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            rsh: vec!["ssh".to_string()],
            remote: DEFAULT_REMOTE.to_string(),
            verbose: false,
        }
    }
}

impl Options {
    /// From `--rsh` (or `BITFOG_RSH`) and `--remote-bitfog` (or
    /// `BITFOG_REMOTE`); exit 2 for an empty or badly quoted command.
    pub(crate) fn new(
        rsh: Option<String>,
        remote: Option<String>,
        verbose: bool,
    ) -> Result<Options> {
        let rsh = match rsh {
            None => vec!["ssh".to_string()],
            Some(s) => {
                let words =
                    split_words(&s).map_err(|why| Error::usage(format!("--rsh '{s}': {why}")))?;
                if words.is_empty() {
                    return Err(Error::usage("--rsh: empty command"));
                }
                words
            }
        };
        let remote = match remote {
            None => DEFAULT_REMOTE.to_string(),
            Some(s) if s.trim().is_empty() => {
                return Err(Error::usage("--remote-bitfog: empty command"));
            }
            Some(s) => s,
        };
        Ok(Options {
            rsh,
            remote,
            verbose,
        })
    }
}

/// Splits a command line into words as a shell would for plain words,
/// 'single' and "double" quotes and backslashes (rsync's `-e` does the
/// same); nothing is expanded.
fn split_words(s: &str) -> std::result::Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated quote"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("trailing backslash"),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Where an ssh area lives.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    user: Option<String>,
    host: String,
    port: Option<u16>,
}

impl Target {
    /// `ssh://[USER@]HOST[:PORT]`, as the user wrote it (normalised).
    fn shown(&self) -> String {
        let user = self
            .user
            .as_ref()
            .map_or(String::new(), |u| format!("{u}@"));
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let port = self.port.map_or(String::new(), |p| format!(":{p}"));
        format!("ssh://{user}{host}{port}")
    }

    /// `[USER@]HOST`, ssh's destination argument.
    fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }
}

/// Every ssh target named on this command line, by index.
fn targets() -> &'static Mutex<Vec<Arc<Target>>> {
    static TARGETS: OnceLock<Mutex<Vec<Arc<Target>>>> = OnceLock::new();
    TARGETS.get_or_init(Default::default)
}

/// Parses the authority of an ssh URL (`[USER@]HOST[:PORT]`) and returns
/// `(stand-in authority, shown form)`. `Err` says why it is not one.
pub(crate) fn register(authority: &str) -> std::result::Result<(String, String), &'static str> {
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(u) = user {
        if u.is_empty() || u.starts_with('-') || !u.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("bad user");
        }
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("bad host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("bad host")?),
        };
        (h, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    // A host ssh could take for an option, or anything a shell or ssh
    // would read as more than a name, is refused.
    if host.is_empty()
        || host.starts_with('-')
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:%".contains(&b))
    {
        return Err("bad host");
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            crate::wire::protocol::parse_digits(p)
                .filter(|&n| (1..=65535).contains(&n))
                .ok_or("bad port")? as u16,
        ),
    };
    let target = Target {
        user: user.map(str::to_string),
        host: host.to_string(),
        port,
    };
    let shown = target.shown();
    let mut all = targets().lock().map_err(|_| "bad host")?;
    let i = match all.iter().position(|t| **t == target) {
        Some(i) => i,
        None => {
            all.push(Arc::new(target));
            all.len() - 1
        }
    };
    Ok((format!("s{i}{STAND_IN}"), shown))
}

fn target_of(host: &str) -> Option<Arc<Target>> {
    let i: usize = host
        .strip_suffix(STAND_IN)?
        .strip_prefix('s')?
        .parse()
        .ok()?;
    targets().lock().ok()?.get(i).cloned()
}

/// Whether `url` is an ssh area's stand-in.
pub(crate) fn is_stand_in(url: &str) -> bool {
    url.strip_prefix("http://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .is_some_and(|host| host.ends_with(STAND_IN))
}

/// A URL as the user knows it: a stand-in ssh URL becomes its
/// `ssh://[USER@]HOST[:PORT]/...` again; any other is returned as it is.
pub(crate) fn shown(url: &str) -> String {
    let stand_in = url.strip_prefix("http://").and_then(|rest| {
        let (host, path) = rest.split_once('/')?;
        Some((target_of(host)?, path))
    });
    match stand_in {
        Some((t, path)) => format!("{}/{path}", t.shown()),
        None => url.to_string(),
    }
}

/// The agent for ssh areas: no proxy (the stand-in host is never looked
/// up or reached), every connection an ssh session.
pub(crate) fn agent(
    config: ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
    opts: Options,
) -> ureq::Agent {
    let config = config.proxy(None).build();
    ureq::Agent::with_parts(
        config,
        SshConnector {
            opts: Arc::new(opts),
        },
        NoLookup,
    )
}

/// Resolves nothing: an ssh session needs no address.
#[derive(Debug)]
struct NoLookup;

impl Resolver for NoLookup {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> std::result::Result<ResolvedSocketAddrs, ureq::Error> {
        let mut addrs = self.empty();
        addrs.push(([0, 0, 0, 0], 0).into());
        Ok(addrs)
    }
}

#[derive(Debug)]
struct SshConnector {
    opts: Arc<Options>,
}

impl Connector for SshConnector {
    type Out = SshTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> std::result::Result<Option<SshTransport>, ureq::Error> {
        let host = details.uri.host().unwrap_or("");
        let Some(target) = target_of(host) else {
            return Err(ureq::Error::Io(io::Error::other(format!(
                "'{host}' is not an ssh area's host"
            ))));
        };
        let (stream, session) = Session::start(&self.opts, &target).map_err(ureq::Error::Io)?;
        Ok(Some(SshTransport {
            stream,
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            session,
            answered: false,
            timeouts: (None, None),
        }))
    }
}

/// How a session's ssh ended.
struct Ended {
    status: ExitStatus,
    /// The last lines of its stderr.
    lines: Vec<String>,
}

/// One ssh process and what it said.
struct Session {
    /// `ssh://...` of the target, for messages.
    shown: String,
    /// The far end's command, for messages.
    remote: String,
    ended: Mutex<Option<Ended>>,
    ended_cv: Condvar,
}

impl Session {
    /// Starts ssh; returns our end of its stdin and stdout, and the session.
    fn start(opts: &Options, target: &Target) -> io::Result<(UnixStream, Arc<Session>)> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = Command::new(&opts.rsh[0]);
        cmd.args(&opts.rsh[1..]);
        if let Some(p) = target.port {
            cmd.arg("-p").arg(p.to_string());
        }
        cmd.arg(target.destination()).arg(&opts.remote);
        cmd.stdin(Stdio::from(OwnedFd::from(theirs.try_clone()?)))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .stderr(Stdio::piped());
        let shown = target.shown();
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run '{}' to reach {shown}: {} (see --rsh)",
                    opts.rsh[0],
                    crate::error::describe_io(&e)
                ),
            )
        })?;
        let session = Arc::new(Session {
            shown,
            remote: opts.remote.clone(),
            ended: Mutex::new(None),
            ended_cv: Condvar::new(),
        });
        let stderr = child.stderr.take();
        let watcher = session.clone();
        let verbose = opts.verbose;
        std::thread::Builder::new()
            .name("ssh-stderr".into())
            .spawn(move || watcher.watch(child, stderr, verbose))?;
        Ok((ours, session))
    }

    /// Keeps (and with `verbose` shows) ssh's stderr, then reaps it.
    fn watch(&self, mut child: Child, stderr: Option<std::process::ChildStderr>, verbose: bool) {
        let mut lines = VecDeque::new();
        if let Some(err) = stderr {
            for line in BufReader::new(err).split(b'\n').map_while(|l| l.ok()) {
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if line.is_empty() {
                    continue;
                }
                if verbose {
                    crate::error::print_error(format!("{}: {line}", self.shown));
                }
                if lines.len() == KEEP_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        }
        let status = child.wait();
        if let (Ok(status), Ok(mut ended)) = (status, self.ended.lock()) {
            *ended = Some(Ended {
                status,
                lines: lines.into(),
            });
            self.ended_cv.notify_all();
        }
    }

    /// Why the session closed, once ssh has exited (or `EXIT_WAIT` passed):
    /// `None` for a clean end after an answer.
    fn failure(&self, answered: bool) -> Option<io::Error> {
        let guard = self.ended.lock().ok()?;
        let (guard, _) = self
            .ended_cv
            .wait_timeout_while(guard, EXIT_WAIT, |e| e.is_none())
            .ok()?;
        let remote = &self.remote;
        let Some(e) = guard.as_ref() else {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the ssh session closed",
            ));
        };
        // ssh's (or the far end's) last word, else the exit status.
        let said = e
            .lines
            .iter()
            .rev()
            .find(|l| !l.starts_with("Warning: Permanently added"))
            .cloned()
            .unwrap_or_else(|| format!("ssh {}", e.status));
        let (kind, msg) = match e.status.code() {
            Some(0) if answered => return None,
            Some(0) => (
                io::ErrorKind::InvalidData,
                format!(
                    "'{remote}' at the far end ended without answering: is it bitfog's 'serve --stdio'? (see --remote-bitfog)"
                ),
            ),
            Some(255) => (
                io::ErrorKind::ConnectionAborted,
                format!("ssh failed: {said}"),
            ),
            Some(126 | 127) => (
                io::ErrorKind::NotFound,
                format!(
                    "'{remote}' cannot run at the far end ({said}): name bitfog there with --remote-bitfog or BITFOG_REMOTE"
                ),
            ),
            Some(_) if answered => (
                io::ErrorKind::ConnectionAborted,
                format!("the far end stopped: {said}"),
            ),
            Some(_) => (
                io::ErrorKind::Other,
                format!("'{remote}' at the far end failed: {said} (see --remote-bitfog)"),
            ),
            None => (
                io::ErrorKind::ConnectionAborted,
                format!("ssh ended: {said}"),
            ),
        };
        Some(io::Error::new(kind, msg))
    }
}

/// HTTP/1.1 over our end of ssh's stdin and stdout, with the session to
/// explain a close.
#[derive(Debug)]
struct SshTransport {
    stream: UnixStream,
    buffers: LazyBuffers,
    session: Arc<Session>,
    /// Whether any byte of an answer came back.
    answered: bool,
    /// The socket timeouts last set (reads, writes).
    timeouts: (Option<std::time::Duration>, Option<std::time::Duration>),
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl SshTransport {
    /// The session's own reason for an I/O failure or an early close.
    fn explain(&self, e: Option<io::Error>) -> std::result::Result<bool, ureq::Error> {
        match self.session.failure(self.answered) {
            Some(why) => Err(ureq::Error::Io(why)),
            None => match e {
                Some(e) => Err(ureq::Error::Io(e)),
                None => Ok(false),
            },
        }
    }
}

/// The socket timeout for one read or write, or the timeout error.
fn limit(t: NextTimeout) -> std::result::Result<Option<std::time::Duration>, ureq::Error> {
    if t.after.is_zero() {
        return Err(ureq::Error::Timeout(t.reason));
    }
    Ok(t.not_zero().map(|d| *d))
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Transport for SshTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(
        &mut self,
        amount: usize,
        timeout: NextTimeout,
    ) -> std::result::Result<(), ureq::Error> {
        let t = timeout.for_write();
        let d = limit(t)?;
        if self.timeouts.1 != d {
            self.stream.set_write_timeout(d)?;
            self.timeouts.1 = d;
        }
        let out = &self.buffers.output()[..amount];
        match (&self.stream).write_all(out) {
            Ok(()) => Ok(()),
            Err(e) if timed_out(&e) => Err(ureq::Error::Timeout(t.reason)),
            Err(e) => self.explain(Some(e)).map(|_| ()),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> std::result::Result<bool, ureq::Error> {
        let t = timeout.for_read();
        let d = limit(t)?;
        if self.timeouts.0 != d {
            self.stream.set_read_timeout(d)?;
            self.timeouts.0 = d;
        }
        let n = loop {
            match (&self.stream).read(self.buffers.input_append_buf()) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(ureq::Error::Timeout(t.reason)),
                Err(e) => return self.explain(Some(e)),
            }
        };
        self.buffers.input_appended(n);
        if n == 0 {
            return self.explain(None);
        }
        self.answered = true;
        Ok(true)
    }

    /// Open while ssh has neither closed nor sent anything unasked.
    fn is_open(&mut self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8];
        let open = matches!(
            (&self.stream).read(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        );
        open && self.stream.set_nonblocking(false).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_as_a_shell_would() {
        assert_eq!(
            split_words(r#"ssh -i 'my key' -o "User=a b" x\ y"#).unwrap(),
            ["ssh", "-i", "my key", "-o", "User=a b", "x y"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("''").unwrap(), [""]);
        assert!(split_words("ssh 'x").is_err());
        assert!(split_words("ssh \\").is_err());
    }

    #[test]
    fn targets_parse_and_show() {
        let (host, shown) = register("me@nas:2222").unwrap();
        assert!(host.ends_with(STAND_IN));
        assert_eq!(shown, "ssh://me@nas:2222");
        assert_eq!(
            super::shown(&format!("http://{host}/vms/a%20b")),
            "ssh://me@nas:2222/vms/a%20b"
        );
        assert_eq!(register("me@nas:2222").unwrap().0, host);
        assert_eq!(register("[::1]:22").unwrap().1, "ssh://[::1]:22");
        assert_eq!(register("nas").unwrap().1, "ssh://nas");
        for bad in [
            "-oProxyCommand=x",
            "me@-x",
            "-u@h",
            "h:0",
            "h:x",
            "",
            "a b",
            "h;x",
            "[::1",
        ] {
            assert!(register(bad).is_err(), "{bad}");
        }
        assert_eq!(super::shown("http://h:1/a/"), "http://h:1/a/");
    }
}
