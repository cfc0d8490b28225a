//! CPU features by name: which CPUID register bits are features, and what they are
//! called.
//!
//! The names and bit positions come from the `raw-cpuid` crate, not from a table typed
//! here. Each name is one of raw-cpuid's `has_*` (or `xcr0_supports_*`,
//! `ia32_xss_supports_*`) methods, listed below by identifier only, so the compiler
//! checks every one against raw-cpuid's API. Where the bit sits is found by asking
//! raw-cpuid: a synthetic CPUID ([`raw_cpuid::CpuIdReader`]) with exactly one bit set
//! is decoded, and the method that turns true names that bit. The table is built
//! once per vendor (Intel, AMD), on first use.
//!
//! A name is the method's name without its `has_` prefix (`avx512f`, `sse3`,
//! `64bit_mode`); XSAVE state components are `xcr0_<component>` and `xss_<component>`.
//! They are raw-cpuid's names, which sometimes differ from Linux's `/proc/cpuinfo`
//! (`rep_movsb_stosb` for `erms`, `aesni` for `aes`, `sha` for `sha_ni`). A bit
//! raw-cpuid does not know has no name and is shown by position.
//!
//! ```
//! use migration_kvm::cpu_features::{feature_by_name, FeatureBit, Reg, RegId};
//!
//! let avx512f = feature_by_name("avx512f").expect("raw-cpuid knows avx512f");
//! assert_eq!(avx512f, FeatureBit { reg: RegId { leaf: 7, subleaf: 0, reg: Reg::Ebx }, bit: 16 });
//! assert_eq!(avx512f.to_string(), "leaf 7 subleaf 0, ebx bit 16");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use raw_cpuid::{CpuId, CpuIdReader, CpuIdResult};
use serde::{Deserialize, Serialize};

use crate::state::CpuidEntry;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reg {
    /// `eax`.
    Eax,
    /// `ebx`.
    Ebx,
    /// `ecx`.
    Ecx,
    /// `edx`.
    Edx,
}

impl Reg {
    /// Every register, in encoding order.
    pub const ALL: [Reg; 4] = [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx];

    /// `eax`, `ebx`, `ecx` or `edx`.
    pub fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }

    /// This register's value in `e`.
    pub fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    /// This register in `e`, to change it.
    pub fn of_mut(self, e: &mut CpuidEntry) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }

    fn of_result_mut(self, r: &mut CpuIdResult) -> &mut u32 {
        match self {
            Reg::Eax => &mut r.eax,
            Reg::Ebx => &mut r.ebx,
            Reg::Ecx => &mut r.ecx,
            Reg::Edx => &mut r.edx,
        }
    }
}

/// One register of one CPUID leaf and subleaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RegId {
    /// The leaf (`eax` input).
    pub leaf: u32,
    /// The subleaf (`ecx` input; 0 for leaves without subleaves).
    pub subleaf: u32,
    /// The output register.
    pub reg: Reg,
}

/// Writes a leaf number as the manuals do: small ones in decimal, others in hex.
fn leaf_number(f: &mut fmt::Formatter<'_>, leaf: u32) -> fmt::Result {
    if leaf < 10 {
        write!(f, "{leaf}")
    } else {
        write!(f, "{leaf:#x}")
    }
}

impl fmt::Display for RegId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("leaf ")?;
        leaf_number(f, self.leaf)?;
        write!(f, " subleaf {}, {}", self.subleaf, self.reg.name())
    }
}

/// One bit of a feature register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeatureBit {
    /// The register.
    pub reg: RegId,
    /// The bit (0 to 31).
    pub bit: u8,
}

impl fmt::Display for FeatureBit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bit {}", self.reg, self.bit)
    }
}

/// A feature bit and its name, when raw-cpuid knows one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Feature {
    /// Where it is.
    pub bit: FeatureBit,
    /// What raw-cpuid calls it.
    pub name: Option<&'static str>,
}

impl Feature {
    /// The feature at `bit`, named for `vendor` (the 12-byte vendor string of leaf 0).
    pub fn at(bit: FeatureBit, vendor: &str) -> Self {
        Self {
            bit,
            name: feature_name(bit, vendor),
        }
    }
}

/// `avx512f (leaf 7 subleaf 0, ebx bit 16)`; `leaf 7 subleaf 0, edx bit 27` unnamed.
impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(n) => write!(f, "{n} ({})", self.bit),
            None => write!(f, "{} (no name known)", self.bit),
        }
    }
}

