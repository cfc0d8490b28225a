//! Whether a guest's CPU can run on a host: [`check`] compares a guest's
//! [`CpuModel`] with a host's, register by register, and names what is missing.
//!
//! The rules (`docs/cpu.md` explains each):
//!
//! | what | rule |
//! |---|---|
//! | vendor (leaf 0 ebx/edx/ecx) | equal |
//! | feature registers ([`FEATURE_REGISTERS`]) | guest's bits ⊆ host's (OSXSAVE, OSPKE ignored: they mirror CR4) |
//! | max basic leaf (0 eax), max extended leaf (0x80000000 eax), max hypervisor leaf (0x40000000 eax), leaf 7's max subleaf (7.0 eax) | guest ≤ host |
//! | physical and linear address bits (0x80000008 eax bits 0–7, 8–15) | guest ≤ host |
//! | XSAVE: largest area for all supported components (0xd.0 ecx) | guest ≤ host |
//! | XSAVE component layout (0xd.i eax size, ebx offset, each component the guest has and whose subleaf its table holds) | equal |
//! | the saved xsave area | guest's length ≤ host's `KVM_CAP_XSAVE2` size |
//! | MSRs | every saved MSR is one the host sets |
//! | TSC frequency | equal (within KVM's 250 ppm), or the host can scale it; a faster guest TSC is a note (KVM's catch-up mode), a slower one a refusal |
//! | family, model, stepping (leaf 1 eax) | informational: a note, never a refusal |
//!
//! [`check`] runs in a few microseconds on full models (`benches/vcpu_state.rs`).
//! Feature names come from [`cpu_features`](crate::cpu_features).
//!
//! ```
//! use migration_kvm::cpu_check::{check, Difference};
//! use migration_kvm::cpu_model::CpuModel;
//! use migration_kvm::CpuidEntry;
//!
//! let leaf0 = CpuidEntry { function: 0, eax: 7, ebx: 0x756e_6547, edx: 0x4965_6e69, ecx: 0x6c65_746e, ..Default::default() };
//! let leaf7 = |ebx| CpuidEntry { function: 7, flags: 1, ebx, ..Default::default() };
//! let model = |name: &str, ebx| CpuModel::new(name, vec![leaf0, leaf7(ebx)], 4096, vec![0x10], None, false).unwrap();
//! let guest = model("guest", (1 << 16) | (1 << 5)); // avx512f, avx2
//! let host = model("host", 1 << 5);                  // avx2 only
//! let report = check(&guest, &host);
//! assert!(!report.is_compatible());
//! assert!(matches!(&report.differences[0], Difference::MissingFeature(f) if f.name == Some("avx512f")));
//! assert!(report.to_string().contains("avx512f (leaf 7 subleaf 0, ebx bit 16)"));
//! assert!(check(&host, &guest).is_compatible());
//! ```

use std::fmt;
use std::sync::Arc;

use raw_cpuid::{CpuId, CpuIdResult};

use crate::cpu_features::{dynamic_mask, Feature, FeatureBit, Reg, RegId, FEATURE_REGISTERS};
use crate::cpu_model::CpuModel;
use crate::error::KvmStateError;
use crate::vcpu::VcpuState;
use migration_core::{MigratableError, Snapshot};

/// Most differences a report's text lists (the rest are counted): the text travels
/// as a migration's ABORT reason, at most 4096 bytes.
pub const MAX_LISTED: usize = 24;

