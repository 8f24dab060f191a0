//! A small HTTP/1.1 server on `httparse`: connections, limits, timeouts,
//! framing. It knows nothing of bitfog.
//!
//! One event thread owns every connection that is not in the middle of a
//! request: it accepts, polls idle keep-alive connections and reads request
//! heads without blocking, so idle or slow-header clients never occupy a
//! worker. Only a connection whose head is complete goes to one of a fixed
//! number of worker threads, which reads the body (blocking, with a
//! per-read timeout), runs the handler and writes the response, then hands
//! the connection back. Every phase is bounded in time and size; any
//! framing error closes the connection. It must never read a body it was
//! not asked to, buffer more than a head in memory, or run a request that
//! the client did not frame itself.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The most headers a request may carry (431 past it).
const MAX_HEADERS: usize = 64;
/// A request body may take this long before its average rate is checked.
const BODY_GRACE: Duration = Duration::from_secs(10);
/// The slowest average body rate accepted after `BODY_GRACE`, in bytes per
/// second: a client trickling a body cannot hold a worker for long.
const MIN_BODY_RATE: u64 = 4096;
/// Socket timeout of one blocking read or write in a worker; between ticks
/// the worker decides whether a stalled client may keep it.
const TICK: Duration = Duration::from_millis(500);

/// When a worker gives up on a client that stopped moving bytes: after
/// `BODY_GRACE` of no progress, after one `TICK` while other requests
/// wait for a worker, or when the average rate falls below
/// `MIN_BODY_RATE`. So N stalled clients cannot starve the others for long,
/// however many workers there are.
struct Patience<'a> {
    waiting: &'a AtomicUsize,
    began: Instant,
    last: Instant,
    moved: u64,
    /// Off for streamed bodies, which are slow when the server is (hashing
    /// a listing), not the client.
    rate_check: bool,
}

impl<'a> Patience<'a> {
    fn new(waiting: &'a AtomicUsize) -> Patience<'a> {
        let now = Instant::now();
        Patience {
            waiting,
            began: now,
            last: now,
            moved: 0,
            rate_check: true,
        }
    }

    fn progress(&mut self, n: usize) -> io::Result<()> {
        self.last = Instant::now();
        self.moved += n as u64;
        let elapsed = self.began.elapsed();
        if self.rate_check && elapsed > BODY_GRACE && self.moved < MIN_BODY_RATE * elapsed.as_secs()
        {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client too slow"));
        }
        Ok(())
    }

    /// After a socket timeout: may we keep waiting?
    fn stalled(&self) -> io::Result<()> {
        let idle = self.last.elapsed();
        if idle >= BODY_GRACE || (idle >= TICK && self.waiting.load(Ordering::SeqCst) > 0) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client stalled"));
        }
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes to the client, waiting through socket timeouts while `Patience`
/// allows.
struct PatientWriter<'a, 'b> {
    stream: &'a mut TcpStream,
    patience: Patience<'b>,
}

impl Write for PatientWriter<'_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream.write(data) {
                Ok(n) => {
                    self.patience.progress(n)?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => self.patience.stalled()?,
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Bounds on every phase of a connection.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Worker threads running handlers.
    pub(crate) threads: usize,
    /// Open connections at most; more are answered 503 and closed.
    pub(crate) max_conns: usize,
    /// Bytes of request line plus headers (431 past it).
    pub(crate) max_head: usize,
    /// Time to receive a whole request head once it has begun.
    pub(crate) head_timeout: Duration,
    /// Time a keep-alive connection may sit idle between requests.
    pub(crate) idle_timeout: Duration,
    /// Log one line per request on stderr.
    pub(crate) log: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            threads: 16,
            max_conns: 1024,
            max_head: 16 * 1024,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            log: true,
        }
    }
}

/// A request as a handler sees it.
pub(crate) struct Request<'a> {
    pub(crate) method: String,
    /// The raw request target, e.g. `/area/a%20b`.
    pub(crate) target: String,
    headers: Vec<(String, String)>,
    /// The body, exactly `Content-Length` bytes.
    pub(crate) body: BodyReader<'a>,
    /// The client's address, without its port.
    pub(crate) peer_ip: String,
}

impl Request<'_> {
    /// The first value of a header (name in lowercase).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn content_length(&self) -> u64 {
        self.body.len
    }
}

