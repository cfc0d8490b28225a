//! Snapshot files: atomic writes, reads, verification.
//!
//! [`write_snapshot_file`] never leaves a partial file at the path: it writes a
//! temporary file in the same directory, `fsync`s it, renames it over the path and
//! `fsync`s the directory. A crash at any point leaves the old file or the new one
//! (and perhaps a stray `.<name>.tmp.*` file, which readers ignore).
//!
//! ```
//! use migration_core::codec::{CodecId, CodecRegistry};
//! use migration_core::container::WriteOptions;
//! use migration_core::{file, Section, Snapshot};
//!
//! let dir = std::env::temp_dir().join(format!("vmsnap-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("vm.snap");
//! let mut vm = Snapshot::new("vm");
//! vm.add_section("regs", Section::from_encoded(1, CodecId::new(b"raw0"), vec![7; 64]));
//! file::write_snapshot_file(&path, &vm, None, &WriteOptions::default())?;
//! assert_eq!(file::verify_file(&path)?.payload_bytes, 64);
//! let back = file::read_snapshot_file(&path, &CodecRegistry::new(), None)?;
//! assert_eq!(back.section("regs")?.payload(), Some(&[7u8; 64][..]));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::CodecRegistry;
use crate::container::{
    self, ContainerInfo, ContainerReader, ReadOptions, VerifyReport, WriteOptions, WriteSummary,
};
use crate::error::MigratableError;
use crate::memory::{MemorySink, MemorySource};
use crate::snapshot::Snapshot;

/// Removes the temporary file unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `snapshot` (and `memory`, if given) to `path` in the file form, atomically.
pub fn write_snapshot_file(
    path: impl AsRef<Path>,
    snapshot: &Snapshot,
    memory: Option<&dyn MemorySource>,
    options: &WriteOptions,
) -> Result<WriteSummary, MigratableError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let path = path.as_ref();
    let name = path.file_name().ok_or_else(|| {
        MigratableError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` names no file", path.display()),
        ))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)?;
    let mut guard = TempGuard(Some(temp.clone()));
    let summary = container::write_snapshot(&mut file, snapshot, memory, options)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)?;
    guard.0 = None;
    File::open(&dir)?.sync_all()?;
    Ok(summary)
}

/// Reads the snapshot file at `path` (either form): the tree with codecs resolved,
/// and memory into `sink` if given (zero pages zeroed).
pub fn read_snapshot_file(
    path: impl AsRef<Path>,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
) -> Result<Snapshot, MigratableError> {
    ContainerReader::open(File::open(path)?)?.read_snapshot(codecs, sink, &ReadOptions::default())
}

/// The header, tree and extent table of the snapshot file at `path`.
pub fn inspect_file(path: impl AsRef<Path>) -> Result<ContainerInfo, MigratableError> {
    container::inspect(File::open(path)?)
}

/// Verifies every checksum of the snapshot file at `path`, and (file form) that every
/// byte of an extent outside its data runs reads as zero, so an `mmap` restore sees
/// what a copying restore sees. Holes are skipped with `SEEK_DATA`, not read: see
/// [`ContainerReader::verify`].
pub fn verify_file(path: impl AsRef<Path>) -> Result<VerifyReport, MigratableError> {
    container::verify(File::open(path)?)
}
