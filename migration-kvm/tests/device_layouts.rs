//! Every VM device layout with a real VM: full irqchip with and without a PIT, split
//! irqchip (`KVM_CAP_SPLIT_IRQCHIP`), no irqchip. Each saves exactly what it has
//! through borrowed fds (the VMM keeps its `VmFd` and `VcpuFd`), round-trips through
//! a codec, restores into a fresh VM of the same layout, and is refused by a VM of
//! another layout.

use anyhow::{ensure, Context, Result};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration_core::{codec, Snapshot};
use migration_kvm::order::VmStep;
use migration_kvm::{
    restore_vcpu_state, restore_vm_state, save_vcpu_state, save_vm_state, ClockRestore,
    DeviceLayout, HostCaps, Irqchip, KvmStateError, VcpuState, VcpuStep, VmState,
};

/// A VM the test owns, as a VMM would: its fds, never handed over.
struct OwnVm {
    vm: VmFd,
    vcpu: VcpuFd,
    caps: HostCaps,
}

fn build(kvm: &Kvm, layout: DeviceLayout) -> Result<OwnVm> {
    let vm = kvm.create_vm()?;
    layout
        .create(&vm)
        .with_context(|| format!("creating {layout}"))?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let caps = HostCaps::probe(kvm, &vm, &layout)?;
    Ok(OwnVm { vm, vcpu, caps })
}

/// Through the snapshot tree and postcard, as a snapshot file carries it.
fn through_codec(vm: &VmState, vcpu: &VcpuState) -> Result<(VmState, VcpuState)> {
    let codecs = migration_serde::registry();
    let postcard = codecs
        .get(migration_serde::POSTCARD_ID)
        .context("postcard")?
        .clone();
    let mut tree = Snapshot::new("vm");
    let mut devices = Snapshot::new("devices");
    vm.add_to(&mut devices);
    let mut v = Snapshot::new("vcpu0");
    vcpu.add_to(&mut v);
    tree.add_child(devices);
    tree.add_child(v);
    tree.encode(&postcard)?;
    let bytes = codec::encode(postcard.as_ref(), &tree)?;
    let mut back: Snapshot = codec::decode(postcard.as_ref(), &bytes)?;
    back.resolve_codecs(&codecs);
    Ok((
        VmState::from_snapshot(back.child("devices")?)?,
        VcpuState::from_snapshot(back.child("vcpu0")?)?,
    ))
}

#[test]
fn each_layout_saves_what_it_has_and_restores_into_the_same_layout() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let kvm = Kvm::new()?;
    for layout in DeviceLayout::ALL {
        let src = build(&kvm, layout)?;
        // Marks a fresh VM would not have: a PIT counter, a register.
        if layout.pit {
            let mut pit = src.vm.get_pit2()?;
            pit.channels[2].count = 0x1234;
            pit.channels[2].mode = 2;
            src.vm.set_pit2(&pit)?;
        }
        let mut regs = src.vcpu.get_regs()?;
        regs.rax = 0xfeed_0000 + layout.pit as u64;
        src.vcpu.set_regs(&regs)?;

        let vm_state = save_vm_state(&src.vm, &layout).with_context(|| format!("{layout}"))?;
        let vcpu_state = save_vcpu_state(&src.vcpu, &src.caps)?;
        for step in [VmStep::Pit2, VmStep::PicMaster, VmStep::Ioapic] {
            let held = match step {
                VmStep::Pit2 => vm_state.pit2.is_some(),
                VmStep::PicMaster => vm_state.pic_master.is_some(),
                _ => vm_state.ioapic.is_some(),
            };
            ensure!(held == layout.has(step), "{layout}: {step} held={held}");
        }
        ensure!(
            vcpu_state.lapic.is_some() == (layout.irqchip != Irqchip::None),
            "{layout}: LAPIC saved iff the vCPU has one"
        );

        let (vm_back, vcpu_back) = through_codec(&vm_state, &vcpu_state)?;
        ensure!(
            vm_back == vm_state && vcpu_back == vcpu_state,
            "{layout}: codec"
        );

        let dst = build(&kvm, layout)?;
        restore_vm_state(&dst.vm, &layout, &vm_back, ClockRestore::Exact)?;
        restore_vcpu_state(&dst.vcpu, &dst.caps, &vcpu_back)?;
        let again = save_vm_state(&dst.vm, &layout)?;
        // The PIT's load time is re-based on restore: compare what was programmed.
        let pit = |s: &VmState| {
            s.pit2
                .map(|p| (p.get().channels[2].count, p.get().channels[2].mode))
        };
        ensure!(pit(&again) == pit(&vm_state), "{layout}: PIT");
        ensure!(pit(&again).is_none() || pit(&again) == Some((0x1234, 2)));
        ensure!(
            again.pic_master == vm_state.pic_master && again.ioapic == vm_state.ioapic,
            "{layout}: irqchip"
        );
        let vcpu_again = save_vcpu_state(&dst.vcpu, &dst.caps)?;
        ensure!(vcpu_again.regs == vcpu_state.regs, "{layout}: regs");
        ensure!(vcpu_again.lapic.is_some() == vcpu_state.lapic.is_some());
        // The fds are still the test's: it can go on using them.
        ensure!(dst.vcpu.get_regs()?.rax == regs.rax);
    }
    Ok(())
}

