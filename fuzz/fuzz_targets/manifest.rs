//! The listing/DB reader: no panic on any input; what it accepts
//! round-trips through the writer's format.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfog::fuzzing::manifest(data));
