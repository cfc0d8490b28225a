//! [`FakeMemory`]: sparse, thread-safe fake guest memory with its own dirty bitmap.
//!
//! Memory is a set of regions at configurable guest-physical addresses. Each region
//! is cut into [`CHUNK_SIZE`] chunks that are allocated on the first non-zero write;
//! an unallocated chunk reads as zeros. A 1 GiB mostly-zero memory therefore costs
//! only the chunks a test actually writes, and [`FakeMemory::allocated_ranges`] tells
//! a container writer which ranges can hold non-zero bytes.
//!
//! Reads and writes take `&self` (each chunk sits behind its own mutex), so a
//! background workload can write while a migration reads. Every write (through
//! [`MemorySink`], including [`MemorySink::zero_memory`] and
//! [`MemorySink::read_memory_from`]) marks its pages in the memory's dirty bitmap
//! *after* the bytes land, so a reader that takes the dirty set and then reads the
//! pages never misses a write: [`FakeMemory::take_dirty`] returns and clears it.
//!
//! ```
//! use migration_core::{MemoryRange, MemorySink, MemorySource};
//! use migration_testkit::FakeMemory;
//!
//! // 1 GiB at 4 GiB: nothing is allocated yet.
//! let mem = FakeMemory::new(&[MemoryRange::new(1 << 32, 1 << 30)]).unwrap();
//! assert!(mem.allocated_ranges().is_empty());
//!
//! mem.write_memory((1 << 32) + 0x1000, b"hello").unwrap();
//! let mut buf = [0u8; 5];
//! mem.read_memory((1 << 32) + 0x1000, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! assert_eq!(mem.take_dirty().ranges(), &[MemoryRange::new((1 << 32) + 0x1000, 0x1000)]);
//! assert!(mem.take_dirty().is_empty());
//! assert_eq!(mem.allocated_ranges().total_bytes(), 2 << 20); // one 2 MiB chunk
//! assert!(mem.read_memory(0, &mut buf).is_err());           // outside guest RAM
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use migration_core::memory::{check_range, is_zero, PAGE_SIZE};
use migration_core::{MemoryError, MemoryRange, MemoryRangeTable, MemorySink, MemorySource};

use crate::rng::Digest;

/// Allocation granule: 2 MiB.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// Zeros written for unallocated chunks.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

type Chunk = Mutex<Option<Box<[u8]>>>;

struct Region {
    range: MemoryRange,
    chunks: Vec<Chunk>,
    dirty: Vec<AtomicU64>,
}

impl Region {
    fn chunk_len(&self, index: usize) -> usize {
        let start = index as u64 * CHUNK_SIZE;
        (self.range.length - start).min(CHUNK_SIZE) as usize
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Option<Box<[u8]>>> {
        // A panic while holding a chunk leaves plain bytes behind: still usable.
        self.chunks[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + len - 1) / PAGE_SIZE;
        for page in first..=last {
            self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }
}

/// One piece of an access: the part of a range inside one chunk.
struct Piece {
    chunk: usize,
    /// Offset in the chunk.
    offset: usize,
    len: usize,
    /// Offset from the start of the access.
    done: usize,
}

/// Sparse fake guest memory; see the [module docs](self).
pub struct FakeMemory {
    regions: Vec<Region>,
}

impl fmt::Debug for FakeMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeMemory")
            .field(
                "regions",
                &self.regions.iter().map(|r| r.range).collect::<Vec<_>>(),
            )
            .field("allocated_bytes", &self.allocated_ranges().total_bytes())
            .finish()
    }
}

fn backend(msg: String) -> MemoryError {
    MemoryError::Backend(msg.into())
}

impl FakeMemory {
    /// Memory with `regions` (any order), all zero. Regions must be non-empty,
    /// page-aligned and must not overlap.
    pub fn new(regions: &[MemoryRange]) -> Result<Self, MemoryError> {
        let mut ranges = regions.to_vec();
        ranges.sort();
        for r in &ranges {
            if r.length == 0 || r.gpa % PAGE_SIZE != 0 || r.length % PAGE_SIZE != 0 {
                return Err(backend(format!(
                    "region [{:#x}, +{:#x}) is empty or not page-aligned",
                    r.gpa, r.length
                )));
            }
            if r.end().is_none() {
                return Err(MemoryError::OutOfRange {
                    gpa: r.gpa,
                    length: r.length,
                });
            }
        }
        for w in ranges.windows(2) {
            if w[0].end().is_some_and(|end| end > w[1].gpa) {
                return Err(MemoryError::Overlap { gpa: w[1].gpa });
            }
        }
        let regions = ranges
            .into_iter()
            .map(|range| {
                let chunks = range.length.div_ceil(CHUNK_SIZE) as usize;
                let words = (range.length / PAGE_SIZE).div_ceil(64) as usize;
                Region {
                    range,
                    chunks: (0..chunks).map(|_| Mutex::new(None)).collect(),
                    dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
                }
            })
            .collect();
        Ok(Self { regions })
    }

