//! [`GuestRam`]: guest RAM as a vm-memory `GuestMemoryMmap<B>`, seen by the migration
//! code as a [`MemorySource`] and a [`MemorySink`], and registered with KVM as memory
//! slots ([`KvmSlots`]).
//!
//! (Not to be confused with vm-memory's `GuestMemory` trait, renamed
//! `GuestMemoryBackend` in vm-memory 0.18: `GuestRam` *holds* a vm-memory guest
//! memory and adds its layout, range checks and the KVM slots.)
//!
//! Any vm-memory mmap memory works: anonymous or file-backed regions (a memfd, a
//! file the VMM names), built here ([`GuestRam::anonymous`]) or by the VMM
//! ([`GuestRam::from_mmap`]). `B` is vm-memory's dirty bitmap: [`AtomicBitmap`] (the
//! default) tracks the VMM's own writes for migration, `()` tracks nothing (see
//! [`crate::bitmap`] for what that loses).
//!
//! Every access is checked against the layout (the sorted, non-overlapping list of RAM
//! regions) before a byte moves, and fails with [`MemoryError::OutOfRange`] otherwise.
//! Streams move straight between guest memory and files (`WriteVolatile`/`ReadVolatile`,
//! no intermediate copy) or through a small bounded buffer for `dyn Read`/`dyn Write`.

use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use migration_core::memory::{check_range, PAGE_SIZE};
use migration_core::{MemoryError, MemoryRange, MemorySink, MemorySource};
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, BS};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion, ReadVolatile, VolatileSlice, WriteVolatile,
};

use crate::bitmap::DirtyBitmap;

/// Size of the bounce buffer for `dyn Read` / `dyn Write` streams: small enough to
/// stay in cache, large enough to amortise the calls.
const BOUNCE: usize = 256 << 10;

/// Bytes [`GuestRam::read_from_socket`] reads before it hands them on for their
/// checksum: small enough to be still in cache.
pub const SOCKET_PIECE: usize = 256 << 10;

/// Errors of creating guest memory and registering it with KVM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmMemoryError {
    /// The layout is empty, unsorted, overlapping, unaligned or too large.
    #[error("invalid memory layout at [{gpa:#x}, +{length:#x}): {reason}")]
    InvalidLayout {
        /// Start of the offending region.
        gpa: u64,
        /// Its length.
        length: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// `mmap` or `madvise` failed.
    #[error("mapping {length:#x} bytes of guest memory: {source}")]
    Mmap {
        /// Bytes asked for.
        length: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}: {source}")]
    SetMemoryRegion {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot}: {source}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A range check, overlap check or stream error.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl From<KvmMemoryError> for MemoryError {
    fn from(e: KvmMemoryError) -> Self {
        match e {
            KvmMemoryError::Memory(m) => m,
            other => MemoryError::Backend(Box::new(other)),
        }
    }
}

impl From<KvmMemoryError> for migration_core::MigratableError {
    fn from(e: KvmMemoryError) -> Self {
        migration_core::MigratableError::Memory(e.into())
    }
}

/// How fresh guest memory is mapped ([`GuestRam::anonymous_with`]; every region is
/// mapped by [`map_region`]). Memory the VMM maps itself (file or memfd backed)
/// comes in through [`GuestRam::from_mmap`] instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOptions {
    /// `madvise(MADV_HUGEPAGE)`: transparent huge pages. First touch then costs one
    /// fault per 2 MiB instead of per 4 KiB (the fault is most of first-touch cost
    /// under nested KVM). On by default.
    pub huge_pages: bool,
    /// `MAP_POPULATE`: fault every page in at creation. Off by default: creation then
    /// costs as much as touching all of memory.
    pub populate: bool,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            huge_pages: true,
            populate: false,
        }
    }
}

