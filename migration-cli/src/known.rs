//! The section types `vmsnap` knows: the migration-kvm vCPU and VM state types.
//!
//! A section is recognised by where it sits in the tree: sections of a node named
//! `vcpu<N>` whose id is a [`VcpuStep`] name, and sections whose id is a [`VmStep`]
//! name elsewhere. Known sections are decoded with their real type, so `inspect` can
//! print named fields and `convert` can re-encode them with another codec.

use std::any::Any;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_ioapic_state, kvm_lapic_state, kvm_mp_state, kvm_pic_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use migration_core::{Codec, Section, Versioned};
use migration_kvm::kvm_vm::ConfigSection;
use migration_kvm::state::{CpuidState, MsrState, NestedState, TscKhz, XsaveState};
use migration_kvm::{KvmVmConfig, Raw, VcpuStep, VmStep};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Every vCPU step, in save order of the section ids.
const VCPU_STEPS: [VcpuStep; 12] = [
    VcpuStep::TscKhz,
    VcpuStep::Cpuid,
    VcpuStep::MpState,
    VcpuStep::Regs,
    VcpuStep::Sregs,
    VcpuStep::Xsave,
    VcpuStep::Xcrs,
    VcpuStep::DebugRegs,
    VcpuStep::Lapic,
    VcpuStep::Msrs,
    VcpuStep::NestedState,
    VcpuStep::VcpuEvents,
];

const VM_STEPS: [VmStep; 5] = [
    VmStep::Pit2,
    VmStep::Clock,
    VmStep::PicMaster,
    VmStep::PicSlave,
    VmStep::Ioapic,
];

/// A section type `vmsnap` can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The `KvmVm` configuration (`vm:config`).
    VmConfig,
    /// One piece of a vCPU's state.
    Vcpu(VcpuStep),
    /// One piece of the VM's in-kernel device state.
    Vm(VmStep),
}

impl Kind {
    /// The Rust type a section of this kind decodes into.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::VmConfig => "KvmVmConfig",
            Kind::Vcpu(VcpuStep::TscKhz) => "TscKhz",
            Kind::Vcpu(VcpuStep::Cpuid) => "CpuidState",
            Kind::Vcpu(VcpuStep::MpState) => "Raw<kvm_mp_state>",
            Kind::Vcpu(VcpuStep::Regs) => "Raw<kvm_regs>",
            Kind::Vcpu(VcpuStep::Sregs) => "Raw<kvm_sregs>",
            Kind::Vcpu(VcpuStep::Xsave) => "XsaveState",
            Kind::Vcpu(VcpuStep::Xcrs) => "Raw<kvm_xcrs>",
            Kind::Vcpu(VcpuStep::DebugRegs) => "Raw<kvm_debugregs>",
            Kind::Vcpu(VcpuStep::Lapic) => "Raw<kvm_lapic_state>",
            Kind::Vcpu(VcpuStep::Msrs) => "MsrState",
            Kind::Vcpu(VcpuStep::NestedState) => "NestedState",
            Kind::Vcpu(VcpuStep::VcpuEvents) => "Raw<kvm_vcpu_events>",
            Kind::Vm(VmStep::Pit2) => "Raw<kvm_pit_state2>",
            Kind::Vm(VmStep::Clock) => "Raw<kvm_clock_data>",
            Kind::Vm(VmStep::PicMaster | VmStep::PicSlave) => "Raw<kvm_pic_state>",
            Kind::Vm(VmStep::Ioapic) => "Raw<kvm_ioapic_state>",
        }
    }
}

