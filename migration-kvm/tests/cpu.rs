//! CPU compatibility with real KVM guests (KVM-gated): a snapshot restore and an
//! incoming migration onto a fake "smaller" host (this host's model with a feature
//! taken away, a smaller xsave area, a missing MSR, another vendor) are refused
//! before any state is written, the refusal names what is missing, and the source
//! keeps running; `force` restores anyway and keeps the diff; a guest built from a
//! template that hides AVX-512 sees no AVX-512 (the `cpuid_report` guest executes
//! CPUID and reports it) and its snapshot restores on the host the template
//! describes. Skipped visibly without /dev/kvm, failing instead under
//! `MIGRATION_REQUIRE_KVM=1`.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use migration_core::destination::receive_migration_over;
use migration_core::precopy::send_migration_over;
use migration_core::protocol::MigrationError;
use migration_core::{MigratableError, Snapshottable};
use migration_kvm::cpu_features::{feature_by_name, named_features, FeatureBit};
use migration_kvm::restore::EagerOptions;
use migration_kvm::{CpuModel, CpuPolicy, KvmVm, KvmVmConfig, KvmVmError, RestoreMode, VcpuState};
use migration_testkit::guest::{cpuid_reports, CpuidSeen, Guest, GuestLog, RunningGuest};
use migration_testkit::require_kvm;

const MEM: u64 = 16 << 20;
/// Generous: only a failing guest waits this long.
const TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn host() -> CpuModel {
    CpuModel::host().expect("probe this host's CPU").clone()
}

/// This host without one feature it has, and that feature's name.
fn smaller_host() -> (CpuModel, &'static str) {
    let host = host();
    let name = ["avx2", "sse42", "popcnt", "sse2"]
        .into_iter()
        .find(|n| feature_by_name(n).is_some_and(|b| host.has(b)))
        .expect("this host has one of avx2, sse42, popcnt, sse2");
    (host.without("smaller", &[name]).unwrap(), name)
}

fn boot(guest: Guest) -> Result<RunningGuest> {
    Ok(RunningGuest::boot(guest, MEM, 0, TIMEOUT)?)
}

fn eager() -> RestoreMode {
    RestoreMode::Eager(EagerOptions::default())
}

/// The guest's vCPU 0 state in `tree`.
fn vcpu0(tree: &migration_core::Snapshot) -> Result<VcpuState> {
    let node = tree
        .find("vm/vcpu0")
        .ok_or_else(|| anyhow!("no vm/vcpu0"))?;
    Ok(VcpuState::from_snapshot(node)?)
}

#[test]
fn restore_on_a_smaller_host_is_refused_naming_the_feature_and_force_overrides() -> Result<()> {
    require_kvm!(Ok(()));
    let (small, missing) = smaller_host();
    let bit = feature_by_name(missing).unwrap();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("vm.snap");
    let mut src = boot(Guest::CpuidReport)?;
    src.advance(2)?;
    src.vm.save_snapshot(&path)?;

    // Refused, before memory is read or a VM is built.
    let log = GuestLog::new();
    let err = KvmVm::restore_from_file_with(
        &path,
        eager(),
        migration_serde::registry(),
        CpuPolicy::with_host(small.clone()),
        log.handlers(),
    )
    .expect_err("a guest with a feature the host lacks");
    let KvmVmError::Cpu(refusal) = &err else {
        return Err(anyhow!("not a CPU refusal: {err}"));
    };
    let text = err.to_string();
    eprintln!("refused restore: {text}");
    ensure!(
        text.contains(&format!("missing {missing} ({bit})")),
        "{text}"
    );
    ensure!(refusal.report().differences.len() == 1, "{text}");

    // This host: restores, and the guest goes on.
    let log = GuestLog::new();
    let mut dst =
        KvmVm::restore_from_file(&path, eager(), migration_serde::registry(), log.handlers())?;
    ensure!(dst.cpu_forced().is_none());
    dst.start()?;
    let baseline = src.last_progress()?;
    log.wait(Some(baseline), 2, TIMEOUT)?;
    dst.stop()?;

    // A restore into a built VM is refused before anything is written: its vCPU
    // state is what it was.
    let later = {
        src.advance(2)?;
        src.vm.stop()?;
        let t = src.vm.snapshot()?;
        src.vm.start()?;
        t
    };
    let before = vcpu0(&dst.snapshot()?)?;
    ensure!(
        vcpu0(&later)?.regs != before.regs,
        "the two states must differ"
    );
    dst.set_cpu_policy(CpuPolicy::with_host(small.clone()));
    let err = dst.restore(&later).expect_err("refused");
    ensure!(err.to_string().contains(missing), "{err}");
    // (The TSC and the LAPIC timer move on by themselves: compare the rest.)
    let after = vcpu0(&dst.snapshot()?)?;
    ensure!(
        (
            after.regs,
            after.sregs,
            &after.xsave,
            after.xcrs,
            &after.cpuid
        ) == (
            before.regs,
            before.sregs,
            &before.xsave,
            before.xcrs,
            &before.cpuid
        ),
        "state written by a refused restore"
    );

    // Forced: restores, and the diff is kept, not dropped.
    let log = GuestLog::new();
    let forced = KvmVm::restore_from_file_with(
        &path,
        eager(),
        migration_serde::registry(),
        CpuPolicy {
            force: true,
            ..CpuPolicy::with_host(small)
        },
        log.handlers(),
    )?;
    let kept = forced.cpu_forced().ok_or_else(|| anyhow!("no diff kept"))?;
    ensure!(kept.to_string().contains(missing), "{kept}");
    Ok(())
}

