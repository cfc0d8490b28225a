//! [`Snapshottable`]: save a component's state into a [`Snapshot`] and restore it.

use crate::{MigratableError, Pausable, Snapshot};

/// A component whose state can be captured in a [`Snapshot`] and restored from one.
///
/// None of the methods has a default: a component that forgets one does not compile,
/// rather than "succeeding" with an empty snapshot.
///
/// The component never picks the codec. It adds typed state with
/// [`Snapshot::add_state`]; whoever takes the snapshot encodes it with the codec of
/// their choice ([`Snapshot::encode`]); restore decodes each section with the codec
/// recorded in it ([`Snapshot::state`]).
pub trait Snapshottable: Pausable {
    /// The component's id: its name among its siblings in the snapshot tree.
    fn id(&self) -> String;

    /// Captures the component's state. Called while the component is paused.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError>;

    /// Restores the component's state from `snapshot`, which [`snapshot`] produced
    /// (perhaps in another process, with an older version of the component).
    ///
    /// [`snapshot`]: Snapshottable::snapshot
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError>;
}
