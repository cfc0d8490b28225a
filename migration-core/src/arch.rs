//! [`Arch`]: the architecture of a VM, recorded in a snapshot container's header
//! (`docs/format.md` §3) and announced in a migration's HELLO (`docs/protocol.md`),
//! with the same codes in both.

/// The architecture of a VM: whose CPU state a snapshot holds, and what a migrating
/// VM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Arch {
    /// No CPU state (tests, fakes, device-only snapshots).
    None,
    /// x86-64.
    X86_64,
    /// AArch64.
    Aarch64,
    /// RISC-V 64.
    Riscv64,
}

impl Arch {
    /// The architecture this crate was compiled for.
    pub fn host() -> Self {
        if cfg!(target_arch = "x86_64") {
            Self::X86_64
        } else if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else if cfg!(target_arch = "riscv64") {
            Self::Riscv64
        } else {
            Self::None
        }
    }

    /// This architecture's code in a container header and a HELLO.
    pub fn code(self) -> u32 {
        match self {
            Self::None => 0,
            Self::X86_64 => 1,
            Self::Aarch64 => 2,
            Self::Riscv64 => 3,
        }
    }

    /// The architecture with code `code`, if it is one this crate knows.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::None,
            1 => Self::X86_64,
            2 => Self::Aarch64,
            3 => Self::Riscv64,
            _ => return None,
        })
    }
}
