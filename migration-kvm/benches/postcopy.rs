//! Postcopy of a 1 GiB KVM guest over loopback TCP: time to resume on the destination
//! (goal: under 50 ms) and fault latency (each page request until its page is placed,
//! p50 and p99), against a raw loopback TCP copy measured in the same run.
//!
//! The guest is the memory-pattern guest in 1 GiB of RAM with a working set of
//! `BENCH_WS_MB` MiB (default 256) that it verifies each pass and rewrites an eighth
//! of. Postcopy switches over right after round 0 (`precopy_rounds` 0), so every page
//! the guest dirtied during round 0 is left for postcopy, and its vCPU faults on
//! them as it runs on. Each of `BENCH_ITERS` runs (default 3) uses a fresh pair of
//! VMs; the first is reported apart (cold: fresh host memory), the others as median
//! and range.
//!
//! Printed per run: pending bytes, the source's downtime (pause until DONE), the
//! destination's resume time (GO until the vCPUs run: arming userfaultfd on 1 GiB
//! included), the postcopy phase, page requests, fault latency p50/p99, the push rate
//! against raw loopback TCP, and whether the destination's self-check held.
//!
//! Run: `cargo bench -p migration-kvm --bench postcopy`. Needs `/dev/kvm` and
//! userfaultfd (root, or `vm.unprivileged_userfaultfd = 1`).

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use migration_core::postcopy::{
    receive_postcopy_over, send_postcopy_over, Incoming, PostcopyOptions, PostcopyReceiveReport,
    PostcopyReport,
};
use migration_kvm::KvmVm;
use migration_testkit::bench::{env_or, loopback_tcp_copy, ms};
use migration_testkit::guest::{Guest, GuestLog, RunningGuest};

const MEM: u64 = 1 << 30;
const TIMEOUT: Duration = Duration::from_secs(120);

fn codecs() -> migration_core::CodecRegistry {
    migration_serde::registry()
}

struct Run {
    sent: PostcopyReport,
    received: PostcopyReceiveReport,
    self_check: bool,
}

fn run(ws: u64) -> Result<Run> {
    let mut src = RunningGuest::boot(Guest::MemoryPattern, MEM, ws, TIMEOUT)?;
    src.advance(2)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let log = GuestLog::new();
    let dest_log = log.clone();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().map_err(|e| anyhow!("accept: {e}"))?;
        let mut options = KvmVm::receive_options(codecs());
        options.frame_timeout = TIMEOUT;
        receive_postcopy_over(stream, &options, |i| {
            Ok(KvmVm::for_incoming(i, codecs(), dest_log.handlers())?)
        })
        .map_err(|e| anyhow!("receive: {e}"))
    });
    let mut opts = src.vm.migration_options();
    let postcopy = PostcopyOptions {
        precopy_rounds: 0,
        peer_timeout: TIMEOUT,
        ..PostcopyOptions::default()
    };
    let sent = send_postcopy_over(&mut src.vm, TcpStream::connect(addr)?, &mut opts, &postcopy)
        .map_err(|e| anyhow!("postcopy: {e}"))?;
    let Incoming::Complete(vm, received) = dest.join().map_err(|_| anyhow!("panicked"))?? else {
        return Err(anyhow!("stranded"));
    };
    let dst = RunningGuest {
        vm,
        log,
        baseline: Some(src.last_progress()?),
        timeout: TIMEOUT,
    };
    let self_check = dst.advance(2).is_ok();
    Ok(Run {
        sent,
        received,
        self_check,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    ms(sorted[i])
}

fn median_range(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.2} [{:.2}–{:.2}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> Result<()> {
    if let Err(why) = migration_testkit::kvm_available() {
        println!("skipped: {why}");
        return Ok(());
    }
    if let Err(e) = migration_kvm::uffd::Userfault::new() {
        println!("skipped: {e}");
        return Ok(());
    }
    let iters = env_or("BENCH_ITERS", 3).max(1);
    let ws = env_or("BENCH_WS_MB", 256) as u64 * (1 << 20);
    let raw = loopback_tcp_copy(1 << 30, None)?;
    let raw_rate = (1u64 << 30) as f64 / raw.as_secs_f64();
    println!(
        "raw loopback TCP, 1 GiB: {:.1} ms, {:.2} GB/s (the limit)",
        ms(raw),
        raw_rate / 1e9
    );
    let mut resume = Vec::new();
    let mut down = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for i in 0..iters {
        let r = run(ws)?;
        let mut lat = r.received.fault_latencies.clone();
        lat.sort();
        let push_rate = r.sent.pending_bytes as f64 / r.sent.postcopy_time.as_secs_f64().max(1e-9);
        println!(
            "  run {i}{}: pending {:.1} MiB, downtime {:.2} ms, resume {:.2} ms, postcopy {:.1} ms ({:.2} GB/s, {:.2}x raw TCP), {} requests, fault latency p50 {:.3} ms p99 {:.3} ms, self-check {}",
            if i == 0 { " (cold)" } else { "" },
            r.sent.pending_bytes as f64 / f64::from(1u32 << 20),
            ms(r.sent.downtime),
            ms(r.received.resume_time),
            ms(r.sent.postcopy_time),
            push_rate / 1e9,
            push_rate / raw_rate,
            r.received.requests,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            if r.self_check { "ok" } else { "FAILED" }
        );
        ensure!(r.self_check, "the destination's self-check failed");
        if i > 0 || iters == 1 {
            resume.push(ms(r.received.resume_time));
            down.push(ms(r.sent.downtime));
            p50.push(percentile(&lat, 0.5));
            p99.push(percentile(&lat, 0.99));
        }
    }
    println!(
        "warm median [range], ms: resume {}, downtime {}, fault p50 {}, fault p99 {}",
        median_range(resume),
        median_range(down),
        median_range(p50),
        median_range(p99)
    );
    Ok(())
}
