//! [`VcpuState`] (plain data) and [`KvmVcpu`] (the live vCPU that saves and restores it).

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, CpuId, Xsave,
};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer};
use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable, Versioned};
use zerocopy::{FromZeros, IntoBytes};

use crate::backend::{VcpuBackend, VmBackend};
use crate::error::{KvmStateError, Step};
use crate::layout::DeviceLayout;
use crate::msr;
use crate::order::{Ordered, VcpuStep, VCPU_RESTORE_ORDER, VCPU_SAVE_ORDER};
use crate::state::{
    CpuidEntry, CpuidState, MsrEntry, MsrState, NestedState, Raw, TscKhz, XsaveState,
    MAX_CPUID_ENTRIES, XSAVE_LEGACY_BYTES,
};

/// The complete state of one x86_64 vCPU: plain data, no file descriptors.
///
/// Each field is one [`VcpuStep`] and one section of a vCPU snapshot, named
/// [`VcpuStep::name`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuState {
    /// TSC frequency in kHz (`None` if the host cannot report it).
    pub tsc_khz: Option<TscKhz>,
    /// CPUID table.
    pub cpuid: CpuidState,
    /// Multiprocessing state (runnable, halted, waiting for SIPI…).
    pub mp_state: Raw<kvm_mp_state>,
    /// General registers.
    pub regs: Raw<kvm_regs>,
    /// Segment and control registers, EFER, APIC_BASE.
    pub sregs: Raw<kvm_sregs>,
    /// FPU/SSE/AVX… state.
    pub xsave: XsaveState,
    /// Extended control registers (XCR0).
    pub xcrs: Raw<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: Raw<kvm_debugregs>,
    /// Local APIC registers (`None` in a VM without an in-kernel irqchip, whose
    /// vCPUs have no in-kernel LAPIC).
    pub lapic: Option<Raw<kvm_lapic_state>>,
    /// MSRs, in the order they were read.
    pub msrs: MsrState,
    /// Nested virtualization state (`None` on hosts without `KVM_CAP_NESTED_STATE`).
    pub nested: Option<NestedState>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow, SMM.
    pub vcpu_events: Raw<kvm_vcpu_events>,
}

impl VcpuState {
    /// Adds every piece as its own section to `snapshot`.
    pub fn add_to(&self, snapshot: &mut Snapshot) {
        if let Some(khz) = self.tsc_khz {
            snapshot.add_state(VcpuStep::TscKhz.name(), khz);
        }
        snapshot.add_state(VcpuStep::Cpuid.name(), self.cpuid.clone());
        snapshot.add_state(VcpuStep::MpState.name(), self.mp_state);
        snapshot.add_state(VcpuStep::Regs.name(), self.regs);
        snapshot.add_state(VcpuStep::Sregs.name(), self.sregs);
        snapshot.add_state(VcpuStep::Xsave.name(), self.xsave.clone());
        snapshot.add_state(VcpuStep::Xcrs.name(), self.xcrs);
        snapshot.add_state(VcpuStep::DebugRegs.name(), self.debugregs);
        if let Some(lapic) = self.lapic {
            snapshot.add_state(VcpuStep::Lapic.name(), lapic);
        }
        snapshot.add_state(VcpuStep::Msrs.name(), self.msrs.clone());
        if let Some(n) = &self.nested {
            snapshot.add_state(VcpuStep::NestedState.name(), n.clone());
        }
        snapshot.add_state(VcpuStep::VcpuEvents.name(), self.vcpu_events);
    }

