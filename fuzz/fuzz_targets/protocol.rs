//! Fuzz target: see `migration_testkit::fuzz_bodies::protocol`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migration_testkit::fuzz_bodies::protocol(data));
