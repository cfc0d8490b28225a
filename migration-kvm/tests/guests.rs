//! Real guests (KVM-gated): run, pause with the kick protocol, save vCPU + VM state
//! (+ a copy of memory), restore into a fresh VM, resume, and check the guest goes on
//! from exactly the saved point. Skipped visibly without /dev/kvm, failing instead
//! under `MIGRATION_REQUIRE_KVM=1`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use kvm_ioctls::VmFd;
use migration_core::{Codec, Snapshot};
use migration_kvm::{
    restore_vm_state, save_vm_state, ClockRestore, DeviceLayout, HostCaps, KvmVcpu, KvmVmDevices,
    VcpuRunner, VcpuState, VcpuStep, VmState,
};
use migration_testkit::guest::{monitor_handler, Failure, Guest, PortMonitor, TestVm, Verdict};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod child;

const RAM: usize = 32 << 20;
/// Progress events before the snapshot, and after each restore.
const BEFORE: u64 = 5;
const AFTER: u64 = 8;
/// Generous: only a failing guest waits this long.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a dead timer is given to tick anyway.
const DEAD_TIMER_WAIT: Duration = Duration::from_secs(3);
const CHILD_ENV: &str = "MIGRATION_KVM_RESTORE_CHILD_DIR";

/// One running VM: its fds, its memory, its vCPU thread and what the guest reported.
struct Machine {
    vm: VmFd,
    mem: GuestMemoryMmap,
    runner: VcpuRunner,
    monitor: Arc<Mutex<PortMonitor>>,
}

/// What a snapshot holds.
struct Saved {
    vm: VmState,
    vcpu: VcpuState,
    memory: Vec<u8>,
    last_progress: u32,
}

impl Machine {
    /// A fresh VM; `guest` is booted into it, or it is left empty for a restore.
    /// With `stop_after`, the exit handler parks the vCPU at the exit that brings the
    /// progress count to that number (a deterministic point); otherwise the test
    /// pauses it from outside with the kick protocol.
    fn new(guest: Option<Guest>, monitor: PortMonitor, stop_after: Option<u64>) -> Result<Self> {
        let t = TestVm::new(RAM)?;
        if let Some(g) = guest {
            t.boot(g.image(), 0)?;
        }
        let TestVm {
            vcpu, vm, kvm, mem, ..
        } = t;
        let caps = HostCaps::probe(&kvm, &vm, &DeviceLayout::FULL_WITH_PIT)?;
        let monitor = Arc::new(Mutex::new(monitor));
        let runner = VcpuRunner::spawn(
            KvmVcpu::new(0, vcpu, caps),
            monitor_handler(monitor.clone(), stop_after),
        )?;
        Ok(Self {
            vm,
            mem,
            runner,
            monitor,
        })
    }

    fn monitor(&self) -> PortMonitor {
        self.monitor.lock().unwrap().clone()
    }

    /// Runs until `n` progress events (then pauses from outside, with a kick), a
    /// failure, or `timeout`. Returns the monitor.
    fn run_for(&self, n: u64, timeout: Duration) -> Result<PortMonitor> {
        self.runner.resume()?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.monitor();
            if m.progress_events() >= n || matches!(m.verdict(), Verdict::Fail(_)) {
                break;
            }
            if self.runner.is_paused() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.runner.pause()?;
        let mut m = self.monitor.lock().unwrap();
        if m.progress_events() < n {
            m.on_timeout();
        }
        Ok(m.clone())
    }

    fn save(&self) -> Result<Saved> {
        ensure!(self.runner.is_paused());
        let last_progress = self
            .monitor()
            .last_progress()
            .ok_or_else(|| anyhow!("no progress before the snapshot"))?;
        let mut memory = vec![0u8; RAM];
        self.mem.read_slice(&mut memory, GuestAddress(0))?;
        Ok(Saved {
            vm: save_vm_state(&self.vm, &DeviceLayout::FULL_WITH_PIT)?,
            vcpu: self.runner.save_state()?,
            memory,
            last_progress,
        })
    }

    /// A fresh VM holding `saved`, paused, with a monitor that expects progress
    /// after `saved.last_progress`.
    fn restore(
        saved: &Saved,
        order: Option<Vec<VcpuStep>>,
        stop_after: Option<u64>,
    ) -> Result<Self> {
        let m = Machine::new(
            None,
            PortMonitor::with_baseline(AFTER, saved.last_progress),
            stop_after,
        )?;
        m.mem.write_slice(&saved.memory, GuestAddress(0))?;
        restore_vm_state(
            &m.vm,
            &DeviceLayout::FULL_WITH_PIT,
            &saved.vm,
            ClockRestore::Exact,
        )?;
        match order {
            None => m.runner.restore_state(&saved.vcpu)?,
            Some(order) => {
                let state = saved.vcpu.clone();
                m.runner
                    .with_vcpu(move |v| v.restore_state_in_order(&state, order))??
            }
        }
        // The registers read back are those saved.
        let back = m.runner.save_state()?;
        ensure!(back.regs == saved.vcpu.regs, "regs differ after restore");
        ensure!(back.sregs == saved.vcpu.sregs, "sregs differ after restore");
        ensure!(
            back.xsave == saved.vcpu.xsave,
            "xsave differs after restore"
        );
        ensure!(back.xcrs == saved.vcpu.xcrs, "xcrs differ after restore");
        Ok(m)
    }
}

