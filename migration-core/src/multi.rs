//! Multi-connection transfer: guest memory over several connections at once, each
//! with its own thread on both sides (the protocol v3 feature
//! [`FEATURE_MULTI_CONNECTION`](crate::protocol::FEATURE_MULTI_CONNECTION);
//! [docs/protocol.md](https://github.com/rust-vmm/vm-migration/blob/main/docs/protocol.md#multi-connection)).
//!
//! **Negotiation.** The source offers the feature bit in its HELLO when asked for more
//! than one connection ([`MigrationOptions::connections`](crate::precopy::MigrationOptions::connections))
//! and its memory can be read from several threads ([`MemorySource::as_sync`](crate::memory::MemorySource::as_sync)). The
//! destination accepts it when it can accept further connections (it listens), allows
//! more than one ([`ReceiveOptions::max_connections`](crate::destination::ReceiveOptions::max_connections))
//! and its VM's memory can be written from several threads ([`MemorySink::as_sync_sink`]).
//! After a HELLO_ACK that accepts it, on the primary connection the destination sends
//! SESSION (a random 32-byte token and its limit), the source answers CONNECTIONS `n`,
//! then opens `n − 1` secondary connections to the same URL (under TLS, each its own
//! mutually authenticated session). The first frame of each is JOIN (the token and
//! the connection's index, 1 to `n − 1`). A connection with another token, an index out
//! of range or taken is refused with an ABORT and closed; the destination waits for the
//! good ones until its handshake deadline.
//!
//! **Which page goes where.** Guest memory is dealt in stripes of [`STRIPE`] bytes:
//! the stripe at `gpa` always travels on connection `(gpa / STRIPE) % n`
//! ([`connection_of`]), the primary being connection 0. Each connection carries its
//! pages as MEMORY and ZERO frames, as a single connection would.
//!
//! **Rounds stay in order.** A page sent in round k+1 must never be overwritten by its
//! round-k copy arriving late. Two rules make sure of it:
//! 1. A page always travels on the same connection (its stripe's), and a connection
//!    delivers in order: its round-k copy is written before its round-k+1 copy is read.
//! 2. A barrier on every connection: each secondary ends its share of round k with
//!    STRIPE_END k; the destination accepts the primary's ROUND_END k only once every
//!    secondary delivered STRIPE_END k, and no receiving thread reads round k+1 before
//!    that. The device state is read only after the last round arrived on every
//!    connection. The source starts round k+1 only after every connection's share of
//!    round k is written.
//!
//! Rule 1 alone keeps pages in order; rule 2 keeps every round whole, so that the
//! destination's per-round accounting, the zero-page rule of round 0 (fresh memory
//! is not zeroed again) and the switch to device state see one consistent round.
//!
//! **Failures.** A connection that breaks, stalls past its deadline or sends a bad
//! frame fails the migration on both sides: the destination names the connection and
//! aborts on the primary; the source's round fails, it resumes its VM and aborts.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::endpoint::Listener;
use crate::memory::{check_range, MemoryRange, MemoryRangeTable, MemorySink};
use crate::protocol::{
    Channel, Message, MigrationError, Received, MAX_CONNECTIONS, SESSION_TOKEN_LEN,
};
use crate::security::{Security, SecurityError};

/// Guest memory is dealt to connections in stripes of this many bytes (2 MiB: a huge
/// page, so each destination thread faults in whole huge pages of its own).
pub const STRIPE: u64 = 2 << 20;

/// Default [`ReceiveOptions::max_connections`](crate::destination::ReceiveOptions::max_connections).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;

/// A connection of a multi-connection migration: a duplex byte stream a thread may own.
pub trait Connection: Read + Write + Send {}

impl<T: Read + Write + Send> Connection for T {}

/// A connection, boxed.
pub type BoxedConnection = Box<dyn Connection>;

/// Which of `n` connections carries the page at `gpa`.
pub fn connection_of(gpa: u64, n: usize) -> usize {
    ((gpa / STRIPE) % n.max(1) as u64) as usize
}

/// `table` dealt to `n` connections by stripe: element `i` is what connection `i`
/// carries ([`connection_of`]).
pub fn shares(table: &MemoryRangeTable, n: usize) -> Vec<MemoryRangeTable> {
    let n = n.max(1);
    let mut out = vec![MemoryRangeTable::new(); n];
    for r in table.ranges() {
        let end = r.gpa.saturating_add(r.length);
        let mut gpa = r.gpa;
        while gpa < end {
            let stripe_end = (gpa / STRIPE + 1).saturating_mul(STRIPE).min(end);
            out[connection_of(gpa, n)].push(MemoryRange::new(gpa, stripe_end - gpa));
            gpa = stripe_end;
        }
    }
    out
}

