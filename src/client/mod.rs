//! The HTTP client: one ureq agent with explicit timeouts, no redirects,
//! and one function per endpoint.
//!
//! Every response body read into memory is capped; listings stream
//! through the validating manifest reader. HTTP failures become errors
//! that name the URL and the server's one-line reason.

mod ssh;

pub(crate) use ssh::Options as SshOptions;

use crate::error::{Error, Result};
use crate::wire::manifest::{Entry, Reader};
use crate::wire::protocol::{self, percent_encode_path};
use std::io::{self, BufRead, BufReader, Read};
use std::time::Duration;
use ureq::BodyReader;

/// A URL that names an area: `http://host:port/AREA/`, behind a reverse
/// proxy under a path prefix, `https://host/PREFIX/AREA/` (the last
/// component is the area), or over ssh, `ssh://[user@]host[:port]/AREA/`.
#[derive(Debug, Clone)]
pub(crate) struct AreaUrl {
    /// As messages and DBs show it.
    base: String,
    /// Where requests go: `base`, or an ssh area's stand-in (see `ssh`).
    request: String,
}

impl AreaUrl {
    /// Whether requests go over ssh (`ssh://`).
    pub(crate) fn is_ssh(&self) -> bool {
        self.base.starts_with("ssh://")
    }

    /// Parses and normalises an area URL (exit 2 when it is not one).
    pub(crate) fn parse(s: &str) -> Result<AreaUrl> {
        let bad = |why: &str| {
            Error::usage(format!(
                "'{s}': not an area URL ({why}); expected http://HOST:PORT/AREA/ or ssh://[USER@]HOST[:PORT]/AREA/"
            ))
        };
        let rest = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .or_else(|| s.strip_prefix("ssh://"))
            .ok_or_else(|| bad("scheme must be http, https or ssh"))?;
        let is_ssh = s.starts_with("ssh://");
        let (host, path) = rest.split_once('/').ok_or_else(|| bad("no area"))?;
        let stand_in = if is_ssh {
            Some(ssh::register(host).map_err(bad)?)
        } else {
            if host.is_empty() || host.contains(['@', '?', '#']) {
                return Err(bad("bad host"));
            }
            None
        };
        let path = path.strip_suffix('/').unwrap_or(path);
        let (prefix, area) = match path.rsplit_once('/') {
            Some(("", _)) => return Err(bad("empty path component")),
            Some((prefix, area)) => (prefix, area),
            None => ("", path),
        };
        if !crate::wire::paths::valid_area_name(area) {
            return Err(bad("bad area name"));
        }
        // A proxy's path prefix: plain path components, sent as they are.
        let prefix_ok = prefix.split('/').all(|c| {
            prefix.is_empty()
                || (!c.is_empty()
                    && c != "."
                    && c != ".."
                    && !c.contains(['?', '#', '\\'])
                    && !c.bytes().any(|b| b.is_ascii_control() || b == b' '))
        });
        if !prefix_ok {
            return Err(bad("bad path prefix"));
        }
        if is_ssh && !prefix.is_empty() {
            return Err(bad("over ssh the area comes right after the host"));
        }
        let scheme = &s[..s.len() - rest.len()];
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(match stand_in {
            Some((stand_in, shown)) => AreaUrl {
                base: format!("{shown}/{prefix}{area}/"),
                request: format!("http://{stand_in}/{prefix}{area}/"),
            },
            None => {
                let base = format!("{scheme}{host}/{prefix}{area}/");
                AreaUrl {
                    request: base.clone(),
                    base,
                }
            }
        })
    }

    /// The URL as the user gave it (normalised), for messages and DBs.
    pub(crate) fn as_str(&self) -> &str {
        &self.base
    }

    /// Where the area's requests go.
    fn request(&self) -> &str {
        &self.request
    }

    /// The URL a file's requests go to.
    pub(crate) fn file(&self, name: &str) -> String {
        format!("{}{}", self.request, percent_encode_path(name))
    }
}

/// The headers of an extended manifest's metadata: the mtime's
/// nanoseconds, and the owner by id and by name (applied where the
/// destination area says `"owners": true`).
fn more_meta<B>(
    mut req: ureq::RequestBuilder<B>,
    m: &crate::wire::manifest::MoreMeta,
) -> ureq::RequestBuilder<B> {
    for (name, value) in meta_headers(m) {
        req = req.header(name, value);
    }
    req
}

/// The headers of `MoreMeta`: the mtime's nanoseconds, and the owner by
/// id and by name.
fn meta_headers(m: &crate::wire::manifest::MoreMeta) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if m.mtime_ns != 0 {
        out.push((protocol::HDR_MTIME_NS, m.mtime_ns.to_string()));
    }
    if let (Some(uid), Some(gid)) = (m.uid, m.gid) {
        out.push((protocol::HDR_OWNER, format!("{uid}:{gid}")));
        if m.user.is_some() || m.group.is_some() {
            out.push((
                protocol::HDR_OWNER_NAMES,
                format!(
                    "{}:{}",
                    m.user.as_deref().unwrap_or(""),
                    m.group.as_deref().unwrap_or("")
                ),
            ));
        }
    }
    out
}