/// Migrates `src` to a destination that checks against `host`; returns the
/// source's error.
fn migrate_to_fake_host(src: &mut RunningGuest, host: CpuModel) -> Result<MigrationError> {
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    let dest = thread::spawn(move || {
        let log = GuestLog::new();
        receive_migration_over(
            b,
            &KvmVm::receive_options(migration_serde::registry()),
            |incoming| -> Result<KvmVm, MigratableError> {
                Ok(KvmVm::for_incoming_with(
                    incoming,
                    migration_serde::registry(),
                    CpuPolicy::with_host(host),
                    log.handlers(),
                )?)
            },
        )
        .map(|_| ())
    });
    let mut opts = src.vm.migration_options();
    let result = send_migration_over(&mut src.vm, a, &mut opts);
    let dest = dest.join().map_err(|_| anyhow!("destination panicked"))?;
    ensure!(dest.is_err(), "the destination accepted");
    result
        .err()
        .ok_or_else(|| anyhow!("the migration succeeded"))
}

#[test]
fn incoming_migration_to_a_smaller_host_is_refused_in_the_handshake() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(2)?;
    let guest = src
        .vm
        .config()
        .cpu
        .clone()
        .ok_or_else(|| anyhow!("no guest CPU model"))?;

    let (small, missing) = smaller_host();
    let mut small_xsave = host();
    small_xsave.xsave_size = guest.xsave_size / 2;
    let msr = *guest.msrs.last().ok_or_else(|| anyhow!("no MSR"))?;
    let mut no_msr = host();
    no_msr.msrs.retain(|&m| m != msr);
    let mut other_vendor = host();
    let other: &[u8; 12] = if guest.vendor() == "GenuineIntel" {
        b"AuthenticAMD"
    } else {
        b"GenuineIntel"
    };
    if let Some(l0) = other_vendor.cpuid.iter_mut().find(|e| e.function == 0) {
        let w = |i: usize| u32::from_le_bytes([other[i], other[i + 1], other[i + 2], other[i + 3]]);
        (l0.ebx, l0.edx, l0.ecx) = (w(0), w(4), w(8));
    }
    let bit = feature_by_name(missing).unwrap();
    let cases = [
        (small, format!("missing {missing} ({bit})")),
        (
            small_xsave,
            format!("xsave area of {} bytes", guest.xsave_size),
        ),
        (no_msr, format!("MSR {msr:#x} is not settable")),
        (
            other_vendor,
            format!("host is {:?}", String::from_utf8_lossy(other)),
        ),
    ];
    for (fake, expected) in cases {
        let refusal = CpuPolicy::with_host(fake.clone())
            .admit(&guest)
            .expect_err("the fake host lacks part of the guest's CPU");
        let err = migrate_to_fake_host(&mut src, fake)?;
        eprintln!("refused migration: {err}");
        // Refused: the destination's ABORT answered the HELLO (no memory moved).
        ensure!(
            matches!(&err, MigrationError::Refused(r) if r.contains(&expected)),
            "expected a HELLO answered by ABORT naming {expected:?}, got: {err}"
        );
        // Each thing said once: who refused, why, and the CPU check's own words.
        ensure!(
            err.to_string() == format!("destination refused: cannot build the VM: {refusal}"),
            "{err}"
        );
        // The source keeps running and passing its self-check.
        ensure!(src.vm.is_running(), "source paused after {expected}");
        src.advance(2)
            .with_context(|| format!("source after {expected}"))?;
    }
    Ok(())
}

