//! [`BincodeCodec`]: bincode 2.0.1, fixed-size little-endian integers.
//!
//! bincode is unmaintained (RUSTSEC-2025-0141, and 3.0.0 is a stub that does not
//! compile), so it is pinned at `=2.0.1` and fenced in this file: nothing outside it
//! names bincode, and callers reach it only through [`Codec`]. Dropping it later
//! removes one file and one registry entry; snapshots written with it stay readable
//! by any build that keeps this feature.

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use migration_core::codec::DecodeVisitor;
use migration_core::{Codec, CodecError, CodecId};

use crate::limits::{self, DepthBudget, VisitSeed, MAX_PAYLOAD};

/// The id of [`BincodeCodec`] in sections it encodes: `bin2`.
pub const BINCODE_ID: CodecId = CodecId::new(b"bin2");

type Config = Configuration<LittleEndian, Fixint, Limit<MAX_PAYLOAD>>;

/// bincode's configuration here: little-endian, fixed-size integers (a `u32` is
/// always 4 bytes, lengths and enum tags 8 and 4), at most [`MAX_PAYLOAD`] bytes
/// claimed by containers.
const CONFIG: Config = bincode::config::standard()
    .with_little_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_PAYLOAD>();

/// bincode 2.0.1 with fixed-size little-endian integers: sizes are predictable
/// (a struct of integers encodes to the sum of their sizes), lengths are `u64`.
///
/// Positional: fields are identified by order, not name. Decoding is depth-limited
/// and never allocates a declared length (see [`crate::limits`]).
///
/// ```
/// use migration_core::codec;
/// use migration_serde::BincodeCodec;
///
/// let bytes = codec::encode(&BincodeCodec, &(1u8, 300u32))?;
/// assert_eq!(bytes, [1, 0x2c, 0x01, 0, 0]);
/// let back: (u8, u32) = codec::decode(&BincodeCodec, &bytes)?;
/// assert_eq!(back, (1, 300));
/// # Ok::<(), migration_core::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BincodeCodec;

impl Codec for BincodeCodec {
    fn id(&self) -> CodecId {
        BINCODE_ID
    }

    fn name(&self) -> &str {
        "bincode"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, CodecError> {
        let out = bincode::serde::encode_to_vec(value, CONFIG).map_err(|e| CodecError::Encode {
            codec: BINCODE_ID,
            source: e.into(),
        })?;
        limits::check_payload_len(BINCODE_ID, out.len())?;
        Ok(out)
    }

    fn decode(&self, payload: &[u8], visitor: &mut DecodeVisitor<'_>) -> Result<(), CodecError> {
        limits::check_payload_len(BINCODE_ID, payload.len())?;
        let budget = DepthBudget::default();
        let seed = VisitSeed::new(visitor, &budget);
        let ((), read) =
            bincode::serde::seed_decode_from_slice(seed, payload, CONFIG).map_err(|e| {
                let inner = budget.take_error();
                // bincode's limit error, directly or as the innermost nested error.
                let limit = matches!(e, bincode::error::DecodeError::LimitExceeded)
                    || inner.as_deref() == Some("LimitExceeded");
                if budget.exceeded() {
                    limits::depth_exceeded(BINCODE_ID)
                } else if limit {
                    CodecError::LimitExceeded {
                        codec: BINCODE_ID,
                        what: "container length",
                        limit: MAX_PAYLOAD as u64,
                    }
                } else {
                    CodecError::Decode {
                        codec: BINCODE_ID,
                        source: inner.map_or_else(|| e.into(), Into::into),
                    }
                }
            })?;
        match payload.len().saturating_sub(read) {
            0 => Ok(()),
            count => Err(CodecError::TrailingBytes {
                codec: BINCODE_ID,
                count,
            }),
        }
    }
}
