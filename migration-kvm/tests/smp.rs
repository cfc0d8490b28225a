//! Guests with several vCPUs (KVM-gated): migration-testkit's SMP guest, 2 and 4
//! vCPUs (more vCPUs than this project's 2-core machines have cores), started both
//! ways (every vCPU at the entry point; APs woken with INIT-SIPI-SIPI), through
//! snapshot and restore in a new process and live migration; an AP snapshotted while
//! it waits for INIT or for SIPI, then woken; IPIs in flight at the snapshot; and
//! what the guest sees when one vCPU's state is restored wrong (its LAPIC from
//! another vCPU, its `vcpu_events` dropped, its in-flight IPI lost, its wait-for-SIPI
//! state lost).
//!
//! Every stopping point that decides an outcome is one the guest announces
//! (`GuestLog::park_at`), so what the snapshot holds is certain, not timed; waits
//! are generous and bound only how long a failing guest is given.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};
use migration_core::{MemorySink, MemorySource};
use migration_kvm::{KvmVm, KvmVmConfig, MachineState, RestoreMode, VcpuState};
use migration_testkit::guest::smp::{
    ipi_pending, lapic_tag, SmpCheck, SmpCounters, SmpFailure, SmpMarker, PERCPU_ADDR,
    PERCPU_STRIDE, SHARED_COUNTER_ADDR, TSC_STAMP_ADDR,
};
use migration_testkit::guest::{
    load_vcpus, Failure, Guest, GuestLog, RunningGuest, SmpStart, Verdict,
};
use migration_testkit::require_kvm;

mod child;
#[allow(dead_code)] // the SMP tests use only some of what the others share
mod common;

use common::{codecs, IO_TIMEOUT, TIMEOUT};

/// Guest RAM.
const MEM: u64 = 32 << 20;
/// Progress events (rounds in which every vCPU advanced) before a snapshot or
/// migration, and after it.
const BEFORE: u64 = 3;
const AFTER: u64 = 5;
/// How long a guest whose restore is known to be broken is watched for progress
/// anyway (it must make none).
const DEAD_WAIT: Duration = Duration::from_secs(3);
const CHILD_ENV: &str = "MIGRATION_KVM_SMP_CHILD_DIR";

/// A VM of `vcpus` vCPUs with the SMP guest loaded, paused, and its log; `park`
/// stopping points are set before any vCPU runs.
fn build(vcpus: u32, start: SmpStart, park: &[(u32, SmpMarker)]) -> Result<(KvmVm, GuestLog)> {
    let log = GuestLog::new();
    for (vcpu, marker) in park {
        log.park_at(*vcpu, marker.value());
    }
    let vm = KvmVm::new(KvmVmConfig::new(MEM, vcpus), codecs(), log.handlers())?;
    load_vcpus(&vm, Guest::Smp.image(), 0, start)?;
    Ok((vm, log))
}

fn boot(vcpus: u32, start: SmpStart) -> Result<RunningGuest> {
    Ok(RunningGuest::boot_smp(
        Guest::Smp,
        KvmVmConfig::new(MEM, vcpus),
        0,
        start,
        TIMEOUT,
    )?)
}

fn counters(vm: &KvmVm) -> Result<Vec<SmpCounters>> {
    Ok(SmpCounters::read(
        vm.memory().mmap(),
        vm.vcpu_count() as u32,
    )?)
}

/// Every vCPU ran, took IPIs and saw rounds since `before`.
fn every_vcpu_advanced(before: &[SmpCounters], after: &[SmpCounters]) -> Result<()> {
    ensure!(before.len() == after.len());
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        ensure!(
            a.started
                && a.heartbeat > b.heartbeat
                && a.received > b.received
                && a.rounds > b.rounds,
            "vCPU {i} did not advance: {b:?} -> {a:?}"
        );
    }
    Ok(())
}

/// A fresh VM built from `src`'s config with a copy of its memory and `state`
/// restored, paused, reporting into a new log.
fn clone_vm(src: &KvmVm, state: &MachineState) -> Result<(KvmVm, GuestLog)> {
    let log = GuestLog::new();
    let mut vm = KvmVm::new(src.config().clone(), codecs(), log.handlers())?;
    for r in src.config().layout.clone() {
        let mut buf = vec![0u8; r.length as usize];
        src.memory().read_memory(r.gpa, &mut buf)?;
        vm.memory().write_memory(r.gpa, &buf)?;
    }
    vm.restore_state(state)?;
    Ok((vm, log))
}

