//! Fault-injecting transports: wrappers over any reader, writer or duplex stream that
//! break it in a planned, replayable way.
//!
//! A [`FaultPlan`] lists [`Fault`]s; [`FaultyReader`], [`FaultyWriter`] and
//! [`FaultyStream`] apply a plan to the bytes and calls that pass through them:
//!
//! | fault | reading | writing |
//! |---|---|---|
//! | [`Fault::TruncateAt`]`(n)` | end of file after `n` bytes | the first `n` bytes go through, then `BrokenPipe` |
//! | [`Fault::FlipBit`]`(k)` | bit `k % 8` of byte `k / 8` arrives flipped | the same bit leaves flipped |
//! | [`Fault::StallAt`] | sleeps once before delivering byte `n` | sleeps once before writing byte `n` |
//! | [`Fault::CloseAfterMessages`]`(m)` | end of file after `m` reads that returned data | `BrokenPipe` after `m` messages |
//! | [`Fault::ErrorAtCall`] | the `c`-th `read` call (0-based) fails | the `c`-th `write` call (0-based) fails |
//!
//! **Messages.** A writer counts every `write` call that wrote bytes as one message,
//! which matches framed protocols that write each frame with one `write_all` over a
//! buffered frame (a `write_all` that the inner writer splits counts more than once).
//! A protocol that writes a frame in several calls switches to explicit counting with
//! [`FaultyWriter::explicit_messages`] and calls [`FaultyWriter::end_message`] after
//! each frame. Byte positions and call numbers count from 0.
//!
//! Plans are deterministic. [`FaultPlan::from_seed`] picks a fault from a seed, and
//! every injected error and the plan's `Display` print the seed, so a failure found
//! by a seeded sweep is replayed with `FaultPlan::from_seed(seed, len)`:
//!
//! ```
//! use std::io::{Read, Write};
//! use migration_testkit::fault::{FaultPlan, FaultyReader, FaultyWriter};
//!
//! // A reader that ends after 3 bytes.
//! let mut r = FaultyReader::new(&b"hello"[..], FaultPlan::new().truncate_at(3));
//! let mut got = Vec::new();
//! r.read_to_end(&mut got).unwrap();
//! assert_eq!(got, b"hel");
//!
//! // A writer that flips bit 0 of byte 1.
//! let mut w = FaultyWriter::new(Vec::new(), FaultPlan::new().flip_bit(8));
//! w.write_all(b"ab").unwrap();
//! assert_eq!(w.into_inner(), b"ac");
//!
//! // A seeded plan: replay it from the seed it prints.
//! let plan = FaultPlan::from_seed(7, 1000);
//! assert_eq!(plan.to_string(), FaultPlan::from_seed(7, 1000).to_string());
//! assert!(plan.to_string().contains("seed 7"));
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::thread;
use std::time::Duration;

use crate::rng::Rng;

/// One planned fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The stream ends after this many bytes.
    TruncateAt(u64),
    /// Bit `k % 8` of stream byte `k / 8` is flipped.
    FlipBit(u64),
    /// The stream stalls for `duration` once, before byte `byte`.
    StallAt {
        /// Stream position of the stall.
        byte: u64,
        /// How long it lasts.
        duration: Duration,
    },
    /// The stream closes after this many messages (see the module docs).
    CloseAfterMessages(u64),
    /// The call with this 0-based number fails with an error of `kind`.
    ErrorAtCall {
        /// Which `read` or `write` call fails.
        call: u64,
        /// The error kind returned.
        kind: io::ErrorKind,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::TruncateAt(n) => write!(f, "truncate at byte {n}"),
            Fault::FlipBit(k) => write!(f, "flip bit {k} (byte {}, bit {})", k / 8, k % 8),
            Fault::StallAt { byte, duration } => write!(f, "stall {duration:?} at byte {byte}"),
            Fault::CloseAfterMessages(m) => write!(f, "close after {m} messages"),
            Fault::ErrorAtCall { call, kind } => write!(f, "{kind:?} error at call {call}"),
        }
    }
}

