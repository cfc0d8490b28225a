//! `vmsnap inspect FILE [--json]`: header, tree, sections (KVM state decoded into
//! named fields) and memory extents of a snapshot file.
//!
//! The file is verified first (what `verify` refuses, `inspect` refuses). Paths are
//! not stored per node: they are spelled out only while printing, one at a time, so a
//! tree of deep, long ids costs memory in proportion to the file, and the text output
//! (ids indented by depth) in proportion to the nodes and sections. Untrusted text
//! (ids, producer) passes through `printable` before it reaches the terminal.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use migration_core::container::{ContainerInfo, Form, ReadOptions};
use migration_core::text::printable;
use migration_core::Snapshot;
use migration_kvm::snapshot_memory::digest_hex;
use serde::{Serialize, Serializer};

use crate::known::{self, Fields};
use crate::open::open_verified;
use crate::report::bytes;

/// Everything `inspect` reports; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct Inspection<'a> {
    /// The file inspected.
    pub file: String,
    /// Its length.
    pub file_bytes: u64,
    /// Bytes it occupies on disk (holes take none).
    pub disk_bytes: u64,
    /// Container format version `major.minor`.
    pub format_version: String,
    /// `file` or `stream`.
    pub form: String,
    /// Architecture.
    pub arch: String,
    /// Producer name and version.
    pub producer: String,
    /// Parent digest (incremental snapshots).
    pub parent: Option<String>,
    /// Nodes of the tree.
    pub nodes: Vec<NodeOut<'a>>,
    /// Sections.
    pub sections: Vec<SectionOut<'a>>,
    /// Memory extents.
    pub extents: Vec<ExtentOut>,
    /// Total guest memory covered by extents.
    pub memory_bytes: u64,
    /// Bytes of memory stored as data (the rest reads as zero).
    pub allocated_bytes: u64,
}

/// The path of a node, spelled out only when printed.
#[derive(Clone, Copy, Debug)]
pub struct PathOf<'a> {
    info: &'a ContainerInfo,
    node: usize,
}

impl Serialize for PathOf<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.info.path(self.node))
    }
}

/// A node of the tree.
#[derive(Debug, Serialize)]
pub struct NodeOut<'a> {
    /// Its path.
    pub path: PathOf<'a>,
    /// Its id.
    pub id: &'a str,
    /// Its depth (the root is 1).
    pub depth: usize,
    /// Its sections.
    pub sections: usize,
    /// Bytes of its own sections.
    pub payload_bytes: u64,
    /// Bytes of its subtree.
    pub subtree_bytes: u64,
}

/// A section.
#[derive(Debug, Serialize)]
pub struct SectionOut<'a> {
    /// Path of its node.
    pub path: PathOf<'a>,
    /// Index of its node in `nodes`.
    #[serde(skip)]
    pub node: usize,
    /// Section id.
    pub id: &'a str,
    /// State version.
    pub version: u32,
    /// Codec id.
    pub codec: String,
    /// Payload bytes.
    pub size: u64,
    /// Payload CRC-64/NVME.
    pub crc: String,
    /// The Rust type it decodes into, when `vmsnap` knows it.
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    /// Its named fields, when decoded.
    pub fields: Option<BTreeMap<String, known::Value>>,
    /// The same fields in display order (text output only).
    #[serde(skip)]
    pub ordered: Fields,
    /// Why decoding failed.
    pub decode_error: Option<String>,
    /// The payload as JSON, for JSON-encoded sections of unknown types.
    pub json: Option<serde_json::Value>,
}

/// A memory extent.
#[derive(Debug, Serialize)]
pub struct ExtentOut {
    /// Guest physical address.
    pub gpa: u64,
    /// Length.
    pub length: u64,
    /// Bytes stored as data.
    pub allocated: u64,
    /// Bytes stored as holes (zero).
    pub sparse: u64,
}

/// A verified snapshot file read for inspection: what [`Inspection`] borrows.
pub struct Loaded {
    file: String,
    file_bytes: u64,
    disk_bytes: u64,
    info: ContainerInfo,
    tree: Snapshot,
}

