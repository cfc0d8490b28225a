//! [`VcpuBackend`] and [`VmBackend`]: the get/set surface this crate uses.
//!
//! Each method is one KVM ioctl with kvm-ioctls' signature. The traits are implemented
//! for [`kvm_ioctls::VcpuFd`] and [`kvm_ioctls::VmFd`], and for a reference to any
//! implementation: a VMM that owns its fds lends them (`KvmVcpu::new(0, &fd, caps)`,
//! `save_vm_state(&vm_fd, …)`) and keeps them. A test double (such as
//! migration-testkit's `RecordingVcpu`) implements them to record the order of calls
//! or inject a failure, without /dev/kvm.

use std::num::NonZeroUsize;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
};
use kvm_ioctls::{Cap, KvmNestedStateBuffer, VcpuFd, VmFd};

/// The result of a KVM ioctl.
pub type Result<T> = std::result::Result<T, kvm_ioctls::Error>;

/// The per-vCPU ioctls that save and restore vCPU state.
pub trait VcpuBackend {
    /// `KVM_GET_REGS`.
    fn get_regs(&self) -> Result<kvm_regs>;
    /// `KVM_SET_REGS`.
    fn set_regs(&self, regs: &kvm_regs) -> Result<()>;
    /// `KVM_GET_SREGS`.
    fn get_sregs(&self) -> Result<kvm_sregs>;
    /// `KVM_SET_SREGS`.
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()>;
    /// `KVM_GET_XSAVE` (the legacy 4096-byte area).
    fn get_xsave(&self) -> Result<kvm_xsave>;
    /// `KVM_GET_XSAVE2`.
    ///
    /// # Safety
    /// `xsave` must hold at least `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` bytes: the
    /// kernel writes that many.
    unsafe fn get_xsave2(&self, xsave: &mut Xsave) -> Result<()>;
    /// `KVM_SET_XSAVE` with a `kvm_xsave2` buffer.
    ///
    /// # Safety
    /// `xsave` must hold at least `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` bytes (4096 if
    /// that is 0): the kernel reads that many.
    unsafe fn set_xsave2(&self, xsave: &Xsave) -> Result<()>;
    /// `KVM_GET_XCRS`.
    fn get_xcrs(&self) -> Result<kvm_xcrs>;
    /// `KVM_SET_XCRS`.
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<()>;
    /// `KVM_GET_DEBUGREGS`.
    fn get_debug_regs(&self) -> Result<kvm_debugregs>;
    /// `KVM_SET_DEBUGREGS`.
    fn set_debug_regs(&self, regs: &kvm_debugregs) -> Result<()>;
    /// `KVM_GET_LAPIC`.
    fn get_lapic(&self) -> Result<kvm_lapic_state>;
    /// `KVM_SET_LAPIC`.
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()>;
    /// `KVM_GET_MP_STATE`.
    fn get_mp_state(&self) -> Result<kvm_mp_state>;
    /// `KVM_SET_MP_STATE`.
    fn set_mp_state(&self, mp_state: kvm_mp_state) -> Result<()>;
    /// `KVM_GET_VCPU_EVENTS`.
    fn get_vcpu_events(&self) -> Result<kvm_vcpu_events>;
    /// `KVM_SET_VCPU_EVENTS`.
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<()>;
    /// `KVM_GET_MSRS`: returns how many MSRs were read; KVM stops at the first it refuses.
    fn get_msrs(&self, msrs: &mut Msrs) -> Result<usize>;
    /// `KVM_SET_MSRS`: returns how many MSRs were written; KVM stops at the first it refuses.
    fn set_msrs(&self, msrs: &Msrs) -> Result<usize>;
    /// `KVM_GET_CPUID2` with room for `num_entries` entries.
    fn get_cpuid2(&self, num_entries: usize) -> Result<CpuId>;
    /// `KVM_SET_CPUID2`.
    fn set_cpuid2(&self, cpuid: &CpuId) -> Result<()>;
    /// `KVM_GET_TSC_KHZ`.
    fn get_tsc_khz(&self) -> Result<u32>;
    /// `KVM_SET_TSC_KHZ`.
    fn set_tsc_khz(&self, khz: u32) -> Result<()>;
    /// `KVM_GET_NESTED_STATE`: the state's size, or `None` if the vCPU holds no nested state.
    fn get_nested_state(&self, buffer: &mut KvmNestedStateBuffer) -> Result<Option<NonZeroUsize>>;
    /// `KVM_SET_NESTED_STATE`.
    fn set_nested_state(&self, buffer: &KvmNestedStateBuffer) -> Result<()>;
}