/// `e` with the index of the connection it happened on.
fn on_connection(index: usize, e: MigrationError) -> MigrationError {
    match e {
        MigrationError::Io(e) => {
            MigrationError::Io(io::Error::new(e.kind(), format!("connection {index}: {e}")))
        }
        MigrationError::Malformed(m) => {
            MigrationError::Malformed(format!("connection {index}: {m}"))
        }
        other => other,
    }
}

/// A source's secondary connection failed with `e`: an error of kind `Other`, so that
/// the source tells the destination on the primary (an ABORT) instead of waiting there
/// for the destination's reason, which the destination does not know to send.
fn secondary_failed(index: usize, e: MigrationError) -> MigrationError {
    match e {
        MigrationError::Io(e) => {
            MigrationError::Io(io::Error::other(format!("connection {index}: {e}")))
        }
        other => on_connection(index, other),
    }
}

/// Whether two tokens are equal, in time independent of where they differ.
fn same_token(a: &[u8; SESSION_TOKEN_LEN], b: &[u8; SESSION_TOKEN_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random session token (from the kernel's CSPRNG).
fn random_token() -> Result<[u8; SESSION_TOKEN_LEN], MigrationError> {
    let mut token = [0u8; SESSION_TOKEN_LEN];
    let mut filled = 0;
    while filled < token.len() {
        let n =
            rustix::rand::getrandom(&mut token[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(io::Error::from)?;
        filled += n;
    }
    Ok(token)
}

// ---------------------------------------------------------------------------------
// Source side.

/// Sends one secondary's share of a round: given its channel, a reusable buffer and the
/// share, on that connection's thread.
pub(crate) type SendShare<'a, R> = dyn Fn(&mut Channel<BoxedConnection>, &mut Vec<u8>, &MemoryRangeTable) -> Result<R, MigrationError>
    + Sync
    + 'a;

/// The source's secondary connections (indices 1 to `n − 1`), joined to the session.
pub(crate) struct Secondaries {
    channels: Vec<Channel<BoxedConnection>>,
    buffers: Vec<Vec<u8>>,
}

impl Secondaries {
    /// After a HELLO_ACK that accepted the feature: reads SESSION on `primary`, asks
    /// for `wanted` connections in all (within the destination's limit), and opens and
    /// joins the secondaries through `connect` (called with each index).
    pub(crate) fn open<S: Read + Write>(
        primary: &mut Channel<S>,
        wanted: usize,
        connect: &mut dyn FnMut(usize) -> Result<BoxedConnection, MigrationError>,
    ) -> Result<Self, MigrationError> {
        let (token, max) = match primary.recv()? {
            Message::Session {
                token,
                max_connections,
            } => (token, max_connections as usize),
            Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
            other => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "waiting for SESSION",
                })
            }
        };
        let n = wanted.clamp(1, max.min(MAX_CONNECTIONS));
        primary.send(&Message::Connections(n as u16))?;
        primary.flush()?;
        let mut channels = Vec::with_capacity(n - 1);
        for index in 1..n {
            let conn = connect(index).map_err(|e| secondary_failed(index, e))?;
            let mut ch = Channel::new(conn);
            ch.send(&Message::Join {
                token,
                index: index as u16,
            })?;
            ch.flush().map_err(|e| secondary_failed(index, e))?;
            channels.push(ch);
        }
        tracing::info!(connections = n, "multi-connection session joined");
        Ok(Self {
            buffers: vec![Vec::new(); channels.len()],
            channels,
        })
    }

    /// Connections in all, the primary included.
    pub(crate) fn count(&self) -> usize {
        self.channels.len() + 1
    }

    /// Bytes framed on the secondaries so far.
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.channels.iter().map(Channel::bytes_sent).sum()
    }

    /// Sends round `round`: `shares[i]` (for `i ≥ 1`) on secondary `i` from a thread of
    /// its own with `send` (given the channel, a reusable buffer and the share), then
    /// STRIPE_END; meanwhile `primary` sends `shares[0]` on this thread. Returns when
    /// every connection's share is written: the results, the primary's first.
    pub(crate) fn send_round<R: Send>(
        &mut self,
        shares: &[MemoryRangeTable],
        round: u32,
        last: bool,
        send: &SendShare<'_, R>,
        primary: impl FnOnce(&MemoryRangeTable) -> Result<R, MigrationError>,
    ) -> Result<Vec<R>, MigrationError> {
        let (first, rest) = shares
            .split_first()
            .ok_or_else(|| MigrationError::Malformed("no share for the primary".into()))?;
        thread::scope(|scope| {
            let threads: Vec<_> = self
                .channels
                .iter_mut()
                .zip(self.buffers.iter_mut())
                .zip(rest)
                .map(|((ch, buf), share)| {
                    scope.spawn(move || -> Result<R, MigrationError> {
                        let r = send(ch, buf, share)?;
                        ch.send(&Message::StripeEnd { round, last })?;
                        ch.flush()?;
                        Ok(r)
                    })
                })
                .collect();
            let mine = primary(first);
            let theirs: Vec<Result<R, MigrationError>> = threads
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    t.join()
                        .unwrap_or_else(|_| {
                            Err(MigrationError::Io(io::Error::other(
                                "the sending thread panicked",
                            )))
                        })
                        .map_err(|e| secondary_failed(i + 1, e))
                })
                .collect();
            let mut out = vec![mine?];
            for r in theirs {
                out.push(r?);
            }
            Ok(out)
        })
    }
}

