//! [`Snapshot`]: the tree of component states.
//!
//! A snapshot node has the id of the component that made it, child snapshots keyed by
//! the children's ids, and data [`Section`]s keyed by section id. Both live in ordered
//! maps, so a tree encodes to the same bytes whatever order it was built in.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::de::{self, Deserializer};
use serde::ser::{self, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use crate::codec::{Codec, CodecError, CodecId, CodecRegistry};
use crate::error::MigratableError;
use crate::section::Section;
use crate::version::Versioned;

/// The snapshot of one component and, recursively, of its children.
///
/// ```
/// use migration_core::Snapshot;
///
/// let mut vm = Snapshot::new("vm");
/// let mut devices = Snapshot::new("devices");
/// devices.add_child(Snapshot::new("serial0"));
/// vm.add_child(devices);
/// assert!(vm.find("vm/devices/serial0").is_some());
/// let paths: Vec<String> = vm.walk().map(|(path, _)| path).collect();
/// assert_eq!(paths, ["vm", "vm/devices", "vm/devices/serial0"]);
/// ```
#[derive(Clone, Debug)]
pub struct Snapshot {
    id: String,
    children: BTreeMap<String, Snapshot>,
    sections: BTreeMap<String, Section>,
}

impl Snapshot {
    /// An empty snapshot for the component `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            children: BTreeMap::new(),
            sections: BTreeMap::new(),
        }
    }

    /// The id of the component this snapshot belongs to.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Checks that this is the snapshot of component `id`, as a component's
    /// `restore` does first: [`MigratableError::IdMismatch`] otherwise.
    pub fn expect_id(&self, id: &str) -> Result<(), MigratableError> {
        if self.id == id {
            Ok(())
        } else {
            Err(MigratableError::IdMismatch {
                path: id.to_owned(),
                found: self.id.clone(),
            })
        }
    }

    /// Adds (or replaces) a child snapshot, keyed by its id.
    pub fn add_child(&mut self, child: Snapshot) -> Option<Snapshot> {
        self.children.insert(child.id.clone(), child)
    }

    /// The child snapshot `id`, or [`MigratableError::MissingChild`].
    pub fn child(&self, id: &str) -> Result<&Snapshot, MigratableError> {
        self.children
            .get(id)
            .ok_or_else(|| MigratableError::MissingChild {
                path: self.id.clone(),
                child: id.to_owned(),
            })
    }

    /// The child snapshots, in id order.
    pub fn children(&self) -> impl Iterator<Item = &Snapshot> {
        self.children.values()
    }

    /// Adds typed `state` as section `id` at version `T::VERSION`, to be encoded with
    /// whatever codec the snapshot's taker chooses.
    pub fn add_state<T: Versioned>(&mut self, id: impl Into<String>, state: T) -> Option<Section> {
        self.add_section(id, Section::from_state(T::VERSION, state))
    }

    /// Adds `state` as section `id` with an explicit `version`: for golden files of
    /// older versions and for state types that do not implement [`Versioned`].
    pub fn add_state_as<T: Serialize + Any + Send + Sync>(
        &mut self,
        id: impl Into<String>,
        version: u32,
        state: T,
    ) -> Option<Section> {
        self.add_section(id, Section::from_state(version, state))
    }

    /// Adds (or replaces) a section.
    pub fn add_section(&mut self, id: impl Into<String>, section: Section) -> Option<Section> {
        self.sections.insert(id.into(), section)
    }

    /// The section `id`, or [`MigratableError::MissingSection`].
    pub fn section(&self, id: &str) -> Result<&Section, MigratableError> {
        self.sections
            .get(id)
            .ok_or_else(|| MigratableError::MissingSection {
                path: self.id.clone(),
                section: id.to_owned(),
            })
    }

    /// The sections, in id order.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Section)> {
        self.sections.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Reads section `id` as `T`, upgrading an older accepted version. Errors name this
    /// snapshot's id and the section: a missing section, an unknown codec, a payload
    /// that does not decode, or a version outside `T::MIN_VERSION..=T::VERSION`.
    pub fn state<T: Versioned>(&self, id: &str) -> Result<T, MigratableError> {
        let section = self.section(id)?;
        section
            .read_versioned::<T>(section.version())
            .map_err(|e| self.locate(e, id))
    }

    /// Fills in the path and section of errors a [`Section`] cannot know.
    fn locate(&self, e: MigratableError, section_id: &str) -> MigratableError {
        match e {
            MigratableError::Version {
                path,
                section,
                found,
                min,
                max,
            } if path.is_empty() && section.is_empty() => MigratableError::Version {
                path: self.id.clone(),
                section: section_id.to_owned(),
                found,
                min,
                max,
            },
            MigratableError::Codec {
                path,
                section,
                source,
            } if path.is_empty() && section.is_empty() => MigratableError::Codec {
                path: self.id.clone(),
                section: section_id.to_owned(),
                source,
            },
            other => other,
        }
    }

    /// The node at `path`: ids joined by `/`, starting with this node's id
    /// (`vm/devices/serial0`).
    pub fn find(&self, path: &str) -> Option<&Snapshot> {
        let mut parts = path.split('/');
        if parts.next()? != self.id {
            return None;
        }
        parts.try_fold(self, |node, part| node.children.get(part))
    }

    /// Every node depth-first, parents before children and siblings in id order, with
    /// its path.
    pub fn walk(&self) -> impl Iterator<Item = (String, &Snapshot)> {
        let mut stack = vec![(self.id.clone(), self)];
        std::iter::from_fn(move || {
            let (path, node) = stack.pop()?;
            for child in node.children.values().rev() {
                stack.push((format!("{path}/{}", child.id), child));
            }
            Some((path, node))
        })
    }

    /// Encodes every section that still holds typed state with `codec`. An error names
    /// the section's path.
    pub fn encode(&mut self, codec: &Arc<dyn Codec>) -> Result<(), MigratableError> {
        for (id, section) in &mut self.sections {
            section
                .encode(codec)
                .map_err(|source| MigratableError::Codec {
                    path: self.id.clone(),
                    section: id.clone(),
                    source,
                })?;
        }
        for child in self.children.values_mut() {
            child.encode(codec).map_err(|e| e.within(&self.id))?;
        }
        Ok(())
    }

    /// Resolves every encoded section's codec id through `registry`, so restore can
    /// decode it. Ids the registry lacks stay unresolved and fail when read.
    pub fn resolve_codecs(&mut self, registry: &CodecRegistry) {
        for section in self.sections.values_mut() {
            section.resolve(registry);
        }
        for child in self.children.values_mut() {
            child.resolve_codecs(registry);
        }
    }

    /// The codecs the encoded sections of the whole tree name: what a reader must
    /// have registered to restore it.
    pub fn required_codecs(&self) -> BTreeSet<CodecId> {
        self.walk()
            .flat_map(|(_, node)| node.sections.values().filter_map(Section::codec_id))
            .collect()
    }

    /// Checks that `registry` has every codec the tree needs
    /// ([`required_codecs`](Self::required_codecs)), before anything is restored:
    /// [`MigratableError::MissingCodecs`] lists them otherwise.
    pub fn check_codecs(&self, registry: &CodecRegistry) -> Result<(), MigratableError> {
        MigratableError::check_codecs(self.required_codecs(), registry)
    }

    /// Whether every section in the tree is encoded.
    pub fn is_encoded(&self) -> bool {
        self.walk()
            .all(|(_, node)| node.sections.values().all(Section::is_encoded))
    }
}

