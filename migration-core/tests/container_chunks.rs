//! Memory larger than one read chunk (1 MiB): data runs that cross chunk boundaries
//! stay one run in the file form, stream records split at chunk boundaries, and both
//! forms round-trip. Covers the writer's two-thread path (memory over 4 MiB) and its
//! single-thread path (small memory).

mod common;

use std::io::Cursor;

use common::{small_snapshot, PageMemory};
use migration_core::codec::CodecRegistry;
use migration_core::container::{self, ReadOptions, WriteOptions};
use migration_core::{MemoryRange, MemorySource};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// `regions`, with pages filled so that: run A crosses three chunk boundaries, run B
/// is the first page of a chunk, run C the last page of a region, and (when there is
/// a second region) run D its first page and run E a pair across a chunk boundary.
fn memory(regions: &[MemoryRange]) -> PageMemory {
    let m = PageMemory::new(regions);
    let mut seed = 1;
    let mut fill = |gpa: u64| {
        m.fill_page(gpa, seed);
        seed += 1;
    };
    let r0 = regions[0];
    let mut gpa = r0.gpa + MIB - 2 * PAGE;
    while gpa < r0.gpa + 3 * MIB + PAGE {
        fill(gpa);
        gpa += PAGE;
    }
    fill(r0.gpa + 3 * MIB + MIB / 2);
    fill(r0.gpa + r0.length - PAGE);
    if let Some(r1) = regions.get(1) {
        fill(r1.gpa);
        fill(r1.gpa + MIB - PAGE);
        fill(r1.gpa + MIB);
    }
    m
}

fn check(regions: &[MemoryRange], file_runs: u64, stream_records: u64) {
    let mem = memory(regions);
    let source: &dyn MemorySource = &mem;
    let total: u64 = regions.iter().map(|r| r.length).sum();
    let data = mem.snapshot_pages().len() as u64 * PAGE;

    let mut file = Cursor::new(Vec::new());
    let s = container::write_snapshot(
        &mut file,
        &small_snapshot(100),
        Some(source),
        &WriteOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (s.memory_bytes, s.data_bytes, s.runs),
        (total, data, file_runs)
    );
    let report = container::verify(Cursor::new(file.get_ref())).unwrap();
    assert_eq!((report.data_bytes, report.runs), (data, file_runs));
    let sink = PageMemory::new(regions);
    container::read_snapshot(
        Cursor::new(file.get_ref()),
        &CodecRegistry::new(),
        Some(&sink),
    )
    .unwrap();
    assert_eq!(sink.snapshot_pages(), mem.snapshot_pages());

    let mut stream = Vec::new();
    let s = container::write_snapshot_stream(
        &mut stream,
        &small_snapshot(100),
        Some(source),
        &WriteOptions::default(),
    )
    .unwrap();
    assert_eq!(s.total_length, stream.len() as u64);
    assert_eq!(
        (s.memory_bytes, s.data_bytes, s.runs),
        (total, data, stream_records)
    );
    let report = container::verify_stream(&mut stream.as_slice()).unwrap();
    assert_eq!((report.data_bytes, report.runs), (data, stream_records));
    let sink = PageMemory::new(regions);
    container::read_snapshot_stream(
        &mut stream.as_slice(),
        &CodecRegistry::new(),
        Some(&sink),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(sink.snapshot_pages(), mem.snapshot_pages());
}

#[test]
fn runs_across_chunks_two_threads() {
    // 6 MiB + 5 MiB: over the single-thread limit.
    // File runs: A, B, C, D, E. Stream records: A in 4 pieces, B, C, D, E in 2.
    check(
        &[
            MemoryRange::new(0, 6 * MIB),
            MemoryRange::new(16 * MIB, 5 * MIB),
        ],
        5,
        9,
    );
}

#[test]
fn runs_across_chunks_one_thread() {
    // 4 MiB: A, B, C; stream: A in 4 pieces, B, C.
    check(&[MemoryRange::new(0, 4 * MIB)], 3, 6);
}
