//! The listing/DB reader: no panic on any input; what it accepts
//! round-trips through the writer's format.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/beneath.rs"]
mod beneath;
#[path = "../../src/digest.rs"]
mod digest;
#[path = "../../src/error.rs"]
mod error;
#[path = "../../src/manifest.rs"]
mod manifest;
#[path = "../../src/paths.rs"]
mod paths;
#[path = "../../src/protocol.rs"]
mod protocol;
#[path = "../../src/sparse.rs"]
mod sparse;
#[path = "../../src/ui.rs"]
mod ui;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let entries: Result<Vec<manifest::Entry>, _> = manifest::Reader::new(data, "fuzz").collect();
    if let Ok(entries) = entries {
        let mut text = String::new();
        for e in &entries {
            text.push_str(&serde_json::to_string(e).unwrap());
            text.push('\n');
        }
        let bytes: u64 = entries.iter().map(|e| e.size).sum();
        text.push_str(&format!(
            "{{\"end\":true,\"count\":{},\"bytes\":{bytes}}}\n",
            entries.len()
        ));
        let again: Vec<manifest::Entry> = manifest::Reader::new(text.as_bytes(), "again")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(again, entries);
    }
});