const fn reg(leaf: u32, subleaf: u32, reg: Reg) -> RegId {
    RegId { leaf, subleaf, reg }
}

/// The registers whose bits are features: a set bit says the CPU has the feature,
/// so a guest may only see a bit its host has (the rule of
/// [`cpu_check`](crate::cpu_check)). The XSAVE state components a CPU supports
/// (leaf 0xd subleaf 0 eax/edx, subleaf 1 ecx/edx) and KVM's paravirtual features
/// (leaf 0x40000001 eax) count as features too.
pub const FEATURE_REGISTERS: &[RegId] = &[
    reg(1, 0, Reg::Ecx),
    reg(1, 0, Reg::Edx),
    reg(6, 0, Reg::Eax),
    reg(7, 0, Reg::Ebx),
    reg(7, 0, Reg::Ecx),
    reg(7, 0, Reg::Edx),
    reg(7, 1, Reg::Eax),
    reg(7, 1, Reg::Edx),
    reg(0xd, 0, Reg::Eax),
    reg(0xd, 0, Reg::Edx),
    reg(0xd, 1, Reg::Eax),
    reg(0xd, 1, Reg::Ecx),
    reg(0xd, 1, Reg::Edx),
    reg(0x4000_0001, 0, Reg::Eax),
    reg(0x8000_0001, 0, Reg::Ecx),
    reg(0x8000_0001, 0, Reg::Edx),
    reg(0x8000_0007, 0, Reg::Edx),
    reg(0x8000_0008, 0, Reg::Ebx),
    reg(0x8000_000a, 0, Reg::Edx),
    reg(0x8000_0021, 0, Reg::Eax),
];

/// Bits of feature registers that are not capabilities but mirror the guest's own
/// control registers (KVM computes them at run time): `OSXSAVE` (leaf 1 ecx bit 27,
/// CR4.OSXSAVE) and `OSPKE` (leaf 7 ecx bit 4, CR4.PKE). They are never compared.
pub const DYNAMIC_BITS: &[FeatureBit] = &[
    FeatureBit {
        reg: reg(1, 0, Reg::Ecx),
        bit: 27,
    },
    FeatureBit {
        reg: reg(7, 0, Reg::Ecx),
        bit: 4,
    },
];

/// The mask of [`DYNAMIC_BITS`] in register `r`.
pub fn dynamic_mask(r: RegId) -> u32 {
    DYNAMIC_BITS
        .iter()
        .filter(|b| b.reg == r)
        .fold(0, |m, b| m | (1 << b.bit))
}

/// What raw-cpuid calls the feature at `bit` on a CPU of `vendor` (the vendor
/// string of leaf 0: `GenuineIntel`, `AuthenticAMD`…), if it knows it.
/// Some methods of raw-cpuid answer for one vendor only (`has_sse4a` is false on
/// Intel): a bit the vendor's table lacks is looked up in the other's.
///
/// On AMD, leaf 0x80000001 edx bits 0–9, 12–17, 23 and 24 repeat leaf 1 edx
/// (AMD APM vol. 3, CPUID Fn8000_0001_EDX): they get leaf 1's names.
pub fn feature_name(bit: FeatureBit, vendor: &str) -> Option<&'static str> {
    let family = Family::of(vendor);
    let lookup = |bit: &FeatureBit| {
        table(family)
            .by_bit
            .get(bit)
            .or_else(|| table(family.other()).by_bit.get(bit))
            .copied()
    };
    lookup(&bit).or_else(|| {
        let mirrored = matches!(bit.bit, 0..=9 | 12..=17 | 23 | 24);
        (family == Family::Amd && bit.reg == reg(0x8000_0001, 0, Reg::Edx) && mirrored)
            .then(|| {
                lookup(&FeatureBit {
                    reg: reg(1, 0, Reg::Edx),
                    bit: bit.bit,
                })
            })
            .flatten()
    })
}

/// The bit raw-cpuid calls `name` (Intel's table first, then AMD's).
pub fn feature_by_name(name: &str) -> Option<FeatureBit> {
    [Family::Intel, Family::Amd]
        .into_iter()
        .find_map(|f| table(f).by_name.get(name).copied())
}