/// Writes a streamed body.
pub(crate) type Producer = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// What a response carries after its head.
pub(crate) enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// `len` bytes of a file from `start`, sent with `std::io::copy`
    /// straight to the socket (sendfile on Linux).
    File {
        file: std::fs::File,
        start: u64,
        len: u64,
    },
    /// Produced on the fly; sent chunked (close-delimited to HTTP/1.0).
    Stream(Producer),
}

/// A response: status, headers, body.
pub(crate) struct Response {
    pub(crate) status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
}

impl Response {
    pub(crate) fn new(status: u16, body: Body) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// A one-line `text/plain` reason.
    pub(crate) fn text(status: u16, msg: impl std::fmt::Display) -> Response {
        let mut body = msg.to_string();
        body.retain(|c| c != '\n' && c != '\r');
        body.push('\n');
        Response::new(status, Body::Bytes(body.into_bytes()))
            .with("Content-Type", "text/plain; charset=utf-8")
    }

    /// The text of a `text` answer (empty for any other body).
    pub(crate) fn text_body(&self) -> String {
        match &self.body {
            Body::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        }
    }

    pub(crate) fn with(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// The request body: reads at most `Content-Length` bytes, first from what
/// the head read already buffered, then from the socket. A body that ends
/// early is an error (`UnexpectedEof`), never a clean end.
pub(crate) struct BodyReader<'a> {
    conn: &'a mut Conn,
    len: u64,
    remaining: u64,
    expect_continue: bool,
    broken: bool,
    patience: Patience<'a>,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || out.is_empty() {
            return Ok(0);
        }
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "request body already failed",
            ));
        }
        if self.expect_continue {
            self.expect_continue = false;
            if let Err(e) = self.conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n") {
                self.broken = true;
                return Err(e);
            }
        }
        let want = (out.len() as u64).min(self.remaining) as usize;
        let n = if self.conn.pos < self.conn.buf.len() {
            let avail = &self.conn.buf[self.conn.pos..];
            let n = want.min(avail.len());
            out[..n].copy_from_slice(&avail[..n]);
            self.conn.pos += n;
            n
        } else {
            let got = loop {
                match self.conn.stream.read(&mut out[..want]) {
                    Err(e) if is_timeout(&e) => {
                        if let Err(e) = self.patience.stalled() {
                            self.broken = true;
                            return Err(e);
                        }
                    }
                    other => break other,
                }
            };
            match got {
                Ok(0) => {
                    self.broken = true;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "request body cut short",
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            }
        };
        self.remaining -= n as u64;
        if let Err(e) = self.patience.progress(n) {
            self.broken = true;
            return Err(e);
        }
        Ok(n)
    }
}

/// A connection slot: counts open connections, released on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection with the bytes read but not yet consumed.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    peer: String,
    _slot: Slot,
}

impl Conn {
    fn compact(&mut self) {
        self.buf.drain(..self.pos);
        self.pos = 0;
    }
}

/// Where the event thread stands with a connection's head.
pub(crate) enum Head {
    Complete,
    Partial,
    TooLarge,
    Bad,
}

pub(crate) fn head_state(buf: &[u8], max_head: usize) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => Head::Complete,
        Ok(httparse::Status::Complete(_)) => Head::TooLarge,
        Ok(httparse::Status::Partial) if buf.len() > max_head => Head::TooLarge,
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(httparse::Error::TooManyHeaders) => Head::TooLarge,
        Err(_) => Head::Bad,
    }
}

/// Set by the SIGINT/SIGTERM handler; the event thread stops on it.
static STOP: AtomicBool = AtomicBool::new(false);
/// Write end of the event thread's wake pipe, for the signal handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is valid.
        unsafe { libc::write(fd, b"s".as_ptr().cast(), 1) };
    }
}

/// Catches SIGINT and SIGTERM from now on; `run` then stops cleanly, even
/// when the signal came before it started. Call before announcing the
/// server, so no signal after the startup line can kill it uncleanly.
pub(crate) fn install_signal_handlers() {
    // SAFETY: the handler only touches atomics and calls write(2).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

/// A non-blocking pipe that wakes the event thread.
struct Waker {
    r: RawFd,
    w: RawFd,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            r: fds[0],
            w: fds[1],
        })
    }

    fn wake(&self) {
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(self.w, b"w".as_ptr().cast(), 1) };
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a valid buffer from our own non-blocking pipe.
        while unsafe { libc::read(self.r, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        WAKE_FD.store(-1, Ordering::SeqCst);
        // SAFETY: closing fds this struct owns.
        unsafe {
            libc::close(self.r);
            libc::close(self.w);
        }
    }
}

