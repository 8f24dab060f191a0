//! `bitfog serve`: the configuration, and one function per endpoint behind
//! a single route `match`.
//!
//! Every request path is decoded once and checked component by component
//! before the disk is touched; no symlink is ever followed (directory
//! components are checked with `symlink_metadata`, files are opened with
//! `O_NOFOLLOW`). Writes go to a temporary file in the target's directory
//! and become visible only by rename, after hashing and fsync. It must
//! never read, create, change or delete anything outside an area.

mod hashcache;
mod html;
mod scan;
mod stdio;

pub(crate) use hashcache::default_dir;

use crate::beneath::{Dir, Kind, Root};
use crate::digest::{CopyError, Hasher, Writeback, copy_hashing, is_sha256_hex};
use crate::error::{Error, Result, describe_io, is_disk_full, print_error};
use crate::http::{self, Body, Request, Response};
use crate::wire::delta;
use crate::wire::manifest::EmptyDir;
use crate::wire::manifest::{End, PartialUpload};
use crate::wire::paths::{components, has_reserved, is_reserved};
use crate::wire::protocol::{self, RangeAsk};
use hashcache::{CacheFile, SigCache};
use scan::Item;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Options of `bitfog serve`.
#[derive(Debug, Clone)]
pub(crate) struct ServeOpts {
    pub(crate) conf: PathBuf,
    pub(crate) addr: String,
    pub(crate) threads: usize,
    /// Where SHA-256 results are cached; `None` turns the cache off.
    pub(crate) cache: Option<PathBuf>,
    /// Why `cache` is `None`, for the log.
    pub(crate) cache_off: &'static str,
    /// Whether `--cache` was given (else `cache` is the default).
    pub(crate) cache_given: bool,
    pub(crate) quiet: bool,
    /// `--stdio`: one connection on stdin and stdout, no listening socket.
    pub(crate) stdio: bool,
}

/// One area of the configuration.
#[derive(Debug, Clone)]
struct Area {
    pub(crate) root: PathBuf,
    pub(crate) writable: bool,
    pub(crate) checksum: bool,
    pub(crate) token: Option<String>,
    /// Writes set the owner and group they ask for (`"owners": true`;
    /// only a server running as root can).
    pub(crate) owners: bool,
    /// Names never listed, served, written or deleted (`"exclude"`).
    pub(crate) exclude: crate::wire::exclude::Excludes,
}

/// The parsed configuration: areas by name, sorted.
type Config = BTreeMap<String, Area>;

/// An empty line is sent on a listing after this long without output.
const LISTING_KEEPALIVE: Duration = Duration::from_secs(10);
/// Partial uploads named in a listing's end record.
const MAX_PARTIALS_LISTED: usize = 200;
/// Bytes of JSON the empty directories and partial uploads named in a
/// listing's end record may take: half of what clients accept
/// (`manifest::MAX_END_LINE`), whatever the names. Empty directories past
/// it are counted in `dirs_omitted` instead.
const END_RECORD_BUDGET: usize = crate::wire::manifest::MAX_END_LINE / 2;
/// Listing lines are handed to the writer in chunks of about this size,
/// and the walk hands its items over this many at a time...
const LISTING_CHUNK: usize = 64 << 10;
const LISTING_ITEMS: usize = 256;
/// ...or after this long, whichever comes first.
const LISTING_CHUNK_WAIT: Duration = Duration::from_millis(200);
/// A PUT that fails mid-body (disk full) reads the rest of bodies up to
/// this size, so the client sees the answer.
const DRAIN_LIMIT: u64 = 16 << 20;
/// In-flight requests get this long to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Reads and checks `bitfog.json`; every error names the file, the area
/// and the key, and exits 2.
fn load_config(path: &Path) -> Result<Config> {
    let file = format!("'{}'", path.display());
    let text = fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("{file}: cannot read config: {}", describe_io(&e))))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::usage(format!("{file}: invalid JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::usage(format!("{file}: expected an object of areas")));
    };
    if map.is_empty() {
        return Err(Error::usage(format!("{file}: no areas defined")));
    }
    let mut config = Config::new();
    for (name, v) in map {
        let at = format!("{file}: area '{name}'");
        if !crate::wire::paths::valid_area_name(&name) {
            return Err(Error::usage(format!(
                "{at}: area names take letters, digits, '.', '_' and '-'"
            )));
        }
        let serde_json::Value::Object(keys) = v else {
            return Err(Error::usage(format!("{at}: expected an object")));
        };
        let mut area = Area {
            root: PathBuf::new(),
            writable: false,
            checksum: true,
            token: None,
            owners: false,
            exclude: Default::default(),
        };
        let mut have_path = false;
        for (key, v) in keys {
            let bad = |what: &str| Error::usage(format!("{at}: key '{key}': {what}"));
            match key.as_str() {
                "path" => {
                    let p = v.as_str().ok_or_else(|| bad("expected a string"))?;
                    let meta =
                        fs::metadata(p).map_err(|e| bad(&format!("'{p}': {}", describe_io(&e))))?;
                    if !meta.is_dir() {
                        return Err(bad(&format!("'{p}' is not a directory")));
                    }
                    area.root = fs::canonicalize(p)
                        .map_err(|e| bad(&format!("'{p}': {}", describe_io(&e))))?;
                    have_path = true;
                }
                "writable" => {
                    area.writable = v.as_bool().ok_or_else(|| bad("expected true or false"))?
                }
                "checksum" => {
                    area.checksum = v.as_bool().ok_or_else(|| bad("expected true or false"))?
                }
                "owners" => {
                    area.owners = v.as_bool().ok_or_else(|| bad("expected true or false"))?
                }
                "exclude" => {
                    let list = v
                        .as_array()
                        .ok_or_else(|| bad("expected an array of patterns"))?;
                    let patterns = list
                        .iter()
                        .map(|p| {
                            p.as_str()
                                .ok_or_else(|| bad("expected an array of patterns"))
                        })
                        .collect::<Result<Vec<&str>>>()?;
                    area.exclude =
                        crate::wire::exclude::Excludes::new(&patterns).map_err(|why| bad(&why))?;
                }
                "token" => {
                    let t = v.as_str().ok_or_else(|| bad("expected a string"))?;
                    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad("a token is one or more visible ASCII characters"));
                    }
                    area.token = Some(t.to_string());
                }
                _ => return Err(Error::usage(format!("{at}: unknown key '{key}'"))),
            }
        }
        if !have_path {
            return Err(Error::usage(format!("{at}: missing key 'path'")));
        }
        config.insert(name, area);
    }
    Ok(config)
}

/// A warning for each two areas where one is the other's directory or
/// lies inside it and one of them is writable: what is written through
/// one changes the other's listing, and `store --delete` into the outer
/// one removes the inner one's files that its SRCDB lacks. (Overlapping
/// read-only areas, and one directory served read-only and also writable
/// with a token, are ordinary setups; hence a warning, not a refusal.)
fn overlaps(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (a, x) in config {
        for (b, y) in config {
            let inside = y.root.starts_with(&x.root) && (a < b || x.root != y.root);
            if a != b && inside && (x.writable || y.writable) {
                let how = if x.root == y.root {
                    "is the same directory as"
                } else {
                    "lies inside"
                };
                out.push(format!(
                    "area '{b}' ('{}') {how} area '{a}' ('{}'), and one of them is writable: what is written through one changes the other",
                    y.root.display(),
                    x.root.display()
                ));
            }
        }
    }
    out
}

/// Parses `:PORT`, `HOST:PORT` or `[V6]:PORT`.
fn parse_addr(addr: &str) -> Result<SocketAddr> {
    let bad = || {
        Error::usage(format!(
            "bad --addr '{addr}': expected :PORT, HOST:PORT or [V6]:PORT"
        ))
    };
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    let (_, port) = full.rsplit_once(':').ok_or_else(bad)?;
    protocol::parse_digits(port)
        .filter(|p| *p <= 65535)
        .ok_or_else(bad)?;
    full.to_socket_addrs()
        .map_err(|e| Error::usage(format!("bad --addr '{addr}': {}", describe_io(&e))))?
        .next()
        .ok_or_else(bad)
}

/// Runs the server until SIGINT/SIGTERM.
pub(crate) fn serve(opts: &ServeOpts) -> Result<()> {
    // First thing: a SIGINT or SIGTERM from here on ends in a clean exit 0
    // (a background job inherits SIGINT ignored; this overrides that too).
    http::install_signal_handlers();
    let config = load_config(&opts.conf)?;
    // A cache directory the user named inside an area is a mistake to say
    // before anything is served; the default one there is only left off.
    let cache_inside = (opts.cache.as_ref()).and_then(|dir| cache_inside_area(dir, &config));
    if let Some(why) = cache_inside.as_ref().filter(|_| opts.cache_given) {
        return Err(Error::usage(format!(
            "{why}; give --cache a directory outside the areas, or --cache none"
        )));
    }
    let source = if opts.stdio {
        // stdout is the protocol: no startup line, and the log (stderr)
        // goes back to the client, which shows it on failure or with -v.
        crate::error::stamp_lines(|| protocol::rfc3339(crate::wire::manifest::now_secs()));
        None
    } else {
        let addr = parse_addr(&opts.addr)?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::failed(format!("cannot listen on {addr}: {}", describe_io(&e))))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("listener", &e))?;
        // One write, so a script reading the log never sees half a line.
        print_error(format!("listening on http://{local}/"));
        // Every later line of the log says when.
        crate::error::stamp_lines(|| protocol::rfc3339(crate::wire::manifest::now_secs()));
        Some(listener)
    };
    if !opts.quiet && !opts.stdio {
        for (name, area) in &config {
            let excludes = match area.exclude.texts() {
                e if e.is_empty() => "no excludes".to_string(),
                e if e.len() <= 8 => format!("excludes {}", e.join(" ")),
                e => format!("excludes {} and {} more", e[..8].join(" "), e.len() - 8),
            };
            print_error(format!(
                "area '{name}': '{}' ({}, {}{}, {excludes})",
                area.root.display(),
                if area.writable {
                    "writable"
                } else {
                    "read-only"
                },
                if area.token.is_some() {
                    "token required"
                } else {
                    "no token"
                },
                if area.owners && area.writable {
                    ", owners"
                } else {
                    ""
                },
            ));
        }
    }
    // SAFETY: geteuid has no preconditions.
    let can_chown = unsafe { libc::geteuid() } == 0;
    for line in overlaps(&config) {
        print_error(line);
    }
    for (name, area) in &config {
        if area.owners && area.writable && !can_chown {
            print_error(format!(
                "area '{name}': \"owners\": true, but only a server running as root may set owners; files get this server's user"
            ));
        }
    }
    if opts.cache.is_none() {
        print_error(format!(
            "the hash cache is off ({}): every listing hashes every file",
            opts.cache_off
        ));
    }

    let mut roots = BTreeMap::new();
    for (name, area) in &config {
        let root = Root::open(&area.root).map_err(|e| {
            Error::failed(format!(
                "area '{name}': '{}': {}",
                area.root.display(),
                describe_io(&e)
            ))
        })?;
        roots.insert(name.clone(), root);
    }
    let ids = config
        .iter()
        .map(|(name, area)| (name.clone(), area_id(&area.root)))
        .collect();
    let folds = config
        .iter()
        .filter(|(name, area)| area.writable && roots.get(*name).is_some_and(folds_case))
        .map(|(name, _)| name.clone())
        .collect();
    let cache = (opts.cache.as_deref()).and_then(|dir| cache_dir(dir, cache_inside));
    // Each area's signature cache, beside its hash cache.
    let sigs = match &cache {
        Some(dir) => config
            .iter()
            .map(|(name, area)| (name.clone(), SigCache::for_area(dir, name, &area.root)))
            .collect(),
        None => BTreeMap::new(),
    };
    let state = Arc::new(State {
        config,
        roots,
        ids,
        folds,
        cache,
        sigs,
        quiet: opts.quiet,
        can_chown,
        names: crate::owners::Names::load(),
    });
    let cleaner = state.clone();
    let stdio = opts.stdio;
    std::thread::spawn(move || {
        loop {
            // Every ssh session starts a `serve --stdio`: they walk the
            // areas for leftovers once a day between them, not each.
            if !stdio || clean_due(&cleaner) {
                clean_areas(&cleaner);
            }
            std::thread::sleep(CLEAN_EVERY);
        }
    });
    let limits = http::Limits {
        threads: opts.threads,
        max_conns: max_connections(),
        log: !opts.quiet,
        ..Default::default()
    };
    let handler_state = state.clone();
    let handler = move |req: &mut http::Request| handle(&handler_state, req);
    let result = match source {
        Some(listener) => http::run(
            http::Source::Listen(listener),
            limits,
            handler,
            SHUTDOWN_GRACE,
        ),
        None => stdio::serve(|conn| {
            let limits = http::Limits {
                // One connection: its requests come one after another.
                threads: 1,
                max_conns: 1,
                ..limits
            };
            http::run(http::Source::One(conn), limits, handler, SHUTDOWN_GRACE)
        }),
    };
    remove_live_temps();
    result.map_err(|e| Error::io("server", &e))
}