    /// Reads every piece from the sections of `snapshot` (`tsc_khz`, `lapic` and
    /// `nested_state` may be absent).
    pub fn from_snapshot(snapshot: &Snapshot) -> Result<Self, MigratableError> {
        fn optional<T: Versioned>(
            s: &Snapshot,
            step: VcpuStep,
        ) -> Result<Option<T>, MigratableError> {
            if s.sections().any(|(id, _)| id == step.name()) {
                s.state(step.name()).map(Some)
            } else {
                Ok(None)
            }
        }
        Ok(Self {
            tsc_khz: optional(snapshot, VcpuStep::TscKhz)?,
            cpuid: snapshot.state(VcpuStep::Cpuid.name())?,
            mp_state: snapshot.state(VcpuStep::MpState.name())?,
            regs: snapshot.state(VcpuStep::Regs.name())?,
            sregs: snapshot.state(VcpuStep::Sregs.name())?,
            xsave: snapshot.state(VcpuStep::Xsave.name())?,
            xcrs: snapshot.state(VcpuStep::Xcrs.name())?,
            debugregs: snapshot.state(VcpuStep::DebugRegs.name())?,
            lapic: optional(snapshot, VcpuStep::Lapic)?,
            msrs: snapshot.state(VcpuStep::Msrs.name())?,
            nested: optional(snapshot, VcpuStep::NestedState)?,
            vcpu_events: snapshot.state(VcpuStep::VcpuEvents.name())?,
        })
    }

    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs
            .0
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.data)
    }
}

/// What the host and the VM offer that vCPU save/restore depends on. Probe it once
/// per VM with [`HostCaps::probe`], or fill it in by hand for a test double.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCaps {
    /// `KVM_GET_MSR_INDEX_LIST`.
    pub msr_index_list: Vec<u32>,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`: bytes of the xsave area, or 0 when the
    /// host only has `KVM_GET_XSAVE` (4096 bytes).
    pub xsave2_size: usize,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE)`: maximum nested state size, 0 if
    /// nested state is not supported.
    pub nested_state_size: usize,
    /// Whether `KVM_GET_TSC_KHZ` works (`KVM_CAP_GET_TSC_KHZ`).
    pub tsc_khz: bool,
    /// Whether the vCPUs have an in-kernel LAPIC: the VM has a full or split
    /// irqchip ([`DeviceLayout::lapic`]). Without one the LAPIC is not saved.
    pub lapic: bool,
}

impl HostCaps {
    /// Probes `kvm` (the MSR index list) and `vm` (capabilities), a VM whose
    /// in-kernel devices are `layout`.
    pub fn probe(
        kvm: &Kvm,
        vm: &impl VmBackend,
        layout: &DeviceLayout,
    ) -> Result<Self, KvmStateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(KvmStateError::get(Step::Setup("msr_index_list")))?;
        Ok(Self {
            msr_index_list: list.as_slice().to_vec(),
            xsave2_size: usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
            nested_state_size: usize::try_from(vm.check_extension_int(Cap::NestedState))
                .unwrap_or(0),
            tsc_khz: vm.check_extension_int(Cap::GetTscKhz) > 0,
            lapic: layout.lapic(),
        })
    }

    /// Size of the xsave buffer to hand KVM: at least 4096 bytes.
    pub fn xsave_size(&self) -> usize {
        self.xsave2_size.max(XSAVE_LEGACY_BYTES)
    }

    /// Whether nested state is saved (the host's `KVM_GET_NESTED_STATE` buffer fits in
    /// kvm-bindings' fixed-size [`KvmNestedStateBuffer`]).
    pub fn nested_state(&self) -> bool {
        self.nested_state_size > 0
            && self.nested_state_size <= std::mem::size_of::<KvmNestedStateBuffer>()
    }
}

/// A KVM vCPU whose state can be saved and restored: a [`Snapshottable`] with id
/// `vcpu<N>`.
///
/// `KvmVcpu` does not run the vCPU: whoever runs it pauses it first (see
/// [`crate::VcpuRunner`], which owns a `KvmVcpu` and implements the pause protocol).
/// Its own [`Pausable`] impl is a no-op, because a `KvmVcpu` that is not inside a
/// runner is not running.
#[derive(Debug)]
pub struct KvmVcpu<B: VcpuBackend> {
    index: u32,
    backend: B,
    caps: HostCaps,
    msr_list: OnceLock<Vec<u32>>,
}

