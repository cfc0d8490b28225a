//! Golden files: every supported container format version and every section version
//! of every state type, as bytes written by an earlier build, checked in under
//! `tests/golden/`. Each must still load and restore. A change that breaks reading an
//! old file fails here.
//!
//! Regenerate (only when adding a version, never to paper over a break):
//! `UPDATE_GOLDEN=1 cargo test -p migration-testkit --test golden`
//! (the KVM files need a usable `/dev/kvm`).
//!
//! | file | what |
//! |---|---|
//! | `container_v1.0_file.bin`, `container_v1.0_stream.bin` | container format 1.0, both forms, a tree (json and pcd1 sections) and memory |
//! | `fake_device_v1.json` | `FakeDevice` state section version 1 (shared with `conformance.rs`) |
//! | `fake_device_v2.{json,bin2,pcd1}` | `FakeDevice` state section version 2, each codec |
//! | `fake_vm_v1.bin` | a `FakeVm` (layout v1, workload v1, devices v2) with its memory, container 1.0 stream form |
//! | `kvm_v1.{json,bin2,pcd1}.bin` | KVM `VcpuState` (every section, version 1) and `VmState` (version 1) of a real vCPU, container 1.0 |
//! | `kvm_config_v1.json` | a `KvmVm` tree's `config` section, config version 1 (no CPU model) |
//! | `kvm_config_v2.{json,bin2,pcd1}` | the same with config version 2: the guest's CPU model (model version 1), each codec |
//! | `cpu_model_v1.json` | a `CpuModel` as `vmsnap cpu host --json` prints it (serde, version 1) |

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use migration_core::codec::{self, Codec};
use migration_core::container::{self, WriteOptions};
use migration_core::{MemorySink, Pausable, Snapshot, Snapshottable};
use migration_kvm::cpu_check::{
    admit_snapshot, check, CpuRefusal, CpuReport, Difference, MAX_LISTED,
};
use migration_kvm::cpu_template;
use migration_kvm::kvm_vm::{add_config, config_of};
use migration_kvm::state::CpuidState;
use migration_kvm::{
    ClockRestore, CpuModel, CpuPolicy, CpuidEntry, DeviceLayout, HostCaps, KvmVcpu, KvmVmConfig,
    KvmVmDevices, VcpuState, VmState,
};
use migration_testkit::fuzz_bodies::{seeds, small_layout};
use migration_testkit::{FakeDevice, FakeDeviceManager, FakeMemory, FakeVm};

// ---- The golden files, by name ---------------------------------------------------------

const CONTAINER_FILE: &str = "container_v1.0_file.bin";
const CONTAINER_STREAM: &str = "container_v1.0_stream.bin";
/// Written by `conformance.rs` (its version-upgrade test), loaded here too.
const FAKE_DEVICE_V1: &str = "fake_device_v1.json";
/// One per codec, in the order of [`codecs`].
const FAKE_DEVICE_V2: [&str; 3] = [
    "fake_device_v2.json",
    "fake_device_v2.bin2",
    "fake_device_v2.pcd1",
];
const FAKE_VM_V1: &str = "fake_vm_v1.bin";
/// One per codec, in the order of [`codecs`].
const KVM_V1: [&str; 3] = ["kvm_v1.json.bin", "kvm_v1.bin2.bin", "kvm_v1.pcd1.bin"];

const KVM_CONFIG_V1: &str = "kvm_config_v1.json";
/// One per codec, in the order of [`codecs`].
const KVM_CONFIG_V2: [&str; 3] = [
    "kvm_config_v2.json",
    "kvm_config_v2.bin2",
    "kvm_config_v2.pcd1",
];
const CPU_MODEL_V1: &str = "cpu_model_v1.json";

/// Every file the tests below load: exactly the contents of `tests/golden/`.
const GOLDEN: &[&str] = &[
    CONTAINER_FILE,
    CONTAINER_STREAM,
    FAKE_DEVICE_V1,
    FAKE_DEVICE_V2[0],
    FAKE_DEVICE_V2[1],
    FAKE_DEVICE_V2[2],
    FAKE_VM_V1,
    KVM_V1[0],
    KVM_V1[1],
    KVM_V1[2],
    KVM_CONFIG_V1,
    KVM_CONFIG_V2[0],
    KVM_CONFIG_V2[1],
    KVM_CONFIG_V2[2],
    CPU_MODEL_V1,
];

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn update() -> bool {
    std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(path(name)).unwrap_or_else(|e| panic!("golden file {name}: {e}"))
}