/// An area's identity: the same whatever name or address reaches the
/// server, the same after a restart, different for another directory or
/// another machine. Clients compare identities to catch a DB of the wrong
/// area (the destination's DB given as the source's, and the reverse).
/// Made from the machine's id (`/etc/machine-id`, else its host name),
/// the area root's canonical path and its inode; never from a device
/// number, which may change at a reboot.
fn area_id(root: &Path) -> String {
    let machine = [
        "/etc/machine-id",
        "/var/lib/dbus/machine-id",
        "/proc/sys/kernel/hostname",
    ]
    .iter()
    .find_map(|p| {
        fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .unwrap_or_default();
    let canon = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let ino = fs::metadata(root).map_or(0, |m| m.ino());
    let mut h = Hasher::new();
    h.update(b"bitfog area\0");
    h.update(machine.as_bytes());
    h.update(b"\0");
    h.update(canon.as_os_str().as_bytes());
    h.update(format!("\0{ino}").as_bytes());
    let mut id = h.hex();
    id.truncate(32);
    id
}

/// Open connections allowed: raise the descriptor limit as far as we may
/// and keep headroom for files being served.
fn max_connections() -> usize {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 256;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max.min(65536),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = want.rlim_cur;
            }
        }
        (lim.rlim_cur as usize / 2).clamp(16, 8192)
    }
}

struct State {
    config: Config,
    /// Each area's root directory, held open: every request resolves
    /// beneath it.
    roots: BTreeMap<String, Root>,
    /// Each area's identity (`area_id`).
    ids: BTreeMap<String, String>,
    /// The writable areas whose filesystem folds case (`folds_case`).
    folds: BTreeSet<String>,
    /// The hash cache directory, if any.
    cache: Option<PathBuf>,
    /// Each area's signature cache (none without a cache directory).
    sigs: BTreeMap<String, SigCache>,
    quiet: bool,
    /// The server runs as root: it may set owners.
    can_chown: bool,
    /// This system's user and group names, read at startup.
    names: crate::owners::Names,
}

impl State {
    fn log(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            print_error(msg);
        }
    }
}

/// Makes the cache directory; `None` (with a warning) where it cannot be
/// used, or is inside an area (`inside`: why, from `cache_inside_area`).
fn cache_dir(dir: &Path, inside: Option<String>) -> Option<PathBuf> {
    if let Some(why) = inside {
        print_error(format!(
            "{why}; hashing every listing in full (give --cache a directory outside the areas)"
        ));
        return None;
    }
    let made = fs::create_dir_all(dir)
        .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)));
    if let Err(e) = made {
        print_error(format!(
            "hash cache '{}' unusable ({}); hashing every listing in full",
            dir.display(),
            describe_io(&e)
        ));
        return None;
    }
    hashcache::remove_stale_temps(dir);
    Some(dir.to_path_buf())
}

/// Why the cache directory `dir` cannot be used, when it is inside an
/// area: its files would be listed and carried, and a writable area's
/// clients could rewrite the hashes the server lists. Nothing is made to
/// find out: a part of `dir` that does not exist yet is taken as written.
fn cache_inside_area(dir: &Path, config: &Config) -> Option<String> {
    let whole = std::path::absolute(dir).ok()?;
    let mut canon = None;
    for base in whole.ancestors() {
        if let Ok(c) = fs::canonicalize(base) {
            let rest = whole.strip_prefix(base).unwrap_or(Path::new(""));
            canon = Some(c.join(rest));
            break;
        }
    }
    let canon = canon?;
    let (name, area) = config
        .iter()
        .find(|(_, area)| fs::canonicalize(&area.root).is_ok_and(|root| canon.starts_with(root)))?;
    Some(format!(
        "hash cache '{}' is inside area '{name}' ('{}'): its files would be listed and \
         carried, and clients could rewrite them",
        dir.display(),
        area.root.display()
    ))
}

/// 503 while an area's path names another directory than the one the
/// server opened (a volume mounted over it after the server started, the
/// directory replaced or removed): serving the one held would list, or
/// fill, a directory nobody sees at that path.
fn moved_away(state: &State, name: &str, path: &Path, root: &Root) -> Option<Response> {
    let why = match root.still_named() {
        Ok(true) => return None,
        Ok(false) => "is no longer the directory bitfog serve opened (replaced, or a \
                      file system mounted over it)"
            .to_string(),
        Err(e) => format!("cannot be looked at ({})", describe_io(&e)),
    };
    let msg = format!(
        "area '{name}': '{}' {why}; restart bitfog serve",
        path.display()
    );
    state.log(&msg);
    Some(Response::text(503, msg))
}

/// The route: one `match` on method and path.
fn handle(state: &State, req: &mut Request) -> Response {
    let Routed { area, route } = route(&state.config, &req.method, &req.target);
    let Some(name) = area else {
        return match route {
            Route::Answer(resp) => resp,
            _ if html::prefers_html(req.header("accept")) => {
                html_page(html::areas(state.config.keys()))
            }
            _ => index(state),
        };
    };
    let (Some(area), Some(root)) = (state.config.get(&name), state.roots.get(&name)) else {
        return Response::text(404, "no such area");
    };
    if let Some(refused) = authorize(&name, area, req) {
        return refused;
    }
    // After the token: the reason names the area's path.
    if let Some(gone) = moved_away(state, &name, &area.root, root) {
        return gone;
    }
    let wants_page = html::prefers_html(req.header("accept"));
    let id = state.ids.get(&name).cloned().unwrap_or_default();
    match &route {
        Route::Listing { .. } if wants_page => {
            let resp = match root.dir(&[], false) {
                Ok(d) => html_page(html::directory(&name, "", &d, &area.exclude)),
                Err(e) => Response::text(500, format!("cannot open the area: {}", describe_io(&e))),
            };
            return resp.with(protocol::AREA_ID_HEADER, id);
        }
        Route::Page { comps, .. } if wants_page => {
            let c: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
            let rel = String::from_utf8_lossy(&c.join(&b'/')).into_owned();
            let resp = match root.dir(&c, false) {
                Ok(d) if !area.exclude.excludes(&rel, true) => {
                    html_page(html::directory(&name, &rel, &d, &area.exclude))
                }
                _ => Response::text(404, "not found"),
            };
            return resp.with(protocol::AREA_ID_HEADER, id);
        }
        _ => {}
    }
    let owned;
    let comps: Vec<&[u8]> = match &route {
        Route::File(_, path) => {
            owned = path;
            owned.iter().map(Vec::as_slice).collect()
        }
        _ => Vec::new(),
    };
    let sigs = state.sigs.get(&name);
    if let Route::File(op, _) = &route {
        if let Some(resp) = excluded(area, *op, &comps, req) {
            return resp.with(protocol::AREA_ID_HEADER, id);
        }
    }
    let resp = match route {
        // What the area takes, so that a client can tell a read-only
        // area before it sends anything.
        Route::Listing { dirs, meta } => listing(state, &name, area, root, (dirs, meta)).with(
            "Allow",
            if area.writable {
                "GET, HEAD, POST, PUT"
            } else {
                "GET, HEAD, POST"
            },
        ),
        Route::File(FileOp::Get, _) => get_file(root, &comps, req),
        Route::File(FileOp::Extents, _) => extents(root, &comps),
        Route::File(FileOp::Signature, _) => signature(root, &comps, sigs.cloned()),
        Route::File(FileOp::Put, _) => put(
            root,
            &comps,
            req,
            sigs,
            (area.owners && state.can_chown).then_some(&state.names),
        ),
        Route::File(FileOp::Delete, _) => delete(root, &comps),
        Route::Files => files(root, area, req),
        Route::Puts => puts(
            root,
            area,
            req,
            (area.owners && state.can_chown).then_some(&state.names),
        ),
        Route::Answer(resp)
        | Route::Page {
            otherwise: resp, ..
        } => resp,
        Route::Index => index(state),
    };
    let resp = resp.with(protocol::AREA_ID_HEADER, id);
    if state.folds.contains(&name) {
        resp.with(protocol::FOLDS_CASE_HEADER, "1")
    } else {
        resp
    }
}

/// True when the filesystem of `root` takes a name and the same name in
/// another case for one (exFAT, FAT, NTFS for Windows, ext4 casefold):
/// tried with a temporary file, removed at once.
fn folds_case(root: &Root) -> bool {
    let Ok(dir) = root.dir(&[], false) else {
        return false;
    };
    let name = |c: &str| format!("{TEMP_PREFIX}{}-case{c}", session_tag()).into_bytes();
    if dir.create_new(&name("A")).is_err() {
        return false;
    }
    let folds = matches!(dir.stat(&name("a")), Ok(Some(_)));
    let _ = dir.unlink(&name("A"));
    folds
}

/// The answer to a request for a name the area excludes: 404 to read it
/// (it does not exist as far as the area is concerned), 403 to write or
/// delete it or to copy from it.
fn excluded(area: &Area, op: FileOp, comps: &[&[u8]], req: &Request) -> Option<Response> {
    if area.exclude.is_empty() {
        return None;
    }
    let name = |c: &[&[u8]]| String::from_utf8_lossy(&c.join(&b'/')).into_owned();
    let path = name(comps);
    let refused = || Some(Response::text(403, "excluded by the area's configuration"));
    match op {
        FileOp::Get | FileOp::Extents | FileOp::Signature => area
            .exclude
            .excludes(&path, false)
            .then(|| Response::text(404, "not found")),
        FileOp::Delete => {
            if area.exclude.excludes(&path, false) || area.exclude.excludes(&path, true) {
                return refused();
            }
            None
        }
        FileOp::Put => {
            let dir = content_type_is(req, protocol::DIRECTORY_TYPE);
            if area.exclude.excludes(&path, dir) {
                return refused();
            }
            let from = req
                .header(protocol::HDR_FROM)
                .or_else(|| req.header(protocol::HDR_LINK))
                .and_then(protocol::percent_decode)
                .map(|f| String::from_utf8_lossy(&f).into_owned());
            if from.is_some_and(|f| area.exclude.excludes(&f, false)) {
                return refused();
            }
            None
        }
    }
}

/// What a request asks of an area's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileOp {
    Get,
    Extents,
    Signature,
    Put,
    Delete,
}

/// Where a request goes, decided from its method and target and the
/// configuration alone (no I/O): `route`'s answer.
enum Route {
    /// `GET /`.
    Index,
    /// The listing of the area, with the directories asked for, and
    /// (`meta`) owners and nanoseconds.
    Listing { dirs: Dirs, meta: bool },
    /// A file of the area, by its checked components, and what to do.
    File(FileOp, Vec<Vec<u8>>),
    /// `POST /AREA/?files`: many files in one answer.
    Files,
    /// `POST /AREA/?put`: many small files in one request.
    Puts,
    /// A directory of the area (a path ending in `/`): a page for a
    /// browser, else `otherwise` (what such a path always got).
    Page {
        comps: Vec<Vec<u8>>,
        otherwise: Response,
    },
    /// Answered as it is: a bad target or path, a reserved name, a
    /// method the area does not allow.
    Answer(Response),
}

/// A route, and the area whose token (if any) the request must carry
/// before it is followed; `None` for what needs no area.
struct Routed {
    area: Option<String>,
    route: Route,
}

/// Decides where a request goes. The answers come in the contract's
/// order of precedence: a bad target, an unknown area (404), then (in
/// `handle`) a missing token (401), then the rest.
fn route(config: &Config, method: &str, target: &str) -> Routed {
    let none = |route| Routed { area: None, route };
    let path = target.split('?').next().unwrap_or("");
    if !path.starts_with('/') {
        return none(Route::Answer(Response::text(
            400,
            "request target must be an absolute path",
        )));
    }
    if path == "/" {
        return none(match method {
            "GET" | "HEAD" => Route::Index,
            _ => Route::Answer(not_allowed("GET, HEAD")),
        });
    }
    let Some(decoded) = protocol::percent_decode(path) else {
        return none(Route::Answer(Response::text(
            400,
            "bad percent-encoding in path",
        )));
    };
    let rest = &decoded[1..];
    let (area_name, file) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Some(area) = std::str::from_utf8(area_name)
        .ok()
        .filter(|n| config.contains_key(*n))
    else {
        return none(Route::Answer(no_such_area(config)));
    };
    let routed = |route| Routed {
        area: Some(area.to_string()),
        route,
    };
    if file.is_empty() {
        let writable = config[area].writable;
        return routed(match method {
            "GET" | "HEAD" => Route::Listing {
                dirs: wants_dirs(target),
                meta: wants(target, "meta=1"),
            },
            "POST" if target.split_once('?').map(|(_, q)| q) == Some("files") => Route::Files,
            "POST" if writable && target.split_once('?').map(|(_, q)| q) == Some("put") => {
                Route::Puts
            }
            // Only a directory PUT, which sets the root's mode and mtime.
            "PUT" if writable => Route::File(FileOp::Put, Vec::new()),
            _ if writable => Route::Answer(not_allowed("GET, HEAD, PUT")),
            _ => Route::Answer(not_allowed("GET, HEAD")),
        });
    }
    let comps = match components(file) {
        Ok(c) => c,
        Err(why) => {
            let refused = Response::text(400, format!("refused path: {}", why.reason()));
            // A directory's page, for a browser that asks for one.
            let dir = file.strip_suffix(b"/").map(components);
            if let (Some(Ok(c)), "GET" | "HEAD") = (dir, method) {
                if !has_reserved(&c) {
                    // A client given a directory's URL for an area's.
                    let whole = Response::text(
                        400,
                        format!(
                            "refused path: a listing is of a whole area; its URL ends at the area's name (/{area}/)"
                        ),
                    );
                    return routed(Route::Page {
                        comps: c.iter().map(|x| x.to_vec()).collect(),
                        otherwise: whole,
                    });
                }
            }
            return routed(Route::Answer(refused));
        }
    };
    let reserved = has_reserved(&comps);
    let owned = || comps.iter().map(|c| c.to_vec()).collect();
    let query = target.split_once('?').map(|(_, q)| q);
    let writable = config[area].writable;
    let allow = if writable {
        "GET, HEAD, PUT, DELETE"
    } else {
        "GET, HEAD"
    };
    routed(match method {
        "GET" if !reserved && query == Some("extents") => Route::File(FileOp::Extents, owned()),
        "GET" if !reserved && query == Some("signature") => Route::File(FileOp::Signature, owned()),
        "GET" | "HEAD" if reserved => Route::Answer(Response::text(404, "not found")),
        "GET" | "HEAD" => Route::File(FileOp::Get, owned()),
        "PUT" | "DELETE" if !writable => Route::Answer(not_allowed(allow)),
        "PUT" | "DELETE" if reserved => Route::Answer(Response::text(
            400,
            "names starting with .bitfog are reserved",
        )),
        "PUT" => Route::File(FileOp::Put, owned()),
        "DELETE" => Route::File(FileOp::Delete, owned()),
        _ => Route::Answer(not_allowed(allow)),
    })
}

