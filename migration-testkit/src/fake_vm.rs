//! [`FakeVm`]: a whole fake VM that implements [`Migratable`], without KVM.
//!
//! A `FakeVm` owns a [`FakeMemory`], a [`FakeDeviceManager`] and a background
//! **workload** thread that dirties guest memory at a set rate while the VM runs. The
//! workload is deterministic: write number `i` goes to a page chosen from the seed
//! and `i`, and fills it with a pattern derived from the seed, `i` and the page's
//! address. The VM's snapshot records how many writes happened, so
//! [`FakeVm::verify`] can recompute what every page of the workload area must hold
//! (zeros, or the pattern of the *last* write to it) and report a stale, torn or
//! corrupt page, on the source or on a migration destination. It is the fake
//! counterpart of the KVM test guests' self-checks.
//!
//! The workload's rate is exact at every [`dirty_log`](Migratable::dirty_log): the
//! writes due by then at the set rate are done before the log is read, however the
//! thread was scheduled. [`set_throttle`](Migratable::set_throttle) scales the rate by
//! `1 - percent/100` from the call on (auto-converge's effect, deterministically).
//!
//! `pause` really stops the workload: it returns only after the write in progress
//! has finished, and no write happens until `resume`. Snapshot and restore require a
//! paused VM (a driver that forgets to pause gets an error, not a torn snapshot).
//!
//! Snapshot tree: node `vm` with sections `layout` (the memory regions) and
//! `workload` ([`WorkloadState`]), and the child `devices` (the device manager).
//! Guest memory is not in the tree: it travels through
//! [`memory_source`](Migratable::memory_source) /
//! [`memory_sink`](Migratable::memory_sink), like a real VM's.
//!
//! ```
//! use migration_core::{MemorySink, MemorySource, Migratable, Pausable, Snapshottable};
//! use migration_testkit::FakeVm;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut source = FakeVm::builder().memory_size(16 << 20).workload(0, 42).build()?;
//! source.run_workload_writes(1000)?;          // deterministic, no thread timing
//! source.devices_mut().step(1);
//!
//! // A hand-rolled "migration": every page, then the device state.
//! let mut dest = FakeVm::destination_for(&source)?;
//! source.pause()?;
//! for r in source.memory_source().regions() {
//!     let mut buf = vec![0; r.length as usize];
//!     source.memory_source().read_memory(r.gpa, &mut buf)?;
//!     dest.memory_sink().write_memory(r.gpa, &buf)?;
//! }
//! dest.restore(&source.snapshot()?)?;
//! dest.verify()?;                              // the workload's pattern checks out
//! source.same_state(&dest)?;                   // memory, devices, workload identical
//! assert_eq!(source.content_digest(), dest.content_digest());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use migration_core::memory::PAGE_SIZE;
use migration_core::missing_pages::{MissingPages, PagePlacer};
use migration_core::{
    CodecRegistry, MemoryError, MemoryRange, MemoryRangeTable, MemorySink, MemorySource,
    Migratable, MigratableError, MigrationRole, Pausable, Snapshot, Snapshottable, Transportable,
    Versioned,
};
use serde::{Deserialize, Serialize};

use crate::fake_manager::FakeDeviceManager;
use crate::fake_memory::FakeMemory;
use crate::fake_missing::FakeMissing;
use crate::rng::{mix, Digest, Rng};

/// First word of every page the workload writes.
const MAGIC: u64 = 0x4b52_4f57_454b_4146; // "FAKEWORK"

/// The workload's progress and configuration: the `workload` section of a
/// [`FakeVm`] snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkloadState {
    /// Seed of the page choice and patterns.
    pub seed: u64,
    /// Target rate in bytes per second while running (`0`: idle; `u64::MAX`: as
    /// fast as possible).
    pub bytes_per_sec: u64,
    /// The guest memory the workload owns; every page of it is checked by
    /// [`FakeVm::verify`].
    pub area: Vec<MemoryRange>,
    /// Number of page writes done so far.
    pub writes: u64,
}

