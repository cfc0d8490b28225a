//! Decodes containers assembled byte by byte from `docs/format.md`, not by the encoder.

mod common;

use std::io::Cursor;

use common::PageMemory;
use migration_core::arch::Arch;
use migration_core::codec::{CodecId, CodecRegistry};
use migration_core::container::{self, Form, FormatError, ReadOptions};
use migration_core::{MemoryRange, MigratableError};

fn crc(b: &[u8]) -> u64 {
    crc_fast::crc64_nvme(b)
}

fn header(
    form: u16,
    metadata_len: u64,
    payload_len: u64,
    table: (u64, u64),
    total: u64,
) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"\x89VMSNAP\n");
    h.extend_from_slice(&1u16.to_le_bytes()); // major
    h.extend_from_slice(&0u16.to_le_bytes()); // minor
    h.extend_from_slice(&form.to_le_bytes());
    h.extend_from_slice(&192u16.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes()); // x86_64
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&metadata_len.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&table.0.to_le_bytes());
    h.extend_from_slice(&table.1.to_le_bytes());
    h.extend_from_slice(&total.to_le_bytes());
    h.extend_from_slice(&[0; 32]); // parent digest
    let mut name = [0u8; 32];
    name[0] = 4;
    name[1..5].copy_from_slice(b"spec");
    h.extend_from_slice(&name);
    let mut version = [0u8; 24];
    version[0] = 1;
    version[1] = b'1';
    h.extend_from_slice(&version);
    h.extend_from_slice(&[0; 32]); // reserved
    assert_eq!(h.len(), 184);
    let c = crc(&h);
    h.extend_from_slice(&c.to_le_bytes());
    h
}

fn reseal_header(b: &mut [u8]) {
    let c = crc(&b[..184]);
    b[184..192].copy_from_slice(&c.to_le_bytes());
}

/// Tree vm{a: v7 raw0 "hello"} with child c{}; one extent at 0x10000 of two pages.
fn metadata(extent_file_offset: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&2u32.to_le_bytes()); // nodes
    m.extend_from_slice(&1u32.to_le_bytes()); // sections
    m.extend_from_slice(&1u32.to_le_bytes()); // extents
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&2u16.to_le_bytes());
    m.extend_from_slice(b"vm");
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(b"a");
    m.extend_from_slice(&7u32.to_le_bytes());
    m.extend_from_slice(b"raw0"); // codec tag bytes = u32 LE
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&5u64.to_le_bytes());
    m.extend_from_slice(&crc(b"hello").to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes()); // one child
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(b"c");
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0x10000u64.to_le_bytes());
    m.extend_from_slice(&0x2000u64.to_le_bytes());
    m.extend_from_slice(&extent_file_offset.to_le_bytes());
    let c = crc(&m);
    m.extend_from_slice(&c.to_le_bytes());
    m
}

fn file_form() -> Vec<u8> {
    let md = metadata(4096);
    assert_eq!(md.len(), 106);
    let page = vec![0xabu8; 4096];
    let mut table = Vec::new();
    table.extend_from_slice(&1u64.to_le_bytes());
    table.extend_from_slice(&0u64.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0x1000u64.to_le_bytes());
    table.extend_from_slice(&0x1000u64.to_le_bytes());
    table.extend_from_slice(&crc(&page).to_le_bytes());
    let c = crc(&table);
    table.extend_from_slice(&c.to_le_bytes());
    let table_offset = 4096 + 0x2000;
    let total = table_offset + table.len() as u64;
    let mut f = header(1, 106, 5, (table_offset, table.len() as u64), total);
    f.extend_from_slice(&md);
    f.extend_from_slice(b"hello");
    f.resize(4096 + 0x1000, 0); // padding, then the extent's zero first page
    f.extend_from_slice(&page);
    f.extend_from_slice(&table);
    assert_eq!(f.len() as u64, total);
    f
}

fn stream_form() -> Vec<u8> {
    let mut s = header(2, 106, 5, (0, 0), 0);
    s.extend_from_slice(&metadata(0));
    s.extend_from_slice(b"hello");
    let page = vec![0xcdu8; 4096];
    let mut rec = Vec::new();
    rec.extend_from_slice(&1u32.to_le_bytes());
    rec.extend_from_slice(&0u32.to_le_bytes());
    rec.extend_from_slice(&0x11000u64.to_le_bytes());
    rec.extend_from_slice(&0x1000u64.to_le_bytes());
    let mut both = rec.clone();
    both.extend_from_slice(&page);
    rec.extend_from_slice(&crc(&both).to_le_bytes());
    rec.extend_from_slice(&page);
    s.extend_from_slice(&rec);
    let mut end = Vec::new();
    end.extend_from_slice(&2u32.to_le_bytes());
    end.extend_from_slice(&0u32.to_le_bytes());
    end.extend_from_slice(&0u64.to_le_bytes());
    end.extend_from_slice(&1u64.to_le_bytes());
    let c = crc(&end);
    end.extend_from_slice(&c.to_le_bytes());
    s.extend_from_slice(&end);
    s
}

