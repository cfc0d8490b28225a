//! Guest memory benchmarks, each reported next to this machine's own limit measured
//! in the same run (see `docs/memory.md`).
//!
//! `cargo bench -p migration-kvm --bench memory` (about a minute; needs ~6 GiB of
//! free RAM and /dev/kvm for the lazy-restore figure).

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use kvm_ioctls::Kvm;
use migration_core::container::WriteOptions;
use migration_core::{
    CodecRegistry, MemoryRange, MemoryRangeTable, MemorySink, MemorySource, Snapshot,
};
use migration_kvm::memory::{GuestRam, MemoryOptions};
use migration_kvm::restore::EagerOptions;
use migration_kvm::snapshot_memory::{restore_eager_from, restore_lazy_from, write_full};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / secs(d) / 1e9
}

fn best<T>(reps: usize, mut f: impl FnMut() -> Result<(Duration, T)>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let (d, v) = f()?;
        black_box(v);
        best = best.min(d);
    }
    Ok(best)
}

fn random_memory(size: u64, data: u64) -> Result<GuestRam> {
    let mem = GuestRam::anonymous(&[MemoryRange::new(0, size)])?;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut buf = vec![0u8; MIB as usize];
    let mut gpa = 0;
    while gpa < data {
        rng.fill(&mut buf);
        mem.write_memory(gpa, &buf)?;
        gpa += MIB;
    }
    Ok(mem)
}

fn main() -> Result<()> {
    // `cargo bench --bench memory -- <filter>`: only the parts whose name contains a
    // filter word (snapshot, eager, lazy, bitmap).
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f.as_str()));
    if !(want("snapshot") || want("eager") || want("lazy")) {
        return dirty_bitmap();
    }
    let dir = tempfile::tempdir()?;
    println!(
        "guest memory benchmarks (best of runs; files in {})",
        dir.path().display()
    );

    // --- 1. Full snapshot of 1 GiB random memory vs a plain sequential write.
    let mem = random_memory(GIB, GIB)?;
    let snap_path = dir.path().join("snap1g");
    {
        let mut f = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&snap_path)?;
        write_full(&mut f, &Snapshot::new("vm"), &mem, &WriteOptions::default())?;
    }
    if want("snapshot") {
        snapshot_section(dir.path(), &mem, &snap_path)?;
    }

    // --- 2. Eager restore of 1 GiB vs first-touch memset of 1 GiB fresh memory.
    if want("eager") {
        let memset = |huge: bool| {
            best(2, || {
                let m = GuestRam::anonymous_with(
                    &[MemoryRange::new(0, GIB)],
                    MemoryOptions {
                        huge_pages: huge,
                        populate: false,
                    },
                )?;
                let t = Instant::now();
                m.zero_memory(0, GIB)?; // memset of fresh memory = first touch
                Ok((t.elapsed(), m))
            })
        };
        let touch4k = memset(false)?;
        let touch2m = memset(true)?;
        println!(
        "first-touch memset 1 GiB fresh memory: 4 KiB pages {:.0} ms ({:.2} GB/s), THP {:.0} ms",
        secs(touch4k) * 1e3,
        gbps(GIB, touch4k),
        secs(touch2m) * 1e3
    );
        let mut f = File::open(&snap_path)?;
        let layout = [MemoryRange::new(0, GIB)];
        for (huge, populate, threads) in [
            (false, false, 1),
            (false, false, 2),
            (true, false, 1),
            (true, false, 2),
            (true, true, 2),
        ] {
            let opts = EagerOptions {
                memory: MemoryOptions {
                    huge_pages: huge,
                    populate,
                },
                threads,
            };
            let d = best(2, || {
                let t = Instant::now();
                let r = restore_eager_from(&mut f, &layout, &CodecRegistry::new(), opts)?;
                Ok((t.elapsed(), r))
            })?;
            println!(
            "eager restore 1 GiB (huge_pages={huge}, populate={populate}, threads={threads}): {:.0} ms ({:.2} GB/s), {:.2}x the 4 KiB first-touch memset",
            secs(d) * 1e3,
            gbps(GIB, d),
            secs(touch4k) / secs(d)
        );
        }
    }
    drop(mem);

    // --- 3. Lazy restore: time until the vCPU can run (memory mapped, slots registered).
    if !want("lazy") {
        return dirty_bitmap();
    }
    let kvm = Kvm::new();
    let mem4 = random_memory(4 * GIB, 64 * MIB)?;
    let snap4 = dir.path().join("snap4g");
    {
        let mut f4 = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&snap4)?;
        write_full(
            &mut f4,
            &Snapshot::new("vm"),
            &mem4,
            &WriteOptions::default(),
        )?;
    }
    drop(mem4);
    for (path, size) in [(&snap_path, GIB), (&snap4, 4 * GIB)] {
        let mut f = File::open(path)?;
        let layout = [MemoryRange::new(0, size)];
        let (map, reg) = match &kvm {
            Ok(kvm) => {
                let mut best_map = Duration::MAX;
                let mut best_all = Duration::MAX;
                for _ in 0..5 {
                    let vm = kvm.create_vm()?;
                    let t = Instant::now();
                    let (_, m) = restore_lazy_from(&mut f, &layout, &CodecRegistry::new())?;
                    let mapped = t.elapsed();
                    let slots = m.register(&vm, 0, false)?;
                    let _vcpu = vm.create_vcpu(0)?;
                    let all = t.elapsed();
                    slots.unregister(&vm)?;
                    best_map = best_map.min(mapped);
                    best_all = best_all.min(all);
                }
                (best_map, Some(best_all))
            }
            Err(_) => (
                best(5, || {
                    let t = Instant::now();
                    let r = restore_lazy_from(&mut f, &layout, &CodecRegistry::new())?;
                    Ok((t.elapsed(), r))
                })?,
                None,
            ),
        };
        match reg {
            Some(all) => println!(
                "lazy restore {} GiB: mapped in {:.2} ms, + KVM slot + vCPU created: {:.2} ms (goal <= 10 ms, flat in size)",
                size / GIB,
                secs(map) * 1e3,
                secs(all) * 1e3
            ),
            None => println!(
                "lazy restore {} GiB: mapped in {:.2} ms (no KVM: slot registration not measured)",
                size / GIB,
                secs(map) * 1e3
            ),
        }
    }

    dirty_bitmap()
}

