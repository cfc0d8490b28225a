//! KVM-gated guest memory snapshot tests with the memory-pattern guest, which writes
//! a known pattern over every page and checks it on every pass: a restored guest
//! whose memory lost or staled a page reports a mismatch.
//!
//! Without a usable /dev/kvm these tests print `skipped: /dev/kvm not usable: …` and
//! pass, unless `MIGRATION_REQUIRE_KVM=1`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use std::sync::Arc;

use kvm_bindings::kvm_pit_config;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration_core::container::WriteOptions;
use migration_core::{Codec, CodecRegistry, MemoryError, MemoryRange, MemorySource, Snapshot};
use migration_kvm::dirty;
use migration_kvm::memory::{GuestRam, KvmSlots};
use migration_kvm::restore::{EagerOptions, RestoreError};
use migration_kvm::snapshot_memory::{
    content_digest, merge_chain, restore_eager_from, restore_lazy_from, write_full,
    write_incremental, SnapshotMemoryError,
};
use migration_kvm::{
    restore_vm_state, save_vm_state, ClockRestore, DeviceLayout, KvmVcpu, VcpuState, VmState,
};
use migration_testkit::guest::{load_with_arg, run_until, Guest, PortMonitor, Verdict};

const MIB: u64 = 1 << 20;
const RUN: Duration = Duration::from_secs(60);

/// A one-vCPU VM over a [`GuestRam`].
struct Vm {
    vcpu: KvmVcpu<VcpuFd>,
    vm: VmFd,
    kvm: Kvm,
    mem: GuestRam,
    slots: Option<KvmSlots>,
}

impl Vm {
    fn new(mem: GuestRam, log_dirty: bool) -> Result<Self> {
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        vm.create_irq_chip()?;
        vm.create_pit2(kvm_pit_config::default())?;
        let slots = mem.register(&vm, 0, log_dirty)?;
        let fd = vm.create_vcpu(0)?;
        let vcpu = KvmVcpu::from_fd(&kvm, &vm, &DeviceLayout::FULL_WITH_PIT, 0, fd)?;
        Ok(Self {
            vcpu,
            vm,
            kvm,
            mem,
            slots: Some(slots),
        })
    }

    fn boot(mem: GuestRam, log_dirty: bool, arg: u64) -> Result<Self> {
        let vm = Self::new(mem, log_dirty)?;
        load_with_arg(
            vm.mem.mmap(),
            vm.vcpu.backend(),
            &vm.kvm,
            Guest::MemoryPattern.image(),
            arg,
        )?;
        Ok(vm)
    }

    /// Runs until `passes` more completed passes (progress ≥ `baseline`).
    fn run(&mut self, passes: u64, baseline: Option<u32>) -> Result<u32> {
        let mut m = match baseline {
            Some(b) => PortMonitor::with_baseline(passes, b),
            None => PortMonitor::new(passes),
        };
        let v = run_until(self.vcpu.backend_mut(), &mut m, RUN)?;
        if v != Verdict::Pass {
            bail!("guest verdict {v:?}, infos {:x?}", m.infos());
        }
        m.last_progress().context("no progress")
    }

    /// The dirty set since the previous call (KVM log OR VMM bitmap).
    fn dirty(&self) -> Result<migration_core::MemoryRangeTable> {
        let slots = self.slots.as_ref().context("not registered")?;
        Ok(dirty::dirty_log(&self.vm, slots, &self.mem)?)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(s) = self.slots.take() {
            let _ = s.unregister(&self.vm);
        }
    }
}

/// The VM's device state and the vCPU's state as a snapshot tree (`vm/devices`,
/// `vm/vcpu0`), encoded with postcard: what the container stores beside memory.
fn save_cpu(vm: &Vm) -> Result<Snapshot> {
    let mut root = Snapshot::new("vm");
    let mut devices = Snapshot::new("devices");
    save_vm_state(&vm.vm, &DeviceLayout::FULL_WITH_PIT)?.add_to(&mut devices);
    root.add_child(devices);
    let mut vcpu = Snapshot::new("vcpu0");
    vm.vcpu.save_state()?.add_to(&mut vcpu);
    root.add_child(vcpu);
    let codec: Arc<dyn Codec> = Arc::new(migration_serde::PostcardCodec);
    root.encode(&codec)?;
    Ok(root)
}

