//! Guest memory as the migration code sees it: ranges, range tables, and the
//! source/sink traits through which snapshots and migrations move memory.
//!
//! Core knows no memory backend. A hypervisor crate implements [`MemorySource`] and
//! [`MemorySink`] for its guest memory (`migration-kvm` does for vm-memory's
//! `GuestMemoryMmap`); `migration-testkit` does for its fake memory.

use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

use crate::box_error::BoxError;

/// Guest page size used by dirty bitmaps and zero-page detection.
pub const PAGE_SIZE: u64 = 4096;

/// Size of the bounce buffer the default streaming methods use.
const BOUNCE: usize = 1 << 20;

/// A contiguous range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemoryRange {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

impl MemoryRange {
    /// A range of `length` bytes at `gpa`.
    pub const fn new(gpa: u64, length: u64) -> Self {
        Self { gpa, length }
    }

    /// One past the last byte, or `None` if that overflows `u64`.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.length)
    }

    /// Whether `other` lies entirely inside this range.
    pub fn contains(&self, other: &MemoryRange) -> bool {
        match (self.end(), other.end()) {
            (Some(end), Some(other_end)) => other.gpa >= self.gpa && other_end <= end,
            _ => false,
        }
    }
}

/// Errors of guest memory access.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The range is not entirely inside one region of guest RAM.
    #[error("range [{gpa:#x}, +{length:#x}) is outside guest RAM")]
    OutOfRange {
        /// Start of the offending range.
        gpa: u64,
        /// Its length.
        length: u64,
    },
    /// Ranges overlap where they must not.
    #[error("ranges overlap at {gpa:#x}")]
    Overlap {
        /// An address covered twice.
        gpa: u64,
    },
    /// Reading or writing the stream failed.
    #[error("memory stream I/O: {0}")]
    Io(#[from] io::Error),
    /// The memory backend failed.
    #[error("memory backend: {0}")]
    Backend(#[source] BoxError),
}

/// A set of guest memory ranges, kept sorted and coalesced: adjacent or overlapping
/// ranges merge. This is what dirty tracking returns and what a migration round sends.
///
/// ```
/// use migration_core::{MemoryRange, MemoryRangeTable};
///
/// // Pages 0, 1 and 3 dirty, 4 KiB pages, region at 1 MiB.
/// let table = MemoryRangeTable::from_bitmap(&[0b1011], 0x10_0000, 4096);
/// assert_eq!(table.ranges(), &[MemoryRange::new(0x10_0000, 0x2000), MemoryRange::new(0x10_3000, 0x1000)]);
/// assert_eq!(table.total_bytes(), 0x3000);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRangeTable {
    ranges: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a table from a dirty bitmap: bit `i` of word `i / 64` set means page
    /// `i` at `start_gpa + i * page_size` is in the table. Runs of set bits become one
    /// range each.
    pub fn from_bitmap(bitmap: &[u64], start_gpa: u64, page_size: u64) -> Self {
        let mut table = Self::new();
        table.append_bitmap(bitmap, start_gpa, page_size);
        table
    }

    /// Adds the pages of a dirty bitmap (as [`from_bitmap`](Self::from_bitmap)) to this
    /// table. Fast when the bitmap lies after every range already in the table (one
    /// bitmap per memory slot, slots in address order); correct in any case.
    ///
    /// Counts the runs first (one pass of bit arithmetic) and reserves exactly, then
    /// finds run starts and ends a word at a time: `starts = w & !(w << 1 | carry)`,
    /// `ends = !w & (w << 1 | carry)`.
    ///
    /// Pages that would end past `u64::MAX` (and every page, if `page_size` is 0) are
    /// not in the address space and are left out.
    pub fn append_bitmap(&mut self, bitmap: &[u64], start_gpa: u64, page_size: u64) {
        // Keep only the pages whose end address fits in a u64.
        let fitting = (u64::MAX - start_gpa).checked_div(page_size).unwrap_or(0);
        let mut clamped: Vec<u64>;
        let bitmap = if (bitmap.len() as u64).saturating_mul(64) > fitting {
            let words = (fitting / 64) as usize;
            clamped = bitmap[..words].to_vec();
            let rest = fitting % 64;
            if rest > 0 {
                clamped.push(bitmap[words] & ((1u64 << rest) - 1));
            }
            &clamped[..]
        } else {
            bitmap
        };
        let mut carry = 0u64;
        let mut runs = 0usize;
        for &w in bitmap {
            runs += (w & !((w << 1) | carry)).count_ones() as usize;
            carry = w >> 63;
        }
        if runs == 0 {
            return;
        }
        let in_order = self
            .ranges
            .last()
            .is_none_or(|last| last.gpa.saturating_add(last.length) <= start_gpa);
        if !in_order {
            // Rare: merge through the general path.
            let other = Self::from_bitmap(bitmap, start_gpa, page_size);
            self.extend(&other);
            return;
        }
        self.ranges.reserve(runs);
        let before = self.ranges.len();
        let mut carry = 0u64;
        let mut open = 0u64; // first page of the open run, valid while carry == 1
        for (i, &w) in bitmap.iter().enumerate() {
            let shifted = (w << 1) | carry;
            let mut starts = w & !shifted;
            let mut ends = !w & shifted;
            let base = i as u64 * 64;
            // Starts and ends alternate; an open run (carry) ends before the next start.
            while starts | ends != 0 {
                let s = starts.trailing_zeros();
                let e = ends.trailing_zeros();
                if e < s {
                    self.ranges.push(MemoryRange::new(
                        start_gpa + open * page_size,
                        (base + u64::from(e) - open) * page_size,
                    ));
                    ends &= ends - 1;
                } else {
                    open = base + u64::from(s);
                    starts &= starts - 1;
                }
            }
            carry = w >> 63;
        }
        if carry == 1 {
            let end = bitmap.len() as u64 * 64;
            self.ranges.push(MemoryRange::new(
                start_gpa + open * page_size,
                (end - open) * page_size,
            ));
        }
        // The first new range may touch the last old one.
        if before > 0 {
            let (prev, first) = (self.ranges[before - 1], self.ranges[before]);
            if prev.gpa + prev.length == first.gpa {
                self.ranges[before - 1].length += first.length;
                self.ranges.remove(before);
            }
        }
    }

    /// Removes every range, keeping the allocation (for reuse across dirty-log rounds).
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Adds a range, merging it with the ranges it touches. A range running past the
    /// end of the address space is cut at `u64::MAX` (no memory lives there), so every
    /// range's end is representable and [`chunks`](Self::chunks) cannot wrap around.
    pub fn push(&mut self, range: MemoryRange) {
        let range = MemoryRange::new(range.gpa, range.length.min(u64::MAX - range.gpa));
        if range.length == 0 {
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if last.gpa <= range.gpa => {
                let last_end = last.gpa.saturating_add(last.length);
                if range.gpa <= last_end {
                    let end = last_end.max(range.gpa.saturating_add(range.length));
                    last.length = end - last.gpa;
                } else {
                    self.ranges.push(range);
                }
            }
            None => self.ranges.push(range),
            Some(_) => {
                // Out of order: insert and re-coalesce.
                self.ranges.push(range);
                self.normalize();
            }
        }
    }

    /// Adds every range of `other`.
    pub fn extend(&mut self, other: &MemoryRangeTable) {
        for r in &other.ranges {
            self.push(*r);
        }
    }

    fn normalize(&mut self) {
        self.ranges.sort_unstable();
        let mut out: Vec<MemoryRange> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges.drain(..) {
            match out.last_mut() {
                Some(last) if r.gpa <= last.gpa.saturating_add(last.length) => {
                    let end = last
                        .gpa
                        .saturating_add(last.length)
                        .max(r.gpa.saturating_add(r.length));
                    last.length = end - last.gpa;
                }
                _ => out.push(r),
            }
        }
        self.ranges = out;
    }

    /// The ranges, sorted by address, none adjacent or overlapping.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes covered.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// The ranges cut into pieces of at most `max_len` bytes (for framing).
    pub fn chunks(&self, max_len: u64) -> impl Iterator<Item = MemoryRange> + '_ {
        let max_len = max_len.max(1);
        self.ranges.iter().flat_map(move |r| {
            let mut offset = 0;
            std::iter::from_fn(move || {
                (offset < r.length).then(|| {
                    let len = (r.length - offset).min(max_len);
                    let piece = MemoryRange::new(r.gpa + offset, len);
                    offset += len;
                    piece
                })
            })
        })
    }
}