/// Guest RAM: a vm-memory [`GuestMemoryMmap<B>`] plus its layout.
///
/// ```
/// use migration_core::{MemoryRange, MemorySink, MemorySource};
/// use migration_kvm::memory::GuestRam;
///
/// let mem = GuestRam::anonymous(&[MemoryRange::new(0, 1 << 20)])?;
/// mem.write_memory(0x1000, b"hello")?;
/// let mut buf = [0u8; 5];
/// mem.read_memory(0x1000, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// // Outside RAM: a typed error, nothing touched.
/// assert!(mem.write_memory(1 << 20, b"x").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct GuestRam<B: DirtyBitmap = AtomicBitmap> {
    mmap: GuestMemoryMmap<B>,
    layout: Vec<MemoryRange>,
}

/// Checks that `layout` is non-empty, sorted, non-overlapping, page-aligned and
/// addressable on this host.
pub fn check_layout(layout: &[MemoryRange]) -> Result<(), KvmMemoryError> {
    let bad = |r: &MemoryRange, reason| KvmMemoryError::InvalidLayout {
        gpa: r.gpa,
        length: r.length,
        reason,
    };
    if layout.is_empty() {
        return Err(KvmMemoryError::InvalidLayout {
            gpa: 0,
            length: 0,
            reason: "no region",
        });
    }
    let mut prev_end = 0u64;
    for (i, r) in layout.iter().enumerate() {
        if r.length == 0 {
            return Err(bad(r, "empty region"));
        }
        if r.gpa % PAGE_SIZE != 0 || r.length % PAGE_SIZE != 0 {
            return Err(bad(r, "not page-aligned"));
        }
        let end = r.end().ok_or_else(|| bad(r, "end overflows"))?;
        if usize::try_from(r.length).is_err() {
            return Err(bad(r, "larger than the address space"));
        }
        if i > 0 && r.gpa < prev_end {
            return Err(bad(r, "overlaps or precedes the previous region"));
        }
        prev_end = end;
    }
    Ok(())
}

/// Checks a set of extents (each `(gpa, length)`, in any order) against a layout:
/// every extent inside one region and no two overlapping. Call it before writing a
/// byte of any of them.
pub fn check_extents(
    layout: &[MemoryRange],
    extents: impl IntoIterator<Item = MemoryRange>,
) -> Result<(), MemoryError> {
    let mut sorted: Vec<MemoryRange> = Vec::new();
    for e in extents {
        check_range(layout, e)?;
        sorted.push(e);
    }
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        // end() cannot overflow: check_range accepted both.
        let end = w[0].gpa + w[0].length;
        if w[1].gpa < end {
            return Err(MemoryError::Overlap { gpa: w[1].gpa });
        }
    }
    Ok(())
}

pub(crate) fn mmap_error(length: u64, source: io::Error) -> KvmMemoryError {
    KvmMemoryError::Mmap { length, source }
}

/// Maps `length` bytes of fresh zeroed guest memory, as `options` say: anonymous
/// private memory with a bitmap `B`, transparent huge pages if asked.
pub fn map_region<B: NewBitmap>(
    length: u64,
    options: MemoryOptions,
) -> Result<MmapRegion<B>, KvmMemoryError> {
    let size = usize::try_from(length).map_err(|_| KvmMemoryError::InvalidLayout {
        gpa: 0,
        length,
        reason: "larger than the address space",
    })?;
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    if options.populate {
        flags |= libc::MAP_POPULATE;
    }
    let region = MmapRegionBuilder::new_with_bitmap(size, B::with_len(size))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| mmap_error(length, io::Error::other(e)))?;
    if options.huge_pages {
        // SAFETY: the range is exactly the mapping just created and owned by `region`;
        // MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
        let ret = unsafe { libc::madvise(region.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            // THP compiled out or disabled: a hint only, the memory works without it.
            let _ = io::Error::last_os_error();
        }
    }
    Ok(region)
}

