//! [`Migratable`]: a component (normally a whole VM) that can be live-migrated.

use crate::error::MigratableError;
use crate::memory::{MemoryRangeTable, MemorySink, MemorySource};
use crate::transportable::Transportable;

/// Which end of a migration a VM is, as [`Migratable::start_migration`] is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationRole {
    /// The VM being sent: it runs until the pause, and must never run again once
    /// the migration completed (its guest runs on the destination).
    Source,
    /// The VM being built from what arrives: it runs only after the migration
    /// completed.
    Destination,
}

/// A component that can be moved while it runs: the precopy driver sends its memory
/// while it runs, then pauses it and sends what changed plus its device state.
///
/// The driver's calls, in order, on the source: [`start_migration`] with
/// [`MigrationRole::Source`], [`start_dirty_log`], rounds of [`dirty_log`] with reads
/// through [`memory_source`], then `pause`, a last [`dirty_log`], `snapshot`,
/// [`stop_dirty_log`] and [`complete_migration`]. On any failure the source gets
/// [`stop_dirty_log`] and `resume`, and keeps running.
///
/// On the destination: [`start_migration`] with [`MigrationRole::Destination`],
/// writes through [`memory_sink`], `restore`, then [`complete_migration`] and
/// `resume`. On any failure the destination VM is dropped.
///
/// [`start_migration`]: Migratable::start_migration
/// [`start_dirty_log`]: Migratable::start_dirty_log
/// [`dirty_log`]: Migratable::dirty_log
/// [`memory_source`]: Migratable::memory_source
/// [`stop_dirty_log`]: Migratable::stop_dirty_log
/// [`complete_migration`]: Migratable::complete_migration
/// [`memory_sink`]: Migratable::memory_sink
pub trait Migratable: Send + Transportable {
    /// Starts tracking which guest pages change.
    fn start_dirty_log(&mut self) -> Result<(), MigratableError>;

    /// Stops tracking dirty pages.
    fn stop_dirty_log(&mut self) -> Result<(), MigratableError>;

    /// The pages dirtied since dirty logging started or since the previous call
    /// (reading clears the log).
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError>;

    /// Called before the first byte of a migration is sent (`role` is
    /// [`MigrationRole::Source`]) or received ([`MigrationRole::Destination`]). An
    /// implementation keeps the role for [`complete_migration`](Self::complete_migration).
    fn start_migration(&mut self, role: MigrationRole) -> Result<(), MigratableError>;

    /// Called when a migration has succeeded, on both sides: on the source after the
    /// destination reported it runs (the source must never run again), on the
    /// destination before it resumes the guest.
    fn complete_migration(&mut self) -> Result<(), MigratableError>;

    /// Guest memory to read from while migrating out.
    fn memory_source(&self) -> &dyn MemorySource;

    /// Guest memory to write into while migrating in.
    fn memory_sink(&self) -> &dyn MemorySink;
}
