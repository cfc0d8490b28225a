//! Soak (KVM-gated, `#[ignore]`: minutes, not seconds): a running memory-pattern guest
//! ping-pongs between VMs over unix and tcp (alternating), then is snapshotted to a
//! file and restored into a fresh VM, each many times; after every hop the guest must
//! make progress past where it was and pass its own self-check. Prints the counts and
//! the worst downtime.
//!
//! ```text
//! cargo test --release -p migration-kvm --test soak -- --ignored --nocapture
//! SOAK_MIGRATIONS=100 SOAK_SNAPSHOTS=100 cargo test --release -p migration-kvm --test soak -- --ignored --nocapture
//! ```
//! (1000 of each by default.) Each migration builds a fresh destination VM (the
//! source is dropped once the destination runs), so "two VMs" are the two ends of each hop.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use migration_core::Pausable;
use migration_kvm::{KvmVm, RestoreMode};
use migration_testkit::bench::env_or;
use migration_testkit::guest::{Guest, GuestLog as Log, RunningGuest as Running};
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
