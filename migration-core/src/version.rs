//! Section versions: what a reader accepts, and how it upgrades older payloads.
//!
//! A state type declares its current [`VERSION`](Versioned::VERSION) and the oldest
//! version it can still read ([`MIN_VERSION`](Versioned::MIN_VERSION)), like QEMU's
//! `version_id` and `minimum_version_id`. For each older version it implements
//! [`upgrade`](Versioned::upgrade): decode the payload as the older type and convert.
//! Chains stay short because each version's type upgrades from its predecessor:
//!
//! ```
//! use migration_core::{MigratableError, Section, Versioned};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct UartV1 { lcr: u8 }
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Uart { lcr: u8, fifo_enabled: bool } // version 2 added `fifo_enabled`
//!
//! impl Versioned for UartV1 { const VERSION: u32 = 1; }
//!
//! impl Versioned for Uart {
//!     const VERSION: u32 = 2;
//!     const MIN_VERSION: u32 = 1;
//!     fn upgrade(version: u32, section: &Section) -> Result<Self, MigratableError> {
//!         let old: UartV1 = section.read_versioned(version)?; // recurses for older ones
//!         Ok(Uart { lcr: old.lcr, fifo_enabled: false })
//!     }
//! }
//! ```
//!
//! A version newer than `VERSION` or older than `MIN_VERSION` is
//! [`MigratableError::Version`], naming the section path and both versions.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::MigratableError;
use crate::section::Section;

/// A state type stored in a versioned section.
pub trait Versioned: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The version this type encodes as.
    const VERSION: u32;

    /// The oldest version [`upgrade`](Versioned::upgrade) accepts.
    const MIN_VERSION: u32 = Self::VERSION;

    /// Builds the current state from `section`, whose payload is at `version`
    /// (`MIN_VERSION <= version < VERSION`). The default refuses every older version;
    /// a type that lowers `MIN_VERSION` must override it.
    fn upgrade(version: u32, section: &Section) -> Result<Self, MigratableError> {
        let _ = section;
        Err(MigratableError::Version {
            path: String::new(),
            section: String::new(),
            found: version,
            min: Self::VERSION,
            max: Self::VERSION,
        })
    }
}

// Reading a section at a version is this module's concept; it sits here, not in
// `section.rs`, so that `section.rs` does not import `Versioned` back (no circle).
impl Section {
    /// Reads the payload as `T`, which the caller knows to be at `version`: decodes
    /// directly at `T::VERSION`, upgrades from older accepted versions through
    /// [`Versioned::upgrade`], and rejects the rest with [`MigratableError::Version`]
    /// (path and section filled in by the snapshot that owns this section).
    pub fn read_versioned<T: Versioned>(&self, version: u32) -> Result<T, MigratableError> {
        let reject = || MigratableError::Version {
            path: String::new(),
            section: String::new(),
            found: version,
            min: T::MIN_VERSION,
            max: T::VERSION,
        };
        if version == T::VERSION {
            self.decode::<T>().map_err(|source| MigratableError::Codec {
                path: String::new(),
                section: String::new(),
                source,
            })
        } else if version >= T::MIN_VERSION && version < T::VERSION {
            T::upgrade(version, self).map_err(|e| match e {
                // An upgrade hook refusing the version reports this type's range.
                MigratableError::Version { .. } => reject(),
                other => other,
            })
        } else {
            Err(reject())
        }
    }
}
