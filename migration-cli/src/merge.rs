//! `vmsnap merge BASE INCR... -o OUT`: apply incremental snapshots onto a full one
//! (`migration_kvm::snapshot_memory::merge_chain`) and write one full snapshot,
//! atomically (temporary file, then rename).

use std::fs::File;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use migration_core::container::WriteOptions;
use migration_kvm::snapshot_memory::{merge_chain, SnapshotMemoryError};

use crate::report::bytes;
use crate::EXIT_FAILED;

/// Runs `vmsnap merge`.
pub fn run(base: &Path, chain: &[std::path::PathBuf], output: &Path) -> anyhow::Result<ExitCode> {
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
        &WriteOptions::default(),
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
            println!("refused: {e}; nothing written");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Err(e) => Err(e).context("merge failed"),
    }
}
