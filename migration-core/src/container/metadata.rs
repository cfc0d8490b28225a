//! The metadata block (`docs/format.md` §4): the snapshot tree without payloads,
//! and the extent table.

use super::error::FormatError;
use super::extents::Extent;
use super::limits::*;
use crate::checksum::crc64;
use crate::codec::{CodecError, CodecId};
use crate::error::MigratableError;
use crate::section::Section;
use crate::snapshot::Snapshot;

/// One section as the metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// Index (in [`ContainerInfo::nodes`](super::ContainerInfo::nodes)) of the node
    /// that owns it; [`ContainerInfo::path`](super::ContainerInfo::path) spells its path.
    pub node: usize,
    /// Section id.
    pub id: String,
    /// State format version.
    pub version: u32,
    /// Codec that encoded the payload.
    pub codec: CodecId,
    /// Offset of the payload from the start of the container.
    pub offset: u64,
    /// Payload length.
    pub length: u64,
    /// CRC-64/NVME of the payload.
    pub crc: u64,
}

/// One node of the tree as the metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its id (the last component of its path).
    pub id: String,
    /// Index of its parent node (`None` for the root). Paths are not stored: a tree of
    /// deep, long ids would cost the square of its size.
    pub parent: Option<usize>,
    /// Depth, the root is 1.
    pub depth: usize,
    /// Number of sections of this node.
    pub sections: usize,
    /// Payload bytes of this node's sections.
    pub payload_bytes: u64,
    /// Payload bytes of this node and all its descendants.
    pub subtree_bytes: u64,
}

/// The decoded metadata block.
#[derive(Clone, Debug)]
pub(crate) struct Metadata {
    pub(crate) nodes: Vec<NodeInfo>,
    pub(crate) sections: Vec<SectionInfo>,
    pub(crate) extents: Vec<Extent>,
}

/// The path of node `index` of `nodes` (ids joined by '/', root first).
pub(crate) fn node_path(nodes: &[NodeInfo], index: usize) -> String {
    let mut ids = Vec::new();
    let mut at = Some(index);
    while let Some(n) = at.and_then(|i| nodes.get(i)) {
        ids.push(n.id.as_str());
        at = n.parent;
    }
    ids.reverse();
    ids.join("/")
}

fn check_id(id: &str, node: bool, what: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("{what} id `{id}` must be 1 to {MAX_ID_LEN} bytes"));
    }
    if node && id.contains('/') {
        return Err(format!("{what} id `{id}` contains '/'"));
    }
    Ok(())
}

fn unwritable(what: String) -> MigratableError {
    FormatError::Unwritable { what }.into()
}

/// A snapshot tree encoded for the metadata block, without the extent table: what
/// the block's length and the payloads' offsets depend on, so a writer encodes the
/// tree once and adds the extents when it knows their file offsets.
pub(crate) struct Tree<'s> {
    nodes: u64,
    body: Vec<u8>,
    /// The section payloads, in storage order.
    pub(crate) payloads: Vec<&'s [u8]>,
}

/// Encodes the tree of `snapshot` (ids, versions, codecs, payload offsets and CRCs).
pub(crate) fn encode(snapshot: &Snapshot) -> Result<Tree<'_>, MigratableError> {
    let mut body = Vec::new();
    let mut payloads = Vec::new();
    let mut nodes = 0u64;
    let mut offset = 0u64;
    encode_node(
        snapshot,
        1,
        &mut body,
        &mut payloads,
        &mut nodes,
        &mut offset,
    )?;
    let sections = payloads.len() as u64;
    if nodes > MAX_NODES {
        return Err(unwritable(format!("{nodes} nodes, over {MAX_NODES}")));
    }
    if sections > MAX_SECTIONS {
        return Err(unwritable(format!(
            "{sections} sections, over {MAX_SECTIONS}"
        )));
    }
    if offset > MAX_PAYLOAD_LEN {
        return Err(unwritable(format!(
            "{offset} payload bytes, over {MAX_PAYLOAD_LEN}"
        )));
    }
    Ok(Tree {
        nodes,
        body,
        payloads,
    })
}