/// 404 for an area name the configuration lacks, naming those it has
/// (the index, `GET /`, names them too): a mistyped URL is told the
/// right one.
fn no_such_area(config: &Config) -> Response {
    let mut names: Vec<&str> = config.keys().map(String::as_str).take(20).collect();
    if config.len() > names.len() {
        names.push("...");
    }
    Response::text(
        404,
        format!("no such area (this server has: {})", names.join(", ")),
    )
}

/// The token check of an area that has one: `None` when the request may
/// go on, else the answer (429 while its address must wait, 401).
fn authorize(name: &str, area: &Area, req: &Request) -> Option<Response> {
    let token = area.token.as_ref()?;
    if let Some(wait) = auth_backoff(&req.peer_ip) {
        return Some(
            Response::text(429, "too many wrong tokens from this address; wait")
                .with("Retry-After", wait.to_string()),
        );
    }
    let header = req.header("authorization").unwrap_or("");
    let given = match bearer(header) {
        Some(t) => t.to_string(),
        None => basic_password(header).unwrap_or_default(),
    };
    let ok = token_matches(&given, token);
    auth_outcome(&req.peer_ip, ok);
    (!ok).then(|| {
        // A browser asks for the token (as the password) when challenged
        // with Basic; everything else is told about the bearer token.
        if html::prefers_html(req.header("accept")) {
            Response::text(401, "this area needs its token (as the password)")
                .with("WWW-Authenticate", format!("Basic realm=\"bitfog {name}\""))
        } else {
            Response::text(401, "this area needs a valid Authorization: Bearer token")
                .with("WWW-Authenticate", "Bearer")
        }
    })
}

/// The password of `Basic BASE64(USER:PASSWORD)` (any user name).
fn basic_password(value: &str) -> Option<String> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64_decode(rest.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

/// Standard base64 (RFC 4648), padding optional; `None` for anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    if s.len() > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// A page for a browser.
fn html_page(body: Vec<u8>) -> Response {
    Response::new(200, Body::Bytes(body)).with("Content-Type", "text/html; charset=utf-8")
}

fn not_allowed(allow: &str) -> Response {
    Response::text(405, "method not allowed").with("Allow", allow)
}

/// The token of `Bearer TOKEN`: the scheme is case-insensitive and may be
/// followed by several spaces (RFC 7235, RFC 6750).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

/// Compares a given token with the area's in time that depends on neither:
/// both are hashed to 32 bytes first, so not even the length shows.
fn token_matches(given: &str, token: &str) -> bool {
    let digest = |t: &str| {
        let mut h = Hasher::new();
        h.update(t.as_bytes());
        h.digest()
    };
    let (a, b) = (digest(given), digest(token));
    a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Wrong tokens an address may send before it must wait.
const AUTH_FREE_FAILURES: u32 = 5;
/// The longest wait, in seconds; it doubles with each failure past the
/// free ones.
const AUTH_MAX_WAIT: u64 = 60;
/// Addresses remembered at once (the oldest are forgotten first).
const AUTH_MAX_CLIENTS: usize = 4096;

/// Per address: wrong tokens in a row, and until when it must wait.
fn auth_failures() -> &'static Mutex<HashMap<String, (u32, Instant)>> {
    static FAILURES: OnceLock<Mutex<HashMap<String, (u32, Instant)>>> = OnceLock::new();
    FAILURES.get_or_init(Default::default)
}

/// Seconds an address must still wait before its token is looked at.
fn auth_backoff(ip: &str) -> Option<u64> {
    let map = auth_failures().lock().ok()?;
    let &(_, until) = map.get(ip)?;
    let left = until.saturating_duration_since(Instant::now());
    (!left.is_zero()).then(|| left.as_secs().max(1))
}

/// Records a token check: a right one clears the address, a wrong one
/// past `AUTH_FREE_FAILURES` makes it wait 1, 2, 4... up to
/// `AUTH_MAX_WAIT` seconds. The worker answers at once either way (429
/// while it waits), so waiting clients hold no thread.
fn auth_outcome(ip: &str, ok: bool) {
    let Ok(mut map) = auth_failures().lock() else {
        return;
    };
    if ok {
        map.remove(ip);
        return;
    }
    if map.len() >= AUTH_MAX_CLIENTS && !map.contains_key(ip) {
        if let Some(oldest) = map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k.clone()) {
            map.remove(&oldest);
        }
    }
    let now = Instant::now();
    let e = map.entry(ip.to_string()).or_insert((0, now));
    e.0 = e.0.saturating_add(1);
    if e.0 > AUTH_FREE_FAILURES {
        let wait = 1u64 << (e.0 - AUTH_FREE_FAILURES - 1).min(6);
        e.1 = now + Duration::from_secs(wait.min(AUTH_MAX_WAIT));
    }
}

fn index(state: &State) -> Response {
    let names: Vec<&String> = state.config.keys().collect();
    let mut body = serde_json::to_vec(&names).unwrap_or_default();
    body.push(b'\n');
    Response::new(200, Body::Bytes(body)).with("Content-Type", "application/json")
}

/// Streams the listing: a walker thread produces lines; this side writes
/// them and sends an empty line whenever the walker is slow (hashing).
/// Which directories a listing's end record names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dirs {
    /// None: the end record is exactly as the SPEC shows it, so scripts
    /// that compare it see no new field.
    No,
    /// `?dirs=1`: the empty ones (the others are implied by their entries).
    Empty,
    /// `?dirs=1&alldirs=1`: every directory, the root first as "", so that
    /// modes and mtimes of directories travel too. (An older server
    /// ignores `alldirs` and names the empty ones.)
    All,
}

/// True when the query of `target` has `param` (as `name=value`).
fn wants(target: &str, param: &str) -> bool {
    target
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|x| x == param))
}

fn wants_dirs(target: &str) -> Dirs {
    match (wants(target, "dirs=1"), wants(target, "alldirs=1")) {
        (true, true) => Dirs::All,
        (true, false) => Dirs::Empty,
        _ => Dirs::No,
    }
}

/// What a listing's end record names beyond its counts, within
/// `END_RECORD_BUDGET`: partial uploads, and directories, an empty one
/// (which nothing else implies) taking the place of one with entries.
#[derive(Default)]
struct EndParts {
    bytes: usize,
    partials: Vec<crate::wire::manifest::PartialUpload>,
    /// Directories in walk order; `None` where one was evicted.
    dirs: Vec<Option<EmptyDir>>,
    /// Which of `dirs` have entries (and may be evicted).
    evictable: Vec<usize>,
    dirs_omitted: u64,
    meta_omitted: u64,
}

impl EndParts {
    fn partial(&mut self, p: crate::wire::manifest::PartialUpload) {
        let n = json_len(&p);
        if self.partials.len() < MAX_PARTIALS_LISTED && self.bytes + n <= END_RECORD_BUDGET {
            self.bytes += n;
            self.partials.push(p);
        }
    }

    fn dir(&mut self, d: EmptyDir, empty: bool) {
        let n = json_len(&d);
        while empty && self.bytes + n > END_RECORD_BUDGET {
            let Some(i) = self.evictable.pop() else { break };
            self.bytes -= self.dirs[i].take().as_ref().map_or(0, json_len);
            self.meta_omitted += 1;
        }
        if self.bytes + n <= END_RECORD_BUDGET {
            self.bytes += n;
            if !empty {
                self.evictable.push(self.dirs.len());
            }
            self.dirs.push(Some(d));
        } else if empty {
            self.dirs_omitted += 1;
        } else {
            self.meta_omitted += 1;
        }
    }

    fn fill(self, end: &mut End) {
        end.partials = self.partials;
        end.dirs = self.dirs.into_iter().flatten().collect();
        end.dirs_omitted = self.dirs_omitted;
        end.dirs_meta_omitted = self.meta_omitted;
    }
}

/// The bytes `v` takes in a JSON array (its JSON and a comma).
fn json_len(v: &impl serde::Serialize) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX / 2, |j| j.len() + 1)
}

fn listing(
    state: &State,
    name: &str,
    area: &Area,
    root: &Root,
    (with_dirs, with_meta): (Dirs, bool),
) -> Response {
    let owners_applied = area.owners && area.writable && state.can_chown;
    let cache = state
        .cache
        .as_ref()
        .map(|dir| CacheFile::for_area(dir, name, &area.root));
    let sigs = state.sigs.get(name).cloned();
    let root = match root.try_clone() {
        Ok(r) => r,
        Err(e) => return Response::text(500, format!("cannot open the area: {}", describe_io(&e))),
    };
    let checksum = area.checksum;
    let exclude = area.exclude.clone();
    let quiet = state.quiet;
    let id = state.ids.get(name).cloned().unwrap_or_default();
    let produce = move |out: &mut dyn Write| -> io::Result<()> {
        // Lines travel in chunks: one hand-over per line cost a context
        // switch per entry. A chunk goes when it is full or has waited
        // LISTING_CHUNK_WAIT, so a slow (hashing) walk still streams.
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(16);
        // Set when the client is gone: hashing for it stops.
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abandon = Arc::clone(&gone);
        // Naming owners and writing JSON happen here, on another core
        // than the walk's.
        let items_rx = walk_in_batches(root, checksum, exclude.clone(), cache, Arc::clone(&gone));
        std::thread::spawn(move || {
            let (mut count, mut bytes, mut skipped) = (0u64, 0u64, 0u64);
            let mut kept = EndParts::default();
            // Signatures worth keeping: those of the files listed.
            let mut signed = HashSet::new();
            let mut chunk = Vec::with_capacity(LISTING_CHUNK);
            let mut since = Instant::now();
            let mut open = true;
            // Owners travel with their names where this system has them.
            let names = with_meta.then(crate::owners::Names::load);
            let more = |m: &mut crate::wire::manifest::MoreMeta| match &names {
                Some(n) => {
                    m.user = m.uid.and_then(|u| n.user(u)).map(str::to_string);
                    m.group = m.gid.and_then(|g| n.group(g)).map(str::to_string);
                }
                None => *m = Default::default(),
            };
            for mut item in items_rx.iter().flatten() {
                match &mut item {
                    Item::Entry(e) => more(&mut e.meta),
                    Item::Dir(d, _) => more(&mut d.meta),
                    _ => {}
                }
                match item {
                    Item::Entry(e) => {
                        count += 1;
                        bytes += e.size;
                        if sigs.is_some() && SigCache::worth(e.size) && e.linkdest.is_none() {
                            signed.insert(SigCache::key(e.name.as_bytes()));
                        }
                        if chunk.is_empty() {
                            since = Instant::now();
                        }
                        let _ = serde_json::to_writer(&mut chunk, &e);
                        chunk.push(b'\n');
                    }
                    Item::Skipped(why) => {
                        skipped += 1;
                        if !quiet {
                            print_error(format!("listing skips {why}"));
                        }
                    }
                    Item::Courier(at) => {
                        if !quiet {
                            print_error(format!(
                                "listing leaves out '{at}': a courier (it holds .bitfog/)"
                            ));
                        }
                    }
                    Item::Partial(p) => kept.partial(p),
                    Item::Dir(d, empty)
                        if with_dirs == Dirs::All || (with_dirs == Dirs::Empty && empty) =>
                    {
                        kept.dir(d, empty)
                    }
                    Item::Dir(..) => {}
                }
                if chunk.len() >= LISTING_CHUNK
                    || (!chunk.is_empty() && since.elapsed() >= LISTING_CHUNK_WAIT)
                {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(LISTING_CHUNK));
                    open = tx.send(full).is_ok();
                }
                if !open {
                    break;
                }
            }
            if let (true, 0, Some(sigs)) = (open, skipped, &sigs) {
                // A complete walk: signatures of files now gone go too.
                sigs.prune(&signed);
            }
            if open {
                let mut end = End::new(count, bytes, skipped);
                kept.fill(&mut end);
                // Like `dirs`, only for clients that ask for the extended
                // end record: a plain listing's stays as it always was.
                if with_dirs != Dirs::No {
                    end.area_id = Some(id);
                }
                end.owners = with_meta && owners_applied;
                if with_meta {
                    end.exclude = exclude.texts();
                }
                let _ = serde_json::to_writer(&mut chunk, &end);
                chunk.push(b'\n');
                let _ = tx.send(chunk);
            }
        });
        let sent = (|| loop {
            match rx.recv_timeout(LISTING_KEEPALIVE) {
                Ok(chunk) => out.write_all(&chunk)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    out.write_all(b"\n")?;
                    out.flush()?;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        })();
        if sent.is_err() {
            abandon.store(true, Ordering::Relaxed);
        }
        sent
    };
    let resp = Response::new(200, Body::Stream(Box::new(produce)))
        .with("Content-Type", protocol::NDJSON_TYPE);
    // Said before the entries, for a client that compares owners as it
    // reads them; its presence says the entries carry the extended
    // metadata.
    match (with_meta, owners_applied) {
        (true, true) => resp.with(protocol::OWNERS_HEADER, "1"),
        (true, false) => resp.with(protocol::OWNERS_HEADER, "0"),
        _ => resp,
    }
}

