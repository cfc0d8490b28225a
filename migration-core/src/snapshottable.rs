//! [`Snapshottable`]: save a component's state into a [`Snapshot`] and restore it.

use crate::error::MigratableError;
use crate::pausable::Pausable;
use crate::snapshot::Snapshot;

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

// Taking and restoring a child component belongs to this trait; it sits here, not in
// `snapshot.rs`, so that `snapshot.rs` does not import `Snapshottable` back (no circle).
impl Snapshot {
    /// Snapshots `component` and adds it as a child. An error names the component's
    /// path below this node.
    pub fn snapshot_child(
        &mut self,
        component: &mut (impl Snapshottable + ?Sized),
    ) -> Result<(), MigratableError> {
        let child = component.snapshot().map_err(|e| e.within(self.id()))?;
        self.add_child(child);
        Ok(())
    }

    /// Restores `component` from the child snapshot with its id. A missing child or an
    /// error from the component names the path below this node.
    pub fn restore_child(
        &self,
        component: &mut (impl Snapshottable + ?Sized),
    ) -> Result<(), MigratableError> {
        let id = component.id();
        let child = self.child(&id)?;
        component.restore(child).map_err(|e| e.within(self.id()))
    }
}
