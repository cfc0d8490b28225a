//! The conformance harness: properties every [`Snapshottable`] must have, one call
//! per property.
//!
//! | property | call | what it checks |
//! |---|---|---|
//! | round trip | [`round_trip`] | snapshot → encode with each codec → serialize the tree → decode → resolve codecs → restore into a **fresh** instance → snapshot again → identical bytes |
//! | determinism | [`determinism`] | two snapshots of the same state (of one instance, and of two instances holding it) encode to identical bytes, per codec |
//! | corruption | [`corruption`] | every truncation of the encoded snapshot, and of each section's payload inside an intact tree, is a typed error from decode or restore; a seeded sample of bit flips never panics |
//! | version upgrade | [`version_upgrade`] | golden bytes written by an older version restore |
//!
//! [`Conformance`] runs the first three in one call. Every failure is a
//! [`ConformanceError`] whose message names the property, the codec and the path of
//! the component or section at fault (`round trip (codec json): section `state` of
//! `blk0/queue1`: …`); seeded checks print their seed so a failure replays.
//!
//! The harness pauses every instance before it snapshots or restores it, and leaves
//! them paused. It catches panics (reporting them as failures), so the default panic
//! hook still prints them to stderr.
//!
//! **Bit flips.** There is no checksum at the section layer (the container adds
//! one), so a flipped bit inside a payload may decode to a different *valid* state:
//! the corruption property accepts `Ok` for flips, and only requires "no panic".
//! A truncated snapshot, in contrast, must always be rejected. The tree's own
//! encoding rejects every truncation of it before any component sees it, so the
//! harness also cuts each section's payload inside an intact tree: that reaches the
//! component's `restore`, where a swallowed decode error shows. The only cut payload
//! a component may accept is one the codec itself still reads as a complete value
//! (JSON's `12` from `123`; postcard and bincode never do: for a given type their
//! encodings are prefix-free).

use std::collections::BTreeMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use migration_core::codec::{self, Codec, CodecError, CodecId, CodecRegistry};
use migration_core::{MigratableError, Section, Snapshot, Snapshottable};
use serde::de::IgnoredAny;

use crate::rng::Rng;

/// A property the harness checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Property {
    /// See [`round_trip`].
    RoundTrip,
    /// See [`determinism`].
    Determinism,
    /// See [`corruption`].
    Corruption,
    /// See [`version_upgrade`].
    VersionUpgrade,
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Property::RoundTrip => "round trip",
            Property::Determinism => "determinism",
            Property::Corruption => "corruption",
            Property::VersionUpgrade => "version upgrade",
        })
    }
}

/// " (codec xyz)" or nothing.
struct Via(Option<CodecId>);

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, " (codec {id})"),
            None => Ok(()),
        }
    }
}

/// Why a property does not hold. Every variant names the property and a path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConformanceError {
    /// The component (or the snapshot tree) returned an error where it must succeed.
    #[error("{property}{}: `{path}` failed: {source}", Via(*.codec))]
    Component {
        /// The property.
        property: Property,
        /// The codec in use, if any.
        codec: Option<CodecId>,
        /// Path of the component at fault (from the error, else the root).
        path: String,
        /// The error.
        #[source]
        source: MigratableError,
    },
    /// Two encodings that must be identical differ.
    #[error("{property}{}: `{path}`: {detail}", Via(*.codec))]
    Mismatch {
        /// The property.
        property: Property,
        /// The codec in use.
        codec: Option<CodecId>,
        /// Path of the first node that differs (`section `s` of `a/b`` in `detail`).
        path: String,
        /// What differs.
        detail: String,
    },
    /// Decoding or restoring panicked.
    #[error("{property}{}: `{path}` panicked on {case}: {message}", Via(*.codec))]
    Panic {
        /// The property.
        property: Property,
        /// The codec in use.
        codec: Option<CodecId>,
        /// Path of the component being restored.
        path: String,
        /// The input that caused it (`truncated to 12 of 80 bytes`, `bit 77 flipped (seed 5)`).
        case: String,
        /// The panic message.
        message: String,
    },
    /// A corrupted snapshot was accepted where it must be rejected.
    #[error("{property}{}: `{path}` accepted {case}", Via(*.codec))]
    Accepted {
        /// The property.
        property: Property,
        /// The codec in use.
        codec: Option<CodecId>,
        /// Path of the component that accepted it.
        path: String,
        /// The input.
        case: String,
    },
    /// The check cannot tell anything: no codec, or a subject whose state equals a
    /// fresh instance's (so a forgotten field would go unnoticed).
    #[error("{property}: `{path}`: {detail}")]
    Setup {
        /// The property.
        property: Property,
        /// Path of the component.
        path: String,
        /// What is wrong with the setup.
        detail: String,
    },
}