impl GuestRam {
    /// Fresh zeroed anonymous memory for `layout`, with [`MemoryOptions::default`]
    /// and an [`AtomicBitmap`] ([`fresh`](Self::fresh) for another bitmap).
    pub fn anonymous(layout: &[MemoryRange]) -> Result<Self, KvmMemoryError> {
        Self::fresh(layout, MemoryOptions::default())
    }

    /// Fresh zeroed anonymous memory for `layout`, with an [`AtomicBitmap`].
    pub fn anonymous_with(
        layout: &[MemoryRange],
        options: MemoryOptions,
    ) -> Result<Self, KvmMemoryError> {
        Self::fresh(layout, options)
    }
}

impl<B: DirtyBitmap + NewBitmap> GuestRam<B> {
    /// Fresh zeroed memory for `layout`, every region mapped by [`map_region`] as
    /// `options` say, with bitmap `B` (`GuestRam::<()>::fresh(…)`: no tracking).
    pub fn fresh(layout: &[MemoryRange], options: MemoryOptions) -> Result<Self, KvmMemoryError> {
        check_layout(layout)?;
        let regions = layout
            .iter()
            .map(|r| {
                let region = map_region(r.length, options)?;
                GuestRegionMmap::new(region, GuestAddress(r.gpa)).ok_or(
                    KvmMemoryError::InvalidLayout {
                        gpa: r.gpa,
                        length: r.length,
                        reason: "end overflows",
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_regions(regions)
    }
}

impl<B: DirtyBitmap> GuestRam<B> {
    /// Wraps regions already mapped (sorted by address), anonymous or file-backed.
    pub fn from_regions(regions: Vec<GuestRegionMmap<B>>) -> Result<Self, KvmMemoryError> {
        let layout: Vec<MemoryRange> = regions
            .iter()
            .map(|r| MemoryRange::new(r.start_addr().0, r.len()))
            .collect();
        check_layout(&layout)?;
        let mmap =
            GuestMemoryMmap::from_regions(regions).map_err(|_| KvmMemoryError::InvalidLayout {
                gpa: 0,
                length: 0,
                reason: "regions rejected by vm-memory",
            })?;
        Ok(Self { mmap, layout })
    }

    /// Wraps a VMM's own vm-memory guest memory: anonymous or file-backed (memfd)
    /// regions, any bitmap. Its regions must be page-aligned. The memory is shared,
    /// not copied: clones of `mmap` see the same pages.
    pub fn from_mmap(mmap: GuestMemoryMmap<B>) -> Result<Self, KvmMemoryError> {
        let layout: Vec<MemoryRange> = mmap
            .iter()
            .map(|r| MemoryRange::new(r.start_addr().0, r.len()))
            .collect();
        check_layout(&layout)?;
        Ok(Self { mmap, layout })
    }

    /// The vm-memory guest memory, for devices and loaders.
    pub fn mmap(&self) -> &GuestMemoryMmap<B> {
        &self.mmap
    }

    /// The RAM regions, sorted, non-overlapping, page-aligned.
    pub fn layout(&self) -> &[MemoryRange] {
        &self.layout
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.layout.iter().map(|r| r.length).sum()
    }

    /// A volatile slice over `range`, which must lie inside one region.
    pub fn slice(&self, range: MemoryRange) -> Result<VolatileSlice<'_, BS<'_, B>>, MemoryError> {
        let (region, offset) = self.locate(range)?;
        let len = usize::try_from(range.length).map_err(|_| out_of_range(range))?;
        region
            .get_slice(MemoryRegionAddress(offset), len)
            .map_err(|e| MemoryError::Backend(Box::new(e)))
    }

    /// The region holding `range` and the offset of `range` in it.
    fn locate(&self, range: MemoryRange) -> Result<(&GuestRegionMmap<B>, u64), MemoryError> {
        check_range(&self.layout, range)?;
        let region = self
            .mmap
            .find_region(GuestAddress(range.gpa))
            .ok_or_else(|| out_of_range(range))?;
        Ok((region, range.gpa - region.start_addr().0))
    }

    /// Marks `len` bytes at `gpa` (inside one region) dirty in vm-memory's bitmap, for
    /// writes that bypass a `VolatileSlice`.
    fn mark_dirty(&self, gpa: u64, len: usize) {
        if let Some(region) = self.mmap.find_region(GuestAddress(gpa)) {
            region
                .bitmap()
                .mark_dirty((gpa - region.start_addr().0) as usize, len);
        }
    }

    /// Host address of `range` (checked), for syscalls that take a pointer.
    pub(crate) fn host_ptr(&self, range: MemoryRange) -> Result<*mut u8, MemoryError> {
        let (region, offset) = self.locate(range)?;
        region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|e| MemoryError::Backend(Box::new(e)))
    }

    /// Writes `length` bytes at `gpa` to `out` straight from guest memory (one
    /// `write(2)` per call, no copy in user space). The range is checked first.
    pub fn write_volatile_to<W: WriteVolatile>(
        &self,
        gpa: u64,
        length: u64,
        out: &mut W,
    ) -> Result<(), MemoryError> {
        let slice = self.slice(MemoryRange::new(gpa, length))?;
        out.write_all_volatile(&slice).map_err(volatile_error)
    }

    /// Reads exactly `length` bytes from `input` straight into guest memory at `gpa`.
    /// The range is checked before any byte is read.
    pub fn read_volatile_from<R: ReadVolatile>(
        &self,
        gpa: u64,
        length: u64,
        input: &mut R,
    ) -> Result<(), MemoryError> {
        let mut slice = self.slice(MemoryRange::new(gpa, length))?;
        input
            .read_exact_volatile(&mut slice)
            .map_err(volatile_error)
    }

    /// Reads exactly `length` bytes from the socket `fd` straight into guest memory at
    /// `gpa` (vm-memory's `ReadVolatile` for a `BorrowedFd`: `read(2)` into the
    /// mapping, which also marks the dirty bitmap), [`SOCKET_PIECE`] at a time, and
    /// passes each piece to `landed` once it is in guest memory (for its checksum,
    /// while it is still in cache). The range is checked before any byte is read.
    ///
    /// # Safety
    /// Nothing else may write `[gpa, gpa + length)` during the call: no vCPU of a VM
    /// using this memory runs, and no other thread writes it. `landed` sees each piece
    /// as a `&[u8]` over guest memory.
    pub unsafe fn read_from_socket(
        &self,
        gpa: u64,
        length: u64,
        fd: BorrowedFd<'_>,
        landed: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), MemoryError> {
        let slice = self.slice(MemoryRange::new(gpa, length))?;
        let mut socket = fd;
        let mut done = 0usize;
        while done < slice.len() {
            let n = (slice.len() - done).min(SOCKET_PIECE);
            let mut piece = slice
                .subslice(done, n)
                .map_err(|e| MemoryError::Backend(Box::new(e)))?;
            socket
                .read_exact_volatile(&mut piece)
                .map_err(volatile_error)?;
            let guard = piece.ptr_guard();
            // SAFETY: `piece` is `n` bytes of mapped guest memory (a checked
            // subslice), kept mapped by `self` for this borrow; the caller guarantees
            // nothing writes it during this call, so a shared view is sound.
            let view = unsafe { std::slice::from_raw_parts(guard.as_ptr(), n) };
            landed(view)?;
            done += n;
        }
        Ok(())
    }

    /// Whether `range` is all zeros (volatile reads; stops at the first non-zero
    /// word). `range.gpa` and `range.length` must be multiples of [`PAGE_SIZE`]:
    /// otherwise, as when the range is not inside one region,
    /// [`MemoryError::OutOfRange`].
    pub fn is_zero(&self, range: MemoryRange) -> Result<bool, MemoryError> {
        if range.gpa % PAGE_SIZE != 0 || range.length % PAGE_SIZE != 0 {
            return Err(out_of_range(range));
        }
        let ptr = self.host_ptr(range)?;
        let len = usize::try_from(range.length).map_err(|_| out_of_range(range))?;
        // SAFETY: `host_ptr` checked that the whole range is mapped guest memory, which
        // stays mapped while `self` is borrowed. The pointer is page aligned, hence
        // 8-byte aligned: every region starts at a page-aligned gpa (`check_layout`)
        // and is mapped at a page-aligned host address (mmap), and `range.gpa` was
        // checked page aligned above, so its offset into the region is whole pages.
        // `len` is a multiple of the page size, hence of 8.
        Ok(unsafe { is_zero_raw(ptr, len) })
    }

    /// Registers every region as a KVM memory slot, numbered from `first_slot`.
    ///
    /// The returned [`KvmSlots`] keeps the regions mapped. Call
    /// [`KvmSlots::unregister`] before dropping it while the VM lives; if it is
    /// dropped while still registered, the mappings are leaked (never unmapped), so
    /// the guest can never reach freed host memory.
    pub fn register(
        &self,
        vm: &VmFd,
        first_slot: u32,
        log_dirty: bool,
    ) -> Result<KvmSlots, KvmMemoryError> {
        let mut slots = self.describe_slots(first_slot, log_dirty)?;
        slots.registered = true;
        for s in &slots.slots {
            // SAFETY: the host range is a live mapping of exactly `size` bytes, kept
            // alive by `slots.keep` until unregistered (or forever if leaked).
            unsafe { set_slot(vm, s, log_dirty) }?;
        }
        Ok(slots)
    }

    /// Describes the KVM slots a VMM registered for these regions itself: region
    /// `i` is slot `first_slot + i`, with `KVM_MEM_LOG_DIRTY_PAGES` set as
    /// `log_dirty` says. Nothing is registered; the dirty-log helpers
    /// ([`crate::dirty`]) then work on the VMM's slots. The [`KvmSlots`] keeps the
    /// regions mapped while it lives; the registration stays the VMM's (dropping it
    /// removes nothing and leaks nothing).
    pub fn describe_slots(
        &self,
        first_slot: u32,
        log_dirty: bool,
    ) -> Result<KvmSlots, KvmMemoryError> {
        let mut slots = KvmSlots {
            slots: Vec::with_capacity(self.layout.len()),
            keep: Vec::with_capacity(self.layout.len()),
            log_dirty,
            registered: false,
        };
        for (i, region) in self.mmap.iter().enumerate() {
            let slot = u32::try_from(i)
                .ok()
                .and_then(|i| first_slot.checked_add(i))
                .ok_or(KvmMemoryError::InvalidLayout {
                    gpa: region.start_addr().0,
                    length: region.len(),
                    reason: "slot number overflows",
                })?;
            slots.slots.push(MemorySlot {
                slot,
                gpa: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
            });
            slots.keep.push(region.get_mmap());
        }
        Ok(slots)
    }
}

/// # Safety
/// `slot.host_addr .. + size` must stay mapped while KVM has the slot.
unsafe fn set_slot(vm: &VmFd, slot: &MemorySlot, log_dirty: bool) -> Result<(), KvmMemoryError> {
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: slot.gpa,
        memory_size: slot.size,
        userspace_addr: slot.host_addr,
    };
    // SAFETY: guaranteed by the caller (size 0 deletes the slot and needs nothing).
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| KvmMemoryError::SetMemoryRegion {
        slot: slot.slot,
        source,
    })
}

/// Whether `len` bytes at `ptr` are zero.
///
/// # Safety
/// `ptr .. ptr + len` must be mapped readable memory, 8-byte aligned, `len % 8 == 0`.
pub(crate) unsafe fn is_zero_raw(ptr: *const u8, len: usize) -> bool {
    let words = ptr.cast::<u64>();
    let n = len / 8;
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n words are inside the range (caller's contract). Volatile:
        // the guest may write concurrently; we only need some value it held.
        let acc = unsafe {
            words.add(i).read_volatile()
                | words.add(i + 1).read_volatile()
                | words.add(i + 2).read_volatile()
                | words.add(i + 3).read_volatile()
                | words.add(i + 4).read_volatile()
                | words.add(i + 5).read_volatile()
                | words.add(i + 6).read_volatile()
                | words.add(i + 7).read_volatile()
        };
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n, inside the range.
        if unsafe { words.add(i).read_volatile() } != 0 {
            return false;
        }
        i += 1;
    }
    true
}

fn out_of_range(range: MemoryRange) -> MemoryError {
    MemoryError::OutOfRange {
        gpa: range.gpa,
        length: range.length,
    }
}

fn volatile_error(e: vm_memory::VolatileMemoryError) -> MemoryError {
    match e {
        vm_memory::VolatileMemoryError::IOError(io) => MemoryError::Io(io),
        other => MemoryError::Backend(Box::new(other)),
    }
}

impl<B: DirtyBitmap> MemorySource for GuestRam<B> {
    fn regions(&self) -> Vec<MemoryRange> {
        self.layout.clone()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let slice = self.slice(MemoryRange::new(gpa, buf.len() as u64))?;
        slice.copy_to(buf);
        Ok(())
    }

