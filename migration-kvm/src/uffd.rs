//! [`Userfault`]: a userfaultfd in MISSING mode, the one place this crate talks to
//! `userfaultfd(2)`.
//!
//! Postcopy's destination resumes the guest before all of its memory arrived. The
//! pages still to come are *missing* (never populated, or discarded with
//! `MADV_DONTNEED`); with the guest memory registered here, the first access to a
//! missing page — by a vCPU inside `KVM_RUN` (KVM's own page walk) or by a VMM thread
//! — blocks, and a message with its address can be read from the file descriptor
//! ([`Userfault::next_fault`]). [`Userfault::copy`] places the page's bytes atomically
//! and wakes every thread waiting on it; [`Userfault::zero`] places zeros.
//!
//! The definitions come from linux-raw-sys (the `userfaultfd` crate needs libclang to
//! build); the syscall from rustix. The descriptor is created without
//! `UFFD_USER_MODE_ONLY`: the faults of a vCPU happen in the kernel (KVM resolving
//! guest memory), and a user-mode-only descriptor would not see them. That needs
//! `CAP_SYS_PTRACE` (root) or `vm.unprivileged_userfaultfd = 1`.
//!
//! ```
//! use migration_kvm::uffd::Userfault;
//!
//! // Without permission (or kernel support) this host cannot do postcopy.
//! let Ok(uffd) = Userfault::new() else { return };
//! # let _ = uffd;
//! ```

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_copy, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};