fn write(name: &str, bytes: &[u8]) {
    std::fs::write(path(name), bytes).unwrap();
    eprintln!("rewrote tests/golden/{name}");
}

fn codecs() -> Vec<Arc<dyn Codec>> {
    vec![
        Arc::new(migration_serde::JsonCodec::new()),
        Arc::new(migration_serde::BincodeCodec),
        Arc::new(migration_serde::PostcardCodec),
    ]
}

/// Each codec with its file of `names`; the name must carry the codec's id.
fn per_codec(names: [&'static str; 3]) -> Vec<(Arc<dyn Codec>, &'static str)> {
    let pairs: Vec<_> = codecs().into_iter().zip(names).collect();
    for (c, name) in &pairs {
        assert!(
            name.contains(&format!(".{}", c.id())),
            "{name} is not named after codec {}",
            c.id()
        );
    }
    pairs
}

// ---- Container format 1.0 ------------------------------------------------------------

/// The memory the container golden files hold.
fn golden_memory() -> FakeMemory {
    let m = FakeMemory::new(&small_layout()).unwrap();
    m.write_memory(0x1000, &[0xab; 0x1800]).unwrap();
    m.write_memory(0x10000, &[0x5a; 0x100]).unwrap();
    m
}

#[test]
fn container_v1_0_both_forms_load() {
    if update() {
        let tree = seeds::sample_tree();
        let mut file = Cursor::new(Vec::new());
        container::write_snapshot(
            &mut file,
            &tree,
            Some(&golden_memory()),
            &WriteOptions::default(),
        )
        .unwrap();
        write(CONTAINER_FILE, file.get_ref());
        let mut stream = Vec::new();
        container::write_snapshot_stream(
            &mut stream,
            &tree,
            Some(&golden_memory()),
            &WriteOptions::default(),
        )
        .unwrap();
        write(CONTAINER_STREAM, &stream);
    }
    let registry = migration_serde::registry();
    let file = read(CONTAINER_FILE);
    let stream = read(CONTAINER_STREAM);
    // The header says 1.0 (bytes 8..12: major, minor as u16 each, per docs/format.md).
    for bytes in [&file, &stream] {
        let info = container::inspect(Cursor::new(bytes)).unwrap();
        assert_eq!((info.header.major, info.header.minor), (1, 0));
    }
    let report = container::verify(Cursor::new(&file)).unwrap();
    assert_eq!(report.sections, 2);
    let mut r = &stream[..];
    assert_eq!(container::verify_stream(&mut r).unwrap().sections, 2);

    let want = golden_memory();
    for (form, bytes) in [("file", &file), ("stream", &stream)] {
        let memory = FakeMemory::new(&small_layout()).unwrap();
        let tree = if form == "file" {
            container::read_snapshot(Cursor::new(bytes), &registry, Some(&memory)).unwrap()
        } else {
            let mut r = &bytes[..];
            container::read_snapshot_stream(&mut r, &registry, Some(&memory), &Default::default())
                .unwrap()
        };
        let clock: u64 = tree.section("clock").unwrap().decode().unwrap();
        assert_eq!(clock, 42, "{form}");
        let serial: (u8, Vec<u8>) = tree
            .find("vm/devices")
            .unwrap()
            .section("serial0")
            .unwrap()
            .decode()
            .unwrap();
        assert_eq!(serial, (3, b"uart".to_vec()), "{form}");
        assert_eq!(
            memory.first_difference(&want).unwrap(),
            None,
            "{form}: memory differs"
        );
    }
}

// ---- FakeDevice section versions 1 and 2 --------------------------------------------

fn golden_device() -> FakeDevice {
    let mut d = FakeDevice::new("blk0", 2);
    d.step(1);
    d.step(2);
    d
}

#[test]
fn fake_device_v1_and_v2_load_and_restore() {
    if update() {
        for (c, name) in per_codec(FAKE_DEVICE_V2) {
            let mut s = golden_device().snapshot().unwrap();
            s.encode(&c).unwrap();
            write(name, &codec::encode(c.as_ref(), &s).unwrap());
        }
        // fake_device_v1.json is written by conformance.rs (its version-upgrade test).
    }
    let registry = migration_serde::registry();
    let want = golden_device();
    for (c, name) in per_codec(FAKE_DEVICE_V2) {
        let mut s: Snapshot = codec::decode(c.as_ref(), &read(name)).unwrap();
        s.resolve_codecs(&registry);
        assert_eq!(s.section("state").unwrap().version(), 2, "{name}");
        let mut fresh = FakeDevice::new("blk0", 2);
        fresh.restore(&s).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(fresh.content_digest(), want.content_digest(), "{name}");
    }
    // Version 1 (no `features`) upgrades on restore.
    let json = &codecs()[0];
    let mut s: Snapshot = codec::decode(json.as_ref(), &read(FAKE_DEVICE_V1)).unwrap();
    s.resolve_codecs(&registry);
    assert_eq!(s.section("state").unwrap().version(), 1);
    let mut fresh = FakeDevice::new("blk0", 2);
    fresh.restore(&s).unwrap();
}

// ---- FakeVm (layout v1, workload v1, a device tree) with memory -----------------------

fn golden_vm() -> FakeVm {
    let vm = FakeVm::builder()
        .memory_size(256 << 10)
        .devices(FakeDeviceManager::new().with_device(golden_device()))
        .workload(0, 7)
        .codecs(migration_serde::registry())
        .paused()
        .build()
        .unwrap();
    vm.run_workload_writes(8).unwrap();
    vm
}

#[test]
fn fake_vm_v1_loads_restores_and_self_checks() {
    if update() {
        let mut vm = golden_vm();
        let mut s = vm.snapshot().unwrap();
        s.encode(&(Arc::new(migration_serde::PostcardCodec) as Arc<dyn Codec>))
            .unwrap();
        // Stream form: only the pages the workload wrote are stored.
        let mut out = Vec::new();
        container::write_snapshot_stream(
            &mut out,
            &s,
            Some(vm.memory().as_ref()),
            &WriteOptions::default(),
        )
        .unwrap();
        write(FAKE_VM_V1, &out);
    }
    let source = golden_vm();
    let mut dest = FakeVm::destination_for(&source).unwrap();
    let bytes = read(FAKE_VM_V1);
    let s = container::read_snapshot_stream(
        &mut &bytes[..],
        &migration_serde::registry(),
        Some(dest.memory().as_ref()),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(s.section("layout").unwrap().version(), 1);
    assert_eq!(s.section("workload").unwrap().version(), 1);
    dest.restore(&s).unwrap();
    assert_eq!(dest.workload().writes, 8);
    dest.verify().unwrap();
    // Restored, it runs on: more writes still self-check.
    dest.run_workload_writes(10).unwrap();
    dest.verify().unwrap();
}

// ---- KVM VcpuState / VmState sections version 1 ----------------------------------------

/// Marker values the generator puts in the vCPU so the test can tell a real load.
const RAX: u64 = 0x601d_e4f1_1e00_0001;
const RBX: u64 = 0xfeed_beef;

fn kvm_vm(kvm: &Kvm) -> (KvmVmDevices<kvm_ioctls::VmFd>, KvmVcpu<kvm_ioctls::VcpuFd>) {
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(Default::default()).unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    fd.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    let caps = HostCaps::probe(kvm, &vm, &DeviceLayout::FULL_WITH_PIT).unwrap();
    (
        KvmVmDevices::new(vm, DeviceLayout::FULL_WITH_PIT, ClockRestore::Exact),
        KvmVcpu::new(0, fd, caps),
    )
}

fn kvm_tree(vcpu: &VcpuState, vm: &VmState, codec: &Arc<dyn Codec>) -> Snapshot {
    let mut root = Snapshot::new("vm");
    let mut v = Snapshot::new("vcpu0");
    vcpu.add_to(&mut v);
    let mut d = Snapshot::new("devices");
    vm.add_to(&mut d);
    root.add_child(v);
    root.add_child(d);
    root.encode(codec).unwrap();
    root
}

#[test]
fn kvm_state_v1_loads_and_restores_into_a_real_vcpu() {
    if update() {
        migration_testkit::require_kvm!();
        let kvm = Kvm::new().unwrap();
        let (devices, vcpu) = kvm_vm(&kvm);
        let mut regs = vcpu.backend().get_regs().unwrap();
        regs.rax = RAX;
        regs.rbx = RBX;
        vcpu.backend().set_regs(&regs).unwrap();
        let vs = vcpu.save_state().unwrap();
        let ms = devices.save_state().unwrap();
        for (c, name) in per_codec(KVM_V1) {
            let tree = kvm_tree(&vs, &ms, &c);
            let mut out = Cursor::new(Vec::new());
            container::write_snapshot(&mut out, &tree, None, &WriteOptions::default()).unwrap();
            write(name, out.get_ref());
        }
    }
    let registry = migration_serde::registry();
    let mut loaded = Vec::new();
    for (c, name) in per_codec(KVM_V1) {
        let tree = container::read_snapshot(Cursor::new(read(name)), &registry, None).unwrap();
        let v = tree.find("vm/vcpu0").unwrap();
        for (id, section) in v.sections() {
            assert_eq!(section.version(), 1, "{name}: vcpu0/{id}");
            assert_eq!(section.codec_id(), Some(c.id()), "{name}: vcpu0/{id}");
        }
        let vs = VcpuState::from_snapshot(v).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ms = VmState::from_snapshot(tree.find("vm/devices").unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((vs.regs.get().rax, vs.regs.get().rbx), (RAX, RBX), "{name}");
        assert!(!vs.msrs.0.is_empty() && !vs.cpuid.0.is_empty(), "{name}");
        loaded.push((name, vs, ms));
    }
    // Every codec's file holds the same state.
    for w in loaded.windows(2) {
        assert!(
            w[0].1 == w[1].1 && w[0].2 == w[1].2,
            "{} and {} differ",
            w[0].0,
            w[1].0
        );
    }

    migration_testkit::require_kvm!();
    let kvm = Kvm::new().unwrap();
    let host = CpuModel::host().unwrap();
    for (name, vs, ms) in &loaded {
        // The golden vCPU was recorded on some host (an AMD one with AVX-512); this
        // one may lack part of its CPU. The check decides, before any vCPU ioctl.
        let guest = CpuModel::of_vcpu("golden", vs);
        let report = check(&guest, host);
        let restored = if report.is_compatible() {
            let back = restore_golden(&kvm, name, vs, ms);
            assert_eq!(back.cpuid, vs.cpuid, "{name}");
            back
        } else {
            refused_then_restored_reduced(&kvm, name, vs, ms, &guest, host, &report)
        };
        assert_eq!(restored.regs, vs.regs, "{name}");
        assert_eq!(restored.sregs, vs.sregs, "{name}");
        assert_eq!(restored.xcrs, vs.xcrs, "{name}");
    }
}

/// Restores `vs` and `ms` into a fresh VM and reads the vCPU back.
fn restore_golden(kvm: &Kvm, name: &str, vs: &VcpuState, ms: &VmState) -> VcpuState {
    let (mut devices, mut vcpu) = kvm_vm(kvm);
    devices.pause().unwrap();
    vcpu.pause().unwrap();
    devices
        .restore_state(ms)
        .unwrap_or_else(|e| panic!("{name}: VM state: {e}"));
    vcpu.restore_state(vs)
        .unwrap_or_else(|e| panic!("{name}: vCPU state: {e}"));
    vcpu.save_state().unwrap()
}

/// On a host that lacks part of the golden CPU: the checked restore refuses with a
/// diff naming each missing feature, before touching a vCPU; the state restores
/// with its CPUID reduced to what the host has (the host's model as a template),
/// and the restored vCPU sees nothing the host lacks and every feature it was
/// given.
fn refused_then_restored_reduced(
    kvm: &Kvm,
    name: &str,
    vs: &VcpuState,
    ms: &VmState,
    guest: &CpuModel,
    host: &CpuModel,
    report: &CpuReport,
) -> VcpuState {
    eprintln!("{name} on this host: {report}");
    // The policy restores use refuses (admit_snapshot is what KvmVm::restore and
    // restore_from_file run first).
    let mut tree = Snapshot::new("vm");
    let mut v = Snapshot::new("vcpu0");
    vs.add_to(&mut v);
    tree.add_child(v);
    let policy = CpuPolicy::with_host(host.clone());
    let refused = match admit_snapshot(&tree, "golden", &policy) {
        Err(CpuRefusal::Incompatible(e)) => e,
        other => panic!("{name}: not refused: {other:?}"),
    };
    let text = refused.to_string();
    let mut missing = 0;
    for d in &refused.report().differences {
        if let Difference::MissingFeature(f) = d {
            // Really missing, and named as "name (leaf L subleaf S, reg bit B)".
            assert!(guest.has(f.bit) && !host.has(f.bit), "{name}: {f}");
            assert!(
                text.contains(&f.to_string()) || missing >= MAX_LISTED,
                "{text}"
            );
            missing += 1;
        }
    }
    assert!(missing > 0 || !refused.report().differences.is_empty());

    // Reduced: the golden table masked by this host (features ANDed, limits lowered).
    let mut reduced = vs.clone();
    reduced.cpuid = CpuidState(cpu_template::apply(guest, host).unwrap());
    let reduced_model = CpuModel::of_vcpu("reduced", &reduced);
    let after = check(&reduced_model, host);
    assert!(after.is_compatible(), "{name}: still incompatible: {after}");
    let back = restore_golden(kvm, name, &reduced, ms);
    // The restored vCPU's CPUID: nothing this host lacks, and every feature it was
    // given. (Hosts that honour KVM_SET_CPUID2 read back exactly `reduced`; kvm_pvm
    // hosts substitute their own values for some leaves.)
    let seen = CpuModel::of_vcpu("restored", &back);
    let r = check(&seen, host);
    assert!(r.is_compatible(), "{name}: {r}");
    let lost: Vec<_> = check(&reduced_model, &seen)
        .differences
        .into_iter()
        .filter(|d| matches!(d, Difference::MissingFeature(_)))
        .collect();
    assert!(
        lost.is_empty(),
        "{name}: features given but not seen: {lost:?}"
    );
    back
}

// ---- KvmVmConfig versions 1 and 2, CpuModel version 1 ----------------------------------

/// A fixed CPU model (not this host's: the files must not depend on where they
/// were written).
fn golden_cpu() -> CpuModel {
    let e = |function, index, flags, eax, ebx, ecx, edx| CpuidEntry {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
    };
    CpuModel::new(
        "pool-a",
        vec![
            e(0, 0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            e(1, 0, 0, 0xa0_0f11, 0x800, 0xf6f8_3203, 0x178b_fbff),
            e(7, 0, 1, 0, 0x219c_07ab, 0x0604, 0x10),
            e(0xd, 0, 1, 0x7, 0x340, 0x340, 0),
            e(
                0x8000_0000,
                0,
                0,
                0x8000_0008,
                0x6874_7541,
                0x444d_4163,
                0x6974_6e65,
            ),
            e(0x8000_0008, 0, 0, 0x3030, 0, 0, 0),
        ],
        4096,
        vec![0x10, 0x1b, 0x6e0, 0xc000_0080],
        Some(2_445_406),
        false,
    )
    .unwrap()
}

fn golden_config(cpu: Option<CpuModel>) -> KvmVmConfig {
    let mut c = KvmVmConfig::new(64 << 20, 2);
    c.cpu = cpu;
    c
}

fn config_tree(config: &KvmVmConfig, codec: &Arc<dyn Codec>) -> Snapshot {
    let mut tree = Snapshot::new(migration_kvm::kvm_vm::VM_ID);
    add_config(&mut tree, config);
    tree.encode(codec).unwrap();
    tree
}

#[test]
fn kvm_config_v1_and_v2_and_cpu_model_v1_load() {
    let json = &codecs()[0];
    if update() {
        let v1 = config_tree(&golden_config(None), json);
        write(KVM_CONFIG_V1, &codec::encode(json.as_ref(), &v1).unwrap());
        for (c, name) in per_codec(KVM_CONFIG_V2) {
            let v2 = config_tree(&golden_config(Some(golden_cpu())), &c);
            write(name, &codec::encode(c.as_ref(), &v2).unwrap());
        }
        write(
            CPU_MODEL_V1,
            serde_json::to_string_pretty(&golden_cpu())
                .unwrap()
                .as_bytes(),
        );
    }
    let registry = migration_serde::registry();
    let load = |c: &Arc<dyn Codec>, name: &str| {
        let mut s: Snapshot = codec::decode(c.as_ref(), &read(name)).unwrap();
        s.resolve_codecs(&registry);
        config_of(&s).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    // Version 1 still reads, without a model; its bytes say version 1.
    let v1 = load(json, KVM_CONFIG_V1);
    assert_eq!(v1, golden_config(None));
    assert_eq!(&v1.to_bytes()[4..8], &1u32.to_le_bytes());
    for (c, name) in per_codec(KVM_CONFIG_V2) {
        let v2 = load(&c, name);
        assert_eq!(v2, golden_config(Some(golden_cpu())), "{name}");
        assert_eq!(&v2.to_bytes()[4..8], &2u32.to_le_bytes(), "{name}");
    }
    let model: CpuModel = serde_json::from_slice(&read(CPU_MODEL_V1)).unwrap();
    assert_eq!(model, golden_cpu());
    assert_eq!(
        model
            .features()
            .iter()
            .filter_map(|f| f.name)
            .take(3)
            .collect::<Vec<_>>(),
        ["sse3", "pclmulqdq", "ssse3"]
    );
}

#[test]
fn every_golden_file_is_used() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut loaded: Vec<String> = GOLDEN.iter().map(|n| n.to_string()).collect();
    loaded.sort();
    assert_eq!(
        on_disk, loaded,
        "tests/golden/ (left) must hold exactly the files tests/golden.rs loads (right)"
    );
}