fn pass(m: &PortMonitor) -> Result<()> {
    match m.verdict() {
        Verdict::Pass => Ok(()),
        v => bail!("guest failed: {v:?} (monitor {m:?})"),
    }
}

/// Runs `guest`, snapshots it, restores into two fresh VMs and checks each goes on
/// from the saved point; `exact` = the first progress after restore must be the
/// saved one + 1 (deterministic guests).
fn snapshot_and_restore_twice(guest: Guest, exact: bool) -> Result<()> {
    let src = Machine::new(Some(guest), PortMonitor::new(BEFORE), None)?;
    pass(&src.run_for(BEFORE, TIMEOUT)?)?;
    let saved = src.save()?;
    drop(src);

    let mut runs = Vec::new();
    for _ in 0..2 {
        // Both restored VMs park at the exit of their AFTER-th progress event.
        let dst = Machine::restore(&saved, None, Some(AFTER))?;
        let m = dst.run_for(AFTER, TIMEOUT)?;
        pass(&m)?;
        let first = m.first_progress().unwrap_or(0);
        let l = saved.last_progress;
        if exact {
            ensure!(
                first == l + 1,
                "{guest:?}: first progress after restore is {first}, saved was {l}"
            );
        } else {
            ensure!(
                first > l && first <= l + 2,
                "{guest:?}: first progress after restore is {first}, saved was {l}"
            );
        }
        ensure!(m.progress_events() == AFTER);
        let state = dst.runner.save_state()?;
        runs.push((
            m.first_progress(),
            m.last_progress(),
            state.regs,
            state.xsave,
        ));
    }
    if exact {
        // Same progress values, and the same registers at the same exit.
        ensure!(
            runs[0] == runs[1],
            "{guest:?}: two restores of one snapshot diverged: {:?} vs {:?}",
            (runs[0].0, runs[0].1, runs[0].2.get()),
            (runs[1].0, runs[1].1, runs[1].2.get())
        );
    }
    Ok(())
}

#[test]
fn counter_avx_continues_after_restore_into_fresh_vms() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    snapshot_and_restore_twice(Guest::CounterAvx, true)
}

#[test]
fn memory_pattern_continues_after_restore_into_fresh_vms() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    snapshot_and_restore_twice(Guest::MemoryPattern, true)
}

#[test]
fn timer_keeps_ticking_after_restore_into_fresh_vms() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    snapshot_and_restore_twice(Guest::Timer, false)
}

/// MSRs before lapic: KVM_SET_LAPIC resets the timer that the TSC_DEADLINE write
/// armed, and the timer guest stops ticking. Kept so the order cannot regress
/// silently; the same snapshot restored in the right order ticks (control).
#[test]
fn msrs_before_lapic_kills_the_timer() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let src = Machine::new(Some(Guest::Timer), PortMonitor::new(BEFORE), None)?;
    // The guest's timer handler re-arms the deadline, so a snapshot taken with a
    // tick pending or inside the handler revives the timer whatever the restore
    // order. Save only at a point where the timer lives on nothing but the armed
    // TSC_DEADLINE, which is what the restore order decides.
    let mut target = BEFORE;
    let saved = loop {
        pass(&src.run_for(target, TIMEOUT)?)?;
        let saved = src.save()?;
        if timer_only_armed(&saved.vcpu) {
            break saved;
        }
        target += 1;
        ensure!(
            target < BEFORE + 200,
            "never caught the guest in ring 3 with no tick pending"
        );
    };
    drop(src);

    let mut wrong: Vec<VcpuStep> = migration_kvm::order::VCPU_RESTORE_ORDER
        .iter()
        .map(|o| o.step)
        .collect();
    let lapic = wrong.iter().position(|s| *s == VcpuStep::Lapic).unwrap();
    let msrs = wrong.iter().position(|s| *s == VcpuStep::Msrs).unwrap();
    wrong.swap(lapic, msrs);
    let dead = Machine::restore(&saved, Some(wrong), None)?;
    let m = dead.run_for(1, DEAD_TIMER_WAIT)?;
    match m.verdict() {
        Verdict::Fail(Failure::Timeout { seen: 0, .. }) => {}
        v => bail!("with MSRs before lapic the timer should be dead, got {v:?}"),
    }

    let alive = Machine::restore(&saved, None, None)?;
    pass(&alive.run_for(AFTER, TIMEOUT)?)
}

