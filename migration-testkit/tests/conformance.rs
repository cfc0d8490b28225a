//! The conformance harness over this crate's fakes, over deliberately broken fakes
//! (which must fail, naming the property and the path), and over golden files.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use migration_core::{Codec, MigratableError, Pausable, Snapshot, Snapshottable, Versioned};
use migration_testkit::conformance::{corruption, determinism, round_trip, version_upgrade};
use migration_testkit::{Conformance, FakeDevice, FakeDeviceManager, FakeVm, Property};
use serde::{Deserialize, Serialize};

fn codecs() -> migration_core::CodecRegistry {
    migration_serde::registry()
}

#[test]
fn fakes_pass_every_property() {
    let mut device = FakeDevice::new("blk0", 2);
    device.step(1);
    device.step(2);
    Conformance::new(codecs())
        .check(&mut device, || FakeDevice::new("blk0", 2))
        .unwrap();

    // Every truncation costs a decode: keep the trees small.
    let small = || {
        FakeDeviceManager::new()
            .with_device(FakeDevice::new("serial0", 0))
            .with_device(FakeDevice::new("net0", 1))
    };
    let mut devices = small();
    devices.step(7);
    Conformance::new(codecs())
        .bit_flips(16)
        .check(&mut devices, small)
        .unwrap();

    let fresh_vm = || {
        FakeVm::builder()
            .memory_size(1 << 20)
            .devices(FakeDeviceManager::new().with_device(FakeDevice::new("serial0", 0)))
            .workload(0, 5)
            .paused()
            .build()
            .unwrap()
    };
    let mut vm = fresh_vm();
    vm.run_workload_writes(10).unwrap();
    vm.devices_mut().step(3);
    Conformance::new(codecs())
        .bit_flips(16)
        .check(&mut vm, fresh_vm)
        .unwrap();
}

#[test]
fn round_trip_refuses_a_subject_in_its_initial_state() {
    let mut device = FakeDevice::new("d", 1);
    let err = round_trip(&mut device, || FakeDevice::new("d", 1), &codecs()).unwrap_err();
    assert_eq!(err.property(), Property::RoundTrip);
    assert!(err.to_string().contains("fresh instance"), "{err}");
}

#[test]
fn harness_reports_component_errors_with_their_path() {
    let mut devices = FakeDeviceManager::standard();
    devices.step(1);
    let fresh = || {
        let mut m = FakeDeviceManager::standard();
        m.device_mut("net0")
            .unwrap()
            .fail_on(Some(migration_testkit::FailOn::Restore));
        m
    };
    let err = round_trip(&mut devices, fresh, &codecs()).unwrap_err();
    assert_eq!(err.property(), Property::RoundTrip);
    assert_eq!(err.path(), "devices/net0");
    assert!(err.to_string().starts_with("round trip (codec "), "{err}");
}

// ---- A device that forgets a field on restore. -----------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ForgetfulState {
    kept: u64,
    forgotten: u64,
}

impl Versioned for ForgetfulState {
    const VERSION: u32 = 1;
}

#[derive(Debug)]
struct Forgetful {
    kept: u64,
    forgotten: u64,
}

impl Pausable for Forgetful {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl Snapshottable for Forgetful {
    fn id(&self) -> String {
        "forgetful".into()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        s.add_state(
            "state",
            ForgetfulState {
                kept: self.kept,
                forgotten: self.forgotten,
            },
        );
        Ok(s)
    }
    fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
        let state: ForgetfulState = s.state("state")?;
        self.kept = state.kept; // BUG (on purpose): `forgotten` is not restored.
        Ok(())
    }
}

/// A board holding a good device and the forgetful one.
#[derive(Debug)]
struct Board {
    good: FakeDevice,
    bad: Forgetful,
}

impl Board {
    fn new() -> Self {
        Self {
            good: FakeDevice::new("uart0", 0),
            bad: Forgetful {
                kept: 0,
                forgotten: 0,
            },
        }
    }
}

impl Pausable for Board {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl Snapshottable for Board {
    fn id(&self) -> String {
        "board".into()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        s.snapshot_child(&mut self.good)?;
        s.snapshot_child(&mut self.bad)?;
        Ok(s)
    }
    fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
        s.restore_child(&mut self.good)?;
        s.restore_child(&mut self.bad)
    }
}

