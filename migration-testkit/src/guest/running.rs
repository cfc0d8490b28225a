//! A test guest running in a [`KvmVm`]: its port events recorded by the VM's exit
//! handlers ([`GuestLog`]), and the steps tests take with it ([`RunningGuest`]): boot,
//! wait for progress, migrate to a fresh VM over a URL.
//!
//! Live-migration tests, the soak and benchmarks share these instead of each writing
//! its own exit-handler log.

use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use migration_core::codec::CodecRegistry;
use migration_core::destination::{receive_migration, IncomingVm};
use migration_core::precopy::{send_migration, MigrationReport};
use migration_core::protocol::MigrationError;
use migration_core::MigratableError;
use migration_kvm::{ExitAction, ExitEvent, ExitHandler, KvmVm, KvmVmConfig, KvmVmError};

use super::{
    configure_vcpu_registers, write_boot_memory, Guest, GuestError, PortEvent, PortMonitor, Verdict,
};

/// Errors of driving a [`RunningGuest`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunningGuestError {
    /// The guest reported a failure (its self-check, or an unexpected exit).
    #[error("guest failed: {0}")]
    Failed(String),
    /// The guest did not make the required progress in time.
    #[error("guest too slow: {0}")]
    Timeout(String),
    /// Loading the guest failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] KvmVmError),
    /// The migration failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// A step did not leave the VMs as it must (the source running after a handover…).
    #[error("{0}")]
    Invariant(String),
}

/// What a vCPU reported: a port write, or another exit (which parks the vCPU).
#[derive(Clone, Debug)]
enum Event {
    Port(PortEvent),
    Exit(String),
}

/// A vCPU exit handler that feeds `monitor` directly: port writes are judged as they
/// come, port reads read zero, and the vCPU parks once the guest has failed (a bad
/// self-check or an unexpected exit), or, with `park_after`, at the exit that brings
/// the monitor's progress count to that number (a deterministic stopping point). For
/// one vCPU whose verdict a caller polls; use [`GuestLog`] to keep the events.
pub fn monitor_handler(monitor: Arc<Mutex<PortMonitor>>, park_after: Option<u64>) -> ExitHandler {
    Box::new(move |ev| {
        let mut m = monitor.lock().unwrap_or_else(PoisonError::into_inner);
        let verdict = match ev {
            ExitEvent::IoOut { port, data } => m.on_io_out(port, data),
            ExitEvent::IoIn { data, .. } => {
                data.fill(0);
                m.verdict().clone()
            }
            ExitEvent::Other(what) => m.on_unexpected_exit(what),
        };
        let enough = park_after.is_some_and(|n| m.progress_events() >= n);
        if enough || matches!(verdict, Verdict::Fail(_)) {
            ExitAction::Pause
        } else {
            ExitAction::Continue
        }
    })
}

/// The events of one VM's guest, recorded by its exit handlers.
#[derive(Clone, Debug, Default)]
pub struct GuestLog(Arc<Mutex<Vec<Event>>>);

impl GuestLog {
    /// A new, empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Exit-handler factory for [`KvmVm::new`] and [`KvmVm::for_incoming`]: port writes
    /// are logged, port reads read zero, any other exit is logged and parks the vCPU.
    pub fn handlers(&self) -> impl FnMut(u32) -> ExitHandler {
        let log = self.0.clone();
        move |_| {
            let log = log.clone();
            Box::new(move |ev| {
                let mut l = log.lock().unwrap_or_else(PoisonError::into_inner);
                match ev {
                    ExitEvent::IoOut { port, data } => {
                        l.push(Event::Port(PortEvent::from_io_out(port, data)));
                        ExitAction::Continue
                    }
                    ExitEvent::IoIn { data, .. } => {
                        data.fill(0);
                        ExitAction::Continue
                    }
                    ExitEvent::Other(what) => {
                        l.push(Event::Exit(what));
                        ExitAction::Pause
                    }
                }
            })
        }
    }