impl<B: VcpuBackend> KvmVcpu<B> {
    /// A vCPU with index `index` (its id is `vcpu<index>`) over `backend`.
    pub fn new(index: u32, backend: B, caps: HostCaps) -> Self {
        Self {
            index,
            backend,
            caps,
            msr_list: OnceLock::new(),
        }
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The backend (e.g. the `VcpuFd`).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (e.g. to run the `VcpuFd`).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Unwraps the backend.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// The host capabilities this vCPU was created with.
    pub fn caps(&self) -> &HostCaps {
        &self.caps
    }

    /// The MSR indices a save reads: [`msr::save_list`] of the host's index list and
    /// this vCPU's CPUID (without [`msr::NEEDS_LAPIC`] on a vCPU without a LAPIC),
    /// computed on first use and kept until the next restore.
    pub fn msr_list(&self) -> Result<&[u32], KvmStateError> {
        self.msr_list_with(None)
    }

    /// [`msr_list`](Self::msr_list), computed from `cpuid` (just read from this
    /// vCPU) if it is not cached yet, instead of reading the CPUID again.
    fn msr_list_with(&self, cpuid: Option<&CpuidState>) -> Result<&[u32], KvmStateError> {
        if let Some(l) = self.msr_list.get() {
            return Ok(l);
        }
        let read;
        let cpuid = match cpuid {
            Some(c) => c,
            None => {
                read = self.get_cpuid()?;
                &read
            }
        };
        let mcg_cap = msr::get_msr(&self.backend, msr::MSR_IA32_MCG_CAP);
        let mtrr_cap = msr::get_msr(&self.backend, msr::MSR_MTRRCAP);
        let mut list = msr::save_list(&self.caps.msr_index_list, &cpuid.0, mcg_cap, mtrr_cap);
        if !self.caps.lapic {
            list.retain(|i| !msr::needs_lapic(*i));
        }
        Ok(self.msr_list.get_or_init(|| list))
    }

    fn get_cpuid(&self) -> Result<CpuidState, KvmStateError> {
        let cpuid = self
            .backend
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(KvmStateError::get(Step::Vcpu(VcpuStep::Cpuid)))?;
        Ok(CpuidState(
            cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
        ))
    }

    /// Reads the vCPU state in [`VCPU_SAVE_ORDER`]. The vCPU must be quiescent (not in
    /// `KVM_RUN`, pending I/O completed).
    pub fn save_state(&self) -> Result<VcpuState, KvmStateError> {
        let mut b = StateBuilder::default();
        for Ordered { step, .. } in VCPU_SAVE_ORDER {
            self.save_step(*step, &mut b)?;
        }
        b.finish()
    }

    fn save_step(&self, step: VcpuStep, b: &mut StateBuilder) -> Result<(), KvmStateError> {
        let be = &self.backend;
        let get = KvmStateError::get(Step::Vcpu(step));
        match step {
            VcpuStep::TscKhz => {
                b.tsc_khz = if self.caps.tsc_khz {
                    Some(TscKhz(be.get_tsc_khz().map_err(get)?))
                } else {
                    None
                }
            }
            VcpuStep::Cpuid => b.cpuid = Some(self.get_cpuid()?),
            VcpuStep::MpState => b.mp_state = Some(Raw::new(be.get_mp_state().map_err(get)?)),
            VcpuStep::Regs => b.regs = Some(Raw::new(be.get_regs().map_err(get)?)),
            VcpuStep::Sregs => b.sregs = Some(Raw::new(be.get_sregs().map_err(get)?)),
            VcpuStep::Xsave => b.xsave = Some(self.get_xsave()?),
            VcpuStep::Xcrs => b.xcrs = Some(Raw::new(be.get_xcrs().map_err(get)?)),
            VcpuStep::DebugRegs => b.debugregs = Some(Raw::new(be.get_debug_regs().map_err(get)?)),
            VcpuStep::Lapic => {
                b.lapic = if self.caps.lapic {
                    Some(Raw::new(be.get_lapic().map_err(get)?))
                } else {
                    None
                }
            }
            VcpuStep::Msrs => {
                // The CPUID step comes first in the save order: reuse what it read.
                let list = self.msr_list_with(b.cpuid.as_ref())?;
                b.msrs = Some(MsrState(msr::get_msrs(be, list)?))
            }
            VcpuStep::NestedState => b.nested = self.get_nested()?,
            VcpuStep::VcpuEvents => {
                b.vcpu_events = Some(Raw::new(be.get_vcpu_events().map_err(get)?))
            }
        }
        Ok(())
    }

    fn get_xsave(&self) -> Result<XsaveState, KvmStateError> {
        let get = KvmStateError::get(Step::Vcpu(VcpuStep::Xsave));
        let size = self.caps.xsave_size();
        let bytes = if size == XSAVE_LEGACY_BYTES {
            self.backend.get_xsave().map_err(get)?.as_bytes().to_vec()
        } else {
            // `size` comes from a public field callers may fill by hand: never hand
            // the kernel less than it may write.
            let mut xsave = xsave_buffer(size.max(kernel_xsave_bound()))?;
            // SAFETY: the buffer holds at least `kernel_xsave_bound()` bytes, which is
            // at least what KVM_GET_XSAVE2 writes (see `kernel_xsave_bound`).
            unsafe { self.backend.get_xsave2(&mut xsave) }.map_err(get)?;
            let mut bytes = xsave_bytes(&xsave);
            bytes.truncate(size);
            bytes
        };
        XsaveState::from_bytes(bytes).ok_or_else(|| invalid(VcpuStep::Xsave, "bad xsave size"))
    }

    fn get_nested(&self) -> Result<Option<NestedState>, KvmStateError> {
        if !self.caps.nested_state() {
            return Ok(None);
        }
        let mut buf = KvmNestedStateBuffer::empty();
        let size = self
            .backend
            .get_nested_state(&mut buf)
            .map_err(KvmStateError::get(Step::Vcpu(VcpuStep::NestedState)))?;
        let Some(size) = size else { return Ok(None) };
        let bytes = buf.as_bytes();
        let bytes = bytes.get(..size.get()).ok_or_else(|| {
            invalid(
                VcpuStep::NestedState,
                "KVM reported a size beyond the buffer",
            )
        })?;
        Ok(NestedState::from_bytes(bytes.to_vec()))
    }

    /// Writes `state` in [`VCPU_RESTORE_ORDER`].
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), KvmStateError> {
        self.restore_state_in_order(state, VCPU_RESTORE_ORDER.iter().map(|o| o.step))
    }

