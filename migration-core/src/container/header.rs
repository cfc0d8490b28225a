//! The 192-byte container header (`docs/format.md` §3).

use super::error::FormatError;
use crate::arch::Arch;
use crate::checksum::crc64;

/// The container magic: `\x89VMSNAP\n`.
pub const MAGIC: [u8; 8] = *b"\x89VMSNAP\n";
/// The major format version this crate reads and writes.
pub const FORMAT_MAJOR: u16 = 1;
/// The newest minor format version this crate reads (and the one it writes).
pub const FORMAT_MINOR: u16 = 0;
/// Length of the header.
pub const HEADER_LEN: usize = 192;
/// Header flag: `parent_digest` names the base of an incremental snapshot.
pub const FLAG_HAS_PARENT: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_HAS_PARENT;
const NAME_MAX: usize = 31;
const VERSION_MAX: usize = 23;

/// The two container forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// Seekable file: page-aligned extents with holes and a run table.
    File,
    /// Socket or pipe: memory as DATA records ended by END.
    Stream,
}

impl Form {
    fn code(self) -> u16 {
        match self {
            Self::File => 1,
            Self::Stream => 2,
        }
    }
}

/// A decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Major format version.
    pub major: u16,
    /// Minor format version.
    pub minor: u16,
    /// Container form.
    pub form: Form,
    /// Target architecture.
    pub arch: Arch,
    /// Digest of the base snapshot, for incremental snapshots.
    pub parent: Option<[u8; 32]>,
    /// Length of the metadata block, CRC included.
    pub metadata_length: u64,
    /// Sum of the section payload lengths.
    pub payload_length: u64,
    /// File form: offset of the run table.
    pub run_table_offset: u64,
    /// File form: length of the run table.
    pub run_table_length: u64,
    /// File form: length of the whole file.
    pub total_length: u64,
    /// Producing crate's name.
    pub producer_name: String,
    /// Producing crate's version.
    pub producer_version: String,
}

impl Header {
    /// Offset of the payload area.
    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.metadata_length
    }

    /// One past the payload area.
    pub fn payload_end(&self) -> u64 {
        self.payload_offset() + self.payload_length
    }

    pub(crate) fn encode(&self) -> Result<[u8; HEADER_LEN], FormatError> {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[12..14].copy_from_slice(&self.form.code().to_le_bytes());
        b[14..16].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[16..20].copy_from_slice(&self.arch.code().to_le_bytes());
        let flags = if self.parent.is_some() {
            FLAG_HAS_PARENT
        } else {
            0
        };
        b[20..24].copy_from_slice(&flags.to_le_bytes());
        b[24..32].copy_from_slice(&self.metadata_length.to_le_bytes());
        b[32..40].copy_from_slice(&self.payload_length.to_le_bytes());
        b[40..48].copy_from_slice(&self.run_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.run_table_length.to_le_bytes());
        b[56..64].copy_from_slice(&self.total_length.to_le_bytes());
        if let Some(p) = &self.parent {
            b[64..96].copy_from_slice(p);
        }
        put_str(&mut b[96..128], &self.producer_name, "producer name")?;
        put_str(&mut b[128..152], &self.producer_version, "producer version")?;
        let crc = crc64(&b[..184]);
        b[184..192].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes and checks a header (everything §3 says a reader rejects).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FormatError> {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[0..8]);
        if found != MAGIC {
            return Err(FormatError::BadMagic { found });
        }
        let major = u16_at(b, 8);
        let minor = u16_at(b, 10);
        if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
            return Err(FormatError::UnsupportedVersion {
                found_major: major,
                found_minor: minor,
                supported_major: FORMAT_MAJOR,
                supported_minor: FORMAT_MINOR,
            });
        }
        let stored = u64_at(b, 184);
        let computed = crc64(&b[..184]);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: "header".into(),
                stored,
                computed,
            });
        }
        let form = match u16_at(b, 12) {
            1 => Form::File,
            2 => Form::Stream,
            f => return Err(FormatError::malformed(format!("unknown form {f}"))),
        };
        if u16_at(b, 14) as usize != HEADER_LEN {
            return Err(FormatError::malformed("header_length is not 192"));
        }
        let arch_code = u32_at(b, 16);
        let arch = Arch::from_code(arch_code)
            .ok_or_else(|| FormatError::malformed(format!("unknown arch {arch_code}")))?;
        let flags = u32_at(b, 20);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FormatError::UnknownFlags {
                flags: flags & !KNOWN_FLAGS,
            });
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[64..96]);
        let parent = if flags & FLAG_HAS_PARENT != 0 {
            Some(digest)
        } else if digest != [0; 32] {
            return Err(FormatError::malformed(
                "parent_digest set without HAS_PARENT",
            ));
        } else {
            None
        };
        if b[152..184].iter().any(|&x| x != 0) {
            return Err(FormatError::malformed("reserved header bytes are not zero"));
        }
        let h = Self {
            major,
            minor,
            form,
            arch,
            parent,
            metadata_length: u64_at(b, 24),
            payload_length: u64_at(b, 32),
            run_table_offset: u64_at(b, 40),
            run_table_length: u64_at(b, 48),
            total_length: u64_at(b, 56),
            producer_name: get_str(&b[96..128], "producer name")?,
            producer_version: get_str(&b[128..152], "producer version")?,
        };
        use super::limits::*;
        if h.metadata_length > MAX_METADATA_LEN {
            return Err(FormatError::limit(
                "metadata length",
                h.metadata_length,
                MAX_METADATA_LEN,
            ));
        }
        if h.metadata_length < 24 {
            return Err(FormatError::malformed("metadata_length below 24"));
        }
        if h.payload_length > MAX_PAYLOAD_LEN {
            return Err(FormatError::limit(
                "payload length",
                h.payload_length,
                MAX_PAYLOAD_LEN,
            ));
        }
        if form == Form::Stream
            && (h.run_table_offset != 0 || h.run_table_length != 0 || h.total_length != 0)
        {
            return Err(FormatError::malformed(
                "stream form with run table or total length",
            ));
        }
        Ok(h)
    }
}

fn put_str(field: &mut [u8], s: &str, what: &str) -> Result<(), FormatError> {
    let max = field.len() - 1;
    if s.len() > max {
        return Err(FormatError::Unwritable {
            what: format!("{what} `{s}` is longer than {max} bytes"),
        });
    }
    field[0] = s.len() as u8;
    field[1..1 + s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn get_str(field: &[u8], what: &str) -> Result<String, FormatError> {
    let len = usize::from(field[0]);
    let max = field.len() - 1;
    if len > max {
        return Err(FormatError::malformed(format!(
            "{what} length {len} over {max}"
        )));
    }
    if field[1 + len..].iter().any(|&x| x != 0) {
        return Err(FormatError::malformed(format!(
            "{what} padding is not zero"
        )));
    }
    std::str::from_utf8(&field[1..1 + len])
        .map(str::to_owned)
        .map_err(|_| FormatError::malformed(format!("{what} is not UTF-8")))
}

const _: () = assert!(NAME_MAX + 1 == 32 && VERSION_MAX + 1 == 24);

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
