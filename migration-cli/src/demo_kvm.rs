//! The demo on a real KVM guest: migration-kvm's `KvmVm` running one of
//! migration-testkit's self-checking guests (or `--guest FILE`) on one or more
//! vCPUs, judged from its port writes, which migration-testkit's [`GuestLog`]
//! records.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use migration_core::{
    CodecRegistry, ConvergencePolicy, IncomingVm, MemoryRangeTable, MemorySink, MemorySource,
    Migratable, MigratableError, MigrationOptions, MigrationRole, Pausable, ReceiveOptions,
    Snapshot, Snapshottable, Transportable,
};
use migration_kvm::restore::EagerOptions;
use migration_kvm::{KvmVm, KvmVmConfig, RestoreMode};
use migration_testkit::guest::{
    describe_error_code, load_vcpus, Failure, Guest, GuestImage, GuestLog, PortMonitor, SmpStart,
    Verdict,
};

use crate::demo_target::{BuildFn, Check, DemoArgs, DemoTarget};

/// Default guest RAM.
const DEFAULT_MEM: u64 = 256 << 20;
/// The built-in guest's working set: [1 MiB, 33 MiB), 1/8 of it rewritten per pass.
const WORKING_SET_END: u64 = 33 << 20;
/// Progress events a check waits for.
const REQUIRED: u64 = 3;
/// Longest wait for them.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A [`KvmVm`] with the log its exit handlers write to.
#[derive(Debug)]
pub struct DemoKvm {
    vm: KvmVm,
    log: GuestLog,
    /// Events of `log` the last check judged.
    checked: usize,
}

impl DemoKvm {
    fn new(vm: KvmVm, log: GuestLog) -> Self {
        Self {
            vm,
            log,
            checked: 0,
        }
    }
}

/// The demo's verdict from a monitor's: on a pass, `mark` becomes the last progress.
fn check_of(monitor: &PortMonitor, mark: &mut u64) -> Check {
    match monitor.verdict() {
        Verdict::Pass => {
            let last = monitor.last_progress().map_or(*mark, u64::from);
            let before = std::mem::replace(mark, last);
            Check {
                ok: true,
                detail: format!(
                    "progress {before} -> {last}, {} events, self-checks hold",
                    monitor.progress_events()
                ),
            }
        }
        Verdict::Fail(Failure::GuestError(code)) => Check {
            ok: false,
            detail: format!(
                "guest error {code:#010x}: {} (info {:x?})",
                describe_error_code(*code),
                monitor.infos()
            ),
        },
        Verdict::Fail(f) => Check {
            ok: false,
            detail: f.to_string(),
        },
        Verdict::Pending => Check {
            ok: false,
            detail: "no verdict".into(),
        },
    }
}

impl Pausable for DemoKvm {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        self.vm.resume()
    }
}

impl Snapshottable for DemoKvm {
    fn id(&self) -> String {
        self.vm.id()
    }
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        self.vm.snapshot()
    }
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        self.vm.restore(snapshot)
    }
}

impl Transportable for DemoKvm {
    fn codecs(&self) -> &CodecRegistry {
        self.vm.codecs()
    }
}

impl Migratable for DemoKvm {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.vm.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.vm.stop_dirty_log()
    }
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        self.vm.dirty_log()
    }
    fn start_migration(&mut self, role: MigrationRole) -> Result<(), MigratableError> {
        self.vm.start_migration(role)
    }
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        self.vm.complete_migration()
    }
    fn memory_source(&self) -> &dyn MemorySource {
        self.vm.memory_source()
    }
    fn memory_sink(&self) -> &dyn MemorySink {
        self.vm.memory_sink()
    }

    fn can_throttle(&self) -> bool {
        self.vm.can_throttle()
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), MigratableError> {
        Migratable::set_throttle(&mut self.vm, percent)
    }
}

/// The KVM target.
#[derive(Debug)]
pub struct KvmTarget {
    mem: u64,
    vcpus: u32,
    start: SmpStart,
    image: Vec<u8>,
    name: String,
    arg: u64,
}

