//! Auto-converge with a real KVM guest (KVM-gated): `KvmVm`'s throttle makes its vCPUs
//! sleep while it is on (a guest that never exits is kicked out once a slice), the
//! memory-pattern guest migrates with the throttle rising 20 → 30 → 40 % and passes
//! its self-check on the destination, and the source's throttle is lifted afterwards:
//! after a completed migration and after a broken link.
//!
//! The assertions are about the throttle's state (what was set, whether vCPUs slept,
//! whether it is off), never about how fast the guest ran. Skipped visibly without
//! /dev/kvm, failing instead under `MIGRATION_REQUIRE_KVM=1`.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use migration_core::convergence::AutoConverge;
use migration_core::destination::receive_migration_over;
use migration_core::precopy::{send_migration_over, ConvergencePolicy, MigrationOptions};
use migration_core::protocol::MigrationError;
use migration_kvm::KvmVm;
use migration_testkit::guest::{Guest, GuestLog, RunningGuest};
use migration_testkit::require_kvm;
use migration_testkit::shaped::{Breakable, Shaped};

#[allow(dead_code)] // not every test file uses every helper
mod common;

use common::{codecs, BEFORE, IO_TIMEOUT, TIMEOUT};

/// The memory-pattern guest's working set ends here (~23 MiB it rewrites an eighth of
/// per pass).
const PATTERN_END: u64 = 24 << 20;
/// Progress events required after a migration or a throttle change.
const AFTER: u64 = 3;
/// The in-process link: round 0 (~23 MiB) takes a good fraction of a second and each
/// later round many throttle slices, so the guest dirties pages during every round.
const LINK: u64 = 50_000_000;

/// Auto-converge with a limit no round meets: the round cap forces the switch-over
/// after rounds 2, 3 and 4 ran at 20, 30 and 40 %.
fn options(vm: &KvmVm) -> MigrationOptions {
    MigrationOptions {
        downtime_limit: Duration::ZERO,
        max_rounds: 4,
        stall_rounds: 0,
        policy: ConvergencePolicy::Force,
        auto_converge: Some(AutoConverge::default()),
        ..vm.migration_options()
    }
}

fn expected_throttle(round: u32) -> u8 {
    if round < 2 {
        0
    } else {
        (20 + 10 * (round - 2)).min(99) as u8
    }
}

