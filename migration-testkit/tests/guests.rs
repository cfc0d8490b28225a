//! Boots each self-checking guest on real KVM, and proves each self-check can fail.
//!
//! Gated: if `/dev/kvm` cannot be opened the tests print
//! `skipped: /dev/kvm not usable: <reason>` and pass, unless
//! `MIGRATION_REQUIRE_KVM=1`, in which case they panic.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kvm_bindings::{kvm_msr_entry, Msrs};
use migration_testkit::guest::{
    describe_error_code, Failure, Guest, PortMonitor, TestVm, Verdict, IMAGE_ADDR, TIMER_IDLE,
};
use vm_memory::{Bytes, GuestAddress};

/// True if KVM is usable; otherwise prints why and returns false (or panics
/// when MIGRATION_REQUIRE_KVM=1).
fn kvm_usable() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("MIGRATION_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("/dev/kvm not usable: {e} (MIGRATION_REQUIRE_KVM=1)");
            }
            eprintln!("skipped: /dev/kvm not usable: {e}");
            false
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Boots `guest` and runs it to `n` progress events; returns the VM and monitor.
fn boot_to(guest: Guest, ram: usize, arg: u64, n: u64) -> Result<(TestVm, PortMonitor)> {
    let mut vm = TestVm::new(ram)?;
    vm.boot(guest.image(), arg)?;
    let mut m = PortMonitor::new(n);
    let start = Instant::now();
    let v = vm.run_until(&mut m, TIMEOUT)?;
    ensure!(
        v == Verdict::Pass,
        "{guest}: {v:?} ({}), infos {:x?}",
        explain(&v),
        m.infos()
    );
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{guest}: {n} progress events in {secs:.3} s ({:.0}/s incl. boot), values {:?}..{:?}",
        n as f64 / secs,
        m.first_progress(),
        m.last_progress()
    );
    Ok((vm, m))
}

fn explain(v: &Verdict) -> String {
    match v {
        Verdict::Fail(f) => f.to_string(),
        _ => String::new(),
    }
}

/// Continues the run after a change and expects the guest to report `code`.
fn expect_guest_error(vm: &mut TestVm, m: &PortMonitor, code: u32) -> Result<PortMonitor> {
    let mut m2 = PortMonitor::with_baseline(1_000_000, m.last_progress().unwrap_or(0));
    let v = vm.run_until(&mut m2, TIMEOUT)?;
    ensure!(
        v == Verdict::Fail(Failure::GuestError(code)),
        "expected guest error {code:#x} ({}), got {v:?} ({})",
        describe_error_code(code),
        explain(&v)
    );
    Ok(m2)
}

/// Rate of progress events once the guest is running.
fn measure_rate(vm: &mut TestVm, m: &PortMonitor, secs: f64) -> Result<f64> {
    let mut m2 = PortMonitor::with_baseline(u64::MAX, m.last_progress().unwrap_or(0));
    let start = Instant::now();
    let v = vm.run_until(&mut m2, Duration::from_secs_f64(secs))?;
    ensure!(matches!(v, Verdict::Fail(Failure::Timeout { .. })), "{v:?}");
    Ok(m2.progress_events() as f64 / start.elapsed().as_secs_f64())
}

#[test]
fn counter_avx_progresses() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, m) = boot_to(Guest::CounterAvx, 4 << 20, 0, 20)?;
    let rate = measure_rate(&mut vm, &m, 1.0)?;
    eprintln!("counter_avx: {rate:.0} progress events/s");
    ensure!(rate > 10.0, "counter_avx too slow: {rate}/s");
    Ok(())
}

#[test]
fn counter_avx_detects_ymm_upper_corruption() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, m) = boot_to(Guest::CounterAvx, 4 << 20, 0, 5)?;
    let mut xsave = vm.vcpu.get_xsave().context("get_xsave")?;
    // Standard XSAVE layout: legacy area (512) + header (64), then YMM_Hi128:
    // 16 bytes per register. Flip a bit in the upper half of ymm3.
    let idx = (576 + 16 * 3) / 4;
    xsave.region[idx] ^= 1;
    // SAFETY: the buffer came from KVM_GET_XSAVE on this vCPU (4 KiB, the legacy
    // KVM_SET_XSAVE size); only a register value changed.
    unsafe { vm.vcpu.set_xsave(&xsave) }.context("set_xsave")?;
    expect_guest_error(&mut vm, &m, 0xA000_0203)?;
    Ok(())
}

#[test]
fn counter_avx_detects_gpr_corruption() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, m) = boot_to(Guest::CounterAvx, 4 << 20, 0, 5)?;
    let mut regs = vm.vcpu.get_regs()?;
    regs.r10 = regs.r10.wrapping_add(1);
    vm.vcpu.set_regs(&regs)?;
    expect_guest_error(&mut vm, &m, 0xA000_0102)?;
    Ok(())
}