/// The guest in `vm` (with `log`), resumed, must make `AFTER` progress events past
/// `baseline` and every vCPU must advance past `saved`.
fn continues(vm: KvmVm, log: GuestLog, baseline: u32, saved: &[SmpCounters]) -> Result<()> {
    let mut vm = vm;
    vm.start()?;
    let m = log.wait(Some(baseline), AFTER, TIMEOUT)?;
    ensure!(m.first_progress().unwrap_or(0) > baseline, "{m:?}");
    every_vcpu_advanced(saved, &counters(&vm)?)
}

/// The guest in `vm`, resumed, must fail `check` on vCPU `vcpu`, its first error.
fn fails_with(vm: KvmVm, log: GuestLog, vcpu: u32, check: SmpCheck) -> Result<()> {
    let mut vm = vm;
    vm.start()?;
    let (m, _) = log.judge(0, None, u64::MAX, TIMEOUT);
    let Verdict::Fail(Failure::GuestError(code)) = m.verdict() else {
        bail!(
            "expected the guest to report {check:?} on vCPU {vcpu}, got {:?}",
            m.verdict()
        );
    };
    let seen = SmpFailure::from_code(*code);
    ensure!(
        seen == Some(SmpFailure { vcpu, check }),
        "expected {check:?} on vCPU {vcpu}, the guest reported {code:#x} ({seen:?})"
    );
    ensure!(
        log.first_error().map(|(v, _)| v) == Some(vcpu),
        "the error came from another vCPU's exit: {:?}",
        log.first_error()
    );
    Ok(())
}

/// Waits up to `TIMEOUT` for vCPU `vcpu` of `vm` to park itself.
fn wait_parked(vm: &KvmVm, vcpu: usize, log: &GuestLog) -> Result<()> {
    ensure!(
        vm.vcpus()[vcpu].wait_for_pause(TIMEOUT)?,
        "vCPU {vcpu} never reached its stopping point; log: {:?}",
        log.monitor(None, 0)
    );
    if let Some((v, code)) = log.first_error() {
        bail!("vCPU {v} failed before the stopping point: {code:#x}");
    }
    Ok(())
}

// --- snapshot, restore in a new process -------------------------------------------

/// The restoring side, in a child process: restore from the file, check the guest
/// goes on with every vCPU, write `ok` to `result.txt`.
fn child_restore(dir: &Path) -> Result<()> {
    let baseline: u32 = std::fs::read_to_string(dir.join("baseline.txt"))?
        .trim()
        .parse()?;
    let log = GuestLog::new();
    let vm = KvmVm::restore_from_file(
        dir.join("vm.snap"),
        RestoreMode::Eager(Default::default()),
        codecs(),
        log.handlers(),
    )?;
    let saved = counters(&vm)?;
    continues(vm, log, baseline, &saved)?;
    std::fs::write(dir.join("result.txt"), "ok")?;
    Ok(())
}

fn snapshot_then_restore_in_a_new_process(test: &str, vcpus: u32, start: SmpStart) -> Result<()> {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return child_restore(Path::new(&dir));
    }
    require_kvm!(Ok(()));
    let mut src = boot(vcpus, start)?;
    src.advance(BEFORE)?;
    src.vm.stop()?;
    let dir = tempfile::tempdir()?;
    src.vm.save_snapshot(dir.path().join("vm.snap"))?;
    std::fs::write(
        dir.path().join("baseline.txt"),
        src.last_progress()?.to_string(),
    )?;
    drop(src);
    let result = child::rerun_in_child(test, CHILD_ENV, dir.path())?;
    ensure!(result == "ok", "child: {result}");
    Ok(())
}

#[test]
fn two_vcpus_started_at_the_entry_restore_in_a_new_process() -> Result<()> {
    snapshot_then_restore_in_a_new_process(
        "two_vcpus_started_at_the_entry_restore_in_a_new_process",
        2,
        SmpStart::AllAtEntry,
    )
}

#[test]
fn four_vcpus_woken_by_init_sipi_restore_in_a_new_process() -> Result<()> {
    snapshot_then_restore_in_a_new_process(
        "four_vcpus_woken_by_init_sipi_restore_in_a_new_process",
        4,
        SmpStart::InitSipi,
    )
}