/// Whether a node id names a vCPU (`vcpu<N>`).
fn is_vcpu_node(node: &str) -> bool {
    node.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The kind of section `section` of node `node` (the node's own id, not its path).
pub fn kind_of(node: &str, section: &str) -> Option<Kind> {
    if node == migration_kvm::kvm_vm::VM_ID && section == migration_kvm::kvm_vm::CONFIG_SECTION {
        Some(Kind::VmConfig)
    } else if is_vcpu_node(node) {
        VCPU_STEPS
            .iter()
            .find(|s| s.name() == section)
            .map(|s| Kind::Vcpu(*s))
    } else {
        VM_STEPS
            .iter()
            .find(|s| s.name() == section)
            .map(|s| Kind::Vm(*s))
    }
}

/// A decoded field's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A number (printed in hex).
    Hex(u64),
    /// A number (printed in decimal).
    Dec(u64),
    /// Text.
    Text(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Hex(v) => write!(f, "{v:#x}"),
            Value::Dec(v) => write!(f, "{v}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// Named fields of a decoded section, in display order.
pub type Fields = Vec<(String, Value)>;

fn hex(name: &str, v: u64) -> (String, Value) {
    (name.to_owned(), Value::Hex(v))
}

fn dec(name: &str, v: u64) -> (String, Value) {
    (name.to_owned(), Value::Dec(v))
}

fn text(name: &str, v: impl Into<String>) -> (String, Value) {
    (name.to_owned(), Value::Text(v.into()))
}

/// Names of well-known MSRs.
pub fn msr_name(index: u32) -> Option<&'static str> {
    Some(match index {
        0x10 => "IA32_TSC",
        0x11 => "KVM_WALL_CLOCK (old)",
        0x12 => "KVM_SYSTEM_TIME (old)",
        0x1b => "IA32_APIC_BASE",
        0x3a => "IA32_FEATURE_CONTROL",
        0x3b => "IA32_TSC_ADJUST",
        0x48 => "IA32_SPEC_CTRL",
        0x122 => "IA32_TSX_CTRL",
        0x174 => "IA32_SYSENTER_CS",
        0x175 => "IA32_SYSENTER_ESP",
        0x176 => "IA32_SYSENTER_EIP",
        0x17a => "IA32_MCG_STATUS",
        0x17b => "IA32_MCG_CTL",
        0x1a0 => "IA32_MISC_ENABLE",
        0x1d9 => "IA32_DEBUGCTL",
        0x277 => "IA32_PAT",
        0x2ff => "IA32_MTRR_DEF_TYPE",
        0x6e0 => "IA32_TSC_DEADLINE",
        0xda0 => "IA32_XSS",
        0x4b56_4d00 => "KVM_WALL_CLOCK_NEW",
        0x4b56_4d01 => "KVM_SYSTEM_TIME_NEW",
        0x4b56_4d02 => "KVM_ASYNC_PF_EN",
        0x4b56_4d03 => "KVM_STEAL_TIME",
        0x4b56_4d04 => "KVM_PV_EOI_EN",
        0x4b56_4d05 => "KVM_POLL_CONTROL",
        0x4b56_4d06 => "KVM_ASYNC_PF_INT",
        0x4b56_4d07 => "KVM_ASYNC_PF_ACK",
        0xc000_0080 => "EFER",
        0xc000_0081 => "STAR",
        0xc000_0082 => "LSTAR",
        0xc000_0083 => "CSTAR",
        0xc000_0084 => "SFMASK",
        0xc000_0100 => "FS_BASE",
        0xc000_0101 => "GS_BASE",
        0xc000_0102 => "KERNEL_GS_BASE",
        0xc000_0103 => "TSC_AUX",
        0xc001_0114 => "AMD_VM_CR",
        0xc001_0117 => "AMD_VM_HSAVE_PA",
        0xc001_011f => "AMD_VIRT_SPEC_CTRL",
        _ => return None,
    })
}

fn lapic_reg(l: &kvm_lapic_state, offset: usize) -> u64 {
    let b = |i: usize| l.regs.get(offset + i).map_or(0, |&c| c as u8);
    u64::from(u32::from_le_bytes([b(0), b(1), b(2), b(3)]))
}

/// Decodes `s` as `T` at the version the section records: older accepted versions are
/// upgraded, others refused (never read as if they were `T::VERSION`).
fn decode<T: Versioned + DeserializeOwned + Clone + Any>(s: &Section) -> Result<T, String> {
    s.read_versioned::<T>(s.version())
        .map_err(|e| e.to_string())
}

/// Decodes `section` as `kind` and returns its named fields.
pub fn fields(kind: Kind, section: &Section) -> Result<Fields, String> {
    Ok(match kind {
        Kind::VmConfig => {
            let c = config(section)?;
            let layout: Vec<String> = c
                .layout
                .iter()
                .map(|r| format!("[{:#x}, +{:#x})", r.gpa, r.length))
                .collect();
            vec![
                dec("vcpus", c.vcpus.into()),
                dec("memory_bytes", c.mem_size()),
                text("layout", layout.join(" ")),
                text("clock_restore", format!("{:?}", c.clock_restore)),
                text("memory_options", format!("{:?}", c.memory)),
                text(
                    "cpu_model",
                    c.cpu.map_or("none (config version 1)".to_owned(), |m| {
                        format!("{:?}", m.name)
                    }),
                ),
            ]
        }
        Kind::Vcpu(VcpuStep::TscKhz) => vec![dec("tsc_khz", decode::<TscKhz>(section)?.0.into())],
        Kind::Vcpu(VcpuStep::Cpuid) => {
            let c = decode::<CpuidState>(section)?;
            let mut f = vec![dec("entries", c.0.len() as u64)];
            if let Some(leaf0) = c.0.iter().find(|e| e.function == 0) {
                let mut v = Vec::new();
                for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
                    v.extend_from_slice(&r.to_le_bytes());
                }
                f.push(text("vendor", String::from_utf8_lossy(&v).into_owned()));
                f.push(hex("max_leaf", leaf0.eax.into()));
            }
            f.extend(cpu_fields(c.0));
            f
        }
        Kind::Vcpu(VcpuStep::MpState) => {
            let m = decode::<Raw<kvm_mp_state>>(section)?.get().mp_state;
            let name = match m {
                0 => "RUNNABLE",
                1 => "UNINITIALIZED",
                2 => "INIT_RECEIVED",
                3 => "HALTED",
                4 => "SIPI_RECEIVED",
                _ => "other",
            };
            vec![text("mp_state", format!("{name} ({m})"))]
        }
        Kind::Vcpu(VcpuStep::Regs) => {
            let r = *decode::<Raw<kvm_regs>>(section)?.get();
            vec![
                hex("rip", r.rip),
                hex("rsp", r.rsp),
                hex("rflags", r.rflags),
                hex("rax", r.rax),
                hex("rbx", r.rbx),
                hex("rcx", r.rcx),
                hex("rdx", r.rdx),
                hex("rsi", r.rsi),
                hex("rdi", r.rdi),
                hex("rbp", r.rbp),
                hex("r8", r.r8),
                hex("r9", r.r9),
                hex("r10", r.r10),
                hex("r11", r.r11),
                hex("r12", r.r12),
                hex("r13", r.r13),
                hex("r14", r.r14),
                hex("r15", r.r15),
            ]
        }
        Kind::Vcpu(VcpuStep::Sregs) => {
            let s = *decode::<Raw<kvm_sregs>>(section)?.get();
            vec![
                hex("cr0", s.cr0),
                hex("cr2", s.cr2),
                hex("cr3", s.cr3),
                hex("cr4", s.cr4),
                hex("cr8", s.cr8),
                hex("efer", s.efer),
                hex("apic_base", s.apic_base),
                text(
                    "cs",
                    format!(
                        "selector {:#x} base {:#x} dpl {} l {}",
                        s.cs.selector, s.cs.base, s.cs.dpl, s.cs.l
                    ),
                ),
                text(
                    "ss",
                    format!("selector {:#x} dpl {}", s.ss.selector, s.ss.dpl),
                ),
                text(
                    "gdt",
                    format!("base {:#x} limit {:#x}", s.gdt.base, s.gdt.limit),
                ),
                text(
                    "idt",
                    format!("base {:#x} limit {:#x}", s.idt.base, s.idt.limit),
                ),
                text(
                    "tr",
                    format!("selector {:#x} base {:#x}", s.tr.selector, s.tr.base),
                ),
            ]
        }
        Kind::Vcpu(VcpuStep::Xsave) => {
            let x = decode::<XsaveState>(section)?;
            let b = x.as_bytes();
            let word = |o: usize, n: usize| {
                b.get(o..o + n).map_or(0, |s| {
                    let mut a = [0u8; 8];
                    a[..n].copy_from_slice(s);
                    u64::from_le_bytes(a)
                })
            };
            vec![
                dec("bytes", b.len() as u64),
                hex("fcw", word(0, 2)),
                hex("mxcsr", word(24, 4)),
                hex("xstate_bv", word(512, 8)),
            ]
        }
        Kind::Vcpu(VcpuStep::Xcrs) => {
            let x = *decode::<Raw<kvm_xcrs>>(section)?.get();
            let n = (x.nr_xcrs as usize).min(x.xcrs.len());
            x.xcrs[..n]
                .iter()
                .map(|c| hex(&format!("xcr{}", c.xcr), c.value))
                .collect()
        }
        Kind::Vcpu(VcpuStep::DebugRegs) => {
            let d = *decode::<Raw<kvm_debugregs>>(section)?.get();
            vec![
                hex("dr0", d.db[0]),
                hex("dr1", d.db[1]),
                hex("dr2", d.db[2]),
                hex("dr3", d.db[3]),
                hex("dr6", d.dr6),
                hex("dr7", d.dr7),
            ]
        }
        Kind::Vcpu(VcpuStep::Lapic) => {
            let l = *decode::<Raw<kvm_lapic_state>>(section)?.get();
            vec![
                hex("id", lapic_reg(&l, 0x20) >> 24),
                hex("version", lapic_reg(&l, 0x30)),
                hex("tpr", lapic_reg(&l, 0x80)),
                hex("svr", lapic_reg(&l, 0xf0)),
                hex("lvt_timer", lapic_reg(&l, 0x320)),
                hex("timer_initial_count", lapic_reg(&l, 0x380)),
                hex("timer_current_count", lapic_reg(&l, 0x390)),
                hex("timer_divide", lapic_reg(&l, 0x3e0)),
            ]
        }
        Kind::Vcpu(VcpuStep::Msrs) => {
            let m = decode::<MsrState>(section)?;
            let mut f = vec![dec("count", m.0.len() as u64)];
            for e in &m.0 {
                let name = match msr_name(e.index) {
                    Some(n) => format!("{n} ({:#x})", e.index),
                    None => format!("msr {:#x}", e.index),
                };
                f.push((name, Value::Hex(e.data)));
            }
            f
        }
        Kind::Vcpu(VcpuStep::NestedState) => {
            let n = decode::<NestedState>(section)?;
            vec![dec("bytes", n.as_bytes().len() as u64)]
        }
        Kind::Vcpu(VcpuStep::VcpuEvents) => {
            let e = *decode::<Raw<kvm_vcpu_events>>(section)?.get();
            vec![
                text(
                    "exception",
                    format!(
                        "injected {} pending {} nr {} error_code {:#x}",
                        e.exception.injected,
                        e.exception.pending,
                        e.exception.nr,
                        e.exception.error_code
                    ),
                ),
                text(
                    "interrupt",
                    format!(
                        "injected {} nr {} shadow {}",
                        e.interrupt.injected, e.interrupt.nr, e.interrupt.shadow
                    ),
                ),
                text(
                    "nmi",
                    format!(
                        "injected {} pending {} masked {}",
                        e.nmi.injected, e.nmi.pending, e.nmi.masked
                    ),
                ),
                hex("flags", e.flags.into()),
            ]
        }
        Kind::Vm(VmStep::Pit2) => {
            let p = *decode::<Raw<kvm_pit_state2>>(section)?.get();
            let mut f = vec![hex("flags", p.flags.into())];
            for (i, c) in p.channels.iter().enumerate() {
                f.push(text(
                    &format!("channel{i}"),
                    format!("count {:#x} mode {} gate {}", c.count, c.mode, c.gate),
                ));
            }
            f
        }
        Kind::Vm(VmStep::Clock) => {
            let c = *decode::<Raw<kvm_clock_data>>(section)?.get();
            vec![
                dec("clock_ns", c.clock),
                hex("flags", c.flags.into()),
                dec("realtime_ns", c.realtime),
                hex("host_tsc", c.host_tsc),
            ]
        }
        Kind::Vm(VmStep::PicMaster | VmStep::PicSlave) => {
            let p = *decode::<Raw<kvm_pic_state>>(section)?.get();
            vec![
                hex("irr", p.irr.into()),
                hex("imr", p.imr.into()),
                hex("isr", p.isr.into()),
                hex("irq_base", p.irq_base.into()),
            ]
        }
        Kind::Vm(VmStep::Ioapic) => {
            let raw = decode::<Raw<kvm_ioapic_state>>(section)?;
            let io = *raw.get();
            // The redirection table: 24 little-endian u64 entries at byte 24; bit 16
            // of an entry is its mask.
            let masked = raw
                .as_bytes()
                .get(24..24 + 24 * 8)
                .unwrap_or(&[])
                .chunks_exact(8)
                .filter(|e| e[2] & 1 == 1)
                .count();
            vec![
                hex("base_address", io.base_address),
                hex("id", io.id.into()),
                hex("irr", io.irr.into()),
                dec("masked_pins", masked as u64),
            ]
        }
    })
}

/// The CPU a CPUID table describes: family/model and its features by name
/// (raw-cpuid's names; unnamed bits by position).
fn cpu_fields(cpuid: Vec<migration_kvm::CpuidEntry>) -> Fields {
    match migration_kvm::CpuModel::new("cpuid", cpuid, 0, Vec::new(), None, false) {
        Ok(m) => vec![
            text("cpu", migration_kvm::cpu_check::signature(&m)),
            text("features", crate::cpu::feature_names(&m)),
        ],
        Err(e) => vec![text("features", format!("cannot decode: {e}"))],
    }
}

fn recode_as<T>(section: &Section, codec: &Arc<dyn Codec>) -> Result<Section, String>
where
    T: Versioned + Serialize + DeserializeOwned + Clone + Any + Send + Sync,
{
    let value = decode::<T>(section)?;
    let mut out = Section::from_state(T::VERSION, value);
    out.encode(codec).map_err(|e| e.to_string())?;
    Ok(out)
}

fn config(section: &Section) -> Result<KvmVmConfig, String> {
    let c = decode::<ConfigSection>(section)?;
    c.config().map_err(|e| e.to_string())
}

/// Decodes `section` with its real type and re-encodes it with `codec`.
pub fn recode(kind: Kind, section: &Section, codec: &Arc<dyn Codec>) -> Result<Section, String> {
    match kind {
        Kind::VmConfig => {
            config(section)?;
            recode_as::<ConfigSection>(section, codec)
        }
        Kind::Vcpu(VcpuStep::TscKhz) => recode_as::<TscKhz>(section, codec),
        Kind::Vcpu(VcpuStep::Cpuid) => recode_as::<CpuidState>(section, codec),
        Kind::Vcpu(VcpuStep::MpState) => recode_as::<Raw<kvm_mp_state>>(section, codec),
        Kind::Vcpu(VcpuStep::Regs) => recode_as::<Raw<kvm_regs>>(section, codec),
        Kind::Vcpu(VcpuStep::Sregs) => recode_as::<Raw<kvm_sregs>>(section, codec),
        Kind::Vcpu(VcpuStep::Xsave) => recode_as::<XsaveState>(section, codec),
        Kind::Vcpu(VcpuStep::Xcrs) => recode_as::<Raw<kvm_xcrs>>(section, codec),
        Kind::Vcpu(VcpuStep::DebugRegs) => recode_as::<Raw<kvm_debugregs>>(section, codec),
        Kind::Vcpu(VcpuStep::Lapic) => recode_as::<Raw<kvm_lapic_state>>(section, codec),
        Kind::Vcpu(VcpuStep::Msrs) => recode_as::<MsrState>(section, codec),
        Kind::Vcpu(VcpuStep::NestedState) => recode_as::<NestedState>(section, codec),
        Kind::Vcpu(VcpuStep::VcpuEvents) => recode_as::<Raw<kvm_vcpu_events>>(section, codec),
        Kind::Vm(VmStep::Pit2) => recode_as::<Raw<kvm_pit_state2>>(section, codec),
        Kind::Vm(VmStep::Clock) => recode_as::<Raw<kvm_clock_data>>(section, codec),
        Kind::Vm(VmStep::PicMaster | VmStep::PicSlave) => {
            recode_as::<Raw<kvm_pic_state>>(section, codec)
        }
        Kind::Vm(VmStep::Ioapic) => recode_as::<Raw<kvm_ioapic_state>>(section, codec),
    }
}