/// Walks an area (stat, hash cache, hashing: `scan::scan`) on a thread of
/// its own, handing its items over `LISTING_ITEMS` at a time (or after
/// `LISTING_CHUNK_WAIT`). The walk stops when the receiver is dropped or
/// `cancel` is set.
fn walk_in_batches(
    root: Root,
    checksum: bool,
    exclude: crate::wire::exclude::Excludes,
    cache: Option<CacheFile>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
) -> mpsc::Receiver<Vec<scan::Item>> {
    let (items_tx, items_rx) = mpsc::sync_channel::<Vec<scan::Item>>(8);
    std::thread::spawn(move || {
        let mut items = Vec::with_capacity(LISTING_ITEMS);
        let mut since = Instant::now();
        let mut open = true;
        scan::scan(&root, checksum, &exclude, cache.as_ref(), &cancel, |item| {
            if items.is_empty() {
                since = Instant::now();
            }
            items.push(item);
            if items.len() >= LISTING_ITEMS || since.elapsed() >= LISTING_CHUNK_WAIT {
                let full = std::mem::replace(&mut items, Vec::with_capacity(LISTING_ITEMS));
                open = items_tx.send(full).is_ok();
            }
            open
        });
        if open && !items.is_empty() {
            let _ = items_tx.send(items);
        }
    });
    items_rx
}

/// Opens the directory of a request's last component beneath the area,
/// refusing symlinks anywhere (see `beneath`); with `create`, makes missing
/// directories.
fn parent_dir(root: &Root, comps: &[&[u8]], create: bool) -> std::result::Result<Dir, Response> {
    root.dir(&comps[..comps.len() - 1], create)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::EXDEV) if create => {
                Response::text(400, "refused path: symlink in a directory component")
            }
            Some(libc::ENOTDIR) if create => {
                Response::text(409, "a path component is not a directory")
            }
            _ if is_disk_full(&e) => Response::text(507, "insufficient storage"),
            Some(libc::ENOENT | libc::ELOOP | libc::EXDEV | libc::ENOTDIR) => {
                Response::text(404, "not found")
            }
            Some(libc::EACCES) => Response::text(403, "permission denied"),
            _ => Response::text(500, format!("cannot open directory: {}", describe_io(&e))),
        })
}

fn last<'a>(comps: &[&'a [u8]]) -> &'a [u8] {
    comps[comps.len() - 1]
}

/// Opens a file to read whole: the file and its metadata, or the status
/// and reason a GET of it would get.
fn open_whole(root: &Root, comps: &[&[u8]]) -> std::result::Result<(File, fs::Metadata), Response> {
    let dir = parent_dir(root, comps, false)?;
    let file = match dir.open_read(last(comps)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(Response::text(403, "permission denied"));
        }
        Err(_) => return Err(Response::text(404, "not found")),
    };
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => Ok((file, m)),
        Ok(_) => Err(Response::text(404, "not a regular file")),
        Err(e) => Err(Response::text(500, describe_io(&e))),
    }
}

/// A file opened to be sent whole, or the status and reason of a GET of it.
type Opened = std::result::Result<(File, fs::Metadata), (u16, String)>;

/// `POST /AREA/?files`: the files named in the body (one percent-encoded
/// name per line, as in a request path), one after another in one
/// answer, so that many small files cost one round trip. Each name gets
/// what a GET of it would: the file's bytes, or its status and reason
/// (a bad, reserved, excluded, missing or unreadable name is answered
/// for itself and the rest go on). Every file is opened before the
/// answer starts; each is sent at the size it had then, and a file that
/// shrinks meanwhile breaks the answer (no end line), as a GET's would.
fn files(root: &Root, area: &Area, req: &mut Request) -> Response {
    let len = req.content_length();
    if len > protocol::FILES_BODY_MAX {
        return Response::text(
            413,
            format!("at most {} bytes of names", protocol::FILES_BODY_MAX),
        );
    }
    let mut body = Vec::with_capacity(len as usize);
    if io::Read::read_to_end(&mut req.body, &mut body).is_err() {
        return Response::text(400, "the request body was cut short");
    }
    let Ok(text) = String::from_utf8(body) else {
        return Response::text(400, "names must be percent-encoded ASCII");
    };
    let names: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if names.len() > protocol::FILES_MAX {
        return Response::text(
            413,
            format!("at most {} names in one request", protocol::FILES_MAX),
        );
    }
    let refusal = |r: Response| {
        let status = r.status;
        (status, r.text_body().trim().to_string())
    };
    let opened: Vec<(String, Opened)> = names
        .iter()
        .map(|&name| {
            let got = (|| {
                let decoded = protocol::percent_decode(name)
                    .ok_or_else(|| (400, "bad percent-encoding in path".to_string()))?;
                let comps = crate::wire::paths::components(&decoded)
                    .map_err(|why| (400, format!("refused path: {}", why.reason())))?;
                if crate::wire::paths::has_reserved(&comps) {
                    return Err((404, "not found".to_string()));
                }
                if let Some(resp) = excluded(area, FileOp::Get, &comps, req) {
                    return Err(refusal(resp));
                }
                open_whole(root, &comps).map_err(refusal)
            })();
            (name.to_string(), got)
        })
        .collect();
    let produce = move |out: &mut dyn Write| -> io::Result<()> {
        let mut out = io::BufWriter::with_capacity(256 * 1024, out);
        let mut sent = 0usize;
        for (name, got) in opened {
            match got {
                Ok((file, meta)) => {
                    let head = serde_json::json!({
                        "name": name,
                        "status": 200,
                        "size": meta.len(),
                        "mtime": meta.mtime(),
                    });
                    writeln!(out, "{head}")?;
                    let n = io::copy(&mut (&file).take(meta.len()), &mut out)?;
                    if n != meta.len() {
                        return Err(io::Error::other(format!(
                            "'{name}' shrank while it was sent"
                        )));
                    }
                }
                Err((status, reason)) => {
                    let head = serde_json::json!({
                        "name": name,
                        "status": status,
                        "reason": reason,
                    });
                    writeln!(out, "{head}")?;
                }
            }
            sent += 1;
        }
        writeln!(out, "{}", serde_json::json!({"end": true, "files": sent}))?;
        out.flush()
    };
    Response::new(200, Body::Stream(Box::new(produce))).with("Content-Type", protocol::FILES_TYPE)
}

/// A file of `POST /AREA/?put`, written and checked: its temporary file
/// (holding its directory), the name to rename it to, and the item's name
/// as asked, for the answer.
struct Staged {
    temp: TempFile<Rc<Dir>>,
    to: Vec<u8>,
    name: String,
}

/// `POST /AREA/?put`: many regular files in one request, each as a PUT
/// of it would be stored (its `X-Bitfog-*` headers in its head line),
/// all made durable together: each is written to a temporary file and
/// checked against its SHA-256, then one `syncfs` makes them all
/// durable, then each is renamed into place and its directory synced.
/// Only a complete, verified, durable file appears at its path; a body
/// cut short stores nothing (400).
fn puts(
    root: &Root,
    area: &Area,
    req: &mut Request,
    owners: Option<&crate::owners::Names>,
) -> Response {
    if req.header("content-length").is_none() {
        return Response::text(411, "POST needs Content-Length");
    }
    let len = req.content_length();
    if len > protocol::PUTS_BODY_MAX {
        return Response::text(
            413,
            format!("at most {} bytes in one request", protocol::PUTS_BODY_MAX),
        );
    }
    if let Some(free) = root
        .dir(&[], false)
        .ok()
        .and_then(|d| d.free_space())
        .filter(|&f| len > f)
    {
        if len <= DRAIN_LIMIT {
            let _ = io::copy(&mut req.body, &mut io::sink());
        }
        return Response::text(
            507,
            format!("the destination disk is full: {len} bytes to write, {free} free"),
        );
    }
    let mut body = io::BufReader::with_capacity(256 * 1024, &mut req.body);
    let mut staged: Vec<Staged> = Vec::new();
    let mut answers: Vec<(String, u16, String)> = Vec::new();
    // Each directory written in, opened once (by its path in the area).
    let mut dirs: HashMap<Vec<u8>, Rc<Dir>> = HashMap::new();
    let cut = || Response::text(400, "request body cut short");
    loop {
        let mut line = Vec::new();
        if io::BufRead::read_until(&mut (&mut body).take(64 * 1024), b'\n', &mut line).is_err()
            || !line.ends_with(b"\n")
        {
            return cut();
        }
        let Ok(head) = serde_json::from_slice::<serde_json::Value>(&line) else {
            return Response::text(400, "a bad item head");
        };
        if head.get("end").and_then(|v| v.as_bool()) == Some(true) {
            break;
        }
        if staged.len() + answers.len() >= protocol::FILES_MAX {
            return Response::text(
                413,
                format!("at most {} files in one request", protocol::FILES_MAX),
            );
        }
        let (Some(name), Some(size)) = (
            head.get("name").and_then(|v| v.as_str()),
            head.get("size").and_then(|v| v.as_u64()),
        ) else {
            return Response::text(400, "an item head needs name and size");
        };
        let headers = head.get("headers").and_then(|h| h.as_object());
        let get = |n: &str| {
            headers.and_then(|h| {
                h.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(n))
                    .and_then(|(_, v)| v.as_str())
            })
        };
        let name = name.to_string();
        let mut item = (&mut body).take(size);
        match stage(
            root,
            area,
            (&name, size),
            &get,
            owners,
            &mut dirs,
            &mut item,
        ) {
            Ok(s) => staged.push(s),
            Err(resp) => answers.push((name, resp.status, resp.text_body().trim().to_string())),
        }
        // What an item refused before its bytes were read is skipped.
        if io::copy(&mut item, &mut io::sink()).is_err() || item.limit() > 0 {
            return cut();
        }
    }
    // Durable together: the data, then the names.
    let synced = root.dir(&[], false).and_then(|d| d.sync_fs());
    for Staged { temp, to, name } in staged {
        let done = match &synced {
            Err(e) => Err(write_error(io::Error::new(e.kind(), e.to_string()))),
            Ok(()) => temp.persist(&to).map_err(write_error),
        };
        match done {
            Ok(()) => answers.push((name, 204, String::new())),
            Err(resp) => answers.push((name, resp.status, resp.text_body().trim().to_string())),
        }
    }
    // Each directory written in, synced once after the renames.
    for d in dirs.values() {
        d.sync();
    }
    let mut out = String::new();
    for (name, status, reason) in answers {
        let mut line = serde_json::json!({"name": name, "status": status});
        if !reason.is_empty() {
            line["reason"] = serde_json::Value::from(reason);
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.push_str("{\"end\":true}\n");
    Response::new(200, Body::Bytes(out.into_bytes())).with("Content-Type", protocol::NDJSON_TYPE)
}

/// One item of `POST /AREA/?put`, written and checked in a temporary
/// file beside its target, with its mode, mtime and owner (not yet
/// synced or renamed). The refusal a PUT of it would get otherwise.
/// `dirs`: the request's directories, each opened once.
fn stage<'h>(
    root: &Root,
    area: &Area,
    (name, size): (&str, u64),
    get: &dyn Fn(&str) -> Option<&'h str>,
    owners: Option<&crate::owners::Names>,
    dirs: &mut HashMap<Vec<u8>, Rc<Dir>>,
    body: &mut dyn Read,
) -> std::result::Result<Staged, Response> {
    let decoded = protocol::percent_decode(name)
        .ok_or_else(|| Response::text(400, "bad percent-encoding in path"))?;
    let comps = crate::wire::paths::components(&decoded)
        .map_err(|why| Response::text(400, format!("refused path: {}", why.reason())))?;
    if crate::wire::paths::has_reserved(&comps) {
        return Err(Response::text(
            400,
            "names starting with .bitfog are reserved",
        ));
    }
    if !area.exclude.is_empty() {
        let path = String::from_utf8_lossy(&decoded).into_owned();
        if area.exclude.excludes(&path, false) {
            return Err(Response::text(403, "excluded by the area's configuration"));
        }
    }
    let asked = Want::of_headers(get, owners)?;
    let want_hash = match get(protocol::HDR_SHA256) {
        Some(h) if is_sha256_hex(&h.to_ascii_lowercase()) => h.to_ascii_lowercase(),
        _ => {
            return Err(Response::text(
                400,
                format!("each file needs a valid {}", protocol::HDR_SHA256),
            ));
        }
    };
    let parent = comps[..comps.len() - 1].join(&b'/');
    let dir = match dirs.get(&parent) {
        Some(d) => Rc::clone(d),
        None => {
            let d = Rc::new(parent_dir(root, &comps, true)?);
            dirs.insert(parent, Rc::clone(&d));
            d
        }
    };
    // A directory at the path refuses the rename (EISDIR: 409).
    let to = last(&comps).to_vec();
    let temp = TempFile::create(dir).map_err(write_error)?;
    let file = temp.file.as_ref().expect("fresh temp file");
    let mut hasher = Hasher::new();
    match copy_hashing(body, &mut (&*file), &mut hasher, size, |_| {}) {
        Ok(n) if n == size => {}
        Ok(_) | Err(CopyError::Read(_)) => {
            return Err(Response::text(400, "request body cut short"));
        }
        Err(CopyError::Write(e)) => return Err(write_error(e)),
    }
    let got = hasher.hex();
    if got != want_hash {
        return Err(Response::text(
            422,
            format!("sha256 mismatch: body has {got}, header says {want_hash}"),
        ));
    }
    set_meta(file, asked.or_mode(0o644)).map_err(write_error)?;
    Ok(Staged {
        temp,
        to,
        name: name.to_string(),
    })
}

