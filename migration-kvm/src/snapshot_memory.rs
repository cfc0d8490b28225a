//! Guest memory snapshots in the container's file form (`docs/format.md` §6): full,
//! incremental, merged, and restored lazily or eagerly.
//!
//! - **Full**: [`write_full`] writes every region of a [`GuestRam`] as one extent;
//!   all-zero pages are holes (never written, never sent).
//! - **Incremental**: [`write_incremental`] writes only the dirty ranges (from
//!   [`dirty_log`](crate::dirty::dirty_log)), as extents: a page inside an extent
//!   but absent from the data runs is zero *now*; a page outside every extent is
//!   unchanged since the parent. The header's `parent_digest` (HAS_PARENT) holds
//!   the parent's [`content_digest`], computed from its checksums, never from its
//!   name or path.
//! - **Merge**: [`merge_chain`] applies a chain of incrementals onto a full base and
//!   writes one full snapshot; an incremental whose parent digest is not the
//!   previous link's digest is refused before anything is written.
//! - **Restore**: [`restore_lazy_from`] maps the extents `MAP_PRIVATE`;
//!   [`restore_eager_from`] copies the data runs (zero pages are never read).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use migration_core::container::{self, ContainerReader, ReadOptions, WriteOptions, WriteSummary};
use migration_core::memory::check_range;
use migration_core::{
    CodecRegistry, MemoryError, MemoryRange, MemoryRangeTable, MemorySource, MigratableError,
    Snapshot,
};

use crate::bitmap::DirtyBitmap;
use crate::memory::GuestRam;
use crate::restore::{self, EagerOptions, FileExtent, RestoreError};

/// Identifies a snapshot file by its content: 32 bytes, the little-endian
/// concatenation of its header CRC, metadata CRC, run-table CRC and total length.
/// The run table's CRC covers every data run's CRC, so the digest changes with any
/// byte of guest memory, any section and the parent digest (which the header CRC
/// covers), and not with the file's name.
pub type ContentDigest = [u8; 32];

/// Most extents an incremental snapshot uses (the format allows 4096); dirty ranges
/// beyond this are coalesced across their smallest gaps.
pub const MAX_INCREMENTAL_EXTENTS: usize = 4000;