    /// Replays the events into a monitor requiring `required` progress events after
    /// `baseline` (if any).
    pub fn monitor(&self, baseline: Option<u32>, required: u64) -> PortMonitor {
        let mut m = match baseline {
            Some(b) => PortMonitor::with_baseline(required, b),
            None => PortMonitor::new(required),
        };
        for ev in self.0.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            match ev {
                Event::Port(p) => m.on_event(*p),
                Event::Exit(what) => m.on_unexpected_exit(what.clone()),
            };
        }
        m
    }

    /// Waits until the guest has made `required` progress events (counting from the
    /// start of the log) with every self-check passing, and returns the monitor.
    pub fn wait(
        &self,
        baseline: Option<u32>,
        required: u64,
        timeout: Duration,
    ) -> Result<PortMonitor, RunningGuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.monitor(baseline, required);
            match m.verdict() {
                Verdict::Pass => return Ok(m),
                Verdict::Fail(f) => {
                    return Err(RunningGuestError::Failed(format!("{f:?} (monitor {m:?})")))
                }
                _ if Instant::now() >= deadline => {
                    let mut m = m;
                    m.on_timeout();
                    return Err(RunningGuestError::Timeout(format!("{:?}", m.verdict())));
                }
                _ => thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// A VM running a test guest, and the guest's log.
#[derive(Debug)]
pub struct RunningGuest {
    /// The VM.
    pub vm: KvmVm,
    /// Its guest's port events.
    pub log: GuestLog,
    /// Progress value the guest had when it arrived in this VM (`None` on the first).
    pub baseline: Option<u32>,
    /// How long to wait for progress before calling the guest too slow.
    pub timeout: Duration,
}

impl RunningGuest {
    /// A fresh one-vCPU VM with `mem` bytes of RAM running `guest`, which gets `arg`
    /// in RSI (the memory-pattern guest's working-set end; 0 for the others).
    pub fn boot(
        guest: Guest,
        mem: u64,
        arg: u64,
        timeout: Duration,
    ) -> Result<Self, RunningGuestError> {
        Self::boot_with(guest, KvmVmConfig::new(mem, 1), arg, timeout)
    }

    /// [`boot`](Self::boot) into a VM built from `config` (its layout must start
    /// with the guest's RAM at 0). The vCPUs keep the CPUID the VM gave them (the
    /// host's, or masked by `config.cpu` as a template).
    pub fn boot_with(
        guest: Guest,
        config: KvmVmConfig,
        arg: u64,
        timeout: Duration,
    ) -> Result<Self, RunningGuestError> {
        let log = GuestLog::new();
        let mut vm = KvmVm::new(config, log.handlers())?;
        let ram = write_boot_memory(vm.memory().mmap(), guest.image())?;
        vm.with_vcpu(0, move |fd| configure_vcpu_registers(fd, ram, arg))??;
        vm.start()?;
        Ok(Self {
            vm,
            log,
            baseline: None,
            timeout,
        })
    }

    /// Waits for `n` more progress events than the log holds now.
    pub fn advance(&self, n: u64) -> Result<PortMonitor, RunningGuestError> {
        let have = self.log.monitor(self.baseline, 0).progress_events();
        self.log.wait(self.baseline, have + n, self.timeout)
    }

    /// The last progress value the guest reported here (or its baseline).
    pub fn last_progress(&self) -> Result<u32, RunningGuestError> {
        self.log
            .monitor(self.baseline, 0)
            .last_progress()
            .or(self.baseline)
            .ok_or_else(|| RunningGuestError::Invariant("no progress yet".into()))
    }

    /// Migrates this guest to a fresh VM listening at `url` (`tcp://127.0.0.1:0` or a
    /// unix URL), checks this VM stayed paused and the new one runs, and returns it
    /// with the source's report.
    pub fn migrate_to(
        &mut self,
        url: &str,
        codecs: CodecRegistry,
        io_timeout: Duration,
    ) -> Result<(RunningGuest, MigrationReport), RunningGuestError> {
        let log = GuestLog::new();
        let dest_log = log.clone();
        let (tx, rx) = mpsc::channel();
        let listen = url.to_owned();
        let dest_codecs = codecs.clone();
        let dest = thread::spawn(move || {
            receive_migration(
                &listen,
                &KvmVm::receive_options(dest_codecs.clone()),
                io_timeout,
                |u| {
                    let _ = tx.send(u.to_owned());
                },
                |incoming: &IncomingVm| -> Result<KvmVm, MigratableError> {
                    Ok(KvmVm::for_incoming(
                        incoming,
                        dest_codecs,
                        dest_log.handlers(),
                    )?)
                },
            )
        });
        let target = rx.recv().map_err(|_| {
            RunningGuestError::Invariant(format!("destination never listened at {url}"))
        });
        let result = target.and_then(|target| {
            let mut opts = self.vm.migration_options();
            Ok(send_migration(
                &mut self.vm,
                &target,
                &mut opts,
                io_timeout,
            )?)
        });
        let dest = dest
            .join()
            .map_err(|_| RunningGuestError::Invariant("destination thread panicked".into()))?;
        let report = result?;
        let (vm, _) = dest?;
        if self.vm.is_running() {
            return Err(RunningGuestError::Invariant(
                "the source must stay paused after handing over".into(),
            ));
        }
        if !vm.is_running() {
            return Err(RunningGuestError::Invariant(
                "the destination must run".into(),
            ));
        }
        let baseline = Some(self.last_progress()?);
        Ok((
            RunningGuest {
                vm,
                log,
                baseline,
                timeout: self.timeout,
            },
            report,
        ))
    }
}
