//! [`VmState`] (the VM's in-kernel devices as plain data) and [`KvmVmDevices`].

use kvm_bindings::{
    kvm_clock_data, kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_state2,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable, Versioned};
use zerocopy::IntoBytes;

use crate::backend::VmBackend;
use crate::error::{KvmStateError, Step};
use crate::layout::DeviceLayout;
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
///
/// Which pieces are present is the [`DeviceLayout`]'s to say: a piece is `Some`
/// exactly when `layout` has it ([`DeviceLayout::has`]; [`check`](Self::check)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// The in-kernel devices this state was saved from.
    pub layout: DeviceLayout,
    /// kvmclock (`KVM_GET_CLOCK`), with its `KVM_CLOCK_REALTIME` timestamp when the host has one.
    pub clock: Raw<kvm_clock_data>,
    /// The i8254 PIT (layouts with a PIT).
    pub pit2: Option<Raw<kvm_pit_state2>>,
    /// The master i8259 PIC (full irqchip).
    pub pic_master: Option<Raw<kvm_pic_state>>,
    /// The slave i8259 PIC (full irqchip).
    pub pic_slave: Option<Raw<kvm_pic_state>>,
    /// The IOAPIC (full irqchip).
    pub ioapic: Option<Raw<kvm_ioapic_state>>,
}

impl VmState {
    /// Whether `step`'s piece is present.
    fn holds(&self, step: VmStep) -> bool {
        match step {
            VmStep::Clock => true,
            VmStep::Pit2 => self.pit2.is_some(),
            VmStep::PicMaster => self.pic_master.is_some(),
            VmStep::PicSlave => self.pic_slave.is_some(),
            VmStep::Ioapic => self.ioapic.is_some(),
        }
    }

    /// Checks that the layout is valid and that exactly its pieces are present.
    pub fn check(&self) -> Result<(), KvmStateError> {
        self.layout.validate()?;
        for Ordered { step, .. } in VM_SAVE_ORDER {
            let (has, holds) = (self.layout.has(*step), self.holds(*step));
            if has != holds {
                let what = if holds { "present" } else { "missing" };
                return Err(invalid(
                    *step,
                    &format!("{what}, but the layout is {}", self.layout),
                ));
            }
        }
        Ok(())
    }

    /// Adds the layout and every present piece as its own section (named
    /// [`VmStep::name`]) to `snapshot`.
    pub fn add_to(&self, snapshot: &mut Snapshot) {
        snapshot.add_state(DeviceLayout::SECTION, self.layout);
        snapshot.add_state(VmStep::Clock.name(), self.clock);
        if let Some(pit2) = self.pit2 {
            snapshot.add_state(VmStep::Pit2.name(), pit2);
        }
        if let Some(chip) = self.pic_master {
            snapshot.add_state(VmStep::PicMaster.name(), chip);
        }
        if let Some(chip) = self.pic_slave {
            snapshot.add_state(VmStep::PicSlave.name(), chip);
        }
        if let Some(chip) = self.ioapic {
            snapshot.add_state(VmStep::Ioapic.name(), chip);
        }
    }

