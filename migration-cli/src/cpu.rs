//! `vmsnap cpu host|check|baseline`: CPU models and whether a snapshot's guest CPU
//! fits a host (`docs/cpu.md`).
//!
//! ```text
//! vmsnap cpu host --json > a.json            # on host A (and B, C…)
//! vmsnap cpu baseline a.json b.json > pool.json
//! vmsnap cpu check vm.snap --host b.json     # exit 1 and the diff if it does not fit
//! ```

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use migration_core::container::{ContainerReader, ReadOptions};
use migration_kvm::cpu_check::{check, signature, snapshot_models};
use migration_kvm::cpu_model::CpuModel;
use migration_kvm::cpu_template::baseline;
use migration_kvm::kvm_vm::config_of;

use crate::EXIT_FAILED;

/// Largest CPU model file read (the JSON of a full model, 256 CPUID entries and 4096
/// MSRs, is under 100 KiB).
const MAX_MODEL_FILE: u64 = 4 << 20;

/// `vmsnap cpu` subcommands.
#[derive(Debug, Subcommand)]
pub enum CpuCommand {
    /// Print this host's CPU model: what it can give a guest (features by name,
    /// xsave size, settable MSRs, TSC).
    Host {
        /// Print the model as JSON (the input of `check --host` and `baseline`).
        #[arg(long)]
        json: bool,
    },
    /// Check whether each vCPU of a snapshot fits this host (or the model in
    /// `--host`); exit 1 with the differences if not.
    Check {
        /// The snapshot file.
        snapshot: PathBuf,
        /// A host model (`vmsnap cpu host --json` output) instead of this host.
        #[arg(long)]
        host: Option<PathBuf>,
    },
    /// Print, as JSON, the baseline of several hosts' models: the features all of
    /// them have (a template a guest can run with on any of them).
    Baseline {
        /// Host models (`vmsnap cpu host --json` output).
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// The baseline's name (recorded in guests built from it).
        #[arg(long, default_value = "baseline")]
        name: String,
    },
}

/// Runs `vmsnap cpu …`.
pub fn run(command: &CpuCommand) -> anyhow::Result<ExitCode> {
    match command {
        CpuCommand::Host { json } => host(*json),
        CpuCommand::Check { snapshot, host } => check_snapshot(snapshot, host.as_deref()),
        CpuCommand::Baseline { models, name } => baseline_of(models, name),
    }
}

fn this_host() -> anyhow::Result<CpuModel> {
    CpuModel::host()
        .cloned()
        .map_err(|e| anyhow!("cannot probe this host's CPU (is /dev/kvm usable?): {e}"))
}

fn host(json: bool) -> anyhow::Result<ExitCode> {
    let m = this_host()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print_model(&m);
    }
    Ok(ExitCode::SUCCESS)
}

/// A model's summary and its features by name (text output).
pub fn print_model(m: &CpuModel) {
    println!("{}", model_line(m));
    println!("  {}", signature(m));
    println!("  features: {}", feature_names(m));
}

/// `name (vendor, …)` with the name escaped (it may come from a file).
fn model_line(m: &CpuModel) -> String {
    let mut shown = m.clone();
    shown.name = m.name.escape_debug().to_string();
    shown.to_string()
}

/// The model's features, by name where raw-cpuid knows one, else by position.
pub fn feature_names(m: &CpuModel) -> String {
    m.features()
        .iter()
        .map(|f| match f.name {
            Some(n) => n.to_owned(),
            None => format!("[{}]", f.bit),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads a model file (JSON), bounded.
fn read_model(path: &Path) -> anyhow::Result<CpuModel> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_MODEL_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > MAX_MODEL_FILE {
        return Err(anyhow!(
            "{}: larger than {MAX_MODEL_FILE} bytes, not a CPU model",
            path.display()
        ));
    }
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a CPU model (vmsnap cpu host --json)",
            path.display()
        )
    })
}

fn check_snapshot(path: &Path, host_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let host = match host_file {
        Some(p) => read_model(p)?,
        None => this_host()?,
    };
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let tree = ContainerReader::open(file)
        .with_context(|| format!("{} is not a readable snapshot", path.display()))?
        .read_snapshot(&migration_serde::registry(), None, &ReadOptions::default())
        .with_context(|| format!("cannot read the tree of {}", path.display()))?;
    let name = config_of(&tree)
        .ok()
        .and_then(|c| c.cpu.map(|m| m.name))
        .unwrap_or_else(|| "guest".to_owned());
    let models = snapshot_models(&tree, &name)
        .with_context(|| format!("cannot read the vCPU state of {}", path.display()))?;
    if models.is_empty() {
        return Err(anyhow!("{} holds no vCPU state (vcpu<N>)", path.display()));
    }
    println!("host   {}", model_line(&host));
    let mut fits = true;
    for m in &models {
        let report = check(m, &host);
        println!("guest  {}", model_line(m));
        if report.is_compatible() {
            println!("  OK: fits");
        } else {
            fits = false;
            println!("  DOES NOT FIT: {} difference(s)", report.differences.len());
            for d in &report.differences {
                println!("    {d}");
            }
        }
        for n in &report.notes {
            println!("  note: {n}");
        }
    }
    Ok(if fits {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

fn baseline_of(paths: &[PathBuf], name: &str) -> anyhow::Result<ExitCode> {
    let models = paths
        .iter()
        .map(|p| read_model(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let b = baseline(name, &models)?;
    println!("{}", serde_json::to_string_pretty(&b)?);
    Ok(ExitCode::SUCCESS)
}
