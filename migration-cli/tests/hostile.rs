//! `vmsnap` against hostile and huge snapshot files (issues 19 and 20): each test
//! writes its own file, runs `vmsnap` in a child process and measures that child's
//! peak RSS (`wait4`'s rusage) and time. Memory bounds are asserted; times are only
//! hang guards (60 s) and printed as figures (`--nocapture`).

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use migration_core::arch::Arch;
use migration_core::codec::CodecId;
use migration_core::container::{self, WriteOptions};
use migration_core::{file, MemoryError, MemoryRange, MemorySource, Section, Snapshot};

const HANG_GUARD: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// What a child run of `vmsnap` did.
struct Run {
    code: i32,
    time: Duration,
    rss_mib: u64,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `vmsnap args`, stdout into a file (or nowhere), and measures it.
// The child is reaped by `wait4` (which also gives its rusage), not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn vmsnap(args: &[&str], keep_stdout: bool) -> Run {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(args)
        .stdout(if keep_stdout {
            Stdio::from(out.try_clone().unwrap())
        } else {
            Stdio::null()
        })
        .stderr(Stdio::from(err.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both pointers are to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let time = start.elapsed();
    let read = |mut f: File| {
        use std::io::{Read, Seek};
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let run = Run {
        code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        time,
        rss_mib: usage.ru_maxrss as u64 / 1024,
        stdout: read(out),
        stderr: String::from_utf8_lossy(&read(err)).into_owned(),
    };
    eprintln!(
        "vmsnap {}: exit {}, {:.2} s, peak RSS {} MiB",
        args.iter()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .collect::<Vec<_>>()
            .join(" "),
        run.code,
        run.time.as_secs_f64(),
        run.rss_mib
    );
    assert!(run.time < HANG_GUARD, "hang guard: {:?}", run.time);
    run
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Memory of `regions`, non-zero (a pattern of `seed`) only in `data`, and saying so.
struct Pattern {
    regions: Vec<MemoryRange>,
    data: Vec<MemoryRange>,
    seed: u8,
}

impl MemorySource for Pattern {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        for (i, page) in buf.chunks_mut(4096).enumerate() {
            let a = gpa + i as u64 * 4096;
            let inside = self.data.iter().any(|r| r.gpa <= a && a < r.gpa + r.length);
            page.fill(if inside {
                ((a >> 12) as u8 ^ self.seed) | 1
            } else {
                0
            });
        }
        Ok(())
    }
    fn nonzero_ranges(&self) -> Option<Vec<MemoryRange>> {
        Some(self.data.clone())
    }
}

/// Builds a file whose tree is large (`kind`: "deep" or "wide") in a child process
/// (this test binary again, running [`generate`]), so this process stays small: a
/// child's peak RSS counts its parent's at `exec`.
fn generated(kind: &str, path: &Path) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "generate", "--nocapture", "--test-threads", "1"])
        .env("VMSNAP_HOSTILE_GENERATE", format!("{kind}:{}", p(path)))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success() && path.exists(), "generating {kind}");
}

/// Not a test of its own: writes the file [`generated`] asks for (nothing without the
/// variable).
#[test]
fn generate() {
    let Ok(what) = std::env::var("VMSNAP_HOSTILE_GENERATE") else {
        return;
    };
    let (kind, path) = what.split_once(':').unwrap();
    let path = Path::new(path);
    match kind {
        "deep" => {
            let long = |c: char| std::iter::repeat_n(c, 255).collect::<String>();
            let mut root = Snapshot::new("vm");
            for chain in 0..2000 {
                let mut node = Snapshot::new(long('y'));
                for _ in 0..29 {
                    let mut parent = Snapshot::new(long('y'));
                    parent.add_child(node);
                    node = parent;
                }
                let mut top = Snapshot::new(
                    format!("{chain:04}{}", long('x'))
                        .split_at(255)
                        .0
                        .to_owned(),
                );
                top.add_child(node);
                root.add_child(top);
            }
            write(path, &root, None, &WriteOptions::default());
        }
        "wide" => {
            let mut root = Snapshot::new("vm");
            for i in 0..65_534u32 {
                let mut n = Snapshot::new(format!("n{i:05}"));
                n.add_section(
                    "s",
                    Section::from_encoded(1, CodecId::new(b"raw0"), vec![1]),
                );
                root.add_child(n);
            }
            let mut evil = Snapshot::new("evil\x1b]0;title\x07\x1b[2J");
            evil.add_section(
                "x\x1b[31m",
                Section::from_encoded(1, CodecId::new(b"raw0"), vec![2]),
            );
            root.add_child(evil);
            let options = WriteOptions {
                producer_name: "prod\x1b[2Juction".into(),
                ..WriteOptions::default()
            };
            write(path, &root, None, &options);
        }
        other => panic!("unknown kind {other}"),
    }
}