/// What became of one file of `POST /AREA/?put`: its name and outcome.
pub(crate) type Stored = (String, std::result::Result<(), Refused>);

/// A piece of a `POST /AREA/?put` body.
enum PutPart {
    Bytes(Vec<u8>),
    /// A file and the bytes of it to send.
    File(std::fs::File, u64),
}

/// The body of `POST /AREA/?put`: heads and files, one after another. A
/// file shorter than said ends the body early (the server refuses it all).
struct PutBody {
    parts: std::collections::VecDeque<PutPart>,
}

impl Read for PutBody {
    /// Fills `buf` across parts, so that many small files go out in one
    /// write rather than a write each for every head and file.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(part) = self.parts.front_mut() else {
                break;
            };
            let out = &mut buf[filled..];
            let (n, empty) = match part {
                PutPart::Bytes(b) => {
                    let n = b.len().min(out.len());
                    out[..n].copy_from_slice(&b[..n]);
                    b.drain(..n);
                    (n, b.is_empty())
                }
                PutPart::File(f, left) => {
                    let want = (*left).min(out.len() as u64) as usize;
                    let n = f.read(&mut out[..want])?;
                    if n == 0 && want > 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a courier file shrank while it was sent",
                        ));
                    }
                    *left -= n as u64;
                    (n, *left == 0)
                }
            };
            if empty {
                self.parts.pop_front();
            }
            filled += n;
        }
        Ok(filled)
    }
}

/// A SHA-256 no body of a link request has: an older server refuses it.
const NO_SUCH_SHA256: &str = "4ee6f18ee3e8a3c4cd5e3e6e4f1a6b7d1b3bbbe5b8e2a5ddcc2d6b57c3b4c1e9";

impl std::fmt::Display for AreaUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// The certificates of a PEM file (`--cacert`), to trust instead of the
/// bundled roots: a CA, or a proxy's self-signed certificate. Exit 2 when
/// the file cannot be read or holds none.
pub(crate) fn load_roots(path: &std::path::Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let what = format!("'{}'", path.display());
    let pem = std::fs::read(path)
        .map_err(|e| Error::usage(format!("{what}: {}", crate::error::describe_io(&e))))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(Error::usage(format!("{what}: {e}"))),
        }
    }
    if certs.is_empty() {
        return Err(Error::usage(format!("{what}: no PEM certificate in it")));
    }
    Ok(certs)
}

fn area_id_of<B>(resp: &ureq::http::Response<B>) -> Option<String> {
    resp.headers()
        .get(crate::wire::protocol::AREA_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
}

/// An HTTP answer that was not a success: status and the server's reason.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

impl Refused {
    /// `HTTP STATUS: TEXT` (the server's one-line reason), or `HTTP STATUS`.
    fn of(status: u16, text: &str) -> Refused {
        let line = text.lines().next().unwrap_or("").trim();
        let mut reason = if line.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {line}")
        };
        if status == 401 {
            reason.push_str(" (give this area's token with --token, or set BITFOG_TOKEN)");
        }
        Refused { status, reason }
    }
}

/// A download in progress.
pub(crate) struct Download {
    pub(crate) status: u16,
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<i64>,
    /// `(start, end, total)` of a 206.
    pub(crate) content_range: Option<(u64, u64, u64)>,
    pub(crate) content_length: Option<u64>,
    pub(crate) body: Stall<BodyReader<'static>>,
}

pub(crate) struct Client {
    /// For http:// and https:// areas.
    http: ureq::Agent,
    /// For ssh:// areas (see `ssh`).
    ssh: ureq::Agent,
    token: Option<String>,
    /// Names listings leave out (`--exclude`).
    pub(crate) exclude: crate::wire::exclude::Excludes,
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long any single read or write may block. Listings send an empty
/// line every few seconds while the server hashes, so this only fires on
/// a server that is truly stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    /// A client sending `token` (if any), trusting `roots` (if given:
    /// those certificates instead of the bundled WebPKI roots, as curl's
    /// `--cacert` does).
    pub(crate) fn new(
        token: Option<String>,
        roots: Option<&[ureq::tls::Certificate<'static>]>,
        ssh: ssh::Options,
    ) -> Client {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(certs) = roots {
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(certs));
        }
        let tls = tls.build();
        let config = || {
            ureq::Agent::config_builder()
                .tls_config(tls.clone())
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_per_read(Some(IO_TIMEOUT))
                .timeout_per_write(Some(IO_TIMEOUT))
                .max_redirects(0)
                .http_status_as_error(false)
                .user_agent(concat!("bitfog/", env!("CARGO_PKG_VERSION")))
                .max_idle_connections_per_host(32)
        };
        Client {
            ssh: ssh::agent(config(), ssh),
            http: config().build().into(),
            token,
            exclude: Default::default(),
        }
    }

    /// A client whose listings leave out the names `exclude` matches.
    pub(crate) fn excluding(mut self, exclude: crate::wire::exclude::Excludes) -> Client {
        self.exclude = exclude;
        self
    }

