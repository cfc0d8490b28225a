//! `vmsnap merge BASE INCR... -o OUT`: apply incremental snapshots onto a full one
//! (`migration_kvm::snapshot_memory::merge_chain`) and write one full snapshot,
//! atomically (temporary file, then rename).

use std::fs::File;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use migration_core::container::WriteOptions;
use migration_core::text::printable;
use migration_kvm::snapshot_memory::{merge_chain, SnapshotMemoryError};

use crate::open::open_verified;
use crate::report::bytes;
use crate::EXIT_FAILED;

/// Runs `vmsnap merge`.
pub fn run(
    base: &Path,
    chain: &[std::path::PathBuf],
    output: &Path,
    max_memory: u64,
) -> anyhow::Result<ExitCode> {
    // The limit, and the base's architecture: the merged snapshot keeps it.
    let arch = open_verified(base, max_memory)?.header().arch;
    let mut base_file =
        File::open(base).with_context(|| format!("cannot open {}", base.display()))?;
    let mut links = Vec::new();
    for p in chain {
        links.push(File::open(p).with_context(|| format!("cannot open {}", p.display()))?);
    }
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut temp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    match merge_chain(
        &mut base_file,
        &mut links,
        temp.as_file_mut(),
        &WriteOptions {
            arch,
            ..WriteOptions::default()
        },
    ) {
        Ok(summary) => {
            temp.as_file().sync_all()?;
            temp.persist(output)
                .with_context(|| format!("cannot write {}", output.display()))?;
            println!(
                "merged {} + {} incremental(s) into {}: {} of memory, {} stored",
                base.display(),
                chain.len(),
                output.display(),
                bytes(summary.memory_bytes),
                bytes(summary.data_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(
            e @ (SnapshotMemoryError::ParentMismatch { .. }
            | SnapshotMemoryError::BaseIsIncremental { .. }),
        ) => {
            println!("refused: {}; nothing written", printable(&e.to_string()));
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Err(e) => Err(e).context("merge failed"),
    }
}
