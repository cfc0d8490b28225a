//! [`JsonCodec`]: serde_json, for debugging and for humans.

use std::io;

use migration_core::codec::DecodeVisitor;
use migration_core::{Codec, CodecError, CodecId};
use serde::de::DeserializeSeed;

use crate::limits::{self, DepthBudget, VisitSeed};

/// The id of [`JsonCodec`] in sections it encodes: `json`.
pub const JSON_ID: CodecId = CodecId::new(b"json");

/// JSON via serde_json: readable, diffable, and tolerant of added fields.
///
/// Compact by default; [`JsonCodec::pretty`] puts each struct field on its own line
/// (arrays stay on one line). Both write the same id and decode each other's output. Byte buffers (`serde_bytes`) are arrays of numbers, up
/// to 4 payload bytes per byte. Decoding accepts trailing whitespace, nothing else.
///
/// ```
/// use migration_core::codec;
/// use migration_serde::JsonCodec;
///
/// let bytes = codec::encode(&JsonCodec::new(), &(1u8, "two"))?;
/// assert_eq!(bytes, br#"[1,"two"]"#);
/// let back: (u8, String) = codec::decode(&JsonCodec::pretty(), &bytes)?;
/// assert_eq!(back, (1, "two".to_string()));
/// # Ok::<(), migration_core::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsonCodec {
    pretty: bool,
}

impl JsonCodec {
    /// Compact JSON.
    pub const fn new() -> Self {
        Self { pretty: false }
    }

    /// Indented JSON.
    pub const fn pretty() -> Self {
        Self { pretty: true }
    }

    /// Whether output is indented.
    pub const fn is_pretty(&self) -> bool {
        self.pretty
    }
}

impl Codec for JsonCodec {
    fn id(&self) -> CodecId {
        JSON_ID
    }

    fn name(&self) -> &str {
        if self.pretty {
            "json (pretty)"
        } else {
            "json"
        }
    }

    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>, CodecError> {
        let out = if self.pretty {
            let mut out = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut out, Pretty::default());
            serde::Serialize::serialize(value, &mut ser).map(|()| out)
        } else {
            serde_json::to_vec(value)
        }
        .map_err(|e| CodecError::Encode {
            codec: JSON_ID,
            source: e.into(),
        })?;
        limits::check_payload_len(JSON_ID, out.len())?;
        Ok(out)
    }

    fn decode(&self, payload: &[u8], visitor: &mut DecodeVisitor<'_>) -> Result<(), CodecError> {
        limits::check_payload_len(JSON_ID, payload.len())?;
        let budget = DepthBudget::default();
        let mut de = serde_json::Deserializer::from_slice(payload);
        VisitSeed::new(visitor, &budget)
            .deserialize(&mut de)
            .map_err(|e| {
                let inner = budget.take_error();
                // serde_json's own recursion limit (128 arrays and maps) may trip
                // before the depth budget; it is the same limit to the caller.
                let json_limit = inner
                    .as_deref()
                    .is_some_and(|m| m.starts_with("recursion limit exceeded"));
                if budget.exceeded() || json_limit {
                    limits::depth_exceeded(JSON_ID)
                } else {
                    CodecError::Decode {
                        codec: JSON_ID,
                        source: inner.map_or_else(|| e.into(), Into::into),
                    }
                }
            })?;
        de.end().map_err(|e| CodecError::TrailingBytes {
            codec: JSON_ID,
            count: payload.len() - offset_of(payload, e.line(), e.column()),
        })
    }
}

/// Indents objects (one field per line) and keeps arrays and everything inside them
/// on one line, so a byte buffer stays one line of numbers instead of one per byte.
#[derive(Default)]
struct Pretty {
    indent: usize,
    arrays: usize,
    has_value: bool,
}

impl Pretty {
    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.indent {
            w.write_all(b"  ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for Pretty {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.arrays += 1;
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.arrays -= 1;
        w.write_all(b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b",")
        }
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        if self.arrays == 0 {
            self.indent += 1;
            self.has_value = false;
        }
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        if self.arrays == 0 {
            self.indent -= 1;
            if self.has_value {
                self.newline(w)?;
            }
        }
        w.write_all(b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        if self.arrays == 0 {
            self.newline(w)?;
        }
        Ok(())
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(if self.arrays == 0 { b": " } else { b":" })
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// The byte offset of 1-based `line` and `column` in `text` (serde_json's error
/// position), clamped to the text.
fn offset_of(text: &[u8], line: usize, column: usize) -> usize {
    let line_start = if line <= 1 {
        0
    } else {
        text.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .nth(line - 2)
            .map_or(text.len(), |(i, _)| i + 1)
    };
    (line_start + column.saturating_sub(1)).min(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::codec;

    #[test]
    fn trailing_garbage_is_counted() {
        let err = codec::decode::<u8>(&JsonCodec::new(), b"1 \n xyz").unwrap_err();
        assert!(
            matches!(err, CodecError::TrailingBytes { count: 3, .. }),
            "{err:?}"
        );
        let ok: u8 = codec::decode(&JsonCodec::new(), b" 1 \n").unwrap();
        assert_eq!(ok, 1);
    }

    #[test]
    fn pretty_and_compact_decode_each_other() {
        let v = std::collections::BTreeMap::from([("a", vec![1u32, 2]), ("b", vec![])]);
        let pretty = codec::encode(&JsonCodec::pretty(), &v).unwrap();
        assert_eq!(pretty, b"{\n  \"a\": [1,2],\n  \"b\": []\n}");
        let back: std::collections::BTreeMap<String, Vec<u32>> =
            codec::decode(&JsonCodec::new(), &pretty).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["a"], [1, 2]);
    }

    #[test]
    fn pretty_indents_nested_objects_and_keeps_arrays_inline() {
        #[derive(serde::Serialize)]
        struct Inner {
            x: u8,
        }
        #[derive(serde::Serialize)]
        struct Outer {
            inner: Inner,
            list: Vec<Inner>,
            empty: std::collections::BTreeMap<u8, u8>,
        }
        let v = Outer {
            inner: Inner { x: 1 },
            list: vec![Inner { x: 2 }, Inner { x: 3 }],
            empty: Default::default(),
        };
        let text = codec::encode(&JsonCodec::pretty(), &v).unwrap();
        let expected = "{\n  \"inner\": {\n    \"x\": 1\n  },\n  \"list\": [{\"x\":2},{\"x\":3}],\n  \"empty\": {}\n}";
        assert_eq!(String::from_utf8(text).unwrap(), expected);
    }
}
