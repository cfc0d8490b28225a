//! JSON, bincode and postcard codecs for [`migration_core`] section payloads.
//!
//! `migration-core` defines the [`Codec`](migration_core::Codec) trait and knows no
//! format; this crate supplies three, each behind a cargo feature (all on by default):
//!
//! | codec | id | feature | for |
//! |---|---|---|---|
//! | [`JsonCodec`] | `json` | `json` | debugging, humans, tolerant of added fields |
//! | [`PostcardCodec`] | `pcd1` | `postcard` | compact binary, maintained, stable wire format (preferred) |
//! | [`BincodeCodec`] | `bin2` | `bincode` | fixed-size binary; bincode is unmaintained, see its docs |
//!
//! Every snapshot section records the id of the codec that wrote it, so a reader with
//! [`registry()`] decodes any of them without naming the codec. Every decode is
//! bounded: see [`limits`] for the memory and depth budget.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use migration_core::{Codec, Snapshot, Versioned};
//! use migration_serde::{BincodeCodec, JsonCodec, PostcardCodec};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! struct RtcState {
//!     index: u8,
//!     #[serde(with = "serde_bytes")]
//!     cmos: Vec<u8>,
//! }
//! impl Versioned for RtcState { const VERSION: u32 = 1; }
//!
//! let state = RtcState { index: 0x0b, cmos: vec![0x26; 128] };
//! let registry = migration_serde::registry();
//! let codecs: [Arc<dyn Codec>; 3] =
//!     [Arc::new(JsonCodec::new()), Arc::new(BincodeCodec), Arc::new(PostcardCodec)];
//!
//! for codec in &codecs {
//!     // Writer: snapshot, encode with this codec, serialize the tree.
//!     let mut snapshot = Snapshot::new("rtc");
//!     snapshot.add_state("state", state.clone());
//!     snapshot.encode(codec)?;
//!     let bytes = migration_core::codec::encode(codec.as_ref(), &snapshot)?;
//!
//!     // Reader: knows only the registry; each section names its codec.
//!     let mut read: Snapshot = migration_core::codec::decode(codec.as_ref(), &bytes)?;
//!     read.resolve_codecs(&registry);
//!     assert_eq!(read.section("state")?.codec_id(), Some(codec.id()));
//!     assert_eq!(read.state::<RtcState>("state")?, state);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Map
//! - [`JsonCodec`], [`BincodeCodec`], [`PostcardCodec`] and their ids.
//! - [`registry()`], [`register_all`]: every enabled codec.
//! - [`limits`]: [`MAX_PAYLOAD`](limits::MAX_PAYLOAD), [`MAX_DEPTH`](limits::MAX_DEPTH),
//!   and [`DepthLimited`](limits::DepthLimited) for codecs of your own.
//!
//! The suite every codec must pass (these and yours) is in `migration-testkit`:
//! `migration_testkit::codec_conformance`, beside its `Snapshottable` harness.
//!
//! `docs/codecs.md` in the repository compares the codecs (size, speed, compatibility
//! rules) and shows a downstream crate adding a fourth.

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

#[cfg(feature = "bincode")]
mod bincode;
#[cfg(feature = "json")]
mod json;
pub mod limits;
#[cfg(feature = "postcard")]
mod postcard;
mod registry;

#[cfg(feature = "bincode")]
pub use crate::bincode::{BincodeCodec, BINCODE_ID};
#[cfg(feature = "json")]
pub use crate::json::{JsonCodec, JSON_ID};
#[cfg(feature = "postcard")]
pub use crate::postcard::{PostcardCodec, POSTCARD_ID};
pub use crate::registry::{register_all, registry};

/// This crate's README (the page a registry shows), its examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
