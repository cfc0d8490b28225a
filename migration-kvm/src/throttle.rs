//! [`ThrottleTicker`]: kicks throttled vCPUs out of `KVM_RUN` once a time slice, so
//! the throttle's sleep ([`PauseControl::set_throttle`](crate::park::PauseControl::set_throttle))
//! applies even to a guest that never exits on its own.
//!
//! Auto-converge (migration-core's precopy driver) asks a VM to throttle its vCPUs
//! while precopy does not converge; [`KvmVm`](crate::KvmVm) does it by setting the
//! throttle on every [`VcpuRunner`](crate::VcpuRunner) and running one ticker for as
//! long as the throttle is on. A VMM with its own run loop does the same with its
//! `PauseControl`s and the kick of its vCPU threads.
//!
//! ```no_run
//! use std::time::Duration;
//! use migration_kvm::throttle::ThrottleTicker;
//!
//! // One kick function per vCPU thread (e.g. `VcpuRunner::kicker`).
//! let kicks: Vec<Box<dyn Fn() + Send + Sync>> = vec![Box::new(|| {})];
//! let ticker = ThrottleTicker::start(Duration::from_millis(10), kicks)?;
//! // ... the vCPUs sleep their share at each kick ...
//! drop(ticker); // stops and joins the thread
//! # Ok::<(), migration_kvm::KvmStateError>(())
//! ```

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::KvmStateError;

/// A kick of one vCPU thread.
pub type Kick = Box<dyn Fn() + Send + Sync>;

/// A thread that calls every kick once per `slice` until stopped (or dropped).
pub struct ThrottleTicker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for ThrottleTicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleTicker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl ThrottleTicker {
    /// Starts the thread: every `slice` (at least 1 ms) it calls each of `kicks`.
    pub fn start(slice: Duration, kicks: Vec<Kick>) -> Result<Self, KvmStateError> {
        let slice = slice.max(Duration::from_millis(1));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let mut next = Instant::now() + slice;
                loop {
                    if *stopped {
                        return;
                    }
                    let now = Instant::now();
                    if now < next {
                        stopped = cv
                            .wait_timeout(stopped, next - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        continue;
                    }
                    next = now + slice;
                    for kick in &kicks {
                        kick();
                    }
                }
            })
            .map_err(|e| KvmStateError::Thread(format!("cannot spawn the throttle ticker: {e}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ThrottleTicker {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn the_ticker_kicks_until_stopped() {
        let n = Arc::new(AtomicU64::new(0));
        let c = n.clone();
        let ticker = ThrottleTicker::start(
            Duration::from_millis(1),
            vec![Box::new(move || {
                c.fetch_add(1, Ordering::Relaxed);
            })],
        )
        .unwrap();
        while n.load(Ordering::Relaxed) < 3 {
            std::thread::yield_now();
        }
        ticker.stop();
        let after = n.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(n.load(Ordering::Relaxed), after, "no kick after stop");
    }
}