impl Versioned for WorkloadState {
    const VERSION: u32 = 1;
}

impl WorkloadState {
    fn pages(&self) -> u64 {
        self.area.iter().map(|r| r.length / PAGE_SIZE).sum()
    }

    /// Address of the `page`-th page of the area.
    fn page_gpa(&self, mut page: u64) -> u64 {
        for r in &self.area {
            let n = r.length / PAGE_SIZE;
            if page < n {
                return r.gpa + page * PAGE_SIZE;
            }
            page -= n;
        }
        unreachable!("page index within the area")
    }

    /// Index (within the area) of the page write `i` goes to.
    fn target(&self, i: u64) -> u64 {
        let pages = self.pages();
        ((u128::from(mix(self.seed ^ mix(i))) * u128::from(pages)) >> 64) as u64
    }

    /// The bytes write `i` puts at `gpa`.
    fn pattern(&self, i: u64, gpa: u64, page: &mut [u8]) {
        Rng::new(mix(self.seed) ^ mix(i) ^ gpa).fill(page);
        page[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        page[8..16].copy_from_slice(&self.seed.to_le_bytes());
        page[16..24].copy_from_slice(&i.to_le_bytes());
        page[24..32].copy_from_slice(&gpa.to_le_bytes());
    }
}

/// State shared with the workload thread.
#[derive(Debug)]
struct Shared {
    memory: Arc<FakeMemory>,
    /// Postcopy's missing pages, while armed: the workload touches a page before
    /// writing it.
    missing: Mutex<Option<Arc<FakeMissing>>>,
    /// Whether the workload may write; cleared by `pause` before it takes the lock.
    run: AtomicBool,
    ctl: Mutex<Ctl>,
    wake: Condvar,
}

#[derive(Debug)]
struct Ctl {
    workload: WorkloadState,
    running: bool,
    stop: bool,
    /// The auto-converge throttle, percent: the workload runs at `100 - throttle` %
    /// of its rate.
    throttle: u8,
    /// Pacing: bytes written since `since`, while running at an unchanged rate.
    since: Instant,
    written: u64,
    /// Whether `since` and `written` describe the current run.
    pacing: bool,
}

impl Ctl {
    /// The workload's rate with the throttle applied, bytes per second.
    fn rate(&self) -> u64 {
        let rate = self.workload.bytes_per_sec;
        if rate == u64::MAX || self.throttle == 0 {
            return rate;
        }
        (u128::from(rate) * u128::from(100 - self.throttle.min(100)) / 100) as u64
    }

    /// Starts pacing afresh (after a pause or a change of rate).
    fn restart_pacing(&mut self) {
        self.since = Instant::now();
        self.written = 0;
        self.pacing = true;
    }