// ---------------------------------------------------------------------------------
// Destination side.

/// Accepts the next secondary connection, secured (TLS handshake done), before the
/// deadline given; an error of kind `TimedOut` once it passed.
pub type Acceptor<'a> = dyn FnMut(Instant) -> Result<BoxedConnection, MigrationError> + 'a;

/// After a HELLO_ACK that accepted the feature: sends SESSION (a fresh token, `max`
/// connections) on `primary`, reads CONNECTIONS, and accepts the secondaries through
/// `accept` until each index has joined with the token, all before `handshake_timeout`
/// has passed. Returns them in index order, their frames timed by `frame_timeout` and
/// `overall`.
pub(crate) fn accept_secondaries<S: Read + Write>(
    primary: &mut Channel<S>,
    accept: &mut Acceptor<'_>,
    max: usize,
    handshake_timeout: Duration,
    frame_timeout: Duration,
    overall: Option<Instant>,
) -> Result<Vec<Channel<BoxedConnection>>, MigrationError> {
    let max = max.clamp(2, MAX_CONNECTIONS);
    let token = random_token()?;
    primary.send(&Message::Session {
        token,
        max_connections: max as u16,
    })?;
    primary.flush()?;
    let n = match primary.recv()? {
        Message::Connections(n) => n as usize,
        Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
        other => {
            return Err(MigrationError::Unexpected {
                got: other.message_type(),
                state: "waiting for CONNECTIONS",
            })
        }
    };
    if n > max {
        return Err(MigrationError::Malformed(format!(
            "the source asks for {n} connections, over this destination's limit of {max}"
        )));
    }
    let deadline = Instant::now() + handshake_timeout;
    let mut slots: Vec<Option<Channel<BoxedConnection>>> = (1..n).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let conn = accept(deadline)?;
        let mut ch = Channel::new(conn);
        ch.set_deadline(Some(deadline));
        let verdict = match ch.recv() {
            Ok(Message::Join { token: t, index }) => {
                let i = index as usize;
                if !same_token(&t, &token) {
                    Err("wrong session token".to_owned())
                } else if i == 0 || i >= n {
                    Err(format!("connection index {i} outside 1 to {}", n - 1))
                } else if slots[i - 1].is_some() {
                    Err(format!("connection index {i} joined twice"))
                } else {
                    Ok(i)
                }
            }
            Ok(other) => Err(format!("expected JOIN, got {:?}", other.message_type())),
            Err(e) => Err(e.to_string()),
        };
        match verdict {
            Ok(i) => {
                ch.set_deadline(overall);
                ch.set_frame_timeout(Some(frame_timeout));
                slots[i - 1] = Some(ch);
            }
            Err(reason) => {
                // `?`: the reason may quote what the peer sent.
                tracing::warn!(reason = ?reason, "secondary connection refused");
                ch.abort(&format!(
                    "destination: secondary connection refused: {reason}"
                ));
            }
        }
    }
    tracing::info!(connections = n, "multi-connection session joined");
    Ok(slots.into_iter().flatten().collect())
}