/// Errors of incremental snapshots and merges.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotMemoryError {
    /// An incremental's parent digest is not the digest of the snapshot it is applied to.
    #[error("incremental #{index} is based on {found}, not on {expected}")]
    ParentMismatch {
        /// Position in the chain (0 = first incremental).
        index: usize,
        /// Digest of the snapshot it would be applied to (hex).
        expected: String,
        /// Parent digest it records (hex), or "none" for a full snapshot.
        found: String,
    },
    /// The base of a merge is itself incremental.
    #[error("the base of a merge must be a full snapshot; it records parent {parent}")]
    BaseIsIncremental {
        /// Its parent digest (hex).
        parent: String,
    },
    /// The container is not the file form (digests and merges need the run table).
    #[error("a content digest needs the file form")]
    NotFileForm,
    /// Reading or writing a container failed (format errors included).
    #[error(transparent)]
    Container(#[from] MigratableError),
    /// Restoring memory failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// File I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// Hex form of a digest, for messages.
pub fn digest_hex(d: &ContentDigest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `snapshot` and all of `memory` in the file form to `w` (normally a `File`;
/// zero pages become holes). The caller takes care of atomicity (`migration_core::
/// file::write_snapshot_file` does temp file + rename).
pub fn write_full<W: Write + Seek, B: DirtyBitmap>(
    w: &mut W,
    snapshot: &Snapshot,
    memory: &GuestRam<B>,
    options: &WriteOptions,
) -> Result<WriteSummary, MigratableError> {
    container::write_snapshot(w, snapshot, Some(memory), options)
}

/// Writes an incremental snapshot: `snapshot` plus the `dirty` pages of `memory`,
/// recording `parent` (the [`content_digest`] of the previous snapshot of the
/// chain) in the header.
pub fn write_incremental<W: Write + Seek, B: DirtyBitmap>(
    w: &mut W,
    snapshot: &Snapshot,
    memory: &GuestRam<B>,
    dirty: &MemoryRangeTable,
    parent: ContentDigest,
    options: &WriteOptions,
) -> Result<WriteSummary, MigratableError> {
    let view = DirtyView::new(memory, dirty, MAX_INCREMENTAL_EXTENTS)?;
    let options = WriteOptions {
        parent: Some(parent),
        ..options.clone()
    };
    container::write_snapshot(w, snapshot, Some(&view), &options)
}

/// A [`MemorySource`] that shows only some ranges of a guest memory (its
/// "regions" are the ranges): what an incremental snapshot writes.
#[derive(Debug)]
pub struct DirtyView<'a, B: DirtyBitmap = vm_memory::bitmap::AtomicBitmap> {
    memory: &'a GuestRam<B>,
    ranges: Vec<MemoryRange>,
}

impl<'a, B: DirtyBitmap> DirtyView<'a, B> {
    /// The ranges of `dirty` (checked against `memory`'s layout), coalesced to at most
    /// `max_ranges` ranges across their smallest gaps (pages in a filled gap are
    /// rewritten with their current content, which is harmless). Ranges are split at
    /// region boundaries.
    pub fn new(
        memory: &'a GuestRam<B>,
        dirty: &MemoryRangeTable,
        max_ranges: usize,
    ) -> Result<Self, MemoryError> {
        let mut ranges = Vec::with_capacity(dirty.len());
        for r in dirty.ranges() {
            ranges.extend(split_at_regions(memory.layout(), *r)?);
        }
        Ok(Self {
            memory,
            ranges: coalesce(
                ranges,
                memory.layout(),
                max_ranges.max(memory.layout().len()),
            ),
        })
    }

    /// The ranges shown.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }
}

/// Cuts `r` at the region boundaries of `layout`; every byte must be in some region.
fn split_at_regions(
    layout: &[MemoryRange],
    r: MemoryRange,
) -> Result<Vec<MemoryRange>, MemoryError> {
    let mut out = Vec::new();
    let end = r.end().ok_or(MemoryError::OutOfRange {
        gpa: r.gpa,
        length: r.length,
    })?;
    let mut pos = r.gpa;
    while pos < end {
        let region = layout
            .iter()
            .find(|g| g.gpa <= pos && pos < g.gpa + g.length)
            .ok_or(MemoryError::OutOfRange {
                gpa: pos,
                length: end - pos,
            })?;
        let stop = end.min(region.gpa + region.length);
        out.push(MemoryRange::new(pos, stop - pos));
        pos = stop;
    }
    Ok(out)
}

/// Merges sorted, disjoint `ranges` across the smallest gaps (never across a region
/// boundary) until at most `max` remain.
fn coalesce(ranges: Vec<MemoryRange>, layout: &[MemoryRange], max: usize) -> Vec<MemoryRange> {
    if ranges.len() <= max {
        return ranges;
    }
    let region_of = |gpa: u64| {
        layout
            .iter()
            .position(|g| g.gpa <= gpa && gpa < g.gpa + g.length)
    };
    // Gaps that may be filled, smallest first; fill the smallest until few enough.
    let mut gaps: Vec<(u64, usize)> = ranges
        .windows(2)
        .enumerate()
        .filter(|(_, w)| region_of(w[0].gpa) == region_of(w[1].gpa))
        .map(|(i, w)| (w[1].gpa - (w[0].gpa + w[0].length), i))
        .collect();
    gaps.sort_unstable();
    let excess = ranges.len() - max;
    let mut fill = vec![false; ranges.len()];
    for &(_, i) in gaps.iter().take(excess) {
        fill[i] = true;
    }
    let mut out: Vec<MemoryRange> = Vec::with_capacity(max);
    for (i, r) in ranges.iter().enumerate() {
        match out.last_mut() {
            Some(last) if i > 0 && fill[i - 1] => last.length = r.gpa + r.length - last.gpa,
            _ => out.push(*r),
        }
    }
    out
}

impl<B: DirtyBitmap> MemorySource for DirtyView<'_, B> {
    fn regions(&self) -> Vec<MemoryRange> {
        self.ranges.clone()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(&self.ranges, MemoryRange::new(gpa, buf.len() as u64))?;
        self.memory.read_memory(gpa, buf)
    }

    fn write_memory_to(
        &self,
        gpa: u64,
        length: u64,
        out: &mut dyn Write,
    ) -> Result<(), MemoryError> {
        check_range(&self.ranges, MemoryRange::new(gpa, length))?;
        self.memory.write_memory_to(gpa, length, out)
    }

    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        Some(self)
    }
}

