//! The snapshot container: the bytes a snapshot and its guest memory become in a file
//! or on a socket. `docs/format.md` specifies them; this module follows it.
//!
//! - [`write_snapshot`] writes the **file form**: page-aligned memory extents whose
//!   zero pages are holes (an idle guest takes little disk), so a restore can
//!   `mmap(MAP_PRIVATE)` them; [`write_snapshot_stream`] writes the **stream form**
//!   (sockets, pipes: only non-zero pages travel).
//! - [`read_snapshot`], [`read_snapshot_stream`] and [`ContainerReader`] read them
//!   back; [`verify`] checks every checksum without restoring; [`inspect`] returns the
//!   header, tree with sizes and extent table ([`ContainerInfo`]).
//! - A reader rejects anything `docs/format.md` §10 lists with a [`FormatError`]
//!   (inside [`MigratableError::Format`](crate::error::MigratableError::Format)), checking
//!   every declared length against [`limits`] and the file size before allocating.
//!
//! Guest memory never passes through a buffer of its full size: it streams from a
//! [`MemorySource`](crate::memory::MemorySource) through a 1 MiB buffer, and back into a
//! [`MemorySink`](crate::memory::MemorySink).
//!
//! ```
//! use std::io::Cursor;
//! use migration_core::codec::{CodecId, CodecRegistry};
//! use migration_core::container::{self, WriteOptions};
//! use migration_core::{Section, Snapshot};
//!
//! // Sections already encoded (by any codec; the container stores the bytes).
//! let mut vm = Snapshot::new("vm");
//! vm.add_section("clock", Section::from_encoded(1, CodecId::new(b"raw0"), vec![1, 2, 3]));
//! let mut devices = Snapshot::new("devices");
//! devices.add_section("serial0", Section::from_encoded(2, CodecId::new(b"raw0"), b"uart".to_vec()));
//! vm.add_child(devices);
//!
//! let mut file = Cursor::new(Vec::new());
//! container::write_snapshot(&mut file, &vm, None, &WriteOptions::default())?;
//!
//! file.set_position(0);
//! let report = container::verify(&mut file)?;
//! assert_eq!(report.sections, 2);
//!
//! file.set_position(0);
//! let back = container::read_snapshot(&mut file, &CodecRegistry::new(), None)?;
//! let serial = back.find("vm/devices").unwrap().section("serial0")?;
//! assert_eq!((serial.version(), serial.payload()), (2, Some(&b"uart"[..])));
//! # Ok::<(), migration_core::MigratableError>(())
//! ```

mod chunk_pipeline;
mod error;
mod extents;
pub mod header;
pub mod limits;
mod metadata;
mod reader;
mod seek_data;
mod stored_memory;
mod writer;

pub use error::FormatError;
pub use extents::{DataRun, Extent};
pub use header::{Form, Header};
pub use metadata::{NodeInfo, SectionInfo};
pub use reader::{
    inspect, read_snapshot, read_snapshot_stream, verify, verify_stream, ContainerInfo,
    ContainerReader, ReadOptions, VerifyReport,
};
pub use seek_data::SeekData;
pub use stored_memory::StoredMemory;
pub use writer::{write_snapshot, write_snapshot_stream, WriteOptions, WriteSummary};
