//! Soak (KVM-gated, `#[ignore]`: minutes, not seconds): a running memory-pattern guest
//! ping-pongs between VMs over unix and tcp (alternating), then is snapshotted to a
//! file and restored into a fresh VM, each many times; after every hop the guest must
//! make progress past where it was and pass its own self-check. Prints the counts and
//! the worst downtime. The SMP guest (4 vCPUs woken with INIT-SIPI-SIPI) ping-pongs
//! the same way, and after every hop every one of its vCPUs must have advanced.
//!
//! ```text
//! cargo test --release -p migration-kvm --test soak -- --ignored --nocapture
//! SOAK_MIGRATIONS=100 SOAK_SNAPSHOTS=100 cargo test --release -p migration-kvm --test soak -- --ignored --nocapture
//! SOAK_SMP_MIGRATIONS=100 SOAK_SMP_VCPUS=4 cargo test --release -p migration-kvm --test soak smp -- --ignored --nocapture
//! ```
//! (1000 of each by default, 100 SMP hops.) Each migration builds a fresh destination
//! VM (the source is dropped once the destination runs), so "two VMs" are the two ends
//! of each hop.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use migration_core::Pausable;
use migration_kvm::{KvmVm, KvmVmConfig, RestoreMode};
use migration_testkit::bench::env_or;
use migration_testkit::guest::smp::SmpCounters;
use migration_testkit::guest::{Guest, GuestLog as Log, RunningGuest as Running, SmpStart};
use migration_testkit::require_kvm;

mod common;

use common::{codecs, migrate_url, BEFORE, TIMEOUT};

/// The memory-pattern guest's working set ends here (bounds first-touch cost).
const PATTERN_END: u64 = 4 << 20;

fn boot(guest: Guest) -> Result<Running> {
    common::boot(guest, PATTERN_END)
}

#[test]
#[ignore = "soak: minutes; run with --ignored"]
fn soak_ping_pong_migrations_and_snapshot_restores() -> Result<()> {
    require_kvm!(Ok(()));
    let migrations = env_or("SOAK_MIGRATIONS", 1000);
    let snapshots = env_or("SOAK_SNAPSHOTS", 1000);
    let dir = tempfile::tempdir()?;
    let started = Instant::now();

    let mut vm = boot(Guest::MemoryPattern)?;
    vm.advance(BEFORE)?;
    let mut last = vm.last_progress()?;
    let (mut unix, mut tcp) = (0usize, 0usize);
    let mut worst = (Duration::ZERO, String::new());
    for i in 0..migrations {
        let url = if i % 2 == 0 {
            unix += 1;
            format!(
                "unix://{}",
                dir.path().join(format!("hop{}.sock", i % 4)).display()
            )
        } else {
            tcp += 1;
            "tcp://127.0.0.1:0".to_owned()
        };
        let (next, report) =
            migrate_url(&mut vm, &url).with_context(|| format!("hop {i} over {url}"))?;
        drop(vm);
        vm = next;
        if report.downtime.total > worst.0 {
            worst = (report.downtime.total, format!("migration {i} ({url})"));
        }
        vm.advance(1)
            .with_context(|| format!("self-check after hop {i}"))?;
        let now = vm.last_progress()?;
        ensure!(now > last, "hop {i}: progress {now} did not pass {last}");
        last = now;
    }
    let migrated_in = started.elapsed();
    eprintln!(
        "soak: {migrations} migrations ({unix} unix, {tcp} tcp) in {migrated_in:?}, worst downtime {:?} at {}",
        worst.0, worst.1
    );

    let path = dir.path().join("vm.snap");
    let mut worst_restore = (Duration::ZERO, 0usize);
    let snap_start = Instant::now();
    for i in 0..snapshots {
        let t0 = Instant::now();
        vm.vm.pause()?;
        vm.vm
            .save_snapshot(&path)
            .with_context(|| format!("save {i}"))?;
        let base = vm.last_progress()?;
        let log = Log::default();
        let mode = if i % 2 == 0 {
            RestoreMode::Lazy
        } else {
            RestoreMode::Eager(Default::default())
        };
        let mut fresh = KvmVm::restore_from_file(&path, mode, codecs(), log.handlers())
            .with_context(|| format!("restore {i}"))?;
        fresh.start()?;
        let downtime = t0.elapsed();
        if downtime > worst_restore.0 {
            worst_restore = (downtime, i);
        }
        drop(std::mem::replace(
            &mut vm,
            Running {
                vm: fresh,
                log,
                baseline: Some(base),
                timeout: TIMEOUT,
            },
        ));
        vm.advance(1)
            .with_context(|| format!("self-check after restore {i}"))?;
        let now = vm.last_progress()?;
        ensure!(
            now > base,
            "restore {i}: progress {now} did not pass {base}"
        );
    }
    eprintln!(
        "soak: {snapshots} snapshot/restores (lazy and eager alternating) in {:?}, worst pause-to-running {:?} at #{}",
        snap_start.elapsed(),
        worst_restore.0,
        worst_restore.1
    );
    Ok(())
}

#[test]
#[ignore = "soak: minutes; run with --ignored"]
fn soak_smp_ping_pong_migrations() -> Result<()> {
    require_kvm!(Ok(()));
    let hops = env_or("SOAK_SMP_MIGRATIONS", 100);
    let vcpus = u32::try_from(env_or("SOAK_SMP_VCPUS", 4))?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let mut vm = Running::boot_smp(
        Guest::Smp,
        KvmVmConfig::new(32 << 20, vcpus),
        0,
        SmpStart::InitSipi,
        TIMEOUT,
    )?;
    vm.advance(BEFORE)?;
    let mut worst = (Duration::ZERO, 0usize);
    for i in 0..hops {
        let url = if i % 2 == 0 {
            format!(
                "unix://{}",
                dir.path().join(format!("smp{}.sock", i % 4)).display()
            )
        } else {
            "tcp://127.0.0.1:0".to_owned()
        };
        let (next, report) =
            migrate_url(&mut vm, &url).with_context(|| format!("hop {i} over {url}"))?;
        // The source is paused: its memory is what the destination got.
        let handed = SmpCounters::read(vm.vm.memory().mmap(), vcpus)?;
        drop(vm);
        vm = next;
        if report.downtime.total > worst.0 {
            worst = (report.downtime.total, i);
        }
        // Two rounds: the second is made of advances after the handover only.
        vm.advance(2)
            .with_context(|| format!("self-check after hop {i}"))?;
        let now = SmpCounters::read(vm.vm.memory().mmap(), vcpus)?;
        for (v, (h, n)) in handed.iter().zip(&now).enumerate() {
            ensure!(
                n.heartbeat > h.heartbeat && n.received > h.received,
                "hop {i}: vCPU {v} did not advance: {h:?} -> {n:?}"
            );
        }
    }
    eprintln!(
        "soak: {hops} migrations of a {vcpus}-vCPU guest in {:?}, worst downtime {:?} at #{}",
        started.elapsed(),
        worst.0,
        worst.1
    );
    Ok(())
}