    /// The agent that reaches `url`.
    fn agent(&self, url: &str) -> &ureq::Agent {
        if ssh::is_stand_in(url) {
            &self.ssh
        } else {
            &self.http
        }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// Streams and validates an area's listing.
    /// The area's listing, with its directories (`?dirs=1&alldirs=1`:
    /// every one from a server that knows `alldirs`, else the empty ones)
    /// and the extended metadata (`meta=1`: owners, nanoseconds).
    pub(crate) fn listing(
        &self,
        area: &AreaUrl,
    ) -> Result<Reader<BufReader<Stall<BodyReader<'static>>>>> {
        let url = format!("{}?dirs=1&alldirs=1&meta=1", area.request());
        let resp = self
            .auth(self.agent(&url).get(&url))
            .call()
            .map_err(|e| transport(area.as_str(), e))?;
        let resp = success(area.as_str(), resp)?;
        let id = area_id_of(&resp);
        let owners = resp
            .headers()
            .get(crate::wire::protocol::OWNERS_HEADER)
            .map(|v| v.as_bytes() == b"1");
        let body = Stall::lines(resp.into_body().into_reader());
        let mut reader = Reader::new(
            BufReader::with_capacity(256 * 1024, body),
            area.as_str().to_string(),
        );
        reader.area_id = id;
        reader.extended = owners.is_some();
        reader.exclude = self.exclude.clone();
        reader.owners = owners == Some(true);
        Ok(reader)
    }

    /// The area's identity, asked with a `HEAD` of its listing (which
    /// lists nothing); `None` from a server too old to give one.
    pub(crate) fn area_id(&self, area: &AreaUrl) -> Result<Option<String>> {
        self.area_head(area).map(|(id, ..)| id)
    }

    /// The area's identity, whether its filesystem folds case (a server
    /// too old to say is taken as one that does not) and whether it takes
    /// writes (`None` from a server too old to say), from a `HEAD` of its
    /// listing.
    pub(crate) fn area_head(&self, area: &AreaUrl) -> Result<(Option<String>, bool, Option<bool>)> {
        let resp = self
            .auth(self.agent(area.request()).head(area.request()))
            .call()
            .map_err(|e| transport(area.as_str(), e))?;
        let status = resp.status();
        if status.is_success() {
            let folds = resp
                .headers()
                .get(crate::wire::protocol::FOLDS_CASE_HEADER)
                .is_some_and(|v| v.as_bytes() == b"1");
            let writable = resp
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').any(|m| m.trim() == "PUT"));
            return Ok((area_id_of(&resp), folds, writable));
        }
        // A refusal of a HEAD has no body to give its reason: the same
        // GET is refused the same way, before anything is listed.
        let why = (self.auth(self.agent(area.request()).get(area.request())))
            .call()
            .ok()
            .filter(|again| again.status() == status)
            .map_or_else(|| Refused::of(status.as_u16(), ""), reason);
        Err(Error::failed(format!(
            "{}: {}",
            ssh::shown(area.as_str()),
            why.reason
        )))
    }

    /// Where a sparse file's data is: `(size, [(start, len)])`.
    pub(crate) fn extents(&self, area: &AreaUrl, name: &str) -> Result<(u64, Vec<(u64, u64)>)> {
        #[derive(serde::Deserialize)]
        struct Extents {
            size: u64,
            extents: Vec<(u64, u64)>,
        }
        let url = format!("{}?extents", area.file(name));
        let resp = self
            .auth(self.agent(&url).get(&url))
            .call()
            .map_err(|e| transport(&url, e))?;
        let resp = success(&url, resp)?;
        let mut text = String::new();
        resp.into_body()
            .into_reader()
            .take(16 << 20)
            .read_to_string(&mut text)
            .map_err(|e| Error::failed(format!("{}: {e}", ssh::shown(&url))))?;
        let x: Extents = serde_json::from_str(&text)
            .map_err(|e| Error::failed(format!("{}: bad extent list: {e}", ssh::shown(&url))))?;
        Ok((x.size, x.extents))
    }

