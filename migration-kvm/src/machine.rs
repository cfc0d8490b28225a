//! A whole machine's state: its VM-wide devices and every one of its vCPUs, saved in
//! [`MACHINE_SAVE_ORDER`] and restored in [`MACHINE_RESTORE_ORDER`].
//!
//! Those tables say what a machine with several vCPUs needs beyond each vCPU's own
//! order: every vCPU is paused before any vCPU or device state is read or written;
//! the devices are restored before any vCPU; the vCPUs are independent of each other
//! then, so each is saved or restored on its own thread, all at once. Nothing here
//! resumes a vCPU: the caller does, after the last step.
//!
//! [`save_machine`] and [`restore_machine`] iterate the tables over any
//! [`VcpuGroup`]: `[VcpuRunner]` (vCPU threads, what [`KvmVm`](crate::KvmVm) uses),
//! or a recording fake (migration-testkit's `RecordingMachine`, which
//! `tests/restore_order.rs` uses to check the order call by call).

use kvm_ioctls::VmFd;
use migration_core::{MigratableError, Snapshot};

use crate::backend::VmBackend;
use crate::error::KvmStateError;
use crate::order::{MachineStep, Ordered, MACHINE_RESTORE_ORDER, MACHINE_SAVE_ORDER};
use crate::runner::VcpuRunner;
use crate::vcpu::VcpuState;
use crate::vm::{KvmVmDevices, VmState};

/// A machine's state: its VM-wide devices and every vCPU's, by index. Plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    /// The VM-wide devices.
    pub vm: VmState,
    /// vCPU `i`'s state at index `i`.
    pub vcpus: Vec<VcpuState>,
}

impl MachineState {
    /// Adds the state to a machine's snapshot node: child `devices`, then children
    /// `vcpu0`, `vcpu1`, …
    pub fn add_to(&self, snapshot: &mut Snapshot) {
        let mut devices = Snapshot::new(KvmVmDevices::<VmFd>::ID);
        self.vm.add_to(&mut devices);
        snapshot.add_child(devices);
        for (i, state) in self.vcpus.iter().enumerate() {
            let mut vcpu = Snapshot::new(vcpu_id(i));
            state.add_to(&mut vcpu);
            snapshot.add_child(vcpu);
        }
    }

    /// Reads the state of a machine with `vcpus` vCPUs from its snapshot node (what
    /// [`add_to`](Self::add_to) wrote). Every section is decoded before anything is
    /// restored; an error names the child it is in.
    pub fn from_snapshot(snapshot: &Snapshot, vcpus: usize) -> Result<Self, MigratableError> {
        let id = KvmVmDevices::<VmFd>::ID;
        let vm = VmState::from_snapshot(snapshot.child(id)?).map_err(|e| e.within(id))?;
        let vcpus = (0..vcpus)
            .map(|i| {
                let id = vcpu_id(i);
                VcpuState::from_snapshot(snapshot.child(&id)?).map_err(|e| e.within(&id))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { vm, vcpus })
    }
}

/// The snapshot id of vCPU `index`.
fn vcpu_id(index: usize) -> String {
    format!("vcpu{index}")
}

/// Errors of [`save_machine`] and [`restore_machine`], naming the part that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    /// The VM-wide devices.
    #[error("devices: {0}")]
    Devices(#[source] KvmStateError),
    /// One vCPU.
    #[error("vcpu{index}: {source}")]
    Vcpu {
        /// The vCPU.
        index: usize,
        /// What failed.
        #[source]
        source: KvmStateError,
    },
    /// A step the save needs is missing from [`MACHINE_SAVE_ORDER`] (a table edited
    /// wrong; its test catches it first).
    #[error("step `{0}` is not in MACHINE_SAVE_ORDER")]
    NotInOrder(MachineStep),
    /// A restore was given a different number of vCPU states than the machine has
    /// vCPUs (nothing was written).
    #[error("{states} vCPU states for a machine with {vcpus} vCPUs")]
    Count {
        /// States given.
        states: usize,
        /// vCPUs of the machine.
        vcpus: usize,
    },
}

impl MachineError {
    /// The error of vCPU `index`.
    pub fn vcpu(index: usize) -> impl FnOnce(KvmStateError) -> Self {
        move |source| MachineError::Vcpu { index, source }
    }
}

/// Into a [`MigratableError`] whose path names the part (`devices`, `vcpu3`) below
/// the machine's node; the caller adds its own id with [`MigratableError::within`].
impl From<MachineError> for MigratableError {
    fn from(e: MachineError) -> Self {
        match e {
            MachineError::Devices(e) => MigratableError::from(e).within(KvmVmDevices::<VmFd>::ID),
            MachineError::Vcpu { index, source } => {
                MigratableError::from(source).within(&vcpu_id(index))
            }
            count @ MachineError::Count { .. } => MigratableError::Restore {
                path: String::new(),
                source: Box::new(count),
            },
            order @ MachineError::NotInOrder(_) => MigratableError::Snapshot {
                path: String::new(),
                source: Box::new(order),
            },
        }
    }
}

/// The vCPUs of one machine, as [`save_machine`] and [`restore_machine`] drive them.
pub trait VcpuGroup {
    /// How many vCPUs.
    fn count(&self) -> usize;