/// Every named feature bit for `vendor` (see [`feature_name`]), in bit order.
pub fn named_features(vendor: &str) -> Vec<Feature> {
    let family = Family::of(vendor);
    let mut bits: Vec<FeatureBit> = table(family)
        .by_bit
        .keys()
        .chain(table(family.other()).by_bit.keys())
        .copied()
        .collect();
    bits.sort_unstable();
    bits.dedup();
    bits.into_iter()
        .map(|bit| Feature::at(bit, vendor))
        .collect()
}

// ---- The table: raw-cpuid's methods, located by probing ---------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Intel,
    Amd,
}

impl Family {
    fn of(vendor: &str) -> Self {
        match vendor {
            "AuthenticAMD" | "HygonGenuine" => Family::Amd,
            _ => Family::Intel,
        }
    }

    fn other(self) -> Self {
        match self {
            Family::Intel => Family::Amd,
            Family::Amd => Family::Intel,
        }
    }

    /// Leaf 0's ebx, edx, ecx.
    fn vendor_regs(self) -> [u32; 3] {
        let s: &[u8; 12] = match self {
            Family::Intel => b"GenuineIntel",
            Family::Amd => b"AuthenticAMD",
        };
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        [w(0), w(4), w(8)]
    }
}

/// A synthetic CPU for raw-cpuid: every leaf exists and reads zero, except the
/// vendor, the SVM bit (when asked, so raw-cpuid decodes leaf 0x8000000a) and the
/// one bit being probed.
#[derive(Clone, Copy)]
struct ProbeReader {
    vendor: [u32; 3],
    svm: bool,
    bit: Option<FeatureBit>,
}

impl CpuIdReader for ProbeReader {
    fn cpuid2(&self, leaf: u32, subleaf: u32) -> CpuIdResult {
        let mut r = CpuIdResult {
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        };
        if leaf == 0 {
            r.eax = 0x20;
            [r.ebx, r.edx, r.ecx] = self.vendor;
        }
        if leaf == 0x8000_0000 {
            r.eax = 0x8000_0028;
        }
        if self.svm && leaf == 0x8000_0001 {
            r.ecx |= 1 << 2;
        }
        if let Some(b) = self.bit {
            if b.reg.leaf == leaf && b.reg.subleaf == subleaf {
                *b.reg.reg.of_result_mut(&mut r) |= 1 << b.bit;
            }
        }
        r
    }
}

type Probe = CpuId<ProbeReader>;

/// One of raw-cpuid's feature methods: its identifier and a call of it.
struct Method {
    ident: &'static str,
    test: fn(&Probe) -> bool,
}

/// The methods of one raw-cpuid getter, and the registers it decodes.
struct Group {
    regs: &'static [RegId],
    /// Set the SVM bit in the probe (raw-cpuid decodes leaf 0x8000000a only then).
    svm: bool,
    methods: &'static [Method],
}

macro_rules! methods {
    ($getter:ident: $($m:ident),* $(,)?) => {
        &[$(Method {
            ident: stringify!($m),
            test: |c: &Probe| c.$getter().is_some_and(|f| f.$m()),
        }),*]
    };
}

