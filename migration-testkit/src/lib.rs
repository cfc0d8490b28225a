//! Placeholder, filled by a later change.
pub mod guest;
