//! [`KvmVm`]: a whole KVM VM (in-kernel irqchip and PIT, guest memory, vCPU threads)
//! that is [`Migratable`], and its configuration [`KvmVmConfig`].
//!
//! The pieces are this crate's: [`GuestRam`] registered as KVM slots, dirty
//! tracking from [`dirty`], [`KvmVmDevices`] for the VM-wide device
//! state and one parked [`VcpuRunner`] per vCPU. `KvmVm` composes them:
//!
//! - snapshot tree: `vm` with section `config` ([`KvmVmConfig::to_bytes`]), child
//!   `devices`, children `vcpu0`, `vcpu1`, …; restore applies `devices` before any
//!   vCPU (the order real KVM needs, `docs/kvm-state.md`);
//! - live migration: [`KvmVm::migration_options`] puts the config into the
//!   handshake; the destination builds a paused VM with [`KvmVm::for_incoming`];
//! - files: [`KvmVm::save_snapshot`] (atomic, tree + memory in the container's file
//!   form) and [`KvmVm::restore_from_file`] (eager copy or lazy `MAP_PRIVATE`).
//!
//! A `KvmVm` starts paused: load a guest ([`KvmVm::with_vcpu`], [`KvmVm::memory`],
//! [`KvmVm::kvm`]) then [`Pausable::resume`] (or [`KvmVm::start`]).
//!
//! ```
//! use migration_core::{Pausable, Snapshottable};
//! use migration_kvm::{ExitAction, KvmVm, KvmVmConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! if kvm_ioctls::Kvm::new().is_err() {
//!     eprintln!("skipped: /dev/kvm not usable");
//!     return Ok(());
//! }
//! // 4 MiB of RAM, one vCPU; every exit just re-enters the guest.
//! let config = KvmVmConfig::new(4 << 20, 1);
//! let codecs = migration_serde::registry();
//! let mut vm = KvmVm::new(config.clone(), codecs, |_vcpu| Box::new(|_exit| ExitAction::Continue))?;
//! // The handshake carries the config, with the CPU model the guest got (this
//! // host's: no template); the destination rebuilds it from the bytes.
//! let sent = KvmVmConfig::from_bytes(&vm.migration_options().config)?;
//! assert_eq!(sent, *vm.config());
//! assert_eq!((sent.layout, sent.vcpus), (config.layout, config.vcpus));
//! assert_eq!(sent.cpu.map(|m| m.name), Some("host-passthrough".to_owned()));
//! // Paused from birth: a snapshot is consistent.
//! vm.pause()?;
//! let tree = vm.snapshot()?;
//! assert!(tree.find("vm/devices").is_some() && tree.find("vm/vcpu0").is_some());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration_core::arch::Arch;
use migration_core::codec::CodecRegistry;
use migration_core::container::{WriteOptions, WriteSummary};
use migration_core::destination::{IncomingVm, ReceiveOptions};
use migration_core::missing_pages::{MissingPages, PagePlacer};
use migration_core::precopy::MigrationOptions;
use migration_core::{
    file, MemoryRange, MemoryRangeTable, MemorySink, MemorySource, Migratable, MigratableError,
    MigrationRole, Pausable, Snapshot, Snapshottable, Transportable, Versioned,
};
use serde::{Deserialize, Serialize};

use crate::cpu_check::{self, CpuIncompatible, CpuPolicy, CpuReport};
use crate::cpu_model::{CpuModel, CpuModelError};
use crate::cpu_template;
use crate::dirty;
use crate::error::KvmStateError;
use crate::layout::DeviceLayout;
use crate::machine::{restore_machine, resume_all, save_machine, MachineState, VcpuGroup};
use crate::memory::{check_layout, GuestRam, KvmMemoryError, KvmSlots, MemoryOptions};
use crate::missing;
use crate::park::THROTTLE_SLICE;
use crate::prefault::Prefaulter;
use crate::restore::EagerOptions;
use crate::runner::{ExitHandler, VcpuRunner};
use crate::snapshot_memory::{restore_eager_from, restore_lazy_from, SnapshotMemoryError};
use crate::throttle::{Kick, ThrottleTicker};
use crate::vcpu::{HostCaps, KvmVcpu};
use crate::vm::{ClockRestore, KvmVmDevices};

/// Most vCPUs a [`KvmVmConfig`] may ask for.
pub const MAX_VCPUS: u32 = 256;
/// Most memory regions a [`KvmVmConfig`] may have.
pub const MAX_REGIONS: usize = 64;
/// Most guest RAM, in bytes summed over all regions, a [`KvmVmConfig`] may ask for:
/// 4 TiB.
///
/// The config arrives from untrusted places (the migration handshake, a snapshot
/// file), and building a VM allocates host memory in proportion to its RAM before a
/// single guest page is touched: vm-memory's dirty bitmap costs one bit per 4 KiB
/// page, RAM / 32768 bytes (128 MiB at 4 TiB), and KVM's own dirty log the same
/// again while logging. Without a cap, a region of 2^56 bytes asks for a 2 TiB
/// bitmap and the process aborts on allocation failure. 4 TiB is above the RAM of
/// the largest single hosts this crate targets while keeping that fixed overhead
/// at a size any such host can afford.
pub const MAX_GUEST_RAM: u64 = 4 << 40;
/// Encoded size of a config with `n` regions: header 24 bytes + 16 per region.
const CONFIG_HEADER: usize = 24;
const CONFIG_MAGIC: &[u8; 4] = b"KVMC";
/// Version 1: no CPU model; version 2: a CPU model follows the regions.
const CONFIG_VERSION_V1: u32 = 1;
const CONFIG_VERSION_V2: u32 = 2;
/// Most bytes of the CPU model in a config (a full model is about 24 KiB at most:
/// 256 CPUID entries and 4096 MSRs).
pub const MAX_CPU_MODEL_BYTES: usize = 32 << 10;
/// The snapshot tree's root id.
pub const VM_ID: &str = "vm";
/// The config section's id.
pub const CONFIG_SECTION: &str = "config";
/// The name of the CPU model of a VM built without a template (its vCPUs get this
/// host's CPUID).
pub const HOST_PASSTHROUGH: &str = "host-passthrough";

