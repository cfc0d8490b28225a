//! [`PauseControl`]: what a controller and a vCPU thread share to pause, resume and
//! stop the vCPU, and to run jobs on its thread while it is parked.
//!
//! The vCPU thread calls [`checkpoint`](PauseControl::checkpoint) before every guest
//! entry; when it answers [`Request::Pause`] the thread makes its vCPU quiescent
//! ([`complete_pending_io`](crate::complete_pending_io)) and calls [`park`](PauseControl::park),
//! which runs the jobs sent with [`run_on_vcpu`](PauseControl::run_on_vcpu) (save,
//! restore: the `VcpuFd` never leaves its thread) until it is resumed or told to quit.
//! The controller calls [`pause`](PauseControl::pause) (request, kick, wait until
//! parked) and [`resume`](PauseControl::resume).
//!
//! `checkpoint` is the one place the thread consults the controller between guest
//! entries, so a per-entry policy the controller sets belongs there: the **throttle**
//! ([`set_throttle`](PauseControl::set_throttle)) makes the thread sleep
//! `percent / (100 - percent)` of a [`THROTTLE_SLICE`] after each slice it ran, so the
//! vCPU runs `100 - percent` % of the time (QEMU's auto-converge arithmetic). A
//! guest that never exits must still be kicked out of `KVM_RUN` once a slice for the
//! sleep to apply ([`crate::throttle::ThrottleTicker`] does that). A pause, a quit or
//! a change of throttle ends a sleep at once.
//!
//! ```
//! use std::sync::Arc;
//! use migration_kvm::park::{PauseControl, Request};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The vCPU is a counter here; a VMM's is its `KickableVcpu`.
//! let control = Arc::new(PauseControl::<u64>::new());
//! let c = control.clone();
//! let thread = std::thread::spawn(move || {
//!     let mut vcpu = 0u64;
//!     loop {
//!         match c.checkpoint() {
//!             Request::Run => vcpu += 1, // KVM_RUN and the exit, here
//!             _ => {
//!                 // Kicked or told to stop: complete pending I/O, then park.
//!                 if !c.park(&mut vcpu) {
//!                     break;
//!                 }
//!             }
//!         }
//!     }
//!     c.exited();
//! });
//! control.wait_parked(None)?; // born parked
//! control.resume()?;
//! control.pause(|| { /* kick(&thread) for a real vCPU */ })?;
//! let seen = control.run_on_vcpu(|v| *v)?;
//! assert!(control.is_parked() && control.run_on_vcpu(|v| *v)? == seen);
//! control.quit(|| {});
//! thread.join().unwrap();
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The throttle's time slice: a throttled vCPU runs this long, then sleeps its share.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

use crate::error::KvmStateError;

/// A job [`PauseControl::submit`] handed to a vCPU thread.
#[derive(Debug)]
pub struct Submitted<R>(mpsc::Receiver<R>);

impl<R> Submitted<R> {
    /// Waits for the job's result.
    pub fn wait(self) -> Result<R, KvmStateError> {
        self.0
            .recv()
            .map_err(|_| KvmStateError::Thread("the vCPU thread dropped a request".into()))
    }
}

/// What the controller asks of the vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Run the guest.
    Run,
    /// Stop at an instruction boundary and park.
    Pause,
    /// Stop and end the thread.
    Quit,
}

/// A job run on the vCPU thread while it is parked.
pub type Job<V> = Box<dyn FnOnce(&mut V) + Send>;

struct Ctl<V> {
    request: Request,
    parked: bool,
    /// Incremented each time the thread leaves the parked state.
    resumed: u64,
    exited: bool,
    last_exit: Option<String>,
    jobs: Vec<Job<V>>,
    /// Percent of each time slice the thread sleeps (0: none).
    throttle: u8,
    /// When the thread last started running unthrottled-by-sleep (`None`: not
    /// counting, the throttle is off or the thread was parked).
    ran_since: Option<Instant>,
    /// Throttle sleeps taken.
    throttle_sleeps: u64,
}

/// The pause state a controller and one vCPU thread share (in an `Arc`). `V` is what
/// jobs receive: the thread's vCPU.
pub struct PauseControl<V> {
    ctl: Mutex<Ctl<V>>,
    cv: Condvar,
}

impl<V> fmt::Debug for PauseControl<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.lock();
        f.debug_struct("PauseControl")
            .field("request", &c.request)
            .field("parked", &c.parked)
            .field("exited", &c.exited)
            .field("last_exit", &c.last_exit)
            .field("throttle", &c.throttle)
            .finish_non_exhaustive()
    }
}