#[test]
fn counter_avx_pending_io_is_completed() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    // run_until completes the `out` of the last exit: RIP is past it and the
    // guest continues from there with increasing progress.
    let (mut vm, m) = boot_to(Guest::CounterAvx, 4 << 20, 0, 3)?;
    let rip = vm.vcpu.get_regs()?.rip;
    let mut byte = [0u8; 2];
    vm.mem.read_slice(&mut byte, GuestAddress(rip - 1))?;
    ensure!(
        byte[0] == 0xef,
        "byte before RIP {rip:#x} is {byte:x?}, not `out %eax,(%dx)`"
    );
    ensure!(rip > IMAGE_ADDR);
    let mut m2 = PortMonitor::with_baseline(3, m.last_progress().unwrap());
    let v = vm.run_until(&mut m2, TIMEOUT)?;
    ensure!(v == Verdict::Pass, "{v:?}");
    ensure!(m2.repeated_progress() == 0);
    Ok(())
}

#[test]
fn timer_ticks() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, m) = boot_to(Guest::Timer, 4 << 20, 0, 20)?;
    ensure!(
        m.infos().first() == Some(&3_000_000),
        "infos {:?}",
        m.infos()
    );
    let rate = measure_rate(&mut vm, &m, 1.0)?;
    eprintln!("timer: {rate:.0} progress events (ticks)/s");
    ensure!(rate > 10.0, "timer too slow: {rate}/s");
    Ok(())
}

/// CPU time this thread has used (user + system, guest time included).
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[test]
fn timer_in_idle_mode_ticks_while_its_vcpu_sleeps() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, m) = boot_to(Guest::Timer, 4 << 20, TIMER_IDLE, 5)?;
    ensure!(m.infos().first() == Some(&3_000_000), "{:?}", m.infos());
    // This thread runs the vCPU: its CPU time is the guest's plus KVM's.
    let (cpu, wall) = (thread_cpu_time(), Instant::now());
    let rate = measure_rate(&mut vm, &m, 1.0)?;
    let busy = (thread_cpu_time() - cpu).as_secs_f64() / wall.elapsed().as_secs_f64();
    eprintln!(
        "timer, idle mode: {rate:.0} ticks/s, vCPU thread busy {:.0} % of the time",
        busy * 100.0
    );
    ensure!(rate > 10.0, "timer too slow: {rate}/s");
    ensure!(
        busy < 0.5,
        "an idle guest kept its vCPU thread busy {busy:.2} of the time"
    );
    Ok(())
}

/// Whether the timer guest's vector (0x20) is pending (IRR) or in service (ISR) in
/// the local APIC `regs`.
fn timer_vector_pending(regs: &[std::os::raw::c_char]) -> bool {
    [0x210, 0x110].iter().any(|&off| regs[off] as u8 & 1 != 0)
}

#[test]
fn timer_stops_when_lapic_timer_is_disabled() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, mut m) = boot_to(Guest::Timer, 4 << 20, 0, 5)?;
    // The handler re-arms the deadline: stop where no tick is pending or in service
    // (the vCPU is at a ring-3 progress write), or a tick would revive the timer.
    let mut lapic = vm.vcpu.get_lapic()?;
    for _ in 0..100 {
        if !timer_vector_pending(&lapic.regs) {
            break;
        }
        let mut next = PortMonitor::with_baseline(1, m.last_progress().unwrap());
        ensure!(vm.run_until(&mut next, TIMEOUT)? == Verdict::Pass);
        m = next;
        lapic = vm.vcpu.get_lapic()?;
    }
    ensure!(!timer_vector_pending(&lapic.regs), "a tick always pending");
    // Mask the LVT timer (offset 0x320, bit 16) and disarm the deadline.
    let off = 0x320;
    let mut lvt = [0u8; 4];
    for (i, b) in lvt.iter_mut().enumerate() {
        *b = lapic.regs[off + i] as u8;
    }
    let masked = (u32::from_le_bytes(lvt) | (1 << 16)).to_le_bytes();
    for (i, b) in masked.iter().enumerate() {
        lapic.regs[off + i] = *b as _;
    }
    vm.vcpu.set_lapic(&lapic)?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x6e0,
        data: 0,
        ..Default::default()
    }])?;
    ensure!(vm.vcpu.set_msrs(&msrs)? == 1);
    let mut m2 = PortMonitor::with_baseline(5, m.last_progress().unwrap());
    let v = vm.run_until(&mut m2, Duration::from_millis(500))?;
    ensure!(
        matches!(v, Verdict::Fail(Failure::Timeout { seen: 0, .. })),
        "{v:?}"
    );
    Ok(())
}

#[test]
fn memory_pattern_progresses() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let ram = 64 << 20;
    let (mut vm, m) = boot_to(Guest::MemoryPattern, ram, 0, 5)?;
    ensure!(m.infos()[..2] == [ram as u32, 0], "infos {:?}", m.infos());
    ensure!(m.first_progress() == Some(1));
    let rate = measure_rate(&mut vm, &m, 1.0)?;
    eprintln!("memory_pattern (64 MiB): {rate:.0} passes/s");
    Ok(())
}