    /// One region of `size` bytes at guest address 0.
    pub fn with_size(size: u64) -> Result<Self, MemoryError> {
        Self::new(&[MemoryRange::new(0, size)])
    }

    /// The regions, sorted by address.
    pub fn layout(&self) -> Vec<MemoryRange> {
        self.regions.iter().map(|r| r.range).collect()
    }

    /// Total guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.range.length).sum()
    }

    /// Checks `[gpa, +len)` and returns its region and the pieces per chunk.
    fn pieces(&self, gpa: u64, len: u64) -> Result<(&Region, Vec<Piece>), MemoryError> {
        let range = MemoryRange::new(gpa, len);
        check_range(&self.layout(), range)?;
        let region = self
            .regions
            .iter()
            .find(|r| r.range.contains(&range))
            .ok_or(MemoryError::OutOfRange { gpa, length: len })?;
        let mut pieces = Vec::new();
        let mut offset = gpa - region.range.gpa;
        let end = offset + len;
        let mut done = 0usize;
        while offset < end {
            let chunk = (offset / CHUNK_SIZE) as usize;
            let in_chunk = offset % CHUNK_SIZE;
            let n = (CHUNK_SIZE - in_chunk).min(end - offset) as usize;
            pieces.push(Piece {
                chunk,
                offset: in_chunk as usize,
                len: n,
                done,
            });
            offset += n as u64;
            done += n;
        }
        Ok((region, pieces))
    }

    /// Returns and clears the set of pages written since the previous call (or since
    /// the memory was created).
    pub fn take_dirty(&self) -> MemoryRangeTable {
        let mut table = MemoryRangeTable::new();
        for r in &self.regions {
            let words: Vec<u64> = r
                .dirty
                .iter()
                .map(|w| w.swap(0, Ordering::AcqRel))
                .collect();
            table.extend(&MemoryRangeTable::from_bitmap(
                &words,
                r.range.gpa,
                PAGE_SIZE,
            ));
        }
        table
    }

    /// Marks `[gpa, +len)` dirty without writing (as a hypervisor's own log would).
    pub fn mark_dirty(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let (region, _) = self.pieces(gpa, len)?;
        region.mark(gpa - region.range.gpa, len);
        Ok(())
    }

    /// The chunk-aligned ranges that are allocated and so may hold non-zero bytes;
    /// everything else reads as zeros.
    pub fn allocated_ranges(&self) -> MemoryRangeTable {
        let mut table = MemoryRangeTable::new();
        for r in &self.regions {
            for i in 0..r.chunks.len() {
                if r.lock(i).is_some() {
                    table.push(MemoryRange::new(
                        r.range.gpa + i as u64 * CHUNK_SIZE,
                        r.chunk_len(i) as u64,
                    ));
                }
            }
        }
        table
    }

    /// Whether every byte of `[gpa, +len)` is zero (unallocated chunks are, without
    /// looking).
    pub fn is_zero(&self, gpa: u64, len: u64) -> Result<bool, MemoryError> {
        let (region, pieces) = self.pieces(gpa, len)?;
        for p in pieces {
            if let Some(data) = region.lock(p.chunk).as_ref() {
                if !is_zero(&data[p.offset..p.offset + p.len]) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// A 64-bit digest of the layout and every byte of memory (not cryptographic):
    /// two memories with the same layout and contents have the same digest, whatever
    /// is allocated.
    pub fn content_digest(&self) -> u64 {
        let mut d = Digest::new();
        for r in &self.regions {
            d.word(r.range.gpa).word(r.range.length);
            for i in 0..r.chunks.len() {
                match r.lock(i).as_ref() {
                    Some(data) if !is_zero(data) => d.bytes(data),
                    _ => d.word(0x2e70_0000_0000_0000 | r.chunk_len(i) as u64),
                };
            }
        }
        d.finish()
    }

    /// The first address where `self` and `other` differ, `Ok(None)` if they are
    /// equal, or an error if their layouts differ.
    pub fn first_difference(&self, other: &FakeMemory) -> Result<Option<u64>, String> {
        if self.layout() != other.layout() {
            return Err(format!(
                "layouts differ: {:x?} vs {:x?}",
                self.layout(),
                other.layout()
            ));
        }
        for (a, b) in self.regions.iter().zip(&other.regions) {
            for i in 0..a.chunks.len() {
                let base = a.range.gpa + i as u64 * CHUNK_SIZE;
                let (x, y) = (a.lock(i), b.lock(i));
                let pos = match (x.as_deref(), y.as_deref()) {
                    (None, None) => None,
                    (Some(d), None) | (None, Some(d)) => d.iter().position(|&b| b != 0),
                    (Some(d), Some(e)) => d.iter().zip(e).position(|(p, q)| p != q),
                };
                if let Some(pos) = pos {
                    return Ok(Some(base + pos as u64));
                }
            }
        }
        Ok(None)
    }
}

impl MemorySource for FakeMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        self.layout()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (region, pieces) = self.pieces(gpa, buf.len() as u64)?;
        for p in pieces {
            let out = &mut buf[p.done..p.done + p.len];
            match region.lock(p.chunk).as_ref() {
                Some(data) => out.copy_from_slice(&data[p.offset..p.offset + p.len]),
                None => out.fill(0),
            }
        }
        Ok(())
    }

    fn write_memory_to(
        &self,
        gpa: u64,
        length: u64,
        out: &mut dyn Write,
    ) -> Result<(), MemoryError> {
        let (region, pieces) = self.pieces(gpa, length)?;
        for p in pieces {
            // Copy out of the lock so a slow writer does not block the workload.
            let copy = region
                .lock(p.chunk)
                .as_ref()
                .map(|data| data[p.offset..p.offset + p.len].to_vec());
            match copy {
                Some(bytes) => out.write_all(&bytes)?,
                None => {
                    let mut left = p.len;
                    while left > 0 {
                        let n = left.min(ZEROS.len());
                        out.write_all(&ZEROS[..n])?;
                        left -= n;
                    }
                }
            }
        }
        Ok(())
    }

    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        Some(self)
    }
}