impl ConformanceError {
    /// The property that failed.
    pub fn property(&self) -> Property {
        match self {
            Self::Component { property, .. }
            | Self::Mismatch { property, .. }
            | Self::Panic { property, .. }
            | Self::Accepted { property, .. }
            | Self::Setup { property, .. } => *property,
        }
    }

    /// The path of the component or node at fault.
    pub fn path(&self) -> &str {
        match self {
            Self::Component { path, .. }
            | Self::Mismatch { path, .. }
            | Self::Panic { path, .. }
            | Self::Accepted { path, .. }
            | Self::Setup { path, .. } => path,
        }
    }
}

/// Context of one check, to build errors.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    property: Property,
    codec: Option<CodecId>,
    root: &'a str,
}

impl Ctx<'_> {
    fn component(&self, source: MigratableError) -> ConformanceError {
        let path = match source.path() {
            Some(p) if !p.is_empty() => p.to_owned(),
            _ => self.root.to_owned(),
        };
        ConformanceError::Component {
            property: self.property,
            codec: self.codec,
            path,
            source,
        }
    }

    fn tree_codec(&self, source: CodecError) -> ConformanceError {
        self.component(MigratableError::Codec {
            path: self.root.to_owned(),
            section: "(tree)".into(),
            source,
        })
    }

    fn setup(&self, detail: impl Into<String>) -> ConformanceError {
        ConformanceError::Setup {
            property: self.property,
            path: self.root.to_owned(),
            detail: detail.into(),
        }
    }
}

fn codecs_of(
    ctx: Ctx<'_>,
    codecs: &CodecRegistry,
) -> Result<Vec<Arc<dyn Codec>>, ConformanceError> {
    let list: Vec<_> = codecs.iter().cloned().collect();
    if list.is_empty() {
        return Err(ctx.setup("the codec registry is empty: nothing to test with"));
    }
    Ok(list)
}

/// Pauses `component`, snapshots it, encodes it with `codec` and serializes the tree.
fn encoded<C: Snapshottable + ?Sized>(
    ctx: Ctx<'_>,
    component: &mut C,
    codec: &Arc<dyn Codec>,
) -> Result<(Snapshot, Vec<u8>), ConformanceError> {
    component.pause().map_err(|e| ctx.component(e))?;
    let mut snapshot = component.snapshot().map_err(|e| ctx.component(e))?;
    snapshot.encode(codec).map_err(|e| ctx.component(e))?;
    let bytes = codec::encode(codec.as_ref(), &snapshot).map_err(|e| ctx.tree_codec(e))?;
    Ok((snapshot, bytes))
}

/// Decodes a serialized tree and restores it into `fresh()`.
fn restore_from<C: Snapshottable>(
    codec: &Arc<dyn Codec>,
    codecs: &CodecRegistry,
    bytes: &[u8],
    fresh: &impl Fn() -> C,
) -> Result<C, MigratableError> {
    let mut tree: Snapshot =
        codec::decode(codec.as_ref(), bytes).map_err(|source| MigratableError::Codec {
            path: String::new(),
            section: "(tree)".into(),
            source,
        })?;
    tree.resolve_codecs(codecs);
    restore_tree(&tree, fresh)
}

/// Restores a decoded tree (codecs resolved) into `fresh()`.
fn restore_tree<C: Snapshottable>(
    tree: &Snapshot,
    fresh: &impl Fn() -> C,
) -> Result<C, MigratableError> {
    let mut target = fresh();
    target.pause()?;
    target.restore(tree)?;
    Ok(target)
}

/// An encoded section of a tree, and where it sits.
struct Located {
    /// Path of the node that owns it.
    path: String,
    /// Section id.
    id: String,
    version: u32,
    codec: CodecId,
    payload: Vec<u8>,
}

