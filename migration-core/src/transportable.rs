//! [`Transportable`]: send a snapshot to a URL and receive one from it.

use crate::codec::CodecRegistry;
use crate::error::MigratableError;
use crate::snapshot::Snapshot;
use crate::snapshottable::Snapshottable;
use crate::transport;

/// A component whose snapshots travel to and from URLs (`file://`, `tcp://`, `unix://`).
///
/// The defaults delegate to this crate's [`transport`] module; a URL whose scheme no
/// transport handles is [`MigratableError::UnsupportedScheme`], never `Ok`.
pub trait Transportable: Snapshottable {
    /// The codecs this component's owner uses: the preferred one encodes sections
    /// that are still typed state on [`send`](Transportable::send), and all of them
    /// are available to decode received sections.
    fn codecs(&self) -> &CodecRegistry;

    /// Sends `snapshot` to `destination_url`.
    fn send(&self, snapshot: &Snapshot, destination_url: &str) -> Result<(), MigratableError> {
        transport::send_snapshot(snapshot, destination_url, self.codecs())
    }

    /// Receives a snapshot from `source_url`, with each section's codec resolved
    /// through [`codecs`](Transportable::codecs).
    fn recv(&self, source_url: &str) -> Result<Snapshot, MigratableError> {
        transport::recv_snapshot(source_url, self.codecs())
    }
}
