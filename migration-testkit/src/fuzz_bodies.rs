//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), shared with the normal
//! test suite (`tests/fuzz_bodies.rs` runs each as a proptest on stable).
//!
//! Each function takes arbitrary bytes, feeds them to a reader of untrusted input and
//! panics only if that reader misbehaves: panics itself, accepts something it must
//! reject, writes outside guest memory, or decodes a value that does not survive a
//! round trip. An `Err` from the reader is the expected outcome for garbage.
//!
//! [`seeds`] returns valid inputs for each target (a container, a migration stream,
//! encoded KVM state, a range script) so fuzzers and proptests can start from
//! something that gets past the first check.
//!
//! ```
//! // Garbage must be rejected, never panic.
//! migration_testkit::fuzz_bodies::container(b"not a container");
//! migration_testkit::fuzz_bodies::protocol(&[0xff; 64]);
//! migration_testkit::fuzz_bodies::kvm_state(&[1, 2, 3]);
//! migration_testkit::fuzz_bodies::memory_ranges(&[7; 40]);
//! ```

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_ioapic_state, kvm_lapic_state, kvm_mp_state, kvm_pic_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use migration_core::arch::Arch;
use migration_core::checksum::Crc64;
use migration_core::codec::{self, Codec};
use migration_core::container::{self, ReadOptions, WriteOptions};
use migration_core::memory::{check_range, MemoryRange, MemoryRangeTable, MemorySink};
use migration_core::protocol::{Channel, Hello, Message, MessageType};
use migration_core::{
    receive_migration_over, CodecRegistry, MemorySource, MigratableError, ReceiveOptions, Snapshot,
};
use migration_kvm::state::{CpuidState, MsrState, NestedState, TscKhz, XsaveState};
use migration_kvm::{CpuidEntry, DeviceLayout, MsrEntry, Raw, VcpuState, VmState};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fake_memory::FakeMemory;
use crate::fake_vm::FakeVm;

/// Guest memory the container and protocol targets restore into: two small regions
/// with a hole between them.
pub fn small_layout() -> Vec<MemoryRange> {
    vec![
        MemoryRange::new(0, 0x4000),
        MemoryRange::new(0x10000, 0x3000),
    ]
}

/// Largest guest a fuzzed HELLO may make the destination build (the fake's memory is
/// sparse, but its bookkeeping is not free).
pub const MAX_FUZZ_GUEST: u64 = 64 << 20;

/// A `Read + Write` over fuzz input: reads the input, discards writes.
#[derive(Debug)]
pub struct InputStream<'a> {
    input: Cursor<&'a [u8]>,
    /// Bytes written to it (the destination's replies).
    pub written: u64,
}

impl<'a> InputStream<'a> {
    /// A stream that reads `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Self {
            input: Cursor::new(input),
            written: 0,
        }
    }
}

impl Read for InputStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for InputStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- (a) container reader ------------------------------------------------------------

/// Reads `data` as a container in every way a reader can: file form (inspect, verify,
/// read into a small fake memory) and stream form (verify, read). Whatever is accepted
/// must be consistent: a container that verifies also reads, and reads the same tree
/// in both forms.
pub fn container(data: &[u8]) {
    let codecs = migration_serde::registry();
    let verified = container::verify(Cursor::new(data));
    let _ = container::inspect(Cursor::new(data));
    let memory = fake_memory();
    let read = container::read_snapshot(Cursor::new(data), &codecs, Some(&memory));
    if let Err(e) = &read {
        // Verification reads everything a restore reads, except that a restore also
        // needs the memory to fit the sink.
        if verified.is_ok() && !is_memory_error(e) {
            panic!("container verifies but does not read: {e}");
        }
    }
    // Without a sink, memory is only checked, never written.
    let _ = container::read_snapshot(Cursor::new(data), &codecs, None);

    let mut r = data;
    let stream_verified = container::verify_stream(&mut r);
    let mut r = data;
    let memory2 = fake_memory();
    let streamed = container::read_snapshot_stream(
        &mut r,
        &codecs,
        Some(&memory2),
        &ReadOptions { zero_holes: false },
    );
    if let Err(e) = &streamed {
        if stream_verified.is_ok() && !is_memory_error(e) {
            panic!("stream container verifies but does not read: {e}");
        }
    }
    if let (Ok(a), Ok(b)) = (&read, &streamed) {
        let json = migration_serde::JsonCodec::new();
        let a = codec::encode(&json, a).expect("a read tree encodes");
        let b = codec::encode(&json, b).expect("a read tree encodes");
        assert!(a == b, "file and stream readers disagree on the same bytes");
    }
}