/// Accepts the next connection on `listener` under `security` before `deadline`
/// (polling: the listener is non-blocking meanwhile). A peer refused by TLS is logged
/// and skipped; the next one is served.
pub(crate) fn accept_until(
    listener: &Listener,
    security: &Security,
    io_timeout: Option<Duration>,
    deadline: Instant,
) -> Result<BoxedConnection, MigrationError> {
    listener.set_nonblocking(true)?;
    let result = loop {
        match listener.accept_with(security, io_timeout, |plain, e| {
            Channel::new(plain).abort(&format!("destination: {e}"))
        }) {
            Ok(s) => break Ok(Box::new(s) as BoxedConnection),
            Err(SecurityError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(MigrationError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the source's secondary connections did not all join before the handshake deadline",
                    )));
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(SecurityError::Io(e)) => break Err(MigrationError::Io(e)),
            Err(e) => {
                tracing::warn!(error = %e, "secondary connection refused");
                if Instant::now() >= deadline {
                    break Err(e.into());
                }
            }
        }
    };
    listener.set_nonblocking(false)?;
    result
}

/// What a secondary delivered in one round.
#[derive(Debug)]
struct Stripe {
    round: u32,
    last: bool,
    memory_bytes: u64,
    zero_bytes: u64,
}

type Report = (usize, Result<Stripe, MigrationError>);

/// The destination's barrier at the end of each round, across every connection.
#[derive(Debug)]
pub(crate) struct Barrier {
    reports: mpsc::Receiver<Report>,
    releases: Vec<mpsc::Sender<()>>,
    wait: Duration,
}

impl Barrier {
    /// The primary delivered ROUND_END `round`: waits (at most the frame timeout) until
    /// every secondary delivered STRIPE_END `round` with the same `last`, then lets them
    /// read on. Returns the bytes they wrote and zeroed in the round.
    pub(crate) fn round_end(
        &mut self,
        round: u32,
        last: bool,
    ) -> Result<(u64, u64), MigrationError> {
        let deadline = Instant::now() + self.wait;
        let n = self.releases.len();
        let mut done = vec![false; n];
        let (mut memory, mut zero) = (0u64, 0u64);
        while done.iter().any(|d| !d) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok((index, Ok(s))) => {
                    if s.round != round || s.last != last || done[index - 1] {
                        return Err(MigrationError::Malformed(format!(
                            "connection {index} ended round {} (last: {}) while the primary ended round {round} (last: {last})",
                            s.round, s.last
                        )));
                    }
                    done[index - 1] = true;
                    memory = memory.saturating_add(s.memory_bytes);
                    zero = zero.saturating_add(s.zero_bytes);
                }
                Ok((index, Err(e))) => return Err(on_connection(index, e)),
                Err(_) => {
                    let late = done.iter().position(|d| !d).map_or(0, |i| i + 1);
                    return Err(MigrationError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connection {late}: round {round} did not arrive in time"),
                    )));
                }
            }
        }
        if !last {
            for r in &self.releases {
                let _ = r.send(());
            }
        }
        Ok((memory, zero))
    }

    /// The error to report for `e`, which ended the primary's side: if `e` only
    /// follows from another connection's failure (the source aborted, the connection
    /// broke), that connection's own error, if it reported one.
    pub(crate) fn first_error(&mut self, e: MigrationError) -> MigrationError {
        if !matches!(e, MigrationError::PeerAborted(_) | MigrationError::Io(_)) {
            return e;
        }
        while let Ok((index, report)) = self.reports.try_recv() {
            if let Err(theirs) = report {
                return on_connection(index, theirs);
            }
        }
        e
    }
}

/// Receives the secondaries' shares of every round, each on a thread of its own
/// writing into `sink`, while `primary` receives the primary connection's on this
/// thread and calls [`Barrier::round_end`] at each ROUND_END. Returns when `primary`
/// does and every thread has ended (a thread ends after the last round, on an error,
/// or when `primary` returned and it waits for a round that will not come).
pub(crate) fn receive_rounds<T>(
    secondaries: Vec<Channel<BoxedConnection>>,
    sink: &(dyn MemorySink + Sync),
    layout: &[MemoryRange],
    version: u32,
    wait: Duration,
    primary: impl FnOnce(&mut Barrier) -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    thread::scope(|scope| {
        let (tx, reports) = mpsc::channel();
        let mut releases = Vec::with_capacity(secondaries.len());
        for (i, mut ch) in secondaries.into_iter().enumerate() {
            let (release, released) = mpsc::channel();
            releases.push(release);
            let tx = tx.clone();
            scope.spawn(move || {
                receive_stripes(i + 1, &mut ch, sink, layout, version, wait, &tx, &released)
            });
        }
        drop(tx);
        let mut barrier = Barrier {
            reports,
            releases,
            wait,
        };
        primary(&mut barrier)
        // The barrier drops here: threads waiting for a release end.
    })
}

