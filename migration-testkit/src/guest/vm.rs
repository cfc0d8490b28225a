//! A complete single-vCPU test VM: irqchip, PIT, RAM at GPA 0, one vCPU.

use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::bitmap::NewBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::error::GuestError;
use super::loader::load_with_arg;
use super::monitor::{PortMonitor, Verdict};
use super::run::run_until;

/// How to build a [`TestVm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM size in bytes (one region at GPA 0, memory slot 0).
    pub ram_size: usize,
    /// Register the slot with `KVM_MEM_LOG_DIRTY_PAGES` (for live migration tests).
    pub dirty_log: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            ram_size: 64 << 20,
            dirty_log: false,
        }
    }
}

/// A single-vCPU KVM VM for the test guests.
///
/// Built in the order KVM needs: `KVM_CREATE_VM`, `KVM_CREATE_IRQCHIP`,
/// `KVM_CREATE_PIT2` (default config), RAM registered as slot 0, then
/// `KVM_CREATE_VCPU(0)`. Nothing is loaded until [`boot`](Self::boot), so the
/// same constructor serves as a restore target.
///
/// `B` is the vm-memory dirty bitmap of the RAM (`()` for none,
/// `vm_memory::bitmap::AtomicBitmap` to track writes made by the VMM).
#[derive(Debug)]
pub struct TestVm<B: NewBitmap = ()> {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    /// The vCPU (id 0).
    pub vcpu: VcpuFd,
    /// The VM.
    pub vm: VmFd,
    /// The KVM system handle.
    pub kvm: Kvm,
    /// Guest RAM, one region at GPA 0.
    pub mem: GuestMemoryMmap<B>,
    config: VmConfig,
}

impl TestVm<()> {
    /// A VM with `ram_size` bytes of RAM and no dirty logging.
    pub fn new(ram_size: usize) -> Result<Self, GuestError> {
        TestVm::with_config(VmConfig {
            ram_size,
            dirty_log: false,
        })
    }
}

impl<B: NewBitmap> TestVm<B> {
    /// A VM built from `config` (see the type docs for the order of operations).
    pub fn with_config(config: VmConfig) -> Result<Self, GuestError> {
        let kvm = Kvm::new().map_err(GuestError::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(GuestError::kvm("KVM_CREATE_VM"))?;
        vm.create_irq_chip()
            .map_err(GuestError::kvm("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config::default())
            .map_err(GuestError::kvm("KVM_CREATE_PIT2"))?;
        let mem = GuestMemoryMmap::<B>::from_ranges(&[(GuestAddress(0), config.ram_size)])?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(GuestError::Memory)?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if config.dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host+len` is a live anonymous mapping owned by
            // `mem`, which the returned TestVm keeps and drops after `vm`.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(GuestError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu = vm
            .create_vcpu(0)
            .map_err(GuestError::kvm("KVM_CREATE_VCPU"))?;
        Ok(TestVm {
            vcpu,
            vm,
            kvm,
            mem,
            config,
        })
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// Loads `image` per the guest ABI with `arg` in `RSI` (see [`load_with_arg`]).
    pub fn boot(&self, image: &[u8], arg: u64) -> Result<(), GuestError> {
        load_with_arg(&self.mem, &self.vcpu, &self.kvm, image, arg)
    }

    /// Runs the vCPU on this thread (see [`run_until`]).
    pub fn run_until(
        &mut self,
        monitor: &mut PortMonitor,
        timeout: Duration,
    ) -> Result<Verdict, GuestError> {
        run_until(&mut self.vcpu, monitor, timeout)
    }
}
