//! A VMM that builds its VM itself (kvm-ioctls, vm-memory, a split irqchip as Cloud
//! Hypervisor has) snapshots it to a file and restores it into a second VM with
//! migration-kvm's pieces, lending its fds: no `KvmVm`.
//! `cargo run --release -p migration-kvm --example own_vm`
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration_core::{container::WriteOptions, file, Snapshot};
use migration_kvm::memory::GuestRam;
use migration_kvm::{ClockRestore, DeviceLayout, HostCaps, KvmVcpu, KvmVmDevices};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const LAYOUT: DeviceLayout = DeviceLayout::SPLIT;

/// The VMM's VM; `mem` first, so it is dropped after the VM that maps it.
fn build(kvm: &Kvm) -> anyhow::Result<(GuestMemoryMmap, VmFd, VcpuFd)> {
    let vm = kvm.create_vm()?;
    LAYOUT.create(&vm)?; // KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP), before any vCPU
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `mem` is returned with the VM and dropped after it.
        unsafe { vm.set_user_memory_region(region)? };
    }
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    Ok((mem, vm, vcpu))
}

fn main() -> anyhow::Result<()> {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("skipped: /dev/kvm not usable");
        return Ok(());
    };
    let (mem, vm, vcpu) = build(&kvm)?;
    mem.write_slice(b"state survives", GuestAddress(0x1000))?;
    let mut regs = vcpu.get_regs()?;
    regs.rax = 42;
    vcpu.set_regs(&regs)?;

    // Save: VM devices, then the vCPU (paused: it never ran), then RAM, to a file.
    let caps = HostCaps::probe(&kvm, &vm, &LAYOUT)?;
    let mut tree = Snapshot::new("vm");
    tree.snapshot_child(&mut KvmVmDevices::new(&vm, LAYOUT, ClockRestore::Exact))?;
    tree.snapshot_child(&mut KvmVcpu::new(0, &vcpu, caps))?;
    let codecs = migration_serde::registry();
    tree.encode(codecs.preferred().expect("postcard"))?;
    let path = std::env::temp_dir().join(format!("own_vm-{}.snap", std::process::id()));
    let ram = GuestRam::from_mmap(mem.clone())?;
    file::write_snapshot_file(&path, &tree, Some(&ram), &WriteOptions::default())?;

    // Restore into a second VM the VMM built the same way: devices before vCPUs.
    let (mem2, vm2, vcpu2) = build(&kvm)?;
    let ram2 = GuestRam::from_mmap(mem2.clone())?;
    let tree = file::read_snapshot_file(&path, &codecs, Some(&ram2))?;
    std::fs::remove_file(&path)?;
    tree.restore_child(&mut KvmVmDevices::new(&vm2, LAYOUT, ClockRestore::Exact))?;
    let caps2 = HostCaps::probe(&kvm, &vm2, &LAYOUT)?;
    tree.restore_child(&mut KvmVcpu::new(0, &vcpu2, caps2))?;

    let mut text = [0u8; 14];
    mem2.read_slice(&mut text, GuestAddress(0x1000))?;
    assert_eq!((vcpu2.get_regs()?.rax, &text), (42, b"state survives"));
    println!("restored a {LAYOUT} VM: rax = 42, memory intact; the VMM kept its fds");
    Ok(())
}
