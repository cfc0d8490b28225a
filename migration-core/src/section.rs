//! [`Section`]: one versioned piece of a component's state.
//!
//! A section starts as typed state handed over by a component
//! ([`Snapshot::add_state`](crate::snapshot::Snapshot::add_state)), becomes bytes when the
//! snapshot is encoded with a codec, and is decoded back into typed state on restore
//! with the codec its bytes record.

use std::any::{type_name, Any};
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::codec::{self, Codec, CodecError, CodecId, CodecRegistry};

/// Typed state waiting to be encoded.
trait StateValue: erased_serde::Serialize + Any + Send + Sync {
    fn as_any(&self) -> &dyn Any;
    fn type_name(&self) -> &'static str;
}

impl<T: serde::Serialize + Any + Send + Sync> StateValue for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn type_name(&self) -> &'static str {
        type_name::<T>()
    }
}

#[derive(Clone)]
enum Data {
    State(Arc<dyn StateValue>),
    Encoded {
        codec_id: CodecId,
        codec: Option<Arc<dyn Codec>>,
        payload: Vec<u8>,
    },
}

/// A versioned section: typed state, or its encoding by a recorded codec.
#[derive(Clone)]
pub struct Section {
    version: u32,
    data: Data,
}

impl Section {
    /// A section holding typed `state` at format `version`, not yet encoded.
    pub fn from_state<T: serde::Serialize + Any + Send + Sync>(version: u32, state: T) -> Self {
        Self {
            version,
            data: Data::State(Arc::new(state)),
        }
    }

    /// A section holding `payload` as encoded by the codec `codec_id`.
    ///
    /// The codec is not resolved yet: call [`resolve`](Self::resolve), or decoding
    /// fails with [`CodecError::UnknownCodec`].
    pub fn from_encoded(version: u32, codec_id: CodecId, payload: Vec<u8>) -> Self {
        Self {
            version,
            data: Data::Encoded {
                codec_id,
                codec: None,
                payload,
            },
        }
    }

    /// The payload's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The codec that encoded the payload, or `None` while the section holds typed state.
    pub fn codec_id(&self) -> Option<CodecId> {
        match &self.data {
            Data::State(_) => None,
            Data::Encoded { codec_id, .. } => Some(*codec_id),
        }
    }

    /// The encoded payload, or `None` while the section holds typed state.
    pub fn payload(&self) -> Option<&[u8]> {
        match &self.data {
            Data::State(_) => None,
            Data::Encoded { payload, .. } => Some(payload),
        }
    }

    /// Whether the section holds bytes rather than typed state.
    pub fn is_encoded(&self) -> bool {
        matches!(self.data, Data::Encoded { .. })
    }

    /// Encodes typed state with `codec`. A section that is already encoded keeps its
    /// bytes and codec.
    pub fn encode(&mut self, codec: &Arc<dyn Codec>) -> Result<(), CodecError> {
        if let Data::State(state) = &self.data {
            let payload = codec.encode(state.as_ref())?;
            self.data = Data::Encoded {
                codec_id: codec.id(),
                codec: Some(codec.clone()),
                payload,
            };
        }
        Ok(())
    }

    /// Attaches the codec recorded in the payload, looked up in `registry`. An id the
    /// registry lacks is left unresolved: decoding then names it.
    pub fn resolve(&mut self, registry: &CodecRegistry) {
        if let Data::Encoded {
            codec_id, codec, ..
        } = &mut self.data
        {
            if codec.is_none() {
                *codec = registry.get(*codec_id).cloned();
            }
        }
    }

    /// Decodes the payload as `T`, whatever its version. Typed state is returned as is
    /// when it is a `T`. A payload that does not decode is [`CodecError::AsType`],
    /// naming `T`.
    pub fn decode<T: DeserializeOwned + Clone + Any>(&self) -> Result<T, CodecError> {
        match &self.data {
            Data::State(state) => state.as_any().downcast_ref::<T>().cloned().ok_or_else(|| {
                CodecError::TypeMismatch {
                    wanted: type_name::<T>(),
                    found: state.type_name(),
                }
            }),
            Data::Encoded {
                codec_id,
                codec,
                payload,
            } => {
                let codec = codec.as_ref().ok_or(CodecError::UnknownCodec(*codec_id))?;
                codec::decode(codec.as_ref(), payload).map_err(|source| CodecError::AsType {
                    ty: type_name::<T>(),
                    version: self.version,
                    source: Box::new(source),
                })
            }
        }
    }
}

impl fmt::Debug for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Section");
        d.field("version", &self.version);
        match &self.data {
            Data::State(s) => d.field("state", &s.type_name()),
            Data::Encoded {
                codec_id, payload, ..
            } => d.field("codec", codec_id).field("len", &payload.len()),
        };
        d.finish()
    }
}
