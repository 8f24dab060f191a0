//! Name validation: whatever is accepted is made of normal components only
//! and stays below any root it is joined to.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/paths.rs"]
mod paths;

use libfuzzer_sys::fuzz_target;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    if let Ok(comps) = paths::components(data) {
        let mut p = Path::new("/root").to_path_buf();
        for c in &comps {
            assert!(
                !c.is_empty()
                    && *c != b"."
                    && *c != b".."
                    && !c.contains(&0)
                    && !c.contains(&b'\\')
            );
            p.push(OsStr::from_bytes(c));
        }
        assert!(p.starts_with("/root"));
        assert!(
            p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        );
        assert_eq!(p.components().count(), comps.len() + 2);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(rel) = paths::check_carried_name(text) {
            assert!(rel.is_relative());
            assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
        }
        let mid = text
            .char_indices()
            .nth(text.chars().count() / 2)
            .map_or(text.len(), |(i, _)| i);
        let (a, b) = text.split_at(mid);
        assert_eq!(paths::name_cmp(a, b), paths::name_cmp(b, a).reverse());
    }
});
