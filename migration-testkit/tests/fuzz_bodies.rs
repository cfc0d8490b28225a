//! The fuzz targets' bodies (`migration_testkit::fuzz_bodies`) as proptests, so they
//! run on stable in every `cargo test`: arbitrary bytes, and mutations of valid seeds
//! (byte flips, truncation, insertion) that get past the first checks.
//!
//! The real fuzzers (`fuzz/run.sh`) run the same bodies under libFuzzer; every crash
//! they found is a regression test at the bottom of this file.

use migration_testkit::fuzz_bodies::{self, seeds};
use proptest::prelude::*;

/// An edit of a seed: each `(position, byte)` overwrites, then an optional cut, then
/// an optional insertion.
#[derive(Clone, Debug)]
struct Mutation {
    writes: Vec<(usize, u8)>,
    cut: Option<usize>,
    insert: Option<(usize, Vec<u8>)>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        prop::option::weighted(0.2, any::<usize>()),
        prop::option::weighted(
            0.1,
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)),
        ),
    )
        .prop_map(|(writes, cut, insert)| Mutation {
            writes,
            cut,
            insert,
        })
}

fn apply(seed: &[u8], m: &Mutation) -> Vec<u8> {
    let mut v = seed.to_vec();
    if v.is_empty() {
        return v;
    }
    for (pos, b) in &m.writes {
        let n = v.len();
        v[pos % n] = *b;
    }
    if let Some(cut) = m.cut {
        v.truncate(cut % (v.len() + 1));
    }
    if let Some((pos, bytes)) = &m.insert {
        let at = pos % (v.len() + 1);
        v.splice(at..at, bytes.iter().copied());
    }
    v
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- The seeds themselves are accepted (else mutating them proves little). ----------

#[test]
fn seeds_are_valid_inputs() {
    use std::io::Cursor;
    for c in seeds::container() {
        if migration_core::container::verify(Cursor::new(&c)).is_err() {
            let mut r = &c[..];
            migration_core::container::verify_stream(&mut r).expect("seed container verifies");
        }
        fuzz_bodies::container(&c);
    }
    for s in seeds::protocol() {
        fuzz_bodies::protocol(&s);
    }
    // The full migration script is received to the end (GO): the destination runs.
    let full = fuzz_bodies::frame_script(&seeds::protocol()[0]);
    let options = migration_core::ReceiveOptions::new(
        migration_core::arch::Arch::X86_64,
        migration_serde::registry(),
    );
    let (vm, report) = migration_core::receive_migration_over(
        fuzz_bodies::InputStream::new(&full),
        &options,
        |i| migration_testkit::FakeVm::destination(&i.layout, migration_serde::registry()),
    )
    .expect("the seed migration is received");
    assert_eq!(report.rounds, 2);
    assert_eq!(report.memory_bytes, 512);
    assert!(vm.is_running());
    // `fuzz_bodies::kvm_state` ignores what does not decode, so decode each seed here.
    let mut kinds = std::collections::BTreeSet::new();
    for s in seeds::kvm_state() {
        let [c, t, ..] = s[..] else {
            panic!("kvm_state seed {s:?} has no codec and type bytes");
        };
        decode_kvm_seed(&s).unwrap_or_else(|e| panic!("kvm_state seed (codec {c}, type {t}): {e}"));
        kinds.insert((c % 3, t % 18));
        fuzz_bodies::kvm_state(&s);
    }
    assert_eq!(kinds.len(), 3 * 18, "a kvm_state seed per codec and type");
    for s in seeds::memory_ranges() {
        fuzz_bodies::memory_ranges(&s);
    }
}

/// Decodes a `kvm_state` seed as `fuzz_bodies::kvm_state` reads it: byte 0 picks the
/// codec (json, bincode, postcard), byte 1 the type, the rest is its encoding.
fn decode_kvm_seed(seed: &[u8]) -> Result<(), String> {
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_ioapic_state, kvm_lapic_state, kvm_mp_state,
        kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    };
    use migration_core::codec::{self, Codec};
    use migration_core::Snapshot;
    use migration_kvm::state::{CpuidState, MsrState, NestedState, TscKhz, XsaveState};
    use migration_kvm::{Raw, VcpuState, VmState};

    fn dec<T: serde::de::DeserializeOwned>(
        codec: &dyn Codec,
        payload: &[u8],
    ) -> Result<(), String> {
        codec::decode::<T>(codec, payload)
            .map(drop)
            .map_err(|e| format!("{} as {}: {e}", codec.name(), std::any::type_name::<T>()))
    }
    fn tree(codec: &dyn Codec, payload: &[u8]) -> Result<Snapshot, String> {
        let mut s: Snapshot =
            codec::decode(codec, payload).map_err(|e| format!("{} tree: {e}", codec.name()))?;
        s.resolve_codecs(&migration_serde::registry());
        Ok(s)
    }

    let [c, t, payload @ ..] = seed else {
        return Err("shorter than two bytes".into());
    };
    let codecs: [&dyn Codec; 3] = [
        &migration_serde::JsonCodec::new(),
        &migration_serde::BincodeCodec,
        &migration_serde::PostcardCodec,
    ];
    let codec = codecs[usize::from(*c) % codecs.len()];
    match t % 18 {
        0 => dec::<Raw<kvm_regs>>(codec, payload),
        1 => dec::<Raw<kvm_sregs>>(codec, payload),
        2 => dec::<Raw<kvm_xcrs>>(codec, payload),
        3 => dec::<Raw<kvm_debugregs>>(codec, payload),
        4 => dec::<Raw<kvm_lapic_state>>(codec, payload),
        5 => dec::<Raw<kvm_mp_state>>(codec, payload),
        6 => dec::<Raw<kvm_vcpu_events>>(codec, payload),
        7 => dec::<Raw<kvm_pit_state2>>(codec, payload),
        8 => dec::<Raw<kvm_clock_data>>(codec, payload),
        9 => dec::<Raw<kvm_pic_state>>(codec, payload),
        10 => dec::<Raw<kvm_ioapic_state>>(codec, payload),
        11 => dec::<MsrState>(codec, payload),
        12 => dec::<CpuidState>(codec, payload),
        13 => dec::<XsaveState>(codec, payload),
        14 => dec::<NestedState>(codec, payload),
        15 => dec::<TscKhz>(codec, payload),
        16 => VcpuState::from_snapshot(&tree(codec, payload)?)
            .map(drop)
            .map_err(|e| format!("{} VcpuState: {e}", codec.name())),
        _ => VmState::from_snapshot(&tree(codec, payload)?)
            .map(drop)
            .map_err(|e| format!("{} VmState: {e}", codec.name())),
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn container_arbitrary(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz_bodies::container(&data);
    }

    #[test]
    fn container_mutated(i in 0usize..3, m in mutation()) {
        let seeds = seeds::container();
        fuzz_bodies::container(&apply(&seeds[i % seeds.len()], &m));
    }

    #[test]
    fn protocol_arbitrary(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz_bodies::protocol(&data);
    }

    #[test]
    fn protocol_mutated(i in 0usize..2, m in mutation()) {
        let seeds = seeds::protocol();
        fuzz_bodies::protocol(&apply(&seeds[i % seeds.len()], &m));
    }

    #[test]
    fn kvm_state_arbitrary(data in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzz_bodies::kvm_state(&data);
    }

    #[test]
    fn kvm_state_mutated(i in 0usize..54, m in mutation()) {
        let seeds = seeds::kvm_state();
        fuzz_bodies::kvm_state(&apply(&seeds[i % seeds.len()], &m));
    }

    #[test]
    fn memory_ranges_arbitrary(data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz_bodies::memory_ranges(&data);
    }

    #[test]
    fn memory_ranges_mutated(i in 0usize..2, m in mutation()) {
        let seeds = seeds::memory_ranges();
        fuzz_bodies::memory_ranges(&apply(&seeds[i % seeds.len()], &m));
    }
}

/// Writes every seed to `fuzz/seeds/<target>/seed-<n>` (checked in; `fuzz/run.sh` reads them).
#[test]
#[ignore = "rewrites fuzz/seeds/"]
fn write_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let sets = [
        ("container", seeds::container()),
        ("protocol", seeds::protocol()),
        ("kvm_state", seeds::kvm_state()),
        ("memory_ranges", seeds::memory_ranges()),
    ];
    for (target, inputs) in sets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (n, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{n}")), input).unwrap();
        }
    }
}

