//! [`BoxError`]: a component's or a backend's error, typed at its origin and erased
//! here so the traits stay object safe.
//!
//! Its own module because every error type of this crate holds one
//! ([`MigratableError`](crate::error::MigratableError), [`CodecError`](crate::codec::CodecError),
//! [`MemoryError`](crate::memory::MemoryError)): a leaf they all import, so none of
//! them imports another to get it.

/// A boxed error from a component or a transport: typed at its origin, erased here so
/// the traits stay object safe. Downcast it to recover the concrete type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
