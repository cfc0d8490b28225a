//! The save/restore order, checked call by call against migration-testkit's
//! `RecordingVcpu` and `RecordingMachine` (no /dev/kvm needed), and the typed errors of
//! failing calls.

use std::sync::Arc;

use migration_core::{Codec, MigratableError, Snapshot};
use migration_kvm::order::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use migration_kvm::{
    restore_machine, restore_vm_state, save_machine, save_vm_state, ClockRestore, DeviceLayout,
    Direction, KvmStateError, KvmVcpu, KvmVmDevices, MachineError, Step, VcpuStep, VmStep,
};
use migration_testkit::recording_machine::RecordingMachine;
use migration_testkit::recording_vcpu::{Call, RecordingVcpu};

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
    let vm_state = save_vm_state(fake, &DeviceLayout::FULL_WITH_PIT).unwrap();
    let state = vcpu.save_state().unwrap();

    let dst = RecordingVcpu::new();
    dst.set_current_tsc_khz(1_000_000); // differs from the saved rate: set_tsc_khz runs
    let dst_vcpu = KvmVcpu::new(0, dst.clone(), dst.caps());
    restore_vm_state(
        &dst,
        &DeviceLayout::FULL_WITH_PIT,
        &vm_state,
        ClockRestore::Exact,
    )
    .unwrap();
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
    let state = save_vm_state(&src, &DeviceLayout::FULL_WITH_PIT).unwrap();
    let dst = RecordingVcpu::new();
    dst.fail_on(Some("set_irqchip(pic_slave)"));
    let e = restore_vm_state(
        &dst,
        &DeviceLayout::FULL_WITH_PIT,
        &state,
        ClockRestore::Exact,
    )
    .unwrap_err();
    assert_eq!(e.step(), Some(Step::Vm(VmStep::PicSlave)));
    assert!(!dst.call_names().contains(&"set_irqchip(ioapic)"));
}

#[test]
fn advancing_the_clock_needs_a_realtime_timestamp() {
    let src = RecordingVcpu::new(); // its clock has no KVM_CLOCK_REALTIME flag
    let state = save_vm_state(&src, &DeviceLayout::FULL_WITH_PIT).unwrap();
    let e = restore_vm_state(
        &RecordingVcpu::new(),
        &DeviceLayout::FULL_WITH_PIT,
        &state,
        ClockRestore::AdvanceByWallTime,
    )
    .unwrap_err();
    assert!(matches!(e, KvmStateError::NoRealtimeClock), "{e}");
}

#[test]
fn snapshottable_components_restore_from_every_codec_and_report_paths() {
    let src = RecordingVcpu::new();
    let mut devices = KvmVmDevices::new(
        src.clone(),
        DeviceLayout::FULL_WITH_PIT,
        ClockRestore::Exact,
    );
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
        let mut dst_devices = KvmVmDevices::new(
            dst.clone(),
            DeviceLayout::FULL_WITH_PIT,
            ClockRestore::Exact,
        );
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

/// vCPUs of the recording machines below: more than the 2 cores of a small host.
const VCPUS: u32 = 4;

/// The names of the calls of vCPU `vcpu` (`None`: of the VM) starting with `prefix`.
fn names_of(calls: &[Call], vcpu: Option<u32>, prefix: &str) -> Vec<&'static str> {
    calls
        .iter()
        .filter(|c| c.vcpu == vcpu && c.name.starts_with(prefix))
        .map(|c| c.name)
        .collect()
}

/// Where the first call starting with `prefix` by any vCPU (`vcpus`) or by the VM
/// (`!vcpus`) is, and where the last one is.
fn span(calls: &[Call], vcpus: bool, prefix: &str) -> (usize, usize) {
    let hits: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.vcpu.is_some() == vcpus && c.name.starts_with(prefix))
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "no `{prefix}` call: {calls:?}");
    (hits[0], hits[hits.len() - 1])
}

/// The calls starting with `prefix` ("get_": a save, "set_": a restore of `state`)
/// that one fresh vCPU makes alone: the reference each vCPU of a machine follows.
fn one_vcpu_calls(prefix: &str, state: &migration_kvm::VcpuState) -> Vec<&'static str> {
    let fake = RecordingVcpu::new().sibling(0);
    let vcpu = KvmVcpu::new(0, fake.clone(), fake.caps());
    if prefix == "get_" {
        vcpu.save_state().unwrap();
    } else {
        vcpu.restore_state(state).unwrap();
    }
    names_of(&fake.calls(), Some(0), prefix)
}

