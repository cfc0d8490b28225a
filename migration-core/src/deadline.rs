//! [`Deadline`]: a reader that fails once a point in time has passed, so a peer that
//! trickles bytes (one a second, each read succeeding) cannot hold a connection
//! longer than the time allowed for a frame, a handshake or a whole transfer.
//!
//! A per-read socket timeout only catches a silent peer; the deadline catches a slow
//! one. Both are needed: the deadline is checked when a read returns, the socket
//! timeout makes sure a read returns.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// A reader (and writer) whose reads fail with [`io::ErrorKind::TimedOut`] after
/// its deadline.
#[derive(Debug)]
pub struct Deadline<S> {
    inner: S,
    at: Option<Instant>,
}

impl<S> Deadline<S> {
    /// `inner` without a deadline.
    pub fn new(inner: S) -> Self {
        Self { inner, at: None }
    }

    /// Reads fail from `at` on (`None`: never).
    pub fn set(&mut self, at: Option<Instant>) {
        self.at = at;
    }

    /// Reads fail `after` from now.
    pub fn set_in(&mut self, after: Duration) {
        self.at = Instant::now().checked_add(after);
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream back.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Fails with [`io::ErrorKind::TimedOut`] once the deadline has passed.
    pub(crate) fn check(&self) -> io::Result<()> {
        match self.at {
            Some(at) if Instant::now() >= at => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not send in time (deadline passed)",
            )),
            _ => Ok(()),
        }
    }
}

impl<S: Read> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check()?;
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.check()?;
        }
        Ok(n)
    }
}

impl<S: Write> Write for Deadline<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One byte per read, 20 ms apart: every read succeeds, the deadline still ends it.
    struct Trickle;
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(20));
            buf[0] = 1;
            Ok(1)
        }
    }

    #[test]
    fn a_trickling_peer_times_out() {
        let mut r = Deadline::new(Trickle);
        r.set_in(Duration::from_millis(200));
        let mut buf = [0u8; 1 << 20];
        let e = r.read_exact(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        r.set(None);
        assert_eq!(r.read(&mut buf).unwrap(), 1);
    }
}
