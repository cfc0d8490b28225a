//! Save and restore of one vCPU + the VM's in-kernel devices, against the same raw
//! ioctls called directly in the same run (goal: ≤ 1.2×); the CPU compatibility
//! check a restore runs first, against that restore (goal: ≤ 1 ms for a full model);
//! and a whole machine's state (devices + 1, 2, 4, 8 vCPUs running the SMP guest)
//! saved and restored by `KvmVm` against the sum of the same raw ioctls (goal:
//! ≤ 1.2×, and wall time no worse than linear in the vCPU count).
//!
//! `cargo bench -p migration-kvm --bench vcpu_state`: the cold CPU figures (first
//! host probe, first check, first check that names features: once per process),
//! criterion timings, the ratios measured interleaved (median and p10–p90 of
//! rounds), then the vCPU-count sweep (`BENCH_SMP_ONLY=1`: only the sweep;
//! `BENCH_SMP_ROUNDS`, default 100; `BENCH_SMP_COLD`, fresh VMs per count for the
//! cold figures, default 8). Skips (prints why) without a usable /dev/kvm.

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use migration_kvm::cpu_check::check;
use migration_kvm::msr::MSR_CHUNK;
use migration_kvm::{
    restore_vm_state, save_vcpu_state, save_vm_state, ClockRestore, CpuModel, DeviceLayout,
    HostCaps, KvmVcpu, KvmVm, KvmVmConfig, MachineState, VcpuState, VmState,
};
use migration_testkit::bench::env_or;
use migration_testkit::guest::{load_vcpus, Guest, GuestLog, SmpStart, TestVm};

struct Raw {
    msr_chunks: Vec<Msrs>,
    cpuid: CpuId,
    xsave: Xsave,
    xsave_size: usize,
}

fn raw_save(vm: &VmFd, fd: &VcpuFd, raw: &mut Raw) {
    raw_save_devices(vm);
    raw_save_vcpu(fd, raw);
}

fn raw_save_devices(vm: &VmFd) {
    black_box(vm.get_pit2().unwrap());
    black_box(vm.get_clock().unwrap());
    for chip in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).unwrap();
        black_box(c);
    }
}

fn raw_save_vcpu(fd: &VcpuFd, raw: &mut Raw) {
    black_box(fd.get_mp_state().unwrap());
    black_box(fd.get_tsc_khz().unwrap());
    black_box(fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap());
    black_box(fd.get_regs().unwrap());
    black_box(fd.get_sregs().unwrap());
    if raw.xsave_size > 4096 {
        // SAFETY: `raw.xsave` holds KVM_CAP_XSAVE2 bytes.
        unsafe { fd.get_xsave2(&mut raw.xsave).unwrap() };
    } else {
        black_box(fd.get_xsave().unwrap());
    }
    black_box(fd.get_xcrs().unwrap());
    black_box(fd.get_debug_regs().unwrap());
    black_box(fd.get_lapic().unwrap());
    for chunk in &mut raw.msr_chunks {
        assert_eq!(fd.get_msrs(chunk).unwrap(), chunk.as_slice().len());
    }
    black_box(fd.get_vcpu_events().unwrap());
}

fn raw_restore(vm: &VmFd, fd: &VcpuFd, vm_state: &VmState, s: &VcpuState, raw: &Raw) {
    raw_restore_devices(vm, vm_state);
    raw_restore_vcpu(fd, s, raw);
}

fn raw_restore_devices(vm: &VmFd, vm_state: &VmState) {
    // The bench VM is full irqchip + PIT: every piece is there.
    vm.set_pit2(vm_state.pit2.as_ref().unwrap().get()).unwrap();
    vm.set_clock(&kvm_bindings::kvm_clock_data {
        clock: vm_state.clock.get().clock,
        ..Default::default()
    })
    .unwrap();
    for (chip, bytes) in [
        (
            KVM_IRQCHIP_PIC_MASTER,
            vm_state.pic_master.as_ref().unwrap().as_bytes(),
        ),
        (
            KVM_IRQCHIP_PIC_SLAVE,
            vm_state.pic_slave.as_ref().unwrap().as_bytes(),
        ),
        (
            KVM_IRQCHIP_IOAPIC,
            vm_state.ioapic.as_ref().unwrap().as_bytes(),
        ),
    ] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        // SAFETY: the union is plain bytes; the chip state is smaller than it.
        let dummy = unsafe { &mut c.chip.dummy };
        for (d, b) in dummy.iter_mut().zip(bytes) {
            *d = *b as i8;
        }
        vm.set_irqchip(&c).unwrap();
    }
}