/// One way a guest's CPU exceeds a host's.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Difference {
    /// Different CPU vendors.
    Vendor {
        /// The guest's vendor string.
        guest: String,
        /// The host's.
        host: String,
    },
    /// A feature the guest sees and the host lacks.
    MissingFeature(Feature),
    /// A limit (max leaf, address bits, xsave size…) above the host's.
    Limit {
        /// What the limit is.
        what: &'static str,
        /// Where it is.
        reg: RegId,
        /// The guest's value.
        guest: u32,
        /// The host's.
        host: u32,
    },
    /// An XSAVE state component laid out differently (size or offset).
    XsaveLayout {
        /// The component (its XCR0 bit).
        component: u8,
        /// The guest's (size, offset).
        guest: (u32, u32),
        /// The host's.
        host: (u32, u32),
    },
    /// The saved xsave area is larger than the host's.
    XsaveArea {
        /// The guest's bytes.
        guest: u32,
        /// The host's.
        host: u32,
    },
    /// A saved MSR the host cannot set.
    MissingMsr(u32),
    /// The guest's TSC is slower than the host's (beyond KVM's 250 ppm tolerance) and
    /// the host cannot scale its TSC: KVM refuses the rate.
    Tsc {
        /// The guest's kHz.
        guest: u32,
        /// The host's kHz (`None`: unknown).
        host: Option<u32>,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Vendor { guest, host } => {
                write!(f, "vendor {guest:?}, host is {host:?}")
            }
            Difference::MissingFeature(feature) => write!(f, "missing {feature}"),
            Difference::Limit {
                what,
                reg,
                guest,
                host,
            } => write!(f, "{what} ({reg}) is {guest:#x}, host's is {host:#x}"),
            Difference::XsaveLayout {
                component,
                guest,
                host,
            } => write!(
                f,
                "XSAVE component {component} (leaf 0xd subleaf {component}) has size {} at offset {}, host's has size {} at offset {}",
                guest.0, guest.1, host.0, host.1
            ),
            Difference::XsaveArea { guest, host } => {
                write!(f, "xsave area of {guest} bytes, host's holds {host}")
            }
            Difference::MissingMsr(index) => write!(f, "MSR {index:#x} is not settable on the host"),
            Difference::Tsc { guest, host } => match host {
                Some(h) => write!(
                    f,
                    "TSC at {guest} kHz, host's runs at {h} kHz without TSC scaling"
                ),
                None => write!(
                    f,
                    "TSC at {guest} kHz, host's rate is unknown and it cannot scale"
                ),
            },
        }
    }
}

/// The result of [`check`]: what the host lacks, and informational notes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuReport {
    /// The guest model's name.
    pub guest: String,
    /// The host model's name.
    pub host: String,
    /// Everything that makes the guest incompatible (empty: compatible).
    pub differences: Vec<Difference>,
    /// Differences that do not matter (family, model, stepping).
    pub notes: Vec<String>,
}

impl CpuReport {
    /// No difference.
    pub fn is_compatible(&self) -> bool {
        self.differences.is_empty()
    }

    /// `Ok(self)` when compatible, the refusal otherwise.
    pub fn into_result(self) -> Result<CpuReport, CpuIncompatible> {
        if self.is_compatible() {
            Ok(self)
        } else {
            Err(CpuIncompatible(Box::new(self)))
        }
    }
}

/// `guest CPU "g" does not fit host "h": 2 differences: missing avx512f (…); …`;
/// at most [`MAX_LISTED`] differences are listed.
impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_compatible() {
            return write!(
                f,
                "guest CPU {:?} is compatible with host {:?}",
                self.guest, self.host
            );
        }
        let n = self.differences.len();
        write!(
            f,
            "guest CPU {:?} does not fit host {:?}: {n} difference{}: ",
            self.guest,
            self.host,
            if n == 1 { "" } else { "s" }
        )?;
        for (i, d) in self.differences.iter().take(MAX_LISTED).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{d}")?;
        }
        if n > MAX_LISTED {
            write!(f, "; and {} more", n - MAX_LISTED)?;
        }
        Ok(())
    }
}

/// A refused restore or migration: the guest's CPU does not fit this host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CpuIncompatible(pub Box<CpuReport>);

impl CpuIncompatible {
    /// The full report.
    pub fn report(&self) -> &CpuReport {
        &self.0
    }
}