/// A list of faults to inject, built explicitly or from a seed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    seed: Option<u64>,
    faults: Vec<Fault>,
}

/// Error kinds a seeded plan picks from.
const SEEDED_KINDS: [io::ErrorKind; 4] = [
    io::ErrorKind::ConnectionReset,
    io::ErrorKind::BrokenPipe,
    io::ErrorKind::UnexpectedEof,
    io::ErrorKind::Other,
];

impl FaultPlan {
    /// A plan with no faults: the wrappers pass everything through.
    pub fn new() -> Self {
        Self::default()
    }

    /// One fault chosen deterministically from `seed`, positioned within a stream of
    /// `stream_len` bytes (a truncation, a bit flip, a short stall, a close after a
    /// few messages or an error at an early call). The same seed and length always
    /// give the same plan.
    pub fn from_seed(seed: u64, stream_len: u64) -> Self {
        let mut rng = Rng::new(seed);
        let len = stream_len.max(1);
        let fault = match rng.below(5) {
            0 => Fault::TruncateAt(rng.below(len)),
            1 => Fault::FlipBit(rng.below(len.saturating_mul(8))),
            2 => Fault::StallAt {
                byte: rng.below(len),
                duration: Duration::from_millis(1 + rng.below(20)),
            },
            3 => Fault::CloseAfterMessages(rng.below(8)),
            _ => Fault::ErrorAtCall {
                call: rng.below(8),
                kind: SEEDED_KINDS[rng.below(SEEDED_KINDS.len() as u64) as usize],
            },
        };
        Self {
            seed: Some(seed),
            faults: vec![fault],
        }
    }

    /// Adds a fault.
    pub fn with(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self
    }

    /// Adds [`Fault::TruncateAt`].
    pub fn truncate_at(self, byte: u64) -> Self {
        self.with(Fault::TruncateAt(byte))
    }

    /// Adds [`Fault::FlipBit`].
    pub fn flip_bit(self, bit: u64) -> Self {
        self.with(Fault::FlipBit(bit))
    }

    /// Adds [`Fault::StallAt`].
    pub fn stall_at(self, byte: u64, duration: Duration) -> Self {
        self.with(Fault::StallAt { byte, duration })
    }

    /// Adds [`Fault::CloseAfterMessages`].
    pub fn close_after_messages(self, messages: u64) -> Self {
        self.with(Fault::CloseAfterMessages(messages))
    }

    /// Adds [`Fault::ErrorAtCall`].
    pub fn error_at_call(self, call: u64, kind: io::ErrorKind) -> Self {
        self.with(Fault::ErrorAtCall { call, kind })
    }

    /// The seed this plan was built from, if any.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The planned faults.
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// Whether the plan has no fault.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    fn truncation_point(&self) -> Option<u64> {
        self.faults
            .iter()
            .filter_map(|f| match f {
                Fault::TruncateAt(n) => Some(*n),
                _ => None,
            })
            .min()
    }

    fn close_after(&self) -> Option<u64> {
        self.faults
            .iter()
            .filter_map(|f| match f {
                Fault::CloseAfterMessages(m) => Some(*m),
                _ => None,
            })
            .min()
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fault plan")?;
        if let Some(seed) = self.seed {
            write!(f, " (seed {seed})")?;
        }
        f.write_str(": ")?;
        if self.faults.is_empty() {
            return f.write_str("no faults");
        }
        for (i, fault) in self.faults.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{fault}")?;
        }
        Ok(())
    }
}

/// The state of one direction of a faulty transport.
#[derive(Debug)]
struct Injector {
    plan: FaultPlan,
    /// Bytes passed so far.
    pos: u64,
    /// `read`/`write` calls so far.
    calls: u64,
    /// Messages completed so far.
    messages: u64,
    /// Which stalls have happened (indexed like `plan.faults`).
    stalled: Vec<bool>,
    /// Whether messages are counted by [`FaultyWriter::end_message`] only.
    explicit_messages: bool,
}