/// A connection the event thread watches.
struct Pending {
    conn: Conn,
    deadline: Instant,
    /// True while no byte of the next head has arrived.
    idle: bool,
}

/// What the workers share.
struct Shared<H> {
    handler: H,
    limits: Limits,
    stopping: AtomicBool,
    /// Requests with a complete head that wait for a worker.
    waiting: AtomicUsize,
}

/// Where connections come from.
pub(crate) enum Source {
    /// Accepted from a listening socket, until SIGINT or SIGTERM.
    Listen(TcpListener),
    /// One connection made elsewhere (`serve --stdio`: a socket pair whose
    /// other end carries stdin and stdout); serving ends when it closes.
    /// It is a `TcpStream` only by type: every call made on a connection
    /// (read, write, `O_NONBLOCK`, `SO_RCVTIMEO`, `SO_SNDTIMEO`,
    /// `shutdown`, `sendfile`) is a socket call a Unix stream socket
    /// answers the same way, and none is TCP's own.
    One(TcpStream),
}

/// Serves `source` until SIGINT or SIGTERM (or, for one connection, until
/// it closes). In-flight requests get `grace` to finish; then it returns.
pub(crate) fn run<H>(source: Source, limits: Limits, handler: H, grace: Duration) -> io::Result<()>
where
    H: Fn(&mut Request) -> Response + Send + Sync + 'static,
{
    let waker = Arc::new(Waker::new()?);
    WAKE_FD.store(waker.w, Ordering::SeqCst);
    let (listener, one) = match source {
        Source::Listen(l) => (Some(l), None),
        Source::One(s) => (None, Some(s)),
    };
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
    }
    let shared = Arc::new(Shared {
        handler,
        limits: limits.clone(),
        stopping: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
    });
    let (job_tx, job_rx) = mpsc::channel::<Conn>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (back_tx, back_rx) = mpsc::channel::<Conn>();
    let mut workers = Vec::new();
    for i in 0..limits.threads.max(1) {
        let (rx, tx, shared, waker) = (
            job_rx.clone(),
            back_tx.clone(),
            shared.clone(),
            waker.clone(),
        );
        workers.push(
            thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || worker(rx, tx, &shared, &waker))?,
        );
    }
    drop(back_tx);
    let mut ev = EventLoop {
        listener,
        limits,
        waker,
        shared: Arc::clone(&shared),
        job_tx,
        back_rx,
        open: Arc::new(AtomicUsize::new(0)),
        pending: Vec::new(),
        accept_pause: None,
        read_buf: vec![0u8; 8192],
    };
    if let Some(stream) = one {
        stream.set_nonblocking(true)?;
        ev.open.fetch_add(1, Ordering::SeqCst);
        ev.pending.push(Pending {
            conn: Conn {
                stream,
                buf: Vec::new(),
                pos: 0,
                peer: "stdio".to_string(),
                _slot: Slot(ev.open.clone()),
            },
            deadline: Instant::now() + ev.limits.idle_timeout,
            idle: true,
        });
    }
    // With one connection, serving ends when it is closed.
    let done = |ev: &EventLoop<H>| ev.listener.is_none() && ev.open.load(Ordering::SeqCst) == 0;
    while !STOP.load(Ordering::SeqCst) && !done(&ev) {
        let Some(ready) = ev.poll()? else { continue };
        ev.read_heads(&ready.conns);
        if ready.woken {
            ev.take_back();
        }
        if ready.listener {
            ev.accept();
        }
        ev.expire();
    }
    // Stop: no new connections or requests; in-flight ones get `grace`.
    let EventLoop {
        listener,
        pending,
        job_tx,
        back_rx,
        ..
    } = ev;
    drop(listener);
    drop(pending);
    shared.stopping.store(true, Ordering::SeqCst);
    drop(job_tx);
    let until = Instant::now() + grace;
    while Instant::now() < until && workers.iter().any(|w| !w.is_finished()) {
        while back_rx.try_recv().is_ok() {}
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The event thread: it accepts connections, reads request heads
/// without blocking, holds idle keep-alive connections, and hands each
/// complete head to a worker; workers hand kept-alive connections back.
struct EventLoop<H> {
    listener: Option<TcpListener>,
    limits: Limits,
    waker: Arc<Waker>,
    /// What the workers share (the count of heads waiting for one).
    shared: Arc<Shared<H>>,
    job_tx: mpsc::Sender<Conn>,
    back_rx: mpsc::Receiver<Conn>,
    /// Open connections, for the cap.
    open: Arc<AtomicUsize>,
    /// Connections whose head is not complete yet, or idle.
    pending: Vec<Pending>,
    /// Accepting is paused until then (after an accept failure).
    accept_pause: Option<Instant>,
    read_buf: Vec<u8>,
}

/// What one `poll` found ready.
struct Ready {
    woken: bool,
    listener: bool,
    /// `revents` of each pending connection, by index.
    conns: Vec<libc::c_short>,
}

impl<H> EventLoop<H> {
    /// Waits for a connection, the listener, the waker or the nearest
    /// deadline. `None` when interrupted by a signal.
    fn poll(&mut self) -> io::Result<Option<Ready>> {
        let now = Instant::now();
        if self.accept_pause.is_some_and(|t| now >= t) {
            self.accept_pause = None;
        }
        let accepting = self.accept_pause.is_none() && self.listener.is_some();
        let mut fds = Vec::with_capacity(self.pending.len() + 2);
        fds.push(libc::pollfd {
            fd: self.waker.r,
            events: libc::POLLIN,
            revents: 0,
        });
        fds.push(libc::pollfd {
            fd: match &self.listener {
                Some(l) if accepting => l.as_raw_fd(),
                _ => -1,
            },
            events: libc::POLLIN,
            revents: 0,
        });
        for p in &self.pending {
            fds.push(libc::pollfd {
                fd: p.conn.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut wait = self
            .pending
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now))
            .min();
        if let Some(t) = self.accept_pause {
            wait = Some(wait.map_or(t - now, |w| w.min(t - now)));
        }
        let timeout_ms = wait.map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
        // SAFETY: fds is a valid, correctly sized array of pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(Ready {
            woken: fds[0].revents != 0,
            listener: accepting && fds[1].revents != 0,
            conns: fds[2..].iter().map(|f| f.revents).collect(),
        }))
    }

    /// Hands a complete head to a worker.
    fn dispatch(&self, conn: Conn) {
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let _ = self.job_tx.send(conn);
    }

    /// Reads what arrived on pending connections (from the last, so the
    /// indexes of `ready` stay valid as they are removed); a complete head
    /// goes to a worker, a bad or oversized one is answered and closed.
    fn read_heads(&mut self, ready: &[libc::c_short]) {
        let mut i = self.pending.len().min(ready.len());
        while i > 0 {
            i -= 1;
            if ready[i] == 0 {
                continue;
            }
            let p = &mut self.pending[i];
            let n = match p.conn.stream.read(&mut self.read_buf) {
                Ok(n) => n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    continue;
                }
                Err(_) => 0,
            };
            if n == 0 {
                self.pending.swap_remove(i);
                continue;
            }
            p.conn.buf.extend_from_slice(&self.read_buf[..n]);
            if p.idle {
                p.idle = false;
                p.deadline = Instant::now() + self.limits.head_timeout;
            }
            match head_state(&p.conn.buf, self.limits.max_head) {
                Head::Partial => {}
                Head::Complete => {
                    let p = self.pending.swap_remove(i);
                    self.dispatch(p.conn);
                }
                Head::TooLarge => reject(
                    self.pending.swap_remove(i).conn,
                    431,
                    "request header fields too large",
                ),
                Head::Bad => reject(
                    self.pending.swap_remove(i).conn,
                    400,
                    "malformed request head",
                ),
            }
        }
    }

    /// Takes back the connections workers kept alive: one with a complete
    /// next head goes straight back to a worker, the rest wait here.
    fn take_back(&mut self) {
        self.waker.drain();
        while let Ok(mut conn) = self.back_rx.try_recv() {
            conn.compact();
            match head_state(&conn.buf, self.limits.max_head) {
                Head::Complete => self.dispatch(conn),
                _ => {
                    let idle = conn.buf.is_empty();
                    let wait = if idle {
                        self.limits.idle_timeout
                    } else {
                        self.limits.head_timeout
                    };
                    self.pending.push(Pending {
                        conn,
                        deadline: Instant::now() + wait,
                        idle,
                    });
                }
            }
        }
    }

    /// Accepts every waiting connection, up to the cap (503 past it); an
    /// accept failure (out of descriptors) pauses accepting instead of
    /// spinning.
    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, addr)) => {
                    if self.open.load(Ordering::SeqCst) >= self.limits.max_conns {
                        let _ = stream.set_nonblocking(true);
                        let _ = (&stream).write(
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
                              Content-Length: 26\r\nConnection: close\r\n\r\ntoo many open connections\n",
                        );
                        continue;
                    }
                    self.open.fetch_add(1, Ordering::SeqCst);
                    let slot = Slot(self.open.clone());
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let conn = Conn {
                        stream,
                        buf: Vec::new(),
                        pos: 0,
                        peer: addr.to_string(),
                        _slot: slot,
                    };
                    self.pending.push(Pending {
                        conn,
                        deadline: Instant::now() + self.limits.head_timeout,
                        idle: true,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if self.limits.log {
                        crate::error::print_error(format!(
                            "accept: {}",
                            crate::error::describe_io(&e)
                        ));
                    }
                    self.accept_pause = Some(Instant::now() + Duration::from_millis(100));
                    break;
                }
            }
        }
    }

    /// Drops connections past their deadline: an idle one quietly, one
    /// whose head is incomplete with 408.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut i = self.pending.len();
        while i > 0 {
            i -= 1;
            if self.pending[i].deadline <= now {
                let p = self.pending.swap_remove(i);
                if !p.idle {
                    reject(p.conn, 408, "request head timed out");
                }
            }
        }
    }
}

