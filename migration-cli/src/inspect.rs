//! `vmsnap inspect FILE [--json]`: header, tree, sections (KVM state decoded into
//! named fields) and memory extents of a snapshot file.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use migration_core::container::{ContainerReader, Form, ReadOptions};
use migration_core::Snapshot;
use migration_kvm::snapshot_memory::digest_hex;
use serde::Serialize;

use crate::known::{self, Fields};
use crate::report::bytes;

/// Everything `inspect` reports; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct Inspection {
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
    pub nodes: Vec<NodeOut>,
    /// Sections.
    pub sections: Vec<SectionOut>,
    /// Memory extents.
    pub extents: Vec<ExtentOut>,
    /// Total guest memory covered by extents.
    pub memory_bytes: u64,
    /// Bytes of memory stored as data (the rest reads as zero).
    pub allocated_bytes: u64,
    /// Why the tree could not be read (a bad payload checksum, an unknown codec…).
    pub tree_error: Option<String>,
}

/// A node of the tree.
#[derive(Debug, Serialize)]
pub struct NodeOut {
    /// Its path.
    pub path: String,
    /// Its sections.
    pub sections: usize,
    /// Bytes of its own sections.
    pub payload_bytes: u64,
    /// Bytes of its subtree.
    pub subtree_bytes: u64,
}

/// A section.
#[derive(Debug, Serialize)]
pub struct SectionOut {
    /// Path of its node.
    pub path: String,
    /// Section id.
    pub id: String,
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

/// Inspects `path`.
pub fn inspect(path: &Path) -> anyhow::Result<Inspection> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata()?;
    let mut reader = ContainerReader::open(file)
        .with_context(|| format!("{} is not a readable snapshot", path.display()))?;
    let info = reader.info();
    let registry = migration_serde::registry();
    let (tree, tree_error) = match reader.read_snapshot(&registry, None, &ReadOptions::default()) {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(e.to_string())),
    };
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
    let sections = info
        .sections
        .iter()
        .map(|s| section_out(s, tree.as_ref()))
        .collect();
    Ok(Inspection {
        file: path.display().to_string(),
        file_bytes: meta.len(),
        disk_bytes: meta.blocks() * 512,
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
            .map(|n| NodeOut {
                path: n.path.clone(),
                sections: n.sections,
                payload_bytes: n.payload_bytes,
                subtree_bytes: n.subtree_bytes,
            })
            .collect(),
        sections,
        memory_bytes: extents.iter().map(|e| e.length).sum(),
        allocated_bytes: extents.iter().map(|e| e.allocated).sum(),
        extents,
        tree_error,
    })
}

fn section_out(s: &migration_core::container::SectionInfo, tree: Option<&Snapshot>) -> SectionOut {
    let node_id = s.path.rsplit('/').next().unwrap_or(&s.path);
    let kind = known::kind_of(node_id, &s.id);
    let mut out = SectionOut {
        path: s.path.clone(),
        id: s.id.clone(),
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
    let Some(section) = tree
        .and_then(|t| t.find(&s.path))
        .and_then(|n| n.section(&s.id).ok())
    else {
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
pub fn run(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let i = inspect(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print_text(&i);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(i: &Inspection) {
    println!("file      {}", i.file);
    println!(
        "size      {} ({} on disk)",
        bytes(i.file_bytes),
        bytes(i.disk_bytes)
    );
    println!(
        "format    {} ({} form), arch {}",
        i.format_version, i.form, i.arch
    );
    println!("producer  {}", i.producer);
    if let Some(p) = &i.parent {
        println!("parent    {p} (incremental)");
    }
    if let Some(e) = &i.tree_error {
        println!("WARNING   the tree could not be read: {e}");
    }
    println!(
        "\ntree ({} nodes, {} sections)",
        i.nodes.len(),
        i.sections.len()
    );
    for n in &i.nodes {
        let depth = n.path.matches('/').count();
        println!(
            "  {}{}  ({} sections, {})",
            "  ".repeat(depth),
            n.path,
            n.sections,
            bytes(n.subtree_bytes)
        );
        for s in i.sections.iter().filter(|s| s.path == n.path) {
            let ty = s
                .type_name
                .as_deref()
                .map_or(String::new(), |t| format!("  {t}"));
            println!(
                "  {}  :{}  v{} {} {}{}",
                "  ".repeat(depth),
                s.id,
                s.version,
                s.codec,
                bytes(s.size),
                ty
            );
            let pad = "  ".repeat(depth + 3);
            let mut zero_msrs = 0;
            for (k, v) in &s.ordered {
                // Unnamed MSRs that hold zero would drown the rest; --json lists all.
                if s.id == "msrs" && k.starts_with("msr ") && *v == known::Value::Hex(0) {
                    zero_msrs += 1;
                    continue;
                }
                println!("  {pad}{k} = {v}");
            }
            if zero_msrs > 0 {
                println!("  {pad}({zero_msrs} other MSRs hold 0; --json lists every MSR)");
            }
            if let Some(e) = &s.decode_error {
                println!("  {pad}cannot decode: {e}");
            }
            if let Some(j) = &s.json {
                let mut text = j.to_string();
                if text.chars().count() > 100 {
                    text = text.chars().take(97).collect::<String>() + "...";
                }
                println!("  {pad}{text}");
            }
        }
    }
    println!(
        "\nmemory: {} in {} extents, {} stored, {} sparse",
        bytes(i.memory_bytes),
        i.extents.len(),
        bytes(i.allocated_bytes),
        bytes(i.memory_bytes - i.allocated_bytes.min(i.memory_bytes))
    );
    for e in &i.extents {
        println!(
            "  [{:#012x}, {:#012x})  {:>10}  allocated {:>10}  sparse {:>10}",
            e.gpa,
            e.gpa + e.length,
            bytes(e.length),
            bytes(e.allocated),
            bytes(e.sparse)
        );
    }
}
