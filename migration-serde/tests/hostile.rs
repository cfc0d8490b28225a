//! Hostile input: forged lengths, depth bombs, oversized payloads, trailing garbage,
//! truncation and random bytes. Each must be a typed error: no panic, no stack
//! overflow, no allocation of a declared length.

use std::collections::BTreeMap;

use migration_core::{codec, Codec, CodecError};
use migration_serde::limits::{MAX_DEPTH, MAX_PAYLOAD};
use migration_serde::{BincodeCodec, JsonCodec, PostcardCodec, BINCODE_ID, POSTCARD_ID};
use migration_testkit::codec_conformance::{check_truncation, sample, Nest, Nested};
use proptest::prelude::*;

/// postcard's unsigned LEB128 varint.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A payload declaring `len` elements followed by a few real bytes, in each binary
/// codec's length encoding.
fn forged(codec: &dyn Codec, len: u64) -> Vec<u8> {
    let mut p = if codec.id() == BINCODE_ID {
        len.to_le_bytes().to_vec()
    } else {
        varint(len)
    };
    p.extend_from_slice(b"abcdefgh");
    p
}

fn binary_codecs() -> [&'static dyn Codec; 2] {
    [&BincodeCodec, &PostcardCodec]
}

fn assert_err<T: std::fmt::Debug>(what: &str, codec: &dyn Codec, r: Result<T, CodecError>) {
    match r {
        Err(e) => eprintln!("{} {what}: {e}", codec.name()),
        Ok(v) => panic!("{} {what}: decoded {v:?}", codec.name()),
    }
}

#[test]
fn forged_lengths_fail_without_allocating() {
    const TIB: u64 = 1 << 40;
    for c in binary_codecs() {
        assert_err(
            "1 TiB Vec<u64>",
            c,
            codec::decode::<Vec<u64>>(c, &forged(c, TIB / 8)),
        );
        assert_err(
            "1 TiB Vec<u8>",
            c,
            codec::decode::<Vec<u8>>(c, &forged(c, TIB)),
        );
        assert_err(
            "1 TiB ByteBuf",
            c,
            codec::decode::<serde_bytes::ByteBuf>(c, &forged(c, TIB)),
        );
        assert_err(
            "2^63 String",
            c,
            codec::decode::<String>(c, &forged(c, 1 << 63)),
        );
        assert_err(
            "u64::MAX String",
            c,
            codec::decode::<String>(c, &forged(c, u64::MAX)),
        );
        assert_err(
            "2^40 BTreeMap",
            c,
            codec::decode::<BTreeMap<u32, u32>>(c, &forged(c, TIB)),
        );
        assert_err(
            "2^40 Vec<[u8; 4096]>",
            c,
            codec::decode::<Vec<Vec<u8>>>(c, &forged(c, TIB)),
        );
        let r = codec::decode::<String>(c, &forged(c, 1 << 63));
        if c.id() == BINCODE_ID {
            assert!(
                matches!(
                    r,
                    Err(CodecError::LimitExceeded {
                        what: "container length",
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        // Within the payload budget but longer than the payload.
        assert_err(
            "60 MiB String",
            c,
            codec::decode::<String>(c, &forged(c, 60 << 20)),
        );
    }
}

#[test]
fn oversized_payload_is_rejected_before_decoding() {
    let big = vec![0u8; MAX_PAYLOAD + 1];
    for c in [
        &JsonCodec::new() as &dyn Codec,
        &BincodeCodec,
        &PostcardCodec,
    ] {
        let r = codec::decode::<serde::de::IgnoredAny>(c, &big);
        assert!(
            matches!(
                r,
                Err(CodecError::LimitExceeded {
                    what: "payload length",
                    ..
                })
            ),
            "{}: {r:?}",
            c.name()
        );
    }
    // And no codec writes what it would refuse to read.
    let buf = serde_bytes::ByteBuf::from(vec![0u8; MAX_PAYLOAD]);
    let r = codec::encode(&PostcardCodec, &buf);
    assert!(matches!(r, Err(CodecError::LimitExceeded { .. })), "{r:?}");
}

/// `depth` nested `Nest::Node`s around a `Nest::Leaf`, written by hand (encoding a
/// value that deep would itself recurse a million times).
fn depth_bomb(codec: &dyn Codec, depth: usize) -> Vec<u8> {
    match codec.id() {
        BINCODE_ID => {
            let mut p = [1u8, 0, 0, 0].repeat(depth);
            p.extend_from_slice(&[0, 0, 0, 0]);
            p
        }
        POSTCARD_ID => {
            let mut p = vec![1u8; depth];
            p.push(0);
            p
        }
        _ => format!(
            "{}\"Leaf\"{}",
            "{\"Node\":".repeat(depth),
            "}".repeat(depth)
        )
        .into_bytes(),
    }
}

#[test]
fn depth_bombs_are_typed_errors_on_a_2_mib_stack() {
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            for c in [&JsonCodec::new() as &dyn Codec, &BincodeCodec, &PostcardCodec] {
                let payload = depth_bomb(c, 1_000_000);
                let r = codec::decode::<Nest>(c, &payload);
                assert!(
                    matches!(r, Err(CodecError::LimitExceeded { what: "nesting depth", limit, .. }) if limit == MAX_DEPTH as u64),
                    "{}: {r:?}",
                    c.name()
                );
                // Just inside the limit still decodes.
                let ok = codec::decode::<Nest>(c, &depth_bomb(c, MAX_DEPTH - 2));
                assert!(ok.is_ok(), "{}: {ok:?}", c.name());
            }
            // Untyped JSON (deserialize_any) too.
            let arrays = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
            let r = codec::decode::<serde_json::Value>(&JsonCodec::new(), arrays.as_bytes());
            assert!(matches!(r, Err(CodecError::LimitExceeded { .. })), "{r:?}");
            // Skipping a value (IgnoredAny) is iterative in serde_json: no recursion.
            let r = codec::decode::<serde::de::IgnoredAny>(&JsonCodec::new(), arrays.as_bytes());
            assert!(r.is_ok(), "{r:?}");
        })
        .expect("spawn");
    handle.join().expect("no stack overflow or panic");
}

#[test]
fn trailing_garbage_is_counted() {
    for c in binary_codecs() {
        let mut payload = codec::encode(c, &sample()).unwrap();
        payload.extend_from_slice(&[0, 0, 0]);
        let r = codec::decode::<Nested>(c, &payload);
        assert!(
            matches!(r, Err(CodecError::TrailingBytes { count: 3, .. })),
            "{}: {r:?}",
            c.name()
        );
    }
    let r = codec::decode::<u32>(&JsonCodec::new(), b"7 garbage");
    assert!(
        matches!(r, Err(CodecError::TrailingBytes { count: 7, .. })),
        "{r:?}"
    );
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    for c in [
        &JsonCodec::new() as &dyn Codec,
        &JsonCodec::pretty(),
        &BincodeCodec,
        &PostcardCodec,
    ] {
        check_truncation(c, "nested", &sample()).unwrap_or_else(|e| panic!("{e}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes never panic, and flipping any byte of a valid payload never panics.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), flip in any::<(usize, u8)>()) {
        for c in [&JsonCodec::new() as &dyn Codec, &BincodeCodec, &PostcardCodec] {
            let _ = codec::decode::<Nested>(c, &bytes);
            let _ = codec::decode::<Nest>(c, &bytes);
            let mut valid = codec::encode(c, &sample()).unwrap();
            let i = flip.0 % valid.len();
            valid[i] ^= flip.1 | 1;
            let _ = codec::decode::<Nested>(c, &valid);
        }
    }
}