/// Checks that `range` lies entirely inside one of `regions`.
pub fn check_range(regions: &[MemoryRange], range: MemoryRange) -> Result<(), MemoryError> {
    if regions.iter().any(|r| r.contains(&range)) {
        Ok(())
    } else {
        Err(MemoryError::OutOfRange {
            gpa: range.gpa,
            length: range.length,
        })
    }
}

/// Whether `bytes` are all zero: the test behind zero pages, which the container
/// leaves as holes and a migration sends as ZERO ranges. Checks 64-byte blocks and
/// stops at the first non-zero one, so random data costs a few bytes per page.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// A maximal run of whole pages of a buffer that are all zero, or all not: see
/// [`page_runs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Offset of the run in the buffer.
    pub offset: usize,
    /// Length of the run in bytes.
    pub len: usize,
    /// Whether every page of the run is all zero.
    pub zero: bool,
}

/// Splits `chunk` into maximal runs of [`PAGE_SIZE`] pages that are all zero or not,
/// in order. A partial last page is a page.
pub fn page_runs(chunk: &[u8]) -> impl Iterator<Item = PageRun> + '_ {
    let page = PAGE_SIZE as usize;
    let zero_at = move |at: usize| is_zero(&chunk[at..chunk.len().min(at + page)]);
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= chunk.len() {
            return None;
        }
        let offset = at;
        let zero = zero_at(offset);
        at = chunk.len().min(at + page);
        while at < chunk.len() && zero_at(at) == zero {
            at = chunk.len().min(at + page);
        }
        Some(PageRun {
            offset,
            len: at - offset,
            zero,
        })
    })
}