impl Injector {
    fn new(plan: FaultPlan) -> Self {
        let stalled = vec![false; plan.faults.len()];
        Self {
            plan,
            pos: 0,
            calls: 0,
            messages: 0,
            stalled,
            explicit_messages: false,
        }
    }

    fn error(&self, kind: io::ErrorKind, what: &str) -> io::Error {
        io::Error::new(kind, format!("injected fault: {what} [{}]", self.plan))
    }

    /// Counts a call and returns the planned error for it, if any.
    fn call(&mut self) -> io::Result<()> {
        let call = self.calls;
        self.calls += 1;
        for f in &self.plan.faults {
            if let Fault::ErrorAtCall { call: c, kind } = f {
                if *c == call {
                    return Err(self.error(*kind, &format!("error at call {call}")));
                }
            }
        }
        Ok(())
    }

    fn closed(&self) -> bool {
        self.plan.close_after().is_some_and(|m| self.messages >= m)
    }

    fn truncated(&self) -> bool {
        self.plan.truncation_point().is_some_and(|n| self.pos >= n)
    }

    /// Sleeps for a stall planned at the current position, and limits `len` so the
    /// transfer stops before the next truncation point or stall.
    fn prepare(&mut self, len: usize) -> usize {
        let pos = self.pos;
        let mut limit = len as u64;
        for (i, f) in self.plan.faults.iter().enumerate() {
            match f {
                Fault::StallAt { byte, duration } if !self.stalled[i] => {
                    if *byte == pos {
                        self.stalled[i] = true;
                        thread::sleep(*duration);
                    } else if *byte > pos {
                        limit = limit.min(byte - pos);
                    }
                }
                Fault::TruncateAt(n) if *n > pos => limit = limit.min(n - pos),
                _ => {}
            }
        }
        usize::try_from(limit).unwrap_or(len).min(len)
    }

    /// Flips the planned bits that fall in `buf`, which sits at the current position.
    fn flip(&self, buf: &mut [u8]) {
        let start = self.pos;
        let end = start + buf.len() as u64;
        for f in &self.plan.faults {
            if let Fault::FlipBit(k) = f {
                let byte = k / 8;
                if byte >= start && byte < end {
                    buf[(byte - start) as usize] ^= 1 << (k % 8);
                }
            }
        }
    }

    fn has_flip_in(&self, len: usize) -> bool {
        let end = self.pos + len as u64;
        self.plan
            .faults
            .iter()
            .any(|f| matches!(f, Fault::FlipBit(k) if k / 8 >= self.pos && k / 8 < end))
    }

    fn read(&mut self, inner: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
        self.call()?;
        if buf.is_empty() {
            return inner.read(buf);
        }
        if self.closed() || self.truncated() {
            return Ok(0);
        }
        let n = self.prepare(buf.len());
        let got = inner.read(&mut buf[..n])?;
        self.flip(&mut buf[..got]);
        self.pos += got as u64;
        if got > 0 {
            self.messages += 1;
        }
        Ok(got)
    }

    fn write(&mut self, inner: &mut dyn Write, buf: &[u8]) -> io::Result<usize> {
        self.call()?;
        if buf.is_empty() {
            return inner.write(buf);
        }
        if self.closed() {
            return Err(self.error(io::ErrorKind::BrokenPipe, "closed after messages"));
        }
        if self.truncated() {
            return Err(self.error(io::ErrorKind::BrokenPipe, "truncated"));
        }
        let n = self.prepare(buf.len());
        let written = if self.has_flip_in(n) {
            let mut copy = buf[..n].to_vec();
            self.flip(&mut copy);
            inner.write(&copy)?
        } else {
            inner.write(&buf[..n])?
        };
        self.pos += written as u64;
        if written > 0 && !self.explicit_messages {
            self.messages += 1;
        }
        Ok(written)
    }
}

