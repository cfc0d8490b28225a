//! [`DeviceLayout`]: which interrupt controllers and timers a VM has in the kernel.
//!
//! KVM lets a VMM choose where the x86 interrupt controllers live, and the VM-wide
//! state there is to save depends on it:
//!
//! | layout | created with | in-kernel state saved here |
//! |---|---|---|
//! | full irqchip + PIT | `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2` | PIT, PIC master/slave, IOAPIC, each vCPU's LAPIC |
//! | full irqchip | `KVM_CREATE_IRQCHIP` | PIC master/slave, IOAPIC, LAPICs |
//! | split irqchip | `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)` | LAPICs (the VMM emulates PIC and IOAPIC and saves them itself) |
//! | no irqchip | nothing | none (the VMM emulates every interrupt controller) |
//!
//! kvmclock is saved in every layout. A PIT needs the full irqchip (KVM refuses
//! `KVM_CREATE_PIT2` otherwise), so split and none have no PIT.
//!
//! The layout is data: a VMM says which it built ([`DeviceLayout::create`] builds
//! one), [`crate::save_vm_state`] reads exactly what exists, the snapshot records the
//! layout (section [`DeviceLayout::SECTION`] of the `devices` node), and
//! [`crate::restore_vm_state`] refuses a snapshot taken with another layout
//! ([`KvmStateError::Layout`]). A snapshot without the section predates it and was
//! taken from a full irqchip with a PIT ([`DeviceLayout::FULL_WITH_PIT`]).

use std::fmt;

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::VmFd;
use migration_core::Versioned;
use serde::{Deserialize, Serialize};

use crate::error::{KvmStateError, Step};
use crate::order::VmStep;

/// IOAPIC pins KVM routes for a split irqchip (`KVM_CAP_SPLIT_IRQCHIP`'s argument):
/// the 24 of an IOAPIC.
pub const SPLIT_IRQCHIP_PINS: u64 = 24;

/// Where a VM's interrupt controllers (PIC pair, IOAPIC, LAPICs) live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Irqchip {
    /// `KVM_CREATE_IRQCHIP`: PICs, IOAPIC and LAPICs in the kernel.
    Full,
    /// `KVM_CAP_SPLIT_IRQCHIP`: LAPICs in the kernel; the VMM emulates the PICs and
    /// the IOAPIC (and saves their state with its own devices).
    Split,
    /// No in-kernel interrupt controller: the VMM emulates all of them.
    None,
}

/// The in-kernel devices of a VM: its [`Irqchip`] and whether it has a PIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceLayout {
    /// Where the interrupt controllers live.
    pub irqchip: Irqchip,
    /// Whether the VM has an in-kernel i8254 PIT (`KVM_CREATE_PIT2`); needs
    /// [`Irqchip::Full`].
    pub pit: bool,
}

impl DeviceLayout {
    /// Section id of the layout in a `devices` snapshot.
    pub const SECTION: &'static str = "layout";

    /// Full irqchip and a PIT: what `KvmVm` builds, and what a snapshot that records
    /// no layout was taken from.
    pub const FULL_WITH_PIT: Self = Self {
        irqchip: Irqchip::Full,
        pit: true,
    };

    /// Full irqchip, no PIT.
    pub const FULL: Self = Self {
        irqchip: Irqchip::Full,
        pit: false,
    };

    /// Split irqchip (Cloud Hypervisor's layout): LAPICs in the kernel only.
    pub const SPLIT: Self = Self {
        irqchip: Irqchip::Split,
        pit: false,
    };

    /// No in-kernel device but kvmclock.
    pub const NONE: Self = Self {
        irqchip: Irqchip::None,
        pit: false,
    };

    /// Every valid layout.
    pub const ALL: [Self; 4] = [Self::FULL_WITH_PIT, Self::FULL, Self::SPLIT, Self::NONE];

    /// Whether KVM can build this layout: a PIT needs the full irqchip.
    pub fn validate(&self) -> Result<(), KvmStateError> {
        if self.pit && self.irqchip != Irqchip::Full {
            return Err(KvmStateError::Invalid {
                step: Step::Setup("device layout"),
                reason: format!("{self}: a PIT needs the full in-kernel irqchip"),
            });
        }
        Ok(())
    }

    /// Whether a VM of this layout has the state of `step` in the kernel.
    pub fn has(&self, step: VmStep) -> bool {
        match step {
            VmStep::Clock => true,
            VmStep::Pit2 => self.pit,
            VmStep::PicMaster | VmStep::PicSlave | VmStep::Ioapic => self.irqchip == Irqchip::Full,
        }
    }

    /// Whether the vCPUs have in-kernel LAPICs (full or split irqchip).
    pub fn lapic(&self) -> bool {
        self.irqchip != Irqchip::None
    }

    /// Creates this layout's devices in `vm`, which must be fresh: no irqchip yet and
    /// no vCPU (KVM requires both to come first).
    pub fn create(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        self.validate()?;
        let setup = |what| KvmStateError::set(Step::Setup(what));
        match self.irqchip {
            Irqchip::Full => vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?,
            Irqchip::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                cap.args[0] = SPLIT_IRQCHIP_PINS;
                vm.enable_cap(&cap)
                    .map_err(setup("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?
            }
            Irqchip::None => {}
        }
        if self.pit {
            vm.create_pit2(kvm_pit_config::default())
                .map_err(setup("KVM_CREATE_PIT2"))?;
        }
        Ok(())
    }
}

impl fmt::Display for DeviceLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.irqchip {
            Irqchip::Full => "full irqchip",
            Irqchip::Split => "split irqchip",
            Irqchip::None => "no irqchip",
        })?;
        f.write_str(if self.pit { " + PIT" } else { ", no PIT" })
    }
}

impl Versioned for DeviceLayout {
    const VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pit_needs_the_full_irqchip() {
        for layout in DeviceLayout::ALL {
            layout.validate().unwrap();
        }
        for irqchip in [Irqchip::Split, Irqchip::None] {
            let bad = DeviceLayout { irqchip, pit: true };
            assert!(bad.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn each_layout_names_what_it_holds() {
        let steps = |l: DeviceLayout| {
            crate::order::VM_SAVE_ORDER
                .iter()
                .filter(|o| l.has(o.step))
                .map(|o| o.step.name())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            steps(DeviceLayout::FULL_WITH_PIT),
            ["pit2", "clock", "pic_master", "pic_slave", "ioapic"]
        );
        assert_eq!(
            steps(DeviceLayout::FULL),
            ["clock", "pic_master", "pic_slave", "ioapic"]
        );
        assert_eq!(steps(DeviceLayout::SPLIT), ["clock"]);
        assert_eq!(steps(DeviceLayout::NONE), ["clock"]);
        assert!(DeviceLayout::SPLIT.lapic() && !DeviceLayout::NONE.lapic());
        assert_eq!(DeviceLayout::SPLIT.to_string(), "split irqchip, no PIT");
        assert_eq!(
            DeviceLayout::FULL_WITH_PIT.to_string(),
            "full irqchip + PIT"
        );
    }
}
