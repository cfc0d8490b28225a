//! `vmsnap`: look inside, check, compare, convert and merge VM snapshot files, and
//! run the demo (boot a self-checking KVM guest, snapshot it, restore it, live-migrate
//! it, print a report; on a fake VM where `/dev/kvm` is unusable).
//!
//! ```text
//! cargo run --release -p migration-cli -- demo
//! vmsnap inspect vm.snap --json | jq .sections
//! vmsnap verify vm.snap && echo intact
//! vmsnap cpu check vm.snap --host other-host.json
//! ```
//!
//! Exit codes: 0 success; 1 a negative answer (a checksum failed, the snapshots
//! differ, a conversion was refused, a guest reported a failure, a guest CPU does
//! not fit); 2 usage or I/O error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod convert;
mod cpu;
mod demo;
mod demo_fake;
mod demo_kvm;
mod demo_target;
mod diff;
mod inspect;
mod known;
mod merge;
mod open;
mod progress;
mod report;
mod report_svg;
mod verify;

/// Exit code: a negative answer (verification failed, snapshots differ, conversion
/// refused, guest failure).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage or I/O error.
pub const EXIT_ERROR: u8 = 2;

const AFTER_HELP: &str = "\
Exit codes:
  0  success (snapshot intact, snapshots identical, guest continued correctly)
  1  negative answer: a checksum failed, the snapshots differ, a conversion was
     refused, a guest reported a failure, or a guest CPU does not fit the host
  2  usage or I/O error (bad arguments, unreadable file, not a snapshot container)";

/// Snapshot, restore and live-migrate VMs; inspect snapshot files.
#[derive(Debug, Parser)]
#[command(name = "vmsnap", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Show what the libraries do, on stderr: `-v` the steps (handshake, rounds,
    /// pause, state, commit or abort, restore steps with their times), `-vv` the
    /// detail.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Refuse snapshots that declare more guest memory than this (e.g. 64G, 2T;
    /// default: this host's physical RAM, what it could restore). `verify` ignores
    /// it: its cost follows the bytes a file stores, not the memory it declares.
    #[arg(long, global = true, value_parser = report::parse_size)]
    max_guest_memory: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

/// Installs a subscriber printing the libraries' `tracing` events at the level
/// `verbose` asks for (none without `-v`).
fn init_logging(verbose: u8) {
    use tracing_subscriber::filter::LevelFilter;
    let level = match verbose {
        0 => return,
        1 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(verbose > 1)
        .init();
}

/// The codecs `convert` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CodecName {
    /// postcard (maintained compact binary; id `pcd1`).
    Postcard,
    /// JSON (human-readable; id `json`).
    Json,
    /// bincode 2 (id `bin2`; unmaintained upstream).
    Bincode,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a self-checking guest, snapshot it to a file, restore it into a fresh VM,
    /// live-migrate it over a loopback socket, and report (fake VM without /dev/kvm).
    Demo(demo_target::DemoArgs),
    /// Print a snapshot's header, tree, sections (KVM state decoded) and memory extents.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum of a snapshot file; exit 0 only if all hold.
    #[command(after_help = AFTER_HELP)]
    Verify {
        /// The snapshot file.
        file: PathBuf,
    },
    /// List the sections and memory pages in which two snapshots differ (exit 1 if any).
    Diff {
        /// First snapshot.
        a: PathBuf,
        /// Second snapshot.
        b: PathBuf,
    },
    /// Re-encode the KVM state sections with another codec; refuses snapshots with
    /// sections of types it does not know.
    Convert {
        /// The snapshot file.
        file: PathBuf,
        /// The codec to re-encode with.
        #[arg(long, value_enum)]
        codec: CodecName,
        /// Where to write the converted snapshot.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// CPU models: this host's, whether a snapshot's guest CPU fits a host, the
    /// baseline of several hosts (docs/cpu.md).
    Cpu {
        #[command(subcommand)]
        command: cpu::CpuCommand,
    },
    /// Apply incremental snapshots onto a full one and write one full snapshot.
    Merge {
        /// The full snapshot at the start of the chain.
        base: PathBuf,
        /// The incrementals, oldest first.
        #[arg(required = true)]
        incrementals: Vec<PathBuf>,
        /// Where to write the merged snapshot.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`vmsnap inspect x | head`), as Unix tools do,
    // instead of panicking in `println!`.
    // SAFETY: restoring the default disposition of SIGPIPE before any other thread
    // exists; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    let max = cli
        .max_guest_memory
        .unwrap_or_else(open::default_max_guest_memory);
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Inspect { file, json } => inspect::run(&file, json, max),
        Command::Verify { file } => verify::run(&file),
        Command::Diff { a, b } => diff::run(&a, &b, max),
        Command::Convert {
            file,
            codec,
            output,
        } => convert::run(&file, codec, &output, max),
        Command::Cpu { command } => cpu::run(&command),
        Command::Merge {
            base,
            incrementals,
            output,
        } => merge::run(&base, &incrementals, &output, max),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "vmsnap: error: {}",
                migration_core::text::printable(&format!("{e:#}"))
            );
            ExitCode::from(EXIT_ERROR)
        }
    }
}
