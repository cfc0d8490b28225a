//! Hostile network peers (issue 20): a peer that trickles bytes, one that declares more
//! guest RAM than the destination allows, one that holds the connection while a real
//! source waits, a sender that never finishes a snapshot, and peer text with escape
//! sequences. Each test builds its own peer. Time limits are hang guards (60 s).

use std::io::{self, Cursor, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use migration_core::arch::Arch;
use migration_core::protocol::{Channel, Hello, Message, MigrationError, PROTOCOL_VERSION};
use migration_core::{
    receive_migration, receive_migration_over, transport, CodecRegistry, MemoryRange,
    MigratableError, ReceiveOptions,
};
use migration_testkit::FakeVm;

const HANG_GUARD: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

/// The bytes of a HELLO frame for a VM of `ram` bytes.
fn hello_frame(ram: u64) -> Vec<u8> {
    let mut ch = Channel::new(Cursor::new(Vec::new()));
    ch.send(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        arch: Arch::None,
        codecs: vec![migration_serde::POSTCARD_ID],
        layout: vec![MemoryRange::new(0, ram)],
        config: Vec::new(),
        producer: "hostile".into(),
        features: 0,
    }))
    .unwrap();
    ch.flush().unwrap();
    ch.get_ref().get_ref().clone()
}

/// Sends `bytes` one at a time, `gap` apart (every read succeeds); writes vanish.
struct Trickle {
    bytes: Vec<u8>,
    at: usize,
    gap: Duration,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        thread::sleep(self.gap);
        let Some(&b) = self.bytes.get(self.at) else {
            // After the bytes, keep trickling zeros: a peer that never stops.
            buf[0] = 0;
            return Ok(1);
        };
        buf[0] = b;
        self.at += 1;
        Ok(1)
    }
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn options() -> ReceiveOptions {
    let mut o = ReceiveOptions::new(Arch::None, codecs());
    o.handshake_timeout = Duration::from_secs(1);
    o.frame_timeout = Duration::from_secs(1);
    o
}

/// Slowloris: one byte every 50 ms keeps every read alive; the handshake deadline
/// ends it anyway, and the VM is never built.
#[test]
fn a_peer_sending_one_byte_at_a_time_times_out() {
    let built = AtomicBool::new(false);
    let start = Instant::now();
    let peer = Trickle {
        bytes: hello_frame(1 << 20),
        at: 0,
        gap: Duration::from_millis(50),
    };
    let e = receive_migration_over(peer, &options(), |_| {
        built.store(true, Ordering::SeqCst);
        FakeVm::destination(&[MemoryRange::new(0, 1 << 20)], codecs())
    })
    .map(drop)
    .unwrap_err();
    assert!(
        matches!(&e, MigrationError::Io(io) if io.kind() == io::ErrorKind::TimedOut),
        "{e}"
    );
    assert!(!built.load(Ordering::SeqCst));
    assert!(start.elapsed() < HANG_GUARD, "{:?}", start.elapsed());
}