impl Tree<'_> {
    /// The length of the metadata block (CRC included) with `extents` extents.
    pub(crate) fn block_len(&self, extents: usize) -> u64 {
        (16 + self.body.len() + 24 * extents + 8) as u64
    }

    /// The sum of the payload lengths.
    pub(crate) fn payload_len(&self) -> u64 {
        self.payloads.iter().map(|p| p.len() as u64).sum()
    }

    /// The metadata block: the tree and `extents`, CRC included.
    pub(crate) fn block(&self, extents: &[Extent]) -> Result<Vec<u8>, MigratableError> {
        if extents.len() as u64 > MAX_EXTENTS {
            return Err(unwritable(format!(
                "{} extents, over {MAX_EXTENTS}",
                extents.len()
            )));
        }
        let len = self.block_len(extents.len());
        if len > MAX_METADATA_LEN {
            return Err(unwritable(format!(
                "metadata of {len} bytes, over {MAX_METADATA_LEN}"
            )));
        }
        let mut block = Vec::with_capacity(len as usize);
        block.extend_from_slice(&(self.nodes as u32).to_le_bytes());
        block.extend_from_slice(&(self.payloads.len() as u32).to_le_bytes());
        block.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        block.extend_from_slice(&0u32.to_le_bytes());
        block.extend_from_slice(&self.body);
        for e in extents {
            block.extend_from_slice(&e.gpa.to_le_bytes());
            block.extend_from_slice(&e.length.to_le_bytes());
            block.extend_from_slice(&e.file_offset.to_le_bytes());
        }
        let crc = crc64(&block);
        block.extend_from_slice(&crc.to_le_bytes());
        Ok(block)
    }
}

fn encode_node<'s>(
    node: &'s Snapshot,
    depth: usize,
    out: &mut Vec<u8>,
    payloads: &mut Vec<&'s [u8]>,
    nodes: &mut u64,
    offset: &mut u64,
) -> Result<(), MigratableError> {
    if depth > MAX_DEPTH {
        return Err(unwritable(format!(
            "tree deeper than {MAX_DEPTH} at `{}`",
            node.id()
        )));
    }
    check_id(node.id(), true, "node").map_err(unwritable)?;
    *nodes += 1;
    put_str(out, node.id());
    let sections: Vec<(&str, &Section)> = node.sections().collect();
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (id, section) in sections {
        check_id(id, false, "section").map_err(unwritable)?;
        let (Some(codec), Some(payload)) = (section.codec_id(), section.payload()) else {
            return Err(MigratableError::Codec {
                path: node.id().to_owned(),
                section: id.to_owned(),
                source: CodecError::NotEncoded,
            });
        };
        let len = payload.len() as u64;
        if len > MAX_SECTION_LEN {
            return Err(unwritable(format!(
                "section `{id}` of `{}` has {len} bytes, over {MAX_SECTION_LEN}",
                node.id()
            )));
        }
        put_str(out, id);
        out.extend_from_slice(&section.version().to_le_bytes());
        out.extend_from_slice(&codec.to_u32().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc64(payload).to_le_bytes());
        *offset += len;
        payloads.push(payload);
    }
    let children: Vec<&Snapshot> = node.children().collect();
    out.extend_from_slice(&(children.len() as u32).to_le_bytes());
    for child in children {
        encode_node(child, depth + 1, out, payloads, nodes, offset)
            .map_err(|e| e.within(node.id()))?;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| FormatError::malformed("metadata ends inside a field"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let mut x = [0u8; 4];
        x.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(x))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut x = [0u8; 8];
        x.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(x))
    }
    fn id(&mut self, node: bool, what: &str) -> Result<String, FormatError> {
        let len = usize::from(self.u16()?);
        if len == 0 || len > MAX_ID_LEN {
            return Err(FormatError::malformed(format!(
                "{what} id length {len} not in 1..={MAX_ID_LEN}"
            )));
        }
        let s = std::str::from_utf8(self.take(len)?)
            .map_err(|_| FormatError::malformed(format!("{what} id is not UTF-8")))?;
        check_id(s, node, what).map_err(FormatError::malformed)?;
        Ok(s.to_owned())
    }
}

