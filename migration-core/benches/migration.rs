//! Live migration of a 1 GiB fake VM over loopback TCP, as a ratio to this machine's
//! raw loopback TCP bandwidth measured in the same run:
//! - a guest with all memory written once (random bytes): total time, throughput and
//!   its ratio to a plain 1 GiB TCP copy through 127.0.0.1 (goal ≥ 0.5×);
//! - an idle guest (1 GiB, 16 MiB of it written, no workload): total time, downtime
//!   (goal: a few ms);
//! - a guest dirtying 256 MiB/s with a 50 ms downtime limit: rounds and downtime
//!   (goal: the limit holds).
//!
//! Run: `cargo bench -p migration-core --bench migration` (env `BENCH_MIB` changes the
//! guest size, default 1024; `BENCH_ITERS` the iterations of the loopback copy and
//! the full-memory migration, default 2, best counts).
//!
//! The source and destination run in one process on two threads, as they would on
//! two hosts: the destination allocates and writes its own memory.

use std::thread;
use std::time::{Duration, Instant};

use migration_core::arch::Arch;
use migration_core::{
    receive_migration, send_migration, ConvergencePolicy, MemoryRange, MemorySink,
    MigrationOptions, MigrationReport, Pausable, ReceiveOptions,
};
use migration_testkit::bench::{env_or, loopback_tcp_copy, ms, print_report};
use migration_testkit::{FakeVm, Rng};

const IO_TIMEOUT: Duration = Duration::from_secs(120);
const BUF: usize = 2 << 20;

/// Migrates `source` over loopback TCP to a destination thread; returns the source's
/// report and the destination VM (paused).
fn migrate(
    source: &mut FakeVm,
    options: &mut MigrationOptions,
) -> anyhow::Result<(MigrationReport, FakeVm)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dest = thread::Builder::new()
        .name("destination".into())
        .spawn(move || {
            let options = ReceiveOptions::new(Arch::None, migration_serde::registry());
            receive_migration(
                "tcp://127.0.0.1:0",
                &options,
                IO_TIMEOUT,
                |url| {
                    let _ = tx.send(url.to_owned());
                },
                |incoming| FakeVm::destination(&incoming.layout, migration_serde::registry()),
            )
        })?;
    let url = rx.recv()?;
    let report = send_migration(source, &url, options, IO_TIMEOUT)?;
    let (mut vm, _) = dest.join().expect("destination thread")?;
    vm.pause()?;
    Ok((report, vm))
}

fn options(limit: Duration, policy: ConvergencePolicy) -> MigrationOptions {
    MigrationOptions {
        arch: Arch::None,
        downtime_limit: limit,
        max_rounds: 30,
        policy,
        ..MigrationOptions::default()
    }
}

/// A guest of `size` bytes, idle, whose first `written` bytes hold random data.
fn guest(size: u64, written: u64) -> anyhow::Result<FakeVm> {
    let vm = FakeVm::builder()
        .memory_size(size)
        .workload(0, 5)
        .codecs(migration_serde::registry())
        .build()?;
    let mut buf = vec![0u8; BUF];
    let mut rng = Rng::new(7);
    let mut gpa = 0;
    while gpa < written {
        rng.fill(&mut buf);
        let n = (written - gpa).min(BUF as u64) as usize;
        vm.memory().write_memory(gpa, &buf[..n])?;
        gpa += n as u64;
    }
    Ok(vm)
}