/// Errors of userfaultfd calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// `userfaultfd(2)` failed: no kernel support, or no permission (not root and
    /// `vm.unprivileged_userfaultfd` is 0).
    #[error("userfaultfd: {0}")]
    Create(#[source] io::Error),
    /// An ioctl on the descriptor failed.
    #[error("{op} at {addr:#x} (+{len:#x}): {source}")]
    Ioctl {
        /// The ioctl (`UFFDIO_COPY`…).
        op: &'static str,
        /// Host address it was given.
        addr: u64,
        /// Length it was given.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks an ioctl this module needs on a registered range.
    #[error("userfaultfd: the kernel does not offer {0} on this memory")]
    Unsupported(&'static str),
    /// Reading a fault message failed.
    #[error("reading a userfaultfd message: {0}")]
    Read(#[source] io::Error),
}

/// What [`Userfault::copy`] or [`Userfault::zero`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The page was missing and now holds the bytes; its waiters were woken.
    Filled,
    /// The page was present already (placed earlier): nothing written. Its waiters,
    /// if any, were woken.
    AlreadyPresent,
}

/// A userfaultfd descriptor (MISSING mode), created with `O_CLOEXEC | O_NONBLOCK`.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

const PAGE: u64 = 4096;

fn ioctl_error(op: &'static str, addr: u64, len: u64) -> UffdError {
    UffdError::Ioctl {
        op,
        addr,
        len,
        source: io::Error::last_os_error(),
    }
}

impl Userfault {
    /// Opens a userfaultfd and negotiates the API (`UFFDIO_API`, no extra
    /// features). Fails with [`UffdError::Create`] where userfaultfd is not
    /// available to this process.
    pub fn new() -> Result<Self, UffdError> {
        use rustix::mm::UserfaultfdFlags;
        // SAFETY: the syscall only creates a descriptor; what it can do to memory
        // (block accesses to registered ranges, write pages into them) happens only
        // through the methods below, each with its own contract.
        let fd = unsafe {
            rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK)
        }
        .map_err(|e| UffdError::Create(e.into()))?;
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which lives
        // on this stack frame for the call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if ret != 0 {
            return Err(ioctl_error("UFFDIO_API", 0, 0));
        }
        Ok(Self { fd })
    }

    /// Registers `len` bytes at host address `addr` (page aligned) in MISSING mode:
    /// from now on the first access to a page of it that is not populated blocks
    /// until the page is placed ([`copy`](Self::copy), [`zero`](Self::zero)) or the
    /// range is unregistered. Fails with [`UffdError::Unsupported`] if the kernel
    /// cannot copy or zero pages into this memory.
    ///
    /// Registering memory this process does not use for the guest would make its
    /// other users block: register only guest memory, and keep this descriptor
    /// served while anything may touch it.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` on this
        // stack frame. It changes no memory contents: accesses to missing pages of
        // the range block until served, which the caller's contract (above) covers.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if ret != 0 {
            return Err(ioctl_error("UFFDIO_REGISTER", addr, len));
        }
        let have = |ioctl: u32| reg.ioctls & (1u64 << (ioctl & 0xff)) != 0;
        if !have(UFFDIO_COPY) {
            return Err(UffdError::Unsupported("UFFDIO_COPY"));
        }
        if !have(UFFDIO_ZEROPAGE) {
            return Err(UffdError::Unsupported("UFFDIO_ZEROPAGE"));
        }
        Ok(())
    }

    /// Unregisters a range: missing pages of it read as zero again on access, and
    /// threads waiting on it are woken.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uffdio_range { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` on this stack frame and
        // changes no memory contents.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
        if ret != 0 {
            return Err(ioctl_error("UFFDIO_UNREGISTER", addr, len));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next page fault and returns its host address,
    /// rounded down to the page; `Ok(None)` if none came in time. Messages other than
    /// page faults (none are enabled) are skipped.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll reads and writes exactly the one `pollfd` passed, which lives
        // on this stack frame for the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Read(e));
        }
        if ret == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; std::mem::size_of::<uffd_msg>()];
        match rustix::io::read(&self.fd, &mut buf) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => {
                return Err(UffdError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short userfaultfd message: {n} bytes"),
                )))
            }
            // Another reader took it, or a wake-up without a message.
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(UffdError::Read(e.into())),
        }
        // SAFETY: `buf` holds exactly one `uffd_msg` as the kernel wrote it; the
        // struct is plain data (integers and unions of integers), valid for any bytes,
        // and `read_unaligned` needs no alignment of `buf`.
        let msg: uffd_msg = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        if u32::from(msg.event) != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        // SAFETY: for UFFD_EVENT_PAGEFAULT the kernel fills the `pagefault` member of
        // the union; every bit pattern is a valid u64.
        let addr = unsafe { msg.arg.pagefault.address };
        Ok(Some(addr & !(PAGE - 1)))
    }

    /// Places `src` (a multiple of the page size) at host address `dst` (page
    /// aligned) atomically, and wakes the threads waiting on those pages.
    /// [`Placed::AlreadyPresent`] if the first page was populated already (nothing
    /// written; waiters woken).
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must be memory registered with this descriptor that
    /// no Rust reference points into (guest memory, accessed volatile): the kernel
    /// writes into it.
    pub unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<Placed, UffdError> {
        let len = src.len() as u64;
        let mut copy = uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from `src` (a live slice of that
        // length) and writes them at `dst`, which the caller guarantees is registered
        // guest memory no reference aliases; it reads and writes one `uffdio_copy`
        // on this stack frame.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        self.placed(ret, "UFFDIO_COPY", dst, len)
    }

    /// Places zeros at `len` bytes (page multiple) at host address `dst` (page
    /// aligned), atomically, and wakes the waiters; as [`copy`](Self::copy).
    ///
    /// # Safety
    /// As [`copy`](Self::copy).
    pub unsafe fn zero(&self, dst: u64, len: u64) -> Result<Placed, UffdError> {
        let mut zero = uffdio_zeropage {
            range: uffdio_range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE maps zero pages at `dst`, registered guest memory
        // no reference aliases (the caller's contract); it reads and writes one
        // `uffdio_zeropage` on this stack frame.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut zero) };
        self.placed(ret, "UFFDIO_ZEROPAGE", dst, len)
    }

    /// Turns a COPY or ZEROPAGE result into [`Placed`] (`EEXIST`: a page of the
    /// range was present, and the kernel stopped there).
    fn placed(&self, ret: i32, op: &'static str, dst: u64, len: u64) -> Result<Placed, UffdError> {
        if ret == 0 {
            return Ok(Placed::Filled);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            // Some page was populated already: nothing more is written; make sure
            // whoever waits on the range runs.
            self.wake(dst, len)?;
            return Ok(Placed::AlreadyPresent);
        }
        Err(UffdError::Ioctl {
            op,
            addr: dst,
            len,
            source: e,
        })
    }

    /// Wakes the threads waiting on `len` bytes at `addr` (after a page was placed
    /// some other way, or to let them retry).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = uffdio_range { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range` on this stack frame and
        // changes no memory.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        if ret != 0 {
            return Err(ioctl_error("UFFDIO_WAKE", addr, len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// An anonymous private mapping of `len` bytes, unmapped on drop.
    struct Map {
        addr: u64,
        len: usize,
    }

    impl Map {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self {
                addr: p as u64,
                len,
            }
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: exactly the mapping `new` created; nothing refers to it now.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    fn read_byte(addr: u64) -> u8 {
        // SAFETY: the tests pass addresses inside a live `Map`; volatile because
        // the kernel fills the page behind the compiler's back.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    /// Another thread touches missing pages and blocks; the pages are placed (one
    /// copied, one zeroed) from the fault messages, and the thread sees their bytes.
    #[test]
    fn a_fault_from_another_thread_is_served_by_copy_and_zero() {
        let uffd = match Userfault::new() {
            Ok(u) => Arc::new(u),
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let map = Map::new(4 * PAGE as usize);
        uffd.register_missing(map.addr, map.len as u64).unwrap();
        assert_eq!(uffd.next_fault(Duration::from_millis(10)).unwrap(), None);

        let base = map.addr;
        let toucher = std::thread::spawn(move || {
            let a = read_byte(base + PAGE + 123);
            let b = read_byte(base + 3 * PAGE + 5);
            (a, b)
        });
        let mut served = Vec::new();
        while served.len() < 2 {
            let Some(addr) = uffd.next_fault(Duration::from_secs(10)).unwrap() else {
                panic!("no fault within 10 s");
            };
            if addr == base + PAGE {
                let page = vec![0xabu8; PAGE as usize];
                // SAFETY: a page of the registered mapping, no reference into it.
                assert_eq!(unsafe { uffd.copy(addr, &page) }.unwrap(), Placed::Filled);
            } else {
                assert_eq!(addr, base + 3 * PAGE);
                // SAFETY: as above.
                assert_eq!(unsafe { uffd.zero(addr, PAGE) }.unwrap(), Placed::Filled);
            }
            served.push(addr);
        }
        assert_eq!(toucher.join().unwrap(), (0xab, 0));
        // Placing a present page writes nothing.
        let other = vec![1u8; PAGE as usize];
        // SAFETY: as above.
        let placed = unsafe { uffd.copy(base + PAGE, &other) };
        assert_eq!(placed.unwrap(), Placed::AlreadyPresent);
        assert_eq!(read_byte(base + PAGE), 0xab);
        // Unregistered, a missing page reads as zero without blocking.
        uffd.unregister(map.addr, map.len as u64).unwrap();
        assert_eq!(read_byte(base), 0);
    }
}