    /// Writes `state` in the given order. Only for tests that show why the order
    /// matters (e.g. MSRs before lapic kills a TSC-deadline timer); use
    /// [`restore_state`](Self::restore_state).
    #[doc(hidden)]
    pub fn restore_state_in_order(
        &self,
        state: &VcpuState,
        order: impl IntoIterator<Item = VcpuStep>,
    ) -> Result<(), KvmStateError> {
        for step in order {
            self.restore_step(step, state)?;
        }
        Ok(())
    }

    /// Forgets the cached MSR list, so the next save recomputes it from the CPUID.
    pub fn reset_msr_list(&mut self) {
        self.msr_list = OnceLock::new();
    }

    fn restore_step(&self, step: VcpuStep, s: &VcpuState) -> Result<(), KvmStateError> {
        let be = &self.backend;
        let set = KvmStateError::set(Step::Vcpu(step));
        match step {
            VcpuStep::TscKhz => {
                if let Some(TscKhz(khz)) = s.tsc_khz {
                    // Hosts without TSC scaling refuse any set, even of the current
                    // rate: only set a rate that differs.
                    let current = be.get_tsc_khz().ok();
                    if current != Some(khz) {
                        be.set_tsc_khz(khz).map_err(set)?;
                    }
                }
            }
            VcpuStep::Cpuid => {
                let entries: Vec<kvm_cpuid_entry2> =
                    s.cpuid.0.iter().map(kvm_cpuid_entry2::from).collect();
                let cpuid = CpuId::from_entries(&entries).map_err(|e| {
                    invalid(
                        VcpuStep::Cpuid,
                        &format!("{} entries: {e:?}", entries.len()),
                    )
                })?;
                be.set_cpuid2(&cpuid).map_err(set)?;
            }
            VcpuStep::MpState => be.set_mp_state(*s.mp_state.get()).map_err(set)?,
            VcpuStep::Regs => be.set_regs(s.regs.get()).map_err(set)?,
            VcpuStep::Sregs => be.set_sregs(s.sregs.get()).map_err(set)?,
            VcpuStep::Xsave => {
                let size = self.caps.xsave_size();
                let bytes = s.xsave.as_bytes();
                if bytes.len() > size {
                    return Err(invalid(
                        VcpuStep::Xsave,
                        &format!("saved area is {} bytes, this host's is {size}", bytes.len()),
                    ));
                }
                let mut xsave = xsave_buffer(size.max(kernel_xsave_bound()))?;
                fill_xsave(&mut xsave, bytes);
                // SAFETY: the buffer holds at least `kernel_xsave_bound()` bytes, at
                // least what KVM_SET_XSAVE reads (see `kernel_xsave_bound`), whatever
                // `self.caps` says.
                unsafe { be.set_xsave2(&xsave) }.map_err(set)?;
            }
            VcpuStep::Xcrs => be.set_xcrs(s.xcrs.get()).map_err(set)?,
            VcpuStep::DebugRegs => be.set_debug_regs(s.debugregs.get()).map_err(set)?,
            VcpuStep::Lapic => match (&s.lapic, self.caps.lapic) {
                (Some(lapic), true) => be.set_lapic(lapic.get()).map_err(set)?,
                (None, false) => {}
                (Some(_), false) => {
                    return Err(invalid(
                        VcpuStep::Lapic,
                        "the snapshot has a LAPIC; this vCPU has none (no in-kernel irqchip)",
                    ))
                }
                (None, true) => {
                    return Err(invalid(
                        VcpuStep::Lapic,
                        "the snapshot has no LAPIC (no in-kernel irqchip); this vCPU has one",
                    ))
                }
            },
            VcpuStep::Msrs => msr::set_msrs(be, &s.msrs.0)?,
            VcpuStep::NestedState => {
                if let Some(n) = &s.nested {
                    if !self.caps.nested_state() {
                        return Err(invalid(
                            VcpuStep::NestedState,
                            "the snapshot has nested state; this host cannot restore it",
                        ));
                    }
                    let mut buf = KvmNestedStateBuffer::new_zeroed();
                    let dst = buf.as_mut_bytes();
                    let src = n.as_bytes();
                    let dst = dst.get_mut(..src.len()).ok_or_else(|| {
                        invalid(
                            VcpuStep::NestedState,
                            "larger than KVM's nested state buffer",
                        )
                    })?;
                    dst.copy_from_slice(src);
                    be.set_nested_state(&buf).map_err(set)?;
                }
            }
            VcpuStep::VcpuEvents => be.set_vcpu_events(s.vcpu_events.get()).map_err(set)?,
        }
        Ok(())
    }
}

