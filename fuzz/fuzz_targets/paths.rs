//! Name validation: whatever is accepted is made of normal components only
//! and stays below any root it is joined to.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfog::fuzzing::paths(data));