/// Errors of decoding a [`KvmVmConfig`] (all input is untrusted).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Fewer bytes than the header or the declared regions need.
    #[error("config truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// The bytes do not start with `KVMC`.
    #[error("not a KVM VM config (bad magic)")]
    BadMagic,
    /// A config version this reader does not know.
    #[error("config version {0} is not supported (this reader knows versions 1 and 2)")]
    Version(u32),
    /// The CPU model (version 2) is invalid.
    #[error("CPU model: {0}")]
    Cpu(#[from] CpuModelError),
    /// More bytes than the declared regions.
    #[error("{0} trailing bytes after the config")]
    TrailingBytes(usize),
    /// Zero vCPUs or more than [`MAX_VCPUS`].
    #[error("{0} vCPUs: a VM has 1 to 256")]
    Vcpus(u32),
    /// More than [`MAX_REGIONS`] regions.
    #[error("{0} memory regions: at most 64")]
    Regions(u32),
    /// Total guest RAM (bytes, summed over the regions) above [`MAX_GUEST_RAM`].
    #[error("{0} bytes of guest RAM: at most {max}", max = MAX_GUEST_RAM)]
    GuestRam(u64),
    /// An unknown clock-restore code or flag bits.
    #[error("invalid field `{0}`")]
    Field(&'static str),
    /// The layout is empty, unsorted, overlapping or unaligned.
    #[error("invalid memory layout: {0}")]
    Layout(String),
}

/// What a KVM VM is made of: its RAM layout, vCPU count, how kvmclock is restored
/// and how fresh memory is mapped. Travels as bytes in the migration handshake
/// ([`MigrationOptions::config`]) and in the `config` section of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmVmConfig {
    /// Guest RAM regions, sorted, page aligned.
    pub layout: Vec<MemoryRange>,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// How kvmclock is set when state is restored into this VM.
    pub clock_restore: ClockRestore,
    /// How fresh guest memory is mapped.
    pub memory: MemoryOptions,
    /// The guest's CPU model. Building a VM from `Some(template)` gives each vCPU
    /// this host's CPUID masked by the template ([`cpu_template::apply`]); `None`
    /// gives the host's CPUID unchanged. A built VM's config always holds the model
    /// its guest got (named after the template, or [`HOST_PASSTHROUGH`]), and so do its snapshots
    /// and its migration handshake, where the destination checks it
    /// (`docs/cpu.md`).
    pub cpu: Option<CpuModel>,
}

impl KvmVmConfig {
    /// One region of `mem_size` bytes at guest-physical 0, `vcpus` vCPUs, exact clock
    /// restore, default memory options.
    pub fn new(mem_size: u64, vcpus: u32) -> Self {
        Self {
            layout: vec![MemoryRange::new(0, mem_size)],
            vcpus,
            clock_restore: ClockRestore::Exact,
            memory: MemoryOptions::default(),
            cpu: None,
        }
    }

    /// Total RAM bytes.
    pub fn mem_size(&self) -> u64 {
        self.layout.iter().map(|r| r.length).sum()
    }

    /// Checks vCPU count, layout and total RAM (at most [`MAX_GUEST_RAM`]). Allocates
    /// nothing, so it is safe on untrusted configs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.layout.len() > MAX_REGIONS {
            return Err(ConfigError::Regions(
                u32::try_from(self.layout.len()).unwrap_or(u32::MAX),
            ));
        }
        check_layout(&self.layout).map_err(|e| ConfigError::Layout(e.to_string()))?;
        // A valid layout is sorted and disjoint, so its sum cannot overflow; saturate
        // anyway rather than rely on that.
        let total = self
            .layout
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.length));
        if total > MAX_GUEST_RAM {
            return Err(ConfigError::GuestRam(total));
        }
        Ok(())
    }

    /// The encoding: `KVMC`, version u32, vCPUs u32, clock u8 (0 exact, 1 advance by
    /// wall time), flags u8 (bit 0 huge pages, bit 1 populate), 2 zero bytes,
    /// region count u32, reserved u32 (0), then per region gpa u64 and length u64;
    /// all little endian. Version 2 (written when [`cpu`](Self::cpu) is set) then
    /// has the model's length u32 (at most [`MAX_CPU_MODEL_BYTES`]) and
    /// [`CpuModel::to_bytes`]; without a model version 1 is written, which readers
    /// of version 1 understand.
    pub fn to_bytes(&self) -> Vec<u8> {
        let cpu = self.cpu.as_ref().map(CpuModel::to_bytes);
        let mut b = Vec::with_capacity(
            CONFIG_HEADER + 16 * self.layout.len() + cpu.as_ref().map_or(0, |c| 4 + c.len()),
        );
        b.extend_from_slice(CONFIG_MAGIC);
        let version = if cpu.is_some() {
            CONFIG_VERSION_V2
        } else {
            CONFIG_VERSION_V1
        };
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&self.vcpus.to_le_bytes());
        b.push(match self.clock_restore {
            ClockRestore::Exact => 0,
            ClockRestore::AdvanceByWallTime => 1,
        });
        b.push(u8::from(self.memory.huge_pages) | (u8::from(self.memory.populate) << 1));
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(self.layout.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.layout {
            b.extend_from_slice(&r.gpa.to_le_bytes());
            b.extend_from_slice(&r.length.to_le_bytes());
        }
        if let Some(c) = cpu {
            b.extend_from_slice(&(c.len() as u32).to_le_bytes());
            b.extend_from_slice(&c);
        }
        b
    }

    /// Decodes and validates [`to_bytes`](Self::to_bytes)' output. Never allocates
    /// more than [`MAX_REGIONS`] regions, whatever the input says.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.len() < CONFIG_HEADER {
            return Err(ConfigError::Truncated {
                needed: CONFIG_HEADER,
                found: bytes.len(),
            });
        }
        if &bytes[..4] != CONFIG_MAGIC {
            return Err(ConfigError::BadMagic);
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u32_at(4);
        if version != CONFIG_VERSION_V1 && version != CONFIG_VERSION_V2 {
            return Err(ConfigError::Version(version));
        }
        let vcpus = u32_at(8);
        let clock_restore = match bytes[12] {
            0 => ClockRestore::Exact,
            1 => ClockRestore::AdvanceByWallTime,
            _ => return Err(ConfigError::Field("clock_restore")),
        };
        let flags = bytes[13];
        if flags & !3 != 0 {
            return Err(ConfigError::Field("memory flags"));
        }
        if bytes[14] != 0 || bytes[15] != 0 || u32_at(20) != 0 {
            return Err(ConfigError::Field("reserved"));
        }
        let n = u32_at(16);
        if n as usize > MAX_REGIONS {
            return Err(ConfigError::Regions(n));
        }
        let regions_end = CONFIG_HEADER + 16 * n as usize;
        let mut needed = regions_end;
        if version == CONFIG_VERSION_V2 {
            needed += 4;
            if bytes.len() >= needed {
                let cpu_len = u32_at(regions_end) as usize;
                if cpu_len > MAX_CPU_MODEL_BYTES {
                    return Err(ConfigError::Field("cpu model length"));
                }
                needed += cpu_len;
            }
        }
        if bytes.len() < needed {
            return Err(ConfigError::Truncated {
                needed,
                found: bytes.len(),
            });
        }
        if bytes.len() > needed {
            return Err(ConfigError::TrailingBytes(bytes.len() - needed));
        }
        let cpu = if version == CONFIG_VERSION_V2 {
            Some(CpuModel::from_bytes(&bytes[regions_end + 4..])?)
        } else {
            None
        };
        let layout = bytes[CONFIG_HEADER..regions_end]
            .chunks_exact(16)
            .map(|c| {
                let mut gpa = [0u8; 8];
                let mut len = [0u8; 8];
                gpa.copy_from_slice(&c[..8]);
                len.copy_from_slice(&c[8..]);
                MemoryRange::new(u64::from_le_bytes(gpa), u64::from_le_bytes(len))
            })
            .collect();
        let config = Self {
            layout,
            vcpus,
            clock_restore,
            memory: MemoryOptions {
                huge_pages: flags & 1 != 0,
                populate: flags & 2 != 0,
            },
            cpu,
        };
        config.validate()?;
        Ok(config)
    }
}