fn invalid(step: VcpuStep, reason: &str) -> KvmStateError {
    KvmStateError::Invalid {
        step: Step::Vcpu(step),
        reason: reason.to_owned(),
    }
}

/// The most bytes KVM_GET_XSAVE2 writes or KVM_SET_XSAVE reads on this machine,
/// independent of [`HostCaps`] (whose fields callers can fill by hand): the larger
/// of 4096 (`struct kvm_xsave`) and CPUID.(EAX=0DH,ECX=0):ECX, the size of the
/// standard-format XSAVE area for every feature the processor supports in XCR0.
/// The kernel copies the vCPU's user-ABI xstate size, which covers only user
/// features the kernel enabled (a subset of those), laid out at the offsets CPUID
/// gives, so it is never larger; KVM_CAP_XSAVE2 is the same size, clamped to at
/// least 4096.
fn kernel_xsave_bound() -> usize {
    // `__cpuid_count` is a safe fn from Rust 1.89 on, unsafe before (rust-version
    // is 1.85).
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU and only writes registers; leaf 0xD
    // exists on every CPU with XSAVE, which KVM_GET_XSAVE2 needs (without it the
    // answer is 0 and the bound is 4096, all the kernel then copies).
    let ecx = unsafe { std::arch::x86_64::__cpuid_count(0xd, 0) }.ecx;
    usize::try_from(ecx)
        .unwrap_or(usize::MAX)
        .max(XSAVE_LEGACY_BYTES)
}