/// Every named AVX-512 feature and XSAVE component.
fn avx512() -> Vec<(&'static str, FeatureBit)> {
    named_features("GenuineIntel")
        .into_iter()
        .chain(named_features("AuthenticAMD"))
        .filter_map(|f| Some((f.name?, f.bit)))
        .filter(|(n, _)| n.starts_with("avx512") || n.starts_with("xcr0_avx512"))
        .collect()
}

/// Whether the guest's last complete report shows `bit`.
fn seen(report: &[CpuidSeen], bit: FeatureBit) -> bool {
    report.iter().any(|s| {
        s[0] == bit.reg.leaf
            && s[1] == bit.reg.subleaf
            && s[2 + bit.reg.reg as usize] & (1 << bit.bit) != 0
    })
}

fn last_report(log: &GuestLog, baseline: Option<u32>) -> Result<Vec<CpuidSeen>> {
    let m = log.monitor(baseline, 0);
    cpuid_reports(m.infos())
        .pop()
        .ok_or_else(|| anyhow!("no complete CPUID report"))
}

#[test]
fn a_guest_built_from_a_template_without_avx512_sees_none_and_restores_on_that_host() -> Result<()>
{
    require_kvm!(Ok(()));
    let avx512 = avx512();
    ensure!(avx512.len() >= 15, "{} AVX-512 names", avx512.len());
    let names: Vec<&str> = avx512.iter().map(|(n, _)| *n).collect();
    let template = host().without("no-avx512", &names)?;
    let mut config = KvmVmConfig::new(MEM, 1);
    config.cpu = Some(template.clone());
    let mut src = RunningGuest::boot_with(Guest::CpuidReport, config, 0, TIMEOUT)?;
    src.advance(2)?;

    // The guest executed CPUID: no AVX-512 feature and no AVX-512 XSAVE state.
    let report = last_report(&src.log, None)?;
    for (name, bit) in &avx512 {
        ensure!(!seen(&report, *bit), "the guest sees {name} ({bit})");
    }
    // The model the VM recorded carries the template's name and no AVX-512 either.
    let model = src
        .vm
        .config()
        .cpu
        .clone()
        .ok_or_else(|| anyhow!("no model"))?;
    ensure!(model.name == "no-avx512", "{}", model.name);
    for (name, bit) in &avx512 {
        ensure!(!model.has(*bit), "the recorded model has {name}");
    }

    // Its snapshot restores on the host the template describes, and the guest goes
    // on, still without AVX-512.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("t.snap");
    src.vm.save_snapshot(&path)?;
    let baseline = Some(src.last_progress()?);
    let log = GuestLog::new();
    let mut dst = KvmVm::restore_from_file_with(
        &path,
        eager(),
        migration_serde::registry(),
        CpuPolicy::with_host(template),
        log.handlers(),
    )
    .context("restore on the template's host")?;
    ensure!(dst.cpu_forced().is_none());
    ensure!(dst.config().cpu.as_ref().map(|m| m.name.as_str()) == Some("no-avx512"));
    dst.start()?;
    log.wait(baseline, 2, TIMEOUT)?;
    let report = last_report(&log, baseline)?;
    for (name, bit) in &avx512 {
        ensure!(!seen(&report, *bit), "after restore the guest sees {name}");
    }
    Ok(())
}
