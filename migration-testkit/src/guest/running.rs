//! A test guest running in a [`KvmVm`]: its port events recorded by the VM's exit
//! handlers ([`GuestLog`]), and the steps tests take with it ([`RunningGuest`]): boot,
//! wait for progress, migrate to a fresh VM over a URL.
//!
//! Live-migration tests, the soak and benchmarks share these instead of each writing
//! its own exit-handler log.

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use migration_core::codec::CodecRegistry;
use migration_core::destination::{receive_migration, IncomingVm};
use migration_core::precopy::{send_migration, ConvergencePolicy, MigrationReport};
use migration_core::protocol::{MigrationError, FEATURE_MULTI_CONNECTION};
use migration_core::MigratableError;
use migration_kvm::{ExitAction, ExitEvent, ExitHandler, KvmVm, KvmVmConfig, KvmVmError};

use super::error::GuestError;
use super::image::Guest;
use super::loader::{configure_vcpu_registers, configure_vcpu_smp, write_boot_memory, SmpStart};
use super::monitor::{Failure, PortEvent, PortMonitor, Verdict};

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
    Port { vcpu: u32, event: PortEvent },
    Exit { vcpu: u32, what: String },
}

/// How a test log names an exit other than port I/O (`Hlt`, `MmioWrite(…)`…).
fn exit_name(event: &ExitEvent<'_>) -> String {
    match event {
        ExitEvent::Other(exit) => format!("{exit:?}"),
        other => format!("{other:?}"),
    }
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
            other => m.on_unexpected_exit(exit_name(&other)),
        };
        let enough = park_after.is_some_and(|n| m.progress_events() >= n);
        if enough || matches!(verdict, Verdict::Fail(_)) {
            ExitAction::Pause
        } else {
            ExitAction::Continue
        }
    })
}

/// The events of one VM's guest, recorded by its exit handlers (one per vCPU), in
/// order, each with the vCPU that wrote it. Clones share the log.
///
/// Tests replay the whole log ([`monitor`](Self::monitor), [`wait`](Self::wait)); a
/// caller that judges the guest step by step (the `vmsnap` demo) keeps a cursor and
/// judges only what came after it ([`judge`](Self::judge)). A test stops one vCPU
/// at a point the guest announces with [`park_at`](Self::park_at).
#[derive(Clone, Debug, Default)]
pub struct GuestLog(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Vec<Event>>,
    /// Notified on every new event.
    wake: Condvar,
    /// Stopping points not reached yet: (vCPU, info value).
    park_at: Mutex<Vec<(u32, u32)>>,
}

