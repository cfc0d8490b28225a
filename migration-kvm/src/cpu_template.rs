//! CPU templates and baselines: a [`CpuModel`] used as an upper bound.
//!
//! - [`baseline`] intersects several hosts' models: the features all of them have,
//!   the smallest of each limit, the MSRs all of them set. A guest given the
//!   baseline runs on any host of the pool (what libvirt's `cpu-baseline` computes).
//! - [`apply`] gives a guest on one host the host's CPUID masked by a template: a
//!   feature the template lacks is hidden, limits are lowered to the template's,
//!   informational leaves (topology, caches, brand) stay the host's.
//!
//! A [`KvmVm`](crate::KvmVm) built from a [`KvmVmConfig`](crate::KvmVmConfig) whose
//! `cpu` is a template gives every vCPU `apply(host, template)`; the snapshot and
//! the migration handshake then carry the resulting guest model, named after the
//! template.
//!
//! ```
//! use migration_kvm::cpu_check::check;
//! use migration_kvm::cpu_model::CpuModel;
//! use migration_kvm::cpu_template::baseline;
//! use migration_kvm::CpuidEntry;
//!
//! let leaf0 = CpuidEntry { function: 0, eax: 7, ebx: 0x756e_6547, edx: 0x4965_6e69, ecx: 0x6c65_746e, ..Default::default() };
//! let leaf7 = |ebx| CpuidEntry { function: 7, flags: 1, ebx, ..Default::default() };
//! let host = |name: &str, ebx| CpuModel::new(name, vec![leaf0, leaf7(ebx)], 4096, vec![0x10], None, false).unwrap();
//! let a = host("a", (1 << 16) | (1 << 5)); // avx512f, avx2
//! let b = host("b", (1 << 5) | (1 << 3));  // avx2, bmi1
//! let pool = baseline("pool", &[a.clone(), b.clone()])?;
//! assert_eq!(pool.entry(7, 0).unwrap().ebx, 1 << 5);
//! assert!(check(&pool, &a).is_compatible() && check(&pool, &b).is_compatible());
//! # Ok::<(), migration_kvm::cpu_template::TemplateError>(())
//! ```

use crate::cpu_features::{Reg, RegId, FEATURE_REGISTERS};
use crate::cpu_model::{CpuModel, CpuModelError};
use crate::state::CpuidEntry;

/// Errors of [`baseline`] and [`apply`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TemplateError {
    /// No model to intersect.
    #[error("a baseline needs at least one CPU model")]
    Empty,
    /// Models of different vendors cannot be combined.
    #[error("CPU model {name:?} is {vendor:?}, the others are {expected:?}")]
    Vendor {
        /// The odd model's name.
        name: String,
        /// Its vendor.
        vendor: String,
        /// The vendor of the first model.
        expected: String,
    },
    /// The result is not a valid model.
    #[error(transparent)]
    Model(#[from] CpuModelError),
}

const fn r(leaf: u32, subleaf: u32, reg: Reg) -> RegId {
    RegId { leaf, subleaf, reg }
}

/// Registers whose value is a limit (the smaller of two is kept), with the mask of
/// each field: max leaves, leaf 7's max subleaf, address bits, XSAVE sizes.
const LIMIT_FIELDS: &[(RegId, &[u32])] = &[
    (r(0, 0, Reg::Eax), &[u32::MAX]),
    (r(0x4000_0000, 0, Reg::Eax), &[u32::MAX]),
    (r(0x8000_0000, 0, Reg::Eax), &[u32::MAX]),
    (r(7, 0, Reg::Eax), &[u32::MAX]),
    (r(0x8000_0008, 0, Reg::Eax), &[0xff, 0xff00]),
    (r(0xd, 0, Reg::Ebx), &[u32::MAX]),
    (r(0xd, 0, Reg::Ecx), &[u32::MAX]),
    (r(0xd, 1, Reg::Ebx), &[u32::MAX]),
];

/// The entry of `m` at `leaf`/`subleaf` whose registers `e` combines with.
fn same_entry<'a>(m: &'a CpuModel, e: &CpuidEntry) -> Option<&'a CpuidEntry> {
    m.entry(e.function, e.index)
}

