//! What the person at the shell sees: log lines and the live progress line
//! on stderr, the final summary (human or `--json`) on stdout, sizes.

use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

/// Output settings shared by every command.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ui {
    pub(crate) quiet: bool,
    pub(crate) json: bool,
    pub(crate) verbose: bool,
    /// Seconds between progress lines when stderr is not a terminal (0:
    /// none).
    pub(crate) progress_secs: u64,
}

/// The default `--progress-interval`.
pub(crate) const PROGRESS_SECS: u64 = 60;

impl Ui {
    /// A log line (suppressed by `--quiet`).
    pub(crate) fn log(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            crate::error::print_error(msg);
        }
    }

    /// An error line (always shown). With `--json`, the last one is also
    /// the `error` of a failed run's JSON object.
    pub(crate) fn error(&self, msg: impl std::fmt::Display) {
        let msg = msg.to_string();
        if self.json {
            *last_error().lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
        }
        crate::error::print_error(msg);
    }

    /// The final summary: with `--json`, kept for `finish_json` (which
    /// prints one object however the run ends); else the human lines on
    /// stdout. A closed stdout is not an error.
    pub(crate) fn summary(&self, value: &impl Serialize, human: &str) {
        if self.json {
            let v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
            *kept_summary().lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
        } else {
            print_stdout(&escape_lines(human));
        }
    }
}

fn kept_summary() -> &'static std::sync::Mutex<Option<serde_json::Value>> {
    static KEPT: std::sync::Mutex<Option<serde_json::Value>> = std::sync::Mutex::new(None);
    &KEPT
}

fn last_error() -> &'static std::sync::Mutex<Option<String>> {
    static LAST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    &LAST
}

/// Prints the one JSON object of a `--json` run: the summary the command
/// gave (if it got that far) and, when it did not succeed, `exit` (the
/// code) and `error` (`failure`, the message that ended it, else the last
/// error line). A run that succeeds prints its summary as it is.
pub(crate) fn finish_json(code: i32, failure: Option<String>) {
    let summary = kept_summary()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let mut obj = match summary {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if code != 0 {
        let last = last_error()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let error = failure
            .or(last)
            .unwrap_or_else(|| "something failed (see stderr)".to_string());
        obj.insert("error".into(), error.into());
        obj.insert("exit".into(), code.into());
    }
    let mut s = serde_json::Value::Object(obj).to_string();
    s.push('\n');
    print_stdout(&s);
}

/// Text that is safe on a terminal: every control character (C0, DEL and
/// C1, newlines included) becomes `\xNN` or `\u{NNNN}`, so a file name
/// with an escape sequence in it cannot drive the terminal. Names never
/// hold a backslash (see `paths`), so the escapes cannot be confused with
/// a name's own text.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    escape_with(s, false)
}

/// `escape`, keeping line breaks: for text of several lines.
pub(crate) fn escape_lines(s: &str) -> std::borrow::Cow<'_, str> {
    escape_with(s, true)
}

