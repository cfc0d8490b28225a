//! The snapshot tree, tested with migration-testkit's fakes, harness and strategies:
//! building and path lookup, determinism whatever the insertion order, section
//! version upgrade and rejection, unknown codecs, and errors that name their path.

use migration_core::codec::{self, CodecError, CodecRegistry};
use migration_core::{MigratableError, Snapshot, Snapshottable};
use migration_testkit::strategies::{tree_spec, TreeShape};
use migration_testkit::{Conformance, FailOn, FakeDevice, FakeDeviceManager};
use proptest::prelude::*;

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

/// Encodes `tree` with each codec and serializes it: one byte string per codec.
fn encodings(tree: &Snapshot) -> Vec<Vec<u8>> {
    codecs()
        .iter()
        .map(|c| {
            let mut t = tree.clone();
            t.encode(c).unwrap();
            codec::encode(c.as_ref(), &t).unwrap()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_node_is_found_by_its_path_and_walked_parents_first(
        spec in tree_spec(TreeShape::default())
    ) {
        let tree = spec.build();
        let walked: Vec<String> = tree.walk().map(|(p, _)| p).collect();
        let mut want = spec.paths();
        want.sort();
        let mut got = walked.clone();
        got.sort();
        prop_assert_eq!(got, want);
        for (i, path) in walked.iter().enumerate() {
            let node = tree.find(path);
            prop_assert!(node.is_some(), "{} not found", path);
            let node = node.unwrap();
            prop_assert_eq!(node.id(), path.rsplit('/').next().unwrap());
            // A parent comes before its children.
            if let Some((parent, _)) = path.rsplit_once('/') {
                prop_assert!(walked[..i].iter().any(|p| p == parent));
            }
        }
        let missing = format!("{}/no such child!", spec.id);
        prop_assert!(tree.find(&missing).is_none());
        prop_assert!(tree.find("").is_none());
    }

    #[test]
    fn trees_built_in_any_order_encode_identically(
        spec in tree_spec(TreeShape::default()),
        seed in any::<u64>(),
    ) {
        prop_assert_eq!(encodings(&spec.build()), encodings(&spec.build_shuffled(seed)));
    }

    #[test]
    fn encoded_trees_survive_serialization(spec in tree_spec(TreeShape { max_depth: 2, ..TreeShape::default() })) {
        let registry = codecs();
        for c in registry.iter() {
            let mut tree = spec.build();
            tree.encode(c).unwrap();
            let bytes = codec::encode(c.as_ref(), &tree).unwrap();
            let mut back: Snapshot = codec::decode(c.as_ref(), &bytes).unwrap();
            back.resolve_codecs(&registry);
            prop_assert!(back.is_encoded());
            prop_assert_eq!(codec::encode(c.as_ref(), &back).unwrap(), bytes);
        }
    }
}

#[test]
fn a_device_tree_passes_the_conformance_harness() {
    let small = || {
        FakeDeviceManager::new()
            .with_device(FakeDevice::new("uart0", 0))
            .with_device(FakeDevice::new("blk0", 1))
    };
    let mut devices = small();
    devices.step(42);
    Conformance::new(codecs())
        .bit_flips(16)
        .check(&mut devices, small)
        .unwrap();
}

/// Snapshots `devices`, encodes with `codec_id` and serializes, then decodes and
/// resolves with `registry`: what a restore on another host sees.
fn through_codec(
    devices: &mut FakeDeviceManager,
    codec_id: migration_core::CodecId,
    registry: &CodecRegistry,
) -> Snapshot {
    let writer = codecs();
    let c = writer.require(codec_id).unwrap();
    let mut s = devices.snapshot().unwrap();
    s.encode(c).unwrap();
    let bytes = codec::encode(c.as_ref(), &s).unwrap();
    let mut back: Snapshot = codec::decode(c.as_ref(), &bytes).unwrap();
    back.resolve_codecs(registry);
    back
}

#[test]
fn older_section_versions_upgrade_through_every_codec() {
    for c in codecs().iter() {
        let mut old = FakeDeviceManager::standard();
        old.step(3);
        old.device_mut("blk0").unwrap().emulate_version(1);
        let snapshot = through_codec(&mut old, c.id(), &codecs());
        assert_eq!(
            snapshot
                .find("devices/blk0")
                .unwrap()
                .section("state")
                .unwrap()
                .version(),
            1
        );
        let mut new = FakeDeviceManager::standard();
        new.restore(&snapshot).unwrap();
        let (was, now) = (old.device("blk0").unwrap(), new.device("blk0").unwrap());
        assert_eq!(now.state().features, None, "version 1 has no features");
        assert_eq!(now.state().buffer, was.state().buffer);
        assert_eq!(now.queues(), was.queues());
        // Devices written at the current version keep their features.
        assert_eq!(new.device("net0"), old.device("net0"));
    }
}

#[test]
fn newer_section_versions_are_rejected_naming_path_and_versions() {
    for c in codecs().iter() {
        let mut future = FakeDeviceManager::standard();
        future.device_mut("net0").unwrap().emulate_version(7);
        let snapshot = through_codec(&mut future, c.id(), &codecs());
        let err = FakeDeviceManager::standard()
            .restore(&snapshot)
            .unwrap_err();
        match &err {
            MigratableError::Version {
                path,
                section,
                found,
                min,
                max,
            } => {
                assert_eq!((path.as_str(), section.as_str()), ("devices/net0", "state"));
                assert_eq!((*found, *min, *max), (7, 1, 2));
            }
            other => panic!("expected a version error, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("devices/net0") && msg.contains('7') && msg.contains("1 to 2"),
            "{msg}"
        );
    }
}

#[test]
fn an_unknown_codec_id_on_restore_is_named() {
    let json = migration_serde::JSON_ID;
    let mut devices = FakeDeviceManager::standard();
    devices.step(1);
    // The reader knows every codec but JSON.
    let mut reader = CodecRegistry::new();
    for c in codecs().iter().filter(|c| c.id() != json) {
        reader.register(c.clone());
    }
    let snapshot = through_codec(&mut devices, json, &reader);
    let err = FakeDeviceManager::standard()
        .restore(&snapshot)
        .unwrap_err();
    match &err {
        MigratableError::Codec {
            path,
            source: CodecError::UnknownCodec(id),
            ..
        } => {
            assert_eq!(*id, json);
            assert!(path.starts_with("devices/"), "{path}");
        }
        other => panic!("expected an unknown-codec error, got {other}"),
    }
    assert!(err.to_string().contains(&json.to_string()), "{err}");
}

#[test]
fn an_error_mid_tree_names_the_component_path() {
    for op in [
        FailOn::Snapshot,
        FailOn::Restore,
        FailOn::Pause,
        FailOn::Resume,
    ] {
        let mut devices = FakeDeviceManager::standard();
        let snapshot = devices.snapshot().unwrap();
        devices.device_mut("blk0").unwrap().fail_on(Some(op));
        let err = match op {
            FailOn::Snapshot => devices.snapshot().unwrap_err(),
            FailOn::Restore => devices.restore(&snapshot).unwrap_err(),
            FailOn::Pause => migration_core::Pausable::pause(&mut devices).unwrap_err(),
            FailOn::Resume => migration_core::Pausable::resume(&mut devices).unwrap_err(),
        };
        assert_eq!(err.path(), Some("devices/blk0"), "{op:?}: {err}");
        assert!(err.to_string().contains("devices/blk0"), "{err}");
    }
    // A missing sub-device names the parent and the child.
    let mut devices = FakeDeviceManager::standard();
    let snapshot = devices.snapshot().unwrap();
    let mut bigger = FakeDeviceManager::standard().with_device(FakeDevice::new("blk0", 3));
    match bigger.restore(&snapshot).unwrap_err() {
        MigratableError::MissingChild { path, child } => {
            assert_eq!((path.as_str(), child.as_str()), ("devices/blk0", "queue2"));
        }
        other => panic!("expected a missing child, got {other}"),
    }
}

/// A struct's layout changed (a field inserted) without a new section version: the
/// positional codec fails, and the error names the section, its path, its version
/// and the type, not only the codec's own words ("Serde Deserialization Error").
#[test]
fn a_section_that_does_not_decode_names_its_path_and_type() {
    use serde::{Deserialize, Serialize};
    #[derive(Clone, Serialize, Deserialize)]
    struct Uart {
        lcr: u8,
    }
    impl migration_core::Versioned for Uart {
        const VERSION: u32 = 1;
    }
    /// The same version, another layout.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct UartChanged {
        lcr: u8,
        fifo: Vec<u64>,
        divisor: u64,
    }
    impl migration_core::Versioned for UartChanged {
        const VERSION: u32 = 1;
    }
    let postcard = codecs().get(migration_serde::POSTCARD_ID).unwrap().clone();
    let mut vm = Snapshot::new("vm");
    let mut uart = Snapshot::new("uart0");
    uart.add_state("state", Uart { lcr: 3 });
    vm.add_child(uart);
    vm.encode(&postcard).unwrap();
    let err = vm
        .child("uart0")
        .unwrap()
        .state::<UartChanged>("state")
        .unwrap_err()
        .within("vm");
    let MigratableError::Codec {
        path,
        section,
        source: CodecError::AsType { ty, version, .. },
    } = &err
    else {
        panic!("expected a decode error naming the type, got {err}");
    };
    assert_eq!(
        (path.as_str(), section.as_str(), *version),
        ("vm/uart0", "state", 1)
    );
    assert!(ty.ends_with("UartChanged"), "{ty}");
    let text = err.to_string();
    assert!(
        text.starts_with("section `state` of `vm/uart0`: a version 1 payload does not decode as `")
            && text.contains("UartChanged` (a changed layout needs a new section version): `pcd1` could not decode"),
        "{text}"
    );
}

/// A snapshot whose sections need a codec the reader lacks is refused before
/// anything is restored, with the list of what it needs: from the tree, and from a
/// container's metadata before any payload or memory is read.
#[test]
fn a_snapshot_names_the_codecs_it_needs_and_is_refused_early_without_them() {
    use std::io::Cursor;
    let all = codecs();
    let (json, postcard) = (
        all.get(migration_serde::JSON_ID).unwrap().clone(),
        all.get(migration_serde::POSTCARD_ID).unwrap().clone(),
    );
    let mut vm = Snapshot::new("vm");
    let mut a = Snapshot::new("a");
    a.add_state_as("s", 1, 7u32);
    a.encode(&json).unwrap();
    let mut b = Snapshot::new("b");
    b.add_state_as("s", 1, 8u32);
    b.encode(&postcard).unwrap();
    vm.add_child(a);
    vm.add_child(b);
    let needed: Vec<_> = vm.required_codecs().into_iter().collect();
    assert_eq!(
        needed,
        [migration_serde::JSON_ID, migration_serde::POSTCARD_ID]
    );

    let only_json = CodecRegistry::new().with(json.clone());
    vm.check_codecs(&all).unwrap();
    let err = vm.check_codecs(&only_json).unwrap_err();
    assert!(
        matches!(&err, MigratableError::MissingCodecs { missing, .. } if missing == &[migration_serde::POSTCARD_ID]),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the snapshot needs codecs [json, pcd1]; not registered here: [pcd1]"
    );

    // The container reader knows it from the metadata alone.
    let mut bytes = Cursor::new(Vec::new());
    migration_core::container::write_snapshot(&mut bytes, &vm, None, &Default::default()).unwrap();
    let reader =
        migration_core::container::ContainerReader::open(Cursor::new(bytes.into_inner())).unwrap();
    assert_eq!(
        reader.required_codecs().into_iter().collect::<Vec<_>>(),
        needed
    );
    assert_eq!(
        reader.check_codecs(&only_json).unwrap_err().to_string(),
        err.to_string()
    );
    reader.check_codecs(&all).unwrap();
}