/// Guest memory that snapshots and migrations read from.
///
/// Implementations must check every range against their layout and return
/// [`MemoryError::OutOfRange`] rather than touch memory outside it.
pub trait MemorySource {
    /// The guest RAM regions, sorted by address, non-overlapping.
    fn regions(&self) -> Vec<MemoryRange>;

    /// Copies guest memory at `gpa` into `buf` (all of it).
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Writes `length` bytes of guest memory at `gpa` to `out`, streamed through a
    /// bounded buffer. Backends that can write straight from guest memory override it.
    fn write_memory_to(
        &self,
        gpa: u64,
        length: u64,
        out: &mut dyn Write,
    ) -> Result<(), MemoryError> {
        check_range(&self.regions(), MemoryRange::new(gpa, length))?;
        bounced(length, |done, buf| {
            self.read_memory(gpa + done, buf)?;
            Ok(out.write_all(buf)?)
        })
    }

    /// The ranges outside of which this memory is known to be all zero, sorted by
    /// address and not overlapping (a snapshot file's data runs), or `None` (the
    /// default): unknown. Writers read only these ranges, so memory that declares
    /// terabytes but stores kilobytes costs kilobytes.
    fn nonzero_ranges(&self) -> Option<Vec<MemoryRange>> {
        None
    }

    /// This source as one several threads may read at once, if it is one.
    ///
    /// Writers that find `Some` read guest memory on a helper thread, so the copy out
    /// of guest memory overlaps their own writes. The default, `None`, keeps every read
    /// on the calling thread; a `Sync` implementation overrides it with `Some(self)`.
    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        None
    }
}

/// Guest memory that restores and migrations write into.
///
/// Implementations must check every range against their layout and return
/// [`MemoryError::OutOfRange`] rather than touch memory outside it.
pub trait MemorySink {
    /// The guest RAM regions, sorted by address, non-overlapping.
    fn regions(&self) -> Vec<MemoryRange>;

    /// Copies `data` into guest memory at `gpa`.
    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError>;