fn escape_with(s: &str, keep_newlines: bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(keep_newlines && c == '\n');
    if !s.contains(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !bad(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Writes to stdout; a closed stdout (a pipe to `head`) is not an error.
pub(crate) fn print_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `1 file` or `N files`.
pub(crate) fn n_files(n: u64) -> String {
    format!("{n} file{}", if n == 1 { "" } else { "s" })
}

/// `3 files (2.9 MiB)`.
pub(crate) fn files_bytes(n: u64, bytes: u64) -> String {
    format!("{} ({})", n_files(n), human_bytes(bytes))
}

/// `1536` → `1.5 KiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} {}", if n == 1 { "byte" } else { "bytes" });
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Parses a size: digits with an optional fraction, then an optional unit:
/// K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024), or KB, MB, GB, TB
/// (powers of 1000, as in rsync and coreutils: a disk sold as 2 TB holds
/// 2×10^12 bytes); `B` alone is bytes. Units are case-insensitive.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return None;
    }
    let unit = unit.to_ascii_uppercase();
    let scale: u128 = match unit.as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u128 = int.parse().ok()?;
    let mut total = int.checked_mul(scale)?;
    if !frac.is_empty() {
        let digits = frac.len().min(18) as u32;
        let f: u128 = frac[..digits as usize].parse().ok()?;
        if scale == 1 && f != 0 {
            return None;
        }
        total = total.checked_add(f * scale / 10u128.pow(digits))?;
    }
    u64::try_from(total).ok()
}

/// Progress on stderr: on a terminal a live line (files, bytes, rate and
/// time left) redrawn five times a second; otherwise a plain line every
/// `Ui::progress_secs` (scripts and ssh sessions see that work goes on).
/// The rate is over the last 10 seconds, so a stall shows as one.
pub(crate) struct Progress {
    pub(crate) files: Arc<AtomicU64>,
    pub(crate) bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    drawer: Option<thread::JoinHandle<()>>,
}

/// What a progress line counts and how far there is to go (0: unknown).
#[derive(Clone, Copy)]
struct Goal {
    verb: &'static str,
    files: u64,
    bytes: u64,
}

/// The rate window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Progress {
    pub(crate) fn start(
        ui: &Ui,
        verb: &'static str,
        total_files: u64,
        total_bytes: u64,
    ) -> Progress {
        let files = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let live = std::io::stderr().is_terminal();
        let every = match live {
            true => Some(Duration::from_millis(200)),
            false if ui.progress_secs > 0 => Some(Duration::from_secs(ui.progress_secs)),
            false => None,
        };
        let goal = Goal {
            verb,
            files: total_files,
            bytes: total_bytes,
        };
        let drawer = every.filter(|_| !ui.quiet).map(|every| {
            let (files, bytes, stop) = (files.clone(), bytes.clone(), stop.clone());
            thread::spawn(move || draw(goal, (&files, &bytes), &stop, live, every))
        });
        Progress {
            files,
            bytes,
            stop,
            drawer,
        }
    }

    /// Stops drawing (the line is cleared on a terminal).
    pub(crate) fn finish(self) {}
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.drawer.take() {
            let _ = d.join();
        }
    }
}

/// The drawing thread: until `stop`, a line every `every`.
fn draw(
    goal: Goal,
    (files, bytes): (&AtomicU64, &AtomicU64),
    stop: &AtomicBool,
    live: bool,
    every: Duration,
) {
    let mut samples: std::collections::VecDeque<(std::time::Instant, u64)> = Default::default();
    let mut last = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(200).min(every));
        let now = std::time::Instant::now();
        let done = bytes.load(Ordering::Relaxed);
        samples.push_back((now, done));
        while samples.len() > 2 && now - samples[0].0 > RATE_WINDOW {
            samples.pop_front();
        }
        if now - last < every {
            continue;
        }
        last = now;
        let (t0, b0) = samples[0];
        let secs = (now - t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (done - b0.min(done)) as f64 / secs
        } else {
            0.0
        };
        let text = progress_line(goal, files.load(Ordering::Relaxed), done, rate);
        if live {
            let _ = std::io::stderr().write_all(format!("\r\x1b[Kbitfog: {text}").as_bytes());
        } else {
            crate::error::print_error(text);
        }
    }
    if live {
        let _ = std::io::stderr().write_all(b"\r\x1b[K");
    }
}

/// `fetching 3/10 files, 1.2 GiB of 4.0 GiB, 85.3 MiB/s, 34 s left`.
fn progress_line(goal: Goal, files: u64, bytes: u64, rate: f64) -> String {
    let mut line = match goal.files {
        0 => format!("{} {}, {}", goal.verb, n_files(files), human_bytes(bytes)),
        n => format!(
            "{} {files}/{n} files, {} of {}",
            goal.verb,
            human_bytes(bytes),
            human_bytes(goal.bytes)
        ),
    };
    line.push_str(&format!(", {}/s", human_bytes(rate as u64)));
    if goal.bytes > bytes && rate >= 1.0 {
        line.push_str(&format!(
            ", {} left",
            duration((goal.bytes - bytes) as f64 / rate)
        ));
    } else if goal.bytes > bytes {
        line.push_str(", stalled");
    }
    line
}

