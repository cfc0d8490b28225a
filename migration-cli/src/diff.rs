//! `vmsnap diff A B`: the sections and memory pages in which two snapshots differ.
//! Exit 0 if identical, 1 if they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use migration_core::container::{ReadOptions, StoredMemory};
use migration_core::memory::PAGE_SIZE;
use migration_core::text::printable;
use migration_core::{Codec, MemoryRange, MemoryRangeTable, MemorySource, Section, Snapshot};

use crate::known;
use crate::open::open_verified;
use crate::report::bytes;
use crate::EXIT_FAILED;

/// A snapshot opened for comparing: its tree, and its memory read on demand.
pub struct Loaded {
    /// The tree (codecs resolved).
    pub tree: Snapshot,
    /// The memory, read from the file run by run.
    pub memory: StoredMemory<File>,
    /// The extents, as memory ranges.
    pub layout: Vec<MemoryRange>,
}

/// Opens and verifies the snapshot at `path` and reads its tree; memory stays in the
/// file.
pub fn load(path: &Path, max_memory: u64) -> anyhow::Result<Loaded> {
    let mut reader = open_verified(path, max_memory)?;
    let layout: Vec<MemoryRange> = reader
        .extents()
        .iter()
        .map(|e| MemoryRange::new(e.gpa, e.length))
        .collect();
    let tree = reader
        .read_snapshot(&migration_serde::registry(), None, &ReadOptions::default())
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Loaded {
        tree,
        memory: StoredMemory::new(reader),
        layout,
    })
}

/// The pages in which `a` and `b` differ, comparing only where either stores bytes
/// (everywhere else both are zero), a chunk of at most 1 MiB at a time. A page
/// outside one side's layout reads as zero there.
fn memory_differences(a: &Loaded, b: &Loaded) -> anyhow::Result<MemoryRangeTable> {
    const CHUNK: u64 = 1 << 20;
    let mut ranges: Vec<MemoryRange> = a
        .memory
        .stored()
        .iter()
        .chain(b.memory.stored())
        .copied()
        .collect();
    ranges.sort_by_key(|r| r.gpa);
    let mut differ = MemoryRangeTable::new();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut done = 0u64; // everything below this address is compared
    for r in ranges {
        let mut at = r.gpa.max(done);
        let end = r.gpa + r.length;
        while at < end {
            let n = (end - at).min(CHUNK);
            read_or_zero(&a.memory, &a.layout, at, n, &mut x)?;
            read_or_zero(&b.memory, &b.layout, at, n, &mut y)?;
            for (i, (p, q)) in x
                .chunks(PAGE_SIZE as usize)
                .zip(y.chunks(PAGE_SIZE as usize))
                .enumerate()
            {
                if p != q {
                    differ.push(MemoryRange::new(at + i as u64 * PAGE_SIZE, PAGE_SIZE));
                }
            }
            at += n;
        }
        done = done.max(end);
    }
    Ok(differ)
}

/// Reads `[gpa, gpa + len)` of `m` into `buf`, pages outside `layout` as zero.
fn read_or_zero(
    m: &StoredMemory<File>,
    layout: &[MemoryRange],
    gpa: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    buf.clear();
    buf.resize(len as usize, 0);
    let end = gpa + len;
    let first = layout.partition_point(|r| r.gpa + r.length <= gpa);
    for r in layout[first..].iter().take_while(|r| r.gpa < end) {
        let lo = r.gpa.max(gpa);
        let hi = (r.gpa + r.length).min(end);
        m.read_memory(lo, &mut buf[(lo - gpa) as usize..(hi - gpa) as usize])?;
    }
    Ok(())
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
pub fn run(a: &Path, b: &Path, max_memory: u64) -> anyhow::Result<ExitCode> {
    let la = load(a, max_memory)?;
    let lb = load(b, max_memory)?;
    let mut differences = 0usize;

    let sa = sections(&la.tree);
    let sb = sections(&lb.tree);
    let keys: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
    println!("sections:");
    for k in keys {
        let shown = printable(k);
        match (sa.get(k), sb.get(k)) {
            (Some(_), None) => println!("  - {shown}  only in A"),
            (None, Some(_)) => println!("  + {shown}  only in B"),
            (Some((node, id, x)), Some((_, _, y))) => match compare(node, id, x, y) {
                None => continue,
                Some((why, true)) => {
                    println!("  = {shown}  {}", printable(&why));
                    continue;
                }
                Some((why, false)) => println!("  ~ {shown}  {}", printable(&why)),
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
    let differ = memory_differences(&la, &lb)?;
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
