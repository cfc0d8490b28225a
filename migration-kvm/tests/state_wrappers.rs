//! The state wrappers through every migration-serde codec: round trips, and bytes
//! that claim to be a struct of another size rejected rather than zero-padded.

use std::sync::Arc;

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_sregs};
use migration_core::{codec, Codec, MigratableError, Snapshot};
use migration_kvm::state::{CpuidState, MsrState, XsaveState};
use migration_kvm::{CpuidEntry, KvmVcpu, MsrEntry, Raw, VcpuState};
use migration_testkit::recording_vcpu::RecordingVcpu;
use serde::Serialize;

fn codecs() -> Vec<Arc<dyn Codec>> {
    let codecs: Vec<Arc<dyn Codec>> = migration_serde::registry().iter().cloned().collect();
    let ids: Vec<String> = codecs.iter().map(|c| c.id().to_string()).collect();
    for id in ["json", "bin2", "pcd1"] {
        assert!(ids.iter().any(|i| i == id), "codec {id} missing: {ids:?}");
    }
    codecs
}

/// Same shape as `Raw<T>` on the wire, with any tag and any bytes.
#[derive(Serialize)]
#[serde(rename = "Raw")]
struct Forged {
    tag: &'static str,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

#[test]
fn raw_structs_round_trip_through_every_codec() {
    let regs = Raw::new(kvm_regs {
        rax: 1,
        rbx: 2,
        rip: 0xfff0,
        rflags: 0x202,
        ..Default::default()
    });
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x320] = 0x20;
    let lapic = Raw::new(lapic);
    for c in codecs() {
        let b = codec::encode(c.as_ref(), &regs).unwrap();
        assert_eq!(
            codec::decode::<Raw<kvm_regs>>(c.as_ref(), &b).unwrap(),
            regs
        );
        let b = codec::encode(c.as_ref(), &lapic).unwrap();
        assert_eq!(
            codec::decode::<Raw<kvm_lapic_state>>(c.as_ref(), &b).unwrap(),
            lapic
        );
    }
}

#[test]
fn wrong_sizes_and_wrong_types_are_rejected_by_every_codec() {
    for c in codecs() {
        let name = c.name().to_owned();
        // postcard's errors drop custom messages: check the text where it survives.
        let says = |e: &migration_core::CodecError, what: &str| {
            c.id().to_string() == "pcd1" || e.to_string().contains(what)
        };
        // Three bytes claiming to be a kvm_regs.
        let three = codec::encode(
            c.as_ref(),
            &Forged {
                tag: "kvm_regs",
                bytes: vec![1, 2, 3],
            },
        )
        .unwrap();
        let e = codec::decode::<Raw<kvm_regs>>(c.as_ref(), &three).unwrap_err();
        assert!(says(&e, "found 3"), "{name}: {e}");

        // kvm_regs bytes read as kvm_sregs: wrong tag.
        let regs = codec::encode(c.as_ref(), &Raw::new(kvm_regs::default())).unwrap();
        let e = codec::decode::<Raw<kvm_sregs>>(c.as_ref(), &regs).unwrap_err();
        assert!(says(&e, "not a `kvm_sregs`"), "{name}: {e}");

        // kvm_regs bytes relabelled as kvm_sregs: wrong size.
        let relabelled = codec::encode(
            c.as_ref(),
            &Forged {
                tag: "kvm_sregs",
                bytes: vec![0; std::mem::size_of::<kvm_regs>()],
            },
        )
        .unwrap();
        let e = codec::decode::<Raw<kvm_sregs>>(c.as_ref(), &relabelled).unwrap_err();
        let found = format!("found {}", std::mem::size_of::<kvm_regs>());
        assert!(says(&e, &found), "{name}: {e}");

        // One byte too many.
        let long = codec::encode(
            c.as_ref(),
            &Forged {
                tag: "kvm_regs",
                bytes: vec![0; std::mem::size_of::<kvm_regs>() + 1],
            },
        )
        .unwrap();
        assert!(
            codec::decode::<Raw<kvm_regs>>(c.as_ref(), &long).is_err(),
            "{name}"
        );

        // An xsave area of a length no host has.
        let xs = codec::encode(
            c.as_ref(),
            &Forged {
                tag: "xsave",
                bytes: vec![0; 100],
            },
        )
        .unwrap();
        assert!(
            codec::decode::<XsaveState>(c.as_ref(), &xs).is_err(),
            "{name}"
        );
    }
}

#[test]
fn msr_and_cpuid_lists_keep_their_entries() {
    let msrs = MsrState(vec![
        MsrEntry {
            index: 0x10,
            data: u64::MAX,
        },
        MsrEntry {
            index: 0x6e0,
            data: 7,
        },
    ]);
    let cpuid = CpuidState(vec![CpuidEntry {
        function: 7,
        index: 0,
        flags: 1,
        eax: 0,
        ebx: 0x2000_0000,
        ecx: 4,
        edx: 0x8000_0000,
    }]);
    for c in codecs() {
        let b = codec::encode(c.as_ref(), &msrs).unwrap();
        assert_eq!(codec::decode::<MsrState>(c.as_ref(), &b).unwrap(), msrs);
        let b = codec::encode(c.as_ref(), &cpuid).unwrap();
        assert_eq!(codec::decode::<CpuidState>(c.as_ref(), &b).unwrap(), cpuid);
    }
}

#[test]
fn a_snapshot_section_of_the_wrong_struct_is_rejected_by_name() {
    let fake = RecordingVcpu::new();
    let state = KvmVcpu::new(0, fake.clone(), fake.caps())
        .save_state()
        .unwrap();
    for c in codecs() {
        let mut s = Snapshot::new("vcpu0");
        state.add_to(&mut s);
        // Put the regs where sregs belong.
        s.add_state("sregs", state.regs);
        s.encode(&c).unwrap();
        let e = VcpuState::from_snapshot(&s).unwrap_err();
        match &e {
            MigratableError::Codec { path, section, .. } => {
                assert_eq!((path.as_str(), section.as_str()), ("vcpu0", "sregs"));
            }
            other => panic!("{}: unexpected {other}", c.name()),
        }

        // The untouched snapshot reads back whole.
        let mut good = Snapshot::new("vcpu0");
        state.add_to(&mut good);
        good.encode(&c).unwrap();
        assert_eq!(VcpuState::from_snapshot(&good).unwrap(), state);
    }
}