#[test]
fn memory_pattern_small_ram_and_working_set_arg() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (_vm, m) = boot_to(Guest::MemoryPattern, 4 << 20, 0, 10)?;
    ensure!(m.infos()[..2] == [4 << 20, 0], "infos {:?}", m.infos());
    let (_vm, m) = boot_to(Guest::MemoryPattern, 64 << 20, 0x20_0000, 10)?;
    ensure!(m.infos()[..2] == [0x20_0000, 0], "infos {:?}", m.infos());
    Ok(())
}

#[test]
fn memory_pattern_detects_corrupt_byte() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let (mut vm, m) = boot_to(Guest::MemoryPattern, 16 << 20, 0, 3)?;
    let addr = 0x10_0000 + 5 * 4096 + 123;
    let b: u8 = vm.mem.read_obj(GuestAddress(addr))?;
    vm.mem.write_obj(b ^ 0x40, GuestAddress(addr))?;
    let m2 = expect_guest_error(&mut vm, &m, 0xB000_0001)?;
    // The guest reports the qword address (low, high) on the info port.
    let n = m2.infos().len();
    ensure!(
        m2.infos()[n - 2..] == [(addr & !7) as u32, 0],
        "infos {:?}",
        m2.infos()
    );
    Ok(())
}

#[test]
fn memory_pattern_detects_stale_page() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    // Models a live migration that missed a dirty page: put back an old copy.
    let (mut vm, m) = boot_to(Guest::MemoryPattern, 8 << 20, 0, 2)?;
    let page = GuestAddress(0x10_0000);
    let mut old = vec![0u8; 4096];
    vm.mem.read_slice(&mut old, page)?;
    // Every page is rewritten within 8 passes.
    let mut m2 = PortMonitor::with_baseline(9, m.last_progress().unwrap());
    ensure!(vm.run_until(&mut m2, TIMEOUT)? == Verdict::Pass);
    vm.mem.write_slice(&old, page)?;
    expect_guest_error(&mut vm, &m2, 0xB000_0001)?;
    Ok(())
}

/// Skips the [3 GiB, 4 GiB) hole and uses RAM above 4 GiB. Touches ~3 GiB of
/// host memory and takes several seconds: run with `--ignored`.
#[test]
#[ignore]
fn memory_pattern_above_4g() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let ram = (4 << 30) + (64 << 20);
    let mut vm = TestVm::new(ram)?;
    vm.boot(Guest::MemoryPattern.image(), 0)?;
    let mut m = PortMonitor::new(2);
    let start = Instant::now();
    let v = vm.run_until(&mut m, Duration::from_secs(120))?;
    ensure!(v == Verdict::Pass, "{v:?} ({})", explain(&v));
    eprintln!(
        "memory_pattern (4 GiB + 64 MiB): 2 passes in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    ensure!(m.infos()[..2] == [64 << 20, 1], "infos {:?}", m.infos());
    // A byte above 4 GiB is checked too.
    let addr = (4u64 << 30) + (1 << 20) + 7;
    let b: u8 = vm.mem.read_obj(GuestAddress(addr))?;
    vm.mem.write_obj(b ^ 1, GuestAddress(addr))?;
    let m2 = expect_guest_error(&mut vm, &m, 0xB000_0001)?;
    let n = m2.infos().len();
    ensure!(
        m2.infos()[n - 2..] == [(1 << 20), 1],
        "infos {:?}",
        m2.infos()
    );
    // Nothing in the hole was touched.
    let hole: u64 = vm.mem.read_obj(GuestAddress(0xC000_0000 + 0x1000))?;
    ensure!(hole == 0);
    Ok(())
}

/// The memory_pattern guest keeps dirtying pages: KVM's dirty log sees them.
#[test]
fn memory_pattern_dirties_pages_continuously() -> Result<()> {
    if !kvm_usable() {
        return Ok(());
    }
    let ram = 16usize << 20;
    let mut vm = TestVm::<vm_memory::bitmap::AtomicBitmap>::with_config(
        migration_testkit::guest::VmConfig {
            ram_size: ram,
            dirty_log: true,
        },
    )?;
    vm.boot(Guest::MemoryPattern.image(), 0)?;
    let mut m = PortMonitor::new(2);
    ensure!(vm.run_until(&mut m, TIMEOUT)? == Verdict::Pass);
    vm.vm.get_dirty_log(0, ram)?; // clears
    let mut m2 = PortMonitor::with_baseline(9, m.last_progress().unwrap());
    ensure!(vm.run_until(&mut m2, TIMEOUT)? == Verdict::Pass);
    let dirty: u32 = vm
        .vm
        .get_dirty_log(0, ram)?
        .iter()
        .map(|w| w.count_ones())
        .sum();
    // 9 passes rewrite every page of [1 MiB, 16 MiB) at least once.
    ensure!(dirty >= 15 * 256, "only {dirty} dirty pages");
    Ok(())
}
