//! Request-head handling: the event thread's completeness check and the
//! worker's parse never panic and agree with each other.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitfog::fuzzing::head(data));
