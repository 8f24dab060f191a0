//! age files: any bytes never panic the reader; sealed bytes come back
//! whole, and one changed byte is refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfog::fuzzing::age(data));
