//! Restoring guest memory from a snapshot file: lazily by mapping the file, or
//! eagerly by copying it.
//!
//! Both take the file's extents as [`FileExtent`]s (guest range and where its bytes
//! sit in the file) and check every extent against the guest layout, against each
//! other, against page alignment and against the file's length before a byte is
//! mapped or written. Guest memory not covered by an extent reads as zeros.
//!
//! - [`restore_lazy`] maps each extent `MAP_PRIVATE` over fresh anonymous memory:
//!   nothing is read until the guest touches it, so restore time depends on the
//!   number of extents, not on memory size, and guest writes go to private copies:
//!   the file is never modified.
//! - [`restore_eager`] copies the extents into fresh memory with `pread(2)`, skipping
//!   the file's holes (`SEEK_DATA`/`SEEK_HOLE`), on several threads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use migration_core::memory::PAGE_SIZE;
use migration_core::{MemoryError, MemoryRange, MemorySink};
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::bitmap::DirtyBitmap;
use crate::memory::{
    check_extents, check_layout, map_region, mmap_error, GuestRam, KvmMemoryError, MemoryOptions,
};

/// Where the bytes of one guest range sit in a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileExtent {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
    /// Offset of the first byte in the file.
    pub file_offset: u64,
}

impl FileExtent {
    /// The guest range this extent fills.
    pub fn range(&self) -> MemoryRange {
        MemoryRange::new(self.gpa, self.length)
    }
}

/// Errors of restoring memory from a snapshot file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// An extent lies outside guest RAM, or two extents overlap.
    #[error("extent rejected: {0}")]
    Extent(#[from] MemoryError),
    /// An extent's address, length or file offset is not page-aligned.
    #[error("extent [{gpa:#x}, +{length:#x}) at file offset {file_offset:#x} is not page-aligned")]
    Unaligned {
        /// Guest address.
        gpa: u64,
        /// Length.
        length: u64,
        /// File offset.
        file_offset: u64,
    },
    /// The file ends before an extent does (mapping it would SIGBUS).
    #[error("file is {file_len:#x} bytes, extent needs it to reach {needed:#x}")]
    FileTooShort {
        /// Bytes the extent needs the file to have.
        needed: u64,
        /// Bytes it has.
        file_len: u64,
    },
    /// Creating or mapping guest memory failed, or the layout is invalid.
    #[error(transparent)]
    Memory(#[from] KvmMemoryError),
    /// Reading the file failed.
    #[error("reading the snapshot file: {0}")]
    Io(#[from] io::Error),
}

/// Checks `extents` against `layout`, page alignment and the file's length.
pub fn check_file_extents(
    layout: &[MemoryRange],
    extents: &[FileExtent],
    file_len: u64,
) -> Result<(), RestoreError> {
    check_layout(layout)?;
    for e in extents {
        if e.gpa % PAGE_SIZE != 0 || e.length % PAGE_SIZE != 0 || e.file_offset % PAGE_SIZE != 0 {
            return Err(RestoreError::Unaligned {
                gpa: e.gpa,
                length: e.length,
                file_offset: e.file_offset,
            });
        }
        let needed = e
            .file_offset
            .checked_add(e.length)
            .ok_or(RestoreError::FileTooShort {
                needed: u64::MAX,
                file_len,
            })?;
        if needed > file_len {
            return Err(RestoreError::FileTooShort { needed, file_len });
        }
    }
    check_extents(layout, extents.iter().map(FileExtent::range))?;
    Ok(())
}

/// Lazy restore: guest memory for `layout` whose extents are the file's pages,
/// mapped `MAP_PRIVATE` (copy on write: the file is never modified), the rest fresh
/// zeroed memory. Costs a few system calls per extent, whatever the memory size.
///
/// The file must not be truncated while the memory lives (pages past its end would
/// raise SIGBUS); its length is checked here.
pub fn restore_lazy(
    file: &File,
    layout: &[MemoryRange],
    extents: &[FileExtent],
) -> Result<GuestRam, RestoreError> {
    let file_len = file.metadata()?.len();
    check_file_extents(layout, extents, file_len)?;
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        // Huge pages would make the first write to a hole allocate 2 MiB; harmless,
        // but the file-backed parts are 4 KiB anyway, so keep it uniform.
        let options = MemoryOptions {
            huge_pages: false,
            populate: false,
        };
        let region = map_region(r.length, options)?;
        let base = region.as_ptr() as usize;
        for e in extents.iter().filter(|e| r.contains(&e.range())) {
            let addr = base + (e.gpa - r.gpa) as usize;
            // SAFETY: [addr, addr + length) lies inside `region`'s mapping (the extent
            // is inside `r`, checked above), which `region` owns and unmaps as a whole
            // on drop; MAP_FIXED replaces only those pages. The file range exists
            // (checked against its length) and MAP_PRIVATE never writes to it.
            let ret = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    e.length as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    e.file_offset as libc::off_t,
                )
            };
            if ret == libc::MAP_FAILED {
                return Err(mmap_error(e.length, io::Error::last_os_error()).into());
            }
        }
        regions.push(GuestRegionMmap::new(region, GuestAddress(r.gpa)).ok_or(
            KvmMemoryError::InvalidLayout {
                gpa: r.gpa,
                length: r.length,
                reason: "end overflows",
            },
        )?);
    }
    Ok(GuestRam::from_regions(regions)?)
}

