//! [`FakeDevice`]: a device with real, versioned state and a nested sub-device.
//!
//! The device follows the Persist pattern: the live object ([`FakeDevice`]) and its
//! state ([`FakeDeviceState`], a plain serde struct) are separate types. Its state has
//! counters, a byte buffer (encoded as bytes with `serde_bytes`) and, since version
//! 2, an optional `features` field; version 1 payloads ([`FakeDeviceStateV1`]) are
//! upgraded on restore. Each device owns zero or more [`FakeQueue`]s, sub-devices
//! with their own snapshot node (`blk0/queue0`).
//!
//! [`FakeDevice::step`] mutates the state deterministically from a seed, so tests
//! build distinct states; [`FakeDevice::emulate_version`] makes the device write
//! version 1 sections, as an older build would (for golden files);
//! [`FakeDevice::fail_on`] makes one operation fail (for error-path tests).
//!
//! ```
//! use migration_core::Snapshottable;
//! use migration_testkit::FakeDevice;
//!
//! let mut blk = FakeDevice::new("blk0", 2);
//! blk.step(1);
//! let snapshot = blk.snapshot().unwrap();
//! assert!(snapshot.find("blk0/queue1").is_some());
//!
//! let mut fresh = FakeDevice::new("blk0", 2);
//! assert_ne!(fresh, blk);
//! fresh.restore(&snapshot).unwrap(); // typed state, no codec needed
//! assert_eq!(fresh, blk);
//! ```

use std::hash::Hash;

use migration_core::{MigratableError, Pausable, Section, Snapshot, Snapshottable, Versioned};
use serde::{Deserialize, Serialize};

use crate::rng::{Digest, Rng};

/// Version 1 of a fake device's state: no `features`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FakeDeviceStateV1 {
    /// Interrupts raised.
    pub interrupts: u64,
    /// Guest reads served.
    pub reads: u64,
    /// Guest writes served.
    pub writes: u64,
    /// A configuration register.
    pub config: u32,
    /// Buffered data.
    #[serde(with = "serde_bytes")]
    pub buffer: Vec<u8>,
}

impl Versioned for FakeDeviceStateV1 {
    const VERSION: u32 = 1;
}

/// The current (version 2) state of a fake device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FakeDeviceState {
    /// Interrupts raised.
    pub interrupts: u64,
    /// Guest reads served.
    pub reads: u64,
    /// Guest writes served.
    pub writes: u64,
    /// A configuration register.
    pub config: u32,
    /// Buffered data.
    #[serde(with = "serde_bytes")]
    pub buffer: Vec<u8>,
    /// Negotiated features: added in version 2, `None` when upgraded from version 1.
    pub features: Option<u64>,
}

impl Versioned for FakeDeviceState {
    const VERSION: u32 = 2;
    const MIN_VERSION: u32 = 1;

    fn upgrade(version: u32, section: &Section) -> Result<Self, MigratableError> {
        let old: FakeDeviceStateV1 = section.read_versioned(version)?;
        Ok(old.into())
    }
}

impl From<FakeDeviceStateV1> for FakeDeviceState {
    fn from(v1: FakeDeviceStateV1) -> Self {
        Self {
            interrupts: v1.interrupts,
            reads: v1.reads,
            writes: v1.writes,
            config: v1.config,
            buffer: v1.buffer,
            features: None,
        }
    }
}

impl From<FakeDeviceState> for FakeDeviceStateV1 {
    fn from(v2: FakeDeviceState) -> Self {
        Self {
            interrupts: v2.interrupts,
            reads: v2.reads,
            writes: v2.writes,
            config: v2.config,
            buffer: v2.buffer,
        }
    }
}

/// State of a [`FakeQueue`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FakeQueueState {
    /// Next descriptor the device consumes.
    pub head: u16,
    /// Next descriptor the driver fills.
    pub tail: u16,
    /// Descriptor addresses in flight.
    pub in_flight: Vec<u64>,
}

impl Versioned for FakeQueueState {
    const VERSION: u32 = 1;
}

/// Which operation [`FakeDevice::fail_on`] makes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOn {
    /// [`Pausable::pause`].
    Pause,
    /// [`Pausable::resume`].
    Resume,
    /// [`Snapshottable::snapshot`].
    Snapshot,
    /// [`Snapshottable::restore`].
    Restore,
}

/// An injected failure's message.
const INJECTED: &str = "injected failure (FakeDevice::fail_on)";

fn injected(op: FailOn, path: String) -> MigratableError {
    let source = INJECTED.into();
    match op {
        FailOn::Pause => MigratableError::Pause { path, source },
        FailOn::Resume => MigratableError::Resume { path, source },
        FailOn::Snapshot => MigratableError::Snapshot { path, source },
        FailOn::Restore => MigratableError::Restore { path, source },
    }
}

