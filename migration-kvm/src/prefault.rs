//! [`Prefaulter`]: faults a migration destination's fresh guest memory in on a
//! thread of its own, a window ahead of the receive cursor, so the receiving thread
//! finds its pages already mapped.
//!
//! First touch of fresh memory is most of a cold destination's time on this machine
//! (nested page faults: 0.3–1.8 GB/s with 4 KiB pages, one thread). Round 0 of a
//! migration arrives in ascending address order, so a second thread can take the
//! faults of the pages about to arrive while the receiving thread copies the ones
//! that did: the two overlap instead of adding up.
//!
//! The thread faults pages with `madvise(MADV_POPULATE_WRITE)`, which maps them
//! writable **without changing their contents**: racing with the receiving thread
//! on the same page is harmless. It never gets more than [`WINDOW`] ahead of the
//! last MEMORY frame received, so a guest that is mostly zero pages (sent as ZERO
//! ranges, never written here) costs at most a window of memory it did not need. It
//! stops at the end of memory, when the VM is resumed, or when dropped.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use migration_core::{MemoryError, MemoryRange, MemorySink};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestRam;

/// How far ahead of the receive cursor the thread faults pages in.
pub const WINDOW: u64 = 64 << 20;
/// Pages faulted in per `madvise` call: one huge page.
const STEP: u64 = 2 << 20;
/// The thread starts this far past the receive cursor, so it does not fault the
/// very pages the receiving thread is writing.
const LEAD: u64 = 2 << 20;

#[derive(Debug)]
struct Shared {
    /// End (guest address) of the last MEMORY data written.
    cursor: AtomicU64,
    stop: AtomicBool,
    /// Bytes the thread faulted in.
    faulted: AtomicU64,
}

/// Guest memory of a migration destination, with a thread faulting it in ahead of
/// what arrives. A [`MemorySink`] that writes through to the [`GuestRam`] it was
/// given (the same mappings) and moves the cursor.
#[derive(Debug)]
pub struct Prefaulter {
    memory: GuestRam,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// [`allow_direct_reads`](Self::allow_direct_reads) was called.
    direct: bool,
}

impl Prefaulter {
    /// Starts the thread over `memory` (a clone: the same pages). If the thread
    /// cannot be spawned the sink still works, without prefaulting.
    pub fn start(memory: &GuestRam) -> Self {
        Self::new(memory, true)
    }

    /// The sink over `memory`, with the prefault thread if `prefault`.
    pub fn new(memory: &GuestRam, prefault: bool) -> Self {
        let shared = Arc::new(Shared {
            cursor: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            faulted: AtomicU64::new(0),
        });
        let ram = memory.clone();
        let s = shared.clone();
        let thread = prefault
            .then(|| {
                thread::Builder::new()
                    .name("prefault".into())
                    .spawn(move || run(&ram, &s))
                    .inspect_err(|e| tracing::warn!(error = %e, "no prefault thread"))
                    .ok()
            })
            .flatten();
        Self {
            memory: memory.clone(),
            shared,
            thread,
            direct: false,
        }
    }

    /// Lets [`MemorySink::read_memory_from_fd`] read sockets straight into guest
    /// memory (otherwise it declines and the caller reads through a buffer).
    ///
    /// # Safety
    /// While this sink lives, nothing but its own methods may write the guest memory:
    /// no vCPU runs, no other thread writes through another handle on the same
    /// memory ([`GuestRam::read_from_socket`]).
    pub unsafe fn allow_direct_reads(&mut self) {
        self.direct = true;
    }

    /// Stops the thread and waits for it; returns the bytes it faulted in.
    pub fn stop(&mut self) -> u64 {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.shared.faulted.load(Ordering::Relaxed)
    }

    fn advance(&self, end: u64) {
        self.shared.cursor.fetch_max(end, Ordering::Relaxed);
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(memory: &GuestRam, shared: &Shared) {
    let t = std::time::Instant::now();
    for region in memory.mmap().iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let cursor = shared.cursor.load(Ordering::Relaxed);
            let gpa = start + at;
            // Behind the cursor (plus the lead): those pages were written already,
            // or were zero pages nobody needs. Jump ahead.
            let ahead = cursor.saturating_add(LEAD);
            if gpa < ahead {
                // ahead > gpa >= start: this moves `at` forward.
                at = (ahead - start).div_ceil(STEP).saturating_mul(STEP).min(len);
                continue;
            }
            if gpa >= cursor.saturating_add(WINDOW) {
                thread::park_timeout(Duration::from_micros(500));
                continue;
            }
            let n = STEP.min(len - at);
            let Ok(ptr) = region.get_host_address(MemoryRegionAddress(at)) else {
                return;
            };
            // SAFETY: `ptr .. ptr + n` lies inside the region (at + n <= len), which
            // `memory` keeps mapped. MADV_POPULATE_WRITE only faults the pages in,
            // writable; it never changes their contents, so it cannot disturb the
            // bytes the receiving thread writes into the same pages.
            let ret = unsafe { libc::madvise(ptr.cast(), n as usize, libc::MADV_POPULATE_WRITE) };
            if ret != 0 {
                // Older kernel (before 5.14) or not allowed: the receiving thread
                // faults the pages itself, as without this thread.
                tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE failed; prefault stops");
                return;
            }
            shared.faulted.fetch_add(n, Ordering::Relaxed);
            at += n;
        }
    }
    tracing::debug!(elapsed = ?t.elapsed(), faulted = shared.faulted.load(Ordering::Relaxed), "prefault reached the end of memory");
}

