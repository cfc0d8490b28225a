//! Placeholder until the vCPU state benchmark lands.
fn main() {}
