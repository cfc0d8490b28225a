//! Round trips, and every bit flip and truncation of a small container giving a typed error.

mod common;

use std::io::Cursor;

use common::{flatten, paths, small_snapshot, PageMemory};
use migration_core::codec::CodecRegistry;
use migration_core::container::{self, FormatError, ReadOptions, WriteOptions};
use migration_core::{MemoryRange, MigratableError};

fn memory() -> PageMemory {
    let m = PageMemory::new(&[
        MemoryRange::new(0, 0x3000),
        MemoryRange::new(0x10_0000, 0x1000),
    ]);
    m.fill_page(0x1000, 1);
    m.fill_page(0x10_0000, 2);
    m
}

fn file_bytes(mem: Option<&PageMemory>) -> Vec<u8> {
    let mut c = Cursor::new(Vec::new());
    let mem = mem.map(|m| m as &dyn migration_core::MemorySource);
    container::write_snapshot(&mut c, &small_snapshot(1000), mem, &WriteOptions::default())
        .unwrap();
    c.into_inner()
}

fn stream_bytes(mem: Option<&PageMemory>) -> Vec<u8> {
    let mut v = Vec::new();
    let mem = mem.map(|m| m as &dyn migration_core::MemorySource);
    container::write_snapshot_stream(&mut v, &small_snapshot(1000), mem, &WriteOptions::default())
        .unwrap();
    v
}

fn sink() -> PageMemory {
    PageMemory::new(&[
        MemoryRange::new(0, 0x3000),
        MemoryRange::new(0x10_0000, 0x1000),
    ])
}

#[test]
fn file_form_round_trip_with_memory() {
    let mem = memory();
    let bytes = file_bytes(Some(&mem));
    let out = sink();
    let s =
        container::read_snapshot(Cursor::new(&bytes), &CodecRegistry::new(), Some(&out)).unwrap();
    let original = small_snapshot(1000);
    assert_eq!(flatten(&s), flatten(&original));
    assert_eq!(paths(&s), paths(&original));
    assert_eq!(out.snapshot_pages(), mem.snapshot_pages());
    let info = container::inspect(Cursor::new(&bytes)).unwrap();
    assert!(info.extents.iter().all(|e| e.file_offset % 4096 == 0));
    assert_eq!(info.runs.unwrap().len(), 2);
    let root = &info.nodes[0];
    assert_eq!(root.subtree_bytes, info.header.payload_length);
}

