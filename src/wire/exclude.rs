//! Exclude patterns, as rsync reads them: a pattern without `/` matches
//! any one name component at any depth; `*` and `?` match within a
//! component, `[...]` one character of a set (`[!...]` or `[^...]` of its
//! complement, `a-z` ranges); `**` matches across `/`; a leading `/`
//! anchors the pattern at the area's root; a pattern with a `/` inside
//! matches the end of a path (or, anchored, all of it); a trailing `/`
//! matches directories only. A directory that matches takes everything
//! below it out too.

/// Patterns this long or this many are refused (a config or command line
/// is no place for more).
pub(crate) const MAX_PATTERN: usize = 1024;
pub(crate) const MAX_PATTERNS: usize = 1000;

/// A set of patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Excludes {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    anchored: bool,
    dir_only: bool,
    /// Components; one without `/` matches any component.
    comps: Vec<String>,
}

impl Excludes {
    /// Parses `patterns`; the error names the one that is not usable.
    pub(crate) fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Excludes, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!("more than {MAX_PATTERNS} exclude patterns"));
        }
        let mut out = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            out.push(Pattern::parse(p).map_err(|why| format!("exclude pattern '{p}': {why}"))?);
        }
        Ok(Excludes { patterns: out })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as given.
    pub(crate) fn texts(&self) -> Vec<String> {
        self.patterns.iter().map(|p| p.text.clone()).collect()
    }

    /// Both sets at once.
    pub(crate) fn and(mut self, other: &Excludes) -> Excludes {
        for p in &other.patterns {
            if !self.patterns.contains(p) {
                self.patterns.push(p.clone());
            }
        }
        self
    }

    /// True when `name` (a `/`-separated path below the area) is excluded:
    /// it matches, or a directory it is in does. `is_dir` says whether
    /// `name` itself is a directory.
    pub(crate) fn excludes(&self, name: &str, is_dir: bool) -> bool {
        if self.patterns.is_empty() || name.is_empty() {
            return false;
        }
        let comps: Vec<&str> = name.split('/').collect();
        (1..=comps.len()).any(|n| {
            let dir = n < comps.len() || is_dir;
            self.patterns.iter().any(|p| p.matches(&comps[..n], dir))
        })
    }

    /// True when `name` itself matches (its directories are not looked
    /// at): for a walk that does not enter excluded directories.
    pub(crate) fn matches_itself(&self, name: &str, is_dir: bool) -> bool {
        if name.is_empty() {
            return false;
        }
        let comps: Vec<&str> = name.split('/').collect();
        self.patterns.iter().any(|p| p.matches(&comps, is_dir))
    }
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, &'static str> {
        if text.is_empty() {
            return Err("empty");
        }
        if text.len() > MAX_PATTERN {
            return Err("longer than 1024 bytes");
        }
        if text.contains('\0') {
            return Err("contains NUL");
        }
        let anchored = text.starts_with('/');
        let dir_only = text.len() > 1 && text.ends_with('/');
        let body = text.trim_start_matches('/').trim_end_matches('/');
        if body.is_empty() {
            return Err("names nothing (the area's root cannot be excluded)");
        }
        let comps: Vec<String> = body.split('/').map(str::to_string).collect();
        if comps.iter().any(String::is_empty) {
            return Err("has an empty component ('//')");
        }
        Ok(Pattern {
            text: text.to_string(),
            anchored,
            dir_only,
            comps,
        })
    }

    /// Whether the path `comps` (a directory when `dir`) matches.
    fn matches(&self, comps: &[&str], dir: bool) -> bool {
        if self.dir_only && !dir {
            return false;
        }
        let pat: Vec<&str> = self.comps.iter().map(String::as_str).collect();
        if self.anchored {
            return match_comps(&pat, comps);
        }
        // Unanchored: the pattern matches the path's last components.
        (0..comps.len()).any(|start| match_comps(&pat, &comps[start..]))
    }
}

/// Component-wise match; a `**` component matches any number of them.
fn match_comps(pat: &[&str], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|k| match_comps(rest, &path[k..])),
        Some((p, rest)) => match path.split_first() {
            Some((c, tail)) => glob(p.as_bytes(), c.as_bytes()) && match_comps(rest, tail),
            None => false,
        },
    }
}

