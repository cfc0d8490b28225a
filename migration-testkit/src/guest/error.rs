//! The error type of the guest loader and run helpers.

/// Errors of the guest loader, [`TestVm`](super::TestVm) and [`run_until`](super::run_until).
///
/// A guest that *fails its self-check* is not an error: that is a
/// [`Verdict::Fail`](super::Verdict::Fail). These are failures of the host side.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The image is empty.
    #[error("guest image is empty")]
    EmptyImage,
    /// The image does not fit in [`IMAGE_ADDR`](super::IMAGE_ADDR)..[`IMAGE_END`](super::IMAGE_END).
    #[error("guest image is {len} bytes, at most {max} fit the guest ABI")]
    ImageTooLarge {
        /// Size of the rejected image.
        len: usize,
        /// Largest size allowed.
        max: usize,
    },
    /// Guest RAM is not one range starting at 0 of at least [`MIN_RAM_SIZE`](super::MIN_RAM_SIZE).
    #[error(
        "guest RAM must be contiguous from GPA 0 and at least {min} bytes, found {found} bytes"
    )]
    RamTooSmall {
        /// Contiguous RAM found from GPA 0.
        found: u64,
        /// Minimum required.
        min: u64,
    },
    /// Reading an image file failed.
    #[error("cannot read guest image {path}: {source}")]
    ImageFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Access to guest memory failed.
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Allocating guest memory failed.
    #[error("cannot allocate guest memory: {0}")]
    Alloc(#[from] vm_memory::mmap::FromRangesError),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The operation (ioctl name).
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An ioctl transferred fewer entries than asked (e.g. `KVM_SET_MSRS` stops at the first bad MSR).
    #[error("{op} processed {done} of {expected} entries")]
    Partial {
        /// The operation (ioctl name).
        op: &'static str,
        /// Entries processed.
        done: usize,
        /// Entries requested.
        expected: usize,
    },
    /// A vCPU index at or above the vCPU count.
    #[error("vCPU {index} of a guest with {count} vCPUs")]
    VcpuIndex {
        /// The index.
        index: u32,
        /// The count.
        count: u32,
    },
    /// Making the vCPU kickable, or completing its pending I/O, failed.
    #[error(transparent)]
    Kick(#[from] migration_kvm::KvmStateError),
    /// Starting the watchdog thread failed.
    #[error("cannot start the watchdog thread: {0}")]
    Thread(std::io::Error),
}

impl GuestError {
    /// Wraps a KVM ioctl error with the name of the operation.
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| GuestError::Kvm { op, source }
    }
}
