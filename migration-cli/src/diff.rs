//! `vmsnap diff A B`: the sections and memory pages in which two snapshots differ.
//! Exit 0 if identical, 1 if they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use migration_core::container::{ContainerReader, ReadOptions};
use migration_core::memory::PAGE_SIZE;
use migration_core::{MemoryRange, MemoryRangeTable, Snapshot};

use crate::report::bytes;
use crate::sparse::SparseMemory;
use crate::EXIT_FAILED;

/// A snapshot read whole: tree and memory pages.
pub struct Loaded {
    /// The tree (codecs resolved).
    pub tree: Snapshot,
    /// The memory.
    pub memory: SparseMemory,
    /// The extents, as memory ranges.
    pub layout: Vec<MemoryRange>,
}

/// Reads the snapshot at `path` whole (memory into a sparse page map).
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = ContainerReader::open(file)
        .with_context(|| format!("{} is not a readable snapshot", path.display()))?;
    let layout: Vec<MemoryRange> = reader
        .extents()
        .iter()
        .map(|e| MemoryRange::new(e.gpa, e.length))
        .collect();
    let memory = SparseMemory::new(layout.clone());
    let tree = reader
        .read_snapshot(
            &migration_serde::registry(),
            Some(&memory),
            &ReadOptions::default(),
        )
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Loaded {
        tree,
        memory,
        layout,
    })
}

fn sections(tree: &Snapshot) -> BTreeMap<String, (u32, String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for (path, node) in tree.walk() {
        for (id, s) in node.sections() {
            out.insert(
                format!("{path}:{id}"),
                (
                    s.version(),
                    s.codec_id().map_or_else(|| "-".into(), |c| c.to_string()),
                    s.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                ),
            );
        }
    }
    out
}

/// Runs `vmsnap diff`.
pub fn run(a: &Path, b: &Path) -> anyhow::Result<ExitCode> {
    let la = load(a)?;
    let lb = load(b)?;
    let mut differences = 0usize;

    let sa = sections(&la.tree);
    let sb = sections(&lb.tree);
    let keys: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
    println!("sections:");
    for k in keys {
        match (sa.get(k), sb.get(k)) {
            (Some(_), None) => println!("  - {k}  only in A"),
            (None, Some(_)) => println!("  + {k}  only in B"),
            (Some(x), Some(y)) if x != y => {
                let mut why = Vec::new();
                if x.0 != y.0 {
                    why.push(format!("version {} vs {}", x.0, y.0));
                }
                if x.1 != y.1 {
                    why.push(format!("codec {} vs {}", x.1, y.1));
                }
                if x.2 != y.2 {
                    match x.2.iter().zip(&y.2).position(|(p, q)| p != q) {
                        Some(i) => why.push(format!("payload differs at byte {i}")),
                        None => why.push(format!("payload {} vs {} bytes", x.2.len(), y.2.len())),
                    }
                }
                println!("  ~ {k}  {}", why.join(", "));
            }
            _ => continue,
        }
        differences += 1;
    }

    println!("memory:");
    if la.layout != lb.layout {
        differences += 1;
        println!("  layouts differ: A {:?}, B {:?}", la.layout, lb.layout);
    }
    let pa = la.memory.pages();
    let pb = lb.memory.pages();
    let pages: BTreeSet<u64> = pa.keys().chain(pb.keys()).copied().collect();
    let mut differ = MemoryRangeTable::new();
    for p in pages {
        if pa.get(&p) != pb.get(&p) {
            differ.push(MemoryRange::new(p, PAGE_SIZE));
        }
    }
    if !differ.is_empty() {
        differences += 1;
        println!(
            "  {} pages ({}) differ, in {} ranges:",
            differ.total_bytes() / PAGE_SIZE,
            bytes(differ.total_bytes()),
            differ.len()
        );
        for r in differ.ranges().iter().take(50) {
            println!(
                "    [{:#012x}, {:#012x})  {} pages",
                r.gpa,
                r.gpa + r.length,
                r.length / PAGE_SIZE
            );
        }
        if differ.len() > 50 {
            println!("    … and {} more ranges", differ.len() - 50);
        }
    }
    if differences == 0 {
        println!("identical: same sections, same memory");
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(EXIT_FAILED))
    }
}
