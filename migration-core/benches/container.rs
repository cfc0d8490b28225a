//! Container throughput for 1 GiB of random guest memory, as a ratio to this machine's
//! own limit measured in the same run:
//! - file write / read (page cache) vs a plain sequential `write` / `read` of the same bytes;
//! - unix socket send+receive vs a raw socket copy of the same bytes.
//!
//! Run: `cargo bench -p migration-core --bench container` (env `BENCH_MIB` to change
//! the size, `BENCH_ITERS` the iterations; the best of the iterations counts).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migration_core::codec::CodecRegistry;
use migration_core::container::{self, ReadOptions, WriteOptions};
use migration_core::{transport, MemoryError, MemoryRange, MemorySink, MemorySource, Snapshot};

struct VecMemory(Mutex<Vec<u8>>);

impl MemorySource for VecMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        vec![MemoryRange::new(0, self.0.lock().unwrap().len() as u64)]
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let m = self.0.lock().unwrap();
        let at = gpa as usize;
        buf.copy_from_slice(&m[at..at + buf.len()]);
        Ok(())
    }
    fn as_sync(&self) -> Option<&(dyn MemorySource + Sync)> {
        Some(self)
    }
}

impl MemorySink for VecMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        MemorySource::regions(self)
    }
    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mut m = self.0.lock().unwrap();
        let at = gpa as usize;
        m[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// An empty file at `path`, the old one (and its page cache) removed first, outside any
/// timing: truncating 1 GiB inside a timed write would charge it to that write.
fn fresh(path: &std::path::Path) -> File {
    let _ = std::fs::remove_file(path);
    File::create(path).unwrap()
}

fn best(iters: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..iters).map(|_| f()).min().unwrap()
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() -> anyhow::Result<()> {
    let mib: usize = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let len = mib << 20;
    let mut data = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let source = VecMemory(Mutex::new(data));
    let sink = VecMemory(Mutex::new(vec![0u8; len]));
    let snapshot = Snapshot::new("vm");
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))?;
    let raw_path = dir.path().join("raw");
    let snap_path = dir.path().join("snap");
    let chunk = 1 << 20;

    // File write: plain sequential write vs container file form (both page cache, no
    // fsync), alternated so both see the same load on a shared machine. Also the floor
    // of any writer that must copy out of a `MemorySource` first: copy each 1 MiB into a
    // buffer, then write it.
    let raw_once = || {
        let mut f = fresh(&raw_path);
        let t = Instant::now();
        for c in source.0.lock().unwrap().chunks(chunk) {
            f.write_all(c).unwrap();
        }
        t.elapsed()
    };
    let copy_once = || {
        let mut f = fresh(&raw_path);
        let t = Instant::now();
        let mut buf = vec![0u8; chunk];
        for at in (0..len).step_by(chunk) {
            source.read_memory(at as u64, &mut buf).unwrap();
            f.write_all(&buf).unwrap();
        }
        t.elapsed()
    };
    let snap_once = || {
        let mut f = fresh(&snap_path);
        let t = Instant::now();
        container::write_snapshot(&mut f, &snapshot, Some(&source), &WriteOptions::default())
            .unwrap();
        t.elapsed()
    };
    let (mut raw_write, mut copy_write, mut snap_write) =
        (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..iters {
        raw_write = raw_write.min(raw_once());
        copy_write = copy_write.min(copy_once());
        snap_write = snap_write.min(snap_once());
    }
    // The plain write's file stays for the read below.
    raw_write = raw_write.min(raw_once());
    // File read: plain sequential read into memory vs container read into the sink.
    let raw_read = best(iters, || {
        let t = Instant::now();
        let mut f = File::open(&raw_path).unwrap();
        let mut m = sink.0.lock().unwrap();
        for c in m.chunks_mut(chunk) {
            f.read_exact(c).unwrap();
        }
        t.elapsed()
    });
    let snap_read = best(iters, || {
        let t = Instant::now();
        let f = File::open(&snap_path).unwrap();
        container::read_snapshot(f, &CodecRegistry::new(), Some(&sink)).unwrap();
        t.elapsed()
    });
    assert!(*sink.0.lock().unwrap() == *source.0.lock().unwrap());

    // Unix socket: raw copy (1 MiB writes, reads into the sink) vs send/recv of the stream form.
    let raw_sock = best(iters, || {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut m = sink.0.lock().unwrap();
                for c in m.chunks_mut(chunk) {
                    b.read_exact(c).unwrap();
                }
            });
            for c in source.0.lock().unwrap().chunks(chunk) {
                a.write_all(c).unwrap();
            }
        });
        t.elapsed()
    });
    let snap_sock = best(iters, || {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                transport::recv_from_stream(
                    &mut b,
                    &CodecRegistry::new(),
                    Some(&sink),
                    &ReadOptions::default(),
                )
                .unwrap();
            });
            transport::send_to_stream(&mut a, &snapshot, Some(&source), &WriteOptions::default())
                .unwrap();
        });
        t.elapsed()
    });
    assert!(*sink.0.lock().unwrap() == *source.0.lock().unwrap());

    println!("container bench, {mib} MiB random memory, best of {iters}:");
    for (what, raw, snap) in [
        ("file write (page cache)", raw_write, snap_write),
        ("  floor: copy + write   ", raw_write, copy_write),
        ("file read  (page cache)", raw_read, snap_read),
        ("unix socket send+recv  ", raw_sock, snap_sock),
    ] {
        println!(
            "  {what}: container {:6.2} GB/s, machine limit {:6.2} GB/s, ratio {:.2}",
            gbps(len, snap),
            gbps(len, raw),
            raw.as_secs_f64() / snap.as_secs_f64()
        );
    }
    Ok(())
}
