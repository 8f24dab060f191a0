//! The command line, from one table: `COMMANDS` and `OPTIONS` define every
//! command and option once, and the parser, the checks of which command
//! takes which option, `--help` and the usage lines all come from them (a
//! test checks the man page names the same options). Parsing runs in two
//! stages, as pico-args users do: raw values first, then validation into
//! one options struct per command; leftovers are errors.

use crate::client::AreaUrl;
use crate::cmd::fetch::FetchOpts;
use crate::cmd::store::StoreOpts;
use crate::error::{Error, Result};
use crate::server::ServeOpts;
use crate::ui::{Ui, parse_size};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

/// Default `--jobs`: enough parallel transfers to hide per-file latency on
/// a LAN without thrashing a disk.
pub(crate) const DEFAULT_JOBS: usize = 4;
/// Default `--jobs` of `store` over HTTP: its batches of small files wait
/// on the destination's disk (one `syncfs` each), and more of them in
/// flight hide that wait; files over the batch size still go
/// `DEFAULT_JOBS` at a time. Over ssh each job is a session, and sshd
/// drops new sessions beyond 10 starting at once (`MaxStartups`).
pub(crate) const STORE_JOBS: usize = 16;
/// Default `--threads` for `serve`, or one per core where there are more:
/// a worker hashes what it receives, so fewer workers than cores would
/// leave cores idle while uploads wait.
pub(crate) const DEFAULT_THREADS: usize = 16;

