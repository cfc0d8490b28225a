//! Postcopy with a fake VM: the destination resumes before all memory arrived, the
//! guest's accesses to missing pages are served on request, and a connection cut
//! during postcopy is recovered over a new one; a source that never comes back
//! leaves the destination reporting the guest lost, in bounded time.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use migration_core::arch::Arch;
use migration_core::endpoint::{Endpoint, Listener};
use migration_core::postcopy::{
    receive_postcopy_over, recover_postcopy_over, send_postcopy_over, Incoming, PostcopyError,
    PostcopyOptions, PostcopyReport,
};
use migration_core::protocol::{Channel, Message, MigrationError, FEATURE_POSTCOPY};
use migration_core::{
    CodecRegistry, MemoryRange, Migratable, MigrationOptions, Pausable, ReceiveOptions,
};
use migration_testkit::relay::cut_postcopy_at;
use migration_testkit::FakeVm;

const MEM: u64 = 16 << 20;
const AREA: u64 = 4 << 20;

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

fn receive_options() -> ReceiveOptions {
    let mut o = ReceiveOptions::new(Arch::None, codecs());
    o.frame_timeout = Duration::from_secs(20);
    o
}

fn options() -> MigrationOptions {
    MigrationOptions {
        arch: Arch::None,
        ..MigrationOptions::default()
    }
}

fn postcopy() -> PostcopyOptions {
    PostcopyOptions {
        precopy_rounds: 0,
        peer_timeout: Duration::from_secs(20),
        ..PostcopyOptions::default()
    }
}

/// A running source whose workload rewrites a 4 MiB area fast enough that much of
/// it is dirty again when round 0 ends: those pages are left for postcopy. On a
/// loaded machine the workload thread may barely run during round 0, so 256 more
/// writes land as it pauses: postcopy always has pages to move (one page alone
/// left a cut "at 90 %" after the last page).
fn busy_source() -> FakeVm {
    let vm = FakeVm::builder()
        .memory_size(MEM)
        .workload(2_000_000_000, 7)
        .workload_area(&[MemoryRange::new(0, AREA)])
        .writes_before_pause(256)
        .codecs(codecs())
        .build()
        .expect("fake VM");
    vm.run_workload_writes(2000).expect("writes");
    vm
}

fn build(layout: &[MemoryRange]) -> Result<FakeVm, migration_core::MigratableError> {
    FakeVm::destination(layout, codecs())
}

/// After postcopy: the destination's workload ran on (its writes waited for their
/// pages) and every page of its area holds what the workload wrote.
fn check_destination(mut dest: FakeVm) {
    assert!(dest.is_running(), "the guest runs on the destination");
    dest.pause().expect("pause");
    dest.verify().expect("the workload's pattern checks out");
    assert!(dest.missing().is_none(), "disarmed once complete");
}

#[test]
fn postcopy_completes_and_the_guest_checks_out() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let dest = thread::spawn(move || {
        receive_postcopy_over(b, &receive_options(), |incoming| build(&incoming.layout))
    });
    let mut source = busy_source();
    let report = send_postcopy_over(&mut source, a, &mut options(), &postcopy())
        .expect("postcopy completes");
    let Incoming::Complete(dest, received) = dest.join().expect("thread").expect("receive") else {
        panic!("the destination was stranded");
    };
    assert!(report.pending_bytes > 0, "{report:?}");
    assert_eq!(received.pending_bytes, report.pending_bytes);
    assert_eq!(
        report.requested_bytes + report.pushed_bytes,
        report.pending_bytes,
        "every pending page sent once: {report:?}"
    );
    assert_eq!(report.refused_requests, 0);
    assert!(!source.is_running(), "the source stays paused");
    // The source's guest memory outside the pages it kept dirtying is what the
    // destination has too.
    check_destination(dest);
}