/// Serialized form of an encoded section.
#[derive(Serialize, Deserialize)]
struct WireSection<'a> {
    version: u32,
    codec: u32,
    #[serde(borrow, with = "serde_bytes")]
    payload: std::borrow::Cow<'a, [u8]>,
}

/// Serializes an **encoded** tree (ids, children, sections with version, codec id and
/// payload). A section still holding typed state is a serialization error: call
/// [`Snapshot::encode`] first. Deserialized sections have unresolved codecs: call
/// [`Snapshot::resolve_codecs`].
///
/// This is the tree as data, e.g. for JSON dumps; the container format (with
/// checksums and memory extents) is in [`crate::container`].
impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut sections = BTreeMap::new();
        for (id, section) in &self.sections {
            let (Some(codec), Some(payload)) = (section.codec_id(), section.payload()) else {
                return Err(ser::Error::custom(format!(
                    "section `{id}` of `{}`: {}",
                    self.id,
                    CodecError::NotEncoded
                )));
            };
            sections.insert(
                id.as_str(),
                WireSection {
                    version: section.version(),
                    codec: codec.to_u32(),
                    payload: std::borrow::Cow::Borrowed(payload),
                },
            );
        }
        let children: Vec<&Snapshot> = self.children.values().collect();
        let mut s = serializer.serialize_struct("Snapshot", 3)?;
        s.serialize_field("id", &self.id)?;
        s.serialize_field("children", &children)?;
        s.serialize_field("sections", &sections)?;
        s.end()
    }
}

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire<'a> {
            id: String,
            children: Vec<Snapshot>,
            #[serde(borrow)]
            sections: BTreeMap<String, WireSection<'a>>,
        }
        let wire = Wire::deserialize(deserializer)?;
        let mut snapshot = Snapshot::new(wire.id);
        for child in wire.children {
            if snapshot.add_child(child).is_some() {
                return Err(de::Error::custom("duplicate child id"));
            }
        }
        for (id, s) in wire.sections {
            let section = Section::from_encoded(
                s.version,
                CodecId::from_u32(s.codec),
                s.payload.into_owned(),
            );
            snapshot.add_section(id, section);
        }
        Ok(snapshot)
    }
}