/// A `kvm_xsave2` buffer of at least `size` bytes.
fn xsave_buffer(size: usize) -> Result<Xsave, KvmStateError> {
    let extra = size.saturating_sub(XSAVE_LEGACY_BYTES).div_ceil(4);
    Xsave::new(extra).map_err(|e| invalid(VcpuStep::Xsave, &format!("{size} bytes: {e:?}")))
}

fn xsave_bytes(xsave: &Xsave) -> Vec<u8> {
    let mut out = xsave.as_fam_struct_ref().xsave.region.as_bytes().to_vec();
    out.extend_from_slice(xsave.as_slice().as_bytes());
    out
}

fn fill_xsave(xsave: &mut Xsave, bytes: &[u8]) {
    // SAFETY: only the fixed `region` is touched through the FAM struct; `len` is unchanged.
    let region = unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .as_mut_bytes();
    let (head, tail) = bytes.split_at(bytes.len().min(region.len()));
    region[..head.len()].copy_from_slice(head);
    let extra = xsave.as_mut_slice().as_mut_bytes();
    let n = tail.len().min(extra.len());
    extra[..n].copy_from_slice(&tail[..n]);
}

#[derive(Default)]
struct StateBuilder {
    tsc_khz: Option<TscKhz>,
    cpuid: Option<CpuidState>,
    mp_state: Option<Raw<kvm_mp_state>>,
    regs: Option<Raw<kvm_regs>>,
    sregs: Option<Raw<kvm_sregs>>,
    xsave: Option<XsaveState>,
    xcrs: Option<Raw<kvm_xcrs>>,
    debugregs: Option<Raw<kvm_debugregs>>,
    lapic: Option<Raw<kvm_lapic_state>>,
    msrs: Option<MsrState>,
    nested: Option<NestedState>,
    vcpu_events: Option<Raw<kvm_vcpu_events>>,
}

impl StateBuilder {
    fn finish(self) -> Result<VcpuState, KvmStateError> {
        fn need<T>(v: Option<T>, step: VcpuStep) -> Result<T, KvmStateError> {
            v.ok_or_else(|| invalid(step, "not read: missing from VCPU_SAVE_ORDER"))
        }
        Ok(VcpuState {
            tsc_khz: self.tsc_khz,
            cpuid: need(self.cpuid, VcpuStep::Cpuid)?,
            mp_state: need(self.mp_state, VcpuStep::MpState)?,
            regs: need(self.regs, VcpuStep::Regs)?,
            sregs: need(self.sregs, VcpuStep::Sregs)?,
            xsave: need(self.xsave, VcpuStep::Xsave)?,
            xcrs: need(self.xcrs, VcpuStep::Xcrs)?,
            debugregs: need(self.debugregs, VcpuStep::DebugRegs)?,
            lapic: self.lapic,
            msrs: need(self.msrs, VcpuStep::Msrs)?,
            nested: self.nested,
            vcpu_events: need(self.vcpu_events, VcpuStep::VcpuEvents)?,
        })
    }
}

