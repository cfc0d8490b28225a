//! Peak heap allocation while decoding forged lengths, measured with a counting global
//! allocator. One test in this binary, so no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use migration_core::{codec, Codec};
use migration_serde::{BincodeCodec, PostcardCodec, BINCODE_ID};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = CURRENT.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated above the current level while running `f`.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

fn forged(codec: &dyn Codec, len: u64) -> Vec<u8> {
    let mut p = if codec.id() == BINCODE_ID {
        len.to_le_bytes().to_vec()
    } else {
        let mut out = Vec::new();
        let mut v = len;
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out
    };
    p.extend_from_slice(b"abcdefgh");
    p
}

/// serde preallocates at most 1 MiB per sequence (`size_hint::cautious`); allow that
/// plus slack for error strings.
const BUDGET: usize = (1 << 20) + (64 << 10);

/// Decodes a payload with a codec; true when decoding failed.
type DecodeFails = fn(&dyn Codec, &[u8]) -> bool;

#[test]
fn forged_lengths_stay_within_the_allocation_budget() {
    for c in [&BincodeCodec as &dyn Codec, &PostcardCodec] {
        let cases: [(&str, Vec<u8>, DecodeFails); 5] = [
            ("1 TiB Vec<u64>", forged(c, 1 << 37), |c, p| {
                codec::decode::<Vec<u64>>(c, p).is_err()
            }),
            ("1 TiB ByteBuf", forged(c, 1 << 40), |c, p| {
                codec::decode::<serde_bytes::ByteBuf>(c, p).is_err()
            }),
            ("60 MiB ByteBuf", forged(c, 60 << 20), |c, p| {
                codec::decode::<serde_bytes::ByteBuf>(c, p).is_err()
            }),
            ("2^63 String", forged(c, 1 << 63), |c, p| {
                codec::decode::<String>(c, p).is_err()
            }),
            ("60 MiB String", forged(c, 60 << 20), |c, p| {
                codec::decode::<String>(c, p).is_err()
            }),
        ];
        for (name, payload, decode_fails) in cases {
            let mut failed = false;
            let peak = peak_during(|| failed = decode_fails(c, &payload));
            eprintln!("{:<9} {name:<16} peak {peak:>8} B", c.name());
            assert!(failed, "{} {name}: decoded", c.name());
            assert!(
                peak < BUDGET,
                "{} {name}: peak allocation {peak} B",
                c.name()
            );
        }
    }
}
