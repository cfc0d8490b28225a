//! [`PostcardCodec`]: postcard 1.x, the maintained compact binary codec.

use migration_core::codec::DecodeVisitor;
use migration_core::{Codec, CodecError, CodecId};
use serde::de::DeserializeSeed;

use crate::limits::{self, DepthBudget, VisitSeed};

/// The id of [`PostcardCodec`] in sections it encodes: `pcd1`.
pub const POSTCARD_ID: CodecId = CodecId::new(b"pcd1");

/// postcard 1.x: varint integers, length-prefixed sequences, a documented and stable
/// wire format (<https://postcard.jamesmunns.com/wire-format>). The preferred binary
/// codec: compact, maintained, and depth-limited here by
/// [`DepthLimited`](crate::limits::DepthLimited).
///
/// Positional like bincode: fields are identified by order, not name.
///
/// ```
/// use migration_core::codec;
/// use migration_serde::PostcardCodec;
///
/// let bytes = codec::encode(&PostcardCodec, &(1u8, 300u32))?;
/// assert_eq!(bytes, [1, 0xac, 0x02]); // 300 as a varint
/// let back: (u8, u32) = codec::decode(&PostcardCodec, &bytes)?;
/// assert_eq!(back, (1, 300));
/// # Ok::<(), migration_core::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcardCodec;

impl Codec for PostcardCodec {
    fn id(&self) -> CodecId {
        POSTCARD_ID
    }

    fn name(&self) -> &str {
        "postcard"
    }

    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, CodecError> {
        let out = postcard::to_stdvec(value).map_err(|e| CodecError::Encode {
            codec: POSTCARD_ID,
            source: e.into(),
        })?;
        limits::check_payload_len(POSTCARD_ID, out.len())?;
        Ok(out)
    }

    fn decode(&self, payload: &[u8], visitor: &mut DecodeVisitor<'_>) -> Result<(), CodecError> {
        limits::check_payload_len(POSTCARD_ID, payload.len())?;
        let budget = DepthBudget::default();
        let mut de = postcard::Deserializer::from_bytes(payload);
        VisitSeed::new(visitor, &budget)
            .deserialize(&mut de)
            .map_err(|e| {
                if budget.exceeded() {
                    limits::depth_exceeded(POSTCARD_ID)
                } else {
                    CodecError::Decode {
                        codec: POSTCARD_ID,
                        source: budget.take_error().map_or_else(|| e.into(), Into::into),
                    }
                }
            })?;
        let rest = de.finalize().map_err(|e| CodecError::Decode {
            codec: POSTCARD_ID,
            source: e.into(),
        })?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes {
                codec: POSTCARD_ID,
                count: rest.len(),
            })
        }
    }
}