/// Best-effort short answer from the event thread, then close.
fn reject(conn: Conn, status: u16, msg: &str) {
    let text = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}\n",
        reason(status),
        msg.len() + 1
    );
    let _ = (&conn.stream).write(text.as_bytes());
}

fn worker<H>(
    jobs: Arc<Mutex<Receiver<Conn>>>,
    back: Sender<Conn>,
    shared: &Shared<H>,
    waker: &Waker,
) where
    H: Fn(&mut Request) -> Response,
{
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(conn) = job else { return };
        shared.waiting.fetch_sub(1, Ordering::SeqCst);
        if let Some(conn) = serve_one(conn, shared) {
            if back.send(conn).is_err() {
                return;
            }
        }
        // Also for a closed connection: the last one ends `Source::One`.
        waker.wake();
    }
}

/// The parsed head, owned.
pub(crate) struct ParsedHead {
    method: String,
    target: String,
    minor: u8,
    headers: Vec<(String, String)>,
    /// Bytes of the head, up to the first body byte.
    pub(crate) len: usize,
}

pub(crate) fn parse_head(buf: &[u8]) -> Option<ParsedHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(buf).ok()? else {
        return None;
    };
    Some(ParsedHead {
        method: req.method?.to_string(),
        target: req.path?.to_string(),
        minor: req.version?,
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect(),
        len,
    })
}

fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Serves one request; returns the connection when it may be kept alive.
fn serve_one<H>(mut conn: Conn, shared: &Shared<H>) -> Option<Conn>
where
    H: Fn(&mut Request) -> Response,
{
    let limits = &shared.limits;
    let head = parse_head(&conn.buf[conn.pos..])?;
    conn.pos += head.len;
    conn.stream.set_nonblocking(false).ok()?;
    // Body reads and response writes wake every TICK so that `Patience`
    // can drop a stalled client (see there).
    let timeout = TICK;
    conn.stream.set_read_timeout(Some(timeout)).ok()?;
    conn.stream.set_write_timeout(Some(timeout)).ok()?;

    let values = |name: &'static str| header_values(&head.headers, name);
    let has_token = |name: &'static str, token: &str| {
        values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let refuse = |conn: &mut Conn, status, msg| {
        let resp = Response::text(status, msg);
        let _ = write_response(&mut conn.stream, &shared.waiting, resp, false, false, 1);
        log_line(limits, &conn.peer, &head.method, &head.target, status, 0);
        linger_close(&mut conn.stream);
        None
    };
    if values("transfer-encoding").next().is_some() {
        return refuse(
            &mut conn,
            411,
            "request bodies need Content-Length; chunked is not accepted",
        );
    }
    let lengths: Vec<&str> = values("content-length").collect();
    let len = match lengths.as_slice() {
        [] => 0,
        [one] => match parse_digits(one) {
            Some(n) => n,
            None => return refuse(&mut conn, 400, "bad Content-Length"),
        },
        _ => return refuse(&mut conn, 400, "more than one Content-Length"),
    };
    let expect = match values("expect").next() {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
        Some(_) => return refuse(&mut conn, 417, "unsupported Expect"),
    };
    let mut keep_alive = head.minor == 1 && !has_token("connection", "close");

    let (status, sent, body_ok) = {
        let peer_ip = conn
            .peer
            .rsplit_once(':')
            .map_or(conn.peer.as_str(), |(ip, _)| ip)
            .to_string();
        let mut req = Request {
            peer_ip,
            method: head.method.clone(),
            target: head.target.clone(),
            headers: head.headers,
            body: BodyReader {
                conn: &mut conn,
                len,
                remaining: len,
                expect_continue: expect,
                patience: Patience::new(&shared.waiting),
                broken: false,
            },
        };
        let resp = catch_unwind(AssertUnwindSafe(|| (shared.handler)(&mut req)))
            .unwrap_or_else(|_| Response::text(500, "internal error"));
        // Leave the body fully read, or give up on the connection.
        let body = req.body;
        let mut body_ok = !body.broken;
        if body_ok && body.remaining > 0 {
            // Skip an unread body only when it has already arrived; never
            // wait for one: a client could make a worker wait for nothing.
            let buffered = (body.conn.buf.len() - body.conn.pos) as u64;
            if !body.expect_continue && body.remaining <= buffered {
                body.conn.pos += body.remaining as usize;
            } else {
                body_ok = false;
            }
        }
        if !body_ok || shared.stopping.load(Ordering::SeqCst) {
            keep_alive = false;
        }
        let status = resp.status;
        let head_only = head.method == "HEAD";
        match write_response(
            &mut conn.stream,
            &shared.waiting,
            resp,
            head_only,
            keep_alive,
            head.minor,
        ) {
            (sent, Ok(framed)) => (status, sent, body_ok && framed),
            (sent, Err(_)) => (status, sent, false),
        }
    };
    log_line(limits, &conn.peer, &head.method, &head.target, status, sent);
    if !(keep_alive && body_ok) {
        linger_close(&mut conn.stream);
        return None;
    }
    conn.compact();
    conn.stream.set_nonblocking(true).ok()?;
    Some(conn)
}