// --- live migration ---------------------------------------------------------------

#[test]
fn two_and_four_vcpus_migrate_while_running() -> Result<()> {
    require_kvm!(Ok(()));
    let dir = tempfile::tempdir()?;
    for (vcpus, start) in [(2, SmpStart::AllAtEntry), (4, SmpStart::InitSipi)] {
        let mut src = boot(vcpus, start)?;
        src.advance(BEFORE)?;
        let url = format!(
            "unix://{}",
            dir.path().join(format!("smp{vcpus}")).display()
        );
        let (dst, report) = src
            .migrate_to(&url, codecs(), IO_TIMEOUT)
            .with_context(|| format!("{vcpus} vCPUs"))?;
        // The source is paused: its memory is what the destination got.
        let handed_over = counters(&src.vm)?;
        let m = dst
            .advance(AFTER)
            .with_context(|| format!("{vcpus} vCPUs"))?;
        ensure!(m.first_progress().unwrap_or(0) > dst.baseline.unwrap_or(0));
        every_vcpu_advanced(&handed_over, &counters(&dst.vm)?)
            .with_context(|| format!("{vcpus} vCPUs"))?;
        eprintln!(
            "{vcpus} vCPUs: {} rounds, downtime {:?}",
            report.rounds.len(),
            report.downtime.total
        );
    }
    Ok(())
}

// --- an AP waiting for INIT or SIPI ---------------------------------------------

/// The BSP stopped right before sending INIT to vCPU 1 (which waits for INIT), or
/// right after it (vCPU 1 waits for SIPI): a snapshot there restored into a fresh VM
/// must let the BSP wake vCPU 1, which must start. Restored as waiting for INIT when
/// it had received INIT (its mp_state lost), vCPU 1 ignores the SIPI and never
/// starts: the guest makes no progress at all.
#[test]
fn an_ap_snapshotted_waiting_for_init_or_sipi_starts_when_woken_after_restore() -> Result<()> {
    require_kvm!(Ok(()));
    for (marker, mp_state) in [
        (SmpMarker::WakeInit(1), KVM_MP_STATE_UNINITIALIZED),
        (SmpMarker::WakeSipi(1), KVM_MP_STATE_INIT_RECEIVED),
    ] {
        let (mut vm, log) = build(2, SmpStart::InitSipi, &[(0, marker)])?;
        vm.start()?;
        wait_parked(&vm, 0, &log)?;
        vm.stop()?;
        let state = vm.save_state()?;
        ensure!(
            state.vcpus[1].mp_state.get().mp_state == mp_state,
            "{marker:?}: vCPU 1 saved in mp_state {}",
            state.vcpus[1].mp_state.get().mp_state
        );
        ensure!(log.infos_of(1).is_empty(), "vCPU 1 ran before it was woken");
        let saved = counters(&vm)?;
        ensure!(!saved[1].started);

        let (dst, dst_log) = clone_vm(&vm, &state)?;
        continues(dst, dst_log.clone(), 0, &saved).with_context(|| format!("{marker:?}"))?;
        ensure!(dst_log.infos_of(1).contains(&SmpMarker::Started(1).value()));

        if mp_state == KVM_MP_STATE_INIT_RECEIVED {
            let mut lost = state.clone();
            lost.vcpus[1].mp_state = migration_kvm::Raw::new(kvm_bindings::kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            });
            let (mut dst, dst_log) = clone_vm(&vm, &lost)?;
            dst.start()?;
            let (m, _) = dst_log.judge(0, None, 1, DEAD_WAIT);
            ensure!(
                matches!(m.verdict(), Verdict::Fail(Failure::Timeout { seen: 0, .. })),
                "vCPU 1 restored waiting for INIT must miss the SIPI: {:?}",
                m.verdict()
            );
            ensure!(!counters(&dst)?[1].started, "vCPU 1 started anyway");
        }
    }
    Ok(())
}

// --- IPIs in flight ----------------------------------------------------------------

