//! [`RecordingVcpu`]: a fake KVM vCPU and VM that records the order of every call.
//!
//! It implements migration-kvm's [`VcpuBackend`] and [`VmBackend`], so
//! `KvmVcpu::new(0, &recording, caps)`-style code and `restore_vm_state` drive it
//! exactly as they drive a real `VcpuFd`/`VmFd`. Each `set_*` stores its value and
//! the matching `get_*` returns it, so state round-trips; every call is appended to a
//! shared log ([`calls`](RecordingVcpu::calls)), with the MSR indices of each
//! `set_msrs`/`get_msrs` call in order. [`fail_on`](RecordingVcpu::fail_on) makes a
//! named call fail with `EIO`, and [`refuse_msr`](RecordingVcpu::refuse_msr) makes
//! `get_msrs`/`set_msrs` stop at an MSR, as KVM does. [`sibling`](RecordingVcpu::sibling)
//! makes another vCPU of the same machine, with its own state, recording into the same
//! log with its index ([`RecordingMachine`](crate::recording_machine::RecordingMachine)
//! puts several together).
//!
//! ```
//! use migration_kvm::{KvmVcpu, VcpuStep};
//! use migration_testkit::recording_vcpu::RecordingVcpu;
//!
//! let fake = RecordingVcpu::new();
//! let vcpu = KvmVcpu::new(0, fake.clone(), fake.caps());
//! let state = vcpu.save_state().unwrap();
//! fake.clear();
//! vcpu.restore_state(&state).unwrap();
//! let calls = fake.call_names();
//! let pos = |n: &str| calls.iter().position(|c| *c == n).unwrap();
//! assert!(pos("set_cpuid2") < pos("set_sregs"));
//! assert_eq!(calls.last(), Some(&"set_vcpu_events"));
//! ```

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
};
use kvm_ioctls::{Cap, KvmNestedStateBuffer};
use migration_kvm::{HostCaps, VcpuBackend, VmBackend};
use vmm_sys_util::errno;

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The method name (`"set_regs"`, `"get_msrs"`…).
    pub name: &'static str,
    /// For `get_msrs`/`set_msrs`: the MSR indices of the call, in order.
    pub msrs: Vec<u32>,
    /// The vCPU that was called (`None`: a fake made with [`RecordingVcpu::new`], which
    /// is one vCPU and its VM at once).
    pub vcpu: Option<u32>,
}

#[derive(Debug)]
struct Values {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: Vec<u8>,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: BTreeMap<u32, u64>,
    cpuid: Vec<kvm_cpuid_entry2>,
    tsc_khz: u32,
    pit2: kvm_pit_state2,
    clock: kvm_clock_data,
    irqchips: [kvm_irqchip; 3],
}

#[derive(Debug)]
struct Inner {
    fail_on: Option<&'static str>,
    refused_msr: Option<u32>,
    values: Values,
    xsave2_size: usize,
}

/// A recording fake vCPU + VM. Clones share the same log and values; siblings share
/// the log only.
#[derive(Clone, Debug)]
pub struct RecordingVcpu {
    index: Option<u32>,
    log: Arc<Mutex<Vec<Call>>>,
    inner: Arc<Mutex<Inner>>,
}

impl Default for RecordingVcpu {
    fn default() -> Self {
        Self::new()
    }
}

/// MSRs the fake holds by default: TSC, TSC_ADJUST, PAT, SYSENTER_CS, TSC_DEADLINE,
/// STAR, KERNEL_GS_BASE.
pub const DEFAULT_MSRS: &[u32] = &[0x10, 0x3b, 0x174, 0x277, 0x6e0, 0xc000_0081, 0xc000_0102];

impl RecordingVcpu {
    /// A fake with distinct non-zero values in every piece of state and
    /// [`DEFAULT_MSRS`].
    pub fn new() -> Self {
        Self::with_msrs(DEFAULT_MSRS.iter().copied())
    }

