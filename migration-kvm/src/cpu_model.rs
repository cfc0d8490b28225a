//! [`CpuModel`]: a CPU as data — what a guest was given, or what a host can give.
//!
//! A model holds the CPUID table, the size of the xsave area, the MSRs that are
//! saved (a guest) or settable (a host), the TSC frequency and whether the TSC rate
//! can be changed (TSC scaling). A guest's model comes from its saved vCPU state
//! ([`CpuModel::of_vcpu`]); a host's from KVM ([`CpuModel::host`]:
//! `KVM_GET_SUPPORTED_CPUID`, `KVM_GET_MSR_INDEX_LIST`, `KVM_CAP_XSAVE2`,
//! `KVM_CAP_TSC_CONTROL`). [`cpu_check`](crate::cpu_check) compares the two;
//! [`cpu_template`](crate::cpu_template) intersects models into templates.
//!
//! A model is serializable with serde (`vmsnap cpu host --json` prints one; it is
//! [`Versioned`], version 1) and has a compact binary form ([`CpuModel::to_bytes`])
//! that travels inside a [`KvmVmConfig`](crate::KvmVmConfig). Both decoders bound
//! every count before allocating.
//!
//! ```
//! use migration_kvm::cpu_model::CpuModel;
//! use migration_kvm::CpuidEntry;
//!
//! let m = CpuModel {
//!     name: "tiny".into(),
//!     cpuid: vec![CpuidEntry { function: 0, eax: 7, ebx: 0x756e_6547, edx: 0x4965_6e69, ecx: 0x6c65_746e, ..Default::default() }],
//!     xsave_size: 4096,
//!     msrs: vec![0x10],
//!     tsc_khz: Some(2_500_000),
//!     tsc_scaling: false,
//! };
//! assert_eq!(m.vendor(), "GenuineIntel");
//! assert_eq!(m.max_leaf(), 7);
//! assert_eq!(CpuModel::from_bytes(&m.to_bytes()), Ok(m));
//! ```

use std::fmt;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm};
use migration_core::Versioned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::backend::VcpuBackend;
use crate::cpu_features::{
    dynamic_mask, feature_by_name, Feature, FeatureBit, RegId, FEATURE_REGISTERS,
};
use crate::error::{KvmStateError, Step};
use crate::layout::DeviceLayout;
use crate::msr;
use crate::state::{CpuidEntry, CpuidState, MAX_CPUID_ENTRIES, MAX_MSRS, MAX_XSAVE_BYTES};
use crate::vcpu::{HostCaps, VcpuState};

/// Longest model name, in bytes.
pub const MAX_NAME: usize = 64;
const MAGIC: &[u8; 4] = b"CPUM";
const VERSION: u32 = 1;
/// Bytes of the binary form before the entries.
const HEADER: usize = 4 + 4 + 2;
const ENTRY_BYTES: usize = 28;

/// Errors of building or decoding a [`CpuModel`] (decoded input is untrusted).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuModelError {
    /// Fewer bytes than the encoding needs.
    #[error("CPU model truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// Bytes after the model.
    #[error("{0} trailing bytes after the CPU model")]
    TrailingBytes(usize),
    /// Not a model (bad magic).
    #[error("not a CPU model (bad magic)")]
    BadMagic,
    /// A version this reader does not know.
    #[error("CPU model version {0} is not supported (this reader knows version 1)")]
    Version(u32),
    /// A field out of its bounds.
    #[error("CPU model: {0}")]
    Invalid(String),
    /// A feature name raw-cpuid does not know.
    #[error("no CPU feature is called `{0}`")]
    UnknownFeature(String),
}