impl MemorySink for FakeMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        self.layout()
    }

    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let (region, pieces) = self.pieces(gpa, data.len() as u64)?;
        for p in pieces {
            let src = &data[p.done..p.done + p.len];
            let mut chunk = region.lock(p.chunk);
            match chunk.as_mut() {
                Some(dst) => dst[p.offset..p.offset + p.len].copy_from_slice(src),
                None if is_zero(src) => {}
                None => {
                    let mut fresh = vec![0u8; region.chunk_len(p.chunk)].into_boxed_slice();
                    fresh[p.offset..p.offset + p.len].copy_from_slice(src);
                    *chunk = Some(fresh);
                }
            }
        }
        region.mark(gpa - region.range.gpa, data.len() as u64);
        Ok(())
    }

    fn read_memory_from(
        &self,
        gpa: u64,
        length: u64,
        input: &mut dyn Read,
    ) -> Result<(), MemoryError> {
        let (region, pieces) = self.pieces(gpa, length)?;
        let mut result = Ok(());
        for p in pieces {
            let mut chunk = region.lock(p.chunk);
            let len = region.chunk_len(p.chunk);
            let dst = chunk.get_or_insert_with(|| vec![0u8; len].into_boxed_slice());
            let r = input.read_exact(&mut dst[p.offset..p.offset + p.len]);
            if is_zero(dst) {
                *chunk = None; // stay sparse when zeros arrive
            }
            drop(chunk);
            if let Err(e) = r {
                result = Err(MemoryError::Io(e));
                break;
            }
        }
        // Whatever may have been overwritten is dirty, even on error.
        region.mark(gpa - region.range.gpa, length);
        result
    }

    fn zero_memory(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        let (region, pieces) = self.pieces(gpa, length)?;
        for p in pieces {
            let mut chunk = region.lock(p.chunk);
            if p.offset == 0 && p.len == region.chunk_len(p.chunk) {
                *chunk = None;
            } else if let Some(dst) = chunk.as_mut() {
                dst[p.offset..p.offset + p.len].fill(0);
            }
        }
        region.mark(gpa - region.range.gpa, length);
        Ok(())
    }

    fn as_sync_sink(&self) -> Option<&(dyn MemorySink + Sync)> {
        Some(self)
    }
}