    /// Reads exactly `length` bytes from `input` into guest memory at `gpa`, streamed
    /// through a bounded buffer. The range is checked before any byte is read.
    /// Backends that can read straight into guest memory override it.
    fn read_memory_from(
        &self,
        gpa: u64,
        length: u64,
        input: &mut dyn Read,
    ) -> Result<(), MemoryError> {
        check_range(&self.regions(), MemoryRange::new(gpa, length))?;
        bounced(length, |done, buf| {
            input.read_exact(buf)?;
            self.write_memory(gpa + done, buf)
        })
    }

    /// Reads exactly `length` bytes from the socket `fd` straight into guest memory at
    /// `gpa`, with no copy in user space, and passes the bytes to `landed` piece by
    /// piece **after** they landed (in order, each byte once: the caller checksums
    /// them there and may fail the read, e.g. when its deadline passed). The range is
    /// checked before any byte is read.
    ///
    /// Returns `Ok(false)`, having read nothing, if this sink does not read sockets
    /// directly (the default): the caller then uses
    /// [`read_memory_from`](Self::read_memory_from). An implementation that returns
    /// `Ok(true)` must make sure nothing else writes the range while `landed` looks at
    /// it (the slice it passes is a shared reference over guest memory).
    fn read_memory_from_fd(
        &self,
        gpa: u64,
        length: u64,
        fd: BorrowedFd<'_>,
        landed: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<bool, MemoryError> {
        let _ = (gpa, length, fd, landed);
        Ok(false)
    }

    /// Zero-fills `length` bytes at `gpa` (a zero page received or a hole restored).
    fn zero_memory(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        check_range(&self.regions(), MemoryRange::new(gpa, length))?;
        // The buffer starts zeroed and nothing writes into it.
        bounced(length, |done, zeros| self.write_memory(gpa + done, zeros))
    }

    /// This sink as one several threads may write at once, if it is one.
    ///
    /// A multi-connection migration ([`crate::multi`]) writes each connection's pages
    /// from that connection's own thread, and is offered only for a sink that returns
    /// `Some`. The default, `None`, keeps a migration to one connection; a `Sync`
    /// implementation overrides it with `Some(self)`.
    fn as_sync_sink(&self) -> Option<&(dyn MemorySink + Sync)> {
        None
    }
}

/// Calls `step(offset, buf)` for consecutive pieces of `length` bytes, each at most
/// [`BOUNCE`] bytes, through one zero-initialised buffer: the streaming loop of the
/// default [`MemorySource`] and [`MemorySink`] methods.
fn bounced(
    length: u64,
    mut step: impl FnMut(u64, &mut [u8]) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; usize::try_from(length).map_or(BOUNCE, |l| l.min(BOUNCE))];
    let mut done = 0u64;
    while done < length {
        let n = usize::try_from(length - done).map_or(buf.len(), |r| r.min(buf.len()));
        step(done, &mut buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_split_zero_and_data_pages() {
        let run = |offset, len, zero| PageRun { offset, len, zero };
        let mut chunk = vec![0u8; 4 * 4096 + 100];
        chunk[4096 + 7] = 1;
        chunk[4 * 4096 + 99] = 1;
        assert_eq!(
            page_runs(&chunk).collect::<Vec<_>>(),
            [
                run(0, 4096, true),
                run(4096, 4096, false),
                run(8192, 8192, true),
                run(16384, 100, false)
            ]
        );
        assert_eq!(page_runs(&[]).count(), 0);
        assert_eq!(page_runs(&[0; 10]).collect::<Vec<_>>(), [run(0, 10, true)]);
        assert!(is_zero(&[0; 200]));
        assert!(!is_zero(&[0, 0, 0, 1]));
        let mut late = [0u8; 200];
        late[199] = 1;
        assert!(
            !is_zero(&late),
            "a non-zero byte in the tail after 64-byte blocks"
        );
    }

    fn naive(bitmap: &[u64], start: u64, page: u64) -> Vec<MemoryRange> {
        let mut t = MemoryRangeTable::new();
        for (w, word) in bitmap.iter().enumerate() {
            for b in 0..64 {
                if word >> b & 1 == 1 {
                    t.push(MemoryRange::new(start + (w as u64 * 64 + b) * page, page));
                }
            }
        }
        t.ranges
    }

    #[test]
    fn from_bitmap_leaves_out_pages_past_the_address_space() {
        // Pages 0..=3 at the top of the address space: only the first 3 end in it.
        let start = u64::MAX - 3 * 4096 - 100;
        let t = MemoryRangeTable::from_bitmap(&[0b1111, 1], start, 4096);
        assert_eq!(t.ranges(), &[MemoryRange::new(start, 3 * 4096)]);
        assert!(t.ranges().iter().all(|r| r.end().is_some()));
        // A bitmap word that is partly past the end, and a page size of 0.
        let t = MemoryRangeTable::from_bitmap(&[u64::MAX; 2], u64::MAX - 70 * 4096, 4096);
        assert_eq!(t.total_bytes(), 70 * 4096);
        assert!(MemoryRangeTable::from_bitmap(&[u64::MAX], 0, 0).is_empty());
    }

    #[test]
    fn from_bitmap_matches_bit_by_bit() {
        let cases: &[&[u64]] = &[
            &[],
            &[0],
            &[u64::MAX],
            &[u64::MAX, u64::MAX, 0, 1],
            &[1 << 63, 1, 0x0ff0_00ff_f0f0_0001],
            &[0x8000_0000_0000_0001, u64::MAX, 0x7fff_ffff_ffff_fffe],
        ];
        for bitmap in cases {
            let t = MemoryRangeTable::from_bitmap(bitmap, 0x1000_0000, 4096);
            assert_eq!(t.ranges(), naive(bitmap, 0x1000_0000, 4096), "{bitmap:x?}");
        }
    }

    #[test]
    fn from_bitmap_matches_bit_by_bit_on_pseudo_random_bitmaps() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for density in [1u64, 2, 5, 50, 95, 99] {
            let bitmap: Vec<u64> = (0..40)
                .map(|_| {
                    (0..64).fold(0, |w, b| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        w | (u64::from(x % 100 < density) << b)
                    })
                })
                .collect();
            let t = MemoryRangeTable::from_bitmap(&bitmap, 0x4000, 4096);
            assert_eq!(
                t.ranges(),
                naive(&bitmap, 0x4000, 4096),
                "density {density}"
            );
        }
    }