/// A sub-device of a [`FakeDevice`] (a virtqueue, say) with its own snapshot node.
///
/// Equality compares the id and the state (not the pause flag).
#[derive(Clone, Debug)]
pub struct FakeQueue {
    id: String,
    state: FakeQueueState,
    paused: bool,
}

impl PartialEq for FakeQueue {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.state == other.state
    }
}

impl Eq for FakeQueue {}

impl FakeQueue {
    /// A queue named `id` in its initial state.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            state: FakeQueueState::default(),
            paused: false,
        }
    }

    /// The state.
    pub fn state(&self) -> &FakeQueueState {
        &self.state
    }

    /// The state, for tests that set it directly.
    pub fn state_mut(&mut self) -> &mut FakeQueueState {
        &mut self.state
    }

    /// Advances the queue deterministically from `rng`.
    fn step(&mut self, rng: &mut Rng) {
        let n = rng.below(4) as u16 + 1;
        self.state.tail = self.state.tail.wrapping_add(n);
        self.state.head = self.state.head.wrapping_add(n - 1);
        self.state.in_flight.push(rng.next_u64() & !0xfff);
        if self.state.in_flight.len() > 8 {
            self.state.in_flight.remove(0);
        }
    }
}

impl Pausable for FakeQueue {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused = false;
        Ok(())
    }
}

impl Snapshottable for FakeQueue {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        s.add_state("state", self.state.clone());
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        snapshot.expect_id(&self.id)?;
        self.state = snapshot.state("state")?;
        Ok(())
    }
}

/// A fake device; see the [module docs](self).
///
/// Equality compares the id, the state and the queues (not the pause flag or
/// injected failures).
#[derive(Clone, Debug)]
pub struct FakeDevice {
    id: String,
    state: FakeDeviceState,
    queues: Vec<FakeQueue>,
    paused: bool,
    fail_on: Option<FailOn>,
    version: u32,
}

impl PartialEq for FakeDevice {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.state == other.state && self.queues == other.queues
    }
}

impl Eq for FakeDevice {}

impl FakeDevice {
    /// A device named `id` with `queues` sub-devices `queue0`, `queue1`, … in their
    /// initial state.
    pub fn new(id: impl Into<String>, queues: usize) -> Self {
        Self {
            id: id.into(),
            state: FakeDeviceState::default(),
            queues: (0..queues)
                .map(|i| FakeQueue::new(format!("queue{i}")))
                .collect(),
            paused: false,
            fail_on: None,
            version: FakeDeviceState::VERSION,
        }
    }

    /// Mutates the state and every queue deterministically from `seed` (and the
    /// device's id, so two devices stepped with one seed differ). Every step changes
    /// every field, `features` included.
    pub fn step(&mut self, seed: u64) {
        let mut id_hash = Digest::new();
        id_hash.bytes(self.id.as_bytes());
        let mut rng = Rng::new(seed ^ id_hash.finish());
        let s = &mut self.state;
        s.interrupts += rng.below(1000) + 1;
        s.reads += rng.below(1000) + 1;
        s.writes += rng.below(1000) + 1;
        s.config = s.config.wrapping_add(rng.next_u64() as u32 | 1);
        let len = rng.below(200) as usize + 1;
        let mut chunk = vec![0u8; len];
        rng.fill(&mut chunk);
        s.buffer.extend_from_slice(&chunk);
        if s.buffer.len() > 4096 {
            let excess = s.buffer.len() - 4096;
            s.buffer.drain(..excess);
        }
        s.features = Some(s.features.unwrap_or(0) ^ (rng.next_u64() | 1));
        for q in &mut self.queues {
            q.step(&mut rng);
        }
    }

    /// The device's state.
    pub fn state(&self) -> &FakeDeviceState {
        &self.state
    }

    /// The device's state, for tests that set it directly.
    pub fn state_mut(&mut self) -> &mut FakeDeviceState {
        &mut self.state
    }

    /// The sub-devices.
    pub fn queues(&self) -> &[FakeQueue] {
        &self.queues
    }