/// Combines `a`'s table with `b`: features ANDed, limits lowered, XSAVE components
/// kept only where both have them with the same layout, leaves above either's
/// maximum dropped; every other register is `a`'s.
fn intersect(a: &CpuModel, b: &CpuModel) -> Vec<CpuidEntry> {
    let max = |m: &CpuModel, base: u32| m.entry(base, 0).map_or(0, |e| e.eax);
    let within = |leaf: u32| {
        let base = match leaf {
            0..=0x3fff_ffff => 0,
            0x4000_0000..=0x4fff_ffff => 0x4000_0000,
            0x8000_0000..=0x8fff_ffff => 0x8000_0000,
            _ => return true,
        };
        leaf <= max(a, base).min(max(b, base))
    };
    // XSAVE components both have, with the same size and offset.
    let comps = |m: &CpuModel| {
        u64::from(m.reg(r(0xd, 0, Reg::Eax))) | (u64::from(m.reg(r(0xd, 0, Reg::Edx))) << 32)
    };
    let mut xcr0 = comps(a) & comps(b);
    for c in 2..64u32 {
        let layout = |m: &CpuModel| (m.reg(r(0xd, c, Reg::Eax)), m.reg(r(0xd, c, Reg::Ebx)));
        if xcr0 & (1 << c) != 0 && layout(a) != layout(b) {
            xcr0 &= !(1 << c);
        }
    }
    let mut out = Vec::with_capacity(a.cpuid.len());
    for e in a.cpuid.iter().filter(|e| within(e.function)) {
        let mut n = *e;
        let other = same_entry(b, e).copied().unwrap_or(CpuidEntry {
            function: e.function,
            index: e.index,
            ..Default::default()
        });
        for reg in Reg::ALL {
            let id = r(e.function, e.index, reg);
            if FEATURE_REGISTERS.contains(&id) {
                *reg.of_mut(&mut n) &= reg.of(&other);
            }
            if let Some((_, fields)) = LIMIT_FIELDS.iter().find(|(l, _)| *l == id) {
                let (x, y) = (reg.of(e), reg.of(&other));
                let mut v = x;
                for &f in *fields {
                    v = (v & !f) | (x & f).min(y & f);
                }
                *reg.of_mut(&mut n) = v;
            }
        }
        if e.function == 0xd {
            match e.index {
                0 => {
                    n.eax = xcr0 as u32;
                    n.edx = (xcr0 >> 32) as u32;
                }
                1 => {}
                c if c < 64 && xcr0 & (1 << c) == 0 => {
                    (n.eax, n.ebx, n.ecx, n.edx) = (0, 0, 0, 0);
                }
                _ => {}
            }
        }
        out.push(n);
    }
    out
}

/// The baseline of `models`, named `name`: a model every one of them can run (see
/// the [module docs](self)). The xsave area is the smallest, the MSRs those all of
/// them set, the TSC rate kept only if all agree; TSC scaling only if all have it.
pub fn baseline(name: &str, models: &[CpuModel]) -> Result<CpuModel, TemplateError> {
    let (first, rest) = models.split_first().ok_or(TemplateError::Empty)?;
    let vendor = first.vendor();
    let mut acc = first.clone();
    for m in rest {
        if m.vendor() != vendor {
            return Err(TemplateError::Vendor {
                name: m.name.clone(),
                vendor: m.vendor(),
                expected: vendor,
            });
        }
        acc = CpuModel::new(
            name,
            intersect(&acc, m),
            acc.xsave_size.min(m.xsave_size),
            acc.msrs
                .iter()
                .copied()
                .filter(|i| m.msrs.binary_search(i).is_ok())
                .collect(),
            if acc.tsc_khz == m.tsc_khz {
                acc.tsc_khz
            } else {
                None
            },
            acc.tsc_scaling && m.tsc_scaling,
        )?;
    }
    acc.name = name.to_owned();
    acc.validate()?;
    Ok(acc)
}

