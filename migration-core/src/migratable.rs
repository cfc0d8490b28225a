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
/// [`stop_dirty_log`] and [`complete_migration`]. With auto-converge, [`set_throttle`]
/// between rounds, and `set_throttle(0)` once paused. On any failure the source gets
/// `set_throttle(0)` (if it was throttled), [`stop_dirty_log`] and `resume`, and keeps
/// running.
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
/// [`set_throttle`]: Migratable::set_throttle
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

    /// Whether [`set_throttle`](Self::set_throttle) slows the guest down (the
    /// precopy driver's auto-converge uses it only then). Default: `false`.
    fn can_throttle(&self) -> bool {
        false
    }

    /// Slows the guest down so that its vCPUs sleep for `percent` (0 to 99) of every
    /// time slice; 0 lifts the throttle. The precopy driver raises it while precopy
    /// does not converge ([`AutoConverge`](crate::convergence::AutoConverge)) and
    /// always sets it back to 0 before the migration ends, fails or is cancelled.
    /// Default: does nothing.
    fn set_throttle(&mut self, percent: u8) -> Result<(), MigratableError> {
        let _ = percent;
        Ok(())
    }
}