fn get_file(root: &Root, comps: &[&[u8]], req: &Request) -> Response {
    let dir = match parent_dir(root, comps, false) {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    let file = match dir.open_read(last(comps)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Response::text(403, "permission denied");
        }
        Err(_) => return Response::text(404, "not found"),
    };
    let meta = match file.metadata() {
        Ok(m) if m.file_type().is_file() => m,
        Ok(_) => return Response::text(404, "not a regular file"),
        Err(e) => return Response::text(500, describe_io(&e)),
    };
    let len = meta.len();
    let mtime = meta.mtime();
    let etag = format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        meta.ino(),
        len,
        mtime,
        meta.mtime_nsec()
    );
    let last_modified = protocol::http_date(mtime);
    let mut ask = req
        .header("range")
        .map_or(RangeAsk::Whole, |r| protocol::parse_range(r, len));
    if let Some(cond) = req.header("if-range") {
        let matches = if cond.starts_with('"') || cond.starts_with("W/") {
            cond == etag
        } else {
            protocol::parse_http_date(cond) == Some(mtime)
        };
        if !matches {
            ask = RangeAsk::Whole;
        }
    }
    let (status, start, count) = match ask {
        RangeAsk::Whole => (200, 0, len),
        RangeAsk::Part { start, end } => (206, start, end - start + 1),
        RangeAsk::Unsatisfiable => {
            return Response::text(416, "range not satisfiable")
                .with("Content-Range", format!("bytes */{len}"))
                .with("Accept-Ranges", "bytes");
        }
    };
    let mut resp = Response::new(
        status,
        Body::File {
            file,
            start,
            len: count,
        },
    )
    .with("Content-Type", "application/octet-stream")
    .with("Accept-Ranges", "bytes")
    .with("ETag", etag)
    .with("Last-Modified", last_modified);
    if status == 206 {
        resp = resp.with(
            "Content-Range",
            protocol::content_range(start, start + count - 1, len),
        );
    }
    resp
}

/// Temporary files being written right now, removed if the server stops.
fn live_temps() -> &'static Mutex<HashSet<PathBuf>> {
    static LIVE: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// This process's tag in temporary names, so startup cleaning can tell
/// a crashed run's leftovers from our own.
fn session_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:x}_{:x}", std::process::id(), nanos & 0xffff_ffff)
    })
}

/// Whether a temporary name is another live server's: several servers
/// may share an area (a daemon and `serve --stdio` sessions, one per
/// ssh connection), and none may remove what another is writing. A name
/// whose process is gone (or older, without a process id) is stale.
fn live_elsewhere(name: &[u8]) -> bool {
    let Some(pid) = name
        .strip_prefix(TEMP_PREFIX.as_bytes())
        .and_then(|rest| rest.split(|&b| b == b'_').next())
        .and_then(|hex| std::str::from_utf8(hex).ok())
        .and_then(|hex| i32::from_str_radix(hex, 16).ok())
        .filter(|&pid| pid > 0 && name.contains(&b'_'))
    else {
        return false;
    };
    !crate::sys::process_gone(pid)
}

const TEMP_PREFIX: &str = ".bitfog-tmp-";

/// A fresh temporary name: this process's tag and a counter.
fn temp_name() -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{}-{n}", session_tag()).into_bytes()
}

/// A temporary name in the target's directory (`D`: the directory, or a
/// borrow of it); removed on drop unless it was renamed into place.
struct TempFile<D: std::borrow::Borrow<Dir>> {
    dir: D,
    name: Vec<u8>,
    file: Option<File>,
    done: bool,
}

impl<D: std::borrow::Borrow<Dir>> TempFile<D> {
    fn register(dir: D, name: Vec<u8>, file: Option<File>) -> TempFile<D> {
        let path = dir.borrow().path.join(OsStr::from_bytes(&name));
        live_temps().lock().map(|mut s| s.insert(path)).ok();
        TempFile {
            dir,
            name,
            file,
            done: false,
        }
    }

    /// A new, empty file.
    fn create(dir: D) -> io::Result<TempFile<D>> {
        let name = temp_name();
        let file = dir.borrow().create_new(&name)?;
        Ok(TempFile::register(dir, name, Some(file)))
    }

    /// A new symlink to `target`.
    fn symlink(dir: D, target: &[u8]) -> io::Result<TempFile<D>> {
        let name = temp_name();
        dir.borrow().symlink(target, &name)?;
        Ok(TempFile::register(dir, name, None))
    }

    /// Renames into place (replacing a file or symlink, never following
    /// one) and forgets the temporary name.
    fn persist(mut self, to: &[u8]) -> io::Result<()> {
        self.file.take();
        let dir = self.dir.borrow();
        dir.rename(&self.name, to)?;
        self.done = true;
        let path = dir.path.join(OsStr::from_bytes(&self.name));
        live_temps().lock().map(|mut s| s.remove(&path)).ok();
        Ok(())
    }
}

impl<D: std::borrow::Borrow<Dir>> Drop for TempFile<D> {
    fn drop(&mut self) {
        if !self.done {
            let dir = self.dir.borrow();
            let _ = dir.unlink(&self.name);
            let path = dir.path.join(OsStr::from_bytes(&self.name));
            live_temps().lock().map(|mut s| s.remove(&path)).ok();
        }
    }
}

fn remove_live_temps() {
    if let Ok(set) = live_temps().lock() {
        for p in set.iter() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Partial uploads (`.bitfog-part-*`) that no range has extended for this
/// long are removed: the next trip carries their file again from the start.
const PART_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);
/// The cleaning of writable areas runs at startup and then this often.
const CLEAN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Whether `serve --stdio` should clean the areas now: when the stamp in
/// the cache directory (`clean.stamp`) is older than `CLEAN_EVERY` (then
/// it is renewed), or there is no cache directory to keep one in.
fn clean_due(state: &State) -> bool {
    let Some(dir) = &state.cache else {
        return true;
    };
    let stamp = dir.join("clean.stamp");
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < CLEAN_EVERY));
    if fresh {
        return false;
    }
    let _ = fs::write(&stamp, b"");
    true
}

/// Cleans the writable areas: removes temporary files left by a crashed
/// server and partial uploads older than `PART_MAX_AGE`; each is unlinked
/// relative to its directory resolved beneath the root.
fn clean_areas(state: &State) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mine = format!("{TEMP_PREFIX}{}-", session_tag());
    for (name, area) in state.config.iter().filter(|(_, a)| a.writable) {
        let Some(root) = state.roots.get(name) else {
            continue;
        };
        let reserved = |rel: &Path| rel.file_name().is_some_and(|n| is_reserved(n.as_bytes()));
        crate::beneath::walk(
            root,
            |rel| !reserved(rel),
            |found| {
                let crate::beneath::Found::Item { dir, rel, name, .. } = found else {
                    return true;
                };
                if name.starts_with(TEMP_PREFIX.as_bytes())
                    && !name.starts_with(mine.as_bytes())
                    && !live_elsewhere(name)
                    && dir.unlink(name).is_ok()
                {
                    state.log(format!(
                        "removed stale temporary file '{}'",
                        area.root.join(rel).display()
                    ));
                }
                let old = |m: crate::beneath::Meta| {
                    now.saturating_sub(m.mtime) as u64 > PART_MAX_AGE.as_secs()
                };
                if name.starts_with(PART_PREFIX.as_bytes())
                    && dir.stat(name).ok().flatten().is_some_and(old)
                    && !part_busy(dir, name)
                    && dir.unlink(name).is_ok()
                {
                    state.log(format!(
                        "removed a partial upload not extended for {} days: '{}'",
                        PART_MAX_AGE.as_secs() / 86400,
                        area.root.join(rel).display()
                    ));
                }
                true
            },
        );
    }
}

