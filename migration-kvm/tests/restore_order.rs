//! The save/restore order, checked call by call against migration-testkit's
//! `RecordingVcpu` (no /dev/kvm needed), and the typed errors of failing calls.

use std::sync::Arc;

use migration_core::{Codec, MigratableError, Snapshot};
use migration_kvm::order::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use migration_kvm::{
    restore_vm_state, save_vm_state, ClockRestore, Direction, KvmStateError, KvmVcpu, KvmVmDevices,
    Step, VcpuStep, VmStep,
};
use migration_testkit::recording_vcpu::RecordingVcpu;

fn pos(calls: &[&str], name: &str) -> usize {
    calls
        .iter()
        .position(|c| *c == name)
        .unwrap_or_else(|| panic!("`{name}` never called: {calls:?}"))
}

fn last_pos(calls: &[&str], name: &str) -> usize {
    calls
        .iter()
        .rposition(|c| *c == name)
        .unwrap_or_else(|| panic!("`{name}` never called: {calls:?}"))
}

/// Asserts `a` (every call of it) happens before `b` (every call of it).
fn before(calls: &[&str], a: &str, b: &str) {
    assert!(
        last_pos(calls, a) < pos(calls, b),
        "`{a}` must come before `{b}`: {calls:?}"
    );
}

/// Saves from one fake and restores (VM devices, then the vCPU) into a fresh one;
/// returns the restore calls.
fn restore_calls(fake: &RecordingVcpu) -> Vec<&'static str> {
    let vcpu = KvmVcpu::new(0, fake.clone(), fake.caps());
    let vm_state = save_vm_state(fake).unwrap();
    let state = vcpu.save_state().unwrap();

    let dst = RecordingVcpu::new();
    dst.set_current_tsc_khz(1_000_000); // differs from the saved rate: set_tsc_khz runs
    let dst_vcpu = KvmVcpu::new(0, dst.clone(), dst.caps());
    restore_vm_state(&dst, &vm_state, ClockRestore::Exact).unwrap();
    dst_vcpu.restore_state(&state).unwrap();
    assert_eq!(
        dst_vcpu.save_state().unwrap(),
        state,
        "state did not round-trip"
    );
    let names = dst.call_names();
    names
        .into_iter()
        .filter(|n| n.starts_with("set_"))
        .collect()
}

#[test]
fn vm_devices_come_before_every_vcpu_set() {
    let calls = restore_calls(&RecordingVcpu::new());
    let first_vcpu = pos(&calls, "set_tsc_khz");
    for dev in [
        "set_pit2",
        "set_clock",
        "set_irqchip(pic_master)",
        "set_irqchip(pic_slave)",
        "set_irqchip(ioapic)",
    ] {
        assert!(pos(&calls, dev) < first_vcpu, "{dev}: {calls:?}");
    }
    before(&calls, "set_pit2", "set_clock");
    before(&calls, "set_clock", "set_irqchip(pic_master)");
    before(&calls, "set_irqchip(pic_master)", "set_irqchip(pic_slave)");
    before(&calls, "set_irqchip(pic_slave)", "set_irqchip(ioapic)");
}

