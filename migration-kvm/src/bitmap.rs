//! [`DirtyBitmap`]: the vm-memory bitmaps [`GuestRam`](crate::memory::GuestRam) can
//! read the VMM's own writes from.
//!
//! Two writers change guest memory during a migration: the guest, whose writes KVM's
//! dirty log sees, and the VMM (its devices, a virtio queue's used ring, a restore),
//! whose writes through vm-memory only a vm-memory bitmap sees. vm-memory's bitmap is
//! a type parameter of the memory:
//!
//! - [`AtomicBitmap`]: one bit per page, set by every write through vm-memory. The
//!   dirty set of a migration is KVM's log OR this bitmap: nothing is missed.
//! - `()`: no bitmap, no cost. **VMM writes during a migration are then not seen**:
//!   a page only the VMM wrote after round 0 is never resent, and the destination
//!   runs with its old content. Use it only when the VMM writes no guest memory while
//!   the guest is migrated (or pauses its devices first).
//!
//! Implement the trait for another bitmap to use it with `GuestRam`.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};

/// A vm-memory bitmap whose dirty pages can be read and cleared.
pub trait DirtyBitmap: Bitmap + Send + Sync + std::fmt::Debug + 'static {
    /// Whether this bitmap records writes (`false` for `()`).
    const TRACKS: bool;

    /// The pages written since the previous call, one bit per page (bit `i` of
    /// word `i / 64` is page `i` of the region), and clears them. `None` if this
    /// bitmap does not record writes.
    fn take_dirty(&self) -> Option<Vec<u64>>;

    /// Clears every bit.
    fn clear_dirty(&self);
}

impl DirtyBitmap for AtomicBitmap {
    const TRACKS: bool = true;

    fn take_dirty(&self) -> Option<Vec<u64>> {
        Some(self.get_and_reset())
    }

    fn clear_dirty(&self) {
        self.reset();
    }
}

/// No bitmap: VMM writes are not tracked (see the [module docs](self)).
impl DirtyBitmap for () {
    const TRACKS: bool = false;

    fn take_dirty(&self) -> Option<Vec<u64>> {
        None
    }

    fn clear_dirty(&self) {}
}
