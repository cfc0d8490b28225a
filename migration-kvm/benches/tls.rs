//! Live migration of one running 1 GiB KVM guest over loopback, alternating plaintext
//! `tcp://` and mutual TLS `tls://` in the same run: the guest (the timer guest in idle
//! mode, its memory from 16 MiB up random-filled so every page travels) migrates on
//! from each destination to the next, `BENCH_RUNS` times each way (default 3). Prints
//! each migration's throughput, the median and spread of each mode, the ratio TLS /
//! plaintext (goal ≥ 0.6×), the negotiated cipher suite and the handshake time, with
//! this machine's raw loopback TCP copy of the same size as the limit.
//!
//! Run: `cargo bench -p migration-kvm --bench tls` (env `BENCH_MIB`: guest size,
//! default 1024; `BENCH_RUNS`). Needs `/dev/kvm`.

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use migration_core::endpoint::Endpoint;
use migration_core::security::Security;
use migration_core::{receive_migration_over, send_migration_over, ConvergencePolicy};
use migration_kvm::KvmVm;
use migration_testkit::bench::{env_or, loopback_tcp_copy, ms};
use migration_testkit::guest::{monitor_handler, Guest, PortMonitor, TIMER_IDLE};
use migration_testkit::test_pki::TestPki;

use common::{source, wait_for};

const IO_TIMEOUT: Duration = Duration::from_secs(120);
const BUF: usize = 2 << 20;

struct Run {
    tls: bool,
    total: Duration,
    bytes: u64,
    handshake: Option<Duration>,
    cipher: Option<String>,
}

/// Migrates `vm` to a destination thread over `scheme`; returns the destination VM
/// (running, its guest checked) and the figures.
fn migrate(mut vm: KvmVm, server: &Security, client: &Security, tls: bool) -> Result<(KvmVm, Run)> {
    let scheme = if tls { "tls" } else { "tcp" };
    let listener = Endpoint::parse(&format!("{scheme}://127.0.0.1:0"))?.bind_with(server)?;
    let url = listener.url()?;
    let server = server.clone();
    let (tx, rx) = mpsc::channel();
    let dest = thread::spawn(move || -> Result<KvmVm> {
        let stream = listener.accept_with(&server, Some(IO_TIMEOUT), |_, _| {})?;
        let monitor = Arc::new(Mutex::new(PortMonitor::new(2)));
        let m = monitor.clone();
        let (vm, _) = receive_migration_over(
            stream,
            &KvmVm::receive_options(migration_serde::registry()),
            move |incoming| {
                KvmVm::for_incoming(incoming, migration_serde::registry(), |_| {
                    monitor_handler(m.clone(), None)
                })
                .map_err(Into::into)
            },
        )?;
        let _ = tx.send(());
        wait_for(&monitor, 2)?;
        Ok(vm)
    });
    let started = Instant::now();
    let stream = Endpoint::parse(&url)?.connect_with(client, Some(IO_TIMEOUT))?;
    let (handshake, cipher) = match stream.tls() {
        Some(s) => (Some(s.handshake_time()), Some(s.cipher_suite())),
        None => (None, None),
    };
    let mut options = vm.migration_options();
    options.policy = ConvergencePolicy::Force;
    let report = send_migration_over(&mut vm, stream, &mut options)?;
    let total = started.elapsed();
    rx.recv().context("destination")?;
    let next = dest
        .join()
        .map_err(|_| anyhow::anyhow!("destination panicked"))??;
    drop(vm);
    Ok((
        next,
        Run {
            tls,
            total,
            bytes: report.bytes_sent,
            handshake,
            cipher,
        },
    ))
}