/// A HELLO declaring 64 GiB, over the destination's limit: refused before build, and
/// the source is told why.
#[test]
fn a_hello_over_the_ram_limit_is_refused_before_build() {
    let built = AtomicBool::new(false);
    let mut o = options();
    o.max_guest_ram = GIB;
    let mut wire = Cursor::new(hello_frame(64 * GIB));
    let mut both = Duplex {
        input: &mut wire,
        output: Vec::new(),
    };
    let e = receive_migration_over(&mut both, &o, |_| {
        built.store(true, Ordering::SeqCst);
        FakeVm::destination(&[MemoryRange::new(0, 1 << 20)], codecs())
    })
    .map(drop)
    .unwrap_err();
    assert!(!built.load(Ordering::SeqCst), "the VM was built");
    assert!(
        e.to_string().contains("over this destination's limit"),
        "{e}"
    );
    // The ABORT went back to the source with the reason.
    let mut back = Channel::new(Cursor::new(both.output));
    match back.recv().unwrap() {
        Message::Abort(reason) => assert!(reason.contains("limit"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The default limit is this host's RAM: 4 TiB is over it on any test machine.
    let mut wire = Cursor::new(hello_frame(4 << 40));
    let mut both = Duplex {
        input: &mut wire,
        output: Vec::new(),
    };
    let e = receive_migration_over(
        &mut both,
        &ReceiveOptions::new(Arch::None, codecs()),
        |_| {
            built.store(true, Ordering::SeqCst);
            FakeVm::destination(&[MemoryRange::new(0, 1 << 20)], codecs())
        },
    )
    .map(drop)
    .unwrap_err();
    assert!(!built.load(Ordering::SeqCst), "the VM was built: {e}");
}

struct Duplex<'a> {
    input: &'a mut Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// While one connection trickles, a second source waits in the backlog; once the
/// first misses its handshake deadline the destination serves the second (here a
/// HELLO it refuses, which proves it was read).
#[test]
fn a_held_connection_does_not_keep_the_next_source_out() {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let dest = thread::spawn(move || {
        receive_migration(
            "tcp://127.0.0.1:0",
            &options(),
            Duration::from_secs(5),
            |url| tx.send(url.to_owned()).unwrap(),
            |_| FakeVm::destination(&[MemoryRange::new(0, 1 << 20)], codecs()),
        )
        .map(drop)
    });
    let url = rx.recv().unwrap();
    let addr = url.trim_start_matches("tcp://").to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let holder = {
        let (addr, stop) = (addr.clone(), stop.clone());
        thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let hello = hello_frame(1 << 20);
            for b in hello.iter().take(hello.len() - 1) {
                if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    thread::sleep(Duration::from_millis(200));
    let mut second = TcpStream::connect(&addr).unwrap();
    second.write_all(&hello_frame(64 << 40)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut back = Channel::new(second);
    let reason = match back.recv().unwrap() {
        Message::Abort(reason) => reason,
        other => panic!("{other:?}"),
    };
    assert!(reason.contains("limit"), "{reason}");
    stop.store(true, Ordering::SeqCst);
    let e = dest.join().unwrap().unwrap_err();
    assert!(matches!(e, MigrationError::Rejected(_)), "{e}");
    holder.join().unwrap();
    assert!(start.elapsed() < HANG_GUARD, "{:?}", start.elapsed());
}

/// `recv_snapshot` gives a connected sender a deadline for the whole container.
#[test]
fn a_snapshot_sender_that_never_finishes_times_out() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let start = Instant::now();
    let receiver = {
        let url = url.clone();
        thread::spawn(move || {
            transport::recv_snapshot_within(&url, &codecs(), None, Duration::from_secs(1))
        })
    };
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < HANG_GUARD => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    // A valid header's first bytes, then one byte every 100 ms for 3 s (three times
    // the deadline), then the connection closes.
    let _ = s.write_all(b"\x89VMSNAP\n");
    let trickle = Instant::now();
    while trickle.elapsed() < Duration::from_secs(3) {
        if s.write_all(&[0]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    drop(s);
    let e = receiver.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, MigratableError::Receive { .. } | MigratableError::Io(_)),
        "{e}"
    );
    assert!(format!("{e:?}").contains("TimedOut"), "{e:?}");
    assert!(start.elapsed() < HANG_GUARD, "{:?}", start.elapsed());
}

/// Peer text reaches a terminal escaped: the reason of an ABORT, a refusal.
#[test]
fn peer_text_is_escaped_in_errors() {
    let evil = "\x1b]0;owned\x07\x1b[2Jgone";
    for e in [
        MigrationError::PeerAborted(evil.into()),
        MigrationError::Refused(evil.into()),
    ] {
        let shown = e.to_string();
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert!(shown.contains("gone"));
    }
}

/// One device-state limit: what the protocol buffers, the codecs decode.
#[test]
fn device_state_limit_is_the_codecs_limit() {
    assert_eq!(
        migration_core::protocol::MAX_STATE,
        migration_serde::limits::MAX_PAYLOAD
    );
    assert_eq!(
        migration_core::protocol::MAX_STATE,
        migration_core::codec::MAX_ENCODED_LEN
    );
}