    /// Pauses every vCPU: kicks all of them, then waits for each to be parked with its
    /// pending I/O completed. Leaves paused vCPUs paused.
    fn pause_all(&self) -> Result<(), MachineError>;

    /// Reads every vCPU's state ([`VCPU_SAVE_ORDER`](crate::order::VCPU_SAVE_ORDER)
    /// inside each); element `i` is vCPU `i`'s. Every vCPU is paused.
    fn save_all(&self) -> Result<Vec<VcpuState>, MachineError>;

    /// Writes `states[i]` into vCPU `i`
    /// ([`VCPU_RESTORE_ORDER`](crate::order::VCPU_RESTORE_ORDER) inside each). There
    /// are [`count`](Self::count) states and every vCPU is paused.
    fn restore_all(&self, states: &[VcpuState]) -> Result<(), MachineError>;
}

/// Saves a machine in [`MACHINE_SAVE_ORDER`]: pauses every vCPU (a paused one stays
/// paused), reads the devices, then every vCPU. The vCPUs stay paused.
pub fn save_machine<V: VmBackend, G: VcpuGroup + ?Sized>(
    devices: &KvmVmDevices<V>,
    vcpus: &G,
) -> Result<MachineState, MachineError> {
    let mut vm = None;
    let mut states = None;
    for Ordered { step, .. } in MACHINE_SAVE_ORDER {
        match step {
            MachineStep::PauseVcpus => vcpus.pause_all()?,
            MachineStep::Devices => {
                vm = Some(devices.save_state().map_err(MachineError::Devices)?);
            }
            MachineStep::Vcpus => states = Some(vcpus.save_all()?),
        }
    }
    Ok(MachineState {
        vm: vm.ok_or(MachineError::NotInOrder(MachineStep::Devices))?,
        vcpus: states.ok_or(MachineError::NotInOrder(MachineStep::Vcpus))?,
    })
}

/// Restores `state` into a machine in [`MACHINE_RESTORE_ORDER`]: pauses every vCPU
/// (a fresh machine's are), writes the devices, then every vCPU. Resume the vCPUs
/// only after it returns `Ok`. A state for another number of vCPUs is refused before
/// anything is written.
pub fn restore_machine<V: VmBackend, G: VcpuGroup + ?Sized>(
    devices: &KvmVmDevices<V>,
    vcpus: &G,
    state: &MachineState,
) -> Result<(), MachineError> {
    if state.vcpus.len() != vcpus.count() {
        return Err(MachineError::Count {
            states: state.vcpus.len(),
            vcpus: vcpus.count(),
        });
    }
    for Ordered { step, .. } in MACHINE_RESTORE_ORDER {
        match step {
            MachineStep::PauseVcpus => vcpus.pause_all()?,
            MachineStep::Devices => devices
                .restore_state(&state.vm)
                .map_err(MachineError::Devices)?,
            MachineStep::Vcpus => vcpus.restore_all(&state.vcpus)?,
        }
    }
    Ok(())
}

/// Resumes every vCPU thread: all are told to run before the first is waited for
/// (with more vCPUs than cores, waiting for each in turn costs a scheduler time slice
/// per vCPU).
pub fn resume_all(vcpus: &[VcpuRunner]) -> Result<(), MachineError> {
    let since: Vec<_> = vcpus.iter().map(VcpuRunner::request_resume).collect();
    for (i, (v, since)) in vcpus.iter().zip(since).enumerate() {
        v.wait_resumed(since).map_err(MachineError::vcpu(i))?;
    }
    Ok(())
}

/// vCPU threads: each vCPU's state is read and written on its own thread, all
/// threads at once (jobs are handed to every thread before the first result is
/// awaited).
impl VcpuGroup for [VcpuRunner] {
    fn count(&self) -> usize {
        self.len()
    }

    fn pause_all(&self) -> Result<(), MachineError> {
        for v in self {
            v.request_pause();
        }
        for (i, v) in self.iter().enumerate() {
            v.wait_paused().map_err(MachineError::vcpu(i))?;
        }
        Ok(())
    }

    fn save_all(&self) -> Result<Vec<VcpuState>, MachineError> {
        let jobs = self
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.submit(|vcpu| vcpu.save_state())
                    .map_err(MachineError::vcpu(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        jobs.into_iter()
            .enumerate()
            .map(|(i, job)| job.wait().and_then(|r| r).map_err(MachineError::vcpu(i)))
            .collect()
    }

    fn restore_all(&self, states: &[VcpuState]) -> Result<(), MachineError> {
        if states.len() != self.len() {
            return Err(MachineError::Count {
                states: states.len(),
                vcpus: self.len(),
            });
        }
        let jobs = self
            .iter()
            .zip(states)
            .enumerate()
            .map(|(i, (v, state))| {
                let state = state.clone();
                v.submit(move |vcpu| {
                    vcpu.restore_state(&state)?;
                    vcpu.reset_msr_list();
                    Ok(())
                })
                .map_err(MachineError::vcpu(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, job) in jobs.into_iter().enumerate() {
            job.wait()
                .and_then(|r: Result<(), KvmStateError>| r)
                .map_err(MachineError::vcpu(i))?;
        }
        Ok(())
    }
}
