//! Encode+decode throughput of each codec on a vCPU-sized state and on a 16 MiB byte
//! section, against a plain memcpy of the same bytes measured in the same run.
//!
//! `cargo bench -p migration-serde --bench codecs -- --measurement-time 2 --warm-up-time 1`
//! runs criterion, then prints a table: MB/s (of raw state bytes) and the time of one
//! encode+decode as a multiple of one memcpy of the same number of bytes.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};
use migration_core::{codec, Codec};
use migration_serde::{BincodeCodec, JsonCodec, PostcardCodec};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// What migration-kvm saves per vCPU, in the shapes kvm-bindings serializes.
#[derive(Clone, Serialize, Deserialize)]
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: ByteBuf,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    cpuid: Vec<kvm_cpuid_entry2>,
    events: kvm_vcpu_events,
}

fn filled<T: serde::de::DeserializeOwned>(seed: u8) -> T {
    let raw = ByteBuf::from(
        (0..std::mem::size_of::<T>())
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect::<Vec<u8>>(),
    );
    let bytes = codec::encode(&PostcardCodec, &raw).expect("encode");
    codec::decode(&PostcardCodec, &bytes).expect("decode")
}

fn vcpu() -> (VcpuState, usize) {
    let state = VcpuState {
        regs: filled(3),
        sregs: filled(5),
        xsave: ByteBuf::from((0..4096).map(|i| (i % 7) as u8).collect::<Vec<u8>>()),
        xcrs: filled(7),
        debugregs: filled(9),
        lapic: filled(11),
        msrs: (0..40)
            .map(|i| kvm_msr_entry {
                index: 0xc000_0080 + i,
                data: u64::from(i) << 33 | 0x1234,
                ..Default::default()
            })
            .collect(),
        cpuid: (0..75)
            .map(|i| filled::<kvm_cpuid_entry2>(i as u8 | 1))
            .collect(),
        events: filled(13),
    };
    let raw = std::mem::size_of::<kvm_regs>()
        + std::mem::size_of::<kvm_sregs>()
        + 4096
        + std::mem::size_of::<kvm_xcrs>()
        + std::mem::size_of::<kvm_debugregs>()
        + std::mem::size_of::<kvm_lapic_state>()
        + 40 * std::mem::size_of::<kvm_msr_entry>()
        + 75 * std::mem::size_of::<kvm_cpuid_entry2>()
        + std::mem::size_of::<kvm_vcpu_events>();
    (state, raw)
}

fn codecs() -> [(&'static str, Box<dyn Codec>); 3] {
    [
        ("json", Box::new(JsonCodec::new())),
        ("bincode", Box::new(BincodeCodec)),
        ("postcard", Box::new(PostcardCodec)),
    ]
}

fn bench_case<T>(c: &mut Criterion, group: &str, value: &T, raw: usize)
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(raw as u64));
    let src = vec![0x5au8; raw];
    let mut dst = vec![0u8; raw];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    for (name, codec) in codecs() {
        let encoded = codec::encode(codec.as_ref(), value).expect("encode");
        println!(
            "{group}/{name}: {raw} raw bytes -> {} encoded bytes",
            encoded.len()
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                let bytes = codec::encode(codec.as_ref(), black_box(value)).expect("encode");
                let back: T = codec::decode(codec.as_ref(), &bytes).expect("decode");
                black_box(back);
            })
        });
    }
    g.finish();
}

/// Criterion's output directory: `<target>/criterion`, next to the bench binary's
/// `<target>/<profile>/deps/`.
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(home.into());
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// Median time of one iteration in nanoseconds, from criterion's estimates.
fn median_ns(group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir()?
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn print_table(cases: &[(&str, usize)]) {
    println!();
    println!("| case | codec | encode+decode | MB/s | × memcpy time |");
    println!("|---|---|---|---|---|");
    for &(group, raw) in cases {
        let Some(memcpy) = median_ns(group, "memcpy") else {
            println!("| {group} | (no criterion estimates found) | | | |");
            continue;
        };
        println!(
            "| {group} ({raw} B) | memcpy | {} | {:.0} | 1.0 |",
            fmt_ns(memcpy),
            raw as f64 / memcpy * 1e3
        );
        for (name, _) in codecs() {
            if let Some(ns) = median_ns(group, name) {
                println!(
                    "| {group} | {name} | {} | {:.0} | {:.1} |",
                    fmt_ns(ns),
                    raw as f64 / ns * 1e3,
                    ns / memcpy
                );
            }
        }
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} µs", ns / 1e3)
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();

    let (state, vcpu_raw) = vcpu();
    bench_case(&mut c, "vcpu_state", &state, vcpu_raw);

    let section = ByteBuf::from(
        (0..16usize << 20)
            .map(|i| (i * 31) as u8)
            .collect::<Vec<u8>>(),
    );
    bench_case(&mut c, "bytes_16MiB", &section, section.len());

    c.final_summary();
    print_table(&[("vcpu_state", vcpu_raw), ("bytes_16MiB", section.len())]);
}
