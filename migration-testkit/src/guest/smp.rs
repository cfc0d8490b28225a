//! The host's view of [`Guest::Smp`](super::Guest::Smp) (source `guests/smp.S`,
//! guest ABI §9): what its markers and error codes mean, and where its per-vCPU
//! counters sit in guest memory, so a test can see that every vCPU runs, not only
//! that the guest as a whole makes progress.
//!
//! ```
//! use migration_testkit::guest::smp::{SmpCheck, SmpFailure, SmpMarker};
//!
//! let f = SmpFailure::from_code(0x5c01_000a).unwrap();
//! assert_eq!((f.vcpu, f.check), (1, SmpCheck::LapicTag));
//! assert_eq!(SmpMarker::from_value(0x534d_0302), Some(SmpMarker::WakeSipi(2)));
//! ```

use std::fmt;

use kvm_bindings::kvm_lapic_state;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::error::GuestError;

/// Most vCPUs the guest runs with (it fails with [`SmpCheck::BadCount`] above).
pub const SMP_MAX_VCPUS: u32 = 32;
/// The vector of the IPIs the vCPUs send around their ring.
pub const IPI_VECTOR: u8 = 0x40;
/// Where the guest copies its real-mode AP trampoline ([`SmpStart::InitSipi`]):
/// the SIPI vector is this address >> 12.
///
/// [`SmpStart::InitSipi`]: super::SmpStart::InitSipi
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// The shared counter every vCPU updates with `lock cmpxchg`: the low half counts,
/// the high half is the low half times a constant (mod 2^32).
pub const SHARED_COUNTER_ADDR: u64 = 0x24040;
/// The shared TSC stamp: the last TSC value a vCPU read; no vCPU may read a lower
/// one after it.
pub const TSC_STAMP_ADDR: u64 = 0x24080;
/// The per-vCPU counters of vCPU `i` start at `PERCPU_ADDR + i * PERCPU_STRIDE`
/// (the heartbeat first).
pub const PERCPU_ADDR: u64 = 0x25000;
/// Bytes between two vCPUs' counters.
pub const PERCPU_STRIDE: u64 = 128;
/// The guest's LAPIC tag: vCPU `i` sets its LVT Error register (masked) to vector
/// `LAPIC_TAG_BASE + i`.
pub const LAPIC_TAG_BASE: u32 = 0x60;

/// Error codes are `ERR_SMP | vcpu << 16 | check`.
const ERR_SMP: u32 = 0x5c00_0000;
/// Info markers are `MARKER_BASE | kind << 8 | vcpu`.
const MARKER_BASE: u32 = 0x534d_0000;

/// A point the guest announces on the info port, where a VMM can stop it
/// (`GuestLog::park_at`), each naming a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmpMarker {
    /// The vCPU entered ring 3 (its LAPIC is enabled: it takes IPIs from now on).
    Started(u32),
    /// The BSP is about to send INIT to this vCPU (it waits for INIT,
    /// `KVM_MP_STATE_UNINITIALIZED`).
    WakeInit(u32),
    /// The BSP sent INIT to this vCPU and is about to send the SIPIs: the vCPU sits in
    /// wait-for-SIPI (`KVM_MP_STATE_INIT_RECEIVED` once KVM has processed the INIT).
    WakeSipi(u32),
    /// The vCPU is in its NMI handler, NMIs blocked until its IRETQ, and is about to
    /// send itself a second NMI: that one must wait (a restore that unblocks NMIs,
    /// e.g. by dropping the vCPU's `vcpu_events`, fails with [`SmpCheck::NmiNested`]).
    NmiBlocked(u32),
    /// The second NMI was sent (after a VM exit, so KVM would have injected it had
    /// NMIs not been blocked).
    NmiSent(u32),
}

impl SmpMarker {
    /// The value the guest writes on the info port.
    pub fn value(self) -> u32 {
        let (kind, vcpu) = match self {
            SmpMarker::Started(v) => (1, v),
            SmpMarker::WakeInit(v) => (2, v),
            SmpMarker::WakeSipi(v) => (3, v),
            SmpMarker::NmiBlocked(v) => (4, v),
            SmpMarker::NmiSent(v) => (5, v),
        };
        MARKER_BASE | (kind << 8) | (vcpu & 0xff)
    }