/// The [`ContentDigest`] of a file-form container (validated on the way: header,
/// metadata and run table checksums).
pub fn content_digest<R: Read + Seek>(r: R) -> Result<ContentDigest, SnapshotMemoryError> {
    let reader = ContainerReader::open(r)?;
    let header = reader.header().clone();
    if header.run_table_length < 8 || header.total_length < 8 {
        return Err(SnapshotMemoryError::NotFileForm);
    }
    let mut r = reader.into_inner();
    let mut read_u64_at = |off: u64| -> io::Result<[u8; 8]> {
        let mut b = [0u8; 8];
        r.seek(SeekFrom::Start(off))?;
        r.read_exact(&mut b)?;
        Ok(b)
    };
    let header_crc = read_u64_at(184)?;
    let metadata_crc = read_u64_at(header.payload_offset() - 8)?;
    let table_crc = read_u64_at(header.total_length - 8)?;
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&header_crc);
    d[8..16].copy_from_slice(&metadata_crc);
    d[16..24].copy_from_slice(&table_crc);
    d[24..].copy_from_slice(&header.total_length.to_le_bytes());
    Ok(d)
}

/// Applies the incrementals `chain` (oldest first) onto the full snapshot `base` and
/// writes the result, a full snapshot with the last link's tree, to `out`.
///
/// Every link is verified and checked before anything is written to `out`: link `i`
/// must record the digest of link `i - 1` (of `base` for the first) as its parent,
/// else [`SnapshotMemoryError::ParentMismatch`]. Extents outside the base's memory
/// are a typed error. Memory is streamed: each page is read from the newest link
/// whose extents cover it (the base otherwise), and only the ranges some link stores
/// data for are read at all, so the cost and the RAM used follow the bytes the files
/// store, not the guest memory they declare.
///
/// `options` decides the header; a caller keeping the base's architecture passes
/// `WriteOptions { arch: base_arch, .. }` (`vmsnap merge` does).
pub fn merge_chain<W: Write + Seek>(
    base: &mut File,
    chain: &mut [File],
    out: &mut W,
    options: &WriteOptions,
) -> Result<WriteSummary, SnapshotMemoryError> {
    // 1. Verify every file and check the chain of digests.
    let base_reader = open_full(base)?;
    let layout: Vec<MemoryRange> = base_reader
        .extents()
        .iter()
        .map(|e| MemoryRange::new(e.gpa, e.length))
        .collect();
    drop(base_reader);
    base.seek(SeekFrom::Start(0))?;
    container::verify(&mut *base)?;
    base.seek(SeekFrom::Start(0))?;
    let mut expected = content_digest(&mut *base)?;
    for (index, link) in chain.iter_mut().enumerate() {
        link.seek(SeekFrom::Start(0))?;
        let reader = ContainerReader::open(&mut *link)?;
        let found = reader.header().parent;
        if found != Some(expected) {
            return Err(SnapshotMemoryError::ParentMismatch {
                index,
                expected: digest_hex(&expected),
                found: found.map_or_else(|| "none".into(), |p| digest_hex(&p)),
            });
        }
        let ranges = reader
            .extents()
            .iter()
            .map(|e| MemoryRange::new(e.gpa, e.length));
        crate::memory::check_extents(&layout, ranges).map_err(MigratableError::Memory)?;
        drop(reader);
        link.seek(SeekFrom::Start(0))?;
        container::verify(&mut *link)?;
        link.seek(SeekFrom::Start(0))?;
        expected = content_digest(&mut *link)?;
    }

    // 2. The last link's tree; memory layered newest first.
    let codecs = CodecRegistry::new();
    let mut layers = Vec::new();
    let mut tree = None;
    for file in chain.iter_mut().rev().chain(std::iter::once(base)) {
        file.seek(SeekFrom::Start(0))?;
        let mut reader = ContainerReader::open(&mut *file)?;
        if tree.is_none() {
            tree = Some(reader.read_snapshot(&codecs, None, &ReadOptions::default())?);
        }
        let extents = reader.extents().to_vec();
        let stored = reader.stored_ranges();
        drop(reader);
        layers.push(Layer {
            file: &*file,
            extents,
            stored,
        });
    }
    let memory = ChainMemory::new(layout, layers);
    let tree = tree.unwrap_or_else(|| Snapshot::new(""));

    // 3. Write the merged full snapshot.
    let options = WriteOptions {
        parent: None,
        ..options.clone()
    };
    Ok(container::write_snapshot(
        out,
        &tree,
        Some(&memory),
        &options,
    )?)
}

/// One snapshot file of a merge chain: its extents and the ranges it stores.
struct Layer<'f> {
    file: &'f File,
    extents: Vec<container::Extent>,
    stored: Vec<MemoryRange>,
}

/// The memory of a merge chain: a page comes from the newest layer whose extents
/// cover it; only the union of the stored ranges may be non-zero.
struct ChainMemory<'f> {
    layout: Vec<MemoryRange>,
    /// Newest first; the base last.
    layers: Vec<Layer<'f>>,
    nonzero: Vec<MemoryRange>,
}

