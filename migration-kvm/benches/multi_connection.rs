//! Live migration of one running 1 GiB KVM guest over 1, 2 and 4 loopback TCP
//! connections (multi-connection, `MigrationOptions::connections`) in the same run: the
//! guest (the timer guest in idle mode, its memory from 16 MiB up random-filled so every
//! page travels) migrates on from each destination to the next, rotating through the
//! connection counts, `BENCH_RUNS` times each (default 3). Prints each migration's
//! throughput, the median and spread per count, against this machine's raw loopback
//! TCP copy of the same size measured in the same run.
//!
//! Run: `cargo bench -p migration-kvm --bench multi_connection` (env `BENCH_MIB`: guest
//! size, default 1024; `BENCH_RUNS`). Needs `/dev/kvm`. On a 2-core machine the
//! connections' threads share the cores with the guest's vCPU: expect little gain.

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use migration_core::destination::receive_migration_with;
use migration_core::precopy::send_migration_with;
use migration_core::protocol::FEATURE_MULTI_CONNECTION;
use migration_core::security::Security;
use migration_core::ConvergencePolicy;
use migration_kvm::KvmVm;
use migration_testkit::bench::{env_or, loopback_tcp_copy, ms};
use migration_testkit::guest::{monitor_handler, Guest, PortMonitor, TIMER_IDLE};

use common::{source, wait_for};

const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Migrates `vm` to a destination thread over `connections` connections; returns the
/// destination VM (running, its guest checked), the time and the bytes sent.
fn migrate(mut vm: KvmVm, connections: usize) -> Result<(KvmVm, Duration, u64)> {
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let dest = thread::spawn(move || -> Result<KvmVm> {
        let monitor = Arc::new(Mutex::new(PortMonitor::new(2)));
        let m = monitor.clone();
        let mut options = KvmVm::receive_options(migration_serde::registry());
        options.features |= FEATURE_MULTI_CONNECTION;
        let (vm, _) = receive_migration_with(
            "tcp://127.0.0.1:0",
            &Security::plaintext(),
            &options,
            IO_TIMEOUT,
            |url| {
                let _ = tx.send(url.to_owned());
            },
            move |incoming| {
                KvmVm::for_incoming(incoming, migration_serde::registry(), |_| {
                    monitor_handler(m.clone(), None)
                })
                .map_err(Into::into)
            },
        )?;
        let _ = done_tx.send(());
        wait_for(&monitor, 2)?;
        Ok(vm)
    });
    let url = rx.recv().context("destination listens")?;
    let started = Instant::now();
    let mut options = vm.migration_options();
    options.policy = ConvergencePolicy::Force;
    options.connections = connections;
    let report = send_migration_with(
        &mut vm,
        &url,
        &Security::plaintext(),
        &mut options,
        IO_TIMEOUT,
    )?;
    let total = started.elapsed();
    ensure!(
        (report.features & FEATURE_MULTI_CONNECTION != 0) == (connections > 1),
        "{connections} connections not negotiated"
    );
    done_rx.recv().context("destination")?;
    let next = dest
        .join()
        .map_err(|_| anyhow::anyhow!("destination panicked"))??;
    drop(vm);
    Ok((next, total, report.bytes_sent))
}

fn median_spread(xs: &mut [f64]) -> (f64, f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn main() -> Result<()> {
    if let Err(reason) = migration_testkit::kvm_available() {
        eprintln!("skipped: /dev/kvm not usable: {reason}");
        return Ok(());
    }
    let size = (env_or("BENCH_MIB", 1024) as u64) << 20;
    let runs = env_or("BENCH_RUNS", 3).max(1);
    let gib = size as f64 / (1u64 << 30) as f64;
    let raw = loopback_tcp_copy(size as usize, None)?;
    let raw_bw = size as f64 / raw.as_secs_f64();
    println!(
        "raw loopback TCP copy of {gib:.2} GiB: {:.1} ms, {:.2} GB/s",
        ms(raw),
        raw_bw / 1e9
    );
    let counts = [1usize, 2, 4];
    let (mut vm, _) = source(size, Guest::Timer, TIMER_IDLE, true)?;
    let mut all: Vec<(usize, f64)> = Vec::new();
    for i in 0..runs * counts.len() {
        let n = counts[i % counts.len()];
        let (next, took, bytes) = migrate(vm, n)?;
        vm = next;
        let bw = bytes as f64 / took.as_secs_f64() / 1e9;
        println!(
            "{n} connection(s), run {}: {:.0} ms, {bw:.2} GB/s",
            i / counts.len() + 1,
            ms(took)
        );
        all.push((n, bw));
    }
    println!("\n| connections | median GB/s | min–max | vs raw TCP |");
    println!("|---|---|---|---|");
    println!("| raw loopback TCP copy | {:.2} | | 1.00× |", raw_bw / 1e9);
    for n in counts {
        let mut xs: Vec<f64> = all.iter().filter(|r| r.0 == n).map(|r| r.1).collect();
        let (med, lo, hi) = median_spread(&mut xs);
        println!(
            "| {n} | {med:.2} | {lo:.2}–{hi:.2} | {:.2}× |",
            med * 1e9 / raw_bw
        );
    }
    println!("\n{runs} runs each, one {gib:.2} GiB guest, first run of each count included");
    drop(vm);
    Ok(())
}