/// One secondary's receiving loop: MEMORY and ZERO frames into `sink` (checked against
/// `layout`), STRIPE_END reported to the barrier, then a wait for its release.
#[allow(clippy::too_many_arguments)]
fn receive_stripes(
    index: usize,
    ch: &mut Channel<BoxedConnection>,
    sink: &(dyn MemorySink + Sync),
    layout: &[MemoryRange],
    version: u32,
    wait: Duration,
    reports: &mpsc::Sender<Report>,
    released: &mpsc::Receiver<()>,
) {
    let mut round = 0u32;
    let (mut memory_bytes, mut zero_bytes) = (0u64, 0u64);
    let error = loop {
        let message = match ch.recv_into(sink, layout) {
            Ok(Received::MemoryWritten(range)) => {
                memory_bytes = memory_bytes.saturating_add(range.length);
                continue;
            }
            Ok(Received::Message(m)) => m,
            Err(e) => break e,
        };
        match message {
            Message::Zero(ranges) => {
                if version < 2 {
                    break MigrationError::Malformed("ZERO frame in protocol version 1".into());
                }
                for r in ranges {
                    if let Err(e) = check_range(layout, r) {
                        return report_error(index, ch, reports, e.into());
                    }
                    // Round 0 writes into fresh memory: it reads as zero already.
                    if round > 0 {
                        if let Err(e) = sink.zero_memory(r.gpa, r.length) {
                            return report_error(index, ch, reports, e.into());
                        }
                    }
                    zero_bytes = zero_bytes.saturating_add(r.length);
                }
            }
            Message::StripeEnd { round: r, last } => {
                if r != round {
                    break MigrationError::Malformed(format!(
                        "STRIPE_END of round {r}, expected round {round}"
                    ));
                }
                let stripe = Stripe {
                    round,
                    last,
                    memory_bytes,
                    zero_bytes,
                };
                if reports.send((index, Ok(stripe))).is_err() || last {
                    return;
                }
                (memory_bytes, zero_bytes) = (0, 0);
                // The barrier: round + 1 is not read before every connection ended
                // round `round`.
                if released.recv_timeout(wait).is_err() {
                    return;
                }
                round += 1;
            }
            Message::Abort(reason) => break MigrationError::PeerAborted(reason),
            other => {
                break MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "receiving memory on a secondary connection",
                }
            }
        }
    };
    report_error(index, ch, reports, error)
}

fn report_error(
    index: usize,
    ch: &mut Channel<BoxedConnection>,
    reports: &mpsc::Sender<Report>,
    error: MigrationError,
) {
    let reason = format!("destination: connection {index}: {error}");
    let aborted = matches!(error, MigrationError::PeerAborted(_));
    // Reported before the connection closes: the source notices the close, and the
    // primary's side then finds this reason waiting (`Barrier::first_error`).
    let _ = reports.send((index, Err(error)));
    if !aborted {
        ch.abort(&reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_deal_every_byte_once_and_always_to_the_same_connection() {
        let mut table = MemoryRangeTable::new();
        table.push(MemoryRange::new(0, 9 << 20));
        table.push(MemoryRange::new((16 << 20) + 4096, 3 << 20));
        for n in 1..=4 {
            let s = shares(&table, n);
            assert_eq!(s.len(), n);
            let total: u64 = s.iter().map(MemoryRangeTable::total_bytes).sum();
            assert_eq!(total, table.total_bytes(), "n = {n}");
            for (i, share) in s.iter().enumerate() {
                for r in share.ranges() {
                    // Every page of the range belongs to connection i.
                    let mut gpa = r.gpa;
                    while gpa < r.gpa + r.length {
                        assert_eq!(connection_of(gpa, n), i, "n = {n}, gpa {gpa:#x}");
                        gpa += 4096;
                    }
                }
            }
        }
        // A page dirtied again goes where it went before, whatever else is dirty.
        let mut one = MemoryRangeTable::new();
        one.push(MemoryRange::new(5 << 20, 4096));
        let s = shares(&one, 3);
        assert_eq!(s[connection_of(5 << 20, 3)].total_bytes(), 4096);
    }

    #[test]
    fn tokens_compare_whole_and_are_random() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_ne!(a, b);
        assert!(same_token(&a, &a));
        let mut c = a;
        c[31] ^= 1;
        assert!(!same_token(&a, &c));
    }
}
