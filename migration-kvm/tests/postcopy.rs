//! Postcopy of a real KVM guest (KVM-gated): the memory-pattern guest resumes on the
//! destination before all of its memory arrived, its vCPU blocks on missing pages
//! (userfaultfd) until they are placed, and its self-check goes on passing; with the
//! connection cut in the middle of postcopy, a recovery over a new connection
//! completes it. Skipped visibly without /dev/kvm, failing instead under
//! `MIGRATION_REQUIRE_KVM=1`.

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use migration_core::destination::IncomingVm;
use migration_core::endpoint::Endpoint;
use migration_core::postcopy::{
    receive_postcopy_over, recover_postcopy_over, send_postcopy_over, Incoming, PostcopyError,
    PostcopyOptions,
};
use migration_core::MigratableError;
use migration_kvm::{KvmVm, KvmVmError};
use migration_testkit::guest::{Guest, GuestLog, RunningGuest};
use migration_testkit::relay::cut_postcopy_at;
use migration_testkit::require_kvm;

#[allow(dead_code)] // not every test file uses every helper
mod common;

use common::{codecs, BEFORE};

/// The memory-pattern guest's working set ends here.
const PATTERN_END: u64 = 24 << 20;
/// Progress events required after the migration.
const AFTER: u64 = 3;

fn postcopy() -> PostcopyOptions {
    PostcopyOptions {
        precopy_rounds: 0,
        peer_timeout: Duration::from_secs(30),
        ..PostcopyOptions::default()
    }
}

fn receive_options() -> migration_core::ReceiveOptions {
    let mut o = KvmVm::receive_options(codecs());
    o.frame_timeout = Duration::from_secs(30);
    o
}

fn build(incoming: &IncomingVm, log: &GuestLog) -> Result<KvmVm, MigratableError> {
    Ok(KvmVm::for_incoming(incoming, codecs(), log.handlers())?)
}

/// The destination guest continues from where the source stopped and passes its
/// self-check (every page it reads holds what it wrote, in any generation).
fn check_continues(src: &RunningGuest, vm: KvmVm, log: GuestLog) -> Result<()> {
    let dst = RunningGuest {
        vm,
        log,
        baseline: Some(src.last_progress()?),
        timeout: src.timeout,
    };
    ensure!(dst.vm.is_running(), "the destination runs");
    let m = dst.advance(AFTER).context("destination after postcopy")?;
    let first = m.first_progress().unwrap_or(0);
    let base = dst.baseline.unwrap_or(0);
    ensure!(
        first > base,
        "first progress {first}, source stopped at {base}"
    );
    Ok(())
}

#[test]
fn memory_pattern_guest_completes_postcopy_and_checks_out() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = common::boot(Guest::MemoryPattern, PATTERN_END)?;
    src.advance(BEFORE)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let log = GuestLog::new();
    let dest_log = log.clone();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().map_err(|e| anyhow!("accept: {e}"))?;
        receive_postcopy_over(stream, &receive_options(), |i| build(i, &dest_log))
            .map_err(|e| anyhow!("receive: {e}"))
    });
    let mut opts = src.vm.migration_options();
    let report = send_postcopy_over(
        &mut src.vm,
        TcpStream::connect(addr)?,
        &mut opts,
        &postcopy(),
    )
    .map_err(|e| anyhow!("postcopy: {e}"))?;
    let Incoming::Complete(vm, received) = dest.join().map_err(|_| anyhow!("panicked"))?? else {
        return Err(anyhow!("the destination was stranded"));
    };
    eprintln!(
        "postcopy: {} pending bytes, downtime {:?}, postcopy {:?}, {} requests ({} bytes), resume {:?}",
        report.pending_bytes,
        report.downtime,
        report.postcopy_time,
        report.requests,
        report.requested_bytes,
        received.resume_time
    );
    ensure!(report.pending_bytes > 0, "nothing was left for postcopy");
    ensure!(
        matches!(src.vm.start(), Err(KvmVmError::MigratedOut)),
        "the source must never run again"
    );
    check_continues(&src, vm, log)
}

#[test]
fn memory_pattern_guest_survives_a_cut_in_the_middle_of_postcopy() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = common::boot(Guest::MemoryPattern, PATTERN_END)?;
    src.advance(BEFORE)?;
    let listener = Endpoint::parse("tcp://127.0.0.1:0")?.bind()?;
    let url = listener.url()?;
    let dest_addr = url.trim_start_matches("tcp://").to_owned();
    let relay = TcpListener::bind("127.0.0.1:0")?;
    let relay_addr = relay.local_addr()?;
    let relay = cut_postcopy_at(relay, dest_addr.clone(), 0.5);
    let log = GuestLog::new();
    let dest_log = log.clone();
    let dest = thread::spawn(move || -> Result<(KvmVm, u32)> {
        let stream = listener.accept()?;
        let first = receive_postcopy_over(stream, &receive_options(), |i| build(i, &dest_log))
            .map_err(|e| anyhow!("receive: {e}"))?;
        let Incoming::Stranded(stranded) = first else {
            return Err(anyhow!("completed before the cut"));
        };
        ensure!(stranded.missing_bytes() > 0);
        match stranded
            .recover_from(&listener, Duration::from_secs(60))
            .map_err(|e| anyhow!("recovery: {e}"))?
        {
            Incoming::Complete(vm, r) => Ok((vm, r.recoveries)),
            Incoming::Stranded(s) => Err(anyhow!("stranded again: {}", s.reason())),
        }
    });
    let mut opts = src.vm.migration_options();
    let err = send_postcopy_over(
        &mut src.vm,
        TcpStream::connect(relay_addr)?,
        &mut opts,
        &postcopy(),
    )
    .expect_err("the relay cuts the connection");
    let PostcopyError::Interrupted(stranded) = err else {
        return Err(anyhow!("failed before GO: {err}"));
    };
    ensure!(!src.vm.is_running(), "an interrupted source stays paused");
    relay.join().map_err(|_| anyhow!("relay panicked"))?;
    let report = recover_postcopy_over(
        &mut src.vm,
        TcpStream::connect(&dest_addr)?,
        stranded,
        &postcopy(),
    )
    .map_err(|e| anyhow!("recovery: {e}"))?;
    ensure!(report.recoveries == 1);
    let (vm, recoveries) = dest.join().map_err(|_| anyhow!("panicked"))??;
    ensure!(recoveries == 1);
    check_continues(&src, vm, log)
}
