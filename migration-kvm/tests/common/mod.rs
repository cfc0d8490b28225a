//! What the live-migration tests and the soak share: the guests they boot and how
//! they migrate them.

use std::time::Duration;

use anyhow::{Context, Result};
use migration_core::codec::CodecRegistry;
use migration_core::precopy::MigrationReport;
use migration_testkit::guest::{Guest, RunningGuest};

/// Guest RAM.
pub const MEM: u64 = 64 << 20;
/// Progress events required before the first migration.
pub const BEFORE: u64 = 3;
/// Generous: only a failing guest waits this long.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of each socket read of a migration.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The codecs both ends use.
pub fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

/// A fresh VM running `guest`; the memory-pattern guest's working set ends at
/// `pattern_end` (which bounds its first-touch cost).
pub fn boot(guest: Guest, pattern_end: u64) -> Result<RunningGuest> {
    let arg = if guest == Guest::MemoryPattern {
        pattern_end
    } else {
        0
    };
    Ok(RunningGuest::boot(guest, MEM, arg, TIMEOUT)?)
}

/// Migrates `src` to a fresh VM listening at `url` (`tcp://127.0.0.1:0` or a unix
/// URL), checks the source stayed paused, and returns the destination.
pub fn migrate_url(src: &mut RunningGuest, url: &str) -> Result<(RunningGuest, MigrationReport)> {
    src.migrate_to(url, codecs(), IO_TIMEOUT)
        .with_context(|| format!("migration to {url}"))
}
