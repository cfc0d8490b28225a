//! The built-in guests and arbitrary flat guest images.

use std::path::Path;

use super::error::GuestError;
use super::smp::SmpFailure;

/// Guest-physical address where the image is loaded; its first byte is the entry point.
pub const IMAGE_ADDR: u64 = 0x1_0000;
/// End (exclusive) of the low guest area: the image must end at or below it.
pub const IMAGE_END: u64 = 0x8_0000;
/// Largest image the ABI accepts (`IMAGE_END - IMAGE_ADDR` = 448 KiB).
pub const IMAGE_MAX_SIZE: usize = (IMAGE_END - IMAGE_ADDR) as usize;

static COUNTER_AVX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter_avx.bin"));
static TIMER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/timer.bin"));
static MEMORY_PATTERN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memory_pattern.bin"));
static CPUID_REPORT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cpuid_report.bin"));
static SMP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp.bin"));

/// The self-checking guests shipped with this crate (sources in `guests/`).
///
/// See `docs/guest-abi.md` for what each one checks, its progress values and
/// its error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Guest {
    /// Ring-3 counter mirrored in GPRs and in every lane of 12 YMM registers.
    /// Progress = counter / 2^18. Needs AVX2 (CPUID) and XSAVE.
    CounterAvx,
    /// LAPIC timer in TSC-deadline mode (x2APIC), ring-0 handler counts ticks.
    /// Progress = tick count (about 1 kHz or less). No ticks = no progress.
    /// Spins in ring 3 between ticks; with the load argument [`TIMER_IDLE`] it halts
    /// in ring 0 instead, so its vCPU thread sleeps (an idle guest).
    Timer,
    /// Writes and re-verifies a generation pattern in every page of
    /// [1 MiB, end), rewriting 1/8 of the pages per pass.
    /// Progress = completed passes. The load argument bounds `end`.
    MemoryPattern,
    /// Executes CPUID in ring 3 for each of [`CPUID_REPORT_LEAVES`] and reports the
    /// results on the info port (6 values per leaf: leaf, subleaf, eax, ebx, ecx,
    /// edx), then progress = round number; again every few milliseconds.
    /// [`cpuid_reports`] decodes the info values.
    CpuidReport,
    /// One to 32 vCPUs ([`SmpStart`](super::SmpStart) says how they start): each
    /// advances and checks shared counters in ring 3, sends fixed IPIs around a
    /// ring and NMIs to itself, and checks the others keep going.
    /// Progress = rounds in which every vCPU advanced; [`smp`](super::smp) decodes
    /// its markers, errors and counters.
    Smp,
}

/// The (leaf, subleaf) pairs [`Guest::CpuidReport`] reports each round, in order.
pub const CPUID_REPORT_LEAVES: [(u32, u32); 7] = [
    (0, 0),
    (1, 0),
    (7, 0),
    (7, 1),
    (0xd, 0),
    (0xd, 1),
    (0x8000_0001, 0),
];

/// One CPUID result as [`Guest::CpuidReport`] saw it: leaf, subleaf, eax, ebx, ecx,
/// edx.
pub type CpuidSeen = [u32; 6];

/// Splits [`Guest::CpuidReport`]'s info values into complete rounds (the oldest
/// values may have been dropped: the first complete round starts at a value equal to
/// the first leaf with the expected subleaf, and every leaf of a round must come in
/// [`CPUID_REPORT_LEAVES`] order).
pub fn cpuid_reports(infos: &[u32]) -> Vec<Vec<CpuidSeen>> {
    let n = CPUID_REPORT_LEAVES.len();
    let mut rounds = Vec::new();
    let mut i = 0;
    while i + 6 * n <= infos.len() {
        let round: Vec<CpuidSeen> = infos[i..i + 6 * n]
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect();
        let in_order = round
            .iter()
            .zip(CPUID_REPORT_LEAVES)
            .all(|(seen, (leaf, sub))| seen[0] == leaf && seen[1] == sub);
        if in_order {
            rounds.push(round);
            i += 6 * n;
        } else {
            i += 1;
        }
    }
    rounds
}

/// Load argument of [`Guest::Timer`]: halt between ticks instead of spinning.
pub const TIMER_IDLE: u64 = 1;

impl Guest {
    /// Every built-in guest.
    pub const ALL: [Guest; 5] = [
        Guest::CounterAvx,
        Guest::Timer,
        Guest::MemoryPattern,
        Guest::CpuidReport,
        Guest::Smp,
    ];