fn bind_destination() -> (Listener, String) {
    let listener = Endpoint::parse("tcp://127.0.0.1:0")
        .unwrap()
        .bind()
        .expect("bind");
    let url = listener.url().expect("url");
    (listener, url)
}

/// Cuts the postcopy at `fraction`, then recovers over a new connection.
fn cut_and_recover(fraction: f64) -> (PostcopyReport, FakeVm) {
    let (listener, url) = bind_destination();
    let relay = TcpListener::bind("127.0.0.1:0").expect("relay");
    let relay_addr = relay.local_addr().unwrap();
    let relay = cut_postcopy_at(relay, url.trim_start_matches("tcp://").to_owned(), fraction);
    let dest = thread::spawn(move || {
        let stream = listener.accept().expect("accept");
        let first = receive_postcopy_over(stream, &receive_options(), |i| build(&i.layout))
            .expect("receive until the cut");
        let Incoming::Stranded(stranded) = first else {
            panic!("the cut at {fraction} came after the last page");
        };
        assert!(stranded.missing_bytes() > 0);
        assert!(!stranded.reason().is_empty());
        match stranded
            .recover_from(&listener, Duration::from_secs(30))
            .expect("a recovery came")
        {
            Incoming::Complete(vm, report) => (vm, report),
            Incoming::Stranded(s) => panic!("stranded again: {}", s.reason()),
        }
    });
    let mut source = busy_source();
    let stream = TcpStream::connect(relay_addr).expect("connect relay");
    let err = send_postcopy_over(&mut source, stream, &mut options(), &postcopy())
        .expect_err("the relay cuts the connection");
    let PostcopyError::Interrupted(stranded) = err else {
        panic!("failed before GO: {err}");
    };
    assert!(!source.is_running(), "an interrupted source stays paused");
    relay.join().expect("relay");
    let stream = TcpStream::connect(url.trim_start_matches("tcp://")).expect("reconnect");
    let report = recover_postcopy_over(&mut source, stream, stranded, &postcopy())
        .expect("the recovery completes");
    assert_eq!(report.recoveries, 1);
    let (vm, received) = dest.join().expect("destination thread");
    assert_eq!(received.recoveries, 1);
    (report, vm)
}

#[test]
fn a_cut_at_10_percent_is_recovered() {
    let (_, vm) = cut_and_recover(0.1);
    check_destination(vm);
}

#[test]
fn a_cut_at_50_percent_is_recovered() {
    let (_, vm) = cut_and_recover(0.5);
    check_destination(vm);
}

#[test]
fn a_cut_at_90_percent_is_recovered() {
    let (_, vm) = cut_and_recover(0.9);
    check_destination(vm);
}

/// The source dies during postcopy (its end of the connection closes and it never
/// reconnects): the destination says the guest is lost once its recovery wait
/// ends, instead of waiting forever.
#[test]
fn a_source_that_dies_during_postcopy_leaves_the_guest_lost_in_bounded_time() {
    let (listener, url) = bind_destination();
    let relay = TcpListener::bind("127.0.0.1:0").expect("relay");
    let relay_addr = relay.local_addr().unwrap();
    let relay = cut_postcopy_at(relay, url.trim_start_matches("tcp://").to_owned(), 0.5);
    let dest = thread::spawn(move || {
        let stream = listener.accept().expect("accept");
        let Incoming::Stranded(stranded) =
            receive_postcopy_over(stream, &receive_options(), |i| build(&i.layout))
                .expect("receive until the cut")
        else {
            panic!("completed without the source");
        };
        stranded.recover_from(&listener, Duration::from_millis(300))
    });
    let mut source = busy_source();
    let stream = TcpStream::connect(relay_addr).expect("connect relay");
    let err = send_postcopy_over(&mut source, stream, &mut options(), &postcopy()).unwrap_err();
    assert!(matches!(err, PostcopyError::Interrupted(_)), "{err}");
    // The source process dies: its VM and pages with it.
    drop(err);
    drop(source);
    relay.join().expect("relay");
    match dest.join().expect("destination thread") {
        Err(MigrationError::GuestLost(why)) => {
            assert!(why.contains("only on the source"), "{why}")
        }
        other => panic!("expected the guest lost, got {:?}", other.map(|_| ())),
    }
}