fn put(
    root: &Root,
    comps: &[&[u8]],
    req: &mut Request,
    sigs: Option<&SigCache>,
    owners: Option<&crate::owners::Names>,
) -> Response {
    if req.header("content-length").is_none() {
        return Response::text(411, "PUT needs Content-Length");
    }
    let asked = match Want::of(req, owners) {
        Ok(w) => w,
        Err(resp) => return resp,
    };
    if content_type_is(req, protocol::DIRECTORY_TYPE) {
        return put_dir(root, comps, req, asked);
    }
    if comps.is_empty() {
        return Response::text(
            405,
            "only a directory PUT (its mode and mtime) may name the area itself",
        )
        .with("Allow", "GET, HEAD, PUT");
    }
    let dir = match parent_dir(root, comps, true) {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    if dir.kind(last(comps)).ok().flatten() == Some(Kind::Dir) {
        return Response::text(409, "a directory exists at this path");
    }
    // A body that cannot fit is refused before any of it is written (a
    // modest one is read, so the client sees the answer).
    if let Some(free) = dir.free_space().filter(|&f| req.content_length() > f) {
        if req.content_length() <= DRAIN_LIMIT {
            let _ = io::copy(&mut req.body, &mut io::sink());
        }
        return Response::text(
            507,
            format!(
                "the destination disk is full: {} bytes to write, {free} free",
                req.content_length()
            ),
        );
    }
    let is_link = content_type_is(req, protocol::SYMLINK_TYPE);
    if let Some(range) = req.header("content-range") {
        let range = range.to_string();
        let resp = match put_range(&dir, last(comps), &range, req, asked) {
            Ok(resp) | Err(resp) => resp,
        };
        dir.sync();
        return resp;
    }
    let sparse = content_type_is(req, protocol::EXTENTS_TYPE);
    let result = if sparse {
        put_sparse(&dir, last(comps), req, asked)
    } else if content_type_is(req, delta::DELTA_TYPE) {
        put_delta(&dir, comps, req, sigs, asked)
    } else if let Some(from) = req.header(protocol::HDR_LINK) {
        let from = from.to_string();
        put_link(root, comps, &dir, &from, req)
    } else if let Some(from) = req.header(protocol::HDR_FROM) {
        let from = from.to_string();
        put_copy(root, comps, &dir, &from, req, asked)
    } else if is_link {
        put_symlink(&dir, last(comps), req, asked)
    } else {
        put_file(&dir, last(comps), req, asked)
    };
    match result {
        Ok(()) => {
            dir.sync();
            Response::new(204, Body::Empty)
        }
        Err(resp) => resp,
    }
}

fn put_symlink(
    dir: &Dir,
    name: &[u8],
    req: &mut Request,
    asked: Want,
) -> std::result::Result<(), Response> {
    let len = req.content_length();
    if len == 0 || len > protocol::MAX_LINK_TARGET {
        return Err(Response::text(
            if len == 0 { 400 } else { 413 },
            "a symlink target is 1 to 4096 bytes",
        ));
    }
    let mut target = Vec::with_capacity(len as usize);
    if req
        .body
        .by_ref()
        .take(len)
        .read_to_end(&mut target)
        .is_err()
        || target.len() as u64 != len
    {
        return Err(Response::text(400, "request body cut short"));
    }
    if target.contains(&0) {
        return Err(Response::text(400, "a symlink target cannot contain NUL"));
    }
    let temp = TempFile::symlink(dir, &target).map_err(write_error)?;
    temp.persist(name).map_err(write_error)?;
    if let Some((uid, gid)) = asked.owner {
        dir.chown_nofollow(name, uid, gid).map_err(write_error)?;
    }
    if let Some(t) = asked.mtime {
        dir.set_mtime_nofollow(name, t).map_err(write_error)?;
    }
    Ok(())
}

/// `PUT` with `X-Bitfog-From`: makes the file at `comps` from another
/// file of the area (a reflink where the filesystem can, else a copy),
/// checking the copy's SHA-256 against `X-Bitfog-Sha256` before it is
/// renamed into place. Naming the target itself changes only its mode and
/// mtime, after the same check.
fn put_copy(
    root: &Root,
    comps: &[&[u8]],
    dir: &Dir,
    from: &str,
    req: &mut Request,
    asked: Want,
) -> std::result::Result<(), Response> {
    if req.content_length() != 0 {
        return Err(Response::text(400, "a PUT with X-Bitfog-From has no body"));
    }
    let want = required_sha(req, "X-Bitfog-From needs a valid X-Bitfog-Sha256")?;
    let bad_from =
        |why: &str| Response::text(400, format!("bad {} header: {why}", protocol::HDR_FROM));
    let decoded = protocol::percent_decode(from).ok_or_else(|| bad_from("bad percent-encoding"))?;
    let from_comps = components(&decoded).map_err(|why| bad_from(why.reason()))?;
    if has_reserved(&from_comps) {
        return Err(bad_from("names starting with .bitfog are reserved"));
    }
    let gone = || Response::text(409, format!("copy source '{from}' not found"));
    let from_dir = parent_dir(root, &from_comps, false).map_err(|_| gone())?;
    let source = from_dir.open_read(last(&from_comps)).map_err(|_| gone())?;
    if !source.metadata().map_err(write_error)?.is_file() {
        return Err(gone());
    }
    let mismatch = |got: &str| {
        Response::text(
            422,
            format!("sha256 mismatch: '{from}' has {got}, header says {want}"),
        )
    };
    if from_comps == comps {
        // The same file: only its mode and mtime change, in place.
        let (got, _) = crate::digest::hash_reader(&source).map_err(write_error)?;
        if got != want {
            return Err(mismatch(&got));
        }
        return set_meta_and_sync(&source, asked).map_err(write_error);
    }
    let temp = TempFile::create(dir).map_err(write_error)?;
    let file = temp.file.as_ref().expect("fresh temp file");
    // SAFETY: FICLONE on two descriptors we own; on failure nothing changed.
    let cloned = unsafe { libc::ioctl(file.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0;
    let got = if cloned {
        // Hash the clone itself: what appears is what was checked.
        crate::digest::hash_reader(file).map_err(write_error)?.0
    } else {
        let mut hasher = Hasher::new();
        let len = source.metadata().map_err(write_error)?.len();
        match copy_hashing(
            &mut &source,
            &mut Writeback::new(file, 0),
            &mut hasher,
            len.saturating_add(1),
            |_| {},
        ) {
            Ok(n) if n >= len => {}
            Ok(_) => {
                return Err(Response::text(
                    409,
                    format!("'{from}' shrank while it was copied"),
                ));
            }
            Err(CopyError::Read(e) | CopyError::Write(e)) => return Err(write_error(e)),
        }
        hasher.hex()
    };
    if got != want {
        return Err(mismatch(&got));
    }
    set_meta_and_sync(file, asked.or_mode(0o644)).map_err(write_error)?;
    temp.persist(last(comps)).map_err(write_error)
}

/// `PUT` with `X-Bitfog-Link: FROM` (a path of the same area) and an empty
/// body: PATH becomes another name of the regular file FROM (a hard link,
/// made at a temporary name and renamed over PATH), which must have the
/// size `X-Bitfog-Size` says; its content was checked when it was stored
/// or listed. 409 when FROM is missing, not a regular file or of another
/// size; 501 when the file system cannot link here (the client copies
/// instead). An older server stores the empty body, which the
/// `X-Bitfog-Sha256` clients send does not match: 422, nothing changes.
fn put_link(
    root: &Root,
    comps: &[&[u8]],
    dir: &Dir,
    from: &str,
    req: &mut Request,
) -> std::result::Result<(), Response> {
    if req.content_length() != 0 {
        return Err(Response::text(400, "a PUT with X-Bitfog-Link has no body"));
    }
    let size: u64 = header_num(req, protocol::HDR_SIZE)?
        .ok_or_else(|| Response::text(400, "X-Bitfog-Link needs X-Bitfog-Size"))?;
    let bad_from =
        |why: &str| Response::text(400, format!("bad {} header: {why}", protocol::HDR_LINK));
    let decoded = protocol::percent_decode(from).ok_or_else(|| bad_from("bad percent-encoding"))?;
    let from_comps = components(&decoded).map_err(|why| bad_from(why.reason()))?;
    if has_reserved(&from_comps) {
        return Err(bad_from("names starting with .bitfog are reserved"));
    }
    let gone = || Response::text(409, format!("link source '{from}' not found as listed"));
    let from_dir = parent_dir(root, &from_comps, false).map_err(|_| gone())?;
    let source = from_dir
        .stat(last(&from_comps))
        .ok()
        .flatten()
        .filter(|m| m.kind == Kind::File && m.size == size)
        .ok_or_else(gone)?;
    let same = |m: crate::beneath::Meta| m.identity[..2] == source.identity[..2];
    if dir.stat(last(comps)).ok().flatten().is_some_and(same) {
        return Ok(());
    }
    let temp = TempFile::register(dir, temp_name(), None);
    if let Err(e) = dir.link_from(&from_dir, last(&from_comps), &temp.name) {
        return Err(match e.raw_os_error() {
            Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP | libc::ENOSYS) => {
                Response::text(
                    501,
                    format!("cannot make a hard link here: {}", describe_io(&e)),
                )
            }
            _ => write_error(e),
        });
    }
    let name = temp.name.clone();
    temp.persist(last(comps)).map_err(write_error)?;
    // Renaming a name over another name of the same file does nothing.
    if dir.stat(&name).ok().flatten().is_some() {
        let _ = dir.unlink(&name);
    }
    Ok(())
}

/// `PUT` of a sparse file: the body is its data extents, each framed as
/// START and LEN (8 bytes each, big-endian) then LEN bytes, in order;
/// `X-Bitfog-Size` gives the whole size and `X-Bitfog-Sha256` (required)
/// the whole content's hash, holes counted as zeros. The extents are
/// written at their offsets of a temporary file, so the holes stay holes,
/// and it is renamed into place only if the hash matches.
fn put_sparse(
    dir: &Dir,
    name: &[u8],
    req: &mut Request,
    asked: Want,
) -> std::result::Result<(), Response> {
    let want = required_sha(req, "a sparse upload needs X-Bitfog-Sha256")?;
    let size: u64 = header_num(req, protocol::HDR_SIZE)?
        .ok_or_else(|| Response::text(400, "a sparse upload needs X-Bitfog-Size"))?;
    let mut body_left = req.content_length();
    // Holes are hashed as zeros: their size is bounded by the data sent.
    if !crate::wire::sparse::holes_within_bounds(size, body_left) {
        return Err(Response::text(
            413,
            format!(
                "a sparse upload of {size} bytes needs more than {body_left} bytes of data; send it as an ordinary file"
            ),
        ));
    }
    let temp = TempFile::create(dir).map_err(write_error)?;
    let file = temp.file.as_ref().expect("fresh temp file");
    file.set_len(size).map_err(write_error)?;
    let mut hasher = Hasher::new();
    let mut pos = 0u64;
    let cut = || Response::text(400, "request body cut short");
    while body_left > 0 {
        let mut frame = [0u8; 16];
        if body_left < 16 {
            return Err(Response::text(400, "bad extent frame"));
        }
        req.body.read_exact(&mut frame).map_err(|_| cut())?;
        body_left -= 16;
        let start = u64::from_be_bytes(frame[..8].try_into().expect("8 bytes"));
        let len = u64::from_be_bytes(frame[8..].try_into().expect("8 bytes"));
        let fits =
            start >= pos && len <= body_left && start.checked_add(len).is_some_and(|e| e <= size);
        if !fits {
            return Err(Response::text(
                400,
                "extents out of order or outside the file",
            ));
        }
        crate::digest::hash_zeros(&mut hasher, start - pos);
        (&*file)
            .seek(io::SeekFrom::Start(start))
            .map_err(write_error)?;
        match copy_hashing(
            &mut req.body,
            &mut Writeback::new(file, start),
            &mut hasher,
            len,
            |_| {},
        ) {
            Ok(n) if n == len => {}
            Ok(_) | Err(CopyError::Read(_)) => return Err(cut()),
            Err(CopyError::Write(e)) => return Err(write_error(e)),
        }
        body_left -= len;
        pos = start + len;
    }
    crate::digest::hash_zeros(&mut hasher, size - pos);
    let got = hasher.hex();
    if got != want {
        return Err(Response::text(
            422,
            format!("sha256 mismatch: body has {got}, header says {want}"),
        ));
    }
    set_meta_and_sync(file, asked.or_mode(0o644)).map_err(write_error)?;
    temp.persist(name).map_err(write_error)
}

/// `PUT` with `Content-Type: application/x-bitfog-directory` and an empty
/// body: makes the directory (and its parents) and sets its mode and
/// mtime. A file in the way is 409. (Clients send an `X-Bitfog-Sha256`
/// the empty body cannot match, so an older server refuses with 422
/// instead of making an empty file.)
fn put_dir(root: &Root, comps: &[&[u8]], req: &mut Request, asked: Want) -> Response {
    if req.content_length() != 0 {
        return Response::text(400, "a directory PUT has no body");
    }
    let dir = match root.dir(comps, true) {
        Ok(d) => d,
        Err(e) => {
            return match e.raw_os_error() {
                Some(libc::ENOTDIR | libc::EEXIST) => Response::text(409, "a file is in the way"),
                Some(libc::ELOOP | libc::EXDEV) => {
                    Response::text(400, "refused path: symlink in a directory component")
                }
                _ => write_error(e),
            };
        }
    };
    if let Some((uid, gid)) = asked.owner {
        if let Err(e) = dir.set_own_owner(uid, gid) {
            return write_error(e);
        }
    }
    match dir.set_own_meta(asked.mode, asked.mtime) {
        Ok(()) => {
            dir.sync();
            Response::new(204, Body::Empty)
        }
        Err(e) => write_error(e),
    }
}

/// `GET /AREA/PATH?extents`: where a file's data is,
/// `{"size":N,"extents":[[START,LEN],...]}` (see `sparse`); the rest
/// reads as zeros.
fn extents(root: &Root, comps: &[&[u8]]) -> Response {
    let dir = match parent_dir(root, comps, false) {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    let Ok(file) = dir.open_read(last(comps)) else {
        return Response::text(404, "not found");
    };
    let size = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        _ => return Response::text(404, "not a regular file"),
    };
    let list = crate::wire::sparse::data_extents(&file, size);
    let body = serde_json::json!({ "size": size, "extents": list });
    Response::new(200, Body::Bytes(format!("{body}\n").into_bytes()))
        .with("Content-Type", "application/json")
}

/// `GET /AREA/PATH?signature`: the file's block signature (see `delta`),
/// from the cache when the file is unchanged, else computed while it
/// streams out. A file that changes meanwhile cuts the response short, so
/// the client never takes a signature of a version that did not exist.
fn signature(root: &Root, comps: &[&[u8]], sigs: Option<SigCache>) -> Response {
    let dir = match parent_dir(root, comps, false) {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    let Ok(file) = dir.open_read(last(comps)) else {
        return Response::text(404, "not found");
    };
    let seen = hashcache::now_ns();
    let meta = match file.metadata() {
        Ok(m) if m.is_file() => m,
        _ => return Response::text(404, "not a regular file"),
    };
    let (size, id) = (meta.len(), crate::beneath::identity(&meta));
    let name = comps.join(&b'/');
    let cached = sigs.as_ref().and_then(|c| c.get(&name, size, &id));
    let produce = move |out: &mut dyn Write| -> io::Result<()> {
        let trailer = |out: &mut dyn Write, sha: &str| {
            let line = serde_json::json!({ "sha256": sha });
            out.write_all(format!("{line}\n").as_bytes())
        };
        let line = |h: &delta::SigHeader| {
            let mut l = serde_json::to_vec(h).unwrap_or_default();
            l.push(b'\n');
            l
        };
        if let Some((sha, h, mut table)) = cached {
            out.write_all(&line(&h))?;
            let n = io::copy(&mut (&mut table).take(h.table_len()), out)?;
            if n != h.table_len() {
                return Err(io::Error::other("cached signature cut short"));
            }
            return trailer(out, &sha);
        }
        let h = delta::SigHeader::new(size);
        out.write_all(&line(&h))?;
        let mut table = Vec::with_capacity(h.table_len() as usize);
        let mut hasher = Hasher::new();
        {
            let mut tee = Tee {
                out: &mut *out,
                keep: &mut table,
            };
            let mut w = delta::SigWriter::new(h.block, &mut tee);
            let n = match copy_hashing(&mut &file, &mut w, &mut hasher, size, |_| {}) {
                Ok(n) => n,
                Err(CopyError::Read(e) | CopyError::Write(e)) => return Err(e),
            };
            w.finish()?;
            let now = file.metadata().map(|m| crate::beneath::identity(&m))?;
            if n != size || now != id {
                return Err(io::Error::other("the file changed while it was signed"));
            }
        }
        let sha = hasher.hex();
        if let Some(c) = sigs.as_ref().filter(|_| hashcache::settled(&id, seen)) {
            let _ = c.put(&name, &id, &sha, &h, &table);
        }
        trailer(out, &sha)
    };
    Response::new(200, Body::Stream(Box::new(produce))).with("Content-Type", delta::SIGNATURE_TYPE)
}

/// Writes to `out` and keeps a copy.
struct Tee<'a> {
    out: &'a mut dyn Write,
    keep: &'a mut Vec<u8>,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        self.keep.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `PUT` with `Content-Type: application/x-bitfog-delta`: makes the new
/// version of PATH from its old version and a delta (see `delta`). The
/// old file must be the version the delta names (size and SHA-256, from
/// the signature cache when its identity is unchanged, else hashed):
/// otherwise 409 and nothing changes. The result goes to a temporary file
/// and replaces PATH only when its SHA-256 matches `X-Bitfog-Sha256`
/// (else 422) and the old file did not change meanwhile (else 409).
fn put_delta(
    dir: &Dir,
    comps: &[&[u8]],
    req: &mut Request,
    sigs: Option<&SigCache>,
    asked: Want,
) -> std::result::Result<(), Response> {
    let want = required_sha(req, "a delta upload needs X-Bitfog-Sha256")?;
    let name = last(comps);
    let len = req.content_length();
    let mut body = (&mut req.body).take(len);
    let mut delta_hash = Hasher::new();
    let h = delta::read_header(&mut body, &mut delta_hash)
        .map_err(|e| Response::text(400, e.to_string()))?;
    if h.sha256 != want {
        return Err(Response::text(
            400,
            "the delta makes another file than X-Bitfog-Sha256 names",
        ));
    }
    let changed = || {
        Response::text(
            409,
            "the file at the destination is not the version the delta was made against",
        )
    };
    let old = match dir.open_read(name) {
        Ok(f) => f,
        // Absent, or a symlink (never followed): no old version to patch.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(changed());
        }
        Err(e) => return Err(Response::text(500, describe_io(&e))),
    };
    let meta = match old.metadata() {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Err(changed()),
        Err(e) => return Err(Response::text(500, describe_io(&e))),
    };
    let id = crate::beneath::identity(&meta);
    if meta.len() != h.base_size {
        return Err(changed());
    }
    let base = match sigs.and_then(|c| c.get(&comps.join(&b'/'), meta.len(), &id)) {
        Some((sha, _, _)) => sha,
        None => {
            crate::digest::hash_reader(&old)
                .map_err(|e| Response::text(500, describe_io(&e)))?
                .0
        }
    };
    if base != h.base_sha256 {
        return Err(changed());
    }
    let temp = TempFile::create(dir).map_err(write_error)?;
    let file = temp.file.as_ref().expect("fresh temp file");
    let mut patch = delta::Patch::new(&h, body, &old, delta_hash);
    let mut hasher = Hasher::new();
    let bad = |e: io::Error| {
        if e.kind() == io::ErrorKind::InvalidData {
            Response::text(422, e.to_string())
        } else {
            Response::text(400, "request body cut short")
        }
    };
    match copy_hashing(
        &mut patch,
        &mut Writeback::new(file, 0),
        &mut hasher,
        h.size,
        |_| {},
    ) {
        Ok(n) if n == h.size => {}
        Ok(_) => {
            return Err(Response::text(
                422,
                "bad delta: shorter than the header says",
            ));
        }
        Err(CopyError::Read(e)) => return Err(bad(e)),
        Err(CopyError::Write(e)) => return Err(write_error(e)),
    }
    // The end record: the delta's own checksum.
    if patch.read(&mut [0u8; 1]).map_err(bad)? != 0 {
        return Err(Response::text(
            422,
            "bad delta: longer than the header says",
        ));
    }
    let got = hasher.hex();
    if got != want {
        return Err(Response::text(
            422,
            format!("sha256 mismatch: the patched file has {got}, header says {want}"),
        ));
    }
    // The old version unchanged, and still the file at PATH (not replaced
    // by another upload meanwhile).
    let same_file = old.metadata().map(|m| crate::beneath::identity(&m)).ok() == Some(id)
        && dir.stat(name).ok().flatten().map(|m| m.identity) == Some(id);
    if !same_file {
        return Err(changed());
    }
    set_meta_and_sync(file, asked.or_mode(0o644)).map_err(write_error)?;
    temp.persist(name).map_err(write_error)?;
    // The rename took the old version's last name; closing it frees its
    // blocks, which for a large file takes a while (0.3 s for 1 GiB on
    // ext4 with discard). The answer need not wait for that.
    std::thread::spawn(move || drop(old));
    Ok(())
}

/// Partial uploads live in the target's directory under reserved names
/// (never listed, never served): `.bitfog-part-ID` holds the bytes so far
/// and `.bitfog-part-ID.json` what they are (`PartialUpload`, with the
/// last component as `name`). ID is a hash of the name, size and SHA-256,
/// so a changed source file starts a new partial upload.
const PART_PREFIX: &str = ".bitfog-part-";

fn part_names(name: &[u8], size: u64, sha: &str) -> (Vec<u8>, Vec<u8>) {
    let mut h = Hasher::new();
    h.update(name);
    h.update(format!("\0{size}\0{sha}").as_bytes());
    let id = format!("{PART_PREFIX}{}", &h.hex()[..24]);
    (id.clone().into_bytes(), format!("{id}.json").into_bytes())
}

/// True while a range is being written to the partial upload `name` (its
/// data or record) in `dir`.
fn part_busy(dir: &Dir, name: &[u8]) -> bool {
    let data = name.strip_suffix(b".json").unwrap_or(name);
    let key = [dir.path.as_os_str().as_bytes(), b"/", data].concat();
    busy_parts().lock().map_or(true, |b| b.contains(&key))
}

/// Partial uploads being written right now; a second PUT for the same one
/// waits its turn by being refused (409).
fn busy_parts() -> &'static Mutex<HashSet<Vec<u8>>> {
    static BUSY: OnceLock<Mutex<HashSet<Vec<u8>>>> = OnceLock::new();
    BUSY.get_or_init(Default::default)
}

/// `PUT` with `Content-Range: bytes A-B/LEN`: one range of a file that
/// arrives over several trips. The range is appended to the partial upload
/// (bytes it already has are skipped, so a retried range is harmless; a
/// gap is refused with 409), made durable, and answered with 202 and
/// `X-Bitfog-Have`. The range that completes the file makes the whole of
/// it be hashed: it appears at PATH (204) only if it matches
/// `X-Bitfog-Sha256`; otherwise the partial upload is dropped (422).
fn put_range(
    dir: &Dir,
    name: &[u8],
    range: &str,
    req: &mut Request,
    asked: Want,
) -> std::result::Result<Response, Response> {
    let (a, b, size) = protocol::parse_content_range(range)
        .filter(|&(a, b, size)| a <= b && b < size)
        .ok_or_else(|| Response::text(400, format!("bad Content-Range: '{range}'")))?;
    if req.content_length() != b - a + 1 {
        return Err(Response::text(
            400,
            "Content-Length does not match Content-Range",
        ));
    }
    let want = required_sha(
        req,
        "a range upload needs X-Bitfog-Sha256 (the whole file's)",
    )?;
    let (part_name, state_name) = part_names(name, size, &want);
    let key = [dir.path.as_os_str().as_bytes(), b"/", &part_name].concat();
    if !busy_parts()
        .lock()
        .map(|mut b| b.insert(key.clone()))
        .unwrap_or(false)
    {
        return Err(Response::text(
            409,
            "another upload of this file is in progress",
        ));
    }
    struct Release(Vec<u8>);
    impl Drop for Release {
        fn drop(&mut self) {
            if let Ok(mut b) = busy_parts().lock() {
                b.remove(&self.0);
            }
        }
    }
    let _release = Release(key);

    let mut have = dir
        .open_read(&state_name)
        .ok()
        .and_then(|f| serde_json::from_reader::<_, PartialUpload>(f).ok())
        .filter(|p| p.size == size && p.sha256 == want && p.name.as_bytes() == name)
        .map_or(0, |p| p.have);
    let part = dir.open_rw(&part_name).map_err(write_error)?;
    if part.metadata().map_err(write_error)?.len() < have {
        have = 0; // the bytes the record promises are gone: start over
    }
    let answer = |have: u64| {
        Response::new(202, Body::Empty).with(protocol::HDR_HAVE_HEADER, have.to_string())
    };
    if a > have {
        return Err(Response::text(
            409,
            format!("range starts at {a}, but the server has {have} bytes of this file"),
        )
        .with(protocol::HDR_HAVE_HEADER, have.to_string()));
    }
    let skip = have - a;
    let len = b - a + 1;
    if skip >= len {
        let _ = io::copy(&mut (&mut req.body).take(len), &mut io::sink());
        return Ok(answer(have));
    }
    io::copy(&mut (&mut req.body).take(skip), &mut io::sink())
        .map_err(|_| Response::text(400, "request body cut short"))?;
    part.set_len(have).map_err(write_error)?;
    let mut out = Writeback::new(&part, have);
    (&part)
        .seek(io::SeekFrom::Start(have))
        .map_err(write_error)?;
    let mut ignored = Hasher::new();
    match copy_hashing(&mut req.body, &mut out, &mut ignored, len - skip, |_| {}) {
        Ok(n) if n == len - skip => {}
        Ok(_) | Err(CopyError::Read(_)) => {
            return Err(Response::text(400, "request body cut short"));
        }
        Err(CopyError::Write(e)) => return Err(write_error(e)),
    }
    part.sync_all().map_err(write_error)?;
    have = b + 1;
    if have < size {
        let state = PartialUpload {
            name: String::from_utf8_lossy(name).into_owned(),
            size,
            sha256: want,
            have,
        };
        let temp = TempFile::create(dir).map_err(write_error)?;
        let f = temp.file.as_ref().expect("fresh temp file");
        (&*f)
            .write_all(&serde_json::to_vec(&state).unwrap_or_default())
            .and_then(|()| f.sync_all())
            .map_err(write_error)?;
        temp.persist(&state_name).map_err(write_error)?;
        return Ok(answer(have));
    }
    // The last range: the whole file must match before it appears.
    (&part).seek(io::SeekFrom::Start(0)).map_err(write_error)?;
    let (got, n) = crate::digest::hash_reader(&part).map_err(write_error)?;
    if n != size || got != want {
        let _ = dir.unlink(&part_name);
        let _ = dir.unlink(&state_name);
        return Err(Response::text(
            422,
            format!(
                "sha256 mismatch: the assembled file has {got}, header says {want}; the partial upload is dropped"
            ),
        ));
    }
    set_meta_and_sync(&part, asked.or_mode(0o644)).map_err(write_error)?;
    dir.rename(&part_name, name).map_err(write_error)?;
    let _ = dir.unlink(&state_name);
    Ok(Response::new(204, Body::Empty))
}

/// The `X-Bitfog-Sha256` a request cannot do without, lowercased; a 400
/// saying `why` when it is missing or not a SHA-256.
fn required_sha(req: &Request, why: &str) -> std::result::Result<String, Response> {
    req.header(protocol::HDR_SHA256)
        .map(str::to_ascii_lowercase)
        .filter(|h| is_sha256_hex(h))
        .ok_or_else(|| Response::text(400, why))
}

/// Whether the request's Content-Type (parameters aside) is `ty`.
fn content_type_is(req: &Request, ty: &str) -> bool {
    req.header("content-type").is_some_and(|t| {
        t.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(ty)
    })
}

/// What a write asks to be set besides its content: the mode, the mtime
/// (seconds, with `X-Bitfog-Mtime-Ns` its nanoseconds) and, in an area
/// that applies owners, the owner and group (`X-Bitfog-Owner: UID:GID`,
/// with `X-Bitfog-Owner-Names: USER:GROUP` a name this system knows
/// standing for its own id).
#[derive(Debug, Clone, Copy, Default)]
struct Want {
    mode: Option<u32>,
    mtime: Option<(i64, u32)>,
    owner: Option<(u32, u32)>,
}

impl Want {
    fn of(
        req: &Request,
        owners: Option<&crate::owners::Names>,
    ) -> std::result::Result<Want, Response> {
        Want::of_headers(&|n| req.header(n), owners)
    }

    /// From headers as `get` gives them: a request's, or an item's of
    /// `POST /AREA/?put`.
    fn of_headers<'h>(
        get: &dyn Fn(&str) -> Option<&'h str>,
        owners: Option<&crate::owners::Names>,
    ) -> std::result::Result<Want, Response> {
        let mode: Option<u32> = num_of(get, protocol::HDR_MODE)?;
        let secs: Option<i64> = num_of(get, protocol::HDR_MTIME)?;
        let ns: Option<u32> = num_of(get, protocol::HDR_MTIME_NS)?;
        if ns.is_some_and(|n| n > 999_999_999) {
            return Err(Response::text(
                400,
                format!("bad {} header: over a second", protocol::HDR_MTIME_NS),
            ));
        }
        let owner = match owners {
            Some(names) => owner_of(get, names)?,
            None => None,
        };
        Ok(Want {
            mode,
            mtime: secs.map(|t| (t, ns.unwrap_or(0))),
            owner,
        })
    }

    /// With `mode` where the request names none.
    fn or_mode(self, mode: u32) -> Want {
        Want {
            mode: Some(self.mode.unwrap_or(mode)),
            ..self
        }
    }
}

