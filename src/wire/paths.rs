//! Turns request paths and manifest names into safe relative paths, and
//! defines the contract's name order.
//!
//! A safe name is relative, `/`-separated, and made of normal components
//! only: no empty component, no `.` or `..`, no NUL, no backslash. Nothing
//! here touches the disk; callers still refuse symlinks in directories.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Longest name accepted, in bytes (Linux's PATH_MAX).
pub(crate) const MAX_NAME: usize = 4096;
/// Longest single component, in bytes (Linux's NAME_MAX).
pub(crate) const MAX_COMPONENT: usize = 255;
/// Names with a component that starts with this are the server's own.
pub(crate) const RESERVED_PREFIX: &[u8] = b".bitfog";
/// The courier's state directory; no carried name may start with it.
pub(crate) const COURIER_STATE: &str = ".bitfog";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadName {
    Empty,
    TooLong,
    Absolute,
    EmptyComponent,
    Dot,
    DotDot,
    Nul,
    Backslash,
    Reserved,
}

impl BadName {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            BadName::Empty => "empty name",
            BadName::TooLong => "name too long",
            BadName::Absolute => "absolute name",
            BadName::EmptyComponent => "empty path component",
            BadName::Dot => "'.' component",
            BadName::DotDot => "'..' component",
            BadName::Nul => "NUL byte in name",
            BadName::Backslash => "backslash in name",
            BadName::Reserved => "reserved name (.bitfog)",
        }
    }
}

/// Splits a relative name into its components, refusing anything but
/// normal components.
pub(crate) fn components(name: &[u8]) -> Result<Vec<&[u8]>, BadName> {
    if name.is_empty() {
        return Err(BadName::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(BadName::TooLong);
    }
    if name[0] == b'/' {
        return Err(BadName::Absolute);
    }
    let mut out = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" => return Err(BadName::EmptyComponent),
            b"." => return Err(BadName::Dot),
            b".." => return Err(BadName::DotDot),
            _ if c.contains(&0) => return Err(BadName::Nul),
            _ if c.contains(&b'\\') => return Err(BadName::Backslash),
            _ if c.len() > MAX_COMPONENT => return Err(BadName::TooLong),
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// True for an area name: letters, digits, `.`, `_` and `-`, and not `.`
/// or `..`.
pub(crate) fn valid_area_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// True when a component is reserved for the server's own files.
pub(crate) fn is_reserved(component: &[u8]) -> bool {
    component.starts_with(RESERVED_PREFIX)
}

/// True when any component of a name is reserved: nothing inside a
/// `.bitfog*` directory is listed, served or written either.
pub(crate) fn has_reserved(comps: &[&[u8]]) -> bool {
    comps.iter().any(|c| is_reserved(c))
}

/// Checks a name from a listing or DB before a client writes or reads it
/// under a local directory (COURIER): normal components only, not inside
/// the courier's state directory, and not a server-reserved name.
pub(crate) fn check_carried_name(name: &str) -> Result<PathBuf, BadName> {
    let comps = components(name.as_bytes())?;
    if has_reserved(&comps) {
        return Err(BadName::Reserved);
    }
    Ok(PathBuf::from(OsStr::from_bytes(name.as_bytes())))
}

/// The contract's order: component by component, bytewise. Equal to a
/// bytewise comparison in which `/` sorts below every other byte.
pub(crate) fn name_cmp(a: &str, b: &str) -> Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    a.bytes().map(key).cmp(b.bytes().map(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    fn join(root: &Path, rel: &[&[u8]]) -> PathBuf {
        let mut p = root.to_path_buf();
        for c in rel {
            p.push(OsStr::from_bytes(c));
        }
        p
    }

    #[test]
    fn refuses_bad_names() {
        for (name, why) in [
            ("", BadName::Empty),
            ("/etc/passwd", BadName::Absolute),
            ("a//b", BadName::EmptyComponent),
            ("a/", BadName::EmptyComponent),
            ("./a", BadName::Dot),
            ("a/../../b", BadName::DotDot),
            ("..", BadName::DotDot),
            ("a\0b", BadName::Nul),
            ("a\\..\\b", BadName::Backslash),
        ] {
            assert_eq!(components(name.as_bytes()), Err(why), "{name:?}");
        }
        assert_eq!(
            check_carried_name(".bitfog/partial/x"),
            Err(BadName::Reserved)
        );
        assert_eq!(
            check_carried_name("x/.bitfog-tmp-1"),
            Err(BadName::Reserved)
        );
        assert_eq!(check_carried_name("x/.bitfog/y"), Err(BadName::Reserved));
        assert_eq!(
            check_carried_name(".bitfog-part-1/x"),
            Err(BadName::Reserved)
        );
        assert!(check_carried_name("x/a.bitfog/y").is_ok());
        assert!(check_carried_name("..a/b..").is_ok());
    }

    #[test]
    fn order_is_component_wise() {
        let mut v = vec!["a.txt", "a/x", "a", "a-b/c", "b", "a/x/y", "a/x.z"];
        v.sort_by(|a, b| name_cmp(a, b));
        assert_eq!(v, ["a", "a/x", "a/x/y", "a/x.z", "a-b/c", "a.txt", "b"]);
    }

    fn component() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z.]{1,4}",
            Just("..".to_string()),
            Just(".".to_string()),
            Just(String::new()),
            "[\\\\\0a]{1,2}",
        ]
    }

    proptest! {
        #[test]
        fn accepted_names_stay_below_the_root(parts in prop::collection::vec(component(), 1..6), lead in any::<bool>()) {
            let name = format!("{}{}", if lead { "/" } else { "" }, parts.join("/"));
            if let Ok(comps) = components(name.as_bytes()) {
                let p = join(Path::new("/root"), &comps);
                prop_assert!(p.starts_with("/root"));
                prop_assert_eq!(p.components().count(), comps.len() + 2);
                for c in comps {
                    prop_assert!(c != b".." && c != b"." && !c.is_empty());
                }
            }
        }

        #[test]
        fn order_matches_component_lists(a in "[a-c/.-]{0,8}", b in "[a-c/.-]{0,8}") {
            let ca: Vec<&str> = a.split('/').collect();
            let cb: Vec<&str> = b.split('/').collect();
            prop_assert_eq!(name_cmp(&a, &b), ca.cmp(&cb));
        }
    }
}
