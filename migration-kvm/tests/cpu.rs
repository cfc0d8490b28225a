//! scratch
use migration_kvm::{CpuModel, KvmVmConfig};
use migration_testkit::guest::{cpuid_reports, Guest, RunningGuest};
use std::time::Duration;

#[test]
fn scratch_what_does_the_guest_see() {
    migration_testkit::require_kvm!();
    let host = CpuModel::host().unwrap();
    for template in [
        None,
        Some(
            host.without("t", &["avx2", "sse3", "xsave", "avx"])
                .unwrap(),
        ),
    ] {
        let mut c = KvmVmConfig::new(4 << 20, 1);
        c.cpu = template;
        let g = RunningGuest::boot_with(Guest::CpuidReport, c, 0, Duration::from_secs(20)).unwrap();
        let m = g.advance(2).unwrap();
        let r = cpuid_reports(m.infos());
        for s in &r[0] {
            eprintln!("{:x?}", s);
        }
        let vm = g.vm.config().cpu.clone().unwrap();
        for l in [1u32, 7] {
            eprintln!("table {:x?}", vm.entry(l, 0));
        }
    }
}