/// raw-cpuid's feature methods, by getter. The bit of each is found by probing.
/// (`has_av512vbmi2` is left out: a misspelt alias of `has_avx512vbmi2`; so is
/// leaf 0x80000007's `has_tm`, whose name leaf 1's thermal monitor has.)
static GROUPS: &[Group] = &[
    Group {
        regs: &[reg(1, 0, Reg::Ecx), reg(1, 0, Reg::Edx)],
        svm: false,
        methods: methods!(get_feature_info:
            has_sse3, has_pclmulqdq, has_ds_area, has_monitor_mwait, has_cpl, has_vmx,
            has_smx, has_eist, has_tm2, has_ssse3, has_cnxtid, has_fma, has_cmpxchg16b,
            has_pdcm, has_pcid, has_dca, has_sse41, has_sse42, has_x2apic, has_movbe,
            has_popcnt, has_tsc_deadline, has_aesni, has_xsave, has_oxsave, has_avx,
            has_f16c, has_rdrand, has_hypervisor, has_fpu, has_vme, has_de, has_pse,
            has_tsc, has_msr, has_pae, has_mce, has_cmpxchg8b, has_apic,
            has_sysenter_sysexit, has_mtrr, has_pge, has_mca, has_cmov, has_pat,
            has_pse36, has_psn, has_clflush, has_ds, has_acpi, has_mmx,
            has_fxsave_fxstor, has_sse, has_sse2, has_ss, has_htt, has_tm, has_pbe,
        ),
    },
    Group {
        regs: &[reg(6, 0, Reg::Eax), reg(6, 0, Reg::Ecx)],
        svm: false,
        methods: methods!(get_thermal_power_info:
            has_dts, has_turbo_boost, has_arat, has_pln, has_ecmd, has_ptm, has_hwp,
            has_hwp_notification, has_hwp_activity_window,
            has_hwp_energy_performance_preference, has_hwp_package_level_request,
            has_hdc, has_turbo_boost3, has_hwp_capabilities, has_hwp_peci_override,
            has_flexible_hwp, has_hwp_fast_access_mode,
            has_ignore_idle_processor_hwp_request, has_hw_coord_feedback,
            has_energy_bias_pref,
        ),
    },
    Group {
        regs: &[
            reg(7, 0, Reg::Ebx),
            reg(7, 0, Reg::Ecx),
            reg(7, 0, Reg::Edx),
            reg(7, 1, Reg::Eax),
            reg(7, 1, Reg::Edx),
        ],
        svm: false,
        methods: methods!(get_extended_feature_info:
            has_fsgsbase, has_tsc_adjust_msr, has_bmi1, has_hle, has_avx2, has_fdp,
            has_smep, has_bmi2, has_rep_movsb_stosb, has_invpcid, has_rtm, has_rdtm,
            has_fpu_cs_ds_deprecated, has_mpx, has_rdta, has_rdseed, has_adx, has_smap,
            has_clflushopt, has_processor_trace, has_sha, has_sgx, has_avx512f,
            has_avx512dq, has_avx512_ifma, has_avx512pf, has_avx512er, has_avx512cd,
            has_avx512bw, has_avx512vl, has_clwb, has_prefetchwt1, has_avx512vbmi,
            has_umip, has_pku, has_ospke, has_waitpkg, has_avx512vbmi2, has_cet_ss,
            has_gfni, has_vaes, has_vpclmulqdq, has_avx512vnni, has_avx512bitalg,
            has_tme_en, has_avx512vpopcntdq, has_la57, has_rdpid, has_sgx_lc,
            has_avx512_4vnniw, has_avx512_4fmaps, has_avx512_vp2intersect, has_amx_bf16,
            has_avx512_fp16, has_amx_tile, has_amx_int8, has_avx_vnni, has_avx512_bf16,
            has_fzrm, has_fsrs, has_fsrcrs, has_hreset, has_avx_ifma, has_lam,
            has_msrlist, has_invd_disable_post_bios_done, has_avx_vnni_int8,
            has_avx_ne_convert, has_avx_vnni_int16, has_prefetchi, has_uiret_uif,
            has_cet_sss, has_avx10,
        ),
    },
    Group {
        regs: &[
            reg(0xd, 0, Reg::Eax),
            reg(0xd, 1, Reg::Eax),
            reg(0xd, 1, Reg::Ecx),
        ],
        svm: false,
        methods: methods!(get_extended_state_info:
            has_xsaveopt, has_xsavec, has_xgetbv, has_xsaves_xrstors,
            xcr0_supports_legacy_x87, xcr0_supports_sse_128, xcr0_supports_avx_256,
            xcr0_supports_mpx_bndregs, xcr0_supports_mpx_bndcsr,
            xcr0_supports_avx512_opmask, xcr0_supports_avx512_zmm_hi256,
            xcr0_supports_avx512_zmm_hi16, xcr0_supports_pkru, ia32_xss_supports_pt,
            ia32_xss_supports_hdc,
        ),
    },
    Group {
        regs: &[reg(0x8000_0001, 0, Reg::Ecx), reg(0x8000_0001, 0, Reg::Edx)],
        svm: false,
        methods: methods!(get_extended_processor_and_feature_identifiers:
            has_lahf_sahf, has_cmp_legacy, has_svm, has_ext_apic_space, has_alt_mov_cr8,
            has_lzcnt, has_sse4a, has_misaligned_sse_mode, has_prefetchw, has_osvw,
            has_ibs, has_xop, has_skinit, has_wdt, has_lwp, has_fma4, has_tbm,
            has_topology_extensions, has_perf_cntr_extensions,
            has_nb_perf_cntr_extensions, has_data_access_bkpt_extension, has_perf_tsc,
            has_perf_cntr_llc_extensions, has_monitorx_mwaitx, has_addr_mask_extension,
            has_syscall_sysret, has_execute_disable, has_mmx_extensions,
            has_fast_fxsave_fxstor, has_1gib_pages, has_rdtscp, has_64bit_mode,
            has_amd_3dnow_extensions, has_3dnow,
        ),
    },
    Group {
        regs: &[reg(0x8000_0007, 0, Reg::Edx)],
        svm: false,
        methods: methods!(get_advanced_power_mgmt_info:
            has_ts, has_freq_id_ctrl, has_volt_id_ctrl, has_thermtrip,
            has_100mhz_steps, has_hw_pstate, has_invariant_tsc, has_cpb,
            has_ro_effective_freq_iface, has_feedback_iface, has_power_reporting_iface,
        ),
    },
    Group {
        regs: &[reg(0x8000_0008, 0, Reg::Ebx)],
        svm: false,
        methods: methods!(get_processor_capacity_feature_info:
            has_cl_zero, has_inst_ret_cntr_msr, has_restore_fp_error_ptrs, has_invlpgb,
            has_rdpru, has_mcommit, has_wbnoinvd, has_int_wbinvd,
            has_unsupported_efer_lmsle, has_invlpgb_nested,
        ),
    },
    Group {
        regs: &[reg(0x8000_000a, 0, Reg::Edx)],
        svm: true,
        methods: methods!(get_svm_info:
            has_nested_paging, has_lbr_virtualization, has_svm_lock, has_nrip,
            has_tsc_rate_msr, has_vmcb_clean_bits, has_flush_by_asid, has_decode_assists,
            has_pause_filter, has_pause_filter_threshold, has_avic,
            has_vmsave_virtualization, has_gif, has_gmet, has_sss_check, has_spec_ctrl,
            has_host_mce_override, has_tlb_ctrl,
        ),
    },
    Group {
        regs: &[reg(0x8000_0021, 0, Reg::Eax)],
        svm: false,
        methods: methods!(get_extended_feature_identification_2:
            has_no_nested_data_bp, has_lfence_always_serializing, has_smm_pg_cfg_lock,
            has_null_select_clears_base, has_upper_address_ignore, has_automatic_ibrs,
            has_no_smm_ctl_msr, has_prefetch_ctl_msr, has_cpuid_user_dis,
        ),
    },
];