/// What a restore or an incoming migration checks the guest's CPU against.
///
/// The default checks against this host ([`CpuModel::host`]) and refuses an
/// incompatible guest. `host` injects another model (a fake "smaller" host in tests,
/// or a pool's baseline to refuse what some host of the pool could not run). `force`
/// restores anyway: the differences are kept
/// ([`KvmVm::cpu_forced`](crate::KvmVm::cpu_forced)), never dropped; the guest may
/// then fault (`#UD`) on an instruction the host lacks. For experts only.
#[derive(Clone, Debug, Default)]
pub struct CpuPolicy {
    /// The host model to check against (`None`: this host's).
    pub host: Option<Arc<CpuModel>>,
    /// Restore even when incompatible.
    pub force: bool,
}

impl CpuPolicy {
    /// Checks against `host` instead of this host.
    pub fn with_host(host: CpuModel) -> Self {
        Self {
            host: Some(Arc::new(host)),
            force: false,
        }
    }

    /// The host model: the injected one or this host's.
    pub fn host_model(&self) -> Result<&CpuModel, KvmStateError> {
        match &self.host {
            Some(m) => Ok(m),
            None => CpuModel::host(),
        }
    }

    /// Checks `guest` against the host model. `Ok(None)`: compatible;
    /// `Ok(Some(report))`: incompatible but forced; `Err`: refused (or the host
    /// could not be probed).
    pub fn admit(&self, guest: &CpuModel) -> Result<Option<CpuReport>, CpuRefusal> {
        let host = self.host_model().map_err(CpuRefusal::Probe)?;
        let report = check(guest, host);
        if report.is_compatible() {
            Ok(None)
        } else if self.force {
            Ok(Some(report))
        } else {
            Err(CpuRefusal::Incompatible(CpuIncompatible(Box::new(report))))
        }
    }
}