impl<V> Default for PauseControl<V> {
    fn default() -> Self {
        Self::new()
    }
}

fn ended() -> KvmStateError {
    KvmStateError::Thread("the vCPU thread ended".into())
}

impl<V> PauseControl<V> {
    /// A control whose vCPU thread parks as soon as it starts ([`Request::Pause`]).
    pub fn new() -> Self {
        Self {
            ctl: Mutex::new(Ctl {
                request: Request::Pause,
                parked: false,
                resumed: 0,
                exited: false,
                last_exit: None,
                jobs: Vec::new(),
                throttle: 0,
                ran_since: None,
                throttle_sleeps: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl<V>> {
        // A panic on the vCPU thread poisons the lock; the state is still coherent.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, c: MutexGuard<'a, Ctl<V>>) -> MutexGuard<'a, Ctl<V>> {
        self.cv.wait(c).unwrap_or_else(|e| e.into_inner())
    }

    // ---- The controller's side ----

    /// Pauses the vCPU: [`request_pause`](Self::request_pause), then `kick` (which
    /// sends the kick signal to the vCPU thread) if that asked for it, and returns
    /// once the thread is parked. Pausing a parked vCPU does nothing.
    pub fn pause(&self, kick: impl FnOnce()) -> Result<(), KvmStateError> {
        if self.request_pause() {
            kick();
        }
        self.wait_parked(None).map(|_| ())
    }

    /// The first half of [`pause`](Self::pause): asks the vCPU to park, without
    /// waiting. Returns whether the caller must kick the thread: only when this call
    /// turned [`Request::Run`] into [`Request::Pause`] (a parked vCPU, one parking by
    /// itself, or one already kicked by whoever asked first would only be woken).
    /// Kicking every vCPU of a VM before waiting for any pauses them all in about the
    /// time of one.
    pub fn request_pause(&self) -> bool {
        let mut c = self.lock();
        if c.request != Request::Run {
            return false;
        }
        c.request = Request::Pause;
        // A thread sleeping for the throttle wakes at once.
        self.cv.notify_all();
        true
    }

    /// Waits until the thread is parked, or `timeout` passes (`Ok(false)`).
    pub fn wait_parked(&self, timeout: Option<Duration>) -> Result<bool, KvmStateError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut c = self.lock();
        while !c.parked {
            if c.exited {
                return Err(ended());
            }
            match deadline {
                None => c = self.wait(c),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    c = self
                        .cv
                        .wait_timeout(c, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        Ok(true)
    }

    /// Resumes a parked vCPU; returns once its thread has left the parked state (so
    /// [`is_parked`](Self::is_parked) is `false` until it parks again).
    pub fn resume(&self) -> Result<(), KvmStateError> {
        let since = self.request_resume();
        self.wait_resumed(since)
    }

    /// The first half of [`resume`](Self::resume): tells the thread to run, without
    /// waiting. Returns what [`wait_resumed`](Self::wait_resumed) waits past (`None`:
    /// it was running already). Telling every vCPU of a VM to run before waiting for
    /// any spares a scheduler time slice per vCPU when they outnumber the cores.
    pub fn request_resume(&self) -> Option<u64> {
        let mut c = self.lock();
        if c.request == Request::Run {
            return None;
        }
        c.request = Request::Run;
        c.last_exit = None;
        self.cv.notify_all();
        Some(c.resumed)
    }

    /// The second half of [`resume`](Self::resume): waits until the thread has left
    /// the parked state it was in when [`request_resume`](Self::request_resume)
    /// returned `since`.
    pub fn wait_resumed(&self, since: Option<u64>) -> Result<(), KvmStateError> {
        let mut c = self.lock();
        if let Some(resumed) = since {
            while c.parked && c.resumed == resumed && !c.exited {
                c = self.wait(c);
            }
        }
        if c.exited {
            return Err(ended());
        }
        Ok(())
    }

    /// Tells the thread to end: sets the request and calls `kick`.
    pub fn quit(&self, kick: impl FnOnce()) {
        {
            let mut c = self.lock();
            c.request = Request::Quit;
            self.cv.notify_all();
        }
        kick();
    }

    /// Runs `f` on the parked vCPU's thread with its vCPU and returns what it
    /// returns: [`KvmStateError::NotPaused`] unless the vCPU is paused.
    pub fn run_on_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut V) -> R + Send + 'static,
    ) -> Result<R, KvmStateError> {
        self.submit(f)?.wait()
    }

    /// [`run_on_vcpu`](Self::run_on_vcpu) without waiting: `f` runs on the vCPU
    /// thread while the caller goes on (e.g. submits to the next vCPU); its result
    /// comes from [`Submitted::wait`].
    pub fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut V) -> R + Send + 'static,
    ) -> Result<Submitted<R>, KvmStateError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut c = self.lock();
        if !c.parked || c.request != Request::Pause {
            return Err(KvmStateError::NotPaused);
        }
        c.jobs.push(Box::new(move |v| {
            let _ = tx.send(f(v));
        }));
        self.cv.notify_all();
        Ok(Submitted(rx))
    }

    /// Whether the vCPU is parked.
    pub fn is_parked(&self) -> bool {
        self.lock().parked
    }

    /// Makes the thread sleep `percent` (at most 99) of every [`THROTTLE_SLICE`] at
    /// its [`checkpoint`](Self::checkpoint)s; 0 lifts the throttle, and a sleep in
    /// progress ends at once.
    pub fn set_throttle(&self, percent: u8) {
        let mut c = self.lock();
        c.throttle = percent.min(99);
        self.cv.notify_all();
    }

    /// The throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.lock().throttle
    }

