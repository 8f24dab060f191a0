//! Range, Content-Range, date and percent-decoding parsers: no panic, and
//! every answer inside the file.
#![no_main]
#![allow(dead_code)]

#[path = "../../src/protocol.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::RangeAsk;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().unwrap()) >> (data[0] % 64);
    let text = String::from_utf8_lossy(&data[8..]);
    match protocol::parse_range(&text, len) {
        RangeAsk::Part { start, end } => {
            assert!(start <= end && end < len);
            let cr = protocol::content_range(start, end, len);
            assert_eq!(protocol::parse_content_range(&cr), Some((start, end, len)));
        }
        RangeAsk::Whole | RangeAsk::Unsatisfiable => {}
    }
    let _ = protocol::parse_content_range(&text);
    if let Some(t) = protocol::parse_http_date(&text) {
        let _ = protocol::http_date(t);
    }
    if let Some(bytes) = protocol::percent_decode(&text) {
        assert!(bytes.len() <= text.len());
    }
});