impl<B: VcpuBackend> Pausable for KvmVcpu<B> {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

impl<B: VcpuBackend> Snapshottable for KvmVcpu<B> {
    fn id(&self) -> String {
        format!("vcpu{}", self.index)
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let id = self.id();
        let state = self.save_state().map_err(|e| e.into_snapshot_error(&id))?;
        let mut s = Snapshot::new(id);
        state.add_to(&mut s);
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let id = self.id();
        snapshot.expect_id(&id)?;
        let state = VcpuState::from_snapshot(snapshot)?;
        self.restore_state(&state)
            .map_err(|e| e.into_restore_error(&id))?;
        self.reset_msr_list();
        Ok(())
    }
}

impl KvmVcpu<kvm_ioctls::VcpuFd> {
    /// Wraps `fd` (vCPU `index` of `vm`, whose devices are `layout`), probing the
    /// host's capabilities.
    pub fn from_fd(
        kvm: &Kvm,
        vm: &kvm_ioctls::VmFd,
        layout: &DeviceLayout,
        index: u32,
        fd: kvm_ioctls::VcpuFd,
    ) -> Result<Self, KvmStateError> {
        Ok(Self::new(index, fd, HostCaps::probe(kvm, vm, layout)?))
    }
}

/// Saves the state of a vCPU the caller keeps (`&VcpuFd`, or any [`VcpuBackend`]),
/// as [`KvmVcpu::save_state`] does: in [`VCPU_SAVE_ORDER`], from a quiescent vCPU
/// (not in `KVM_RUN`, pending I/O completed: [`crate::complete_pending_io`]).
///
/// The MSR list is computed from the vCPU's CPUID on every call; a [`KvmVcpu`]
/// keeps it between saves.
pub fn save_vcpu_state<B: VcpuBackend + ?Sized>(
    vcpu: &B,
    caps: &HostCaps,
) -> Result<VcpuState, KvmStateError> {
    KvmVcpu::new(0, vcpu, caps.clone()).save_state()
}

/// Restores `state` into a vCPU the caller keeps, in [`VCPU_RESTORE_ORDER`], as
/// [`KvmVcpu::restore_state`] does. Restore the VM's device state first
/// ([`crate::restore_vm_state`]).
pub fn restore_vcpu_state<B: VcpuBackend + ?Sized>(
    vcpu: &B,
    caps: &HostCaps,
    state: &VcpuState,
) -> Result<(), KvmStateError> {
    KvmVcpu::new(0, vcpu, caps.clone()).restore_state(state)
}

/// An MSR list from `(index, value)` pairs.
impl FromIterator<(u32, u64)> for MsrState {
    fn from_iter<I: IntoIterator<Item = (u32, u64)>>(iter: I) -> Self {
        MsrState(
            iter.into_iter()
                .map(|(index, data)| MsrEntry { index, data })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_xsave_bound_covers_kvm_cap_xsave2() {
        migration_testkit::require_kvm!();
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let caps = HostCaps::probe(&kvm, &vm, &DeviceLayout::FULL).expect("probe");
        assert!(
            kernel_xsave_bound() >= caps.xsave_size(),
            "bound {} < KVM_CAP_XSAVE2 {}",
            kernel_xsave_bound(),
            caps.xsave_size()
        );
    }

    #[test]
    fn hand_made_xsave2_size_below_the_hosts_still_saves_and_restores() {
        migration_testkit::require_kvm!();
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mut caps = HostCaps::probe(&kvm, &vm, &DeviceLayout::FULL).expect("probe");
        // Just above 4096 (takes the KVM_GET_XSAVE2 path) and below the bound: the
        // buffer must still be what the kernel may write, not this.
        caps.xsave2_size = XSAVE_LEGACY_BYTES + 64;
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        fd.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        let vcpu = KvmVcpu::new(0, fd, caps);
        let state = vcpu.save_state().expect("save");
        assert_eq!(state.xsave.as_bytes().len(), XSAVE_LEGACY_BYTES + 64);
        vcpu.restore_state(&state).expect("restore");
    }
}
