//! Which MSRs a vCPU snapshot holds, and reading/writing them with checked counts.
//!
//! The set is the union of
//! - KVM's MSR index list (`KVM_GET_MSR_INDEX_LIST`) filtered by [`MSR_ALLOWLIST`]: the
//!   list also names read-only and feature MSRs that are not guest state;
//! - the MSRs implied by the vCPU's CPUID ([`cpuid_implied`]): MTRRs and PAT, the MCE
//!   banks (counted by `IA32_MCG_CAP`), TSC_DEADLINE, TSC_ADJUST, TSC_AUX, the SYSCALL
//!   and SYSENTER MSRs and KVM's paravirtual MSRs. KVM's index list omits several of
//!   these, and a guest that programmed them would lose them.
//!
//! `KVM_GET_MSRS`/`KVM_SET_MSRS` take at most [`MSR_CHUNK`] entries per call here and
//! return `Ok(n)`, stopping at the first MSR they refuse; [`get_msrs`] and
//! [`set_msrs`] compare `n` with the count and name the refused MSR in
//! [`KvmStateError::Msr`].

use std::collections::BTreeSet;

use kvm_bindings::{kvm_msr_entry, Msrs};

use crate::backend::VcpuBackend;
use crate::error::{Direction, KvmStateError, Step};
use crate::order::{msr_rank, VcpuStep};
use crate::state::{CpuidEntry, MsrEntry};

/// Most entries per `KVM_GET_MSRS`/`KVM_SET_MSRS` call.
pub const MSR_CHUNK: usize = 256;

/// A range of MSR indices (inclusive) allowed into a snapshot, with why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrRange {
    /// First index.
    pub first: u32,
    /// Last index (inclusive).
    pub last: u32,
    /// What the range holds.
    pub what: &'static str,
}

const fn r(first: u32, last: u32, what: &'static str) -> MsrRange {
    MsrRange { first, last, what }
}

/// MSRs from KVM's index list that are guest state. Deliberately absent:
/// `IA32_APIC_BASE` (0x1b) and `EFER` (0xc0000080), carried by sregs; `MCG_CAP`
/// (0x179), `MTRRcap` (0xfe), `ARCH_CAPABILITIES` (0x10a), `IA32_UCODE_REV` (0x8b) and
/// the VMX capability MSRs, which describe the (virtual) CPU and are configured with
/// CPUID and `KVM_X86_SETUP_MCE`, not saved.
pub const MSR_ALLOWLIST: &[MsrRange] = &[
    r(0x10, 0x10, "IA32_TSC"),
    r(
        0x11,
        0x12,
        "KVM kvmclock (old ABI): wall clock, system time",
    ),
    r(0x3a, 0x3a, "IA32_FEATURE_CONTROL"),
    r(0x3b, 0x3b, "IA32_TSC_ADJUST"),
    r(0x48, 0x48, "IA32_SPEC_CTRL"),
    r(0x122, 0x122, "IA32_TSX_CTRL"),
    r(0xc1, 0xc8, "IA32_PMC0..7"),
    r(0x174, 0x176, "SYSENTER_CS/ESP/EIP"),
    r(0x17a, 0x17b, "IA32_MCG_STATUS, IA32_MCG_CTL"),
    r(0x186, 0x18d, "IA32_PERFEVTSEL0..7"),
    r(0x1a0, 0x1a0, "IA32_MISC_ENABLE"),
    r(0x1d9, 0x1d9, "IA32_DEBUGCTL"),
    r(0x200, 0x2ff, "MTRRs (variable, fixed, def type) and PAT"),
    r(0x309, 0x30b, "IA32_FIXED_CTR0..2"),
    r(
        0x38d,
        0x390,
        "IA32_FIXED_CTR_CTRL, PERF_GLOBAL_STATUS/CTRL/OVF_CTRL",
    ),
    r(0x400, 0x47f, "MCE banks 0..31 (CTL, STATUS, ADDR, MISC)"),
    r(0x4d0, 0x4d0, "IA32_MCG_EXT_CTL"),
    r(
        0x6a0,
        0x6a8,
        "CET: U_CET, S_CET, PL0..3_SSP, INTERRUPT_SSP_TABLE",
    ),
    r(0x6e0, 0x6e0, "IA32_TSC_DEADLINE"),
    r(0xda0, 0xda0, "IA32_XSS"),
    r(
        0x4000_0000,
        0x4000_00ff,
        "Hyper-V synthetic MSRs (when KVM lists them)",
    ),
    r(
        0x4b56_4d00,
        0x4b56_4dff,
        "KVM paravirtual MSRs (kvmclock, async PF, steal time, PV EOI, poll control)",
    ),
    r(0xc000_0081, 0xc000_0084, "STAR, LSTAR, CSTAR, SFMASK"),
    r(
        0xc000_0100,
        0xc000_0103,
        "FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX",
    ),
    r(0xc001_0000, 0xc001_0007, "AMD PERF_CTL0..3 / PERF_CTR0..3"),
    r(0xc001_0114, 0xc001_0114, "AMD VM_CR"),
    r(0xc001_0117, 0xc001_0117, "AMD VM_HSAVE_PA"),
    r(0xc001_011f, 0xc001_011f, "AMD VIRT_SPEC_CTRL"),
    r(0xc001_0200, 0xc001_020b, "AMD PERF_CTL/CTR 0..5 (extended)"),
];