/// Why [`CpuPolicy::admit`] or [`admit_snapshot`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpuRefusal {
    /// The guest's CPU does not fit.
    #[error(transparent)]
    Incompatible(#[from] CpuIncompatible),
    /// This host's model could not be probed.
    #[error("probing this host's CPU: {0}")]
    Probe(#[source] KvmStateError),
    /// A vCPU's state in the snapshot could not be read.
    #[error(transparent)]
    State(#[from] MigratableError),
}

/// Whether node id `id` names a vCPU (`vcpu<N>`).
fn is_vcpu(id: &str) -> bool {
    id.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The guest models of every vCPU child (`vcpu<N>`) of `tree`, from their saved
/// state, named `name` (`name/vcpu<N>` for vCPUs other than `vcpu0`).
pub fn snapshot_models(tree: &Snapshot, name: &str) -> Result<Vec<CpuModel>, MigratableError> {
    tree.children()
        .filter(|c| is_vcpu(c.id()))
        .map(|c| {
            let state = VcpuState::from_snapshot(c)?;
            let n = if c.id() == "vcpu0" {
                name.to_owned()
            } else {
                format!("{name}/{}", c.id())
            };
            Ok(CpuModel::of_vcpu(n, &state))
        })
        .collect()
}

/// Checks every vCPU of `tree` (see [`snapshot_models`]) with `policy`, before
/// anything is restored. `Ok(None)`: all compatible; `Ok(Some(report))`: the first
/// incompatible vCPU, forced; `Err`: refused.
pub fn admit_snapshot(
    tree: &Snapshot,
    name: &str,
    policy: &CpuPolicy,
) -> Result<Option<CpuReport>, CpuRefusal> {
    let mut forced = None;
    for m in snapshot_models(tree, name)? {
        if let Some(r) = policy.admit(&m)? {
            forced.get_or_insert(r);
        }
    }
    Ok(forced)
}

const fn r(leaf: u32, subleaf: u32, reg: Reg) -> RegId {
    RegId { leaf, subleaf, reg }
}

/// Limits a guest must not exceed: (what, register, mask of the field).
const LIMITS: &[(&str, RegId, u32)] = &[
    ("max basic leaf", r(0, 0, Reg::Eax), u32::MAX),
    ("max extended leaf", r(0x8000_0000, 0, Reg::Eax), u32::MAX),
    ("max hypervisor leaf", r(0x4000_0000, 0, Reg::Eax), u32::MAX),
    ("leaf 7 max subleaf", r(7, 0, Reg::Eax), u32::MAX),
    ("physical address bits", r(0x8000_0008, 0, Reg::Eax), 0xff),
    ("linear address bits", r(0x8000_0008, 0, Reg::Eax), 0xff00),
    ("largest XSAVE area", r(0xd, 0, Reg::Ecx), u32::MAX),
];

/// Compares `guest` with `host` (see the [module docs](self) for the rules).
pub fn check(guest: &CpuModel, host: &CpuModel) -> CpuReport {
    let mut differences = Vec::new();
    let (gv, hv) = (guest.vendor(), host.vendor());
    if gv != hv {
        differences.push(Difference::Vendor {
            guest: gv.clone(),
            host: hv,
        });
    }
    for &reg in FEATURE_REGISTERS {
        let missing = guest.reg(reg) & !host.reg(reg) & !dynamic_mask(reg);
        for bit in 0..32u8 {
            if missing & (1 << bit) != 0 {
                differences.push(Difference::MissingFeature(Feature::at(
                    FeatureBit { reg, bit },
                    &gv,
                )));
            }
        }
    }
    for &(what, reg, mask) in LIMITS {
        let (g, h) = (guest.reg(reg) & mask, host.reg(reg) & mask);
        if g > h {
            differences.push(Difference::Limit {
                what,
                reg,
                guest: g,
                host: h,
            });
        }
    }
    // Layout of each XSAVE component both have (one the host lacks is a missing
    // feature above). Components 0 and 1 (x87, SSE) are the fixed legacy area.
    let components = |m: &CpuModel| {
        u64::from(m.reg(r(0xd, 0, Reg::Eax))) | (u64::from(m.reg(r(0xd, 0, Reg::Edx))) << 32)
    };
    let both = components(guest) & components(host);
    for c in 2..64u8 {
        // Only a layout the guest was told (its table has the subleaf) can differ.
        if both & (1 << c) == 0 || guest.entry(0xd, u32::from(c)).is_none() {
            continue;
        }
        let layout = |m: &CpuModel| {
            let sub = u32::from(c);
            (m.reg(r(0xd, sub, Reg::Eax)), m.reg(r(0xd, sub, Reg::Ebx)))
        };
        let (g, h) = (layout(guest), layout(host));
        if g != h {
            differences.push(Difference::XsaveLayout {
                component: c,
                guest: g,
                host: h,
            });
        }
    }
    if guest.xsave_size > host.xsave_size {
        differences.push(Difference::XsaveArea {
            guest: guest.xsave_size,
            host: host.xsave_size,
        });
    }
    for &index in &guest.msrs {
        if host.msrs.binary_search(&index).is_err() {
            differences.push(Difference::MissingMsr(index));
        }
    }
    let mut notes = Vec::new();
    if let Some(g) = guest.tsc_khz {
        match host.tsc_khz {
            _ if host.tsc_scaling => {}
            Some(h) if within_tolerance(g, h) => {}
            Some(h) if g > h => notes.push(format!(
                "TSC at {g} kHz on a host at {h} kHz without TSC scaling: KVM emulates the \
                 faster rate by catch-up (the guest's TSC advances in steps)"
            )),
            h => differences.push(Difference::Tsc { guest: g, host: h }),
        }
    }
    let (gs, hs) = (signature(guest), signature(host));
    if gs != hs {
        notes.push(format!("CPU {gs} on a host with {hs} (informational)"));
    }
    CpuReport {
        guest: guest.name.clone(),
        host: host.name.clone(),
        differences,
        notes,
    }
}

/// KVM sets a TSC rate within 250 ppm of the host's without scaling
/// (`tsc_tolerance_ppm`).
fn within_tolerance(guest: u32, host: u32) -> bool {
    u64::from(guest.abs_diff(host)) * 1_000_000 <= u64::from(host) * 250
}

/// `family 0x19 model 0x11 stepping 1`, decoded by raw-cpuid from leaf 1.
pub fn signature(m: &CpuModel) -> String {
    let reader = |leaf: u32, subleaf: u32| {
        m.entry(leaf, subleaf).map_or(
            CpuIdResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
            |e| CpuIdResult {
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            },
        )
    };
    match CpuId::with_cpuid_reader(reader).get_feature_info() {
        Some(fi) => format!(
            "family {:#x} model {:#x} stepping {}",
            fi.family_id(),
            fi.model_id(),
            fi.stepping_id()
        ),
        None => "no leaf 1".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CpuidEntry;

    const INTEL: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: u32::from(function == 7 || function == 0xd),
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// A plausible model: AVX2 + AVX-512F, XSAVE components x87/SSE/AVX/opmask.
    fn model(name: &str) -> CpuModel {
        CpuModel::new(
            name,
            vec![
                entry(0, 0, 0xd, INTEL[0], INTEL[2], INTEL[1]),
                entry(1, 0, 0x806f8, 0, (1 << 28) | (1 << 26) | (1 << 27), 1 << 25),
                entry(7, 0, 0, (1 << 5) | (1 << 16), 0, 0),
                entry(0xd, 0, 0x27, 0x340, 0x440, 0),
                entry(0xd, 2, 256, 576, 0, 0),
                entry(0xd, 5, 64, 1088, 0, 0),
                entry(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
                entry(0x8000_0008, 0, 0x3030, 0, 0, 0),
            ],
            4096,
            vec![0x10, 0x1b, 0x6e0],
            Some(2_000_000),
            false,
        )
        .unwrap()
    }

    fn set(m: &mut CpuModel, leaf: u32, sub: u32, f: impl Fn(&mut CpuidEntry)) {
        let e = m
            .cpuid
            .iter_mut()
            .find(|e| e.function == leaf && e.index == sub)
            .unwrap();
        f(e);
    }

    #[test]
    fn identical_models_are_compatible_and_a_smaller_guest_fits() {
        let host = model("host");
        assert!(check(&host, &host).is_compatible());
        let guest = host.without("small", &["avx512f", "avx2"]).unwrap();
        let report = check(&guest, &host);
        assert!(report.is_compatible(), "{report}");
        assert!(report.notes.is_empty());
    }

    #[test]
    fn a_missing_feature_is_named_with_its_position() {
        let guest = model("guest");
        let host = guest.without("host", &["avx512f"]).unwrap();
        let report = check(&guest, &host);
        assert_eq!(report.differences.len(), 1, "{report}");
        assert_eq!(
            report.to_string(),
            "guest CPU \"guest\" does not fit host \"host\": 1 difference: \
             missing avx512f (leaf 7 subleaf 0, ebx bit 16)"
        );
    }

    #[test]
    fn the_dynamic_osxsave_bit_is_never_compared() {
        let guest = model("guest");
        let mut host = model("host");
        set(&mut host, 1, 0, |e| e.ecx &= !(1 << 27));
        assert!(check(&guest, &host).is_compatible());
    }

    #[test]
    fn vendor_limits_xsave_msrs_and_tsc_are_checked() {
        let guest = model("guest");

        let mut amd = model("amd");
        set(&mut amd, 0, 0, |e| {
            e.ebx = 0x6874_7541;
            e.edx = 0x6974_6e65;
            e.ecx = 0x444d_4163;
        });
        let d = check(&guest, &amd).differences;
        assert_eq!(
            d,
            vec![Difference::Vendor {
                guest: "GenuineIntel".into(),
                host: "AuthenticAMD".into()
            }]
        );

        let mut low = model("low");
        set(&mut low, 0, 0, |e| e.eax = 7);
        set(&mut low, 0x8000_0008, 0, |e| e.eax = 0x3028);
        let d = check(&guest, &low).differences;
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(
            |x| x.to_string() == "max basic leaf (leaf 0 subleaf 0, eax) is 0xd, host's is 0x7"
        ));
        assert!(d.iter().any(|x| matches!(
            x,
            Difference::Limit {
                what: "physical address bits",
                guest: 0x30,
                host: 0x28,
                ..
            }
        )));

        let mut small_xsave = model("small-xsave");
        small_xsave.xsave_size = 2048;
        assert_eq!(
            check(&guest, &small_xsave).differences,
            vec![Difference::XsaveArea {
                guest: 4096,
                host: 2048
            }]
        );

        let mut moved = model("moved");
        set(&mut moved, 0xd, 5, |e| e.ebx = 1152);
        assert_eq!(
            check(&guest, &moved).differences,
            vec![Difference::XsaveLayout {
                component: 5,
                guest: (64, 1088),
                host: (64, 1152)
            }]
        );

        let mut no_deadline = model("no-deadline");
        no_deadline.msrs.retain(|&m| m != 0x6e0);
        let d = check(&guest, &no_deadline);
        assert_eq!(d.differences, vec![Difference::MissingMsr(0x6e0)]);
        assert!(d.to_string().contains("MSR 0x6e0 is not settable"));

        let mut fast = model("fast");
        fast.tsc_khz = Some(3_000_000);
        assert_eq!(
            check(&guest, &fast).differences,
            vec![Difference::Tsc {
                guest: 2_000_000,
                host: Some(3_000_000)
            }]
        );
        fast.tsc_scaling = true;
        assert!(check(&guest, &fast).is_compatible());
        // Within 250 ppm: KVM sets it without scaling.
        let mut close = model("close");
        close.tsc_khz = Some(2_000_400);
        assert!(check(&guest, &close).is_compatible());
        // A slower host: KVM catches up; allowed, with a note.
        let mut slow = model("slow");
        slow.tsc_khz = Some(1_000_000);
        let r = check(&guest, &slow);
        assert!(r.is_compatible());
        assert!(r.notes[0].contains("catch-up"), "{:?}", r.notes);
    }

    #[test]
    fn family_and_model_are_informational() {
        let guest = model("guest");
        let mut other = model("other");
        set(&mut other, 1, 0, |e| e.eax = 0xa10f11);
        let report = check(&guest, &other);
        assert!(report.is_compatible());
        assert_eq!(
            report.notes,
            vec!["CPU family 0x6 model 0x8f stepping 8 on a host with family 0x19 model 0x11 stepping 1 (informational)"]
        );
    }

    #[test]
    fn a_long_report_stays_short() {
        let guest = model("guest");
        let mut host = model("host");
        host.msrs.clear();
        for i in 0..100 {
            let mut g = guest.clone();
            g.msrs = (0..100).map(|m| m + i * 1000).collect();
            let text = check(&g, &host).to_string();
            assert!(text.len() < 4096, "{}", text.len());
            assert!(text.ends_with("and 76 more"), "{text}");
        }
    }

    #[test]
    fn policy_forces_only_when_asked() {
        let guest = model("guest");
        let host = guest.without("host", &["avx512f"]).unwrap();
        let refuse = CpuPolicy::with_host(host.clone());
        assert!(matches!(
            refuse.admit(&guest),
            Err(CpuRefusal::Incompatible(_))
        ));
        let force = CpuPolicy {
            force: true,
            ..refuse
        };
        let kept = force.admit(&guest).unwrap().unwrap();
        assert_eq!(kept.differences.len(), 1);
        assert_eq!(force.admit(&host).unwrap(), None);
    }
}