fn raw_restore_vcpu(fd: &VcpuFd, s: &VcpuState, raw: &Raw) {
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().unwrap() != khz.0 {
            fd.set_tsc_khz(khz.0).unwrap();
        }
    }
    fd.set_cpuid2(&raw.cpuid).unwrap();
    fd.set_mp_state(*s.mp_state.get()).unwrap();
    fd.set_regs(s.regs.get()).unwrap();
    fd.set_sregs(s.sregs.get()).unwrap();
    // SAFETY: `raw.xsave` holds at least KVM_CAP_XSAVE2 (or 4096) bytes.
    unsafe { fd.set_xsave2(&raw.xsave).unwrap() };
    fd.set_xcrs(s.xcrs.get()).unwrap();
    fd.set_debug_regs(s.debugregs.get()).unwrap();
    fd.set_lapic(s.lapic.as_ref().unwrap().get()).unwrap();
    for chunk in &raw.msr_chunks {
        assert_eq!(fd.set_msrs(chunk).unwrap(), chunk.as_slice().len());
    }
    fd.set_vcpu_events(s.vcpu_events.get()).unwrap();
}

/// The buffers the raw ioctls of one vCPU use, built from its saved `state`.
fn raw_buffers(state: &VcpuState, xsave_size: usize) -> Raw {
    let mut xsave = Xsave::new((xsave_size - 4096).div_ceil(4)).unwrap();
    // SAFETY: only the fixed region is written.
    let region = unsafe { &mut xsave.as_mut_fam_struct().xsave.region };
    for (w, b) in region.iter_mut().zip(state.xsave.as_bytes().chunks(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .0
        .iter()
        .map(|e| kvm_msr_entry {
            index: e.index,
            data: e.data,
            ..Default::default()
        })
        .collect();
    let cpuid_entries: Vec<_> = state.cpuid.0.iter().map(Into::into).collect();
    Raw {
        msr_chunks: entries
            .chunks(MSR_CHUNK)
            .map(|c| Msrs::from_entries(c).unwrap())
            .collect(),
        cpuid: CpuId::from_entries(&cpuid_entries).unwrap(),
        xsave,
        xsave_size,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (p10, median, p90) in µs.
fn spread(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: usize| v[(v.len() - 1) * q / 100].as_secs_f64() * 1e6;
    (at(10), at(50), at(90))
}

/// The guest's model from its state, checked against `host`: what a restore runs
/// before its first vCPU ioctl.
fn model_and_check(state: &VcpuState, host: &CpuModel) -> bool {
    let guest = CpuModel::of_vcpu("guest", state);
    check(&guest, host).is_compatible()
}

fn main() {
    if let Err(reason) = migration_testkit::kvm_available() {
        eprintln!("skipped: /dev/kvm not usable: {reason}");
        return;
    }
    if std::env::var_os("BENCH_SMP_ONLY").is_none() {
        one_vcpu();
    }
    machine_sweep();
}

/// One vCPU and the devices: ours against the raw ioctls, and the CPU check.
fn one_vcpu() {
    let t = TestVm::new(16 << 20).unwrap();
    t.boot(Guest::CounterAvx.image(), 0).unwrap();
    let caps = HostCaps::probe(&t.kvm, &t.vm, &DeviceLayout::FULL_WITH_PIT).unwrap();
    let TestVm { vcpu, vm, .. } = t;
    let vcpu = KvmVcpu::new(0, vcpu, caps.clone());

    let vm_state = save_vm_state(&vm, &DeviceLayout::FULL_WITH_PIT).unwrap();
    let state = vcpu.save_state().unwrap();
    let mut raw = raw_buffers(&state, caps.xsave_size());
    let fd = vcpu.backend();

    // Cold, once per process: the host probe (a throwaway VM and vCPU), the first
    // check, the first check with differences (builds raw-cpuid's name table).
    let t0 = Instant::now();
    let host = CpuModel::host().unwrap();
    let probe = t0.elapsed();
    let t0 = Instant::now();
    let first_ok = model_and_check(&state, host);
    let first = t0.elapsed();
    let t0 = Instant::now();
    let features = host.features();
    let first_names = t0.elapsed();
    let present: Vec<&str> = features.iter().filter_map(|f| f.name).collect();
    let small = host
        .without("small", &present[..present.len() / 2])
        .unwrap();
    let t0 = Instant::now();
    let report = check(&CpuModel::of_vcpu("guest", &state), &small);
    let text = report.to_string();
    let first_named = t0.elapsed();
    println!(
        "cpu cold: host probe {:.1} µs; first check {:.1} µs (compatible: {first_ok}); \
         first naming of features (builds raw-cpuid's name tables) {:.1} µs; \
         then a check naming {} differences {:.1} µs ({} bytes of text)",
        probe.as_secs_f64() * 1e6,
        first.as_secs_f64() * 1e6,
        first_names.as_secs_f64() * 1e6,
        report.differences.len(),
        first_named.as_secs_f64() * 1e6,
        text.len()
    );
    println!(
        "state: {} MSRs, {} CPUID entries, xsave {} bytes, nested state: {}",
        state.msrs.0.len(),
        state.cpuid.0.len(),
        state.xsave.as_bytes().len(),
        caps.nested_state()
    );

    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    c.bench_function("save/ours", |b| {
        b.iter(|| {
            black_box(save_vm_state(&vm, &DeviceLayout::FULL_WITH_PIT).unwrap());
            black_box(vcpu.save_state().unwrap())
        })
    });
    c.bench_function("save/raw_ioctls", |b| {
        b.iter(|| raw_save(&vm, fd, &mut raw))
    });
    c.bench_function("restore/ours", |b| {
        b.iter(|| {
            restore_vm_state(
                &vm,
                &DeviceLayout::FULL_WITH_PIT,
                &vm_state,
                ClockRestore::Exact,
            )
            .unwrap();
            vcpu.restore_state(&state).unwrap()
        })
    });
    c.bench_function("restore/raw_ioctls", |b| {
        b.iter(|| raw_restore(&vm, fd, &vm_state, &state, &raw))
    });
    c.bench_function("cpu_check/model_and_check", |b| {
        b.iter(|| black_box(model_and_check(&state, host)))
    });
    let guest = CpuModel::of_vcpu("guest", &state);
    c.bench_function("cpu_check/incompatible_with_text", |b| {
        b.iter(|| black_box(check(&guest, &small).to_string()))
    });
    c.final_summary();

    // Interleaved rounds, so both sides see the same machine load.
    let rounds = 200;
    let per = 20;
    let (mut s_ours, mut s_raw, mut r_ours, mut r_raw) = (vec![], vec![], vec![], vec![]);
    let (mut c_ok, mut c_named, mut s_lent) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t0 = Instant::now();
        for _ in 0..per {
            black_box(save_vm_state(&vm, &DeviceLayout::FULL_WITH_PIT).unwrap());
            black_box(vcpu.save_state().unwrap());
        }
        s_ours.push(t0.elapsed() / per);
        let t0 = Instant::now();
        for _ in 0..per {
            raw_save(&vm, fd, &mut raw);
        }
        s_raw.push(t0.elapsed() / per);
        // A VMM lending its fd: `save_vcpu_state` recomputes the MSR list each call.
        let t0 = Instant::now();
        for _ in 0..per {
            black_box(save_vm_state(&vm, &DeviceLayout::FULL_WITH_PIT).unwrap());
            black_box(save_vcpu_state(fd, &caps).unwrap());
        }
        s_lent.push(t0.elapsed() / per);
        let t0 = Instant::now();
        for _ in 0..per {
            restore_vm_state(
                &vm,
                &DeviceLayout::FULL_WITH_PIT,
                &vm_state,
                ClockRestore::Exact,
            )
            .unwrap();
            vcpu.restore_state(&state).unwrap();
        }
        r_ours.push(t0.elapsed() / per);
        let t0 = Instant::now();
        for _ in 0..per {
            raw_restore(&vm, fd, &vm_state, &state, &raw);
        }
        r_raw.push(t0.elapsed() / per);
        let t0 = Instant::now();
        for _ in 0..per {
            black_box(model_and_check(&state, host));
        }
        c_ok.push(t0.elapsed() / per);
        let t0 = Instant::now();
        for _ in 0..per {
            black_box(check(&guest, &small).to_string());
        }
        c_named.push(t0.elapsed() / per);
    }
    let restore = spread(r_ours.clone());
    for (what, v) in [
        ("check (model + compare, compatible)", c_ok),
        ("check (incompatible, diff text)", c_named),
    ] {
        let (p10, p50, p90) = spread(v);
        println!(
            "cpu {what}: median {p50:.2} µs (p10 {p10:.2}, p90 {p90:.2}); \
             {:.4} of the restore it guards (median {:.1} µs, p10 {:.1}, p90 {:.1})",
            p50 / restore.1,
            restore.1,
            restore.0,
            restore.2
        );
    }
    let lent = spread(s_lent);
    let (so, sr, ro, rr) = (median(s_ours), median(s_raw), median(r_ours), median(r_raw));
    println!(
        "save, borrowed fd (save_vcpu_state): median {:.1} µs (p10 {:.1}, p90 {:.1}), ratio to raw ioctls {:.3}",
        lent.1,
        lent.0,
        lent.2,
        lent.1 / (sr.as_secs_f64() * 1e6)
    );
    println!(
        "save:    ours {:>8.1} µs  raw ioctls {:>8.1} µs  ratio {:.3}",
        so.as_secs_f64() * 1e6,
        sr.as_secs_f64() * 1e6,
        so.as_secs_f64() / sr.as_secs_f64()
    );
    println!(
        "restore: ours {:>8.1} µs  raw ioctls {:>8.1} µs  ratio {:.3}",
        ro.as_secs_f64() * 1e6,
        rr.as_secs_f64() * 1e6,
        ro.as_secs_f64() / rr.as_secs_f64()
    );
}

/// vCPU counts of the machine sweep.
const SMP_COUNTS: [u32; 4] = [1, 2, 4, 8];

/// A paused `KvmVm` of `n` vCPUs that ran the SMP guest for two rounds (every vCPU
/// up, x2APIC on, IPIs sent): the state a snapshot of a live machine holds.
fn smp_vm(n: u32) -> KvmVm {
    let log = GuestLog::new();
    let mut vm = KvmVm::new(
        KvmVmConfig::new(32 << 20, n),
        migration_serde::registry(),
        log.handlers(),
    )
    .unwrap();
    load_vcpus(&vm, Guest::Smp.image(), 0, SmpStart::AllAtEntry).unwrap();
    vm.start().unwrap();
    log.wait(None, 2, Duration::from_secs(120)).unwrap();
    vm.stop().unwrap();
    vm
}

/// One vCPU's raw buffers and saved state, to hand to its thread.
type RawVcpu = Arc<(Mutex<Raw>, VcpuState)>;

/// The raw ioctls of a machine save: the devices' on this thread, each vCPU's on its
/// own thread, timed there (no hand-off counted). Returns the sum.
fn raw_machine_save(vm: &KvmVm, raws: &[RawVcpu]) -> Duration {
    let t0 = Instant::now();
    raw_save_devices(vm.vm_fd());
    let mut sum = t0.elapsed();
    for (i, r) in raws.iter().enumerate() {
        let r = r.clone();
        sum += vm
            .with_vcpu(i, move |fd| {
                let mut raw = r.0.lock().unwrap();
                let t = Instant::now();
                raw_save_vcpu(fd, &mut raw);
                t.elapsed()
            })
            .unwrap();
    }
    sum
}

/// The raw ioctls of a machine restore, summed as [`raw_machine_save`] does.
fn raw_machine_restore(vm: &KvmVm, vm_state: &VmState, raws: &[RawVcpu]) -> Duration {
    let t0 = Instant::now();
    raw_restore_devices(vm.vm_fd(), vm_state);
    let mut sum = t0.elapsed();
    for (i, r) in raws.iter().enumerate() {
        let r = r.clone();
        sum += vm
            .with_vcpu(i, move |fd| {
                let raw = r.0.lock().unwrap();
                let t = Instant::now();
                raw_restore_vcpu(fd, &r.1, &raw);
                t.elapsed()
            })
            .unwrap();
    }
    sum
}

/// The pre-SMP path for comparison: each vCPU saved on its own thread, one after
/// the other (`with_vcpu` waits for each).
fn sequential_save(vm: &KvmVm) -> Duration {
    let t0 = Instant::now();
    black_box(save_vm_state(vm.vm_fd(), &DeviceLayout::FULL_WITH_PIT).unwrap());
    for i in 0..vm.vcpu_count() {
        black_box(
            vm.vcpus()[i]
                .with_vcpu(|v| v.save_state().unwrap())
                .unwrap(),
        );
    }
    t0.elapsed()
}

/// "median (p10–p90)" in µs.
fn fmt_spread(v: &[Duration]) -> String {
    let (p10, p50, p90) = spread(v.to_vec());
    format!("{p50:.0} ({p10:.0}–{p90:.0})")
}

/// Save and restore of devices + N vCPUs, `KvmVm` (vCPUs in parallel on their
/// threads) against the raw ioctls' sum, cold and warm.
fn machine_sweep() {
    let rounds = env_or("BENCH_SMP_ROUNDS", 100).max(1);
    let cold_vms = env_or("BENCH_SMP_COLD", 8).max(1);
    println!(
        "\nmachine state (devices + N vCPUs running the smp guest, paused), µs, median (p10–p90); \
         {rounds} interleaved warm rounds, {cold_vms} fresh VMs for cold:"
    );
    println!(
        "| vCPUs | save: ours | raw sum | ratio | one vCPU after another | restore: ours | raw sum | ratio | cold save | cold restore |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut base: Option<(f64, f64)> = None;
    let mut linear = Vec::new();
    for n in SMP_COUNTS {
        // Cold: the first save of a VM that just ran (its MSR lists not computed
        // yet), and the first restore into a fresh VM.
        let (mut cold_save, mut cold_restore) = (Vec::new(), Vec::new());
        let mut kept = None;
        for _ in 0..cold_vms {
            let vm = smp_vm(n);
            let t0 = Instant::now();
            let state = vm.save_state().unwrap();
            cold_save.push(t0.elapsed());
            let mut fresh = KvmVm::new(
                vm.config().clone(),
                migration_serde::registry(),
                GuestLog::new().handlers(),
            )
            .unwrap();
            let t0 = Instant::now();
            fresh.restore_state(&state).unwrap();
            cold_restore.push(t0.elapsed());
            kept = Some((vm, state));
        }
        let (mut vm, state): (KvmVm, MachineState) = kept.unwrap();
        let xsave_size = state.vcpus[0].xsave.as_bytes().len().max(4096);
        let raws: Vec<RawVcpu> = state
            .vcpus
            .iter()
            .map(|s| Arc::new((Mutex::new(raw_buffers(s, xsave_size)), s.clone())))
            .collect();

        // Saves first, then restores (a restore makes the next save recompute each
        // vCPU's MSR list, which the cold figures count), each kind's order rotated
        // round by round: the first measurement after the vCPU threads slept costs
        // more (measured: ~20 µs).
        let mut times: [Vec<Duration>; 5] = Default::default();
        for (ops, first) in [(3, 0), (2, 3)] {
            for round in 0..rounds {
                for k in 0..ops {
                    let op = first + (round + k) % ops;
                    let t = match op {
                        0 => {
                            let t0 = Instant::now();
                            black_box(vm.save_state().unwrap());
                            t0.elapsed()
                        }
                        1 => raw_machine_save(&vm, &raws),
                        2 => sequential_save(&vm),
                        3 => {
                            let t0 = Instant::now();
                            vm.restore_state(&state).unwrap();
                            t0.elapsed()
                        }
                        _ => raw_machine_restore(&vm, &state.vm, &raws),
                    };
                    times[op].push(t);
                }
            }
        }
        let [s_ours, s_raw, s_seq, r_ours, r_raw] = times;
        let med = |v: &[Duration]| spread(v.to_vec()).1;
        let (so, sr, ro, rr) = (med(&s_ours), med(&s_raw), med(&r_ours), med(&r_raw));
        println!(
            "| {n} | {} | {} | {:.2}× | {} | {} | {} | {:.2}× | {} | {} |",
            fmt_spread(&s_ours),
            fmt_spread(&s_raw),
            so / sr,
            fmt_spread(&s_seq),
            fmt_spread(&r_ours),
            fmt_spread(&r_raw),
            ro / rr,
            fmt_spread(&cold_save),
            fmt_spread(&cold_restore),
        );
        let (b_save, b_restore) = *base.get_or_insert((so, ro));
        linear.push(format!(
            "{n} vCPUs: save {:.2}×, restore {:.2}× the 1-vCPU time (linear: {n}×)",
            so / b_save,
            ro / b_restore
        ));
        // Keep the VM alive until its raw buffers are done with.
        drop(raws);
        vm.stop().unwrap();
    }
    println!("wall time against one vCPU's:");
    for l in linear {
        println!("  {l}");
    }
}
