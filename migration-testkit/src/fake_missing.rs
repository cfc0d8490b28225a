//! [`FakeMissing`]: postcopy's missing pages for [`FakeVm`](crate::fake_vm::FakeVm),
//! in memory: an access to a missing page ([`FakeMissing::touch`]) reports a fault
//! and waits until the page is placed, as a vCPU waits on a userfaultfd.

use std::collections::BTreeSet;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use migration_core::memory::PAGE_SIZE;
use migration_core::missing_pages::PagePlacer;
use migration_core::{MemoryError, MemoryRangeTable, MemorySink};

use crate::fake_memory::FakeMemory;

/// The missing pages of a fake VM's memory during postcopy.
#[derive(Debug)]
pub struct FakeMissing {
    memory: Arc<FakeMemory>,
    state: Mutex<State>,
    arrived: Condvar,
}

#[derive(Debug)]
struct State {
    missing: BTreeSet<u64>,
    reported: BTreeSet<u64>,
    faults: Sender<u64>,
    /// Disarmed or dropped: nobody waits any more.
    abandoned: bool,
    faults_seen: u64,
}

impl FakeMissing {
    /// The pages of `pending` made missing in `memory` (zero-filled: their old
    /// content is stale); accesses report to `faults`.
    pub fn arm(
        memory: Arc<FakeMemory>,
        pending: &MemoryRangeTable,
        faults: Sender<u64>,
    ) -> Result<Arc<Self>, MemoryError> {
        let mut missing = BTreeSet::new();
        for r in pending.ranges() {
            memory.zero_memory(r.gpa, r.length)?;
            let mut gpa = r.gpa;
            while gpa < r.gpa + r.length {
                missing.insert(gpa);
                gpa += PAGE_SIZE;
            }
        }
        Ok(Arc::new(Self {
            memory,
            state: Mutex::new(State {
                missing,
                reported: BTreeSet::new(),
                faults,
                abandoned: false,
                faults_seen: 0,
            }),
            arrived: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An access to the page holding `gpa`: returns at once if it is present,
    /// else reports a fault (once) and waits until the page is placed (or the
    /// missing pages are abandoned).
    pub fn touch(&self, gpa: u64) {
        let page = gpa & !(PAGE_SIZE - 1);
        let mut s = self.lock();
        while s.missing.contains(&page) && !s.abandoned {
            if s.reported.insert(page) {
                s.faults_seen += 1;
                let _ = s.faults.send(page);
            }
            s = self
                .arrived
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Bytes still missing.
    pub fn missing_bytes(&self) -> u64 {
        self.lock().missing.len() as u64 * PAGE_SIZE
    }

    /// Faults reported (pages a toucher waited on).
    pub fn faults(&self) -> u64 {
        self.lock().faults_seen
    }

    /// Stops waiting: every toucher returns (the pages are not placed).
    pub fn abandon(&self) {
        self.lock().abandoned = true;
        self.arrived.notify_all();
    }

    fn place_with(&self, gpa: u64, length: u64, data: Option<&[u8]>) -> Result<(), MemoryError> {
        let mut s = self.lock();
        let mut at = 0u64;
        while at < length {
            let page = gpa + at;
            // A page placed twice keeps its first content.
            if s.missing.remove(&page) {
                match data {
                    Some(d) => self
                        .memory
                        .write_memory(page, &d[at as usize..(at + PAGE_SIZE) as usize])?,
                    None => self.memory.zero_memory(page, PAGE_SIZE)?,
                }
            }
            at += PAGE_SIZE;
        }
        drop(s);
        self.arrived.notify_all();
        Ok(())
    }
}

impl PagePlacer for FakeMissing {
    fn place(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.place_with(gpa, data.len() as u64, Some(data))
    }

    fn place_zero(&self, gpa: u64, length: u64) -> Result<(), MemoryError> {
        self.place_with(gpa, length, None)
    }

    fn wake(&self, _gpa: u64, _length: u64) -> Result<(), MemoryError> {
        self.arrived.notify_all();
        Ok(())
    }
}
