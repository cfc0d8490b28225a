//! Test memory and snapshots shared by the container and transport tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use migration_core::codec::CodecId;
use migration_core::memory::{check_range, PAGE_SIZE};
use migration_core::{MemoryError, MemoryRange, MemorySink, MemorySource, Section, Snapshot};

/// Guest memory stored page by page; pages never written read as zero, so a 1 GiB
/// guest costs only its non-zero pages.
#[derive(Debug, Default)]
pub struct PageMemory {
    pub regions: Vec<MemoryRange>,
    pub pages: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl PageMemory {
    pub fn new(regions: &[MemoryRange]) -> Self {
        Self {
            regions: regions.to_vec(),
            pages: Mutex::new(BTreeMap::new()),
        }
    }

    /// Fills page `gpa` with bytes derived from `seed`.
    pub fn fill_page(&self, gpa: u64, seed: u64) {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let page: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8 | 1
            })
            .collect();
        self.pages.lock().unwrap().insert(gpa, page);
    }

    pub fn snapshot_pages(&self) -> BTreeMap<u64, Vec<u8>> {
        self.pages.lock().unwrap().clone()
    }

    fn copy_out(&self, gpa: u64, buf: &mut [u8]) {
        let pages = self.pages.lock().unwrap();
        buf.fill(0);
        let first = gpa / PAGE_SIZE * PAGE_SIZE;
        let end = gpa + buf.len() as u64;
        for (&p, data) in pages.range(first..end) {
            let lo = p.max(gpa);
            let hi = (p + PAGE_SIZE).min(end);
            buf[(lo - gpa) as usize..(hi - gpa) as usize]
                .copy_from_slice(&data[(lo - p) as usize..(hi - p) as usize]);
        }
    }
}

impl MemorySource for PageMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        check_range(&self.regions, MemoryRange::new(gpa, buf.len() as u64))?;
        self.copy_out(gpa, buf);
        Ok(())
    }
}

impl MemorySink for PageMemory {
    fn regions(&self) -> Vec<MemoryRange> {
        self.regions.clone()
    }
    fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        check_range(&self.regions, MemoryRange::new(gpa, data.len() as u64))?;
        let mut pages = self.pages.lock().unwrap();
        let mut at = gpa;
        let end = gpa + data.len() as u64;
        while at < end {
            let p = at / PAGE_SIZE * PAGE_SIZE;
            let hi = (p + PAGE_SIZE).min(end);
            let page = pages
                .entry(p)
                .or_insert_with(|| vec![0; PAGE_SIZE as usize]);
            page[(at - p) as usize..(hi - p) as usize]
                .copy_from_slice(&data[(at - gpa) as usize..(hi - gpa) as usize]);
            if page.iter().all(|&b| b == 0) {
                pages.remove(&p);
            }
            at = hi;
        }
        Ok(())
    }
}

pub const RAW: CodecId = CodecId::new(b"raw0");

/// A small tree: vm{clock, cpus{cpu0{regs}, cpu1{regs}}, devices{serial0{state}}}.
pub fn small_snapshot(payload_bytes: usize) -> Snapshot {
    let bytes = |seed: u8, n: usize| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    };
    let mut vm = Snapshot::new("vm");
    vm.add_section("clock", Section::from_encoded(1, RAW, bytes(1, 16)));
    let mut cpus = Snapshot::new("cpus");
    for i in 0..2u8 {
        let mut cpu = Snapshot::new(format!("cpu{i}"));
        cpu.add_section(
            "regs",
            Section::from_encoded(3, RAW, bytes(10 + i, payload_bytes)),
        );
        cpu.add_section("empty", Section::from_encoded(1, RAW, Vec::new()));
        cpus.add_child(cpu);
    }
    vm.add_child(cpus);
    let mut devices = Snapshot::new("devices");
    let mut serial = Snapshot::new("serial0");
    serial.add_section(
        "state",
        Section::from_encoded(2, CodecId::new(b"json"), b"{\"lcr\":3}".to_vec()),
    );
    devices.add_child(serial);
    vm.add_child(devices);
    vm
}

/// One section as (path, id, version, codec, payload).
pub type FlatSection = (String, String, u32, Option<CodecId>, Vec<u8>);

/// Every section of a tree.
pub fn flatten(s: &Snapshot) -> Vec<FlatSection> {
    let mut out = Vec::new();
    for (path, node) in s.walk() {
        for (id, sec) in node.sections() {
            out.push((
                path.clone(),
                id.to_owned(),
                sec.version(),
                sec.codec_id(),
                sec.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            ));
        }
    }
    out
}

/// Paths of every node.
pub fn paths(s: &Snapshot) -> Vec<String> {
    s.walk().map(|(p, _)| p).collect()
}
