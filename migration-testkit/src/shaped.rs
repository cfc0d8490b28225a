//! [`Shaped`]: a stream whose writes go out no faster than a set rate, the in-process
//! stand-in for a shaped link (`tc tbf`, see [`crate::netns`]) in tests that need a
//! link slower than the guest dirties memory, without root.
//!
//! The rate is an upper bound, as a token bucket of 64 KiB: a write of `n` bytes
//! returns no earlier than `n / rate` after the previous one's due time, and time the
//! link sat idle earns at most one 64 KiB burst. The bandwidth a migration measures
//! over it is therefore at most the rate plus one burst per round (less on a busy
//! machine). Reads pass through.
//!
//! ```
//! use std::io::Write;
//! use std::time::Instant;
//! use migration_testkit::shaped::Shaped;
//!
//! let mut link = Shaped::new(Vec::new(), 1_000_000); // 1 MB/s
//! let t = Instant::now();
//! link.write_all(&[0u8; 200_000])?; // one 64 KiB burst, then paced
//! assert!(t.elapsed().as_secs_f64() >= 0.1);
//! assert_eq!(link.into_inner().len(), 200_000);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most bytes one write hands to the inner stream (keeps the pacing smooth).
const PIECE: usize = 64 << 10;

/// A stream whose writes are paced to at most `bytes_per_sec`; see the [module
/// docs](self).
#[derive(Debug)]
pub struct Shaped<S> {
    inner: S,
    bytes_per_sec: u64,
    /// When the bytes written so far are due (the bucket's level, as a time).
    due: Option<Instant>,
}

impl<S> Shaped<S> {
    /// Wraps `inner`; writes go out at most at `bytes_per_sec` (at least 1).
    pub fn new(inner: S, bytes_per_sec: u64) -> Self {
        Self {
            inner,
            bytes_per_sec: bytes_per_sec.max(1),
            due: None,
        }
    }

    /// The rate, bytes per second.
    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
    }

    /// The inner stream, borrowed (e.g. to shut a socket down).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Read> Read for Shaped<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Shaped<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(PIECE);
        let secs = |bytes: usize| Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let now = Instant::now();
        // An idle link earns at most one burst.
        let burst = secs(PIECE);
        let level = match self.due {
            Some(due) if due + burst > now => due,
            _ => now.checked_sub(burst).unwrap_or(now),
        };
        let due = level + secs(n);
        if due > now {
            std::thread::sleep(due - now);
        }
        let written = self.inner.write(&buf[..n])?;
        // Bytes the inner stream did not take are not charged.
        self.due = Some(level + secs(written));
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A shaped unix-socket link that breaks once its `cut` flag is set (by a progress
/// callback, say, at a chosen moment of a migration): the socket is shut down, so
/// the peer sees the end of the stream, and every later write fails.
#[derive(Debug)]
pub struct Breakable {
    inner: Shaped<UnixStream>,
    cut: Arc<AtomicBool>,
}

impl Breakable {
    /// `stream` shaped to `bytes_per_sec`, cut when `cut` becomes true.
    pub fn new(stream: UnixStream, bytes_per_sec: u64, cut: Arc<AtomicBool>) -> Self {
        Self {
            inner: Shaped::new(stream, bytes_per_sec),
            cut,
        }
    }
}

impl Read for Breakable {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Breakable {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cut.load(Ordering::Relaxed) {
            let _ = self.inner.get_ref().shutdown(std::net::Shutdown::Both);
            return Err(io::Error::other("link cut"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
