//! [`VcpuRunner`]: a vCPU running on its own thread, pausable at any time, its
//! exits handed to the VMM's [`ExitHandler`].
//!
//! The runner is the pause protocol's pieces put together ([`kick`](mod@crate::kick),
//! [`crate::park`]); a VMM with its own run loop uses the pieces directly. To pause:
//! 1. the controller sets the pause request (under a mutex) and sends the thread the
//!    kick signal;
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
//! Every exit goes to the [`ExitHandler`] with its data ([`ExitEvent`]): port and
//! MMIO accesses, and any other exit as kvm-ioctls reports it. The handler can stop
//! the vCPU ([`ExitAction::Pause`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable};

use crate::error::KvmStateError;
use crate::kick::{install_kick_handler, kick, KickableVcpu};
use crate::park::{PauseControl, Request, Submitted};
use crate::vcpu::{KvmVcpu, VcpuState};

/// What a vCPU exit handler sees: the exit, with its data.
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
    /// A read of `data.len()` bytes at guest-physical `addr` outside RAM: fill `data`;
    /// KVM hands it to the guest on the next entry.
    MmioRead {
        /// The guest-physical address.
        addr: u64,
        /// The bytes to return.
        data: &'a mut [u8],
    },
    /// A write of `data` at guest-physical `addr` outside RAM.
    MmioWrite {
        /// The guest-physical address.
        addr: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// Any other exit, as kvm-ioctls reports it (`Hlt`, `Shutdown`, `IoapicEoi`,
    /// `SystemEvent`, `FailEntry`, `InternalError`…), with its data.
    Other(VcpuExit<'a>),
    /// `KVM_RUN` failed (other than `EINTR`/`EAGAIN`): the vCPU parks whatever the
    /// handler answers (re-entering would fail again).
    RunFailed(&'a kvm_ioctls::Error),
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

/// A [`KvmVcpu`] running on its own thread, pausable at any time.
///
/// A [`Snapshottable`] with the vCPU's id (`vcpu<N>`): `snapshot` and `restore` need
/// the vCPU paused and fail with [`KvmStateError::NotPaused`] otherwise.
pub struct VcpuRunner {
    id: String,
    control: Arc<PauseControl<KvmVcpu<VcpuFd>>>,
    /// Shared with [`kicker`](Self::kicker)s: a kick holds the lock, so the thread is
    /// never joined while a signal is sent to it.
    thread: Arc<Mutex<Option<VcpuThread>>>,
}

type VcpuThread = JoinHandle<Option<KvmVcpu<VcpuFd>>>;

fn kick_thread(thread: &Mutex<Option<VcpuThread>>) {
    if let Some(t) = thread
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        // Only fails if the signal cannot be sent at all; the wait that follows
        // then reports the thread's state.
        let _ = kick(t);
    }
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("id", &self.id)
            .field("control", &self.control)
            .finish()
    }
}

impl VcpuRunner {
    /// Starts a thread for `vcpu`, parked: call [`resume`](Self::resume) to run it
    /// (e.g. after restoring its state).
    pub fn spawn(vcpu: KvmVcpu<VcpuFd>, handler: ExitHandler) -> Result<Self, KvmStateError> {
        install_kick_handler()?;
        let id = format!("vcpu{}", vcpu.index());
        let control = Arc::new(PauseControl::new());
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name(id.clone())
            .spawn(move || vcpu_thread(vcpu, &c, handler))
            .map_err(|e| KvmStateError::Thread(format!("cannot spawn: {e}")))?;
        let runner = Self {
            id,
            control,
            thread: Arc::new(Mutex::new(Some(thread))),
        };
        runner.control.wait_parked(None)?;
        Ok(runner)
    }

    fn kick(&self) {
        kick_thread(&self.thread);
    }

    /// A function that kicks this vCPU out of `KVM_RUN` (from any thread, as often as
    /// needed; nothing once the vCPU thread was stopped): what a
    /// [`ThrottleTicker`](crate::throttle::ThrottleTicker) calls once a slice.
    pub fn kicker(&self) -> impl Fn() + Send + Sync + 'static {
        let thread = self.thread.clone();
        move || kick_thread(&thread)
    }

    /// Makes the vCPU sleep `percent` (at most 99) of every time slice
    /// ([`PauseControl::set_throttle`]); 0 lifts it. The vCPU is kicked so the new
    /// throttle applies at once; a guest that never exits also needs a kick every
    /// slice ([`ThrottleTicker`](crate::throttle::ThrottleTicker)).
    pub fn set_throttle(&self, percent: u8) {
        self.control.set_throttle(percent);
        self.kick();
    }

    /// The throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.control.throttle()
    }

    /// How many throttle sleeps the vCPU has taken.
    pub fn throttle_sleeps(&self) -> u64 {
        self.control.throttle_sleeps()
    }

    /// Pauses the vCPU: returns once it is out of `KVM_RUN`, its pending I/O is
    /// completed, and it is parked. Pausing a parked vCPU does nothing.
    pub fn pause(&self) -> Result<(), KvmStateError> {
        self.control.pause(|| self.kick())
    }

    /// The first half of [`pause`](Self::pause): asks the vCPU to park and kicks it
    /// out of `KVM_RUN` ([`PauseControl::request_pause`]), without waiting. Kicking
    /// every vCPU of a VM before waiting for any pauses them all in about the time of
    /// one.
    pub fn request_pause(&self) {
        if self.control.request_pause() {
            self.kick();
        }
    }

    /// The second half of [`pause`](Self::pause): waits until the vCPU is parked.
    pub(crate) fn wait_paused(&self) -> Result<(), KvmStateError> {
        self.control.wait_parked(None).map(|_| ())
    }

    /// Resumes a parked vCPU; returns once its thread has left the parked state
    /// (so [`is_paused`](Self::is_paused) is `false` until it parks again).
    pub fn resume(&self) -> Result<(), KvmStateError> {
        self.control.resume()
    }

    /// The first half of [`resume`](Self::resume) ([`PauseControl::request_resume`]).
    pub(crate) fn request_resume(&self) -> Option<u64> {
        self.control.request_resume()
    }

    /// The second half of [`resume`](Self::resume) ([`PauseControl::wait_resumed`]).
    pub(crate) fn wait_resumed(&self, since: Option<u64>) -> Result<(), KvmStateError> {
        self.control.wait_resumed(since)
    }

    /// Waits up to `timeout` for the vCPU to park by itself (its handler returned
    /// [`ExitAction::Pause`] or `KVM_RUN` failed). Returns whether it did.
    pub fn wait_for_pause(&self, timeout: Duration) -> Result<bool, KvmStateError> {
        self.control.wait_parked(Some(timeout))
    }

    /// Whether the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.control.is_parked()
    }

    /// The exit that made the vCPU park by itself, if any (cleared on resume).
    pub fn last_exit(&self) -> Option<String> {
        self.control.last_exit()
    }

    /// Runs `f` on the vCPU thread with its [`KvmVcpu`]. The vCPU must be paused.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KvmVcpu<VcpuFd>) -> R + Send + 'static,
    ) -> Result<R, KvmStateError> {
        self.control.run_on_vcpu(f)
    }

    /// [`with_vcpu`](Self::with_vcpu) without waiting: `f` runs on the vCPU thread
    /// while the caller goes on (e.g. submits to the next vCPU); its result comes from
    /// [`Submitted::wait`].
    pub(crate) fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KvmVcpu<VcpuFd>) -> R + Send + 'static,
    ) -> Result<Submitted<R>, KvmStateError> {
        self.control.submit(f)
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
        self.control.quit(|| self.kick());
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| KvmStateError::Thread("already stopped".into()))?;
        t.join()
            .map_err(|_| KvmStateError::Thread("the vCPU thread panicked".into()))?
            .ok_or_else(|| KvmStateError::Thread("the vCPU thread could not start".into()))
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        if self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            let _ = self.quit();
        }
    }
}

