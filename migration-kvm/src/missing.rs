//! Postcopy's missing pages on [`GuestRam`] with a userfaultfd ([`crate::uffd`]):
//! [`arm`] discards the pending pages (`MADV_DONTNEED`), registers every region in
//! MISSING mode and starts a thread that turns fault messages into guest addresses;
//! [`UffdPlacer`] places pages with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`. What
//! [`KvmVm`](crate::KvmVm) implements `MissingPages` with.
//!
//! A vCPU that touches a missing page blocks inside `KVM_RUN` (KVM's page walk
//! faults on the host mapping) until the page is placed; so does a VMM thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use migration_core::memory::PAGE_SIZE;
use migration_core::missing_pages::PagePlacer;
use migration_core::{MemoryError, MemoryRange, MemoryRangeTable};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::bitmap::DirtyBitmap;
use crate::memory::GuestRam;
use crate::uffd::{Placed, UffdError, Userfault};

/// A region of guest memory: its guest range and host address, and the mapping kept
/// alive while pages may be placed into it.
#[derive(Clone)]
struct HostRegion {
    range: MemoryRange,
    host: u64,
    _keep: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegion")
            .field("range", &self.range)
            .field("host", &format_args!("{:#x}", self.host))
            .finish()
    }
}

fn host_regions<B: DirtyBitmap>(memory: &GuestRam<B>) -> Vec<HostRegion> {
    memory
        .mmap()
        .iter()
        .map(|r| HostRegion {
            range: MemoryRange::new(r.start_addr().0, r.len()),
            host: r.as_ptr() as u64,
            _keep: r.get_mmap(),
        })
        .collect()
}

/// The host address of `range` (whole pages, inside one region).
fn host_of(regions: &[HostRegion], range: MemoryRange) -> Result<u64, MemoryError> {
    let out = || MemoryError::OutOfRange {
        gpa: range.gpa,
        length: range.length,
    };
    if range.gpa % PAGE_SIZE != 0 || range.length % PAGE_SIZE != 0 {
        return Err(out());
    }
    regions
        .iter()
        .find(|r| r.range.contains(&range))
        .map(|r| r.host + (range.gpa - r.range.gpa))
        .ok_or_else(out)
}

fn backend(e: UffdError) -> MemoryError {
    MemoryError::Backend(Box::new(e))
}

/// Places pages into guest memory registered with a userfaultfd.
#[derive(Debug)]
pub struct UffdPlacer {
    uffd: Arc<Userfault>,
    regions: Vec<HostRegion>,
}

impl UffdPlacer {
    /// Places one range page by page (after the kernel stopped at a present page).
    fn each_page(
        &self,
        host: u64,
        length: u64,
        mut one: impl FnMut(u64, u64) -> Result<Placed, UffdError>,
    ) -> Result<(), MemoryError> {
        let mut at = 0;
        while at < length {
            one(host + at, at).map_err(backend)?;
            at += PAGE_SIZE;
        }
        Ok(())
    }
}

impl PagePlacer for UffdPlacer {
    fn place(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let length = data.len() as u64;
        let host = host_of(&self.regions, MemoryRange::new(gpa, length))?;
        // SAFETY: `host_of` put the range inside a region of guest memory registered
        // with this descriptor; `regions` keeps its mapping alive; guest memory is
        // only ever accessed volatile, never through a Rust reference.
        match unsafe { self.uffd.copy(host, data) }.map_err(backend)? {
            Placed::Filled => Ok(()),
            Placed::AlreadyPresent if length == PAGE_SIZE => Ok(()),
            // The kernel stopped at a present page: place the rest one by one.
            Placed::AlreadyPresent => self.each_page(host, length, |h, at| {
                let page = &data[at as usize..(at + PAGE_SIZE) as usize];
                // SAFETY: as above, one page of the same range.
                unsafe { self.uffd.copy(h, page) }
            }),
        }
    }

    fn place_zero(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        let host = host_of(&self.regions, MemoryRange::new(gpa, length))?;
        // SAFETY: as in `place`.
        match unsafe { self.uffd.zero(host, length) }.map_err(backend)? {
            Placed::Filled => Ok(()),
            Placed::AlreadyPresent if length == PAGE_SIZE => Ok(()),
            Placed::AlreadyPresent => self.each_page(host, length, |h, _| {
                // SAFETY: as in `place`, one page of the same range.
                unsafe { self.uffd.zero(h, PAGE_SIZE) }
            }),
        }
    }

    fn wake(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        let host = host_of(&self.regions, MemoryRange::new(gpa, length))?;
        self.uffd.wake(host, length).map_err(backend)
    }
}

/// Guest memory armed for postcopy: registered with a userfaultfd, a thread reading
/// its faults. Dropping it stops the thread and unregisters the memory (missing pages
/// then read as zero), waking whoever waited.
#[derive(Debug)]
pub struct Armed {
    uffd: Arc<Userfault>,
    regions: Vec<HostRegion>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host, r.range.length) {
                tracing::warn!(error = %e, "cannot unregister guest memory from userfaultfd");
            }
        }
    }
}

/// Makes the pages of `pending` missing in `memory` and catches accesses to missing
/// pages: each fault's guest address goes to `faults`. The memory must not be
/// accessed through references meanwhile (vm-memory accesses are volatile).
pub fn arm<B: DirtyBitmap>(
    memory: &GuestRam<B>,
    pending: &MemoryRangeTable,
    faults: Sender<u64>,
) -> Result<(Armed, Arc<UffdPlacer>), MemoryError> {
    let regions = host_regions(memory);
    let uffd = Arc::new(Userfault::new().map_err(backend)?);
    for r in pending.ranges() {
        let host = host_of(&regions, *r)?;
        // SAFETY: the range is inside a guest memory mapping (checked by `host_of`),
        // private anonymous memory whose pages MADV_DONTNEED drops: their content
        // was stale (the source sends them again) and no Rust reference points into
        // guest memory.
        let ret = unsafe {
            libc::madvise(
                host as *mut libc::c_void,
                r.length as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(MemoryError::Io(std::io::Error::last_os_error()));
        }
    }
    for r in &regions {
        uffd.register_missing(r.host, r.range.length)
            .map_err(backend)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (uffd, regions, stop) = (uffd.clone(), regions.clone(), stop.clone());
        thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match uffd.next_fault(Duration::from_millis(20)) {
                        Ok(Some(host)) => {
                            let gpa = regions.iter().find_map(|r| {
                                (host >= r.host && host - r.host < r.range.length)
                                    .then(|| r.range.gpa + (host - r.host))
                            });
                            if let Some(gpa) = gpa {
                                let _ = faults.send(gpa);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "userfaultfd: cannot read faults");
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
            .map_err(MemoryError::Io)?
    };
    let placer = Arc::new(UffdPlacer {
        uffd: uffd.clone(),
        regions: regions.clone(),
    });
    Ok((
        Armed {
            uffd,
            regions,
            stop,
            thread: Some(thread),
        },
        placer,
    ))
}
