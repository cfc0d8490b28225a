//! Plain-data wrappers around kvm-bindings structs, with a type tag and an exact size check.
//!
//! kvm-bindings' own serde support writes a struct as its raw bytes and never checks
//! the length on decode: three bytes decode into a zero-padded `kvm_regs`, and the
//! bytes of a `kvm_regs` decode happily as a `kvm_sregs`. Some structs
//! (`kvm_pic_state`, `kvm_ioapic_state`) have no serde at all, and the FAM structs
//! (`kvm_msrs`, `kvm_cpuid2`) serialize without their entries.
//!
//! So this crate never serializes a kvm-bindings type directly:
//! - fixed-size structs go through [`Raw<T>`], encoded as `{ tag, bytes }` where `tag`
//!   names the struct ([`KvmStruct::TAG`]) and `bytes` must be exactly
//!   `size_of::<T>()` long. A wrong tag or a wrong length is a decode error;
//! - variable-size state has its own plain types: [`MsrEntry`], [`CpuidEntry`],
//!   [`XsaveState`], [`NestedState`], each bounded before anything is allocated.
//!
//! Every wrapper implements [`Versioned`], so it can be a section of its own.

use std::fmt;
use std::marker::PhantomData;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_ioapic_state, kvm_lapic_state,
    kvm_mp_state, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use migration_core::Versioned;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A kvm-bindings struct that [`Raw`] may carry: plain bytes both ways, with a stable
/// tag naming it in the encoding.
pub trait KvmStruct: IntoBytes + FromBytes + Immutable + Copy + Send + Sync + 'static {
    /// The name recorded next to the bytes (the C struct name).
    const TAG: &'static str;
}

macro_rules! kvm_struct {
    ($($t:ident),* $(,)?) => {
        $(impl KvmStruct for $t { const TAG: &'static str = stringify!($t); })*
    };
}

kvm_struct!(
    kvm_regs,
    kvm_sregs,
    kvm_xcrs,
    kvm_debugregs,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_vcpu_events,
    kvm_pit_state2,
    kvm_clock_data,
    kvm_pic_state,
    kvm_ioapic_state,
);

/// A kvm-bindings struct `T`, serialized as its tag and its exact bytes.
///
/// Decoding rejects a different tag and any length other than `size_of::<T>()`.
///
/// ```
/// use kvm_bindings::kvm_regs;
/// use migration_kvm::Raw;
///
/// let regs = Raw::new(kvm_regs { rip: 0x1000, ..Default::default() });
/// let json = serde_json::to_string(&regs).unwrap();
/// let back: Raw<kvm_regs> = serde_json::from_str(&json).unwrap();
/// assert_eq!(back.get().rip, 0x1000);
///
/// // Three bytes are not a kvm_regs.
/// let bad = r#"{"tag":"kvm_regs","bytes":[1,2,3]}"#;
/// assert!(serde_json::from_str::<Raw<kvm_regs>>(bad).is_err());
/// ```
#[derive(Clone, Copy)]
pub struct Raw<T: KvmStruct>(T);

impl<T: KvmStruct> Raw<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The wrapped struct.
    pub fn get(&self) -> &T {
        &self.0
    }

    /// The wrapped struct, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.0
    }

    /// Unwraps the struct.
    pub fn into_inner(self) -> T {
        self.0
    }

    /// The struct's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// A `T` from exactly `size_of::<T>()` bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SizeMismatch> {
        T::read_from_bytes(bytes)
            .map(Self)
            .map_err(|_| SizeMismatch {
                tag: T::TAG,
                expected: std::mem::size_of::<T>(),
                found: bytes.len(),
            })
    }
}

/// Bytes that do not have the size of the struct they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tag}: expected {expected} bytes, found {found}")]
pub struct SizeMismatch {
    /// The struct.
    pub tag: &'static str,
    /// Its size.
    pub expected: usize,
    /// The length offered.
    pub found: usize,
}

impl<T: KvmStruct + Default> Default for Raw<T> {
    fn default() -> Self {
        Self(T::default())
    }
}

impl<T: KvmStruct> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<T: KvmStruct> Eq for Raw<T> {}

