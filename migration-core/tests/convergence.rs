//! Convergence of a busy guest, with a fake VM over an in-process shaped link: the
//! dirty rate and the bandwidth each round, precopy alone giving up with both rates in
//! its error, auto-converge raising the throttle 20 → 30 → … until precopy converges,
//! and the throttle lifted afterwards: after success, a broken link and a cancel.
//!
//! The fake's workload dirties memory at an exact rate (the writes due by each dirty
//! log read are done before it is read) scaled exactly by the throttle, and the link's
//! rate is an upper bound ([`Shaped`]), so "the guest dirties faster than the link"
//! holds however busy the machine is. The tests assert what the driver decides, never
//! how fast anything ran.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use migration_core::arch::Arch;
use migration_core::convergence::GiveUp;
use migration_core::protocol::MigrationError;
use migration_core::{
    receive_migration_over, send_migration_over, AutoConverge, CodecRegistry, ConvergencePolicy,
    MigrationOptions, MigrationReport, Pausable, ReceiveOptions, ReceiveReport,
};
use migration_testkit::shaped::{Breakable, Shaped};
use migration_testkit::FakeVm;

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

fn receive_options() -> ReceiveOptions {
    ReceiveOptions::new(Arch::None, codecs())
}

type DestResult = Result<(FakeVm, ReceiveReport), MigrationError>;

/// Migrates `source` over a socket pair whose source end is `wrap`ped.
fn migrate<S: Read + Write>(
    source: &mut FakeVm,
    options: &mut MigrationOptions,
    wrap: impl FnOnce(UnixStream) -> S,
) -> (Result<MigrationReport, MigrationError>, DestResult) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
    }
    let dest = thread::spawn(move || {
        receive_migration_over(b, &receive_options(), |incoming| {
            FakeVm::destination(&incoming.layout, codecs())
        })
    });
    let result = send_migration_over(source, wrap(a), options);
    (result, dest.join().expect("destination thread"))
}

/// The source after a failed migration: running, unthrottled, its memory intact.
fn assert_source_runs_unthrottled(source: &mut FakeVm, context: &str) {
    assert!(source.is_running(), "{context}: the source must run");
    assert!(
        !source.is_dirty_logging(),
        "{context}: dirty logging left on"
    );
    assert_eq!(
        source.throttle(),
        0,
        "{context}: the throttle must be lifted"
    );
    if let Some(&last) = source.throttle_history().last() {
        assert_eq!(last, 0, "{context}: {:?}", source.throttle_history());
    }
    source.pause().expect("pause");
    source.verify().expect("source self-check");
}

/// A guest dirtying 2 MiB of memory at 32 MB/s, every page written already (so round
/// 0 sends 2 MiB), over a 16 MB/s link: it dirties most of its memory while any round
/// of it is sent, so precopy alone never gets under a 20 ms downtime limit.
fn busy_small_guest() -> FakeVm {
    let vm = FakeVm::builder()
        .memory_size(2 << 20)
        .workload(32_000_000, 21)
        .codecs(codecs())
        .build()
        .expect("fake VM");
    vm.run_workload_writes(8 << 10).expect("writes");
    vm
}

const SMALL_LINK: u64 = 16_000_000;

fn auto_converge_options() -> MigrationOptions {
    MigrationOptions {
        arch: Arch::None,
        downtime_limit: Duration::from_millis(20),
        policy: ConvergencePolicy::Cancel,
        auto_converge: Some(AutoConverge::default()),
        max_rounds: 60,
        max_time: Duration::from_secs(600),
        ..MigrationOptions::default()
    }
}

/// What auto-converge sets before precopy round `round`: nothing for rounds 0 and 1,
/// then 20, 30, … 90, 99.
fn expected_throttle(round: u32) -> u8 {
    if round < 2 {
        0
    } else {
        (20 + 10 * (round - 2)).min(99) as u8
    }
}

