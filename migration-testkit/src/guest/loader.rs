//! Loads a flat guest image and puts a vCPU in the ABI's entry state.
//!
//! Memory written by the loader (everything else is left as it is, and the ABI
//! says it must be zero, as fresh anonymous memory is):
//!
//! | GPA               | content                                              |
//! |-------------------|------------------------------------------------------|
//! | `0x500..0x520`    | boot GDT: null, code64 `0x08`, data `0x10`, TSS `0x18` |
//! | `0x9000..0xa000`  | PML4 (entry 0 → PDPT)                                |
//! | `0xa000..0xb000`  | PDPT (entry 0 → PD)                                  |
//! | `0xb000..0xc000`  | PD: 512 × 2 MiB pages = identity map of `[0, 1 GiB)` |
//! | `0x10000..0x80000`| zeroed, then the image at `0x10000`                  |

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_segment, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::error::GuestError;
use super::image::{check_image_size, IMAGE_ADDR, IMAGE_END};

/// Smallest guest RAM the loader accepts (2 MiB: the boot area plus 1 MiB..2 MiB).
pub const MIN_RAM_SIZE: u64 = 2 << 20;
/// GPA of the loader's GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// GPA of the loader's PML4 (CR3 at entry).
pub const BOOT_PML4_ADDR: u64 = 0x9000;
/// GPA of the loader's PDPT.
pub const BOOT_PDPT_ADDR: u64 = 0xa000;
/// GPA of the loader's page directory (2 MiB pages).
pub const BOOT_PD_ADDR: u64 = 0xb000;
/// Size of the identity map set up by the loader: `[0, 1 GiB)`.
pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;
/// RSP at entry (top of the guest area; the built-in guests switch stacks at once).
pub const BOOT_STACK_TOP: u64 = IMAGE_END;

const BOOT_GDT: [u64; 4] = [
    0,                     // null
    0x00af_9b00_0000_ffff, // 0x08: code, 64-bit, DPL0
    0x00cf_9300_0000_ffff, // 0x10: data, DPL0
    0x008f_8b00_0000_ffff, // 0x18: TSS (busy), base 0
];
const SEL_CODE: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_TSS: u16 = 0x18;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Size of the RAM that is contiguous from GPA 0 (what the guest gets in RDI).
///
/// Regions that do not continue that range are ignored by the ABI.
pub fn guest_ram_size<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let mut regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let mut end = 0u64;
    for (start, len) in regions {
        if start != end {
            break;
        }
        end = start + len;
    }
    end
}

/// Writes the boot GDT, the boot page tables and `image` into guest memory.
///
/// Returns the guest RAM size (see [`guest_ram_size`]). Checks the image size
/// and the RAM size before writing anything.
pub fn write_boot_memory<M: GuestMemoryBackend>(mem: &M, image: &[u8]) -> Result<u64, GuestError> {
    check_image_size(image)?;
    let ram = guest_ram_size(mem);
    if ram < MIN_RAM_SIZE {
        return Err(GuestError::RamTooSmall {
            found: ram,
            min: MIN_RAM_SIZE,
        });
    }
    for (i, d) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))?;
    }
    let mut pd = vec![0u8; 4096];
    for (i, e) in pd.chunks_exact_mut(8).enumerate() {
        // Present | writable | 2 MiB page.
        e.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    let mut table = vec![0u8; 4096];
    table[..8].copy_from_slice(&(BOOT_PDPT_ADDR | 0x3).to_le_bytes());
    mem.write_slice(&table, GuestAddress(BOOT_PML4_ADDR))?;
    table[..8].copy_from_slice(&(BOOT_PD_ADDR | 0x3).to_le_bytes());
    mem.write_slice(&table, GuestAddress(BOOT_PDPT_ADDR))?;
    mem.write_slice(&pd, GuestAddress(BOOT_PD_ADDR))?;

    let mut area = vec![0u8; (IMAGE_END - IMAGE_ADDR) as usize];
    area[..image.len()].copy_from_slice(image);
    mem.write_slice(&area, GuestAddress(IMAGE_ADDR))?;
    Ok(ram)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// How the vCPUs of a guest with more than one start (guest ABI §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmpStart {
    /// The VMM starts every vCPU in 64-bit mode at the entry point, with its index
    /// in `RDX`, the count in `RCX` and `R8` = 0. vCPUs other than 0 are made
    /// runnable (`KVM_SET_MP_STATE`): with an in-kernel irqchip KVM creates them
    /// waiting for INIT.
    AllAtEntry,
    /// The VMM starts vCPU 0 only (`RDX` = 0, `RCX` = count, `R8` = 1) and leaves the
    /// others as KVM creates them, in `KVM_MP_STATE_UNINITIALIZED`: the guest wakes
    /// them with INIT-SIPI-SIPI through its LAPIC, as Linux does, into a real-mode
    /// trampoline below 1 MiB.
    InitSipi,
}

impl SmpStart {
    /// The value of `R8` at the entry point.
    pub fn register(self) -> u64 {
        match self {
            SmpStart::AllAtEntry => 0,
            SmpStart::InitSipi => 1,
        }
    }
}

