//! The pause protocol's pieces with a real vCPU: the exit handler of a
//! `VcpuRunner` gets MMIO and port exits with their data, a vCPU that parks right
//! after an `IN` has the value in its register (the pending I/O was completed),
//! and a VMM's own run loop built from `KickableVcpu` and `PauseControl` pauses a
//! spinning guest and runs jobs on its thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_kvm::park::Request;
use migration_kvm::{
    kick, DeviceLayout, ExitAction, ExitEvent, HostCaps, KickableVcpu, KvmVcpu, PauseControl,
    VcpuRunner,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const CODE: u64 = 0x1000;
const RAM: usize = 64 << 10;
const MMIO: u64 = 0x2_0000;

/// Real mode at `CODE`: an MMIO write and read above RAM, a port read, the value
/// echoed to a port, then a spin.
const GUEST: &[u8] = &[
    0xb8, 0x00, 0x20, // mov ax, 0x2000
    0x8e, 0xd8, // mov ds, ax
    0xc6, 0x06, 0x00, 0x00, 0x5a, // mov byte [0], 0x5a    (MMIO write at 0x20000)
    0xa0, 0x01, 0x00, // mov al, [1]             (MMIO read at 0x20001)
    0x88, 0xc4, // mov ah, al
    0xe4, 0x11, // in al, 0x11
    0xe6, 0x10, // out 0x10, al
    0x88, 0xe0, // mov al, ah
    0xe6, 0x10, // out 0x10, al
    0xeb, 0xfe, // jmp $
];
/// Offsets into `GUEST`.
const AFTER_IN: u64 = 17;
const SPIN: u64 = 23;

struct Machine {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    // Dropped after the VM.
    _mem: GuestMemoryMmap,
}

fn machine() -> Result<Machine> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    DeviceLayout::FULL.create(&vm)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)])?;
    mem.write_slice(GUEST, GuestAddress(CODE))?;
    let region = mem.iter().next().context("one region")?;
    // SAFETY: the mapping is owned by `mem`, which outlives the VM (field order).
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        })?
    };
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    Ok(Machine {
        kvm,
        vm,
        vcpu,
        _mem: mem,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    In(u16),
    Out(u16, Vec<u8>),
    Other(String),
}

#[test]
fn the_runner_hands_mmio_and_port_exits_over_with_their_data() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let m = machine()?;
    let caps = HostCaps::probe(&m.kvm, &m.vm, &DeviceLayout::FULL)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let handler = Box::new(move |ev: ExitEvent<'_>| {
        let mut log = log.lock().unwrap();
        match ev {
            ExitEvent::MmioWrite { addr, data } => log.push(Seen::MmioWrite(addr, data.to_vec())),
            ExitEvent::MmioRead { addr, data } => {
                log.push(Seen::MmioRead(addr, data.len()));
                data.fill(0xa7);
            }
            ExitEvent::IoIn { port, data } => {
                log.push(Seen::In(port));
                data.fill(0x3c);
                // Park right after the IN: its value must still reach the guest.
                return ExitAction::Pause;
            }
            ExitEvent::IoOut { port, data } => log.push(Seen::Out(port, data.to_vec())),
            other => log.push(Seen::Other(format!("{other:?}"))),
        }
        ExitAction::Continue
    });
    let runner = VcpuRunner::spawn(KvmVcpu::new(0, m.vcpu, caps), handler)?;
    runner.resume()?;
    ensure!(
        runner.wait_for_pause(Duration::from_secs(30))?,
        "the IN parks the vCPU"
    );
    let regs = runner.with_vcpu(|v| v.backend().get_regs())??;
    ensure!(
        regs.rip == CODE + AFTER_IN && regs.rax & 0xff == 0x3c,
        "the IN is complete: rip {:#x}, al {:#x}",
        regs.rip,
        regs.rax & 0xff
    );
    ensure!(
        regs.rax >> 8 & 0xff == 0xa7,
        "the MMIO read's value reached the guest"
    );
    // Resumed, the guest echoes both values and spins; pause kicks it out.
    runner.resume()?;
    let want = vec![
        Seen::MmioWrite(MMIO, vec![0x5a]),
        Seen::MmioRead(MMIO + 1, 1),
        Seen::In(0x11),
        Seen::Out(0x10, vec![0x3c]),
        Seen::Out(0x10, vec![0xa7]),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < want.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    runner.pause()?;
    ensure!(*seen.lock().unwrap() == want, "{:?}", seen.lock().unwrap());
    let rip = runner.with_vcpu(|v| v.backend().get_regs().map(|r| r.rip))??;
    ensure!(rip == CODE + SPIN, "paused in the spin: {rip:#x}");
    ensure!(runner.last_exit().is_none(), "paused by the controller");
    Ok(())
}

#[test]
fn a_vmms_own_run_loop_pauses_with_the_public_pieces() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let m = machine()?;
    let control = Arc::new(PauseControl::<VcpuFd>::new());
    let c = control.clone();
    let fd = m.vcpu;
    // The VMM's own loop: its own exit handling, the crate's pause pieces.
    let thread = std::thread::spawn(move || -> Result<()> {
        let mut vcpu = KickableVcpu::new(fd)?;
        loop {
            if c.checkpoint() != Request::Run {
                vcpu.complete_pending_io()?;
                if !vcpu.with_vcpu(|fd| c.park(fd)) {
                    break;
                }
                continue;
            }
            match vcpu.run() {
                Ok(VcpuExit::MmioRead(_, data)) | Ok(VcpuExit::IoIn(_, data)) => data.fill(1),
                Ok(_) => {}
                Err(e) if e.errno() == libc::EINTR => vcpu.clear_immediate_exit(),
                Err(e) => return Err(e.into()),
            }
        }
        c.exited();
        Ok(())
    });
    control.wait_parked(None)?;
    control.resume()?;
    // The guest ends in `jmp $`: only a kick gets it out of KVM_RUN.
    let spins = |control: &PauseControl<VcpuFd>| -> Result<bool> {
        Ok(control.run_on_vcpu(|fd| fd.get_regs().map(|r| r.rip))?? == CODE + SPIN)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        control.pause(|| {
            let _ = kick(&thread);
        })?;
        if spins(&control)? || std::time::Instant::now() > deadline {
            break;
        }
        control.resume()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(
        spins(&control)?,
        "the guest reached its spin and was paused there"
    );
    // Paused and parked: jobs run on the vCPU thread, the guest stays put.
    ensure!(control.is_parked());
    control.quit(|| {
        let _ = kick(&thread);
    });
    thread.join().expect("vCPU thread")?;
    Ok(())
}