    /// Decodes an info value (`None`: not a marker).
    pub fn from_value(value: u32) -> Option<Self> {
        if value & 0xffff_0000 != MARKER_BASE {
            return None;
        }
        let vcpu = value & 0xff;
        Some(match (value >> 8) & 0xff {
            1 => SmpMarker::Started(vcpu),
            2 => SmpMarker::WakeInit(vcpu),
            3 => SmpMarker::WakeSipi(vcpu),
            4 => SmpMarker::NmiBlocked(vcpu),
            5 => SmpMarker::NmiSent(vcpu),
            _ => return None,
        })
    }
}

/// Which self-check of the SMP guest failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmpCheck {
    /// The vCPU's heartbeat or contribution count in memory differs from its
    /// register mirror (memory and registers from different moments).
    Mirror,
    /// The ring-3 index register is not the vCPU's x2APIC ID (registers of another
    /// vCPU); the register's value precedes the error on the info port.
    Identity,
    /// The TSC read below the shared stamp another vCPU wrote earlier.
    Tsc,
    /// The shared counter's halves disagree (high ≠ low × constant).
    Shared,
    /// The shared count lies outside the sum of the vCPUs' contributions.
    Sum,
    /// Another vCPU's heartbeat went back (its index precedes the error on the info
    /// port).
    HeartbeatBack,
    /// Another vCPU's receive count went back (its index precedes the error).
    ReceiveBack,
    /// An IPI arrived that the previous vCPU never sent.
    IpiDuplicate,
    /// The last IPI this vCPU sent never arrived, though the receiver ran long enough
    /// with interrupts enabled.
    IpiLost,
    /// The vCPU's LAPIC carries another vCPU's tag (whose index precedes the error).
    LapicTag,
    /// An NMI arrived inside the NMI handler: NMI blocking was lost.
    NmiNested,
    /// The vCPU count is 0 or above [`SMP_MAX_VCPUS`].
    BadCount,
    /// The index is at or above the count, or is not the vCPU's x2APIC ID.
    BadIndex,
}

impl SmpCheck {
    const ALL: [SmpCheck; 13] = [
        SmpCheck::Mirror,
        SmpCheck::Identity,
        SmpCheck::Tsc,
        SmpCheck::Shared,
        SmpCheck::Sum,
        SmpCheck::HeartbeatBack,
        SmpCheck::ReceiveBack,
        SmpCheck::IpiDuplicate,
        SmpCheck::IpiLost,
        SmpCheck::LapicTag,
        SmpCheck::NmiNested,
        SmpCheck::BadCount,
        SmpCheck::BadIndex,
    ];

    /// The check's number in the low byte of the error code.
    pub fn code(self) -> u32 {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0) as u32 + 1
    }

    fn from_code(code: u32) -> Option<Self> {
        let i = usize::try_from(code.checked_sub(1)?).ok()?;
        Self::ALL.get(i).copied()
    }

    fn describe(self) -> &'static str {
        match self {
            SmpCheck::Mirror => "its counters in memory differ from their register mirrors",
            SmpCheck::Identity => "its registers belong to another vCPU",
            SmpCheck::Tsc => "its TSC is below a stamp another vCPU wrote earlier",
            SmpCheck::Shared => "the shared counter's halves disagree",
            SmpCheck::Sum => "the shared counter is outside the sum of the contributions",
            SmpCheck::HeartbeatBack => "another vCPU's heartbeat went back",
            SmpCheck::ReceiveBack => "another vCPU's IPI count went back",
            SmpCheck::IpiDuplicate => "an IPI arrived that was never sent",
            SmpCheck::IpiLost => "the IPI it sent never arrived",
            SmpCheck::LapicTag => "its LAPIC is another vCPU's",
            SmpCheck::NmiNested => "an NMI arrived inside its NMI handler",
            SmpCheck::BadCount => "the vCPU count is 0 or above 32",
            SmpCheck::BadIndex => "its index is not below the count or not its x2APIC ID",
        }
    }
}

/// A failed self-check of the SMP guest: which vCPU, which check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SmpFailure {
    /// The vCPU that saw it.
    pub vcpu: u32,
    /// What it saw.
    pub check: SmpCheck,
}