// ---- Regression tests: inputs the fuzzers found. -------------------------------------

/// memory_ranges, libFuzzer: a range pushed at `u64::MAX` with a length past the end of
/// the address space made `MemoryRangeTable::chunks` wrap around to a piece at 0xfff,
/// an address the table never held. Fixed: `push` cuts ranges at `u64::MAX`.
#[test]
fn regression_range_at_the_top_of_the_address_space_does_not_wrap() {
    fuzz_bodies::memory_ranges(&[
        0x00, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x27, 0xff, 0xf0,
        0xfa, 0x00, 0x00, 0x00, 0x30, 0x06, 0x00,
    ]);
    let mut table = migration_core::MemoryRangeTable::new();
    table.push(migration_core::MemoryRange::new(u64::MAX, 0xfa_f0ff_27ff));
    table.push(migration_core::MemoryRange::new(u64::MAX - 0x1000, 0x2000));
    for piece in table.chunks(0x1000) {
        assert!(piece.gpa >= u64::MAX - 0x1000, "{piece:x?} wrapped around");
        assert!(
            piece.end().is_some(),
            "{piece:x?} runs past the address space"
        );
    }
}

/// protocol, libFuzzer: a 16-byte ZERO range legitimately zeroes 4 MiB of a 4 MiB
/// guest, which broke the fuzz body's own bound (guest bytes ≤ 4096 × stream bytes), not
/// the destination. Fixed in the body: data bytes ≤ stream bytes, and each ZERO range
/// covers at most the layout.
#[test]
fn regression_a_small_zero_range_may_cover_megabytes() {
    let data = include_bytes!("fuzz_regressions/protocol_zero_range_covers_megabytes.bin");
    fuzz_bodies::protocol(data);
}