/// The owner and group a write asks for, by this system's ids.
fn owner_of<'h>(
    get: &dyn Fn(&str) -> Option<&'h str>,
    names: &crate::owners::Names,
) -> std::result::Result<Option<(u32, u32)>, Response> {
    let bad = |h: &str| Response::text(400, format!("bad {h} header: expected A:B"));
    let Some(ids) = get(protocol::HDR_OWNER) else {
        return Ok(None);
    };
    let (u, g) = ids
        .split_once(':')
        .ok_or_else(|| bad(protocol::HDR_OWNER))?;
    let (mut uid, mut gid): (u32, u32) = match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => (u, g),
        _ => return Err(bad(protocol::HDR_OWNER)),
    };
    if let Some(n) = get(protocol::HDR_OWNER_NAMES) {
        let (user, group) = n
            .split_once(':')
            .ok_or_else(|| bad(protocol::HDR_OWNER_NAMES))?;
        uid = names.uid_of(user).unwrap_or(uid);
        gid = names.gid_of(group).unwrap_or(gid);
    }
    Ok(Some((uid, gid)))
}

/// Sets the owner, the mode (setuid, setgid and sticky dropped) and the
/// mtime a request asked for, then makes the file durable. (The owner
/// goes first: a chown may clear setuid bits, and the mode is set after.)
fn set_meta_and_sync(file: &File, want: Want) -> io::Result<()> {
    set_meta(file, want)?;
    file.sync_all()
}

