//! Dirty page tracking: which guest pages changed since the last look.
//!
//! Two writers change guest memory and each has its own log:
//! - the guest (vCPUs): KVM's dirty log, on while the slots carry
//!   `KVM_MEM_LOG_DIRTY_PAGES` ([`KvmSlots::set_dirty_logging`]), read and cleared
//!   with `KVM_GET_DIRTY_LOG`;
//! - the VMM and its devices, writing through vm-memory: the bitmap of each region of
//!   a [`GuestRam`], if it has one ([`DirtyBitmap`]; with `()` these writes are not
//!   seen).
//!
//! The dirty set is their OR, per slot, coalesced into a [`MemoryRangeTable`].
//! Reading clears both logs. The slots may be this crate's ([`GuestRam::register`])
//! or the VMM's own ([`GuestRam::describe_slots`]).

use kvm_ioctls::VmFd;
use migration_core::memory::PAGE_SIZE;
use migration_core::MemoryRangeTable;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::bitmap::DirtyBitmap;
use crate::memory::{GuestRam, KvmMemoryError, KvmSlots};

/// Starts dirty tracking: clears the VMM bitmaps and turns KVM's log on for every
/// slot (a fresh, empty log).
pub fn start_dirty_log<B: DirtyBitmap>(
    vm: &VmFd,
    slots: &mut KvmSlots,
    memory: &GuestRam<B>,
) -> Result<(), KvmMemoryError> {
    clear_vmm_dirty(memory);
    slots.set_dirty_logging(vm, true)
}

/// Stops dirty tracking on every slot.
pub fn stop_dirty_log(vm: &VmFd, slots: &mut KvmSlots) -> Result<(), KvmMemoryError> {
    slots.set_dirty_logging(vm, false)
}

/// The pages dirtied since tracking started or since the previous call: KVM's log
/// (if logging is on) OR the VMM bitmaps (if `B` tracks). Clears both.
///
/// `slots` must describe `memory`'s regions (same addresses).
pub fn dirty_log<B: DirtyBitmap>(
    vm: &VmFd,
    slots: &KvmSlots,
    memory: &GuestRam<B>,
) -> Result<MemoryRangeTable, KvmMemoryError> {
    let mut table = MemoryRangeTable::new();
    for s in slots.slots() {
        let size = usize::try_from(s.size).map_err(|_| KvmMemoryError::InvalidLayout {
            gpa: s.gpa,
            length: s.size,
            reason: "larger than the address space",
        })?;
        let mut bitmap = if slots.dirty_logging() {
            vm.get_dirty_log(s.slot, size)
                .map_err(|source| KvmMemoryError::DirtyLog {
                    slot: s.slot,
                    source,
                })?
        } else {
            vec![0u64; size.div_ceil(PAGE_SIZE as usize).div_ceil(64)]
        };
        if let Some(region) = memory.mmap().find_region(GuestAddress(s.gpa)) {
            if let Some(vmm) = vmm_bitmap(region).take_dirty() {
                or_into(&mut bitmap, &vmm);
            }
        }
        table.append_bitmap(&bitmap, s.gpa, PAGE_SIZE);
    }
    Ok(table)
}

/// The pages the VMM wrote through vm-memory since the previous call (clears the
/// bitmaps; empty if `B` does not track). Without KVM: what a snapshot of a stopped
/// VM modified by devices needs.
pub fn vmm_dirty_log<B: DirtyBitmap>(memory: &GuestRam<B>) -> MemoryRangeTable {
    let mut table = MemoryRangeTable::new();
    for region in memory.mmap().iter() {
        if let Some(bitmap) = vmm_bitmap(region).take_dirty() {
            table.append_bitmap(&bitmap, region.start_addr().0, PAGE_SIZE);
        }
    }
    table
}

/// Clears the VMM dirty bitmaps of every region.
pub fn clear_vmm_dirty<B: DirtyBitmap>(memory: &GuestRam<B>) {
    for region in memory.mmap().iter() {
        vmm_bitmap(region).clear_dirty();
    }
}

/// The VMM dirty bitmap of one region (bit `i` = page `i` of the region).
pub fn vmm_bitmap<B: DirtyBitmap>(region: &GuestRegionMmap<B>) -> &B {
    let mapping: &MmapRegion<B> = region;
    mapping.bitmap()
}

/// `dst |= src` word by word (`src` may be shorter or longer).
pub fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::{MemoryRange, MemorySink};

    #[test]
    fn vmm_writes_through_vm_memory_are_tracked_and_cleared() {
        let m = GuestRam::anonymous(&[
            MemoryRange::new(0, 0x10_0000),
            MemoryRange::new(0x100_0000, 0x10_0000),
        ])
        .unwrap();
        clear_vmm_dirty(&m);
        m.write_memory(0x1ff0, &[1; 0x20]).unwrap(); // pages 1 and 2
        m.write_memory(0x100_5000, &[1; 1]).unwrap();
        m.zero_memory(0x8000, 0x2000).unwrap();
        let t = vmm_dirty_log(&m);
        assert_eq!(
            t.ranges(),
            &[
                MemoryRange::new(0x1000, 0x2000),
                MemoryRange::new(0x8000, 0x2000),
                MemoryRange::new(0x100_5000, 0x1000)
            ]
        );
        assert!(vmm_dirty_log(&m).is_empty());
    }

    #[test]
    fn or_into_merges_words() {
        let mut a = vec![0b0101, 0];
        or_into(&mut a, &[0b0011, 1 << 63, 7]);
        assert_eq!(a, vec![0b0111, 1 << 63]);
    }
}
