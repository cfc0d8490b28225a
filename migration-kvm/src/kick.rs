//! Getting a vCPU out of `KVM_RUN` at any moment, and leaving it quiescent.
//!
//! A vCPU thread spends its time inside `KVM_RUN`; its state can only be read once it
//! is out and the exit it made is complete. The pieces, usable from any run loop:
//!
//! 1. [`install_kick_handler`] installs a handler for [`kick_signal`] (once per
//!    process, without `SA_RESTART`, so a `KVM_RUN` in progress returns `EINTR`).
//! 2. A vCPU thread wraps its vCPU in a [`KickableVcpu`]: the handler then also sets
//!    that vCPU's `kvm_run.immediate_exit`, so a kick that lands just *before* the
//!    thread enters `KVM_RUN` makes the entry return `EINTR` at once (no lost
//!    wake-up: the signal alone would be gone by then).
//! 3. Another thread sends the kick with [`kick`] (after setting whatever flag tells
//!    the vCPU thread to stop, under a lock: the thread reads it after `EINTR`).
//! 4. The vCPU thread calls [`complete_pending_io`]: `KVM_RUN` once more with
//!    `immediate_exit` set. KVM finishes the last port or MMIO exit (copies the
//!    data the VMM supplied into the guest's registers, advances RIP past the
//!    instruction) and returns `EINTR` without running guest code. Only now is the
//!    saved state that of an instruction boundary; without it, a restored vCPU
//!    executes its last `out` or `in` again, or loses the value of its last `in`.
//!
//! [`crate::park`] adds the parking and the jobs; [`crate::VcpuRunner`] is a run loop
//! built from both.
//!
//! ```no_run
//! use kvm_ioctls::{Kvm, VcpuExit};
//! use migration_kvm::KickableVcpu;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let mut fd = vm.create_vcpu(0)?;
//! // On the vCPU thread: a VMM's own loop, kickable.
//! let mut vcpu = KickableVcpu::new(&mut fd)?;
//! loop {
//!     match vcpu.run() {
//!         Ok(VcpuExit::Hlt) => break,
//!         Ok(_) => {}
//!         // Kicked: check the stop flag; to save state, complete the last exit.
//!         Err(e) if e.errno() == libc::EINTR => {
//!             vcpu.complete_pending_io()?;
//!             break;
//!         }
//!         Err(e) => return Err(e.into()),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::backend::VcpuBackend;
use crate::error::KvmStateError;
use crate::vcpu::KvmVcpu;

/// The signal that kicks a vCPU thread out of `KVM_RUN`: `SIGRTMIN + 1`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

thread_local! {
    /// The `kvm_run` page of the vCPU registered on this thread, for the handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` is the kvm_run mapping of the VcpuFd a `KickableVcpu` on
            // this thread holds; the pointer is cleared before that fd can be
            // dropped or replaced. A volatile byte store is what KVM's API asks
            // signal handlers to do.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the handler of [`kick_signal`] (once per process; later calls return
/// the first result). It replaces any handler another component set for that
/// signal. On a thread without a [`KickableVcpu`] the handler does nothing, and the
/// signal still interrupts a blocking call with `EINTR`.
pub fn install_kick_handler() -> Result<(), KvmStateError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| KvmStateError::Thread(format!("cannot install the kick signal handler: {e}")))
}

/// Sends [`kick_signal`] to `thread` (a `JoinHandle`, or any [`Killable`]). A thread
/// that already ended is not an error: there is nothing to kick.
pub fn kick(thread: &impl Killable) -> Result<(), KvmStateError> {
    match thread.kill(kick_signal()) {
        Err(e) if e.errno() != libc::ESRCH => Err(KvmStateError::Thread(format!(
            "cannot send the kick signal: {e}"
        ))),
        _ => Ok(()),
    }
}

/// Completes the exit `fd` last made (a port or MMIO access) without running guest
/// code: `KVM_RUN` with `immediate_exit` set, which returns `EINTR`. Call it on the
/// vCPU's thread before saving its state after an exit (see the [module
/// docs](self)); calling it when no exit is pending does nothing.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), KvmStateError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => {
            Err(KvmStateError::CompleteIo(e))
        }
        _ => Ok(()),
    }
}

