//! Memory extents and their data runs (`docs/format.md` §4, §6, §7).

use super::error::FormatError;
use super::limits::MAX_RUNS;
use crate::checksum::crc64;
use crate::memory::PAGE_SIZE;

/// A range of guest memory stored in the container, outside the snapshot tree.
///
/// In the file form, byte `i` of the extent is at file offset `file_offset + i`
/// (relative to the container's start): a restore may `mmap(MAP_PRIVATE)`
/// `[file_offset, file_offset + length)` at `gpa`. Zero pages are holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest-physical address, page aligned.
    pub gpa: u64,
    /// Length, page aligned, non-zero.
    pub length: u64,
    /// File form: page-aligned offset of the extent's first byte; stream form: 0.
    pub file_offset: u64,
}

/// A run of non-zero pages of one extent, with its checksum.
///
/// Bytes of an extent that no run covers are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRun {
    /// Index of the extent in the extent table.
    pub extent: u32,
    /// Offset inside the extent, page aligned.
    pub offset: u64,
    /// Length, page aligned, non-zero.
    pub length: u64,
    /// CRC-64/NVME of the run's bytes.
    pub crc: u64,
    /// Guest-physical address of the first byte (`extent.gpa + offset`).
    pub gpa: u64,
    /// File offset of the first byte (`extent.file_offset + offset`).
    pub file_offset: u64,
}

/// Length of a run table with `runs` runs.
pub(crate) fn run_table_len(runs: u64) -> u64 {
    16 + 32 * runs + 8
}

pub(crate) fn encode_run_table(runs: &[DataRun]) -> Vec<u8> {
    let mut b = Vec::with_capacity(run_table_len(runs.len() as u64) as usize);
    b.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    for r in runs {
        b.extend_from_slice(&r.extent.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.length.to_le_bytes());
        b.extend_from_slice(&r.crc.to_le_bytes());
    }
    let crc = crc64(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Checks a run table's declared length before it is read.
pub(crate) fn check_run_table_len(len: u64) -> Result<u64, FormatError> {
    if len < 24 || (len - 24) % 32 != 0 {
        return Err(FormatError::malformed(format!(
            "run table length {len} is not 16 + 32n + 8"
        )));
    }
    let runs = (len - 24) / 32;
    if runs > MAX_RUNS {
        return Err(FormatError::limit("run count", runs, MAX_RUNS));
    }
    Ok(runs)
}

pub(crate) fn decode_run_table(b: &[u8], extents: &[Extent]) -> Result<Vec<DataRun>, FormatError> {
    use super::header::{u32_at, u64_at};
    let body = b.len() - 8;
    let stored = u64_at(b, body);
    let computed = crc64(&b[..body]);
    if stored != computed {
        return Err(FormatError::Checksum {
            what: "run table".into(),
            stored,
            computed,
        });
    }
    // The count the length allows (checked and bounded), not `run_table_len(count)`:
    // a forged count would overflow that arithmetic.
    let count = u64_at(b, 0);
    if count != check_run_table_len(b.len() as u64)? {
        return Err(FormatError::malformed(format!(
            "run_count {count} does not match the run table length {}",
            b.len()
        )));
    }
    if u64_at(b, 8) != 0 {
        return Err(FormatError::malformed(
            "run table reserved field is not zero",
        ));
    }
    let mut runs: Vec<DataRun> = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let extent = u32_at(b, at);
        let offset = u64_at(b, at + 8);
        let length = u64_at(b, at + 16);
        let crc = u64_at(b, at + 24);
        let what = || format!("run {i} (extent {extent}, offset {offset:#x}, {length:#x} bytes)");
        let e = extents
            .get(extent as usize)
            .ok_or_else(|| FormatError::malformed(format!("{}: no such extent", what())))?;
        if u32_at(b, at + 4) != 0 {
            return Err(FormatError::malformed(format!(
                "{}: reserved is not zero",
                what()
            )));
        }
        if offset % PAGE_SIZE != 0 || length % PAGE_SIZE != 0 || length == 0 {
            return Err(FormatError::malformed(format!(
                "{}: empty or unaligned",
                what()
            )));
        }
        if offset.checked_add(length).is_none_or(|end| end > e.length) {
            return Err(FormatError::malformed(format!(
                "{}: leaves its extent",
                what()
            )));
        }
        if let Some(p) = runs.last() {
            if (extent, offset) < (p.extent, p.offset + p.length) {
                return Err(FormatError::Overlap {
                    what: format!("{} overlaps or precedes run {}", what(), i - 1),
                });
            }
        }
        runs.push(DataRun {
            extent,
            offset,
            length,
            crc,
            gpa: e.gpa + offset,
            file_offset: e.file_offset + offset,
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run table whose count field is forged so that `16 + 32 * count + 8` wraps to
    /// the table's real length; its CRC is valid, as a hostile writer can make it.
    fn forged(count: u64, runs: usize) -> Vec<u8> {
        let mut b = count.to_le_bytes().to_vec();
        b.extend_from_slice(&[0u8; 8]);
        b.extend(std::iter::repeat_n(0u8, 32 * runs));
        let crc = crc64(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn a_forged_run_count_is_malformed_not_a_panic() {
        let extents = [Extent {
            gpa: 0,
            length: 1 << 20,
            file_offset: 4096,
        }];
        // 32 * (1 + 2^59) wraps to 32 in a u64: the length matches one run.
        let b = forged(1 + (1 << 59), 1);
        let wrapped = 32u64.wrapping_mul(1 + (1 << 59)) + 24;
        assert_eq!(wrapped as usize, b.len());
        assert!(matches!(
            decode_run_table(&b, &extents),
            Err(FormatError::Malformed { .. })
        ));
        // The honest count still decodes (to a run the extent check then judges).
        assert!(decode_run_table(&forged(0, 0), &extents)
            .unwrap()
            .is_empty());
    }
}