impl KvmTarget {
    /// A target for `args`: the built-in memory_pattern guest (the smp guest with
    /// more than one vCPU), or `--guest FILE`.
    pub fn new(args: &DemoArgs) -> anyhow::Result<Self> {
        let mem = args.mem.unwrap_or(DEFAULT_MEM);
        let vcpus = args.vcpus;
        let (image, name, arg) = match &args.guest {
            Some(path) => {
                let img = GuestImage::from_file(path)
                    .with_context(|| format!("loading guest {}", path.display()))?;
                (img.bytes().to_vec(), path.display().to_string(), 0)
            }
            None if vcpus > 1 => (
                Guest::Smp.image().to_vec(),
                format!(
                    "{} (its vCPUs woken with INIT-SIPI-SIPI; each checks shared counters and \
                     the TSC, sends IPIs around a ring and NMIs to itself)",
                    Guest::Smp.name()
                ),
                0,
            ),
            None => (
                Guest::MemoryPattern.image().to_vec(),
                format!(
                    "{} (verifies a {} MiB working set each pass and rewrites 1/8 of it)",
                    Guest::MemoryPattern.name(),
                    (WORKING_SET_END >> 20) - 1
                ),
                WORKING_SET_END,
            ),
        };
        if args.guest.is_none() && vcpus == 1 && mem < WORKING_SET_END {
            return Err(anyhow!(
                "--mem must be at least {} MiB for the built-in guest",
                WORKING_SET_END >> 20
            ));
        }
        // The built-in SMP guest shows the INIT-SIPI-SIPI start; a guest file gets
        // every vCPU at its entry point (docs/guest-abi.md §9).
        let start = match args.guest {
            None => SmpStart::InitSipi,
            Some(_) => SmpStart::AllAtEntry,
        };
        Ok(Self {
            mem,
            vcpus,
            start,
            image,
            name,
            arg,
        })
    }

    fn codecs() -> CodecRegistry {
        migration_serde::registry()
    }
}

impl DemoTarget for KvmTarget {
    type Vm = DemoKvm;

    fn describe(&self) -> String {
        format!(
            "KVM guest {}, {} MiB of RAM, {} vCPU{}",
            self.name,
            self.mem >> 20,
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" }
        )
    }

    fn guest_memory(&self) -> u64 {
        self.mem
    }

    fn boot(&mut self) -> anyhow::Result<DemoKvm> {
        let log = GuestLog::new();
        let mut vm = KvmVm::new(
            KvmVmConfig::new(self.mem, self.vcpus),
            Self::codecs(),
            log.handlers(),
        )?;
        load_vcpus(&vm, &self.image, self.arg, self.start)?;
        vm.start()?;
        Ok(DemoKvm::new(vm, log))
    }

    /// Judges the events since the last check: `REQUIRED` progress events at or above
    /// `mark`, every self-check passing.
    fn check(&mut self, vm: &mut DemoKvm, mark: &mut u64) -> anyhow::Result<Check> {
        let baseline = u32::try_from(*mark).unwrap_or(u32::MAX);
        let (monitor, seen) = vm.log.judge(vm.checked, Some(baseline), REQUIRED, TIMEOUT);
        vm.checked = seen;
        Ok(check_of(&monitor, mark))
    }

    fn snapshot(&mut self, vm: &mut DemoKvm, path: &Path) -> anyhow::Result<u64> {
        vm.vm.stop()?;
        let mark = vm.log.last_progress().map_or(0, u64::from);
        let saved = vm.vm.save_snapshot(path);
        vm.vm.start()?;
        saved?;
        Ok(mark)
    }

    fn restore(&mut self, path: &Path) -> anyhow::Result<DemoKvm> {
        let log = GuestLog::new();
        let mut vm = KvmVm::restore_from_file(
            path,
            RestoreMode::Eager(EagerOptions::default()),
            Self::codecs(),
            log.handlers(),
        )?;
        vm.start()?;
        Ok(DemoKvm::new(vm, log))
    }

    fn destination(&self) -> BuildFn<DemoKvm> {
        Box::new(|incoming: &IncomingVm| {
            let log = GuestLog::new();
            let vm = KvmVm::for_incoming(incoming, Self::codecs(), log.handlers())?;
            Ok(DemoKvm::new(vm, log))
        })
    }

    fn migration_options(&self, vm: &DemoKvm) -> MigrationOptions {
        MigrationOptions {
            downtime_limit: Duration::from_millis(100),
            // A demo always completes: on a loaded host, pause and send the rest
            // (the report then says "converged: no (forced)").
            max_rounds: 10,
            policy: ConvergencePolicy::Force,
            ..vm.vm.migration_options()
        }
    }

    fn receive_options(&self) -> ReceiveOptions {
        KvmVm::receive_options(Self::codecs())
    }
}