    /// A file's block signature (`?signature`): its header, record table
    /// and the file's SHA-256.
    pub(crate) fn signature(
        &self,
        area: &AreaUrl,
        name: &str,
    ) -> Result<(crate::wire::delta::SigHeader, Vec<u8>, String)> {
        use crate::wire::delta::{MAX_HEADER, SIGNATURE_TYPE, SigHeader};
        let url = format!("{}?signature", area.file(name));
        let resp = self
            .auth(self.agent(&url).get(&url))
            .call()
            .map_err(|e| transport(&url, e))?;
        let resp = success(&url, resp)?;
        let ty = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ty.eq_ignore_ascii_case(SIGNATURE_TYPE) {
            return Err(Error::failed(format!(
                "{}: the server does not make signatures (bitfog too old?)",
                ssh::shown(&url)
            )));
        }
        let fail = |why: String| Error::failed(format!("{}: {why}", ssh::shown(&url)));
        let mut r = BufReader::new(Stall::bytes(resp.into_body().into_reader()));
        let mut line = Vec::new();
        let read_line = |r: &mut BufReader<Stall<BodyReader<'static>>>, line: &mut Vec<u8>| {
            line.clear();
            r.by_ref()
                .take(MAX_HEADER as u64)
                .read_until(b'\n', line)
                .map_err(|e| fail(format!("signature cut short: {e}")))
        };
        read_line(&mut r, &mut line)?;
        let h: SigHeader =
            serde_json::from_slice(&line).map_err(|e| fail(format!("bad signature: {e}")))?;
        h.check()
            .map_err(|why| fail(format!("bad signature: {why}")))?;
        // Grown as it arrives: a header's promise allocates nothing.
        let mut table = Vec::new();
        let got = r
            .by_ref()
            .take(h.table_len())
            .read_to_end(&mut table)
            .map_err(|e| fail(format!("signature cut short: {e}")))?;
        if got as u64 != h.table_len() {
            return Err(fail("signature cut short".into()));
        }
        read_line(&mut r, &mut line)?;
        #[derive(serde::Deserialize)]
        struct End {
            sha256: String,
        }
        let end: End = serde_json::from_slice(&line).map_err(|_| {
            fail("signature cut short (the file changed while it was signed?)".into())
        })?;
        if !crate::digest::is_sha256_hex(&end.sha256) {
            return Err(fail("bad signature: no SHA-256".into()));
        }
        Ok((h, table, end.sha256))
    }

    /// GETs bytes `start..=end` of a file.
    pub(crate) fn get_range(
        &self,
        area: &AreaUrl,
        name: &str,
        start: u64,
        end: u64,
    ) -> Result<Download> {
        let url = area.file(name);
        let req = self
            .auth(self.agent(&url).get(&url))
            .header("Range", format!("bytes={start}-{end}"));
        let resp = req.call().map_err(|e| transport(&url, e))?;
        let resp = success(&url, resp)?;
        Ok(download(resp))
    }

    /// PUTs one range of a file bigger than a trip (`Content-Range`);
    /// answers the status (202 or 204) and the bytes the server holds.
    pub(crate) fn put_range(
        &self,
        area: &AreaUrl,
        e: &Entry,
        (start, len): (u64, u64),
        body: impl Read + Send + 'static,
    ) -> Result<std::result::Result<(u16, u64), Refused>> {
        let url = area.file(&e.name);
        let resp = self
            .auth(self.agent(&url).put(&url))
            .header("Content-Length", len.to_string())
            .header(
                "Content-Range",
                format!("bytes {start}-{}/{}", start + len - 1, e.size),
            )
            .header("Content-Type", "application/octet-stream")
            .header(protocol::HDR_SHA256, e.sha256.as_deref().unwrap_or(""))
            .header(protocol::HDR_MODE, (e.mode & 0o777).to_string())
            .header(protocol::HDR_MTIME, e.mtime.to_string());
        let resp = more_meta(resp, &e.meta)
            // ureq reads straight into its output buffer, which the body
            // fills across files.
            .send(ureq::SendBody::from_owned_reader(body.take(len)))
            .map_err(|e| transport(&url, e))?;
        let status = resp.status().as_u16();
        if status == 202 || status == 204 {
            let have = resp
                .headers()
                .get(protocol::HDR_HAVE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(protocol::parse_digits)
                .unwrap_or(if status == 204 { e.size } else { 0 });
            return Ok(Ok((status, have)));
        }
        Ok(Err(reason(resp)))
    }

    /// GETs a file from byte `from` (with `If-Range` when resuming).
    pub(crate) fn get(
        &self,
        area: &AreaUrl,
        name: &str,
        from: u64,
        if_range: Option<&str>,
    ) -> Result<Download> {
        let url = area.file(name);
        let mut req = self.auth(self.agent(&url).get(&url));
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
            if let Some(tag) = if_range {
                req = req.header("If-Range", tag);
            }
        }
        let resp = req.call().map_err(|e| transport(&url, e))?;
        let resp = success(&url, resp)?;
        Ok(download(resp))
    }

    /// Asks for many files in one answer (`POST /AREA/?files`); `None`
    /// from a server that does not know it (an older one answers 405),
    /// for the caller to GET each.
    pub(crate) fn get_files(&self, area: &AreaUrl, names: &[&str]) -> Result<Option<Files>> {
        let url = format!("{}?files", area.request());
        let mut body = String::new();
        for n in names {
            body.push_str(&percent_encode_path(n));
            body.push('\n');
        }
        let resp = self
            .auth(self.agent(&url).post(&url))
            .header("Content-Type", "text/plain")
            .send(body)
            .map_err(|e| transport(&url, e))?;
        let is_files = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes() == protocol::FILES_TYPE.as_bytes());
        match resp.status().as_u16() {
            200 if is_files => {}
            // An older server: it does not route the request, or answers
            // it as something else.
            200..=299 | 400 | 404 | 405 | 501 => return Ok(None),
            _ => {
                return Err(success(&url, resp)
                    .err()
                    .unwrap_or_else(|| Error::failed("")));
            }
        }
        Ok(Some(Files {
            body: BufReader::with_capacity(
                256 * 1024,
                Stall::bytes(resp.into_body().into_reader()),
            ),
            area: area.clone(),
        }))
    }

    /// Uploads many small regular files in one request (`POST
    /// /AREA/?put`), each with the headers its PUT would carry; every
    /// file must hold exactly its entry's size. The outcome of each, by
    /// name (the server answers in any order); `None` from a server that
    /// does not know the request (an older one answers 405), for the
    /// caller to PUT each.
    pub(crate) fn put_files(
        &self,
        area: &AreaUrl,
        files: Vec<(Entry, std::fs::File)>,
    ) -> Result<Option<Vec<Stored>>> {
        let url = format!("{}?put", area.request());
        let mut parts: Vec<PutPart> = Vec::new();
        let mut len = 0u64;
        let names: Vec<String> = files.iter().map(|(e, _)| e.name.clone()).collect();
        for (e, f) in files {
            let mut headers = serde_json::Map::new();
            let mut h = |k: &str, v: String| {
                headers.insert(k.to_string(), serde_json::Value::from(v));
            };
            h(protocol::HDR_MODE, (e.mode & 0o777).to_string());
            h(protocol::HDR_MTIME, e.mtime.to_string());
            if let Some(sha) = &e.sha256 {
                h(protocol::HDR_SHA256, sha.clone());
            }
            for (k, v) in meta_headers(&e.meta) {
                h(k, v);
            }
            let head = serde_json::json!({
                "name": percent_encode_path(&e.name),
                "size": e.size,
                "headers": headers,
            });
            let head = format!("{head}\n").into_bytes();
            len += head.len() as u64 + e.size;
            parts.push(PutPart::Bytes(head));
            parts.push(PutPart::File(f, e.size));
        }
        let end = b"{\"end\":true}\n".to_vec();
        len += end.len() as u64;
        parts.push(PutPart::Bytes(end));
        let body = PutBody {
            parts: parts.into(),
        };
        let resp = self
            .auth(self.agent(&url).post(&url))
            .header("Content-Length", len.to_string())
            .header("Content-Type", "application/x-bitfog-put")
            // ureq reads straight into its output buffer, which the body
            // fills across files.
            .send(ureq::SendBody::from_owned_reader(body.take(len)))
            .map_err(|e| transport(&url, e))?;
        match resp.status().as_u16() {
            200 => {}
            // An older server does not route it.
            404 | 405 | 501 => return Ok(None),
            _ => {
                // The request as a whole was refused (a full disk, a
                // token): each file shares the reason.
                let r = reason(resp);
                return Ok(Some(
                    names.into_iter().map(|n| (n, Err(r.clone()))).collect(),
                ));
            }
        }
        let mut text = String::new();
        resp.into_body()
            .into_reader()
            .take(16 << 20)
            .read_to_string(&mut text)
            .map_err(|e| Error::failed(format!("{}: {e}", ssh::shown(&url))))?;
        let mut out = Vec::new();
        let mut ended = false;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|_| Error::failed(format!("{}: a bad answer line", ssh::shown(&url))))?;
            if v.get("end").and_then(|e| e.as_bool()) == Some(true) {
                ended = true;
                break;
            }
            let name = v
                .get("name")
                .and_then(|n| n.as_str())
                .and_then(protocol::percent_decode)
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let status = v.get("status").and_then(|s| s.as_u64()).unwrap_or(0) as u16;
            let outcome = if (200..300).contains(&status) {
                Ok(())
            } else {
                let why = v.get("reason").and_then(|r| r.as_str()).unwrap_or("");
                Err(Refused::of(status, why))
            };
            out.push((name, outcome));
        }
        if !ended {
            return Err(Error::unreachable(format!(
                "{}: the answer was cut short",
                ssh::shown(&url)
            )));
        }
        Ok(Some(out))
    }

    /// PUTs a regular file with its hash, mode and mtime; `file` is
    /// read from its current position.
    pub(crate) fn put_file(
        &self,
        area: &AreaUrl,
        entry: &Entry,
        file: impl Read + Send + 'static,
    ) -> Result<std::result::Result<(), Refused>> {
        self.put_body(
            area,
            entry,
            "application/octet-stream",
            None,
            entry.size,
            file,
        )
    }

    /// PUTs a delta (`len` bytes of `body`) that makes `entry` from the
    /// destination's older version of it.
    pub(crate) fn put_delta(
        &self,
        area: &AreaUrl,
        entry: &Entry,
        body: impl Read + Send + 'static,
        len: u64,
    ) -> Result<std::result::Result<(), Refused>> {
        self.put_body(area, entry, crate::wire::delta::DELTA_TYPE, None, len, body)
    }

    /// PUTs `len` bytes of `body` for `entry` as `content_type`, with the
    /// entry's hash (when known), mode and mtime and the logical size
    /// when the body is not the content itself.
    fn put_body(
        &self,
        area: &AreaUrl,
        entry: &Entry,
        content_type: &str,
        size: Option<u64>,
        len: u64,
        body: impl Read + Send + 'static,
    ) -> Result<std::result::Result<(), Refused>> {
        let url = area.file(&entry.name);
        let mut req = self
            .auth(self.agent(&url).put(&url))
            .header("Content-Length", len.to_string())
            .header("Content-Type", content_type)
            .header(protocol::HDR_MODE, (entry.mode & 0o777).to_string())
            .header(protocol::HDR_MTIME, entry.mtime.to_string());
        req = more_meta(req, &entry.meta);
        if let Some(h) = &entry.sha256 {
            req = req.header(protocol::HDR_SHA256, h.as_str());
        }
        if let Some(n) = size {
            req = req.header(protocol::HDR_SIZE, n.to_string());
        }
        let body = BufReader::with_capacity(crate::digest::BUF_SIZE, body.take(len));
        let resp = req
            .send(ureq::SendBody::from_owned_reader(body))
            .map_err(|e| transport(&url, e))?;
        Ok(outcome(resp))
    }

    /// Asks the server to make `entry` from its own file `from` (or, when
    /// `from` is the entry's own name, to set only its mode and mtime),
    /// checked against the entry's SHA-256 (`X-Bitfog-From`).
    pub(crate) fn put_copy(
        &self,
        area: &AreaUrl,
        entry: &Entry,
        from: &str,
    ) -> Result<std::result::Result<(), Refused>> {
        let url = area.file(&entry.name);
        let resp = self
            .auth(self.agent(&url).put(&url))
            .header(protocol::HDR_FROM, protocol::percent_encode_path(from))
            .header(
                protocol::HDR_SHA256,
                entry.sha256.as_deref().unwrap_or_default(),
            )
            .header(protocol::HDR_MODE, (entry.mode & 0o777).to_string())
            .header(protocol::HDR_MTIME, entry.mtime.to_string());
        let resp = more_meta(resp, &entry.meta)
            .send(&[][..])
            .map_err(|e| transport(&url, e))?;
        Ok(outcome(resp))
    }

    /// Asks the server to make `entry` another name of its file `from` (a
    /// hard link, `X-Bitfog-Link`). The hash header is the file's: an
    /// older server, which would store the empty body, refuses instead.
    pub(crate) fn put_link(
        &self,
        area: &AreaUrl,
        entry: &Entry,
        from: &str,
    ) -> Result<std::result::Result<(), Refused>> {
        let url = area.file(&entry.name);
        let resp = self
            .auth(self.agent(&url).put(&url))
            .header(protocol::HDR_LINK, protocol::percent_encode_path(from))
            .header(protocol::HDR_SIZE, entry.size.to_string())
            .header(
                protocol::HDR_SHA256,
                entry.sha256.as_deref().unwrap_or(NO_SUCH_SHA256),
            )
            .send(&[][..])
            .map_err(|e| transport(&url, e))?;
        Ok(outcome(resp))
    }

    /// PUTs a sparse file as its framed data extents (`sparse`).
    pub(crate) fn put_sparse(
        &self,
        area: &AreaUrl,
        entry: &Entry,
        body: impl std::io::Read + Send + 'static,
        body_len: u64,
    ) -> Result<std::result::Result<(), Refused>> {
        let size = Some(entry.size);
        self.put_body(area, entry, protocol::EXTENTS_TYPE, size, body_len, body)
    }

    /// Makes an empty directory with its mode and mtime. The hash header
    /// cannot match the empty body, so a server that does not know the
    /// content type refuses (422) instead of making an empty file.
    pub(crate) fn put_dir(
        &self,
        area: &AreaUrl,
        d: &crate::wire::manifest::EmptyDir,
    ) -> Result<std::result::Result<(), Refused>> {
        const NOT_EMPTY: &str = "4ee6f18ee3e8a3c4cd5e3e6e4f1a6b7d1b3bbbe5b8e2a5ddcc2d6b57c3b4c1e9";
        let url = area.file(&d.name);
        let resp = self
            .auth(self.agent(&url).put(&url))
            .header("Content-Type", protocol::DIRECTORY_TYPE)
            .header(protocol::HDR_SHA256, NOT_EMPTY)
            .header(protocol::HDR_MODE, (d.mode & 0o777).to_string())
            .header(protocol::HDR_MTIME, d.mtime.to_string());
        let resp = more_meta(resp, &d.meta)
            .send(&[][..])
            .map_err(|e| transport(&url, e))?;
        Ok(outcome(resp))
    }

    /// PUTs a symlink.
    pub(crate) fn put_symlink(
        &self,
        area: &AreaUrl,
        e: &Entry,
    ) -> Result<std::result::Result<(), Refused>> {
        let url = area.file(&e.name);
        let target = e.linkdest.as_deref().unwrap_or_default();
        let resp = self
            .auth(self.agent(&url).put(&url))
            .header("Content-Type", protocol::SYMLINK_TYPE)
            .header(protocol::HDR_MTIME, e.mtime.to_string());
        let resp = more_meta(resp, &e.meta)
            .send(target.as_bytes())
            .map_err(|e| transport(&url, e))?;
        Ok(outcome(resp))
    }

    pub(crate) fn delete(
        &self,
        area: &AreaUrl,
        name: &str,
    ) -> Result<std::result::Result<(), Refused>> {
        let url = area.file(name);
        let resp = self
            .auth(self.agent(&url).delete(&url))
            .call()
            .map_err(|e| transport(&url, e))?;
        Ok(outcome(resp))
    }
}

