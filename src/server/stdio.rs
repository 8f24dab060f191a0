//! `serve --stdio`: one HTTP/1.1 connection carried on stdin and stdout,
//! as ssh gives a remote command. The server serves it as any other
//! connection: a socket pair joins the two, one end is the connection,
//! and two threads copy stdin into the other end and the other end out to
//! stdout. End of input shuts the socket for writing, so the server sees
//! the client go exactly as on TCP (an upload cut short is removed); a
//! stdout that breaks shuts it both ways.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long the answer already written may take to reach stdout once the
/// server has closed its end.
const DRAIN: Duration = Duration::from_secs(30);

/// Runs `run` on the connection that stdin and stdout carry.
pub(super) fn serve(run: impl FnOnce(TcpStream) -> io::Result<()>) -> io::Result<()> {
    let stdin = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let stdout = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let (ours, theirs) = UnixStream::pair()?;
    let inbound = ours.try_clone()?;
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || copy_in(stdin, inbound))?;
    let (done_tx, done_rx) = mpsc::channel();
    let outbound = ours.try_clone()?;
    thread::Builder::new()
        .name("stdout".into())
        .spawn(move || {
            copy_out(outbound, stdout);
            let _ = done_tx.send(());
        })?;
    // See `http::Source::One` for why a Unix socket may pose as a TcpStream.
    let result = run(TcpStream::from(OwnedFd::from(theirs)));
    // The server's end is closed (or it was stopped by a signal): let what
    // it wrote reach stdout, within bounds.
    if done_rx.recv_timeout(DRAIN).is_err() {
        let _ = ours.shutdown(Shutdown::Both);
    }
    result
}

fn copy_in(mut stdin: File, mut sock: UnixStream) {
    if let Err(e) = pump(&mut stdin, &mut sock) {
        crate::error::print_error(format!("stdin: {}", crate::error::describe_io(&e)));
    }
    let _ = sock.shutdown(Shutdown::Write);
}

fn copy_out(mut sock: UnixStream, mut stdout: File) {
    if let Err(e) = pump(&mut sock, &mut stdout) {
        crate::error::print_error(format!("stdout: {}", crate::error::describe_io(&e)));
        // Nobody reads the answers any more (or the server's end broke):
        // the server's next write fails and it closes the connection.
        let _ = sock.shutdown(Shutdown::Both);
    }
}

/// Copies `from` to `to` until the end of `from`. (`splice` would save
/// a copy where one end is a pipe, but from a Unix socket it stalled
/// answers here until the connection's idle timeout.)
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
