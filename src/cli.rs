//! Help texts and argument parsing: raw values first, then validation
//! into one options struct per command. Leftover arguments are errors.

use crate::client::AreaUrl;
use crate::cmd::fetch::FetchOpts;
use crate::cmd::store::StoreOpts;
use crate::error::{Error, Result};
use crate::server::ServeOpts;
use crate::ui::{Ui, parse_size};
use std::ffi::OsString;
use std::path::PathBuf;

/// Default `--jobs`: enough parallel transfers to hide per-file latency on
/// a LAN without thrashing a disk.
pub(crate) const DEFAULT_JOBS: usize = 4;
/// Default `--threads` for `serve`.
pub(crate) const DEFAULT_THREADS: usize = 16;

pub(crate) const USAGE: &str = "\
bitfog: move terabytes between sites on a carried disk, verified with SHA-256

usage: bitfog <command> [options] [args]

commands:
  serve    [--conf FILE] [--addr ADDR] [--threads N] [--cache DIR]
                                                        run the HTTP server
  builddb  URL DB [--signatures [--signature-min SIZE]]
                                                        snapshot an area into a DB
  emptydb  DB                                           write a DB of an empty area
  plan     DESTDB SRCURL [--max-bytes SIZE]             show what fetch would carry
  fetch    DESTDB SRCURL COURIER [--max-bytes SIZE] [--jobs N] [--dry-run]
                                                        fill COURIER with what DESTDB lacks
  store    SRCDB DESTURL COURIER [--delete [--max-delete N]] [--jobs N] [--dry-run]
                                                        empty COURIER into DESTURL

global options:
  -q, --quiet        errors only on stderr
  -v, --verbose      more detail (plan lists files, fetch names each file)
      --json         print the final summary as one JSON object
      --token TOKEN  send Authorization: Bearer TOKEN (or set BITFOG_TOKEN)
  -h, --help         this help; 'bitfog <command> --help' for a command
  -V, --version      print the version

exit status: 0 done, 1 something failed, 2 bad usage or unusable input
";