impl MemorySink for Prefaulter {
    fn regions(&self) -> Vec<MemoryRange> {
        MemorySink::regions(&self.memory)
    }

    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.memory.write_memory(gpa, data)?;
        self.advance(gpa.saturating_add(data.len() as u64));
        Ok(())
    }

    fn read_memory_from(
        &self,
        gpa: u64,
        length: u64,
        input: &mut dyn std::io::Read,
    ) -> Result<(), MemoryError> {
        // Moved first: the thread skips the pages this frame is about to write.
        self.advance(gpa);
        self.memory.read_memory_from(gpa, length, input)?;
        self.advance(gpa.saturating_add(length));
        Ok(())
    }

    fn read_memory_from_fd(
        &self,
        gpa: u64,
        length: u64,
        fd: BorrowedFd<'_>,
        landed: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<bool, MemoryError> {
        if !self.direct {
            return Ok(false);
        }
        self.advance(gpa);
        // SAFETY: `direct` is set only by `allow_direct_reads`, whose caller
        // guaranteed that nothing else writes this memory while the sink lives.
        unsafe { self.memory.read_from_socket(gpa, length, fd, landed) }?;
        self.advance(gpa.saturating_add(length));
        Ok(true)
    }

    fn zero_memory(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        self.memory.zero_memory(gpa, length)
    }

    /// Several connections may write at once (multi-connection): the cursor moves
    /// to the furthest write, and the thread only faults pages in.
    fn as_sync_sink(&self) -> Option<&(dyn MemorySink + Sync)> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::MemorySource;

    #[test]
    fn writes_land_whatever_the_thread_does() {
        let layout = [
            MemoryRange::new(0, 8 << 20),
            MemoryRange::new(16 << 20, 8 << 20),
        ];
        let ram = GuestRam::anonymous(&layout).unwrap();
        let mut p = Prefaulter::start(&ram);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13 + 5) as u8).collect();
        for gpa in [0u64, 3 << 20, 16 << 20, 23 << 20] {
            p.read_memory_from(gpa, data.len() as u64, &mut &data[..])
                .unwrap();
        }
        thread::sleep(Duration::from_millis(20));
        p.stop();
        let mut back = vec![0u8; data.len()];
        for gpa in [0u64, 3 << 20, 16 << 20, 23 << 20] {
            ram.read_memory(gpa, &mut back).unwrap();
            assert_eq!(back, data, "at {gpa:#x}");
        }
        // Pages faulted in but never written still read as zero.
        ram.read_memory(20 << 20, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // Outside the layout: refused, as by the memory itself.
        assert!(p.write_memory(8 << 20, &[1]).is_err());
    }

    /// MEMORY frames read from a socket straight into guest memory land intact, and a
    /// byte changed in transit is caught by the checksum of the landed bytes.
    #[test]
    fn direct_socket_reads_land_and_are_checksummed() {
        use migration_core::protocol::{Channel, Message, MigrationError, Received};
        use std::io::Write;
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;

        let layout = [MemoryRange::new(0, 16 << 20)];
        let ram = GuestRam::anonymous(&layout).unwrap();
        let mut sink = Prefaulter::new(&ram, true);
        // SAFETY: nothing else writes `ram` in this test while `sink` lives.
        unsafe { sink.allow_direct_reads() };
        let data: Vec<u8> = (0..(3u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let frames = |gpa: u64| {
            let mut out = Channel::new(std::io::Cursor::new(Vec::new()));
            out.send(&Message::Memory { gpa, data: &data }).unwrap();
            out.flush().unwrap();
            out.get_ref().get_ref().clone()
        };
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let good = frames(0x10_0000);
        let mut bad = frames(0x80_0000);
        bad[8 + 8 + (2 << 20) + 5] ^= 1; // past the first socket piece
        let sender = std::thread::spawn(move || {
            tx.write_all(&good).unwrap();
            tx.write_all(&bad).unwrap();
        });
        let mut ch = Channel::new(rx).with_socket(|s: &UnixStream| Some(s.as_fd()));
        let got = ch.recv_into(&sink, &layout).unwrap();
        assert_eq!(
            got,
            Received::MemoryWritten(MemoryRange::new(0x10_0000, data.len() as u64))
        );
        assert!(matches!(
            ch.recv_into(&sink, &layout),
            Err(MigrationError::Checksum(_))
        ));
        sender.join().unwrap();
        drop(sink);
        let mut back = vec![0u8; data.len()];
        ram.read_memory(0x10_0000, &mut back).unwrap();
        assert!(back == data, "the frame landed intact");

        // The direct path itself: every byte handed on once, in order, after landing.
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let copy = data.clone();
        let sender = std::thread::spawn(move || tx.write_all(&copy).unwrap());
        let mut seen = Vec::new();
        // SAFETY: nothing else writes `ram` during the call.
        unsafe {
            ram.read_from_socket(0x40_0000, data.len() as u64, rx.as_fd(), &mut |b| {
                seen.extend_from_slice(b);
                Ok(())
            })
        }
        .unwrap();
        sender.join().unwrap();
        assert!(seen == data, "landed bytes handed on in order");
        ram.read_memory(0x40_0000, &mut back).unwrap();
        assert!(back == data);
    }
}
