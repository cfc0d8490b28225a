//! Valid-but-hostile container files (issue 20): each test builds its own file, with
//! valid checksums where the point is a file that is valid yet hostile, and checks
//! that every reader refuses it or handles it with work bounded by the bytes stored.
//! Time limits here are hang guards (60 s), not speed thresholds.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use migration_core::checksum::{crc64, Crc64};
use migration_core::codec::CodecId;
use migration_core::container::{self, ContainerReader, StoredMemory, WriteOptions};
use migration_core::{MemoryError, MemoryRange, MemorySource, MigratableError, Section, Snapshot};

const HANG_GUARD: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Memory of `regions` whose bytes are non-zero only in `data` (a pattern), and that
/// says so ([`MemorySource::nonzero_ranges`]), so writing terabytes costs kilobytes.
struct Pattern {
    regions: Vec<MemoryRange>,
    data: Vec<MemoryRange>,
}

impl MemorySource for Pattern {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa + i as u64;
            let inside = self.data.iter().any(|r| r.gpa <= a && a < r.gpa + r.length);
            *b = if inside { (a % 251) as u8 | 1 } else { 0 };
        }
        Ok(())
    }
    fn nonzero_ranges(&self) -> Option<Vec<MemoryRange>> {
        Some(self.data.clone())
    }
}

fn tree() -> Snapshot {
    let mut vm = Snapshot::new("vm");
    vm.add_section(
        "regs",
        Section::from_encoded(1, CodecId::new(b"raw0"), vec![7; 100]),
    );
    vm
}

fn small_memory() -> Pattern {
    Pattern {
        regions: vec![MemoryRange::new(0, 16 * 4096)],
        data: vec![MemoryRange::new(4096, 4096)],
    }
}

fn stream_bytes(memory: &Pattern) -> Vec<u8> {
    let mut out = Vec::new();
    container::write_snapshot_stream(&mut out, &tree(), Some(memory), &WriteOptions::default())
        .unwrap();
    out
}

fn file_bytes(memory: &Pattern) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    container::write_snapshot(&mut out, &tree(), Some(memory), &WriteOptions::default()).unwrap();
    out.into_inner()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recomputes the metadata CRC after a patch.
fn fix_metadata_crc(b: &mut [u8]) {
    let len = u64_at(b, 24) as usize;
    let crc = crc64(&b[192..192 + len - 8]);
    b[192 + len - 8..192 + len].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the run table CRC after a patch (file form).
fn fix_run_table_crc(b: &mut [u8]) {
    let (off, len) = (u64_at(b, 40) as usize, u64_at(b, 48) as usize);
    let crc = crc64(&b[off..off + len - 8]);
    b[off + len - 8..off + len].copy_from_slice(&crc.to_le_bytes());
}

/// Every reader refuses `b`: verify, inspect, and a restore.
fn refused_by_all(b: &[u8]) -> Vec<MigratableError> {
    let v = container::verify(Cursor::new(b)).expect_err("verify accepted it");
    let i = container::inspect(Cursor::new(b)).expect_err("inspect accepted it");
    vec![v, i]
}

#[test]
fn stream_form_with_bytes_after_end_is_refused() {
    let mut b = stream_bytes(&small_memory());
    assert!(container::verify(Cursor::new(&b)).is_ok());
    b.extend_from_slice(b"trailing garbage");
    let e = refused_by_all(&b);
    assert!(
        e[0].to_string().contains("after the END record"),
        "{}",
        e[0]
    );
}

#[test]
fn stream_form_with_a_second_container_appended_is_refused() {
    let one = stream_bytes(&small_memory());
    let mut two = one.clone();
    two.extend_from_slice(&one);
    refused_by_all(&two);
}

#[test]
fn stream_form_extent_with_a_file_offset_is_refused() {
    let mut b = stream_bytes(&small_memory());
    // The single extent is the last 24 bytes before the metadata CRC.
    let md_end = 192 + u64_at(&b, 24) as usize - 8;
    let file_offset_at = md_end - 8;
    b[file_offset_at..md_end].copy_from_slice(&4096u64.to_le_bytes());
    fix_metadata_crc(&mut b);
    let e = refused_by_all(&b);
    assert!(e[0].to_string().contains("file_offset"), "{}", e[0]);
    // The socket reader refuses it too.
    assert!(container::verify_stream(&mut &b[..]).is_err());
}

#[test]
fn non_zero_padding_is_refused() {
    let good = file_bytes(&small_memory());
    let payload_end = 192 + u64_at(&good, 24) + u64_at(&good, 32);
    let first_extent = payload_end.div_ceil(4096) * 4096;
    // First and last byte of the padding before the first extent.
    for at in [payload_end, first_extent - 1] {
        let mut b = good.clone();
        b[at as usize] = 1;
        let e = refused_by_all(&b);
        assert!(e[0].to_string().contains("padding"), "{}", e[0]);
    }
}

#[test]
fn inspect_refuses_a_wrong_run_crc_and_a_non_zero_byte_in_a_hole() {
    let good = file_bytes(&small_memory());
    let table = u64_at(&good, 40) as usize;
    // Run 0's CRC, table re-checksummed: only the run's own CRC is wrong.
    let mut bad_crc = good.clone();
    bad_crc[table + 16 + 24] ^= 1;
    fix_run_table_crc(&mut bad_crc);
    let e = refused_by_all(&bad_crc);
    assert!(e[1].to_string().contains("run 0"), "{}", e[1]);
    // A non-zero byte in the extent's page 5, outside every run.
    let extent = u64_at(&good, 192 + u64_at(&good, 24) as usize - 8 - 8) as usize;
    let mut in_hole = good.clone();
    in_hole[extent + 5 * 4096 + 17] = 0x55;
    let e = refused_by_all(&in_hole);
    assert!(
        e[1].to_string().contains("outside every data run"),
        "{}",
        e[1]
    );
}

/// A file-form snapshot declaring 1 TiB that stores a few pages: verify, inspect and a
/// copy through [`StoredMemory`] (what `vmsnap convert` does) finish with work
/// bounded by the bytes stored.
#[test]
fn a_terabyte_declared_in_a_small_file_costs_what_it_stores() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Pattern {
        regions: vec![MemoryRange::new(0, TIB)],
        data: vec![
            MemoryRange::new(0, 4096),
            MemoryRange::new(TIB - 8192, 4096),
        ],
    };
    let path = dir.path().join("tib.snap");
    let start = Instant::now();
    migration_core::file::write_snapshot_file(
        &path,
        &tree(),
        Some(&memory),
        &WriteOptions::default(),
    )
    .unwrap();
    let report = migration_core::file::verify_file(&path).unwrap();
    assert_eq!((report.memory_bytes, report.data_bytes), (TIB, 8192));
    migration_core::file::inspect_file(&path).unwrap();
    let reader = ContainerReader::open(std::fs::File::open(&path).unwrap()).unwrap();
    assert!(reader.check_memory_limit(64 * GIB).is_err());
    let stored = StoredMemory::new(reader);
    let copy = dir.path().join("copy.snap");
    migration_core::file::write_snapshot_file(
        &copy,
        &tree(),
        Some(&stored),
        &WriteOptions::default(),
    )
    .unwrap();
    assert_eq!(migration_core::file::verify_file(&copy).unwrap(), report);
    // The stream form of the same: a few KiB.
    let stream = stream_bytes(&memory);
    assert!(stream.len() < 64 << 10);
    let report = container::verify(Cursor::new(&stream)).unwrap();
    assert_eq!(report.memory_bytes, TIB);
    let stored = StoredMemory::new(ContainerReader::open(Cursor::new(&stream)).unwrap());
    let mut back = Cursor::new(Vec::new());
    container::write_snapshot_stream(&mut back, &tree(), Some(&stored), &WriteOptions::default())
        .unwrap();
    assert_eq!(back.into_inner(), stream);
    assert!(start.elapsed() < HANG_GUARD, "{:?}", start.elapsed());
}