/// How [`restore_eager`] copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EagerOptions {
    /// How the fresh memory is mapped.
    pub memory: MemoryOptions,
    /// Copy threads (1 = the calling thread only).
    pub threads: usize,
}

impl Default for EagerOptions {
    /// The winner measured here (`docs/memory.md`): huge pages, no populate,
    /// two threads.
    fn default() -> Self {
        Self {
            memory: MemoryOptions {
                huge_pages: true,
                populate: false,
            },
            threads: 2,
        }
    }
}

/// Eager restore: fresh memory for `layout`, filled from the file's extents.
pub fn restore_eager(
    file: &File,
    layout: &[MemoryRange],
    extents: &[FileExtent],
    options: EagerOptions,
) -> Result<GuestRam, RestoreError> {
    let file_len = file.metadata()?.len();
    check_file_extents(layout, extents, file_len)?;
    let memory = GuestRam::anonymous_with(layout, options.memory)?;
    copy_extents(&memory, file, extents, options.threads, false, true)?;
    Ok(memory)
}

/// Eager restore from data runs: like [`restore_eager`], but `runs` list exactly the
/// non-zero bytes (a container's run table), so holes are not searched for.
pub fn restore_eager_runs(
    file: &File,
    layout: &[MemoryRange],
    runs: &[FileExtent],
    options: EagerOptions,
) -> Result<GuestRam, RestoreError> {
    let file_len = file.metadata()?.len();
    check_file_extents(layout, runs, file_len)?;
    let memory = GuestRam::anonymous_with(layout, options.memory)?;
    copy_extents(&memory, file, runs, options.threads, false, false)?;
    Ok(memory)
}

/// Eager restore into existing memory: every extent's bytes are copied in and the
/// file's holes inside extents are zeroed. Memory outside the extents is left alone.
pub fn restore_eager_into<B: DirtyBitmap>(
    memory: &GuestRam<B>,
    file: &File,
    extents: &[FileExtent],
    threads: usize,
) -> Result<(), RestoreError> {
    let file_len = file.metadata()?.len();
    check_file_extents(memory.layout(), extents, file_len)?;
    copy_extents(memory, file, extents, threads, true, true)
}

/// Largest piece one `pread` call copies (bounds the work unit for threads).
const PIECE: u64 = 8 << 20;

/// One unit of copy work: `length` bytes from `file_offset` to host address `host`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    host: usize,
    file_offset: u64,
    length: u64,
}

