//! bitfog: move terabytes between sites on a carried disk, verified end to
//! end with SHA-256.
//!
//! The folders say what the program is (ARCHITECTURE.md has the map and
//! the rules of who may use whom):
//!
//! - `wire`: the formats both ends agree on: names, HTTP headers and
//!   ranges, manifests, sparse extents, signatures and deltas. No I/O but
//!   reading and writing what it is given.
//! - `http`: a small HTTP/1.1 server layer on httparse; knows nothing of
//!   bitfog.
//! - `server`: `bitfog serve`: configuration, routes, endpoints, the walk
//!   of an area, the hash and signature caches.
//! - `client`: the HTTP client of an area.
//! - `courier`: what lives on the courier disk and how to touch it safely.
//! - `plan`: merging manifests and fitting files into a budget. Pure.
//! - `cmd`: the commands (`builddb`, `plan`, `fetch`, `store`), wiring the
//!   client, the courier, the plan and the wire formats.
//!
//! Beneath them: `beneath` (file operations that never follow a symlink),
//! `digest` (streaming SHA-256), `error` and `ui`.

mod age;
mod beneath;
mod cli;
mod client;
mod cmd;
mod courier;
mod digest;
mod error;
mod http;
mod owners;
mod plan;
mod server;
mod sys;
mod ui;
mod wire;

use cli::Command;
use client::Client;
use error::{Exit, Result};

/// Parses `args` (without the program name), runs one command, and
/// returns the exit code (see EXIT STATUS in the man page).
pub fn main(args: Vec<std::ffi::OsString>) -> i32 {
    // With --json, however the run ends, stdout carries one JSON object
    // (help and version stay plain text).
    let json = args.iter().any(|a| a == "--json");
    let mut plain = false;
    let outcome = cli::parse(args).and_then(|cli| {
        plain = matches!(cli.command, cli::Command::Help(_) | cli::Command::Version);
        run(cli)
    });
    let (code, failure) = match outcome {
        Ok(exit) => (exit as i32, None),
        Err(e) => {
            error::print_error(&e);
            (e.exit as i32, Some(e.to_string()))
        }
    };
    if json && !plain {
        ui::finish_json(code, failure);
    }
    code
}

fn run(cli: cli::Cli) -> Result<Exit> {
    let ui = &cli.ui;
    let roots = match &cli.cacert {
        Some(path)
            if matches!(
                cli.command,
                Command::Builddb { .. }
                    | Command::Plan { .. }
                    | Command::Fetch(_)
                    | Command::Store(_)
            ) =>
        {
            Some(client::load_roots(path)?)
        }
        _ => None,
    };
    let ssh = if matches!(
        cli.command,
        Command::Builddb { .. } | Command::Plan { .. } | Command::Fetch(_) | Command::Store(_)
    ) {
        client::SshOptions::new(cli.rsh.clone(), cli.remote.clone(), ui.verbose)?
    } else {
        client::SshOptions::default()
    };
    let client = || {
        Client::new(cli.token.clone(), roots.as_deref(), ssh.clone()).excluding(cli.exclude.clone())
    };
    if matches!(
        cli.command,
        Command::Builddb { .. } | Command::Plan { .. } | Command::Fetch(_) | Command::Store(_)
    ) {
        ui::say_what_is_kept_on_interrupt(ui.json);
    }
    age::set_identities(&cli.identities).map_err(error::Error::usage)?;
    match &cli.command {
        // Plain text even with --json: there is no summary to give.
        Command::Help(text) => {
            ui::print_stdout(text);
            Ok(Exit::Done)
        }
        Command::Version => {
            ui::print_stdout(concat!("bitfog ", env!("CARGO_PKG_VERSION"), "\n"));
            Ok(Exit::Done)
        }
        Command::Serve(opts) => server::serve(opts).map(|()| Exit::Done),
        Command::Builddb {
            url,
            db,
            signatures,
            seal,
        } => cmd::db::builddb(ui, &client(), url, db, *signatures, seal.as_deref()),
        Command::Emptydb { db, seal } => cmd::db::emptydb(ui, db, seal.as_deref()),
        Command::Keygen { out } => cmd::db::keygen(ui, out.as_deref()),
        Command::Plan {
            destdb,
            src,
            max_bytes,
        } => cmd::fetch::plan(ui, &client(), destdb, src, *max_bytes),
        Command::Fetch(opts) => cmd::fetch::fetch(ui, &client(), opts),
        Command::Store(opts) => cmd::store::store(ui, &client(), opts),
        Command::Status { path, verify } => cmd::status::status(ui, path, *verify),
    }
}

/// The properties the fuzz targets check (see `fuzz/`). Not a stable
/// interface.
#[doc(hidden)]
pub mod fuzzing;
