//! Range, Content-Range, date and percent-decoding parsers: no panic, and
//! every answer inside the file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfog::fuzzing::range(data));
