//! The demo on migration-testkit's `FakeVm`: guest memory is a sparse fake whose
//! background workload dirties pages at a set rate, and `FakeVm::verify` is the
//! guest's verdict (every page of the workload area holds exactly what the last write
//! to it wrote).

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context};
use migration_core::container::WriteOptions;
use migration_core::{
    file, Codec, ConvergencePolicy, IncomingVm, MemoryRange, Migratable, MigrationOptions,
    Pausable, ReceiveOptions, Snapshottable,
};
use migration_testkit::FakeVm;

use crate::demo_target::{BuildFn, Check, DemoArgs, DemoTarget};

/// Default fake guest memory.
const DEFAULT_MEM: u64 = 128 << 20;
/// How long a VM runs before each check.
const RUN: Duration = Duration::from_millis(150);

/// The fake-VM target.
#[derive(Debug)]
pub struct FakeTarget {
    mem: u64,
}

impl FakeTarget {
    /// A target for `args` (`--guest` does not apply to a fake VM).
    pub fn new(args: &DemoArgs) -> anyhow::Result<Self> {
        if let Some(g) = &args.guest {
            println!(
                "note: --guest {} needs KVM; the fake VM runs its own workload",
                g.display()
            );
        }
        if args.vcpus > 1 {
            println!(
                "note: --vcpus {} needs KVM; the fake VM has no vCPUs",
                args.vcpus
            );
        }
        let mem = args.mem.unwrap_or(DEFAULT_MEM);
        if mem < 32 << 20 || mem % 4096 != 0 {
            return Err(anyhow!("--mem must be a multiple of 4 KiB, at least 32M"));
        }
        Ok(Self { mem })
    }

    fn registry() -> migration_core::CodecRegistry {
        migration_serde::registry()
    }
}

impl DemoTarget for FakeTarget {
    type Vm = FakeVm;

    fn describe(&self) -> String {
        format!(
            "fake VM, {} MiB of memory, a workload rewriting a 16 MiB working set at 64 MiB/s",
            self.mem >> 20
        )
    }

    fn guest_memory(&self) -> u64 {
        self.mem
    }

    fn boot(&mut self) -> anyhow::Result<FakeVm> {
        let vm = FakeVm::builder()
            .memory_size(self.mem)
            .workload_area(&[MemoryRange::new(16 << 20, 16 << 20)])
            .workload(64 << 20, 0x5eed)
            .codecs(Self::registry())
            .build()?;
        vm.run_workload_writes(2000)?;
        Ok(vm)
    }

    fn check(&mut self, vm: &mut FakeVm, mark: &mut u64) -> anyhow::Result<Check> {
        thread::sleep(RUN);
        vm.pause()?;
        let writes = vm.workload().writes;
        let verdict = vm.verify();
        vm.resume()?;
        Ok(match verdict {
            Err(e) => Check {
                ok: false,
                detail: e,
            },
            Ok(()) if writes <= *mark => Check {
                ok: false,
                detail: format!("the workload did not go on: {writes} writes, {mark} before"),
            },
            Ok(()) => {
                let before = std::mem::replace(mark, writes);
                Check {
                    ok: true,
                    detail: format!(
                        "workload at write {writes} (from {before}), every page of its area checks out"
                    ),
                }
            }
        })
    }

    fn snapshot(&mut self, vm: &mut FakeVm, path: &Path) -> anyhow::Result<u64> {
        vm.pause()?;
        let result = (|| -> anyhow::Result<u64> {
            let mut snap = vm.snapshot()?;
            let codec: Arc<dyn Codec> = Arc::new(migration_serde::PostcardCodec);
            snap.encode(&codec)?;
            file::write_snapshot_file(
                path,
                &snap,
                Some(vm.memory().as_ref()),
                &WriteOptions::default(),
            )?;
            Ok(vm.workload().writes)
        })();
        vm.resume()?;
        result
    }

    fn restore(&mut self, path: &Path) -> anyhow::Result<FakeVm> {
        let mut vm = FakeVm::destination(&[MemoryRange::new(0, self.mem)], Self::registry())?;
        let snap = file::read_snapshot_file(path, &Self::registry(), Some(vm.memory_sink()))
            .with_context(|| format!("reading {}", path.display()))?;
        vm.restore(&snap)?;
        vm.resume()?;
        Ok(vm)
    }

    fn destination(&self) -> BuildFn<FakeVm> {
        Box::new(|incoming: &IncomingVm| FakeVm::destination(&incoming.layout, Self::registry()))
    }

    fn migration_options(&self, _vm: &FakeVm) -> MigrationOptions {
        MigrationOptions {
            downtime_limit: Duration::from_millis(50),
            max_rounds: 10,
            policy: ConvergencePolicy::Force,
            ..MigrationOptions::default()
        }
    }

    fn receive_options(&self) -> ReceiveOptions {
        ReceiveOptions::new(migration_core::arch::Arch::host(), Self::registry())
    }
}
