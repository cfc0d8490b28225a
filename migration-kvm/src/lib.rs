//! KVM x86_64 vCPU and VM state for `migration-core`: save, restore, in the right order.
//!
//! This crate decouples *what* KVM state a VM has (plain data: [`VcpuState`],
//! [`VmState`]) from the *live* objects that hold it ([`KvmVcpu`], [`KvmVmDevices`],
//! [`VcpuRunner`]), and both from the ioctls underneath ([`VcpuBackend`],
//! [`VmBackend`], implemented for kvm-ioctls' `VcpuFd`/`VmFd`, for references to
//! them, and by test doubles). A VMM that owns its KVM objects lends them: every
//! piece works on `&VmFd`, `&VcpuFd` and the VMM's own vm-memory guest memory, for
//! any irqchip layout ([`DeviceLayout`]). [`KvmVm`] assembles the pieces into a whole
//! VM for those who have no VMM of their own. The order in which state is saved and
//! restored is written once, as data, in [`order`]; `docs/kvm-state.md` explains
//! every constraint.
//!
//! # Example
//!
//! A vCPU and the VM's in-kernel devices, snapshotted from one VM and restored into a
//! fresh one. Without a usable `/dev/kvm` the example returns early.
//!
//! ```
//! use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
//! use kvm_ioctls::{Kvm, VmFd};
//! use migration_core::{Snapshot, Snapshottable};
//! use migration_kvm::{ClockRestore, DeviceLayout, HostCaps, KvmVcpu, KvmVmDevices, VcpuBackend};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let Ok(kvm) = Kvm::new() else {
//!     eprintln!("skipped: /dev/kvm not usable");
//!     return Ok(());
//! };
//! // A VM with an in-kernel irqchip and PIT, and one vCPU with KVM's CPUID.
//! let layout = DeviceLayout::FULL_WITH_PIT;
//! let new_vm = || -> Result<(KvmVmDevices<VmFd>, KvmVcpu<_>), Box<dyn std::error::Error>> {
//!     let vm = kvm.create_vm()?;
//!     layout.create(&vm)?; // KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2
//!     let fd = vm.create_vcpu(0)?;
//!     fd.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
//!     let caps = HostCaps::probe(&kvm, &vm, &layout)?;
//!     // The caller chooses how kvmclock is restored.
//!     Ok((KvmVmDevices::new(vm, layout, ClockRestore::Exact), KvmVcpu::new(0, fd, caps)))
//! };
//!
//! let (mut devices, mut vcpu) = new_vm()?;
//! let mut regs = vcpu.backend().get_regs()?;
//! regs.rax = 0x1234_5678;
//! vcpu.backend().set_regs(&regs)?;
//!
//! // Save: devices, then vCPUs (all vCPUs paused: this one never ran).
//! let mut vm = Snapshot::new("vm");
//! vm.snapshot_child(&mut devices)?;
//! vm.snapshot_child(&mut vcpu)?;
//! assert!(vm.find("vm/vcpu0").is_some_and(|v| v.section("msrs").is_ok()));
//!
//! // Restore into a fresh VM: devices first, then each vCPU in VCPU_RESTORE_ORDER.
//! let (mut devices2, mut vcpu2) = new_vm()?;
//! vm.restore_child(&mut devices2)?;
//! vm.restore_child(&mut vcpu2)?;
//! assert_eq!(vcpu2.backend().get_regs()?.rax, 0x1234_5678);
//! assert_eq!(vcpu2.save_state()?.regs, vcpu.save_state()?.regs);
//! # Ok(())
//! # }
//! ```
//!
//! # Map
//! - [`VcpuState`] / [`KvmVcpu`] (`vcpu<N>`), [`HostCaps`]: vCPU state;
//!   [`save_vcpu_state`] / [`restore_vcpu_state`] on a borrowed vCPU.
//! - [`VmState`] / [`KvmVmDevices`] (`devices`), [`save_vm_state`] /
//!   [`restore_vm_state`], [`ClockRestore`]: kvmclock and the PIT, PICs and IOAPIC
//!   the VM's [`DeviceLayout`] ([`layout`]: full, split or no irqchip; PIT or not)
//!   has.
//! - [`order`]: the save and restore order as data, with reasons.
//! - [`MachineState`] / [`save_machine`] / [`restore_machine`] ([`machine`]): a whole
//!   machine, every vCPU paused before any state is read or written, devices before
//!   vCPUs, the vCPUs in parallel on their threads ([`VcpuGroup`]).
//! - [`msr`]: which MSRs are saved, chunked and count-checked reads and writes.
//! - [`state`]: tagged, size-checked wrappers of kvm-bindings structs ([`Raw`]).
//! - [`VcpuBackend`], [`VmBackend`]: the ioctl surface, for borrowed fds and test
//!   doubles.
//! - The pause protocol, in pieces for a VMM's own run loop: [`kick`](mod@kick) (the kick
//!   signal, [`KickableVcpu`]: this thread's `immediate_exit`,
//!   [`complete_pending_io`]) and [`park`] ([`PauseControl`]: request, park, jobs on
//!   the vCPU thread); [`VcpuRunner`], a run loop built from them, hands every exit
//!   to an [`ExitHandler`] with its data ([`ExitEvent`]).
//! - [`memory`] ([`memory::GuestRam`]: any vm-memory mmap memory, with its layout
//!   and KVM slots), [`bitmap`] (what the VMM's own writes are tracked with),
//!   [`dirty`], [`snapshot_memory`], [`restore`]: guest memory (`docs/memory.md`);
//!   [`uffd`]: userfaultfd in MISSING mode, and [`missing`]: postcopy's missing pages
//!   on guest memory with it (`KvmVm` is `MissingPages`).
//! - [`KvmStateError`]: typed errors naming the failed step or MSR.
//! - CPU compatibility: [`cpu_model`] (a CPU as data, this host's probed),
//!   [`cpu_features`] (feature names from raw-cpuid), [`cpu_check`] (guest vs host,
//!   the diff by feature name; [`CpuPolicy`]), [`cpu_template`] (templates and
//!   baselines); `docs/cpu.md`.
//! - [`KvmVm`] / [`KvmVmConfig`]: a whole VM (irqchip, PIT, memory slots, vCPU threads)
//!   that is `Migratable`; snapshot files with [`KvmVm::save_snapshot`] and
//!   [`KvmVm::restore_from_file`].
//!
//! Operators see what it does through `tracing` events (restore steps with their
//! times, snapshot sizes, pauses); without a `tracing` subscriber they are `log`
//! records.

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