/// A destination that asks for pages outside guest RAM, unaligned, larger than
/// [`MAX_REQUEST`](migration_core::postcopy::MAX_REQUEST), and the same page twice:
/// the source refuses or ignores each, and the migration completes.
#[test]
fn hostile_page_requests_are_refused_without_harm() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let dest = thread::spawn(move || -> Result<(), MigrationError> {
        let mut ch = Channel::new(b);
        let Message::Hello(hello) = ch.recv()? else {
            panic!("no HELLO");
        };
        let layout = hello.layout.clone();
        ch.send(&Message::HelloAck {
            version: hello.version,
            codec: hello.codecs[0],
            features: FEATURE_POSTCOPY,
        })?;
        ch.flush()?;
        let mut pending = Vec::new();
        loop {
            match ch.recv()? {
                Message::PostcopyPending { ranges, .. } => pending.extend(ranges),
                Message::State { last: true, .. } => break,
                _ => {}
            }
        }
        ch.send(&Message::Ready)?;
        ch.flush()?;
        assert!(matches!(ch.recv()?, Message::Go));
        ch.send(&Message::Done)?;
        let end = layout.last().map_or(0, |r| r.gpa + r.length);
        let first = pending[0].gpa;
        for (gpa, length) in [
            (end, 4096),             // outside guest RAM
            (u64::MAX - 4095, 4096), // overflowing
            (first + 1, 4096),       // unaligned
            (first, !4095u32),       // huge
            (first, 4096),           // fine
            (first, 4096),           // repeated
        ] {
            ch.send(&Message::PageRequest { gpa, length })?;
        }
        ch.flush()?;
        let total: u64 = pending.iter().map(|r| r.length).sum();
        let mut got = 0u64;
        while got < total {
            match ch.recv()? {
                Message::Memory { data, .. } => got += data.len() as u64,
                Message::Zero(ranges) => got += ranges.iter().map(|r| r.length).sum::<u64>(),
                other => panic!("unexpected {:?}", other.message_type()),
            }
        }
        ch.send(&Message::PostcopyComplete)?;
        ch.flush()?;
        Ok(())
    });
    let mut source = busy_source();
    let report = send_postcopy_over(&mut source, a, &mut options(), &postcopy())
        .expect("postcopy completes despite the requests");
    dest.join().expect("thread").expect("hostile destination");
    assert_eq!(report.refused_requests, 4, "{report:?}");
    // The valid page was served on request, or pushed before the request came.
    assert_eq!(report.requests + report.repeated_requests, 2, "{report:?}");
    assert_eq!(
        report.requested_bytes + report.pushed_bytes,
        report.pending_bytes
    );
    // The source is still paused, its pages intact: it never ran again.
    assert!(!source.is_running());
    let _ = source.dirty_log();
}

/// A destination that does not take postcopy (a plain precopy receiver, which
/// enables no feature) is found out at the handshake: the source refuses, tells it
/// why, and runs on.
#[test]
fn a_destination_without_postcopy_is_refused_and_the_source_runs_on() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let dest = thread::spawn(move || {
        migration_core::receive_migration_over(b, &receive_options(), |incoming| {
            build(&incoming.layout)
        })
        .map(|_| ())
    });
    let mut source = busy_source();
    let err = send_postcopy_over(&mut source, a, &mut options(), &postcopy())
        .expect_err("no postcopy at the destination");
    let PostcopyError::Failed(MigrationError::Rejected(why)) = &err else {
        panic!("{err}");
    };
    assert!(why.contains("does not accept postcopy"), "{why}");
    assert!(source.is_running(), "the source runs on");
    assert!(dest.join().expect("thread").is_err());
}
