//! Fuzz target: see `migration_testkit::fuzz_bodies::kvm_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migration_testkit::fuzz_bodies::kvm_state(data));