impl SmpFailure {
    /// Decodes an error code (`None`: not one of the SMP guest's).
    pub fn from_code(code: u32) -> Option<Self> {
        if code & 0xff00_0000 != ERR_SMP {
            return None;
        }
        Some(Self {
            vcpu: (code >> 16) & 0xff,
            check: SmpCheck::from_code(code & 0xff)?,
        })
    }

    /// The error code the guest writes.
    pub fn code(self) -> u32 {
        ERR_SMP | ((self.vcpu & 0xff) << 16) | self.check.code()
    }
}

impl fmt::Display for SmpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "smp: vCPU {}: {}", self.vcpu, self.check.describe())
    }
}

/// One vCPU's counters, read from guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmpCounters {
    /// Ring-3 loop iterations.
    pub heartbeat: u64,
    /// Successful `lock cmpxchg` on the shared counter.
    pub contributions: u64,
    /// IPIs asked of the gate (counted before the ICR write).
    pub sending: u64,
    /// Rounds this vCPU saw (every vCPU advanced).
    pub rounds: u64,
    /// Ring-0 gate calls.
    pub gates: u64,
    /// IPIs received.
    pub received: u64,
    /// IPIs sent (counted after the ICR write).
    pub sent: u64,
    /// NMIs taken.
    pub nmis: u64,
    /// Whether the vCPU reached ring 3.
    pub started: bool,
}

impl SmpCounters {
    /// The counters of vCPUs `0..vcpus`, read from `mem` (not atomically: read a
    /// paused guest, or compare only counters that never go back).
    pub fn read<M: GuestMemoryBackend>(mem: &M, vcpus: u32) -> Result<Vec<Self>, GuestError> {
        (0..u64::from(vcpus.min(SMP_MAX_VCPUS)))
            .map(|i| {
                let base = PERCPU_ADDR + i * PERCPU_STRIDE;
                let q = |off: u64| mem.read_obj::<u64>(GuestAddress(base + off));
                Ok(SmpCounters {
                    heartbeat: q(0x00)?,
                    contributions: q(0x08)?,
                    sending: q(0x10)?,
                    rounds: q(0x18)?,
                    gates: q(0x20)?,
                    received: q(0x40)?,
                    sent: q(0x48)?,
                    nmis: q(0x60)?,
                    started: q(0x68)? != 0,
                })
            })
            .collect()
    }
}

/// Whether a saved LAPIC holds the ring's IPI in its IRR (requested, not yet
/// delivered: an IPI in flight).
pub fn ipi_pending(lapic: &kvm_lapic_state) -> bool {
    // IRR at 0x200: one 32-bit register per 16 bytes.
    let reg = 0x200 + usize::from(IPI_VECTOR / 32) * 0x10;
    let word = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[reg + i] as u8));
    word & (1 << (IPI_VECTOR % 32)) != 0
}

