//! Test kit for VM snapshot, restore and live migration: fakes, fault-injecting
//! transports, conformance harnesses for components and codecs, proptest strategies
//! and KVM test gating.
//!
//! Add it to `[dev-dependencies]` and test your device in ten lines:
//!
//! ```
//! use migration_testkit::{Conformance, FakeDevice};
//!
//! // Your device here: any `Snapshottable`. Give it a state a fresh one lacks...
//! let mut device = FakeDevice::new("blk0", 2);
//! device.step(1);
//! // ...then check round trip, determinism and corruption with every codec.
//! Conformance::new(migration_serde::registry())
//!     .check(&mut device, || FakeDevice::new("blk0", 2))
//!     .unwrap();
//! ```
//!
//! A failure names the property and the path of the section at fault, e.g.
//! ``round trip (codec json): `blk0/queue1`: restored instance snapshots
//! differently: section `state` of `blk0/queue1`: payloads differ at byte 9``.
//!
//! # Map
//! - [`conformance`]: the harness for a `Snapshottable`, one call per property
//!   ([`Conformance`] runs them).
//! - [`codec_conformance`]: the suite every `Codec` passes (`migration-serde`'s and
//!   yours): [`check_codec`](codec_conformance::check_codec).
//! - [`FakeDevice`] (versioned state, a nested [`FakeQueue`]), [`FakeDeviceManager`]
//!   (a device tree), [`FakeMemory`] (sparse guest memory with a dirty bitmap) and
//!   [`FakeVm`] (a [`Migratable`](migration_core::Migratable) VM with a
//!   self-verifying background workload): enough to drive snapshot, restore and
//!   live migration end to end without KVM.
//! - [`recording_vcpu`] and [`recording_machine`]: fake KVM vCPUs and VM (one, or a
//!   machine of several) that record the order of every call, for migration-kvm's
//!   order tables.
//! - [`fault`]: readers, writers and streams that truncate, flip bits, stall, close
//!   or fail on a plan, deterministic from a seed.
//! - [`strategies`]: proptest strategies for snapshot trees (feature `proptest`).
//! - [`kvm`]: [`require_kvm!`] and [`skip_unless_kvm`] for KVM-gated tests.
//! - [`netns`]: two network namespaces joined by a shaped veth pair, for
//!   migrations between processes on different "hosts".
//! - [`relay`]: a TCP man in the middle that flips a byte or cuts a connection at an
//!   offset (tampering with a TLS stream).
//! - [`test_pki`]: throwaway CA and certificates (valid, expired, not yet valid,
//!   another CA's) for TLS tests and `vmsnap demo --tls`.
//! - [`Rng`]: the deterministic generator behind every seed.
//! - [`fuzz_bodies`]: the fuzz targets' bodies (container, protocol, KVM state codecs,
//!   memory ranges) and their seeds, run by `fuzz/` and as proptests.

#![warn(missing_docs)]
#![warn(missing_debug_implementations)]

pub mod bench;
pub mod codec_conformance;
pub mod conformance;
pub mod fake_device;
pub mod fake_manager;
pub mod fake_memory;
pub mod fake_missing;
pub mod fake_vm;
pub mod fault;
pub mod fuzz_bodies;
pub mod guest;
pub mod kvm;
pub mod netns;
pub mod recording_machine;
pub mod recording_vcpu;
pub mod relay;
pub mod rng;
pub mod shaped;
#[cfg(feature = "proptest")]
pub mod strategies;
pub mod test_pki;

pub use conformance::{Conformance, ConformanceError, Property};
pub use fake_device::{FailOn, FakeDevice, FakeDeviceState, FakeDeviceStateV1, FakeQueue};
pub use fake_manager::FakeDeviceManager;
pub use fake_memory::FakeMemory;
pub use fake_vm::{assert_source_intact, FakeVm, FakeVmBuilder, WorkloadState};
pub use fault::{Fault, FaultPlan, FaultyReader, FaultyStream, FaultyWriter};
pub use kvm::{kvm_available, skip_unless_kvm};
pub use rng::Rng;

/// This crate's README (the page a registry shows), its examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