/// An answer of many files (`Client::get_files`), read item by item.
pub(crate) struct Files {
    body: BufReader<Stall<BodyReader<'static>>>,
    area: AreaUrl,
}

/// One item of an answer of many files.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FilesItem {
    /// The file follows: `size` bytes (read them with `Files::body`).
    File { name: String, size: u64, mtime: i64 },
    /// Refused as a GET of it would be: `URL: HTTP STATUS: REASON`.
    Refused { name: String, why: String },
    /// The answer is complete.
    End,
}

impl Files {
    /// The next item's head. An error when the answer is cut short or
    /// is not one.
    pub(crate) fn next_item(&mut self) -> std::io::Result<FilesItem> {
        let mut line = Vec::new();
        (&mut self.body)
            .take(64 * 1024)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the answer was cut short",
            ));
        }
        let bad =
            || std::io::Error::new(std::io::ErrorKind::InvalidData, "a bad item in the answer");
        let v: serde_json::Value = serde_json::from_slice(&line).map_err(|_| bad())?;
        if v.get("end").and_then(|e| e.as_bool()) == Some(true) {
            return Ok(FilesItem::End);
        }
        let encoded = v.get("name").and_then(|n| n.as_str()).ok_or_else(bad)?;
        let name = protocol::percent_decode(encoded)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(bad)?;
        match v.get("status").and_then(|s| s.as_u64()).ok_or_else(bad)? {
            200 => Ok(FilesItem::File {
                size: v.get("size").and_then(|s| s.as_u64()).ok_or_else(bad)?,
                mtime: v.get("mtime").and_then(|s| s.as_i64()).ok_or_else(bad)?,
                name,
            }),
            status => {
                let reason = v.get("reason").and_then(|r| r.as_str()).unwrap_or("");
                let why = format!(
                    "{}: {}",
                    ssh::shown(&self.area.file(&name)),
                    Refused::of(status as u16, reason).reason
                );
                Ok(FilesItem::Refused { name, why })
            }
        }
    }

    /// Reads what is left of a complete answer (the chunked end), so
    /// that its connection can serve the next request: over ssh a
    /// connection dropped unread is a session to start again.
    pub(crate) fn finish(mut self) {
        let _ = io::copy(&mut (&mut self.body).take(64 * 1024), &mut io::sink());
    }

    /// The body of the item just read: exactly its `size` bytes.
    pub(crate) fn body(&mut self, size: u64) -> impl Read + '_ {
        (&mut self.body).take(size)
    }
}

