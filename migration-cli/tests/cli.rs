//! `vmsnap` run as a process, on snapshots these tests make: the demo (fake mode, and
//! KVM mode where `/dev/kvm` works), inspect (text and `--json`), verify (intact and
//! corrupt), diff, convert (KVM state sections, and refusal of unknown ones), merge.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use kvm_bindings::{kvm_clock_data, kvm_regs, kvm_sregs};
use migration_core::container::WriteOptions;
use migration_core::{file, Codec, MemoryRange, Snapshot};
use migration_kvm::state::{CpuidState, MsrState, XsaveState};
use migration_kvm::{CpuidEntry, MsrEntry, Raw};

fn vmsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(args)
        .output()
        .expect("run vmsnap")
}

fn vmsnap_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run vmsnap")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Guest memory for the test snapshots: a few non-zero pages.
fn memory(seed: u8) -> SparseMem {
    let m = SparseMem::new(vec![MemoryRange::new(0, 1 << 20)]);
    for i in 0..4u64 {
        m.put(i * 0x10000, vec![seed.wrapping_add(i as u8) | 1; 4096]);
    }
    m
}

/// A tiny MemorySource: a few pages over a zero background.
struct SparseMem {
    regions: Vec<MemoryRange>,
    pages: std::sync::Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
}

impl SparseMem {
    fn new(regions: Vec<MemoryRange>) -> Self {
        Self {
            regions,
            pages: Default::default(),
        }
    }
    fn put(&self, gpa: u64, page: Vec<u8>) {
        self.pages.lock().unwrap().insert(gpa, page);
    }
}

impl migration_core::MemorySource for SparseMem {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), migration_core::MemoryError> {
        buf.fill(0);
        let end = gpa + buf.len() as u64;
        for (&pg, data) in self.pages.lock().unwrap().iter() {
            let (lo, hi) = (pg.max(gpa), (pg + 4096).min(end));
            if lo < hi {
                buf[(lo - gpa) as usize..(hi - gpa) as usize]
                    .copy_from_slice(&data[(lo - pg) as usize..(hi - pg) as usize]);
            }
        }
        Ok(())
    }
}

