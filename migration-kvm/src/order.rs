//! The save and restore order of vCPU and VM state, written once, as data.
//!
//! KVM does not accept vCPU state in any order: several `KVM_SET_*` calls check or
//! derive state from what earlier calls set. The tables below are the only place the
//! order is written: [`MACHINE_SAVE_ORDER`] and [`MACHINE_RESTORE_ORDER`] for a whole
//! machine (its vCPUs paused, its VM-wide devices, its vCPUs), which
//! [`crate::machine`] iterates; [`VM_RESTORE_ORDER`] inside the devices, which
//! [`crate::KvmVmDevices`] iterates; [`VCPU_SAVE_ORDER`] and [`VCPU_RESTORE_ORDER`]
//! inside each vCPU, which [`crate::KvmVcpu`] iterates. `tests/restore_order.rs` checks
//! every constraint against a recording fake of one or several vCPUs.
//! `docs/kvm-state.md` explains each one at length.

use std::fmt;

/// One piece of vCPU state, saved and restored by one get/set ioctl pair
/// (MSRs: by as many 256-entry chunks as needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VcpuStep {
    /// `KVM_GET/SET_TSC_KHZ`.
    TscKhz,
    /// `KVM_GET/SET_CPUID2`.
    Cpuid,
    /// `KVM_GET/SET_MP_STATE`.
    MpState,
    /// `KVM_GET/SET_REGS`.
    Regs,
    /// `KVM_GET/SET_SREGS`.
    Sregs,
    /// `KVM_GET_XSAVE2` / `KVM_SET_XSAVE`.
    Xsave,
    /// `KVM_GET/SET_XCRS`.
    Xcrs,
    /// `KVM_GET/SET_DEBUGREGS`.
    DebugRegs,
    /// `KVM_GET/SET_LAPIC`.
    Lapic,
    /// `KVM_GET/SET_MSRS`.
    Msrs,
    /// `KVM_GET/SET_NESTED_STATE` (only when the host has `KVM_CAP_NESTED_STATE`).
    NestedState,
    /// `KVM_GET/SET_VCPU_EVENTS`.
    VcpuEvents,
}

impl VcpuStep {
    /// The step's name, which is also its section id in a vCPU snapshot.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TscKhz => "tsc_khz",
            Self::Cpuid => "cpuid2",
            Self::MpState => "mp_state",
            Self::Regs => "regs",
            Self::Sregs => "sregs",
            Self::Xsave => "xsave",
            Self::Xcrs => "xcrs",
            Self::DebugRegs => "debugregs",
            Self::Lapic => "lapic",
            Self::Msrs => "msrs",
            Self::NestedState => "nested_state",
            Self::VcpuEvents => "vcpu_events",
        }
    }
}

impl fmt::Display for VcpuStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One piece of VM-wide in-kernel device state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VmStep {
    /// `KVM_GET/SET_PIT2`.
    Pit2,
    /// `KVM_GET/SET_CLOCK` (kvmclock).
    Clock,
    /// `KVM_GET/SET_IRQCHIP`, chip 0.
    PicMaster,
    /// `KVM_GET/SET_IRQCHIP`, chip 1.
    PicSlave,
    /// `KVM_GET/SET_IRQCHIP`, chip 2.
    Ioapic,
}

impl VmStep {
    /// The step's name, which is also its section id in the devices snapshot.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pit2 => "pit2",
            Self::Clock => "clock",
            Self::PicMaster => "pic_master",
            Self::PicSlave => "pic_slave",
            Self::Ioapic => "ioapic",
        }
    }
}

impl fmt::Display for VmStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One step of saving or restoring a whole machine: its vCPUs and its VM-wide
/// devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MachineStep {
    /// Every vCPU paused: all kicked out of `KVM_RUN` first, then each waited for
    /// until parked with its pending I/O completed. Pausing a paused vCPU does
    /// nothing.
    PauseVcpus,
    /// The VM-wide devices, in [`VM_SAVE_ORDER`] / [`VM_RESTORE_ORDER`].
    Devices,
    /// Every vCPU, each in [`VCPU_SAVE_ORDER`] / [`VCPU_RESTORE_ORDER`], on its own
    /// thread, all at once.
    Vcpus,
}