    /// Reads the layout and the pieces it has from the sections of `snapshot`. A
    /// snapshot without a `layout` section is [`DeviceLayout::FULL_WITH_PIT`] (it
    /// predates the section). A piece the layout lacks, or a missing one, is an error.
    pub fn from_snapshot(snapshot: &Snapshot) -> Result<Self, MigratableError> {
        let present = |id: &str| snapshot.sections().any(|(s, _)| s == id);
        let layout = if present(DeviceLayout::SECTION) {
            snapshot.state(DeviceLayout::SECTION)?
        } else {
            DeviceLayout::FULL_WITH_PIT
        };
        fn piece<T: Versioned>(
            snapshot: &Snapshot,
            layout: &DeviceLayout,
            step: VmStep,
        ) -> Result<Option<T>, MigratableError> {
            if layout.has(step) {
                snapshot.state(step.name()).map(Some)
            } else {
                Ok(None)
            }
        }
        let state = Self {
            clock: snapshot.state(VmStep::Clock.name())?,
            pit2: piece(snapshot, &layout, VmStep::Pit2)?,
            pic_master: piece(snapshot, &layout, VmStep::PicMaster)?,
            pic_slave: piece(snapshot, &layout, VmStep::PicSlave)?,
            ioapic: piece(snapshot, &layout, VmStep::Ioapic)?,
            layout,
        };
        state
            .check()
            .map_err(|e| e.into_restore_error(snapshot.id()))?;
        // A section of a piece the layout lacks: the snapshot contradicts itself.
        for Ordered { step, .. } in VM_SAVE_ORDER {
            if !layout.has(*step) && present(step.name()) {
                return Err(invalid(
                    *step,
                    &format!("section present, but the recorded layout is {layout}"),
                )
                .into_restore_error(snapshot.id()));
            }
        }
        Ok(state)
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

/// Saves the in-kernel device state of `vm`, whose devices are `layout`, in
/// [`VM_SAVE_ORDER`]: exactly the pieces `layout` has. All vCPUs must be paused.
pub fn save_vm_state<V: VmBackend + ?Sized>(
    vm: &V,
    layout: &DeviceLayout,
) -> Result<VmState, KvmStateError> {
    layout.validate()?;
    let mut state = VmState {
        layout: *layout,
        clock: Raw::default(),
        pit2: None,
        pic_master: None,
        pic_slave: None,
        ioapic: None,
    };
    for Ordered { step, .. } in VM_SAVE_ORDER.iter().filter(|o| layout.has(o.step)) {
        let get = KvmStateError::get(Step::Vm(*step));
        match step {
            VmStep::Pit2 => state.pit2 = Some(Raw::new(vm.get_pit2().map_err(get)?)),
            VmStep::Clock => state.clock = Raw::new(vm.get_clock().map_err(get)?),
            VmStep::PicMaster => state.pic_master = Some(get_chip(vm, *step)?),
            VmStep::PicSlave => state.pic_slave = Some(get_chip(vm, *step)?),
            VmStep::Ioapic => state.ioapic = Some(get_chip(vm, *step)?),
        }
    }
    Ok(state)
}

/// Restores `state` into `vm`, whose devices are `layout`, in [`VM_RESTORE_ORDER`],
/// kvmclock as `clock` says. Call it before restoring any vCPU.
///
/// A state saved from another layout is refused before any ioctl
/// ([`KvmStateError::Layout`]): its pieces would have nowhere to go, or the VM's
/// devices would keep their reset state.
pub fn restore_vm_state<V: VmBackend + ?Sized>(
    vm: &V,
    layout: &DeviceLayout,
    state: &VmState,
    clock: ClockRestore,
) -> Result<(), KvmStateError> {
    if state.layout != *layout {
        return Err(KvmStateError::Layout {
            snapshot: state.layout,
            vm: *layout,
        });
    }
    state.check()?;
    for Ordered { step, .. } in VM_RESTORE_ORDER {
        let set = KvmStateError::set(Step::Vm(*step));
        match (step, state) {
            (VmStep::Clock, _) => {
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
            (VmStep::Pit2, VmState { pit2: Some(p), .. }) => vm.set_pit2(p.get()).map_err(set)?,
            (
                VmStep::PicMaster,
                VmState {
                    pic_master: Some(c),
                    ..
                },
            )
            | (
                VmStep::PicSlave,
                VmState {
                    pic_slave: Some(c), ..
                },
            ) => set_chip(vm, *step, c)?,
            (
                VmStep::Ioapic,
                VmState {
                    ioapic: Some(c), ..
                },
            ) => set_chip(vm, *step, c)?,
            // Not in this layout (`check` made sure the state agrees).
            _ => {}
        }
    }
    Ok(())
}

/// A VM's in-kernel devices (kvmclock, and the PIT, PICs and IOAPIC its
/// [`DeviceLayout`] has): a [`Snapshottable`] with id `devices`. A `KvmVm` composes
/// it with the vCPUs (restored after it) and memory.
///
/// `V` is the VM backend: an owned `VmFd`, or `&VmFd` for a VMM that keeps its own.
#[derive(Debug)]
pub struct KvmVmDevices<V: VmBackend> {
    vm: V,
    layout: DeviceLayout,
    clock: ClockRestore,
}

impl<V: VmBackend> KvmVmDevices<V> {
    /// The snapshot id.
    pub const ID: &'static str = "devices";

    /// The devices of `vm`, which has the in-kernel devices `layout` says; restore
    /// sets kvmclock as `clock` says.
    pub fn new(vm: V, layout: DeviceLayout, clock: ClockRestore) -> Self {
        Self { vm, layout, clock }
    }

    /// The VM's in-kernel devices.
    pub fn layout(&self) -> DeviceLayout {
        self.layout
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
        save_vm_state(&self.vm, &self.layout)
    }

    /// Writes the device state ([`restore_vm_state`]).
    pub fn restore_state(&self, state: &VmState) -> Result<(), KvmStateError> {
        restore_vm_state(&self.vm, &self.layout, state, self.clock)
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
