//! Round trips over file://, tcp:// and unix://, rejections with the receiver's reason,
//! early close and garbage.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;

use common::{flatten, small_snapshot, PageMemory};
use migration_core::codec::CodecRegistry;
use migration_core::container::{FormatError, ReadOptions, WriteOptions};
use migration_core::transport::{self, TransportError};
use migration_core::{MemoryRange, MigratableError};

fn memory() -> PageMemory {
    let m = PageMemory::new(&[MemoryRange::new(0, 0x10_0000)]);
    for (i, gpa) in [0x0u64, 0x5000, 0x6000, 0xf_f000].into_iter().enumerate() {
        m.fill_page(gpa, i as u64);
    }
    m
}

fn round_trip(url: &str) {
    let mem = memory();
    let snapshot = small_snapshot(3000);
    let sink = PageMemory::new(&[MemoryRange::new(0, 0x10_0000)]);
    let received = thread::scope(|s| {
        let url2 = url.to_owned();
        let sink = &sink;
        let rx = s.spawn(move || {
            transport::recv_snapshot_with_memory(&url2, &CodecRegistry::new(), Some(sink))
        });
        if !url.starts_with("file:") {
            transport::send_snapshot_with_memory(&snapshot, Some(&mem), url, &CodecRegistry::new())
                .unwrap();
        }
        rx.join().unwrap()
    });
    let received = received.unwrap();
    assert_eq!(flatten(&received), flatten(&snapshot));
    assert_eq!(sink.snapshot_pages(), mem.snapshot_pages());
}

#[test]
fn round_trip_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/vm.snap", dir.path().display());
    transport::send_snapshot_with_memory(
        &small_snapshot(3000),
        Some(&memory()),
        &url,
        &CodecRegistry::new(),
    )
    .unwrap();
    round_trip(&url);
    // Without memory, through the plain API.
    transport::send_snapshot(&small_snapshot(10), &url, &CodecRegistry::new()).unwrap();
    let s = transport::recv_snapshot(&url, &CodecRegistry::new()).unwrap();
    assert_eq!(flatten(&s), flatten(&small_snapshot(10)));
}

#[test]
fn round_trip_over_tcp() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    round_trip(&format!("tcp://127.0.0.1:{port}"));
}

#[test]
fn round_trip_over_unix() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(&format!("unix://{}/mig.sock", dir.path().display()));
}

#[test]
fn sender_learns_the_receivers_reason() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/mig.sock", dir.path().display());
    let mem = memory();
    // The receiver's guest is smaller than the sender's: it rejects.
    let small = PageMemory::new(&[MemoryRange::new(0, 0x1000)]);
    let (sent, received) = thread::scope(|s| {
        let url2 = url.clone();
        let small = &small;
        let rx = s.spawn(move || {
            transport::recv_snapshot_with_memory(&url2, &CodecRegistry::new(), Some(small))
        });
        let sent = transport::send_snapshot_with_memory(
            &small_snapshot(10),
            Some(&mem),
            &url,
            &CodecRegistry::new(),
        );
        (sent, rx.join().unwrap())
    });
    let received = received.unwrap_err();
    assert!(
        matches!(received, MigratableError::Memory(_)),
        "{received:?}"
    );
    match sent {
        Err(MigratableError::Send { url: u, source }) => {
            assert_eq!(u, url);
            match source.downcast_ref::<TransportError>() {
                Some(TransportError::Rejected { reason }) => {
                    assert_eq!(reason, &received.to_string());
                }
                other => panic!("expected Rejected, got {other:?}"),
            }
        }
        other => panic!("expected a Send error, got {other:?}"),
    }
}

#[test]
fn early_close_is_truncation_and_garbage_is_bad_magic() {
    for (bytes, truncated) in [
        (b"\x89VMSNAP\n\x01\x00".to_vec(), true),
        (vec![b'G'; 300], false),
    ] {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let writer = thread::spawn(move || {
            a.write_all(&bytes).unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            std::io::Read::read_to_end(&mut a, &mut reply).unwrap();
            reply
        });
        let e = transport::recv_from_stream(
            &mut b,
            &CodecRegistry::new(),
            None,
            &ReadOptions::default(),
        )
        .unwrap_err();
        drop(b);
        let reply = writer.join().unwrap();
        match e {
            MigratableError::Format(FormatError::Truncated { .. }) if truncated => {}
            MigratableError::Format(FormatError::BadMagic { .. }) if !truncated => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(&reply[..4], b"VMSR");
        assert_eq!(reply[4], 1, "a rejection reply");
    }
}

#[test]
fn receiver_that_closes_without_reply_is_a_send_error() {
    let (mut a, b) = UnixStream::pair().unwrap();
    drop(b);
    let e = transport::send_to_stream(&mut a, &small_snapshot(10), None, &WriteOptions::default())
        .unwrap_err();
    assert!(
        matches!(e, MigratableError::Io(_) | MigratableError::Send { .. }),
        "{e:?}"
    );
}

#[test]
fn bad_urls_are_typed_errors() {
    let c = CodecRegistry::new();
    let s = small_snapshot(1);
    assert!(matches!(
        transport::send_snapshot(&s, "ftp://x/y", &c),
        Err(MigratableError::UnsupportedScheme { .. })
    ));
    assert!(matches!(
        transport::send_snapshot(&s, "tcp://127.0.0.1", &c),
        Err(MigratableError::InvalidUrl { .. })
    ));
    assert!(matches!(
        transport::recv_snapshot("no scheme", &c),
        Err(MigratableError::InvalidUrl { .. })
    ));
    assert!(matches!(
        transport::recv_snapshot("unix://", &c),
        Err(MigratableError::InvalidUrl { .. })
    ));
}