/// Every encoded section of `tree`, in walk order.
fn encoded_sections(tree: &Snapshot) -> Vec<Located> {
    let mut out = Vec::new();
    for (path, node) in tree.walk() {
        for (id, section) in node.sections() {
            if let (Some(codec), Some(payload)) = (section.codec_id(), section.payload()) {
                out.push(Located {
                    path: path.clone(),
                    id: id.to_owned(),
                    version: section.version(),
                    codec,
                    payload: payload.to_vec(),
                });
            }
        }
    }
    out
}

/// A copy of `node` (whose path is `here`) with section `at.id` of the node at
/// `at.path` replaced by `section`.
fn with_section(node: &Snapshot, here: &str, at: &Located, section: &Section) -> Snapshot {
    let mut out = Snapshot::new(node.id());
    for (id, s) in node.sections() {
        let s = if here == at.path && id == at.id {
            section.clone()
        } else {
            s.clone()
        };
        out.add_section(id, s);
    }
    for child in node.children() {
        let there = format!("{here}/{}", child.id());
        out.add_child(with_section(child, &there, at, section));
    }
    out
}

/// The first difference between two encoded trees: (path, description).
fn first_difference(a: &Snapshot, b: &Snapshot) -> Option<(String, String)> {
    let nodes = |s: &Snapshot| -> BTreeMap<String, Snapshot> {
        s.walk().map(|(p, n)| (p, n.clone())).collect()
    };
    let (na, nb) = (nodes(a), nodes(b));
    for path in na.keys().chain(nb.keys()) {
        let (x, y) = match (na.get(path), nb.get(path)) {
            (Some(x), Some(y)) => (x, y),
            (Some(_), None) => {
                return Some((path.clone(), "node only in the first snapshot".into()))
            }
            _ => return Some((path.clone(), "node only in the second snapshot".into())),
        };
        let sa: BTreeMap<_, _> = x.sections().collect();
        let sb: BTreeMap<_, _> = y.sections().collect();
        for id in sa.keys().chain(sb.keys()) {
            let what = match (sa.get(id), sb.get(id)) {
                (Some(p), Some(q)) => {
                    if p.version() != q.version() {
                        format!("versions {} and {}", p.version(), q.version())
                    } else if p.codec_id() != q.codec_id() {
                        format!("codecs {:?} and {:?}", p.codec_id(), q.codec_id())
                    } else if p.payload() != q.payload() {
                        let (pa, pb) = (p.payload().unwrap_or(&[]), q.payload().unwrap_or(&[]));
                        let at = pa
                            .iter()
                            .zip(pb)
                            .position(|(u, v)| u != v)
                            .unwrap_or(pa.len().min(pb.len()));
                        format!(
                            "payloads differ at byte {at} ({} and {} bytes)",
                            pa.len(),
                            pb.len()
                        )
                    } else {
                        continue;
                    }
                }
                (Some(_), None) => "only in the first snapshot".into(),
                _ => "only in the second snapshot".into(),
            };
            return Some((path.clone(), format!("section `{id}` of `{path}`: {what}")));
        }
    }
    None
}

fn mismatch(ctx: Ctx<'_>, a: &Snapshot, b: &Snapshot, what: &str) -> ConformanceError {
    let (path, detail) = first_difference(a, b).unwrap_or_else(|| {
        (
            ctx.root.to_owned(),
            "sections are identical but the serialized trees differ".into(),
        )
    });
    ConformanceError::Mismatch {
        property: ctx.property,
        codec: ctx.codec,
        path,
        detail: format!("{what}: {detail}"),
    }
}

/// **Round trip**: for each codec in `codecs`, snapshot `component`, encode and
/// serialize the tree, decode it, resolve its codecs, restore it into `fresh()`,
/// snapshot that, and require byte-identical encodings. A difference names the
/// first section that differs, which is where a forgotten field shows.
///
/// `component` must hold a state that differs from `fresh()`'s (mutate it first),
/// otherwise a forgotten field would restore to the right value by accident: such a
/// setup is reported as [`ConformanceError::Setup`].
pub fn round_trip<C: Snapshottable>(
    component: &mut C,
    fresh: impl Fn() -> C,
    codecs: &CodecRegistry,
) -> Result<(), ConformanceError> {
    let root = component.id();
    let mut ctx = Ctx {
        property: Property::RoundTrip,
        codec: None,
        root: &root,
    };
    let list = codecs_of(ctx, codecs)?;
    {
        let (_, subject) = encoded(ctx, component, &list[0])?;
        let (_, blank) = encoded(ctx, &mut fresh(), &list[0])?;
        if subject == blank {
            return Err(ctx.setup(
                "the component's state equals a fresh instance's, so the round trip \
                 cannot detect a forgotten field: change its state first",
            ));
        }
    }
    for codec in &list {
        ctx.codec = Some(codec.id());
        let (first, bytes) = encoded(ctx, component, codec)?;
        let mut restored =
            restore_from(codec, codecs, &bytes, &fresh).map_err(|e| ctx.component(e))?;
        let (second, again) = encoded(ctx, &mut restored, codec)?;
        if bytes != again {
            return Err(mismatch(
                ctx,
                &first,
                &second,
                "restored instance snapshots differently",
            ));
        }
    }
    Ok(())
}