#[test]
fn a_forgotten_field_fails_round_trip_naming_the_section_path() {
    let mut board = Board::new();
    board.good.step(1);
    board.bad.kept = 1;
    board.bad.forgotten = 2;
    let err = round_trip(&mut board, Board::new, &codecs()).unwrap_err();
    assert_eq!(err.property(), Property::RoundTrip);
    assert_eq!(err.path(), "board/forgetful");
    let msg = err.to_string();
    assert!(msg.contains("round trip"), "{msg}");
    assert!(
        msg.contains("section `state` of `board/forgetful`"),
        "{msg}"
    );
    // The builder stops at the same property.
    let err = Conformance::new(codecs())
        .check(&mut board, Board::new)
        .unwrap_err();
    assert_eq!(
        (err.property(), err.path()),
        (Property::RoundTrip, "board/forgetful")
    );
}

// ---- A device that encodes a HashMap in iteration order. -------------------------

/// A hasher keyed by a seed, so each instance's iteration order is different but
/// reproducible (a `RandomState` would make the failure merely very likely).
#[derive(Clone, Debug)]
struct Seeded(u64);

#[derive(Debug)]
struct SeededHasher(u64);

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = migration_testkit::rng::mix(self.0 ^ u64::from(b));
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher(self.0)
    }
}

#[derive(Debug)]
struct Hashy {
    table: HashMap<u32, u64, Seeded>,
}

impl Hashy {
    /// `entries` entries inserted ascending or descending, hashed with `seed`.
    fn new(seed: u64, entries: u32, descending: bool) -> Self {
        let mut table = HashMap::with_hasher(Seeded(seed));
        let keys: Vec<u32> = if descending {
            (0..entries).rev().collect()
        } else {
            (0..entries).collect()
        };
        for k in keys {
            table.insert(k, u64::from(k) * 3 + 1);
        }
        Self { table }
    }
}

impl Pausable for Hashy {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl Snapshottable for Hashy {
    fn id(&self) -> String {
        "hashy".into()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        // BUG (on purpose): serializes the map in its iteration order.
        let entries: Vec<(u32, u64)> = self.table.iter().map(|(k, v)| (*k, *v)).collect();
        s.add_state_as("table", 1, entries);
        Ok(s)
    }
    fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
        let entries: Vec<(u32, u64)> =
            s.section("table")?
                .decode()
                .map_err(|source| MigratableError::Codec {
                    path: self.id(),
                    section: "table".into(),
                    source,
                })?;
        self.table.clear();
        self.table.extend(entries);
        Ok(())
    }
}

#[test]
fn hashmap_iteration_order_fails_determinism_naming_the_section_path() {
    let mut a = Hashy::new(1, 256, false);
    let mut b = Hashy::new(2, 256, true);
    assert_eq!(
        a.table.iter().collect::<std::collections::BTreeMap<_, _>>(),
        b.table.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "same state"
    );
    let err = determinism(&mut a, &mut b, &codecs()).unwrap_err();
    assert_eq!(err.property(), Property::Determinism);
    assert_eq!(err.path(), "hashy");
    let msg = err.to_string();
    assert!(msg.starts_with("determinism"), "{msg}");
    assert!(msg.contains("section `table` of `hashy`"), "{msg}");
    // The builder catches it too, already in its first property, the round trip: the
    // fresh instance it restores into hashes with another seed, so it snapshots the same
    // entries in another order.
    let err = Conformance::new(codecs())
        .check(&mut a, || Hashy::new(3, 0, false))
        .unwrap_err();
    assert_eq!(err.property(), Property::RoundTrip, "{err}");
    assert_eq!(err.path(), "hashy", "{err}");
}

// ---- Corruption. -----------------------------------------------------------------

/// Panics on restore when its payload's first byte is odd: the harness must
/// report the panic, not crash.
#[derive(Debug)]
struct Panicky(u8);

impl Pausable for Panicky {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl Snapshottable for Panicky {
    fn id(&self) -> String {
        "panicky".into()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        s.add_state_as("b", 1, self.0);
        Ok(s)
    }
    fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
        let b: u8 = s
            .section("b")?
            .decode()
            .map_err(|source| MigratableError::Codec {
                path: self.id(),
                section: "b".into(),
                source,
            })?;
        assert!(b % 2 == 0, "odd byte {b}");
        self.0 = b;
        Ok(())
    }
}