fn copy_extents<B: DirtyBitmap>(
    memory: &GuestRam<B>,
    file: &File,
    extents: &[FileExtent],
    threads: usize,
    zero_holes: bool,
    seek_holes: bool,
) -> Result<(), RestoreError> {
    let mut pieces = Vec::new();
    for e in extents {
        let base = memory.host_ptr(e.range())? as usize;
        let mut covered = 0u64;
        let segments = if seek_holes {
            data_segments(file, e.file_offset, e.length)?
        } else {
            vec![(e.file_offset, e.length)]
        };
        for (off, len) in segments {
            let rel = off - e.file_offset;
            if zero_holes && rel > covered {
                memory.zero_memory(e.gpa + covered, rel - covered)?;
            }
            let mut done = 0;
            while done < len {
                let n = (len - done).min(PIECE);
                pieces.push(Piece {
                    host: base + (rel + done) as usize,
                    file_offset: off + done,
                    length: n,
                });
                done += n;
            }
            covered = rel + len;
        }
        if zero_holes && covered < e.length {
            memory.zero_memory(e.gpa + covered, e.length - covered)?;
        }
    }
    let threads = threads.clamp(1, 64).min(pieces.len().max(1));
    if threads == 1 {
        return pieces.iter().try_for_each(|p| pread_piece(file, p));
    }
    // Interleave pieces so every thread streams through the file.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let pieces = &pieces;
                scope.spawn(move || {
                    pieces
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .try_for_each(|p| pread_piece(file, p))
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(RestoreError::Io(io::Error::other("copy thread panicked"))))
        })
    })
}

/// Copies one piece with `pread`, retrying short reads; a premature end of file is
/// an error (the length was checked, so the file shrank).
fn pread_piece(file: &File, p: &Piece) -> Result<(), RestoreError> {
    let mut done = 0u64;
    while done < p.length {
        let left = (p.length - done) as usize;
        // SAFETY: `host .. host + length` is guest memory inside one region, checked
        // by `host_ptr` in `copy_extents`, and the memory outlives this call; the
        // kernel writes at most `left` bytes there.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                (p.host + done as usize) as *mut libc::c_void,
                left,
                (p.file_offset + done) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        done += n as u64;
    }
    Ok(())
}