/// Only the typed memory error (the sink refused a range): a format error that merely
/// mentions memory ("memory record length …") is a verify/read disagreement.
fn is_memory_error(e: &MigratableError) -> bool {
    matches!(e, MigratableError::Memory(_))
}

fn fake_memory() -> FakeMemory {
    FakeMemory::new(&small_layout()).expect("fixed layout is valid")
}

// ---- (b) protocol decoder --------------------------------------------------------------

const TYPES: [MessageType; 10] = [
    MessageType::Hello,
    MessageType::HelloAck,
    MessageType::Memory,
    MessageType::Zero,
    MessageType::RoundEnd,
    MessageType::State,
    MessageType::Ready,
    MessageType::Go,
    MessageType::Done,
    MessageType::Abort,
];

/// The destination side of the protocol over `data`:
/// - byte 0 picks a message type and the rest is decoded as its payload;
/// - the whole input is read by a [`Channel`] as raw frames;
/// - the input is cut into messages ([`frame_script`]), framed with correct checksums,
///   and received by [`receive_migration_over`] into a [`FakeVm`] destination.
///
/// Decoded messages must re-encode to the same message.
pub fn protocol(data: &[u8]) {
    if let Some((&first, payload)) = data.split_first() {
        let ty = TYPES[usize::from(first) % TYPES.len()];
        if let Ok(msg) = Message::decode(ty, payload) {
            assert_eq!(msg.message_type(), ty);
            check_reencode(&msg);
        }
    }

    let mut ch = Channel::new(InputStream::new(data));
    for _ in 0..64 {
        match ch.recv() {
            Ok(msg) => check_reencode(&msg),
            Err(_) => break,
        }
    }

    receive(&frame_script(data));
}

/// Receives the framed stream `stream` into a fake destination.
pub fn receive(stream: &[u8]) {
    let options = ReceiveOptions::new(Arch::X86_64, migration_serde::registry());
    let result = receive_migration_over(InputStream::new(stream), &options, |incoming| {
        let total: u64 = incoming.layout.iter().map(|r| r.length).sum();
        if total > MAX_FUZZ_GUEST {
            return Err(MigratableError::Restore {
                path: "vm".into(),
                source: "guest too large for the fuzz destination".into(),
            });
        }
        FakeVm::destination(&incoming.layout, migration_serde::registry())
    });
    if let Ok((vm, report)) = result {
        // Accepted: everything written lies inside the layout the HELLO announced.
        let layout = MemorySource::regions(vm.memory().as_ref());
        for r in vm.memory().allocated_ranges().ranges() {
            check_range(&layout, *r).expect("allocated memory outside the layout");
        }
        // Data bytes all came from the stream; a ZERO range (16 bytes on the wire)
        // may cover at most the whole layout.
        assert!(report.memory_bytes <= stream.len() as u64);
        let guest: u64 = layout.iter().map(|r| r.length).sum();
        assert!(report.zero_bytes <= guest * (stream.len() as u64 / 16));
    }
}