fn download(resp: ureq::http::Response<ureq::Body>) -> Download {
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Download {
        status: resp.status().as_u16(),
        etag: header("etag"),
        last_modified: header("last-modified").and_then(|d| protocol::parse_http_date(&d)),
        content_range: header("content-range").and_then(|v| protocol::parse_content_range(&v)),
        content_length: header("content-length").and_then(|v| protocol::parse_digits(&v)),
        body: Stall::bytes(resp.into_body().into_reader()),
    }
}

/// A listing must complete a line at least this often: the server sends
/// an empty one every 10 s while it hashes.
const LINE_STALL: Duration = Duration::from_secs(60);
/// A body must bring `STALL_BYTES` at least this often.
const BODY_STALL: Duration = Duration::from_secs(300);
const STALL_BYTES: u64 = 16 << 10;

/// Ends a transfer that has stopped making progress, whatever trickle
/// keeps each read alive: a listing that completes no line in
/// `LINE_STALL`, a body that brings fewer than `STALL_BYTES` in
/// `BODY_STALL`. A server that drips a byte a minute cannot hold a client
/// forever. Only time spent waiting for the server counts, not time the
/// reader spends elsewhere (hashing a held file, say).
pub(crate) struct Stall<R> {
    inner: R,
    lines: bool,
    window: Duration,
    waited: Duration,
    got: u64,
}

