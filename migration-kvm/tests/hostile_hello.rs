//! A HELLO that declares 64 GiB of guest RAM (issue 20): with the default
//! `max_guest_ram` (this host's RAM) a `KvmVm` destination refuses it before building
//! anything. Kernel memory (`VmallocUsed`) and this process's RSS are printed before
//! and after, and, for the record, what building that VM would have committed.

use std::io::{self, Cursor, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use migration_core::arch::Arch;
use migration_core::destination::{receive_migration_over, IncomingVm};
use migration_core::protocol::{Channel, Hello, Message, PROTOCOL_VERSION};
use migration_core::MemoryRange;
use migration_kvm::{KvmVm, KvmVmConfig};
use migration_testkit::require_kvm;

fn codecs() -> migration_core::CodecRegistry {
    migration_serde::registry()
}

const GIB: u64 = 1 << 30;

fn meminfo_kib(key: &str, file: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn figures() -> (u64, u64) {
    (
        meminfo_kib("VmallocUsed:", "/proc/meminfo"),
        meminfo_kib("VmRSS:", "/proc/self/status"),
    )
}

fn hello(ram: u64) -> Vec<u8> {
    let config = KvmVmConfig::new(ram, 1);
    let mut ch = Channel::new(Cursor::new(Vec::new()));
    ch.send(&Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        arch: Arch::X86_64,
        codecs: vec![migration_serde::POSTCARD_ID],
        layout: vec![MemoryRange::new(0, ram)],
        config: config.to_bytes(),
        producer: "hostile".into(),
        features: 0,
    }))
    .unwrap();
    ch.flush().unwrap();
    ch.get_ref().get_ref().clone()
}

/// Reads the HELLO, discards replies.
struct Peer(Cursor<Vec<u8>>);

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_64_gib_hello_is_refused_before_the_vm_is_built() {
    require_kvm!();
    let built = AtomicBool::new(false);
    let options = KvmVm::receive_options(codecs());
    assert!(
        options.max_guest_ram < 64 * GIB || std::env::var_os("CI_BIG_HOST").is_some(),
        "this test assumes a host with less than 64 GiB of RAM"
    );
    let before = figures();
    let e = receive_migration_over(
        Peer(Cursor::new(hello(64 * GIB))),
        &options,
        |i: &IncomingVm| {
            built.store(true, Ordering::SeqCst);
            Ok(KvmVm::for_incoming(i, codecs(), |_| {
                Box::new(|_| migration_kvm::ExitAction::Pause)
            })?)
        },
    )
    .map(drop)
    .unwrap_err();
    let after = figures();
    assert!(!built.load(Ordering::SeqCst), "the VM was built");
    assert!(
        e.to_string().contains("over this destination's limit"),
        "{e}"
    );
    eprintln!(
        "refused 64 GiB HELLO: VmallocUsed {} -> {} KiB, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1
    );

    // For the record: what building it commits (the limit raised past 64 GiB).
    let mut options = options;
    options.max_guest_ram = 128 * GIB;
    let during = std::sync::Mutex::new((0u64, 0u64));
    let before = figures();
    let _ = receive_migration_over(
        Peer(Cursor::new(hello(64 * GIB))),
        &options,
        |i: &IncomingVm| {
            let vm = KvmVm::for_incoming(i, codecs(), |_| {
                Box::new(|_| migration_kvm::ExitAction::Pause)
            })?;
            *during.lock().unwrap() = figures();
            Ok(vm)
        },
    );
    let d = *during.lock().unwrap();
    eprintln!(
        "built for a 64 GiB HELLO: VmallocUsed {} -> {} KiB (+{} KiB), RSS {} -> {} KiB",
        before.0,
        d.0,
        d.0.saturating_sub(before.0),
        before.1,
        d.1
    );
}