    fn write_memory_to(
        &self,
        gpa: u64,
        length: u64,
        out: &mut dyn Write,
    ) -> Result<(), MemoryError> {
        let slice = self.slice(MemoryRange::new(gpa, length))?;
        let mut buf = vec![0u8; slice.len().min(BOUNCE)];
        let mut done = 0usize;
        while done < slice.len() {
            let n = (slice.len() - done).min(buf.len());
            let piece = slice
                .subslice(done, n)
                .map_err(|e| MemoryError::Backend(Box::new(e)))?;
            piece.copy_to(&mut buf[..n]);
            out.write_all(&buf[..n])?;
            done += n;
        }
        Ok(())
    }

    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        Some(self)
    }
}

impl<B: DirtyBitmap> MemorySink for GuestRam<B> {
    fn regions(&self) -> Vec<MemoryRange> {
        self.layout.clone()
    }

    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let slice = self.slice(MemoryRange::new(gpa, data.len() as u64))?;
        slice.copy_from(data);
        Ok(())
    }

    /// Reads through a bounce buffer of at most `BOUNCE` bytes, then copies into
    /// guest memory with [`VolatileSlice::copy_from`] (which also marks vm-memory's
    /// dirty bitmap). A `&mut [u8]` straight over guest memory would be unsound
    /// here: this method takes `&self` on `Sync` memory, so another thread (or the
    /// guest) may access the same bytes while the reference lives.
    fn read_memory_from(
        &self,
        gpa: u64,
        length: u64,
        input: &mut dyn Read,
    ) -> Result<(), MemoryError> {
        let slice = self.slice(MemoryRange::new(gpa, length))?;
        thread_local! {
            // One bounce buffer per thread, reused across calls (a migration calls this
            // once per 2 MiB frame).
            static BOUNCE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BOUNCE_BUF.with_borrow_mut(|buf| {
            buf.resize(BOUNCE, 0);
            let mut done = 0usize;
            while done < slice.len() {
                let n = (slice.len() - done).min(BOUNCE);
                input.read_exact(&mut buf[..n])?;
                slice
                    .subslice(done, n)
                    .map_err(|e| MemoryError::Backend(Box::new(e)))?
                    .copy_from(&buf[..n]);
                done += n;
            }
            Ok(())
        })
    }

    fn zero_memory(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        let range = MemoryRange::new(gpa, length);
        let ptr = self.host_ptr(range)?;
        let len = usize::try_from(length).map_err(|_| out_of_range(range))?;
        // SAFETY: `host_ptr` checked the whole range is guest memory owned by `self`.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        self.mark_dirty(gpa, len);
        Ok(())
    }

    fn as_sync_sink(&self) -> Option<&(dyn MemorySink + Sync)> {
        Some(self)
    }
}

