//! One test of this test binary run again in a child process, a process that shares
//! nothing with the parent but the files it is given: the restoring side of the
//! snapshot tests.

use std::path::Path;

use anyhow::{ensure, Context, Result};

/// Runs test `name` of the current test binary alone in a child process with the
/// environment variable `env` set to `dir`, and returns what the child wrote to
/// `dir/result.txt` (the test, seeing `env`, takes the child's part and writes it).
pub fn rerun_in_child(name: &str, env: &str, dir: &Path) -> Result<String> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .output()
        .context("re-exec the test binary")?;
    ensure!(
        out.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join("result.txt"))
        .context("the child wrote no result: did it run the restore?")
}