/// The timer guest's vector.
const TIMER_VECTOR: usize = 0x20;

/// True when `vcpu` is in the ring-3 loop, with no timer interrupt pending,
/// injected or in service, and a deadline armed: the only thing that keeps the
/// timer alive is the TSC_DEADLINE MSR.
fn timer_only_armed(vcpu: &VcpuState) -> bool {
    let Some(lapic) = &vcpu.lapic else {
        return false; // no in-kernel LAPIC: no timer
    };
    let lapic = &lapic.get().regs;
    // IRR at 0x200 and ISR at 0x100, one 32-bit register per 16 bytes.
    let bit = |base: usize| {
        let reg = base + (TIMER_VECTOR / 32) * 0x10;
        let word = u32::from_le_bytes(std::array::from_fn(|i| lapic[reg + i] as u8));
        word & (1 << (TIMER_VECTOR % 32)) != 0
    };
    let events = vcpu.vcpu_events.get();
    let deadline = vcpu
        .msrs
        .0
        .iter()
        .find(|m| m.index == migration_kvm::order::MSR_IA32_TSC_DEADLINE)
        .map_or(0, |m| m.data);
    vcpu.sregs.get().cs.selector & 3 == 3
        && !bit(0x200)
        && !bit(0x100)
        && events.interrupt.injected == 0
        && deadline != 0
}

/// Writes `saved` to `dir`: `snapshot.bin` (the snapshot tree, postcard) and
/// `memory.raw`.
fn write_snapshot_files(saved: &Saved, dir: &Path) -> Result<()> {
    let codec: Arc<dyn Codec> = Arc::new(migration_serde::PostcardCodec);
    let mut root = Snapshot::new("vm");
    let mut devices = Snapshot::new(KvmVmDevices::<VmFd>::ID);
    saved.vm.add_to(&mut devices);
    root.add_child(devices);
    let mut vcpu = Snapshot::new("vcpu0");
    saved.vcpu.add_to(&mut vcpu);
    root.add_child(vcpu);
    root.add_state_as("last_progress", 1, saved.last_progress);
    root.encode(&codec)?;
    std::fs::write(
        dir.join("snapshot.bin"),
        migration_core::codec::encode(codec.as_ref(), &root)?,
    )?;
    std::fs::write(dir.join("memory.raw"), &saved.memory)?;
    Ok(())
}

fn read_snapshot_files(dir: &Path) -> Result<Saved> {
    let bytes = std::fs::read(dir.join("snapshot.bin"))?;
    let codec = migration_serde::PostcardCodec;
    let mut root: Snapshot = migration_core::codec::decode(&codec, &bytes)?;
    root.resolve_codecs(&migration_serde::registry());
    let memory = std::fs::read(dir.join("memory.raw"))?;
    ensure!(memory.len() == RAM, "memory file is {} bytes", memory.len());
    Ok(Saved {
        vm: VmState::from_snapshot(root.child(KvmVmDevices::<VmFd>::ID)?)?,
        vcpu: VcpuState::from_snapshot(root.child("vcpu0")?)?,
        memory,
        last_progress: root.section("last_progress")?.decode()?,
    })
}

/// The restoring side, run in a child process: restore from the files, run, and
/// write `first last seen` to `result.txt`.
fn child_restore(dir: &Path) -> Result<()> {
    let saved = read_snapshot_files(dir)?;
    let dst = Machine::restore(&saved, None, Some(AFTER))?;
    let m = dst.run_for(AFTER, TIMEOUT)?;
    pass(&m)?;
    std::fs::write(
        dir.join("result.txt"),
        format!(
            "{} {} {}",
            m.first_progress().unwrap_or(0),
            m.last_progress().unwrap_or(0),
            m.progress_events()
        ),
    )?;
    Ok(())
}

#[test]
fn counter_avx_restores_in_a_separate_process_from_files() -> Result<()> {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return child_restore(Path::new(&dir));
    }
    migration_testkit::require_kvm!(Ok(()));
    let src = Machine::new(Some(Guest::CounterAvx), PortMonitor::new(BEFORE), None)?;
    pass(&src.run_for(BEFORE, TIMEOUT)?)?;
    let saved = src.save()?;
    drop(src);
    let dir = tempfile::tempdir()?;
    write_snapshot_files(&saved, dir.path())?;

    let result = child::rerun_in_child(
        "counter_avx_restores_in_a_separate_process_from_files",
        CHILD_ENV,
        dir.path(),
    )?;
    let v: Vec<u64> = result
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let l = u64::from(saved.last_progress);
    ensure!(
        v == [l + 1, l + AFTER, AFTER],
        "child saw {v:?}, expected progress {}..={} after {l}",
        l + 1,
        l + AFTER
    );
    Ok(())
}