impl MachineStep {
    /// The step's name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PauseVcpus => "pause_vcpus",
            Self::Devices => "devices",
            Self::Vcpus => "vcpus",
        }
    }
}

impl fmt::Display for MachineStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A step with the reason it sits where it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ordered<S: 'static> {
    /// The step.
    pub step: S,
    /// Why it must come at this point (empty: no constraint of its own).
    pub reason: &'static str,
}

const fn at<S>(step: S, reason: &'static str) -> Ordered<S> {
    Ordered { step, reason }
}

/// A machine's state is read in this order. The machine runs again only when the
/// caller resumes it, after the last step.
pub const MACHINE_SAVE_ORDER: &[Ordered<MachineStep>] = &[
    at(MachineStep::PauseVcpus, "first, every one of them: a running vCPU writes guest memory, sends IPIs into the other vCPUs' LAPICs and EOIs into the IOAPIC, so any state read while one runs can disagree with what is read after it"),
    at(MachineStep::Devices, "the PIT, kvmclock, PICs and IOAPIC, while no vCPU can change them"),
    at(MachineStep::Vcpus, "each vCPU's own state; once all are paused the vCPUs no longer change each other, so they are read in parallel, each on its own thread"),
];

/// A machine's state is written in this order into a machine whose vCPUs have not
/// run since it was built or paused. The caller resumes it only after the last
/// step: a vCPU resumed early would send IPIs into LAPICs not yet restored (whose
/// restore then overwrites them) and run against vCPUs whose TSC is not yet set.
pub const MACHINE_RESTORE_ORDER: &[Ordered<MachineStep>] = &[
    at(MachineStep::PauseVcpus, "no vCPU may run while any state is written (a fresh VM's vCPUs are parked already: then it does nothing)"),
    at(MachineStep::Devices, "before any vCPU: the LAPICs deliver into the PICs and the IOAPIC and kvmclock must be set before a vCPU's MSRs point at it (VM_RESTORE_ORDER)"),
    at(MachineStep::Vcpus, "each vCPU in VCPU_RESTORE_ORDER, all in parallel, each on its own thread: KVM keeps no order between vCPUs (their TSC writes are matched within a second whatever the order)"),
];

/// VM device state, restored before any vCPU state.
///
/// The LAPICs restored later deliver into the PIC/IOAPIC, and kvmclock must be set
/// before vCPUs read their pvclock pages.
pub const VM_RESTORE_ORDER: &[Ordered<VmStep>] = &[
    at(VmStep::Pit2, "the PIT feeds IRQ0 of the PIC/IOAPIC restored next; restoring it first means no tick is raised into a half-restored irqchip"),
    at(VmStep::Clock, "kvmclock is VM-wide and must be set before any vCPU runs or its MSRs point it at a pvclock page"),
    at(VmStep::PicMaster, "irqchip state before any LAPIC: the LAPIC's ExtINT and LINT0 routing refer to it"),
    at(VmStep::PicSlave, "cascaded on the master's IRQ2"),
    at(VmStep::Ioapic, "redirection table refers to LAPIC ids restored afterwards per vCPU"),
];

/// VM device state, saved in the same order it is restored (all vCPUs paused first).
pub const VM_SAVE_ORDER: &[Ordered<VmStep>] = VM_RESTORE_ORDER;

