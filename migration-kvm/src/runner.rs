//! [`VcpuRunner`]: a vCPU running on its own thread, and the protocol that pauses it.
//!
//! A vCPU thread spends its time inside `KVM_RUN`. To read consistent state:
//! 1. the controller sets the pause request (under a mutex) and sends the thread the
//!    kick signal ([`kick_signal`], a real-time signal);
//! 2. the signal handler sets `kvm_run.immediate_exit = 1`: if the thread was in the
//!    guest, the signal already made `KVM_RUN` return `EINTR`; if it was about to
//!    enter, `immediate_exit` makes the entry return `EINTR` at once (no lost wake-up);
//! 3. the thread sees the request, then calls `KVM_RUN` once more with
//!    `immediate_exit = 1`: this completes a pending port/MMIO read (KVM copies the
//!    data the VMM supplied into the guest's registers on the next entry) and returns
//!    `EINTR` without running guest code;
//! 4. the thread reports itself parked; only then does [`pause`](VcpuRunner::pause)
//!    return. The vCPU is quiescent: its state can be read.
//!
//! While parked, the thread runs closures sent with [`with_vcpu`](VcpuRunner::with_vcpu)
//! (save, restore) on its own [`KvmVcpu`], so the `VcpuFd` never leaves its thread.
//!
//! Port I/O exits go to an [`ExitHandler`]: a test guest's ports can be monitored, and
//! the handler can stop the vCPU ([`ExitAction::Pause`]).

use std::cell::Cell;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::error::KvmStateError;
use crate::vcpu::{KvmVcpu, VcpuState};

/// What a vCPU exit handler sees.
#[derive(Debug)]
pub enum ExitEvent<'a> {
    /// `OUT` to `port` with `data` (1, 2 or 4 bytes).
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// `IN` from `port`: fill `data`; KVM hands it to the guest on the next entry.
    IoIn {
        /// The port.
        port: u16,
        /// The bytes to return.
        data: &'a mut [u8],
    },
    /// Any other exit, described (`"Hlt"`, `"Shutdown"`, `"InternalError"`…).
    Other(String),
}

/// What the vCPU thread does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Park the vCPU, as if [`VcpuRunner::pause`] had been called. The exit is
    /// recorded ([`VcpuRunner::last_exit`]).
    Pause,
}

/// Handles vCPU exits on the vCPU thread.
pub type ExitHandler = Box<dyn FnMut(ExitEvent<'_>) -> ExitAction + Send>;

/// The signal that kicks a vCPU thread out of `KVM_RUN`: `SIGRTMIN + 1`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` is the kvm_run mapping of the VcpuFd this thread runs; it
            // stays mapped until the thread clears the pointer (before dropping the
            // fd). A volatile byte store is what KVM's API asks signal handlers to do.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    });
}

fn install_kick_handler() -> Result<(), KvmStateError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| KvmStateError::Thread(format!("cannot install the kick signal handler: {e}")))
}

type Job = Box<dyn FnOnce(&mut KvmVcpu<VcpuFd>) + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Quit,
}

struct Ctl {
    request: Request,
    parked: bool,
    /// Incremented each time the thread leaves the parked state.
    resumed: u64,
    exited: bool,
    last_exit: Option<String>,
    jobs: Vec<Job>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A panic on the vCPU thread poisons the lock; the state is still coherent.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`KvmVcpu`] running on its own thread, pausable at any time.
///
/// A [`Snapshottable`] with the vCPU's id (`vcpu<N>`): `snapshot` and `restore` need
/// the vCPU paused and fail with [`KvmStateError::NotPaused`] otherwise.
pub struct VcpuRunner {
    id: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<KvmVcpu<VcpuFd>>>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.shared.lock();
        f.debug_struct("VcpuRunner")
            .field("id", &self.id)
            .field("request", &c.request)
            .field("parked", &c.parked)
            .field("last_exit", &c.last_exit)
            .finish()
    }
}