#[test]
fn precopy_alone_gives_up_on_a_guest_outrunning_the_link_and_says_why() {
    // 16 MiB, 512 KiB of it written (round 0 sends the rest as zero ranges), dirtied
    // at 32 MB/s over an 8 MB/s link: the guest dirties far more than the link carries
    // and rewrites few of its pages twice in a round.
    let mut source = FakeVm::builder()
        .memory_size(16 << 20)
        .workload(32_000_000, 5)
        .codecs(codecs())
        .build()
        .expect("fake VM");
    source.run_workload_writes(128).expect("writes");
    let mut opts = MigrationOptions {
        arch: Arch::None,
        downtime_limit: Duration::from_millis(10),
        policy: ConvergencePolicy::Cancel,
        stall_rounds: 1,
        ..MigrationOptions::default()
    };
    let (result, dest) = migrate(&mut source, &mut opts, |s| Shaped::new(s, 8_000_000));
    let err = result.expect_err("precopy alone cannot converge");
    let MigrationError::NotConverged(failure) = &err else {
        panic!("expected NotConverged, got {err}");
    };
    assert_eq!(failure.reason, GiveUp::DirtyFasterThanLink, "{err}");
    assert!(failure.dirty_rate > failure.bandwidth, "{failure:?}");
    assert_eq!(failure.rounds, 2, "gave up after round 1: {failure:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("cannot converge: dirty ") && text.contains(" MB/s > link "),
        "{text}"
    );
    assert!(text.contains("auto-converge is off"), "{text}");
    assert!(dest.is_err(), "the destination must not run the guest");
    assert!(source.throttle_history().is_empty());
    assert_source_runs_unthrottled(&mut source, "gave up");
}

#[test]
fn auto_converge_raises_the_throttle_until_precopy_converges_then_lifts_it() {
    let mut source = busy_small_guest();
    let mut opts = auto_converge_options();
    let seen = Arc::new(AtomicU8::new(0));
    let s = seen.clone();
    opts.progress = Some(Box::new(move |p| {
        s.fetch_max(p.throttle, Ordering::Relaxed);
    }));
    let (result, dest) = migrate(&mut source, &mut opts, |s| Shaped::new(s, SMALL_LINK));
    let report = result.expect("auto-converge converges");
    assert!(report.converged, "{report}");
    let (precopy, last) = report.rounds.split_at(report.rounds.len() - 1);
    // Round 1 did not converge (the guest rewrites its memory during any round),
    // so the throttle rose at least once; then by 10 each round, capped at 99.
    assert!(precopy.len() >= 3, "{report}");
    for r in precopy {
        assert_eq!(r.throttle, expected_throttle(r.round), "{report}");
        assert!(r.bandwidth > 0.0 && r.dirty_bytes > 0, "{report}");
    }
    assert!(precopy[1].dirty_rate > 0.0, "{report}");
    let top = precopy[precopy.len() - 1].throttle;
    assert_eq!(
        last[0].throttle, top,
        "the final round reports the last throttle"
    );
    assert_eq!(last[0].dirty_rate, 0.0, "the guest was paused");
    assert_eq!(
        seen.load(Ordering::Relaxed),
        top,
        "progress carried the throttle"
    );
    // Every step the fake was given, then 0 once paused; nothing since.
    let mut steps: Vec<u8> = (2..precopy.len() as u32).map(expected_throttle).collect();
    steps.dedup();
    steps.push(0);
    assert_eq!(source.throttle_history(), steps.as_slice(), "{report}");
    assert_eq!(source.throttle(), 0);
    let (mut dest, _) = dest.expect("destination");
    dest.pause().expect("pause");
    dest.verify().expect("destination self-check");
    assert_eq!(dest.throttle(), 0, "the destination is never throttled");
}

#[test]
fn without_auto_converge_the_same_guest_hits_the_round_cap() {
    let mut source = busy_small_guest();
    let mut opts = MigrationOptions {
        auto_converge: None,
        max_rounds: 4,
        stall_rounds: 0,
        ..auto_converge_options()
    };
    let (result, dest) = migrate(&mut source, &mut opts, |s| Shaped::new(s, SMALL_LINK));
    let err = result.expect_err("precopy alone does not converge");
    let MigrationError::NotConverged(failure) = &err else {
        panic!("expected NotConverged, got {err}");
    };
    assert_eq!(failure.reason, GiveUp::RoundCap, "{err}");
    assert!(
        err.to_string()
            .starts_with("did not converge before the round cap: dirty "),
        "{err}"
    );
    assert!(dest.is_err());
    assert_source_runs_unthrottled(&mut source, "round cap");
}

