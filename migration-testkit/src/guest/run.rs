//! A single-vCPU run loop with a timeout, for tests.
//!
//! A guest can spin in ring 3 for ever without a single exit, so a timeout
//! cannot rely on exits: [`run_until`] starts a watchdog thread that, once the
//! deadline has passed, sends migration-kvm's [`kick_signal`] to the vCPU thread
//! every millisecond until the run loop notices. The vCPU runs as a
//! [`KickableVcpu`], so a kick makes `KVM_RUN` return `EINTR` even when it lands
//! just before the entry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use migration_kvm::{kick_signal, KickableVcpu};

use super::error::GuestError;
use super::monitor::{PortMonitor, Verdict};

/// Kicks the thread that created it once its deadline passes; stops on drop.
struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(deadline: Instant) -> Result<Self, GuestError> {
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("vcpu-watchdog".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < deadline {
                        thread::park_timeout(deadline - now);
                        continue;
                    }
                    // SAFETY: `target` is the thread that owns this Watchdog; it
                    // joins this thread in Drop before it can exit, so the handle
                    // is valid. The signal's handler is migration-kvm's (installed
                    // by `KickableVcpu::new`).
                    unsafe { libc::pthread_kill(target, kick_signal()) };
                    thread::park_timeout(Duration::from_millis(1));
                }
            })
            .map_err(GuestError::Thread)?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn is_interrupted(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::EINTR | libc::EAGAIN)
}

/// Runs `vcpu` on the calling thread, feeding port writes to `monitor`, until
/// the verdict is final or `timeout` has passed (then the verdict is a
/// [`Failure::Timeout`](super::Failure::Timeout) unless it already passed).
///
/// Any exit other than a port write fails the run. On return the vCPU is at an
/// instruction boundary (a pending `out` is completed with migration-kvm's
/// [`complete_pending_io`](migration_kvm::complete_pending_io)), so its state can
/// be saved and the run resumed by calling this again. Returns `Err` only for
/// host-side failures (an ioctl error other than `EINTR`/`EAGAIN`).
pub fn run_until(
    vcpu: &mut VcpuFd,
    monitor: &mut PortMonitor,
    timeout: Duration,
) -> Result<Verdict, GuestError> {
    let mut vcpu = KickableVcpu::new(vcpu)?;
    let deadline = Instant::now() + timeout;
    let watchdog = Watchdog::start(deadline)?;
    let mut pending_io = false;
    let verdict = loop {
        if monitor.verdict().is_final() {
            break monitor.verdict().clone();
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pending_io = true;
                monitor.on_io_out(port, data);
            }
            Ok(exit) => {
                let what = format!("{exit:?}");
                pending_io = false;
                break monitor.on_unexpected_exit(what);
            }
            Err(e) if is_interrupted(&e) => {
                vcpu.clear_immediate_exit();
                pending_io = false
            }
            Err(source) => {
                return Err(GuestError::Kvm {
                    op: "KVM_RUN",
                    source,
                })
            }
        }
        if Instant::now() >= deadline {
            break monitor.on_timeout();
        }
    };
    drop(watchdog);
    if pending_io {
        vcpu.complete_pending_io()?;
    }
    Ok(verdict)
}
