//! Auto-converge against precopy alone, for a KVM guest that dirties memory about
//! twice as fast as the link carries it.
//!
//! The guest is the memory-pattern guest (a 16 MiB working set it verifies each pass
//! and rewrites an eighth of). Its dirty rate is sampled first (dirty log started,
//! read after 20 ms: distinct pages over the window, before the working set
//! saturates); the link is an in-process shaped unix socket (`Shaped`, a token bucket)
//! at half that rate unless `BENCH_LINK_MB` says otherwise, and its raw capacity is
//! measured in the same run (64 MiB through it to a draining reader). Then, each
//! `BENCH_ITERS` times (default 3) on a fresh guest, with a 50 ms downtime limit:
//! - precopy alone, forced when it gives up (the guest outruns the link);
//! - auto-converge (20 %, +10 %, at most 99 %).
//!
//! Printed: total time and downtime, median and range, rounds and the highest
//! throttle, and whether the destination's self-check held.
//!
//! Run: `cargo bench -p migration-kvm --bench auto_converge`. Needs `/dev/kvm`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use migration_core::convergence::AutoConverge;
use migration_core::destination::receive_migration_over;
use migration_core::precopy::{send_migration_over, ConvergencePolicy, MigrationReport};
use migration_core::Migratable;
use migration_kvm::KvmVm;
use migration_testkit::bench::{env_or, ms};
use migration_testkit::guest::{Guest, GuestLog, RunningGuest};
use migration_testkit::shaped::Shaped;

const MEM: u64 = 64 << 20;
const PATTERN_END: u64 = 17 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(120);

fn codecs() -> migration_core::CodecRegistry {
    migration_serde::registry()
}

fn boot() -> Result<RunningGuest> {
    let g = RunningGuest::boot(Guest::MemoryPattern, MEM, PATTERN_END, TIMEOUT)?;
    g.advance(3)?;
    Ok(g)
}

/// Distinct bytes the guest dirties per second over a short window.
fn sample_dirty_rate(g: &mut RunningGuest) -> Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..5 {
        g.vm.start_dirty_log()?;
        let t = Instant::now();
        thread::sleep(Duration::from_millis(20));
        let dirty = g.vm.dirty_log()?.total_bytes();
        let secs = t.elapsed().as_secs_f64();
        g.vm.stop_dirty_log()?;
        best = best.max(dirty as f64 / secs);
    }
    Ok(best)
}

/// Bytes per second a `Shaped` unix socket at `rate` carries, measured.
fn raw_capacity(rate: u64) -> Result<f64> {
    let (a, mut b) = UnixStream::pair()?;
    let total = 64usize << 20;
    let reader = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            let n = b.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(())
    });
    let mut link = Shaped::new(a, rate);
    let chunk = vec![0x5au8; 2 << 20];
    let t = Instant::now();
    for _ in 0..total / chunk.len() {
        link.write_all(&chunk)?;
    }
    reader.join().map_err(|_| anyhow!("reader panicked"))??;
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

struct Run {
    report: MigrationReport,
    self_check: bool,
}

fn migrate(link: u64, auto: bool) -> Result<Run> {
    let mut src = boot()?;
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    let log = GuestLog::new();
    let dlog = log.clone();
    let dest = thread::spawn(move || {
        receive_migration_over(b, &KvmVm::receive_options(codecs()), |i| {
            Ok(KvmVm::for_incoming(i, codecs(), dlog.handlers())?)
        })
    });
    let mut opts = src.vm.migration_options();
    opts.downtime_limit = Duration::from_millis(50);
    opts.policy = ConvergencePolicy::Force;
    opts.auto_converge = auto.then(AutoConverge::default);
    let report = send_migration_over(&mut src.vm, Shaped::new(a, link), &mut opts)?;
    let (vm, _) = dest.join().map_err(|_| anyhow!("destination panicked"))??;
    ensure!(
        src.vm.throttle() == 0,
        "the source's throttle was not lifted"
    );
    let dst = RunningGuest {
        vm,
        log,
        baseline: Some(src.last_progress()?),
        timeout: TIMEOUT,
    };
    let self_check = dst.advance(3).is_ok();
    Ok(Run { report, self_check })
}

fn median_range(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:8.1} ms (range {:.1}–{:.1})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn main() -> Result<()> {
    if let Err(why) = migration_testkit::kvm_available() {
        println!("skipped: {why}");
        return Ok(());
    }
    let iters = env_or("BENCH_ITERS", 3).max(1);
    let mut g = boot()?;
    let dirty = sample_dirty_rate(&mut g)?;
    drop(g);
    let link = match env_or("BENCH_LINK_MB", 0) {
        0 => (dirty / 2.0) as u64,
        mb => mb as u64 * 1_000_000,
    };
    let raw = raw_capacity(link)?;
    println!(
        "guest dirty rate (sampled over 20 ms): {:.1} MB/s; link shaped to {:.1} MB/s, raw capacity measured {:.1} MB/s; over-commit {:.2}x",
        dirty / 1e6,
        link as f64 / 1e6,
        raw / 1e6,
        dirty / raw
    );
    for (name, auto) in [("precopy alone", false), ("auto-converge", true)] {
        let mut total = Vec::new();
        let mut down = Vec::new();
        for i in 0..iters {
            let run = migrate(link, auto)?;
            let r = &run.report;
            let top = r.rounds.iter().map(|x| x.throttle).max().unwrap_or(0);
            println!(
                "  {name} #{i}: total {:.1} ms, downtime {:.1} ms, {} rounds, converged {}, highest throttle {top} %, destination self-check {}",
                ms(r.total_time),
                ms(r.downtime.total),
                r.rounds.len(),
                r.converged,
                if run.self_check { "ok" } else { "FAILED" }
            );
            ensure!(
                run.self_check,
                "{name}: the destination's self-check failed"
            );
            total.push(ms(r.total_time));
            down.push(ms(r.downtime.total));
        }
        println!(
            "{name:>14}: total {}, downtime {}",
            median_range(total),
            median_range(down)
        );
    }
    Ok(())
}