    /// The sub-devices, mutable.
    pub fn queues_mut(&mut self) -> &mut [FakeQueue] {
        &mut self.queues
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Makes `op` fail with an error naming this device (or stop failing: `None`).
    pub fn fail_on(&mut self, op: Option<FailOn>) {
        self.fail_on = op;
    }

    /// Writes the state section at `version` (1 or 2), as a build of that version
    /// would: version 1 drops `features`. Other versions are written as given, with
    /// the current layout, to test rejection of versions a reader does not know.
    pub fn emulate_version(&mut self, version: u32) {
        self.version = version;
    }

    /// A deterministic digest of the id, state and queues.
    pub fn content_digest(&self) -> u64 {
        let mut d = Digest::new();
        self.id.hash(&mut d);
        self.state.hash(&mut d);
        for q in &self.queues {
            q.id.hash(&mut d);
            q.state.hash(&mut d);
        }
        d.finish()
    }

    fn check(&self, op: FailOn) -> Result<(), MigratableError> {
        match self.fail_on {
            Some(f) if f == op => Err(injected(op, self.id.clone())),
            _ => Ok(()),
        }
    }
}

impl Pausable for FakeDevice {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.check(FailOn::Pause)?;
        for q in &mut self.queues {
            q.pause().map_err(|e| e.within(&self.id))?;
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.check(FailOn::Resume)?;
        for q in &mut self.queues {
            q.resume().map_err(|e| e.within(&self.id))?;
        }
        self.paused = false;
        Ok(())
    }
}

impl Snapshottable for FakeDevice {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        self.check(FailOn::Snapshot)?;
        let mut s = Snapshot::new(self.id());
        match self.version {
            1 => s.add_state_as("state", 1, FakeDeviceStateV1::from(self.state.clone())),
            v => s.add_state_as("state", v, self.state.clone()),
        };
        for q in &mut self.queues {
            s.snapshot_child(q)?;
        }
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        self.check(FailOn::Restore)?;
        snapshot.expect_id(&self.id)?;
        let state = snapshot.state("state")?;
        if let Some(extra) = snapshot
            .children()
            .find(|c| !self.queues.iter().any(|q| q.id == c.id()))
        {
            return Err(MigratableError::Restore {
                path: self.id.clone(),
                source: format!("unexpected child snapshot `{}`", extra.id()).into(),
            });
        }
        for q in &mut self.queues {
            snapshot.restore_child(q)?;
        }
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_changes_every_field_and_depends_on_the_id() {
        let mut a = FakeDevice::new("a", 1);
        let before = a.clone();
        a.step(3);
        let (s, b) = (a.state(), before.state());
        assert!(s.interrupts != b.interrupts && s.reads != b.reads && s.writes != b.writes);
        assert!(s.config != b.config && s.buffer != b.buffer && s.features.is_some());
        assert_ne!(a.queues()[0], before.queues()[0]);
        let mut other = FakeDevice::new("b", 1);
        other.step(3);
        assert_ne!(a.state(), other.state());
        let mut again = FakeDevice::new("a", 1);
        again.step(3);
        assert_eq!(a, again);
        assert_eq!(a.content_digest(), again.content_digest());
        assert_ne!(a.content_digest(), before.content_digest());
    }

    #[test]
    fn version_1_snapshot_restores_without_features() {
        let mut old = FakeDevice::new("d", 0);
        old.step(9);
        old.emulate_version(1);
        let snap = old.snapshot().unwrap();
        assert_eq!(snap.section("state").unwrap().version(), 1);
        let mut new = FakeDevice::new("d", 0);
        new.restore(&snap).unwrap();
        assert_eq!(new.state().features, None);
        assert_eq!(new.state().buffer, old.state().buffer);
    }

    #[test]
    fn newer_version_is_rejected_naming_path_and_versions() {
        let mut future = FakeDevice::new("d", 0);
        future.emulate_version(3);
        let snap = future.snapshot().unwrap();
        let err = FakeDevice::new("d", 0).restore(&snap).unwrap_err();
        assert!(
            matches!(&err, MigratableError::Version { path, found: 3, min: 1, max: 2, .. } if path == "d"),
            "{err}"
        );
    }

    #[test]
    fn injected_failures_and_mismatches_name_the_device() {
        let mut d = FakeDevice::new("blk0", 1);
        d.fail_on(Some(FailOn::Snapshot));
        assert_eq!(d.snapshot().unwrap_err().path(), Some("blk0"));
        d.fail_on(None);
        let snap = d.snapshot().unwrap();
        let err = FakeDevice::new("net0", 1).restore(&snap).unwrap_err();
        assert!(matches!(err, MigratableError::IdMismatch { .. }));
        let err = FakeDevice::new("blk0", 2).restore(&snap).unwrap_err();
        assert!(
            matches!(&err, MigratableError::MissingChild { path, child } if path == "blk0" && child == "queue1")
        );
        let err = FakeDevice::new("blk0", 0).restore(&snap).unwrap_err();
        assert!(
            err.to_string()
                .contains("unexpected child snapshot `queue0`"),
            "{err}"
        );
    }
}