/// One KVM memory slot: a guest region and where it lives in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
}

/// Keeps a region's mapping alive, whatever its bitmap type.
type Keep = Arc<dyn std::any::Any + Send + Sync>;

/// The KVM memory slots of a VM's guest RAM: registered by [`GuestRam::register`],
/// or registered by the VMM and described with [`GuestRam::describe_slots`] or
/// [`KvmSlots::from_raw`]. Turns dirty logging on and off.
#[derive(Debug)]
pub struct KvmSlots {
    slots: Vec<MemorySlot>,
    /// The mappings behind the slots (empty for [`KvmSlots::from_raw`]).
    keep: Vec<Keep>,
    log_dirty: bool,
    /// Registered by this value ([`GuestRam::register`]), and not yet unregistered.
    registered: bool,
}

impl KvmSlots {
    /// Describes slots a VMM registered itself, from their raw numbers and
    /// addresses, with `KVM_MEM_LOG_DIRTY_PAGES` set as `log_dirty` says.
    ///
    /// # Safety
    /// Each slot's `host_addr .. host_addr + size` must stay mapped while the
    /// returned value lives: [`set_dirty_logging`](Self::set_dirty_logging) hands
    /// those addresses to KVM again. Prefer [`GuestRam::describe_slots`], which keeps
    /// the mappings alive itself.
    pub unsafe fn from_raw(slots: Vec<MemorySlot>, log_dirty: bool) -> Self {
        Self {
            slots,
            keep: Vec::new(),
            log_dirty,
            registered: false,
        }
    }

