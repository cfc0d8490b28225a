//! proptest strategies for snapshot trees (feature `proptest`, on by default).
//!
//! A [`TreeSpec`] is a plain description of a tree: ids, sections (version and
//! payload bytes) and children. [`tree_spec`] generates them within a [`TreeShape`]
//! (depth, fan-out, sections per node, section sizes); [`TreeSpec::build`] turns one
//! into a [`Snapshot`] with typed sections, [`TreeSpec::build_encoded`] into one with
//! encoded sections, and [`TreeSpec::build_shuffled`] builds the same tree inserting
//! children and sections in a seeded order, for determinism tests.
//!
//! ```
//! use migration_testkit::strategies::{snapshot_tree, TreeShape};
//! use proptest::prelude::*;
//!
//! proptest! {
//!     #![proptest_config(ProptestConfig::with_cases(16))]
//!     // Put #[test] here in a test file.
//!     fn every_node_is_found_by_its_path(tree in snapshot_tree(TreeShape::default())) {
//!         for (path, _) in tree.walk() {
//!             prop_assert!(tree.find(&path).is_some());
//!         }
//!     }
//! }
//! # fn main() { every_node_is_found_by_its_path(); }
//! ```

use std::collections::BTreeMap;

use migration_core::{CodecId, Section, Snapshot};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

use crate::rng::Rng;

/// Bounds of generated trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeShape {
    /// Levels below the root.
    pub max_depth: u32,
    /// Children per node.
    pub max_children: usize,
    /// Sections per node.
    pub max_sections: usize,
    /// Payload bytes per section.
    pub max_section_len: usize,
    /// Section versions are drawn from `1..=max_version`.
    pub max_version: u32,
}

impl Default for TreeShape {
    fn default() -> Self {
        Self {
            max_depth: 3,
            max_children: 4,
            max_sections: 3,
            max_section_len: 64,
            max_version: 3,
        }
    }
}

/// One generated section: its version and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionSpec {
    /// Section version.
    pub version: u32,
    /// Payload: stored as a [`ByteBuf`] in typed sections, as the bytes themselves in
    /// encoded ones.
    pub data: Vec<u8>,
}

/// A description of a snapshot tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeSpec {
    /// The node's id.
    pub id: String,
    /// Sections by id.
    pub sections: BTreeMap<String, SectionSpec>,
    /// Children by id.
    pub children: BTreeMap<String, TreeSpec>,
}

impl TreeSpec {
    /// The tree with typed sections (`ByteBuf` state at the spec's version),
    /// inserted in id order.
    pub fn build(&self) -> Snapshot {
        self.build_with(
            &mut |v, d| Section::from_state(v, ByteBuf::from(d.to_vec())),
            None,
        )
    }

    /// The same tree, inserting sections and children in an order shuffled by
    /// `seed`: a determinism test compares it with [`build`](Self::build).
    pub fn build_shuffled(&self, seed: u64) -> Snapshot {
        let mut rng = Rng::new(seed);
        self.build_with(
            &mut |v, d| Section::from_state(v, ByteBuf::from(d.to_vec())),
            Some(&mut rng),
        )
    }

    /// The tree with sections already encoded: each payload is the spec's bytes,
    /// recorded as encoded by `codec` (unresolved; call `resolve_codecs`).
    pub fn build_encoded(&self, codec: CodecId) -> Snapshot {
        self.build_with(
            &mut |v, d| Section::from_encoded(v, codec, d.to_vec()),
            None,
        )
    }

    fn build_with(
        &self,
        section: &mut dyn FnMut(u32, &[u8]) -> Section,
        mut rng: Option<&mut Rng>,
    ) -> Snapshot {
        let mut node = Snapshot::new(self.id.clone());
        let mut sections: Vec<_> = self.sections.iter().collect();
        let mut children: Vec<_> = self.children.values().collect();
        if let Some(rng) = rng.as_deref_mut() {
            shuffle(&mut sections, rng);
            shuffle(&mut children, rng);
        }
        for (id, s) in sections {
            node.add_section(id.clone(), section(s.version, &s.data));
        }
        for child in children {
            node.add_child(child.build_with(section, rng.as_deref_mut()));
        }
        node
    }

    /// Paths of every node (`root/a/b`), parents first.
    pub fn paths(&self) -> Vec<String> {
        let mut out = vec![self.id.clone()];
        for c in self.children.values() {
            out.extend(c.paths().into_iter().map(|p| format!("{}/{p}", self.id)));
        }
        out
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        1 + self
            .children
            .values()
            .map(TreeSpec::node_count)
            .sum::<usize>()
    }
}

fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// Component and section ids: a lowercase letter then up to 11 of `[a-z0-9_]`.
pub fn component_id() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,11}"
}

/// Section payloads of up to `max_len` bytes.
pub fn section_data(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max_len)
}

fn section_spec(shape: TreeShape) -> impl Strategy<Value = SectionSpec> {
    (
        1..=shape.max_version.max(1),
        section_data(shape.max_section_len),
    )
        .prop_map(|(version, data)| SectionSpec { version, data })
}

fn node(shape: TreeShape) -> impl Strategy<Value = (String, BTreeMap<String, SectionSpec>)> {
    (
        component_id(),
        btree_map(component_id(), section_spec(shape), 0..=shape.max_sections),
    )
}

/// Trees within `shape`; the root's id is generated too.
pub fn tree_spec(shape: TreeShape) -> BoxedStrategy<TreeSpec> {
    let leaf = node(shape)
        .prop_map(|(id, sections)| TreeSpec {
            id,
            sections,
            children: BTreeMap::new(),
        })
        .boxed();
    if shape.max_depth == 0 {
        return leaf;
    }
    let inner = tree_spec(TreeShape {
        max_depth: shape.max_depth - 1,
        ..shape
    });
    (node(shape), vec(inner, 0..=shape.max_children))
        .prop_map(|((id, sections), kids)| {
            // Children are keyed by id: later duplicates replace earlier ones.
            let children = kids.into_iter().map(|c| (c.id.clone(), c)).collect();
            TreeSpec {
                id,
                sections,
                children,
            }
        })
        .boxed()
}

/// Snapshots with typed sections, within `shape`.
pub fn snapshot_tree(shape: TreeShape) -> impl Strategy<Value = Snapshot> {
    tree_spec(shape).prop_map(|t| t.build())
}

/// Snapshots whose sections are encoded, recorded as written by `codec`.
pub fn encoded_snapshot_tree(shape: TreeShape, codec: CodecId) -> impl Strategy<Value = Snapshot> {
    tree_spec(shape).prop_map(move |t| t.build_encoded(codec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::test_runner::TestRunner;

    #[test]
    fn specs_stay_within_shape_and_build_every_node() {
        let shape = TreeShape {
            max_depth: 2,
            max_children: 3,
            max_sections: 2,
            max_section_len: 8,
            max_version: 2,
        };
        let mut runner = TestRunner::deterministic();
        for _ in 0..64 {
            let spec = tree_spec(shape).new_tree(&mut runner).unwrap().current();
            let tree = spec.build();
            let paths: Vec<String> = tree.walk().map(|(p, _)| p).collect();
            let mut want = spec.paths();
            want.sort();
            let mut got = paths.clone();
            got.sort();
            assert_eq!(got, want);
            for (_, n) in tree.walk() {
                assert!(n.sections().count() <= 2);
                for (_, s) in n.sections() {
                    assert!((1..=2).contains(&s.version()));
                }
            }
            assert!(spec.node_count() <= 1 + 3 + 9);
        }
    }
}