/// Sets the owner, the mode and the mtime a request asked for.
fn set_meta(file: &File, want: Want) -> io::Result<()> {
    if let Some((uid, gid)) = want.owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    if let Some(m) = want.mode {
        file.set_permissions(fs::Permissions::from_mode(m & 0o777))?;
    }
    if let Some((t, ns)) = want.mtime {
        file.set_modified(epoch_plus(t) + Duration::from_nanos(u64::from(ns.min(999_999_999))))?;
    }
    Ok(())
}

fn epoch_plus(t: i64) -> SystemTime {
    if t >= 0 {
        UNIX_EPOCH + Duration::from_secs(t as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.unsigned_abs())
    }
}

fn header_num<T: std::str::FromStr>(
    req: &Request,
    name: &str,
) -> std::result::Result<Option<T>, Response> {
    num_of(&|n| req.header(n), name)
}

fn num_of<'h, T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<&'h str>,
    name: &str,
) -> std::result::Result<Option<T>, Response> {
    match get(name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| Response::text(400, format!("bad {name} header: '{v}'"))),
    }
}

fn write_error(e: io::Error) -> Response {
    if is_disk_full(&e) {
        Response::text(507, "insufficient storage")
    } else if e.raw_os_error() == Some(libc::EISDIR) {
        Response::text(409, "a directory exists at this path")
    } else {
        Response::text(500, format!("write failed: {}", describe_io(&e)))
    }
}

fn put_file(
    dir: &Dir,
    name: &[u8],
    req: &mut Request,
    asked: Want,
) -> std::result::Result<(), Response> {
    let want_hash = match req.header(protocol::HDR_SHA256) {
        Some(h) if is_sha256_hex(&h.to_ascii_lowercase()) => Some(h.to_ascii_lowercase()),
        Some(h) => {
            return Err(Response::text(
                400,
                format!("bad {} header: '{h}'", protocol::HDR_SHA256),
            ));
        }
        None => None,
    };
    let len = req.content_length();
    let temp = TempFile::create(dir).map_err(write_error)?;
    let mut hasher = Hasher::new();
    let file = temp.file.as_ref().expect("fresh temp file");
    // Writing on a thread of its own keeps the socket read while the
    // disk stalls under writeback.
    match crate::digest::copy_hashing_apart(
        &mut req.body,
        &mut Writeback::new(file, 0),
        &mut hasher,
        len,
        |_| {},
    ) {
        Ok(n) if n == len => {}
        Ok(_) | Err(CopyError::Read(_)) => {
            return Err(Response::text(400, "request body cut short"));
        }
        Err(CopyError::Write(e)) => {
            // Read the rest of a modest body so the client, still sending,
            // gets our answer instead of a connection reset.
            if len <= DRAIN_LIMIT {
                let _ = io::copy(&mut req.body, &mut io::sink());
            }
            return Err(write_error(e));
        }
    }
    let got = hasher.hex();
    if let Some(want) = want_hash {
        if got != want {
            return Err(Response::text(
                422,
                format!("sha256 mismatch: body has {got}, header says {want}"),
            ));
        }
    }
    let file = temp.file.as_ref().expect("fresh temp file");
    set_meta_and_sync(file, asked.or_mode(0o644)).map_err(write_error)?;
    temp.persist(name).map_err(write_error)
}

fn delete(root: &Root, comps: &[&[u8]]) -> Response {
    let dir = match parent_dir(root, comps, false) {
        Ok(d) => d,
        Err(resp) => return resp,
    };
    match dir.kind(last(comps)) {
        Ok(None) | Err(_) => return Response::text(404, "not found"),
        // An empty directory goes (store --delete removes the ones the
        // source does not have); one with anything in it stays.
        Ok(Some(Kind::Dir)) => {
            return match dir.rmdir(last(comps)) {
                Ok(()) => {
                    dir.sync();
                    Response::new(204, Body::Empty)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Response::text(404, "not found"),
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    Response::text(409, "a directory that is not empty exists at this path")
                }
                Err(e) => Response::text(500, format!("delete failed: {}", describe_io(&e))),
            };
        }
        Ok(Some(_)) => {}
    }
    match dir.unlink(last(comps)) {
        Ok(()) => {
            dir.sync();
            Response::new(204, Body::Empty)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Response::text(404, "not found"),
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            Response::text(409, "a directory exists at this path")
        }
        Err(e) => Response::text(500, format!("delete failed: {}", describe_io(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr(":8675").unwrap().to_string(), "0.0.0.0:8675");
        assert_eq!(
            parse_addr("127.0.0.1:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(parse_addr("[::1]:80").unwrap().to_string(), "[::1]:80");
        for bad in ["8675", ":", ":99999", "host", ":-1"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_in_the_order_of_precedence() {
        let area = |writable| Area {
            root: PathBuf::from("/nonexistent"),
            writable,
            checksum: true,
            token: None,
            owners: false,
            exclude: Default::default(),
        };
        let config: Config = [
            ("ro".to_string(), area(false)),
            ("rw".to_string(), area(true)),
        ]
        .into_iter()
        .collect();
        let go = |method: &str, target: &str| {
            let r = route(&config, method, target);
            let what = match &r.route {
                Route::Index => "index".to_string(),
                Route::Listing { dirs, .. } => format!("listing dirs={dirs:?}"),
                Route::File(op, comps) => format!("{op:?} {}", comps.join(&b'/').escape_ascii()),
                Route::Answer(resp) => resp.status.to_string(),
                Route::Files => "files".to_string(),
                Route::Puts => "puts".to_string(),
                Route::Page { comps, otherwise } => format!(
                    "page {} or {}",
                    comps.join(&b'/').escape_ascii(),
                    otherwise.status
                ),
            };
            (r.area, what)
        };
        let none = |w: &str| (None, w.to_string());
        let ro = |w: &str| (Some("ro".to_string()), w.to_string());
        let rw = |w: &str| (Some("rw".to_string()), w.to_string());
        assert_eq!(go("GET", "/"), none("index"));
        assert_eq!(go("POST", "/"), none("405"));
        assert_eq!(go("GET", "relative"), none("400"));
        assert_eq!(go("GET", "/%zz/"), none("400"));
        assert_eq!(go("GET", "/missing/x"), none("404"));
        assert_eq!(go("GET", "/ro/"), ro("listing dirs=No"));
        assert_eq!(go("GET", "/ro/?dirs=1"), ro("listing dirs=Empty"));
        assert_eq!(go("GET", "/ro/?dirs=1&alldirs=1"), ro("listing dirs=All"));
        assert_eq!(go("GET", "/ro/?alldirs=1"), ro("listing dirs=No"));
        assert_eq!(
            go("PUT", "/rw/").1.trim(),
            "Put",
            "a directory PUT sets the root's meta"
        );
        assert_eq!(go("DELETE", "/rw/"), rw("405"));
        assert_eq!(go("PUT", "/ro/"), ro("405"));
        // A bad path is answered only after the area's token was checked.
        assert_eq!(go("GET", "/ro/a/../b"), ro("400"));
        assert_eq!(go("GET", "/ro/a/b/"), ro("page a/b or 400"));
        assert_eq!(go("HEAD", "/ro/a%20b/"), ro("page a b or 400"));
        assert_eq!(go("PUT", "/rw/a/"), rw("400"));
        assert_eq!(go("GET", "/ro/.bitfog-x/"), ro("400"));
        assert_eq!(go("GET", "/ro/a//"), ro("400"));
        assert_eq!(go("GET", "/ro/a%2f..%2fb"), ro("400"));
        assert_eq!(go("GET", "/ro/a/b?extents"), ro("Extents a/b"));
        assert_eq!(go("GET", "/ro/a/b?signature"), ro("Signature a/b"));
        assert_eq!(go("HEAD", "/ro/a%20b"), ro("Get a b"));
        assert_eq!(go("GET", "/ro/.bitfog-x/y"), ro("404"));
        assert_eq!(go("GET", "/ro/.bitfog-x/y?signature"), ro("404"));
        assert_eq!(go("PUT", "/ro/x"), ro("405"));
        assert_eq!(go("PUT", "/ro/.bitfog/x"), ro("405"));
        assert_eq!(go("PUT", "/rw/.bitfog/x"), rw("400"));
        assert_eq!(go("DELETE", "/rw/a/.bitfog-part-1"), rw("400"));
        assert_eq!(go("PUT", "/rw/x"), rw("Put x"));
        assert_eq!(go("DELETE", "/rw/d/x"), rw("Delete d/x"));
        assert_eq!(go("POST", "/rw/x"), rw("405"));
        assert_eq!(go("POST", "/ro/?files"), ro("files"));
        assert_eq!(go("POST", "/ro/"), ro("405"));
        assert_eq!(go("POST", "/ro/x?files"), ro("405"));
        assert_eq!(go("POST", "/missing/?files"), none("404"));
        assert_eq!(go("POST", "/rw/?put"), rw("puts"));
        assert_eq!(go("POST", "/ro/?put"), ro("405"));
    }

    #[test]
    fn tokens_match_exactly() {
        assert!(token_matches("s3cret", "s3cret"));
        for wrong in ["", "s3cre", "s3cret ", "S3cret", "s3cret\0"] {
            assert!(!token_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer("bearer   s3cret"), Some("s3cret"));
        assert_eq!(bearer("Basic s3cret"), None);
        assert_eq!(bearer("Bearers3cret"), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn area_names() {
        assert!(crate::wire::paths::valid_area_name("vm_images-2.x"));
        for bad in ["", ".", "..", "a/b", "a b", "é"] {
            assert!(!crate::wire::paths::valid_area_name(bad), "{bad}");
        }
    }

    #[test]
    fn config_errors_name_file_area_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("bitfog.json");
        let area = dir.path().display();
        for (text, needle) in [
            ("{", "invalid JSON"),
            (
                &format!("{{\"a\":{{\"path\":\"{area}\",\"pth\":1}}}}"),
                "area 'a': unknown key 'pth'",
            ),
            (
                &format!("{{\"a\":{{\"path\":\"{area}\",\"writable\":\"yes\"}}}}"),
                "area 'a': key 'writable'",
            ),
            (
                "{\"a\":{\"path\":\"/nonexistent/x\"}}",
                "area 'a': key 'path'",
            ),
            ("{\"a\":{}}", "missing key 'path'"),
            (
                &format!("{{\"a b\":{{\"path\":\"{area}\"}}}}"),
                "area 'a b'",
            ),
        ] {
            fs::write(&conf, text).unwrap();
            let err = load_config(&conf).unwrap_err();
            assert_eq!(err.exit, crate::error::Exit::Usage);
            let msg = err.to_string();
            assert!(msg.contains("bitfog.json") && msg.contains(needle), "{msg}");
        }
    }
}
