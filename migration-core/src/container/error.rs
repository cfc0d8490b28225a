//! [`FormatError`]: what a container reader rejects, and why.

/// A container that does not follow `docs/format.md`, or that this reader cannot read.
///
/// `what` fields name the part at fault: `header`, `metadata`, `section vm/cpu:regs`,
/// `run 3 (gpa 0x100000, 0x2000 bytes)`, …
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The first 8 bytes are not the container magic.
    #[error("not a snapshot container: magic is {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// Another major version, or a newer minor than this reader's.
    #[error(
        "container format {found_major}.{found_minor} is not supported: this reader reads {supported_major}.0 to {supported_major}.{supported_minor}"
    )]
    UnsupportedVersion {
        /// Major version in the container.
        found_major: u16,
        /// Minor version in the container.
        found_minor: u16,
        /// The only major this reader reads.
        supported_major: u16,
        /// The newest minor this reader reads.
        supported_minor: u16,
    },
    /// Header flags this reader does not know.
    #[error("unknown header flags {flags:#x}")]
    UnknownFlags {
        /// The unknown bits.
        flags: u32,
    },
    /// A checksum does not match.
    #[error("checksum mismatch in {what}: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum {
        /// The part whose checksum failed.
        what: String,
        /// Checksum stored in the container.
        stored: u64,
        /// Checksum of the bytes read.
        computed: u64,
    },
    /// The container ends before `what` does.
    #[error("truncated: the container ends inside {what}")]
    Truncated {
        /// The part that was cut.
        what: String,
    },
    /// A declared size or count is over its documented limit.
    #[error("{what} is {value}, over the limit of {limit}")]
    LimitExceeded {
        /// What was counted or measured.
        what: &'static str,
        /// The declared value.
        value: u64,
        /// The limit (`container::limits`).
        limit: u64,
    },
    /// Two extents, runs or records overlap, or are out of order.
    #[error("overlap or disorder: {what}")]
    Overlap {
        /// The parts that overlap.
        what: String,
    },
    /// A part declared to lie outside the file.
    #[error("{what} at [{offset:#x}, +{length:#x}) is outside the file of {file_len:#x} bytes")]
    OutOfFile {
        /// The part.
        what: String,
        /// Its declared offset.
        offset: u64,
        /// Its declared length.
        length: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Any other violation of the format: `what` says which rule.
    #[error("malformed container: {what}")]
    Malformed {
        /// The rule broken.
        what: String,
    },
    /// A snapshot or memory layout the writer cannot express in the format.
    #[error("cannot write container: {what}")]
    Unwritable {
        /// Why.
        what: String,
    },
}

impl FormatError {
    pub(crate) fn malformed(what: impl Into<String>) -> Self {
        Self::Malformed { what: what.into() }
    }

    pub(crate) fn truncated(what: impl Into<String>) -> Self {
        Self::Truncated { what: what.into() }
    }

    pub(crate) fn limit(what: &'static str, value: u64, limit: u64) -> Self {
        Self::LimitExceeded { what, value, limit }
    }
}