fn write(path: &Path, tree: &Snapshot, memory: Option<&Pattern>, options: &WriteOptions) {
    file::write_snapshot_file(path, tree, memory.map(|m| m as &dyn MemorySource), options).unwrap();
}

/// A few KiB on disk (sparse), 1 TiB declared: every command finishes with little
/// memory; the default limit (this host's RAM) refuses it with a clear message.
#[test]
fn a_terabyte_declared_costs_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("tib.snap");
    let memory = Pattern {
        regions: vec![MemoryRange::new(0, TIB)],
        data: vec![MemoryRange::new(0, 8192), MemoryRange::new(TIB / 2, 4096)],
        seed: 1,
    };
    write(
        &snap,
        &Snapshot::new("vm"),
        Some(&memory),
        &WriteOptions::default(),
    );
    let refused = vmsnap(&["inspect", p(&snap)], true);
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains("--max-guest-memory"),
        "{}",
        refused.stderr
    );
    let out = dir.path().join("out.snap");
    for args in [
        vec!["verify", p(&snap)],
        vec!["inspect", p(&snap), "--max-guest-memory", "2T"],
        vec![
            "convert",
            p(&snap),
            "--codec",
            "json",
            "-o",
            p(&out),
            "--max-guest-memory",
            "2T",
        ],
        vec!["diff", p(&snap), p(&out), "--max-guest-memory", "2T"],
    ] {
        let r = vmsnap(&args, true);
        assert_eq!(
            r.code,
            0,
            "{args:?}: {}{}",
            String::from_utf8_lossy(&r.stdout),
            r.stderr
        );
        assert!(r.rss_mib < 256, "{args:?}: {} MiB", r.rss_mib);
    }
}

/// A 16 MiB metadata block of chains 32 deep with 255-byte ids: verify and inspect
/// (text and JSON) use memory in proportion to the file, not to its paths.
#[test]
fn deep_long_paths_do_not_amplify_memory() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("deep.snap");
    generated("deep", &snap);
    let size = std::fs::metadata(&snap).unwrap().len();
    assert!(size > 15 * MIB, "{size}");
    for (args, keep) in [
        (vec!["verify", p(&snap)], true),
        (vec!["inspect", p(&snap)], true),
        (vec!["inspect", p(&snap), "--json"], false),
    ] {
        let r = vmsnap(&args, keep);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(
            r.rss_mib < 256,
            "{args:?}: {} MiB for a {} MiB file",
            r.rss_mib,
            size / MIB
        );
    }
}

/// 65,535 nodes with a section each: the text output is linear (one pass over nodes
/// and sections), and escapes hostile ids and the producer.
#[test]
fn many_nodes_print_linearly_and_hostile_text_is_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("wide.snap");
    generated("wide", &snap);
    let r = vmsnap(&["inspect", p(&snap)], true);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.contains("65536 nodes, 65535 sections"),
        "{}",
        &text[..500]
    );
    assert!(!r.stdout.contains(&0x1b), "raw ESC reached the terminal");
    assert!(
        text.contains("evil\\u{1b}]0;title\\u{7}"),
        "escaped id missing"
    );
    assert!(text.contains("prod\\u{1b}[2Juction"));
}

