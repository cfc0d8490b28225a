//! [`VmState`] (the VM's in-kernel devices as plain data) and [`KvmVmDevices`].

use kvm_bindings::{
    kvm_clock_data, kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_state2,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable};
use zerocopy::IntoBytes;

use crate::backend::VmBackend;
use crate::error::{KvmStateError, Step};
use crate::order::{Ordered, VmStep, VM_RESTORE_ORDER, VM_SAVE_ORDER};
use crate::state::Raw;

/// How `KVM_SET_CLOCK` restores kvmclock. The caller chooses; there is no default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockRestore {
    /// The guest clock resumes at the saved value, as if no time had passed
    /// (`flags = 0`). Right for a snapshot restored later: the guest sees no jump.
    Exact,
    /// The guest clock is advanced by the wall time elapsed since the save
    /// (`flags = KVM_CLOCK_REALTIME`), as on a live migration where the guest should
    /// keep wall-clock time. Needs a saved clock with `KVM_CLOCK_REALTIME` set
    /// (a TSC-based clocksource on the source host), else
    /// [`KvmStateError::NoRealtimeClock`].
    AdvanceByWallTime,
}

/// The VM-wide in-kernel device state: plain data, no file descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// The i8254 PIT.
    pub pit2: Raw<kvm_pit_state2>,
    /// kvmclock (`KVM_GET_CLOCK`), with its `KVM_CLOCK_REALTIME` timestamp when the host has one.
    pub clock: Raw<kvm_clock_data>,
    /// The master i8259 PIC.
    pub pic_master: Raw<kvm_pic_state>,
    /// The slave i8259 PIC.
    pub pic_slave: Raw<kvm_pic_state>,
    /// The IOAPIC.
    pub ioapic: Raw<kvm_ioapic_state>,
}

impl VmState {
    /// Adds every piece as its own section (named [`VmStep::name`]) to `snapshot`.
    pub fn add_to(&self, snapshot: &mut Snapshot) {
        snapshot.add_state(VmStep::Pit2.name(), self.pit2);
        snapshot.add_state(VmStep::Clock.name(), self.clock);
        snapshot.add_state(VmStep::PicMaster.name(), self.pic_master);
        snapshot.add_state(VmStep::PicSlave.name(), self.pic_slave);
        snapshot.add_state(VmStep::Ioapic.name(), self.ioapic);
    }

    /// Reads every piece from the sections of `snapshot`.
    pub fn from_snapshot(snapshot: &Snapshot) -> Result<Self, MigratableError> {
        Ok(Self {
            pit2: snapshot.state(VmStep::Pit2.name())?,
            clock: snapshot.state(VmStep::Clock.name())?,
            pic_master: snapshot.state(VmStep::PicMaster.name())?,
            pic_slave: snapshot.state(VmStep::PicSlave.name())?,
            ioapic: snapshot.state(VmStep::Ioapic.name())?,
        })
    }
}

fn invalid(step: VmStep, reason: &str) -> KvmStateError {
    KvmStateError::Invalid {
        step: Step::Vm(step),
        reason: reason.to_owned(),
    }
}

fn chip_id(step: VmStep) -> u32 {
    match step {
        VmStep::PicMaster => KVM_IRQCHIP_PIC_MASTER,
        VmStep::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
        _ => KVM_IRQCHIP_IOAPIC,
    }
}

/// Reads chip `step` with `KVM_GET_IRQCHIP` and returns its bytes as a `T`.
fn get_chip<T: crate::state::KvmStruct, V: VmBackend + ?Sized>(
    vm: &V,
    step: VmStep,
) -> Result<Raw<T>, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id: chip_id(step),
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(KvmStateError::get(Step::Vm(step)))?;
    // The union holds the chip's struct at its start; the rest is padding.
    let bytes = chip.chip.as_bytes();
    let n = std::mem::size_of::<T>();
    let value = bytes
        .get(..n)
        .and_then(|b| T::read_from_bytes(b).ok())
        .ok_or_else(|| invalid(step, "irqchip union smaller than the chip state"))?;
    Ok(Raw::new(value))
}

fn set_chip<T: crate::state::KvmStruct, V: VmBackend + ?Sized>(
    vm: &V,
    step: VmStep,
    value: &Raw<T>,
) -> Result<(), KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id: chip_id(step),
        ..Default::default()
    };
    let src = value.as_bytes();
    let dst = chip.chip.as_mut_bytes();
    dst.get_mut(..src.len())
        .ok_or_else(|| invalid(step, "chip state larger than the irqchip union"))?
        .copy_from_slice(src);
    vm.set_irqchip(&chip)
        .map_err(KvmStateError::set(Step::Vm(step)))
}