/// The display name of a method: `has_avx512f` → `avx512f`,
/// `xcr0_supports_pkru` → `xcr0_pkru`, `ia32_xss_supports_pt` → `xss_pt`.
fn name_of(ident: &'static str) -> String {
    if let Some(rest) = ident.strip_prefix("xcr0_supports_") {
        format!("xcr0_{rest}")
    } else if let Some(rest) = ident.strip_prefix("ia32_xss_supports_") {
        format!("xss_{rest}")
    } else {
        ident.strip_prefix("has_").unwrap_or(ident).to_owned()
    }
}

struct Table {
    by_bit: BTreeMap<FeatureBit, &'static str>,
    by_name: BTreeMap<&'static str, FeatureBit>,
}

fn table(family: Family) -> &'static Table {
    static INTEL: OnceLock<Table> = OnceLock::new();
    static AMD: OnceLock<Table> = OnceLock::new();
    let cell = match family {
        Family::Intel => &INTEL,
        Family::Amd => &AMD,
    };
    cell.get_or_init(|| build_table(family))
}

/// Probes every bit of every group's registers: a method that is false on the base
/// probe and true with the bit set names the bit (the first such method, in list
/// order, when several do).
fn build_table(family: Family) -> Table {
    let mut by_bit = BTreeMap::new();
    let mut by_name = BTreeMap::new();
    for group in GROUPS {
        let base = ProbeReader {
            vendor: family.vendor_regs(),
            svm: group.svm,
            bit: None,
        };
        let base_cpu = CpuId::with_cpuid_reader(base);
        let already: Vec<bool> = group.methods.iter().map(|m| (m.test)(&base_cpu)).collect();
        for &r in group.regs {
            for b in 0..32u8 {
                let bit = FeatureBit { reg: r, bit: b };
                let cpu = CpuId::with_cpuid_reader(ProbeReader {
                    bit: Some(bit),
                    ..base
                });
                let found = group
                    .methods
                    .iter()
                    .zip(&already)
                    .find(|(m, was)| !**was && (m.test)(&cpu));
                if let Some((m, _)) = found {
                    let name: &'static str = Box::leak(name_of(m.ident).into_boxed_str());
                    by_bit.insert(bit, name);
                    by_name.entry(name).or_insert(bit);
                }
            }
        }
    }
    Table { by_bit, by_name }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bit(leaf: u32, subleaf: u32, r: Reg, b: u8) -> FeatureBit {
        FeatureBit {
            reg: reg(leaf, subleaf, r),
            bit: b,
        }
    }

    #[test]
    fn well_known_features_are_named_at_their_architectural_bits() {
        // Positions from the Intel SDM / AMD APM, names from raw-cpuid.
        let cases = [
            (bit(1, 0, Reg::Edx, 25), "sse"),
            (bit(1, 0, Reg::Ecx, 28), "avx"),
            (bit(1, 0, Reg::Ecx, 26), "xsave"),
            (bit(1, 0, Reg::Ecx, 21), "x2apic"),
            (bit(7, 0, Reg::Ebx, 5), "avx2"),
            (bit(7, 0, Reg::Ebx, 16), "avx512f"),
            (bit(7, 0, Reg::Ebx, 17), "avx512dq"),
            (bit(7, 0, Reg::Ebx, 31), "avx512vl"),
            (bit(7, 0, Reg::Ecx, 1), "avx512vbmi"),
            (bit(7, 0, Reg::Edx, 24), "amx_tile"),
            (bit(7, 1, Reg::Eax, 5), "avx512_bf16"),
            (bit(0xd, 0, Reg::Eax, 5), "xcr0_avx512_opmask"),
            (bit(0xd, 1, Reg::Eax, 3), "xsaves_xrstors"),
            (bit(0x8000_0001, 0, Reg::Edx, 29), "64bit_mode"),
            (bit(0x8000_0001, 0, Reg::Ecx, 6), "sse4a"),
            (bit(0x8000_0007, 0, Reg::Edx, 8), "invariant_tsc"),
        ];
        for vendor in ["GenuineIntel", "AuthenticAMD"] {
            for (b, name) in cases {
                assert_eq!(feature_name(b, vendor), Some(name), "{b} on {vendor}");
            }
        }
        // AMD repeats leaf 1's edx bits in leaf 0x80000001 edx.
        assert_eq!(
            feature_name(bit(0x8000_0001, 0, Reg::Edx, 0), "AuthenticAMD"),
            Some("fpu")
        );
        assert_eq!(
            feature_name(bit(0x8000_0001, 0, Reg::Edx, 0), "GenuineIntel"),
            None
        );
        // The SVM feature leaf decodes only with SVM present; probed with it.
        assert_eq!(
            feature_name(bit(0x8000_000a, 0, Reg::Edx, 0), "AuthenticAMD"),
            Some("nested_paging")
        );
        assert_eq!(feature_by_name("avx512f"), Some(bit(7, 0, Reg::Ebx, 16)));
        assert_eq!(feature_by_name("no_such_feature"), None);
    }

    #[test]
    fn a_feature_displays_its_name_and_position() {
        let f = Feature::at(bit(7, 0, Reg::Ebx, 16), "GenuineIntel");
        assert_eq!(f.to_string(), "avx512f (leaf 7 subleaf 0, ebx bit 16)");
        let f = Feature::at(bit(0x8000_0001, 0, Reg::Edx, 29), "AuthenticAMD");
        assert_eq!(
            f.to_string(),
            "64bit_mode (leaf 0x80000001 subleaf 0, edx bit 29)"
        );
        // A reserved bit has no name, only its position.
        let f = Feature::at(bit(1, 0, Reg::Edx, 10), "GenuineIntel");
        assert_eq!(f.name, None);
        assert_eq!(
            f.to_string(),
            "leaf 1 subleaf 0, edx bit 10 (no name known)"
        );
    }

    #[test]
    fn the_table_names_most_bits_of_the_main_feature_leaves_once() {
        let named = named_features("GenuineIntel");
        // Leaf 1 alone has 58 features raw-cpuid knows; every method landed somewhere.
        let leaf1 = named.iter().filter(|f| f.bit.reg.leaf == 1).count();
        assert!(leaf1 >= 55, "{leaf1} named bits in leaf 1");
        // No name on two bits.
        let mut names: Vec<_> = named.iter().filter_map(|f| f.name).collect();
        let before = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), before, "a name appears on two bits");
        // Every named bit is in a feature register.
        for f in &named {
            assert!(FEATURE_REGISTERS.contains(&f.bit.reg) || f.bit.reg.leaf == 6);
        }
    }
}
