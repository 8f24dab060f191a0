//! Pages for browsers: one directory of an area, or the list of areas,
//! from what the file system says (names, sizes, mtimes; never a hash, so
//! a cold cache never makes a browser wait). Every name is escaped for
//! HTML in text and percent-encoded in links; no scripts, no external
//! assets.

use crate::beneath::{Dir, Kind};
use crate::wire::exclude::Excludes;
use crate::wire::paths::is_reserved;
use crate::wire::protocol;

/// A page shows at most this many names of one directory (and says how
/// many more there are).
const MAX_SHOWN: usize = 10_000;

/// True when the request's `Accept` prefers HTML: `text/html` (or
/// `application/xhtml+xml`) named with a weight above zero and at least
/// that of every JSON type named. `*/*` alone (curl, scripts, bitfog's own
/// client) is not a preference.
pub(super) fn prefers_html(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut html, mut json) = (0.0f32, 0.0f32);
    for part in accept.split(',') {
        let mut fields = part.split(';');
        let ty = fields.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = fields
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match ty.as_str() {
            "text/html" | "application/xhtml+xml" => html = html.max(q),
            "application/x-ndjson" | "application/json" => json = json.max(q),
            _ => {}
        }
    }
    html > 0.0 && html >= json
}

/// Text for HTML: `& < > " '` escaped.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One name as a relative link: every byte but unreserved ones
/// percent-encoded (so `/`, `?`, `#`, `"` and `<` cannot act).
fn href(name: &str) -> String {
    let mut out = String::new();
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn page(title: &str, body: &str) -> Vec<u8> {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1em;max-width:60em}}\
         table{{border-collapse:collapse;width:100%}}\
         td,th{{padding:.2em .6em;text-align:left;border-bottom:1px solid #ddd}}\
         td.n{{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}}\
         a{{text-decoration:none}}</style></head>\n<body><h1>{t}</h1>\n{body}</body></html>\n",
        t = escape(title)
    )
    .into_bytes()
}

/// The list of areas.
pub(super) fn areas<'a>(names: impl Iterator<Item = &'a String>) -> Vec<u8> {
    let mut rows = String::new();
    for n in names {
        rows.push_str(&format!(
            "<tr><td><a href=\"{}/\">{}/</a></td></tr>\n",
            href(n),
            escape(n)
        ));
    }
    page("bitfog", &format!("<table>\n{rows}</table>\n"))
}

/// One directory of an area: `dir` is `rel` (its path below the area's
/// root, "" for the root).
pub(super) fn directory(area: &str, rel: &str, dir: &Dir, exclude: &Excludes) -> Vec<u8> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut more = 0usize;
    for (name, _) in dir.names().unwrap_or_default() {
        let Ok(n) = String::from_utf8(name) else {
            continue;
        };
        if is_reserved(n.as_bytes()) {
            continue;
        }
        let Ok(Some(m)) = dir.stat(n.as_bytes()) else {
            continue;
        };
        let path = if rel.is_empty() {
            n.clone()
        } else {
            format!("{rel}/{n}")
        };
        let is_dir = m.kind == Kind::Dir;
        if !matches!(m.kind, Kind::Dir | Kind::File) || exclude.excludes(&path, is_dir) {
            continue;
        }
        if dirs.len() + files.len() >= MAX_SHOWN {
            more += 1;
            continue;
        }
        if is_dir {
            dirs.push((n, m.mtime));
        } else {
            files.push((n, m.size, m.mtime));
        }
    }
    let mut rows = String::new();
    let parent = if rel.is_empty() { "/" } else { "../" };
    rows.push_str(&format!(
        "<tr><td><a href=\"{parent}\">../</a></td><td></td><td></td></tr>\n"
    ));
    for (n, mtime) in &dirs {
        rows.push_str(&format!(
            "<tr><td><a href=\"{}/\">{}/</a></td><td class=\"n\">-</td><td class=\"n\">{}</td></tr>\n",
            href(n),
            escape(n),
            protocol::rfc3339(*mtime)
        ));
    }
    let mut total = 0u64;
    for (n, size, mtime) in &files {
        total += size;
        rows.push_str(&format!(
            "<tr><td><a href=\"{}\">{}</a></td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            href(n),
            escape(n),
            crate::ui::human_bytes(*size),
            protocol::rfc3339(*mtime)
        ));
    }
    let bytes = if total < 1024 {
        crate::ui::human_bytes(total)
    } else {
        format!("{}, {total} bytes", crate::ui::human_bytes(total))
    };
    let mut summary = format!(
        "<p>{} {}, {} {} ({bytes})",
        dirs.len(),
        if dirs.len() == 1 {
            "directory"
        } else {
            "directories"
        },
        files.len(),
        if files.len() == 1 { "file" } else { "files" },
    );
    if more > 0 {
        summary.push_str(&format!("; {more} more not shown"));
    }
    summary.push_str("</p>\n");
    let title = format!("{area}/{rel}{}", if rel.is_empty() { "" } else { "/" });
    page(
        &title,
        &format!(
            "<table>\n<tr><th>name</th><th>size</th><th>modified (UTC)</th></tr>\n{rows}</table>\n{summary}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_preference_for_html_counts() {
        let firefox = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(prefers_html(Some(firefox)));
        assert!(prefers_html(Some("text/html")));
        assert!(!prefers_html(None));
        assert!(!prefers_html(Some("*/*")));
        assert!(!prefers_html(Some("text/html;q=0")));
        assert!(!prefers_html(Some("application/x-ndjson, text/html;q=0.5")));
        assert!(prefers_html(Some("application/json;q=0.5, text/html")));
    }

    #[test]
    fn names_cannot_act() {
        assert_eq!(
            escape("<script>alert(1)</script>\"'&"),
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"
        );
        assert_eq!(href("\"><img src=x>"), "%22%3E%3Cimg%20src%3Dx%3E");
        assert_eq!(href("a b/c?#"), "a%20b%2Fc%3F%23");
        assert_eq!(href("été"), "%C3%A9t%C3%A9");
    }
}
