//! A downstream crate adding a fourth codec: postcard with an FNV-1a checksum trailer,
//! registered beside the stock codecs and checked with the same conformance suite.
//!
//! Run: `cargo run -p migration-serde --example custom_codec`.

use std::sync::Arc;

use migration_core::codec::{self, Codec, CodecError, CodecId, DecodeVisitor};
use migration_core::Snapshot;
use migration_serde::limits::{DepthBudget, DepthLimited, MAX_PAYLOAD};

/// postcard followed by the 8-byte little-endian FNV-1a hash of the postcard bytes.
#[derive(Debug)]
struct CheckedPostcard;

/// Pick an id no other codec uses.
const CHECKED_ID: CodecId = CodecId::new(b"pcdc");

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn decode_err(e: impl Into<migration_core::BoxError>) -> CodecError {
    CodecError::Decode {
        codec: CHECKED_ID,
        source: e.into(),
    }
}

impl Codec for CheckedPostcard {
    fn id(&self) -> CodecId {
        CHECKED_ID
    }

    fn name(&self) -> &str {
        "postcard+fnv"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, CodecError> {
        let mut out = postcard::to_stdvec(value).map_err(|e| CodecError::Encode {
            codec: CHECKED_ID,
            source: e.into(),
        })?;
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        Ok(out)
    }

    fn decode(&self, payload: &[u8], visitor: &mut DecodeVisitor<'_>) -> Result<(), CodecError> {
        // 1. Bound the input before anything else.
        if payload.len() > MAX_PAYLOAD {
            return Err(CodecError::LimitExceeded {
                codec: CHECKED_ID,
                what: "payload length",
                limit: MAX_PAYLOAD as u64,
            });
        }
        let split = payload
            .len()
            .checked_sub(8)
            .ok_or_else(|| decode_err("payload shorter than its checksum"))?;
        let (body, sum) = payload.split_at(split);
        let mut expected = [0u8; 8];
        expected.copy_from_slice(sum);
        if fnv1a(body) != u64::from_le_bytes(expected) {
            return Err(decode_err("checksum mismatch"));
        }
        // 2. Concrete deserializer, depth-limited, erased; call the visitor once.
        let budget = DepthBudget::default();
        let mut de = postcard::Deserializer::from_bytes(body);
        let mut erased =
            <dyn erased_serde::Deserializer>::erase(DepthLimited::new(&mut de, &budget));
        visitor(&mut erased).map_err(|e| {
            if budget.exceeded() {
                CodecError::LimitExceeded {
                    codec: CHECKED_ID,
                    what: "nesting depth",
                    limit: migration_serde::limits::MAX_DEPTH as u64,
                }
            } else {
                decode_err(budget.take_error().unwrap_or_else(|| e.to_string()))
            }
        })?;
        // 3. Reject trailing bytes.
        let rest = de.finalize().map_err(decode_err)?;
        if !rest.is_empty() {
            return Err(CodecError::TrailingBytes {
                codec: CHECKED_ID,
                count: rest.len(),
            });
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Register it beside the stock codecs and prefer it for encoding.
    let mut registry = migration_serde::registry();
    let checked: Arc<dyn Codec> = Arc::new(CheckedPostcard);
    registry.register(checked.clone());
    registry.set_preferred(CHECKED_ID)?;

    // Writer.
    let mut snapshot = Snapshot::new("uart");
    snapshot.add_state_as("regs", 1, [0x03u8, 0x60, 0x00, 0xc1]);
    snapshot.encode(&checked)?;
    let bytes = codec::encode(checked.as_ref(), &snapshot)?;

    // Reader: resolves the codec from the section's recorded id.
    let mut read: Snapshot = codec::decode(checked.as_ref(), &bytes)?;
    read.resolve_codecs(&registry);
    let regs: [u8; 4] = read.section("regs")?.decode()?;
    assert_eq!(regs, [0x03, 0x60, 0x00, 0xc1]);

    // A flipped bit is caught by the checksum.
    let mut bad = bytes.clone();
    bad[3] ^= 1;
    assert!(codec::decode::<Snapshot>(checked.as_ref(), &bad).is_err());

    // The same conformance suite the stock codecs pass (migration-testkit's).
    let report = migration_testkit::codec_conformance::check_codec(checked.as_ref())?;
    println!("conformance: {} cases passed", report.cases.len());
    println!("custom codec `{}` ({}) works", checked.name(), checked.id());
    Ok(())
}
