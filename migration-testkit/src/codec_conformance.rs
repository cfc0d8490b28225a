//! The codec conformance suite: what every [`Codec`] must do, runnable against any codec.
//!
//! The codecs of `migration-serde` pass it; a downstream codec runs the same checks
//! (with this crate as a dev-dependency), as it runs [`conformance`](crate::conformance)
//! over its components:
//!
//! ```
//! let report = migration_testkit::codec_conformance::check_codec(&migration_serde::PostcardCodec)
//!     .unwrap_or_else(|e| panic!("{e}"));
//! assert!(report.cases.iter().any(|c| c.name == "bytes/16MiB"));
//! ```
//!
//! Each case encodes a value twice (the bytes must be identical), decodes it (the value
//! must be equal), re-encodes the decoded value (the bytes must be identical again),
//! and checks that one trailing byte is rejected. Structured values are also truncated
//! at every byte (each prefix must be an error, never a panic), including a map of
//! several entries. Nesting 64 deep must decode; nesting 1000 deep must be an error.
//! Add your own state types with [`check_value`].

use std::collections::BTreeMap;
use std::fmt;

use migration_core::codec::{self, Codec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A conformance check that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecConformanceError {
    /// The codec's name.
    pub codec: String,
    /// The case (`"nested"`, `"bytes/4KiB"`, …).
    pub case: String,
    /// What went wrong.
    pub problem: String,
}

impl fmt::Display for CodecConformanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "codec `{}`, case `{}`: {}",
            self.codec, self.case, self.problem
        )
    }
}

impl std::error::Error for CodecConformanceError {}

/// One passed case and the size of its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The case.
    pub name: String,
    /// Encoded payload length in bytes.
    pub encoded_len: usize,
}

/// What [`check_codec`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodecConformanceReport {
    /// Every case, in the order run.
    pub cases: Vec<CaseReport>,
}

/// A small enum with every variant shape.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Unit variant.
    Off,
    /// Newtype variant.
    Level(u8),
    /// Tuple variant.
    Pair(u16, i32),
    /// Struct variant.
    Named {
        /// A field.
        a: u64,
        /// An optional field.
        b: Option<String>,
    },
}

/// A small nested struct.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Inner {
    /// A field.
    pub id: u32,
    /// A mode.
    pub mode: Mode,
}

/// A state type using every serde shape a device state typically has.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Nested {
    /// A string.
    pub name: String,
    /// A boolean.
    pub flag: bool,
    /// Integers at their extremes.
    pub ints: (u8, u16, u32, u64, i8, i16, i32, i64),
    /// A float exactly representable in decimal.
    pub ratio: f64,
    /// A character outside ASCII.
    pub glyph: char,
    /// A nested struct.
    pub inner: Inner,
    /// Present option.
    pub some: Option<Inner>,
    /// Absent option.
    pub none: Option<Inner>,
    /// A sequence of structs with every enum shape.
    pub list: Vec<Inner>,
    /// An ordered map.
    pub map: BTreeMap<String, Vec<u16>>,
    /// A byte section.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Bytes without `serde_bytes` (a sequence of `u8`).
    pub raw: Vec<u8>,
    /// A fixed array.
    pub array: [u32; 4],
    /// Unit and a unit struct.
    pub unit: ((), Marker),
    /// A newtype struct.
    pub newtype: Wrapper,
}

/// A unit struct.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker;

/// A newtype struct.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wrapper(pub u64);

/// A recursive type, for nesting-depth checks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Nest {
    /// The end.
    Leaf,
    /// One more level.
    Node(Box<Nest>),
}

impl Nest {
    /// A chain `depth` nodes deep.
    pub fn deep(depth: usize) -> Self {
        (0..depth).fold(Nest::Leaf, |n, _| Nest::Node(Box::new(n)))
    }
}

impl Drop for Nest {
    // Unlinks iteratively, so dropping a deep chain does not recurse.
    fn drop(&mut self) {
        let mut next = match self {
            Nest::Node(b) => std::mem::replace(&mut **b, Nest::Leaf),
            Nest::Leaf => return,
        };
        while let Nest::Node(b) = &mut next {
            next = std::mem::replace(&mut **b, Nest::Leaf);
        }
    }
}

/// The [`Nested`] value the suite uses.
pub fn sample() -> Nested {
    Nested {
        name: "serial0 ✓".into(),
        flag: true,
        ints: (
            u8::MAX,
            u16::MAX,
            u32::MAX,
            u64::MAX,
            i8::MIN,
            i16::MIN,
            i32::MIN,
            i64::MIN,
        ),
        ratio: -1.25,
        glyph: 'λ',
        inner: Inner {
            id: 7,
            mode: Mode::Off,
        },
        some: Some(Inner {
            id: 8,
            mode: Mode::Level(3),
        }),
        none: None,
        list: vec![
            Inner {
                id: 1,
                mode: Mode::Pair(2, -3),
            },
            Inner {
                id: 2,
                mode: Mode::Named {
                    a: 1 << 40,
                    b: Some("x".into()),
                },
            },
            Inner {
                id: 3,
                mode: Mode::Named { a: 0, b: None },
            },
        ],
        map: BTreeMap::from([
            ("b".into(), vec![1, 2, 3]),
            ("a".into(), vec![]),
            ("ä".into(), vec![u16::MAX]),
        ]),
        bytes: vec![0, 1, 2, 0xfe, 0xff],
        raw: vec![9, 8, 7],
        array: [1, 2, 3, u32::MAX],
        unit: ((), Marker),
        newtype: Wrapper(42),
    }
}

