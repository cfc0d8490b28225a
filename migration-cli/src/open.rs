//! Opening a snapshot file the way every command does: checked against the limit on
//! declared guest memory, then verified (`ContainerReader::verify`: every checksum,
//! the stream form's end, zero padding and zero holes), so `inspect`, `convert`,
//! `diff` and `merge` refuse exactly what `verify` refuses, at a cost that follows
//! the bytes the file stores.

use std::fs::File;
use std::path::Path;

use anyhow::Context;
use migration_core::container::ContainerReader;

use crate::report::bytes;

/// The default for `--max-guest-memory`: this host's physical RAM (what it could
/// restore), the same default as a migration destination's `max_guest_ram`.
pub fn default_max_guest_memory() -> u64 {
    migration_core::destination::host_ram()
}

/// Opens and verifies the snapshot at `path`; refuses one declaring more than
/// `max_memory` bytes of guest memory before reading any of it.
pub fn open_verified(path: &Path, max_memory: u64) -> anyhow::Result<ContainerReader<File>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = ContainerReader::open(file)
        .with_context(|| format!("{} is not a readable snapshot", path.display()))?;
    let declared = reader.memory_bytes();
    if declared > max_memory {
        anyhow::bail!(
            "{} declares {} of guest memory, over the limit of {} (--max-guest-memory)",
            path.display(),
            bytes(declared),
            bytes(max_memory)
        );
    }
    reader
        .verify()
        .with_context(|| format!("{} does not verify", path.display()))?;
    Ok(reader)
}