/// Whether MSR `index` is in [`MSR_ALLOWLIST`].
pub fn is_allowed(index: u32) -> bool {
    MSR_ALLOWLIST
        .iter()
        .any(|m| (m.first..=m.last).contains(&index))
}

/// `IA32_MCG_CAP`: bits 0-7 count the MCE banks, bit 8 says `IA32_MCG_CTL` exists.
pub const MSR_IA32_MCG_CAP: u32 = 0x179;
/// `IA32_MTRRCAP`: bits 0-7 count the variable MTRRs.
pub const MSR_MTRRCAP: u32 = 0xfe;

fn leaf(cpuid: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    cpuid
        .iter()
        .find(|e| e.function == function && (e.index == index || e.flags & 1 == 0))
}

fn bit(v: u32, b: u32) -> bool {
    v & (1 << b) != 0
}

/// The MSRs the vCPU's CPUID implies.
///
/// `mcg_cap` and `mtrr_cap` are the values of `IA32_MCG_CAP` and `IA32_MTRRCAP`
/// (`None` if unreadable): they count the MCE banks and variable MTRRs.
pub fn cpuid_implied(
    cpuid: &[CpuidEntry],
    mcg_cap: Option<u64>,
    mtrr_cap: Option<u64>,
) -> Vec<u32> {
    let mut out = Vec::new();
    if let Some(l1) = leaf(cpuid, 1, 0) {
        if bit(l1.edx, 11) {
            out.extend(0x174..=0x176); // SEP: SYSENTER
        }
        if bit(l1.edx, 12) {
            // MTRR: def type, fixed ranges, 2 MSRs per variable range.
            out.extend([0x2ff, 0x250, 0x258, 0x259]);
            out.extend(0x268..=0x26f);
            let vcnt = mtrr_cap.map_or(0, |c| (c & 0xff) as u32);
            out.extend((0..vcnt.min(64) * 2).map(|i| 0x200 + i));
        }
        if bit(l1.edx, 16) {
            out.push(0x277); // PAT
        }
        if bit(l1.edx, 7) && bit(l1.edx, 14) {
            // MCE + MCA: MCG_STATUS, MCG_CTL if MCG_CAP.CTL_P, 4 MSRs per bank.
            out.push(0x17a);
            if let Some(cap) = mcg_cap {
                if cap & (1 << 8) != 0 {
                    out.push(0x17b);
                }
                let banks = ((cap & 0xff) as u32).min(32);
                out.extend((0..banks * 4).map(|i| 0x400 + i));
            }
        }
        if bit(l1.ecx, 24) {
            out.push(0x6e0); // TSC_DEADLINE
        }
    }
    if let Some(l7) = leaf(cpuid, 7, 0) {
        if bit(l7.ebx, 1) {
            out.push(0x3b); // TSC_ADJUST
        }
        if bit(l7.ecx, 22) {
            out.push(0xc000_0103); // RDPID: TSC_AUX
        }
    }
    if let Some(ext) = leaf(cpuid, 0x8000_0001, 0) {
        if bit(ext.edx, 27) {
            out.push(0xc000_0103); // RDTSCP: TSC_AUX
        }
        if bit(ext.edx, 29) {
            // Long mode: SYSCALL targets and segment bases.
            out.extend(0xc000_0081..=0xc000_0084);
            out.extend(0xc000_0100..=0xc000_0102);
        }
    }
    // KVM paravirtual features, if the hypervisor leaves say "KVMKVMKVM".
    let kvm_sig = leaf(cpuid, 0x4000_0000, 0)
        .is_some_and(|e| (e.ebx, e.ecx, e.edx) == (0x4b4d_564b, 0x564b_4d56, 0x4d));
    if kvm_sig {
        if let Some(pv) = leaf(cpuid, 0x4000_0001, 0) {
            let pv_msrs: &[(u32, &[u32])] = &[
                (0, &[0x11, 0x12]),               // CLOCKSOURCE
                (3, &[0x4b56_4d00, 0x4b56_4d01]), // CLOCKSOURCE2
                (4, &[0x4b56_4d02]),              // ASYNC_PF
                (5, &[0x4b56_4d03]),              // STEAL_TIME
                (6, &[0x4b56_4d04]),              // PV_EOI
                (12, &[0x4b56_4d05]),             // POLL_CONTROL
                (14, &[0x4b56_4d06]),             // ASYNC_PF_INT
            ];
            for (b, msrs) in pv_msrs {
                if bit(pv.eax, *b) {
                    out.extend_from_slice(msrs);
                }
            }
        }
    }
    out
}