/// The VM-wide ioctls that save and restore in-kernel device state and query capabilities.
pub trait VmBackend {
    /// `KVM_GET_PIT2`.
    fn get_pit2(&self) -> Result<kvm_pit_state2>;
    /// `KVM_SET_PIT2`.
    fn set_pit2(&self, pit: &kvm_pit_state2) -> Result<()>;
    /// `KVM_GET_CLOCK`.
    fn get_clock(&self) -> Result<kvm_clock_data>;
    /// `KVM_SET_CLOCK`.
    fn set_clock(&self, clock: &kvm_clock_data) -> Result<()>;
    /// `KVM_GET_IRQCHIP` for `irqchip.chip_id`.
    fn get_irqchip(&self, irqchip: &mut kvm_irqchip) -> Result<()>;
    /// `KVM_SET_IRQCHIP`.
    fn set_irqchip(&self, irqchip: &kvm_irqchip) -> Result<()>;
    /// `KVM_CHECK_EXTENSION` on the VM fd.
    fn check_extension_int(&self, cap: Cap) -> i32;
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> $ret { <Self>::$name(self, $($arg),*) })*
    };
}

macro_rules! forward_to_target {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> $ret { T::$name(self, $($arg),*) })*
    };
}

impl VcpuBackend for VcpuFd {
    forward! {
        get_regs() -> Result<kvm_regs>;
        set_regs(regs: &kvm_regs) -> Result<()>;
        get_sregs() -> Result<kvm_sregs>;
        set_sregs(sregs: &kvm_sregs) -> Result<()>;
        get_xsave() -> Result<kvm_xsave>;
        get_xcrs() -> Result<kvm_xcrs>;
        set_xcrs(xcrs: &kvm_xcrs) -> Result<()>;
        get_debug_regs() -> Result<kvm_debugregs>;
        set_debug_regs(regs: &kvm_debugregs) -> Result<()>;
        get_lapic() -> Result<kvm_lapic_state>;
        set_lapic(lapic: &kvm_lapic_state) -> Result<()>;
        get_mp_state() -> Result<kvm_mp_state>;
        set_mp_state(mp_state: kvm_mp_state) -> Result<()>;
        get_vcpu_events() -> Result<kvm_vcpu_events>;
        set_vcpu_events(events: &kvm_vcpu_events) -> Result<()>;
        get_msrs(msrs: &mut Msrs) -> Result<usize>;
        set_msrs(msrs: &Msrs) -> Result<usize>;
        get_cpuid2(num_entries: usize) -> Result<CpuId>;
        set_cpuid2(cpuid: &CpuId) -> Result<()>;
        get_tsc_khz() -> Result<u32>;
        set_tsc_khz(khz: u32) -> Result<()>;
        set_nested_state(buffer: &KvmNestedStateBuffer) -> Result<()>;
    }

    unsafe fn get_xsave2(&self, xsave: &mut Xsave) -> Result<()> {
        // SAFETY: the caller guarantees `xsave` is at least KVM_CAP_XSAVE2 bytes long.
        unsafe { VcpuFd::get_xsave2(self, xsave) }
    }