/// A reader that injects the faults of a [`FaultPlan`].
#[derive(Debug)]
pub struct FaultyReader<R> {
    inner: R,
    faults: Injector,
}

impl<R: Read> FaultyReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, plan: FaultPlan) -> Self {
        Self {
            inner,
            faults: Injector::new(plan),
        }
    }

    /// Bytes delivered so far.
    pub fn position(&self) -> u64 {
        self.faults.pos
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.faults.plan
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for FaultyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.faults.read(&mut self.inner, buf)
    }
}

/// A writer that injects the faults of a [`FaultPlan`].
#[derive(Debug)]
pub struct FaultyWriter<W> {
    inner: W,
    faults: Injector,
}

impl<W: Write> FaultyWriter<W> {
    /// Wraps `inner`; every `write` call that writes bytes counts as a message.
    pub fn new(inner: W, plan: FaultPlan) -> Self {
        Self {
            inner,
            faults: Injector::new(plan),
        }
    }

    /// Counts messages only through [`end_message`](Self::end_message).
    pub fn explicit_messages(mut self) -> Self {
        self.faults.explicit_messages = true;
        self
    }

    /// Marks the end of a message (with [`explicit_messages`](Self::explicit_messages)).
    pub fn end_message(&mut self) {
        self.faults.messages += 1;
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.faults.pos
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.faults.plan
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for FaultyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.faults.write(&mut self.inner, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A duplex stream (such as `UnixStream` or `TcpStream`) with one plan for what it
/// reads and another for what it writes; each direction counts its own bytes, calls
/// and messages.
#[derive(Debug)]
pub struct FaultyStream<S> {
    inner: S,
    reads: Injector,
    writes: Injector,
}

impl<S: Read + Write> FaultyStream<S> {
    /// Wraps `inner` with `read_plan` for reads and `write_plan` for writes.
    pub fn new(inner: S, read_plan: FaultPlan, write_plan: FaultPlan) -> Self {
        Self {
            inner,
            reads: Injector::new(read_plan),
            writes: Injector::new(write_plan),
        }
    }

    /// Faults on reads only.
    pub fn reads(inner: S, plan: FaultPlan) -> Self {
        Self::new(inner, plan, FaultPlan::new())
    }

    /// Faults on writes only.
    pub fn writes(inner: S, plan: FaultPlan) -> Self {
        Self::new(inner, FaultPlan::new(), plan)
    }

    /// Counts written messages only through [`end_message`](Self::end_message).
    pub fn explicit_messages(mut self) -> Self {
        self.writes.explicit_messages = true;
        self
    }

    /// Marks the end of a written message.
    pub fn end_message(&mut self) {
        self.writes.messages += 1;
    }

    /// Bytes read and written so far.
    pub fn positions(&self) -> (u64, u64) {
        (self.reads.pos, self.writes.pos)
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Read + Write> Read for FaultyStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.read(&mut self.inner, buf)
    }
}

impl<S: Read + Write> Write for FaultyStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes.write(&mut self.inner, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7) as u8).collect()
    }