/// `serve`'s workers when `--threads` is not given.
fn default_threads() -> usize {
    threads_for(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn threads_for(cores: usize) -> usize {
    DEFAULT_THREADS.max(cores).min(1024)
}

/// A command: its name, positional arguments, one-line summary and what
/// its `--help` says.
struct Cmd {
    name: &'static str,
    args: &'static str,
    summary: &'static str,
    about: &'static str,
}

const COMMANDS: &[Cmd] = &[
    Cmd {
        name: "serve",
        args: "",
        summary: "run the HTTP server",
        about: "Serves the areas of the configuration over HTTP until SIGINT or SIGTERM;\n\
                with --stdio, one connection on stdin and stdout until its end.",
    },
    Cmd {
        name: "builddb",
        args: "URL DB",
        summary: "snapshot an area into a DB",
        about: "Reads the listing of the area at URL and writes it to DB as a manifest.\n\
                An interrupted or failed run leaves an existing DB untouched.",
    },
    Cmd {
        name: "emptydb",
        args: "DB",
        summary: "write a DB of an empty area",
        about: "Writes a manifest that says the area holds nothing.",
    },
    Cmd {
        name: "plan",
        args: "DESTDB SRCURL",
        summary: "show what fetch would carry",
        about: "Prints what fetch would carry (file count and bytes); downloads nothing.\n\
                DESTDB may be a courier directory: the receipt store left there is used.",
    },
    Cmd {
        name: "fetch",
        args: "DESTDB SRCURL COURIER",
        summary: "fill COURIER with what DESTDB lacks",
        about: "Downloads into COURIER what the destination (described by DESTDB) lacks\n\
                from SRCURL, largest files first, each verified before it appears.\n\
                Resumable: rerun after any interruption. DESTDB may be a courier\n\
                directory: the receipt store left there is used. Renamed and duplicate\n\
                files become instructions for the destination instead of bytes.",
    },
    Cmd {
        name: "store",
        args: "SRCDB DESTURL COURIER",
        summary: "empty COURIER into DESTURL",
        about: "Uploads from COURIER to DESTURL what DESTURL lacks according to SRCDB,\n\
                checking each file's SHA-256 first. Recreates symlinks and empty\n\
                directories from SRCDB, carries out fetch's copy instructions, fixes\n\
                mode and mtime in place, and leaves the destination's manifest in\n\
                COURIER/.bitfog/receipt.jsonl. SRCDB may be the courier itself: the\n\
                source listing fetch left there is used.",
    },
    Cmd {
        name: "keygen",
        args: "",
        summary: "make an age key pair",
        about: "Writes a new age identity (an X25519 secret key, as age-keygen does) to\n\
                standard output or, with --output, to a new file only its owner reads,\n\
                and says its recipient (the public key to encrypt to) on stderr.",
    },
    Cmd {
        name: "status",
        args: "COURIER|DB",
        summary: "say what a courier or a DB holds (no network)",
        about: "Says what COURIER holds (where it was filled from and for, when, its\n\
                files, ranges, deltas, instructions and partial downloads, and what is\n\
                left for later trips), or what DB describes (its area, when it was made,\n\
                files, bytes, the largest files, signatures). Reads the disk alone.",
    },
];

/// An option: its names, the name of its value (none for a flag), the
/// commands that take it (`ALL`: every one), the option it needs, and its
/// help.
struct Opt {
    long: &'static str,
    short: Option<&'static str>,
    value: Option<&'static str>,
    commands: &'static [&'static str],
    needs: Option<&'static str>,
    help: &'static str,
}

const ALL: &[&str] = &[
    "serve", "builddb", "emptydb", "plan", "fetch", "store", "status", "keygen",
];
const CLIENTS: &[&str] = &["builddb", "plan", "fetch", "store"];

/// Every option. Those of one command come before the global ones, in the
/// order `--help` shows them.
const OPTIONS: &[Opt] = &[
    Opt {
        long: "--conf",
        short: None,
        value: Some("FILE"),
        commands: &["serve"],
        needs: None,
        help: "configuration (default: bitfog.json)",
    },
    Opt {
        long: "--addr",
        short: None,
        value: Some("ADDR"),
        commands: &["serve"],
        needs: None,
        help: ":PORT, HOST:PORT or [V6]:PORT (default: :8675)",
    },
    Opt {
        long: "--stdio",
        short: None,
        value: None,
        commands: &["serve"],
        needs: None,
        help: "serve one connection on stdin and stdout instead of listening\n\
               (what an ssh:// URL runs at the far end); no startup line;\n\
               exits 0 at the end of input",
    },
    Opt {
        long: "--threads",
        short: None,
        value: Some("N"),
        commands: &["serve"],
        needs: None,
        help: "worker threads (default: 16, or one per core where there are more)",
    },
    Opt {
        long: "--cache",
        short: None,
        value: Some("DIR"),
        commands: &["serve"],
        needs: None,
        help: "SHA-256 cache, outside the areas (default: $XDG_CACHE_HOME/bitfog\n\
               or ~/.cache/bitfog; none: off)",
    },
    Opt {
        long: "--signatures",
        short: None,
        value: None,
        commands: &["builddb"],
        needs: None,
        help: "also write block signatures of the large files to DB.sig,\n\
               so fetch can carry deltas of their next versions",
    },
    Opt {
        long: "--signature-min",
        short: None,
        value: Some("SIZE"),
        commands: &["builddb"],
        needs: Some("--signatures"),
        help: "smallest file to sign (default: 64M)",
    },
    Opt {
        long: "--max-bytes",
        short: None,
        value: Some("SIZE"),
        commands: &["plan", "fetch"],
        needs: None,
        help: "cap on bytes held in COURIER; with plan, also say how many trips\n\
               of SIZE the rest needs (K M G T and KiB..TiB are powers of 1024,\n\
               KB MB GB TB of 1000: 200G, 1.5T, 512MiB, 2TB)",
    },
    Opt {
        long: "--exclude",
        short: None,
        value: Some("PATTERN"),
        commands: &["builddb", "plan", "fetch"],
        needs: None,
        help: "leave out names PATTERN matches (repeatable; as rsync's:\n\
               no '/' matches a name at any depth, '*' '?' '[...]',\n\
               a leading '/' anchors at the area's root, a trailing '/'\n\
               matches directories); a DB records them, and what they\n\
               match is never deleted by store",
    },
    Opt {
        long: "--delete",
        short: None,
        value: None,
        commands: &["store"],
        needs: None,
        help: "remove from DESTURL the files SRCDB does not have, if they are as\n\
               the destination snapshot fetch saw (refused when SRCDB lists\n\
               nothing or was made by emptydb, or, without --max-delete, would\n\
               remove more than half of DESTURL's files; nothing is deleted\n\
               when SRCDB's listing skipped entries)",
    },
    Opt {
        long: "--max-delete",
        short: None,
        value: Some("N"),
        commands: &["store"],
        needs: Some("--delete"),
        help: "delete at most N files (exit 1 when more were due)",
    },
    Opt {
        long: "--other-dest",
        short: None,
        value: None,
        commands: &["store"],
        needs: None,
        help: "store although DESTURL is not the area the courier's trip was\n\
               planned for (it moved to another disk or machine); refused\n\
               otherwise, before anything is touched",
    },
    Opt {
        long: "--verify",
        short: None,
        value: None,
        commands: &["status"],
        needs: None,
        help: "re-read and hash everything COURIER carries against its records;\n\
               name and mark what is damaged (the next fetch replaces it); exit 1\n\
               if anything is",
    },
    Opt {
        long: "--jobs",
        short: None,
        value: Some("N"),
        commands: &["fetch", "store"],
        needs: None,
        help: "parallel transfers (default: 4; store over http: 16, at most 4\n\
               of them files over 1 MiB)",
    },
    Opt {
        long: "--dry-run",
        short: None,
        value: None,
        commands: &["fetch", "store"],
        needs: None,
        help: "show what would be done; change nothing",
    },
    Opt {
        long: "--progress-interval",
        short: None,
        value: Some("SECS"),
        commands: &["builddb", "fetch", "store"],
        needs: None,
        help: "without a terminal, a progress line every SECS seconds\n\
               (default: 60; 0: none)",
    },
    Opt {
        long: "--quiet",
        short: Some("-q"),
        value: None,
        commands: ALL,
        needs: None,
        help: "errors only on stderr (serve: no request log)",
    },
    Opt {
        long: "--verbose",
        short: Some("-v"),
        value: None,
        commands: &["builddb", "plan", "fetch", "store"],
        needs: None,
        help: "more detail (plan lists each file, fetch names each file; over\n\
               ssh, the far end's log)",
    },
    Opt {
        long: "--json",
        short: None,
        value: None,
        commands: CLIENTS_AND_EMPTYDB,
        needs: None,
        help: "print the final summary as one JSON object",
    },
    Opt {
        long: "--cacert",
        short: None,
        value: Some("FILE"),
        commands: CLIENTS,
        needs: None,
        help: "trust the PEM certificates in FILE (a CA, or a proxy's\n\
               self-signed certificate) instead of the bundled roots\n\
               (or set BITFOG_CACERT)",
    },
    Opt {
        long: "--token",
        short: None,
        value: Some("TOKEN"),
        commands: CLIENTS,
        needs: None,
        help: "send Authorization: Bearer TOKEN (or set BITFOG_TOKEN)",
    },
    Opt {
        long: "--rsh",
        short: None,
        value: Some("COMMAND"),
        commands: CLIENTS,
        needs: None,
        help: "run COMMAND, with its own options, instead of 'ssh' to reach\n\
               ssh:// URLs (or set BITFOG_RSH)",
    },
    Opt {
        long: "--remote-bitfog",
        short: None,
        value: Some("COMMAND"),
        commands: CLIENTS,
        needs: None,
        help: "the command ssh runs at the far end: a bitfog serving stdin\n\
               and stdout (default: bitfog's own, found on the far end's\n\
               PATH; or set BITFOG_REMOTE)",
    },
    Opt {
        long: "--encrypt-to",
        short: None,
        value: Some("RECIPIENT"),
        commands: &["builddb", "emptydb", "fetch", "store"],
        needs: None,
        help: "encrypt to this age recipient (age1..., repeatable): the DB\n\
               and its signatures (builddb, emptydb); everything fetch\n\
               writes in the courier, names included; the receipt store\n\
               writes in an encrypted courier. Read back with the\n\
               matching identity",
    },
    Opt {
        long: "--encrypt-to-file",
        short: None,
        value: Some("FILE"),
        commands: &["builddb", "emptydb", "fetch", "store"],
        needs: None,
        help: "the same, for each recipient in FILE (one age1... a line;\n\
               # comments)",
    },
    Opt {
        long: "--identity",
        short: Some("-i"),
        value: Some("FILE"),
        commands: &["plan", "fetch", "store", "status"],
        needs: None,
        help: "age identities (AGE-SECRET-KEY-1... lines, as age-keygen\n\
               and bitfog keygen write) to read encrypted DBs and\n\
               couriers with (repeatable)",
    },
    Opt {
        long: "--output",
        short: Some("-o"),
        value: Some("FILE"),
        commands: &["keygen"],
        needs: None,
        help: "write the identity to FILE (made new, mode 0600) instead\n\
               of standard output",
    },
    Opt {
        long: "--help",
        short: Some("-h"),
        value: None,
        commands: ALL,
        needs: None,
        help: "this help",
    },
    Opt {
        long: "--version",
        short: Some("-V"),
        value: None,
        commands: ALL,
        needs: None,
        help: "print the version",
    },
];

const CLIENTS_AND_EMPTYDB: &[&str] = &["builddb", "emptydb", "plan", "fetch", "store", "status"];

/// The options shown as global, in `bitfog --help` and after each
/// command's own.
const GLOBAL: &[&str] = &[
    "--quiet",
    "--verbose",
    "--json",
    "--token",
    "--help",
    "--version",
];

impl Opt {
    /// `--long VALUE` or `--flag`, as usage lines show it.
    fn usage(&self) -> String {
        match self.value {
            Some(v) => format!("{} {v}", self.long),
            None => self.long.to_string(),
        }
    }

    /// True for the options `bitfog --help` lists as global (each command
    /// still takes only those its `commands` name).
    fn global(&self) -> bool {
        GLOBAL.contains(&self.long)
    }
}

/// The usage line of a command: its arguments, then its own options in
/// brackets, an option that needs another nested inside it.
fn usage_line(cmd: &Cmd) -> String {
    let mut line = format!("bitfog {}", cmd.name);
    if !cmd.args.is_empty() {
        line.push(' ');
        line.push_str(cmd.args);
    }
    let own: Vec<&Opt> = OPTIONS
        .iter()
        .filter(|o| !o.global() && o.commands.contains(&cmd.name))
        .collect();
    for o in own.iter().filter(|o| o.needs.is_none()) {
        let nested: Vec<String> = own
            .iter()
            .filter(|n| n.needs == Some(o.long))
            .map(|n| format!(" [{}]", n.usage()))
            .collect();
        line.push_str(&format!(" [{}{}]", o.usage(), nested.concat()));
    }
    line
}

/// Option help lines, aligned, continuation lines indented.
fn option_lines(opts: &[&Opt]) -> String {
    let mut out = String::new();
    for o in opts {
        let names = match o.short {
            Some(s) => format!("  {s}, {}", o.usage()),
            None => format!("      {}", o.usage()),
        };
        let mut lines = o.help.lines();
        let first = lines.next().unwrap_or("");
        if names.len() < 22 {
            out.push_str(&format!("{names:<22} {first}\n"));
        } else {
            out.push_str(&format!("{names}\n{:<22} {first}\n", ""));
        }
        for l in lines {
            out.push_str(&format!("{:<22} {}\n", "", l.trim_start()));
        }
    }
    out
}

/// `bitfog --help`.
fn general_help() -> String {
    let mut out = String::from(
        "bitfog: move terabytes between sites on a carried disk, verified with SHA-256\n\n\
         usage: bitfog <command> [options] [args]\n\ncommands:\n",
    );
    for c in COMMANDS {
        let line = usage_line(c);
        let line = line.strip_prefix("bitfog ").unwrap_or(&line);
        if line.len() <= 52 {
            out.push_str(&format!("  {line:<52} {}\n", c.summary));
        } else {
            out.push_str(&format!("  {line}\n  {:<52} {}\n", "", c.summary));
        }
    }
    out.push_str("\nglobal options:\n");
    let global: Vec<&Opt> = OPTIONS.iter().filter(|o| o.global()).collect();
    out.push_str(&option_lines(&global));
    out.push_str(
        "\nURL, SRCURL, DESTURL: http://HOST:PORT/AREA/, https://HOST/[PREFIX/]AREA/\n\
         or ssh://[USER@]HOST[:PORT]/AREA/ (ssh runs 'bitfog serve' at the far end)\n",
    );
    out.push_str("\n'bitfog <command> --help' for a command.\n");
    out.push_str("exit status: 0 done, 1 something failed, 2 bad usage or unusable input\n");
    out
}

/// `bitfog COMMAND --help`.
fn command_help(cmd: &Cmd) -> String {
    let opts: Vec<&Opt> = OPTIONS
        .iter()
        .filter(|o| o.commands.contains(&cmd.name) && o.long != "--help" && o.long != "--version")
        .collect();
    format!(
        "usage: {}\n\n{}\n\noptions:\n{}",
        usage_line(cmd),
        cmd.about
            .lines()
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n"),
        option_lines(&opts)
    )
}

/// What to run.
#[derive(Debug)]
pub(crate) enum Command {
    Help(String),
    Version,
    Serve(ServeOpts),
    Builddb {
        url: AreaUrl,
        db: PathBuf,
        /// With `--signatures`: the smallest file to sign.
        signatures: Option<u64>,
        /// `--encrypt-to`: the DB (and its signatures) encrypted to these.
        seal: Option<Vec<crate::age::Recipient>>,
    },
    Emptydb {
        db: PathBuf,
        seal: Option<Vec<crate::age::Recipient>>,
    },
    Keygen {
        out: Option<PathBuf>,
    },
    Plan {
        destdb: PathBuf,
        src: AreaUrl,
        max_bytes: Option<u64>,
    },
    Fetch(FetchOpts),
    Store(StoreOpts),
    Status {
        path: PathBuf,
        verify: bool,
    },
}

#[derive(Debug)]
pub(crate) struct Cli {
    pub(crate) ui: Ui,
    pub(crate) token: Option<String>,
    /// `--cacert` or `BITFOG_CACERT`.
    pub(crate) cacert: Option<PathBuf>,
    /// `--exclude`.
    pub(crate) exclude: crate::wire::exclude::Excludes,
    /// `--rsh` or `BITFOG_RSH`.
    pub(crate) rsh: Option<String>,
    /// `--remote-bitfog` or `BITFOG_REMOTE`.
    pub(crate) remote: Option<String>,
    /// `--identity`: files of age identities for encrypted inputs.
    pub(crate) identities: Vec<PathBuf>,
    pub(crate) command: Command,
}

/// Stage 1: raw values, by option, and the positional arguments.
struct Raw {
    given: HashMap<&'static str, Option<OsString>>,
    /// Every value of each option of `REPEATABLE` given.
    multi: HashMap<&'static str, Vec<OsString>>,
    free: Vec<OsString>,
}

/// Options that may be given more than once.
const REPEATABLE: &[&str] = &[
    "--exclude",
    "--encrypt-to",
    "--encrypt-to-file",
    "--identity",
];

impl Raw {
    fn flag(&self, long: &str) -> bool {
        self.given.contains_key(long)
    }

    fn os(&self, long: &str) -> Option<&OsString> {
        self.given.get(long).and_then(Option::as_ref)
    }

    fn text(&self, long: &str) -> Option<String> {
        self.os(long).map(|v| v.to_string_lossy().into_owned())
    }

    fn all(&self, long: &str) -> &[OsString] {
        self.multi.get(long).map_or(&[], Vec::as_slice)
    }

    /// The recipients of `--encrypt-to` and `--encrypt-to-file`; `None`
    /// when neither is given.
    fn recipients(&self) -> Result<Option<Vec<crate::age::Recipient>>> {
        let mut out = Vec::new();
        for r in self.all("--encrypt-to") {
            let r = r.to_string_lossy();
            out.push(crate::age::Recipient::parse(&r).ok_or_else(|| {
                Error::usage(format!(
                    "--encrypt-to takes an age recipient (age1...), not '{r}'"
                ))
            })?);
        }
        for f in self.all("--encrypt-to-file") {
            out.extend(crate::age::read_recipients(std::path::Path::new(f)).map_err(Error::usage)?);
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

fn pico(e: pico_args::Error) -> Error {
    Error::usage(format!("{e}"))
}

fn raw(args: Vec<OsString>) -> Result<Raw> {
    // Everything after `--` is positional.
    let (args, after) = match args.iter().position(|a| a == "--") {
        Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let mut p = pico_args::Arguments::from_vec(args);
    let mut given = HashMap::new();
    let mut multi = HashMap::new();
    for long in REPEATABLE {
        let short = OPTIONS
            .iter()
            .find(|o| o.long == *long)
            .and_then(|o| o.short);
        let keys: pico_args::Keys = match short {
            Some(s) => [s, *long].into(),
            None => (*long).into(),
        };
        let v: Vec<OsString> = p
            .values_from_os_str(keys, |s| Ok::<_, String>(s.to_os_string()))
            .map_err(pico)?;
        if !v.is_empty() {
            given.insert(*long, None);
            multi.insert(*long, v);
        }
    }
    for o in OPTIONS.iter().filter(|o| !REPEATABLE.contains(&o.long)) {
        let keys: pico_args::Keys = match o.short {
            Some(s) => [s, o.long].into(),
            None => o.long.into(),
        };
        if let Some(value) = o.value {
            // Paths may be any bytes; other values are text and may also
            // come as `--name=value`.
            let v = if matches!(value, "FILE" | "DIR") {
                p.opt_value_from_os_str(keys, |s| Ok::<_, String>(s.to_os_string()))
            } else {
                p.opt_value_from_fn(keys, |s| Ok::<_, String>(OsString::from(s)))
            }
            .map_err(pico)?;
            if let Some(v) = v {
                given.insert(o.long, Some(v));
            }
        } else if p.contains(keys) {
            given.insert(o.long, None);
        }
    }
    let mut free = Vec::new();
    for a in p.finish() {
        let s = a.to_string_lossy();
        if s.starts_with('-') && s.len() > 1 {
            let key = s.split('=').next().unwrap_or(&s);
            let known = OPTIONS
                .iter()
                .any(|o| o.long == key || o.short == Some(key));
            return Err(Error::usage(if known {
                format!("option '{key}' given twice")
            } else {
                format!("unknown option '{s}' (see 'bitfog --help')")
            }));
        }
        free.push(a);
    }
    free.extend(after);
    Ok(Raw { given, multi, free })
}

fn count(name: &str, value: &str, max: usize) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(Error::usage(format!(
            "{name} takes a whole number from 1 to {max}, not '{value}'"
        ))),
    }
}

fn size(name: &str, value: &str) -> Result<u64> {
    parse_size(value).ok_or_else(|| {
        Error::usage(format!(
            "{name}: bad size '{value}' (e.g. 200G, 1.5T, 512MiB, 2TB)"
        ))
    })
}

/// Parses the command line (without the program name).
pub(crate) fn parse(args: Vec<OsString>) -> Result<Cli> {
    let r = raw(args)?;
    let progress_secs = match r.text("--progress-interval") {
        None => crate::ui::PROGRESS_SECS,
        Some(v) => v.parse::<u64>().map_err(|_| {
            Error::usage(format!(
                "--progress-interval takes a whole number of seconds, not '{v}'"
            ))
        })?,
    };
    let ui = Ui {
        quiet: r.flag("--quiet"),
        json: r.flag("--json"),
        verbose: r.flag("--verbose"),
        progress_secs,
    };
    let cacert = r.os("--cacert").map(PathBuf::from).or_else(|| {
        std::env::var_os("BITFOG_CACERT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let token = r
        .text("--token")
        .or_else(|| std::env::var("BITFOG_TOKEN").ok().filter(|t| !t.is_empty()));
    let excludes: Vec<String> = r
        .all("--exclude")
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let exclude = crate::wire::exclude::Excludes::new(&excludes).map_err(Error::usage)?;
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let rsh = r.text("--rsh").or_else(|| env("BITFOG_RSH"));
    let remote = r.text("--remote-bitfog").or_else(|| env("BITFOG_REMOTE"));
    let identities: Vec<PathBuf> = r.all("--identity").iter().map(PathBuf::from).collect();
    let cli = |command| {
        Ok(Cli {
            ui,
            token: token.clone(),
            cacert: cacert.clone(),
            exclude: exclude.clone(),
            rsh: rsh.clone(),
            remote: remote.clone(),
            identities: identities.clone(),
            command,
        })
    };
    let Some(name) = r.free.first().map(|s| s.to_string_lossy().into_owned()) else {
        if r.flag("--version") {
            return cli(Command::Version);
        }
        if r.flag("--help") {
            return cli(Command::Help(general_help()));
        }
        return Err(Error::usage("no command given (see 'bitfog --help')"));
    };
    let Some(cmd) = COMMANDS.iter().find(|c| c.name == name) else {
        return Err(Error::usage(format!(
            "unknown command '{name}' (see 'bitfog --help')"
        )));
    };
    if r.flag("--help") {
        return cli(Command::Help(command_help(cmd)));
    }
    if r.flag("--version") {
        return cli(Command::Version);
    }
    check_options(cmd, &r)?;
    let args = &r.free[1..];
    let want = |n: usize| -> Result<Vec<PathBuf>> {
        if args.len() != n {
            let what = if args.len() < n {
                "missing argument"
            } else {
                "too many arguments"
            };
            return Err(Error::usage(format!("{what}: usage: {}", usage_line(cmd))));
        }
        Ok(args.iter().map(PathBuf::from).collect())
    };
    cli(command(cmd.name, &r, ui, want)?)
}

/// Every option given must apply to the command, with what it needs.
fn check_options(cmd: &Cmd, r: &Raw) -> Result<()> {
    for o in OPTIONS.iter().filter(|o| r.flag(o.long)) {
        if !o.commands.contains(&cmd.name) {
            return Err(Error::usage(format!(
                "option '{}' does not apply to '{}'",
                o.long, cmd.name
            )));
        }
        if let Some(needed) = o.needs.filter(|n| !r.flag(n)) {
            return Err(Error::usage(format!("{} needs {needed}", o.long)));
        }
    }
    Ok(())
}

/// Stage 2: the checked options of one command.
fn command(
    name: &str,
    r: &Raw,
    ui: Ui,
    want: impl Fn(usize) -> Result<Vec<PathBuf>>,
) -> Result<Command> {
    let url = |p: &PathBuf| AreaUrl::parse(&p.to_string_lossy());
    let given_jobs = r
        .text("--jobs")
        .map(|j| count("--jobs", &j, 64))
        .transpose()?;
    let jobs = given_jobs.unwrap_or(DEFAULT_JOBS);
    let max_bytes = r
        .text("--max-bytes")
        .map(|s| size("--max-bytes", &s))
        .transpose()?;
    Ok(match name {
        "serve" => {
            want(0)?;
            if r.flag("--stdio") && r.flag("--addr") {
                return Err(Error::usage(
                    "--stdio serves stdin and stdout: it takes no --addr",
                ));
            }
            Command::Serve(ServeOpts {
                conf: r
                    .os("--conf")
                    .map_or_else(|| PathBuf::from("bitfog.json"), PathBuf::from),
                addr: r.text("--addr").unwrap_or_else(|| ":8675".to_string()),
                threads: r
                    .text("--threads")
                    .map_or_else(|| Ok(default_threads()), |t| count("--threads", &t, 1024))?,
                cache: match r.os("--cache") {
                    Some(c) if c == "none" => None,
                    Some(c) => Some(PathBuf::from(c)),
                    None => crate::server::default_dir(),
                },
                cache_off: match r.os("--cache") {
                    Some(_) => "--cache none",
                    None => "neither XDG_CACHE_HOME nor HOME is set; give --cache DIR",
                },
                cache_given: r.os("--cache").is_some(),
                quiet: ui.quiet,
                stdio: r.flag("--stdio"),
            })
        }
        "builddb" => {
            let a = want(2)?;
            let min = match r.text("--signature-min") {
                Some(v) => size("--signature-min", &v)?,
                None => crate::wire::delta::SIGNATURE_MIN,
            };
            Command::Builddb {
                url: url(&a[0])?,
                db: a[1].clone(),
                signatures: r.flag("--signatures").then_some(min),
                seal: r.recipients()?,
            }
        }
        "emptydb" => Command::Emptydb {
            db: want(1)?.remove(0),
            seal: r.recipients()?,
        },
        "keygen" => {
            want(0)?;
            Command::Keygen {
                out: r.os("--output").map(PathBuf::from),
            }
        }
        "plan" => {
            let a = want(2)?;
            Command::Plan {
                destdb: a[0].clone(),
                src: url(&a[1])?,
                max_bytes,
            }
        }
        "fetch" => {
            let a = want(3)?;
            Command::Fetch(FetchOpts {
                destdb: a[0].clone(),
                src: url(&a[1])?,
                courier: a[2].clone(),
                max_bytes,
                dry_run: r.flag("--dry-run"),
                jobs,
                seal: r.recipients()?,
            })
        }
        "store" => {
            let a = want(3)?;
            let dest = url(&a[1])?;
            let many = if dest.is_ssh() {
                DEFAULT_JOBS
            } else {
                STORE_JOBS
            };
            Command::Store(StoreOpts {
                srcdb: a[0].clone(),
                jobs: given_jobs.unwrap_or(many),
                big_jobs: jobs,
                dest,
                courier: a[2].clone(),
                delete: r.flag("--delete"),
                max_delete: match r.text("--max-delete") {
                    None => None,
                    Some(n) => Some(n.parse().map_err(|_| {
                        Error::usage(format!("--max-delete takes a whole number, not '{n}'"))
                    })?),
                },
                dry_run: r.flag("--dry-run"),
                other_dest: r.flag("--other-dest"),
                seal: r.recipients()?,
            })
        }
        "status" => Command::Status {
            path: want(1)?.remove(0),
            verify: r.flag("--verify"),
        },
        _ => unreachable!("COMMANDS names every command"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Cli> {
        parse(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn options_anywhere() {
        let c = parse_str(&[
            "--json",
            "fetch",
            "d.db",
            "--max-bytes",
            "1.5G",
            "http://h:1/a",
            "c",
            "-q",
        ])
        .unwrap();
        assert!(c.ui.json && c.ui.quiet);
        let Command::Fetch(f) = c.command else {
            panic!("not fetch")
        };
        assert_eq!(f.max_bytes, Some(3 << 29));
        assert_eq!(f.jobs, DEFAULT_JOBS);
        let c = parse_str(&[
            "store",
            "s.db",
            "http://h:1/a/",
            "c",
            "--delete",
            "--jobs=2",
        ])
        .unwrap();
        let Command::Store(s) = c.command else {
            panic!("not store")
        };
        assert!(s.delete);
        assert_eq!((s.jobs, s.big_jobs), (2, 2));
        // store's own default: many batches over HTTP, few large files,
        // and over ssh a session a job.
        let store_jobs = |url: &str| {
            let Command::Store(s) = parse_str(&["store", "s.db", url, "c"]).unwrap().command else {
                panic!("not store")
            };
            (s.jobs, s.big_jobs)
        };
        assert_eq!(store_jobs("http://h:1/a/"), (STORE_JOBS, DEFAULT_JOBS));
        assert_eq!(store_jobs("https://h:1/a/"), (STORE_JOBS, DEFAULT_JOBS));
        assert_eq!(store_jobs("ssh://h/a/"), (DEFAULT_JOBS, DEFAULT_JOBS));
        // serve: 16 workers, or one per core where there are more.
        let Command::Serve(s) = parse_str(&["serve"]).unwrap().command else {
            panic!("not serve")
        };
        assert_eq!(s.threads, default_threads());
        let counts = [2, 16, 17, 64, 5000].map(threads_for);
        assert_eq!(counts, [16, 16, 17, 64, 1024]);
    }

    #[test]
    fn help_and_usage_come_from_the_table() {
        for c in COMMANDS {
            let help = command_help(c);
            assert!(help.starts_with(&format!("usage: bitfog {}", c.name)));
            for o in OPTIONS.iter().filter(|o| o.commands.contains(&c.name)) {
                if o.long != "--help" && o.long != "--version" {
                    assert!(help.contains(o.long), "{} --help lacks {}", c.name, o.long);
                }
            }
            assert!(general_help().contains(&usage_line(c)["bitfog ".len()..]));
        }
        assert!(usage_line(&COMMANDS[5]).contains("[--delete [--max-delete N]]"));
        // Every option is taken by some command, and what one needs exists.
        for o in OPTIONS {
            assert!(
                o.commands
                    .iter()
                    .all(|c| COMMANDS.iter().any(|k| k.name == *c))
            );
            assert!(o.needs.is_none_or(|n| OPTIONS.iter().any(|x| x.long == n)));
        }
    }

    #[test]
    fn usage_errors() {
        for args in [
            &[][..],
            &["nope"],
            &["plan", "d.db"],
            &["plan", "d.db", "http://h/a/", "extra"],
            &["plan", "d.db", "http://h/a/", "--bogus"],
            &["store", "s.db", "http://h/a/", "c", "--max-bytes", "1G"],
            &["fetch", "d.db", "http://h/a/", "c", "--max-bytes", "lots"],
            &["fetch", "d.db", "http://h/a/", "c", "--jobs", "0"],
            &["fetch", "d.db", "ftp://h/a/", "c"],
            &["serve", "--threads", "x"],
            &["serve", "--addr"],
            &["emptydb", "a", "--jobs", "1", "--jobs", "2"],
            // An option the command does not take is an error, never
            // silently ignored.
            &["serve", "--token", "x"],
            &["serve", "--json"],
            &["serve", "-v"],
            &["emptydb", "a.db", "--token", "x"],
            &["store", "s.db", "http://h/a/", "c", "--max-delete", "3"],
            &["builddb", "http://h/a/", "d.db", "--signature-min", "1M"],
            &["status", "c", "-v"],
            &["serve", "--stdio", "--addr", ":1"],
            &["serve", "--rsh", "ssh"],
            &["emptydb", "a.db", "--remote-bitfog", "x"],
            &["builddb", "ssh://-x/a/", "d.db"],
            &["builddb", "ssh://h:99999/a/", "d.db"],
        ] {
            let err = parse_str(args).unwrap_err();
            assert_eq!(err.exit, crate::error::Exit::Usage, "{args:?}");
        }
        assert!(matches!(
            parse_str(&["fetch", "--help"]).unwrap().command,
            Command::Help(_)
        ));
        assert!(matches!(
            parse_str(&["--version"]).unwrap().command,
            Command::Version
        ));
        assert!(matches!(
            parse_str(&["emptydb", "--", "-odd.db"]).unwrap().command,
            Command::Emptydb { .. }
        ));
    }
}
