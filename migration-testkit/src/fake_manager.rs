//! [`FakeDeviceManager`]: a tree of [`FakeDevice`]s under one snapshot node.
//!
//! The manager's id is `devices`; each device is a child node (`devices/serial0`,
//! `devices/blk0`, `devices/blk0/queue0`, …). Pause, resume, snapshot and restore
//! delegate to every device in id order, and errors carry the full path
//! (`devices/blk0/queue1`), through [`Snapshot::snapshot_child`] and
//! [`Snapshot::restore_child`].
//!
//! ```
//! use migration_core::Snapshottable;
//! use migration_testkit::FakeDeviceManager;
//!
//! let mut devices = FakeDeviceManager::standard();
//! devices.step(5);
//! let snapshot = devices.snapshot().unwrap();
//! assert!(snapshot.find("devices/blk0/queue1").is_some());
//!
//! let mut fresh = FakeDeviceManager::standard();
//! fresh.restore(&snapshot).unwrap();
//! assert_eq!(fresh, devices);
//! ```

use std::collections::BTreeMap;

use migration_core::{MigratableError, Pausable, Snapshot, Snapshottable};

use crate::fake_device::FakeDevice;
use crate::rng::Digest;

/// Owns fake devices by id; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeDeviceManager {
    id: String,
    devices: BTreeMap<String, FakeDevice>,
}

impl Default for FakeDeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeDeviceManager {
    /// A manager with id `devices` and no device.
    pub fn new() -> Self {
        Self {
            id: "devices".into(),
            devices: BTreeMap::new(),
        }
    }

    /// The standard tree: `serial0` (no queue), `blk0` (2 queues), `net0` (2 queues).
    pub fn standard() -> Self {
        Self::new()
            .with_device(FakeDevice::new("serial0", 0))
            .with_device(FakeDevice::new("blk0", 2))
            .with_device(FakeDevice::new("net0", 2))
    }

    /// Adds (or replaces) a device, keyed by its id.
    pub fn with_device(mut self, device: FakeDevice) -> Self {
        self.add(device);
        self
    }

    /// Adds (or replaces) a device, keyed by its id, returning the one replaced.
    pub fn add(&mut self, device: FakeDevice) -> Option<FakeDevice> {
        self.devices.insert(device.id(), device)
    }

    /// The device `id`.
    pub fn device(&self, id: &str) -> Option<&FakeDevice> {
        self.devices.get(id)
    }

    /// The device `id`, mutable.
    pub fn device_mut(&mut self, id: &str) -> Option<&mut FakeDevice> {
        self.devices.get_mut(id)
    }

    /// The devices in id order.
    pub fn devices(&self) -> impl Iterator<Item = &FakeDevice> {
        self.devices.values()
    }

    /// A fresh manager with the same devices (ids and queue counts) in their initial
    /// state: what a restore destination builds.
    pub fn fresh_copy(&self) -> Self {
        let mut m = Self::new();
        for d in self.devices.values() {
            m.add(FakeDevice::new(d.id(), d.queues().len()));
        }
        m
    }

    /// Steps every device with `seed` (see [`FakeDevice::step`]).
    pub fn step(&mut self, seed: u64) {
        for d in self.devices.values_mut() {
            d.step(seed);
        }
    }

    /// A deterministic digest of every device.
    pub fn content_digest(&self) -> u64 {
        let mut d = Digest::new();
        for dev in self.devices.values() {
            d.word(dev.content_digest());
        }
        d.finish()
    }
}

impl Pausable for FakeDeviceManager {
    fn pause(&mut self) -> Result<(), MigratableError> {
        for d in self.devices.values_mut() {
            d.pause().map_err(|e| e.within(&self.id))?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        for d in self.devices.values_mut() {
            d.resume().map_err(|e| e.within(&self.id))?;
        }
        Ok(())
    }
}

impl Snapshottable for FakeDeviceManager {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut s = Snapshot::new(self.id());
        for d in self.devices.values_mut() {
            s.snapshot_child(d)?;
        }
        Ok(s)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        snapshot.expect_id(&self.id)?;
        if let Some(extra) = snapshot
            .children()
            .find(|c| !self.devices.contains_key(c.id()))
        {
            return Err(MigratableError::Restore {
                path: self.id.clone(),
                source: format!("snapshot has device `{}`, which this VM lacks", extra.id()).into(),
            });
        }
        for d in self.devices.values_mut() {
            snapshot.restore_child(d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_device::FailOn;

    #[test]
    fn errors_name_the_full_path() {
        let mut m = FakeDeviceManager::standard();
        m.device_mut("blk0")
            .unwrap()
            .fail_on(Some(FailOn::Snapshot));
        assert_eq!(m.snapshot().unwrap_err().path(), Some("devices/blk0"));

        let mut m = FakeDeviceManager::standard();
        let mut snap = m.snapshot().unwrap();
        // A restore target with more queues than the snapshot: names the queue.
        let mut bigger = FakeDeviceManager::standard().with_device(FakeDevice::new("blk0", 3));
        let err = bigger.restore(&snap).unwrap_err();
        assert_eq!(err.path(), Some("devices/blk0"), "{err}");
        assert!(err.to_string().contains("queue2"), "{err}");
        // A snapshot with a device the target lacks.
        snap.add_child(Snapshot::new("gpu0"));
        let err = m.restore(&snap).unwrap_err();
        assert!(err.to_string().contains("gpu0"), "{err}");
    }

    #[test]
    fn restore_brings_back_every_device() {
        let mut m = FakeDeviceManager::standard();
        m.step(1);
        m.step(2);
        let snap = m.snapshot().unwrap();
        let mut fresh = m.fresh_copy();
        assert_ne!(fresh, m);
        fresh.restore(&snap).unwrap();
        assert_eq!(fresh, m);
        assert_eq!(fresh.content_digest(), m.content_digest());
    }
}