/// Issue 19: two 4 GiB snapshots with 1 GiB of different non-zero memory each;
/// `diff`, `convert` and `merge` stream them: peak RSS under 256 MiB. `merge`
/// keeps the base's architecture. (A debug build of `vmsnap` checksums slowly: there
/// the data is 128 MiB per snapshot, the memory bound the same.)
#[test]
fn big_snapshots_stream_through_diff_convert_and_merge() {
    // The data size (and its offsets); the snapshots are 4 GiB either way.
    let data: u64 = if cfg!(debug_assertions) {
        128 * MIB
    } else {
        GIB
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = vec![MemoryRange::new(0, 4 << 30)];
    let a = dir.path().join("a.snap");
    let b = dir.path().join("b.snap");
    let base_options = WriteOptions {
        arch: Arch::Aarch64,
        ..WriteOptions::default()
    };
    for (path, seed) in [(&a, 1u8), (&b, 2u8)] {
        let m = Pattern {
            regions: layout.clone(),
            data: vec![MemoryRange::new(GIB, data)],
            seed,
        };
        write(path, &Snapshot::new("vm"), Some(&m), &base_options);
    }
    let diff = vmsnap(&["diff", p(&a), p(&b), "--max-guest-memory", "8G"], true);
    assert_eq!(diff.code, 1, "{}", diff.stderr);
    let text = String::from_utf8_lossy(&diff.stdout);
    let pages = data / 4096;
    assert!(text.contains(&format!("{pages} pages (")), "{text}");
    assert!(diff.rss_mib < 256, "diff: {} MiB", diff.rss_mib);

    let converted = dir.path().join("c.snap");
    let r = vmsnap(
        &[
            "convert",
            p(&a),
            "--codec",
            "postcard",
            "-o",
            p(&converted),
            "--max-guest-memory",
            "8G",
        ],
        true,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.rss_mib < 256, "convert: {} MiB", r.rss_mib);
    assert_eq!(
        file::verify_file(&converted).unwrap().data_bytes,
        data,
        "every stored byte copied"
    );

    // An incremental on `a`: 1 GiB of other pages changed, recorded as one extent.
    let digest = migration_kvm::snapshot_memory::content_digest(File::open(&a).unwrap()).unwrap();
    let incr = dir.path().join("i.snap");
    let m = Pattern {
        regions: vec![MemoryRange::new(2 * GIB, data)],
        data: vec![MemoryRange::new(2 * GIB, data)],
        seed: 3,
    };
    let mut f = File::create(&incr).unwrap();
    container::write_snapshot(
        &mut f,
        &Snapshot::new("vm"),
        Some(&m),
        &WriteOptions {
            parent: Some(digest),
            ..base_options.clone()
        },
    )
    .unwrap();
    drop(f);
    let merged = dir.path().join("m.snap");
    let r = vmsnap(
        &[
            "merge",
            p(&a),
            p(&incr),
            "-o",
            p(&merged),
            "--max-guest-memory",
            "8G",
        ],
        true,
    );
    assert_eq!(
        r.code,
        0,
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        r.stderr
    );
    assert!(r.rss_mib < 256, "merge: {} MiB", r.rss_mib);
    let info = file::inspect_file(&merged).unwrap();
    assert_eq!(
        info.header.arch,
        Arch::Aarch64,
        "merge kept the base's arch"
    );
    assert_eq!(file::verify_file(&merged).unwrap().data_bytes, 2 * data);
}

/// Issue 19: `vmsnap merge` writes the base's architecture, not this host's.
#[test]
fn merge_keeps_the_base_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.snap");
    let options = WriteOptions {
        arch: Arch::None,
        ..WriteOptions::default()
    };
    let m = Pattern {
        regions: vec![MemoryRange::new(0, 16 * 4096)],
        data: vec![MemoryRange::new(0, 4096)],
        seed: 1,
    };
    write(&base, &Snapshot::new("vm"), Some(&m), &options);
    let digest =
        migration_kvm::snapshot_memory::content_digest(File::open(&base).unwrap()).unwrap();
    let incr = dir.path().join("incr.snap");
    let mut f = File::create(&incr).unwrap();
    container::write_snapshot(
        &mut f,
        &Snapshot::new("vm"),
        Some(&m),
        &WriteOptions {
            parent: Some(digest),
            ..options.clone()
        },
    )
    .unwrap();
    drop(f);
    let merged = dir.path().join("merged.snap");
    let r = vmsnap(&["merge", p(&base), p(&incr), "-o", p(&merged)], true);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file::inspect_file(&merged).unwrap().header.arch, Arch::None);
}