#[test]
fn a_state_from_another_layout_is_refused_before_any_ioctl() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let kvm = Kvm::new()?;
    for from in DeviceLayout::ALL {
        let src = build(&kvm, from)?;
        let state = save_vm_state(&src.vm, &from)?;
        for into in DeviceLayout::ALL.into_iter().filter(|l| *l != from) {
            let dst = build(&kvm, into)?;
            let before = dst.vm.get_clock()?;
            let e = restore_vm_state(&dst.vm, &into, &state, ClockRestore::Exact)
                .expect_err("another layout");
            ensure!(
                matches!(e, KvmStateError::Layout { snapshot, vm } if snapshot == from && vm == into),
                "{from} into {into}: {e}"
            );
            ensure!(
                e.to_string()
                    == format!(
                        "device layout mismatch: the snapshot's VM had {from}, this VM has {into}"
                    ),
                "{e}"
            );
            // Nothing was written: kvmclock runs on from where it was.
            ensure!(dst.vm.get_clock()?.clock >= before.clock);
        }
    }
    Ok(())
}

#[test]
fn saving_with_the_wrong_layout_fails_on_the_missing_device() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let kvm = Kvm::new()?;
    // A split-irqchip VM (Cloud Hypervisor's layout) described as full + PIT: the
    // first piece it lacks fails, named.
    let vm = build(&kvm, DeviceLayout::SPLIT)?;
    let e = save_vm_state(&vm.vm, &DeviceLayout::FULL_WITH_PIT).expect_err("no PIT");
    ensure!(
        e.step() == Some(migration_kvm::Step::Vm(VmStep::Pit2)),
        "{e}"
    );
    // A PIT without the full irqchip is not a layout KVM can build.
    let bad = DeviceLayout {
        irqchip: Irqchip::Split,
        pit: true,
    };
    ensure!(save_vm_state(&vm.vm, &bad).is_err());
    let fresh = kvm.create_vm()?;
    ensure!(bad.create(&fresh).is_err());
    // KVM agrees: no PIT on a VM without the in-kernel PIC.
    let split = kvm.create_vm()?;
    DeviceLayout::SPLIT.create(&split)?;
    ensure!(split.create_pit2(kvm_pit_config::default()).is_err());
    Ok(())
}

#[test]
fn a_vcpu_state_with_a_lapic_is_refused_by_a_vcpu_without_one() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let kvm = Kvm::new()?;
    let full = build(&kvm, DeviceLayout::FULL)?;
    let none = build(&kvm, DeviceLayout::NONE)?;
    let with_lapic = save_vcpu_state(&full.vcpu, &full.caps)?;
    let e = restore_vcpu_state(&none.vcpu, &none.caps, &with_lapic).expect_err("no LAPIC");
    ensure!(
        e.step() == Some(migration_kvm::Step::Vcpu(VcpuStep::Lapic)),
        "{e}"
    );
    let without = save_vcpu_state(&none.vcpu, &none.caps)?;
    ensure!(restore_vcpu_state(&full.vcpu, &full.caps, &without).is_err());
    Ok(())
}

/// A snapshot that records no layout (written before the section existed) is full
/// irqchip + PIT: the golden files of `migration-testkit` cover real bytes; this
/// checks the rule on a tree built without the section.
#[test]
fn a_devices_node_without_a_layout_section_is_full_with_pit() -> Result<()> {
    migration_testkit::require_kvm!(Ok(()));
    let kvm = Kvm::new()?;
    let src = build(&kvm, DeviceLayout::FULL_WITH_PIT)?;
    let state = save_vm_state(&src.vm, &DeviceLayout::FULL_WITH_PIT)?;
    let mut node = Snapshot::new("devices");
    state.add_to(&mut node);
    let mut old = Snapshot::new("devices");
    for (id, section) in node
        .sections()
        .filter(|(id, _)| *id != DeviceLayout::SECTION)
    {
        old.add_section(id, section.clone());
    }
    ensure!(VmState::from_snapshot(&old)? == state);
    // Without the layout section and without a PIT section: not full + PIT.
    let mut no_pit = Snapshot::new("devices");
    for (id, section) in old.sections().filter(|(id, _)| *id != "pit2") {
        no_pit.add_section(id, section.clone());
    }
    ensure!(VmState::from_snapshot(&no_pit).is_err());
    Ok(())
}