/// Restores what [`save_cpu`] saved (read back from the container) into `vm`.
fn restore_cpu(vm: &Vm, tree: &Snapshot) -> Result<()> {
    let mut tree = tree.clone();
    tree.resolve_codecs(&migration_serde::registry());
    let devices = tree.child("devices").context("no devices")?;
    restore_vm_state(
        &vm.vm,
        &DeviceLayout::FULL_WITH_PIT,
        &VmState::from_snapshot(devices)?,
        ClockRestore::Exact,
    )?;
    let state = VcpuState::from_snapshot(tree.child("vcpu0").context("no vcpu0")?)?;
    vm.vcpu.restore_state(&state)?;
    Ok(())
}

fn all_memory(m: &GuestRam) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    for r in m.layout() {
        m.write_memory_to(r.gpa, r.length, &mut v)?;
    }
    Ok(v)
}

fn file_bytes(f: &mut File) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn full_snapshot_restores_eager_and_lazy_and_the_guest_continues() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let layout = [MemoryRange::new(0, 64 * MIB)];
    let mut vm = Vm::boot(GuestRam::anonymous(&layout)?, false, 0)?;
    let progress = vm.run(3, None)?;
    let state = save_cpu(&vm)?;
    let mut file = tempfile::tempfile()?;
    let summary = write_full(&mut file, &state, &vm.mem, &WriteOptions::default())?;
    ensure!(summary.data_bytes > 60 * MIB, "{summary:?}");
    let saved = all_memory(&vm.mem)?;
    drop(vm);

    // Eager.
    let codecs = migration_serde::registry();
    let (cpu, mem) = restore_eager_from(&mut file, &layout, &codecs, EagerOptions::default())?;
    ensure!(
        all_memory(&mem)? == saved,
        "eager restore differs from the saved memory"
    );
    let mut vm = Vm::new(mem, false)?;
    restore_cpu(&vm, &cpu)?;
    vm.run(3, Some(progress)).context("eager-restored guest")?;
    drop(vm);

    // Lazy: the guest runs on the file's pages and rewrites many of them.
    let before = file_bytes(&mut file)?;
    let (cpu, mem) = restore_lazy_from(&mut file, &layout, &codecs)?;
    let mut vm = Vm::new(mem, false)?;
    restore_cpu(&vm, &cpu)?;
    vm.run(3, Some(progress)).context("lazy-restored guest")?;
    ensure!(
        all_memory(&vm.mem)? != saved,
        "the guest should have rewritten pages"
    );
    drop(vm);
    ensure!(
        file_bytes(&mut file)? == before,
        "lazy restore modified the snapshot file"
    );
    Ok(())
}

