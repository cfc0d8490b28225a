//! The error type every trait in this crate returns.
//!
//! [`MigratableError`] is an enum a caller can match on. Variants that concern one
//! component carry that component's path in the snapshot tree (`vm/devices/serial0`):
//! a component reports its own id, and every parent that forwards the error prepends
//! its id with [`MigratableError::within`].

use std::io;

use crate::box_error::BoxError;
use crate::codec::{CodecError, CodecId, CodecRegistry};
use crate::container::FormatError;
use crate::memory::MemoryError;
use crate::security::SecurityError;

/// Errors of pausing, snapshotting, restoring, sending and receiving components.
///
/// `path` fields hold the component path (`vm/devices/serial0`) where the error arose;
/// an empty path means the root.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigratableError {
    /// A component failed to pause.
    #[error("pause failed at `{path}`: {source}")]
    Pause {
        /// Path of the component.
        path: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// The destination of a migration could not build the VM the source announced
    /// (the `build` function of [`crate::destination`] failed: a config it cannot
    /// honour, a guest CPU this host lacks, no memory…). Sent to the source as the
    /// reason of its refusal.
    #[error("cannot build the VM: {0}")]
    Build(#[source] BoxError),
    /// A component failed to resume.
    #[error("resume failed at `{path}`: {source}")]
    Resume {
        /// Path of the component.
        path: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// A component failed to produce its snapshot.
    #[error("snapshot failed at `{path}`: {source}")]
    Snapshot {
        /// Path of the component.
        path: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// A component failed to restore from its snapshot.
    #[error("restore failed at `{path}`: {source}")]
    Restore {
        /// Path of the component.
        path: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// Sending a snapshot or a migration stream failed.
    #[error("send to `{url}` failed: {source}")]
    Send {
        /// Destination.
        url: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// Receiving a snapshot or a migration stream failed.
    #[error("receive from `{url}` failed: {source}")]
    Receive {
        /// Source.
        url: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// A section could not be encoded or decoded.
    #[error("section `{section}` of `{path}`: {source}")]
    Codec {
        /// Path of the component that owns the section.
        path: String,
        /// Section id.
        section: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// A section has a version this reader does not accept.
    #[error(
        "section `{section}` of `{path}` has version {found}; this reader accepts versions {min} to {max}"
    )]
    Version {
        /// Path of the component that owns the section.
        path: String,
        /// Section id.
        section: String,
        /// Version recorded in the snapshot.
        found: u32,
        /// Oldest version the reader can upgrade from.
        min: u32,
        /// Current version of the reader's state type.
        max: u32,
    },
    /// A section a component needs is not in its snapshot.
    #[error("`{path}` has no section `{section}`")]
    MissingSection {
        /// Path of the component.
        path: String,
        /// Section id.
        section: String,
    },
    /// A child snapshot a component needs is not in its snapshot.
    #[error("`{path}` has no child snapshot `{child}`")]
    MissingChild {
        /// Path of the parent component.
        path: String,
        /// Id of the missing child.
        child: String,
    },
    /// A snapshot was offered to a component with another id.
    #[error("snapshot `{found}` offered to component `{path}`")]
    IdMismatch {
        /// Path (id) of the component.
        path: String,
        /// Id of the snapshot it was given.
        found: String,
    },
    /// A snapshot holds sections encoded with codecs this reader has not
    /// registered: found before anything is restored.
    #[error(
        "the snapshot needs codecs [{}]; not registered here: [{}]",
        ids(.needed),
        ids(.missing)
    )]
    MissingCodecs {
        /// Every codec the snapshot's sections name, in id order.
        needed: Vec<CodecId>,
        /// Those the registry lacks.
        missing: Vec<CodecId>,
    },
    /// A checksum or structural check failed.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// No transport handles this URL's scheme.
    #[error("no transport for scheme `{scheme}` (in `{url}`)")]
    UnsupportedScheme {
        /// The whole URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A URL could not be parsed or lacks a part its scheme needs.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A snapshot container violates `docs/format.md` or this reader cannot read it.
    #[error("snapshot container: {0}")]
    Format(#[from] FormatError),
    /// Guest memory access failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// An I/O error outside any transport.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The endpoint's security policy refused: plaintext where it is not allowed, a
    /// failed TLS handshake or authorization (the reason named).
    #[error("security: {0}")]
    Security(SecurityError),
}

impl From<SecurityError> for MigratableError {
    /// A socket failure stays [`MigratableError::Io`]; the rest is [`MigratableError::Security`].
    fn from(e: SecurityError) -> Self {
        match e {
            SecurityError::Io(e) => Self::Io(e),
            other => Self::Security(other),
        }
    }
}

/// `Some(path)` of the variants that carry a component path, `None` for the rest:
/// the one list of them, for [`MigratableError::path`] (borrowed) and
/// `path_mut` (mutably borrowed).
macro_rules! with_path {
    ($e:expr) => {
        match $e {
            MigratableError::Pause { path, .. }
            | MigratableError::Resume { path, .. }
            | MigratableError::Snapshot { path, .. }
            | MigratableError::Restore { path, .. }
            | MigratableError::Codec { path, .. }
            | MigratableError::Version { path, .. }
            | MigratableError::MissingSection { path, .. }
            | MigratableError::MissingChild { path, .. }
            | MigratableError::IdMismatch { path, .. } => Some(path),
            _ => None,
        }
    };
}

/// `json, pcd1` (each id as [`CodecId`] displays it: text, or hex when not printable).
fn ids(ids: &[CodecId]) -> String {
    ids.iter()
        .map(CodecId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl MigratableError {
    /// Checks that `registry` has every codec in `needed` (the codecs a snapshot's
    /// sections name): [`MigratableError::MissingCodecs`] otherwise.
    pub fn check_codecs(
        needed: impl IntoIterator<Item = CodecId>,
        registry: &CodecRegistry,
    ) -> Result<(), Self> {
        let needed: std::collections::BTreeSet<CodecId> = needed.into_iter().collect();
        let missing: Vec<CodecId> = needed
            .iter()
            .filter(|id| registry.get(**id).is_none())
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Self::MissingCodecs {
            needed: needed.into_iter().collect(),
            missing,
        })
    }

    /// Prepends `id` to the component path of this error, if it has one.
    ///
    /// A parent calls this on errors from its children, so the error that reaches
    /// the caller names the full path (`vm/devices/serial0`).
    pub fn within(mut self, id: &str) -> Self {
        if let Some(path) = self.path_mut() {
            *path = if path.is_empty() {
                id.to_owned()
            } else {
                format!("{id}/{path}")
            };
        }
        self
    }

    /// The component path this error concerns, where known.
    pub fn path(&self) -> Option<&str> {
        with_path!(self).map(String::as_str)
    }

    fn path_mut(&mut self) -> Option<&mut String> {
        with_path!(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_builds_the_path_from_the_leaf_up() {
        let e = MigratableError::Restore {
            path: "serial0".into(),
            source: "bad register".into(),
        };
        let e = e.within("devices").within("vm");
        assert_eq!(e.path(), Some("vm/devices/serial0"));
        assert!(e.to_string().contains("vm/devices/serial0"), "{e}");
    }

    #[test]
    fn within_leaves_pathless_errors_alone() {
        let e = MigratableError::Integrity("crc".into()).within("vm");
        assert_eq!(e.path(), None);
    }
}
