//! Deltas: applying any bytes as a delta never panics and agrees with
//! `verify`; a delta made from any old/new pair rebuilds the new one.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfog::fuzzing::delta(data));