/// Closes without resetting: a client still sending a body we did not read
/// would otherwise get a TCP reset and might lose our answer. Bounded to
/// half a second and 256 KiB.
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_millis(500);
    let mut buf = [0u8; 16 * 1024];
    let mut left = 256 * 1024;
    while left > 0 {
        let now = Instant::now();
        if now >= until || stream.set_read_timeout(Some(until - now)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n.min(left),
        }
    }
}

fn log_line(limits: &Limits, peer: &str, method: &str, target: &str, status: u16, sent: u64) {
    if limits.log {
        let target: String = target.chars().take(300).collect();
        crate::error::print_error(format!(
            "{peer} \"{method} {}\" {status} {sent}",
            target.escape_debug()
        ));
    }
}

/// Writes a response. Returns the body bytes sent and whether the framing
/// allows the connection to be reused.
fn write_response(
    stream: &mut TcpStream,
    waiting: &AtomicUsize,
    resp: Response,
    head_only: bool,
    keep_alive: bool,
    minor: u8,
) -> (u64, io::Result<bool>) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: bitfog\r\n",
        resp.status,
        reason(resp.status)
    );
    for (name, value) in &resp.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    let no_body_status = resp.status == 204 || resp.status == 304 || resp.status < 200;
    let mut reusable = keep_alive;
    let chunked = matches!(resp.body, Body::Stream(_)) && minor == 1;
    match &resp.body {
        _ if no_body_status => {}
        Body::Empty => head.push_str("Content-Length: 0\r\n"),
        Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::File { len, .. } => head.push_str(&format!("Content-Length: {len}\r\n")),
        Body::Stream(_) if chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        Body::Stream(_) => reusable = false,
    }
    head.push_str(if reusable {
        "\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = PatientWriter {
        stream,
        patience: Patience::new(waiting),
    };
    if let Err(e) = out.write_all(head.as_bytes()) {
        return (0, Err(e));
    }
    if head_only || no_body_status {
        return (0, Ok(reusable));
    }
    let framed = write_body(&mut out, resp.body, chunked).and_then(|framed| {
        out.flush()?;
        Ok(framed && reusable)
    });
    // What went out after the head, even when the client vanished midway.
    (out.patience.moved - head.len() as u64, framed)
}

