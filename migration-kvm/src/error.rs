//! [`KvmStateError`]: what can go wrong saving or restoring KVM state.

use migration_core::MigratableError;

use crate::layout::DeviceLayout;
use crate::order::{VcpuStep, VmStep};

/// Whether an error arose reading state out of KVM or writing it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A `KVM_GET_*` call (saving).
    Get,
    /// A `KVM_SET_*` call (restoring).
    Set,
}

/// Which step of the save/restore order failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A vCPU step.
    Vcpu(VcpuStep),
    /// A VM device step.
    Vm(VmStep),
    /// Querying a capability or a list (MSR index list, supported CPUID).
    Setup(&'static str),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vcpu(s) => write!(f, "{s}"),
            Self::Vm(s) => write!(f, "{s}"),
            Self::Setup(s) => f.write_str(s),
        }
    }
}

/// Errors of saving and restoring KVM vCPU and VM state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmStateError {
    /// An ioctl failed.
    #[error("{} {step} failed: {source}", match .direction { Direction::Get => "get", Direction::Set => "set" })]
    Ioctl {
        /// Which step.
        step: Step,
        /// Get or set.
        direction: Direction,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_MSRS`/`KVM_SET_MSRS` processed fewer MSRs than asked: it stops at the
    /// first MSR it refuses.
    #[error("{} MSR {index:#x} refused ({done} of {requested} MSRs in this chunk processed)", match .direction { Direction::Get => "reading", Direction::Set => "writing" })]
    Msr {
        /// Get or set.
        direction: Direction,
        /// The MSR KVM stopped at.
        index: u32,
        /// How many MSRs of the chunk were processed before it.
        done: usize,
        /// How many the chunk held.
        requested: usize,
    },
    /// A state piece is absent or malformed (e.g. an xsave area smaller than the
    /// host's, a CPUID table that is too long).
    #[error("invalid {step} state: {reason}")]
    Invalid {
        /// Which piece.
        step: Step,
        /// What is wrong.
        reason: String,
    },
    /// The caller asked to advance kvmclock by wall time, but the saved clock has no
    /// `KVM_CLOCK_REALTIME` timestamp (the source host's clocksource is not TSC-based).
    #[error("the saved kvmclock has no KVM_CLOCK_REALTIME timestamp: restore it with ClockRestore::Exact")]
    NoRealtimeClock,
    /// A VM's device state was saved from another [`DeviceLayout`] than the VM it
    /// is restored into has.
    #[error("device layout mismatch: the snapshot's VM had {snapshot}, this VM has {vm}")]
    Layout {
        /// The layout the state was saved from.
        snapshot: DeviceLayout,
        /// The layout of the VM restored into.
        vm: DeviceLayout,
    },
    /// Completing a vCPU's last exit (`KVM_RUN` with `immediate_exit`) failed.
    #[error("completing the vCPU's pending I/O (KVM_RUN with immediate_exit) failed: {0}")]
    CompleteIo(#[source] kvm_ioctls::Error),
    /// The vCPU thread is gone, or did not answer.
    #[error("vCPU thread: {0}")]
    Thread(String),
    /// The operation needs a paused vCPU.
    #[error("the vCPU is running: pause it first")]
    NotPaused,
}

impl KvmStateError {
    /// The failed step, if the error concerns one.
    pub fn step(&self) -> Option<Step> {
        match self {
            Self::Ioctl { step, .. } | Self::Invalid { step, .. } => Some(*step),
            Self::Msr { .. } => Some(Step::Vcpu(VcpuStep::Msrs)),
            Self::NoRealtimeClock => Some(Step::Vm(VmStep::Clock)),
            Self::Layout { .. } | Self::CompleteIo(_) | Self::Thread(_) | Self::NotPaused => None,
        }
    }

    pub(crate) fn get(step: Step) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Ioctl {
            step,
            direction: Direction::Get,
            source,
        }
    }

    pub(crate) fn set(step: Step) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Ioctl {
            step,
            direction: Direction::Set,
            source,
        }
    }

    /// This error as a [`MigratableError::Snapshot`] at component `path`.
    pub fn into_snapshot_error(self, path: &str) -> MigratableError {
        MigratableError::Snapshot {
            path: path.to_owned(),
            source: Box::new(self),
        }
    }

    /// This error as a [`MigratableError::Restore`] at component `path`.
    pub fn into_restore_error(self, path: &str) -> MigratableError {
        MigratableError::Restore {
            path: path.to_owned(),
            source: Box::new(self),
        }
    }
}

/// Get errors become [`MigratableError::Snapshot`], set errors
/// [`MigratableError::Restore`], others [`MigratableError::Pause`]; the path is empty
/// (a component fills it in with [`MigratableError::within`]). Recover the
/// [`KvmStateError`] by downcasting the source.
impl From<KvmStateError> for MigratableError {
    fn from(e: KvmStateError) -> Self {
        match &e {
            KvmStateError::Ioctl {
                direction: Direction::Get,
                ..
            }
            | KvmStateError::Msr {
                direction: Direction::Get,
                ..
            } => e.into_snapshot_error(""),
            KvmStateError::Thread(_) | KvmStateError::NotPaused | KvmStateError::CompleteIo(_) => {
                MigratableError::Pause {
                    path: String::new(),
                    source: Box::new(e),
                }
            }
            _ => e.into_restore_error(""),
        }
    }
}
