//! The codec trait: how typed state becomes section bytes and back.
//!
//! Core knows no concrete codec. A codec crate (such as `migration-serde`) implements
//! [`Codec`] and hands instances to a [`CodecRegistry`]; a downstream crate adds its
//! own the same way, without touching this crate or any component.
//!
//! [`Codec`] is object safe: values cross it as `erased_serde` trait objects, so the
//! snapshot tree can hold `Arc<dyn Codec>` and any `Serialize` state type works with
//! any codec. Use [`encode`] and [`decode`] for typed calls.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::box_error::BoxError;

/// Largest encoded state a codec decodes and a destination buffers (64 MiB): one
/// limit for the protocol's device state ([`MAX_STATE`](crate::protocol::MAX_STATE))
/// and for every codec (migration-serde's `limits::MAX_PAYLOAD`), so what one side
/// accepts the other does not refuse after buffering it.
pub const MAX_ENCODED_LEN: usize = 64 << 20;

/// A codec's stable four-byte identifier, recorded in every section it encodes.
///
/// Pick a tag no other codec uses; printable ASCII reads best in tools
/// (`migration-serde` uses `json`, `bin2` and `pcd1`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CodecId(pub [u8; 4]);

impl CodecId {
    /// A codec id from its four bytes.
    pub const fn new(tag: &[u8; 4]) -> Self {
        Self(*tag)
    }

    /// The id as a little-endian `u32`, as the container format stores it.
    pub const fn to_u32(self) -> u32 {
        u32::from_le_bytes(self.0)
    }

    /// The id from a little-endian `u32`.
    pub const fn from_u32(v: u32) -> Self {
        Self(v.to_le_bytes())
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.iter().all(|b| b.is_ascii_graphic()) {
            // All four bytes are printable ASCII, so this is valid UTF-8.
            f.write_str(std::str::from_utf8(&self.0).map_err(|_| fmt::Error)?)
        } else {
            write!(f, "0x{:08x}", u32::from_be_bytes(self.0))
        }
    }
}

impl fmt::Debug for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodecId({self})")
    }
}

/// Errors of encoding and decoding one value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A section names a codec nobody registered.
    #[error("unknown codec `{0}`: no registered codec has this id")]
    UnknownCodec(CodecId),
    /// The codec could not encode the value.
    #[error("`{codec}` could not encode: {source}")]
    Encode {
        /// The codec.
        codec: CodecId,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The payload is not a valid encoding of the requested type.
    #[error("`{codec}` could not decode: {source}")]
    Decode {
        /// The codec.
        codec: CodecId,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// Bytes remain after a complete value.
    #[error("`{codec}`: {count} trailing bytes after the value")]
    TrailingBytes {
        /// The codec.
        codec: CodecId,
        /// How many bytes were left over.
        count: usize,
    },
    /// Decoding would exceed the codec's memory or depth budget.
    #[error("`{codec}`: {what} exceeds the decode limit of {limit}")]
    LimitExceeded {
        /// The codec.
        codec: CodecId,
        /// Which limit (payload size, allocation, nesting depth).
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A section still holding typed state was read as another type.
    #[error("section holds a `{found}`, not the requested `{wanted}`")]
    TypeMismatch {
        /// The type asked for.
        wanted: &'static str,
        /// The type the section holds.
        found: &'static str,
    },
    /// A payload did not decode as the type a component asked for: the codec's own
    /// error, with the type and the section version. Either the bytes are damaged
    /// or the type's layout changed without a new section version.
    #[error(
        "a version {version} payload does not decode as `{ty}` (a changed layout needs a new section version): {source}"
    )]
    AsType {
        /// The Rust type asked for.
        ty: &'static str,
        /// The section's recorded version.
        version: u32,
        /// The codec's error.
        #[source]
        source: Box<CodecError>,
    },
    /// The operation needs an encoded section, and this one still holds typed state.
    #[error("section is not encoded yet: encode the snapshot with a codec first")]
    NotEncoded,
}

/// A callback that deserializes one value from an erased deserializer.
pub type DecodeVisitor<'v> =
    dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<(), erased_serde::Error> + 'v;

