//! [`StoredMemory`]: the guest memory of a container, read from it on demand, so
//! tools (convert, diff, merge) handle snapshots of any size page run by page run,
//! never holding the memory whole.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

use super::reader::ContainerReader;
use crate::memory::{check_range, MemoryError, MemoryRange, MemorySource};

/// A container's guest memory as a [`MemorySource`] that reads the container when
/// asked: file form through the extents (holes read as zero), stream form through the
/// DATA records (bytes outside them are zero). Its
/// [`nonzero_ranges`](MemorySource::nonzero_ranges) are the stored runs, so a writer
/// copying it reads only the bytes the container stores.
///
/// Run [`ContainerReader::verify`] first: this reads bytes, it does not check them.
#[derive(Debug)]
pub struct StoredMemory<R> {
    reader: Mutex<ContainerReader<R>>,
    regions: Vec<MemoryRange>,
    stored: Vec<MemoryRange>,
}

impl<R: Read + Seek> StoredMemory<R> {
    /// The memory of the container `reader` opened.
    pub fn new(reader: ContainerReader<R>) -> Self {
        let regions = reader
            .extents()
            .iter()
            .map(|e| MemoryRange::new(e.gpa, e.length))
            .collect();
        let stored = reader.stored_ranges();
        Self {
            reader: Mutex::new(reader),
            regions,
            stored,
        }
    }

    /// The ranges the container stores bytes for, in address order.
    pub fn stored(&self) -> &[MemoryRange] {
        &self.stored
    }

    /// The reader back.
    pub fn into_inner(self) -> ContainerReader<R> {
        self.reader
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<R: Read + Seek + Send> MemorySource for StoredMemory<R> {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(&self.regions, MemoryRange::new(gpa, buf.len() as u64))?;
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let base = reader.base();
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let left = buf.len() - done;
            match reader.locate(at) {
                Some((offset, n)) => {
                    let n = left.min(usize::try_from(n).unwrap_or(usize::MAX));
                    let r = reader.get_mut();
                    r.seek(SeekFrom::Start(base + offset))?;
                    r.read_exact(&mut buf[done..done + n])?;
                    done += n;
                }
                None => {
                    // Zero up to the next stored byte.
                    let next = self.stored.partition_point(|r| r.gpa <= at);
                    let stop = self
                        .stored
                        .get(next)
                        .map_or(u64::MAX, |r| r.gpa)
                        .saturating_sub(at);
                    let n = left.min(usize::try_from(stop).unwrap_or(usize::MAX));
                    buf[done..done + n].fill(0);
                    done += n;
                }
            }
        }
        Ok(())
    }

    fn nonzero_ranges(&self) -> Option<Vec<MemoryRange>> {
        Some(self.stored.clone())
    }

    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        Some(self)
    }
}
