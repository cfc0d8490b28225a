//! The format's size limits (`docs/format.md` §8). A reader checks every declared
//! length against these before it allocates.

/// Largest metadata block, CRC included.
pub const MAX_METADATA_LEN: u64 = 16 << 20;
/// Largest section payload.
pub const MAX_SECTION_LEN: u64 = 64 << 20;
/// Largest sum of all section payloads.
pub const MAX_PAYLOAD_LEN: u64 = 1 << 30;
/// Most nodes in a snapshot tree.
pub const MAX_NODES: u64 = 65536;
/// Most sections in a snapshot tree.
pub const MAX_SECTIONS: u64 = 65536;
/// Deepest tree (the root is depth 1).
pub const MAX_DEPTH: usize = 32;
/// Longest node or section id, in bytes.
pub const MAX_ID_LEN: usize = 255;
/// Most memory extents.
pub const MAX_EXTENTS: u64 = 4096;
/// Most data runs in a file-form run table.
pub const MAX_RUNS: u64 = 4 << 20;
/// Largest stream-form DATA record.
pub const MAX_RECORD_LEN: u64 = 4 << 20;
