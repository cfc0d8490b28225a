//! Snapshot, restore and live migration of virtual machines, without a hypervisor.
//!
//! This crate decouples *what a component's state is* from *how it is encoded* and
//! *where it goes*. Components implement [`Snapshottable`] and hand over typed state;
//! whoever takes the snapshot picks a [`Codec`]; the container format and the
//! transports carry the bytes. It knows no hypervisor (KVM lives in `migration-kvm`)
//! and no concrete codec (those live in `migration-serde`).
//!
//! Data flows one way: component → state → [`Section`] → [`Codec`] → container →
//! transport, and back.
//!
//! # Example
//!
//! Two components in a tree, snapshotted, encoded, decoded and restored. The codec
//! here is a ten-line JSON codec written inline, the same way a downstream crate adds
//! its own; real code takes one from `migration-serde`.
//!
//! ```
//! use std::sync::Arc;
//! use migration_core::codec::{self, Codec, CodecError, CodecId, CodecRegistry, DecodeVisitor};
//! use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable, Versioned};
//! use serde::{Deserialize, Serialize};
//!
//! // A serial port: its state is a plain struct (the "Persist" pattern).
//! #[derive(Clone, Serialize, Deserialize)]
//! struct SerialState { lcr: u8, buffer: Vec<u8> }
//! impl Versioned for SerialState { const VERSION: u32 = 1; }
//!
//! struct Serial { state: SerialState }
//! impl Pausable for Serial {
//!     fn pause(&mut self) -> Result<(), MigratableError> { Ok(()) }
//!     fn resume(&mut self) -> Result<(), MigratableError> { Ok(()) }
//! }
//! impl Snapshottable for Serial {
//!     fn id(&self) -> String { "serial0".into() }
//!     fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
//!         let mut s = Snapshot::new(self.id());
//!         s.add_state("state", self.state.clone());
//!         Ok(s)
//!     }
//!     fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
//!         self.state = s.state("state")?;
//!         Ok(())
//!     }
//! }
//!
//! // A bus that owns the serial port: its snapshot holds the child's.
//! struct Bus { serial: Serial, ticks: u64 }
//! impl Pausable for Bus {
//!     fn pause(&mut self) -> Result<(), MigratableError> { self.serial.pause() }
//!     fn resume(&mut self) -> Result<(), MigratableError> { self.serial.resume() }
//! }
//! impl Snapshottable for Bus {
//!     fn id(&self) -> String { "bus".into() }
//!     fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
//!         let mut s = Snapshot::new(self.id());
//!         s.add_state_as("ticks", 1, self.ticks);
//!         s.snapshot_child(&mut self.serial)?;
//!         Ok(s)
//!     }
//!     fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
//!         self.ticks = s.section("ticks")?.decode().map_err(|source| MigratableError::Codec {
//!             path: self.id(), section: "ticks".into(), source })?;
//!         s.restore_child(&mut self.serial)
//!     }
//! }
//!
//! // Any codec works; this one is JSON.
//! #[derive(Debug)]
//! struct Json;
//! impl Codec for Json {
//!     fn id(&self) -> CodecId { CodecId::new(b"jsn0") }
//!     fn name(&self) -> &str { "json (example)" }
//!     fn encode(&self, v: &dyn erased_serde::Serialize) -> Result<Vec<u8>, CodecError> {
//!         serde_json::to_vec(v).map_err(|e| CodecError::Encode { codec: self.id(), source: e.into() })
//!     }
//!     fn decode(&self, bytes: &[u8], visit: &mut DecodeVisitor<'_>) -> Result<(), CodecError> {
//!         let err = |e: Box<dyn std::error::Error + Send + Sync>| CodecError::Decode { codec: self.id(), source: e };
//!         let mut de = serde_json::Deserializer::from_slice(bytes);
//!         visit(&mut <dyn erased_serde::Deserializer>::erase(&mut de)).map_err(|e| err(e.into()))?;
//!         de.end().map_err(|e| err(e.into()))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let json: Arc<dyn Codec> = Arc::new(Json);
//! let mut bus = Bus { serial: Serial { state: SerialState { lcr: 3, buffer: b"hi".to_vec() } }, ticks: 7 };
//!
//! bus.pause()?;
//! let mut snapshot = bus.snapshot()?;
//! snapshot.encode(&json)?;                        // the taker picks the codec
//! let bytes = codec::encode(json.as_ref(), &snapshot)?;
//!
//! // Elsewhere: decode the tree, resolve the codecs it names, restore a fresh bus.
//! let registry = CodecRegistry::new().with(json.clone());
//! let mut received: Snapshot = codec::decode(json.as_ref(), &bytes)?;
//! received.resolve_codecs(&registry);
//! let mut fresh = Bus { serial: Serial { state: SerialState { lcr: 0, buffer: vec![] } }, ticks: 0 };
//! fresh.restore(&received)?;
//! assert_eq!((fresh.ticks, fresh.serial.state.lcr, &fresh.serial.state.buffer[..]), (7, 3, &b"hi"[..]));
//! # Ok(())
//! # }
//! ```
//!
//! # Map
//! - [`Pausable`], [`Snapshottable`], [`Transportable`], [`Migratable`]: the traits.
//! - [`Snapshot`] and [`Section`]: the snapshot tree.
//! - [`Versioned`]: section versions and upgrades.
//! - [`codec`]: the [`Codec`] trait and [`CodecRegistry`].
//! - [`memory`]: [`MemoryRange`], [`MemoryRangeTable`], [`MemorySource`], [`MemorySink`].
//! - [`container`]: the snapshot container format (`docs/format.md`); [`file`](mod@file): atomic
//!   snapshot files; [`checksum`]: CRC-64/NVME.
//! - [`transport`]: `file://`, `tcp://`, `tls://`, `unix://`; [`endpoint`]: the socket
//!   URLs snapshots and migrations share; [`security`]: who may connect (plaintext on
//!   loopback only unless allowed); `tls` (feature `tls`, default): mutual TLS,
//!   certificate allowlists (`docs/security.md`).
//! - [`protocol`], [`precopy`], [`destination`]: live migration's wire protocol, its
//!   source and its destination; [`convergence`]: dirty rate, auto-converge and why
//!   precopy gave up; [`postcopy`]: the destination resumes before all memory arrived,
//!   missing pages caught through [`missing_pages`], recovery after a broken link.
//! - [`Arch`]: the architecture a container header records and a HELLO announces.
//! - [`MigratableError`]: the error everything returns; [`BoxError`]: a component's
//!   own error inside it.
//!
//! Modules import each other by module path (`crate::memory::MemorySource`), never
//! through the re-exports below, and no two modules import each other: the
//! re-exports are for users of the crate.

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

