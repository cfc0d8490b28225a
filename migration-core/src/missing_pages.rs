//! [`MissingPages`]: the destination VM's side of postcopy, guest memory whose pages
//! may be missing and whose accesses to them are caught; [`PagePlacer`]: how the
//! pages are put in place.
//!
//! Core knows no mechanism: `migration-kvm` implements these with userfaultfd
//! (MISSING mode on the guest memory it built), testkit's `FakeVm` in memory.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::error::MigratableError;
use crate::memory::{MemoryError, MemoryRangeTable};

/// A destination VM that can run before all of its memory arrived (postcopy).
///
/// The postcopy driver calls [`arm_missing`](Self::arm_missing) on the paused VM once
/// its device state is restored and before it resumes it, and
/// [`disarm_missing`](Self::disarm_missing) once every pending page is placed.
pub trait MissingPages {
    /// Makes every page of `pending` missing (whatever it held is discarded: it is
    /// stale) and, from now on, catches the first access to any missing page of
    /// guest RAM: the accessor (a vCPU, a VMM thread) waits, and the page's
    /// guest-physical address (page aligned) is sent to `faults` (once or more),
    /// until the page is placed through the returned [`PagePlacer`]. Pages outside
    /// `pending` may be missing too (never written: they are zero); the driver
    /// places zeros for them when they are reported.
    fn arm_missing(
        &mut self,
        pending: &MemoryRangeTable,
        faults: Sender<u64>,
    ) -> Result<Arc<dyn PagePlacer>, MigratableError>;

    /// Stops catching accesses (every pending page was placed). Missing pages left
    /// read as zero afterwards.
    fn disarm_missing(&mut self) -> Result<(), MigratableError>;
}

/// Puts pages in place in a VM's guest memory while the guest runs, and wakes
/// whoever waits on them. Addresses and lengths are whole pages inside the layout
/// (the driver checks them); a page placed twice keeps its first content.
pub trait PagePlacer: Send + Sync {
    /// Places `data` (whole pages) at `gpa`, atomically per page, and wakes the
    /// accessors waiting on those pages.
    fn place(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError>;

    /// Places `length` bytes of zeros at `gpa`, as [`place`](Self::place).
    fn place_zero(&self, gpa: u64, length: u64) -> Result<(), MemoryError>;

    /// Wakes the accessors waiting on `length` bytes at `gpa` (pages already placed).
    fn wake(&self, gpa: u64, length: u64) -> Result<(), MemoryError>;
}