impl<T: KvmStruct> fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Raw<{}>({} bytes)", T::TAG, self.as_bytes().len())
    }
}

impl<T: KvmStruct> Versioned for Raw<T> {
    const VERSION: u32 = 1;
}

impl<T: KvmStruct> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Raw", 2)?;
        s.serialize_field("tag", T::TAG)?;
        s.serialize_field("bytes", serde_bytes::Bytes::new(self.as_bytes()))?;
        s.end()
    }
}

impl<'de, T: KvmStruct> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor<T>(PhantomData<T>);

        fn check<T: KvmStruct, E: de::Error>(tag: &str, bytes: &[u8]) -> Result<Raw<T>, E> {
            if tag != T::TAG {
                return Err(E::custom(format!(
                    "section holds a `{tag}`, not a `{}`",
                    T::TAG
                )));
            }
            Raw::<T>::from_bytes(bytes).map_err(E::custom)
        }

        impl<'de, T: KvmStruct> Visitor<'de> for RawVisitor<T> {
            type Value = Raw<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a tagged `{}` of {} bytes",
                    T::TAG,
                    std::mem::size_of::<T>()
                )
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let tag: TagBuf = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let bytes: BoundedBytes<T> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                check(&tag.0, &bytes.0)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut tag: Option<TagBuf> = None;
                let mut bytes: Option<BoundedBytes<T>> = None;
                while let Some(key) = map.next_key::<TagBuf>()? {
                    match key.0.as_str() {
                        "tag" if tag.is_none() => tag = Some(map.next_value()?),
                        "bytes" if bytes.is_none() => bytes = Some(map.next_value()?),
                        other => {
                            return Err(de::Error::custom(format!(
                                "unexpected or duplicate field `{other}`"
                            )))
                        }
                    }
                }
                let tag = tag.ok_or_else(|| de::Error::missing_field("tag"))?;
                let bytes = bytes.ok_or_else(|| de::Error::missing_field("bytes"))?;
                check(&tag.0, &bytes.0)
            }
        }

        deserializer.deserialize_struct("Raw", &["tag", "bytes"], RawVisitor(PhantomData))
    }
}

/// Deserializes a string of at most `max` bytes (longer ones are refused before
/// they are copied).
pub(crate) fn bounded_string<'de, D: Deserializer<'de>>(
    deserializer: D,
    max: usize,
    what: &'static str,
) -> Result<String, D::Error> {
    struct V {
        max: usize,
        what: &'static str,
    }
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}: a string of at most {} bytes", self.what, self.max)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            if v.len() > self.max {
                return Err(E::custom(format!(
                    "{}: expected at most {} bytes, found {}",
                    self.what,
                    self.max,
                    v.len()
                )));
            }
            Ok(v.to_owned())
        }
    }
    deserializer.deserialize_str(V { max, what })
}

/// A short string (at most 64 bytes), for tags and field names.
struct TagBuf(String);

impl<'de> Deserialize<'de> for TagBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TagBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a short string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TagBuf, E> {
                if v.len() > 64 {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(TagBuf(v.to_owned()))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Bytes of at most `size_of::<T>()` (anything longer is refused before allocating).
struct BoundedBytes<T>(Vec<u8>, PhantomData<T>);

impl<'de, T: KvmStruct> Deserialize<'de> for BoundedBytes<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        bounded_bytes(deserializer, std::mem::size_of::<T>(), T::TAG)
            .map(|v| BoundedBytes(v, PhantomData))
    }
}