fn command_help(cmd: &str) -> Option<&'static str> {
    Some(match cmd {
        "serve" => {
            "\
usage: bitfog serve [--conf FILE] [--addr ADDR] [--threads N] [--cache DIR]

Serves the areas of FILE over HTTP until SIGINT or SIGTERM.

options:
      --conf FILE    configuration (default: bitfog.json)
      --addr ADDR    :PORT, HOST:PORT or [V6]:PORT (default: :8675)
      --threads N    worker threads (default: 16)
      --cache DIR    SHA-256 cache, outside the areas (default:
                     $XDG_CACHE_HOME/bitfog or ~/.cache/bitfog; none: off)
  -q, --quiet        no request log
"
        }
        "builddb" => {
            "\
usage: bitfog builddb URL DB [--signatures [--signature-min SIZE]]

Reads the listing of the area at URL and writes it to DB as a manifest.
An interrupted or failed run leaves an existing DB untouched.

options:
      --signatures   also write block signatures of the large files to
                     DB.sig, so fetch can carry deltas of their next versions
      --signature-min SIZE
                     smallest file to sign (default: 64M)
      --json         print {\"files\":N,\"bytes\":B}
      --token TOKEN  bearer token for the area
"
        }
        "emptydb" => {
            "\
usage: bitfog emptydb DB

Writes a manifest that says the area holds nothing.

options:
      --json         print {\"files\":0,\"bytes\":0}
"
        }
        "plan" => {
            "\
usage: bitfog plan DESTDB SRCURL [--max-bytes SIZE]

Prints what fetch would carry (file count and bytes); downloads nothing.
DESTDB may be a courier directory: the receipt store left there is used.

options:
      --max-bytes SIZE  also say how many trips of SIZE the rest needs
  -v, --verbose      list each file with its size
      --json         print remaining_files and remaining_bytes (and trips)
      --token TOKEN  bearer token for the source area
"
        }
        "fetch" => {
            "\
usage: bitfog fetch DESTDB SRCURL COURIER [--max-bytes SIZE] [--jobs N] [--dry-run]

Downloads into COURIER what the destination (described by DESTDB) lacks
from SRCURL, largest files first, each verified before it appears.
Resumable: rerun after any interruption. DESTDB may be a courier directory:
the receipt store left there is used. Renamed and duplicate files become
instructions for the destination instead of bytes.

options:
      --max-bytes SIZE  cap on bytes held in COURIER (e.g. 200G, 1.5T, 512MiB)
      --jobs N          parallel downloads (default: 4)
      --dry-run         show what would be fetched and removed; change nothing
  -v, --verbose         name each fetched file
      --json            print the summary as JSON
      --token TOKEN     bearer token for the source area
"
        }
        "store" => {
            "\
usage: bitfog store SRCDB DESTURL COURIER [--delete [--max-delete N]] [--jobs N] [--dry-run]

Uploads from COURIER to DESTURL what DESTURL lacks according to SRCDB,
checking each file's SHA-256 first. Recreates symlinks from SRCDB, carries
out fetch's copy instructions, fixes mode and mtime in place, and leaves
the destination's manifest in COURIER/.bitfog/receipt.jsonl.

options:
      --delete       remove from DESTURL the files SRCDB does not have, if they
                     are as the destination snapshot fetch saw (refused when
                     SRCDB lists nothing or was made by emptydb)
      --max-delete N delete at most N files (exit 1 when more were due)
      --jobs N       parallel uploads (default: 4)
      --dry-run      show what would be uploaded and deleted; change nothing
      --json         print the summary as JSON
      --token TOKEN  bearer token for the destination area
"
        }
        _ => return None,
    })
}

/// What to run.
#[derive(Debug)]
pub(crate) enum Command {
    Help(&'static str),
    Version,
    Serve(ServeOpts),
    Builddb {
        url: AreaUrl,
        db: PathBuf,
        /// With `--signatures`: the smallest file to sign.
        signatures: Option<u64>,
    },
    Emptydb {
        db: PathBuf,
    },
    Plan {
        destdb: PathBuf,
        src: AreaUrl,
        max_bytes: Option<u64>,
    },
    Fetch(FetchOpts),
    Store(StoreOpts),
}

#[derive(Debug)]
pub(crate) struct Cli {
    pub(crate) ui: Ui,
    pub(crate) token: Option<String>,
    pub(crate) command: Command,
}

/// Raw values, before validation.
struct Raw {
    help: bool,
    version: bool,
    ui: Ui,
    token: Option<String>,
    conf: Option<OsString>,
    cache: Option<OsString>,
    addr: Option<String>,
    threads: Option<String>,
    max_bytes: Option<String>,
    jobs: Option<String>,
    delete: bool,
    max_delete: Option<String>,
    dry_run: bool,
    signatures: bool,
    signature_min: Option<String>,
    free: Vec<OsString>,
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
    let mut r = Raw {
        help: p.contains(["-h", "--help"]),
        version: p.contains(["-V", "--version"]),
        ui: Ui {
            quiet: p.contains(["-q", "--quiet"]),
            json: p.contains("--json"),
            verbose: p.contains(["-v", "--verbose"]),
        },
        token: p.opt_value_from_str("--token").map_err(pico)?,
        conf: p
            .opt_value_from_os_str("--conf", |s| Ok::<_, String>(s.to_os_string()))
            .map_err(pico)?,
        addr: p.opt_value_from_str("--addr").map_err(pico)?,
        cache: p
            .opt_value_from_os_str("--cache", |s| Ok::<_, String>(s.to_os_string()))
            .map_err(pico)?,
        threads: p.opt_value_from_str("--threads").map_err(pico)?,
        max_bytes: p.opt_value_from_str("--max-bytes").map_err(pico)?,
        jobs: p.opt_value_from_str("--jobs").map_err(pico)?,
        delete: p.contains("--delete"),
        max_delete: p.opt_value_from_str("--max-delete").map_err(pico)?,
        dry_run: p.contains("--dry-run"),
        signatures: p.contains("--signatures"),
        signature_min: p.opt_value_from_str("--signature-min").map_err(pico)?,
        free: Vec::new(),
    };
    for a in p.finish() {
        let s = a.to_string_lossy();
        if s.starts_with('-') && s.len() > 1 {
            let known = [
                "--token",
                "--conf",
                "--addr",
                "--cache",
                "--threads",
                "--max-bytes",
                "--jobs",
                "-q",
                "--quiet",
                "--json",
                "-v",
                "--verbose",
                "--delete",
                "--max-delete",
                "--dry-run",
                "--signatures",
                "--signature-min",
                "-h",
                "--help",
                "-V",
                "--version",
            ];
            let key = s.split('=').next().unwrap_or(&s);
            return Err(Error::usage(if known.contains(&key) {
                format!("option '{key}' given twice")
            } else {
                format!("unknown option '{s}' (see 'bitfog --help')")
            }));
        }
        r.free.push(a);
    }
    r.free.extend(after);
    Ok(r)
}

fn count(name: &str, value: &str, max: usize) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(Error::usage(format!(
            "{name} takes a whole number from 1 to {max}, not '{value}'"
        ))),
    }
}