/// Saves `VmState` from `vm` in [`VM_SAVE_ORDER`]. All vCPUs must be paused.
pub fn save_vm_state<V: VmBackend + ?Sized>(vm: &V) -> Result<VmState, KvmStateError> {
    let (mut pit2, mut clock, mut master, mut slave, mut ioapic) = (None, None, None, None, None);
    for Ordered { step, .. } in VM_SAVE_ORDER {
        let get = KvmStateError::get(Step::Vm(*step));
        match step {
            VmStep::Pit2 => pit2 = Some(Raw::new(vm.get_pit2().map_err(get)?)),
            VmStep::Clock => clock = Some(Raw::new(vm.get_clock().map_err(get)?)),
            VmStep::PicMaster => master = Some(get_chip(vm, *step)?),
            VmStep::PicSlave => slave = Some(get_chip(vm, *step)?),
            VmStep::Ioapic => ioapic = Some(get_chip(vm, *step)?),
        }
    }
    let need = |step: VmStep| invalid(step, "not read: missing from VM_SAVE_ORDER");
    Ok(VmState {
        pit2: pit2.ok_or_else(|| need(VmStep::Pit2))?,
        clock: clock.ok_or_else(|| need(VmStep::Clock))?,
        pic_master: master.ok_or_else(|| need(VmStep::PicMaster))?,
        pic_slave: slave.ok_or_else(|| need(VmStep::PicSlave))?,
        ioapic: ioapic.ok_or_else(|| need(VmStep::Ioapic))?,
    })
}

/// Restores `state` into `vm` in [`VM_RESTORE_ORDER`], kvmclock as `clock` says.
/// Call it before restoring any vCPU.
pub fn restore_vm_state<V: VmBackend + ?Sized>(
    vm: &V,
    state: &VmState,
    clock: ClockRestore,
) -> Result<(), KvmStateError> {
    for Ordered { step, .. } in VM_RESTORE_ORDER {
        let set = KvmStateError::set(Step::Vm(*step));
        match step {
            VmStep::Pit2 => vm.set_pit2(state.pit2.get()).map_err(set)?,
            VmStep::Clock => {
                let saved = state.clock.get();
                let data = match clock {
                    ClockRestore::Exact => kvm_clock_data {
                        clock: saved.clock,
                        flags: 0,
                        ..Default::default()
                    },
                    ClockRestore::AdvanceByWallTime => {
                        if saved.flags & KVM_CLOCK_REALTIME == 0 {
                            return Err(KvmStateError::NoRealtimeClock);
                        }
                        kvm_clock_data {
                            clock: saved.clock,
                            flags: KVM_CLOCK_REALTIME,
                            realtime: saved.realtime,
                            ..Default::default()
                        }
                    }
                };
                vm.set_clock(&data).map_err(set)?
            }
            VmStep::PicMaster => set_chip(vm, *step, &state.pic_master)?,
            VmStep::PicSlave => set_chip(vm, *step, &state.pic_slave)?,
            VmStep::Ioapic => set_chip(vm, *step, &state.ioapic)?,
        }
    }
    Ok(())
}

/// A VM's in-kernel devices (PIT, kvmclock, PICs, IOAPIC): a [`Snapshottable`] with
/// id `devices`. A `KvmVm` composes it with the vCPUs (restored after it) and memory.
#[derive(Debug)]
pub struct KvmVmDevices<V: VmBackend> {
    vm: V,
    clock: ClockRestore,
}

impl<V: VmBackend> KvmVmDevices<V> {
    /// The snapshot id.
    pub const ID: &'static str = "devices";

    /// The devices of `vm`; restore sets kvmclock as `clock` says.
    pub fn new(vm: V, clock: ClockRestore) -> Self {
        Self { vm, clock }
    }

    /// The VM backend (e.g. the `VmFd`).
    pub fn vm(&self) -> &V {
        &self.vm
    }

    /// Unwraps the VM backend.
    pub fn into_vm(self) -> V {
        self.vm
    }

    /// How restore sets kvmclock.
    pub fn clock_restore(&self) -> ClockRestore {
        self.clock
    }

    /// Changes how restore sets kvmclock.
    pub fn set_clock_restore(&mut self, clock: ClockRestore) {
        self.clock = clock;
    }

    /// Reads the device state ([`save_vm_state`]).
    pub fn save_state(&self) -> Result<VmState, KvmStateError> {
        save_vm_state(&self.vm)
    }

    /// Writes the device state ([`restore_vm_state`]).
    pub fn restore_state(&self, state: &VmState) -> Result<(), KvmStateError> {
        restore_vm_state(&self.vm, state, self.clock)
    }
}

impl<V: VmBackend> Pausable for KvmVmDevices<V> {
    /// In-kernel devices only change when vCPUs run or timers fire; pausing the vCPUs
    /// is what makes their state stable, so there is nothing to do here.
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl<V: VmBackend> Snapshottable for KvmVmDevices<V> {
    fn id(&self) -> String {
        Self::ID.to_owned()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let state = self
            .save_state()
            .map_err(|e| e.into_snapshot_error(Self::ID))?;
        let mut s = Snapshot::new(Self::ID);
        state.add_to(&mut s);
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        snapshot.expect_id(Self::ID)?;
        let state = VmState::from_snapshot(snapshot)?;
        self.restore_state(&state)
            .map_err(|e| e.into_restore_error(Self::ID))
    }
}