/// Parks vCPU 1 in its NMI handler (interrupts off) and waits until vCPU 0 has sent
/// it an IPI it cannot take yet; then stops the VM. Returns the VM, its log and the
/// state, in which vCPU 1's LAPIC holds the IPI.
fn ipi_in_flight(vcpus: u32) -> Result<(KvmVm, GuestLog, MachineState)> {
    let (mut vm, log) = build(
        vcpus,
        SmpStart::AllAtEntry,
        &[(1, SmpMarker::NmiBlocked(1))],
    )?;
    vm.start()?;
    wait_parked(&vm, 1, &log)?;
    // vCPU 0 sends its next IPI once its last one arrived: since vCPU 1 stopped, at
    // most one more. `sent` counts it after the ICR write.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let c = counters(&vm)?;
        if c[0].sent > c[1].received {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "vCPU 0 never sent vCPU 1 an IPI: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.stop()?;
    let state = vm.save_state()?;
    let c = counters(&vm)?;
    ensure!(c[0].sent == c[1].received + 1, "{c:?}");
    ensure!(
        ipi_pending(lapic_of(&state.vcpus[1])?),
        "vCPU 1's LAPIC does not hold the IPI"
    );
    Ok((vm, log, state))
}

/// A vCPU's LAPIC state (a `KvmVm` has the full irqchip: every vCPU has one).
fn lapic_of(state: &VcpuState) -> Result<&kvm_bindings::kvm_lapic_state> {
    Ok(state.lapic.as_ref().context("no LAPIC saved")?.get())
}

/// An IPI requested but not delivered when the VM stops is in the receiver's LAPIC;
/// restored, it is delivered: the guest counts every IPI, and the sender would
/// report it lost. The same snapshot with that IRR bit cleared shows the guest sees
/// the loss.
#[test]
fn an_ipi_in_flight_at_the_snapshot_arrives_after_restore() -> Result<()> {
    require_kvm!(Ok(()));
    for vcpus in [2, 4] {
        let (vm, log, state) = ipi_in_flight(vcpus)?;
        let saved = counters(&vm)?;
        let baseline = log.last_progress().unwrap_or(0);
        let (dst, dst_log) = clone_vm(&vm, &state)?;
        continues(dst, dst_log, baseline, &saved).with_context(|| format!("{vcpus} vCPUs"))?;

        let mut lost = state.clone();
        let lapic = lost.vcpus[1].lapic.as_mut().context("no LAPIC")?.get_mut();
        lapic.regs[0x220] &= !1; // IRR bit of vector 0x40
        ensure!(!ipi_pending(lapic_of(&lost.vcpus[1])?));
        let (dst, dst_log) = clone_vm(&vm, &lost)?;
        fails_with(dst, dst_log, 0, SmpCheck::IpiLost).with_context(|| format!("{vcpus} vCPUs"))?;
    }
    Ok(())
}

// --- one vCPU restored wrong --------------------------------------------------------

/// vCPU 1 restored with vCPU 0's LAPIC (KVM keeps vCPU 1's x2APIC ID, so only what
/// the LAPIC holds moves): the guest's first ring-0 entry on vCPU 1 sees another
/// vCPU's tag, whatever the pause point. The same state restored right goes on.
#[test]
fn a_lapic_restored_from_another_vcpu_is_seen_by_the_guest() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = boot(2, SmpStart::AllAtEntry)?;
    src.advance(BEFORE)?;
    src.vm.stop()?;
    let state = src.vm.save_state()?;
    ensure!(lapic_tag(lapic_of(&state.vcpus[0])?) == Some(0));
    ensure!(lapic_tag(lapic_of(&state.vcpus[1])?) == Some(1));
    let saved = counters(&src.vm)?;
    let baseline = src.last_progress()?;

    let mut swapped = state.clone();
    swapped.vcpus[1].lapic = state.vcpus[0].lapic;
    let (dst, log) = clone_vm(&src.vm, &swapped)?;
    fails_with(dst, log, 1, SmpCheck::LapicTag)?;

    let (dst, log) = clone_vm(&src.vm, &state)?;
    continues(dst, log, baseline, &saved)
}

