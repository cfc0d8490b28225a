//! A VMM's own VM type made `Migratable` from migration-kvm's pieces (no `KvmVm`),
//! live-migrated over a unix socket to a second VM in another thread while its guest
//! keeps incrementing a counter in memory.
//! `cargo run --release -p migration-kvm --example own_migratable`
use std::{os::unix::net::UnixStream, time::Duration};

use kvm_ioctls::{Kvm, VmFd};
use migration_core::*;
use migration_kvm::memory::{GuestRam, KvmSlots};
use migration_kvm::{dirty, ClockRestore, DeviceLayout, ExitAction, HostCaps, KvmVcpu};
use migration_kvm::{KvmVmDevices, VcpuRunner};

type Error = Box<dyn std::error::Error + Send + Sync>;
const LAYOUT: DeviceLayout = DeviceLayout::FULL_WITH_PIT;
/// Real mode at 0x1000: `inc word [0x2000]; jmp 0x1000`.
const GUEST: [u8; 6] = [0xff, 0x06, 0x00, 0x20, 0xeb, 0xfa];

struct OwnVm {
    runner: VcpuRunner, // first: its thread stops before the VM and memory go
    vm: VmFd,
    ram: GuestRam,
    slots: KvmSlots,
    codecs: CodecRegistry,
    role: Option<MigrationRole>,
    migrated_out: bool,
}

impl OwnVm {
    fn new() -> Result<Self, Error> {
        let (kvm, ram) = (
            Kvm::new()?,
            GuestRam::anonymous(&[MemoryRange::new(0, 1 << 20)])?,
        );
        let vm = kvm.create_vm()?;
        LAYOUT.create(&vm)?;
        let slots = ram.register(&vm, 0, false)?; // dropped registered: leaked, never freed
        let fd = vm.create_vcpu(0)?;
        fd.set_cpuid2(&kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?)?;
        let (mut sregs, mut regs) = (fd.get_sregs()?, fd.get_regs()?);
        (sregs.cs.base, sregs.cs.selector, regs.rip, regs.rflags) = (0, 0, 0x1000, 2);
        fd.set_sregs(&sregs)?;
        fd.set_regs(&regs)?;
        let vcpu = KvmVcpu::new(0, fd, HostCaps::probe(&kvm, &vm, &LAYOUT)?);
        let runner = VcpuRunner::spawn(vcpu, Box::new(|_| ExitAction::Pause))?;
        let codecs = migration_serde::registry();
        Ok(Self {
            runner,
            vm,
            ram,
            slots,
            codecs,
            role: None,
            migrated_out: false,
        })
    }

    fn counter(&self) -> Result<u16, MemoryError> {
        let mut b = [0; 2];
        self.ram
            .read_memory(0x2000, &mut b)
            .map(|()| u16::from_le_bytes(b))
    }

    fn devices(&self) -> KvmVmDevices<&VmFd> {
        KvmVmDevices::new(&self.vm, LAYOUT, ClockRestore::Exact)
    }
}

impl Pausable for OwnVm {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.runner.pause().map_err(Into::into)
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        if self.migrated_out {
            let source = "its guest runs on the destination".into();
            return Err(MigratableError::Resume {
                path: "vm".into(),
                source,
            });
        }
        Ok(self.runner.resume()?)
    }
}

impl Snapshottable for OwnVm {
    fn id(&self) -> String {
        "vm".into()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new("vm");
        s.snapshot_child(&mut self.devices())?;
        s.snapshot_child(&mut self.runner).map(|()| s)
    }
    fn restore(&mut self, s: &Snapshot) -> Result<(), MigratableError> {
        s.restore_child(&mut self.devices())?;
        s.restore_child(&mut self.runner)
    }
}

impl Transportable for OwnVm {
    fn codecs(&self) -> &CodecRegistry {
        &self.codecs
    }
}

impl Migratable for OwnVm {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(dirty::start_dirty_log(
            &self.vm,
            &mut self.slots,
            &self.ram,
        )?)
    }
    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(dirty::stop_dirty_log(&self.vm, &mut self.slots)?)
    }
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        Ok(dirty::dirty_log(&self.vm, &self.slots, &self.ram)?)
    }
    fn start_migration(&mut self, role: MigrationRole) -> Result<(), MigratableError> {
        self.role = Some(role);
        Ok(())
    }
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        self.migrated_out = self.role == Some(MigrationRole::Source);
        Ok(())
    }
    fn memory_source(&self) -> &dyn MemorySource {
        &self.ram
    }
    fn memory_sink(&self) -> &dyn MemorySink {
        &self.ram
    }
}

fn main() -> Result<(), Error> {
    if Kvm::new().is_err() {
        eprintln!("skipped: /dev/kvm not usable");
        return Ok(());
    }
    let mut source = OwnVm::new()?;
    source.ram.write_memory(0x1000, &GUEST)?;
    source.resume()?;
    let (a, b) = UnixStream::pair()?;
    a.set_read_timeout(Some(Duration::from_secs(30)))?;
    b.set_read_timeout(Some(Duration::from_secs(30)))?;
    let opts = ReceiveOptions::new(Arch::host(), migration_serde::registry());
    let build = |_: &IncomingVm| OwnVm::new().map_err(MigratableError::Build);
    let dest = std::thread::spawn(move || receive_migration_over(b, &opts, build));
    let report = send_migration_over(&mut source, a, &mut MigrationOptions::default())?;
    let (dest, _) = dest.join().expect("destination thread")?;

    let (handed_over, t) = (source.counter()?, std::time::Instant::now());
    while dest.counter()? == handed_over && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(source.resume().is_err(), "the source never runs again");
    assert_ne!(
        dest.counter()?,
        handed_over,
        "the guest runs on the destination"
    );
    println!("{report}\nthe guest's counter went on from {handed_over} on the destination");
    Ok(())
}