    /// How many throttle sleeps the thread has taken.
    pub fn throttle_sleeps(&self) -> u64 {
        self.lock().throttle_sleeps
    }

    /// Why the vCPU parked by itself ([`park_self`](Self::park_self)), if it did
    /// (cleared on resume).
    pub fn last_exit(&self) -> Option<String> {
        self.lock().last_exit.clone()
    }

    // ---- The vCPU thread's side ----

    /// What the controller asks now; called before every guest entry. While
    /// [throttled](Self::set_throttle), a thread that has run for a
    /// [`THROTTLE_SLICE`] sleeps its share here first (woken early by a pause, a quit
    /// or a new throttle).
    pub fn checkpoint(&self) -> Request {
        let mut c = self.lock();
        if c.request != Request::Run || c.throttle == 0 {
            c.ran_since = None;
            return c.request;
        }
        let now = Instant::now();
        let since = *c.ran_since.get_or_insert(now);
        if now.duration_since(since) < THROTTLE_SLICE {
            return Request::Run;
        }
        let p = u32::from(c.throttle);
        let until = now + THROTTLE_SLICE * p / (100 - p);
        let throttle = c.throttle;
        c.throttle_sleeps += 1;
        while c.request == Request::Run && c.throttle == throttle {
            let now = Instant::now();
            if now >= until {
                break;
            }
            c = self
                .cv
                .wait_timeout(c, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        c.ran_since = Some(Instant::now());
        c.request
    }

    /// The vCPU thread decides to park (its exit handler said so, or `KVM_RUN`
    /// failed), for the reason `why`; it parks at its next
    /// [`checkpoint`](Self::checkpoint). A reason already recorded is kept.
    pub fn park_self(&self, why: impl FnOnce() -> String) {
        let mut c = self.lock();
        if c.request == Request::Run {
            c.request = Request::Pause;
        }
        if c.last_exit.is_none() {
            c.last_exit = Some(why());
        }
    }

    /// Parks the thread, running jobs on `vcpu` meanwhile, until it is resumed
    /// (`true`) or told to quit (`false`). Call it with the vCPU quiescent.
    pub fn park(&self, vcpu: &mut V) -> bool {
        let mut c = self.lock();
        c.parked = true;
        self.cv.notify_all();
        loop {
            let jobs = std::mem::take(&mut c.jobs);
            if !jobs.is_empty() {
                drop(c);
                for job in jobs {
                    job(vcpu);
                }
                c = self.lock();
                continue;
            }
            match c.request {
                Request::Run => {
                    c.parked = false;
                    c.resumed += 1;
                    self.cv.notify_all();
                    return true;
                }
                Request::Quit => {
                    c.parked = false;
                    return false;
                }
                Request::Pause => c = self.wait(c),
            }
        }
    }

    /// The thread is ending: controllers waiting for it get an error instead of
    /// waiting for ever.
    pub fn exited(&self) {
        let mut c = self.lock();
        c.exited = true;
        c.parked = false;
        c.jobs.clear();
        self.cv.notify_all();
    }
}