impl GuestLog {
    /// A new, empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.0.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, event: Event) {
        self.lock().push(event);
        self.0.wake.notify_all();
    }

    /// [`handler_for`](Self::handler_for) vCPU 0.
    pub fn handler(&self) -> ExitHandler {
        self.handler_for(0)
    }

    /// A vCPU exit handler that records into this log as vCPU `vcpu`: port writes
    /// are logged, port reads read zero. It parks the vCPU after an error write (the
    /// guest repeats it forever: one is the verdict), at a stopping point set with
    /// [`park_at`](Self::park_at), and after any other exit (logged too).
    pub fn handler_for(&self, vcpu: u32) -> ExitHandler {
        let log = self.clone();
        Box::new(move |ev| match ev {
            ExitEvent::IoOut { port, data } => {
                let event = PortEvent::from_io_out(port, data);
                log.push(Event::Port { vcpu, event });
                match event {
                    PortEvent::Error(_) => ExitAction::Pause,
                    PortEvent::Info(value) if log.take_park(vcpu, value) => ExitAction::Pause,
                    _ => ExitAction::Continue,
                }
            }
            ExitEvent::IoIn { data, .. } => {
                data.fill(0);
                ExitAction::Continue
            }
            other => {
                log.push(Event::Exit {
                    vcpu,
                    what: exit_name(&other),
                });
                ExitAction::Pause
            }
        })
    }

    /// Exit-handler factory for [`KvmVm::new`] and [`KvmVm::for_incoming`]: a
    /// [`handler_for`](Self::handler_for) every vCPU.
    pub fn handlers(&self) -> impl FnMut(u32) -> ExitHandler {
        let log = self.clone();
        move |vcpu| log.handler_for(vcpu)
    }

    /// Makes vCPU `vcpu` park (`ExitAction::Pause`) the next time it writes `info` on
    /// the info port, once: a stopping point the guest chose, so what a snapshot
    /// taken there holds does not depend on timing. Wait for it with the runner's
    /// `wait_for_pause`.
    pub fn park_at(&self, vcpu: u32, info: u32) {
        self.0
            .park_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((vcpu, info));
    }

    /// Removes the stopping point (`vcpu`, `value`) if it is set; whether it was.
    fn take_park(&self, vcpu: u32, value: u32) -> bool {
        let mut points = self
            .0
            .park_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match points.iter().position(|p| *p == (vcpu, value)) {
            Some(i) => {
                points.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// The values vCPU `vcpu` wrote on the info port, oldest first.
    pub fn infos_of(&self, vcpu: u32) -> Vec<u32> {
        self.lock()
            .iter()
            .filter_map(|ev| match ev {
                Event::Port {
                    vcpu: v,
                    event: PortEvent::Info(value),
                } if *v == vcpu => Some(*value),
                _ => None,
            })
            .collect()
    }

    /// The first error the guest reported: the vCPU that wrote it and the code.
    pub fn first_error(&self) -> Option<(u32, u32)> {
        self.lock().iter().find_map(|ev| match ev {
            Event::Port {
                vcpu,
                event: PortEvent::Error(code),
            } => Some((*vcpu, *code)),
            _ => None,
        })
    }

    /// How many events the log holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the log holds no event yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last progress value the guest wrote, if any.
    pub fn last_progress(&self) -> Option<u32> {
        self.lock().iter().rev().find_map(|ev| match ev {
            Event::Port {
                event: PortEvent::Progress(v),
                ..
            } => Some(*v),
            _ => None,
        })
    }

    /// Replays the events into a monitor requiring `required` progress events after
    /// `baseline` (if any).
    pub fn monitor(&self, baseline: Option<u32>, required: u64) -> PortMonitor {
        let mut m = monitor(baseline, required);
        for ev in self.lock().iter() {
            feed(&mut m, ev);
        }
        m
    }

    /// Judges the events from index `from` on (`0`: the whole log) with a monitor
    /// requiring `required` progress events after `baseline` (if any), waiting for
    /// new events until the verdict is final or `timeout` has passed (a timeout
    /// failure then). Returns the monitor and the index after the last event it saw,
    /// the `from` of the next step.
    pub fn judge(
        &self,
        from: usize,
        baseline: Option<u32>,
        required: u64,
        timeout: Duration,
    ) -> (PortMonitor, usize) {
        let mut m = monitor(baseline, required);
        let deadline = Instant::now() + timeout;
        let mut seen = from;
        let mut events = self.lock();
        loop {
            for ev in events.get(seen..).unwrap_or(&[]) {
                feed(&mut m, ev);
            }
            seen = seen.max(events.len());
            if m.verdict().is_final() {
                return (m, seen);
            }
            let now = Instant::now();
            if now >= deadline {
                m.on_timeout();
                return (m, seen);
            }
            events = self
                .0
                .wake
                .wait_timeout(events, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until the guest has made `required` progress events (counting from the
    /// start of the log) with every self-check passing, and returns the monitor.
    pub fn wait(
        &self,
        baseline: Option<u32>,
        required: u64,
        timeout: Duration,
    ) -> Result<PortMonitor, RunningGuestError> {
        let (m, _) = self.judge(0, baseline, required, timeout);
        match m.verdict() {
            Verdict::Pass => Ok(m),
            Verdict::Fail(Failure::Timeout { .. }) => {
                Err(RunningGuestError::Timeout(format!("{:?}", m.verdict())))
            }
            Verdict::Fail(f) => Err(RunningGuestError::Failed(format!("{f:?} (monitor {m:?})"))),
            Verdict::Pending => Err(RunningGuestError::Invariant(format!(
                "no verdict after the timeout: {m:?}"
            ))),
        }
    }
}

fn monitor(baseline: Option<u32>, required: u64) -> PortMonitor {
    match baseline {
        Some(b) => PortMonitor::with_baseline(required, b),
        None => PortMonitor::new(required),
    }
}

fn feed(m: &mut PortMonitor, ev: &Event) {
    match ev {
        Event::Port { event, .. } => m.on_event(*event),
        Event::Exit { vcpu, what } => m.on_unexpected_exit(format!("vCPU {vcpu}: {what}")),
    };
}

/// Loads `image` into a paused `vm` for all of its vCPUs: the boot memory, then
/// [`configure_vcpu_smp`] on every vCPU's thread (each keeps the CPUID the VM gave
/// it), with `arg` in RSI.
pub fn load_vcpus(
    vm: &KvmVm,
    image: &[u8],
    arg: u64,
    start: SmpStart,
) -> Result<(), RunningGuestError> {
    let ram = write_boot_memory(vm.memory().mmap(), image)?;
    let count = u32::try_from(vm.vcpu_count())
        .map_err(|_| RunningGuestError::Invariant(format!("{} vCPUs", vm.vcpu_count())))?;
    for index in 0..count {
        vm.with_vcpu(index as usize, move |fd| {
            configure_vcpu_smp(fd, ram, arg, index, count, start)
        })??;
    }
    Ok(())
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
        Self::boot_into(config, timeout, |vm| {
            let ram = write_boot_memory(vm.memory().mmap(), guest.image())?;
            vm.with_vcpu(0, move |fd| configure_vcpu_registers(fd, ram, arg))??;
            Ok(())
        })
    }

    /// A fresh VM built from `config` running `guest` on all its vCPUs, started as
    /// `start` says (see [`load_vcpus`]); `arg` goes to RSI.
    pub fn boot_smp(
        guest: Guest,
        config: KvmVmConfig,
        arg: u64,
        start: SmpStart,
        timeout: Duration,
    ) -> Result<Self, RunningGuestError> {
        Self::boot_into(config, timeout, |vm| {
            load_vcpus(vm, guest.image(), arg, start)
        })
    }

    /// A fresh VM built from `config` and recording into a new log, loaded by `load`,
    /// then started.
    fn boot_into(
        config: KvmVmConfig,
        timeout: Duration,
        load: impl FnOnce(&KvmVm) -> Result<(), RunningGuestError>,
    ) -> Result<Self, RunningGuestError> {
        let log = GuestLog::new();
        let mut vm = KvmVm::new(config, migration_serde::registry(), log.handlers())?;
        load(&vm)?;
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
    ///
    /// The migration always completes ([`ConvergencePolicy::Force`]): a test checks
    /// that the guest continues, and whether precopy converges under the downtime
    /// limit depends on the machine's speed (a debug build, a loaded host), so it is
    /// the report's to say (`converged`), not the test's to require. Benchmarks
    /// measure convergence. The destination reads MEMORY data straight into guest
    /// memory where the transport allows (`KvmVm::allow_direct_receive`).
    pub fn migrate_to(
        &mut self,
        url: &str,
        codecs: CodecRegistry,
        io_timeout: Duration,
    ) -> Result<(RunningGuest, MigrationReport), RunningGuestError> {
        self.migrate_over_connections(url, codecs, io_timeout, 1)
    }

    /// [`migrate_to`](Self::migrate_to) over `connections` connections (the
    /// destination enables `FEATURE_MULTI_CONNECTION` when it is above 1).
    pub fn migrate_over_connections(
        &mut self,
        url: &str,
        codecs: CodecRegistry,
        io_timeout: Duration,
        connections: usize,
    ) -> Result<(RunningGuest, MigrationReport), RunningGuestError> {
        let log = GuestLog::new();
        let dest_log = log.clone();
        let (tx, rx) = mpsc::channel();
        let listen = url.to_owned();
        let dest_codecs = codecs.clone();
        let dest = thread::spawn(move || {
            let mut options = KvmVm::receive_options(dest_codecs.clone());
            if connections > 1 {
                options.features |= FEATURE_MULTI_CONNECTION;
            }
            receive_migration(
                &listen,
                &options,
                io_timeout,
                |u| {
                    let _ = tx.send(u.to_owned());
                },
                |incoming: &IncomingVm| -> Result<KvmVm, MigratableError> {
                    let mut vm = KvmVm::for_incoming(incoming, dest_codecs, dest_log.handlers())?;
                    // SAFETY: nothing here holds the destination's memory but the VM
                    // and the incoming migration, until the VM is resumed. (On
                    // tcp:// and unix:// the MEMORY data then lands straight in guest
                    // memory: the guests' self-checks cover that path.)
                    unsafe { vm.allow_direct_receive() };
                    Ok(vm)
                },
            )
        });
        let target = rx.recv().map_err(|_| {
            RunningGuestError::Invariant(format!("destination never listened at {url}"))
        });
        let result = target.and_then(|target| {
            let mut opts = self.vm.migration_options();
            opts.policy = ConvergencePolicy::Force;
            opts.connections = connections;
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