/// The state type of the `vm` node's [`CONFIG_SECTION`]: a [`KvmVmConfig`] as
/// [`KvmVmConfig::to_bytes`] writes it. Tools that decode or re-encode that section
/// (`vmsnap inspect`, `vmsnap convert`) use this type; [`ConfigSection::config`]
/// checks the bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigSection {
    /// [`KvmVmConfig::to_bytes`].
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl ConfigSection {
    /// The section for `config`.
    pub fn new(config: &KvmVmConfig) -> Self {
        Self {
            bytes: config.to_bytes(),
        }
    }

    /// The configuration the section holds, checked ([`KvmVmConfig::from_bytes`]).
    pub fn config(&self) -> Result<KvmVmConfig, ConfigError> {
        KvmVmConfig::from_bytes(&self.bytes)
    }
}

impl Versioned for ConfigSection {
    const VERSION: u32 = 1;
}

/// Errors of building, running and snapshotting a [`KvmVm`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmVmError {
    /// A KVM ioctl failed: a VMM's own ioctl, converted with `?` or
    /// `KvmVmError::from` (which then converts into a `MigratableError`).
    #[error("KVM ioctl failed: {0}")]
    Ioctl(#[from] kvm_ioctls::Error),
    /// A KVM ioctl of VM construction failed.
    #[error("{step}: {source}")]
    Kvm {
        /// What was being done (`"KVM_CREATE_VM"`…).
        step: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration is invalid.
    #[error("VM config: {0}")]
    Config(#[from] ConfigError),
    /// The config does not match what it must match (the incoming layout, a
    /// snapshot's config…).
    #[error("config mismatch: {0}")]
    Mismatch(String),
    /// Guest memory or its KVM slots.
    #[error(transparent)]
    Memory(#[from] KvmMemoryError),
    /// vCPU or VM state, or a vCPU thread.
    #[error(transparent)]
    State(#[from] KvmStateError),
    /// Snapshotting, restoring or writing a snapshot.
    #[error(transparent)]
    Migratable(#[from] MigratableError),
    /// Restoring memory from a snapshot file.
    #[error(transparent)]
    SnapshotMemory(#[from] SnapshotMemoryError),
    /// File I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The guest's CPU does not fit this host ([`CpuPolicy`]; `docs/cpu.md`).
    #[error(transparent)]
    Cpu(#[from] CpuIncompatible),
    /// A CPU template could not be applied to this host's CPU.
    #[error(transparent)]
    CpuTemplate(#[from] cpu_template::TemplateError),
    /// The VM was migrated out: its guest runs on the destination now, and running
    /// this copy too would run it twice.
    #[error("the VM was migrated out; its guest runs on the destination")]
    MigratedOut,
}

/// A `MigratableError` wraps a `KvmVmError` as it arose: [`MigratableError::Build`]
/// for building a VM (a destination's `build` function returns
/// `KvmVm::for_incoming(…)?`), the inner error for [`KvmVmError::Migratable`], and
/// [`KvmStateError`]'s own conversion for [`KvmVmError::State`]. A VMM's own ioctl
/// errors come through too: `.map_err(KvmVmError::from)?`.
impl From<KvmVmError> for MigratableError {
    fn from(e: KvmVmError) -> Self {
        match e {
            KvmVmError::Migratable(m) => m,
            KvmVmError::State(s) => s.into(),
            other => MigratableError::Build(Box::new(other)),
        }
    }
}

/// `e`, raised while restoring state into this VM, as [`MigratableError::Restore`].
fn restore_error(e: KvmVmError) -> MigratableError {
    MigratableError::Restore {
        path: VM_ID.to_owned(),
        source: Box::new(e),
    }
}

fn kvm_err(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError::Kvm { step, source }
}

/// How [`KvmVm::restore_from_file`] brings memory back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// Copy the file's data runs into fresh memory (zero pages never read).
    Eager(EagerOptions),
    /// Map the file's extents `MAP_PRIVATE` (copy on write); pages load on first
    /// touch. The file must not be truncated while the VM lives.
    Lazy,
}

/// A KVM VM: in-kernel irqchip and PIT2, [`GuestRam`] in KVM slots, one
/// [`VcpuRunner`] thread per vCPU. [`Migratable`] (and so [`Snapshottable`] and
/// [`Transportable`]).
///
/// Created paused. Exit handlers (one per vCPU, from the factory given to the
/// constructor) see the guest's port I/O.
pub struct KvmVm {
    config: KvmVmConfig,
    codecs: CodecRegistry,
    // Drop order matters and is enforced in `Drop`: vCPU threads stop first, then
    // the slots are removed, then the VM fd and the memory go.
    vcpus: Vec<VcpuRunner>,
    slots: Option<KvmSlots>,
    devices: KvmVmDevices<VmFd>,
    memory: GuestRam,
    kvm: Kvm,
    running: bool,
    /// Set once a migration out of this VM completed: it must never run again.
    migrated_out: bool,
    /// The role the current migration gave this VM (`start_migration`).
    migration_role: Option<MigrationRole>,
    /// What restores into this VM check the guest's CPU against.
    cpu_policy: CpuPolicy,
    /// The differences a forced restore let through.
    cpu_forced: Option<CpuReport>,
    /// Kicks the vCPUs once a slice while they are throttled.
    ticker: Option<ThrottleTicker>,
    /// Postcopy: guest memory registered with a userfaultfd while pages are missing.
    missing: Option<missing::Armed>,
    /// Whether a destination faults its memory in ahead of what arrives.
    prefault: bool,
    /// Whether a destination reads MEMORY data from the socket straight into guest
    /// memory ([`KvmVm::allow_direct_receive`]).
    direct_receive: bool,
    /// The thread doing it, while this VM receives a migration.
    prefaulter: Option<Prefaulter>,
}

impl fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmVm")
            .field("config", &self.config)
            .field("running", &self.running)
            .field("migrated_out", &self.migrated_out)
            .field("vcpus", &self.vcpus)
            .field("codecs", &self.codecs)
            .finish_non_exhaustive()
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.ticker = None;
        // Closing the userfaultfd wakes vCPUs waiting on missing pages (which then
        // read zeros), so their threads can stop.
        self.missing = None;
        self.prefaulter = None;
        // Stop every vCPU thread before KVM loses the memory.
        self.vcpus.clear();
        if let Some(slots) = self.slots.take() {
            // On failure the slots leak their mappings (never unmapped): safe.
            let _ = slots.unregister(self.devices.vm());
        }
    }
}

impl KvmVm {
    /// Builds a paused VM with fresh zeroed memory for `config.layout`. `codecs`
    /// encode its state (the preferred one) and decode what is restored into it
    /// (`migration_serde::registry()`, or a registry of your own: this crate
    /// depends on no codec). `handlers` is called once per vCPU index for its exit
    /// handler.
    pub fn new(
        config: KvmVmConfig,
        codecs: CodecRegistry,
        handlers: impl FnMut(u32) -> ExitHandler,
    ) -> Result<Self, KvmVmError> {
        config.validate()?;
        let memory = GuestRam::anonymous_with(&config.layout, config.memory)?;
        Self::with_memory(config, memory, codecs, handlers)
    }

    /// Builds a paused VM around existing guest `memory` (e.g. restored from a file),
    /// whose layout must be `config.layout`.
    pub fn with_memory(
        config: KvmVmConfig,
        memory: GuestRam,
        codecs: CodecRegistry,
        mut handlers: impl FnMut(u32) -> ExitHandler,
    ) -> Result<Self, KvmVmError> {
        config.validate()?;
        if memory.layout() != config.layout.as_slice() {
            return Err(KvmVmError::Mismatch(format!(
                "memory layout {:x?} is not the config's {:x?}",
                memory.layout(),
                config.layout
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Irqchip and PIT before any vCPU.
        let layout = DeviceLayout::FULL_WITH_PIT;
        layout.create(&vm)?;
        let slots = memory.register(&vm, 0, false)?;
        let cpuid = vcpu_cpuid(&kvm, config.cpu.as_ref())?;
        let caps = HostCaps::probe(&kvm, &vm, &layout)?;
        let mut fds = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            fds.push(fd);
        }
        // The model the guest got, named after its template: what snapshots and the
        // migration handshake carry.
        let mut config = config;
        if let Some(fd) = fds.first() {
            let name = config
                .cpu
                .as_ref()
                .map_or(HOST_PASSTHROUGH, |t| t.name.as_str());
            config.cpu = Some(CpuModel::of_backend(name, fd, &caps)?);
        }
        let mut this = Self {
            devices: KvmVmDevices::new(vm, layout, config.clock_restore),
            config,
            codecs,
            vcpus: Vec::with_capacity(fds.len()),
            slots: Some(slots),
            memory,
            kvm,
            running: false,
            migrated_out: false,
            migration_role: None,
            cpu_policy: CpuPolicy::default(),
            cpu_forced: None,
            ticker: None,
            missing: None,
            prefault: true,
            direct_receive: false,
            prefaulter: None,
        };
        for (i, fd) in fds.into_iter().enumerate() {
            let i = i as u32;
            let runner = VcpuRunner::spawn(KvmVcpu::new(i, fd, caps.clone()), handlers(i))?;
            this.vcpus.push(runner);
        }
        Ok(this)
    }

    /// The paused destination VM of a live migration, built from the source's
    /// handshake: `incoming.config` must be a [`KvmVmConfig`] whose layout is
    /// `incoming.layout`, for x86_64. Its memory reads as zero.
    ///
    /// The sender's [`MemoryOptions::populate`] is ignored: whether this host
    /// faults in all of the guest's RAM up front (`MAP_POPULATE`) is this host's
    /// decision, not the peer's, so the VM is built with `populate` off (and its
    /// config says so). `huge_pages` is kept as sent: it only advises the kernel.
    ///
    /// The guest's CPU model in the config is checked against this host before
    /// anything is built ([`for_incoming_with`](Self::for_incoming_with)).
    pub fn for_incoming(
        incoming: &IncomingVm,
        codecs: CodecRegistry,
        handlers: impl FnMut(u32) -> ExitHandler,
    ) -> Result<Self, KvmVmError> {
        Self::for_incoming_with(incoming, codecs, CpuPolicy::default(), handlers)
    }

    /// [`for_incoming`](Self::for_incoming), checking the guest's CPU with `cpu`:
    /// an incompatible guest is refused with [`KvmVmError::Cpu`] before the VM is
    /// built, and the destination's ABORT carries the diff. A source whose config
    /// has no CPU model (version 1) is checked later, when its state arrives, before
    /// any vCPU state is written.
    pub fn for_incoming_with(
        incoming: &IncomingVm,
        codecs: CodecRegistry,
        cpu: CpuPolicy,
        handlers: impl FnMut(u32) -> ExitHandler,
    ) -> Result<Self, KvmVmError> {
        if incoming.arch != Arch::X86_64 {
            return Err(KvmVmError::Mismatch(format!(
                "architecture {:?} is not x86_64",
                incoming.arch
            )));
        }
        let mut config = KvmVmConfig::from_bytes(&incoming.config)?;
        config.memory.populate = false;
        if config.layout != incoming.layout {
            return Err(KvmVmError::Mismatch(format!(
                "config layout {:x?} differs from the announced layout {:x?}",
                config.layout, incoming.layout
            )));
        }
        let forced = match &config.cpu {
            Some(guest) => cpu.admit(guest).inspect_err(|e| {
                tracing::warn!(error = %e, "incoming guest CPU refused");
            })?,
            None => None,
        };
        let t = Instant::now();
        let vcpus = config.vcpus;
        let ram_bytes = config.mem_size();
        let mut vm = Self::new(config, codecs, handlers)?;
        tracing::info!(vcpus, ram_bytes, elapsed = ?t.elapsed(), "destination VM built");
        vm.cpu_policy = cpu;
        vm.cpu_forced = forced;
        Ok(vm)
    }

    /// Options for [`send_migration`](migration_core::precopy::send_migration) with
    /// this VM's config and architecture filled in (other fields default).
    pub fn migration_options(&self) -> MigrationOptions {
        MigrationOptions {
            arch: Arch::X86_64,
            config: self.config.to_bytes(),
            ..MigrationOptions::default()
        }
    }

    /// Options for [`receive_migration`](migration_core::destination::receive_migration)
    /// on this host with `codecs`.
    pub fn receive_options(codecs: CodecRegistry) -> ReceiveOptions {
        ReceiveOptions::new(Arch::X86_64, codecs)
    }

    /// The config the VM was built with; its `cpu` is the guest's CPU model.
    pub fn config(&self) -> &KvmVmConfig {
        &self.config
    }

    /// What later restores into this VM check the guest's CPU against.
    pub fn set_cpu_policy(&mut self, cpu: CpuPolicy) {
        self.cpu_policy = cpu;
    }

    /// The differences between the guest's CPU and this host that a forced restore
    /// or incoming migration let through (`None`: none, or not forced).
    pub fn cpu_forced(&self) -> Option<&CpuReport> {
        self.cpu_forced.as_ref()
    }

    /// Replaces the codec registry ([`Transportable::codecs`]).
    pub fn set_codecs(&mut self, codecs: CodecRegistry) {
        self.codecs = codecs;
    }

    /// Changes how kvmclock is restored by later restores into this VM.
    pub fn set_clock_restore(&mut self, clock: ClockRestore) {
        self.config.clock_restore = clock;
        self.devices.set_clock_restore(clock);
    }

    /// Whether, as a migration destination, this VM faults its fresh memory in on a
    /// thread of its own a window ahead of what arrives ([`crate::prefault`]). On by
    /// default; takes effect at the next `start_migration`.
    pub fn set_prefault(&mut self, on: bool) {
        self.prefault = on;
    }

    /// Lets a migration into this VM read MEMORY data from a `tcp://` or `unix://`
    /// socket straight into guest memory, checksummed where it landed (no copy through
    /// a buffer). Takes effect at the next `start_migration(Destination)`, until the VM
    /// is resumed.
    ///
    /// # Safety
    /// From that `start_migration` until the VM is resumed (or dropped), nothing but
    /// the incoming migration may write this VM's guest memory: no thread holding a
    /// clone of [`memory`](Self::memory)'s mappings writes it. (The VM's own vCPUs and
    /// exit handlers do not run before it is resumed.) The checksum reads the landed
    /// bytes through a shared reference over guest memory.
    pub unsafe fn allow_direct_receive(&mut self) {
        self.direct_receive = true;
    }

    fn stop_prefault(&mut self) {
        if let Some(mut p) = self.prefaulter.take() {
            let faulted = p.stop();
            tracing::debug!(faulted, "prefault thread stopped");
        }
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn vm_fd(&self) -> &VmFd {
        self.devices.vm()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The vCPU runners (to wait for a self-parked vCPU, read its last exit…).
    pub fn vcpus(&self) -> &[VcpuRunner] {
        &self.vcpus
    }

    /// Runs `f` on vCPU `index`'s thread with its `VcpuFd` (e.g. to load a guest
    /// before the first resume). The VM must be paused.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce(&VcpuFd) -> R + Send + 'static,
    ) -> Result<R, KvmVmError> {
        let runner = self.vcpus.get(index).ok_or_else(|| {
            KvmVmError::Mismatch(format!("no vCPU {index} (the VM has {})", self.vcpus.len()))
        })?;
        Ok(runner.with_vcpu(move |v| f(v.backend()))?)
    }

    /// Makes every vCPU sleep `percent` (at most 99) of each [`THROTTLE_SLICE`]; 0
    /// lifts the throttle. While it is on, a [`ThrottleTicker`] kicks the vCPUs out of
    /// the guest once a slice, so a guest that never exits is throttled too. The
    /// precopy driver's auto-converge calls this through
    /// [`Migratable::set_throttle`].
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), KvmVmError> {
        let percent = percent.min(99);
        if percent == 0 {
            self.ticker = None;
        }
        for v in &self.vcpus {
            v.set_throttle(percent);
        }
        if percent > 0 && self.ticker.is_none() {
            let kicks = self
                .vcpus
                .iter()
                .map(|v| Box::new(v.kicker()) as Kick)
                .collect();
            self.ticker = Some(ThrottleTicker::start(THROTTLE_SLICE, kicks)?);
        }
        tracing::debug!(percent, "vCPU throttle set");
        Ok(())
    }

    /// The vCPUs' throttle, percent (0: they run unthrottled).
    pub fn throttle(&self) -> u8 {
        self.vcpus.iter().map(|v| v.throttle()).max().unwrap_or(0)
    }

    /// Whether a [`ThrottleTicker`] is kicking the vCPUs (only while throttled).
    pub fn is_throttle_ticking(&self) -> bool {
        self.ticker.is_some()
    }

    /// Throttle sleeps the vCPUs have taken, all together.
    pub fn throttle_sleeps(&self) -> u64 {
        self.vcpus.iter().map(|v| v.throttle_sleeps()).sum()
    }

    /// Whether the vCPUs were resumed and not paused since (a vCPU may still have
    /// parked itself through its exit handler).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts (resumes) every vCPU: all are told to run before the first is waited
    /// for.
    pub fn start(&mut self) -> Result<(), KvmVmError> {
        if self.migrated_out {
            tracing::warn!("refused to resume: the VM was migrated out");
            return Err(KvmVmError::MigratedOut);
        }
        self.stop_prefault();
        resume_all(&self.vcpus).map_err(|e| KvmVmError::Migratable(e.into()))?;
        self.running = true;
        tracing::debug!(vcpus = self.vcpus.len(), "VM resumed");
        Ok(())
    }

    /// Pauses every vCPU: each is kicked out of `KVM_RUN`, its pending I/O completed,
    /// and parked. All are kicked before the first is waited for.
    pub fn stop(&mut self) -> Result<(), KvmVmError> {
        let t = Instant::now();
        VcpuGroup::pause_all(&self.vcpus[..]).map_err(|e| KvmVmError::Migratable(e.into()))?;
        self.running = false;
        tracing::debug!(vcpus = self.vcpus.len(), elapsed = ?t.elapsed(), "VM paused");
        Ok(())
    }

    /// Reads the devices' and every vCPU's state ([`save_machine`]: the vCPUs in
    /// parallel, each on its own thread). Every vCPU must be paused.
    pub fn save_state(&self) -> Result<MachineState, KvmVmError> {
        self.require_paused()?;
        save_machine(&self.devices, &self.vcpus[..])
            .map_err(|e| KvmVmError::Migratable(MigratableError::from(e).within(VM_ID)))
    }

    /// Writes `state` into the devices and every vCPU ([`restore_machine`]), without
    /// the config and CPU checks of [`Snapshottable::restore`]: for a state this VM
    /// (or one built from the same config on this host) saved. Every vCPU must be
    /// paused; resume only after it returns `Ok`.
    pub fn restore_state(&mut self, state: &MachineState) -> Result<(), KvmVmError> {
        self.require_paused()?;
        restore_machine(&self.devices, &self.vcpus[..], state)
            .map_err(|e| KvmVmError::Migratable(MigratableError::from(e).within(VM_ID)))
    }

    /// Fails with [`KvmStateError::NotPaused`] (as a [`MigratableError::Pause`] at
    /// `vm`) unless every vCPU is parked: nothing is read or written then.
    fn require_paused(&self) -> Result<(), KvmVmError> {
        match self.vcpus.iter().any(|v| !v.is_paused()) {
            true => Err(KvmVmError::Migratable(
                MigratableError::from(KvmStateError::NotPaused).within(VM_ID),
            )),
            false => Ok(()),
        }
    }

    /// Writes a snapshot of the VM (tree encoded with the preferred codec, and all
    /// of guest memory) to `path`, atomically. A running VM is paused for the
    /// snapshot and resumed after it.
    pub fn save_snapshot(&mut self, path: impl AsRef<Path>) -> Result<WriteSummary, KvmVmError> {
        let was_running = self.running;
        if was_running {
            self.stop()?;
        }
        let result = self.save_snapshot_paused(path.as_ref());
        if was_running {
            self.start()?;
        }
        result
    }

    fn save_snapshot_paused(&mut self, path: &Path) -> Result<WriteSummary, KvmVmError> {
        let _span = tracing::info_span!("save_snapshot", path = %path.display()).entered();
        let t = Instant::now();
        let mut tree = self.snapshot()?;
        let codec = self.codecs.preferred().cloned().ok_or_else(|| {
            KvmVmError::Mismatch("the codec registry has no preferred codec".into())
        })?;
        tree.encode(&codec)?;
        tracing::debug!(codec = %codec.id(), elapsed = ?t.elapsed(), "state captured and encoded");
        let options = WriteOptions::default();
        let summary = file::write_snapshot_file(
            path,
            &tree,
            Some(&self.memory as &dyn MemorySource),
            &options,
        )?;
        tracing::info!(
            file_bytes = summary.total_length,
            memory_bytes = summary.memory_bytes,
            data_bytes = summary.data_bytes,
            elapsed = ?t.elapsed(),
            "snapshot written"
        );
        Ok(summary)
    }

    /// Restores a snapshot file written by [`save_snapshot`](Self::save_snapshot)
    /// into a fresh, paused VM built from the file's config. `codecs` decode the
    /// sections and become the VM's registry. Every vCPU's CPU is checked against
    /// this host first ([`restore_from_file_with`](Self::restore_from_file_with)).
    pub fn restore_from_file(
        path: impl AsRef<Path>,
        mode: RestoreMode,
        codecs: CodecRegistry,
        handlers: impl FnMut(u32) -> ExitHandler,
    ) -> Result<Self, KvmVmError> {
        Self::restore_from_file_with(path, mode, codecs, CpuPolicy::default(), handlers)
    }

    /// [`restore_from_file`](Self::restore_from_file), checking each vCPU's saved
    /// CPU with `cpu` as soon as the tree is read: an incompatible guest is refused
    /// with [`KvmVmError::Cpu`] before memory is read or any VM or vCPU is created.
    /// Before that, a file whose sections need a codec `codecs` lacks is refused
    /// with the list of codecs it needs ([`MigratableError::MissingCodecs`]).
    pub fn restore_from_file_with(
        path: impl AsRef<Path>,
        mode: RestoreMode,
        codecs: CodecRegistry,
        cpu: CpuPolicy,
        handlers: impl FnMut(u32) -> ExitHandler,
    ) -> Result<Self, KvmVmError> {
        let path = path.as_ref();
        let _span = tracing::info_span!("restore_from_file", path = %path.display()).entered();
        let start = Instant::now();
        let step = |what: &str, t: Instant| tracing::info!(elapsed = ?t.elapsed(), "{what}");
        let mut f = File::open(path)?;
        // The tree first (file form: memory is not read), for the layout.
        let t = Instant::now();
        let mut reader = migration_core::container::ContainerReader::open(&mut f)?;
        // Every codec the sections name, before a payload or a page is read.
        reader.check_codecs(&codecs)?;
        let tree = reader.read_snapshot(&codecs, None, &Default::default())?;
        let config = config_of(&tree)?;
        tracing::info!(
            vcpus = config.vcpus,
            ram_bytes = config.mem_size(),
            regions = config.layout.len(),
            elapsed = ?t.elapsed(),
            "state tree read"
        );
        let t = Instant::now();
        cpu_check::admit_snapshot(&tree, &guest_name(&config), &cpu)?;
        step("guest CPU admitted", t);
        let t = Instant::now();
        let (tree, memory) = match mode {
            RestoreMode::Eager(options) => {
                restore_eager_from(&mut f, &config.layout, &codecs, options)?
            }
            RestoreMode::Lazy => restore_lazy_from(&mut f, &config.layout, &codecs)?,
        };
        tracing::info!(mode = ?mode, elapsed = ?t.elapsed(), "memory restored");
        let t = Instant::now();
        let mut vm = Self::with_memory(config, memory, codecs, handlers)?;
        vm.cpu_policy = cpu;
        step("VM built", t);
        let t = Instant::now();
        vm.restore(&tree)?;
        step("device and vCPU state restored", t);
        step("restored", start);
        Ok(vm)
    }
}

fn no_slots() -> MigratableError {
    MigratableError::Memory(
        KvmMemoryError::InvalidLayout {
            gpa: 0,
            length: 0,
            reason: "memory slots are not registered",
        }
        .into(),
    )
}

/// The CPUID for a new VM's vCPUs: this host's, masked by `template` if any.
fn vcpu_cpuid(kvm: &Kvm, template: Option<&CpuModel>) -> Result<CpuId, KvmVmError> {
    let Some(template) = template else {
        return kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"));
    };
    let host = CpuModel::host()?;
    let entries: Vec<kvm_cpuid_entry2> = cpu_template::apply(host, template)?
        .iter()
        .map(kvm_cpuid_entry2::from)
        .collect();
    CpuId::from_entries(&entries)
        .map_err(|e| KvmVmError::Mismatch(format!("CPUID of {} entries: {e:?}", entries.len())))
}

/// The name a snapshot's guest CPU models get: the config's model's, or `guest`.
fn guest_name(config: &KvmVmConfig) -> String {
    config
        .cpu
        .as_ref()
        .map_or_else(|| "guest".to_owned(), |m| m.name.clone())
}

impl From<cpu_check::CpuRefusal> for KvmVmError {
    fn from(e: cpu_check::CpuRefusal) -> Self {
        match e {
            cpu_check::CpuRefusal::Incompatible(i) => KvmVmError::Cpu(i),
            cpu_check::CpuRefusal::Probe(p) => KvmVmError::State(p),
            cpu_check::CpuRefusal::State(m) => KvmVmError::Migratable(m),
        }
    }
}

/// Adds `config` to `tree` as its `config` section (what [`config_of`] reads).
pub fn add_config(tree: &mut Snapshot, config: &KvmVmConfig) {
    tree.add_state(CONFIG_SECTION, ConfigSection::new(config));
}

/// The [`KvmVmConfig`] recorded in a `vm` snapshot tree.
pub fn config_of(tree: &Snapshot) -> Result<KvmVmConfig, KvmVmError> {
    tree.expect_id(VM_ID)?;
    let section: ConfigSection = tree.state(CONFIG_SECTION)?;
    Ok(section.config()?)
}

impl Pausable for KvmVm {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.stop().map_err(|e| MigratableError::Pause {
            path: VM_ID.to_owned(),
            source: Box::new(e),
        })
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.start().map_err(|e| MigratableError::Resume {
            path: VM_ID.to_owned(),
            source: Box::new(e),
        })
    }
}

impl Snapshottable for KvmVm {
    fn id(&self) -> String {
        VM_ID.to_owned()
    }

    /// The `vm` tree: section `config`, child `devices`, children `vcpu<N>`
    /// ([`save_state`](KvmVm::save_state)). Every vCPU must be paused.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let state = self.save_state()?;
        let mut s = Snapshot::new(VM_ID);
        add_config(&mut s, &self.config);
        state.add_to(&mut s);
        Ok(s)
    }

    /// Restores devices, then every vCPU ([`restore_state`](KvmVm::restore_state)).
    /// The snapshot's config must have this VM's layout and vCPU count, every vCPU's
    /// saved CPU must pass this VM's [`CpuPolicy`], and every section must decode
    /// (all checked before anything is written). Every vCPU must be paused.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let theirs = config_of(snapshot)?;
        if theirs.layout != self.config.layout || theirs.vcpus != self.config.vcpus {
            return Err(restore_error(KvmVmError::Mismatch(format!(
                "snapshot has {} vCPUs and layout {:x?}; this VM has {} vCPUs and {:x?}",
                theirs.vcpus, theirs.layout, self.config.vcpus, self.config.layout
            ))));
        }
        let name = guest_name(&theirs);
        let forced = cpu_check::admit_snapshot(snapshot, &name, &self.cpu_policy)
            .map_err(|e| restore_error(e.into()))?;
        let state =
            MachineState::from_snapshot(snapshot, self.vcpus.len()).map_err(|e| e.within(VM_ID))?;
        let t = Instant::now();
        self.restore_state(&state)?;
        tracing::debug!(
            layout = %state.vm.layout,
            vcpus = state.vcpus.len(),
            elapsed = ?t.elapsed(),
            "devices and vCPUs restored"
        );
        // The guest's model is the restored one from now on (what a later snapshot
        // or migration carries).
        if let Some(m) = cpu_check::snapshot_models(snapshot, &name)?
            .into_iter()
            .next()
        {
            self.config.cpu = Some(m);
        }
        self.cpu_forced = forced;
        Ok(())
    }
}

impl Transportable for KvmVm {
    fn codecs(&self) -> &CodecRegistry {
        &self.codecs
    }
}

impl Migratable for KvmVm {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        let slots = self.slots.as_mut().ok_or_else(no_slots)?;
        Ok(dirty::start_dirty_log(
            self.devices.vm(),
            slots,
            &self.memory,
        )?)
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        let slots = self.slots.as_mut().ok_or_else(no_slots)?;
        Ok(dirty::stop_dirty_log(self.devices.vm(), slots)?)
    }

    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        let slots = self.slots.as_ref().ok_or_else(no_slots)?;
        Ok(dirty::dirty_log(self.devices.vm(), slots, &self.memory)?)
    }

    /// On the destination, with [`set_prefault`](KvmVm::set_prefault) on (the
    /// default) and the VM not yet run, starts the thread that faults guest memory
    /// in ahead of what arrives ([`crate::prefault`]).
    fn start_migration(&mut self, role: MigrationRole) -> Result<(), MigratableError> {
        tracing::debug!(?role, "migration started");
        self.migration_role = Some(role);
        if role == MigrationRole::Destination
            && (self.prefault || self.direct_receive)
            && !self.running
        {
            let mut sink = Prefaulter::new(&self.memory, self.prefault);
            if self.direct_receive {
                // SAFETY: `direct_receive` is set only by `allow_direct_receive`,
                // whose caller guaranteed nothing else writes this VM's memory until
                // it is resumed; the VM has not run, and `start` drops the sink
                // before any vCPU resumes.
                unsafe { sink.allow_direct_reads() };
            }
            self.prefaulter = Some(sink);
        }
        Ok(())
    }

    /// On the source (the destination runs the guest now) this VM is marked
    /// migrated out, and [`start`](KvmVm::start) refuses from then on. On the
    /// destination nothing changes.
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        self.stop_prefault();
        if self.migration_role.take() == Some(MigrationRole::Source) {
            self.migrated_out = true;
            tracing::info!("migrated out: this VM will not run again");
        }
        Ok(())
    }

    fn memory_source(&self) -> &dyn MemorySource {
        &self.memory
    }

    fn memory_sink(&self) -> &dyn MemorySink {
        match &self.prefaulter {
            Some(p) => p,
            None => &self.memory,
        }
    }

    fn can_throttle(&self) -> bool {
        true
    }

    /// [`KvmVm::set_throttle`].
    fn set_throttle(&mut self, percent: u8) -> Result<(), MigratableError> {
        Ok(KvmVm::set_throttle(self, percent)?)
    }
}

/// Postcopy on the destination: the pending pages are discarded and guest memory
/// registered with a userfaultfd ([`missing::arm`]); a vCPU touching a missing page
/// blocks in `KVM_RUN` until the page is placed.
impl MissingPages for KvmVm {
    fn arm_missing(
        &mut self,
        pending: &MemoryRangeTable,
        faults: std::sync::mpsc::Sender<u64>,
    ) -> Result<std::sync::Arc<dyn PagePlacer>, MigratableError> {
        // The prefault thread must be gone first: a page it populated after the
        // pending pages are dropped would read as zeros instead of faulting.
        self.stop_prefault();
        self.missing = None;
        let (armed, placer) = missing::arm(&self.memory, pending, faults)?;
        self.missing = Some(armed);
        tracing::info!(
            pending_bytes = pending.total_bytes(),
            "guest memory armed: missing pages are caught with userfaultfd"
        );
        Ok(placer)
    }

    fn disarm_missing(&mut self) -> Result<(), MigratableError> {
        self.missing = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips() {
        let mut c = KvmVmConfig::new(64 << 20, 2);
        c.clock_restore = ClockRestore::AdvanceByWallTime;
        c.memory.populate = true;
        c.layout.push(MemoryRange::new(1 << 32, 1 << 20));
        assert_eq!(KvmVmConfig::from_bytes(&c.to_bytes()), Ok(c));
    }

    #[test]
    fn hostile_configs_are_typed_errors() {
        let good = KvmVmConfig::new(1 << 20, 1).to_bytes();
        assert!(matches!(
            KvmVmConfig::from_bytes(&good[..10]),
            Err(ConfigError::Truncated { .. })
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(KvmVmConfig::from_bytes(&b), Err(ConfigError::BadMagic));
        let mut b = good.clone();
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            KvmVmConfig::from_bytes(&b),
            Err(ConfigError::Regions(u32::MAX))
        );
        let mut b = good.clone();
        b[16..20].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            KvmVmConfig::from_bytes(&b),
            Err(ConfigError::Truncated { .. })
        ));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            KvmVmConfig::from_bytes(&b),
            Err(ConfigError::TrailingBytes(1))
        );
        let mut b = good.clone();
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(KvmVmConfig::from_bytes(&b), Err(ConfigError::Vcpus(0)));
        let mut b = good.clone();
        b[12] = 7;
        assert_eq!(
            KvmVmConfig::from_bytes(&b),
            Err(ConfigError::Field("clock_restore"))
        );
        // Unaligned region.
        let c = KvmVmConfig {
            layout: vec![MemoryRange::new(0, 123)],
            ..KvmVmConfig::new(0, 1)
        };
        assert!(matches!(
            KvmVmConfig::from_bytes(&c.to_bytes()),
            Err(ConfigError::Layout(_))
        ));
    }

    fn with_cpu() -> KvmVmConfig {
        let mut c = KvmVmConfig::new(64 << 20, 2);
        c.cpu = Some(
            CpuModel::new(
                "pool",
                vec![crate::state::CpuidEntry {
                    function: 0,
                    eax: 0xd,
                    ebx: 0x756e_6547,
                    edx: 0x4965_6e69,
                    ecx: 0x6c65_746e,
                    ..Default::default()
                }],
                4096,
                vec![0x10, 0x6e0],
                Some(2_000_000),
                false,
            )
            .unwrap(),
        );
        c
    }

    #[test]
    fn config_v2_carries_the_cpu_model_and_v1_is_written_without_one() {
        let c = with_cpu();
        let b = c.to_bytes();
        assert_eq!(&b[4..8], &2u32.to_le_bytes());
        assert_eq!(KvmVmConfig::from_bytes(&b), Ok(c));
        let v1 = KvmVmConfig::new(64 << 20, 2).to_bytes();
        assert_eq!(&v1[4..8], &1u32.to_le_bytes());
        // Hostile v2: a CPU block cut short, a huge declared length, trailing bytes,
        // a bad model inside.
        let end = CONFIG_HEADER + 16;
        assert!(matches!(
            KvmVmConfig::from_bytes(&b[..end + 2]),
            Err(ConfigError::Truncated { .. })
        ));
        assert!(matches!(
            KvmVmConfig::from_bytes(&b[..b.len() - 1]),
            Err(ConfigError::Truncated { .. })
        ));
        let mut huge = b.clone();
        huge[end..end + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            KvmVmConfig::from_bytes(&huge),
            Err(ConfigError::Field("cpu model length"))
        );
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            KvmVmConfig::from_bytes(&long),
            Err(ConfigError::TrailingBytes(1))
        );
        let mut bad = b.clone();
        bad[end + 4] = b'X';
        assert_eq!(
            KvmVmConfig::from_bytes(&bad),
            Err(ConfigError::Cpu(CpuModelError::BadMagic))
        );
    }

    proptest::proptest! {
        /// Any bytes, and any one-byte change or cut of a valid v2 config: a typed
        /// error or a config that encodes back to the same bytes; never a panic.
        #[test]
        fn config_decoding_never_panics_and_is_canonical(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            at in 0usize..4096,
            value in proptest::prelude::any::<u8>(),
            cut in 0usize..4096,
        ) {
            let good = with_cpu().to_bytes();
            let mut changed = good.clone();
            let i = at % changed.len();
            changed[i] = value;
            let cut = &good[..cut % (good.len() + 1)];
            for bytes in [&junk[..], &changed[..], cut] {
                if let Ok(c) = KvmVmConfig::from_bytes(bytes) {
                    proptest::prop_assert_eq!(c.to_bytes(), bytes.to_vec());
                }
            }
        }
    }

    #[test]
    fn configs_above_max_guest_ram_are_rejected_before_any_allocation() {
        // One region of 2^56 bytes: valid layout, but its dirty bitmap alone would
        // be 2 TiB. Decoding must refuse it (decoding allocates nothing for RAM).
        let huge = KvmVmConfig::new(1 << 56, 1);
        assert_eq!(huge.validate(), Err(ConfigError::GuestRam(1 << 56)));
        assert_eq!(
            KvmVmConfig::from_bytes(&huge.to_bytes()),
            Err(ConfigError::GuestRam(1 << 56))
        );
        // The sum counts, not the largest region: two regions of the cap each.
        let mut two = KvmVmConfig::new(MAX_GUEST_RAM, 1);
        two.layout
            .push(MemoryRange::new(MAX_GUEST_RAM, MAX_GUEST_RAM));
        assert_eq!(
            KvmVmConfig::from_bytes(&two.to_bytes()),
            Err(ConfigError::GuestRam(2 * MAX_GUEST_RAM))
        );
        // Exactly the cap is accepted (validation only: nothing is mapped).
        let at_cap = KvmVmConfig::new(MAX_GUEST_RAM, 1);
        assert_eq!(KvmVmConfig::from_bytes(&at_cap.to_bytes()), Ok(at_cap));
    }

    #[test]
    fn a_snapshot_file_needing_an_unregistered_codec_is_refused_before_anything_is_built() {
        migration_testkit::require_kvm!();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.snap");
        let handlers = |_| -> ExitHandler { Box::new(|_| crate::runner::ExitAction::Continue) };
        let mut vm = KvmVm::new(
            KvmVmConfig::new(4 << 20, 1),
            migration_serde::registry(),
            handlers,
        )
        .expect("VM");
        vm.save_snapshot(&path).expect("save"); // postcard, the preferred codec
        let json = migration_serde::registry()
            .get(migration_serde::JSON_ID)
            .cloned()
            .expect("json");
        let err = KvmVm::restore_from_file(
            &path,
            RestoreMode::Lazy,
            CodecRegistry::new().with(json),
            handlers,
        )
        .expect_err("no postcard");
        assert_eq!(
            err.to_string(),
            "the snapshot needs codecs [pcd1]; not registered here: [pcd1]"
        );
        assert!(matches!(
            err,
            KvmVmError::Migratable(MigratableError::MissingCodecs { .. })
        ));
    }

    /// The role decides, not whether dirty logging ran: a source refuses to run
    /// after its migration completed, a destination runs.
    #[test]
    fn only_a_completed_source_refuses_to_run() {
        migration_testkit::require_kvm!();
        let handlers = |_| -> ExitHandler { Box::new(|_| crate::runner::ExitAction::Continue) };
        let new = || {
            KvmVm::new(
                KvmVmConfig::new(4 << 20, 1),
                migration_serde::registry(),
                handlers,
            )
            .expect("VM")
        };
        let mut destination = new();
        destination
            .start_migration(MigrationRole::Destination)
            .unwrap();
        // Even with dirty logging (which only a source needs) it stays runnable.
        destination.start_dirty_log().unwrap();
        destination.stop_dirty_log().unwrap();
        destination.complete_migration().unwrap();
        destination.start().expect("a destination runs");
        destination.stop().unwrap();

        let mut source = new();
        source.start_migration(MigrationRole::Source).unwrap();
        source.complete_migration().unwrap();
        assert!(matches!(source.start(), Err(KvmVmError::MigratedOut)));
    }

    #[test]
    fn incoming_vm_ignores_the_senders_populate_flag() {
        migration_testkit::require_kvm!();
        let mut sent = KvmVmConfig::new(4 << 20, 1);
        sent.memory = MemoryOptions {
            huge_pages: false,
            populate: true,
        };
        let incoming = IncomingVm {
            version: migration_core::protocol::PROTOCOL_VERSION,
            arch: Arch::X86_64,
            layout: sent.layout.clone(),
            config: sent.to_bytes(),
            producer: "test".to_owned(),
            features: 0,
        };
        let vm = KvmVm::for_incoming(&incoming, migration_serde::registry(), |_| {
            Box::new(|_| crate::runner::ExitAction::Continue)
        })
        .expect("for_incoming");
        // populate is the receiver's choice (off); huge_pages is kept as sent.
        assert_eq!(
            vm.config().memory,
            MemoryOptions {
                huge_pages: false,
                populate: false,
            }
        );
    }
}