#[test]
fn vcpu_restore_constraints_hold() {
    let calls = restore_calls(&RecordingVcpu::new());
    before(&calls, "set_tsc_khz", "set_cpuid2");
    before(&calls, "set_tsc_khz", "set_msrs"); // TSC frequency before TSC values
    before(&calls, "set_cpuid2", "set_sregs"); // CR4 / x2APIC checked against CPUID
    before(&calls, "set_cpuid2", "set_xcrs"); // XCR0 checked against CPUID 0xD
    before(&calls, "set_cpuid2", "set_msrs");
    before(&calls, "set_cpuid2", "set_mp_state");
    before(&calls, "set_mp_state", "set_regs");
    before(&calls, "set_regs", "set_sregs");
    before(&calls, "set_sregs", "set_xsave2"); // CR4.OSXSAVE
    before(&calls, "set_sregs", "set_lapic"); // APIC mode from APIC_BASE
    before(&calls, "set_xsave2", "set_xcrs");
    before(&calls, "set_lapic", "set_msrs"); // TSC_DEADLINE after the LAPIC reset
    assert_eq!(calls.last(), Some(&"set_vcpu_events"), "{calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == "set_vcpu_events").count(), 1);
}

#[test]
fn tsc_is_written_before_tsc_deadline_across_chunks() {
    // 384 allowed MSRs (MTRR/PAT range and MCE banks): two chunks of 256 + 128 entries,
    // with TSC_DEADLINE (0x6e0) sorting after both ranges and TSC (0x10) before.
    let msrs =
        (0x200..0x300)
            .chain(0x400..0x480)
            .chain([MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC, 0x3b]);
    let fake = RecordingVcpu::with_msrs(msrs);
    let vcpu = KvmVcpu::new(0, fake.clone(), fake.caps());
    let state = vcpu.save_state().unwrap();
    assert_eq!(state.msrs.0.len(), 387);
    let dst = RecordingVcpu::with_msrs([]);
    let dst_vcpu = KvmVcpu::new(0, dst.clone(), dst.caps());
    dst_vcpu.restore_state(&state).unwrap();

    let sets: Vec<Vec<u32>> = dst
        .calls()
        .into_iter()
        .filter(|c| c.name == "set_msrs")
        .map(|c| c.msrs)
        .collect();
    assert_eq!(
        sets.iter().map(Vec::len).collect::<Vec<_>>(),
        [256, 131],
        "chunked at 256"
    );
    let all: Vec<u32> = sets.concat();
    let tsc = all.iter().position(|&i| i == MSR_IA32_TSC).unwrap();
    let deadline = all
        .iter()
        .position(|&i| i == MSR_IA32_TSC_DEADLINE)
        .unwrap();
    assert_eq!(tsc, 0, "TSC first");
    assert_eq!(deadline, all.len() - 1, "TSC_DEADLINE last");
    // Every MSR written exactly once.
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len());
}

#[test]
fn save_reads_mp_state_first_and_vcpu_events_last() {
    let fake = RecordingVcpu::new();
    let vcpu = KvmVcpu::new(0, fake.clone(), fake.caps());
    vcpu.msr_list().unwrap(); // computed once, before the timed save
    fake.clear();
    vcpu.save_state().unwrap();
    let calls: Vec<&str> = fake
        .call_names()
        .into_iter()
        .filter(|n| n.starts_with("get_"))
        .collect();
    assert_eq!(calls.first(), Some(&"get_mp_state"), "{calls:?}");
    assert_eq!(calls.last(), Some(&"get_vcpu_events"), "{calls:?}");
    before(&calls, "get_mp_state", "get_regs"); // INIT/SIPI can change CS:RIP
    before(&calls, "get_cpuid2", "get_msrs");
}

#[test]
fn xsave_larger_than_4096_uses_xsave2_and_round_trips() {
    let fake = RecordingVcpu::new();
    fake.set_xsave2_size(4096 + 2 * 1024 + 64);
    let vcpu = KvmVcpu::new(0, fake.clone(), fake.caps());
    let state = vcpu.save_state().unwrap();
    assert_eq!(state.xsave.as_bytes().len(), 4096 + 2 * 1024 + 64);
    assert!(fake.call_names().contains(&"get_xsave2"));
    assert!(!fake.call_names().contains(&"get_xsave"));

    // Restoring into a host with a smaller xsave area is refused, typed.
    let small = RecordingVcpu::new();
    let small_vcpu = KvmVcpu::new(0, small.clone(), small.caps());
    let e = small_vcpu.restore_state(&state).unwrap_err();
    assert!(
        matches!(
            e,
            KvmStateError::Invalid {
                step: Step::Vcpu(VcpuStep::Xsave),
                ..
            }
        ),
        "{e}"
    );

    let dst = RecordingVcpu::new();
    dst.set_xsave2_size(4096 + 2 * 1024 + 64);
    let dst_vcpu = KvmVcpu::new(0, dst.clone(), dst.caps());
    dst_vcpu.restore_state(&state).unwrap();
    assert_eq!(dst_vcpu.save_state().unwrap().xsave, state.xsave);
}

#[test]
fn a_failing_set_call_names_its_step() {
    let src = RecordingVcpu::new();
    let state = KvmVcpu::new(0, src.clone(), src.caps())
        .save_state()
        .unwrap();
    for (call, step) in [
        ("set_cpuid2", VcpuStep::Cpuid),
        ("set_sregs", VcpuStep::Sregs),
        ("set_xcrs", VcpuStep::Xcrs),
        ("set_lapic", VcpuStep::Lapic),
        ("set_vcpu_events", VcpuStep::VcpuEvents),
    ] {
        let dst = RecordingVcpu::new();
        dst.fail_on(Some(call));
        let vcpu = KvmVcpu::new(0, dst.clone(), dst.caps());
        let e = vcpu.restore_state(&state).unwrap_err();
        match &e {
            KvmStateError::Ioctl {
                step: s,
                direction: Direction::Set,
                source,
            } => {
                assert_eq!(*s, Step::Vcpu(step));
                assert_eq!(source.errno(), libc::EIO);
            }
            other => panic!("{call}: unexpected error {other:?}"),
        }
        assert!(e.to_string().contains(step.name()), "{e}");
        // Nothing after the failing call was attempted.
        assert_eq!(dst.call_names().last(), Some(&call));
    }
}

