//! [`Pausable`]: stop and restart a component's activity.

use crate::error::MigratableError;

/// A component whose activity can be stopped and restarted.
///
/// A paused component must not change its state (or guest memory) until it is resumed:
/// a snapshot taken while paused is then consistent. Both methods are required; a
/// component with no activity of its own says so by returning `Ok(())` explicitly.
pub trait Pausable {
    /// Stops the component's activity. Its state is stable once this returns.
    fn pause(&mut self) -> Result<(), MigratableError>;

    /// Restarts the component's activity after [`pause`](Pausable::pause).
    fn resume(&mut self) -> Result<(), MigratableError>;
}