/// Puts `vcpu` in the ABI's entry state: CPUID = KVM's supported CPUID, 64-bit
/// long mode with the loader's GDT and page tables, `RIP` = [`IMAGE_ADDR`],
/// `RDI` = `ram_size`, `RSI` = `arg`, `RSP` = [`BOOT_STACK_TOP`], `RFLAGS` = 0x2,
/// `RCX` = 1 (one vCPU; its index `RDX` = 0).
///
/// Order: `KVM_SET_CPUID2`, `KVM_SET_SREGS`, `KVM_SET_REGS`, `KVM_SET_FPU`.
pub fn configure_vcpu(vcpu: &VcpuFd, kvm: &Kvm, ram_size: u64, arg: u64) -> Result<(), GuestError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(GuestError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(GuestError::kvm("KVM_SET_CPUID2"))?;
    configure_vcpu_registers(vcpu, ram_size, arg)
}

/// [`configure_vcpu`] without its first step: the vCPU keeps the CPUID it has (a
/// VMM that gives its vCPUs a CPU template, such as migration-kvm's `KvmVm`, has set
/// it already). Order: `KVM_SET_SREGS`, `KVM_SET_REGS`, `KVM_SET_FPU`.
pub fn configure_vcpu_registers(vcpu: &VcpuFd, ram_size: u64, arg: u64) -> Result<(), GuestError> {
    set_entry_state(vcpu, [ram_size, arg, 0, 1, SmpStart::AllAtEntry.register()])
}

/// Puts vCPU `index` of `count` of a guest started as `start` says in its entry
/// state (guest ABI §9), keeping its CPUID:
/// - [`SmpStart::AllAtEntry`]: every vCPU as [`configure_vcpu_registers`] does,
///   with `RDX` = `index`, `RCX` = `count`, `R8` = 0; then, for `index` > 0,
///   `KVM_SET_MP_STATE(RUNNABLE)`;
/// - [`SmpStart::InitSipi`]: vCPU 0 the same with `R8` = 1; any other vCPU is left
///   untouched, waiting for INIT.
///
/// `index` must be below `count`; `index` is the vCPU's KVM id, which is also its
/// APIC ID.
pub fn configure_vcpu_smp(
    vcpu: &VcpuFd,
    ram_size: u64,
    arg: u64,
    index: u32,
    count: u32,
    start: SmpStart,
) -> Result<(), GuestError> {
    if index >= count {
        return Err(GuestError::VcpuIndex { index, count });
    }
    if index > 0 && start == SmpStart::InitSipi {
        return Ok(());
    }
    let gprs = [
        ram_size,
        arg,
        u64::from(index),
        u64::from(count),
        start.register(),
    ];
    set_entry_state(vcpu, gprs)?;
    if index > 0 {
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(GuestError::kvm("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

/// The ABI's entry state with `[RDI, RSI, RDX, RCX, R8]` = `gprs`.
fn set_entry_state(vcpu: &VcpuFd, gprs: [u64; 5]) -> Result<(), GuestError> {
    let mut sregs = vcpu.get_sregs().map_err(GuestError::kvm("KVM_GET_SREGS"))?;
    sregs.cs = segment(SEL_CODE, 0xb, true);
    let data = segment(SEL_DATA, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0xfffff,
        s: 0,
        db: 0,
        ..segment(SEL_TSS, 0xb, false)
    };
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = BOOT_PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(GuestError::kvm("KVM_SET_SREGS"))?;

    let mut regs = vcpu.get_regs().map_err(GuestError::kvm("KVM_GET_REGS"))?;
    regs.rip = IMAGE_ADDR;
    regs.rsp = BOOT_STACK_TOP;
    [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8] = gprs;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(GuestError::kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(GuestError::kvm("KVM_SET_FPU"))?;
    Ok(())
}

/// Loads `image` per the guest ABI with argument (`RSI`) 0.
///
/// Same as [`load_with_arg`]`(mem, vcpu, kvm, image, 0)`.
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    kvm: &Kvm,
    image: &[u8],
) -> Result<(), GuestError> {
    load_with_arg(mem, vcpu, kvm, image, 0)
}

/// Loads `image` per the guest ABI: [`write_boot_memory`] then [`configure_vcpu`].
///
/// `arg` is passed in `RSI`; its meaning is guest-specific (0 = default). For
/// [`Guest::MemoryPattern`](super::Guest::MemoryPattern) a non-zero `arg` is the
/// end address (exclusive) of the working set.
pub fn load_with_arg<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    kvm: &Kvm,
    image: &[u8],
    arg: u64,
) -> Result<(), GuestError> {
    let ram = write_boot_memory(mem, image)?;
    configure_vcpu(vcpu, kvm, ram, arg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn ram_size_is_contiguous_prefix() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(4 << 20), 4 << 20),
            (GuestAddress(16 << 20), 4 << 20),
        ])
        .unwrap();
        assert_eq!(guest_ram_size(&m), 8 << 20);
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 20), 4 << 20)]).unwrap();
        assert_eq!(guest_ram_size(&m), 0);
    }

    #[test]
    fn writes_boot_memory() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let img = [0xf4u8, 0x90, 0x90];
        assert_eq!(write_boot_memory(&m, &img).unwrap(), 4 << 20);
        let mut got = [0u8; 3];
        m.read_slice(&mut got, GuestAddress(IMAGE_ADDR)).unwrap();
        assert_eq!(got, img);
        let pd1: u64 = m.read_obj(GuestAddress(BOOT_PD_ADDR + 8)).unwrap();
        assert_eq!(pd1, (2 << 20) | 0x83);
        let pml4: u64 = m.read_obj(GuestAddress(BOOT_PML4_ADDR)).unwrap();
        assert_eq!(pml4, BOOT_PDPT_ADDR | 3);
    }

    #[test]
    fn rejects_small_ram() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            write_boot_memory(&m, &[0x90]),
            Err(GuestError::RamTooSmall { .. })
        ));
    }
}