/// Full snapshot of 1 GiB random memory vs a plain sequential write; zero detection.
fn snapshot_section(
    dir: &std::path::Path,
    mem: &GuestRam,
    snap_path: &std::path::Path,
) -> Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    Rng(7).fill(&mut buf);
    let seq = best(3, || {
        let path = dir.join("seq");
        let mut f = File::create(&path)?;
        let t = Instant::now();
        for _ in 0..GIB / MIB {
            f.write_all(&buf)?;
        }
        let d = t.elapsed();
        drop(f);
        std::fs::remove_file(&path)?;
        Ok((d, ()))
    })?;
    // The same write of the guest's own 1 GiB (distinct bytes, not cache-hot), straight
    // from guest memory with write(2): what writing this memory costs at the least.
    let seq_mem = best(3, || {
        let path = dir.join("seq_mem");
        let mut f = File::create(&path)?;
        let t = Instant::now();
        for i in 0..GIB / MIB {
            mem.write_volatile_to(i * MIB, MIB, &mut f)?;
        }
        let d = t.elapsed();
        drop(f);
        std::fs::remove_file(&path)?;
        Ok((d, ()))
    })?;
    let snap = best(3, || {
        let _ = std::fs::remove_file(snap_path);
        let mut f = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(snap_path)?;
        let t = Instant::now();
        write_full(&mut f, &Snapshot::new("vm"), mem, &WriteOptions::default())?;
        Ok((t.elapsed(), ()))
    })?;
    println!(
        "full snapshot 1 GiB random: {:.0} ms ({:.2} GB/s); sequential write of the guest's 1 GiB: {:.0} ms ({:.2} GB/s); ratio {:.2} (goal >= 0.8)",
        secs(snap) * 1e3,
        gbps(GIB, snap),
        secs(seq_mem) * 1e3,
        gbps(GIB, seq_mem),
        secs(seq_mem) / secs(snap)
    );
    println!(
        "  against a sequential write of one cache-hot 1 MiB buffer 1024 times: {:.0} ms ({:.2} GB/s); ratio {:.2}",
        secs(seq) * 1e3,
        gbps(GIB, seq),
        secs(seq) / secs(snap)
    );

    // Where the time goes: the copy out of guest memory and the CRC the format needs.
    let mut chunk = vec![0u8; MIB as usize];
    let copy = best(3, || {
        let t = Instant::now();
        for i in 0..GIB / MIB {
            mem.read_memory(i * MIB, &mut chunk)?;
        }
        Ok((t.elapsed(), ()))
    })?;
    let crc = best(3, || {
        let t = Instant::now();
        let mut c = migration_core::checksum::Crc64::new();
        for _ in 0..GIB / MIB {
            c.update(black_box(&chunk));
        }
        Ok((t.elapsed(), c.finish()))
    })?;
    println!(
        "  parts of it: copy out of guest memory {:.0} ms ({:.1} GB/s), CRC-64 {:.0} ms ({:.1} GB/s)",
        secs(copy) * 1e3,
        gbps(GIB, copy),
        secs(crc) * 1e3,
        gbps(GIB, crc)
    );

    // Zero detection: a snapshot of 1 GiB of zero (touched) memory writes nothing.
    let zeros = GuestRam::anonymous(&[MemoryRange::new(0, GIB)])?;
    zeros.zero_memory(0, GIB)?; // touch every page
    let zpath = dir.join("zero");
    let zero = best(3, || {
        let _ = std::fs::remove_file(&zpath);
        let mut f = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&zpath)?;
        let t = Instant::now();
        write_full(
            &mut f,
            &Snapshot::new("vm"),
            &zeros,
            &WriteOptions::default(),
        )?;
        Ok((t.elapsed(), ()))
    })?;
    let scan = best(3, || {
        let t = Instant::now();
        let mut n = 0u64;
        let mut gpa = 0;
        while gpa < GIB {
            n += u64::from(zeros.is_zero(MemoryRange::new(gpa, 4096))?);
            gpa += 4096;
        }
        Ok((t.elapsed(), n))
    })?;
    println!(
        "zero detection: snapshot of 1 GiB zero pages {:.0} ms (writes nothing), raw is_zero scan {:.0} ms ({:.1} GB/s); writing those pages would take {:.0} ms",
        secs(zero) * 1e3,
        secs(scan) * 1e3,
        gbps(GIB, scan),
        secs(seq) * 1e3
    );
    drop(zeros);

    Ok(())
}