/// A vCPU that holds a `VcpuFd`: the fd itself, a borrow of it, or a [`KvmVcpu`].
pub trait AsVcpuFd {
    /// The fd.
    fn vcpu_fd(&mut self) -> &mut VcpuFd;
}

impl AsVcpuFd for VcpuFd {
    fn vcpu_fd(&mut self) -> &mut VcpuFd {
        self
    }
}

impl AsVcpuFd for &mut VcpuFd {
    fn vcpu_fd(&mut self) -> &mut VcpuFd {
        self
    }
}

impl<B: VcpuBackend + AsVcpuFd> AsVcpuFd for KvmVcpu<B> {
    fn vcpu_fd(&mut self) -> &mut VcpuFd {
        self.backend_mut().vcpu_fd()
    }
}

/// A vCPU registered with its thread's kick handler: a kick sets its
/// `immediate_exit` (step 2 of the [module docs](self)).
///
/// One per thread, and it stays on the thread that made it (it is not `Send`).
/// While it lives, the fd cannot be dropped or replaced except through
/// [`with_vcpu`](Self::with_vcpu), which lifts the registration meanwhile.
#[derive(Debug)]
pub struct KickableVcpu<V: AsVcpuFd> {
    // Declared first, so dropped first: the handler forgets the fd before it goes.
    registration: Registration,
    vcpu: V,
}

/// This thread's registration; dropping it clears the handler's pointer. Not `Send`.
#[derive(Debug)]
struct Registration(PhantomData<*const ()>);

impl Registration {
    fn set(fd: &mut VcpuFd) {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
    }

    fn clear() {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        Self::clear();
    }
}

impl<V: AsVcpuFd> KickableVcpu<V> {
    /// Registers `vcpu` on the calling thread, installing the kick handler if needed.
    /// Fails if this thread already has a registered vCPU.
    pub fn new(mut vcpu: V) -> Result<Self, KvmStateError> {
        install_kick_handler()?;
        if KVM_RUN.with(|p| !p.get().is_null()) {
            return Err(KvmStateError::Thread(
                "this thread already has a kickable vCPU".into(),
            ));
        }
        Registration::set(vcpu.vcpu_fd());
        Ok(Self {
            registration: Registration(PhantomData),
            vcpu,
        })
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &V {
        &self.vcpu
    }

    /// Runs `f` with the vCPU, mutably. The registration is lifted meanwhile (`f`
    /// may even replace the fd): a kick that lands then only interrupts, so check
    /// the stop flag after `f` and before the next [`run`](Self::run), as
    /// [`PauseControl::checkpoint`](crate::PauseControl::checkpoint) does.
    pub fn with_vcpu<R>(&mut self, f: impl FnOnce(&mut V) -> R) -> R {
        Registration::clear();
        let r = f(&mut self.vcpu);
        Registration::set(self.vcpu.vcpu_fd());
        r
    }

    /// `KVM_RUN`. A kick makes it return `EINTR` (then call
    /// [`clear_immediate_exit`](Self::clear_immediate_exit) before running again, or
    /// [`complete_pending_io`](Self::complete_pending_io) to stop).
    pub fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.vcpu.vcpu_fd().run()
    }

    /// Clears `immediate_exit` after a kick, so the next [`run`](Self::run) enters the
    /// guest.
    pub fn clear_immediate_exit(&mut self) {
        self.vcpu.vcpu_fd().set_kvm_immediate_exit(0);
    }

    /// [`complete_pending_io`] on this vCPU: afterwards it is quiescent.
    pub fn complete_pending_io(&mut self) -> Result<(), KvmStateError> {
        complete_pending_io(self.vcpu.vcpu_fd())
    }

    /// Lifts the registration and returns the vCPU.
    pub fn into_inner(self) -> V {
        let Self { registration, vcpu } = self;
        drop(registration);
        vcpu
    }
}