impl VcpuRunner {
    /// Starts a thread for `vcpu`, parked: call [`resume`](Self::resume) to run it
    /// (e.g. after restoring its state).
    pub fn spawn(vcpu: KvmVcpu<VcpuFd>, handler: ExitHandler) -> Result<Self, KvmStateError> {
        install_kick_handler()?;
        let id = format!("vcpu{}", vcpu.index());
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                request: Request::Pause,
                parked: false,
                resumed: 0,
                exited: false,
                last_exit: None,
                jobs: Vec::new(),
            }),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(id.clone())
            .spawn(move || vcpu_thread(vcpu, s, handler))
            .map_err(|e| KvmStateError::Thread(format!("cannot spawn: {e}")))?;
        let runner = Self {
            id,
            shared,
            thread: Some(thread),
        };
        runner.wait_parked(None)?;
        Ok(runner)
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // ESRCH if the thread already ended: nothing to kick.
            let _ = t.kill(kick_signal());
        }
    }

    /// Waits until the thread is parked (or `timeout` passes: `Ok(false)`).
    fn wait_parked(&self, timeout: Option<Duration>) -> Result<bool, KvmStateError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut c = self.shared.lock();
        while !c.parked {
            if c.exited {
                return Err(KvmStateError::Thread("the vCPU thread ended".into()));
            }
            match deadline {
                None => c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    c = self
                        .shared
                        .cv
                        .wait_timeout(c, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        Ok(true)
    }

    /// Pauses the vCPU: returns once it is out of `KVM_RUN`, its pending I/O is
    /// completed, and it is parked. Pausing a parked vCPU does nothing.
    pub fn pause(&self) -> Result<(), KvmStateError> {
        self.request_pause();
        self.wait_parked(None).map(|_| ())
    }

    /// The first half of [`pause`](Self::pause): asks the vCPU to park and kicks it
    /// out of `KVM_RUN`, without waiting. Kicking every vCPU of a VM before waiting
    /// for any pauses them all in about the time of one.
    pub fn request_pause(&self) {
        {
            let mut c = self.shared.lock();
            if c.request != Request::Run {
                // Parked, parking by itself (its exit handler asked) or already
                // kicked by whoever asked first: a signal would only wake it.
                return;
            }
            c.request = Request::Pause;
        }
        self.kick();
    }

    /// The second half of [`pause`](Self::pause): waits until the vCPU is parked.
    pub(crate) fn wait_paused(&self) -> Result<(), KvmStateError> {
        self.wait_parked(None).map(|_| ())
    }

    /// Resumes a parked vCPU; returns once its thread has left the parked state
    /// (so [`is_paused`](Self::is_paused) is `false` until it parks again).
    pub fn resume(&self) -> Result<(), KvmStateError> {
        let since = self.request_resume();
        self.wait_resumed(since)
    }

    /// The first half of [`resume`](Self::resume): tells the thread to run, without
    /// waiting. Returns what [`wait_resumed`](Self::wait_resumed) waits past (`None`:
    /// it was running already).
    pub(crate) fn request_resume(&self) -> Option<u64> {
        let mut c = self.shared.lock();
        if c.request == Request::Run {
            return None;
        }
        c.request = Request::Run;
        c.last_exit = None;
        self.shared.cv.notify_all();
        Some(c.resumed)
    }

    /// The second half of [`resume`](Self::resume): waits until the thread has left
    /// the parked state it was in when [`request_resume`](Self::request_resume)
    /// returned `since`.
    pub(crate) fn wait_resumed(&self, since: Option<u64>) -> Result<(), KvmStateError> {
        let mut c = self.shared.lock();
        if let Some(resumed) = since {
            while c.parked && c.resumed == resumed {
                if c.exited {
                    break;
                }
                c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
        }
        if c.exited {
            return Err(KvmStateError::Thread("the vCPU thread ended".into()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the vCPU to park by itself (its handler returned
    /// [`ExitAction::Pause`] or an unhandled exit happened). Returns whether it did.
    pub fn wait_for_pause(&self, timeout: Duration) -> Result<bool, KvmStateError> {
        self.wait_parked(Some(timeout))
    }

    /// Whether the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.shared.lock().parked
    }

    /// The exit that made the vCPU park by itself, if any (cleared on resume).
    pub fn last_exit(&self) -> Option<String> {
        self.shared.lock().last_exit.clone()
    }

    /// Runs `f` on the vCPU thread with its [`KvmVcpu`]. The vCPU must be paused.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KvmVcpu<VcpuFd>) -> R + Send + 'static,
    ) -> Result<R, KvmStateError> {
        self.submit(f)?.wait()
    }

    /// [`with_vcpu`](Self::with_vcpu) without waiting: `f` runs on the vCPU thread
    /// while the caller goes on (e.g. submits to the next vCPU); its result comes from
    /// [`Submitted::wait`].
    pub(crate) fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KvmVcpu<VcpuFd>) -> R + Send + 'static,
    ) -> Result<Submitted<R>, KvmStateError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut c = self.shared.lock();
        if !c.parked || c.request != Request::Pause {
            return Err(KvmStateError::NotPaused);
        }
        c.jobs.push(Box::new(move |v| {
            let _ = tx.send(f(v));
        }));
        self.shared.cv.notify_all();
        Ok(Submitted(rx))
    }

    /// Saves the paused vCPU's state.
    pub fn save_state(&self) -> Result<VcpuState, KvmStateError> {
        self.with_vcpu(|v| v.save_state())?
    }

    /// Restores the paused vCPU's state.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), KvmStateError> {
        let state = state.clone();
        self.with_vcpu(move |v| {
            v.restore_state(&state)?;
            v.reset_msr_list();
            Ok(())
        })?
    }

    /// Stops the thread and returns the vCPU.
    pub fn stop(mut self) -> Result<KvmVcpu<VcpuFd>, KvmStateError> {
        self.quit()
    }

    fn quit(&mut self) -> Result<KvmVcpu<VcpuFd>, KvmStateError> {
        {
            let mut c = self.shared.lock();
            c.request = Request::Quit;
            self.shared.cv.notify_all();
        }
        self.kick();
        let t = self
            .thread
            .take()
            .ok_or_else(|| KvmStateError::Thread("already stopped".into()))?;
        t.join()
            .map_err(|_| KvmStateError::Thread("the vCPU thread panicked".into()))
    }
}

/// A job [`VcpuRunner::submit`] handed to a vCPU thread.
pub(crate) struct Submitted<R>(mpsc::Receiver<R>);

impl<R> Submitted<R> {
    /// Waits for the job's result.
    pub(crate) fn wait(self) -> Result<R, KvmStateError> {
        self.0
            .recv()
            .map_err(|_| KvmStateError::Thread("the vCPU thread dropped a request".into()))
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.quit();
        }
    }
}

