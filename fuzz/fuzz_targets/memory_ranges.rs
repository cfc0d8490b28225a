//! Fuzz target: see `migration_testkit::fuzz_bodies::memory_ranges`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migration_testkit::fuzz_bodies::memory_ranges(data));
