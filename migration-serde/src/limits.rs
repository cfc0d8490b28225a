//! Decode limits: the memory and depth budget every codec in this crate enforces.
//!
//! Section payloads come from files and sockets, so decoding treats them as hostile:
//!
//! - **Payload size.** A payload longer than [`MAX_PAYLOAD`] (64 MiB) is
//!   [`CodecError::LimitExceeded`] before a byte is decoded, and no codec here encodes
//!   a payload it would refuse to decode.
//! - **Allocation.** No decoder allocates from a declared length. Strings and byte
//!   buffers are borrowed from the payload and copied once, so they are never larger
//!   than the payload; sequences and maps preallocate at most serde's cautious
//!   1 MiB (`serde::__private::size_hint::cautious`) and then grow as elements
//!   actually decode. A payload declaring a 1 TiB vector or a 2^63-byte string fails
//!   at the end of the payload, having allocated at most about 1 MiB per open container.
//!   Peak decode memory is therefore about the decoded value itself (bounded by the
//!   payload length times the type's expansion) plus 1 MiB per nesting level of
//!   sequence types in the state type.
//! - **Depth.** Nesting deeper than [`MAX_DEPTH`] (128 nested values) is
//!   [`CodecError::LimitExceeded`], checked by [`DepthLimited`] before the next level
//!   recurses: a payload nesting a recursive type 10^6 deep fails without touching the
//!   stack guard.
//!
//! A sequence of zero-sized elements (`Vec<()>`) costs no payload bytes per element,
//! so a forged length makes such a decode loop (without allocating). Keep zero-sized
//! element types out of state types.

// Helpers for the codecs are unused in a build with none of them.
#![cfg_attr(
    not(any(feature = "json", feature = "bincode", feature = "postcard")),
    allow(dead_code)
)]

use std::cell::{Cell, RefCell};
use std::fmt;

use migration_core::codec::DecodeVisitor;
use migration_core::{CodecError, CodecId};
use serde::de::{self, DeserializeSeed, Deserializer, Visitor};

/// The largest payload any codec in this crate encodes or decodes: 64 MiB.
///
/// JSON writes a byte buffer as an array of decimal numbers (up to 4 bytes per byte),
/// so JSON byte sections stay under about 16 MiB; the binary codecs carry up to the
/// full budget.
pub const MAX_PAYLOAD: usize = migration_core::codec::MAX_ENCODED_LEN;

/// The deepest nesting any codec in this crate decodes: 128 nested values (each
/// struct, sequence, map, enum variant, option or newtype level counts one).
pub const MAX_DEPTH: usize = 128;

/// Rejects a payload larger than [`MAX_PAYLOAD`] for `codec`.
pub(crate) fn check_payload_len(codec: CodecId, len: usize) -> Result<(), CodecError> {
    if len > MAX_PAYLOAD {
        return Err(CodecError::LimitExceeded {
            codec,
            what: "payload length",
            limit: MAX_PAYLOAD as u64,
        });
    }
    Ok(())
}

/// The error a codec returns for nesting deeper than [`MAX_DEPTH`].
pub(crate) fn depth_exceeded(codec: CodecId) -> CodecError {
    CodecError::LimitExceeded {
        codec,
        what: "nesting depth",
        limit: MAX_DEPTH as u64,
    }
}

/// The message that replaces an error on its way out of a nested value.
const NESTED_ERROR: &str = "<decode error in a nested value>";

/// The longest innermost error message kept.
const MAX_ERROR_LEN: usize = 512;

/// Shared depth counter of one decode; [`DepthLimited`] wrappers point at it.
#[derive(Debug)]
pub struct DepthBudget {
    depth: Cell<usize>,
    max: usize,
    exceeded: Cell<bool>,
    error: RefCell<Option<String>>,
}

impl DepthBudget {
    /// A budget allowing `max` nested values.
    pub fn new(max: usize) -> Self {
        Self {
            depth: Cell::new(0),
            max,
            exceeded: Cell::new(false),
            error: RefCell::new(None),
        }
    }

    /// The innermost error of the last failed decode, if any: the message of the
    /// format or of the visitor where decoding stopped.
    pub fn take_error(&self) -> Option<String> {
        self.error.borrow_mut().take()
    }