/// vCPU 1 stopped in its NMI handler, where NMIs are blocked until its IRETQ (held
/// in `vcpu_events`), and restored without its `vcpu_events` (those of a fresh
/// vCPU): the second NMI it sends itself nests, and the guest says so. The same state
/// restored right goes on.
#[test]
fn dropped_vcpu_events_of_one_vcpu_are_seen_by_the_guest() -> Result<()> {
    require_kvm!(Ok(()));
    let (mut vm, log) = build(2, SmpStart::AllAtEntry, &[(1, SmpMarker::NmiBlocked(1))])?;
    vm.start()?;
    wait_parked(&vm, 1, &log)?;
    vm.stop()?;
    let state = vm.save_state()?;
    ensure!(
        state.vcpus[1].vcpu_events.get().nmi.masked == 1,
        "vCPU 1 must be saved with NMIs blocked"
    );
    let saved = counters(&vm)?;
    let baseline = log.last_progress().unwrap_or(0);

    let fresh =
        KvmVm::new(vm.config().clone(), codecs(), GuestLog::new().handlers())?.save_state()?;
    let mut dropped = state.clone();
    dropped.vcpus[1].vcpu_events = fresh.vcpus[1].vcpu_events;
    ensure!(dropped.vcpus[1].vcpu_events.get().nmi.masked == 0);
    let (dst, dst_log) = clone_vm(&vm, &dropped)?;
    fails_with(dst, dst_log, 1, SmpCheck::NmiNested)?;

    let (dst, dst_log) = clone_vm(&vm, &state)?;
    continues(dst, dst_log, baseline, &saved)
}

// --- the guest's other checks ---------------------------------------------------------

/// The checks the tests above do not reach, shown to fire: a TSC stamp from the
/// future, a torn shared counter (its halves disagree, or its count is off the
/// contributions), a heartbeat set back, and two vCPUs' registers swapped on
/// restore.
#[test]
fn the_smp_guest_sees_corrupted_memory_and_swapped_registers() -> Result<()> {
    require_kvm!(Ok(()));
    // (address, value, the checks that may fire first, by any vCPU)
    let heartbeat1 = PERCPU_ADDR + PERCPU_STRIDE; // vCPU 1's counters, heartbeat first
    let cases: [(&str, u64, u64, &[SmpCheck]); 3] = [
        ("stamp", TSC_STAMP_ADDR, u64::MAX / 2, &[SmpCheck::Tsc]),
        (
            "shared",
            SHARED_COUNTER_ADDR,
            0x1234_5678_0000_0001,
            &[SmpCheck::Shared, SmpCheck::Sum],
        ),
        (
            "heartbeat",
            heartbeat1,
            0,
            &[SmpCheck::Mirror, SmpCheck::HeartbeatBack],
        ),
    ];
    for (what, addr, value, checks) in cases {
        let src = boot(2, SmpStart::AllAtEntry)?;
        src.advance(BEFORE)?;
        // The guest stores to some of these addresses itself, which may overwrite a
        // write landing between its load and its store: write until it reports.
        let deadline = Instant::now() + TIMEOUT;
        while src.log.first_error().is_none() && Instant::now() < deadline {
            src.vm.memory().write_memory(addr, &value.to_le_bytes())?;
            std::thread::sleep(Duration::from_millis(1));
        }
        let (m, _) = src.log.judge(0, None, u64::MAX, Duration::ZERO);
        let code = m.error_code();
        let seen = code.and_then(SmpFailure::from_code);
        ensure!(
            seen.is_some_and(|f| checks.contains(&f.check)),
            "{what}: expected one of {checks:?}, got {:?} ({seen:?})",
            m.verdict()
        );
    }

    // Registers only (RIP, RSP, RFLAGS, GPRs), not segments: swapped where both
    // vCPUs are in ring 3, or a vCPU would run ring-0 code at CPL 3 and fault.
    let mut src = boot(2, SmpStart::AllAtEntry)?;
    src.advance(BEFORE)?;
    let mut attempts = 0;
    let state = loop {
        src.vm.stop()?;
        let state = src.vm.save_state()?;
        if state
            .vcpus
            .iter()
            .all(|v| v.sregs.get().cs.selector & 3 == 3)
        {
            break state;
        }
        attempts += 1;
        ensure!(attempts < 200, "never caught both vCPUs in ring 3");
        src.vm.start()?;
        src.advance(1)?;
    };
    let mut swapped = state.clone();
    swapped.vcpus[0].regs = state.vcpus[1].regs;
    swapped.vcpus[1].regs = state.vcpus[0].regs;
    let (mut dst, log) = clone_vm(&src.vm, &swapped)?;
    dst.start()?;
    let (m, _) = log.judge(0, None, u64::MAX, TIMEOUT);
    let seen = m.error_code().and_then(SmpFailure::from_code);
    ensure!(
        seen.is_some_and(|f| f.check == SmpCheck::Identity),
        "swapped registers: {:?} ({seen:?})",
        m.verdict()
    );
    Ok(())
}