/// MSRs KVM refuses to write on a vCPU without an in-kernel LAPIC (a VM without an
/// irqchip), even with the value it reads back: left out of such a vCPU's save list.
pub const NEEDS_LAPIC: &[(u32, &str)] = &[(
    0x4b56_4d06,
    "MSR_KVM_ASYNC_PF_INT: the async page fault vector is delivered through the in-kernel LAPIC",
)];

/// Whether MSR `index` is in [`NEEDS_LAPIC`].
pub fn needs_lapic(index: u32) -> bool {
    NEEDS_LAPIC.iter().any(|(i, _)| *i == index)
}

/// The MSRs to save: KVM's index list filtered by [`MSR_ALLOWLIST`], plus the
/// CPUID-implied ones, sorted and without duplicates.
pub fn save_list(
    index_list: &[u32],
    cpuid: &[CpuidEntry],
    mcg_cap: Option<u64>,
    mtrr_cap: Option<u64>,
) -> Vec<u32> {
    let mut set: BTreeSet<u32> = index_list
        .iter()
        .copied()
        .filter(|i| is_allowed(*i))
        .collect();
    set.extend(cpuid_implied(cpuid, mcg_cap, mtrr_cap));
    set.into_iter().collect()
}

fn to_msrs(entries: impl ExactSizeIterator<Item = kvm_msr_entry>) -> Result<Msrs, KvmStateError> {
    let entries: Vec<kvm_msr_entry> = entries.collect();
    Msrs::from_entries(&entries).map_err(|e| KvmStateError::Invalid {
        step: Step::Vcpu(VcpuStep::Msrs),
        reason: format!(
            "cannot build an MSR list of {} entries: {e:?}",
            entries.len()
        ),
    })
}