    fn read_all(plan: FaultPlan, src: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = FaultyReader::new(src, plan);
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn no_faults_pass_through() {
        let d = data(10_000);
        assert_eq!(read_all(FaultPlan::new(), &d).unwrap(), d);
        let mut w = FaultyWriter::new(Vec::new(), FaultPlan::new());
        w.write_all(&d).unwrap();
        assert_eq!(w.into_inner(), d);
    }

    #[test]
    fn truncation_ends_reads_and_breaks_writes_at_the_byte() {
        let d = data(100);
        for n in [0, 1, 57, 99, 100, 200] {
            let got = read_all(FaultPlan::new().truncate_at(n), &d).unwrap();
            assert_eq!(got, &d[..(n as usize).min(100)]);
            let mut w = FaultyWriter::new(Vec::new(), FaultPlan::new().truncate_at(n));
            let r = w.write_all(&d);
            assert_eq!(r.is_err(), n < 100, "n={n}");
            if let Err(e) = r {
                assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
            }
            assert_eq!(w.into_inner(), &d[..(n as usize).min(100)]);
        }
    }

    #[test]
    fn flips_exactly_one_bit_in_either_direction() {
        let d = data(64);
        for k in [0u64, 7, 8, 100, 511] {
            let mut want = d.clone();
            want[(k / 8) as usize] ^= 1 << (k % 8);
            assert_eq!(read_all(FaultPlan::new().flip_bit(k), &d).unwrap(), want);
            let mut w = FaultyWriter::new(Vec::new(), FaultPlan::new().flip_bit(k));
            for piece in d.chunks(5) {
                w.write_all(piece).unwrap();
            }
            assert_eq!(w.into_inner(), want);
        }
    }

    #[test]
    fn error_at_call_fails_that_call_only() {
        let mut w = FaultyWriter::new(
            Vec::new(),
            FaultPlan::new().error_at_call(2, io::ErrorKind::ConnectionReset),
        );
        w.write_all(b"a").unwrap();
        w.write_all(b"b").unwrap();
        let e = w.write_all(b"c").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(e.to_string().contains("error at call 2"), "{e}");
        w.write_all(b"d").unwrap();
        assert_eq!(w.into_inner(), b"abd");
    }

    #[test]
    fn close_after_messages_counts_writes_or_explicit_marks() {
        let mut w = FaultyWriter::new(Vec::new(), FaultPlan::new().close_after_messages(2));
        w.write_all(b"one").unwrap();
        w.write_all(b"two").unwrap();
        assert!(w.write_all(b"three").is_err());
        assert_eq!(w.into_inner(), b"onetwo");

        let mut w = FaultyWriter::new(Vec::new(), FaultPlan::new().close_after_messages(1))
            .explicit_messages();
        w.write_all(b"he").unwrap();
        w.write_all(b"ad").unwrap();
        w.end_message();
        assert!(w.write_all(b"x").is_err());
        assert_eq!(w.into_inner(), b"head");

        // Reading: end of file after the first read that returned data.
        let mut r = FaultyReader::new(&b"abcdef"[..], FaultPlan::new().close_after_messages(1));
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        assert_eq!(r.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn stall_delivers_every_byte_and_splits_at_the_stall() {
        let d = data(32);
        let mut r = FaultyReader::new(
            &d[..],
            FaultPlan::new().stall_at(10, Duration::from_millis(1)),
        );
        let mut buf = [0u8; 32];
        assert_eq!(r.read(&mut buf).unwrap(), 10);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &d[10..]);
    }

    #[test]
    fn seeded_plans_are_replayable_and_vary() {
        let plans: Vec<_> = (0..50).map(|s| FaultPlan::from_seed(s, 1000)).collect();
        for (s, p) in plans.iter().enumerate() {
            assert_eq!(*p, FaultPlan::from_seed(s as u64, 1000));
            assert_eq!(p.seed(), Some(s as u64));
        }
        let kinds: std::collections::BTreeSet<_> = plans
            .iter()
            .map(|p| std::mem::discriminant(&p.faults()[0]))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|d| format!("{d:?}"))
            .collect();
        assert_eq!(kinds.len(), 5, "50 seeds should cover every fault kind");
    }

    #[test]
    fn duplex_stream_faults_each_direction_separately() {
        use std::os::unix::net::UnixStream;
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = FaultyStream::new(
            a,
            FaultPlan::new().flip_bit(0),
            FaultPlan::new().truncate_at(2),
        );
        assert!(s.write_all(b"xyz").is_err());
        b.write_all(b"\x00").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        assert_eq!(one, [1]);
        let mut got = [0u8; 2];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"xy");
        assert_eq!(s.positions(), (1, 2));
    }
}
