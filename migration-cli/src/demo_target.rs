//! What `vmsnap demo` runs on, shared by the flow ([`demo`](crate::demo)) and the two
//! targets ([`demo_kvm`](crate::demo_kvm), [`demo_fake`](crate::demo_fake)): its
//! options, the [`DemoTarget`] trait and the guest's verdict ([`Check`]). The flow
//! imports the targets and both import this module, never each other.

use std::path::{Path, PathBuf};

use clap::Args;
use migration_core::{IncomingVm, Migratable, MigratableError, MigrationOptions, ReceiveOptions};

use migration_testkit::guest::smp::SMP_MAX_VCPUS;

use crate::report::parse_size;

/// Options of `vmsnap demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run this flat guest binary (docs/guest-abi.md) instead of the built-in guest.
    #[arg(long, value_name = "FILE")]
    pub guest: Option<PathBuf>,
    /// Guest memory size (e.g. 64M, 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// vCPUs of the KVM guest: with more than one, the built-in guest is the SMP
    /// guest (its vCPUs woken with INIT-SIPI-SIPI), and a `--guest` file has every
    /// vCPU started at its entry point (docs/guest-abi.md §9).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SMP_MAX_VCPUS)))]
    pub vcpus: u32,
    /// Only snapshot and restore (no live migration).
    #[arg(long, conflicts_with = "migrate_only")]
    pub snapshot_only: bool,
    /// Only live-migrate (no snapshot).
    #[arg(long)]
    pub migrate_only: bool,
    /// Number of live migrations, each from the last destination to a fresh VM.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub rounds: u32,
    /// Write the snapshot file into DIR and keep it (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Live-migrate over mutual TLS on `tls://127.0.0.1` (instead of a unix socket
    /// pair), with a throwaway CA and certificates made at run time (docs/security.md).
    #[arg(long)]
    pub tls: bool,
    /// Live-migrate over mutual TLS with the certificates in DIR (Cloud Hypervisor's
    /// layout: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; the server certificate must be valid for 127.0.0.1 or
    /// localhost). Implies --tls.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Accept only this peer (repeatable): `name:<CN or DNS name>` or
    /// `spki-sha256:<hex>`. Checked on both sides. Implies --tls.
    #[arg(long, value_name = "ID")]
    pub allow_peer: Vec<String>,
    /// Write an SVG picture of the (last) migration's rounds to FILE: bytes sent,
    /// dirty rate, bandwidth, throttle, downtime.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Throttle the guest while precopy does not converge (20 %, +10 % a round, at
    /// most 99 %).
    #[arg(long)]
    pub auto_converge: bool,
    /// Limit the loopback link to RATE bytes per second (e.g. 50M), so a busy guest
    /// outruns it.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub link: Option<u64>,
}

impl DemoArgs {
    /// Whether the demo migrates over TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls || self.tls_dir.is_some() || !self.allow_peer.is_empty()
    }
}

/// The guest's verdict after a step.
#[derive(Debug, Clone)]
pub struct Check {
    /// Whether the guest continued correctly.
    pub ok: bool,
    /// What it reported.
    pub detail: String,
}

/// Builds a migration destination from the source's HELLO.
pub type BuildFn<V> = Box<dyn FnOnce(&IncomingVm) -> Result<V, MigratableError> + Send + 'static>;

/// What the demo runs on: a KVM guest or a fake VM.
pub trait DemoTarget {
    /// The VM type.
    type Vm: Migratable + Send + 'static;
    /// One line describing the guest.
    fn describe(&self) -> String;
    /// Guest memory size.
    fn guest_memory(&self) -> u64;
    /// Boots the guest; it runs when this returns.
    fn boot(&mut self) -> anyhow::Result<Self::Vm>;
    /// Lets `vm` run a little and asks the guest whether it continued correctly: its
    /// self-checks hold and its progress went on from `mark` (the progress at the last
    /// check of this VM, or of the snapshot or VM it came from), which is updated.
    /// `vm` runs again when this returns.
    fn check(&mut self, vm: &mut Self::Vm, mark: &mut u64) -> anyhow::Result<Check>;
    /// Pauses `vm`, writes a snapshot (state and memory) to `path`, resumes it.
    /// Returns the guest's progress in the snapshot.
    fn snapshot(&mut self, vm: &mut Self::Vm, path: &Path) -> anyhow::Result<u64>;
    /// A fresh VM restored from `path`, running.
    fn restore(&mut self, path: &Path) -> anyhow::Result<Self::Vm>;
    /// Builds migration destinations from the source's HELLO.
    fn destination(&self) -> BuildFn<Self::Vm>;
    /// Options to migrate `vm` (without the progress callback).
    fn migration_options(&self, vm: &Self::Vm) -> MigrationOptions;
    /// Receive options.
    fn receive_options(&self) -> ReceiveOptions;
}