/// Reads `indices` in chunks of [`MSR_CHUNK`]; fails with [`KvmStateError::Msr`]
/// naming the first MSR KVM refused.
pub fn get_msrs<B: VcpuBackend + ?Sized>(
    vcpu: &B,
    indices: &[u32],
) -> Result<Vec<MsrEntry>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSR_CHUNK) {
        let mut msrs = to_msrs(chunk.iter().map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        }))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(KvmStateError::get(Step::Vcpu(VcpuStep::Msrs)))?;
        if n != chunk.len() {
            return Err(KvmStateError::Msr {
                direction: Direction::Get,
                index: chunk.get(n).copied().unwrap_or(u32::MAX),
                done: n,
                requested: chunk.len(),
            });
        }
        out.extend(msrs.as_slice().iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
    }
    Ok(out)
}

/// Reads one MSR; `None` if KVM refuses it.
pub fn get_msr<B: VcpuBackend + ?Sized>(vcpu: &B, index: u32) -> Option<u64> {
    get_msrs(vcpu, &[index])
        .ok()
        .and_then(|v| v.first().map(|e| e.data))
}

/// `entries` in restore order: stably sorted by [`crate::order::MSR_RESTORE_RANK`]
/// (TSC first, TSC_DEADLINE last, the rest as saved).
pub fn restore_order(entries: &[MsrEntry]) -> Vec<MsrEntry> {
    let mut v = entries.to_vec();
    v.sort_by_key(|e| msr_rank(e.index));
    v
}

/// Writes `entries` in restore order ([`restore_order`]), in chunks of
/// [`MSR_CHUNK`]; fails with [`KvmStateError::Msr`] naming the first MSR KVM refused.
pub fn set_msrs<B: VcpuBackend + ?Sized>(
    vcpu: &B,
    entries: &[MsrEntry],
) -> Result<(), KvmStateError> {
    let ordered = restore_order(entries);
    for chunk in ordered.chunks(MSR_CHUNK) {
        let msrs = to_msrs(chunk.iter().map(|e| kvm_msr_entry {
            index: e.index,
            data: e.data,
            ..Default::default()
        }))?;
        let n = vcpu
            .set_msrs(&msrs)
            .map_err(KvmStateError::set(Step::Vcpu(VcpuStep::Msrs)))?;
        if n != chunk.len() {
            return Err(KvmStateError::Msr {
                direction: Direction::Set,
                index: chunk.get(n).map_or(u32::MAX, |e| e.index),
                done: n,
                requested: chunk.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_excludes_state_carried_elsewhere() {
        assert!(is_allowed(0x10));
        assert!(is_allowed(0x6e0));
        assert!(!is_allowed(0x1b), "APIC_BASE is in sregs");
        assert!(!is_allowed(0xc000_0080), "EFER is in sregs");
        assert!(!is_allowed(MSR_IA32_MCG_CAP));
    }

    #[test]
    fn cpuid_implies_mtrrs_and_mce_banks() {
        let cpuid = [CpuidEntry {
            function: 1,
            edx: (1 << 7) | (1 << 12) | (1 << 14) | (1 << 16),
            ecx: 1 << 24,
            ..Default::default()
        }];
        let l = save_list(&[0x10, 0x1b], &cpuid, Some(0x100 | 2), Some(0x508));
        assert!(l.contains(&0x10) && !l.contains(&0x1b));
        assert!(l.contains(&0x2ff) && l.contains(&0x20f) && !l.contains(&0x210));
        assert!(l.contains(&0x17b) && l.contains(&0x407) && !l.contains(&0x408));
        assert!(l.contains(&0x277) && l.contains(&0x6e0));
        assert!(l.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn restore_order_puts_tsc_first_and_deadline_last() {
        let e = |index| MsrEntry { index, data: 0 };
        let v = restore_order(&[e(0x6e0), e(0x3b), e(0x10), e(0x277)]);
        let idx: Vec<u32> = v.iter().map(|e| e.index).collect();
        assert_eq!(idx, [0x10, 0x3b, 0x277, 0x6e0]);
    }
}