    /// The slots, sorted by address.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set on the slots.
    pub fn dirty_logging(&self) -> bool {
        self.log_dirty
    }

    /// Sets or clears `KVM_MEM_LOG_DIRTY_PAGES` on every slot. Setting it starts a
    /// fresh (empty) log.
    pub fn set_dirty_logging(&mut self, vm: &VmFd, enable: bool) -> Result<(), KvmMemoryError> {
        for s in &self.slots {
            // SAFETY: the slot's memory is kept mapped by `self.keep`, or by the
            // caller of `from_raw` (its contract).
            unsafe { set_slot(vm, s, enable) }?;
        }
        self.log_dirty = enable;
        Ok(())
    }

    /// Removes the slots from the VM and releases the memory mappings.
    pub fn unregister(mut self, vm: &VmFd) -> Result<(), KvmMemoryError> {
        for s in &self.slots {
            let gone = MemorySlot { size: 0, ..*s };
            // SAFETY: size 0 deletes the slot; KVM keeps no reference to the memory.
            unsafe { set_slot(vm, &gone, false) }?;
        }
        self.registered = false;
        Ok(())
    }
}

impl Drop for KvmSlots {
    fn drop(&mut self) {
        if self.registered {
            // Still in a VM that may run: never unmap memory KVM can reach.
            for r in self.keep.drain(..) {
                std::mem::forget(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestRam {
        GuestRam::anonymous(&[
            MemoryRange::new(0, 0x10_0000),
            MemoryRange::new(0x20_0000, 0x10_0000),
        ])
        .unwrap()
    }

    #[test]
    fn layout_errors_are_typed() {
        for bad in [
            vec![],
            vec![MemoryRange::new(0, 0)],
            vec![MemoryRange::new(0x800, 0x1000)],
            vec![
                MemoryRange::new(0, 0x2000),
                MemoryRange::new(0x1000, 0x1000),
            ],
            vec![MemoryRange::new(!0xfff, 0x2000)],
        ] {
            assert!(
                matches!(
                    GuestRam::anonymous(&bad),
                    Err(KvmMemoryError::InvalidLayout { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn accesses_are_checked_against_the_layout() {
        let m = mem();
        assert!(matches!(
            m.write_memory(0x10_0000, &[1]),
            Err(MemoryError::OutOfRange { .. })
        ));
        // Straddles the end of region 0.
        assert!(matches!(
            m.write_memory(0x0f_ffff, &[1, 2]),
            Err(MemoryError::OutOfRange { .. })
        ));
        let mut input: &[u8] = &[7u8; 16];
        assert!(m.read_memory_from(0x2f_fff8, 16, &mut input).is_err());
        // Nothing was consumed from the stream.
        assert_eq!(input.len(), 16);
        assert!(m.zero_memory(u64::MAX - 10, 20).is_err());
    }

    #[test]
    fn every_write_path_marks_the_vmm_dirty_bitmap() {
        let m = mem();
        crate::dirty::clear_vmm_dirty(&m);
        m.write_memory(0x20_0000, &[1]).unwrap();
        m.read_memory_from(0x20_3000, 0x2000, &mut &[2u8; 0x2000][..])
            .unwrap();
        m.zero_memory(0x20_8000, 0x1000).unwrap();
        let dirty = crate::dirty::vmm_dirty_log(&m).ranges().to_vec();
        assert_eq!(
            dirty,
            vec![
                MemoryRange::new(0x20_0000, 0x1000),
                MemoryRange::new(0x20_3000, 0x2000),
                MemoryRange::new(0x20_8000, 0x1000),
            ]
        );
    }

    #[test]
    fn streams_round_trip_through_dyn_and_volatile_io() {
        let m = mem();
        let data: Vec<u8> = (0..0x6_0000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        m.read_memory_from(0x20_1000, data.len() as u64, &mut &data[..])
            .unwrap();
        let mut out = Vec::new();
        m.write_memory_to(0x20_1000, data.len() as u64, &mut out)
            .unwrap();
        assert_eq!(out, data);

        let mut file = tempfile::tempfile().unwrap();
        m.write_volatile_to(0x20_1000, data.len() as u64, &mut file)
            .unwrap();
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(0)).unwrap();
        let other = mem();
        other
            .read_volatile_from(0x1000, data.len() as u64, &mut file)
            .unwrap();
        let mut back = vec![0u8; data.len()];
        other.read_memory(0x1000, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zero_detection_and_zeroing() {
        let m = mem();
        let page = MemoryRange::new(0x3000, 0x1000);
        assert!(m.is_zero(page).unwrap());
        m.write_memory(0x3ff8, &[0, 0, 0, 0, 0, 0, 0, 1]).unwrap();
        assert!(!m.is_zero(page).unwrap());
        m.zero_memory(0x3000, 0x1000).unwrap();
        assert!(m.is_zero(page).unwrap());
    }

    #[test]
    fn is_zero_rejects_ranges_that_are_not_whole_pages() {
        let m = mem();
        for range in [
            MemoryRange::new(0x3001, 0x1000),
            MemoryRange::new(0x3004, 0x0ffc),
            MemoryRange::new(0x3000, 0x0ff8),
            MemoryRange::new(0x3000, 7),
        ] {
            assert!(
                matches!(m.is_zero(range), Err(MemoryError::OutOfRange { gpa, length })
                    if gpa == range.gpa && length == range.length),
                "{range:x?}"
            );
        }
        assert!(m.is_zero(MemoryRange::new(0x3000, 0x2000)).unwrap());
    }

    #[test]
    fn extents_outside_ram_or_overlapping_are_rejected() {
        let layout = mem().layout().to_vec();
        assert!(check_extents(&layout, [MemoryRange::new(0, 0x1000)]).is_ok());
        assert!(matches!(
            check_extents(&layout, [MemoryRange::new(0x10_0000, 0x1000)]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_extents(
                &layout,
                [
                    MemoryRange::new(0x4000, 0x2000),
                    MemoryRange::new(0x1000, 0x4000)
                ]
            ),
            Err(MemoryError::Overlap { gpa: 0x4000 })
        ));
    }
}