impl<'f> ChainMemory<'f> {
    fn new(layout: Vec<MemoryRange>, layers: Vec<Layer<'f>>) -> Self {
        let mut all: Vec<MemoryRange> = layers
            .iter()
            .flat_map(|l| l.stored.iter().copied())
            .collect();
        all.sort_by_key(|r| r.gpa);
        let mut nonzero: Vec<MemoryRange> = Vec::with_capacity(all.len());
        for r in all {
            match nonzero.last_mut() {
                Some(last) if r.gpa <= last.gpa + last.length => {
                    let end = (r.gpa + r.length).max(last.gpa + last.length);
                    last.length = end - last.gpa;
                }
                _ => nonzero.push(r),
            }
        }
        Self {
            layout,
            layers,
            nonzero,
        }
    }

    fn fill(&self, layer: usize, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(l) = self.layers.get(layer) else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let left = (buf.len() - done) as u64;
            let i = l.extents.partition_point(|e| e.gpa + e.length <= at);
            match l.extents.get(i) {
                Some(e) if e.gpa <= at => {
                    let n = left.min(e.gpa + e.length - at) as usize;
                    l.file
                        .read_exact_at(&mut buf[done..done + n], e.file_offset + (at - e.gpa))?;
                    done += n;
                }
                next => {
                    let stop = next.map_or(u64::MAX, |e| e.gpa);
                    let n = left.min(stop - at) as usize;
                    self.fill(layer + 1, at, &mut buf[done..done + n])?;
                    done += n;
                }
            }
        }
        Ok(())
    }
}

impl MemorySource for ChainMemory<'_> {
    fn regions(&self) -> Vec<MemoryRange> {
        self.layout.clone()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(&self.layout, MemoryRange::new(gpa, buf.len() as u64))?;
        Ok(self.fill(0, gpa, buf)?)
    }

    fn nonzero_ranges(&self) -> Option<Vec<MemoryRange>> {
        Some(self.nonzero.clone())
    }

    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        Some(self)
    }
}

/// The extents of a file-form container as [`FileExtent`]s (whole extents, holes
/// included: what a lazy restore maps).
pub fn file_extents<R: Read + Seek>(reader: &ContainerReader<R>) -> Vec<FileExtent> {
    reader
        .extents()
        .iter()
        .map(|e| FileExtent {
            gpa: e.gpa,
            length: e.length,
            file_offset: e.file_offset,
        })
        .collect()
}

/// The data runs of a file-form container as [`FileExtent`]s (only non-zero bytes:
/// what an eager restore into fresh memory copies).
pub fn data_runs<R: Read + Seek>(reader: &ContainerReader<R>) -> Option<Vec<FileExtent>> {
    reader.runs().map(|runs| {
        runs.iter()
            .map(|r| FileExtent {
                gpa: r.gpa,
                length: r.length,
                file_offset: r.file_offset,
            })
            .collect()
    })
}

/// Opens `file` from its start as a full snapshot: an incremental one (it has a parent)
/// is [`SnapshotMemoryError::BaseIsIncremental`].
fn open_full(file: &mut File) -> Result<ContainerReader<&mut File>, SnapshotMemoryError> {
    file.seek(SeekFrom::Start(0))?;
    let reader = ContainerReader::open(file)?;
    if let Some(p) = reader.header().parent {
        return Err(SnapshotMemoryError::BaseIsIncremental {
            parent: digest_hex(&p),
        });
    }
    Ok(reader)
}

/// Lazy restore of a full file-form snapshot: reads its tree (checksums verified)
/// and maps its memory extents `MAP_PRIVATE` as guest memory for `layout`.
///
/// Memory checksums are not verified (that would read every page and defeat the
/// laziness): run [`container::verify`] first on an untrusted file.
pub fn restore_lazy_from(
    file: &mut File,
    layout: &[MemoryRange],
    codecs: &CodecRegistry,
) -> Result<(Snapshot, GuestRam), SnapshotMemoryError> {
    let mut reader = open_full(file)?;
    let extents = file_extents(&reader);
    let tree = reader.read_snapshot(codecs, None, &ReadOptions::default())?;
    drop(reader);
    let memory = restore::restore_lazy(file, layout, &extents)?;
    Ok((tree, memory))
}