/// Deserializes a byte string (or a sequence of `u8`, as JSON writes it) of at most
/// `max` bytes, without allocating more than `max`.
pub(crate) fn bounded_bytes<'de, D: Deserializer<'de>>(
    deserializer: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<u8>, D::Error> {
    struct V {
        max: usize,
        what: &'static str,
    }
    impl V {
        fn too_long<E: de::Error>(&self, len: usize) -> E {
            E::custom(format!(
                "{}: expected at most {} bytes, found {len}",
                self.what, self.max
            ))
        }
    }
    impl<'de> Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {} bytes", self.max)
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            if v.len() > self.max {
                return Err(self.too_long(v.len()));
            }
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            self.visit_bytes(&v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
            while let Some(b) = seq.next_element::<u8>()? {
                if out.len() == self.max {
                    return Err(self.too_long(self.max + 1));
                }
                out.push(b);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_bytes(V { max, what })
}

/// One model-specific register: its index and value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR index (`ecx` of `rdmsr`).
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// One CPUID leaf as KVM_SET_CPUID2 takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (`eax` input).
    pub function: u32,
    /// Subleaf (`ecx` input), meaningful when `flags` has `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`.
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// Output `eax`.
    pub eax: u32,
    /// Output `ebx`.
    pub ebx: u32,
    /// Output `ecx`.
    pub ecx: u32,
    /// Output `edx`.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// Most MSRs a vCPU state may hold (KVM's index list is a few hundred at most).
pub const MAX_MSRS: usize = 4096;
/// Most CPUID entries KVM accepts (`KVM_MAX_CPUID_ENTRIES`).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Largest xsave area accepted (AMX needs ~11 KiB; this leaves room for growth).
pub const MAX_XSAVE_BYTES: usize = 1 << 20;
/// Largest nested state accepted (KVM's VMX/SVM nested state is 8 KiB + header).
pub const MAX_NESTED_STATE_BYTES: usize = 1 << 20;
/// Size of the legacy `kvm_xsave` area (KVM_GET_XSAVE).
pub const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>();

/// The MSRs of one vCPU, in restore order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MsrState(pub Vec<MsrEntry>);

impl Versioned for MsrState {
    const VERSION: u32 = 1;
}

impl<'de> Deserialize<'de> for MsrState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        bounded_vec(deserializer, MAX_MSRS, "MSR list").map(MsrState)
    }
}

/// The CPUID table of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuidState(pub Vec<CpuidEntry>);

impl Versioned for CpuidState {
    const VERSION: u32 = 1;
}

impl<'de> Deserialize<'de> for CpuidState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        bounded_vec(deserializer, MAX_CPUID_ENTRIES, "CPUID table").map(CpuidState)
    }
}

pub(crate) fn bounded_vec<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    struct V<T> {
        max: usize,
        what: &'static str,
        _t: PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a {} of at most {} entries", self.what, self.max)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
            while let Some(e) = seq.next_element()? {
                if out.len() == self.max {
                    return Err(de::Error::custom(format!(
                        "{} has more than {} entries",
                        self.what, self.max
                    )));
                }
                out.push(e);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_seq(V {
        max,
        what,
        _t: PhantomData,
    })
}

/// `Debug` (the length only), `Versioned` (version 1) and a bounded `Deserialize` for a
/// `{ bytes: Vec<u8> }` state type with a `from_bytes(Vec<u8>) -> Option<Self>`
/// validator: at most `$max` bytes are read (never allocated beyond), and bytes
/// `from_bytes` rejects are an error saying `$invalid(len)`. The wire form is the
/// struct `$name` with the one field `bytes`.
macro_rules! byte_state_impls {
    ($ty:ident, $name:literal, $max:expr, $what:literal, $invalid:expr) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($name, "({} bytes)"), self.bytes.len())
            }
        }

        impl Versioned for $ty {
            const VERSION: u32 = 1;
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(rename = $name)]
                struct Wire {
                    #[serde(deserialize_with = "bounded")]
                    bytes: Vec<u8>,
                }
                fn bounded<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
                    bounded_bytes(d, $max, $what)
                }
                let invalid: fn(usize) -> String = $invalid;
                let w = Wire::deserialize(deserializer)?;
                let len = w.bytes.len();
                $ty::from_bytes(w.bytes).ok_or_else(|| de::Error::custom(invalid(len)))
            }
        }
    };
}

/// The xsave area of one vCPU (`kvm_xsave` or the larger `kvm_xsave2`), as bytes.
///
/// Its length is at least [`XSAVE_LEGACY_BYTES`], a multiple of 4, and at most
/// [`MAX_XSAVE_BYTES`]; decoding rejects anything else.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct XsaveState {
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl XsaveState {
    /// Wraps an xsave area; `None` if its length is not valid (see the type docs).
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= XSAVE_LEGACY_BYTES
            && bytes.len() <= MAX_XSAVE_BYTES
            && bytes.len() % 4 == 0)
            .then_some(Self { bytes })
    }

    /// The area's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

