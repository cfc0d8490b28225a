//! [`registry`]: every codec this build enables, ready to decode any snapshot.

use migration_core::CodecRegistry;

/// A registry holding every codec enabled in this build. The preferred codec (used to
/// encode) is postcard if enabled, then bincode, then JSON.
///
/// ```
/// let registry = migration_serde::registry();
/// # #[cfg(all(feature = "postcard", feature = "json"))] {
/// assert_eq!(registry.preferred().unwrap().id(), migration_serde::POSTCARD_ID);
/// assert!(registry.get(migration_serde::JSON_ID).is_some());
/// # }
/// ```
pub fn registry() -> CodecRegistry {
    let mut registry = CodecRegistry::new();
    register_all(&mut registry);
    registry
}

/// Adds every codec enabled in this build to `registry`, replacing codecs with the
/// same ids. The first one added (postcard, then bincode, then JSON) becomes the
/// preferred codec only if `registry` had none.
#[cfg_attr(
    not(any(feature = "json", feature = "bincode", feature = "postcard")),
    allow(unused_variables)
)]
pub fn register_all(registry: &mut CodecRegistry) {
    #[cfg(feature = "postcard")]
    registry.register(std::sync::Arc::new(crate::postcard::PostcardCodec));
    #[cfg(feature = "bincode")]
    registry.register(std::sync::Arc::new(crate::bincode::BincodeCodec));
    #[cfg(feature = "json")]
    registry.register(std::sync::Arc::new(crate::json::JsonCodec::new()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn register_all_keeps_an_existing_preference() {
        let mut r = CodecRegistry::new();
        r.register(Arc::new(crate::json::JsonCodec::pretty()));
        register_all(&mut r);
        assert_eq!(r.preferred().map(|c| c.id()), Some(crate::json::JSON_ID));
        assert_eq!(r.iter().count(), 3);
        // Replaced by the compact one; both share the id.
        assert_eq!(r.require(crate::json::JSON_ID).unwrap().name(), "json");
    }
}