    /// A fake whose MSR index list (and readable MSRs) are `msrs`.
    pub fn with_msrs(msrs: impl IntoIterator<Item = u32>) -> Self {
        let msrs: BTreeMap<u32, u64> = msrs
            .into_iter()
            .map(|i| (i, 0x1000 + u64::from(i)))
            .collect();
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 1;
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (i, c) in irqchips.iter_mut().enumerate() {
            c.chip_id = i as u32;
            // SAFETY: the union is plain bytes; writing its `dummy` array is always valid.
            unsafe { c.chip.dummy[0] = 0x40 + i as i8 };
        }
        let values = Values {
            regs: kvm_regs {
                rax: 0x1111,
                rip: 0x10000,
                rflags: 2,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x8000_0011,
                efer: 0x500,
                ..Default::default()
            },
            xsave: vec![0x5a; 4096],
            xcrs: kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            },
            debugregs: kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            },
            lapic,
            mp_state: kvm_mp_state { mp_state: 0 },
            events: kvm_vcpu_events::default(),
            msrs,
            cpuid: vec![
                kvm_cpuid_entry2 {
                    function: 0,
                    eax: 0xd,
                    ..Default::default()
                },
                kvm_cpuid_entry2 {
                    function: 1,
                    ecx: 1 << 24,
                    ..Default::default()
                },
            ],
            tsc_khz: 2_000_000,
            pit2: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            },
            irqchips,
        };
        Self {
            index: None,
            log: Arc::new(Mutex::new(Vec::new())),
            inner: Arc::new(Mutex::new(Inner {
                fail_on: None,
                refused_msr: None,
                values,
                xsave2_size: 4096,
            })),
        }
    }

    /// vCPU `index` of the same machine: its own state (the values of
    /// [`new`](Self::new) with this fake's MSRs, `rax` = `0x1111 + index`), recording
    /// into the same log as vCPU `index`.
    pub fn sibling(&self, index: u32) -> Self {
        let msrs: Vec<u32> = self.lock().values.msrs.keys().copied().collect();
        let fresh = Self::with_msrs(msrs);
        fresh.lock().values.regs.rax = 0x1111 + u64::from(index);
        Self {
            index: Some(index),
            log: self.log.clone(),
            inner: fresh.inner,
        }
    }

    /// The vCPU index this fake records as (`None` for [`new`](Self::new)'s).
    pub fn index(&self) -> Option<u32> {
        self.index
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self) -> MutexGuard<'_, Vec<Call>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a call named `name` that is not an ioctl (`"pause"`…) to the log.
    pub fn note(&self, name: &'static str) {
        self.log().push(Call {
            name,
            msrs: vec![],
            vcpu: self.index,
        });
    }

    /// Host capabilities matching this fake: its MSRs as the index list, its xsave
    /// size, no nested state, `KVM_GET_TSC_KHZ` available, a LAPIC.
    pub fn caps(&self) -> HostCaps {
        let i = self.lock();
        HostCaps {
            msr_index_list: i.values.msrs.keys().copied().collect(),
            xsave2_size: i.xsave2_size,
            nested_state_size: 0,
            tsc_khz: true,
            lapic: true,
        }
    }

    /// Makes the xsave area `size` bytes (> 4096: the `KVM_GET_XSAVE2` path).
    pub fn set_xsave2_size(&self, size: usize) {
        let mut i = self.lock();
        i.xsave2_size = size;
        i.values.xsave = (0..size).map(|b| b as u8).collect();
    }

    /// Makes the call named `name` fail with `EIO` (or no call, with `None`).
    pub fn fail_on(&self, name: Option<&'static str>) {
        self.lock().fail_on = name;
    }

    /// Makes `get_msrs`/`set_msrs` stop at MSR `index`, as KVM does with an MSR it
    /// refuses.
    pub fn refuse_msr(&self, index: Option<u32>) {
        self.lock().refused_msr = index;
    }

    /// Changes the TSC frequency `get_tsc_khz` reports.
    pub fn set_current_tsc_khz(&self, khz: u32) {
        self.lock().values.tsc_khz = khz;
    }

    /// Every call so far (of every sibling).
    pub fn calls(&self) -> Vec<Call> {
        self.log().clone()
    }

    /// The names of every call so far (of every sibling).
    pub fn call_names(&self) -> Vec<&'static str> {
        self.log().iter().map(|c| c.name).collect()
    }

    /// Forgets the recorded calls (of every sibling).
    pub fn clear(&self) {
        self.log().clear();
    }

    fn record(
        &self,
        name: &'static str,
        msrs: Vec<u32>,
    ) -> Result<MutexGuard<'_, Inner>, errno::Error> {
        self.log().push(Call {
            name,
            msrs,
            vcpu: self.index,
        });
        let i = self.lock();
        if i.fail_on == Some(name) {
            return Err(errno::Error::new(libc::EIO));
        }
        Ok(i)
    }
}