byte_state_impls!(
    XsaveState,
    "XsaveState",
    MAX_XSAVE_BYTES,
    "xsave",
    |len| format!(
        "xsave: {len} bytes is not a valid xsave area (>= {XSAVE_LEGACY_BYTES}, multiple of 4)"
    )
);

/// The nested-virtualization state of one vCPU (`KVM_GET_NESTED_STATE`), as bytes:
/// a `kvm_nested_state` header followed by its data, `header.size` bytes in all.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct NestedState {
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

impl NestedState {
    /// Size of the `kvm_nested_state` header.
    pub const HEADER_BYTES: usize = std::mem::size_of::<kvm_bindings::kvm_nested_state>();

    /// Wraps nested state; `None` unless it holds at least a header and at most
    /// [`MAX_NESTED_STATE_BYTES`].
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= Self::HEADER_BYTES && bytes.len() <= MAX_NESTED_STATE_BYTES)
            .then_some(Self { bytes })
    }

    /// The state's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

byte_state_impls!(
    NestedState,
    "NestedState",
    MAX_NESTED_STATE_BYTES,
    "nested state",
    |len| format!("nested state: {len} bytes is too short")
);

/// The TSC frequency of a vCPU in kHz (`KVM_GET_TSC_KHZ`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TscKhz(pub u32);

impl Versioned for TscKhz {
    const VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn raw_round_trips_and_checks_size_and_tag() {
        let regs = Raw::new(kvm_regs {
            rax: 1,
            rip: 2,
            rflags: 3,
            ..Default::default()
        });
        let back: Raw<kvm_regs> = serde_json::from_str(&json(&regs)).unwrap();
        assert_eq!(back, regs);

        let short = r#"{"tag":"kvm_regs","bytes":[1,2,3]}"#;
        let e = serde_json::from_str::<Raw<kvm_regs>>(short).unwrap_err();
        assert!(e.to_string().contains("expected 144 bytes, found 3"), "{e}");

        // kvm_regs bytes offered as kvm_sregs: wrong tag.
        let e = serde_json::from_str::<Raw<kvm_sregs>>(&json(&regs)).unwrap_err();
        assert!(e.to_string().contains("not a `kvm_sregs`"), "{e}");

        // Right tag, wrong bytes: still refused.
        let relabelled = json(&regs).replace("kvm_regs", "kvm_sregs");
        let e = serde_json::from_str::<Raw<kvm_sregs>>(&relabelled).unwrap_err();
        assert!(e.to_string().contains("kvm_sregs"), "{e}");
    }

    #[test]
    fn oversized_bytes_are_refused_before_allocation() {
        let long = format!(
            r#"{{"tag":"kvm_mp_state","bytes":[{}]}}"#,
            ["0"; 5].join(",")
        );
        let e = serde_json::from_str::<Raw<kvm_mp_state>>(&long).unwrap_err();
        assert!(e.to_string().contains("at most 4 bytes"), "{e}");
    }

    #[test]
    fn xsave_length_is_checked() {
        assert!(XsaveState::from_bytes(vec![0; 100]).is_none());
        assert!(XsaveState::from_bytes(vec![0; 4097]).is_none());
        let x = XsaveState::from_bytes(vec![7; 4096 + 64]).unwrap();
        let back: XsaveState = serde_json::from_str(&json(&x)).unwrap();
        assert_eq!(back, x);
        let bad = r#"{"bytes":[1,2,3]}"#;
        assert!(serde_json::from_str::<XsaveState>(bad).is_err());
    }

    #[test]
    fn msr_and_cpuid_lists_round_trip_with_entries() {
        let m = MsrState(vec![
            MsrEntry {
                index: 0x10,
                data: 5,
            },
            MsrEntry {
                index: 0x6e0,
                data: 9,
            },
        ]);
        assert_eq!(serde_json::from_str::<MsrState>(&json(&m)).unwrap(), m);
        let c = CpuidState(vec![CpuidEntry {
            function: 1,
            eax: 0x806f0,
            ..Default::default()
        }]);
        assert_eq!(serde_json::from_str::<CpuidState>(&json(&c)).unwrap(), c);
    }
}