/// What [`VcpuRunner::last_exit`] says about an exit that parked the vCPU.
fn describe(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoOut(p, d) => format!("IoOut({p:#x}, {d:?})"),
        VcpuExit::IoIn(p, d) => format!("IoIn({p:#x}, {} bytes)", d.len()),
        VcpuExit::MmioRead(a, d) => format!("MmioRead({a:#x}, {} bytes)", d.len()),
        VcpuExit::MmioWrite(a, d) => format!("MmioWrite({a:#x}, {d:?})"),
        VcpuExit::FailEntry(r, cpu) => format!("FailEntry(reason {r:#x}, cpu {cpu})"),
        other => format!("{other:?}"),
    }
}

fn vcpu_thread(
    vcpu: KvmVcpu<VcpuFd>,
    control: &PauseControl<KvmVcpu<VcpuFd>>,
    mut handler: ExitHandler,
) -> Option<KvmVcpu<VcpuFd>> {
    // A fresh thread has no registered vCPU and `spawn` installed the handler, so
    // this does not fail; if it did, the vCPU could never be paused: never run it.
    let vcpu = match KickableVcpu::new(vcpu) {
        Ok(mut k) => {
            run_loop(&mut k, control, &mut handler);
            Some(k.into_inner())
        }
        Err(e) => {
            control.park_self(|| e.to_string());
            None
        }
    };
    control.exited();
    vcpu
}

fn run_loop(
    vcpu: &mut KickableVcpu<KvmVcpu<VcpuFd>>,
    control: &PauseControl<KvmVcpu<VcpuFd>>,
    handler: &mut ExitHandler,
) {
    loop {
        if control.checkpoint() != Request::Run {
            // Complete pending I/O without running guest code, then park.
            if let Err(e) = vcpu.complete_pending_io() {
                control.park_self(|| e.to_string());
            }
            if !vcpu.with_vcpu(|v| control.park(v)) {
                return;
            }
            continue;
        }
        let mut parked_by = None;
        let action = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => handler(ExitEvent::IoOut { port, data }),
            Ok(VcpuExit::IoIn(port, data)) => handler(ExitEvent::IoIn { port, data }),
            Ok(VcpuExit::MmioRead(addr, data)) => handler(ExitEvent::MmioRead { addr, data }),
            Ok(VcpuExit::MmioWrite(addr, data)) => handler(ExitEvent::MmioWrite { addr, data }),
            Ok(exit) => {
                let what = describe(&exit);
                let action = handler(ExitEvent::Other(exit));
                parked_by = Some(what);
                action
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.clear_immediate_exit();
                ExitAction::Continue
            }
            Err(e) => {
                let _ = handler(ExitEvent::RunFailed(&e));
                parked_by = Some(format!("KVM_RUN failed: {e}"));
                ExitAction::Pause
            }
        };
        if action == ExitAction::Pause {
            control.park_self(|| parked_by.unwrap_or_else(|| "paused by the exit handler".into()));
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
