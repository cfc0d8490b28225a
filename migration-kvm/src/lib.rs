//! Placeholder, filled by a later change.
pub mod dirty;
pub mod memory;
pub mod restore;