    unsafe fn set_xsave2(&self, xsave: &Xsave) -> Result<()> {
        // SAFETY: the caller guarantees `xsave` is at least KVM_CAP_XSAVE2 bytes long.
        unsafe { VcpuFd::set_xsave2(self, xsave) }
    }

    fn get_nested_state(&self, buffer: &mut KvmNestedStateBuffer) -> Result<Option<NonZeroUsize>> {
        self.nested_state(buffer)
    }
}

impl VmBackend for VmFd {
    forward! {
        get_pit2() -> Result<kvm_pit_state2>;
        set_pit2(pit: &kvm_pit_state2) -> Result<()>;
        get_clock() -> Result<kvm_clock_data>;
        set_clock(clock: &kvm_clock_data) -> Result<()>;
        get_irqchip(irqchip: &mut kvm_irqchip) -> Result<()>;
        set_irqchip(irqchip: &kvm_irqchip) -> Result<()>;
        check_extension_int(cap: Cap) -> i32;
    }
}

/// A borrowed backend is a backend: the caller keeps its fd.
impl<T: VcpuBackend + ?Sized> VcpuBackend for &T {
    forward_to_target! {
        get_regs() -> Result<kvm_regs>;
        set_regs(regs: &kvm_regs) -> Result<()>;
        get_sregs() -> Result<kvm_sregs>;
        set_sregs(sregs: &kvm_sregs) -> Result<()>;
        get_xsave() -> Result<kvm_xsave>;
        get_xcrs() -> Result<kvm_xcrs>;
        set_xcrs(xcrs: &kvm_xcrs) -> Result<()>;
        get_debug_regs() -> Result<kvm_debugregs>;
        set_debug_regs(regs: &kvm_debugregs) -> Result<()>;
        get_lapic() -> Result<kvm_lapic_state>;
        set_lapic(lapic: &kvm_lapic_state) -> Result<()>;
        get_mp_state() -> Result<kvm_mp_state>;
        set_mp_state(mp_state: kvm_mp_state) -> Result<()>;
        get_vcpu_events() -> Result<kvm_vcpu_events>;
        set_vcpu_events(events: &kvm_vcpu_events) -> Result<()>;
        get_msrs(msrs: &mut Msrs) -> Result<usize>;
        set_msrs(msrs: &Msrs) -> Result<usize>;
        get_cpuid2(num_entries: usize) -> Result<CpuId>;
        set_cpuid2(cpuid: &CpuId) -> Result<()>;
        get_tsc_khz() -> Result<u32>;
        set_tsc_khz(khz: u32) -> Result<()>;
        get_nested_state(buffer: &mut KvmNestedStateBuffer) -> Result<Option<NonZeroUsize>>;
        set_nested_state(buffer: &KvmNestedStateBuffer) -> Result<()>;
    }

    unsafe fn get_xsave2(&self, xsave: &mut Xsave) -> Result<()> {
        // SAFETY: the caller's guarantee is the one `T::get_xsave2` needs.
        unsafe { T::get_xsave2(self, xsave) }
    }

    unsafe fn set_xsave2(&self, xsave: &Xsave) -> Result<()> {
        // SAFETY: the caller's guarantee is the one `T::set_xsave2` needs.
        unsafe { T::set_xsave2(self, xsave) }
    }
}

/// A borrowed backend is a backend: the caller keeps its fd.
impl<T: VmBackend + ?Sized> VmBackend for &T {
    forward_to_target! {
        get_pit2() -> Result<kvm_pit_state2>;
        set_pit2(pit: &kvm_pit_state2) -> Result<()>;
        get_clock() -> Result<kvm_clock_data>;
        set_clock(clock: &kvm_clock_data) -> Result<()>;
        get_irqchip(irqchip: &mut kvm_irqchip) -> Result<()>;
        set_irqchip(irqchip: &kvm_irqchip) -> Result<()>;
        check_extension_int(cap: Cap) -> i32;
    }
}