macro_rules! get_set {
    ($get:ident, $set:ident, $field:ident, $ty:ty) => {
        fn $get(&self) -> migration_kvm::IoctlResult<$ty> {
            Ok(self.record(stringify!($get), vec![])?.values.$field)
        }
        fn $set(&self, v: &$ty) -> migration_kvm::IoctlResult<()> {
            self.record(stringify!($set), vec![])?.values.$field = *v;
            Ok(())
        }
    };
}

impl VcpuBackend for RecordingVcpu {
    get_set!(get_regs, set_regs, regs, kvm_regs);
    get_set!(get_sregs, set_sregs, sregs, kvm_sregs);
    get_set!(get_xcrs, set_xcrs, xcrs, kvm_xcrs);
    get_set!(get_debug_regs, set_debug_regs, debugregs, kvm_debugregs);
    get_set!(get_lapic, set_lapic, lapic, kvm_lapic_state);
    get_set!(get_vcpu_events, set_vcpu_events, events, kvm_vcpu_events);

    fn get_xsave(&self) -> migration_kvm::IoctlResult<kvm_xsave> {
        let i = self.record("get_xsave", vec![])?;
        let mut x = kvm_xsave::default();
        for (k, w) in x.region.iter_mut().enumerate() {
            let b = i.values.xsave.get(k * 4..k * 4 + 4).unwrap_or(&[0; 4]);
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(x)
    }

    unsafe fn get_xsave2(&self, xsave: &mut Xsave) -> migration_kvm::IoctlResult<()> {
        let i = self.record("get_xsave2", vec![])?;
        let words: Vec<u32> = i
            .values
            .xsave
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // SAFETY: only the fixed region is written; the FAM length is unchanged.
        let fam = unsafe { xsave.as_mut_fam_struct() };
        let (head, tail) = words.split_at(words.len().min(1024));
        fam.xsave.region[..head.len()].copy_from_slice(head);
        let extra = xsave.as_mut_slice();
        let n = tail.len().min(extra.len());
        extra[..n].copy_from_slice(&tail[..n]);
        Ok(())
    }

    unsafe fn set_xsave2(&self, xsave: &Xsave) -> migration_kvm::IoctlResult<()> {
        let mut i = self.record("set_xsave2", vec![])?;
        let mut bytes: Vec<u8> = xsave
            .as_fam_struct_ref()
            .xsave
            .region
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        bytes.extend(xsave.as_slice().iter().flat_map(|w| w.to_le_bytes()));
        bytes.truncate(i.xsave2_size.max(4096));
        i.values.xsave = bytes;
        Ok(())
    }

    fn get_mp_state(&self) -> migration_kvm::IoctlResult<kvm_mp_state> {
        Ok(self.record("get_mp_state", vec![])?.values.mp_state)
    }

    fn set_mp_state(&self, v: kvm_mp_state) -> migration_kvm::IoctlResult<()> {
        self.record("set_mp_state", vec![])?.values.mp_state = v;
        Ok(())
    }

    fn get_msrs(&self, msrs: &mut Msrs) -> migration_kvm::IoctlResult<usize> {
        let indices = msrs.as_slice().iter().map(|e| e.index).collect();
        let i = self.record("get_msrs", indices)?;
        let mut n = 0;
        for e in msrs.as_mut_slice() {
            match i.values.msrs.get(&e.index) {
                Some(v) if i.refused_msr != Some(e.index) => e.data = *v,
                _ => break,
            }
            n += 1;
        }
        Ok(n)
    }

    fn set_msrs(&self, msrs: &Msrs) -> migration_kvm::IoctlResult<usize> {
        let indices = msrs.as_slice().iter().map(|e| e.index).collect();
        let mut i = self.record("set_msrs", indices)?;
        let mut n = 0;
        for e in msrs.as_slice() {
            if i.refused_msr == Some(e.index) {
                break;
            }
            i.values.msrs.insert(e.index, e.data);
            n += 1;
        }
        Ok(n)
    }

    fn get_cpuid2(&self, num_entries: usize) -> migration_kvm::IoctlResult<CpuId> {
        let i = self.record("get_cpuid2", vec![])?;
        if num_entries < i.values.cpuid.len() {
            return Err(errno::Error::new(libc::E2BIG));
        }
        CpuId::from_entries(&i.values.cpuid).map_err(|_| errno::Error::new(libc::ENOMEM))
    }

    fn set_cpuid2(&self, cpuid: &CpuId) -> migration_kvm::IoctlResult<()> {
        self.record("set_cpuid2", vec![])?.values.cpuid = cpuid.as_slice().to_vec();
        Ok(())
    }

    fn get_tsc_khz(&self) -> migration_kvm::IoctlResult<u32> {
        Ok(self.record("get_tsc_khz", vec![])?.values.tsc_khz)
    }

    fn set_tsc_khz(&self, khz: u32) -> migration_kvm::IoctlResult<()> {
        self.record("set_tsc_khz", vec![])?.values.tsc_khz = khz;
        Ok(())
    }

    fn get_nested_state(
        &self,
        _buffer: &mut KvmNestedStateBuffer,
    ) -> migration_kvm::IoctlResult<Option<NonZeroUsize>> {
        drop(self.record("get_nested_state", vec![])?);
        Ok(None)
    }

    fn set_nested_state(&self, _buffer: &KvmNestedStateBuffer) -> migration_kvm::IoctlResult<()> {
        drop(self.record("set_nested_state", vec![])?);
        Ok(())
    }
}

/// `get_irqchip`/`set_irqchip` calls are recorded per chip:
/// `"set_irqchip(pic_master)"`, `"set_irqchip(pic_slave)"`, `"set_irqchip(ioapic)"`.
fn chip_call(dir: &str, chip: u32) -> &'static str {
    match (dir, chip) {
        ("get", 0) => "get_irqchip(pic_master)",
        ("get", 1) => "get_irqchip(pic_slave)",
        ("get", 2) => "get_irqchip(ioapic)",
        ("get", _) => "get_irqchip(?)",
        (_, 0) => "set_irqchip(pic_master)",
        (_, 1) => "set_irqchip(pic_slave)",
        (_, 2) => "set_irqchip(ioapic)",
        _ => "set_irqchip(?)",
    }
}