/// Waits (bounded by [`TIMEOUT`]) until `f` holds.
fn wait_until(what: &str, f: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        ensure!(start.elapsed() < TIMEOUT, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[test]
fn a_throttled_guest_sleeps_and_runs_unthrottled_once_lifted() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = common::boot(Guest::MemoryPattern, PATTERN_END)?;
    src.advance(BEFORE)?;
    ensure!(src.vm.throttle() == 0 && !src.vm.is_throttle_ticking());
    ensure!(
        src.vm.throttle_sleeps() == 0,
        "never throttled, never slept"
    );

    src.vm.set_throttle(50)?;
    ensure!(src.vm.throttle() == 50 && src.vm.is_throttle_ticking());
    // The guest exits only once a pass: the ticker's kicks make the vCPU sleep.
    wait_until("the vCPU slept for the throttle three times", || {
        src.vm.throttle_sleeps() >= 3
    })?;
    src.advance(1)?; // still runs, slower

    src.vm.set_throttle(0)?;
    ensure!(src.vm.throttle() == 0, "lifted");
    ensure!(!src.vm.is_throttle_ticking(), "no ticker once lifted");
    let slept = src.vm.throttle_sleeps();
    src.advance(AFTER)?;
    ensure!(
        src.vm.throttle_sleeps() == slept,
        "an unthrottled vCPU never sleeps for the throttle"
    );
    // A pause is not held up by a throttle sleep (99 %: ~1 s per slice).
    src.vm.set_throttle(99)?;
    wait_until("a 99 % sleep", || src.vm.throttle_sleeps() > slept)?;
    src.vm.stop()?;
    src.vm.set_throttle(0)?;
    src.vm.start()?;
    src.advance(AFTER)?;
    Ok(())
}

/// Receives into a fresh KVM VM recording into `log`; returns the running VM.
fn destination(
    stream: UnixStream,
    log: GuestLog,
) -> thread::JoinHandle<Result<KvmVm, MigrationError>> {
    thread::spawn(move || {
        receive_migration_over(stream, &KvmVm::receive_options(codecs()), |incoming| {
            Ok(KvmVm::for_incoming(incoming, codecs(), log.handlers())?)
        })
        .map(|(vm, _)| vm)
    })
}

fn socket_pair() -> Result<(UnixStream, UnixStream)> {
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    Ok((a, b))
}

#[test]
fn a_dirtying_guest_migrates_with_auto_converge_and_the_source_is_unthrottled() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = common::boot(Guest::MemoryPattern, PATTERN_END)?;
    src.advance(BEFORE)?;
    let (a, b) = socket_pair()?;
    let log = GuestLog::new();
    let dest = destination(b, log.clone());
    let mut opts = options(&src.vm);
    let report = send_migration_over(&mut src.vm, Shaped::new(a, LINK), &mut opts)?;
    let vm = dest.join().map_err(|_| anyhow!("destination panicked"))??;
    eprintln!("{report}");

    let (precopy, last) = report.rounds.split_at(report.rounds.len() - 1);
    for r in precopy {
        ensure!(
            r.throttle == expected_throttle(r.round),
            "round {} ran at {} %:\n{report}",
            r.round,
            r.throttle
        );
    }
    ensure!(
        precopy.len() == 5 && !report.converged,
        "rounds 0-4 then forced:\n{report}"
    );
    ensure!(
        last[0].throttle == 40,
        "the final round reports the last throttle"
    );
    // The source: paused, migrated out, and no longer throttled.
    ensure!(
        src.vm.throttle() == 0,
        "the source's throttle must be lifted"
    );
    ensure!(
        !src.vm.is_throttle_ticking(),
        "no ticker after the migration"
    );
    ensure!(!src.vm.is_running(), "the source stays paused");

    // The destination goes on from where the source stopped, passing its self-check
    // (every page verified each pass), unthrottled.
    let dst = RunningGuest {
        vm,
        log,
        baseline: Some(src.last_progress()?),
        timeout: TIMEOUT,
    };
    ensure!(dst.vm.throttle() == 0, "the destination is never throttled");
    dst.advance(AFTER)?;
    Ok(())
}

#[test]
fn a_link_broken_while_throttled_leaves_the_source_running_unthrottled() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = common::boot(Guest::MemoryPattern, PATTERN_END)?;
    src.advance(BEFORE)?;
    let (a, b) = socket_pair()?;
    let dest = destination(b, GuestLog::new());
    let mut opts = options(&src.vm);
    let cut = Arc::new(AtomicBool::new(false));
    let c = cut.clone();
    opts.progress = Some(Box::new(move |p| {
        if p.throttle >= 30 {
            c.store(true, Ordering::Relaxed);
        }
    }));
    let link = Breakable::new(a, LINK, cut);
    let err = send_migration_over(&mut src.vm, link, &mut opts).expect_err("the link broke");
    eprintln!("link cut while throttled: {err}");
    ensure!(dest.join().map_err(|_| anyhow!("panic"))?.is_err());
    ensure!(src.vm.throttle() == 0, "the throttle must be lifted");
    ensure!(!src.vm.is_throttle_ticking(), "no ticker after the failure");
    ensure!(src.vm.is_running(), "the source runs on");
    let slept = src.vm.throttle_sleeps();
    src.advance(AFTER)?; // the self-check goes on passing
    ensure!(
        src.vm.throttle_sleeps() == slept,
        "the source's vCPUs sleep no more"
    );
    Ok(())
}