/// The data (non-hole) segments of `[offset, offset + length)` in `file`, as
/// `(offset, length)`, found with `SEEK_DATA`/`SEEK_HOLE`. A file system without
/// hole support reports one segment.
pub fn data_segments(file: &File, offset: u64, length: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = offset.saturating_add(length);
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        // SAFETY: lseek on an fd we borrow; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole up to the end of the file
                Some(libc::EINVAL) => {
                    out.push((pos, end - pos)); // no SEEK_DATA support
                    break;
                }
                _ => return Err(e),
            }
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        // Holes are page-granular on every Linux file system; align anyway so every
        // piece stays page-aligned.
        let start = data & !(PAGE_SIZE - 1);
        let stop = (hole as u64).min(end).next_multiple_of(PAGE_SIZE).min(end);
        out.push((start.max(pos), stop - start.max(pos)));
        pos = stop;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::MemorySource;
    use std::io::{Seek, SeekFrom, Write};

    const MIB: u64 = 1 << 20;

    fn layout() -> Vec<MemoryRange> {
        vec![MemoryRange::new(0, 2 * MIB), MemoryRange::new(4 * MIB, MIB)]
    }

    /// A file: page 0 of zeros (header stand-in), then 3 pages of data at offset
    /// 0x1000, a hole, 1 page of data at offset 0x10000.
    fn file() -> (File, Vec<FileExtent>) {
        let mut f = tempfile::tempfile().unwrap();
        f.seek(SeekFrom::Start(0x1000)).unwrap();
        f.write_all(&[0xab; 0x3000]).unwrap();
        f.seek(SeekFrom::Start(0x10000)).unwrap();
        f.write_all(&[0xcd; 0x1000]).unwrap();
        let extents = vec![
            FileExtent {
                gpa: 0x5000,
                length: 0x3000,
                file_offset: 0x1000,
            },
            FileExtent {
                gpa: 4 * MIB,
                length: 0xc000,
                file_offset: 0x5000, // 0x5000..0x10000 hole, then 0xcd
            },
        ];
        (f, extents)
    }

    fn check(mem: &GuestRam) {
        let mut b = vec![0u8; 0x4000];
        mem.read_memory(0x4000, &mut b).unwrap();
        assert!(b[..0x1000].iter().all(|&x| x == 0));
        assert!(b[0x1000..].iter().all(|&x| x == 0xab));
        let mut b = vec![0u8; 0xc000];
        mem.read_memory(4 * MIB, &mut b).unwrap();
        assert!(b[..0xb000].iter().all(|&x| x == 0));
        assert!(b[0xb000..].iter().all(|&x| x == 0xcd));
    }

    #[test]
    fn lazy_restore_maps_extents_and_never_writes_the_file() {
        let (f, extents) = file();
        let mem = restore_lazy(&f, &layout(), &extents).unwrap();
        check(&mem);
        mem.write_memory(0x5000, &[1; 0x100]).unwrap();
        let mut b = [0u8; 1];
        mem.read_memory(0x5000, &mut b).unwrap();
        assert_eq!(b[0], 1);
        let mut back = [0u8; 0x100];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut back, 0x1000).unwrap();
        assert!(back.iter().all(|&x| x == 0xab));
    }

    #[test]
    fn eager_restore_fresh_and_into_existing() {
        let (f, extents) = file();
        for threads in [1, 2] {
            let opts = EagerOptions {
                threads,
                ..EagerOptions::default()
            };
            check(&restore_eager(&f, &layout(), &extents, opts).unwrap());
        }
        let mem = GuestRam::anonymous(&layout()).unwrap();
        mem.write_memory(4 * MIB, &[9; 0x1000]).unwrap(); // in a file hole: zeroed
        restore_eager_into(&mem, &f, &extents, 2).unwrap();
        check(&mem);
    }

    #[test]
    fn bad_extents_are_typed_errors_before_any_write() {
        let (f, _) = file();
        let ext = |gpa, length, file_offset| FileExtent {
            gpa,
            length,
            file_offset,
        };
        let mem = GuestRam::anonymous(&layout()).unwrap();
        mem.write_memory(0, &[5; 16]).unwrap();
        // Outside RAM (in the gap between the regions).
        let e = restore_eager_into(
            &mem,
            &f,
            &[ext(0, 0x1000, 0x1000), ext(2 * MIB, 0x1000, 0)],
            1,
        );
        assert!(
            matches!(e, Err(RestoreError::Extent(MemoryError::OutOfRange { .. }))),
            "{e:?}"
        );
        // Overlapping.
        let e = restore_lazy(&f, &layout(), &[ext(0, 0x2000, 0), ext(0x1000, 0x1000, 0)]);
        assert!(
            matches!(
                e,
                Err(RestoreError::Extent(MemoryError::Overlap { gpa: 0x1000 }))
            ),
            "{e:?}"
        );
        // Past the end of the file.
        let e = restore_lazy(&f, &layout(), &[ext(0, 0x2000, 0x10000)]);
        assert!(
            matches!(
                e,
                Err(RestoreError::FileTooShort {
                    needed: 0x12000,
                    file_len: 0x11000
                })
            ),
            "{e:?}"
        );
        // Unaligned.
        let e = restore_lazy(&f, &layout(), &[ext(0x800, 0x1000, 0)]);
        assert!(matches!(e, Err(RestoreError::Unaligned { .. })), "{e:?}");
        // Nothing was written by the rejected restores.
        let mut b = [0u8; 16];
        mem.read_memory(0, &mut b).unwrap();
        assert_eq!(b, [5; 16]);
    }

    #[test]
    fn data_segments_skip_holes() {
        let (f, _) = file();
        let segs = data_segments(&f, 0, 0x11000).unwrap();
        // tmpfs/ext4/xfs all report the hole; a file system without holes reports one
        // segment, which is also correct.
        assert!(
            segs == vec![(0x1000, 0x3000), (0x10000, 0x1000)]
                || segs == vec![(0, 0x4000), (0x10000, 0x1000)]
                || segs == vec![(0, 0x11000)],
            "{segs:x?}"
        );
    }
}