impl VmBackend for RecordingVcpu {
    get_set!(get_pit2, set_pit2, pit2, kvm_pit_state2);
    get_set!(get_clock, set_clock, clock, kvm_clock_data);

    fn get_irqchip(&self, irqchip: &mut kvm_irqchip) -> migration_kvm::IoctlResult<()> {
        let i = self.record(chip_call("get", irqchip.chip_id), vec![])?;
        let chip = i
            .values
            .irqchips
            .get(irqchip.chip_id as usize)
            .ok_or_else(|| errno::Error::new(libc::EINVAL))?;
        *irqchip = *chip;
        Ok(())
    }

    fn set_irqchip(&self, irqchip: &kvm_irqchip) -> migration_kvm::IoctlResult<()> {
        let mut i = self.record(chip_call("set", irqchip.chip_id), vec![])?;
        let chip = i
            .values
            .irqchips
            .get_mut(irqchip.chip_id as usize)
            .ok_or_else(|| errno::Error::new(libc::EINVAL))?;
        *chip = *irqchip;
        Ok(())
    }

    fn check_extension_int(&self, cap: Cap) -> i32 {
        match cap {
            Cap::Xsave2 => self.lock().xsave2_size as i32,
            Cap::GetTscKhz => 1,
            _ => 0,
        }
    }
}