/// A byte buffer of `len` bytes in a fixed non-trivial pattern.
pub fn pattern(len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(
        (0..len)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn fail(codec: &dyn Codec, case: &str, problem: impl fmt::Display) -> CodecConformanceError {
    CodecConformanceError {
        codec: codec.name().to_owned(),
        case: case.to_owned(),
        problem: problem.to_string(),
    }
}

/// Checks one value: deterministic encoding, equal round trip, canonical re-encoding,
/// trailing byte rejected. Returns the encoding.
pub fn check_value<T>(
    codec: &dyn Codec,
    case: &str,
    value: &T,
) -> Result<Vec<u8>, CodecConformanceError>
where
    T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
{
    let (bytes, back) = check_round_trip(codec, case, value)?;
    let reencoded = codec::encode(codec, &back).map_err(|e| fail(codec, case, e))?;
    if reencoded != bytes {
        return Err(fail(
            codec,
            case,
            "re-encoding the decoded value gave different bytes",
        ));
    }
    let mut trailing = bytes.clone();
    trailing.push(0xa5);
    if codec::decode::<T>(codec, &trailing).is_ok() {
        return Err(fail(
            codec,
            case,
            "a trailing byte after the value was accepted",
        ));
    }
    Ok(bytes)
}

/// Encodes `value` twice (the bytes must be identical) and decodes it (the value must
/// be equal); returns the encoding and the decoded value. The first half of
/// [`check_value`], and alone for multi-megabyte values (the smaller cases cover the
/// re-encoding and trailing-byte passes).
fn check_round_trip<T>(
    codec: &dyn Codec,
    case: &str,
    value: &T,
) -> Result<(Vec<u8>, T), CodecConformanceError>
where
    T: Serialize + DeserializeOwned + PartialEq,
{
    let bytes = codec::encode(codec, value).map_err(|e| fail(codec, case, e))?;
    let again = codec::encode(codec, value).map_err(|e| fail(codec, case, e))?;
    if bytes != again {
        return Err(fail(
            codec,
            case,
            "encoding the same value twice gave different bytes",
        ));
    }
    let back: T = codec::decode(codec, &bytes).map_err(|e| fail(codec, case, e))?;
    if &back != value {
        return Err(fail(
            codec,
            case,
            "the decoded value differs from the original",
        ));
    }
    Ok((bytes, back))
}

/// Checks that every strict prefix of `value`'s encoding fails to decode as `T`.
/// `value` must be a type whose every prefix is incomplete (a struct or a sequence).
pub fn check_truncation<T>(
    codec: &dyn Codec,
    case: &str,
    value: &T,
) -> Result<(), CodecConformanceError>
where
    T: Serialize + DeserializeOwned + fmt::Debug,
{
    let bytes = codec::encode(codec, value).map_err(|e| fail(codec, case, e))?;
    for cut in 0..bytes.len() {
        if let Ok(v) = codec::decode::<T>(codec, &bytes[..cut]) {
            return Err(fail(
                codec,
                case,
                format_args!("the first {cut} of {} bytes decoded as {v:?}", bytes.len()),
            ));
        }
    }
    Ok(())
}

/// Runs the whole suite against `codec`.
///
/// Takes a few seconds in debug builds: it round-trips byte sections up to 16 MiB.
pub fn check_codec(codec: &dyn Codec) -> Result<CodecConformanceReport, CodecConformanceError> {
    let mut report = CodecConformanceReport::default();
    let mut record = |name: &str, bytes: Vec<u8>| {
        report.cases.push(CaseReport {
            name: name.to_owned(),
            encoded_len: bytes.len(),
        })
    };

    let nested = sample();
    record("nested", check_value(codec, "nested", &nested)?);
    check_truncation(codec, "nested", &nested)?;
    for (i, mode) in [
        Mode::Off,
        Mode::Level(0),
        Mode::Pair(0, 0),
        Mode::Named { a: 0, b: None },
    ]
    .iter()
    .enumerate()
    {
        let case = format!("enum/{i}");
        record(
            &case,
            check_value(
                codec,
                &case,
                &Inner {
                    id: 0,
                    mode: mode.clone(),
                },
            )?,
        );
    }
    record(
        "option/none",
        check_value(codec, "option/none", &None::<u32>)?,
    );
    record(
        "option/some",
        check_value(codec, "option/some", &Some(0u32))?,
    );
    record("unit", check_value(codec, "unit", &())?);
    let empty: BTreeMap<u32, String> = BTreeMap::new();
    record("map/empty", check_value(codec, "map/empty", &empty)?);

    // A map of several entries.
    let entries: BTreeMap<String, u64> = ["vcpu0", "vcpu1", "vcpu10", "vcpu2", "serial0", "rtc"]
        .iter()
        .zip(0..)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    record("map/entries", check_value(codec, "map/entries", &entries)?);
    check_truncation(codec, "map/entries", &entries)?;

    // Byte sections from empty to 16 MiB.
    for (name, len) in [
        ("0B", 0usize),
        ("1B", 1),
        ("255B", 255),
        ("4KiB", 4 << 10),
        ("1MiB", 1 << 20),
        ("16MiB", 16 << 20),
    ] {
        let case = format!("bytes/{name}");
        let bytes = if len <= 1 << 20 {
            check_value(codec, &case, &pattern(len))?
        } else {
            check_round_trip(codec, &case, &pattern(len))?.0
        };
        record(&case, bytes);
    }

    // Nesting: moderate depth decodes, deep nesting is an error.
    record("nest/64", check_value(codec, "nest/64", &Nest::deep(64))?);
    let deep = codec::encode(codec, &Nest::deep(1000)).map_err(|e| fail(codec, "nest/1000", e))?;
    if codec::decode::<Nest>(codec, &deep).is_ok() {
        return Err(fail(codec, "nest/1000", "nesting 1000 deep was accepted"));
    }
    Ok(report)
}
