//! `vmsnap convert FILE --codec C -o OUT`: re-encode the sections whose types are
//! known (the migration-kvm state types) with another codec. If any section's type is
//! unknown, nothing is written and the command names those sections.
//!
//! Memory is copied run by run from the input file to the output
//! ([`StoredMemory`]): the cost and the RAM used follow the bytes the input stores,
//! whatever guest memory it declares.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use migration_core::container::{ReadOptions, StoredMemory, WriteOptions};
use migration_core::text::printable;
use migration_core::{file, Codec, Snapshot};

use crate::known;
use crate::open::open_verified;
use crate::{CodecName, EXIT_FAILED};

fn codec(name: CodecName) -> Arc<dyn Codec> {
    match name {
        CodecName::Postcard => Arc::new(migration_serde::PostcardCodec),
        CodecName::Json => Arc::new(migration_serde::JsonCodec::new()),
        CodecName::Bincode => Arc::new(migration_serde::BincodeCodec),
    }
}

/// Re-encodes `node` (at `path`) with `codec`; unknown sections go to `unknown`.
fn convert_node(
    node: &Snapshot,
    path: &str,
    codec: &Arc<dyn Codec>,
    unknown: &mut Vec<String>,
    failed: &mut Vec<String>,
) -> Snapshot {
    let mut out = Snapshot::new(node.id());
    for (id, section) in node.sections() {
        match known::kind_of(node.id(), id) {
            Some(kind) => match known::recode(kind, section, codec) {
                Ok(s) => {
                    out.add_section(id, s);
                }
                Err(e) => failed.push(format!(
                    "{}:{} ({}): {e}",
                    printable(path),
                    printable(id),
                    kind.type_name()
                )),
            },
            None => unknown.push(format!("{}:{}", printable(path), printable(id))),
        }
    }
    for child in node.children() {
        out.add_child(convert_node(
            child,
            &format!("{path}/{}", child.id()),
            codec,
            unknown,
            failed,
        ));
    }
    out
}

/// Runs `vmsnap convert`.
pub fn run(
    input: &Path,
    name: CodecName,
    output: &Path,
    max_memory: u64,
) -> anyhow::Result<ExitCode> {
    let mut reader = open_verified(input, max_memory)?;
    let header = reader.header().clone();
    let tree = reader
        .read_snapshot(&migration_serde::registry(), None, &ReadOptions::default())
        .with_context(|| format!("cannot read the tree of {}", input.display()))?;
    let memory = StoredMemory::new(reader);
    let codec = codec(name);
    let mut unknown = Vec::new();
    let mut failed = Vec::new();
    let converted = convert_node(&tree, tree.id(), &codec, &mut unknown, &mut failed);
    if !unknown.is_empty() || !failed.is_empty() {
        println!(
            "refused: {} section(s) of types vmsnap does not know, {} that did not decode; \
             nothing was written to {}",
            unknown.len(),
            failed.len(),
            output.display()
        );
        for u in &unknown {
            println!("  unknown type: {u}");
        }
        for f in &failed {
            println!("  cannot decode: {f}");
        }
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    let options = WriteOptions {
        arch: header.arch,
        parent: header.parent,
        ..WriteOptions::default()
    };
    let summary = file::write_snapshot_file(output, &converted, Some(&memory), &options)
        .with_context(|| format!("cannot write {}", output.display()))?;
    println!(
        "converted {} sections of {} to {} ({}): {} bytes",
        converted
            .walk()
            .map(|(_, n)| n.sections().count())
            .sum::<usize>(),
        input.display(),
        codec.name(),
        codec.id(),
        summary.total_length
    );
    Ok(ExitCode::SUCCESS)
}