fn check_tree(s: &migration_core::Snapshot) {
    assert_eq!(s.id(), "vm");
    let a = s.section("a").unwrap();
    assert_eq!(
        (a.version(), a.codec_id(), a.payload()),
        (7, Some(CodecId::new(b"raw0")), Some(&b"hello"[..]))
    );
    let c = s.child("c").unwrap();
    assert_eq!((c.sections().count(), c.children().count()), (0, 0));
}

#[test]
fn hand_assembled_file_form_decodes() {
    let bytes = file_form();
    let info = container::inspect(Cursor::new(&bytes)).unwrap();
    assert_eq!(info.header.form, Form::File);
    assert_eq!(info.header.arch, Arch::X86_64);
    assert_eq!(
        (
            info.header.producer_name.as_str(),
            info.header.producer_version.as_str()
        ),
        ("spec", "1")
    );
    assert_eq!(info.extents.len(), 1);
    assert_eq!(
        (info.extents[0].gpa, info.extents[0].file_offset),
        (0x10000, 4096)
    );
    let runs = info.runs.clone().unwrap();
    assert_eq!(
        (runs[0].gpa, runs[0].file_offset, runs[0].length),
        (0x11000, 8192, 4096)
    );
    assert_eq!(
        (0..info.nodes.len())
            .map(|i| info.path(i))
            .collect::<Vec<_>>(),
        ["vm", "vm/c"]
    );
    assert_eq!(info.sections[0].offset, 298);

    let sink = PageMemory::new(&[MemoryRange::new(0x10000, 0x2000)]);
    sink.fill_page(0x10000, 9); // stale content the hole must clear
    let s =
        container::read_snapshot(Cursor::new(&bytes), &CodecRegistry::new(), Some(&sink)).unwrap();
    check_tree(&s);
    let pages = sink.snapshot_pages();
    assert_eq!(pages.keys().copied().collect::<Vec<_>>(), [0x11000]);
    assert!(pages[&0x11000].iter().all(|&b| b == 0xab));
    assert_eq!(
        container::verify(Cursor::new(&bytes)).unwrap().data_bytes,
        4096
    );
}

#[test]
fn hand_assembled_stream_form_decodes() {
    let bytes = stream_form();
    let sink = PageMemory::new(&[MemoryRange::new(0x10000, 0x2000)]);
    let s = container::read_snapshot_stream(
        &mut &bytes[..],
        &CodecRegistry::new(),
        Some(&sink),
        &ReadOptions::default(),
    )
    .unwrap();
    check_tree(&s);
    let pages = sink.snapshot_pages();
    assert_eq!(pages.keys().copied().collect::<Vec<_>>(), [0x11000]);
    assert!(pages[&0x11000].iter().all(|&b| b == 0xcd));
    // A seekable reader accepts the stream form too.
    check_tree(
        &container::read_snapshot(Cursor::new(&bytes), &CodecRegistry::new(), None).unwrap(),
    );
}

fn format_err(r: Result<impl std::fmt::Debug, MigratableError>) -> FormatError {
    match r {
        Err(MigratableError::Format(e)) => e,
        other => panic!("expected a FormatError, got {other:?}"),
    }
}

#[test]
fn newer_minor_and_other_major_are_rejected_naming_both_versions() {
    for (major, minor) in [(1u16, 1u16), (2, 0), (0, 9)] {
        let mut b = file_form();
        b[8..10].copy_from_slice(&major.to_le_bytes());
        b[10..12].copy_from_slice(&minor.to_le_bytes());
        reseal_header(&mut b);
        let e = format_err(container::verify(Cursor::new(&b)));
        assert_eq!(
            e,
            FormatError::UnsupportedVersion {
                found_major: major,
                found_minor: minor,
                supported_major: 1,
                supported_minor: 0
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{major}.{minor}")) && msg.contains("1.0"),
            "{msg}"
        );
    }
}

#[test]
fn unknown_flags_bad_magic_and_reserved_bytes_are_rejected() {
    let mut b = file_form();
    b[20] = 2;
    reseal_header(&mut b);
    assert_eq!(
        format_err(container::verify(Cursor::new(&b))),
        FormatError::UnknownFlags { flags: 2 }
    );

    let mut b = file_form();
    b[1] = b'X';
    assert!(matches!(
        format_err(container::verify(Cursor::new(&b))),
        FormatError::BadMagic { .. }
    ));

    let mut b = file_form();
    b[160] = 1;
    reseal_header(&mut b);
    assert!(matches!(
        format_err(container::verify(Cursor::new(&b))),
        FormatError::Malformed { .. }
    ));
}
