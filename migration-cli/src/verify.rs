//! `vmsnap verify FILE`: every checksum (header, metadata, each section, each memory
//! run, the run table) and that holes read as zero. Exit 0 only if all hold.

use std::path::Path;
use std::process::ExitCode;

use migration_core::text::printable;
use migration_core::{file, FormatError, MigratableError};

use crate::report::bytes;
use crate::{EXIT_ERROR, EXIT_FAILED};

/// Runs `vmsnap verify`.
pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    match file::verify_file(path) {
        Ok(r) => {
            println!(
                "OK {}: {} sections ({}), {} extents ({} of guest memory), {} data runs ({}): every checksum holds",
                path.display(),
                r.sections,
                bytes(r.payload_bytes),
                r.extents,
                bytes(r.memory_bytes),
                r.runs,
                bytes(r.data_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(MigratableError::Io(e)) => {
            eprintln!("vmsnap: error: cannot read {}: {e}", path.display());
            Ok(ExitCode::from(EXIT_ERROR))
        }
        Err(MigratableError::Format(FormatError::BadMagic { .. })) => {
            eprintln!(
                "vmsnap: error: {} is not a snapshot container",
                path.display()
            );
            Ok(ExitCode::from(EXIT_ERROR))
        }
        Err(MigratableError::Format(FormatError::Checksum {
            what,
            stored,
            computed,
        })) => {
            println!(
                "FAILED {}: checksum mismatch in {} (stored {stored:#018x}, computed {computed:#018x})",
                path.display(),
                printable(&what)
            );
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Err(e) => {
            println!("FAILED {}: {}", path.display(), printable(&e.to_string()));
            Ok(ExitCode::from(EXIT_FAILED))
        }
    }
}
