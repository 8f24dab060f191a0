//! bitfog: move terabytes between sites on a carried disk, verified end to
//! end with SHA-256. `main` parses, runs one command, and maps the outcome
//! to an exit code; nothing else.

mod beneath;
mod cli;
mod client;
mod copies;
mod courier;
mod db;
mod delta;
mod deltas;
mod digest;
mod error;
mod fetch;
mod hashcache;
mod http;
mod manifest;
mod paths;
mod plan;
mod protocol;
mod ranges;
mod scan;
mod server;
mod sparse;
mod store;
mod ui;

use cli::Command;
use client::Client;
use error::{Exit, Result};

fn run(cli: cli::Cli) -> Result<Exit> {
    let ui = &cli.ui;
    let client = || Client::new(cli.token.clone());
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
        } => db::builddb(ui, &client(), url, db, *signatures),
        Command::Emptydb { db } => db::emptydb(ui, db),
        Command::Plan {
            destdb,
            src,
            max_bytes,
        } => fetch::plan(ui, &client(), destdb, src, *max_bytes),
        Command::Fetch(opts) => fetch::fetch(ui, &client(), opts),
        Command::Store(opts) => store::store(ui, &client(), opts),
    }
}

fn main() {
    let outcome = cli::parse(std::env::args_os().skip(1).collect()).and_then(run);
    let code = match outcome {
        Ok(exit) => exit,
        Err(e) => {
            error::print_error(&e);
            e.exit
        }
    };
    std::process::exit(code as i32);
}