/// Eager restore of a full file-form snapshot into fresh memory for `layout`: the
/// data runs are copied with `pread` (zero pages are never read or touched).
pub fn restore_eager_from(
    file: &mut File,
    layout: &[MemoryRange],
    codecs: &CodecRegistry,
    options: EagerOptions,
) -> Result<(Snapshot, GuestRam), SnapshotMemoryError> {
    let mut reader = open_full(file)?;
    // Whole extents must fit the layout too, not only their runs.
    crate::memory::check_extents(layout, file_extents(&reader).iter().map(FileExtent::range))
        .map_err(RestoreError::Extent)?;
    let runs = data_runs(&reader).ok_or(SnapshotMemoryError::NotFileForm)?;
    let tree = reader.read_snapshot(codecs, None, &ReadOptions::default())?;
    drop(reader);
    let memory = restore::restore_eager_runs(file, layout, &runs, options)?;
    Ok((tree, memory))
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::memory::MemorySink;

    const MIB: u64 = 1 << 20;

    fn layout() -> Vec<MemoryRange> {
        vec![
            MemoryRange::new(0, 4 * MIB),
            MemoryRange::new(8 * MIB, 2 * MIB),
        ]
    }

    fn tree(tag: u8) -> Snapshot {
        let mut s = Snapshot::new("vm");
        s.add_section(
            "tag",
            migration_core::Section::from_encoded(
                1,
                migration_core::CodecId::new(b"raw0"),
                vec![tag],
            ),
        );
        s
    }

    fn digest_of(f: &mut File) -> ContentDigest {
        f.seek(SeekFrom::Start(0)).unwrap();
        content_digest(&mut *f).unwrap()
    }

    fn all(m: &GuestRam) -> Vec<u8> {
        let mut v = Vec::new();
        for r in m.layout() {
            m.write_memory_to(r.gpa, r.length, &mut v).unwrap();
        }
        v
    }

    #[test]
    fn incremental_chain_merges_to_the_full_snapshot() {
        let mem = GuestRam::anonymous(&layout()).unwrap();
        mem.write_memory(0x1000, &[1; 0x3000]).unwrap();
        mem.write_memory(9 * MIB, &[2; 0x1000]).unwrap();
        let mut base = tempfile::tempfile().unwrap();
        write_full(&mut base, &tree(0), &mem, &WriteOptions::default()).unwrap();
        crate::dirty::clear_vmm_dirty(&mem);
        let mut parent = digest_of(&mut base);
        let mut chain = Vec::new();
        for step in 1..=3u8 {
            mem.write_memory(0x2000 * u64::from(step), &[step + 10; 0x1800])
                .unwrap();
            mem.zero_memory(9 * MIB, 0x1000).unwrap(); // dirty, now zero
            mem.write_memory(8 * MIB + 0x5000 * u64::from(step), &[step; 8])
                .unwrap();
            let dirty = crate::dirty::vmm_dirty_log(&mem);
            let mut f = tempfile::tempfile().unwrap();
            write_incremental(
                &mut f,
                &tree(step),
                &mem,
                &dirty,
                parent,
                &WriteOptions::default(),
            )
            .unwrap();
            parent = digest_of(&mut f);
            chain.push(f);
        }
        let mut merged = tempfile::tempfile().unwrap();
        merge_chain(&mut base, &mut chain, &mut merged, &WriteOptions::default()).unwrap();
        let (t, back) = restore_eager_from(
            &mut merged,
            &layout(),
            &CodecRegistry::new(),
            EagerOptions::default(),
        )
        .unwrap();
        assert_eq!(all(&back), all(&mem));
        assert_eq!(t.section("tag").unwrap().payload(), Some(&[3u8][..]));

        // A link with another parent is refused, before anything is written.
        let mut out = tempfile::tempfile().unwrap();
        chain.swap(0, 1);
        let e = merge_chain(&mut base, &mut chain, &mut out, &WriteOptions::default());
        assert!(
            matches!(e, Err(SnapshotMemoryError::ParentMismatch { index: 0, .. })),
            "{e:?}"
        );
        assert_eq!(out.metadata().unwrap().len(), 0);
    }

    #[test]
    fn coalesce_fills_the_smallest_gaps_within_regions() {
        let l = vec![
            MemoryRange::new(0, 0x10000),
            MemoryRange::new(0x10000, 0x10000),
        ];
        let r = vec![
            MemoryRange::new(0, 0x1000),
            MemoryRange::new(0x2000, 0x1000),  // gap 0x1000
            MemoryRange::new(0x8000, 0x1000),  // gap 0x5000
            MemoryRange::new(0xf000, 0x1000),  // gap 0x6000
            MemoryRange::new(0x10000, 0x1000), // region boundary: never filled
        ];
        let c = coalesce(r, &l, 3);
        assert_eq!(
            c,
            vec![
                MemoryRange::new(0, 0x9000),
                MemoryRange::new(0xf000, 0x1000),
                MemoryRange::new(0x10000, 0x1000)
            ]
        );
    }
}