/// Decodes a metadata block whose CRC has been checked. `payload_offset` is where the
/// payload area starts, `payload_length` its declared length.
pub(crate) fn decode(
    block: &[u8],
    payload_offset: u64,
    payload_length: u64,
) -> Result<Metadata, FormatError> {
    let body_len = block.len() - 8;
    let mut c = Cursor {
        b: &block[..body_len],
        pos: 0,
    };
    let node_count = u64::from(c.u32()?);
    let section_count = u64::from(c.u32()?);
    let extent_count = u64::from(c.u32()?);
    if c.u32()? != 0 {
        return Err(FormatError::malformed(
            "metadata reserved field is not zero",
        ));
    }
    if node_count == 0 || node_count > MAX_NODES {
        return Err(FormatError::limit("node count", node_count, MAX_NODES));
    }
    if section_count > MAX_SECTIONS {
        return Err(FormatError::limit(
            "section count",
            section_count,
            MAX_SECTIONS,
        ));
    }
    if extent_count > MAX_EXTENTS {
        return Err(FormatError::limit(
            "extent count",
            extent_count,
            MAX_EXTENTS,
        ));
    }
    let mut md = Metadata {
        nodes: Vec::new(),
        sections: Vec::new(),
        extents: Vec::new(),
    };
    let mut next_offset = 0u64;
    decode_node(
        &mut c,
        1,
        None,
        &mut md,
        &mut next_offset,
        payload_offset,
        (node_count, section_count),
    )?;
    if md.nodes.len() as u64 != node_count || md.sections.len() as u64 != section_count {
        return Err(FormatError::malformed(
            "node or section count does not match the tree",
        ));
    }
    if next_offset != payload_length {
        return Err(FormatError::malformed(format!(
            "sections hold {next_offset} payload bytes, header says {payload_length}"
        )));
    }
    for i in 0..extent_count {
        let e = Extent {
            gpa: c.u64()?,
            length: c.u64()?,
            file_offset: c.u64()?,
        };
        let what = || format!("extent {i} (gpa {:#x}, {:#x} bytes)", e.gpa, e.length);
        if e.gpa % PAGE != 0 || e.length % PAGE != 0 || e.length == 0 || e.file_offset % PAGE != 0 {
            return Err(FormatError::malformed(format!(
                "{} is empty or not page aligned",
                what()
            )));
        }
        let end = e
            .gpa
            .checked_add(e.length)
            .ok_or_else(|| FormatError::malformed(format!("{} wraps", what())))?;
        if let Some(prev) = md.extents.last() {
            if e.gpa < prev.gpa + prev.length {
                return Err(FormatError::Overlap {
                    what: format!("{} overlaps or precedes extent {}", what(), i - 1),
                });
            }
        }
        if end > u64::MAX - PAGE {
            return Err(FormatError::malformed(format!(
                "{} ends at the top of the address space",
                what()
            )));
        }
        md.extents.push(e);
    }
    if c.pos != body_len {
        return Err(FormatError::malformed(format!(
            "{} bytes left over in metadata",
            body_len - c.pos
        )));
    }
    Ok(md)
}

const PAGE: u64 = crate::memory::PAGE_SIZE;