/// `34 s`, `12 min`, `3.5 h`.
fn duration(secs: f64) -> String {
    if secs < 100.0 {
        format!("{secs:.0} s")
    } else if secs < 6000.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

static INTERRUPT_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static INTERRUPT_TTY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The line an interrupted client command leaves: everything it wrote is
/// either complete and verified or a partial file a rerun resumes, as
/// after `kill -9`, so the handler only has to say so and exit.
const INTERRUPTED: &[u8] =
    b"bitfog: interrupted: everything completed and verified so far is kept; rerun to continue\n";

extern "C" fn on_interrupt(sig: libc::c_int) {
    use std::sync::atomic::Ordering;
    let code = 128 + sig;
    // SAFETY: only write(2) and _exit(2), both async-signal-safe, on
    // static buffers.
    unsafe {
        if INTERRUPT_TTY.load(Ordering::Relaxed) {
            // Off the progress line first.
            libc::write(2, b"\r\x1b[K".as_ptr().cast(), 4);
        }
        libc::write(2, INTERRUPTED.as_ptr().cast(), INTERRUPTED.len());
        if INTERRUPT_JSON.load(Ordering::Relaxed) {
            let out: &[u8] = if sig == libc::SIGINT {
                b"{\"error\":\"interrupted\",\"exit\":130}\n"
            } else {
                b"{\"error\":\"interrupted\",\"exit\":143}\n"
            };
            libc::write(1, out.as_ptr().cast(), out.len());
        }
        libc::_exit(code);
    }
}

/// For client commands: SIGINT and SIGTERM print one line saying what is
/// kept (and, with `--json`, the error object) and exit 128 + the signal.
pub(crate) fn say_what_is_kept_on_interrupt(json: bool) {
    use std::io::IsTerminal;
    use std::sync::atomic::Ordering;
    INTERRUPT_JSON.store(json, Ordering::Relaxed);
    INTERRUPT_TTY.store(std::io::stderr().is_terminal(), Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only calls async-signal-safe
        // functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn progress_lines_say_rate_and_time_left() {
        let goal = Goal {
            verb: "fetching",
            files: 10,
            bytes: 4 << 30,
        };
        assert_eq!(
            progress_line(goal, 3, 1 << 30, (100 << 20) as f64),
            "fetching 3/10 files, 1.0 GiB of 4.0 GiB, 100.0 MiB/s, 31 s left"
        );
        assert!(progress_line(goal, 3, 1 << 30, 0.0).ends_with("0 bytes/s, stalled"));
        let open = Goal {
            verb: "listing",
            files: 0,
            bytes: 0,
        };
        assert_eq!(
            progress_line(open, 5, 2048, 1024.0),
            "listing 5 files, 2.0 KiB, 1.0 KiB/s"
        );
        assert_eq!(duration(7200.0), "2.0 h");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("200G"), Some(200 << 30));
        assert_eq!(parse_size("1.5T"), Some(3 << 39));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("512MB"), Some(512_000_000));
        assert_eq!(parse_size("2TB"), Some(2_000_000_000_000));
        assert_eq!(parse_size("1.5KB"), Some(1500));
        assert_eq!(parse_size("1.5kib"), Some(1536));
        assert_eq!(parse_size("30m"), Some(30 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("100B"), Some(100));
        for bad in [
            "",
            "G",
            "1.5",
            "1..5G",
            ".5G",
            "5.G",
            "-1G",
            "1X",
            "1 G",
            "99999999999T",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1), "1 byte");
    }

    proptest! {
        #[test]
        fn sizes_with_units_scale(n in 0u64..100_000, unit in prop::sample::select(vec![("K", 1u32), ("M", 2), ("G", 3), ("T", 4)]), tail in prop::sample::select(vec!["", "B", "iB"])) {
            let want = if tail == "B" {
                n * 1000u64.pow(unit.1)
            } else {
                n << (10 * unit.1)
            };
            prop_assert_eq!(parse_size(&format!("{n}{}{tail}", unit.0)), Some(want));
        }
    }
}