mod backend;
pub mod bitmap;
pub mod cpu_check;
pub mod cpu_features;
pub mod cpu_model;
pub mod cpu_template;
pub mod dirty;
mod error;
pub mod kick;
pub mod kvm_vm;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod missing;
pub mod msr;
pub mod order;
pub mod park;
pub mod prefault;
pub mod restore;
mod runner;
pub mod snapshot_memory;
pub mod state;
pub mod throttle;
pub mod uffd;
mod vcpu;
mod vm;

pub use backend::{Result as IoctlResult, VcpuBackend, VmBackend};
pub use cpu_check::{CpuIncompatible, CpuPolicy};
pub use cpu_model::CpuModel;
pub use error::{Direction, KvmStateError, Step};
pub use kick::{
    complete_pending_io, install_kick_handler, kick, kick_signal, AsVcpuFd, KickableVcpu,
};
pub use kvm_vm::{ConfigError, KvmVm, KvmVmConfig, KvmVmError, RestoreMode};
pub use layout::{DeviceLayout, Irqchip};
pub use machine::{restore_machine, save_machine, MachineError, MachineState, VcpuGroup};
pub use order::{MachineStep, Ordered, VcpuStep, VmStep};
pub use park::{PauseControl, THROTTLE_SLICE};
pub use runner::{ExitAction, ExitEvent, ExitHandler, VcpuRunner};
pub use state::{CpuidEntry, MsrEntry, Raw, SizeMismatch};
pub use throttle::ThrottleTicker;
pub use vcpu::{restore_vcpu_state, save_vcpu_state, HostCaps, KvmVcpu, VcpuState};
pub use vm::{restore_vm_state, save_vm_state, ClockRestore, KvmVmDevices, VmState};

/// This crate's README (the page a registry shows), its examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