/// vCPU state, restored in this order after [`VM_RESTORE_ORDER`].
pub const VCPU_RESTORE_ORDER: &[Ordered<VcpuStep>] = &[
    at(VcpuStep::TscKhz, "sets the TSC scaling ratio; every TSC value written later (the TSC and TSC_DEADLINE MSRs) is interpreted at this frequency"),
    at(VcpuStep::Cpuid, "KVM validates sregs (CR4 bits, x2APIC in APIC_BASE), xcrs (XCR0 vs CPUID 0xD) and many MSRs against the guest CPUID: xcrs before cpuid is EINVAL, sregs with x2APIC before cpuid is EINVAL"),
    at(VcpuStep::MpState, "setting mp_state may reset pending INIT/SIPI handling; before regs so the run state does not overwrite restored registers"),
    at(VcpuStep::Regs, "general registers; RFLAGS before vcpu_events' interrupt shadow"),
    at(VcpuStep::Sregs, "control registers, EFER and APIC_BASE (checked against CPUID); before lapic, since the APIC mode (xAPIC/x2APIC) comes from APIC_BASE"),
    at(VcpuStep::Xsave, "FPU/SSE/AVX state; needs CR4.OSXSAVE from sregs"),
    at(VcpuStep::Xcrs, "XCR0 is checked against CPUID leaf 0xD and CR4.OSXSAVE"),
    at(VcpuStep::DebugRegs, "no constraint of its own; kept with the other register state"),
    at(VcpuStep::Lapic, "KVM_SET_LAPIC resets the APIC timer: MSRs that arm it (TSC_DEADLINE) must come after, or the timer is silently dead"),
    at(VcpuStep::Msrs, "after lapic (TSC_DEADLINE arms the LAPIC timer) and after sregs/cpuid; within the list TSC comes before TSC_DEADLINE (see MSR_RESTORE_RANK)"),
    at(VcpuStep::NestedState, "needs EFER.SVME/CR4.VMXE (sregs) and IA32_FEATURE_CONTROL (MSRs)"),
    at(VcpuStep::VcpuEvents, "last: pending exceptions, NMIs, interrupt shadow and SMM state would be cleared or rejected by any earlier set call"),
];

/// vCPU state, saved in this order once the vCPU is quiescent.
pub const VCPU_SAVE_ORDER: &[Ordered<VcpuStep>] = &[
    at(VcpuStep::MpState, "first: KVM_GET_MP_STATE processes pending INIT/SIPI, which can change CS and RIP, so it must precede the register reads"),
    at(VcpuStep::TscKhz, ""),
    at(VcpuStep::Cpuid, "read before MSRs: the CPUID decides which MSRs exist (MTRRs, MCE banks)"),
    at(VcpuStep::Regs, ""),
    at(VcpuStep::Sregs, ""),
    at(VcpuStep::Xsave, ""),
    at(VcpuStep::Xcrs, ""),
    at(VcpuStep::DebugRegs, ""),
    at(VcpuStep::Lapic, ""),
    at(VcpuStep::Msrs, "TSC and TSC_DEADLINE are read in one call, so their distance is preserved"),
    at(VcpuStep::NestedState, ""),
    at(VcpuStep::VcpuEvents, "last, as on restore, so events raised by the reads above are included"),
];

/// MSR `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSR `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSR `IA32_TSC_ADJUST`.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;

/// Rank of MSRs inside the restored MSR list: lower ranks are written first; MSRs not
/// listed have rank 0. The sort is stable, so other MSRs keep their saved order.
pub const MSR_RESTORE_RANK: &[(u32, i8, &str)] = &[
    (
        MSR_IA32_TSC,
        -1,
        "first: the TSC offset it sets is what TSC_DEADLINE and TSC_ADJUST are relative to",
    ),
    (
        MSR_IA32_TSC_DEADLINE,
        1,
        "last: a deadline written before the TSC is compared with the old TSC and fires at once or never",
    ),
];

/// The rank of MSR `index` in [`MSR_RESTORE_RANK`].
pub fn msr_rank(index: u32) -> i8 {
    MSR_RESTORE_RANK
        .iter()
        .find(|(i, _, _)| *i == index)
        .map_or(0, |(_, r, _)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_name_every_step_once() {
        for table in [VCPU_RESTORE_ORDER, VCPU_SAVE_ORDER] {
            let mut steps: Vec<_> = table.iter().map(|o| o.step).collect();
            steps.sort();
            steps.dedup();
            assert_eq!(steps.len(), 12);
        }
        assert_eq!(VM_RESTORE_ORDER.len(), 5);
        for table in [MACHINE_SAVE_ORDER, MACHINE_RESTORE_ORDER] {
            let steps: Vec<_> = table.iter().map(|o| o.step).collect();
            assert_eq!(
                steps,
                [
                    MachineStep::PauseVcpus,
                    MachineStep::Devices,
                    MachineStep::Vcpus
                ]
            );
        }
    }
}