impl<R> Stall<R> {
    pub(crate) fn lines(inner: R) -> Stall<R> {
        Stall {
            inner,
            lines: true,
            window: LINE_STALL,
            waited: Duration::ZERO,
            got: 0,
        }
    }

    pub(crate) fn bytes(inner: R) -> Stall<R> {
        Stall {
            lines: false,
            window: BODY_STALL,
            ..Stall::lines(inner)
        }
    }
}

impl<R: Read> Read for Stall<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let t = std::time::Instant::now();
        let n = self.inner.read(buf)?;
        self.waited += t.elapsed();
        self.got += n as u64;
        let progress = if self.lines {
            buf[..n].contains(&b'\n')
        } else {
            self.got >= STALL_BYTES
        };
        if progress || n == 0 {
            self.waited = Duration::ZERO;
            self.got = 0;
            return Ok(n);
        }
        if self.waited > self.window {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the server stalled: no progress for {} s",
                    self.window.as_secs()
                ),
            ));
        }
        Ok(n)
    }
}

fn transport(url: &str, e: ureq::Error) -> Error {
    let is_ssh = url.starts_with("ssh://") || ssh::is_stand_in(url);
    let url = ssh::shown(url);
    let lost = match &e {
        ureq::Error::Io(io) => crate::error::is_connection_lost(io),
        ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed => true,
        _ => false,
    };
    let what = match &e {
        // An ssh session's failure is its own sentence (see `ssh`).
        ureq::Error::Io(io) if is_ssh => io.to_string(),
        ureq::Error::Protocol(_) if is_ssh => format!(
            "{e}; the far end did not answer HTTP: is --remote-bitfog bitfog's 'serve --stdio'?"
        ),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "cannot connect: connection refused (is bitfog serve running there, on that port?)"
                .to_string()
        }
        // rustls meeting a plain HTTP answer to its hello.
        _ if url.starts_with("https://") && e.to_string().contains("InvalidContentType") => {
            format!("{e}: the server answers plain HTTP there; use http://")
        }
        _ => e.to_string(),
    };
    if lost {
        Error::unreachable(format!("{url}: {what}"))
    } else {
        Error::failed(format!("{url}: {what}"))
    }
}