/// Opens, verifies and reads `path` (tree only; memory is summarized from the tables).
pub fn load(path: &Path, max_memory: u64) -> anyhow::Result<Loaded> {
    let mut reader = open_verified(path, max_memory)?;
    let meta = std::fs::metadata(path)?;
    let info = reader.info();
    let tree = reader
        .read_snapshot(&migration_serde::registry(), None, &ReadOptions::default())
        .with_context(|| format!("cannot read the tree of {}", path.display()))?;
    Ok(Loaded {
        file: path.display().to_string(),
        file_bytes: meta.len(),
        disk_bytes: meta.blocks() * 512,
        info,
        tree,
    })
}

/// The tree's nodes in storage order (depth first, children by id): the order of
/// [`ContainerInfo::nodes`].
fn nodes_in_order(tree: &Snapshot) -> Vec<&Snapshot> {
    let mut out = Vec::new();
    let mut stack = vec![tree];
    while let Some(n) = stack.pop() {
        out.push(n);
        let children: Vec<&Snapshot> = n.children().collect();
        stack.extend(children.into_iter().rev());
    }
    out
}

/// What `inspect` reports about `l`.
pub fn inspect(l: &Loaded) -> Inspection<'_> {
    let info = &l.info;
    let h = &info.header;
    let mut allocated_by_extent = vec![0u64; info.extents.len()];
    match &info.runs {
        Some(runs) => {
            for r in runs {
                if let Some(a) = allocated_by_extent.get_mut(r.extent as usize) {
                    *a += r.length;
                }
            }
        }
        // Stream form: no run table; count everything as stored.
        None => {
            for (a, e) in allocated_by_extent.iter_mut().zip(&info.extents) {
                *a = e.length;
            }
        }
    }
    let extents: Vec<ExtentOut> = info
        .extents
        .iter()
        .zip(&allocated_by_extent)
        .map(|(e, &a)| ExtentOut {
            gpa: e.gpa,
            length: e.length,
            allocated: a,
            sparse: e.length.saturating_sub(a),
        })
        .collect();
    let tree_nodes = nodes_in_order(&l.tree);
    let sections = info
        .sections
        .iter()
        .map(|s| section_out(info, s, tree_nodes.get(s.node).copied()))
        .collect();
    Inspection {
        file: l.file.clone(),
        file_bytes: l.file_bytes,
        disk_bytes: l.disk_bytes,
        format_version: format!("{}.{}", h.major, h.minor),
        form: match h.form {
            Form::File => "file".into(),
            Form::Stream => "stream".into(),
        },
        arch: format!("{:?}", h.arch),
        producer: format!("{} {}", h.producer_name, h.producer_version)
            .trim()
            .to_owned(),
        parent: h.parent.as_ref().map(digest_hex),
        nodes: info
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeOut {
                path: PathOf { info, node: i },
                id: &n.id,
                depth: n.depth,
                sections: n.sections,
                payload_bytes: n.payload_bytes,
                subtree_bytes: n.subtree_bytes,
            })
            .collect(),
        sections,
        memory_bytes: extents.iter().map(|e| e.length).sum(),
        allocated_bytes: extents.iter().map(|e| e.allocated).sum(),
        extents,
    }
}

fn section_out<'a>(
    info: &'a ContainerInfo,
    s: &'a migration_core::container::SectionInfo,
    node: Option<&Snapshot>,
) -> SectionOut<'a> {
    let node_id = info.nodes.get(s.node).map_or("", |n| n.id.as_str());
    let kind = known::kind_of(node_id, &s.id);
    let mut out = SectionOut {
        path: PathOf { info, node: s.node },
        node: s.node,
        id: &s.id,
        version: s.version,
        codec: s.codec.to_string(),
        size: s.length,
        crc: format!("{:016x}", s.crc),
        type_name: kind.map(|k| k.type_name().to_owned()),
        fields: None,
        ordered: Vec::new(),
        decode_error: None,
        json: None,
    };
    let Some(section) = node.and_then(|n| n.section(&s.id).ok()) else {
        return out;
    };
    match kind {
        Some(kind) => match known::fields(kind, section) {
            Ok(f) => {
                out.fields = Some(f.iter().cloned().collect());
                out.ordered = f;
            }
            Err(e) => out.decode_error = Some(e),
        },
        None if s.codec == migration_serde::JSON_ID => {
            out.json = section
                .payload()
                .and_then(|p| serde_json::from_slice(p).ok());
        }
        None => {}
    }
    out
}

