//! Request-head handling: the event thread's completeness check and the
//! worker's parse never panic and agree with each other.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/error.rs"]
mod error;
#[path = "../../src/http.rs"]
mod http;
#[path = "../../src/protocol.rs"]
mod protocol;
#[path = "../../src/ui.rs"]
mod ui;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let complete = matches!(http::head_state(data, 16 * 1024), http::Head::Complete);
    let parsed = http::parse_head(data);
    if complete {
        let head = parsed.expect("a complete head parses");
        assert!(head.len <= data.len());
    }
});