#[test]
fn corruption_reports_panics_as_failures_with_the_seed() {
    let mut p = Panicky(2);
    let err = corruption(&mut p, || Panicky(0), &codecs(), 11, 256).unwrap_err();
    assert_eq!(err.property(), Property::Corruption);
    let msg = err.to_string();
    assert!(
        msg.contains("panicked") && msg.contains("odd byte"),
        "{msg}"
    );
    assert!(msg.contains("seed 11"), "{msg}");
}

/// Snapshots one section and accepts any tree on restore, even one whose section no
/// longer decodes: truncations must be caught.
#[derive(Debug)]
struct Lenient;

impl Pausable for Lenient {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl Snapshottable for Lenient {
    fn id(&self) -> String {
        "lenient".into()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        s.add_state_as("state", 1, (300u32, "uart"));
        Ok(s)
    }
    fn restore(&mut self, _: &Snapshot) -> Result<(), MigratableError> {
        // BUG (on purpose): never reads its section, so never sees it is broken.
        Ok(())
    }
}

#[test]
fn corruption_passes_for_the_fakes_and_catches_a_lenient_component() {
    let mut d = FakeDevice::new("blk0", 1);
    d.step(4);
    corruption(&mut d, || FakeDevice::new("blk0", 1), &codecs(), 1, 128).unwrap();
    // Every codec's tree encoding rejects its own truncations before any component
    // sees them; a section's payload cut inside an intact tree reaches the restore
    // that accepts anything.
    let err = corruption(&mut Lenient, || Lenient, &codecs(), 1, 0).unwrap_err();
    assert_eq!(err.property(), Property::Corruption);
    assert_eq!(err.path(), "lenient");
    let msg = err.to_string();
    assert!(
        msg.contains("accepted") && msg.contains("section `state` of `lenient` truncated"),
        "{msg}"
    );
}

// ---- Version upgrade from golden bytes. ------------------------------------------

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fake_device_v1.json")
}

/// The device the golden file was written from (version 1 of `FakeDevice`).
fn golden_device() -> FakeDevice {
    let mut d = FakeDevice::new("blk0", 2);
    d.step(1);
    d.step(2);
    d
}

/// Rewrites the golden file: `UPDATE_GOLDEN=1 cargo test -p migration-testkit --test conformance golden`.
/// Only ever needed when the format changes on purpose.
fn write_golden(json: &Arc<dyn Codec>) {
    let mut d = golden_device();
    d.emulate_version(1);
    let mut s = d.snapshot().unwrap();
    s.encode(json).unwrap();
    let bytes = migration_core::codec::encode(json.as_ref(), &s).unwrap();
    std::fs::write(golden_path(), bytes).unwrap();
}

#[test]
fn golden_version_1_bytes_restore_with_features_unset() {
    let registry = codecs();
    let json = registry.require(migration_serde::JSON_ID).unwrap().clone();
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        write_golden(&json);
    }
    let golden = std::fs::read(golden_path()).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    let restored =
        version_upgrade(&golden, &json, &registry, || FakeDevice::new("blk0", 2)).unwrap();
    let want = golden_device();
    assert_eq!(restored.state().features, None);
    assert_eq!(restored.state().buffer, want.state().buffer);
    assert_eq!(restored.state().interrupts, want.state().interrupts);
    assert_eq!(restored.queues(), want.queues());
    // The restored device writes version 2.
    let mut again = restored;
    assert_eq!(
        again
            .snapshot()
            .unwrap()
            .section("state")
            .unwrap()
            .version(),
        2
    );
}

#[test]
fn version_upgrade_fails_on_a_version_the_reader_does_not_know() {
    let registry = codecs();
    let json = registry.require(migration_serde::JSON_ID).unwrap().clone();
    let mut d = golden_device();
    d.emulate_version(3);
    let mut s = d.snapshot().unwrap();
    s.encode(&json).unwrap();
    let bytes = migration_core::codec::encode(json.as_ref(), &s).unwrap();
    let err = version_upgrade(&bytes, &json, &registry, || FakeDevice::new("blk0", 2)).unwrap_err();
    assert_eq!(err.property(), Property::VersionUpgrade);
    assert_eq!(err.path(), "blk0");
    assert!(err.to_string().contains("version 3"), "{err}");
}