fn describe(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoOut(p, d) => format!("IoOut({p:#x}, {d:?})"),
        VcpuExit::IoIn(p, d) => format!("IoIn({p:#x}, {} bytes)", d.len()),
        VcpuExit::MmioRead(a, d) => format!("MmioRead({a:#x}, {} bytes)", d.len()),
        VcpuExit::MmioWrite(a, d) => format!("MmioWrite({a:#x}, {d:?})"),
        VcpuExit::FailEntry(r, cpu) => format!("FailEntry(reason {r:#x}, cpu {cpu})"),
        VcpuExit::InternalError => "InternalError".into(),
        VcpuExit::Hlt => "Hlt".into(),
        VcpuExit::Shutdown => "Shutdown".into(),
        other => format!("{other:?}"),
    }
}

fn vcpu_thread(
    mut vcpu: KvmVcpu<VcpuFd>,
    shared: Arc<Shared>,
    mut handler: ExitHandler,
) -> KvmVcpu<VcpuFd> {
    let run_ptr: *mut kvm_run = vcpu.backend_mut().get_kvm_run();
    KVM_RUN.with(|p| p.set(run_ptr));
    let vcpu = vcpu_loop(vcpu, &shared, &mut handler);
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    let mut c = shared.lock();
    c.exited = true;
    c.parked = false;
    shared.cv.notify_all();
    drop(c);
    vcpu
}