/// Runs `vmsnap inspect`.
pub fn run(path: &Path, json: bool, max_memory: u64) -> anyhow::Result<ExitCode> {
    let loaded = load(path, max_memory)?;
    let i = inspect(&loaded);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        serde_json::to_writer_pretty(&mut out, &i)?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &i)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn print_text(out: &mut impl Write, i: &Inspection<'_>) -> std::io::Result<()> {
    writeln!(out, "file      {}", printable(&i.file))?;
    writeln!(
        out,
        "size      {} ({} on disk)",
        bytes(i.file_bytes),
        bytes(i.disk_bytes)
    )?;
    writeln!(
        out,
        "format    {} ({} form), arch {}",
        i.format_version, i.form, i.arch
    )?;
    writeln!(out, "producer  {}", printable(&i.producer))?;
    if let Some(p) = &i.parent {
        writeln!(out, "parent    {p} (incremental)")?;
    }
    writeln!(
        out,
        "\ntree ({} nodes, {} sections)",
        i.nodes.len(),
        i.sections.len()
    )?;
    // Sections are stored node by node, in node order: one pass over both.
    let mut sections = i.sections.iter().peekable();
    for (index, n) in i.nodes.iter().enumerate() {
        let indent = "  ".repeat(n.depth - 1);
        writeln!(
            out,
            "  {indent}{}  ({} sections, {})",
            printable(n.id),
            n.sections,
            bytes(n.subtree_bytes)
        )?;
        while let Some(s) = sections.next_if(|s| s.node == index) {
            let ty = s
                .type_name
                .as_deref()
                .map_or(String::new(), |t| format!("  {t}"));
            writeln!(
                out,
                "  {indent}  :{}  v{} {} {}{}",
                printable(s.id),
                s.version,
                printable(&s.codec),
                bytes(s.size),
                ty
            )?;
            let pad = "  ".repeat(n.depth + 2);
            let mut zero_msrs = 0;
            for (k, v) in &s.ordered {
                // Unnamed MSRs that hold zero would drown the rest; --json lists all.
                if s.id == "msrs" && k.starts_with("msr ") && *v == known::Value::Hex(0) {
                    zero_msrs += 1;
                    continue;
                }
                writeln!(out, "  {pad}{k} = {}", printable(&v.to_string()))?;
            }
            if zero_msrs > 0 {
                writeln!(
                    out,
                    "  {pad}({zero_msrs} other MSRs hold 0; --json lists every MSR)"
                )?;
            }
            if let Some(e) = &s.decode_error {
                writeln!(out, "  {pad}cannot decode: {}", printable(e))?;
            }
            if let Some(j) = &s.json {
                let mut text = j.to_string();
                if text.chars().count() > 100 {
                    text = text.chars().take(97).collect::<String>() + "...";
                }
                writeln!(out, "  {pad}{}", printable(&text))?;
            }
        }
    }
    writeln!(
        out,
        "\nmemory: {} in {} extents, {} stored, {} sparse",
        bytes(i.memory_bytes),
        i.extents.len(),
        bytes(i.allocated_bytes),
        bytes(i.memory_bytes - i.allocated_bytes.min(i.memory_bytes))
    )?;
    for e in &i.extents {
        writeln!(
            out,
            "  [{:#012x}, {:#012x})  {:>10}  allocated {:>10}  sparse {:>10}",
            e.gpa,
            e.gpa + e.length,
            bytes(e.length),
            bytes(e.allocated),
            bytes(e.sparse)
        )?;
    }
    Ok(())
}