/// Reads at most 1 KiB of an error body as the server's reason.
fn reason(resp: ureq::http::Response<ureq::Body>) -> Refused {
    let status = resp.status().as_u16();
    let mut text = String::new();
    let _ = resp
        .into_body()
        .into_reader()
        .take(1024)
        .read_to_string(&mut text);
    Refused::of(status, &text)
}

fn success(
    url: &str,
    resp: ureq::http::Response<ureq::Body>,
) -> Result<ureq::http::Response<ureq::Body>> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(Error::failed(format!(
            "{}: {}",
            ssh::shown(url),
            reason(resp).reason
        )))
    }
}

fn outcome(resp: ureq::http::Response<ureq::Body>) -> std::result::Result<(), Refused> {
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(reason(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives `chunk` once every `every`, forever.
    struct Drip {
        chunk: &'static [u8],
        every: Duration,
    }

    impl Read for Drip {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.every);
            let n = self.chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&self.chunk[..n]);
            Ok(n)
        }
    }

    #[test]
    fn a_dripping_server_is_cut_off() {
        let every = Duration::from_millis(20);
        let window = Duration::from_millis(200);
        let drain = |mut r: Stall<Drip>, reads: usize| {
            r.window = window;
            let mut buf = [0u8; 8192];
            (0..reads).try_for_each(|_| r.read(&mut buf).map(drop))
        };
        // Bytes without a line end, and a body's trickle: cut off.
        let e = drain(Stall::lines(Drip { chunk: b"x", every }), 100).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(drain(Stall::bytes(Drip { chunk: b"x", every }), 100).is_err());
        // A line at a time (keep-alive lines too), or enough bytes: fine.
        assert!(
            drain(
                Stall::lines(Drip {
                    chunk: b"\n",
                    every
                }),
                30
            )
            .is_ok()
        );
        let steady = Drip {
            chunk: &[0u8; 8192],
            every: Duration::from_millis(5),
        };
        assert!(drain(Stall::bytes(steady), 100).is_ok());
    }

    #[test]
    fn ssh_area_urls() {
        let u = AreaUrl::parse("ssh://me@nas:2222/vms").unwrap();
        assert_eq!(u.as_str(), "ssh://me@nas:2222/vms/");
        assert!(u.file("a b").ends_with(".ssh.bitfog.invalid/vms/a%20b"));
        assert!(ssh::is_stand_in(&u.file("a")));
        assert_eq!(ssh::shown(&u.file("a b")), "ssh://me@nas:2222/vms/a%20b");
        for bad in [
            "ssh://nas/p/vms/",
            "ssh://nas/",
            "ssh://-x/vms/",
            "ssh:///vms/",
        ] {
            assert!(AreaUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn area_urls() {
        assert_eq!(
            AreaUrl::parse("http://h:1/vms").unwrap().as_str(),
            "http://h:1/vms/"
        );
        assert_eq!(
            AreaUrl::parse("https://h/vms/").unwrap().as_str(),
            "https://h/vms/"
        );
        assert_eq!(
            AreaUrl::parse("http://h:1/vms/").unwrap().file("a b/c"),
            "http://h:1/vms/a%20b/c"
        );
        assert_eq!(
            AreaUrl::parse("https://nas.example/bitfog/vms/")
                .unwrap()
                .file("a b"),
            "https://nas.example/bitfog/vms/a%20b"
        );
        assert_eq!(
            AreaUrl::parse("https://h/p/q/vms").unwrap().as_str(),
            "https://h/p/q/vms/"
        );
        for bad in [
            "https://h//vms/",
            "https://h/../vms/",
            "https://h/a?b/vms/",
            "ftp://h/a/",
            "http://h",
            "http://h/",
            "http:///a/",
            "h:1/a/",
        ] {
            assert!(AreaUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
