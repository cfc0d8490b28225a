//! [`RecordingMachine`]: a fake VM and several fake vCPUs ([`RecordingVcpu`]s) that
//! record into one log, driven as migration-kvm's [`VcpuGroup`], so the order of a
//! whole machine's save and restore (every vCPU paused before any state is read,
//! devices before vCPUs) can be checked call by call without KVM.
//!
//! Pausing records a `"pause"` call per vCPU (all of them before it returns, as a
//! kick-all-then-wait pause does); saving and restoring run every vCPU on its own
//! thread at once, as migration-kvm's `VcpuRunner`s do, so the calls of different
//! vCPUs interleave.
//!
//! ```
//! use migration_kvm::{restore_machine, save_machine};
//! use migration_testkit::recording_machine::RecordingMachine;
//!
//! let m = RecordingMachine::new(4);
//! let state = save_machine(&m.devices(), &m).unwrap();
//! let calls = m.calls();
//! let first_get = calls.iter().position(|c| c.name.starts_with("get_")).unwrap();
//! let pauses = calls[..first_get].iter().filter(|c| c.name == "pause").count();
//! assert_eq!(pauses, 4, "every vCPU paused before the first read");
//!
//! let fresh = RecordingMachine::new(4);
//! restore_machine(&fresh.devices(), &fresh, &state).unwrap();
//! assert_eq!(save_machine(&fresh.devices(), &fresh).unwrap(), state);
//! ```

use std::sync::{Mutex, PoisonError};
use std::thread;

use migration_kvm::{
    ClockRestore, DeviceLayout, KvmStateError, KvmVcpu, KvmVmDevices, MachineError, VcpuGroup,
    VcpuState,
};

use crate::recording_vcpu::{Call, RecordingVcpu};

/// A fake machine: one fake VM and `n` fake vCPUs recording into one log.
#[derive(Debug)]
pub struct RecordingMachine {
    vm: RecordingVcpu,
    vcpus: Vec<RecordingVcpu>,
    refused_pause: Mutex<Option<u32>>,
}

impl RecordingMachine {
    /// A machine with `vcpus` vCPUs, each with its own state (see
    /// [`RecordingVcpu::sibling`]).
    pub fn new(vcpus: u32) -> Self {
        let vm = RecordingVcpu::new();
        let vcpus = (0..vcpus).map(|i| vm.sibling(i)).collect();
        Self {
            vm,
            vcpus,
            refused_pause: Mutex::new(None),
        }
    }

    /// The VM-wide devices over the fake VM (kvmclock restored exactly).
    pub fn devices(&self) -> KvmVmDevices<RecordingVcpu> {
        KvmVmDevices::new(
            self.vm.clone(),
            DeviceLayout::FULL_WITH_PIT,
            ClockRestore::Exact,
        )
    }

    /// Fake vCPU `index`.
    pub fn vcpu(&self, index: usize) -> &RecordingVcpu {
        &self.vcpus[index]
    }

    /// Every call so far, of the VM (`vcpu: None`) and of every vCPU, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.vm.calls()
    }

    /// Forgets the recorded calls.
    pub fn clear(&self) {
        self.vm.clear();
    }

    /// Makes pausing vCPU `index` fail (`None`: none fails), as a vCPU thread that
    /// ended would.
    pub fn refuse_pause(&self, index: Option<u32>) {
        *self
            .refused_pause
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = index;
    }

    fn vcpu_of(&self, i: usize) -> KvmVcpu<RecordingVcpu> {
        let fake = self.vcpus[i].clone();
        KvmVcpu::new(i as u32, fake.clone(), fake.caps())
    }
}

impl VcpuGroup for RecordingMachine {
    fn count(&self) -> usize {
        self.vcpus.len()
    }

    fn pause_all(&self) -> Result<(), MachineError> {
        let refused = *self
            .refused_pause
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, v) in self.vcpus.iter().enumerate() {
            v.note("pause");
            if refused == v.index() {
                return Err(MachineError::Vcpu {
                    index: i,
                    source: KvmStateError::Thread("refused to pause (test)".into()),
                });
            }
        }
        Ok(())
    }

    fn save_all(&self) -> Result<Vec<VcpuState>, MachineError> {
        thread::scope(|s| {
            let jobs: Vec<_> = (0..self.vcpus.len())
                .map(|i| {
                    let vcpu = self.vcpu_of(i);
                    s.spawn(move || vcpu.save_state())
                })
                .collect();
            jobs.into_iter()
                .enumerate()
                .map(|(i, j)| {
                    j.join()
                        .unwrap_or_else(|_| Err(KvmStateError::Thread("panicked".into())))
                        .map_err(MachineError::vcpu(i))
                })
                .collect()
        })
    }

    fn restore_all(&self, states: &[VcpuState]) -> Result<(), MachineError> {
        if states.len() != self.vcpus.len() {
            return Err(MachineError::Count {
                states: states.len(),
                vcpus: self.vcpus.len(),
            });
        }
        thread::scope(|s| {
            let jobs: Vec<_> = states
                .iter()
                .enumerate()
                .map(|(i, state)| {
                    let vcpu = self.vcpu_of(i);
                    s.spawn(move || vcpu.restore_state(state))
                })
                .collect();
            jobs.into_iter().enumerate().try_for_each(|(i, j)| {
                j.join()
                    .unwrap_or_else(|_| Err(KvmStateError::Thread("panicked".into())))
                    .map_err(MachineError::vcpu(i))
            })
        })
    }
}