#[test]
fn incremental_chain_merged_equals_a_full_snapshot() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let layout = [MemoryRange::new(0, 32 * MIB)];
    let mut vm = Vm::boot(GuestRam::anonymous(&layout)?, true, 0)?;
    let mem = vm.mem.clone();
    let mut progress = vm.run(2, None)?;
    let mut base = tempfile::tempfile()?;
    write_full(
        &mut base,
        &Snapshot::new("vm"),
        &mem,
        &WriteOptions::default(),
    )?;
    vm.dirty()?; // the base holds everything up to now
    base.seek(SeekFrom::Start(0))?;
    let mut parent = content_digest(&mut base)?;
    let mut chain = Vec::new();
    for _ in 0..3 {
        progress = vm.run(1, Some(progress))?;
        let dirty = vm.dirty()?;
        ensure!(
            !dirty.is_empty() && dirty.total_bytes() < 32 * MIB,
            "dirty {}",
            dirty.total_bytes()
        );
        let mut inc = tempfile::tempfile()?;
        write_incremental(
            &mut inc,
            &Snapshot::new("vm"),
            &mem,
            &dirty,
            parent,
            &WriteOptions::default(),
        )?;
        inc.seek(SeekFrom::Start(0))?;
        parent = content_digest(&mut inc)?;
        chain.push(inc);
    }
    let mut full = tempfile::tempfile()?;
    write_full(
        &mut full,
        &Snapshot::new("vm"),
        &mem,
        &WriteOptions::default(),
    )?;
    if let Some(slots) = vm.slots.as_mut() {
        dirty::stop_dirty_log(&vm.vm, slots)?;
    }

    let mut merged = tempfile::tempfile()?;
    merge_chain(&mut base, &mut chain, &mut merged, &WriteOptions::default())?;
    let codecs = CodecRegistry::new();
    let (_, from_merged) =
        restore_eager_from(&mut merged, &layout, &codecs, EagerOptions::default())?;
    let (_, from_full) = restore_eager_from(&mut full, &layout, &codecs, EagerOptions::default())?;
    let (a, b) = (all_memory(&from_merged)?, all_memory(&from_full)?);
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        bail!("merged chain differs from the full snapshot at {i:#x}");
    }
    ensure!(a == all_memory(&mem)?);

    // A chain missing its first link is refused.
    let mut out = tempfile::tempfile()?;
    let e = merge_chain(
        &mut base,
        &mut chain[1..],
        &mut out,
        &WriteOptions::default(),
    );
    ensure!(
        matches!(e, Err(SnapshotMemoryError::ParentMismatch { index: 0, .. })),
        "{e:?}"
    );
    Ok(())
}

#[test]
fn four_gib_guest_touching_64_mib_makes_a_sparse_snapshot() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let layout = [MemoryRange::new(0, 4096 * MIB)];
    let mut vm = Vm::boot(GuestRam::anonymous(&layout)?, false, MIB + 64 * MIB)?;
    vm.run(1, None)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("snap");
    let mut file = File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let summary = write_full(
        &mut file,
        &Snapshot::new("vm"),
        &vm.mem,
        &WriteOptions::default(),
    )?;
    file.sync_all()?;
    let allocated = file.metadata()?.blocks() * 512;
    eprintln!(
        "4 GiB guest: file length {} MiB, allocated {} MiB, data {} MiB",
        file.metadata()?.len() >> 20,
        allocated >> 20,
        summary.data_bytes >> 20
    );
    ensure!(summary.data_bytes >= 64 * MIB, "{summary:?}");
    ensure!(
        allocated < 128 * MIB,
        "snapshot allocates {allocated} bytes"
    );
    Ok(())
}

#[test]
fn snapshot_larger_than_the_guest_layout_is_a_typed_error() -> Result<()> {
    // Plain memory is enough: no KVM needed to build the file.
    let layout = [MemoryRange::new(0, 16 * MIB)];
    let mem = GuestRam::anonymous(&layout)?;
    migration_core::MemorySink::write_memory(&mem, 15 * MIB, &[1; 4096])?;
    let mut file = tempfile::tempfile()?;
    write_full(
        &mut file,
        &Snapshot::new("vm"),
        &mem,
        &WriteOptions::default(),
    )?;
    let small = [MemoryRange::new(0, 8 * MIB)];
    let codecs = CodecRegistry::new();
    for lazy in [false, true] {
        let r = if lazy {
            restore_lazy_from(&mut file, &small, &codecs).map(|_| ())
        } else {
            restore_eager_from(&mut file, &small, &codecs, EagerOptions::default()).map(|_| ())
        };
        ensure!(
            matches!(
                r,
                Err(SnapshotMemoryError::Restore(RestoreError::Extent(
                    MemoryError::OutOfRange { .. }
                )))
            ),
            "lazy={lazy}: {r:?}"
        );
    }
    Ok(())
}