/// Dirty bitmap -> ranges, 64 GiB of 4 KiB pages at 10 % dirty.
fn dirty_bitmap() -> Result<()> {
    let pages = 64 * GIB / 4096;
    let words = (pages / 64) as usize;
    let mut rng = Rng(99);
    let scattered: Vec<u64> = (0..words)
        .map(|_| (0..64).fold(0u64, |w, b| w | (u64::from(rng.next() % 10 == 0) << b)))
        .collect();
    // Clustered: 10 % of 64-page blocks fully dirty, plus 1 % scattered noise.
    let clustered: Vec<u64> = (0..words)
        .map(|_| if rng.next() % 10 == 0 { u64::MAX } else { 0 })
        .collect();
    // Limit: one pass over the bitmap (popcount of every word).
    let pass = best(5, || {
        let t = Instant::now();
        let n: u32 = black_box(&scattered).iter().map(|w| w.count_ones()).sum();
        Ok((t.elapsed(), n))
    })?;
    for (name, bitmap) in [
        ("scattered pages", &scattered),
        ("clustered 256 KiB blocks", &clustered),
    ] {
        let mut ranges = 0;
        let d = best(5, || {
            let t = Instant::now();
            let table = MemoryRangeTable::from_bitmap(black_box(bitmap), 0, 4096);
            let d = t.elapsed();
            ranges = table.len();
            Ok((d, table))
        })?;
        // Steady state of a migration: one table reused round after round.
        let mut table = MemoryRangeTable::new();
        let reused = best(5, || {
            table.clear();
            let t = Instant::now();
            table.append_bitmap(black_box(bitmap), 0, 4096);
            Ok((t.elapsed(), ()))
        })?;
        println!(
            "dirty bitmap -> ranges, 64 GiB at 10 % ({name}): {:.2} ms new table, {:.2} ms reused table, {ranges} ranges (goal <= 12 ms; popcount pass over the bitmap {:.3} ms)",
            secs(d) * 1e3,
            secs(reused) * 1e3,
            secs(pass) * 1e3
        );
    }
    Ok(())
}
