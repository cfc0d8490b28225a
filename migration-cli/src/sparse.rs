//! [`SparseMemory`]: guest memory held page by page, for reading a snapshot's memory
//! without a VM (diff, convert). Zero pages take no RAM.

use std::collections::BTreeMap;
use std::sync::Mutex;

use migration_core::memory::{check_range, PAGE_SIZE};
use migration_core::{MemoryError, MemoryRange, MemorySink, MemorySource};

const PAGE: usize = PAGE_SIZE as usize;

/// Sparse guest memory: a map from page address to page bytes; absent pages are zero.
#[derive(Debug)]
pub struct SparseMemory {
    regions: Vec<MemoryRange>,
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl SparseMemory {
    /// Empty (all-zero) memory with `regions`.
    pub fn new(regions: Vec<MemoryRange>) -> Self {
        Self {
            regions,
            pages: Mutex::new(BTreeMap::new()),
        }
    }

    /// The non-zero pages.
    pub fn pages(&self) -> BTreeMap<u64, Box<[u8]>> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.pages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl MemorySource for SparseMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(&self.regions, MemoryRange::new(gpa, buf.len() as u64))?;
        buf.fill(0);
        let end = gpa + buf.len() as u64;
        let pages = self.lock();
        for (&p, data) in pages.range(gpa / PAGE_SIZE * PAGE_SIZE..end) {
            let lo = p.max(gpa);
            let hi = (p + PAGE_SIZE).min(end);
            buf[(lo - gpa) as usize..(hi - gpa) as usize]
                .copy_from_slice(&data[(lo - p) as usize..(hi - p) as usize]);
        }
        Ok(())
    }
}

impl MemorySink for SparseMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }

    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        check_range(&self.regions, MemoryRange::new(gpa, data.len() as u64))?;
        let end = gpa + data.len() as u64;
        let mut pages = self.lock();
        let mut at = gpa;
        while at < end {
            let p = at / PAGE_SIZE * PAGE_SIZE;
            let hi = (p + PAGE_SIZE).min(end);
            let src = &data[(at - gpa) as usize..(hi - gpa) as usize];
            let zero = src.iter().all(|&b| b == 0);
            match pages.get_mut(&p) {
                Some(page) => {
                    page[(at - p) as usize..(hi - p) as usize].copy_from_slice(src);
                    if zero && page.iter().all(|&b| b == 0) {
                        pages.remove(&p);
                    }
                }
                None if zero => {}
                None => {
                    let mut page = vec![0u8; PAGE].into_boxed_slice();
                    page[(at - p) as usize..(hi - p) as usize].copy_from_slice(src);
                    pages.insert(p, page);
                }
            }
            at = hi;
        }
        Ok(())
    }

    fn zero_memory(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        check_range(&self.regions, MemoryRange::new(gpa, length))?;
        let end = gpa + length;
        let first_full = gpa.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let last_full = end / PAGE_SIZE * PAGE_SIZE;
        if first_full >= last_full {
            return self.write_memory(gpa, &vec![0u8; length as usize]);
        }
        self.write_memory(gpa, &vec![0u8; (first_full - gpa) as usize])?;
        self.write_memory(last_full, &vec![0u8; (end - last_full) as usize])?;
        let mut pages = self.lock();
        let doomed: Vec<u64> = pages
            .range(first_full..last_full)
            .map(|(&p, _)| p)
            .collect();
        for p in doomed {
            pages.remove(&p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_and_zero_pages_take_no_room() {
        let m = SparseMemory::new(vec![MemoryRange::new(0, 4 * PAGE_SIZE)]);
        m.write_memory(PAGE_SIZE - 2, &[1, 2, 3, 4]).unwrap();
        let mut buf = [9u8; 6];
        m.read_memory(PAGE_SIZE - 3, &mut buf).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 4, 0]);
        assert_eq!(m.pages().len(), 2);
        m.zero_memory(0, 4 * PAGE_SIZE).unwrap();
        assert!(m.pages().is_empty());
        assert!(m.write_memory(4 * PAGE_SIZE, &[1]).is_err());
    }
}
