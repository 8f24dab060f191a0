//! Wire details shared by server and client: header names, range parsing
//! and formatting, dates, percent-encoding. Pure functions, no I/O.

/// Request header carrying the content's SHA-256 (hex) on PUT.
pub(crate) const HDR_SHA256: &str = "x-bitfog-sha256";
/// Request header carrying permission bits (decimal) on PUT.
pub(crate) const HDR_MODE: &str = "x-bitfog-mode";
/// Request header carrying the mtime (seconds since the epoch) on PUT.
pub(crate) const HDR_MTIME: &str = "x-bitfog-mtime";
/// `PUT` with an empty body: make the path another name (a hard link) of
/// this file of the same area.
pub(crate) const HDR_LINK: &str = "x-bitfog-link";
/// The nanoseconds of `X-Bitfog-Mtime` (0 to 999999999); older servers
/// ignore it and set whole seconds.
pub(crate) const HDR_MTIME_NS: &str = "x-bitfog-mtime-ns";
/// `UID:GID` a write asks for, applied where the area says
/// `"owners": true` and the server runs as root.
pub(crate) const HDR_OWNER: &str = "x-bitfog-owner";
/// `USER:GROUP`: names that stand for the destination's own ids where it
/// knows them (either may be empty).
pub(crate) const HDR_OWNER_NAMES: &str = "x-bitfog-owner-names";
/// A PUT with this header and an empty body makes the file from another
/// file of the same area (named like a request path, percent-encoded,
/// relative to the area), after checking that file's SHA-256 against
/// `X-Bitfog-Sha256`; naming the PUT's own path changes only mode and
/// mtime.
pub(crate) const HDR_FROM: &str = "x-bitfog-from";
/// A PUT that makes a directory.
pub(crate) const DIRECTORY_TYPE: &str = "application/x-bitfog-directory";
/// A PUT body of data extents (a sparse file), and its logical size.
pub(crate) const EXTENTS_TYPE: &str = "application/x-bitfog-extents";
pub(crate) const HDR_SIZE: &str = "x-bitfog-size";
/// How many bytes of a partial upload the server holds (answers to range
/// uploads).
pub(crate) const HDR_HAVE_HEADER: &str = "X-Bitfog-Have";
/// On every answer about an area: the area's identity (see `area_id`).
pub(crate) const AREA_ID_HEADER: &str = "X-Bitfog-Area";
/// On answers about a writable area whose filesystem folds case (two
/// names differing only in case are one file there): `1`.
pub(crate) const FOLDS_CASE_HEADER: &str = "X-Bitfog-Folds-Case";
/// On an extended listing (`?meta=1`, whose entries carry `mtime_ns` and
/// owners): `1` when the area applies the owners writes ask for, else `0`.
pub(crate) const OWNERS_HEADER: &str = "X-Bitfog-Owners";
/// Content type of a PUT whose body is a symlink target.
pub(crate) const SYMLINK_TYPE: &str = "application/symlink";
/// Content type of an area listing.
pub(crate) const NDJSON_TYPE: &str = "application/x-ndjson";
/// The answer to `POST /AREA/?files`: for each name asked, a JSON line,
/// then (when its status is 200) exactly `size` bytes of the file; then
/// an end line.
pub(crate) const FILES_TYPE: &str = "application/x-bitfog-files";
/// Names one `POST /AREA/?files` may ask for.
pub(crate) const FILES_MAX: usize = 1024;
/// Bytes of one `POST /AREA/?put` (heads and files).
pub(crate) const PUTS_BODY_MAX: u64 = 64 << 20;
/// Bytes of the names in one `POST /AREA/?files`.
pub(crate) const FILES_BODY_MAX: u64 = 1 << 20;
/// The longest symlink target a server accepts.
pub(crate) const MAX_LINK_TARGET: u64 = 4096;

/// What a `Range` header asks of a file of a known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeAsk {
    /// No usable range: send the whole file (200).
    Whole,
    /// Send bytes `start..=end` (206).
    Part { start: u64, end: u64 },
    /// A well-formed range that misses the file: 416.
    Unsatisfiable,
}

