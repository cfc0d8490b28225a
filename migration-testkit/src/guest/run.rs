//! A single-vCPU run loop with a timeout, for tests.
//!
//! A guest can spin in ring 3 for ever without a single exit, so a timeout
//! cannot rely on exits: [`run_until`] starts a watchdog thread that, once the
//! deadline has passed, sends [`kick_signal`] to the vCPU thread every
//! millisecond until the run loop notices. The signal has a no-op handler
//! (installed by [`install_kick_handler`], without `SA_RESTART`), so a
//! `KVM_RUN` in progress returns `EINTR`. Repeating the signal closes the race
//! where it lands just before the thread enters `KVM_RUN`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::error::GuestError;
use super::monitor::{PortMonitor, Verdict};

/// The signal used to kick a vCPU thread out of `KVM_RUN`: `SIGRTMIN()`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs a no-op handler for [`kick_signal`] (once per process; later calls
/// return the first result). Installing it replaces any handler another
/// component set for that signal, which is fine if that one is a no-op too.
pub fn install_kick_handler() -> Result<(), GuestError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), noop_handler));
    (*installed).map_err(GuestError::Signal)
}

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
                    // is valid. The signal has a no-op handler (install_kick_handler).
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

/// Completes a port or MMIO exit still pending in KVM by running the vCPU with
/// `immediate_exit` set: KVM finishes the instruction (for `out`, advances RIP
/// past it) and returns `EINTR` without running guest code.
///
/// Call it before saving vCPU state after an I/O exit; otherwise the saved RIP
/// points at the `out` and a restored vCPU executes it again.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), GuestError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_interrupted(&e) => Ok(()),
        Err(source) => Err(GuestError::Kvm {
            op: "KVM_RUN (immediate_exit)",
            source,
        }),
    }
}

/// Runs `vcpu` on the calling thread, feeding port writes to `monitor`, until
/// the verdict is final or `timeout` has passed (then the verdict is a
/// [`Failure::Timeout`](super::Failure::Timeout) unless it already passed).
///
/// Any exit other than a port write fails the run. On return the vCPU is at an
/// instruction boundary (a pending `out` is completed with
/// [`complete_pending_io`]), so its state can be saved and the run resumed by
/// calling this again. Returns `Err` only for host-side failures (an ioctl
/// error other than `EINTR`/`EAGAIN`).
pub fn run_until(
    vcpu: &mut VcpuFd,
    monitor: &mut PortMonitor,
    timeout: Duration,
) -> Result<Verdict, GuestError> {
    install_kick_handler()?;
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
            Err(e) if is_interrupted(&e) => pending_io = false,
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
        complete_pending_io(vcpu)?;
    }
    Ok(verdict)
}