/// A valid run laid over a 64 GiB hole (its CRC is that of the page and the zeros):
/// verify computes the hole's CRC instead of reading 64 GiB.
#[test]
fn a_run_over_a_64_gib_hole_is_verified_without_reading_the_hole() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * GIB;
    let memory = Pattern {
        regions: vec![MemoryRange::new(0, len)],
        data: vec![MemoryRange::new(0, 4096)],
    };
    let path = dir.path().join("hole.snap");
    migration_core::file::write_snapshot_file(
        &path,
        &tree(),
        Some(&memory),
        &WriteOptions::default(),
    )
    .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut head = vec![0u8; 192];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    let (table_off, table_len) = (u64_at(&head, 40), u64_at(&head, 48));
    f.seek(SeekFrom::Start(table_off)).unwrap();
    let mut table = vec![0u8; table_len as usize];
    std::io::Read::read_exact(&mut f, &mut table).unwrap();
    assert_eq!(u64_at(&table, 0), 1, "one run");
    let mut page = vec![0u8; 4096];
    memory.read_memory(0, &mut page).unwrap();
    let mut crc = Crc64::new();
    crc.update(&page);
    crc.update_zeros(len - 4096);
    table[16 + 16..16 + 24].copy_from_slice(&len.to_le_bytes());
    table[16 + 24..16 + 32].copy_from_slice(&crc.finish().to_le_bytes());
    let body = table.len() - 8;
    let tcrc = crc64(&table[..body]);
    table[body..].copy_from_slice(&tcrc.to_le_bytes());
    f.seek(SeekFrom::Start(table_off)).unwrap();
    f.write_all(&table).unwrap();
    drop(f);
    let start = Instant::now();
    let report = migration_core::file::verify_file(&path).unwrap();
    assert_eq!(report.data_bytes, len);
    assert!(start.elapsed() < HANG_GUARD, "{:?}", start.elapsed());
}

/// A tree of deep chains of 255-byte ids: the reader's memory follows the file's size
/// (no path string per node), and paths are spelled only on demand.
#[test]
fn deep_long_paths_are_read_without_a_path_per_node() {
    let long = |c: char| std::iter::repeat_n(c, 255).collect::<String>();
    let mut root = Snapshot::new("vm");
    for chain in 0..40 {
        let mut node = Snapshot::new(
            format!("{chain:03}{}", long('x'))
                .split_at(255)
                .0
                .to_owned(),
        );
        let mut leaf = Snapshot::new(long('z'));
        leaf.add_section(
            "s",
            Section::from_encoded(1, CodecId::new(b"raw0"), vec![1]),
        );
        for _ in 0..29 {
            let mut parent = Snapshot::new(long('y'));
            parent.add_child(leaf);
            leaf = parent;
        }
        node.add_child(leaf);
        root.add_child(node);
    }
    let mut out = Cursor::new(Vec::new());
    container::write_snapshot(&mut out, &root, None, &WriteOptions::default()).unwrap();
    let info = container::inspect(Cursor::new(out.get_ref())).unwrap();
    assert_eq!(info.nodes.len(), 1 + 40 * 31);
    let stored: usize = info.nodes.iter().map(|n| n.id.len()).sum();
    assert!(stored < out.get_ref().len(), "ids only, no paths");
    let deepest = info.nodes.iter().position(|n| n.depth == 32).unwrap();
    assert_eq!(info.path(deepest).matches('/').count(), 31);
    let s = &info.sections[0];
    assert_eq!(info.nodes[s.node].depth, 32);
}
