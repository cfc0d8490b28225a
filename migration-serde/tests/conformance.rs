//! Every codec over the same state types: round trip, determinism, truncation,
//! trailing bytes, nesting, and the kvm-bindings state structs.

use std::fmt;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use migration_core::{codec, Codec};
use migration_serde::{BincodeCodec, JsonCodec, PostcardCodec};
use migration_testkit::codec_conformance::{check_codec, check_value, pattern};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

fn codecs() -> Vec<Arc<dyn Codec>> {
    vec![
        Arc::new(JsonCodec::new()),
        Arc::new(JsonCodec::pretty()),
        Arc::new(BincodeCodec),
        Arc::new(PostcardCodec),
    ]
}

#[test]
fn every_codec_passes_the_suite() {
    for codec in codecs() {
        let report = check_codec(codec.as_ref()).unwrap_or_else(|e| panic!("{e}"));
        for case in &report.cases {
            eprintln!(
                "{:<14} {:<12} {:>10} B",
                codec.name(),
                case.name,
                case.encoded_len
            );
        }
    }
}

#[test]
fn byte_sections_are_compact_in_binary_codecs() {
    let buf = pattern(16 << 20);
    for codec in [&BincodeCodec as &dyn Codec, &PostcardCodec] {
        let bytes = codec::encode(codec, &buf).unwrap();
        // Length prefix (8 bytes fixed, or a varint) plus the bytes themselves.
        assert!(
            bytes.len() <= buf.len() + 9,
            "{}: {}",
            codec.name(),
            bytes.len()
        );
    }
    let json = codec::encode(&JsonCodec::new(), &buf).unwrap();
    assert!(json.len() < 4 * buf.len() + 2, "json: {}", json.len());
}

/// A kvm-bindings struct, compared by its bytes: kvm-bindings' serde writes each state
/// struct as its raw bytes (`serialize_bytes`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Raw<T>(T);

impl<T: Serialize> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        let a = codec::encode(&PostcardCodec, &self.0).expect("encode");
        let b = codec::encode(&PostcardCodec, &other.0).expect("encode");
        a == b
    }
}

/// A `T` whose every byte is set (a fixed pattern), so a codec dropping or reordering
/// bytes shows.
fn filled<T: DeserializeOwned>() -> T {
    let bytes = pattern(std::mem::size_of::<T>());
    let payload = codec::encode(&PostcardCodec, &bytes).expect("encode");
    codec::decode(&PostcardCodec, &payload).expect("decode")
}

fn kvm_case<T: Serialize + DeserializeOwned + fmt::Debug>(codec: &dyn Codec, name: &str) {
    let value = Raw(filled::<T>());
    let encoded = check_value(codec, name, &value).unwrap_or_else(|e| panic!("{e}"));
    let payload = std::mem::size_of::<T>();
    eprintln!(
        "{:<14} {name:<16} {payload:>5} B -> {:>6} B",
        codec.name(),
        encoded.len()
    );
    if codec.id() != migration_serde::JSON_ID {
        // Binary codecs: the raw bytes plus a length prefix of at most 9 bytes.
        assert!(encoded.len() <= payload + 9, "{name}: {}", encoded.len());
    }
}

#[test]
fn kvm_state_structs_round_trip() {
    for codec in codecs() {
        let c = codec.as_ref();
        kvm_case::<kvm_regs>(c, "kvm_regs");
        kvm_case::<kvm_sregs>(c, "kvm_sregs");
        kvm_case::<kvm_lapic_state>(c, "kvm_lapic_state");
        kvm_case::<kvm_xcrs>(c, "kvm_xcrs");
        kvm_case::<kvm_debugregs>(c, "kvm_debugregs");
        kvm_case::<kvm_mp_state>(c, "kvm_mp_state");
        kvm_case::<kvm_vcpu_events>(c, "kvm_vcpu_events");
        kvm_case::<kvm_pit_state2>(c, "kvm_pit_state2");
        kvm_case::<kvm_clock_data>(c, "kvm_clock_data");
        kvm_case::<kvm_xsave>(c, "kvm_xsave");
    }
}