/// A CPU as data: see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuModel {
    /// What it is: `host`, a template's name, `guest`… (at most [`MAX_NAME`] bytes).
    pub name: String,
    /// The CPUID table, sorted by leaf and subleaf (at most 256 entries).
    pub cpuid: Vec<CpuidEntry>,
    /// Bytes of the xsave area (a guest's saved area; the host's `KVM_CAP_XSAVE2`).
    pub xsave_size: u32,
    /// MSR indices, sorted, without duplicates: those a guest's state holds, or those
    /// a host can set.
    pub msrs: Vec<u32>,
    /// TSC frequency in kHz, when known.
    pub tsc_khz: Option<u32>,
    /// Whether the TSC frequency can be set to another rate (`KVM_CAP_TSC_CONTROL`).
    pub tsc_scaling: bool,
}

impl Versioned for CpuModel {
    const VERSION: u32 = 1;
}

impl CpuModel {
    /// A model from parts: sorts the CPUID table and the MSR list (dropping
    /// duplicate MSRs) and checks the bounds.
    pub fn new(
        name: impl Into<String>,
        mut cpuid: Vec<CpuidEntry>,
        xsave_size: u32,
        mut msrs: Vec<u32>,
        tsc_khz: Option<u32>,
        tsc_scaling: bool,
    ) -> Result<Self, CpuModelError> {
        cpuid.sort_by_key(|e| (e.function, e.index));
        msrs.sort_unstable();
        msrs.dedup();
        let m = Self {
            name: name.into(),
            cpuid,
            xsave_size,
            msrs,
            tsc_khz,
            tsc_scaling,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the bounds: name, entry and MSR counts, xsave size, MSR order.
    pub fn validate(&self) -> Result<(), CpuModelError> {
        let bad = |s: String| Err(CpuModelError::Invalid(s));
        if self.name.len() > MAX_NAME {
            return bad(format!(
                "name of {} bytes (at most {MAX_NAME})",
                self.name.len()
            ));
        }
        if self.cpuid.len() > MAX_CPUID_ENTRIES {
            return bad(format!(
                "{} CPUID entries (at most {MAX_CPUID_ENTRIES})",
                self.cpuid.len()
            ));
        }
        if self.msrs.len() > MAX_MSRS {
            return bad(format!("{} MSRs (at most {MAX_MSRS})", self.msrs.len()));
        }
        if self.xsave_size as usize > MAX_XSAVE_BYTES {
            return bad(format!("xsave area of {} bytes", self.xsave_size));
        }
        if self.msrs.windows(2).any(|w| w[0] >= w[1]) {
            return bad("MSR list not sorted or with duplicates".into());
        }
        Ok(())
    }

    /// The model of a guest from its saved vCPU state: its CPUID, the length of its
    /// xsave area, the MSRs it holds and its TSC rate.
    pub fn of_vcpu(name: impl Into<String>, state: &VcpuState) -> Self {
        let mut cpuid = state.cpuid.0.clone();
        cpuid.sort_by_key(|e| (e.function, e.index));
        let mut msrs: Vec<u32> = state.msrs.0.iter().map(|e| e.index).collect();
        msrs.sort_unstable();
        msrs.dedup();
        Self {
            name: truncate_name(name.into()),
            cpuid,
            xsave_size: u32::try_from(state.xsave.as_bytes().len()).unwrap_or(u32::MAX),
            msrs,
            tsc_khz: state.tsc_khz.map(|t| t.0),
            tsc_scaling: false,
        }
    }

    /// The model of a live vCPU as the guest sees it: its CPUID (`KVM_GET_CPUID2`),
    /// the xsave size and MSR list a save would use, its TSC rate.
    pub fn of_backend<B: VcpuBackend + ?Sized>(
        name: impl Into<String>,
        vcpu: &B,
        caps: &HostCaps,
    ) -> Result<Self, KvmStateError> {
        let cpuid = vcpu
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(KvmStateError::get(Step::Setup("KVM_GET_CPUID2")))?;
        let cpuid: Vec<CpuidEntry> = cpuid.as_slice().iter().map(CpuidEntry::from).collect();
        let msrs = msr::save_list(
            &caps.msr_index_list,
            &cpuid,
            msr::get_msr(vcpu, msr::MSR_IA32_MCG_CAP),
            msr::get_msr(vcpu, msr::MSR_MTRRCAP),
        );
        let tsc_khz = if caps.tsc_khz {
            vcpu.get_tsc_khz().ok()
        } else {
            None
        };
        let mut m = Self {
            name: truncate_name(name.into()),
            cpuid,
            xsave_size: u32::try_from(caps.xsave_size()).unwrap_or(u32::MAX),
            msrs,
            tsc_khz,
            tsc_scaling: false,
        };
        m.cpuid.sort_by_key(|e| (e.function, e.index));
        Ok(m)
    }

    /// This host's model (named `host`), probed once per process and cached: see
    /// [`probe_host`](Self::probe_host).
    pub fn host() -> Result<&'static CpuModel, KvmStateError> {
        static HOST: OnceLock<CpuModel> = OnceLock::new();
        if let Some(m) = HOST.get() {
            return Ok(m);
        }
        let kvm = Kvm::new().map_err(KvmStateError::get(Step::Setup("open /dev/kvm")))?;
        let m = Self::probe_host(&kvm)?;
        Ok(HOST.get_or_init(|| m))
    }

    /// Probes what this host can give a guest, with a throwaway VM and vCPU: the
    /// CPUID a vCPU has after `KVM_SET_CPUID2` of `KVM_GET_SUPPORTED_CPUID` (plus the
    /// TSC-deadline timer when `KVM_CAP_TSC_DEADLINE_TIMER` says KVM emulates it: the
    /// supported table leaves it out), read back with `KVM_GET_CPUID2`; the MSRs a
    /// vCPU with that CPUID saves (all settable); the `KVM_CAP_XSAVE2` size; the
    /// vCPU's TSC rate and `KVM_CAP_TSC_CONTROL`.
    pub fn probe_host(kvm: &Kvm) -> Result<Self, KvmStateError> {
        let setup = |what| KvmStateError::get(Step::Setup(what));
        let vm = kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?;
        // A bare VM: no irqchip (nothing here reads a LAPIC).
        let caps = HostCaps::probe(kvm, &vm, &DeviceLayout::NONE)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
        let mut cpuid: Vec<CpuidEntry> =
            supported.as_slice().iter().map(CpuidEntry::from).collect();
        if vm.check_extension_int(Cap::TscDeadlineTimer) > 0 {
            if let Some(l1) = cpuid.iter_mut().find(|e| e.function == 1) {
                l1.ecx |= 1 << 24;
            }
        }
        let vcpu = vm.create_vcpu(0).map_err(setup("KVM_CREATE_VCPU"))?;
        // What a vCPU given that table really has: KVM reports it back. The same
        // table on hosts that honour KVM_SET_CPUID2; on kvm_pvm hosts the guest runs
        // CPUID on the hardware, KVM_GET_SUPPORTED_CPUID understates it (no SSE3,
        // no AVX) and the table read back is the truth.
        let entries: Vec<kvm_cpuid_entry2> = cpuid.iter().map(kvm_cpuid_entry2::from).collect();
        let table = CpuId::from_entries(&entries).map_err(|e| KvmStateError::Invalid {
            step: Step::Setup("host CPU model"),
            reason: format!("{} CPUID entries: {e:?}", entries.len()),
        })?;
        vcpu.set_cpuid2(&table).map_err(setup("KVM_SET_CPUID2"))?;
        let back = vcpu
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(setup("KVM_GET_CPUID2"))?;
        let cpuid: Vec<CpuidEntry> = back.as_slice().iter().map(CpuidEntry::from).collect();
        let msrs = msr::save_list(
            &caps.msr_index_list,
            &cpuid,
            msr::get_msr(&vcpu, msr::MSR_IA32_MCG_CAP),
            msr::get_msr(&vcpu, msr::MSR_MTRRCAP),
        );
        let tsc_khz = if caps.tsc_khz {
            vcpu.get_tsc_khz().ok()
        } else {
            None
        };
        Self::new(
            "host",
            cpuid,
            u32::try_from(caps.xsave_size()).unwrap_or(u32::MAX),
            msrs,
            tsc_khz,
            vm.check_extension_int(Cap::TscControl) > 0,
        )
        .map_err(|e| KvmStateError::Invalid {
            step: Step::Setup("host CPU model"),
            reason: e.to_string(),
        })
    }

    /// The entry for `leaf` and `subleaf` (the subleaf is ignored for leaves whose
    /// entry is not flagged `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`).
    pub fn entry(&self, leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
        self.cpuid.iter().find(|e| {
            e.function == leaf
                && (e.index == subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        })
    }

    /// Register `r`'s value (0 when the leaf is absent).
    pub fn reg(&self, r: RegId) -> u32 {
        self.entry(r.leaf, r.subleaf).map_or(0, |e| r.reg.of(e))
    }

    /// The vendor string of leaf 0 (`GenuineIntel`, `AuthenticAMD`), non-printable
    /// bytes as `?`; empty without leaf 0.
    pub fn vendor(&self) -> String {
        let Some(l0) = self.entry(0, 0) else {
            return String::new();
        };
        [l0.ebx, l0.edx, l0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .map(|b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect()
    }

    /// The highest basic leaf (leaf 0 eax).
    pub fn max_leaf(&self) -> u32 {
        self.entry(0, 0).map_or(0, |e| e.eax)
    }

    /// The highest extended leaf (leaf 0x80000000 eax).
    pub fn max_extended_leaf(&self) -> u32 {
        self.entry(0x8000_0000, 0).map_or(0, |e| e.eax)
    }

    /// Whether feature `bit` is set.
    pub fn has(&self, bit: FeatureBit) -> bool {
        self.reg(bit.reg) & (1 << bit.bit) != 0
    }

    /// Every feature bit set in a feature register (the dynamic OSXSAVE/OSPKE bits
    /// left out), named where raw-cpuid knows the name, in bit order.
    pub fn features(&self) -> Vec<Feature> {
        let vendor = self.vendor();
        let mut out = Vec::new();
        for &r in FEATURE_REGISTERS {
            let v = self.reg(r) & !dynamic_mask(r);
            for b in 0..32u8 {
                if v & (1 << b) != 0 {
                    out.push(Feature::at(FeatureBit { reg: r, bit: b }, &vendor));
                }
            }
        }
        out
    }

    /// This model without the features called `names` (raw-cpuid's names, see
    /// [`cpu_features`](crate::cpu_features)), renamed `name`. Only the named bits are
    /// cleared: to hide AVX-512's XSAVE state as well, name its components
    /// (`xcr0_avx512_opmask`…).
    pub fn without(&self, name: &str, names: &[&str]) -> Result<Self, CpuModelError> {
        let mut m = self.clone();
        m.name = truncate_name(name.to_owned());
        for n in names {
            let bit =
                feature_by_name(n).ok_or_else(|| CpuModelError::UnknownFeature((*n).into()))?;
            for e in m.cpuid.iter_mut().filter(|e| {
                e.function == bit.reg.leaf
                    && (e.index == bit.reg.subleaf
                        || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
            }) {
                *bit.reg.reg.of_mut(e) &= !(1 << bit.bit);
            }
        }
        Ok(m)
    }

    /// The binary form: `CPUM`, version u32 (1), name length u16, name (UTF-8),
    /// xsave size u32, TSC kHz u32 (0 = unknown), flags u32 (bit 0 TSC scaling),
    /// entry count u32 (≤ 256), MSR count u32 (≤ 4096), then per entry leaf, subleaf,
    /// flags, eax, ebx, ecx, edx (u32 each), then the MSR indices (u32 each); all
    /// little endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            HEADER + self.name.len() + 20 + ENTRY_BYTES * self.cpuid.len() + 4 * self.msrs.len(),
        );
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        for v in [
            self.xsave_size,
            self.tsc_khz.unwrap_or(0),
            u32::from(self.tsc_scaling),
            self.cpuid.len() as u32,
            self.msrs.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for e in &self.cpuid {
            for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        for m in &self.msrs {
            b.extend_from_slice(&m.to_le_bytes());
        }
        b
    }

    /// Decodes [`to_bytes`](Self::to_bytes)' output, bounding every count before
    /// allocating, and validates it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CpuModelError> {
        let mut r = Cursor { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(CpuModelError::BadMagic);
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(CpuModelError::Version(version));
        }
        let name_len = usize::from(r.u16()?);
        if name_len > MAX_NAME {
            return Err(CpuModelError::Invalid(format!("name of {name_len} bytes")));
        }
        let name = std::str::from_utf8(r.take(name_len)?)
            .map_err(|_| CpuModelError::Invalid("name is not UTF-8".into()))?
            .to_owned();
        let xsave_size = r.u32()?;
        let tsc_khz = Some(r.u32()?).filter(|&k| k != 0);
        let flags = r.u32()?;
        if flags & !1 != 0 {
            return Err(CpuModelError::Invalid(format!("unknown flags {flags:#x}")));
        }
        let n_cpuid = r.u32()? as usize;
        let n_msrs = r.u32()? as usize;
        if n_cpuid > MAX_CPUID_ENTRIES || n_msrs > MAX_MSRS {
            return Err(CpuModelError::Invalid(format!(
                "{n_cpuid} CPUID entries and {n_msrs} MSRs (at most {MAX_CPUID_ENTRIES} and {MAX_MSRS})"
            )));
        }
        let needed = r.at + ENTRY_BYTES * n_cpuid + 4 * n_msrs;
        if bytes.len() < needed {
            return Err(CpuModelError::Truncated {
                needed,
                found: bytes.len(),
            });
        }
        if bytes.len() > needed {
            return Err(CpuModelError::TrailingBytes(bytes.len() - needed));
        }
        let mut cpuid = Vec::with_capacity(n_cpuid);
        for _ in 0..n_cpuid {
            let mut v = [0u32; 7];
            for x in &mut v {
                *x = r.u32()?;
            }
            let [function, index, flags, eax, ebx, ecx, edx] = v;
            cpuid.push(CpuidEntry {
                function,
                index,
                flags,
                eax,
                ebx,
                ecx,
                edx,
            });
        }
        let mut msrs = Vec::with_capacity(n_msrs);
        for _ in 0..n_msrs {
            msrs.push(r.u32()?);
        }
        let m = Self {
            name,
            cpuid,
            xsave_size,
            msrs,
            tsc_khz,
            tsc_scaling: flags & 1 != 0,
        };
        m.validate()?;
        Ok(m)
    }
}

/// `name` cut to at most [`MAX_NAME`] bytes, on a character boundary.
fn truncate_name(mut name: String) -> String {
    if name.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CpuModelError> {
        let end = self.at.saturating_add(n);
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or(CpuModelError::Truncated {
                needed: end,
                found: self.bytes.len(),
            })?;
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, CpuModelError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Result<u32, CpuModelError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

impl fmt::Display for CpuModel {
    /// `name (vendor, N CPUID entries, M MSRs, xsave X bytes, TSC T kHz)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {} CPUID entries, {} MSRs, xsave {} bytes, TSC ",
            self.name,
            self.vendor(),
            self.cpuid.len(),
            self.msrs.len(),
            self.xsave_size
        )?;
        match self.tsc_khz {
            Some(k) => write!(f, "{k} kHz")?,
            None => f.write_str("unknown")?,
        }
        f.write_str(if self.tsc_scaling { ", scalable)" } else { ")" })
    }
}

/// The serde form is the struct's fields; decoding bounds the name, the CPUID table
/// and the MSR list before allocating, then [`validate`](CpuModel::validate)s.
impl<'de> Deserialize<'de> for CpuModel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "CpuModel", deny_unknown_fields)]
        struct Wire {
            #[serde(deserialize_with = "name")]
            name: String,
            cpuid: CpuidState,
            xsave_size: u32,
            #[serde(deserialize_with = "msrs")]
            msrs: Vec<u32>,
            tsc_khz: Option<u32>,
            tsc_scaling: bool,
        }
        fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
            crate::state::bounded_string(d, MAX_NAME, "CPU model name")
        }
        fn msrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
            crate::state::bounded_vec(d, MAX_MSRS, "MSR index list")
        }
        let w = Wire::deserialize(deserializer)?;
        let m = CpuModel {
            name: w.name,
            cpuid: w.cpuid.0,
            xsave_size: w.xsave_size,
            msrs: w.msrs,
            tsc_khz: w.tsc_khz,
            tsc_scaling: w.tsc_scaling,
        };
        m.validate().map_err(serde::de::Error::custom)?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_features::Reg;

    pub(crate) fn sample() -> CpuModel {
        let e = |function, index, flags, eax, ebx, ecx, edx| CpuidEntry {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
        };
        CpuModel::new(
            "sample",
            vec![
                e(0, 0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
                e(1, 0, 0, 0x806f0, 0, 0x1000_0000, 0x0200_0000),
                e(7, 0, 1, 0, (1 << 16) | (1 << 5), 0, 0),
                e(0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0),
            ],
            4096,
            vec![0x10, 0x6e0, 0x1b],
            Some(2_500_000),
            false,
        )
        .unwrap()
    }

    #[test]
    fn binary_and_serde_forms_round_trip() {
        let m = sample();
        assert_eq!(m.msrs, vec![0x10, 0x1b, 0x6e0]);
        assert_eq!(CpuModel::from_bytes(&m.to_bytes()), Ok(m.clone()));
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<CpuModel>(&json).unwrap(), m);
    }

    #[test]
    fn hostile_bytes_are_typed_errors() {
        let good = sample().to_bytes();
        for cut in [0, 3, 9, 20, good.len() - 1] {
            assert!(matches!(
                CpuModel::from_bytes(&good[..cut]),
                Err(CpuModelError::Truncated { .. })
            ));
        }
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            CpuModel::from_bytes(&b),
            Err(CpuModelError::TrailingBytes(1))
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(CpuModel::from_bytes(&b), Err(CpuModelError::BadMagic));
        // A huge entry count is refused before allocating.
        let name_len = sample().name.len();
        let counts = HEADER + name_len + 12;
        let mut b = good.clone();
        b[counts..counts + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            CpuModel::from_bytes(&b),
            Err(CpuModelError::Invalid(_))
        ));
        // Unsorted MSRs.
        let mut m = sample();
        m.msrs = vec![2, 1];
        assert!(CpuModel::from_bytes(&m.to_bytes()).is_err());
        let json = serde_json::to_string(&m).unwrap();
        assert!(serde_json::from_str::<CpuModel>(&json).is_err());
    }

    #[test]
    fn features_are_listed_by_name_and_can_be_removed() {
        let m = sample();
        let names: Vec<_> = m.features().iter().filter_map(|f| f.name).collect();
        assert_eq!(names, ["avx", "sse", "avx2", "avx512f"]);
        let small = m.without("no-avx512", &["avx512f"]).unwrap();
        assert_eq!(small.name, "no-avx512");
        assert_eq!(
            small.reg(RegId {
                leaf: 7,
                subleaf: 0,
                reg: Reg::Ebx
            }),
            1 << 5
        );
        assert_eq!(
            m.without("x", &["avx9000"]),
            Err(CpuModelError::UnknownFeature("avx9000".into()))
        );
    }
}