#[test]
fn a_cancelled_auto_converge_lifts_the_throttle() {
    let mut source = busy_small_guest();
    // A limit no round meets: the round cap cancels with the throttle at 40 %.
    let mut opts = MigrationOptions {
        downtime_limit: Duration::ZERO,
        max_rounds: 4,
        ..auto_converge_options()
    };
    let (result, dest) = migrate(&mut source, &mut opts, |s| Shaped::new(s, SMALL_LINK));
    let err = result.expect_err("cancelled");
    let MigrationError::NotConverged(failure) = &err else {
        panic!("expected NotConverged, got {err}");
    };
    assert_eq!(failure.throttle, 40, "{err}");
    assert!(err.to_string().contains("throttle 40 %"), "{err}");
    assert!(dest.is_err());
    assert_eq!(source.throttle_history(), [20, 30, 40, 0]);
    assert_source_runs_unthrottled(&mut source, "cancelled");
}

#[test]
fn a_link_failure_while_throttled_lifts_the_throttle() {
    let mut source = busy_small_guest();
    let mut opts = auto_converge_options();
    // The link breaks as soon as a round runs at 30 %.
    let cut = Arc::new(AtomicBool::new(false));
    let c = cut.clone();
    opts.progress = Some(Box::new(move |p| {
        if p.throttle >= 30 {
            c.store(true, Ordering::Relaxed);
        }
    }));
    let (result, dest) = migrate(&mut source, &mut opts, |s| {
        Breakable::new(s, SMALL_LINK, cut)
    });
    let err = result.expect_err("the link broke");
    assert!(matches!(err, MigrationError::Io(_)), "{err}");
    assert!(dest.is_err());
    assert_eq!(source.throttle_history(), [20, 30, 0]);
    assert_source_runs_unthrottled(&mut source, "link cut");
}

#[test]
fn a_vm_that_cannot_be_throttled_is_migrated_by_precopy_alone() {
    struct Unthrottled(FakeVm);
    impl Pausable for Unthrottled {
        fn pause(&mut self) -> Result<(), migration_core::MigratableError> {
            self.0.pause()
        }
        fn resume(&mut self) -> Result<(), migration_core::MigratableError> {
            self.0.resume()
        }
    }
    impl migration_core::Snapshottable for Unthrottled {
        fn id(&self) -> String {
            self.0.id()
        }
        fn snapshot(
            &mut self,
        ) -> Result<migration_core::Snapshot, migration_core::MigratableError> {
            self.0.snapshot()
        }
        fn restore(
            &mut self,
            s: &migration_core::Snapshot,
        ) -> Result<(), migration_core::MigratableError> {
            self.0.restore(s)
        }
    }
    impl migration_core::Transportable for Unthrottled {
        fn codecs(&self) -> &CodecRegistry {
            self.0.codecs()
        }
    }
    impl migration_core::Migratable for Unthrottled {
        fn start_dirty_log(&mut self) -> Result<(), migration_core::MigratableError> {
            self.0.start_dirty_log()
        }
        fn stop_dirty_log(&mut self) -> Result<(), migration_core::MigratableError> {
            self.0.stop_dirty_log()
        }
        fn dirty_log(
            &mut self,
        ) -> Result<migration_core::MemoryRangeTable, migration_core::MigratableError> {
            self.0.dirty_log()
        }
        fn start_migration(
            &mut self,
            role: migration_core::MigrationRole,
        ) -> Result<(), migration_core::MigratableError> {
            self.0.start_migration(role)
        }
        fn complete_migration(&mut self) -> Result<(), migration_core::MigratableError> {
            self.0.complete_migration()
        }
        fn memory_source(&self) -> &dyn migration_core::MemorySource {
            self.0.memory_source()
        }
        fn memory_sink(&self) -> &dyn migration_core::MemorySink {
            self.0.memory_sink()
        }
        // can_throttle and set_throttle: the defaults (cannot; does nothing).
    }
    let mut source = Unthrottled(busy_small_guest());
    let mut opts = MigrationOptions {
        max_rounds: 4,
        stall_rounds: 0,
        ..auto_converge_options()
    };
    let (a, b) = UnixStream::pair().expect("socketpair");
    let dest = thread::spawn(move || {
        receive_migration_over(b, &receive_options(), |incoming| {
            FakeVm::destination(&incoming.layout, codecs())
        })
    });
    let result = send_migration_over(&mut source, Shaped::new(a, SMALL_LINK), &mut opts);
    let err = result.expect_err("no throttle, no convergence");
    let MigrationError::NotConverged(failure) = &err else {
        panic!("expected NotConverged, got {err}");
    };
    assert_eq!(failure.throttle, 0, "{err}");
    assert!(!failure.throttling, "{err}");
    assert!(dest.join().expect("thread").is_err());
    assert!(source.0.throttle_history().is_empty());
    assert_source_runs_unthrottled(&mut source.0, "cannot throttle");
}