/// **Determinism**: `a` and `b` hold the same state (built independently, e.g. in
/// different orders). For each codec, two snapshots of `a` and one of `b` must all
/// encode to identical bytes.
pub fn determinism<C: Snapshottable>(
    a: &mut C,
    b: &mut C,
    codecs: &CodecRegistry,
) -> Result<(), ConformanceError> {
    let root = a.id();
    let mut ctx = Ctx {
        property: Property::Determinism,
        codec: None,
        root: &root,
    };
    for codec in &codecs_of(ctx, codecs)? {
        ctx.codec = Some(codec.id());
        let (s1, b1) = encoded(ctx, a, codec)?;
        let (s2, b2) = encoded(ctx, a, codec)?;
        if b1 != b2 {
            return Err(mismatch(
                ctx,
                &s1,
                &s2,
                "two snapshots of one instance differ",
            ));
        }
        let (s3, b3) = encoded(ctx, b, codec)?;
        if b1 != b3 {
            return Err(mismatch(
                ctx,
                &s1,
                &s3,
                "two instances with the same state snapshot differently",
            ));
        }
    }
    Ok(())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// **Corruption**: for each codec, encode `component`'s snapshot, then
/// - restore every proper prefix of the encoded tree (every truncation) into
///   `fresh()`: each must fail with an error, never succeed or panic (the tree
///   decoder rejects them all);
/// - restore the tree with each section's payload cut to every shorter length, the
///   tree around it intact, so the component's own `restore` sees it: each must
///   fail, never succeed or panic, unless the codec itself reads the cut payload as
///   a complete value (a JSON number that lost digits), which may then restore like
///   a bit flip;
/// - flip `bit_flips` bits chosen from `seed`, one at a time: decoding and restoring
///   may succeed (no checksum at this layer) or fail, but must not panic.
///
/// Costs one decode per truncation of the tree and one restore per truncation of a
/// payload: quadratic in the snapshot size (fine for the kilobytes a device
/// snapshot has).
pub fn corruption<C: Snapshottable>(
    component: &mut C,
    fresh: impl Fn() -> C,
    codecs: &CodecRegistry,
    seed: u64,
    bit_flips: usize,
) -> Result<(), ConformanceError> {
    let root = component.id();
    let mut ctx = Ctx {
        property: Property::Corruption,
        codec: None,
        root: &root,
    };
    for codec in &codecs_of(ctx, codecs)? {
        ctx.codec = Some(codec.id());
        let (_, bytes) = encoded(ctx, component, codec)?;
        // Runs `restore` on a corrupted input; `path` is the node the input concerns.
        let attempt = |restore: &dyn Fn() -> Result<C, MigratableError>,
                       path: &str,
                       case: String,
                       must_fail: bool| {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| restore().map(drop)));
            match outcome {
                Ok(Ok(())) if must_fail => Err(ConformanceError::Accepted {
                    property: ctx.property,
                    codec: ctx.codec,
                    path: path.to_owned(),
                    case,
                }),
                Ok(_) => Ok(()),
                Err(payload) => Err(ConformanceError::Panic {
                    property: ctx.property,
                    codec: ctx.codec,
                    path: path.to_owned(),
                    case,
                    message: panic_message(payload.as_ref()),
                }),
            }
        };

        for len in 0..bytes.len() {
            attempt(
                &|| restore_from(codec, codecs, &bytes[..len], &fresh),
                &root,
                format!("the snapshot truncated to {len} of {} bytes", bytes.len()),
                true,
            )?;
        }

        let mut tree: Snapshot =
            codec::decode(codec.as_ref(), &bytes).map_err(|e| ctx.tree_codec(e))?;
        tree.resolve_codecs(codecs);
        for at in encoded_sections(&tree) {
            let Some(section_codec) = codecs.get(at.codec) else {
                continue; // not restorable with these codecs even when intact
            };
            for len in 0..at.payload.len() {
                let cut = &at.payload[..len];
                let mut section = Section::from_encoded(at.version, at.codec, cut.to_vec());
                section.resolve(codecs);
                let cut_tree = with_section(&tree, tree.id(), &at, &section);
                let still_a_value =
                    codec::decode::<IgnoredAny>(section_codec.as_ref(), cut).is_ok();
                attempt(
                    &|| restore_tree(&cut_tree, &fresh),
                    &at.path,
                    format!(
                        "section `{}` of `{}` truncated to {len} of {} bytes",
                        at.id,
                        at.path,
                        at.payload.len()
                    ),
                    !still_a_value,
                )?;
            }
        }

        let mut rng = Rng::new(seed);
        let mut flipped = bytes.clone();
        for _ in 0..bit_flips {
            let bit = rng.below(bytes.len() as u64 * 8);
            let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
            flipped[byte] ^= mask;
            let r = attempt(
                &|| restore_from(codec, codecs, &flipped, &fresh),
                &root,
                format!(
                    "bit {bit} of {} bytes flipped (seed {seed}, replay with the same seed)",
                    bytes.len()
                ),
                false,
            );
            flipped[byte] ^= mask;
            r?;
        }
    }
    Ok(())
}