    /// Records `e` if it is not already a replacement made by [`fail`](Self::fail)
    /// and returns a short replacement. Formats that wrap a nested error's message in
    /// their own (bincode quotes and escapes it) would otherwise grow the message at
    /// every level, exponentially with depth.
    fn fail<E: de::Error>(&self, e: E) -> E {
        let text = e.to_string();
        if !text.contains(NESTED_ERROR) {
            let mut text = text;
            if text.len() > MAX_ERROR_LEN {
                let mut end = MAX_ERROR_LEN;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
            *self.error.borrow_mut() = Some(text);
        }
        E::custom(NESTED_ERROR)
    }

    /// Whether a decode using this budget went past it.
    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    fn enter<E: de::Error>(&self) -> Result<(), E> {
        let depth = self.depth.get();
        if depth >= self.max {
            self.exceeded.set(true);
            return Err(E::custom(format_args!(
                "nesting depth exceeds the limit of {}",
                self.max
            )));
        }
        self.depth.set(depth + 1);
        Ok(())
    }

    fn leave(&self) {
        self.depth.set(self.depth.get().saturating_sub(1));
    }
}

impl Default for DepthBudget {
    fn default() -> Self {
        Self::new(MAX_DEPTH)
    }
}

/// A [`Deserializer`] adapter that counts nesting and fails past a [`DepthBudget`].
///
/// Every value the wrapped deserializer hands out (struct fields, sequence elements,
/// map keys and values, enum variants, `Some` contents, newtype contents) is itself
/// wrapped, so every level of recursion passes through the counter. Owned strings and
/// byte buffers are requested in their borrowed form, so the visitor copies the bytes
/// actually present instead of the format allocating a declared length. Wrap the
/// outermost deserializer of any format without limits of its own:
///
/// ```
/// use migration_serde::limits::{DepthBudget, DepthLimited};
/// use serde::Deserialize;
///
/// // 200 nested arrays: past a budget of 100.
/// let text = format!("{}{}", "[".repeat(200), "]".repeat(200));
/// let budget = DepthBudget::new(100);
/// let mut de = serde_json::Deserializer::from_str(&text);
/// let r = serde_json::Value::deserialize(DepthLimited::new(&mut de, &budget));
/// assert!(r.is_err() && budget.exceeded());
/// ```
pub struct DepthLimited<'b, D> {
    inner: D,
    budget: &'b DepthBudget,
}

impl<'b, D> DepthLimited<'b, D> {
    /// Wraps `inner`, counting its nesting against `budget`.
    pub fn new(inner: D, budget: &'b DepthBudget) -> Self {
        Self { inner, budget }
    }
}

impl<D> fmt::Debug for DepthLimited<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DepthLimited")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Forwards one `deserialize_*` method, counting one level around it.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            self.budget.enter::<D::Error>()?;
            let budget = self.budget;
            let r = self.inner.$method($($arg,)* Limit { inner: visitor, budget });
            budget.leave();
            r.map_err(|e| budget.fail(e))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for DepthLimited<'_, D> {
    type Error = D::Error;

    forward! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_bytes();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    // Owned strings and byte buffers are requested as borrowed ones: the visitor then
    // copies exactly the bytes present, where some formats (bincode) would allocate
    // the declared length up front. Every format here encodes both forms the same way.
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.deserialize_bytes(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// Wraps visitors, seeds and accessors so nested values stay depth-limited.
struct Limit<'b, T> {
    inner: T,
    budget: &'b DepthBudget,
}

impl<'b, T> Limit<'b, T> {
    fn wrap<U>(&self, inner: U) -> Limit<'b, U> {
        Limit {
            inner,
            budget: self.budget,
        }
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Limit<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(DepthLimited::new(d, self.budget))
    }
}

/// Forwards leaf `visit_*` methods unchanged.
macro_rules! visit_leaf {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Limit<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    visit_leaf! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(DepthLimited::new(d, self.budget))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner
            .visit_newtype_struct(DepthLimited::new(d, self.budget))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        let seq = self.wrap(seq);
        self.inner.visit_seq(seq)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let map = self.wrap(map);
        self.inner.visit_map(map)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        let data = self.wrap(data);
        self.inner.visit_enum(data)
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Limit<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_element_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Limit<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'b, 'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Limit<'b, A> {
    type Error = A::Error;
    type Variant = Limit<'b, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let seed = self.wrap(seed);
        let (value, variant) = self.inner.variant_seed(seed)?;
        Ok((
            value,
            Limit {
                inner: variant,
                budget: self.budget,
            },
        ))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Limit<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.wrap(seed);
        self.inner.newtype_variant_seed(seed)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor);
        self.inner.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor);
        self.inner.struct_variant(fields, visitor)
    }
}

/// A [`DeserializeSeed`] that hands the (depth-limited, erased) deserializer to a
/// codec's [`DecodeVisitor`].
pub(crate) struct VisitSeed<'a, 'v> {
    visitor: &'a mut DecodeVisitor<'v>,
    budget: &'a DepthBudget,
}

impl<'a, 'v> VisitSeed<'a, 'v> {
    pub(crate) fn new(visitor: &'a mut DecodeVisitor<'v>, budget: &'a DepthBudget) -> Self {
        Self { visitor, budget }
    }
}

impl<'de> DeserializeSeed<'de> for VisitSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let limited = DepthLimited::new(d, self.budget);
        let mut erased = <dyn erased_serde::Deserializer>::erase(limited);
        (self.visitor)(&mut erased).map_err(de::Error::custom)
    }
}