    /// The flat binary image, to be loaded at [`IMAGE_ADDR`].
    pub fn image(&self) -> &'static [u8] {
        match self {
            Guest::CounterAvx => COUNTER_AVX,
            Guest::Timer => TIMER,
            Guest::MemoryPattern => MEMORY_PATTERN,
            Guest::CpuidReport => CPUID_REPORT,
            Guest::Smp => SMP,
        }
    }

    /// Short name, as in the source file name (`counter_avx`, `timer`,
    /// `memory_pattern`, `cpuid_report`, `smp`).
    pub fn name(&self) -> &'static str {
        match self {
            Guest::CounterAvx => "counter_avx",
            Guest::Timer => "timer",
            Guest::MemoryPattern => "memory_pattern",
            Guest::CpuidReport => "cpuid_report",
            Guest::Smp => "smp",
        }
    }

    /// Looks a guest up by [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Guest> {
        Guest::ALL.into_iter().find(|g| g.name() == name)
    }
}

impl std::fmt::Display for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An arbitrary flat guest image, checked to fit the ABI's image area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    bytes: Vec<u8>,
}

impl GuestImage {
    /// Wraps `bytes`, rejecting an empty image or one larger than [`IMAGE_MAX_SIZE`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, GuestError> {
        check_image_size(&bytes)?;
        Ok(GuestImage { bytes })
    }

    /// Reads a flat binary from `path` (at most [`IMAGE_MAX_SIZE`] bytes).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, GuestError> {
        let path = path.as_ref();
        let file_err = |source| GuestError::ImageFile {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(file_err)?.len();
        if len > IMAGE_MAX_SIZE as u64 {
            return Err(GuestError::ImageTooLarge {
                len: usize::try_from(len).unwrap_or(usize::MAX),
                max: IMAGE_MAX_SIZE,
            });
        }
        GuestImage::new(std::fs::read(path).map_err(file_err)?)
    }

    /// The image bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Guest> for GuestImage {
    fn from(guest: Guest) -> Self {
        GuestImage {
            bytes: guest.image().to_vec(),
        }
    }
}

impl AsRef<[u8]> for GuestImage {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Checks that an image is non-empty and fits [`IMAGE_ADDR`]..[`IMAGE_END`].
pub(crate) fn check_image_size(image: &[u8]) -> Result<(), GuestError> {
    if image.is_empty() {
        return Err(GuestError::EmptyImage);
    }
    if image.len() > IMAGE_MAX_SIZE {
        return Err(GuestError::ImageTooLarge {
            len: image.len(),
            max: IMAGE_MAX_SIZE,
        });
    }
    Ok(())
}

/// Describes an error code a built-in guest writes to [`PORT_ERROR`](super::PORT_ERROR).
///
/// ```
/// use migration_testkit::guest::describe_error_code;
/// assert!(describe_error_code(0xE000_000D).contains("vector 13"));
/// ```
pub fn describe_error_code(code: u32) -> String {
    match code {
        0xE000_0000..=0xE000_00FF => {
            format!("unexpected exception or interrupt, vector {}", code & 0xFF)
        }
        0xC000_0001 => "CPUID lacks a required feature (XSAVE/AVX/AVX2)".into(),
        0xC000_0002 => "CPUID lacks x2APIC".into(),
        0xC000_0003 => "CPUID lacks the TSC-deadline timer".into(),
        0xC000_0004 => "RAM too small for the working set".into(),
        0xA000_0101..=0xA000_0105 => {
            let reg = ["r9", "r10", "r11", "rbx", "r12"][(code & 0xFF) as usize - 1];
            format!("counter_avx: GPR mirror {reg} does not match the counter")
        }
        0xA000_0200..=0xA000_020B => format!(
            "counter_avx: ymm{} does not hold the counter in every lane",
            code & 0xFF
        ),
        0xD000_0001 => "timer: tick count went backwards".into(),
        0xB000_0001 => {
            "memory_pattern: a qword does not hold its expected pattern (address on port 0x12)"
                .into()
        }
        _ => match SmpFailure::from_code(code) {
            Some(f) => f.to_string(),
            None => format!("unknown guest error code {code:#010x}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_images_fit() {
        for g in Guest::ALL {
            assert!(GuestImage::new(g.image().to_vec()).is_ok(), "{g}");
            assert_eq!(Guest::from_name(g.name()), Some(g));
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            GuestImage::new(Vec::new()),
            Err(GuestError::EmptyImage)
        ));
        assert!(GuestImage::new(vec![0x90; IMAGE_MAX_SIZE]).is_ok());
        assert!(matches!(
            GuestImage::new(vec![0x90; IMAGE_MAX_SIZE + 1]),
            Err(GuestError::ImageTooLarge { .. })
        ));
    }

    #[test]
    fn describes_codes() {
        assert!(describe_error_code(0xA000_0203).contains("ymm3"));
        assert!(describe_error_code(0xA000_0102).contains("r10"));
        assert!(describe_error_code(0x1234).contains("unknown"));
    }
}