/// **Version upgrade**: decodes `golden` (a serialized snapshot tree written by an
/// older version, with `codec`), resolves its sections' codecs through `codecs`,
/// restores it into `fresh()`, and checks that the restored instance snapshots and
/// encodes again with `codec`. Returns the restored instance so the caller can check
/// what the upgrade filled in.
pub fn version_upgrade<C: Snapshottable>(
    golden: &[u8],
    codec: &Arc<dyn Codec>,
    codecs: &CodecRegistry,
    fresh: impl Fn() -> C,
) -> Result<C, ConformanceError> {
    let probe = fresh();
    let root = probe.id();
    let ctx = Ctx {
        property: Property::VersionUpgrade,
        codec: Some(codec.id()),
        root: &root,
    };
    let mut restored = restore_from(codec, codecs, golden, &fresh).map_err(|e| ctx.component(e))?;
    encoded(ctx, &mut restored, codec)?;
    Ok(restored)
}

/// Runs [`round_trip`], [`determinism`] and [`corruption`] over one component.
///
/// ```
/// use migration_testkit::{Conformance, FakeDevice};
///
/// let mut device = FakeDevice::new("blk0", 2);
/// device.step(1);
/// Conformance::new(migration_serde::registry())
///     .check(&mut device, || FakeDevice::new("blk0", 2))
///     .unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Conformance {
    codecs: CodecRegistry,
    seed: u64,
    bit_flips: usize,
}

impl Conformance {
    /// Checks with every codec of `codecs`, seed `0x5eed`, 64 bit flips per codec.
    pub fn new(codecs: CodecRegistry) -> Self {
        Self {
            codecs,
            seed: 0x5eed,
            bit_flips: 64,
        }
    }

    /// The seed of the bit-flip sample.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// How many bit flips to try per codec.
    pub fn bit_flips(mut self, n: usize) -> Self {
        self.bit_flips = n;
        self
    }

    /// Runs the properties on `component` (which must hold a state different from
    /// `fresh()`'s); the determinism twin is `fresh()` restored from `component`'s
    /// unencoded snapshot.
    pub fn check<C: Snapshottable>(
        &self,
        component: &mut C,
        fresh: impl Fn() -> C,
    ) -> Result<(), ConformanceError> {
        round_trip(component, &fresh, &self.codecs)?;
        let root = component.id();
        let ctx = Ctx {
            property: Property::Determinism,
            codec: None,
            root: &root,
        };
        let mut twin = fresh();
        let typed = component.snapshot().map_err(|e| ctx.component(e))?;
        twin.pause().map_err(|e| ctx.component(e))?;
        twin.restore(&typed).map_err(|e| ctx.component(e))?;
        determinism(component, &mut twin, &self.codecs)?;
        corruption(component, &fresh, &self.codecs, self.seed, self.bit_flips)
    }
}
