//! `vmsnap diff A B`: the sections and memory pages in which two snapshots differ.
//! Exit 0 if identical, 1 if they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use migration_core::container::{ContainerReader, ReadOptions};
use migration_core::memory::PAGE_SIZE;
use migration_core::{Codec, MemoryRange, MemoryRangeTable, Section, Snapshot};

use crate::known;
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
    check_declared_memory(&layout)
        .with_context(|| format!("{} is not a snapshot vmsnap reads", path.display()))?;
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

/// Refuses a snapshot declaring more guest memory than any VM may have
/// ([`migration_kvm::kvm_vm::MAX_GUEST_RAM`]). A stream-form file's extents are not bounded by
/// its length (zero pages are not sent), and `convert` reads every declared byte, so a
/// small file could otherwise keep it busy for years.
fn check_declared_memory(layout: &[MemoryRange]) -> anyhow::Result<()> {
    let total = layout
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.length));
    match total {
        Some(t) if t <= migration_kvm::kvm_vm::MAX_GUEST_RAM => Ok(()),
        _ => anyhow::bail!(
            "it declares more than {} bytes of guest memory",
            migration_kvm::kvm_vm::MAX_GUEST_RAM
        ),
    }
}

/// A section and where it sits: node id, section id.
type Located<'a> = (String, String, &'a Section);

/// Every section of `tree`, keyed `path:id`.
fn sections(tree: &Snapshot) -> BTreeMap<String, Located<'_>> {
    let mut out = BTreeMap::new();
    for (path, node) in tree.walk() {
        for (id, s) in node.sections() {
            out.insert(
                format!("{path}:{id}"),
                (node.id().to_owned(), id.to_owned(), s),
            );
        }
    }
    out
}

fn codec_name(s: &Section) -> String {
    s.codec_id().map_or_else(|| "-".into(), |c| c.to_string())
}

/// Why two sections at the same path differ, or `None` if they do not. Sections of
/// a known type that decode to the same state under different codecs are reported
/// as equal state (second element `true`).
fn compare(node: &str, id: &str, x: &Section, y: &Section) -> Option<(String, bool)> {
    let (cx, cy) = (codec_name(x), codec_name(y));
    if x.version() == y.version() && cx == cy && x.payload() == y.payload() {
        return None;
    }
    let mut why = Vec::new();
    if x.version() != y.version() {
        why.push(format!("version {} vs {}", x.version(), y.version()));
    }
    if cx != cy {
        why.push(format!("codec {cx} vs {cy}"));
        if let Some(kind) = known::kind_of(node, id) {
            // Same state? Decode both with their real type and encode them with one
            // (deterministic) codec: equal bytes mean equal state.
            let one: Arc<dyn Codec> = Arc::new(migration_serde::PostcardCodec);
            if let (Ok(ex), Ok(ey)) = (known::recode(kind, x, &one), known::recode(kind, y, &one)) {
                if ex.payload() == ey.payload() && x.version() == y.version() {
                    why.push("same decoded state".into());
                    return Some((why.join(", "), true));
                }
                why.push("decoded state differs".into());
            }
        }
        return Some((why.join(", "), false));
    }
    let (px, py) = (x.payload().unwrap_or(&[]), y.payload().unwrap_or(&[]));
    match px.iter().zip(py).position(|(p, q)| p != q) {
        Some(i) => why.push(format!("payload differs at byte {i}")),
        None if px.len() != py.len() => {
            why.push(format!("payload {} vs {} bytes", px.len(), py.len()))
        }
        None => {}
    }
    Some((why.join(", "), false))
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
            (Some((node, id, x)), Some((_, _, y))) => match compare(node, id, x, y) {
                None => continue,
                Some((why, true)) => {
                    println!("  = {k}  {why}");
                    continue;
                }
                Some((why, false)) => println!("  ~ {k}  {why}"),
            },
            (None, None) => continue,
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
    if differ.is_empty() {
        println!("  same contents");
    } else {
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
        println!("identical: same state in every section, same memory");
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(EXIT_FAILED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_memory_is_bounded() {
        let gib = MemoryRange::new(0, 1 << 30);
        assert!(check_declared_memory(&[gib]).is_ok());
        let max = MemoryRange::new(0, migration_kvm::kvm_vm::MAX_GUEST_RAM);
        assert!(check_declared_memory(&[max]).is_ok());
        assert!(check_declared_memory(&[max, MemoryRange::new(1 << 50, 4096)]).is_err());
        assert!(check_declared_memory(&[MemoryRange::new(0, 1 << 62)]).is_err());
        let wraps = [MemoryRange::new(0, u64::MAX), MemoryRange::new(0, 2)];
        assert!(check_declared_memory(&wraps).is_err());
    }
}
