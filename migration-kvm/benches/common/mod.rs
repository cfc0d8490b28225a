//! What the KVM migration benches share: a running guest to migrate, its memory
//! filled so every page travels, and the wait for its self-checking progress.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use migration_core::Migratable;
use migration_kvm::{KvmVm, KvmVmConfig};
use migration_testkit::bench::env_or;
use migration_testkit::guest::{
    configure_vcpu, monitor_handler, write_boot_memory, Guest, PortMonitor, Verdict,
};
use migration_testkit::Rng;

/// Bytes below this are the guest's (boot structures, image, working set).
pub const FILL_START: u64 = 16 << 20;
const FILL_BUF: usize = 2 << 20;

/// Waits (at most 60 s) until the guest behind `monitor` reported `n` progress
/// events; fails if it reported a failed self-check.
pub fn wait_for(monitor: &Mutex<PortMonitor>, n: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = monitor.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Verdict::Fail(f) = m.verdict() {
            bail!("guest failed: {f:?}");
        }
        if m.progress_events() >= n {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out: {m:?}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// A running source VM of `size` bytes and `BENCH_VCPUS` vCPUs (default 1), huge
/// pages unless `BENCH_HUGE=0`, running `guest` on vCPU 0 (booted with load argument
/// `arg`), its memory from 16 MiB up random-filled if `fill`.
pub fn source(
    size: u64,
    guest: Guest,
    arg: u64,
    fill: bool,
) -> Result<(KvmVm, Arc<Mutex<PortMonitor>>)> {
    let monitor = Arc::new(Mutex::new(PortMonitor::new(2)));
    let vcpus = u32::try_from(env_or("BENCH_VCPUS", 1)).unwrap_or(1);
    let mut config = KvmVmConfig::new(size, vcpus);
    config.memory.huge_pages = env_or("BENCH_HUGE", 1) != 0;
    let mut vm = KvmVm::new(config, migration_serde::registry(), |_| {
        monitor_handler(monitor.clone(), None)
    })?;
    let ram = write_boot_memory(vm.memory().mmap(), guest.image())?;
    vm.with_vcpu(0, move |fd| -> Result<()> {
        let kvm = kvm_ioctls::Kvm::new()?;
        configure_vcpu(fd, &kvm, ram, arg)?;
        Ok(())
    })??;
    if fill {
        let mut buf = vec![0u8; FILL_BUF];
        let mut rng = Rng::new(7);
        let mut gpa = FILL_START;
        while gpa < size {
            rng.fill(&mut buf);
            let n = (size - gpa).min(FILL_BUF as u64) as usize;
            vm.memory_sink().write_memory(gpa, &buf[..n])?;
            gpa += n as u64;
        }
    }
    vm.start()?;
    wait_for(&monitor, 2)?;
    Ok((vm, monitor))
}