/// A snapshot tree shaped like a KVM VM's: `vm/devices` (clock) and `vm/vcpu0`
/// (regs, sregs, cpuid2, xsave, msrs), encoded with `codec`.
fn kvm_tree(rip: u64, codec: Arc<dyn Codec>, extra_unknown: bool) -> Snapshot {
    let mut vm = Snapshot::new("vm");
    let mut devices = Snapshot::new("devices");
    devices.add_state(
        "clock",
        Raw::new(kvm_clock_data {
            clock: 123_456_789,
            ..Default::default()
        }),
    );
    vm.add_child(devices);
    let mut vcpu = Snapshot::new("vcpu0");
    vcpu.add_state(
        "regs",
        Raw::new(kvm_regs {
            rip,
            rsp: 0x8_0000,
            rflags: 0x202,
            ..Default::default()
        }),
    );
    let mut sregs = kvm_sregs {
        cr0: 0x8005_0033,
        cr3: 0x9000,
        cr4: 0x620,
        efer: 0xd01,
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    sregs.cs.selector = 0x08;
    vcpu.add_state("sregs", Raw::new(sregs));
    vcpu.add_state(
        "cpuid2",
        CpuidState(vec![CpuidEntry {
            function: 0,
            eax: 0x10,
            ebx: u32::from_le_bytes(*b"Auth"),
            edx: u32::from_le_bytes(*b"enti"),
            ecx: u32::from_le_bytes(*b"cAMD"),
            ..Default::default()
        }]),
    );
    vcpu.add_state(
        "xsave",
        XsaveState::from_bytes(vec![0; 4096]).expect("xsave size"),
    );
    vcpu.add_state(
        "msrs",
        MsrState(vec![
            MsrEntry {
                index: 0x10,
                data: 0x1234,
            },
            MsrEntry {
                index: 0xc000_0082,
                data: 0xffff_8000_0000_1000,
            },
        ]),
    );
    vm.add_child(vcpu);
    if extra_unknown {
        vm.add_state_as("vmm_config", 1, String::from("a VMM's own state"));
    }
    vm.encode(&codec).expect("encode");
    vm
}

fn write_snap(dir: &Path, name: &str, tree: &Snapshot, seed: u8) -> PathBuf {
    let path = dir.join(name);
    file::write_snapshot_file(&path, tree, Some(&memory(seed)), &WriteOptions::default())
        .expect("write snapshot");
    path
}

fn json_codec() -> Arc<dyn Codec> {
    Arc::new(migration_serde::JsonCodec::new())
}

fn postcard() -> Arc<dyn Codec> {
    Arc::new(migration_serde::PostcardCodec)
}

#[test]
fn inspect_prints_named_kvm_fields_and_json_parses() {
    let dir = tempfile::tempdir().unwrap();
    let snap = write_snap(
        dir.path(),
        "a.snap",
        &kvm_tree(0x1_2345, postcard(), false),
        1,
    );

    let out = vmsnap(&["inspect", p(&snap)]);
    assert!(out.status.success(), "{}", all(&out));
    let text = stdout(&out);
    for want in [
        "rip = 0x12345",
        "cr3 = 0x9000",
        "efer = 0xd01",
        "apic_base = 0xfee00900",
        "IA32_TSC (0x10) = 0x1234",
        "LSTAR (0xc0000082) = 0xffff800000001000",
        "vendor = AuthenticAMD",
        "clock_ns = 123456789",
        "\n    vcpu0  (",
        "pcd1",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }

    let out = vmsnap(&["inspect", p(&snap), "--json"]);
    assert!(out.status.success(), "{}", all(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect --json parses");
    assert_eq!(v["format_version"], "1.0");
    let regs = v["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"] == "vm/vcpu0" && s["id"] == "regs")
        .expect("regs section");
    assert_eq!(regs["fields"]["rip"], 0x1_2345);
    assert_eq!(regs["type"], "Raw<kvm_regs>");
    let ext = &v["extents"][0];
    assert_eq!(ext["length"], 1 << 20);
    assert_eq!(ext["allocated"], 4 * 4096);
}

#[test]
fn verify_passes_an_intact_file_and_names_the_corrupt_section() {
    let dir = tempfile::tempdir().unwrap();
    let tree = kvm_tree(0x4242_4242, json_codec(), false);
    let snap = write_snap(dir.path(), "a.snap", &tree, 1);
    let out = vmsnap(&["verify", p(&snap)]);
    assert!(out.status.success(), "{}", all(&out));
    assert!(stdout(&out).starts_with("OK"), "{}", all(&out));

    // Flip one digit of rip inside the JSON payload of vm/vcpu0:regs.
    let mut bytes = std::fs::read(&snap).unwrap();
    let info = migration_core::file::inspect_file(&snap).unwrap();
    let regs = info
        .sections
        .iter()
        .find(|s| info.path(s.node) == "vm/vcpu0" && s.id == "regs")
        .unwrap();
    let at = regs.offset as usize + regs.length as usize / 2;
    bytes[at] ^= 0x01;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, &bytes).unwrap();

    let out = vmsnap(&["verify", p(&bad)]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    let text = stdout(&out);
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("vm/vcpu0"), "names the node: {text}");
    assert!(text.contains("regs"), "names the section: {text}");

    // A corrupt memory page is named too.
    let mut bytes = std::fs::read(&snap).unwrap();
    let run = &info.runs.as_ref().unwrap()[1];
    bytes[run.file_offset as usize + 7] ^= 0x80;
    std::fs::write(&bad, &bytes).unwrap();
    let out = vmsnap(&["verify", p(&bad)]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    assert!(stdout(&out).contains("run 1"), "{}", all(&out));

    // Not a snapshot, or no file at all: usage/IO error, exit 2.
    std::fs::write(&bad, b"definitely not a snapshot container").unwrap();
    assert_eq!(vmsnap(&["verify", p(&bad)]).status.code(), Some(2));
    let missing = dir.path().join("missing.snap");
    assert_eq!(vmsnap(&["verify", p(&missing)]).status.code(), Some(2));
    assert_eq!(vmsnap(&["verify"]).status.code(), Some(2));
}

#[test]
fn diff_names_sections_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_snap(
        dir.path(),
        "a.snap",
        &kvm_tree(0x1000, postcard(), false),
        1,
    );
    let a2 = write_snap(
        dir.path(),
        "a2.snap",
        &kvm_tree(0x1000, postcard(), false),
        1,
    );
    let b = write_snap(
        dir.path(),
        "b.snap",
        &kvm_tree(0x2000, postcard(), false),
        9,
    );

    let out = vmsnap(&["diff", p(&a), p(&a2)]);
    assert_eq!(out.status.code(), Some(0), "{}", all(&out));
    assert!(stdout(&out).contains("identical"), "{}", all(&out));

    let out = vmsnap(&["diff", p(&a), p(&b)]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    let text = stdout(&out);
    assert!(text.contains("~ vm/vcpu0:regs"), "{text}");
    assert!(!text.contains("vm/vcpu0:sregs"), "sregs are equal: {text}");
    assert!(text.contains("4 pages"), "{text}");
    assert!(text.contains("0x0000010000"), "{text}");
}

#[test]
fn convert_reencodes_kvm_state_and_refuses_unknown_sections() {
    let dir = tempfile::tempdir().unwrap();
    let src = write_snap(
        dir.path(),
        "a.snap",
        &kvm_tree(0xabcd, postcard(), false),
        3,
    );
    let out_path = dir.path().join("json.snap");
    let out = vmsnap(&["convert", p(&src), "--codec", "json", "-o", p(&out_path)]);
    assert!(out.status.success(), "{}", all(&out));
    let info = migration_core::file::inspect_file(&out_path).unwrap();
    assert!(info
        .sections
        .iter()
        .all(|s| s.codec == migration_serde::JSON_ID));
    // Same state and memory, another codec: decoded, equal.
    let back = file::read_snapshot_file(&out_path, &migration_serde::registry(), None).unwrap();
    let regs: Raw<kvm_regs> = back.find("vm/vcpu0").unwrap().state("regs").unwrap();
    assert_eq!(regs.get().rip, 0xabcd);
    let inspected = vmsnap(&["inspect", p(&out_path)]);
    assert!(
        stdout(&inspected).contains("rip = 0xabcd"),
        "{}",
        all(&inspected)
    );
    let d = vmsnap(&["diff", p(&src), p(&out_path)]);
    let text = stdout(&d);
    assert!(text.contains("codec pcd1 vs json"), "{text}");
    // Decoded with their real types, the two encodings hold the same state.
    assert!(text.contains("same decoded state"), "{text}");
    assert!(!text.contains("decoded state differs"), "{text}");
    assert!(!text.contains("pages ("), "memory unchanged: {text}");

    // A section recorded at a version its type does not have (regs v2; the type is
    // v1): refused as undecodable, never relabelled or read as v1.
    let mut tree = kvm_tree(0xabcd, postcard(), false);
    let mut vcpu = tree.child("vcpu0").unwrap().clone();
    let regs: Raw<kvm_regs> = vcpu.state("regs").unwrap();
    vcpu.add_state_as("regs", 2, regs);
    tree.add_child(vcpu);
    tree.encode(&postcard()).unwrap();
    let src = write_snap(dir.path(), "v2.snap", &tree, 3);
    let refused = dir.path().join("v2-json.snap");
    let out = vmsnap(&["convert", p(&src), "--codec", "json", "-o", p(&refused)]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    assert!(
        stdout(&out).contains("cannot decode: vm/vcpu0:regs"),
        "{}",
        all(&out)
    );
    assert!(!refused.exists(), "no output on refusal");

    // A section of a type vmsnap does not know: refused, named, nothing written.
    let src = write_snap(dir.path(), "u.snap", &kvm_tree(1, postcard(), true), 3);
    let refused = dir.path().join("refused.snap");
    let out = vmsnap(&["convert", p(&src), "--codec", "bincode", "-o", p(&refused)]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    assert!(stdout(&out).contains("vm:vmm_config"), "{}", all(&out));
    assert!(!refused.exists(), "no output on refusal");
}

#[test]
fn demo_in_fake_mode_reports_and_leaves_a_snapshot_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("keep");
    let out = vmsnap_env(
        &["demo", "--keep", p(&keep), "--rounds", "2"],
        &[("VMSNAP_FORCE_FAKE", "1")],
    );
    assert!(out.status.success(), "{}", all(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.starts_with("no usable /dev/kvm (")),
        "{text}"
    );
    // Without -v the libraries' events stay quiet.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("round sent"),
        "{}",
        all(&out)
    );
    for want in [
        "snapshot:",
        "on disk",
        "restore:",
        "migration 1/2",
        "migration 2/2",
        "downtime",
        "guest after restore: continued correctly",
        "guest after migration 2: continued correctly",
        "demo OK",
    ] {
        assert!(text.contains(want), "missing `{want}`:\n{text}");
    }
    let snap = keep.join("demo.snap");
    let out = vmsnap(&["verify", p(&snap)]);
    assert!(out.status.success(), "{}", all(&out));
    // The fake VM's sections are testkit types: convert refuses them by name.
    let out = vmsnap(&[
        "convert",
        p(&snap),
        "--codec",
        "json",
        "-o",
        p(&dir.path().join("x")),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    assert!(stdout(&out).contains("vm:workload"), "{}", all(&out));
}

#[test]
fn demo_writes_the_migration_report_as_svg() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("report.svg");
    let out = vmsnap_env(
        &[
            "demo",
            "--migrate-only",
            "--auto-converge",
            "--link",
            "64M",
            "--report",
            p(&svg),
        ],
        &[("VMSNAP_FORCE_FAKE", "1")],
    );
    assert!(out.status.success(), "{}", all(&out));
    let text = stdout(&out);
    for want in [
        "limited to 64.00 MiB/s",
        "per round, dirty rate / link bandwidth / throttle:",
        "report picture:",
    ] {
        assert!(text.contains(want), "missing `{want}`:\n{text}");
    }
    let svg = std::fs::read_to_string(&svg).expect("the SVG was written");
    assert!(svg.starts_with("<svg") && svg.contains("dirty rate and link bandwidth"));
}

#[test]
fn demo_on_kvm() {
    if !migration_testkit::skip_unless_kvm() {
        return;
    }
    let out = vmsnap(&["-v", "demo"]);
    assert!(out.status.success(), "{}", all(&out));
    let text = stdout(&out);
    assert!(!text.contains("no usable /dev/kvm"), "{text}");
    // `-v`: the libraries' events an operator reads, on stderr.
    let log = String::from_utf8_lossy(&out.stderr);
    for want in [
        "snapshot written",
        "restore_from_file",
        "state tree read",
        "memory restored",
        "VM built",
        "device and vCPU state restored",
        "HELLO received",
        "handshake accepted",
        "round sent",
        "dirty log read",
        "estimated_downtime",
        "source paused for the final round",
        "device state captured",
        "device state restored, READY",
        "GO sent",
        "migration completed",
    ] {
        assert!(log.contains(want), "missing event `{want}`:\n{log}");
    }
    assert!(
        text.contains("guest after migration 1: continued correctly"),
        "{text}"
    );
    assert!(
        text.contains("guest after restore: continued correctly"),
        "{text}"
    );
}

#[test]
fn demo_on_kvm_with_four_vcpus() {
    if !migration_testkit::skip_unless_kvm() {
        return;
    }
    let out = vmsnap(&["demo", "--vcpus", "4", "--mem", "64M"]);
    assert!(out.status.success(), "{}", all(&out));
    let text = stdout(&out);
    assert!(text.contains("KVM guest smp"), "{text}");
    assert!(text.contains("4 vCPUs"), "{text}");
    for step in ["restore", "migration 1"] {
        assert!(
            text.contains(&format!("guest after {step}: continued correctly")),
            "{text}"
        );
    }
    // More vCPUs than the SMP guest runs with is refused before anything starts.
    let out = vmsnap(&["demo", "--vcpus", "33"]);
    assert_eq!(out.status.code(), Some(2), "{}", all(&out));
}

#[test]
fn merge_applies_incrementals_and_refuses_a_broken_chain() {
    use migration_core::{MemoryRangeTable, MemorySink};
    use migration_kvm::memory::GuestRam;
    use migration_kvm::snapshot_memory::{content_digest, write_full, write_incremental};
    use std::fs::File;

    let dir = tempfile::tempdir().unwrap();
    let mem = GuestRam::anonymous(&[MemoryRange::new(0, 1 << 20)]).unwrap();
    let tree = |rip| kvm_tree(rip, postcard(), false);
    let opts = WriteOptions::default();
    mem.write_memory(0x3000, &[7; 4096]).unwrap();
    let base = dir.path().join("base.snap");
    write_full(&mut File::create(&base).unwrap(), &tree(1), &mem, &opts).unwrap();

    // Incremental 1: one page changes, one page is zeroed.
    mem.write_memory(0x5000, &[9; 4096]).unwrap();
    mem.write_memory(0x3000, &[0; 4096]).unwrap();
    let mut dirty = MemoryRangeTable::new();
    dirty.push(MemoryRange::new(0x3000, 0x1000));
    dirty.push(MemoryRange::new(0x5000, 0x1000));
    let inc1 = dir.path().join("inc1.snap");
    let parent = content_digest(File::open(&base).unwrap()).unwrap();
    write_incremental(
        &mut File::create(&inc1).unwrap(),
        &tree(2),
        &mem,
        &dirty,
        parent,
        &opts,
    )
    .unwrap();
    // Incremental 2: another page.
    mem.write_memory(0x8000, &[3; 100]).unwrap();
    let mut dirty = MemoryRangeTable::new();
    dirty.push(MemoryRange::new(0x8000, 0x1000));
    let inc2 = dir.path().join("inc2.snap");
    let parent = content_digest(File::open(&inc1).unwrap()).unwrap();
    write_incremental(
        &mut File::create(&inc2).unwrap(),
        &tree(3),
        &mem,
        &dirty,
        parent,
        &opts,
    )
    .unwrap();
    // What the merge must equal: a full snapshot of the final memory and tree.
    let expected = dir.path().join("expected.snap");
    write_full(&mut File::create(&expected).unwrap(), &tree(3), &mem, &opts).unwrap();

    let merged = dir.path().join("merged.snap");
    let out = vmsnap(&["merge", p(&base), p(&inc1), p(&inc2), "-o", p(&merged)]);
    assert!(out.status.success(), "{}", all(&out));
    assert!(vmsnap(&["verify", p(&merged)]).status.success());
    let out = vmsnap(&["diff", p(&merged), p(&expected)]);
    assert_eq!(out.status.code(), Some(0), "{}", all(&out));

    // Out of order: inc2 does not follow base. Refused, nothing written.
    let wrong = dir.path().join("wrong.snap");
    let out = vmsnap(&["merge", p(&base), p(&inc2), "-o", p(&wrong)]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    assert!(stdout(&out).contains("incremental #0"), "{}", all(&out));
    assert!(!wrong.exists());
}

#[test]
fn demo_runs_a_guest_file_and_exits_non_zero_when_the_guest_fails() {
    if !migration_testkit::skip_unless_kvm() {
        return;
    }
    use migration_testkit::guest::Guest;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("counter_avx.bin");
    std::fs::write(&good, Guest::CounterAvx.image()).unwrap();
    let out = vmsnap(&[
        "demo",
        "--guest",
        p(&good),
        "--mem",
        "64M",
        "--snapshot-only",
    ]);
    assert!(out.status.success(), "{}", all(&out));
    let text = stdout(&out);
    assert!(text.contains("counter_avx.bin, 64 MiB"), "{text}");
    assert!(
        text.contains("guest after restore: continued correctly"),
        "{text}"
    );
    assert!(!text.contains("migration 1"), "--snapshot-only: {text}");

    // A guest that reports a self-check failure at once:
    // mov dx, 0x11; mov eax, 0xdead0001; out dx, eax; hlt; jmp $
    let bad = dir.path().join("fails.bin");
    std::fs::write(
        &bad,
        [
            0x66, 0xba, 0x11, 0x00, 0xb8, 0x01, 0x00, 0xad, 0xde, 0xef, 0xf4, 0xeb, 0xfe,
        ],
    )
    .unwrap();
    let out = vmsnap(&["demo", "--guest", p(&bad), "--mem", "16M"]);
    assert_eq!(out.status.code(), Some(1), "{}", all(&out));
    let text = stdout(&out);
    assert!(text.contains("guest after boot: FAILED"), "{text}");
    assert!(text.contains("0xdead0001"), "{text}");
    assert!(text.contains("demo FAILED"), "{text}");
}

#[test]
fn cpu_host_check_and_baseline_work_on_a_real_snapshot() {
    use migration_kvm::{CpuModel, ExitAction, KvmVm, KvmVmConfig};
    if !migration_testkit::skip_unless_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    let mut vm = KvmVm::new(
        KvmVmConfig::new(4 << 20, 1),
        migration_serde::registry(),
        |_| Box::new(|_| ExitAction::Continue),
    )
    .unwrap();
    vm.save_snapshot(&snap).unwrap();

    // This host, as JSON and as text.
    let o = vmsnap(&["cpu", "host", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", all(&o));
    let host: CpuModel = serde_json::from_slice(&o.stdout).unwrap();
    let host_json = dir.path().join("host.json");
    std::fs::write(&host_json, &o.stdout).unwrap();
    let o = vmsnap(&["cpu", "host"]);
    assert_eq!(o.status.code(), Some(0), "{}", all(&o));
    assert!(
        stdout(&o).contains("features: ") && stdout(&o).contains(" sse2 "),
        "{}",
        all(&o)
    );

    // The snapshot fits this host.
    let o = vmsnap(&["cpu", "check", p(&snap)]);
    assert_eq!(o.status.code(), Some(0), "{}", all(&o));
    assert!(stdout(&o).contains("OK: fits"), "{}", all(&o));

    // Not a host without a feature it has: exit 1, the feature named.
    let (missing, bit) = ["avx2", "sse42", "sse2"]
        .into_iter()
        .find_map(|n| {
            let b = migration_kvm::cpu_features::feature_by_name(n)?;
            host.has(b).then_some((n, b))
        })
        .unwrap();
    let small = host.without("small", &[missing]).unwrap();
    let small_json = dir.path().join("small.json");
    std::fs::write(&small_json, serde_json::to_vec(&small).unwrap()).unwrap();
    let o = vmsnap(&["cpu", "check", p(&snap), "--host", p(&small_json)]);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    assert!(
        stdout(&o).contains(&format!("missing {missing} ({bit})")),
        "{}",
        all(&o)
    );

    // The baseline of the two is the smaller one's features; the snapshot does not
    // fit it either.
    let o = vmsnap(&[
        "cpu",
        "baseline",
        p(&host_json),
        p(&small_json),
        "--name",
        "pool",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", all(&o));
    let pool: CpuModel = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(pool.name, "pool");
    assert_eq!(pool.features(), small.features());
    let pool_json = dir.path().join("pool.json");
    std::fs::write(&pool_json, &o.stdout).unwrap();
    let o = vmsnap(&["cpu", "check", p(&snap), "--host", p(&pool_json)]);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));

    // inspect names the guest's features and its model.
    let o = vmsnap(&["inspect", p(&snap)]);
    assert_eq!(o.status.code(), Some(0), "{}", all(&o));
    let text = stdout(&o);
    assert!(
        text.contains("features = ") && text.contains(" sse2 "),
        "{text}"
    );
    assert!(text.contains("cpu_model = \"host-passthrough\""), "{text}");

    // A file that is not a model is an error (exit 2), not a panic.
    let o = vmsnap(&["cpu", "check", p(&snap), "--host", p(&snap)]);
    assert_eq!(o.status.code(), Some(2), "{}", all(&o));
}
