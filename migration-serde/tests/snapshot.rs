//! A snapshot encoded with any codec decodes through `registry()` without the reader
//! naming the codec, including a tree whose sections use different codecs.

use std::collections::BTreeMap;
use std::sync::Arc;

use migration_core::{
    codec, Codec, CodecError, CodecRegistry, MigratableError, Snapshot, Versioned,
};
use migration_serde::{registry, BincodeCodec, JsonCodec, PostcardCodec};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct VcpuState {
    regs: [u64; 18],
    msrs: BTreeMap<u32, u64>,
    #[serde(with = "serde_bytes")]
    xsave: Vec<u8>,
}
impl Versioned for VcpuState {
    const VERSION: u32 = 3;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SerialState {
    lcr: u8,
    fifo: Option<Vec<u8>>,
}
impl Versioned for SerialState {
    const VERSION: u32 = 1;
}

fn vcpu(i: u64) -> VcpuState {
    VcpuState {
        regs: std::array::from_fn(|r| r as u64 * 0x1000 + i),
        msrs: (0..40)
            .map(|m| (0xc000_0080 + m, u64::from(m) << 32 | i))
            .collect(),
        xsave: (0..4096).map(|b| (b as u64 ^ i) as u8).collect(),
    }
}

fn tree() -> Snapshot {
    let mut vm = Snapshot::new("vm");
    for i in 0..2 {
        let mut cpu = Snapshot::new(format!("vcpu{i}"));
        cpu.add_state("state", vcpu(i));
        vm.add_child(cpu);
    }
    let mut serial = Snapshot::new("serial0");
    serial.add_state(
        "state",
        SerialState {
            lcr: 3,
            fifo: Some(b"login:".to_vec()),
        },
    );
    vm.add_child(serial);
    vm
}

fn check(read: &Snapshot) -> Result<(), MigratableError> {
    for i in 0..2 {
        let cpu = read.child(&format!("vcpu{i}"))?;
        assert_eq!(cpu.state::<VcpuState>("state")?, vcpu(i));
    }
    let serial: SerialState = read.child("serial0")?.state("state")?;
    assert_eq!(serial.fifo.as_deref(), Some(&b"login:"[..]));
    Ok(())
}

#[test]
fn snapshot_with_each_codec_decodes_through_the_registry() -> anyhow::Result<()> {
    let codecs: [Arc<dyn Codec>; 4] = [
        Arc::new(JsonCodec::new()),
        Arc::new(JsonCodec::pretty()),
        Arc::new(BincodeCodec),
        Arc::new(PostcardCodec),
    ];
    // The tree itself travels as postcard here; the sections inside name their codec.
    let carrier = PostcardCodec;
    for c in &codecs {
        let mut snap = tree();
        snap.encode(c)?;
        let bytes = codec::encode(&carrier, &snap)?;

        let mut read: Snapshot = codec::decode(&carrier, &bytes)?;
        read.resolve_codecs(&registry());
        check(&read)?;
        eprintln!("{:<14} snapshot {} B", c.name(), bytes.len());
    }
    Ok(())
}

#[test]
fn sections_may_mix_codecs() -> anyhow::Result<()> {
    let json: Arc<dyn Codec> = Arc::new(JsonCodec::new());
    let bincode: Arc<dyn Codec> = Arc::new(BincodeCodec);
    let mut snap = tree();
    // Encode one child with JSON first: encoding the rest keeps its bytes and codec.
    let mut serial = snap.child("serial0")?.clone();
    serial.encode(&json)?;
    snap.add_child(serial);
    snap.encode(&bincode)?;

    let bytes = codec::encode(json.as_ref(), &snap)?;
    let mut read: Snapshot = codec::decode(json.as_ref(), &bytes)?;
    read.resolve_codecs(&registry());
    let ids: Vec<_> = read
        .walk()
        .flat_map(|(_, n)| n.sections().map(|(_, s)| s.codec_id()).collect::<Vec<_>>())
        .collect();
    assert!(ids.contains(&Some(migration_serde::JSON_ID)));
    assert!(ids.contains(&Some(migration_serde::BINCODE_ID)));
    check(&read)?;
    Ok(())
}

#[test]
fn a_codec_missing_from_the_registry_is_named() -> anyhow::Result<()> {
    let mut snap = tree();
    snap.encode(&(Arc::new(BincodeCodec) as Arc<dyn Codec>))?;
    let bytes = codec::encode(&PostcardCodec, &snap)?;
    let mut read: Snapshot = codec::decode(&PostcardCodec, &bytes)?;
    let only_json = CodecRegistry::new().with(Arc::new(JsonCodec::new()));
    read.resolve_codecs(&only_json);
    let err = read
        .child("serial0")?
        .state::<SerialState>("state")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            MigratableError::Codec { source: CodecError::UnknownCodec(id), .. } if *id == migration_serde::BINCODE_ID
        ),
        "{err:?}"
    );
    Ok(())
}