fn main() -> anyhow::Result<()> {
    let size = (env_or("BENCH_MIB", 1024) as u64) << 20;
    let iters = env_or("BENCH_ITERS", 2).max(1);
    let gib = size as f64 / (1u64 << 30) as f64;

    // The machine's own limit: raw loopback TCP.
    let mut raw = Duration::MAX;
    let mut raw_fill = Duration::MAX;
    for _ in 0..iters {
        raw = raw.min(loopback_tcp_copy(size as usize, None)?);
        let fresh = FakeVm::destination(&[MemoryRange::new(0, size)], migration_serde::registry())?;
        raw_fill = raw_fill.min(loopback_tcp_copy(
            size as usize,
            Some(fresh.memory().as_ref()),
        )?);
    }
    let raw_bw = size as f64 / raw.as_secs_f64();
    let fill_bw = size as f64 / raw_fill.as_secs_f64();
    println!(
        "raw loopback TCP copy of {gib:.2} GiB: {:.1} ms, {:.2} GB/s (best of {iters})",
        ms(raw),
        raw_bw / 1e9
    );
    println!(
        "raw loopback TCP copy into fresh fake guest memory: {:.1} ms, {:.2} GB/s (best of {iters})",
        ms(raw_fill),
        fill_bw / 1e9
    );

    // 1. All memory written once.
    let mut best: Option<MigrationReport> = None;
    for i in 0..iters {
        let mut source = guest(size, size)?;
        let mut opts = options(Duration::from_millis(300), ConvergencePolicy::Force);
        let (report, dest) = migrate(&mut source, &mut opts)?;
        if i == 0 {
            anyhow::ensure!(
                source.content_digest() == dest.content_digest(),
                "destination memory differs from the source"
            );
        }
        if best
            .as_ref()
            .is_none_or(|b| report.total_time < b.total_time)
        {
            best = Some(report);
        }
    }
    let full = best.expect("at least one iteration");
    println!("\n1. {gib:.2} GiB guest, all memory written once (best of {iters}):");
    print_report(&full);

    if std::env::var_os("BENCH_ONLY_FULL").is_some() {
        return Ok(());
    }

    // 2. Idle guest.
    let mut source = guest(size, 16 << 20)?;
    let mut opts = options(Duration::from_millis(300), ConvergencePolicy::Force);
    let (idle, _dest) = migrate(&mut source, &mut opts)?;
    drop((source, _dest));
    println!("\n2. idle {gib:.2} GiB guest (16 MiB written):");
    print_report(&idle);

    // 3. A guest dirtying 256 MiB/s, 50 ms downtime limit.
    let limit = Duration::from_millis(50);
    let mut source = FakeVm::builder()
        .memory_size(size)
        .workload(256 << 20, 9)
        .codecs(migration_serde::registry())
        .build()?;
    source.run_workload_writes(size / 4096 / 4)?;
    thread::sleep(Duration::from_millis(200));
    let writes_before = source.workload().writes;
    let t = Instant::now();
    let mut opts = options(limit, ConvergencePolicy::Force);
    let (dirty, dest) = migrate(&mut source, &mut opts)?;
    let dirty_rate = (source.workload().writes - writes_before) as f64 * 4096.0
        / t.elapsed().as_secs_f64()
        / (1 << 20) as f64;
    dest.verify().map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "\n3. {gib:.2} GiB guest dirtying 256 MiB/s (measured {dirty_rate:.0} MiB/s during the migration), limit {} ms:",
        limit.as_millis()
    );
    print_report(&dirty);

    let ratio = (size as f64 / full.total_time.as_secs_f64()) / raw_bw;
    println!("\n| scenario | total | throughput | vs raw TCP | rounds | downtime | goal |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| raw loopback TCP, {gib:.2} GiB | {:.0} ms | {:.2} GB/s | 1.00× | | | |",
        ms(raw),
        raw_bw / 1e9
    );
    println!(
        "| raw TCP into fresh fake guest memory | {:.0} ms | {:.2} GB/s | {:.2}× | | | |",
        ms(raw_fill),
        fill_bw / 1e9,
        fill_bw / raw_bw
    );
    println!(
        "| all memory written | {:.0} ms | {:.2} GB/s | {:.2}× | {} | {:.2} ms | ≥ 0.5× {} |",
        ms(full.total_time),
        size as f64 / full.total_time.as_secs_f64() / 1e9,
        ratio,
        full.rounds.len(),
        ms(full.downtime.total),
        if ratio >= 0.5 { "met" } else { "NOT met" }
    );
    println!(
        "| idle | {:.0} ms | | | {} | {:.2} ms | a few ms {} |",
        ms(idle.total_time),
        idle.rounds.len(),
        ms(idle.downtime.total),
        if idle.downtime.total <= Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "| dirtying 256 MiB/s, limit 50 ms | {:.0} ms | | | {} | {:.2} ms | ≤ 50 ms {}{} |",
        ms(dirty.total_time),
        dirty.rounds.len(),
        ms(dirty.downtime.total),
        if dirty.downtime.total <= limit {
            "met"
        } else {
            "NOT met"
        },
        if dirty.converged {
            ""
        } else {
            " (forced: did not converge)"
        }
    );
    println!(
        "\n(all memory written: {:.2}× of raw TCP into fresh fake guest memory)",
        (size as f64 / full.total_time.as_secs_f64()) / fill_bw
    );
    Ok(())
}