/// The LAPIC tag a saved LAPIC carries: the vCPU whose LAPIC it is, as the guest
/// marked it (`None`: not marked, e.g. before the vCPU started).
pub fn lapic_tag(lapic: &kvm_lapic_state) -> Option<u32> {
    // LVT Error at 0x370.
    let word = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[0x370 + i] as u8));
    (word & 0xff).checked_sub(LAPIC_TAG_BASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `.set NAME, VALUE` in the guest's source.
    fn asm_constant(name: &str) -> u64 {
        let src = include_str!("../../guests/smp.S");
        let prefix = format!(".set {name},");
        let line = src
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `.set {name}` in smp.S"));
        let value = line[prefix.len()..].split('#').next().unwrap_or("").trim();
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .unwrap_or_else(|e| panic!("`.set {name}, {value}`: {e}"))
    }

    #[test]
    fn constants_match_the_guest_source() {
        assert_eq!(asm_constant("MAX_VCPUS"), u64::from(SMP_MAX_VCPUS));
        assert_eq!(asm_constant("IPI_VECTOR"), u64::from(IPI_VECTOR));
        assert_eq!(asm_constant("TRAMPOLINE"), TRAMPOLINE_ADDR);
        assert_eq!(asm_constant("PERCPU"), PERCPU_ADDR);
        let vars = asm_constant("SMP_VARS");
        assert_eq!(vars + 0x40, SHARED_COUNTER_ADDR);
        assert_eq!(vars + 0x80, TSC_STAMP_ADDR);
        let src = include_str!("../../guests/smp.S");
        assert!(src.contains(".set V_SHARED,  SMP_VARS + 0x40"));
        assert!(src.contains(".set V_STAMP,   SMP_VARS + 0x80"));
        assert_eq!(1 << asm_constant("PERCPU_SHIFT"), PERCPU_STRIDE);
        assert_eq!(asm_constant("LAPIC_TAG_BASE"), u64::from(LAPIC_TAG_BASE));
        assert_eq!(asm_constant("ERR_SMP"), u64::from(ERR_SMP));
        for (name, off) in [
            ("P_HB", 0x00),
            ("P_CONTRIB", 0x08),
            ("P_SENDING", 0x10),
            ("P_ROUNDS", 0x18),
            ("P_GATES", 0x20),
            ("P_RECV", 0x40),
            ("P_SENT", 0x48),
            ("P_NMIS", 0x60),
            ("P_STARTED", 0x68),
        ] {
            assert_eq!(asm_constant(name), off, "{name}");
        }
        for check in SmpCheck::ALL {
            let name = match check {
                SmpCheck::Mirror => "K_MIRROR",
                SmpCheck::Identity => "K_IDENTITY",
                SmpCheck::Tsc => "K_TSC",
                SmpCheck::Shared => "K_SHARED",
                SmpCheck::Sum => "K_SUM",
                SmpCheck::HeartbeatBack => "K_HB_BACK",
                SmpCheck::ReceiveBack => "K_RECV_BACK",
                SmpCheck::IpiDuplicate => "K_IPI_DUP",
                SmpCheck::IpiLost => "K_IPI_LOST",
                SmpCheck::LapicTag => "K_LAPIC_TAG",
                SmpCheck::NmiNested => "K_NMI_NESTED",
                SmpCheck::BadCount => "K_BAD_COUNT",
                SmpCheck::BadIndex => "K_BAD_INDEX",
            };
            assert_eq!(asm_constant(name), u64::from(check.code()), "{name}");
        }
        for (name, marker) in [
            ("INFO_STARTED", SmpMarker::Started(0)),
            ("INFO_WAKE_INIT", SmpMarker::WakeInit(0)),
            ("INFO_WAKE_SIPI", SmpMarker::WakeSipi(0)),
            ("INFO_NMI_BLOCKED", SmpMarker::NmiBlocked(0)),
            ("INFO_NMI_SENT", SmpMarker::NmiSent(0)),
        ] {
            assert_eq!(asm_constant(name), u64::from(marker.value()), "{name}");
        }
    }

    #[test]
    fn codes_and_markers_round_trip() {
        for check in SmpCheck::ALL {
            let f = SmpFailure { vcpu: 7, check };
            assert_eq!(SmpFailure::from_code(f.code()), Some(f));
            assert!(f.to_string().contains("vCPU 7"), "{f}");
        }
        assert_eq!(SmpFailure::from_code(0x5c00_0000), None);
        assert_eq!(SmpFailure::from_code(0x5c00_00ff), None);
        assert_eq!(SmpFailure::from_code(0xB000_0001), None);
        for m in [
            SmpMarker::Started(3),
            SmpMarker::WakeInit(1),
            SmpMarker::WakeSipi(31),
            SmpMarker::NmiBlocked(0),
            SmpMarker::NmiSent(2),
        ] {
            assert_eq!(SmpMarker::from_value(m.value()), Some(m));
        }
        assert_eq!(SmpMarker::from_value(0x534d_0900), None);
        assert_eq!(SmpMarker::from_value(3_000_000), None);
    }

    #[test]
    fn reads_the_lapic_fields() {
        let mut lapic = kvm_lapic_state::default();
        assert!(!ipi_pending(&lapic));
        assert_eq!(lapic_tag(&lapic), None);
        lapic.regs[0x220] = 1; // vector 0x40 = bit 0 of IRR word 2
        lapic.regs[0x370] = 0x62;
        lapic.regs[0x372] = 1; // masked
        assert!(ipi_pending(&lapic));
        assert_eq!(lapic_tag(&lapic), Some(2));
    }
}
