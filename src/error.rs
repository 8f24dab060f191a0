//! The one error type, the exit codes, and the `bitfog:` printer.
//!
//! Every failure that reaches `main` carries the exit code it maps to and a
//! one-line message a shell user can grep. Nothing here ever panics.

use std::fmt;
use std::io;

/// Exit codes, named once (see EXIT STATUS in the man page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The command did its whole job.
    Done = 0,
    /// Something failed; what could be done was done and kept.
    Failed = 1,
    /// Bad usage or unusable input (option, config, DB).
    Usage = 2,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) exit: Exit,
    msg: String,
    /// The server could not be reached or stopped answering (refused,
    /// reset, timed out): what follows would fail the same way.
    pub(crate) unreachable: bool,
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Bad usage or unusable input: exit 2.
    pub(crate) fn usage(msg: impl Into<String>) -> Error {
        Error {
            exit: Exit::Usage,
            msg: msg.into(),
            unreachable: false,
        }
    }

    /// A failure of the job itself: exit 1.
    pub(crate) fn failed(msg: impl Into<String>) -> Error {
        Error {
            exit: Exit::Failed,
            msg: msg.into(),
            unreachable: false,
        }
    }

    /// The server could not be reached or stopped answering: exit 1.
    pub(crate) fn unreachable(msg: impl Into<String>) -> Error {
        Error {
            unreachable: true,
            ..Error::failed(msg)
        }
    }

    /// An I/O failure on `what` (usually a quoted path): exit 1.
    pub(crate) fn io(what: impl fmt::Display, err: &io::Error) -> Error {
        Error::failed(format!("{what}: {}", describe_io(err)))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

/// True for the errors of a connection that is gone or never came:
/// refused, reset, aborted, timed out.
pub(crate) fn is_connection_lost(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// A short lowercase description of an I/O error, without Rust's
/// "(os error N)" suffix.
pub(crate) fn describe_io(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// True when the error means the disk (or quota) is full.
pub(crate) fn is_disk_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || err.kind() == io::ErrorKind::StorageFull
}

/// Once set, every line `print_error` writes starts with the time this
/// gives (the server's log, after its startup line).
static STAMP: std::sync::OnceLock<fn() -> String> = std::sync::OnceLock::new();

/// Starts every later line on stderr with `stamp()` (an RFC 3339 time).
pub(crate) fn stamp_lines(stamp: fn() -> String) {
    let _ = STAMP.set(stamp);
}

/// Prints `bitfog: MESSAGE` on stderr in one write, so lines from several
/// threads or processes sharing a log never interleave. Control characters
/// (from names in a listing, a DB or a courier) are escaped.
pub(crate) fn print_error(msg: impl fmt::Display) {
    use std::io::Write;
    let msg = msg.to_string();
    let time = STAMP.get().map(|f| f() + " ").unwrap_or_default();
    let line = format!("{time}bitfog: {}\n", crate::ui::escape(&msg));
    let _ = std::io::stderr().write_all(line.as_bytes());
}
