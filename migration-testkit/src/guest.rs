//! Self-checking KVM test guests, their loader and a verdict monitor.
//!
//! The guests are tiny flat x86-64 binaries (sources in `guests/*.S`, assembled
//! by `build.rs`) that follow the guest ABI of `docs/guest-abi.md`: loaded at
//! guest-physical [`IMAGE_ADDR`], entered in 64-bit long mode, they set up their
//! own GDT/IDT/TSS/page tables, drop to ring 3 and report on I/O ports:
//! [`PORT_PROGRESS`] (monotonic progress), [`PORT_ERROR`] (self-check failed,
//! terminal) and [`PORT_INFO`] (diagnostics). Each guest checks its own state,
//! so a snapshot/restore or a migration that loses or corrupts state is caught
//! by the guest itself.
//!
//! The pieces are independent:
//! - [`Guest`] and [`GuestImage`]: what to run;
//! - [`load`] / [`write_boot_memory`] / [`configure_vcpu`]: put an image into any
//!   vm-memory [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend) and set up a
//!   [`kvm_ioctls::VcpuFd`] per the ABI;
//! - [`PortMonitor`]: turns port writes into a [`Verdict`], whatever runs the vCPU;
//! - [`run_until`] and [`TestVm`]: a minimal single-vCPU VM and run loop for tests,
//!   with a watchdog that kicks the vCPU out of `KVM_RUN` on timeout;
//! - [`configure_vcpu_smp`] / [`SmpStart`]: the vCPUs of a guest with several, both
//!   ways they start; [`smp`]: what the SMP guest reports and where its counters are;
//! - [`GuestLog`] and [`RunningGuest`]: a guest in migration-kvm's `KvmVm`, its port
//!   events recorded per vCPU, stopping points, migration to a fresh VM.
//!
//! ```no_run
//! use std::time::Duration;
//! use migration_testkit::guest::{Guest, PortMonitor, TestVm, Verdict};
//!
//! let mut vm = TestVm::new(16 << 20)?;
//! vm.boot(Guest::CounterAvx.image(), 0)?;
//! let mut monitor = PortMonitor::new(10);
//! assert_eq!(vm.run_until(&mut monitor, Duration::from_secs(10))?, Verdict::Pass);
//! # Ok::<(), migration_testkit::guest::GuestError>(())
//! ```

mod error;
mod image;
mod loader;
mod monitor;
mod run;
mod running;
pub mod smp;
mod vm;

pub use error::GuestError;
pub use image::{
    cpuid_reports, describe_error_code, CpuidSeen, Guest, GuestImage, CPUID_REPORT_LEAVES,
    IMAGE_ADDR, IMAGE_END, IMAGE_MAX_SIZE, TIMER_IDLE,
};
pub use loader::{
    configure_vcpu, configure_vcpu_registers, configure_vcpu_smp, guest_ram_size, load,
    load_with_arg, write_boot_memory, SmpStart, BOOT_GDT_ADDR, BOOT_PDPT_ADDR, BOOT_PD_ADDR,
    BOOT_PML4_ADDR, BOOT_STACK_TOP, IDENTITY_MAP_SIZE, MIN_RAM_SIZE,
};
pub use monitor::{Failure, PortEvent, PortMonitor, Verdict, PORT_ERROR, PORT_INFO, PORT_PROGRESS};
pub use run::run_until;
pub use running::{load_vcpus, monitor_handler, GuestLog, RunningGuest, RunningGuestError};
pub use vm::{TestVm, VmConfig};
