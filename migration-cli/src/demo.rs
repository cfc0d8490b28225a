//! `vmsnap demo`: boot a self-checking guest, snapshot it to a file, restore it into a
//! fresh VM, live-migrate it over a loopback socket (`--rounds N` times, ping-pong),
//! and report sizes, times, rounds, bytes, downtime and the guest's own verdict after
//! each step.
//!
//! The flow is written once over [`DemoTarget`]; [`demo_kvm`](crate::demo_kvm) runs it
//! on a KVM guest, [`demo_fake`](crate::demo_fake) on migration-testkit's `FakeVm`
//! (where `/dev/kvm` is unusable, or with `VMSNAP_FORCE_FAKE=1`).

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Args;
use migration_core::{
    receive_migration_over, send_migration_over, IncomingVm, Migratable, MigratableError,
    MigrationOptions, ReceiveOptions,
};

use crate::report::{bytes, duration, migration_lines, parse_size};
use crate::{progress, EXIT_FAILED};

/// Environment variable that forces the fake-VM demo even where KVM works.
pub const FORCE_FAKE_ENV: &str = "VMSNAP_FORCE_FAKE";

/// Options of `vmsnap demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run this flat guest binary (docs/guest-abi.md) instead of the built-in guest.
    #[arg(long, value_name = "FILE")]
    pub guest: Option<PathBuf>,
    /// Guest memory size (e.g. 64M, 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Only snapshot and restore (no live migration).
    #[arg(long, conflicts_with = "migrate_only")]
    pub snapshot_only: bool,
    /// Only live-migrate (no snapshot).
    #[arg(long)]
    pub migrate_only: bool,
    /// Number of live migrations, each from the last destination to a fresh VM.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub rounds: u32,
    /// Write the snapshot file into DIR and keep it (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

/// The guest's verdict after a step.
#[derive(Debug, Clone)]
pub struct Check {
    /// Whether the guest continued correctly.
    pub ok: bool,
    /// What it reported.
    pub detail: String,
}

/// Builds a migration destination from the source's HELLO.
pub type BuildFn<V> = Box<dyn FnOnce(&IncomingVm) -> Result<V, MigratableError> + Send + 'static>;

/// What the demo runs on: a KVM guest or a fake VM.
pub trait DemoTarget {
    /// The VM type.
    type Vm: Migratable + Send + 'static;
    /// One line describing the guest.
    fn describe(&self) -> String;
    /// Guest memory size.
    fn guest_memory(&self) -> u64;
    /// Boots the guest; it runs when this returns.
    fn boot(&mut self) -> anyhow::Result<Self::Vm>;
    /// Lets `vm` run a little and asks the guest whether it continued correctly: its
    /// self-checks hold and its progress went on from `mark` (the progress at the last
    /// check of this VM, or of the snapshot or VM it came from), which is updated.
    /// `vm` runs again when this returns.
    fn check(&mut self, vm: &mut Self::Vm, mark: &mut u64) -> anyhow::Result<Check>;
    /// Pauses `vm`, writes a snapshot (state and memory) to `path`, resumes it.
    /// Returns the guest's progress in the snapshot.
    fn snapshot(&mut self, vm: &mut Self::Vm, path: &Path) -> anyhow::Result<u64>;
    /// A fresh VM restored from `path`, running.
    fn restore(&mut self, path: &Path) -> anyhow::Result<Self::Vm>;
    /// Builds migration destinations from the source's HELLO.
    fn destination(&self) -> BuildFn<Self::Vm>;
    /// Options to migrate `vm` (without the progress callback).
    fn migration_options(&self, vm: &Self::Vm) -> MigrationOptions;
    /// Receive options.
    fn receive_options(&self) -> ReceiveOptions;
}

/// Runs `vmsnap demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let forced = std::env::var(FORCE_FAKE_ENV).is_ok_and(|v| v == "1");
    let kvm = if forced {
        Err(format!("{FORCE_FAKE_ENV}=1"))
    } else {
        migration_testkit::kvm_available()
    };
    match kvm {
        Ok(()) => {
            let mut target = crate::demo_kvm::KvmTarget::new(args)?;
            flow(&mut target, args)
        }
        Err(reason) => {
            println!("no usable /dev/kvm ({reason}): running the demo on a fake VM");
            let mut target = crate::demo_fake::FakeTarget::new(args)?;
            flow(&mut target, args)
        }
    }
}

