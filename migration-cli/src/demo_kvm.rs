//! The demo on a KVM guest (filled in once `migration_kvm::KvmVm` lands).

use crate::demo::DemoArgs;

/// Placeholder until KvmVm lands: runs the fake target.
pub type KvmTarget = crate::demo_fake::FakeTarget;

#[allow(dead_code)]
fn _unused(_: &DemoArgs) {}