fn decode_node(
    c: &mut Cursor<'_>,
    depth: usize,
    parent: Option<usize>,
    md: &mut Metadata,
    next_offset: &mut u64,
    payload_offset: u64,
    counts: (u64, u64),
) -> Result<(), FormatError> {
    if depth > MAX_DEPTH {
        return Err(FormatError::limit(
            "tree depth",
            depth as u64,
            MAX_DEPTH as u64,
        ));
    }
    if md.nodes.len() as u64 >= counts.0 {
        return Err(FormatError::malformed("more nodes than node_count"));
    }
    let id = c.id(true, "node")?;
    let index = md.nodes.len();
    md.nodes.push(NodeInfo {
        id,
        parent,
        depth,
        sections: 0,
        payload_bytes: 0,
        subtree_bytes: 0,
    });
    let path = |md: &Metadata| node_path(&md.nodes, index);
    let nsec = c.u32()?;
    if u64::from(nsec) + md.sections.len() as u64 > counts.1 {
        return Err(FormatError::malformed("more sections than section_count"));
    }
    for i in 0..nsec {
        let sid = c.id(false, "section")?;
        if i > 0 && md.sections.last().is_some_and(|p| p.id >= sid) {
            return Err(FormatError::malformed(format!(
                "sections of `{}` not in strictly ascending id order at `{sid}`",
                path(md)
            )));
        }
        let version = c.u32()?;
        let codec = CodecId::from_u32(c.u32()?);
        let offset = c.u64()?;
        let length = c.u64()?;
        let crc = c.u64()?;
        if length > MAX_SECTION_LEN {
            return Err(FormatError::limit(
                "section length",
                length,
                MAX_SECTION_LEN,
            ));
        }
        if offset != *next_offset {
            return Err(FormatError::malformed(format!(
                "section `{}:{sid}` at payload offset {offset}, expected {next_offset}",
                path(md)
            )));
        }
        *next_offset += length;
        md.sections.push(SectionInfo {
            node: index,
            id: sid,
            version,
            codec,
            offset: payload_offset + offset,
            length,
            crc,
        });
        md.nodes[index].sections += 1;
        md.nodes[index].payload_bytes += length;
    }
    md.nodes[index].subtree_bytes = md.nodes[index].payload_bytes;
    let nchild = c.u32()?;
    let mut prev: Option<usize> = None;
    for _ in 0..nchild {
        let child_index = md.nodes.len();
        decode_node(
            c,
            depth + 1,
            Some(index),
            md,
            next_offset,
            payload_offset,
            counts,
        )?;
        md.nodes[index].subtree_bytes += md.nodes[child_index].subtree_bytes;
        if prev.is_some_and(|p| md.nodes[p].id >= md.nodes[child_index].id) {
            return Err(FormatError::malformed(format!(
                "children of `{}` not in strictly ascending id order at `{}`",
                path(md),
                md.nodes[child_index].id
            )));
        }
        prev = Some(child_index);
    }
    Ok(())
}

impl Metadata {
    /// Builds the snapshot tree from the payloads, given in storage order.
    pub(crate) fn build(&self, payloads: Vec<Vec<u8>>) -> Snapshot {
        let mut payloads = payloads.into_iter();
        let mut sections = self.sections.iter();
        let mut stack: Vec<(usize, Snapshot)> = Vec::new();
        for info in &self.nodes {
            let depth = &info.depth;
            // Close every open node at this depth or deeper.
            while stack.last().is_some_and(|(d, _)| d >= depth) {
                close(&mut stack);
            }
            let mut node = Snapshot::new(info.id.clone());
            for _ in 0..info.sections {
                if let (Some(s), Some(p)) = (sections.next(), payloads.next()) {
                    node.add_section(s.id.clone(), Section::from_encoded(s.version, s.codec, p));
                }
            }
            stack.push((*depth, node));
        }
        while stack.len() > 1 {
            close(&mut stack);
        }
        stack
            .pop()
            .map(|(_, s)| s)
            .unwrap_or_else(|| Snapshot::new(""))
    }
}

fn close(stack: &mut Vec<(usize, Snapshot)>) {
    if let Some((_, node)) = stack.pop() {
        if let Some((_, parent)) = stack.last_mut() {
            parent.add_child(node);
        }
    }
}