#[test]
fn a_refused_msr_is_named() {
    let src = RecordingVcpu::new();
    let state = KvmVcpu::new(0, src.clone(), src.caps())
        .save_state()
        .unwrap();
    let dst = RecordingVcpu::new();
    dst.refuse_msr(Some(0x277));
    let e = KvmVcpu::new(0, dst.clone(), dst.caps())
        .restore_state(&state)
        .unwrap_err();
    match e {
        KvmStateError::Msr {
            direction: Direction::Set,
            index,
            done,
            requested,
        } => {
            assert_eq!(index, 0x277);
            assert!(done < requested);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        dst.call_names().last() == Some(&"set_msrs"),
        "vcpu_events must not be set after a failed MSR write"
    );

    // Reading: the same, with the MSR named.
    src.refuse_msr(Some(0x6e0));
    let e = KvmVcpu::new(0, src.clone(), src.caps())
        .save_state()
        .unwrap_err();
    assert!(e.to_string().contains("0x6e0"), "{e}");
}

#[test]
fn a_failing_vm_device_call_names_its_step() {
    let src = RecordingVcpu::new();
    let state = save_vm_state(&src).unwrap();
    let dst = RecordingVcpu::new();
    dst.fail_on(Some("set_irqchip(pic_slave)"));
    let e = restore_vm_state(&dst, &state, ClockRestore::Exact).unwrap_err();
    assert_eq!(e.step(), Some(Step::Vm(VmStep::PicSlave)));
    assert!(!dst.call_names().contains(&"set_irqchip(ioapic)"));
}

#[test]
fn advancing_the_clock_needs_a_realtime_timestamp() {
    let src = RecordingVcpu::new(); // its clock has no KVM_CLOCK_REALTIME flag
    let state = save_vm_state(&src).unwrap();
    let e = restore_vm_state(
        &RecordingVcpu::new(),
        &state,
        ClockRestore::AdvanceByWallTime,
    )
    .unwrap_err();
    assert!(matches!(e, KvmStateError::NoRealtimeClock), "{e}");
}

#[test]
fn snapshottable_components_restore_from_every_codec_and_report_paths() {
    let src = RecordingVcpu::new();
    let mut devices = KvmVmDevices::new(src.clone(), ClockRestore::Exact);
    let mut vcpu = KvmVcpu::new(3, src.clone(), src.caps());
    let registry = migration_serde::registry();
    for codec in registry.iter() {
        let codec: Arc<dyn Codec> = codec.clone();
        let mut vm = Snapshot::new("vm");
        vm.snapshot_child(&mut devices).unwrap();
        vm.snapshot_child(&mut vcpu).unwrap();
        vm.encode(&codec).unwrap();
        let bytes = migration_core::codec::encode(codec.as_ref(), &vm).unwrap();
        let mut read: Snapshot = migration_core::codec::decode(codec.as_ref(), &bytes).unwrap();
        read.resolve_codecs(&registry);

        let dst = RecordingVcpu::new();
        let mut dst_devices = KvmVmDevices::new(dst.clone(), ClockRestore::Exact);
        let mut dst_vcpu = KvmVcpu::new(3, dst.clone(), dst.caps());
        read.restore_child(&mut dst_devices).unwrap();
        read.restore_child(&mut dst_vcpu).unwrap();
        assert_eq!(
            dst_vcpu.save_state().unwrap(),
            vcpu.save_state().unwrap(),
            "codec {}",
            codec.name()
        );
        assert_eq!(
            dst_devices.save_state().unwrap(),
            devices.save_state().unwrap()
        );

        // A failing set reaches the caller as MigratableError::Restore at vm/vcpu3.
        let bad = RecordingVcpu::new();
        bad.fail_on(Some("set_lapic"));
        let mut bad_vcpu = KvmVcpu::new(3, bad.clone(), bad.caps());
        let e = read.restore_child(&mut bad_vcpu).unwrap_err();
        assert!(matches!(e, MigratableError::Restore { .. }), "{e}");
        assert_eq!(e.path(), Some("vm/vcpu3"));
        assert!(e.to_string().contains("lapic"), "{e}");
    }
}