    /// Bytes the workload may have written by now at its (throttled) rate.
    fn allowed(&self) -> u64 {
        (self.since.elapsed().as_secs_f64() * self.rate() as f64) as u64
    }
}

impl Shared {
    fn missing(&self) -> Option<Arc<FakeMissing>> {
        self.missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Does the writes a running workload at a finite rate is behind on, so the pages
    /// dirtied by now do not depend on how the workload thread was scheduled.
    fn catch_up(&self, ctl: &mut Ctl) -> Result<(), MemoryError> {
        let rate = ctl.rate();
        if !ctl.running || !ctl.pacing || rate == 0 || rate == u64::MAX {
            return Ok(());
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let allowed = ctl.allowed();
        while ctl.written.saturating_add(PAGE_SIZE) <= allowed && ctl.workload.pages() > 0 {
            self.write_next(ctl, &mut page)?;
            ctl.written += PAGE_SIZE;
        }
        Ok(())
    }

    /// Performs the next workload write (the caller holds the lock).
    fn write_next(&self, ctl: &mut Ctl, page: &mut [u8]) -> Result<(), MemoryError> {
        let w = &ctl.workload;
        if w.pages() == 0 {
            return Ok(());
        }
        let i = w.writes;
        let gpa = w.page_gpa(w.target(i));
        if let Some(m) = self.missing() {
            m.touch(gpa);
        }
        w.pattern(i, gpa, page);
        self.memory.write_memory(gpa, page)?;
        ctl.workload.writes += 1;
        Ok(())
    }
}

fn workload_thread(shared: Arc<Shared>) {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut ctl = shared.lock();
    loop {
        if ctl.stop {
            return;
        }
        let running = ctl.running && shared.run.load(Ordering::Acquire);
        let rate = ctl.rate();
        if !running || rate == 0 || ctl.workload.pages() == 0 {
            ctl.pacing = false;
            ctl = shared
                .wake
                .wait(ctl)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        if !ctl.pacing {
            ctl.restart_pacing();
        }
        let (written, allowed) = (ctl.written, ctl.allowed());
        if written.saturating_add(PAGE_SIZE) > allowed && rate != u64::MAX {
            let ahead = (written + PAGE_SIZE - allowed) as f64 / rate as f64;
            let nap = Duration::from_secs_f64(ahead.min(0.01));
            ctl = shared
                .wake
                .wait_timeout(ctl, nap)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        if shared.write_next(&mut ctl, &mut page).is_err() {
            // The area lies inside memory by construction; stop rather than spin.
            ctl.running = false;
            continue;
        }
        ctl.written += PAGE_SIZE;
        // Let `pause` and the other callers in between writes.
        drop(ctl);
        ctl = shared.lock();
    }
}

/// Builds a [`FakeVm`]; see [`FakeVm::builder`].
#[derive(Debug)]
pub struct FakeVmBuilder {
    regions: Vec<MemoryRange>,
    devices: FakeDeviceManager,
    workload: WorkloadState,
    codecs: CodecRegistry,
    running: bool,
    writes_before_pause: u64,
}

impl FakeVmBuilder {
    /// Guest memory regions (default: 64 MiB at 0).
    pub fn regions(mut self, regions: &[MemoryRange]) -> Self {
        self.regions = regions.to_vec();
        self
    }

    /// One region of `size` bytes at 0.
    pub fn memory_size(self, size: u64) -> Self {
        self.regions(&[MemoryRange::new(0, size)])
    }

    /// The devices (default: [`FakeDeviceManager::standard`]).
    pub fn devices(mut self, devices: FakeDeviceManager) -> Self {
        self.devices = devices;
        self
    }

    /// The workload's rate in bytes per second while running (`0`: idle,
    /// `u64::MAX`: unthrottled) and its seed (default: idle, seed 0).
    pub fn workload(mut self, bytes_per_sec: u64, seed: u64) -> Self {
        self.workload.bytes_per_sec = bytes_per_sec;
        self.workload.seed = seed;
        self
    }

    /// The memory the workload owns (default: all of it). Must be page-aligned and
    /// inside the regions.
    pub fn workload_area(mut self, area: &[MemoryRange]) -> Self {
        self.workload.area = area.to_vec();
        self
    }

    /// The codecs of [`Transportable::codecs`] (default: empty).
    pub fn codecs(mut self, codecs: CodecRegistry) -> Self {
        self.codecs = codecs;
        self
    }

    /// On every pause of a running VM, `n` more workload writes land first (default
    /// 0), on the pausing thread: pages a guest is sure to have dirtied since the
    /// last dirty-log read, whatever the scheduler gave the workload thread (what
    /// postcopy's pending list is made of).
    pub fn writes_before_pause(mut self, n: u64) -> Self {
        self.writes_before_pause = n;
        self
    }

    /// Start paused, as a migration destination does (default: running).
    pub fn paused(mut self) -> Self {
        self.running = false;
        self
    }

    /// Builds the VM and starts its workload thread.
    pub fn build(self) -> Result<FakeVm, MigratableError> {
        let memory = Arc::new(FakeMemory::new(&self.regions)?);
        let mut workload = self.workload;
        if workload.area.is_empty() {
            workload.area = memory.layout();
        }
        for r in &workload.area {
            if r.gpa % PAGE_SIZE != 0 || r.length % PAGE_SIZE != 0 {
                return Err(MemoryError::Backend(
                    format!(
                        "workload area [{:#x}, +{:#x}) is not page-aligned",
                        r.gpa, r.length
                    )
                    .into(),
                )
                .into());
            }
            migration_core::memory::check_range(&memory.layout(), *r)?;
        }
        let shared = Arc::new(Shared {
            memory,
            missing: Mutex::new(None),
            run: AtomicBool::new(self.running),
            ctl: Mutex::new(Ctl {
                workload,
                running: self.running,
                stop: false,
                throttle: 0,
                since: Instant::now(),
                written: 0,
                pacing: false,
            }),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let worker = thread::Builder::new()
            .name("fake-vm-workload".into())
            .spawn(move || workload_thread(thread_shared))?;
        Ok(FakeVm {
            shared,
            worker: Some(worker),
            devices: self.devices,
            codecs: self.codecs,
            dirty_logging: false,
            migrating: false,
            role: None,
            throttles: Vec::new(),
            writes_before_pause: self.writes_before_pause,
        })
    }
}

/// A fake VM; see the [module docs](self).
pub struct FakeVm {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    devices: FakeDeviceManager,
    codecs: CodecRegistry,
    dirty_logging: bool,
    migrating: bool,
    /// The role of the current or last migration.
    role: Option<MigrationRole>,
    /// Every throttle `set_throttle` set, in order.
    throttles: Vec<u8>,
    /// See [`FakeVmBuilder::writes_before_pause`].
    writes_before_pause: u64,
}

impl fmt::Debug for FakeVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctl = self.shared.lock();
        f.debug_struct("FakeVm")
            .field("memory", &self.shared.memory)
            .field("devices", &self.devices)
            .field("workload", &ctl.workload)
            .field("running", &ctl.running)
            .field("dirty_logging", &self.dirty_logging)
            .field("migrating", &self.migrating)
            .field("role", &self.role)
            .finish()
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        // A workload waiting on a missing page gives up.
        if let Some(m) = self.shared.missing() {
            m.abandon();
        }
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl FakeVm {
    /// Postcopy's missing pages while armed ([`MissingPages::arm_missing`]).
    pub fn missing(&self) -> Option<Arc<FakeMissing>> {
        self.shared.missing()
    }

    /// A guest access to the page at `gpa`: waits while it is missing (postcopy).
    pub fn touch(&self, gpa: u64) {
        if let Some(m) = self.shared.missing() {
            m.touch(gpa);
        }
    }

    /// A builder: 64 MiB at 0, the standard devices, an idle workload, no codecs,
    /// running.
    pub fn builder() -> FakeVmBuilder {
        FakeVmBuilder {
            regions: vec![MemoryRange::new(0, 64 << 20)],
            devices: FakeDeviceManager::standard(),
            workload: WorkloadState::default(),
            codecs: CodecRegistry::new(),
            running: true,
            writes_before_pause: 0,
        }
    }

    /// A paused, all-zero migration destination with memory `regions`, the standard
    /// devices in their initial state, and `codecs`.
    pub fn destination(
        regions: &[MemoryRange],
        codecs: CodecRegistry,
    ) -> Result<Self, MigratableError> {
        Self::builder()
            .regions(regions)
            .codecs(codecs)
            .paused()
            .build()
    }

    /// A paused, all-zero destination for `source`: the same memory layout, the same
    /// device tree in its initial state, the same codecs.
    pub fn destination_for(source: &FakeVm) -> Result<Self, MigratableError> {
        Self::builder()
            .regions(&source.shared.memory.layout())
            .devices(source.devices.fresh_copy())
            .codecs(source.codecs.clone())
            .paused()
            .build()
    }

    /// The guest memory (shared with the workload thread).
    pub fn memory(&self) -> &Arc<FakeMemory> {
        &self.shared.memory
    }

    /// The devices.
    pub fn devices(&self) -> &FakeDeviceManager {
        &self.devices
    }

    /// The devices, mutable (step them to change device state).
    pub fn devices_mut(&mut self) -> &mut FakeDeviceManager {
        &mut self.devices
    }

    /// Whether the VM is running (not paused).
    pub fn is_running(&self) -> bool {
        self.shared.lock().running
    }

    /// The workload's configuration and progress.
    pub fn workload(&self) -> WorkloadState {
        self.shared.lock().workload.clone()
    }

    /// Changes the workload's rate (bytes per second; `0` idles it).
    pub fn set_workload_rate(&self, bytes_per_sec: u64) {
        let mut ctl = self.shared.lock();
        ctl.workload.bytes_per_sec = bytes_per_sec;
        ctl.pacing = false;
        drop(ctl);
        self.shared.wake.notify_all();
    }

    /// The auto-converge throttle in force, percent (0: none).
    pub fn throttle(&self) -> u8 {
        self.shared.lock().throttle
    }

    /// Every throttle [`set_throttle`](Migratable::set_throttle) set, in order (a
    /// migration with auto-converge leaves e.g. `[20, 30, 40, 0]`).
    pub fn throttle_history(&self) -> &[u8] {
        &self.throttles
    }

    /// Performs `n` workload writes now, on the calling thread, whether or not the
    /// VM runs: a deterministic way to reach a given memory state.
    pub fn run_workload_writes(&self, n: u64) -> Result<(), MigratableError> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut ctl = self.shared.lock();
        for _ in 0..n {
            self.shared.write_next(&mut ctl, &mut page)?;
        }
        Ok(())
    }

    /// Checks every page of the workload area against what the workload wrote: a
    /// page must hold the pattern of the last write to it, or zeros if none did. The
    /// VM must be paused. The error names the first bad page and what it holds.
    pub fn verify(&self) -> Result<(), String> {
        let ctl = self.shared.lock();
        if ctl.running {
            return Err("verify needs a paused FakeVm".into());
        }
        let w = &ctl.workload;
        let pages = w.pages();
        let mut last = vec![u64::MAX; usize::try_from(pages).map_err(|e| e.to_string())?];
        for i in 0..w.writes {
            last[w.target(i) as usize] = i;
        }
        let mut want = vec![0u8; PAGE_SIZE as usize];
        let mut got = vec![0u8; PAGE_SIZE as usize];
        for (p, &i) in last.iter().enumerate() {
            let gpa = w.page_gpa(p as u64);
            let mem = &self.shared.memory;
            if i == u64::MAX {
                match mem.is_zero(gpa, PAGE_SIZE) {
                    Ok(true) => continue,
                    Ok(false) => {
                        mem.read_memory(gpa, &mut got).map_err(|e| e.to_string())?;
                        return Err(format!(
                            "page {gpa:#x} was never written by the workload but holds {}",
                            describe(&got)
                        ));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            w.pattern(i, gpa, &mut want);
            mem.read_memory(gpa, &mut got).map_err(|e| e.to_string())?;
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "page {gpa:#x} should hold workload write #{i} (seed {}, {} writes so far) \
                     but holds {} (first difference at byte {at})",
                    w.seed,
                    w.writes,
                    describe(&got)
                ));
            }
        }
        Ok(())
    }

    /// A digest of memory, devices and workload progress: equal digests mean (up to
    /// hash collisions) equal VMs. Stable while paused.
    pub fn content_digest(&self) -> u64 {
        let mut d = Digest::new();
        d.word(self.shared.memory.content_digest());
        d.word(self.devices.content_digest());
        std::hash::Hash::hash(&self.shared.lock().workload, &mut d);
        d.finish()
    }

    /// Compares memory, devices and workload state with `other`; the error describes
    /// the first difference.
    pub fn same_state(&self, other: &FakeVm) -> Result<(), String> {
        if let Some(gpa) = self.shared.memory.first_difference(&other.shared.memory)? {
            return Err(format!("memory differs at {gpa:#x}"));
        }
        for (a, b) in self.devices.devices().zip(other.devices.devices()) {
            if a.state() != b.state() {
                return Err(format!(
                    "device `{}` differs: {:?} vs {:?}",
                    a.id(),
                    a.state(),
                    b.state()
                ));
            }
            if a != b {
                return Err(format!(
                    "the queues of device `{}` differ: {:?} vs {:?}",
                    a.id(),
                    a.queues(),
                    b.queues()
                ));
            }
        }
        if self.devices != other.devices {
            return Err("the device trees differ".into());
        }
        let (a, b) = (self.workload(), other.workload());
        if a != b {
            return Err(format!("workload state differs: {a:?} vs {b:?}"));
        }
        Ok(())
    }

    fn require_paused(&self, what: &str) -> Result<(), String> {
        if self.shared.lock().running {
            Err(format!("{what} needs a paused FakeVm: pause it first"))
        } else {
            Ok(())
        }
    }
}

/// What a page holds, for error messages.
fn describe(page: &[u8]) -> String {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&page[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    if page.iter().all(|&b| b == 0) {
        "zeros".into()
    } else if word(0) == MAGIC {
        format!(
            "a workload page of write #{} (seed {}, for page {:#x})",
            word(2),
            word(1),
            word(3)
        )
    } else {
        "bytes no workload write produces".into()
    }
}

impl Pausable for FakeVm {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.shared.run.store(false, Ordering::Release);
        // Taking the lock waits for the write in progress; after this no write starts.
        let mut ctl = self.shared.lock();
        if ctl.running && self.writes_before_pause > 0 {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            for _ in 0..self.writes_before_pause {
                self.shared.write_next(&mut ctl, &mut page)?;
            }
        }
        ctl.running = false;
        drop(ctl);
        self.devices.pause().map_err(|e| e.within("vm"))
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.devices.resume().map_err(|e| e.within("vm"))?;
        self.shared.lock().running = true;
        self.shared.run.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        Ok(())
    }
}

impl Snapshottable for FakeVm {
    fn id(&self) -> String {
        "vm".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        self.require_paused("snapshot")
            .map_err(|e| MigratableError::Snapshot {
                path: self.id(),
                source: e.into(),
            })?;
        let mut s = Snapshot::new(self.id());
        s.add_state_as("layout", 1, self.shared.memory.layout());
        s.add_state("workload", self.workload());
        s.snapshot_child(&mut self.devices)?;
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let fail = |e: String| MigratableError::Restore {
            path: "vm".into(),
            source: e.into(),
        };
        self.require_paused("restore").map_err(fail)?;
        snapshot.expect_id(&self.id())?;
        let section = snapshot.section("layout")?;
        if section.version() != 1 {
            return Err(MigratableError::Version {
                path: self.id(),
                section: "layout".into(),
                found: section.version(),
                min: 1,
                max: 1,
            });
        }
        let layout: Vec<MemoryRange> =
            section.decode().map_err(|source| MigratableError::Codec {
                path: self.id(),
                section: "layout".into(),
                source,
            })?;
        if layout != self.shared.memory.layout() {
            return Err(fail(format!(
                "snapshot memory layout {layout:x?} differs from this VM's {:x?}",
                self.shared.memory.layout()
            )));
        }
        let workload: WorkloadState = snapshot.state("workload")?;
        for r in &workload.area {
            migration_core::memory::check_range(&layout, *r).map_err(|e| fail(e.to_string()))?;
            if r.gpa % PAGE_SIZE != 0 || r.length % PAGE_SIZE != 0 {
                return Err(fail(format!("workload area {r:x?} is not page-aligned")));
            }
        }
        snapshot.restore_child(&mut self.devices)?;
        self.shared.lock().workload = workload;
        Ok(())
    }
}

impl Transportable for FakeVm {
    fn codecs(&self) -> &CodecRegistry {
        &self.codecs
    }
}

impl Migratable for FakeVm {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.shared.memory.take_dirty();
        self.dirty_logging = true;
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.dirty_logging = false;
        Ok(())
    }

    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        if !self.dirty_logging {
            return Err(MigratableError::Snapshot {
                path: self.id(),
                source: "dirty_log called without start_dirty_log".into(),
            });
        }
        // The writes due by now are in this log, however the thread was scheduled.
        self.shared.catch_up(&mut self.shared.lock())?;
        Ok(self.shared.memory.take_dirty())
    }

    /// The fake's throttle is exact: the workload's rate times `1 - percent/100`,
    /// paced afresh from the call.
    fn can_throttle(&self) -> bool {
        true
    }

    fn set_throttle(&mut self, percent: u8) -> Result<(), MigratableError> {
        let mut ctl = self.shared.lock();
        // Writes due at the old rate happen first.
        self.shared.catch_up(&mut ctl)?;
        ctl.throttle = percent.min(99);
        ctl.pacing = false;
        drop(ctl);
        self.shared.wake.notify_all();
        self.throttles.push(percent.min(99));
        Ok(())
    }

    fn start_migration(&mut self, role: MigrationRole) -> Result<(), MigratableError> {
        self.migrating = true;
        self.role = Some(role);
        Ok(())
    }

    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        self.migrating = false;
        Ok(())
    }

    fn memory_source(&self) -> &dyn MemorySource {
        self.shared.memory.as_ref()
    }

    fn memory_sink(&self) -> &dyn MemorySink {
        self.shared.memory.as_ref()
    }
}

/// Postcopy: the pending pages are zero-filled and missing; the workload (and
/// [`FakeVm::touch`]) waits on them.
impl MissingPages for FakeVm {
    fn arm_missing(
        &mut self,
        pending: &MemoryRangeTable,
        faults: std::sync::mpsc::Sender<u64>,
    ) -> Result<Arc<dyn PagePlacer>, MigratableError> {
        let m = FakeMissing::arm(self.shared.memory.clone(), pending, faults)?;
        *self
            .shared
            .missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(m.clone());
        Ok(m)
    }

    fn disarm_missing(&mut self) -> Result<(), MigratableError> {
        if let Some(m) = self
            .shared
            .missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            m.abandon();
        }
        Ok(())
    }
}

impl FakeVm {
    /// Whether a migration is in progress (between `start_migration` and
    /// `complete_migration`).
    pub fn is_migrating(&self) -> bool {
        self.migrating
    }