/// Parses a `Range` header value against a file of `len` bytes, following
/// RFC 9110: a header that cannot be parsed, or that names several ranges,
/// is ignored (whole file); a single valid range past the end is 416.
pub(crate) fn parse_range(value: &str, len: u64) -> RangeAsk {
    let value = value.trim();
    let Some(spec) = strip_prefix_ignore_case(value, "bytes=") else {
        return RangeAsk::Whole;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix range: the last N bytes.
        let Some(n) = parse_digits(b) else {
            return RangeAsk::Whole;
        };
        if n == 0 || len == 0 {
            return RangeAsk::Unsatisfiable;
        }
        let n = n.min(len);
        return RangeAsk::Part {
            start: len - n,
            end: len - 1,
        };
    }
    let Some(start) = parse_digits(a) else {
        return RangeAsk::Whole;
    };
    let end = if b.is_empty() {
        None
    } else {
        match parse_digits(b) {
            Some(end) if end >= start => Some(end),
            _ => return RangeAsk::Whole,
        }
    };
    if start >= len {
        return RangeAsk::Unsatisfiable;
    }
    let end = end.unwrap_or(len - 1).min(len - 1);
    RangeAsk::Part { start, end }
}

/// The `Content-Range` value for a 206.
pub(crate) fn content_range(start: u64, end: u64, len: u64) -> String {
    format!("bytes {start}-{end}/{len}")
}

/// Parses a `Content-Range: bytes A-B/LEN` value (client side).
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = strip_prefix_ignore_case(value.trim(), "bytes ")?;
    let (range, len) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b, len) = (parse_digits(a)?, parse_digits(b)?, parse_digits(len)?);
    (a <= b && b < len).then_some((a, b, len))
}

/// Digits only (no sign, no spaces), fitting in a u64.
pub(crate) fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(crate) fn http_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let wd = WEEKDAYS[days.rem_euclid(7) as usize];
    let mon = MONTHS[m as usize - 1];
    format!(
        "{wd}, {d:02} {mon} {y:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Parses an IMF-fixdate; other date forms are not understood.
pub(crate) fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_ascii_whitespace().collect();
    let [_wd, d, mon, y, hms, "GMT"] = parts.as_slice() else {
        return None;
    };
    let d: u32 = d.parse().ok()?;
    let m = MONTHS.iter().position(|x| x == mon)? as u32 + 1;
    let y: i64 = y.parse().ok()?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    if !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// RFC 3339 in UTC, e.g. `2026-11-26T12:17:16Z`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Decodes `%XX` escapes once. Returns `None` on a malformed escape.
pub(crate) fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = (*b.get(i + 1)? as char).to_digit(16)?;
            let lo = (*b.get(i + 2)? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Encodes a relative name for a URL path: every byte but unreserved
/// characters and `/` is escaped.
pub(crate) fn percent_encode_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn range_examples() {
        use RangeAsk::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part { start: 0, end: 9 });
        assert_eq!(parse_range("bytes=90-", 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range("bytes=-10", 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range("bytes=-1000", 100), Part { start: 0, end: 99 });
        assert_eq!(
            parse_range("bytes=50-5000", 100),
            Part { start: 50, end: 99 }
        );
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Whole);
        assert_eq!(parse_range("items=0-1", 100), Whole);
        assert_eq!(parse_range("bytes=+1-2", 100), Whole);
        assert_eq!(parse_range("bytes=99999999999999999999999-", 100), Whole);
        assert_eq!(parse_range("BYTES=1-1", 100), Part { start: 1, end: 1 });
    }

    #[test]
    fn dates() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("a%20b%2Fc").unwrap(), b"a b/c");
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_encode_path("a b/ü%"), "a%20b/%C3%BC%25");
    }

    proptest! {
        #[test]
        fn range_result_is_always_inside_the_file(value in ".{0,40}", len in 0u64..1000) {
            if let RangeAsk::Part { start, end } = parse_range(&value, len) {
                prop_assert!(start <= end && end < len);
            }
        }

        #[test]
        fn range_of_valid_specs(a in 0u64..2000, b in 0u64..2000, len in 0u64..1000) {
            let got = parse_range(&format!("bytes={a}-{b}"), len);
            if b < a {
                prop_assert_eq!(got, RangeAsk::Whole);
            } else if a >= len {
                prop_assert_eq!(got, RangeAsk::Unsatisfiable);
            } else {
                prop_assert_eq!(got, RangeAsk::Part { start: a, end: b.min(len - 1) });
                let cr = content_range(a, b.min(len - 1), len);
                prop_assert_eq!(parse_content_range(&cr), Some((a, b.min(len - 1), len)));
            }
        }

        #[test]
        fn http_date_round_trips(secs in 0i64..10_000_000_000) {
            prop_assert_eq!(parse_http_date(&http_date(secs)), Some(secs));
        }

        #[test]
        fn percent_round_trips(s in "\\PC{0,30}") {
            let enc = percent_encode_path(&s);
            prop_assert_eq!(percent_decode(&enc).unwrap(), s.as_bytes());
        }
    }
}