fn verdict_line(step: &str, c: &Check) -> String {
    format!(
        "  guest after {step}: {} ({})",
        if c.ok {
            "continued correctly"
        } else {
            "FAILED"
        },
        c.detail
    )
}

/// The demo flow over any target.
pub fn flow<T: DemoTarget>(target: &mut T, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    println!("vmsnap demo: {}", target.describe());
    // The first failure ends the demo: later steps would only wait on a dead guest.
    let failed = |step: &str, c: &Check| -> Option<ExitCode> {
        println!("{}", verdict_line(step, c));
        if c.ok {
            return None;
        }
        println!(
            "demo FAILED: the guest reported a failure after {step} ({} total)",
            duration(started.elapsed())
        );
        Some(ExitCode::from(EXIT_FAILED))
    };

    let mut vm = target.boot().context("booting the guest")?;
    let mut mark = 0u64;
    let c = target.check(&mut vm, &mut mark)?;
    if let Some(code) = failed("boot", &c) {
        return Ok(code);
    }

    let temp;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };

    if !args.migrate_only {
        let path = dir.join("demo.snap");
        let t = Instant::now();
        let spinner = progress::Spinner::start("writing the snapshot");
        let mut snap_mark = target
            .snapshot(&mut vm, &path)
            .context("snapshot to file")?;
        let snap_time = t.elapsed();
        drop(spinner);
        let meta = std::fs::metadata(&path)?;
        println!(
            "snapshot: {} in {} — file {} ({} on disk) for {} of guest memory",
            path.display(),
            duration(snap_time),
            bytes(meta.len()),
            bytes(meta.blocks() * 512),
            bytes(target.guest_memory())
        );
        let c = target.check(&mut vm, &mut mark)?;
        if let Some(code) = failed("snapshot (source)", &c) {
            return Ok(code);
        }

        let t = Instant::now();
        let spinner = progress::Spinner::start("restoring into a fresh VM");
        let mut restored = target.restore(&path).context("restore from file")?;
        let restore_time = t.elapsed();
        drop(spinner);
        println!("restore: into a fresh VM in {}", duration(restore_time));
        let c = target.check(&mut restored, &mut snap_mark)?;
        if let Some(code) = failed("restore", &c) {
            return Ok(code);
        }
        drop(restored);
        if args.keep.is_some() {
            println!("  kept {}", path.display());
        }
    }

    if !args.snapshot_only {
        for i in 1..=args.rounds {
            let (next, lines) = migrate(target, vm, i)?;
            vm = next;
            println!("migration {i}/{}: over a loopback unix socket", args.rounds);
            for l in lines {
                println!("  {l}");
            }
            let c = target.check(&mut vm, &mut mark)?;
            if let Some(code) = failed(&format!("migration {i}"), &c) {
                return Ok(code);
            }
        }
    }
    drop(vm);
    println!(
        "demo OK: the guest continued correctly after every step ({} total)",
        duration(started.elapsed())
    );
    Ok(ExitCode::SUCCESS)
}

/// Migrates `vm` to a fresh destination in another thread; returns the destination
/// (running) and the report lines.
fn migrate<T: DemoTarget>(
    target: &mut T,
    mut vm: T::Vm,
    round: u32,
) -> anyhow::Result<(T::Vm, Vec<String>)> {
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
    }
    let build = target.destination();
    let recv_options = target.receive_options();
    let dest = thread::Builder::new()
        .name(format!("vmsnap-dest-{round}"))
        .spawn(move || receive_migration_over(b, &recv_options, build))?;
    let mut options = target.migration_options(&vm);
    let (callback, bar) = progress::migration(&format!("migration {round}"));
    options.progress = Some(callback);
    let sent = send_migration_over(&mut vm, a, &mut options);
    bar.finish_and_clear();
    let received = dest
        .join()
        .map_err(|_| anyhow!("the destination thread panicked"))?;
    let report = sent.context("migration (source side)")?;
    let (dest_vm, recv) = received.context("migration (destination side)")?;
    let mut lines = migration_lines(&report);
    lines.push(format!(
        "destination received {} rounds, {} of memory data, {} as zero ranges, {} of state",
        recv.rounds,
        bytes(recv.memory_bytes),
        bytes(recv.zero_bytes),
        bytes(recv.state_bytes)
    ));
    // The source stays paused after the handover; dropping it frees it.
    drop(vm);
    Ok((dest_vm, lines))
}