/// Cuts `data` into messages and frames each with a correct header and checksum, so a
/// fuzzer's bytes reach the decoders behind the checksum. Each message is
/// `[type: u8][len: u16 LE][len bytes of payload]`; a type byte ≥ 0xf0 copies the rest
/// of the input unframed (to reach the frame checks too).
pub fn frame_script(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut rest = data;
    while let Some((&t, tail)) = rest.split_first() {
        if t >= 0xf0 {
            out.extend_from_slice(tail);
            break;
        }
        let ty = TYPES[usize::from(t) % TYPES.len()] as u16;
        let len = match tail {
            [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        let tail = tail.get(2..).unwrap_or(&[]);
        let len = len.min(tail.len());
        let (payload, next) = tail.split_at(len);
        push_frame(&mut out, ty, payload);
        rest = next;
    }
    out
}

/// Appends one frame (`type`, flags 0, length, payload, CRC-64/NVME) to `out`.
pub fn push_frame(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let mut header = [0u8; 8];
    header[..2].copy_from_slice(&ty.to_le_bytes());
    header[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = Crc64::new();
    crc.update(&header);
    crc.update(payload);
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc.finish().to_le_bytes());
}

/// The inverse of [`frame_script`] for a list of messages: what a fuzzer must produce
/// to send them.
pub fn script_of(messages: &[Message<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let framed = frame(m);
        let payload = &framed[8..framed.len() - 8];
        let t = TYPES
            .iter()
            .position(|t| *t == m.message_type())
            .expect("every type is listed") as u8;
        out.push(t);
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

/// `msg` as a frame, through the real [`Channel::send`].
pub fn frame(msg: &Message<'_>) -> Vec<u8> {
    let mut sink = VecStream(Vec::new());
    {
        let mut ch = Channel::new(&mut sink);
        ch.send(msg).expect("framing an in-memory message");
        ch.flush().expect("flushing to a Vec");
    }
    sink.0
}

#[derive(Debug)]
struct VecStream(Vec<u8>);

impl Read for VecStream {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

impl Write for VecStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A decoded message, framed again and received again, is the same message.
fn check_reencode(msg: &Message<'_>) {
    let framed = frame(msg);
    let mut ch = Channel::new(InputStream::new(&framed));
    let again = ch
        .recv()
        .expect("a message we decoded re-frames and decodes");
    assert_eq!(&again, msg, "message changed through encode/decode");
}

// ---- (c) codecs × KVM state types --------------------------------------------------------

/// Byte 0 picks a codec (json, bincode, postcard) and byte 1 a KVM state type (every
/// [`Raw`] wrapper, [`MsrState`], [`CpuidState`], [`XsaveState`], [`NestedState`],
/// [`TscKhz`], or a whole snapshot tree read as [`VcpuState`] / [`VmState`]); the rest
/// is decoded. A value that decodes must re-encode and decode to itself.
pub fn kvm_state(data: &[u8]) {
    let [c, t, payload @ ..] = data else {
        return;
    };
    let codecs = codec_list();
    let codec = codecs[usize::from(*c) % codecs.len()].as_ref();
    match t % 18 {
        0 => round_trip::<Raw<kvm_regs>>(codec, payload),
        1 => round_trip::<Raw<kvm_sregs>>(codec, payload),
        2 => round_trip::<Raw<kvm_xcrs>>(codec, payload),
        3 => round_trip::<Raw<kvm_debugregs>>(codec, payload),
        4 => round_trip::<Raw<kvm_lapic_state>>(codec, payload),
        5 => round_trip::<Raw<kvm_mp_state>>(codec, payload),
        6 => round_trip::<Raw<kvm_vcpu_events>>(codec, payload),
        7 => round_trip::<Raw<kvm_pit_state2>>(codec, payload),
        8 => round_trip::<Raw<kvm_clock_data>>(codec, payload),
        9 => round_trip::<Raw<kvm_pic_state>>(codec, payload),
        10 => round_trip::<Raw<kvm_ioapic_state>>(codec, payload),
        11 => round_trip::<MsrState>(codec, payload),
        12 => round_trip::<CpuidState>(codec, payload),
        13 => round_trip::<XsaveState>(codec, payload),
        14 => round_trip::<NestedState>(codec, payload),
        15 => round_trip::<TscKhz>(codec, payload),
        16 => {
            if let Ok(s) = snapshot_tree(codec, payload) {
                if let Ok(v) = VcpuState::from_snapshot(&s) {
                    let mut again = Snapshot::new(s.id());
                    v.add_to(&mut again);
                    assert_eq!(VcpuState::from_snapshot(&again).ok(), Some(v));
                }
            }
        }
        _ => {
            if let Ok(s) = snapshot_tree(codec, payload) {
                if let Ok(v) = VmState::from_snapshot(&s) {
                    let mut again = Snapshot::new(s.id());
                    v.add_to(&mut again);
                    assert_eq!(VmState::from_snapshot(&again).ok(), Some(v));
                }
            }
        }
    }
}

fn codec_list() -> Vec<Arc<dyn Codec>> {
    vec![
        Arc::new(migration_serde::JsonCodec::new()),
        Arc::new(migration_serde::BincodeCodec),
        Arc::new(migration_serde::PostcardCodec),
    ]
}

fn snapshot_tree(codec: &dyn Codec, payload: &[u8]) -> Result<Snapshot, MigratableError> {
    let mut s: Snapshot =
        codec::decode(codec, payload).map_err(|source| MigratableError::Codec {
            path: String::new(),
            section: "<tree>".into(),
            source,
        })?;
    let mut registry = CodecRegistry::new();
    for c in codec_list() {
        registry.register(c);
    }
    s.resolve_codecs(&registry);
    Ok(s)
}

fn round_trip<T>(codec: &dyn Codec, payload: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = codec::decode::<T>(codec, payload) {
        let bytes = codec::encode(codec, &v).expect("a decoded value re-encodes");
        let again: T = codec::decode(codec, &bytes).expect("a re-encoded value decodes");
        assert_eq!(again, v, "{} changed through a round trip", codec.name());
    }
}

// ---- (d) memory range table on a small guest -----------------------------------------

/// Runs a script of range-table operations (push, bitmap, extend, clear) from `data`,
/// checks the table's invariants (sorted, disjoint, not adjacent, byte count), then
/// writes every chunk of the table into a small [`FakeMemory`]: a write must succeed
/// exactly when [`check_range`] accepts the range, and afterwards guest memory must
/// equal a plain model of it (nothing written outside).
pub fn memory_ranges(data: &[u8]) {
    let layout = small_layout();
    let memory = fake_memory();
    let end = layout.last().map_or(0, |r| r.gpa + r.length);
    let mut model = vec![0u8; end as usize];
    let mut table = MemoryRangeTable::new();
    let mut other = MemoryRangeTable::new();
    let mut ops = Bytes(data);
    let mut fill = 1u8;
    while let Some(op) = ops.u8() {
        match op % 8 {
            0..=2 => table.push(MemoryRange::new(ops.gpa(), ops.len())),
            3 => other.push(MemoryRange::new(ops.gpa(), ops.len())),
            4 => {
                let words: Vec<u64> = (0..ops.u8().unwrap_or(0) % 4).map(|_| ops.u64()).collect();
                // KVM hands bitmaps of slots below 2^52 (the x86 physical limit).
                let start = ops.u64() % (1 << 52);
                let page = 1u64 << (ops.u8().unwrap_or(0) % 22);
                table.append_bitmap(&words, start, page);
            }
            5 => table.extend(&other),
            6 => {
                check_invariants(&table);
                let max = 1 + u64::from(ops.u8().unwrap_or(0)) * 97;
                write_chunks(&table, max, &layout, &memory, &mut model, fill);
                fill = fill.wrapping_add(1).max(1);
            }
            _ => {
                if ops.u8().unwrap_or(0) == 0 {
                    table.clear();
                }
            }
        }
    }
    check_invariants(&table);
    write_chunks(&table, 4096, &layout, &memory, &mut model, fill);
    // Guest memory equals the model, region by region; the hole stayed untouched.
    for r in &layout {
        let mut buf = vec![0u8; r.length as usize];
        memory.read_memory(r.gpa, &mut buf).expect("region reads");
        let want = &model[r.gpa as usize..(r.gpa + r.length) as usize];
        assert!(buf == want, "guest memory differs from the model in {r:x?}");
    }
    let inside = |i: usize| {
        layout
            .iter()
            .any(|r| r.gpa <= i as u64 && (i as u64) < r.gpa + r.length)
    };
    assert!(
        model.iter().enumerate().all(|(i, b)| *b == 0 || inside(i)),
        "the model was written outside the layout"
    );
}

fn check_invariants(table: &MemoryRangeTable) {
    let ranges = table.ranges();
    assert_eq!(ranges.len(), table.len());
    assert_eq!(table.is_empty(), ranges.is_empty());
    let mut total = 0u64;
    for r in ranges {
        assert!(r.length > 0, "empty range in {ranges:x?}");
        total = total.wrapping_add(r.length);
    }
    for w in ranges.windows(2) {
        let end = w[0].gpa.saturating_add(w[0].length);
        assert!(
            end < w[1].gpa,
            "ranges overlap, touch or are unsorted: {w:x?}"
        );
    }
    assert_eq!(total, table.total_bytes());
}

fn write_chunks(
    table: &MemoryRangeTable,
    max: u64,
    layout: &[MemoryRange],
    memory: &FakeMemory,
    model: &mut [u8],
    fill: u8,
) {
    // Chunk each range on its own, at most 256 pieces of it: a range of 2^63 bytes in
    // 1-byte pieces would never end (the pieces past the guest are all refused alike).
    for r in table.ranges() {
        let mut one = MemoryRangeTable::new();
        one.push(*r);
        let mut covered = 0u64;
        let mut pieces = 0usize;
        for piece in one.chunks(max).take(256) {
            assert!(
                piece.length > 0 && piece.length <= max,
                "{piece:x?} of {r:x?}"
            );
            // Not `contains`: the table keeps ranges whose end is 2^64 or beyond (pushes
            // saturate), which `MemoryRange::end` calls overflowing.
            let inside = piece.gpa >= r.gpa
                && (r.length.checked_sub(piece.length))
                    .is_some_and(|room| piece.gpa - r.gpa <= room);
            assert!(inside, "{piece:x?} outside {r:x?}");
            covered += piece.length;
            pieces += 1;
            write_piece(piece, layout, memory, model, fill);
        }
        if pieces < 256 {
            assert_eq!(covered, r.length, "chunks do not cover {r:x?}");
        }
    }
}

fn write_piece(
    piece: MemoryRange,
    layout: &[MemoryRange],
    memory: &FakeMemory,
    model: &mut [u8],
    fill: u8,
) {
    let checked = check_range(layout, piece);
    if piece.length > 0x10000 {
        // Too large for the small guest: the check alone must refuse it.
        assert!(checked.is_err(), "{piece:x?} accepted");
        return;
    }
    let data = vec![fill; piece.length as usize];
    let written = memory.write_memory(piece.gpa, &data);
    assert_eq!(
        checked.is_ok(),
        written.is_ok(),
        "check_range and the memory disagree on {piece:x?}"
    );
    if written.is_ok() {
        model[piece.gpa as usize..(piece.gpa + piece.length) as usize].fill(fill);
    }
}

/// A little reader of fuzz bytes that returns zeros once the input runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8().unwrap_or(0);
        }
        u64::from_le_bytes(b)
    }
    /// An address: mostly near the small guest, sometimes anywhere (up to `u64::MAX`).
    fn gpa(&mut self) -> u64 {
        match self.u8().unwrap_or(0) {
            0..=199 => {
                u64::from(self.u8().unwrap_or(0)) * 0x100 + u64::from(self.u8().unwrap_or(0)) * 0x10
            }
            200..=239 => self.u64() % 0x2_0000,
            _ => self.u64(),
        }
    }
    /// A length: mostly small, sometimes huge.
    fn len(&mut self) -> u64 {
        match self.u8().unwrap_or(0) {
            0..=219 => u64::from(self.u8().unwrap_or(0)) * 0x40,
            220..=239 => self.u64() % 0x2_0000,
            _ => self.u64(),
        }
    }
}

// ---- seeds -------------------------------------------------------------------------------

/// Valid inputs for each target, to seed fuzzers and proptest mutations.
pub mod seeds {
    use super::*;

    /// File-form and stream-form containers of a small tree with memory.
    pub fn container() -> Vec<Vec<u8>> {
        let memory = fake_memory();
        memory
            .write_memory(0x1000, &[0xab; 0x1800])
            .expect("in range");
        memory
            .write_memory(0x10000, &[0x5a; 0x100])
            .expect("in range");
        let tree = sample_tree();
        let mut file = Cursor::new(Vec::new());
        container::write_snapshot(&mut file, &tree, Some(&memory), &WriteOptions::default())
            .expect("writes to a Vec");
        let mut stream = Vec::new();
        container::write_snapshot_stream(
            &mut stream,
            &tree,
            Some(&memory),
            &WriteOptions::default(),
        )
        .expect("writes to a Vec");
        let mut bare = Cursor::new(Vec::new());
        container::write_snapshot(&mut bare, &tree, None, &WriteOptions::default())
            .expect("writes to a Vec");
        // Hostile shapes (issue 20), valid or one step from invalid: a stream with bytes
        // after END, two streams back to back, a stream declaring 1 TiB in a few
        // bytes, a tree as deep as allowed with long ids.
        let mut trailing = stream.clone();
        trailing.extend_from_slice(b"after END");
        let mut appended = stream.clone();
        appended.extend_from_slice(&stream);
        let mut huge = Vec::new();
        container::write_snapshot_stream(
            &mut huge,
            &tree,
            Some(&Declared(vec![MemoryRange::new(0, 1 << 40)])),
            &WriteOptions::default(),
        )
        .expect("writes to a Vec");
        let mut deep = Snapshot::new("vm");
        {
            let mut leaf = Snapshot::new("z".repeat(255));
            leaf.add_state_as("s", 1, 7u8);
            for _ in 0..30 {
                let mut parent = Snapshot::new("y".repeat(255));
                parent.add_child(leaf);
                leaf = parent;
            }
            deep.add_child(leaf);
            deep.encode(&(Arc::new(migration_serde::PostcardCodec) as Arc<dyn Codec>))
                .expect("encodes");
        }
        let mut deep_file = Cursor::new(Vec::new());
        container::write_snapshot(&mut deep_file, &deep, None, &WriteOptions::default())
            .expect("writes to a Vec");
        vec![
            file.into_inner(),
            stream,
            bare.into_inner(),
            trailing,
            appended,
            huge,
            deep_file.into_inner(),
        ]
    }

    /// Memory that declares `regions` and stores nothing (all zero, and says so).
    struct Declared(Vec<MemoryRange>);

    impl migration_core::MemorySource for Declared {
        fn regions(&self) -> Vec<MemoryRange> {
            self.0.clone()
        }
        fn read_memory(&self, _: u64, buf: &mut [u8]) -> Result<(), migration_core::MemoryError> {
            buf.fill(0);
            Ok(())
        }
        fn nonzero_ranges(&self) -> Option<Vec<MemoryRange>> {
            Some(Vec::new())
        }
    }

    /// A snapshot tree with sections of two codecs and a child.
    pub fn sample_tree() -> Snapshot {
        let json: Arc<dyn Codec> = Arc::new(migration_serde::JsonCodec::new());
        let pcd: Arc<dyn Codec> = Arc::new(migration_serde::PostcardCodec);
        let mut vm = Snapshot::new("vm");
        vm.add_state_as("clock", 1, 42u64);
        let mut dev = Snapshot::new("devices");
        dev.add_state_as("serial0", 2, (3u8, b"uart".to_vec()));
        dev.encode(&json).expect("encodes");
        vm.encode(&pcd).expect("encodes");
        vm.add_child(dev);
        vm
    }

    /// Scripts ([`frame_script`] input) of whole migrations into [`small_layout`].
    pub fn protocol() -> Vec<Vec<u8>> {
        let codec: Arc<dyn Codec> = Arc::new(migration_serde::PostcardCodec);
        let mut src = FakeVm::builder()
            .regions(&small_layout())
            .codecs(migration_serde::registry())
            .paused()
            .build()
            .expect("fake VM");
        use migration_core::Snapshottable;
        let mut snap = src.snapshot().expect("paused");
        snap.encode(&codec).expect("encodes");
        let state = codec::encode(codec.as_ref(), &snap).expect("encodes");
        let hello = Hello {
            version: 2,
            min_version: 1,
            arch: Arch::X86_64,
            codecs: vec![codec.id()],
            layout: small_layout(),
            config: vec![1, 2],
            producer: "fuzz".into(),
            features: 0,
        };
        let page = [0x11u8; 256];
        let full = script_of(&[
            Message::Hello(hello.clone()),
            Message::Memory {
                gpa: 0x1000,
                data: &page,
            },
            Message::Zero(vec![MemoryRange::new(0x10000, 0x1000)]),
            Message::RoundEnd {
                round: 0,
                last: false,
            },
            Message::Memory {
                gpa: 0x10100,
                data: &page,
            },
            Message::Zero(vec![MemoryRange::new(0x2000, 0x1000)]),
            Message::RoundEnd {
                round: 1,
                last: true,
            },
            Message::State {
                last: true,
                data: &state,
            },
            Message::Go,
        ]);
        let aborted = script_of(&[Message::Hello(hello), Message::Abort("bye".into())]);
        vec![full, aborted]
    }

    /// `[codec][type][payload]` inputs for [`kvm_state`](super::kvm_state): every
    /// type, every codec.
    pub fn kvm_state() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (c, codec) in codec_list().iter().enumerate() {
            let codec = codec.as_ref();
            let mut push = |t: u8, bytes: Vec<u8>| {
                let mut v = vec![c as u8, t];
                v.extend(bytes);
                out.push(v);
            };
            push(
                0,
                enc(
                    codec,
                    &Raw::new(kvm_regs {
                        rax: 7,
                        rip: 0x1000,
                        ..Default::default()
                    }),
                ),
            );
            push(1, enc(codec, &Raw::new(kvm_sregs::default())));
            push(2, enc(codec, &Raw::new(kvm_xcrs::default())));
            push(3, enc(codec, &Raw::new(kvm_debugregs::default())));
            push(4, enc(codec, &Raw::new(kvm_lapic_state::default())));
            push(5, enc(codec, &Raw::new(kvm_mp_state::default())));
            push(6, enc(codec, &Raw::new(kvm_vcpu_events::default())));
            push(7, enc(codec, &Raw::new(kvm_pit_state2::default())));
            push(8, enc(codec, &Raw::new(kvm_clock_data::default())));
            push(9, enc(codec, &Raw::new(kvm_pic_state::default())));
            push(10, enc(codec, &Raw::new(kvm_ioapic_state::default())));
            push(11, enc(codec, &sample_msrs()));
            push(12, enc(codec, &sample_cpuid()));
            push(13, enc(codec, &sample_xsave()));
            push(
                14,
                enc(
                    codec,
                    &NestedState::from_bytes(vec![0; NestedState::HEADER_BYTES])
                        .expect("valid size"),
                ),
            );
            push(15, enc(codec, &TscKhz(2_000_000)));
            let cd: Arc<dyn Codec> = codec_list().remove(c);
            let mut vcpu = Snapshot::new("vcpu0");
            sample_vcpu().add_to(&mut vcpu);
            vcpu.encode(&cd).expect("encodes");
            push(16, codec::encode(codec, &vcpu).expect("encodes"));
            let mut vm = Snapshot::new("devices");
            sample_vm().add_to(&mut vm);
            vm.encode(&cd).expect("encodes");
            push(17, codec::encode(codec, &vm).expect("encodes"));
        }
        out
    }

    fn enc<T: Serialize>(codec: &dyn Codec, v: &T) -> Vec<u8> {
        codec::encode(codec, v).expect("encodes")
    }

    /// Range scripts for [`memory_ranges`](super::memory_ranges).
    pub fn memory_ranges() -> Vec<Vec<u8>> {
        vec![
            // push [0x1000, +0x800), push out of order, bitmap at 0x10000, write.
            vec![
                0, 0, 0x10, 0, 0, 0x20, 2, 0, 0x02, 0, 0, 0x10, 4, 1, 0b1011, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 1, 0, 0, 0, 0, 0, 12, 6, 3,
            ],
            // a huge push, then write.
            vec![
                0, 250, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0, 250, 0, 0, 1, 0, 0, 0, 0,
                0, 6, 0,
            ],
        ]
    }

    /// An `MsrState` of three entries.
    pub fn sample_msrs() -> MsrState {
        MsrState(vec![
            MsrEntry {
                index: 0x10,
                data: 123_456,
            },
            MsrEntry {
                index: 0xc000_0080,
                data: 0x500,
            },
            MsrEntry {
                index: 0x1b,
                data: 0xfee0_0900,
            },
        ])
    }

    /// A `CpuidState` of two entries.
    pub fn sample_cpuid() -> CpuidState {
        CpuidState(vec![
            CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0x10,
                ebx: 1,
                ecx: 2,
                edx: 3,
            },
            CpuidEntry {
                function: 7,
                index: 0,
                flags: 1,
                eax: 0,
                ebx: 0x209,
                ecx: 0,
                edx: 0,
            },
        ])
    }

    /// A legacy-size (4 KiB) xsave area with a few bytes set.
    pub fn sample_xsave() -> XsaveState {
        let mut bytes = vec![0u8; 4096];
        bytes[0] = 0x7f;
        bytes[24] = 0x80;
        bytes[512] = 3;
        XsaveState::from_bytes(bytes).expect("valid size")
    }

    /// A vCPU state made of the samples above.
    pub fn sample_vcpu() -> VcpuState {
        VcpuState {
            tsc_khz: Some(TscKhz(2_000_000)),
            cpuid: sample_cpuid(),
            mp_state: Raw::new(kvm_mp_state::default()),
            regs: Raw::new(kvm_regs {
                rax: 7,
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            }),
            sregs: Raw::new(kvm_sregs::default()),
            xsave: sample_xsave(),
            xcrs: Raw::new(kvm_xcrs::default()),
            debugregs: Raw::new(kvm_debugregs::default()),
            lapic: Some(Raw::new(kvm_lapic_state::default())),
            msrs: sample_msrs(),
            nested: None,
            vcpu_events: Raw::new(kvm_vcpu_events::default()),
        }
    }

    /// A VM state of default device structs.
    pub fn sample_vm() -> VmState {
        VmState {
            layout: DeviceLayout::FULL_WITH_PIT,
            pit2: Some(Raw::new(kvm_pit_state2::default())),
            clock: Raw::new(kvm_clock_data {
                clock: 99,
                ..Default::default()
            }),
            pic_master: Some(Raw::new(kvm_pic_state::default())),
            pic_slave: Some(Raw::new(kvm_pic_state::default())),
            ioapic: Some(Raw::new(kvm_ioapic_state::default())),
        }
    }
}