/// Writes a response body; false when its framing could not be kept.
fn write_body(out: &mut PatientWriter, body: Body, chunked: bool) -> io::Result<bool> {
    match body {
        Body::Empty => {}
        Body::Bytes(b) => out.write_all(&b)?,
        Body::File { file, start, len } => {
            if send_file(out, file, start, len)? != len {
                // The file shrank under us: the framing is broken.
                return Ok(false);
            }
        }
        Body::Stream(produce) => {
            out.patience.rate_check = false;
            {
                let mut framer = Chunked {
                    inner: out,
                    chunked,
                };
                let mut w = io::BufWriter::with_capacity(64 * 1024, &mut framer);
                produce(&mut w)?;
                w.flush()?;
            }
            if chunked {
                out.write_all(b"0\r\n\r\n")?;
            }
        }
    }
    Ok(true)
}

/// Sends `len` bytes of `file` from `start` with sendfile(2), which moves
/// them inside the kernel. Measured on Rust 1.95: `io::copy` from a `File`
/// to a `TcpStream` does 8 KiB read/sendto pairs instead, so it is only the
/// fallback where sendfile is refused. Returns fewer than `len` bytes only
/// when the file shrank.
fn send_file(
    out: &mut PatientWriter,
    file: std::fs::File,
    start: u64,
    len: u64,
) -> io::Result<u64> {
    let mut offset = start as crate::sys::off_t;
    let mut sent = 0u64;
    while sent < len {
        let chunk = (len - sent).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call and
        // `offset` is a valid, exclusively borrowed off_t.
        let n = unsafe {
            crate::sys::sendfile(out.stream.as_raw_fd(), file.as_raw_fd(), &mut offset, chunk)
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL | libc::ENOSYS) if sent == 0 => {
                    use std::io::Seek;
                    let mut file = file;
                    file.seek(io::SeekFrom::Start(start))?;
                    return io::copy(&mut file.take(len), out);
                }
                Some(libc::EAGAIN) => {
                    out.patience.stalled()?;
                    continue;
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            break;
        }
        sent += n as u64;
        out.patience.progress(n as usize)?;
    }
    Ok(sent)
}

/// Frames each write as one chunk (when `chunked`).
struct Chunked<'a, 'b, 'c> {
    inner: &'a mut PatientWriter<'b, 'c>,
    chunked: bool,
}

impl Write for Chunked<'_, '_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.chunked {
            self.inner
                .write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
            self.inner.write_all(data)?;
            self.inner.write_all(b"\r\n")?;
        } else {
            self.inner.write_all(data)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// A decimal number of digits only (no sign, no spaces), as HTTP wants a
/// Content-Length.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn head_states() {
        assert!(matches!(
            head_state(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1024),
            Head::Complete
        ));
        assert!(matches!(
            head_state(b"GET / HTTP/1.1\nHost: x\n\n", 1024),
            Head::Complete
        ));
        assert!(matches!(
            head_state(b"GET / HTTP/1.1\r\nHost: x\r\n", 1024),
            Head::Partial
        ));
        assert!(matches!(
            head_state(b"GET / HTTP/1.1\r\nHost: x\r\n", 10),
            Head::TooLarge
        ));
        assert!(matches!(
            head_state(b"\x00\x01 garbage\r\n\r\n", 1024),
            Head::Bad
        ));
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            head_state(req.as_bytes(), 1 << 20),
            Head::TooLarge
        ));
    }

    #[test]
    fn parsed_head_keeps_pipelined_bytes_out() {
        let buf = b"PUT /a/b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        let h = parse_head(buf).unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(&buf[h.len..h.len + 3], b"abc");
        assert_eq!(
            h.headers[0],
            ("content-length".to_string(), "3".to_string())
        );
    }

    proptest! {
        #[test]
        fn head_parsing_never_panics(data in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = head_state(&data, 512);
            let _ = parse_head(&data);
        }
    }
}