/// The CPUID a guest built from `template` gets on `host`: the host's table masked by
/// the template (see the [module docs](self)). The vendors must agree.
pub fn apply(host: &CpuModel, template: &CpuModel) -> Result<Vec<CpuidEntry>, TemplateError> {
    if host.vendor() != template.vendor() {
        return Err(TemplateError::Vendor {
            name: template.name.clone(),
            vendor: template.vendor(),
            expected: host.vendor(),
        });
    }
    Ok(intersect(host, template))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_check::check;
    use crate::cpu_features::{dynamic_mask, FeatureBit};
    use proptest::prelude::*;

    const INTEL: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];

    /// A model whose feature registers hold `values` (in FEATURE_REGISTERS order).
    fn model(name: &str, values: &[u32], max_leaf: u32, phys_bits: u32) -> CpuModel {
        let mut cpuid = vec![
            CpuidEntry {
                function: 0,
                eax: max_leaf,
                ebx: INTEL[0],
                edx: INTEL[1],
                ecx: INTEL[2],
                ..Default::default()
            },
            CpuidEntry {
                function: 0x8000_0000,
                eax: 0x8000_0021,
                ..Default::default()
            },
            CpuidEntry {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ];
        for (reg, v) in FEATURE_REGISTERS.iter().zip(values) {
            let pos = cpuid
                .iter()
                .position(|e| e.function == reg.leaf && e.index == reg.subleaf);
            let i = pos.unwrap_or_else(|| {
                cpuid.push(CpuidEntry {
                    function: reg.leaf,
                    index: reg.subleaf,
                    flags: u32::from(reg.leaf == 7 || reg.leaf == 0xd),
                    ..Default::default()
                });
                cpuid.len() - 1
            });
            *reg.reg.of_mut(&mut cpuid[i]) = *v;
        }
        match cpuid.iter_mut().find(|e| e.function == 0x8000_0008) {
            Some(e) => e.eax = phys_bits,
            None => unreachable!("0x80000008 is a feature leaf"),
        }
        CpuModel::new(name, cpuid, 4096, vec![0x10, 0x1b], Some(1000), false).unwrap()
    }

    proptest! {
        #[test]
        fn a_baseline_of_two_models_is_their_intersection(
            a in prop::collection::vec(any::<u32>(), FEATURE_REGISTERS.len()),
            b in prop::collection::vec(any::<u32>(), FEATURE_REGISTERS.len()),
            max_a in 7u32..0x20,
            max_b in 7u32..0x20,
            bits_a in 30u32..52,
            bits_b in 30u32..52,
        ) {
            // Leaf 0xd's XSAVE components need layouts to be kept; keep them out.
            let clear_xsave = |v: &mut Vec<u32>| {
                for (reg, x) in FEATURE_REGISTERS.iter().zip(v.iter_mut()) {
                    if reg.leaf == 0xd && reg.subleaf == 0 {
                        *x &= 3;
                    }
                }
            };
            let (mut a, mut b) = (a, b);
            clear_xsave(&mut a);
            clear_xsave(&mut b);
            let ma = model("a", &a, max_a, bits_a);
            let mb = model("b", &b, max_b, bits_b);
            let base = baseline("ab", &[ma.clone(), mb.clone()]).unwrap();
            for (i, &reg) in FEATURE_REGISTERS.iter().enumerate() {
                if reg.leaf > 0x20 && reg.leaf < 0x4000_0000 {
                    continue;
                }
                let visible = |m: u32| reg.leaf >= 0x4000_0000 || reg.leaf <= m;
                for bit in 0..32u8 {
                    let fb = FeatureBit { reg, bit };
                    let want = (a[i] & b[i]) & (1 << bit) != 0
                        && visible(max_a.min(max_b));
                    prop_assert_eq!(base.has(fb), want, "{}", fb);
                }
            }
            prop_assert_eq!(base.max_leaf(), max_a.min(max_b));
            prop_assert_eq!(base.reg(r(0x8000_0008, 0, Reg::Eax)), bits_a.min(bits_b));
            // The baseline runs on both.
            prop_assert!(check(&base, &ma).is_compatible(), "{}", check(&base, &ma));
            prop_assert!(check(&base, &mb).is_compatible(), "{}", check(&base, &mb));
            // And is the same whichever order the models come in (features and limits).
            let other = baseline("ab", &[mb, ma]).unwrap();
            for &reg in FEATURE_REGISTERS {
                prop_assert_eq!(base.reg(reg) & !dynamic_mask(reg), other.reg(reg) & !dynamic_mask(reg));
            }
        }
    }

    #[test]
    fn vendors_must_agree_and_a_baseline_needs_a_model() {
        let a = model("a", &[1; 20], 0xd, 40);
        let mut amd = a.clone();
        amd.name = "amd".into();
        amd.cpuid[0].ebx = 0x6874_7541;
        assert!(matches!(
            baseline("x", &[a.clone(), amd.clone()]),
            Err(TemplateError::Vendor { .. })
        ));
        assert!(matches!(apply(&a, &amd), Err(TemplateError::Vendor { .. })));
        assert_eq!(baseline("x", &[]), Err(TemplateError::Empty));
    }

    #[test]
    fn apply_masks_features_and_keeps_the_hosts_other_registers() {
        let mut host = model("host", &[u32::MAX; 20], 0x1c, 48);
        host.cpuid.push(CpuidEntry {
            function: 4,
            eax: 0x1234,
            ..Default::default()
        });
        host.cpuid.sort_by_key(|e| (e.function, e.index));
        let template = host.without("no-avx512f", &["avx512f", "avx2"]).unwrap();
        let mut template = template;
        template.cpuid.retain(|e| e.function != 4);
        let got = CpuModel::new(
            "g",
            apply(&host, &template).unwrap(),
            4096,
            vec![],
            None,
            false,
        )
        .unwrap();
        let avx512f = crate::cpu_features::feature_by_name("avx512f").unwrap();
        let avx2 = crate::cpu_features::feature_by_name("avx2").unwrap();
        assert!(host.has(avx512f) && !got.has(avx512f) && !got.has(avx2));
        // Leaf 4 (cache topology) is informational: the host's, though the template
        // has none.
        assert_eq!(got.entry(4, 0).map(|e| e.eax), Some(0x1234));
    }
}