/// `io::Error` for callers that want to surface a [`MemoryError`] through `io`.
pub fn to_io(e: MemoryError) -> io::Error {
    match e {
        MemoryError::Io(e) => e,
        other => io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn two_regions() -> FakeMemory {
        FakeMemory::new(&[
            MemoryRange::new(0x1_0000_0000, 3 * MIB),
            MemoryRange::new(0, 5 * MIB),
        ])
        .unwrap()
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(matches!(
            FakeMemory::new(&[
                MemoryRange::new(0, 0x2000),
                MemoryRange::new(0x1000, 0x1000)
            ]),
            Err(MemoryError::Overlap { gpa: 0x1000 })
        ));
        assert!(FakeMemory::new(&[MemoryRange::new(0x10, 0x1000)]).is_err());
        assert!(FakeMemory::new(&[MemoryRange::new(0, 0)]).is_err());
    }

    #[test]
    fn reads_back_writes_across_chunks_and_zero_elsewhere() {
        let m = two_regions();
        let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 251) as u8 + 1).collect();
        m.write_memory(MIB, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        m.read_memory(MIB, &mut back).unwrap();
        assert_eq!(back, data);
        let mut head = vec![1u8; MIB as usize];
        m.read_memory(0, &mut head).unwrap();
        assert!(head.iter().all(|&b| b == 0));
        // Chunks 0 and 1 of the low region are allocated, nothing of the high one.
        assert_eq!(
            m.allocated_ranges().ranges(),
            &[MemoryRange::new(0, 4 * MIB)]
        );
        assert!(m.is_zero(0, MIB).unwrap());
        assert!(!m.is_zero(0, MIB + 1).unwrap());
    }

    #[test]
    fn checks_ranges() {
        let m = two_regions();
        let mut buf = [0u8; 16];
        assert!(m.read_memory(5 * MIB - 8, &mut buf).is_err());
        assert!(m.write_memory(0x1_0000_0000 - 8, &buf).is_err());
        assert!(m.write_memory(u64::MAX - 4, &buf).is_err());
        assert!(m.zero_memory(0x1_0000_0000, 3 * MIB + 1).is_err());
        assert!(m.read_memory_from(6 * MIB, 1, &mut &[1u8][..]).is_err());
    }

    #[test]
    fn dirty_bitmap_tracks_every_kind_of_write() {
        let m = two_regions();
        m.write_memory(0x1fff, &[1, 2]).unwrap(); // pages 1 and 2
        m.zero_memory(0x1_0000_0000, 0x1000).unwrap();
        m.read_memory_from(0x5000, 0x1000, &mut &[7u8; 0x1000][..])
            .unwrap();
        let d = m.take_dirty();
        assert_eq!(
            d.ranges(),
            &[
                MemoryRange::new(0x1000, 0x2000),
                MemoryRange::new(0x5000, 0x1000),
                MemoryRange::new(0x1_0000_0000, 0x1000)
            ]
        );
        assert!(m.take_dirty().is_empty());
    }

    #[test]
    fn zeroing_and_zero_reads_keep_memory_sparse() {
        let m = two_regions();
        m.write_memory(0, &[9u8; 100]).unwrap();
        assert_eq!(m.allocated_ranges().total_bytes(), 2 * MIB);
        m.zero_memory(0, 2 * MIB).unwrap();
        assert!(m.allocated_ranges().is_empty());
        m.read_memory_from(0, 4 * MIB, &mut io::repeat(0)).unwrap();
        assert!(m.allocated_ranges().is_empty());
        m.write_memory(0, &[0u8; 4096]).unwrap();
        assert!(m.allocated_ranges().is_empty());
    }

    #[test]
    fn digest_and_difference_see_contents_not_allocation() {
        let a = two_regions();
        let b = two_regions();
        assert_eq!(a.content_digest(), b.content_digest());
        a.write_memory(0x3000, &[1]).unwrap();
        assert_ne!(a.content_digest(), b.content_digest());
        assert_eq!(a.first_difference(&b).unwrap(), Some(0x3000));
        a.write_memory(0x3000, &[0]).unwrap(); // allocated but zero again
        assert_eq!(a.content_digest(), b.content_digest());
        assert_eq!(a.first_difference(&b).unwrap(), None);
    }

    #[test]
    fn streams_out_what_was_written() {
        let m = two_regions();
        m.write_memory(2 * MIB - 2, &[1, 2, 3, 4]).unwrap();
        let mut out = Vec::new();
        m.write_memory_to(2 * MIB - 4, 8, &mut out).unwrap();
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
    }

    #[test]
    fn a_gib_costs_only_what_is_written() {
        let m = FakeMemory::with_size(1 << 30).unwrap();
        m.write_memory(512 * MIB, &[0xaa; 4096]).unwrap();
        assert_eq!(m.allocated_ranges().total_bytes(), CHUNK_SIZE);
        let mut out = Vec::new();
        m.write_memory_to(512 * MIB, 4096, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0xaa));
    }
}