pub mod arch;
pub mod box_error;
pub mod checksum;
pub mod codec;
pub mod container;
pub mod convergence;
pub mod deadline;
pub mod destination;
pub mod endpoint;
pub mod error;
pub mod file;
pub mod memory;
mod migratable;
pub mod missing_pages;
pub mod multi;
mod pausable;
pub mod postcopy;
pub mod precopy;
pub mod protocol;
mod section;
pub mod security;
mod snapshot;
mod snapshottable;
pub mod text;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
mod transportable;
mod version;

pub use arch::Arch;
pub use box_error::BoxError;
pub use codec::{Codec, CodecError, CodecId, CodecRegistry};
pub use container::FormatError;
pub use convergence::{AutoConverge, ConvergenceFailure};
pub use destination::{
    receive_migration, receive_migration_over, IncomingVm, ReceiveOptions, ReceiveReport,
};
pub use error::MigratableError;
pub use memory::{MemoryError, MemoryRange, MemoryRangeTable, MemorySink, MemorySource};
pub use migratable::{Migratable, MigrationRole};
pub use pausable::Pausable;
pub use precopy::{
    send_migration, send_migration_over, ConvergencePolicy, MigrationOptions, MigrationReport,
};
pub use protocol::MigrationError;
pub use section::Section;
pub use snapshot::Snapshot;
pub use snapshottable::Snapshottable;
pub use transportable::Transportable;
pub use version::Versioned;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

/// This crate's README (the page a registry shows), its examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct CrateReadmeDoctests;