    /// The role the current or last migration gave this VM (`None`: never migrated).
    pub fn migration_role(&self) -> Option<MigrationRole> {
        self.role
    }

    /// Whether dirty logging is on.
    pub fn is_dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// [`content_digest`](Self::content_digest) taken while paused (the VM is paused
    /// and resumed around it): what [`assert_source_intact`] compares with after a
    /// failed migration.
    pub fn paused_digest(&mut self) -> Result<u64, MigratableError> {
        self.pause()?;
        let digest = self.content_digest();
        self.resume()?;
        Ok(digest)
    }
}

/// Asserts that `source` survived a failed migration: running, dirty logging off,
/// memory, devices and workload exactly as `digest` ([`FakeVm::paused_digest`] taken
/// before the migration) says, and its workload's self-check passes. Panics with
/// `context` and what differs otherwise (a test helper).
pub fn assert_source_intact(source: &mut FakeVm, digest: u64, context: &str) {
    assert!(source.is_running(), "{context}: source not running");
    assert!(
        !source.is_dirty_logging(),
        "{context}: dirty logging left on"
    );
    if let Err(e) = source.pause() {
        panic!("{context}: cannot pause the source: {e}");
    }
    assert_eq!(
        source.content_digest(),
        digest,
        "{context}: source state changed"
    );
    if let Err(e) = source.verify() {
        panic!("{context}: source self-check: {e}");
    }
    if let Err(e) = source.resume() {
        panic!("{context}: cannot resume the source: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_really_stops_the_workload() {
        let mut vm = FakeVm::builder()
            .memory_size(4 << 20)
            .workload(u64::MAX, 3)
            .build()
            .unwrap();
        // Wait (without timing assertions) until the workload has written something.
        while vm.workload().writes == 0 {
            thread::yield_now();
        }
        vm.pause().unwrap();
        let writes = vm.workload().writes;
        let digest = vm.memory().content_digest();
        vm.memory().take_dirty();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(vm.workload().writes, writes);
        assert_eq!(vm.memory().content_digest(), digest);
        assert!(vm.memory().take_dirty().is_empty());
        vm.verify().unwrap();
        vm.resume().unwrap();
        while vm.workload().writes == writes {
            thread::yield_now();
        }
        vm.pause().unwrap();
        vm.verify().unwrap();
    }

    #[test]
    fn verify_catches_stale_and_corrupt_pages() {
        let mut vm = FakeVm::builder()
            .memory_size(1 << 20)
            .workload(0, 9)
            .paused()
            .build()
            .unwrap();
        vm.run_workload_writes(2000).unwrap(); // 256 pages: every page rewritten
        vm.verify().unwrap();
        // Stale: put an older write's pattern back on its page.
        let w = vm.workload();
        let (i, gpa) = (0..w.writes)
            .map(|i| (i, w.page_gpa(w.target(i))))
            .find(|&(i, gpa)| (i + 1..w.writes).any(|j| w.page_gpa(w.target(j)) == gpa))
            .unwrap();
        let mut old = vec![0u8; PAGE_SIZE as usize];
        w.pattern(i, gpa, &mut old);
        let mut saved = vec![0u8; PAGE_SIZE as usize];
        vm.memory().read_memory(gpa, &mut saved).unwrap();
        vm.memory().write_memory(gpa, &old).unwrap();
        let err = vm.verify().unwrap_err();
        assert!(
            err.contains(&format!("page {gpa:#x}")) && err.contains(&format!("write #{i} ")),
            "{err}"
        );
        vm.memory().write_memory(gpa, &saved).unwrap();
        vm.verify().unwrap();
        vm.memory().write_memory(gpa + 100, &[0x55]).unwrap();
        assert!(vm
            .verify()
            .unwrap_err()
            .contains("first difference at byte 100"));
        vm.resume().unwrap();
        assert!(vm.verify().is_err());
        vm.pause().unwrap();
        assert!(vm.snapshot().is_ok());
    }

    #[test]
    fn snapshot_and_restore_need_a_paused_vm_and_a_matching_layout() {
        let mut vm = FakeVm::builder().memory_size(1 << 20).build().unwrap();
        assert!(vm.snapshot().is_err());
        vm.pause().unwrap();
        let snap = vm.snapshot().unwrap();
        let mut other =
            FakeVm::destination(&[MemoryRange::new(0, 2 << 20)], CodecRegistry::new()).unwrap();
        let err = other.restore(&snap).unwrap_err();
        assert!(err.to_string().contains("layout"), "{err}");
        let mut same = FakeVm::destination_for(&vm).unwrap();
        same.restore(&snap).unwrap();
    }

    #[test]
    fn dirty_log_reports_workload_writes() {
        let mut vm = FakeVm::builder()
            .memory_size(1 << 20)
            .workload(0, 1)
            .paused()
            .build()
            .unwrap();
        assert!(vm.dirty_log().is_err());
        vm.start_dirty_log().unwrap();
        vm.run_workload_writes(1).unwrap();
        let w = vm.workload();
        let gpa = w.page_gpa(w.target(0));
        assert_eq!(
            vm.dirty_log().unwrap().ranges(),
            &[MemoryRange::new(gpa, PAGE_SIZE)]
        );
        assert!(vm.dirty_log().unwrap().is_empty());
    }
}