/// A serialization format for section payloads.
///
/// Implementations must be deterministic (the same value gives the same bytes), must
/// reject trailing bytes after a value, and must bound what a hostile payload can make
/// them allocate or recurse: decoding reads untrusted input.
///
/// Callers use the typed helpers [`encode`] and [`decode`].
pub trait Codec: Send + Sync + fmt::Debug {
    /// The stable id recorded in sections this codec encodes.
    fn id(&self) -> CodecId;

    /// A human-readable name (`"json"`, `"postcard"`).
    fn name(&self) -> &str;

    /// Encodes `value`.
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, CodecError>;

    /// Decodes one value from `payload`: builds a deserializer over it, calls
    /// `visitor` once with it, then checks that no bytes remain.
    fn decode(&self, payload: &[u8], visitor: &mut DecodeVisitor<'_>) -> Result<(), CodecError>;
}

/// Encodes `value` with `codec`.
pub fn encode<T: Serialize>(codec: &dyn Codec, value: &T) -> Result<Vec<u8>, CodecError> {
    codec.encode(value)
}

/// Decodes a `T` from `payload` with `codec`.
pub fn decode<T: DeserializeOwned>(codec: &dyn Codec, payload: &[u8]) -> Result<T, CodecError> {
    let mut out = None;
    codec.decode(payload, &mut |de| {
        out = Some(erased_serde::deserialize::<T>(de)?);
        Ok(())
    })?;
    out.ok_or_else(|| CodecError::Decode {
        codec: codec.id(),
        source: "the codec did not call the decode visitor".into(),
    })
}

/// The codecs a process knows, by id, and the one it prefers for encoding.
///
/// Reading a snapshot resolves each section's recorded codec id here, so a snapshot
/// written with any registered codec decodes without the caller naming it.
#[derive(Clone, Default)]
pub struct CodecRegistry {
    codecs: BTreeMap<CodecId, Arc<dyn Codec>>,
    preferred: Option<CodecId>,
}

impl CodecRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `codec`, replacing and returning any codec with the same id. The first
    /// codec registered becomes the preferred one.
    pub fn register(&mut self, codec: Arc<dyn Codec>) -> Option<Arc<dyn Codec>> {
        let id = codec.id();
        self.preferred.get_or_insert(id);
        self.codecs.insert(id, codec)
    }

    /// Builder form of [`register`](Self::register).
    pub fn with(mut self, codec: Arc<dyn Codec>) -> Self {
        self.register(codec);
        self
    }

    /// Makes the registered codec `id` the preferred one.
    pub fn set_preferred(&mut self, id: CodecId) -> Result<(), CodecError> {
        if !self.codecs.contains_key(&id) {
            return Err(CodecError::UnknownCodec(id));
        }
        self.preferred = Some(id);
        Ok(())
    }

    /// The codec with id `id`, if registered.
    pub fn get(&self, id: CodecId) -> Option<&Arc<dyn Codec>> {
        self.codecs.get(&id)
    }

    /// The codec with id `id`, or [`CodecError::UnknownCodec`].
    pub fn require(&self, id: CodecId) -> Result<&Arc<dyn Codec>, CodecError> {
        self.get(id).ok_or(CodecError::UnknownCodec(id))
    }

    /// The codec used to encode typed state, if any codec is registered.
    pub fn preferred(&self) -> Option<&Arc<dyn Codec>> {
        self.preferred.and_then(|id| self.codecs.get(&id))
    }

    /// All registered codecs, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Codec>> {
        self.codecs.values()
    }
}

impl fmt::Debug for CodecRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodecRegistry")
            .field("codecs", &self.codecs.keys().collect::<Vec<_>>())
            .field("preferred", &self.preferred)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_id_displays_as_text_or_hex() {
        assert_eq!(CodecId::new(b"json").to_string(), "json");
        assert_eq!(CodecId([0, 1, 2, 3]).to_string(), "0x00010203");
        assert_eq!(
            CodecId::from_u32(CodecId::new(b"pcd1").to_u32()),
            CodecId::new(b"pcd1")
        );
    }

    #[test]
    fn registry_rejects_unknown_preferred() {
        let mut r = CodecRegistry::new();
        assert!(matches!(
            r.set_preferred(CodecId::new(b"none")),
            Err(CodecError::UnknownCodec(_))
        ));
        assert!(r.preferred().is_none());
    }
}