#[test]
fn machine_save_pauses_every_vcpu_before_reading_any_state() {
    let m = RecordingMachine::new(VCPUS);
    let state = save_machine(&m.devices(), &m).unwrap();
    let calls = m.calls();
    let first_read = calls
        .iter()
        .position(|c| c.name.starts_with("get_"))
        .unwrap();
    for v in 0..VCPUS {
        assert!(
            calls[..first_read]
                .iter()
                .any(|c| c.name == "pause" && c.vcpu == Some(v)),
            "vCPU {v} not paused before the first read: {calls:?}"
        );
    }
    // Devices, then vCPUs (MACHINE_SAVE_ORDER); each vCPU in VCPU_SAVE_ORDER (its
    // reads interleave with the others', which run on their own threads).
    assert!(span(&calls, false, "get_").1 < span(&calls, true, "get_").0);
    let reference = one_vcpu_calls("get_", &state.vcpus[0]);
    for v in 0..VCPUS {
        // (A fresh vCPU's first save also computes its MSR list: cpuid2, MCG_CAP,
        // MTRRcap, before its MSRs.)
        let reads = names_of(&calls, Some(v), "get_");
        assert_eq!(reads, reference, "vCPU {v}");
        assert_eq!(reads.first(), Some(&"get_mp_state"));
    }
    // Every vCPU's state is its own, in index order.
    for (i, s) in state.vcpus.iter().enumerate() {
        assert_eq!(s.regs.get().rax, 0x1111 + i as u64, "vCPU {i}");
    }
}

#[test]
fn machine_restore_writes_the_devices_then_every_vcpu_in_its_order() {
    let src = RecordingMachine::new(VCPUS);
    let state = save_machine(&src.devices(), &src).unwrap();
    let dst = RecordingMachine::new(VCPUS);
    dst.devices().vm().set_current_tsc_khz(2_000_000);
    dst.clear();
    restore_machine(&dst.devices(), &dst, &state).unwrap();
    let calls = dst.calls();
    let first_write = calls
        .iter()
        .position(|c| c.name.starts_with("set_"))
        .unwrap();
    let pauses = calls[..first_write]
        .iter()
        .filter(|c| c.name == "pause")
        .count();
    assert_eq!(pauses, VCPUS as usize, "{calls:?}");
    // Every device write before the first vCPU write.
    assert!(span(&calls, false, "set_").1 < span(&calls, true, "set_").0);
    // Each vCPU exactly as one vCPU alone restores (VCPU_RESTORE_ORDER).
    let reference = one_vcpu_calls("set_", &state.vcpus[0]);
    assert_eq!(reference.last(), Some(&"set_vcpu_events"));
    for v in 0..VCPUS {
        assert_eq!(names_of(&calls, Some(v), "set_"), reference, "vCPU {v}");
    }
    // And every vCPU got its own state back.
    assert_eq!(save_machine(&dst.devices(), &dst).unwrap(), state);
}

#[test]
fn a_vcpu_that_cannot_pause_stops_the_machine_before_any_state_is_touched() {
    let m = RecordingMachine::new(VCPUS);
    let state = save_machine(&m.devices(), &m).unwrap();
    m.clear();
    m.refuse_pause(Some(2));
    let e = save_machine(&m.devices(), &m).unwrap_err();
    assert!(matches!(e, MachineError::Vcpu { index: 2, .. }), "{e}");
    let e = restore_machine(&m.devices(), &m, &state).unwrap_err();
    assert!(matches!(e, MachineError::Vcpu { index: 2, .. }), "{e}");
    let touched: Vec<_> = m
        .calls()
        .into_iter()
        .filter(|c| c.name != "pause")
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
}

#[test]
fn a_machine_state_for_another_vcpu_count_is_refused_before_anything() {
    let src = RecordingMachine::new(VCPUS);
    let state = save_machine(&src.devices(), &src).unwrap();
    let dst = RecordingMachine::new(2);
    dst.clear();
    let e = restore_machine(&dst.devices(), &dst, &state).unwrap_err();
    assert!(
        matches!(
            e,
            MachineError::Count {
                states: 4,
                vcpus: 2
            }
        ),
        "{e}"
    );
    assert!(dst.calls().is_empty(), "{:?}", dst.calls());
}

#[test]
fn a_failing_vcpu_of_a_machine_names_itself() {
    let src = RecordingMachine::new(VCPUS);
    let state = save_machine(&src.devices(), &src).unwrap();
    let dst = RecordingMachine::new(VCPUS);
    dst.vcpu(3).fail_on(Some("set_lapic"));
    let e = restore_machine(&dst.devices(), &dst, &state).unwrap_err();
    match &e {
        MachineError::Vcpu { index: 3, source } => {
            assert_eq!(source.step(), Some(Step::Vcpu(VcpuStep::Lapic)), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let e = MigratableError::from(e).within("vm");
    assert!(matches!(e, MigratableError::Restore { .. }), "{e}");
    assert_eq!(e.path(), Some("vm/vcpu3"));
    // The devices failing name the devices.
    let dst = RecordingMachine::new(VCPUS);
    dst.devices().vm().fail_on(Some("set_irqchip(ioapic)"));
    let e = restore_machine(&dst.devices(), &dst, &state).unwrap_err();
    assert!(matches!(e, MachineError::Devices(_)), "{e}");
    assert!(
        names_of(&dst.calls(), Some(0), "set_").is_empty(),
        "no vCPU written after the devices failed"
    );
}
