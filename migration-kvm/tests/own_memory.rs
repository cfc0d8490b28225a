//! A VMM's own guest memory and its own KVM slots, with this crate's dirty tracking:
//! memfd-backed `GuestMemoryMmap<()>` (no VMM-side tracking: its own writes are not
//! seen, as documented) and anonymous `GuestMemoryMmap<AtomicBitmap>` (they are).

use std::fs::File;

use anyhow::{ensure, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_core::{MemoryRange, MemorySource};
use migration_kvm::bitmap::DirtyBitmap;
use migration_kvm::dirty;
use migration_kvm::memory::GuestRam;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

const RAM: usize = 1 << 20;
const CODE: u64 = 0x1000;
/// Real mode: two byte writes, then `out 0x10` (the end marker) and a spin.
const GUEST: &[u8] = &[
    0xc6, 0x06, 0x00, 0x30, 0x01, // mov byte [0x3000], 1
    0xc6, 0x06, 0x00, 0x50, 0x01, // mov byte [0x5000], 1
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xfe, // jmp $
];

/// The VMM's side: registers `mem`'s regions as slots 0.. itself, dirty logging on.
fn own_vm<B: DirtyBitmap>(kvm: &Kvm, mem: &GuestMemoryMmap<B>) -> Result<(VmFd, VcpuFd)> {
    let vm = kvm.create_vm()?;
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: the mapping is `mem`'s, which the test keeps until the VM is gone.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            })?
        };
    }
    let vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    Ok((vm, vcpu))
}

fn run_to_marker(vcpu: &mut VcpuFd) -> Result<()> {
    loop {
        match vcpu.run()? {
            VcpuExit::IoOut(0x10, _) => return Ok(()),
            VcpuExit::IoOut(..) => {}
            other => anyhow::bail!("unexpected exit {other:?}"),
        }
    }
}

/// Runs the guest on memory the VMM built and registered, then reads the dirty set
/// through this crate after a VMM write at 0x7000.
fn dirty_pages_of<B: DirtyBitmap>(mem: GuestMemoryMmap<B>) -> Result<Vec<MemoryRange>> {
    let kvm = Kvm::new()?;
    mem.write_slice(GUEST, GuestAddress(CODE))?;
    let (vm, mut vcpu) = own_vm(&kvm, &mem)?;
    let ram = GuestRam::from_mmap(mem.clone())?;
    let mut slots = ram.describe_slots(0, true)?;
    dirty::start_dirty_log(&vm, &mut slots, &ram)?;
    run_to_marker(&mut vcpu)?;
    // A device model writing guest memory through vm-memory.
    mem.write_slice(&[9], GuestAddress(0x7000))?;
    let table = dirty::dirty_log(&vm, &slots, &ram)?;
    // The guest's writes are in the memory this crate reads (shared, not copied).
    let mut b = [0u8; 1];
    ram.read_memory(0x5000, &mut b)?;
    ensure!(b == [1], "GuestRam sees the guest's write");
    // Dropping the description leaves the VMM's slots alone.
    drop(slots);
    ensure!(vm.get_dirty_log(0, RAM).is_ok(), "slot 0 still registered");
    Ok(table.ranges().to_vec())
}

fn page(gpa: u64) -> MemoryRange {
    MemoryRange::new(gpa, 0x1000)
}

#[test]
fn memfd_memory_without_a_bitmap_tracks_guest_writes_only() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let fd = rustix::fs::memfd_create("guest-ram", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(RAM as u64)?;
    let region =
        GuestRegionMmap::<()>::from_range(GuestAddress(0), RAM, Some(FileOffset::new(file, 0)))
            .context("map the memfd")?;
    let mem = GuestMemoryMmap::from_regions(vec![region])?;
    // The VMM's write at 0x7000 is not seen: `()` tracks nothing (bitmap.rs).
    ensure!(!<() as DirtyBitmap>::TRACKS);
    let dirty = dirty_pages_of(mem)?;
    ensure!(dirty == [page(0x3000), page(0x5000)], "{dirty:x?}");
    Ok(())
}

#[test]
fn anonymous_memory_with_an_atomic_bitmap_tracks_vmm_writes_too() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), RAM)])?;
    let dirty = dirty_pages_of(mem)?;
    ensure!(
        dirty == [page(0x3000), page(0x5000), page(0x7000)],
        "{dirty:x?}"
    );
    Ok(())
}