    #[test]
    fn append_bitmap_joins_adjacent_and_handles_out_of_order() {
        let mut t = MemoryRangeTable::from_bitmap(&[1 << 63], 0, 4096);
        t.append_bitmap(&[0b11], 64 * 4096, 4096); // touches the last range
        assert_eq!(t.ranges(), &[MemoryRange::new(63 * 4096, 3 * 4096)]);
        t.append_bitmap(&[1], 0, 4096); // before the existing ranges
        assert_eq!(
            t.ranges(),
            &[
                MemoryRange::new(0, 4096),
                MemoryRange::new(63 * 4096, 3 * 4096)
            ]
        );
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn push_coalesces_out_of_order_and_overlapping() {
        let mut t = MemoryRangeTable::new();
        t.push(MemoryRange::new(0x5000, 0x1000));
        t.push(MemoryRange::new(0x1000, 0x1000));
        t.push(MemoryRange::new(0x2000, 0x3000));
        t.push(MemoryRange::new(0x9000, 0));
        assert_eq!(t.ranges(), &[MemoryRange::new(0x1000, 0x5000)]);
    }

    #[test]
    fn chunks_cut_ranges() {
        let mut t = MemoryRangeTable::new();
        t.push(MemoryRange::new(0, 0x2800));
        let c: Vec<_> = t.chunks(0x1000).collect();
        assert_eq!(c.len(), 3);
        assert_eq!(c[2], MemoryRange::new(0x2000, 0x800));
    }

    #[test]
    fn check_range_rejects_straddling_and_overflowing_ranges() {
        let regions = [
            MemoryRange::new(0, 0x1000),
            MemoryRange::new(0x1000, 0x1000),
        ];
        assert!(check_range(&regions, MemoryRange::new(0x800, 0x800)).is_ok());
        assert!(check_range(&regions, MemoryRange::new(0x800, 0x1000)).is_err());
        assert!(check_range(&regions, MemoryRange::new(u64::MAX, 2)).is_err());
    }
}