/// `*`, `?` and `[...]` within one component (`**` inside a component
/// reads as `*`). Iterative with one backtrack point, so no pattern takes
/// more than quadratic time.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    while pi < p.len() && p[pi] == b'*' {
                        pi += 1;
                    }
                    star = Some((pi, si));
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((hit, next)) = class(&p[pi..], s[si]) {
                        if hit {
                            pi += next;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        // An unclosed `[` is itself.
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == s[si] => {
                    pi += 2;
                    si += 1;
                    continue;
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at the start of `p`: whether `c` is in it, and the
/// class's length; `None` when the `[` is not closed.
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let &b = p.get(i)?;
        if b == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&e| e != b']') {
            let e = p[i + 2];
            hit |= b <= c && c <= e;
            i += 3;
        } else {
            hit |= b == c;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(p).unwrap()
    }

    #[test]
    fn reads_as_rsync_does() {
        let e = ex(&["@eaDir", ".DS_Store", "._*", "Thumbs.db", "#recycle"]);
        assert!(e.excludes("@eaDir", true));
        assert!(e.excludes("photos/@eaDir/x.jpg/SYNOFILE_THUMB_M.jpg", false));
        assert!(e.excludes("a/b/.DS_Store", false));
        assert!(e.excludes("a/._photo.jpg", false));
        assert!(e.excludes("#recycle/old.txt", false));
        assert!(!e.excludes("photos/x.jpg", false));
        assert!(!e.excludes("a/.DS_Store2", false));
        assert!(!e.excludes("a_.b", false));

        let anchored = ex(&["/tmp", "/cache/"]);
        assert!(anchored.excludes("tmp", false) && anchored.excludes("tmp/x", false));
        assert!(!anchored.excludes("a/tmp", false), "anchored at the root");
        assert!(anchored.excludes("cache/x", false), "a directory");
        assert!(
            !anchored.excludes("cache", false),
            "a file named cache is not a directory"
        );

        let inner = ex(&["logs/*.gz", "/a/**/z"]);
        assert!(inner.excludes("logs/x.gz", false));
        assert!(
            inner.excludes("srv/logs/x.gz", false),
            "the end of the path"
        );
        assert!(!inner.excludes("logs/sub/x.gz", false));
        assert!(inner.excludes("a/z", false) && inner.excludes("a/b/c/z", false));
        assert!(!inner.excludes("b/a/z", false));

        let classes = ex(&["[Tt]humbs.db", "*.[!j]pg", "file[0-9]", "?x"]);
        assert!(classes.excludes("thumbs.db", false) && classes.excludes("Thumbs.db", false));
        assert!(classes.excludes("a.ppg", false) && !classes.excludes("a.jpg", false));
        assert!(classes.excludes("file7", false) && !classes.excludes("filex", false));
        assert!(classes.excludes("ax", false) && !classes.excludes("x", false));
    }

    #[test]
    fn refuses_what_names_nothing() {
        for bad in ["", "/", "//", "a//b", "x\0y"] {
            assert!(Excludes::new(&[bad]).is_err(), "{bad:?}");
        }
        assert!(Excludes::new(&["x".repeat(2000)]).is_err());
    }

    proptest! {
        /// A literal name excludes exactly itself (and what is in it), at
        /// any depth.
        #[test]
        fn a_literal_name_matches_only_itself(name in "[a-z.]{1,6}", other in "[a-z.]{1,6}", depth in 0usize..3) {
            let e = ex(&[&name]);
            let mut path = vec!["d"; depth];
            path.push(&other);
            prop_assert_eq!(e.excludes(&path.join("/"), false), name == other || (depth > 0 && name == "d"));
        }

        /// `*` alone excludes everything; glob never panics.
        #[test]
        fn glob_terminates_and_star_is_everything(p in "[a-c*?\\[\\]!^-]{0,12}", s in "[a-c\\[\\]]{0,12}") {
            let _ = glob(p.as_bytes(), s.as_bytes());
            prop_assert!(glob(b"*", s.as_bytes()));
        }
    }
}