fn vcpu_loop(
    mut vcpu: KvmVcpu<VcpuFd>,
    shared: &Shared,
    handler: &mut ExitHandler,
) -> KvmVcpu<VcpuFd> {
    loop {
        let request = shared.lock().request;
        if request != Request::Run {
            // Complete pending I/O without running guest code: with immediate_exit
            // set, KVM_RUN finishes the last exit's emulation and returns EINTR.
            let fd = vcpu.backend_mut();
            fd.set_kvm_immediate_exit(1);
            let _ = fd.run();
            fd.set_kvm_immediate_exit(0);
            if !park(&mut vcpu, shared) {
                return vcpu;
            }
            continue;
        }
        let action = match vcpu.backend_mut().run() {
            Ok(VcpuExit::IoOut(port, data)) => handler(ExitEvent::IoOut { port, data }),
            Ok(VcpuExit::IoIn(port, data)) => handler(ExitEvent::IoIn { port, data }),
            Ok(exit) => {
                let what = describe(&exit);
                let action = handler(ExitEvent::Other(what.clone()));
                if action == ExitAction::Pause {
                    shared.lock().last_exit = Some(what);
                }
                action
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.backend_mut().set_kvm_immediate_exit(0);
                ExitAction::Continue
            }
            Err(e) => {
                let what = format!("KVM_RUN failed: {e}");
                // Re-entering after an ioctl error would spin: always park.
                let _ = handler(ExitEvent::Other(what.clone()));
                shared.lock().last_exit = Some(what);
                ExitAction::Pause
            }
        };
        if action == ExitAction::Pause {
            let mut c = shared.lock();
            if c.request == Request::Run {
                c.request = Request::Pause;
            }
            if c.last_exit.is_none() {
                c.last_exit = Some("paused by the exit handler".into());
            }
        }
    }
}

/// Parks the thread until resumed (returns `true`) or told to quit (`false`),
/// running jobs meanwhile.
fn park(vcpu: &mut KvmVcpu<VcpuFd>, shared: &Shared) -> bool {
    let mut c = shared.lock();
    c.parked = true;
    shared.cv.notify_all();
    loop {
        let jobs = std::mem::take(&mut c.jobs);
        if !jobs.is_empty() {
            drop(c);
            for job in jobs {
                job(vcpu);
            }
            c = shared.lock();
            continue;
        }
        match c.request {
            Request::Run => {
                c.parked = false;
                c.resumed += 1;
                shared.cv.notify_all();
                return true;
            }
            Request::Quit => {
                c.parked = false;
                return false;
            }
            Request::Pause => c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Pausable for VcpuRunner {
    fn pause(&mut self) -> Result<(), MigratableError> {
        VcpuRunner::pause(self).map_err(|e| MigratableError::Pause {
            path: self.id.clone(),
            source: Box::new(e),
        })
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        VcpuRunner::resume(self).map_err(|e| MigratableError::Resume {
            path: self.id.clone(),
            source: Box::new(e),
        })
    }
}

impl Snapshottable for VcpuRunner {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let id = self.id.clone();
        let state = self.save_state().map_err(|e| e.into_snapshot_error(&id))?;
        let mut s = Snapshot::new(id);
        state.add_to(&mut s);
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        snapshot.expect_id(&self.id)?;
        let state = VcpuState::from_snapshot(snapshot)?;
        self.restore_state(&state)
            .map_err(|e| e.into_restore_error(&self.id))
    }
}