/// Parses the command line (without the program name).
pub(crate) fn parse(args: Vec<OsString>) -> Result<Cli> {
    let r = raw(args)?;
    let token = r
        .token
        .clone()
        .or_else(|| std::env::var("BITFOG_TOKEN").ok().filter(|t| !t.is_empty()));
    let cli = |command| {
        Ok(Cli {
            ui: r.ui,
            token: token.clone(),
            command,
        })
    };
    let Some(name) = r.free.first().map(|s| s.to_string_lossy().into_owned()) else {
        if r.version {
            return cli(Command::Version);
        }
        if r.help {
            return cli(Command::Help(USAGE));
        }
        return Err(Error::usage("no command given (see 'bitfog --help')"));
    };
    let Some(help) = command_help(&name) else {
        return Err(Error::usage(format!(
            "unknown command '{name}' (see 'bitfog --help')"
        )));
    };
    if r.help {
        return cli(Command::Help(help));
    }
    if r.version {
        return cli(Command::Version);
    }
    // Options that belong to other commands are errors here.
    let given = [
        ("--conf", r.conf.is_some(), &["serve"][..]),
        ("--addr", r.addr.is_some(), &["serve"]),
        ("--cache", r.cache.is_some(), &["serve"]),
        ("--threads", r.threads.is_some(), &["serve"]),
        ("--max-bytes", r.max_bytes.is_some(), &["fetch", "plan"]),
        ("--jobs", r.jobs.is_some(), &["fetch", "store"]),
        ("--delete", r.delete, &["store"]),
        ("--max-delete", r.max_delete.is_some(), &["store"]),
        ("--dry-run", r.dry_run, &["fetch", "store"]),
        ("--signatures", r.signatures, &["builddb"]),
        ("--signature-min", r.signature_min.is_some(), &["builddb"]),
    ];
    for (opt, present, allowed) in given {
        if present && !allowed.contains(&name.as_str()) {
            return Err(Error::usage(format!(
                "option '{opt}' does not apply to '{name}'"
            )));
        }
    }
    let args = &r.free[1..];
    let want = |n: usize, names: &str| -> Result<Vec<PathBuf>> {
        if args.len() != n {
            let what = if args.len() < n {
                "missing argument"
            } else {
                "too many arguments"
            };
            return Err(Error::usage(format!(
                "{what}: usage: bitfog {name} {names}"
            )));
        }
        Ok(args.iter().map(PathBuf::from).collect())
    };
    let url = |p: &PathBuf| AreaUrl::parse(&p.to_string_lossy());
    let jobs = r
        .jobs
        .as_deref()
        .map_or(Ok(DEFAULT_JOBS), |j| count("--jobs", j, 64))?;
    let command = match name.as_str() {
        "serve" => {
            want(0, "[--conf FILE] [--addr ADDR] [--threads N]")?;
            Command::Serve(ServeOpts {
                conf: r
                    .conf
                    .map_or_else(|| PathBuf::from("bitfog.json"), PathBuf::from),
                addr: r.addr.unwrap_or_else(|| ":8675".to_string()),
                threads: r
                    .threads
                    .as_deref()
                    .map_or(Ok(DEFAULT_THREADS), |t| count("--threads", t, 1024))?,
                cache: match r.cache {
                    Some(c) if c == "none" => None,
                    Some(c) => Some(PathBuf::from(c)),
                    None => crate::server::hashcache::default_dir(),
                },
                quiet: r.ui.quiet,
            })
        }
        "builddb" => {
            let a = want(2, "URL DB [--signatures [--signature-min SIZE]]")?;
            if r.signature_min.is_some() && !r.signatures {
                return Err(Error::usage("--signature-min needs --signatures"));
            }
            let min = match r.signature_min.as_deref() {
                Some(v) => parse_size(v).ok_or_else(|| {
                    Error::usage(format!("--signature-min: bad size '{v}' (e.g. 64M, 1G)"))
                })?,
                None => crate::wire::delta::SIGNATURE_MIN,
            };
            Command::Builddb {
                url: url(&a[0])?,
                db: a[1].clone(),
                signatures: r.signatures.then_some(min),
            }
        }
        "emptydb" => Command::Emptydb {
            db: want(1, "DB")?.remove(0),
        },
        "plan" => {
            let a = want(2, "DESTDB SRCURL [--max-bytes SIZE]")?;
            Command::Plan {
                destdb: a[0].clone(),
                src: url(&a[1])?,
                max_bytes: max_bytes(r.max_bytes.as_deref())?,
            }
        }
        "fetch" => {
            let a = want(3, "DESTDB SRCURL COURIER [--max-bytes SIZE] [--jobs N]")?;
            let max_bytes = max_bytes(r.max_bytes.as_deref())?;
            Command::Fetch(FetchOpts {
                destdb: a[0].clone(),
                src: url(&a[1])?,
                courier: a[2].clone(),
                max_bytes,
                dry_run: r.dry_run,
                jobs,
            })
        }
        "store" => {
            let a = want(3, "SRCDB DESTURL COURIER [--delete] [--jobs N]")?;
            Command::Store(StoreOpts {
                srcdb: a[0].clone(),
                dest: url(&a[1])?,
                courier: a[2].clone(),
                delete: r.delete,
                max_delete: match r.max_delete.as_deref() {
                    None => None,
                    Some(n) => Some(n.parse().map_err(|_| {
                        Error::usage(format!("--max-delete takes a whole number, not '{n}'"))
                    })?),
                },
                dry_run: r.dry_run,
                jobs,
            })
        }
        _ => unreachable!("command_help knows every command"),
    };
    cli(command)
}

fn max_bytes(arg: Option<&str>) -> Result<Option<u64>> {
    arg.map(|s| {
        parse_size(s).ok_or_else(|| {
            Error::usage(format!(
                "--max-bytes: bad size '{s}' (e.g. 200G, 1.5T, 512MiB)"
            ))
        })
    })
    .transpose()
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
        assert_eq!(s.jobs, 2);
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
