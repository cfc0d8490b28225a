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

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_ioctls::Kvm;
use migration_core::codec::CodecRegistry;
use migration_core::destination::receive_migration;
use migration_core::precopy::{send_migration, MigrationReport};
use migration_core::{MigratableError, Pausable};
use migration_kvm::{ExitAction, ExitEvent, ExitHandler, KvmVm, KvmVmConfig, RestoreMode};
use migration_testkit::guest::{
    configure_vcpu, write_boot_memory, Guest, PortEvent, PortMonitor, Verdict,
};
use migration_testkit::require_kvm;

const MEM: u64 = 64 << 20;
/// The memory-pattern guest's working set ends here (bounds first-touch cost).
const PATTERN_END: u64 = 4 << 20;
/// Progress events required before the first migration.
const BEFORE: u64 = 3;
/// Generous: only a failing guest waits this long.
const TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

/// What a vCPU reported: port writes, and any other exit (which parks the vCPU).
#[derive(Clone, Debug)]
enum Ev {
    Port(PortEvent),
    Exit(String),
}

/// The events of one VM's guest, recorded by its exit handlers.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Ev>>>);

impl Log {
    fn handlers(&self) -> impl FnMut(u32) -> ExitHandler {
        let log = self.0.clone();
        move |_| {
            let log = log.clone();
            Box::new(move |ev| {
                let mut l = log.lock().unwrap();
                match ev {
                    ExitEvent::IoOut { port, data } => {
                        l.push(Ev::Port(PortEvent::from_io_out(port, data)));
                        ExitAction::Continue
                    }
                    ExitEvent::IoIn { data, .. } => {
                        data.fill(0);
                        ExitAction::Continue
                    }
                    ExitEvent::Other(what) => {
                        l.push(Ev::Exit(what));
                        ExitAction::Pause
                    }
                }
            })
        }
    }

    /// Replays the events into a monitor requiring `required` progress events after
    /// `baseline` (if any).
    fn monitor(&self, baseline: Option<u32>, required: u64) -> PortMonitor {
        let mut m = match baseline {
            Some(b) => PortMonitor::with_baseline(required, b),
            None => PortMonitor::new(required),
        };
        for ev in self.0.lock().unwrap().iter() {
            match ev {
                Ev::Port(p) => m.on_event(*p),
                Ev::Exit(what) => m.on_unexpected_exit(what.clone()),
            };
        }
        m
    }

    /// Waits until the guest has made `required` progress events (counting from the
    /// start of the log) with every self-check passing, and returns the monitor.
    fn wait(&self, baseline: Option<u32>, required: u64) -> Result<PortMonitor> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let m = self.monitor(baseline, required);
            match m.verdict() {
                Verdict::Pass => return Ok(m),
                Verdict::Fail(f) => bail!("guest failed: {f:?} (monitor {m:?})"),
                _ if Instant::now() >= deadline => {
                    let mut m = m;
                    m.on_timeout();
                    bail!("guest too slow: {:?}", m.verdict())
                }
                _ => thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// A VM and its guest's log.
struct Running {
    vm: KvmVm,
    log: Log,
    /// Progress value the guest had when it arrived here (None on the first VM).
    baseline: Option<u32>,
}

impl Running {
    /// A fresh VM running `guest`.
    fn boot(guest: Guest) -> Result<Self> {
        let log = Log::default();
        let mut vm = KvmVm::new(KvmVmConfig::new(MEM, 1), log.handlers())?;
        let ram = write_boot_memory(vm.memory().mmap(), guest.image())?;
        let arg = if guest == Guest::MemoryPattern {
            PATTERN_END
        } else {
            0
        };
        vm.with_vcpu(0, move |fd| {
            let kvm = Kvm::new()?;
            configure_vcpu(fd, &kvm, ram, arg)?;
            Ok::<_, anyhow::Error>(())
        })??;
        vm.start()?;
        Ok(Self {
            vm,
            log,
            baseline: None,
        })
    }

    /// Waits for `n` more progress events than the log holds now.
    fn advance(&self, n: u64) -> Result<PortMonitor> {
        let have = self.log.monitor(self.baseline, 0).progress_events();
        self.log.wait(self.baseline, have + n)
    }

    /// The last progress value the guest reported here.
    fn last_progress(&self) -> Result<u32> {
        self.log
            .monitor(self.baseline, 0)
            .last_progress()
            .or(self.baseline)
            .ok_or_else(|| anyhow!("no progress yet"))
    }
}

fn build(
    incoming: &migration_core::destination::IncomingVm,
    log: &Log,
) -> Result<KvmVm, MigratableError> {
    Ok(KvmVm::for_incoming(incoming, codecs(), log.handlers())?)
}

/// Migrates `src` to a fresh VM listening at `url` (`tcp://127.0.0.1:0` or a unix
/// URL), checks the source stayed paused, and returns the destination.
fn migrate_url(src: &mut Running, url: &str) -> Result<(Running, MigrationReport)> {
    let log = Log::default();
    let dlog = log.clone();
    let (tx, rx) = mpsc::channel();
    let listen = url.to_owned();
    let dest = thread::spawn(move || {
        receive_migration(
            &listen,
            &KvmVm::receive_options(codecs()),
            IO_TIMEOUT,
            |u| {
                let _ = tx.send(u.to_owned());
            },
            |incoming| build(incoming, &dlog),
        )
    });
    let target = rx.recv().context("destination never listened")?;
    let mut opts = src.vm.migration_options();
    let result = send_migration(&mut src.vm, &target, &mut opts, IO_TIMEOUT);
    let dest = dest.join().map_err(|_| anyhow!("destination panicked"))?;
    let report = result.with_context(|| format!("migration to {url}"))?;
    let (vm, _) = dest.context("destination")?;
    ensure!(
        !src.vm.is_running(),
        "the source must stay paused after handing over"
    );
    ensure!(vm.is_running(), "the destination must run");
    let baseline = Some(src.last_progress()?);
    Ok((Running { vm, log, baseline }, report))
}

fn count(var: &str) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[test]
#[ignore = "soak: minutes; run with --ignored"]
fn soak_ping_pong_migrations_and_snapshot_restores() -> Result<()> {
    require_kvm!(Ok(()));
    let migrations = count("SOAK_MIGRATIONS");
    let snapshots = count("SOAK_SNAPSHOTS");
    let dir = tempfile::tempdir()?;
    let started = Instant::now();

    let mut vm = Running::boot(Guest::MemoryPattern)?;
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