#[test]
fn stream_form_round_trip_with_memory_sends_no_zero_pages() {
    let mem = memory();
    let bytes = stream_bytes(Some(&mem));
    let out = sink();
    out.fill_page(0, 7); // stale: must be zeroed
    let s = container::read_snapshot_stream(
        &mut &bytes[..],
        &CodecRegistry::new(),
        Some(&out),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(flatten(&s), flatten(&small_snapshot(1000)));
    assert_eq!(out.snapshot_pages(), mem.snapshot_pages());
    let report = container::verify_stream(&mut &bytes[..]).unwrap();
    assert_eq!(
        (report.runs, report.data_bytes, report.memory_bytes),
        (2, 0x2000, 0x4000)
    );
    assert!(
        bytes.len() < 192 + 4096 * 3,
        "{} bytes: zero pages were sent",
        bytes.len()
    );
}

#[test]
fn unencoded_sections_are_refused_by_the_writer() {
    let mut s = small_snapshot(10);
    s.add_state_as("typed", 1, 5u32);
    let e = container::write_snapshot_stream(&mut Vec::new(), &s, None, &WriteOptions::default())
        .unwrap_err();
    assert!(matches!(e, MigratableError::Codec { .. }), "{e:?}");
}

fn expect_format_error(
    r: Result<impl std::fmt::Debug, MigratableError>,
    what: &str,
) -> FormatError {
    match r {
        Err(MigratableError::Format(e)) => e,
        other => panic!("{what}: expected a FormatError, got {other:?}"),
    }
}

/// Flips every bit of `range` in `bytes` and expects `read` to fail with a FormatError.
fn every_flip(
    bytes: &[u8],
    range: std::ops::Range<usize>,
    read: impl Fn(&[u8]) -> Result<(), MigratableError>,
) {
    let mut b = bytes.to_vec();
    for i in range {
        for bit in 0..8 {
            b[i] ^= 1 << bit;
            expect_format_error(read(&b), &format!("byte {i} bit {bit}"));
            b[i] ^= 1 << bit;
        }
    }
    read(&b).unwrap();
}

fn read_file(b: &[u8]) -> Result<(), MigratableError> {
    container::read_snapshot(Cursor::new(b), &CodecRegistry::new(), Some(&sink())).map(drop)
}

fn read_stream(b: &[u8]) -> Result<(), MigratableError> {
    container::read_snapshot_stream(
        &mut &b[..],
        &CodecRegistry::new(),
        Some(&sink()),
        &ReadOptions::default(),
    )
    .map(drop)
}

#[test]
fn every_bit_flip_of_a_file_without_memory_is_a_format_error() {
    let bytes = file_bytes(None);
    assert!(bytes.len() < 4096, "{}", bytes.len());
    every_flip(&bytes, 0..bytes.len(), read_file);
    every_flip(&bytes, 0..bytes.len(), |b| {
        container::verify(Cursor::new(b)).map(drop)
    });
}

#[test]
fn every_bit_flip_in_checksummed_parts_of_a_file_with_memory_is_a_format_error() {
    let mem = memory();
    let bytes = file_bytes(Some(&mem));
    let info = container::inspect(Cursor::new(&bytes)).unwrap();
    let h = &info.header;
    every_flip(&bytes, 0..h.payload_end() as usize, read_file);
    for run in info.runs.as_ref().unwrap() {
        let at = run.file_offset as usize;
        // Every bit of the first and last 64 bytes of each run, and some in between.
        every_flip(&bytes, at..at + 64, read_file);
        every_flip(
            &bytes,
            at + run.length as usize - 64..at + run.length as usize,
            read_file,
        );
    }
    every_flip(&bytes, h.run_table_offset as usize..bytes.len(), read_file);
}

#[test]
fn every_bit_flip_of_a_stream_is_a_format_error() {
    let mem = memory();
    let bytes = stream_bytes(Some(&mem));
    every_flip(&bytes, 0..bytes.len(), read_stream);
}

#[test]
fn every_truncation_is_a_format_error() {
    let mem = memory();
    for (bytes, file) in [
        (file_bytes(Some(&mem)), true),
        (file_bytes(None), true),
        (stream_bytes(Some(&mem)), false),
    ] {
        for len in 0..bytes.len() {
            let b = &bytes[..len];
            let r = if file { read_file(b) } else { read_stream(b) };
            expect_format_error(r, &format!("truncated to {len}"));
            expect_format_error(
                container::verify(Cursor::new(b)),
                &format!("verify truncated to {len}"),
            );
        }
    }
}

#[test]
fn trailing_bytes_after_a_file_form_container_are_rejected() {
    let mut bytes = file_bytes(None);
    bytes.push(0);
    assert!(matches!(
        expect_format_error(read_file(&bytes), "trailing"),
        FormatError::Malformed { .. }
    ));
}

#[test]
fn declared_lengths_over_the_limits_fail_before_allocating() {
    // metadata_length of 1 TiB in a tiny stream: LimitExceeded, not an allocation.
    let mut b = stream_bytes(None);
    b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let c = crc_fast::crc64_nvme(&b[..184]);
    b[184..192].copy_from_slice(&c.to_le_bytes());
    let e = expect_format_error(read_stream(&b), "huge metadata");
    assert!(
        matches!(
            e,
            FormatError::LimitExceeded {
                what: "metadata length",
                ..
            }
        ),
        "{e:?}"
    );
    // Within the limit but past the end of the stream: Truncated.
    b[24..32].copy_from_slice(&(8u64 << 20).to_le_bytes());
    let c = crc_fast::crc64_nvme(&b[..184]);
    b[184..192].copy_from_slice(&c.to_le_bytes());
    let e = expect_format_error(read_stream(&b), "long metadata");
    assert!(matches!(e, FormatError::Truncated { .. }), "{e:?}");
}

#[test]
fn writer_rejects_overlapping_or_unaligned_regions() {
    for regions in [
        vec![
            MemoryRange::new(0, 0x2000),
            MemoryRange::new(0x1000, 0x1000),
        ],
        vec![MemoryRange::new(0x800, 0x1000)],
    ] {
        let m = PageMemory::new(&regions);
        let e = container::write_snapshot_stream(
            &mut Vec::new(),
            &small_snapshot(1),
            Some(&m),
            &WriteOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(e, MigratableError::Format(FormatError::Unwritable { .. })),
            "{e:?}"
        );
    }
}

#[test]
fn a_sink_without_the_snapshot_memory_is_a_memory_error() {
    let mem = memory();
    let bytes = file_bytes(Some(&mem));
    let small = PageMemory::new(&[MemoryRange::new(0, 0x3000)]);
    let e = container::read_snapshot(Cursor::new(&bytes), &CodecRegistry::new(), Some(&small))
        .unwrap_err();
    assert!(matches!(e, MigratableError::Memory(_)), "{e:?}");
}