/// Copies `size` bytes over a loopback `tls://` connection (no VM): this machine's TLS
/// limit, beside the raw TCP copy.
fn tls_copy(size: u64, server: &Security, client: &Security) -> Result<Duration> {
    use std::io::{Read, Write};
    let listener = Endpoint::parse("tls://127.0.0.1:0")?.bind_with(server)?;
    let url = listener.url()?;
    let server = server.clone();
    let sink = thread::spawn(move || -> Result<u64> {
        let mut s = listener.accept_with(&server, Some(IO_TIMEOUT), |_, _| {})?;
        let mut buf = vec![0u8; BUF];
        let mut n = 0u64;
        while n < size {
            match s.read(&mut buf)? {
                0 => break,
                k => n += k as u64,
            }
        }
        Ok(n)
    });
    let mut s = Endpoint::parse(&url)?.connect_with(client, Some(IO_TIMEOUT))?;
    let buf = vec![0x5au8; BUF];
    let t = Instant::now();
    let mut left = size;
    while left > 0 {
        let k = left.min(BUF as u64) as usize;
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    s.flush()?;
    let got = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    let took = t.elapsed();
    ensure!(got == size, "TLS copy: {got} of {size} bytes");
    Ok(took)
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

    let pki = TestPki::new()?;
    let tls_server = Security::tls(pki.server_config()?);
    let tls_client = Security::tls(pki.client_config()?);
    let tls_raw = tls_copy(size, &tls_server, &tls_client)?;
    let tls_raw_bw = size as f64 / tls_raw.as_secs_f64();
    println!(
        "raw loopback TLS copy of {gib:.2} GiB (no VM): {:.1} ms, {:.2} GB/s",
        ms(tls_raw),
        tls_raw_bw / 1e9
    );
    let plain = Security::plaintext();
    let (mut vm, _) = source(size, Guest::Timer, TIMER_IDLE, true)?;
    let mut all = Vec::new();
    for i in 0..runs * 2 {
        let tls = i % 2 == 1;
        let (server, client) = if tls {
            (&tls_server, &tls_client)
        } else {
            (&plain, &plain)
        };
        let (next, run) = migrate(vm, server, client, tls)?;
        vm = next;
        println!(
            "{} {:>2}: {:.0} ms, {:.2} GB/s{}",
            if tls { "tls" } else { "tcp" },
            i / 2 + 1,
            ms(run.total),
            run.bytes as f64 / run.total.as_secs_f64() / 1e9,
            match (&run.cipher, run.handshake) {
                (Some(c), Some(h)) => format!(", {c}, handshake {:.2} ms", ms(h)),
                _ => String::new(),
            }
        );
        all.push(run);
    }
    let bw = |tls: bool| -> Vec<f64> {
        all.iter()
            .filter(|r| r.tls == tls)
            .map(|r| r.bytes as f64 / r.total.as_secs_f64() / 1e9)
            .collect()
    };
    let (tcp_med, tcp_lo, tcp_hi) = median_spread(&mut bw(false));
    let (tls_med, tls_lo, tls_hi) = median_spread(&mut bw(true));
    let mut hs: Vec<f64> = all.iter().filter_map(|r| r.handshake).map(ms).collect();
    let (hs_med, hs_lo, hs_hi) = median_spread(&mut hs);
    let cipher = all
        .iter()
        .find_map(|r| r.cipher.clone())
        .unwrap_or_default();
    let ratio = tls_med / tcp_med;
    println!("\n| mode | median GB/s | min–max | vs raw TCP |");
    println!("|---|---|---|---|");
    println!("| raw loopback TCP copy | {:.2} | | 1.00× |", raw_bw / 1e9);
    println!(
        "| raw loopback TLS copy (no VM) | {:.2} | | {:.2}× |",
        tls_raw_bw / 1e9,
        tls_raw_bw / raw_bw
    );
    println!(
        "| plaintext tcp:// | {tcp_med:.2} | {tcp_lo:.2}–{tcp_hi:.2} | {:.2}× |",
        tcp_med * 1e9 / raw_bw
    );
    println!(
        "| mutual TLS tls:// | {tls_med:.2} | {tls_lo:.2}–{tls_hi:.2} | {:.2}× |",
        tls_med * 1e9 / raw_bw
    );
    println!(
        "\nTLS / plaintext: {ratio:.2}× (goal ≥ 0.6×: {}); cipher suite {cipher}; handshake median {hs_med:.2} ms ({hs_lo:.2}–{hs_hi:.2}), {runs} runs each, one {gib:.2} GiB guest",
        if ratio >= 0.6 { "met" } else { "NOT met" }
    );
    drop(vm);
    Ok(())
}
